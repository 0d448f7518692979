"""FLUX.2: dev (6144 wide, 8 double + 48 single blocks), klein 9B (4096, 8 + 24), klein 4B (3072, 5 + 20).

diffusers' Flux2Transformer2DModel; Black Forest Labs' layout as diffusers'
`convert_flux2_transformer_checkpoint_to_diffusers` reads it (the table was derived from its code and is
checked against it on labelled tensors: tests/test_flux2.py). Unlike FLUX.1: the modulation is shared by all
blocks (`double_stream_modulation_img/txt.lin`, `single_stream_modulation.lin`, blocks of their own in
schedules), there are no biases, the MLP is SwiGLU (`img_mlp.0` holds gate and up), there is no CLIP
`vector_in`, and diffusers keeps the single block's `linear1` fused (`attn.to_qkv_mlp_proj`): only the double
blocks' qkv are split. The final layer's halves swap as in FLUX.1.
Blocks: img_in, time_in, guidance_in, txt_in, double_stream_modulation_img, double_stream_modulation_txt,
single_stream_modulation, double_blocks.0-7, single_blocks.0-47, final_layer.

What shapes tell (variant): the width and block counts (dev, klein 9B, klein 4B), and the guidance embedder
(dev has one, klein none). klein's distilled and base models have the same tensors and shapes: a file cannot
tell them apart (diffusers' Flux2KleinPipeline says which with `is_distilled`: previews take a base model's
defaults where preview.pipeline's model_index.json says `is_distilled: false`).
"""

from __future__ import annotations

import json
from typing import Any

from ..text import cut
from . import flux1
from .base import BflTable, Family, Fit, Group, PipelineSetting, Preview, Rename, ShapeError, Shapes, required

ROPE = [32, 32, 32, 32]  # every FLUX.2 (head dim 128): rope has no weights, so a file cannot tell it
VARIANTS = {6144: ("dev", 8, 48), 4096: ("klein 9B", 8, 24), 3072: ("klein 4B", 5, 20)}  # width -> name, blocks
GUIDANCE = "time_guidance_embed.guidance_embedder."

TABLE = BflTable(
    top={
        "img_in": Rename("x_embedder"),
        "time_in.in_layer": Rename("time_guidance_embed.timestep_embedder.linear_1"),
        "time_in.out_layer": Rename("time_guidance_embed.timestep_embedder.linear_2"),
        "guidance_in.in_layer": Rename("time_guidance_embed.guidance_embedder.linear_1"),
        "guidance_in.out_layer": Rename("time_guidance_embed.guidance_embedder.linear_2"),
        "txt_in": Rename("context_embedder"),
        "double_stream_modulation_img.lin": Rename("double_stream_modulation_img.linear"),
        "double_stream_modulation_txt.lin": Rename("double_stream_modulation_txt.linear"),
        "single_stream_modulation.lin": Rename("single_stream_modulation.linear"),
    },
    groups=(
        Group("double_blocks", "transformer_blocks", {
            **flux1.ATTENTION,  # no per-block modulation (img_mod, txt_mod); the attention as FLUX.1's
            "img_mlp.0": Rename("ff.linear_in"),
            "img_mlp.2": Rename("ff.linear_out"),
            "txt_mlp.0": Rename("ff_context.linear_in"),
            "txt_mlp.2": Rename("ff_context.linear_out"),
        }),
        Group("single_blocks", "single_transformer_blocks", {
            "linear1": Rename("attn.to_qkv_mlp_proj"),
            "linear2": Rename("attn.to_out"),
            **flux1.QK_NORMS,
        }),
    ),
    final=flux1.FINAL,  # the halves of the final modulation swap as in FLUX.1
    hidden="img_in.weight",
)

# encode_prompt -> (the text encoder's hidden states of 3 layers side by side, text ids)
VAE_FIT = Fit("vae", "latent_channels", "in_channels", "its VAE's latent channels (2x2 packed)", 4)
DEV = Preview(
    "Flux2Pipeline", "black-forest-labs/FLUX.2-dev", steps=50, guidance=4.0, max_sequence_length=512, text_inputs=("prompt_embeds", None),
    fits=(Fit("text_encoder", "text_config.hidden_size", "joint_attention_dim", "Mistral's hidden states (3 layers)", 3), VAE_FIT),
)
# klein: the distilled models' defaults (4 steps, no classifier-free guidance: the default repos); a pipeline
# whose model_index.json says `is_distilled: false` is a base model's (the model cards: 50 steps, guidance 4.0),
# whose call does classifier-free guidance against "" (encoded up front: negative_inputs)
KLEIN_FITS = (Fit("text_encoder", "hidden_size", "joint_attention_dim", "Qwen3's hidden states (3 layers)", 3), VAE_FIT)


def _klein(size: str) -> Preview:
    base = Preview(
        "Flux2KleinPipeline", f"black-forest-labs/FLUX.2-klein-base-{size}", steps=50, guidance=4.0, max_sequence_length=512,
        text_inputs=("prompt_embeds", None), negative_inputs=("negative_prompt_embeds", None), fits=KLEIN_FITS,
    )
    return Preview(
        "Flux2KleinPipeline", f"black-forest-labs/FLUX.2-klein-{size}", steps=4, guidance=None, max_sequence_length=512,
        text_inputs=("prompt_embeds", None), fits=KLEIN_FITS, by_pipeline=(PipelineSetting("is_distilled", False, base),),
    )


