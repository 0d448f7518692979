"""fluxrecipe's run options: those conf/config.yaml defines, with their defaults, and the messages for an
option that does not exist or was deleted."""

from __future__ import annotations

import difflib
import functools
import json
from typing import Any

from omegaconf import OmegaConf

from ..catalog import conf_dir

SUBCOMMAND_OPTIONS = ("recipe", "sweep")  # config groups chosen like options (recipe=NAME, sweep=NAME)


@functools.cache
def defaults() -> dict[str, Any]:
    """The run options conf/config.yaml defines, with their defaults (`preview`: a mapping of its settings)."""
    config = OmegaConf.to_container(OmegaConf.load(conf_dir() / "config.yaml"))
    return {k: v for k, v in config.items() if k not in ("defaults", "hydra")}


def groups() -> dict[str, list[str]]:
    """Each option that holds settings (`preview`), with its settings."""
    return {name: list(value) for name, value in defaults().items() if isinstance(value, dict)}


def default_of(name: str) -> tuple[Any] | None:
    """(default,) of an option or a setting of one (`preview.steps`); None for any other name."""
    head, _, rest = name.partition(".")
    options = defaults()
    if head not in options or (rest and not (isinstance(options[head], dict) and rest in options[head])):
        return None
    return (options[head][rest] if rest else options[head],)


def known_options() -> list[str]:
    """The run options, and the config groups chosen as options (recipe=, sweep=)."""
    return [*defaults(), *SUBCOMMAND_OPTIONS]


def unknown_option(name: str) -> str | None:
    """The message for an option fluxrecipe does not have (with the closest it has), or None if it has it.
    `name` may be a setting of an option (`preview.steps`); a recipe's own values (`recipe.alpha`) are the
    recipe loader's to check."""
    head, _, rest = name.partition(".")
    if head in ("recipe", "hydra", "sweep") and rest:
        return None
    known = known_options()
    if head in known and rest:
        settings = groups().get(head)
        known = [f"{head}.{k}" for k in settings] if settings else []
        name = f"{head}.{rest.partition('.')[0]}"
    if name in known:
        return None
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]}?)" if close else f" (options: {', '.join(known)})" if known else f" ({head} has no settings)"
    return f"unknown option {name!r}{hint}; `fluxrecipe --help` lists them"


def deleted_option(name: str, default: Any) -> str:
    instead = f"its settings ({name}.NAME=VALUE)" if isinstance(default, dict) else f"it ({name}={json.dumps(default)} is its default)"
    return f"option {name!r} has no value (~{name} deletes it): every option needs one; set {instead} instead"
