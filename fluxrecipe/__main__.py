"""`python -m fluxrecipe recipe=NAME [overrides]`: Hydra composes the config, run.py does the job.

Errors a user can act on (FluxRecipeError) are printed as one message with a non-zero exit; `traceback=true`
(or HYDRA_FULL_ERROR=1) shows the traceback as well.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys

import hydra
from omegaconf import DictConfig

from .catalog import conf_dir, register_recipes
from .errors import FluxRecipeError

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130


# `python -m fluxrecipe COMMAND ...`: commands beside the merge itself, each a module with main(argv) -> int.
COMMANDS = {"verify": "fluxrecipe.verify", "summary": "fluxrecipe.sweep"}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in COMMANDS:
        module = importlib.import_module(COMMANDS[sys.argv[1]])
        sys.exit(module.main(sys.argv[2:]))
    register_recipes()
    signal.signal(signal.SIGTERM, _terminate)  # unwind like Ctrl-C, so the partial output is removed
    try:
        hydra.main(config_path=str(conf_dir()), config_name="config", version_base="1.3")(_task)()
    except KeyboardInterrupt:
        print("fluxrecipe: interrupted; nothing was left under the output's name", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)


def _terminate(signum, frame) -> None:
    raise KeyboardInterrupt


def _task(cfg: DictConfig):
    from .run import run_job

    try:
        return run_job(cfg)
    except FluxRecipeError as e:
        if cfg.get("traceback") or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"fluxrecipe: error: {e}", file=sys.stderr)
        sys.exit(EXIT_ERROR)


if __name__ == "__main__":
    main()
