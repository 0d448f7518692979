"""Rules x keys -> a Plan: one step per output tensor. Every check runs here, before any tensor byte is read.

The plan is plain data, in canonical keys (diffusers' names) whatever the sources' and the output's layouts:
which rule decided each key, which source tensors feed it (byte pieces, dtype, shape), the op and its
parameters for that key, the dtype it is rounded to; what is dropped and why; the output's files, each
tensor of which is a list of element ranges of steps (a rename, or BFL's fused and swapped tensors); and the
config the output carries. It can be printed (`dry_run=true`) and tested without touching a tensor, and
the executor needs nothing else.

Three modules, each needing only the one before: data.py (the dataclasses), make.py (make_plan and its
checks), text.py (format_plan, the printed plan).
"""

from .data import Dropped, Plan, PlannedRecipe, PlannedRule, RuleStats, SourceSummary, Step
from .make import make_plan
from .text import format_plan, human_bytes

__all__ = ["Dropped", "Plan", "PlannedRecipe", "PlannedRule", "RuleStats", "SourceSummary", "Step", "format_plan", "human_bytes", "make_plan"]
