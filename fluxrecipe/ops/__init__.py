"""Merge operations, registered by name (registry.OPS). Importing this package registers every op."""

from . import linear  # noqa: F401, I001  (registers the ops: the plain ones first, as listings show them)
from . import advanced  # noqa: F401
from .registry import OPS, OpCall, OpSpec, Param, Source, StatPass, TaskWeights, Where, identity_of, op, parse_op

__all__ = ["OPS", "OpCall", "OpSpec", "Param", "Source", "StatPass", "TaskWeights", "Where", "identity_of", "op", "parse_op"]
