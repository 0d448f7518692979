"""What tells the jobs of a sweep apart: the overrides whose values differ between them.

A job's folder is named by them (`alpha=0.25`, not `recipe.alpha=0.25,recipe=krea_schnell,...` with every
override the jobs share), and the grid, the plot and the summary label a job the same way; the job's full
overrides stay in its record (fluxrecipe-job.json and Hydra's .hydra/overrides.yaml).
"""

from __future__ import annotations

import hashlib
import re
from typing import Sequence

# Characters kept in a job folder's name; any other (a '/' of a path, a space, a quote) becomes '_'.
UNSAFE = re.compile(r"[^A-Za-z0-9._=,+@%~\[\]-]")
MAX_NAME = 160  # well under the 255 bytes a file name may have, leaving room for a hash
RECIPE_PREFIX = "recipe."


def split_override(text: str) -> tuple[str, str]:
    """('recipe.alpha', '0.25') of 'recipe.alpha=0.25' (or of '+recipe.alpha=0.25': how it was added does not
    tell jobs apart)."""
    key, _, value = text.partition("=")
    return key.lstrip("+~"), value


def differing(jobs: Sequence[Sequence[str]]) -> list[str]:
    """The override keys whose value is not the same in every job (a key a job lacks counts as a value),
    Hydra's own (`hydra.*`, `hydra/launcher`) left out: they never change a merge."""
    maps = [dict(split_override(o) for o in overrides) for overrides in jobs]
    keys = dict.fromkeys(k for m in maps for k in m if not k.startswith(("hydra.", "hydra/")))
    return [k for k in keys if len({m.get(k) for m in maps}) > 1]


def short_names(keys: Sequence[str]) -> dict[str, str]:
    """Each key as a label shows it: a recipe value without `recipe.` (`alpha`, `alpha.GROUP.3`),
    unless two keys would then read the same."""
    short = {k: k.removeprefix(RECIPE_PREFIX) for k in keys}
    taken = list(short.values())
    return {k: s if taken.count(s) == 1 else k for k, s in short.items()}


def label(keys: Sequence[str], overrides: Sequence[str], separator: str = ", ") -> str:
    """A job's values of `keys` (those that differ between the jobs), as `alpha=0.25, recipe=tiny`, in the
    order of their short names; empty when the job sets none of them."""
    values = dict(split_override(o) for o in overrides)
    names = short_names(keys)
    return separator.join(f"{names[k]}={values[k]}" for k in sorted(keys, key=names.get) if k in values)


def folder_name(label_text: str, num: int) -> str:
    """A job's folder name: its label made safe as a folder name (path separators above all: a source path
    in a label must not become a path); a name that is too long is cut and made unique again with a hash of
    the whole. A job without a label (a sweep of one job) is named by its number."""
    if not label_text:
        return f"job{num}"
    name = UNSAFE.sub("_", label_text)
    if len(name) > MAX_NAME:
        name = f"{name[:MAX_NAME]}-{hashlib.sha256(label_text.encode()).hexdigest()[:10]}"
    return name


def folder_names(jobs: Sequence[Sequence[str]]) -> list[str]:
    """The folder of every job of a sweep, named by what differs between them (`alpha=0.25`)."""
    keys = differing(jobs)
    return [folder_name(label(keys, overrides, separator=","), num) for num, overrides in enumerate(jobs)]
