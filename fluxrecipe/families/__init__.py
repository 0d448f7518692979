"""The model families fluxrecipe merges, one module each (base.py says what a family module provides).

FAMILIES is the order in which files are recognised: a family whose files also hold another family's
fingerprint comes before that family (FLUX.2's, FLUX.3's and Chroma's files hold FLUX.1's block names;
FLUX.1, whose fingerprint is any FLUX-shaped key, comes last). To add a family: write its module, put its FAMILY here, add its tests.
"""

from __future__ import annotations

from collections.abc import Iterable

from . import chroma, flux1, flux2, flux3
from .base import Family, Preview, ShapeError

__all__ = ["FAMILIES", "Family", "Preview", "ShapeError", "by_class", "by_name", "comfyui_prefixes", "diagnostic_order", "recognise", "schedule_name", "vocabulary"]

FAMILIES: tuple[Family, ...] = (flux3.FAMILY, flux2.FAMILY, chroma.FAMILY, flux1.FAMILY)


def recognise(keys: Iterable[str]) -> Family | None:
    """The family of a set of keys (a file's, ComfyUI's prefix removed, in any layout; or canonical keys)."""
    keys = list(keys)
    return next((f for f in FAMILIES if f.recognises(keys)), None)


def by_name(name: str) -> Family:
    """The family called `name` ('FLUX.1', 'FLUX.2')."""
    return next(f for f in FAMILIES if f.name == name)


def by_class(class_name: object) -> Family | None:
    """The family whose diffusers model class this is (a config's `_class_name`)."""
    return next((f for f in FAMILIES if f.class_name == class_name), None)


def comfyui_prefixes() -> tuple[str, ...]:
    """Every family's ComfyUI key prefixes, longest first."""
    return tuple(sorted({p for f in FAMILIES for p in f.comfyui_prefixes}, key=len, reverse=True))


def vocabulary() -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """Every family's block names, as a recipe may write them before its model is known: the blocks before
    the groups, the groups, the blocks after them; oldest family's first, each name once."""
    ordered = list(reversed(FAMILIES))
    top = tuple(dict.fromkeys(b for f in ordered for b in f.top_blocks))
    groups = tuple(dict.fromkeys(g for f in ordered for g in f.groups))
    final = tuple(dict.fromkeys(b for f in ordered for b in f.final_blocks))
    return top, groups, final


def diagnostic_order(block: str) -> tuple[int, int]:
    """Model order of a diagnostics block name ('embedders', 'transformer_blocks.7', 'output') of any family."""
    if block == "embedders":
        return (0, 0)
    group, _, index = block.rpartition(".")
    groups = list(dict.fromkeys(g.canonical for f in reversed(FAMILIES) for g in f.bfl.groups))
    if group in groups and index.isdigit():
        return (1 + groups.index(group), int(index))
    return (1 + len(groups), 0)


def schedule_name(block: str) -> str:
    """A diagnostics block name of any family ('transformer_blocks.7') as recipes' schedules write it
    ('double_blocks.7'); 'embedders' and 'output' as they are."""
    group, _, index = block.rpartition(".")
    bfl = next((g.bfl for f in reversed(FAMILIES) for g in f.bfl.groups if g.canonical == group), None)
    return f"{bfl}.{index}" if bfl and index.isdigit() else block
