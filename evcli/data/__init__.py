"""Dataset readers for standard layouts and the small built-in datasets."""
