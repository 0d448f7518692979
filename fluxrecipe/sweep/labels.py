"""What tells the jobs of a sweep apart: the overrides whose values differ between them (the labels of the
grid, the plot and the summary), and a job's folder name, made safe from its overrides."""

from __future__ import annotations

import hashlib
import re
from typing import Sequence

# Characters kept in a job folder's name; any other (a '/' of a path, a space, a quote) becomes '_'.
UNSAFE = re.compile(r"[^A-Za-z0-9._=,+@%~\[\]-]")
MAX_NAME = 160  # well under the 255 bytes a file name may have, leaving room for a hash


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


def label(keys: Sequence[str], overrides: Sequence[str]) -> str:
    """A job's values of `keys` (those that differ between the jobs), as `recipe=tiny, recipe.alpha=0.25`;
    empty when the job sets none of them."""
    values = dict(split_override(o) for o in overrides)
    return ", ".join(f"{k}={values[k]}" for k in keys if k in values)


def folder_name(overrides_text: object, num: object) -> str:
    """A job's folder name: its overrides (`recipe.alpha=0.25,recipe=krea_schnell`) made safe as a folder name
    (path separators above all: `recipe.sources.krea=/data/k` must not become a path); a name that is too long
    is cut and made unique again with a hash of the whole. A job without overrides is named by its number."""
    text = str(overrides_text or "")
    if not text:
        return f"job{num}"
    name = UNSAFE.sub("_", text)
    if len(name) > MAX_NAME:
        name = f"{name[:MAX_NAME]}-{hashlib.sha256(text.encode()).hexdigest()[:10]}"
    return name
