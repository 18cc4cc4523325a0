"""One package per method: its recipe schema (config.py, torch-free) and its engine hooks."""
