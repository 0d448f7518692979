"""Where recipe files and Hydra's config come from: the package (or the checkout), plus the user's folders.

The recipe folders are a flat folder of YAML files each (Hydra's `recipe` group, through the command layer's
config source, cli/hydra_setup.py): `FLUXRECIPE_RECIPE_PATH` (folders separated by os.pathsep) adds the
user's own, and `recipe=PATH.yaml` runs that exact file by its path (a choice that names a folder or ends
with .yaml or .yml is a path, from the current folder; any other is a name). A user recipe shadows a built-in
one of the same name; among user folders, the first listed wins. A file whose name is not plain
(A-Z, a-z, 0-9, `_`, `.`, `-`) is not a recipe name: it is ignored and listed as such in `--help`, so that a
name that holds a terminal escape never reaches the terminal raw. Listing the recipes reads no file; the
recipe loader (recipe.py) reads only the chosen one, within bounds.
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path

from .errors import UsageError
from .text import printable

PACKAGE = Path(__file__).resolve().parent
RECIPE_PATH_ENV = "FLUXRECIPE_RECIPE_PATH"
GROUP = "recipe"  # Hydra's config group of the recipes (recipe=NAME)
SUFFIXES = (".yaml", ".yml")
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
