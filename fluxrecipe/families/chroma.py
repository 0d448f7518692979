"""Chroma (Chroma1, Chroma1-HD, Chroma1-Base): FLUX.1-schnell without its per-block modulation and without
the time, vector and guidance embedders, plus a small "distilled guidance" network that emits every modulation
vector of the model at once.

diffusers' ChromaTransformer2DModel; Black Forest Labs' layout as diffusers'
`convert_chroma_transformer_checkpoint_to_diffusers` reads it (which hard-codes FLUX.1's width 3072; nothing
here does): FLUX.1's blocks without `img_mod` / `txt_mod` / `modulation` (fused q/k/v and linear1, norms as
`.scale`), `final_layer.linear` without the final modulation (so no swap), and
`distilled_guidance_layer.{in_proj, layers.N.in_layer / out_layer, norms.N, out_proj}`, whose layers diffusers
calls `linear_1` / `linear_2`.

Blocks: img_in, distilled_guidance_layer, txt_in, double_blocks.0-18, single_blocks.0-37, final_layer. The
guidance network is one block, by the name it has in every layout (Chroma's own code, ComfyUI, diffusers):
it is one small network that computes the modulation of all the blocks at once, so a schedule that treated
its layers apart from one another would have no block of the model to follow; it sits where FLUX.1's
time/guidance/vector embedders sit, before the blocks.

What shapes tell (variant): nothing beyond the size. Chroma1-HD, Chroma1-Base and the earlier Chroma releases
have the same tensors and shapes, so a file is "Chroma"; a model of another width or block count says so.
Chroma1-Radiance (pixel space: a NeRF decoder head, `nerf_*`, in place of the final layer) is refused by name.
LoRAs trained on FLUX.1 apply where Chroma has the module (attention, MLPs, embedders): their modulation
modules have no target here and are listed as unmatched.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from . import flux1
from .base import BflTable, Family, Fit, Group, Norm, Preview, Rename, Shapes, required

WIDTH, DOUBLE, SINGLE = flux1.WIDTH, flux1.DOUBLE, flux1.SINGLE  # Chroma1's size is FLUX.1-schnell's
GUIDANCE_LAYER = re.compile(r"^distilled_guidance_layer\.layers\.(\d+)\.")

TABLE = BflTable(
    top={
        "img_in": Rename("x_embedder"),
        "distilled_guidance_layer.in_proj": Rename("distilled_guidance_layer.in_proj"),
        "distilled_guidance_layer.layers.*.in_layer": Rename("distilled_guidance_layer.layers.*.linear_1"),
        "distilled_guidance_layer.layers.*.out_layer": Rename("distilled_guidance_layer.layers.*.linear_2"),
        "distilled_guidance_layer.norms.*": Norm("distilled_guidance_layer.norms.*"),
        "distilled_guidance_layer.out_proj": Rename("distilled_guidance_layer.out_proj"),
        "txt_in": Rename("context_embedder"),
    },
    groups=(
        Group("double_blocks", "transformer_blocks", {**flux1.ATTENTION, **flux1.MLP}),
        Group("single_blocks", "single_transformer_blocks", flux1.SINGLE_BLOCK),
    ),
    final={"final_layer.linear": Rename("proj_out")},
    hidden="img_in.weight",
)

# ChromaPipeline's defaults; its guidance is classifier-free: encode_prompt -> (T5's embeddings, text ids, mask,
# and the same of the negative prompt, "")
PREVIEW = Preview(
    "ChromaPipeline", "lodestones/Chroma1-HD", steps=35, guidance=5.0, max_sequence_length=512,
    text_inputs=("prompt_embeds", None, "prompt_attention_mask", "negative_prompt_embeds", None, "negative_prompt_attention_mask"),
    encode_options=(("negative_prompt", ""), ("do_classifier_free_guidance", True)),
    fits=(
        Fit("text_encoder", "d_model", "joint_attention_dim", "T5's embeddings"),
        Fit("vae", "latent_channels", "in_channels", "its VAE's latent channels (2x2 packed)", 4),
    ),
)


def derive_config(shapes: Shapes, diffusers_version: str | None = None) -> tuple[dict[str, Any], list[str]]:
    """The config.json of a Chroma transformer with these canonical tensors, and notes on what was assumed
    (rope: FLUX.1's). Raises ShapeError naming a tensor every Chroma transformer has, when it is missing or not
    of a shape a Chroma transformer can have."""
    config, notes = flux1.flux_config(FAMILY, shapes, diffusers_version, flux1.ROPE, flux1.assumed_rope)
    hidden, channels = required(shapes, "distilled_guidance_layer.in_proj.weight", 2, FAMILY.name)
    layers = {int(m[1]) for k in shapes if (m := GUIDANCE_LAYER.match(k))}
    config["approximator_num_channels"] = channels
    config["approximator_hidden_dim"] = hidden
    config["approximator_layers"] = max(layers) + 1 if layers else 0
    return dict(sorted(config.items())), notes


def variant(shapes: Shapes) -> str:
    """'' for Chroma1's size (the family's name says it all); another model says its width and blocks."""
    width = FAMILY.width(shapes)
    double, single = FAMILY.count(shapes, "double_blocks"), FAMILY.count(shapes, "single_blocks")
    if (width, double, single) == (WIDTH, DOUBLE, SINGLE):
        return ""
    in_channels = shapes.get(FAMILY.hidden_key, (0, 0))[-1]
    channels = "" if in_channels == flux1.BASE_CHANNELS else f", in_channels {in_channels}"
    return f"(width {width}{channels}, {double}+{single} blocks)"


def preview(config: dict[str, Any]) -> Preview:
    return PREVIEW


def summary(config: dict[str, Any]) -> str:
    width = config.get("num_attention_heads", 0) * config.get("attention_head_dim", 0)
    return f"width {width}, {config.get('num_layers')}+{config.get('num_single_layers')} blocks, {config.get('approximator_layers')} guidance layers"


FAMILY = Family(
    name="Chroma",
    class_name="ChromaTransformer2DModel",
    # its guidance network (the same name in either layout); Chroma1-Radiance's NeRF head, to refuse it by name
    fingerprints=(r"^distilled_guidance_layer\.", r"^nerf_"),
    bfl=TABLE,
    derive_config=derive_config,
    variant=variant,
    preview=preview,
    summary=summary,
    licences="Chroma1-HD and Chroma1-Base: Apache-2.0",
    lora=dataclasses.replace(flux1.LORA, replaced=None, control_hint=""),  # XLabs' FLUX.1 processors: Chroma has their modules
    refused={r"^nerf_": "Chroma1-Radiance, a pixel-space Chroma (a NeRF decoder head in place of the final layer)"},
)
