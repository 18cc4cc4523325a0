"""Shared model builders."""
