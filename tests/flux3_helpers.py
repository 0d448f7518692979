"""Test-side FLUX.3: tiny models built by diffusers, and its layout written out by hand from diffusers'
`convert_flux3_transformer_checkpoint_to_diffusers` (independent of fluxrecipe's table): a diffusers key ->
its Black Forest Labs key, and whole state dicts both ways."""

from __future__ import annotations

from pathlib import Path

import torch

from conftest import build_model
from flux_layouts import fuse

TINY3 = dict(
    in_channels=8,
    cond_in_channels=8,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,
    timestep_channels=16,
    axes_dims_rope=[4, 4, 4, 4],
)
# Flux3Transformer2DModel's defaults (the config diffusers' single-file loader takes for flux-3-image-klein[-base])
REAL = dict(in_channels=128, cond_in_channels=128, num_layers=5, num_single_layers=28, attention_head_dim=128, num_attention_heads=24, joint_attention_dim=20480, timestep_channels=256, axes_dims_rope=[32, 32, 32, 32])

EXACT = {  # diffusers key -> BFL key, where the converter renames a whole key
    "timestep_embedder.linear_1.weight": "time_in.in_layer.weight",
    "timestep_embedder.linear_2.weight": "time_in.out_layer.weight",
    "target_timestep_embedder.linear_1.weight": "ref_time_in.in_layer.weight",
    "target_timestep_embedder.linear_2.weight": "ref_time_in.out_layer.weight",
    "proj_out.weight": "final_layer.image.linear.weight",
    "norm_out.linear.weight": "final_layer.image.adaLN_modulation.1.weight",  # its halves swapped
}
PREFIXES = {"x_embedders.": "emb_in.", "context_embedder.": "txt_in.", "mode_blocks.": "content_mode_blocks.", "single_transformer_blocks.": "single_blocks."}
SUFFIXES = {  # a block's module, diffusers -> BFL
    "attn.to_q.weight": "q_proj.weight",
    "attn.to_k.weight": "k_proj.weight",
    "attn.to_v.weight": "v_proj.weight",
    "attn.to_out.0.weight": "attn_out.weight",
    "attn.norm_q.weight": "norm.query_norm.scale",
    "attn.norm_k.weight": "norm.key_norm.scale",
    "ff.linear_in.weight": "mlp_in.weight",
    "ff.linear_out.weight": "mlp_out.weight",
}
SWAPPED = "final_layer.image.adaLN_modulation.1"  # flux_layouts.fuse swaps a final layer's modulation


def make_flux3(folder: Path, *, distilled: bool, seed: int, shard: str = "40KB", dtype: torch.dtype = torch.bfloat16, **changes) -> Path:
    """A tiny FLUX.3 transformer (distilled: flow_map) with random (non-trivial) weights, saved as diffusers saves it."""
    return build_model("Flux3Transformer2DModel", {**TINY3, **changes, "flow_map": distilled}, folder, seed=seed, shard=shard, dtype=dtype)


def bfl_key(key: str) -> str:
    """A diffusers key's BFL key, as the converter's renames read backwards."""
    if key in EXACT:
        return EXACT[key]
    for new, old in PREFIXES.items():
        if key.startswith(new):
            key = old + key[len(new):]
            break
    key = key.replace(".linear.weight", ".lin.weight")  # the modulation heads
    for new, old in SUFFIXES.items():
        if key.endswith("." + new):
            return key[: -len(new)] + old
    return key


def linear_modules(state: dict) -> list[tuple[str, tuple[str, ...]]]:
    """Every Linear module of a FLUX.3 model (diffusers keys) in BFL's names, with the one diffusers module each
    holds (SWAPPED: norm_out.linear, its halves swapped)."""
    return [(bfl_key(k).removesuffix(".weight"), (k.removesuffix(".weight"),)) for k, t in state.items() if t.dim() == 2]


def flux3_to_bfl(state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """The inverse of diffusers' convert_flux3_transformer_checkpoint_to_diffusers."""
    return {prefix + bfl_key(k): fuse(bfl_key(k).rsplit(".", 1)[0], [t]).contiguous() for k, t in state.items()}


def from_bfl(bfl: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """A BFL / ComfyUI state dict through diffusers' own converter."""
    from diffusers.loaders.single_file_utils import convert_flux3_transformer_checkpoint_to_diffusers

    return convert_flux3_transformer_checkpoint_to_diffusers({k.removeprefix(prefix): v for k, v in bfl.items()})
