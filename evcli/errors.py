"""Errors a user can cause, each tied to the exit code a script or CI can rely on.

The CLI turns any :class:`EvcliError` into one line on stderr (plus an optional hint) and exits with
its code; a traceback is shown only when ``EVCLI_DEBUG=1``. Anything else is a bug and exits 1 with
a traceback.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_DATA = 3
EXIT_HARDWARE = 4
EXIT_INTERRUPTED = 130
EXIT_PREEMPTED = 143  # SIGTERM / SIGUSR1 (a scheduler's preemption): checkpoint saved, requeue with --resume


class EvcliError(Exception):
    """Base class of errors reported as one clear line.

    Args:
        message: what went wrong, one line, naming the file / key / value involved.
        hint: optional second line telling the user what to do about it.
    """

    exit_code = EXIT_FAILURE

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint


class UsageError(EvcliError):
    """A wrong flag value, an unknown model name, an impossible combination of options."""

    exit_code = EXIT_USAGE


class RecipeError(UsageError):
    """A recipe file or ``--set`` override that does not validate against the schema."""


class DataError(EvcliError):
    """Data missing, empty or unreadable (folders, images, point files)."""

    exit_code = EXIT_DATA


class CheckpointError(DataError):
    """A checkpoint or weights file missing, unreadable, unsafe (pickle) or for another model."""


class HardwareError(EvcliError):
    """A hardware requirement is not met (e.g. fp16 asked for without a CUDA device)."""

    exit_code = EXIT_HARDWARE


class MethodContractError(EvcliError):
    """A method broke the engine contract (a frozen module with trainable parameters, an optimizer over
    parameters of no trained module): a bug of the method, named precisely."""

    exit_code = EXIT_FAILURE


class TrainingDiverged(EvcliError):
    """The loss became NaN/inf; the last good checkpoint is kept."""

    exit_code = EXIT_FAILURE


class Interrupted(EvcliError):
    """The run was interrupted (Ctrl-C / SIGINT); state was saved where possible."""

    exit_code = EXIT_INTERRUPTED


class Preempted(EvcliError):
    """A scheduler asked the run to stop (SIGTERM / SIGUSR1); a checkpoint was saved at the step boundary."""

    exit_code = EXIT_PREEMPTED
