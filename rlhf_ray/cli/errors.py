"""How the `rlhf-ray` command reports a failure: one readable line on stderr.

Every failure ends the command with a non-zero exit code and a single line
`rlhf-ray: error: <what went wrong and what to do>`; the full traceback is
printed only with `--debug`. Errors a user can act on (a config key, a data
row, a missing file, an unreachable cluster) show their own message, which
already names the key, file or address. Anything else is a bug or an
environment problem: its type and first line are shown, with a pointer to
`--debug`.

Exit codes: 0 success; 1 a failure; 2 a command line argparse rejects;
130 interrupted (Ctrl-C), as shells report SIGINT.

The package reports what goes wrong along the way (a damaged checkpoint
passed over, a dead actor recovered from, a signal that stops the job)
through `logging` under `rlhf_ray`; `configure_logging` decides what the
command shows of it: its warnings, one line each on stderr,
`rlhf-ray: warning: <message>`. Its INFO records (a tokenizer padding with
its eos token) stay out of the way.
"""

from __future__ import annotations

import logging
import sys
import traceback

PROG = "rlhf-ray"
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_STOPPED = 75  # stopped on a signal after writing a checkpoint: run the same command again to continue


class _StderrHandler(logging.StreamHandler):
    """Writes to `sys.stderr` as it is when a record arrives (a test's capture replaces it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


class _CommandFormatter(logging.Formatter):
    """`rlhf-ray: warning: <message>`: the level in lower case, as in the command's `error:` lines."""

    def format(self, record: logging.LogRecord) -> str:
        return f"{PROG}: {record.levelname.lower()}: {super().format(record)}"


def configure_logging() -> None:
    """Show the package's warnings (and worse) on stderr, one `rlhf-ray: warning: <message>` line each.
    Calling it again changes nothing."""
    logger = logging.getLogger("rlhf_ray")
    if not any(isinstance(handler, _StderrHandler) for handler in logger.handlers):
        handler = _StderrHandler()
        handler.setLevel(logging.WARNING)
        handler.setFormatter(_CommandFormatter())
        logger.addHandler(handler)


class CLIError(Exception):
    """A failure the user can act on, raised by the CLI itself; the message is shown as is."""


def user_error_types() -> tuple[type[BaseException], ...]:
    """Exceptions whose message is written for the user (see the module docstring).

    `ConfigError`, `DataError`, `UnknownAlgorithmError` and `PlacementError`
    are `ValueError`s; they are named here so that the list documents what the
    command expects. Imported on the failure path only, so a fast command
    (`rlhf-ray presets`) never pays for Ray or torch.
    """
    from rlhf_ray.algorithms.registry import UnknownAlgorithmError
    from rlhf_ray.cli.submit import SubmitError
    from rlhf_ray.config.schema import ConfigError
    from rlhf_ray.data.formats import DataError
    from rlhf_ray.jobs.common import NonFiniteError, RecoveryError
    from rlhf_ray.runtime.placement import PlacementError

    return (CLIError, SubmitError, ConfigError, DataError, UnknownAlgorithmError, PlacementError, NonFiniteError,
            RecoveryError, ValueError, FileNotFoundError, ConnectionError, OSError, ImportError)


def root_cause(err: BaseException) -> BaseException:
    """The exception a Ray task or actor raised, when `err` wraps one (`RayTaskError.cause`)."""
    seen = {id(err)}
    while isinstance(getattr(err, "cause", None), BaseException) and id(err.cause) not in seen:
        err = err.cause
        seen.add(id(err))
    return err


def one_line(text: str) -> str:
    """Collapse a message's lines and runs of spaces into one line."""
    return " ".join(text.split())


def describe(err: BaseException) -> str:
    """The text after `rlhf-ray: error: ` for `err`."""
    from rlhf_ray.runtime.actor_group import ActorGroupError

    if isinstance(err, ActorGroupError):  # its first line names the role, the call and what the role raised
        first = next((line.strip() for line in str(err).splitlines() if line.strip()), "")
        return f"{first} (run with --debug for the remote traceback)"
    err = root_cause(err)
    if isinstance(err, OSError) and err.filename is not None and err.strerror and not isinstance(err, ConnectionError):
        return f"{err.strerror}: {err.filename}"
    message = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    if isinstance(err, user_error_types()):
        return one_line(message) or type(err).__name__
    first = next((line.strip() for line in message.splitlines() if line.strip()), "")
    detail = f"{type(err).__name__}: {first}" if first else type(err).__name__
    return f"{detail} (run with --debug for the full traceback)"


def report(err: BaseException, *, debug: bool) -> int:
    """Print `err` as the CLI does and return the exit code."""
    if isinstance(err, KeyboardInterrupt):
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    from rlhf_ray.jobs import StopRequested

    if isinstance(err, StopRequested):
        print(f"{PROG}: stopped: {err}", file=sys.stderr)
        return EXIT_STOPPED
    if debug:
        traceback.print_exception(err)
    print(f"{PROG}: error: {describe(err)}", file=sys.stderr)
    return EXIT_FAILURE
