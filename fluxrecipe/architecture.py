"""What diffusers expects of a model folder: the parameters (names and shapes) its config.json implies.

The model is built on torch's meta device, so this costs no memory and no weights; it is diffusers' own
answer, not a list kept by hand, and it holds for every diffusers model class, not only FLUX. Importing
diffusers and torch takes seconds on a small machine, longer than planning, so each answer is kept in the
fluxrecipe cache, keyed by the diffusers version and the config, and later runs read it from there.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from importlib import metadata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .demo import cache_root
from .errors import PlanError
from .writer import replace_json


def model_class(config: dict[str, Any], where: str) -> type:
    import diffusers

    name = config.get("_class_name")
    cls = getattr(diffusers, str(name), None) if name else None
    if not (isinstance(cls, type) and issubclass(cls, diffusers.ModelMixin)):
        raise PlanError(f"{where}: _class_name {name!r} is not a diffusers model class")
    return cls


def config_fields(config: dict[str, Any], where: str) -> set[str]:
    """The names the model class takes in its config."""
    return set(inspect.signature(model_class(config, where).__init__).parameters) - {"self"}


def expected_parameters(config: dict[str, Any], where: str) -> dict[str, tuple[int, ...]]:
    """Every parameter name -> shape that a model built from `config` holds (from the cache when known)."""
    key = hashlib.sha256(json.dumps({"diffusers": metadata.version("diffusers"), "config": config}, sort_keys=True).encode()).hexdigest()
    cached = cache_root() / "architectures" / f"{key}.json"
    try:
        return {k: tuple(v) for k, v in json.loads(cached.read_text()).items()}
    except (OSError, ValueError, AttributeError):
        pass
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
