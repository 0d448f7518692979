"""Test-side FLUX.2: tiny models built by diffusers, and its layouts written out by hand from diffusers'
`convert_flux2_transformer_checkpoint_to_diffusers` (independent of fluxrecipe's table): diffusers state
dict -> Black Forest Labs / ComfyUI state dict; and safetensors files of FLUX.2's real widths that hold
headers only (sparse), for what needs shapes and no weights."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

import flux_layouts
from conftest import build_model
from flux_layouts import blocks, fuse

TINY2 = dict(
    patch_size=1,
    in_channels=8,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,
    timestep_guidance_channels=16,
    axes_dims_rope=[4, 4, 4, 4],
)
# The real variants' configs (diffusers' FLUX.2-dev, FLUX.2-klein-9B, FLUX.2-klein-4B)
KLEIN_4B = dict(in_channels=128, num_layers=5, num_single_layers=20, attention_head_dim=128, num_attention_heads=24, joint_attention_dim=7680, guidance_embeds=False)
KLEIN_9B = dict(in_channels=128, num_layers=8, num_single_layers=24, attention_head_dim=128, num_attention_heads=32, joint_attention_dim=12288, guidance_embeds=False)
DEV = dict(in_channels=128, num_layers=8, num_single_layers=48, attention_head_dim=128, num_attention_heads=48, joint_attention_dim=15360, guidance_embeds=True)

TOP = {  # BFL module -> diffusers module, renamed as they are
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_guidance_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_guidance_embed.timestep_embedder.linear_2",
    "guidance_in.in_layer": "time_guidance_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_guidance_embed.guidance_embedder.linear_2",
    "double_stream_modulation_img.lin": "double_stream_modulation_img.linear",
    "double_stream_modulation_txt.lin": "double_stream_modulation_txt.linear",
    "single_stream_modulation.lin": "single_stream_modulation.linear",
    "final_layer.linear": "proj_out",
}
DOUBLE = {  # double_blocks.N.X -> the transformer_blocks.N. modules whose rows it holds, in order
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "img_attn.proj": ("attn.to_out.0",),
    "txt_attn.proj": ("attn.to_add_out",),
    "img_mlp.0": ("ff.linear_in",),
    "img_mlp.2": ("ff.linear_out",),
    "txt_mlp.0": ("ff_context.linear_in",),
    "txt_mlp.2": ("ff_context.linear_out",),
}
DOUBLE_NORMS = {"img_attn.norm.query_norm": "attn.norm_q", "img_attn.norm.key_norm": "attn.norm_k", "txt_attn.norm.query_norm": "attn.norm_added_q", "txt_attn.norm.key_norm": "attn.norm_added_k"}
SINGLE = {"linear1": ("attn.to_qkv_mlp_proj",), "linear2": ("attn.to_out",)}
SINGLE_NORMS = {"norm.query_norm": "attn.norm_q", "norm.key_norm": "attn.norm_k"}


def make_flux2(folder: Path, *, guidance: bool, seed: int, shard: str = "40KB", dtype: torch.dtype = torch.bfloat16, **changes) -> Path:
    """A tiny FLUX.2 transformer with random (non-trivial) weights, saved the way diffusers saves it."""
    return build_model("Flux2Transformer2DModel", {**TINY2, **changes, "guidance_embeds": guidance}, folder, seed=seed, shard=shard, dtype=dtype)


def linear_modules(state: dict) -> list[tuple[str, tuple[str, ...]]]:
    """Every Linear module of a FLUX.2 model (diffusers keys) in BFL's names, with the diffusers modules
    whose rows it holds in order (FINAL_MOD: norm_out.linear, its halves swapped)."""
    return flux_layouts.linear_modules(state, TOP, DOUBLE, SINGLE)


def flux2_to_bfl(state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """The inverse of diffusers' convert_flux2_transformer_checkpoint_to_diffusers (FLUX.2 has no biases)."""
    out = {f"{b}.weight": fuse(b, [state[f"{d}.weight"] for d in ds]) for b, ds in linear_modules(state)}
    for i in blocks(state, "transformer_blocks"):
        out |= {f"double_blocks.{i}.{b}.scale": state[f"transformer_blocks.{i}.{d}.weight"] for b, d in DOUBLE_NORMS.items()}
    for i in blocks(state, "single_transformer_blocks"):
        out |= {f"single_blocks.{i}.{b}.scale": state[f"single_transformer_blocks.{i}.{d}.weight"] for b, d in SINGLE_NORMS.items()}
    return {prefix + k: v.contiguous() for k, v in out.items()}


def from_bfl(bfl: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """A BFL / ComfyUI state dict through diffusers' own converter."""
    from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers

    return convert_flux2_transformer_checkpoint_to_diffusers({k.removeprefix(prefix): v for k, v in bfl.items()})


def sparse_folder(folder: Path, config: dict, dtype: str = "BF16") -> Path:
    """A diffusers folder of a FLUX.2 of this config (a real variant's) whose one weight file holds a header
    and no data: the file is as long as the data would be, but sparse (a hole), so it costs no disk and no
    time. Enough for anything that reads headers only: recognising, planning, refusing."""
    from fluxrecipe.architecture import expected_parameters

    config = {"_class_name": "Flux2Transformer2DModel", "patch_size": 1, "timestep_guidance_channels": 256, "axes_dims_rope": [32, 32, 32, 32], **config}
    shapes = expected_parameters(config, "test")
    header, offset = {}, 0
    for key, shape in shapes.items():
        nbytes = math.prod(shape) * 2
        header[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    folder.mkdir(parents=True)
    with open(folder / "diffusion_pytorch_model.safetensors", "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        f.truncate(8 + len(raw) + offset)
    (folder / "config.json").write_text(json.dumps(config))
    return folder
