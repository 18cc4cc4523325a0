"""Entry point for ``python -m evcli``."""

from evcli.cli.app import main

main()
