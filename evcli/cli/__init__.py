"""Thin Typer layer: one module per subcommand; parses flags into a recipe and calls the library.

Nothing here imports torch at module level: ``evcli --help`` and TAB completion stay fast.
"""
