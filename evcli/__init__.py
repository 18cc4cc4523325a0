"""evcli: one command-line tool for efficient vision models (training, compression, evaluation)."""

__version__ = "0.1.0"
