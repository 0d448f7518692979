"""fluxrecipe's Hydra sweeper: Hydra's basic sweeper behind a pre-flight (fluxrecipe/cli/multirun.py).

Hydra instantiates plugins only from the `hydra_plugins` namespace package, so the class lives here;
conf/config.yaml selects it as `hydra.sweeper._target_`. It makes the same jobs, in the same order, as the
basic sweeper, and hands them to whichever launcher is configured (basic, joblib, submitit), but only after
every job was composed and planned in this process and nothing was found wrong, each job named by what
differs between them.
"""

from __future__ import annotations

from typing import Any

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser


class PreflightSweeper(BasicSweeper):
    def sweep(self, arguments: list[str]) -> Any:
        from fluxrecipe.cli.multirun import before_launch  # here: Hydra imports every plugin of every app it starts

        assert self.config is not None and self.hydra_context is not None
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        all_jobs = BasicSweeper.split_arguments(parser.parse_overrides([*self._parse_config(), *arguments]), None)[0]
        self._checked_jobs = before_launch(self.config, self.hydra_context.config_loader, all_jobs)
        if self._checked_jobs is None:
            return []  # a dry run: every job planned and printed, none launched
        return super().sweep(arguments)

    def split_arguments(self, overrides: Any, max_batch_size: int | None) -> list[list[list[str]]]:  # noqa: ARG002 - split before, in sweep()
        """The jobs the pre-flight checked (and named), in batches as the basic sweeper makes them."""
        jobs = self._checked_jobs
        size = len(jobs) if max_batch_size in (None, -1) else max_batch_size
        return [jobs[i : i + size] for i in range(0, len(jobs), size)]


try:  # the sweep extra's Optuna sweeper (hydra-optuna-sweeper); without it hydra/sweeper=optuna says which extra
    from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper  # optuna itself only once it is chosen
except ImportError:
    OptunaSweeper = None

if OptunaSweeper is not None:

    class PreflightOptunaSweeper(OptunaSweeper):
        """Hydra's Optuna sweeper behind the pre-flight: the search space and one composed job are checked
        before the first trial, and the directions follow search.objective (one, or one per objective of a
        Pareto front; every score is better higher)."""

        def sweep(self, arguments: list[str]) -> Any:
            from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides  # imported by the sweeper's __init__

            from fluxrecipe.cli.multirun import before_search

            impl = self.sweeper
            impl._process_searchspace_config()
            space, fixed = create_params_from_overrides([*impl._parse_sweeper_params_config(), *arguments])
            directions = before_search(impl.config, impl.hydra_context.config_loader, space, fixed, impl.n_trials)
            if directions is None:
                return None  # a dry run: the first trial's job planned and printed, none launched
            impl.direction = directions
            return super().sweep(arguments)
