"""FLUX.1 in canonical keys: its blocks (in ComfyUI ModelMergeFlux1's names) and its config from its shapes.

The block vocabulary is the same whatever a source's layout, since canonical keys are diffusers' names:
x_embedder = img_in, time_text_embed.timestep_embedder = time_in, .guidance_embedder = guidance_in,
.text_embedder = vector_in, context_embedder = txt_in, transformer_blocks.N = double_blocks.N,
single_transformer_blocks.N = single_blocks.N, norm_out and proj_out = final_layer.
"""

from __future__ import annotations

import re
from typing import Any

CLASS_NAME = "FluxTransformer2DModel"
EMBEDDERS = (
    ("x_embedder.", "img_in"),
    ("time_text_embed.timestep_embedder.", "time_in"),
    ("time_text_embed.guidance_embedder.", "guidance_in"),
    ("time_text_embed.text_embedder.", "vector_in"),
    ("context_embedder.", "txt_in"),
)
FINAL = ("norm_out.", "proj_out.")
BLOCK = re.compile(r"^(single_)?transformer_blocks\.(\d+)\.")
FLUX_ROPE = [16, 56, 56]  # every FLUX.1 (head dim 128): rope has no weights, so a file cannot tell it
VARIANTS = {64: "base", 128: "Depth/Canny (in_channels 128)", 384: "Fill (in_channels 384)"}


def block_of(key: str) -> str | None:
    """The block of a canonical key: 'img_in', ..., 'double_blocks.7', 'single_blocks.12', 'final_layer'."""
    m = BLOCK.match(key)
    if m:
        return f"{'single' if m[1] else 'double'}_blocks.{m[2]}"
    for prefix, block in EMBEDDERS:
        if key.startswith(prefix):
            return block
    if key.startswith(FINAL):
        return "final_layer"
    return None


def block_order(block: str) -> tuple[int, int]:
    """Model order: the embedders, the double blocks, the single blocks, the final layer."""
    m = re.fullmatch(r"(double|single)_blocks\.(\d+)", block)
    if m:
        return (1 if m[1] == "double" else 2, int(m[2]))
    names = [b for _, b in EMBEDDERS]
    return (0, names.index(block)) if block in names else (3, 0)


def derive_config(shapes: dict[str, tuple[int, ...]], diffusers_version: str | None = None) -> tuple[dict[str, Any], list[str]]:
    """The config.json of a FLUX.1 transformer with these canonical tensors, and notes on what was assumed.

    Raises ShapeError naming a tensor every FLUX.1 transformer has, when it is missing or not of a shape
    a FLUX.1 transformer can have."""
    hidden, in_channels = _shape(shapes, "x_embedder.weight", 2)
    head_key = next((k for k in shapes if k.endswith("attn.norm_q.weight")), "transformer_blocks.0.attn.norm_q.weight")
    (head_dim,) = _shape(shapes, head_key, 1)
    out_channels = _shape(shapes, "proj_out.weight", 2)[0]
    joint = _shape(shapes, "context_embedder.weight", 2)[1]
    pooled = _shape(shapes, "time_text_embed.text_embedder.linear_1.weight", 2)[1]
    if hidden % head_dim:
        raise ShapeError(f"'{head_key}' has {head_dim} elements, which do not divide the hidden size {hidden}")
    notes = []
    if head_dim == 128:
        rope = FLUX_ROPE
    else:  # not FLUX.1's width: an even split (rotary dims must be even); say so
        first = head_dim // 4 - (head_dim // 4) % 2
        rest = (head_dim - first) // 2 - ((head_dim - first) // 2) % 2
        rope = [first, rest, head_dim - first - rest]
        notes.append(f"axes_dims_rope cannot be read from weights: assumed {rope} (head dim {head_dim}); set `config: {{axes_dims_rope: [...]}}` if the model differs")
    config: dict[str, Any] = {
        "_class_name": CLASS_NAME,
        **({"_diffusers_version": diffusers_version} if diffusers_version else {}),
        "attention_head_dim": head_dim,
        "axes_dims_rope": rope,
        "guidance_embeds": any(k.startswith("time_text_embed.guidance_embedder.") for k in shapes),
        "in_channels": in_channels,
        "joint_attention_dim": joint,
        "num_attention_heads": hidden // head_dim,
        "num_layers": _count(shapes, "transformer_blocks"),
        "num_single_layers": _count(shapes, "single_transformer_blocks"),
        "out_channels": out_channels if out_channels != in_channels else None,
        "patch_size": 1,
        "pooled_projection_dim": pooled,
    }
    return config, notes


class ShapeError(ValueError):
    """A tensor every FLUX.1 transformer has is missing, or its shape is not one it can have."""


def _shape(shapes: dict[str, tuple[int, ...]], key: str, dims: int) -> tuple[int, ...]:
    if key not in shapes:
        raise ShapeError(f"lacks '{key}', which every FLUX.1 transformer has")
    shape = shapes[key]
    if len(shape) != dims or not all(shape):
        raise ShapeError(f"'{key}' is {list(shape)}: a FLUX.1 transformer's is {dims}-D and not empty")
    return shape


def variant(config: dict[str, Any]) -> str:
    """'base', 'Fill (in_channels 384)', ... from a config, for messages."""
    return VARIANTS.get(config.get("in_channels"), f"in_channels {config.get('in_channels')}")


def _count(shapes: dict[str, tuple[int, ...]], group: str) -> int:
    indexes = {int(k.split(".")[1]) for k in shapes if k.startswith(group + ".")}
    return max(indexes) + 1 if indexes else 0
