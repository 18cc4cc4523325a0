"""Metrics shared by methods."""
