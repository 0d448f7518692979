"""FLUX.1: schnell, dev, Krea-dev, Kontext-dev, Fill, Depth / Canny, and Flex-style models (fewer double blocks).

diffusers' FluxTransformer2DModel; Black Forest Labs' layout as diffusers'
`convert_flux_transformer_checkpoint_to_diffusers` reads it (unlike it, nothing here assumes FLUX.1's width,
so small test models convert as well):
- `double_blocks.N.img_attn.qkv` = rows of to_q, to_k, to_v (txt_attn.qkv: add_q/k/v_proj);
- `single_blocks.N.linear1` = rows of to_q, to_k, to_v (hidden rows each) and proj_mlp (the rest);
- `final_layer.adaLN_modulation.1` = norm_out.linear with its two row halves swapped, the only swap;
- q/k norms are `.scale` there and `.weight` in diffusers.
Blocks in ComfyUI ModelMergeFlux1's names: img_in, time_in, guidance_in, vector_in, txt_in,
double_blocks.0-18, single_blocks.0-37, final_layer.

What shapes tell (variant): the guidance embedder (schnell has none; dev has one), in_channels (Fill 384,
Depth / Canny 128), the number of double blocks (Flex.1-style models have 8). dev, Krea-dev and Kontext-dev
have the same tensors and shapes, so a file cannot tell them apart: all are "dev"; nor Depth from Canny.
"""

from __future__ import annotations

import json
import re
from typing import Any

from ..text import cut
from .base import BflTable, Family, Fit, Fused, Group, LoraTables, Norm, Preview, Rename, ShapeError, Shapes, Swapped, required

WIDTH, DOUBLE, SINGLE = 3072, 19, 38  # FLUX.1's hidden size and block counts
HEAD_DIM = 128  # every released FLUX's
ROPE = [16, 56, 56]  # every FLUX.1 (head dim 128): rope has no weights, so a file cannot tell it
BASE_CHANNELS = 64  # in_channels of schnell, dev, Krea-dev, Kontext-dev
CHANNELS = {384: "Fill", 128: "Depth/Canny"}  # in_channels of the control variants

# The double blocks' attention and the final layer, which FLUX.2 has as well
ATTENTION = {
    "img_attn.qkv": Fused(("attn.to_q", "attn.to_k", "attn.to_v")),
    "txt_attn.qkv": Fused(("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")),
    "img_attn.norm.query_norm": Norm("attn.norm_q"),
    "img_attn.norm.key_norm": Norm("attn.norm_k"),
    "txt_attn.norm.query_norm": Norm("attn.norm_added_q"),
    "txt_attn.norm.key_norm": Norm("attn.norm_added_k"),
    "img_attn.proj": Rename("attn.to_out.0"),
    "txt_attn.proj": Rename("attn.to_add_out"),
}
FINAL = {
    "final_layer.linear": Rename("proj_out"),
    "final_layer.adaLN_modulation.1": Swapped("norm_out.linear"),
}
QK_NORMS = {"norm.query_norm": Norm("attn.norm_q"), "norm.key_norm": Norm("attn.norm_k")}  # a single block's
# The double blocks' GELU MLPs and the single blocks without their modulation: Chroma's blocks are these
MLP = {
    "img_mlp.0": Rename("ff.net.0.proj"),
    "img_mlp.2": Rename("ff.net.2"),
    "txt_mlp.0": Rename("ff_context.net.0.proj"),
    "txt_mlp.2": Rename("ff_context.net.2"),
}
SINGLE_BLOCK = {
    "linear1": Fused(("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")),
    "linear2": Rename("proj_out"),
    **QK_NORMS,
}

TABLE = BflTable(
    top={
        "img_in": Rename("x_embedder"),
        "time_in.in_layer": Rename("time_text_embed.timestep_embedder.linear_1"),
        "time_in.out_layer": Rename("time_text_embed.timestep_embedder.linear_2"),
        "guidance_in.in_layer": Rename("time_text_embed.guidance_embedder.linear_1"),
        "guidance_in.out_layer": Rename("time_text_embed.guidance_embedder.linear_2"),
        "vector_in.in_layer": Rename("time_text_embed.text_embedder.linear_1"),
        "vector_in.out_layer": Rename("time_text_embed.text_embedder.linear_2"),
        "txt_in": Rename("context_embedder"),
    },
    groups=(
        Group("double_blocks", "transformer_blocks", {
            "img_mod.lin": Rename("norm1.linear"),
            "txt_mod.lin": Rename("norm1_context.linear"),
            **ATTENTION,
            **MLP,
        }),
        Group("single_blocks", "single_transformer_blocks", {"modulation.lin": Rename("norm.linear"), **SINGLE_BLOCK}),
    ),
    final=FINAL,
    hidden="img_in.weight",
)

