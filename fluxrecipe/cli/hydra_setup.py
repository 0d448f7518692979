"""What Hydra must know before it composes a config: the recipe group (read from the recipe folders by a
config source of fluxrecipe's own), the run options with their defaults (the config `fluxrecipe_options`, from
the one table of cli/options.py), and the resolvers `--help` uses (the options, one line each; the recipe files
ignored for their names). `register()` is idempotent; Hydra's launchers carry what it registers
into their worker processes.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.object_type import ObjectType
from hydra.core.plugins import Plugins
from hydra.plugins.config_source import ConfigLoadError, ConfigResult, ConfigSource
from hydra.plugins.search_path_plugin import SearchPathPlugin
from omegaconf import OmegaConf

from ..catalog import GROUP, ignored_recipe_files, recipe_file, recipe_files
from ..recipe import load_recipe_file
from ..text import printable
from .options import CONFIG_NAME, defaults, help_table


class RecipeSource(ConfigSource):
    """Hydra's `recipe` group, read from the recipe folders: listing reads no file, loading parses one."""

    @staticmethod
    def scheme() -> str:
        return "fluxrecipe"

    def available(self) -> bool:
        return True

    def is_group(self, config_path: str) -> bool:
        return config_path.strip("/") in ("", GROUP)

    def is_config(self, config_path: str) -> bool:
        choice = self._choice(config_path)
        return choice is not None and recipe_file(choice) is not None

    def list(self, config_path: str, results_filter: ObjectType | None) -> list[str]:
        path = config_path.strip("/")
        if path == GROUP and results_filter in (None, ObjectType.CONFIG):
            return sorted(recipe_files())
        if path == "" and results_filter in (None, ObjectType.GROUP):
            return [GROUP]
        return []

    def load_config(self, config_path: str) -> ConfigResult:
        choice = self._choice(config_path)
        file = recipe_file(choice) if choice is not None else None
        if file is None:
            raise ConfigLoadError(f"recipe not found: {config_path}")
        return ConfigResult(config=load_recipe_file(file), path=f"{self.scheme()}://{file.parent}", provider=self.provider, header={"package": None})

    @staticmethod
    def _choice(config_path: str) -> str | None:
        """`recipe/NAME` or `recipe/PATH` (as given, `recipe//abs/x.yaml` for an absolute one) -> NAME or PATH."""
        group, _, choice = config_path.partition("/")
        return choice if group == GROUP and choice else None


class RecipeSearchPath(SearchPathPlugin):
    def manipulate_search_path(self, search_path: Any) -> None:
        search_path.append(provider="fluxrecipe", path=f"{RecipeSource.scheme()}://{GROUP}")


def ignored_note() -> str:
    """For `--help` (conf/config.yaml's help footer): the recipe files ignored for their names, escaped."""
    ignored = ignored_recipe_files()
    if not ignored:
        return ""
    names = ", ".join(printable(repr(p.name)) for p in ignored)
    text = f"\nIgnored (a recipe file's name may hold only A-Z a-z 0-9 _ . -; rename it, or give it as recipe=PATH): {names}"
    return _template_text(text)


def options_help() -> str:
    """For `--help`: the options, one line each, from the table that defines them."""
    return _template_text(help_table())


def _template_text(text: str) -> str:
    """Hydra fills the help template with string.Template: a $ of the text is text."""
    return text.replace("$", "$$")


def register() -> None:
    """Make Hydra see the recipe group, the options and the help's resolvers (idempotent)."""
    plugins = Plugins.instance()
    plugins.register(RecipeSource)
    plugins.register(RecipeSearchPath)
    ConfigStore.instance().store(name=CONFIG_NAME, node=defaults())
    _preflight_sweepers()
    OmegaConf.register_new_resolver("fluxrecipe.ignored_recipes", ignored_note, replace=True)
    OmegaConf.register_new_resolver("fluxrecipe.options", options_help, replace=True)


def _preflight_sweepers() -> None:
    """hydra/sweeper=basic (the default) and optuna as fluxrecipe's sweepers (hydra_plugins/fluxrecipe_sweeper.py:
    Hydra's behind the pre-flight), stored over Hydra's presets of the same names once the plugins registered
    theirs. (A YAML preset cannot shadow optuna's: its schema has a defaults list.) Optuna maximises: every
    score is better higher, and search.objective sets how many directions."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeperConf

    store = ConfigStore.instance()
    basic = dataclasses.make_dataclass("PreflightSweeperConf", [("_target_", str, "hydra_plugins.fluxrecipe_sweeper.PreflightSweeper")], bases=(BasicSweeperConf,))
    store.store(group="hydra/sweeper", name="basic", node=basic, provider="fluxrecipe")
    try:
        from hydra_plugins.hydra_optuna_sweeper.config import OptunaSweeperConf
    except ImportError:  # the sweep extra is not installed: hydra/sweeper=optuna says so (extras.py)
        return
    fields = [("_target_", str, "hydra_plugins.fluxrecipe_sweeper.PreflightOptunaSweeper"), ("direction", Any, "maximize"), ("n_jobs", int, 1)]
    store.store(group="hydra/sweeper", name="optuna", node=dataclasses.make_dataclass("PreflightOptunaSweeperConf", fields, bases=(OptunaSweeperConf,)), provider="fluxrecipe")


# conf/hydra/launcher/joblib.yaml replaces the joblib plugin's preset of the same name (n_jobs 2, not one job
# per core); Hydra still checks it against the plugin's schema, which is right, and warns that it does.
warnings.filterwarnings("ignore", message=r"\s*'hydra/launcher/joblib' is validated against ConfigStore schema", category=UserWarning)
