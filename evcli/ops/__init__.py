"""Reusable tensor operations shared by methods: N:M masks and packing, FLOPs counting."""
