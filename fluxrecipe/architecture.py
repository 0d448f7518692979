"""What diffusers expects of a model folder: the parameters (names and shapes) its config.json implies.

The model is built on torch's meta device, so this costs no memory and no weights; it is diffusers' own
answer, not a list kept by hand, and it holds for every diffusers model class, not only FLUX.
"""

from __future__ import annotations

import inspect
from typing import Any

from .errors import PlanError


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
    """Every parameter name -> shape that a model built from `config` holds."""
    import torch

    cls = model_class(config, where)
    try:
        with torch.device("meta"):
            model = cls.from_config(config)
    except Exception as e:  # any complaint of the model's constructor about the config
        raise PlanError(f"{where}: diffusers cannot build {cls.__name__} from this config: {type(e).__name__}: {e}") from None
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}
