"""`fluxrecipe recipe=NAME [overrides]` (or `python -m fluxrecipe`): the command line's entry point.

The first argument may name a command beside the merge (commands.py: verify, summary, methods; `help` is
--help, `help COMMAND` that command's). Otherwise the overrides are checked and rewritten for Hydra (arguments.py), Hydra composes the
config, and the task runs one job (job.py) or, in a multirun (`-m`), one recorded job of a sweep
(multirun.py). Errors a user can act on (FluxRecipeError) are printed as one message with a non-zero exit;
`traceback=true` (or HYDRA_FULL_ERROR=1) shows the traceback as well. A single run is checked before Hydra
makes its run folder (preflight.Preflight), so a refused run writes nothing. In a multirun a failed job is
logged and recorded in its folder instead, so that the other jobs go on and the sweep's summary reports it;
the process still exits non-zero at the end.
"""

from __future__ import annotations

import contextlib
import difflib
import errno
import os
import signal
import sys
import threading
from typing import Any, NoReturn

import hydra
from omegaconf import DictConfig

from .. import __version__
from ..catalog import conf_dir, recipe_dirs
from ..errors import FluxRecipeError, UsageError
from ..files import os_errors
from ..recipe import BLOCK_OVERRIDES_ENV
from . import job, multirun, settings
from .arguments import command_line, defer_recipe_overrides, is_multirun
from .commands import COMMANDS, PROGRAM
from .exits import EXIT_ERROR, EXIT_INTERRUPTED, fail
from .hydra_setup import register

# signals that end a run as Ctrl-C does (the partial output is removed): kill, a SLURM time limit, a closed terminal
UNWINDING_SIGNALS = (signal.SIGTERM, signal.SIGHUP)
HELP = "help"  # `fluxrecipe help` is --help; `fluxrecipe help COMMAND` is COMMAND --help


def main() -> None:
    _keep_standard_streams_open()
    sys.stdout = _StandardOutput(sys.stdout)
    args = sys.argv[1:]
    if args[:1] == [HELP]:
        args = _help(args[1:])
    if args and args[0] in COMMANDS:
        sys.exit(COMMANDS[args[0]](args[1:]))
    if "--version" in args:
        print(f"{PROGRAM} {__version__}")
        sys.exit(0)
    sys.argv[0] = PROGRAM  # `python -m fluxrecipe` too: Hydra's --hydra-help and -sc name the installed command
    try:
        with os_errors():
            recipe_dirs()  # a folder named in FLUXRECIPE_RECIPE_PATH that is not there: said before Hydra starts
            sys.argv[1:] = command_line(args)
            if is_multirun(args):
                sys.argv[1:] = defer_recipe_overrides(sys.argv[1:])
    except FluxRecipeError as e:
        fail(e, "traceback=true" in args)
    register()
    for sig in UNWINDING_SIGNALS:
        signal.signal(sig, _terminate)
    try:
        hydra.main(config_path=str(conf_dir()), config_name="config", version_base="1.3")(task)()
    except KeyboardInterrupt:
        print("fluxrecipe: interrupted; nothing was left under the output's name", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    finally:  # this command line's blocks (its jobs have read them), not a later load_recipe's in this process
        os.environ.pop(BLOCK_OVERRIDES_ENV, None)
    if multirun.failed():
        sys.exit(EXIT_ERROR)


def _help(args: list[str]) -> list[str]:
    """`help` is --help, `help COMMAND` is COMMAND --help; `help` of a command there is not is one line."""
    if not args:
        return ["--help"]
    if args[0] not in COMMANDS:
        close = difflib.get_close_matches(args[0], COMMANDS, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        fail(UsageError(f"help {args[0]}: no command {args[0]!r}{hint}; the commands: {', '.join(COMMANDS)}"), False)
    return [args[0], "--help"]


def task(cfg: DictConfig) -> Any:
    """Hydra's task: one job, or one recorded job of a multirun."""
    if multirun.in_multirun():
        with _terminate_unwinds():
            return multirun.run_job(cfg)
    try:
        return job.run_config(cfg)
    except FluxRecipeError as e:
        fail(e, settings.show_traceback(cfg))


def _keep_standard_streams_open() -> None:
    """A closed stdin, stdout or stderr (`2>&-`) gets /dev/null: otherwise the next file opened (an output
    shard) would take its number, and anything written to stderr would land in it."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            os.open(os.devnull, os.O_RDWR)  # takes the lowest free number: this one
    if sys.stdout is None:
        sys.stdout = open(1, "w", closefd=False)
    if sys.stderr is None:
        sys.stderr = open(2, "w", closefd=False)


class _StandardOutput:
    """Standard output for the whole command: when it cannot be written (a pipe whose reader is gone, `| head`;
    a full disk, `> /dev/full`; an I/O error), the command ends there with status 1, whatever was printing (a
    plan, a log line, Hydra's help, a summary): quietly for a reader that left, else with one line on stderr.
    Otherwise a BrokenPipeError would reach Hydra, which prints it as a traceback, or Python's exit, which
    prints 'Exception ignored'; and the log's handler would print '--- Logging error ---' for every line.
    SystemExit passes through Hydra, through logging and through a job's own error handling."""

    def __init__(self, stream) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except OSError as e:
            self._unwritable(e)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError as e:
            self._unwritable(e)

    def __getattr__(self, name: str):
        return getattr(self._stream, name)

    @staticmethod
    def _unwritable(error: OSError) -> NoReturn:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.__stdout__.fileno())  # what is still buffered goes nowhere
        if error.errno != errno.EPIPE:  # a reader that left needs no word; a full disk or a broken device does
            with contextlib.suppress(OSError):
                print(f"{PROGRAM}: error: standard output: {error.strerror or error}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_ERROR)


def _terminate(_signum, _frame) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def _terminate_unwinds():
    """SIGTERM and SIGHUP unwind a job like Ctrl-C (its partial output is removed) in a process of its own as
    well: a joblib worker, a submitit or SLURM job (which SLURM ends with SIGTERM at its time limit)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, _terminate) for sig in UNWINDING_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
