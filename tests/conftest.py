"""Test settings: offline, no progress bars, quiet threads."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("EVCLI_NO_PROGRESS", "1")
os.environ.setdefault("COLUMNS", "200")  # wide rich output: one error per line in captured stderr