KLEIN = {4096: _klein("9B"), 3072: _klein("4B")}


def derive_config(shapes: Shapes, diffusers_version: str | None = None) -> tuple[dict[str, Any], list[str]]:
    """The config.json of a FLUX.2 transformer with these canonical tensors, and notes on what was assumed.

    Raises ShapeError naming a tensor every FLUX.2 transformer has, when it is missing or not of a shape a
    FLUX.2 transformer can have."""
    config, notes = flux1.flux_config(FAMILY, shapes, diffusers_version, ROPE, assumed_rope)
    hidden = config["num_attention_heads"] * config["attention_head_dim"]
    config["guidance_embeds"] = any(k.startswith(GUIDANCE) for k in shapes)
    config["mlp_ratio"] = _mlp_width(shapes, hidden) / hidden
    config["timestep_guidance_channels"] = _shape(shapes, "time_guidance_embed.timestep_embedder.linear_1.weight", 2)[1]
    return dict(sorted(config.items())), notes


def assumed_rope(head_dim: int) -> list[int]:
    """Four even rotary dims (as many as FLUX.2's 32 x 4), the last taking the rest."""
    quarter = head_dim // 4 - (head_dim // 4) % 2
    return [quarter] * 3 + [head_dim - 3 * quarter]


def _mlp_width(shapes: Shapes, hidden: int) -> int:
    """The MLP's hidden width: a double block's SwiGLU input holds gate and up (2 x width rows); a single
    block's fused projection holds q, k, v (hidden rows each), then gate and up."""
    double = next((k for k in shapes if k.endswith(".ff.linear_in.weight")), None)
    if double:
        return _shape(shapes, double, 2)[0] // 2
    single = next((k for k in shapes if k.endswith(".attn.to_qkv_mlp_proj.weight")), None)
    if single is None:
        raise ShapeError("has neither a double block's 'ff.linear_in' nor a single block's 'attn.to_qkv_mlp_proj', one of which every FLUX.2 transformer has")
    rows = _shape(shapes, single, 2)[0]
    if rows <= 3 * hidden or (rows - 3 * hidden) % 2:
        raise ShapeError(f"'{cut(single)}' has {rows} rows: a FLUX.2 transformer's are 3 x {hidden} (q, k, v) and then twice the MLP's width")
    return (rows - 3 * hidden) // 2


def variant(shapes: Shapes) -> str:
    """'dev', 'klein 9B', 'klein 4B' by width and blocks; another model says its width and blocks ('klein
    (width 32, 2+2 blocks)': klein when it has no guidance embedder)."""
    width = FAMILY.width(shapes)
    double, single = FAMILY.count(shapes, "double_blocks"), FAMILY.count(shapes, "single_blocks")
    name, *blocks = VARIANTS.get(width, (None, None, None))
    if name and blocks == [double, single]:
        return name
    if name:
        return f"{name}-wide ({double}+{single} blocks)"
    kind = "dev" if any(k.startswith(GUIDANCE) for k in shapes) else "klein"
    return f"{kind} (width {width}, {double}+{single} blocks)"


def preview(config: dict[str, Any]) -> Preview:
    """dev's pipeline for a model with a guidance embedder, klein's (of its width) without; a width of no klein
    gets klein 4B's, whose encoder the fit check then finds too wide or narrow (preview.pipeline gives one that fits)."""
    if config.get("guidance_embeds"):
        return DEV
    width = config.get("num_attention_heads", 0) * config.get("attention_head_dim", 0)
    return KLEIN.get(width, KLEIN[3072])


def summary(config: dict[str, Any]) -> str:
    width = config.get("num_attention_heads", 0) * config.get("attention_head_dim", 0)
    return f"guidance_embeds: {json.dumps(config.get('guidance_embeds'))}, width {width}, {config.get('num_layers')}+{config.get('num_single_layers')} blocks"


FAMILY = Family(
    name="FLUX.2",
    class_name="Flux2Transformer2DModel",
    # its shared modulation (either layout), its time embedder and fused single-block projection (diffusers)
    fingerprints=(r"^(double_stream_modulation_(img|txt)|single_stream_modulation)\.", r"^time_guidance_embed\.", r"\.attn\.to_qkv_mlp_proj\."),
    bfl=TABLE,
    derive_config=derive_config,
    variant=variant,
    preview=preview,
    summary=summary,
    licences="FLUX.2-dev: the FLUX [dev] Non-Commercial License; FLUX.2 klein 4B: Apache-2.0; FLUX.2 klein 9B: the FLUX Non-Commercial License",
    config_hint=flux1.guidance_hint,
    flags=("guidance_embeds",),
)


def _shape(shapes: Shapes, key: str, dims: int) -> tuple[int, ...]:
    return required(shapes, key, dims, FAMILY.name)
