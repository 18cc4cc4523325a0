#!/usr/bin/env bash
# Regenerate the shell completion scripts from the installed `evcli` entry point.
# (Typer bakes the program name from the running entry point: do not use `python -m evcli`.)
set -euo pipefail
cd "$(dirname "$0")"
for shell in bash zsh fish; do
  _TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION=1 evcli --show-completion "$shell" > "evcli.$shell"
done
