"""The ``evcli`` Typer application and its error handling (one line per user mistake, exit codes).

Exit codes: 0 ok, 1 runtime failure, 2 usage or recipe error, 3 data/checkpoint missing or
unreadable, 4 hardware requirement not met, 130 interrupted. ``EVCLI_DEBUG=1`` shows tracebacks.
"""

from __future__ import annotations

import inspect
import os
import sys

import typer

from evcli import __version__
from evcli.cli import coarse2fine as coarse2fine_cmd
from evcli.cli import deshadow as deshadow_cmd
from evcli.cli import distill_gan as distill_gan_cmd
from evcli.cli import env as env_cmd
from evcli.cli import mix as mix_cmd
from evcli.cli import pointcloud as pointcloud_cmd
from evcli.cli import qat as qat_cmd
from evcli.cli import quant_sr as quant_sr_cmd
from evcli.cli import recipe_cmd
from evcli.cli import sparsify as sparsify_cmd
from evcli.console import error
from evcli.errors import EXIT_HARDWARE, EXIT_INTERRUPTED, EvcliError

app = typer.Typer(
    name="evcli",
    help="Train, compress and evaluate efficient vision models: one engine, one checkpoint format, one "
    "recipe format. Every command runs offline on built-in data when no --data is given.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"evcli {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """evcli: efficient vision models from the command line."""


# One line per method subcommand, added when the subcommand works.
app.add_typer(mix_cmd.app, name="mix")
app.add_typer(coarse2fine_cmd.app, name="coarse2fine")
app.add_typer(deshadow_cmd.app, name="deshadow")
app.add_typer(sparsify_cmd.app, name="sparsify")
app.add_typer(qat_cmd.app, name="qat")
app.add_typer(distill_gan_cmd.app, name="distill-gan")
app.add_typer(quant_sr_cmd.app, name="quant-sr")
app.add_typer(pointcloud_cmd.app, name="pointcloud")

app.add_typer(recipe_cmd.app, name="recipe")
env_cmd.register(app)


def unwrap_help(text: str | None) -> str | None:
    """Join the hard-wrapped lines of each help paragraph (Typer prints a help text's single newlines as they are,
    which rewraps into ragged lines in any terminal width). Indented lines (examples) and list items keep theirs."""
    if not text:
        return text
    paragraphs = []
    for para in inspect.cleandoc(text).split("\n\n"):
        lines: list[str] = []
        for line in para.splitlines():
            keep = not lines or line.startswith((" ", "\t", "- ", "* ")) or lines[-1].startswith((" ", "\t"))
            if keep:
                lines.append(line)
            else:
                lines[-1] = f"{lines[-1].rstrip()} {line.strip()}"
        paragraphs.append("\n".join(lines))
    return "\n\n".join(paragraphs)


def _unwrap_all(typer_app: typer.Typer) -> None:
    """Apply :func:`unwrap_help` to a Typer app's help, its commands' and its groups', recursively."""
    typer_app.info.help = unwrap_help(typer_app.info.help)
    for command in typer_app.registered_commands:
        command.help = unwrap_help(command.help or inspect.getdoc(command.callback))
    for group in typer_app.registered_groups:
        group.help = unwrap_help(group.help)
        if group.typer_instance is not None:
            _unwrap_all(group.typer_instance)


_unwrap_all(app)


def _clean_message(message: str) -> str:
    """A message re-raised from a DataLoader worker carries the worker traceback; keep its last line."""
    if "Original Traceback" not in message:
        return message
    last = [line for line in message.strip().splitlines() if line.strip()][-1]
    return last.split(": ", 1)[1] if ": " in last and last.split(": ", 1)[0].count(".") else last


def main() -> None:
    """Console-script entry point."""
    debug = os.environ.get("EVCLI_DEBUG") == "1"
    try:
        app(prog_name="evcli")
    except EvcliError as exc:
        if debug:
            raise
        error(_clean_message(exc.message), exc.hint)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        error("interrupted")
        sys.exit(EXIT_INTERRUPTED)
    except Exception as exc:
        if type(exc).__name__ == "OutOfMemoryError" and not debug:
            error(f"out of memory: {str(exc).splitlines()[0]}", "lower --batch-size or --img-size")
            sys.exit(EXIT_HARDWARE)
        raise
