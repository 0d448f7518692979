"""`python -m fluxrecipe recipe=NAME [overrides]`: Hydra composes the config, run.py does the job.

Errors a user can act on (FluxRecipeError) are printed as one message with a non-zero exit; `traceback=true`
(or HYDRA_FULL_ERROR=1) shows the traceback as well. In a multirun (`-m`) a failed job is logged and recorded
in its folder instead, so that the other jobs go on and the sweep's summary reports it (fluxrecipe.sweep); the
process still exits non-zero at the end.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import signal
import sys
import threading

import hydra
from omegaconf import DictConfig

from . import sweep
from .catalog import conf_dir, register_recipes
from .errors import FluxRecipeError

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130


# `python -m fluxrecipe COMMAND ...`: commands beside the merge itself, each a module with main(argv) -> int.
COMMANDS = {"verify": "fluxrecipe.verify", "summary": "fluxrecipe.sweep", "methods": "fluxrecipe.methods"}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in COMMANDS:
        module = importlib.import_module(COMMANDS[sys.argv[1]])
        sys.exit(module.main(sys.argv[2:]))
    if sweep.is_multirun(sys.argv):
        sys.argv[1:] = sweep.defer_recipe_overrides(sys.argv[1:])
    register_recipes()
    signal.signal(signal.SIGTERM, _terminate)  # unwind like Ctrl-C, so the partial output is removed
    try:
        hydra.main(config_path=str(conf_dir()), config_name="config", version_base="1.3")(_task)()
    except KeyboardInterrupt:
        print("fluxrecipe: interrupted; nothing was left under the output's name", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    if sweep.failed():
        sys.exit(EXIT_ERROR)


def _terminate(signum, frame) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def _terminate_unwinds():
    """SIGTERM unwinds a job like Ctrl-C (its partial output is removed) in a process of its own as well:
    a joblib worker, a submitit or SLURM job (which SLURM ends with SIGTERM at its time limit)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _task(cfg: DictConfig):
    from .run import run_job

    show_traceback = bool(cfg.get("traceback")) or os.environ.get("HYDRA_FULL_ERROR") == "1"
    if sweep.in_multirun():
        with _terminate_unwinds():
            return sweep.run_recorded(cfg, run_job, show_traceback)
    try:
        return run_job(cfg)
    except FluxRecipeError as e:
        if show_traceback:
            raise
        print(f"fluxrecipe: error: {e}", file=sys.stderr)
        sys.exit(EXIT_ERROR)


if __name__ == "__main__":
    main()
