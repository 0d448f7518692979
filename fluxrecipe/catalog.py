"""Where recipe files and Hydra's config come from: the package (or the checkout), plus the user's folders.

Recipe files are registered into Hydra's `recipe` config group through the ConfigStore, so a flat folder of
YAML files is a group, and `FLUXRECIPE_RECIPE_PATH` (folders separated by os.pathsep) adds the user's own.
A user recipe shadows a built-in one of the same name; among user folders, the first listed wins.
A file that is not valid YAML is still registered, as a note of its error, so that choosing it gives that
error and choosing any other recipe is not affected.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from .schedule import string_keys

PACKAGE = Path(__file__).resolve().parent
RECIPE_PATH_ENV = "FLUXRECIPE_RECIPE_PATH"


def _packaged_or_checkout(packaged: str, checkout: str) -> Path:
    """A wheel carries the folder inside the package; a source checkout has it beside the package."""
    inside = PACKAGE / packaged
    return inside if inside.is_dir() else PACKAGE.parent / checkout


def conf_dir() -> Path:
    return _packaged_or_checkout("_conf", "conf")


def builtin_recipe_dir() -> Path:
    return _packaged_or_checkout("_recipes", "recipes")


def recipe_dirs() -> list[Path]:
    """In order of precedence, highest first: the user's folders, then the built-in recipes."""
    user = [Path(p).expanduser() for p in os.environ.get(RECIPE_PATH_ENV, "").split(os.pathsep) if p.strip()]
    return user + [builtin_recipe_dir()]


def recipe_files() -> dict[str, Path]:
    """Recipe name -> the file that defines it (the highest-precedence one)."""
    found: dict[str, Path] = {}
    for folder in reversed(recipe_dirs()):
        for path in sorted(folder.glob("*.yaml")) + sorted(folder.glob("*.yml")):
            found[path.stem] = path.resolve()
    return found


def register_recipes() -> dict[str, Path]:
    files = recipe_files()
    store = ConfigStore.instance()
    for name, path in files.items():
        try:
            node = OmegaConf.load(path)
        except (yaml.YAMLError, OSError, ValueError) as e:
            node = OmegaConf.create({"__load_error__": f"not a valid YAML file: {e}".replace("${", "$ {")})
        if isinstance(node, DictConfig):  # {double_blocks: {7: ...}}: as '7', which `recipe.alpha.double_blocks.7=...` finds
            node = OmegaConf.create(string_keys(OmegaConf.to_container(node, resolve=False)))
        if isinstance(node, DictConfig) and "defaults" in node:
            # Hydra would act on it: pull other configs in at any package (`/recipe@_global_: x` puts a file's
            # `hydra.callbacks` at the top, and Hydra instantiates those), so a recipe could run code.
            node = OmegaConf.create({"__load_error__": "a recipe may not have a `defaults` list (Hydra would compose other configs from it); remove it"})
        store.store(group="recipe", name=name, node=node, provider="fluxrecipe")
    return files