# XLabs' processors: lora1 works on the image stream, lora2 on the text stream; the single blocks' qkv_lora
# adds to the first 3 x hidden rows of linear1 (q, k, v; not the MLP part). BFL's control LoRAs replace the
# q/k norms whole.
LORA = LoraTables(
    xlabs=re.compile(r"^(double_blocks|single_blocks)\.(\d+)\.processor\.(qkv_lora1|qkv_lora2|proj_lora1|proj_lora2|qkv_lora|proj_lora)$"),
    xlabs_double={"qkv_lora1": "img_attn.qkv", "qkv_lora2": "txt_attn.qkv", "proj_lora1": "img_attn.proj", "proj_lora2": "txt_attn.proj"},
    xlabs_single_qkv=Fused(("attn.to_q", "attn.to_k", "attn.to_v")),
    replaced=re.compile(r"\.norm_(added_)?[qk]\.weight$"),
    control_hint="a control LoRA for FLUX.1 Canny/Depth/Fill? bake it into a model of that input size",
)

GUIDANCE = "time_text_embed.guidance_embedder."
# FluxPipeline.encode_prompt -> (T5's embeddings, CLIP's pooled one, text ids); 256 T5 tokens: schnell's limit
PIPELINE = dict(
    text_inputs=("prompt_embeds", "pooled_prompt_embeds", None),
    encode_options=(("prompt_2", None),),
    fits=(
        Fit("text_encoder_2", "d_model", "joint_attention_dim", "T5's embeddings"),
        Fit("text_encoder", "hidden_size", "pooled_projection_dim", "CLIP's pooled embedding"),
        Fit("vae", "latent_channels", "in_channels", "its VAE's latent channels (2x2 packed)", 4),
    ),
)
SCHNELL = Preview("FluxPipeline", "black-forest-labs/FLUX.1-schnell", steps=4, guidance=None, max_sequence_length=256, **PIPELINE)
DEV = Preview("FluxPipeline", "black-forest-labs/FLUX.1-schnell", steps=20, guidance=3.5, max_sequence_length=256, **PIPELINE)  # schnell's encoders and VAE serve dev too

# The demo's small FLUX.1 models of random weights (demo.py): FLUX.1's design, a few blocks of width 128;
# schnell-like without and Krea-like with a guidance embedder.
_DEMO = dict(
    patch_size=1, in_channels=16, num_layers=2, num_single_layers=4, attention_head_dim=32, num_attention_heads=4,
    joint_attention_dim=64, pooled_projection_dim=32, axes_dims_rope=[8, 12, 12],
)
DEMO = {"schnell": {**_DEMO, "guidance_embeds": False}, "krea": {**_DEMO, "guidance_embeds": True}}


def derive_config(shapes: Shapes, diffusers_version: str | None = None) -> tuple[dict[str, Any], list[str]]:
    """The config.json of a FLUX.1 transformer with these canonical tensors, and notes on what was assumed.

    Raises ShapeError naming a tensor every FLUX.1 transformer has, when it is missing or not of a shape
    a FLUX.1 transformer can have."""
    config, notes = flux_config(FAMILY, shapes, diffusers_version, ROPE, assumed_rope)
    config["guidance_embeds"] = any(k.startswith(GUIDANCE) for k in shapes)
    config["pooled_projection_dim"] = required(shapes, "time_text_embed.text_embedder.linear_1.weight", 2, FAMILY.name)[1]
    return dict(sorted(config.items())), notes


