"""What diffusers expects of a model folder: the parameters (names and shapes) its config.json implies.

The model is built on torch's meta device, so this costs no memory and no weights; it is diffusers' own
answer, not a list kept by hand, and it holds for every diffusers model class, not only FLUX. Importing
diffusers and torch takes seconds on a small machine, longer than planning, so each answer is kept in the
fluxrecipe cache, keyed by the diffusers version and the config, and later runs read it from there.

A config comes from a stranger's file or recipe, so it is checked before anything is built from it: every
value has the type the model class declares (a yes/no field given as `'false'` is text, and text is true), and its
sizes are bounded by the shapes a model of its family can have (families/: block counts and widths), so that
a config of 20000 layers cannot make the planner build a huge model.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import re
import types
import typing
from importlib import metadata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import families
from .demo import cache_root
from .errors import PlanError
from .files import read_small
from .text import cut
from .writer import replace_json

COUNT_FIELD = re.compile(r"num_\w*(layers|blocks)|layers_per_block")


def model_class(config: dict[str, Any], where: str) -> type:
    """The diffusers class of a config of a family fluxrecipe knows."""
    import diffusers

    name = config.get("_class_name")
    cls = getattr(diffusers, str(name), None) if name else None
    if not (isinstance(cls, type) and issubclass(cls, diffusers.ModelMixin)):
        raise PlanError(f"{where}: _class_name {cut(str(name))!r} is not a diffusers model class")
    if families.by_class(name) is None:
        raise PlanError(f"{where}: _class_name {cut(str(name))!r} is not the model class of a family fluxrecipe merges ({', '.join(f.class_name for f in families.FAMILIES)})")
    return cls


def config_fields(config: dict[str, Any], where: str) -> set[str]:
    """The names the model class takes in its config."""
    return set(inspect.signature(model_class(config, where).__init__).parameters) - {"self"}


def check_config(config: dict[str, Any], where: str) -> None:
    """Every value the model class takes has the type it declares, and sizes are within its family's bounds."""
    cls = model_class(config, where)
    family = families.by_class(config.get("_class_name"))
    hints = _type_hints(cls)
    for name, value in config.items():
        if name.startswith("_"):
            continue
        if name in hints and not _fits(value, hints[name]):
            raise PlanError(f"{where}: {name} is {json.dumps(value)} ({type(value).__name__}), but {cls.__name__} takes {_type_name(hints[name])}")
        for number in _whole_numbers(value):
            limit = family.max_blocks if COUNT_FIELD.fullmatch(name) else family.max_size
            if abs(number) > limit:
                raise PlanError(f"{where}: {name} is {json.dumps(value)}: more than the {limit} a FLUX transformer can have")


def _type_hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls.__init__)
    except Exception:  # noqa: BLE001 - an annotation diffusers cannot resolve itself: check by the defaults instead
        params = inspect.signature(cls.__init__).parameters.values()
        return {p.name: type(p.default) for p in params if p.default not in (None, inspect.Parameter.empty)}


def _fits(value: Any, hint: Any) -> bool:
    """Whether a JSON value is of the declared type (float takes an integer; a tuple or list is a JSON list)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if hint is type(None):
        return value is None
    if origin in (tuple, list):
        if not isinstance(value, list):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(_fits(v, a) for v, a in zip(value, args))
        return not args or all(_fits(v, args[0]) for v in value)
    return True  # a type JSON cannot spell (Any, a class): not checked here


def _type_name(hint: Any) -> str:
    names = {bool: "true or false", int: "a whole number", float: "a number", str: "text", type(None): "null"}
    if hint in names:
        return names[hint]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    return f"a list ({str(hint).replace('typing.', '')})" if typing.get_origin(hint) in (tuple, list) else str(hint)


def _whole_numbers(value: Any) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    return [n for v in value for n in _whole_numbers(v)] if isinstance(value, list) else []


def expected_parameters(config: dict[str, Any], where: str) -> dict[str, tuple[int, ...]]:
    """Every parameter name -> shape that a model built from `config` holds (from the cache when known: a
    config found there was checked when it was built)."""
    # "checked": entries cached before check_config existed are not taken for checked ones
    key = hashlib.sha256(json.dumps({"diffusers": metadata.version("diffusers"), "config": config, "checked": 1}, sort_keys=True).encode()).hexdigest()
    cached = cache_root() / "architectures" / f"{key}.json"
    try:
        shapes = json.loads(read_small(cached))
        if isinstance(shapes, dict) and all(isinstance(v, list) and all(isinstance(d, int) for d in v) for v in shapes.values()):
            return {k: tuple(v) for k, v in shapes.items()}
    except (OSError, ValueError, RecursionError):
        pass  # not cached yet, or a damaged entry: build it again and replace it
    check_config(config, where)
    shapes = _build_on_meta(config, where)
    _store(cached, shapes)
    return shapes


def _store(path: Path, shapes: dict[str, tuple[int, ...]]) -> None:
    """Write the cache entry atomically; a cache that cannot be written only costs the next run time."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        replace_json(path, shapes)
    except OSError:
        pass


def _build_on_meta(config: dict[str, Any], where: str) -> dict[str, tuple[int, ...]]:
    import torch

    cls = model_class(config, where)
    try:
        with torch.device("meta"):
            model = cls.from_config(config)
    except Exception as e:  # any complaint of the model's constructor about the config
        raise PlanError(f"{where}: diffusers cannot build {cls.__name__} from this config: {type(e).__name__}: {e}") from None
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@dataclass(frozen=True)
class Mismatch:
    """How a set of tensors (name -> shape) differs from what a config implies."""

    missing: list[str]  # the config needs them, the tensors lack them
    unexpected: list[str]  # the tensors hold them, the config has no place for them
    wrong: list[str]  # both have them, in other shapes

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.wrong)


def mismatch(expected: dict[str, tuple[int, ...]], have: dict[str, tuple[int, ...]]) -> Mismatch:
    return Mismatch(
        missing=[k for k in expected if k not in have],
        unexpected=[k for k in have if k not in expected],
        wrong=[k for k in have if k in expected and tuple(expected[k]) != tuple(have[k])],
    )
