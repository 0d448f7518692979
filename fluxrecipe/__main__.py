"""`python -m fluxrecipe recipe=NAME [overrides]` (or the `fluxrecipe` command): Hydra composes the config,
run.py does the job.

Errors a user can act on (FluxRecipeError) are printed as one message with a non-zero exit; `traceback=true`
(or HYDRA_FULL_ERROR=1) shows the traceback as well. A single run is checked before Hydra makes its run folder
(run.Preflight), so a refused run writes nothing. In a multirun (`-m`) a failed job is logged and recorded in
its folder instead, so that the other jobs go on and the sweep's summary reports it (fluxrecipe.sweep); the
process still exits non-zero at the end.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import re
import signal
import sys
import threading
from typing import NoReturn

import hydra
from omegaconf import DictConfig

from . import __version__, preview, sweep
from .catalog import conf_dir, is_recipe_path, recipe_dirs, recipe_file, recipe_problem, register_recipes
from .recipe import BLOCK_OVERRIDES_ENV
from .errors import FluxRecipeError, UsageError
from .files import os_errors
from .run import EXIT_ERROR, deleted_option, fail, option_default, show_traceback, unknown_option

EXIT_INTERRUPTED = 130
PROGRAM = "fluxrecipe"  # the console script: what Hydra's help and shell completion name
# signals that end a run as Ctrl-C does (the partial output is removed): kill, a SLURM time limit, a closed terminal
UNWINDING_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


# `recipe.alpha.double_blocks.7=V`, `recipe.loras.style.strength.single_blocks=V`: one block of a schedule
BLOCK_OVERRIDE = re.compile(
    r"\+?recipe\.(?P<param>[A-Za-z_][\w-]*|loras\.[A-Za-z_][\w-]*\.strength)\."
    r"(default|img_in|time_in|guidance_in|vector_in|txt_in|final_layer|(double_blocks|single_blocks)(\.\w+)?)=.*",
    re.S,
)
# Hydra's flags that take the next argument as their value (not an override)
VALUE_FLAGS = {"-sc", "--shell-completion", "-cp", "--config-path", "-cn", "--config-name", "-cd", "--config-dir", "-p", "--package", "--info", "--experimental-rerun"}

# `python -m fluxrecipe COMMAND ...`: commands beside the merge itself, each a module with main(argv) -> int.
COMMANDS = {"verify": "fluxrecipe.verify", "summary": "fluxrecipe.sweep", "methods": "fluxrecipe.methods"}


def main() -> None:
    _keep_standard_streams_open()
    sys.stdout = _ReaderMayLeave(sys.stdout)
    if len(sys.argv) > 1 and sys.argv[1] in COMMANDS:
        module = importlib.import_module(COMMANDS[sys.argv[1]])
        sys.exit(module.main(sys.argv[2:]))
    if "--version" in sys.argv[1:]:
        print(f"{PROGRAM} {__version__}")
        sys.exit(0)
    sys.argv[0] = PROGRAM  # `python -m fluxrecipe` too: Hydra's --hydra-help and -sc name the installed command
    try:
        with os_errors():
            recipe_dirs()  # a folder named in FLUXRECIPE_RECIPE_PATH that is not there: said before Hydra starts
            sys.argv[1:] = command_line(sys.argv[1:])
    except FluxRecipeError as e:
        fail(e, "traceback=true" in sys.argv)
    sys.argv[1:] = preview.expand_switch(sys.argv[1:])
    if sweep.is_multirun(sys.argv):
        sys.argv[1:] = sweep.defer_recipe_overrides(sys.argv[1:])
    register_recipes()
    for sig in UNWINDING_SIGNALS:
        signal.signal(sig, _terminate)
    try:
        hydra.main(config_path=str(conf_dir()), config_name="config", version_base="1.3")(_task)()
    except KeyboardInterrupt:
        print("fluxrecipe: interrupted; nothing was left under the output's name", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    if sweep.failed():
        sys.exit(EXIT_ERROR)


def command_line(args: list[str]) -> list[str]:
    """The overrides as Hydra should see them, and the mistakes Hydra would answer with a page of text:
    - `recipe=NAME` is a recipe on the search path, and a mistyped name is one line ("did you mean");
    - `recipe=PATH.yaml` runs that exact file (a whole value that is a file is one path, commas and all);
    - a recipe choice that Hydra would read as something else goes to it quoted: `recipe=2024`, `recipe=true`
      or `recipe=null` is a name, not a number, a boolean or no recipe, and `recipe=a/x=y.yaml` a path;
    - `dryrun=true` or `+dryrun=true`: an option fluxrecipe does not have, named with the closest it has."""
    out, blocks = [], []
    for previous, arg in zip([None, *args], args):
        block = BLOCK_OVERRIDE.fullmatch(arg) if previous not in VALUE_FLAGS else None
        if block:  # the recipe loader gives this parameter a shape the block can be added to
            blocks.append(block["param"])
        m = re.fullmatch(r"(\+{0,2})([A-Za-z_][\w-]*(?:\.[\w-]+)*)=(.*)", arg, re.S) if previous not in VALUE_FLAGS else None
        if m and (message := unknown_option(m[2])):
            raise UsageError(message)
        deleted = re.fullmatch(r"~([A-Za-z_][\w-]*(?:\.[\w-]+)*)(=.*)?", arg, re.S) if previous not in VALUE_FLAGS else None
        if deleted and (default := option_default(deleted[1])) is not None:
            raise UsageError(deleted_option(deleted[1], default[0]))
        if m and m[1] == "" and m[2] == "recipe" and not re.match(r"\w+\(", m[3]):  # not a sweep function
            arg = "recipe=" + ",".join(_recipe_choice(v, sweep.is_multirun(args)) for v in _recipe_values(m[3]))
        out.append(arg)
    if blocks:
        os.environ[BLOCK_OVERRIDES_ENV] = ",".join(dict.fromkeys(blocks))
    return out


def _recipe_values(value: str) -> list[str]:
    """The recipes of `recipe=VALUE`: one file, when the whole value is one (a sweep's job folder has commas
    in its name), else the comma-separated choices of a sweep."""
    return [value] if is_recipe_path(value) and recipe_file(value) is not None else value.split(",")


def _recipe_choice(value: str, multirun: bool) -> str:
    """One recipe choice, checked (a sweep's pre-flight reports it with the sweep's other problems), as Hydra
    should read it."""
    if not multirun and (problem := recipe_problem(value)):
        raise UsageError(problem)
    return _hydra_string(value)


def _hydra_string(text: str) -> str:
    """`text` written so that Hydra's override parser reads back that very string: as it is where it would
    (a plain name keeps the job folders' names plain), else quoted (a backslash escapes a quote, and itself
    before a quote or at the end)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        if OverridesParser.create().parse_override(f"recipe={text}").value() == text:
            return text
    except Exception:  # noqa: BLE001 - any value the parser refuses is quoted
        pass
    escaped = re.sub(r"(\\*)('|$)", lambda q: q[1] * 2 + ("\\'" if q[2] else ""), text)
    return f"'{escaped}'"


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


class _ReaderMayLeave:
    """Standard output for the whole command: when it is a pipe whose reader is gone (`| head`), the command
    ends there, quietly, with status 1, whatever was printing (a plan, a log line, Hydra's help, a summary).
    A BrokenPipeError would otherwise reach Hydra, which prints it as a traceback, or Python's exit, which
    prints 'Exception ignored'. SystemExit passes through Hydra and through a job's own error handling."""

    def __init__(self, stream) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._reader_gone()

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._reader_gone()

    def __getattr__(self, name: str):
        return getattr(self._stream, name)

    @staticmethod
    def _reader_gone() -> NoReturn:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.__stdout__.fileno())  # what is still buffered goes nowhere
        raise SystemExit(EXIT_ERROR)


def _terminate(signum, frame) -> None:
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


def _task(cfg: DictConfig):
    from . import job  # the merge, then its previews and keep_weights

    if sweep.in_multirun():
        with _terminate_unwinds():
            return sweep.run_recorded(cfg, job.run, show_traceback(cfg))
    try:
        return job.run(cfg)
    except FluxRecipeError as e:
        fail(e, show_traceback(cfg))


if __name__ == "__main__":
    main()