def flux_config(family: Family, shapes: Shapes, diffusers_version: str | None, rope: list[int], assumed_rope) -> tuple[dict[str, Any], list[str]]:
    """The config fields every FLUX-shaped transformer has (FLUX.1 and the families built on its design), from
    its shapes: width and heads, channels, text width, blocks, rope (`rope` at a head dim of 128, as every
    released model; else `assumed_rope(head_dim)`, with a note: rope has no weights)."""
    hidden, in_channels = required(shapes, family.hidden_key, 2, family.name)
    head_key = next((k for k in shapes if k.endswith("attn.norm_q.weight")), f"{family.bfl.groups[-1].canonical}.0.attn.norm_q.weight")
    (head_dim,) = required(shapes, head_key, 1, family.name)
    out_channels = required(shapes, "proj_out.weight", 2, family.name)[0]
    joint = required(shapes, "context_embedder.weight", 2, family.name)[1]
    if hidden % head_dim:
        raise ShapeError(f"'{cut(head_key)}' has {head_dim} elements, which do not divide the hidden size {hidden}")
    notes = []
    if head_dim != HEAD_DIM:
        rope = assumed_rope(head_dim)
        notes.append(f"axes_dims_rope cannot be read from weights: assumed {rope} (head dim {head_dim}); set `config: {{axes_dims_rope: [...]}}` if the model differs")
    config: dict[str, Any] = {
        "_class_name": family.class_name,
        **({"_diffusers_version": diffusers_version} if diffusers_version else {}),
        "attention_head_dim": head_dim,
        "axes_dims_rope": rope,
        "in_channels": in_channels,
        "joint_attention_dim": joint,
        "num_attention_heads": hidden // head_dim,
        "num_layers": family.count(shapes, family.groups[0]),
        "num_single_layers": family.count(shapes, family.groups[-1]),
        "out_channels": out_channels if out_channels != in_channels else None,
        "patch_size": 1,
    }
    return config, notes


def assumed_rope(head_dim: int) -> list[int]:
    """Three even rotary dims, the first about a quarter, as FLUX.1's 16 + 56 + 56 (rotary dims must be even)."""
    first = head_dim // 4 - (head_dim // 4) % 2
    rest = (head_dim - first) // 2 - ((head_dim - first) // 2) % 2
    return [first, rest, head_dim - first - rest]


def variant(shapes: Shapes) -> str:
    """'schnell', 'dev' (or Krea-dev, Kontext-dev: the same shapes), 'Fill', 'Depth/Canny', 'Flex-style dev
    (8 double blocks)'; a model of another width says so ('schnell (width 32, in_channels 4, 2+2 blocks)')."""
    width = FAMILY.width(shapes)
    in_channels = shapes.get("x_embedder.weight", (0, 0))[-1]
    kind = CHANNELS.get(in_channels) or ("dev" if any(k.startswith(GUIDANCE) for k in shapes) else "schnell")
    double, single = FAMILY.count(shapes, "double_blocks"), FAMILY.count(shapes, "single_blocks")
    if width != WIDTH:
        channels = "" if in_channels in (CHANNELS.keys() | {BASE_CHANNELS}) else f", in_channels {in_channels}"
        return f"{kind} (width {width}{channels}, {double}+{single} blocks)"
    if double < DOUBLE and single == SINGLE:
        return f"Flex-style {kind} ({double} double blocks)"
    return kind if (double, single) == (DOUBLE, SINGLE) else f"{kind} ({double}+{single} blocks)"


def preview(config: dict[str, Any]) -> Preview:
    """Few steps and no guidance for a model without a guidance embedder (schnell-like), dev's otherwise."""
    return DEV if config.get("guidance_embeds") else SCHNELL


def summary(config: dict[str, Any]) -> str:
    return f"guidance_embeds: {json.dumps(config.get('guidance_embeds'))}, in_channels {config.get('in_channels')}"


def guidance_hint(missing: list[str], unexpected: list[str], config: dict[str, Any]) -> str:
    """guidance_embeds decides whether the model has a guidance embedder: the usual misfit of a merge."""
    guidance = config.get("guidance_embeds")
    if any("guidance" in k for k in missing) and guidance:
        return (
            " The config says guidance_embeds: true but the guidance embedder is not written: make a source that has it the base and "
            "`take` its guidance keys, or drop them and set `config: {guidance_embeds: false}`."
        )
    if any("guidance" in k for k in unexpected) and not guidance:
        return " The config says guidance_embeds: false: drop the guidance keys (`{match: guidance, op: drop}`) or set `config: {guidance_embeds: true}`."
    return ""


FAMILY = Family(
    name="FLUX.1",
    class_name="FluxTransformer2DModel",
    # FLUX.1's keys are in every later family too: it is tried last, and anything FLUX-shaped is FLUX.1
    fingerprints=(r"^(double_blocks|single_blocks|img_in|final_layer)\.", r"^(transformer_blocks|single_transformer_blocks|x_embedder)\."),
    bfl=TABLE,
    derive_config=derive_config,
    variant=variant,
    preview=preview,
    summary=summary,
    licences="FLUX.1-schnell: Apache-2.0; FLUX.1-dev and FLUX.1-Krea-dev: the FLUX.1 [dev] Non-Commercial License",
    lora=LORA,
    config_hint=guidance_hint,
    flags=("guidance_embeds",),
)

