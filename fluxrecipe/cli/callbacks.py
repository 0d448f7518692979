"""fluxrecipe's Hydra callbacks (conf/config.yaml, hydra.callbacks): a single run's pre-flight before Hydra
makes its run folder, and a multirun's summary at its end."""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, read_write

from ..errors import FluxRecipeError
from ..sweep.preflight import JobCheck, PipelineChecks
from . import settings
from .exits import EXIT_ERROR, fail
from .job import print_dry_run
from .multirun import summarize_at_end
from .preflight import check_config, check_run_dir, no_run_folder, refuse, remember, wants_run_folder


class Preflight(Callback):
    """Registered in conf/config.yaml under hydra.callbacks: a single run's checks, before Hydra makes the run
    folder. A run that is refused (a mistyped option, an unused recipe parameter, a sweep without -m, a bad
    recipe, source or preview setting) writes nothing at all; a dry run is printed here and ends (nothing
    written either); a run that passes runs on the plan made here."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            with read_write(config.hydra.runtime):  # the run folder, as Hydra's run_job will set it
                config.hydra.runtime.output_dir = os.path.abspath(str(config.hydra.run.dir))
            check = check_config(config, JobCheck(0, "run", Path(config.hydra.runtime.output_dir)), None, PipelineChecks())
            refuse(check)
            if check.dry_run:
                print_dry_run(check)
            elif wants_run_folder(config, check):
                check_run_dir(Path(str(config.hydra.run.dir)))
            else:
                no_run_folder(config)
        except FluxRecipeError as e:
            if settings.show_traceback(config):
                traceback.print_exception(e)
                sys.exit(EXIT_ERROR)
            fail(e, False)
        if check.dry_run:
            sys.exit(0)  # the dry run is done: Hydra is not to make its run folder
        check.folder = Path(config.hydra.runtime.output_dir)  # where the job will look for this check
        remember([check])


class SweepSummary(Callback):
    """Writes the summary when a multirun ends. It runs in the process that launched the sweep; with joblib or
    submitit the jobs ran elsewhere, so everything comes from the files the jobs left in the sweep folder."""

    def __init__(self) -> None:
        self.sweep_dir: str | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.sweep_dir = str(config.hydra.sweep.dir)  # resolved now: ${now:...} must not move by the end

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        summarize_at_end(Path(self.sweep_dir or str(config.hydra.sweep.dir)))
