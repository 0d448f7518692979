"""fluxrecipe: declarative, streaming merges of FLUX.1 transformer checkpoints."""

__version__ = "0.1.0"
