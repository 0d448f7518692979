"""`python -m fluxrecipe methods [NAME ...]`: every merge method (op), or the named ones, with its sources,
parameters (kinds and defaults) and formula, from the ops' own declarations."""

from __future__ import annotations

import sys

from .ops import OPS
from .ops.registry import listing


def main(argv: list[str]) -> int:
    unknown = [name for name in argv if name not in OPS]
    if unknown:
        print(f"fluxrecipe: error: no method {', '.join(map(repr, unknown))} (methods: {', '.join(OPS)})", file=sys.stderr)
        return 1
    print(listing(argv or None))
    return 0
