"""Where recipe files and Hydra's config come from: the package (or the checkout), plus the user's folders.

Recipe files form Hydra's `recipe` config group through a config source of their own (`RecipeSource`), so a
flat folder of YAML files is a group, `FLUXRECIPE_RECIPE_PATH` (folders separated by os.pathsep) adds the
user's own, and `recipe=PATH.yaml` runs that exact file by its path (a choice that names a folder or ends
with .yaml or .yml is a path, from the current folder; any other is a name). A user recipe shadows a built-in
one of the same name; among user folders, the first listed wins. A file whose name is not plain
(A-Z, a-z, 0-9, `_`, `.`, `-`) is not a recipe name: it is ignored and listed as such in `--help`, so that a
name that holds a terminal escape never reaches the terminal raw.

Recipes are files from strangers, so they are loaded lazily and within bounds: listing the group (for
`--help` or tab completion) reads no file; only the chosen recipe is parsed, and a file that is too large,
not UTF-8, not YAML, or whose YAML aliases would expand past a limit is registered as a note of its error,
so that choosing it gives that error in one line and choosing any other recipe is not affected.
"""

from __future__ import annotations

import difflib
import io
import os
import re
from pathlib import Path
from typing import Any

import yaml
from hydra.core.object_type import ObjectType
from hydra.core.plugins import Plugins
from hydra.plugins.config_source import ConfigLoadError, ConfigResult, ConfigSource
from hydra.plugins.search_path_plugin import SearchPathPlugin
from omegaconf import DictConfig, OmegaConf

from .errors import UsageError
from .files import os_error_text, read_small
from .schedule import string_keys
from .text import printable

PACKAGE = Path(__file__).resolve().parent
RECIPE_PATH_ENV = "FLUXRECIPE_RECIPE_PATH"
GROUP = "recipe"
SUFFIXES = (".yaml", ".yml")
MAX_RECIPE_BYTES = 1 << 20  # a recipe is a few hundred bytes; a megabyte is a thousand rules
MAX_RECIPE_NODES = 20_000  # YAML values once aliases are expanded (a 300-byte alias bomb expands to billions)
PLAIN_NAME = re.compile(r"[A-Za-z0-9_.-]+")  # a recipe file's name on the search path


def _packaged_or_checkout(packaged: str, checkout: str) -> Path:
    """A wheel carries the folder inside the package; a source checkout has it beside the package."""
    inside = PACKAGE / packaged
    return inside if inside.is_dir() else PACKAGE.parent / checkout


def conf_dir() -> Path:
    return _packaged_or_checkout("_conf", "conf")


def builtin_recipe_dir() -> Path:
    return _packaged_or_checkout("_recipes", "recipes")


def recipe_dirs() -> list[Path]:
    """In order of precedence, highest first: the user's folders, then the built-in recipes. A folder named
    in FLUXRECIPE_RECIPE_PATH that is not there is an error, not a silence."""
    user = [Path(p).expanduser() for p in os.environ.get(RECIPE_PATH_ENV, "").split(os.pathsep) if p.strip()]
    for folder in user:
        if not folder.is_dir():
            raise UsageError(f"{RECIPE_PATH_ENV} names {folder}, which is not a folder" + (" (it does not exist)" if not folder.exists() else ""))
    return user + [builtin_recipe_dir()]


def recipe_files() -> dict[str, Path]:
    """Recipe name -> the file that defines it (the highest-precedence one). Reads no file, and follows no
    link (a link that loops is a file that cannot be read, said when it is chosen)."""
    found: dict[str, Path] = {}
    for path in _files_on_search_path():
        if PLAIN_NAME.fullmatch(path.name):
            found[path.stem] = path
    return found


def ignored_recipe_files() -> list[Path]:
    """Files on the search path that look like recipes but whose names are not plain (see PLAIN_NAME)."""
    return sorted({p for p in _files_on_search_path() if not PLAIN_NAME.fullmatch(p.name)})


def _files_on_search_path() -> list[Path]:
    """Every *.yaml and *.yml of the recipe folders, lowest precedence first (.yaml wins over .yml)."""
    return [
        Path(os.path.abspath(path))
        for folder in reversed(recipe_dirs())
        for suffix in reversed(SUFFIXES)
        for path in sorted(folder.glob("*" + suffix))
    ]


def is_recipe_path(choice: str) -> bool:
    """`recipe=CHOICE` names a file by its path (it names a folder, or ends with .yaml or .yml), not a recipe
    on the search path."""
    return "/" in choice or choice.endswith(SUFFIXES)


