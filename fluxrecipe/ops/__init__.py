"""Merge operations, registered by name (registry.OPS). Importing this package registers every op."""

from . import linear  # noqa: F401  (registers the ops)
from .registry import OPS, OpCall, OpSpec, Param, Source, StatPass, Where, op, parse_op

__all__ = ["OPS", "OpCall", "OpSpec", "Param", "Source", "StatPass", "Where", "op", "parse_op"]
