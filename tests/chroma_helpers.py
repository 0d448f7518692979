"""Test-side Chroma: tiny models built by diffusers, a Chroma of FLUX.1's width (what diffusers' converter
needs), and its layout written out by hand from diffusers' `convert_chroma_transformer_checkpoint_to_diffusers`
(independent of fluxrecipe's table): diffusers state dict -> Black Forest Labs / ComfyUI state dict."""

from __future__ import annotations

import math
from pathlib import Path

import torch

import flux_layouts
from conftest import build_model, save_sharded
from flux_layouts import blocks

TINY_CHROMA = dict(
    patch_size=1,
    in_channels=4,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,
    axes_dims_rope=[4, 4, 8],
    approximator_num_channels=8,
    approximator_hidden_dim=32,
    approximator_layers=2,
)
# Chroma1-HD's config (diffusers' defaults)
REAL = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
    axes_dims_rope=[16, 56, 56], approximator_num_channels=64, approximator_hidden_dim=5120, approximator_layers=5,
)
# The smallest Chroma diffusers' converter reads: FLUX.1's width (it splits linear1 as 3 x 3072 + 12288 rows),
# one block of each kind
WIDE = {**TINY_CHROMA, "attention_head_dim": 128, "num_attention_heads": 24, "num_layers": 1, "num_single_layers": 1, "axes_dims_rope": [16, 56, 56]}

TOP = {  # BFL module -> diffusers module, renamed as they are
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "distilled_guidance_layer.in_proj": "distilled_guidance_layer.in_proj",
    "distilled_guidance_layer.out_proj": "distilled_guidance_layer.out_proj",
    "final_layer.linear": "proj_out",
}
DOUBLE = {b: ds for b, ds in flux_layouts.DOUBLE.items() if b not in ("img_mod.lin", "txt_mod.lin")}  # no per-block modulation
SINGLE = {b: ds for b, ds in flux_layouts.SINGLE.items() if b != "modulation.lin"}
GUIDANCE = {"in_layer": "linear_1", "out_layer": "linear_2"}  # distilled_guidance_layer.layers.N.X


def make_chroma(folder: Path, *, seed: int, shard: str = "40KB", dtype: torch.dtype = torch.bfloat16, **changes) -> Path:
    """A tiny Chroma transformer with random (non-trivial) weights, saved the way diffusers saves it."""
    return build_model("ChromaTransformer2DModel", {**TINY_CHROMA, **changes}, folder, seed=seed, shard=shard, dtype=dtype)


def make_wide_chroma(folder: Path, seed: int) -> dict[str, torch.Tensor]:
    """A Chroma of FLUX.1's width (WIDE: 1 + 1 blocks, ~340M parameters) as a diffusers folder, filled from a
    random tile (cheap) that starts at another place in every tensor, so that no two tensors, and no two rows
    of one, are alike; its state, as bf16."""
    from fluxrecipe.architecture import expected_parameters

    config = {"_class_name": "ChromaTransformer2DModel", **WIDE}
    tile = torch.randn(100_003, generator=torch.Generator().manual_seed(seed)) * 0.02
    state = {}
    for i, (key, shape) in enumerate(expected_parameters(config, "test").items()):
        start, n = (i * 7919) % tile.numel(), math.prod(shape)
        state[key] = tile.roll(-start).repeat(n // tile.numel() + 1)[:n].view(shape).to(torch.bfloat16)
    save_sharded(state, folder, [list(state)], config)
    return state


def linear_modules(state: dict) -> list[tuple[str, tuple[str, ...]]]:
    """Every Linear module of a Chroma model (diffusers keys) in BFL's names, with the diffusers modules whose
    rows it holds in order."""
    modules = flux_layouts.linear_modules(state, TOP, DOUBLE, SINGLE)
    for i in blocks(state, "distilled_guidance_layer.layers"):
        modules += [(f"distilled_guidance_layer.layers.{i}.{b}", (f"distilled_guidance_layer.layers.{i}.{d}",)) for b, d in GUIDANCE.items()]
    return modules


def chroma_to_bfl(state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """The inverse of diffusers' convert_chroma_transformer_checkpoint_to_diffusers."""
    out = flux_layouts.diffusers_to_bfl(state, prefix, linear_modules(state))
    for i in blocks(state, "distilled_guidance_layer.norms"):
        out[f"{prefix}distilled_guidance_layer.norms.{i}.scale"] = state[f"distilled_guidance_layer.norms.{i}.weight"].contiguous()
    return out


def from_bfl(bfl: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """A BFL / ComfyUI state dict through diffusers' own converter."""
    from diffusers.loaders.single_file_utils import convert_chroma_transformer_checkpoint_to_diffusers

    return convert_chroma_transformer_checkpoint_to_diffusers({k.removeprefix(prefix): v for k, v in bfl.items()})