def recipe_file(choice: str) -> Path | None:
    """The file a recipe choice means: a path is that exact file (from the current folder), a name the
    recipe of that name on the search path; None when there is no such file."""
    if is_recipe_path(choice):
        path = Path(os.path.abspath(os.path.expanduser(choice)))
        return path if path.is_file() and path.name.endswith(SUFFIXES) else None
    return recipe_files().get(choice)


def recipe_problem(choice: str) -> str | None:
    """Why `recipe=CHOICE` names no recipe, in one line (with the closest name); None when it names one."""
    if recipe_file(choice) is not None:
        return None
    if is_recipe_path(choice):
        path = os.path.abspath(os.path.expanduser(choice))
        if not choice.endswith(SUFFIXES):
            return f"recipe={choice}: a recipe file's name ends with .yaml" + ("" if os.path.isfile(path) else f" (and there is no file {path})")
        return f"recipe={choice}: no such recipe file ({path})"
    known = sorted(recipe_files())
    close = difflib.get_close_matches(choice, known, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]}?" if close else f"recipes: {', '.join(known)}"
    ignored = [p for p in ignored_recipe_files() if p.stem == choice]
    if ignored:
        hint = f"{printable(str(ignored[0]))} is ignored: a recipe name may hold only A-Z a-z 0-9 _ . -; run it as recipe=PATH"
    return f"no recipe {choice!r} ({hint}); `fluxrecipe --help` lists the recipes, and recipe=PATH.yaml runs a file"


def recipe_name(choice: str) -> str:
    """What a recipe is called: its file's name without .yaml for a path, else the name chosen."""
    return os.path.splitext(os.path.basename(choice))[0] if is_recipe_path(choice) else choice


def load_recipe_file(path: Path) -> DictConfig:
    """A recipe file as a config node, or a node holding only `__load_error__` (see recipe.load_recipe)."""
    try:
        text = read_small(path, MAX_RECIPE_BYTES).decode("utf-8")
    except OSError as e:
        return _error_node(f"cannot read it: {os_error_text(e)}")
    except UnicodeDecodeError as e:
        return _error_node(f"not a valid YAML file: not utf-8 text ({e})")
    try:
        nodes = _expanded_size(yaml.compose(text, Loader=yaml.SafeLoader))
        if nodes > MAX_RECIPE_NODES:
            return _error_node(f"its YAML expands to more than {MAX_RECIPE_NODES} values (anchors and aliases?): a recipe is far smaller")
        node = OmegaConf.load(io.StringIO(text))
    except yaml.YAMLError as e:
        return _error_node(f"not a valid YAML file: {e}")
    except RecursionError:
        return _error_node("not a valid YAML file: nested too deeply")
    except Exception as e:  # noqa: BLE001 - whatever OmegaConf refuses (a key that is not text, ...) is the file's fault
        return _error_node(f"not a valid recipe file: {type(e).__name__}: {e}")
    if isinstance(node, DictConfig):  # schedules as Hydra can override one block of (recipe.addressable_schedules)
        from .recipe import addressable_schedules

        node, schedules = addressable_schedules(string_keys(OmegaConf.to_container(node, resolve=False)))
        node = OmegaConf.create(node)
        for path in schedules:  # a block a schedule does not name yet may be set without `+`
            OmegaConf.set_struct(OmegaConf.select(node, path), False)
    if isinstance(node, DictConfig) and "defaults" in node:
        # Hydra would act on it: pull other configs in at any package (`/recipe@_global_: x` puts a file's
        # `hydra.callbacks` at the top, and Hydra instantiates those), so a recipe could run code.
        return _error_node("a recipe may not have a `defaults` list (Hydra would compose other configs from it); remove it")
    return node


def _expanded_size(root: yaml.Node | None) -> int:
    """How many values the YAML tree holds once every alias is expanded; stops counting past the limit (so a
    recursive alias is caught too)."""
    count, stack = 0, [root] if root is not None else []
    while stack and count <= MAX_RECIPE_NODES:
        node = stack.pop()
        count += 1
        if isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)
        elif isinstance(node, yaml.MappingNode):
            stack.extend(v for pair in node.value for v in pair)
    return count


def _error_node(message: str) -> DictConfig:
    return OmegaConf.create({"__load_error__": message.replace("${", "$ {")})


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
    return text.replace("$", "$$")  # Hydra fills the help template with string.Template: a $ of a name is text


def register_recipes() -> None:
    """Make Hydra see the recipe group (idempotent; Hydra's launchers carry it into their worker processes)."""
    plugins = Plugins.instance()
    plugins.register(RecipeSource)
    plugins.register(RecipeSearchPath)
    OmegaConf.register_new_resolver("fluxrecipe.ignored_recipes", ignored_note, replace=True)
