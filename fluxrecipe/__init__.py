"""fluxrecipe: declarative, streaming merges of FLUX-family transformer checkpoints (FLUX.1, FLUX.2, FLUX.3, Chroma)."""

__version__ = "0.1.0"
