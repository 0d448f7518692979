"""FLUX.3: base and distilled (the step-distilled "flow map" models), as diffusers 0.42 defines them.

diffusers' Flux3Transformer2DModel; Black Forest Labs' layout as diffusers'
`convert_flux3_transformer_checkpoint_to_diffusers` reads it: renames only, and one swap (the final layer's
modulation halves, as in FLUX.1). Unlike FLUX.1 and FLUX.2 nothing is fused: every block (per-mode or
joint) has its own `q_proj`, `k_proj`, `v_proj`, `attn_out`, a SwiGLU `mlp_in` / `mlp_out` and q/k norms;
three token modes (image, reference image `image_cond`, text) each have their own input layer, per-mode
blocks and modulation heads (`early_stream_modulations.*`, `single_stream_modulations.*`), shared by all
blocks; there are no biases. `repa_projectors.*` (training-only heads) are no part of the model: the
converter drops them, fluxrecipe reads past them (the plan counts them).
Blocks: emb_in, txt_in, time_in, ref_time_in, early_stream_modulations, single_stream_modulations,
content_mode_blocks.image.N, content_mode_blocks.image_cond.N, txt_mode_blocks.N (the three per-mode streams,
side by side: a gradient gives the same depth the same value in each), single_blocks.N, final_layer.

What shapes tell (variant): the distilled models hold a second timestep embedder (`ref_time_in`, diffusers'
`target_timestep_embedder`: `flow_map: true`), the base models do not; a model of another size than
Flux3Transformer2DModel's default (24 x 128 = 3072 wide, 5 + 28 blocks, the config diffusers' single-file
loader takes from black-forest-labs/flux-3-image-klein[-base]) says its width and blocks.
Previews: diffusers has no Flux3Pipeline, only Flux3ModularPipeline and Flux3DistilledModularPipeline, which
previews cannot drive (base.Preview.modular).
"""

from __future__ import annotations

import json
from typing import Any

from . import flux1, flux2
from .base import BflTable, Family, Group, Norm, Preview, Rename, ShapeError, Shapes, Swapped, required

ROPE = [32, 32, 32, 32]  # Flux3Transformer2DModel's (head dim 128): rope has no weights, so a file cannot tell it
WIDTH, DOUBLE, SINGLE = 3072, 5, 28  # Flux3Transformer2DModel's default size
TARGET = "target_timestep_embedder."  # the distilled (flow map) models' second timestep embedder
MODES = ("image", "image_cond", "txt")

BLOCK = {  # every block's modules, per-mode and joint alike
    "q_proj": Rename("attn.to_q"),
    "k_proj": Rename("attn.to_k"),
    "v_proj": Rename("attn.to_v"),
    "attn_out": Rename("attn.to_out.0"),
    "norm.query_norm": Norm("attn.norm_q"),
    "norm.key_norm": Norm("attn.norm_k"),
    "mlp_in": Rename("ff.linear_in"),
    "mlp_out": Rename("ff.linear_out"),
}

TABLE = BflTable(
    top={
        "emb_in.image": Rename("x_embedders.image"),
        "emb_in.image_cond": Rename("x_embedders.image_cond"),
        "txt_in": Rename("context_embedder"),
        "time_in.in_layer": Rename("timestep_embedder.linear_1"),
        "time_in.out_layer": Rename("timestep_embedder.linear_2"),
        "ref_time_in.in_layer": Rename(TARGET + "linear_1"),
        "ref_time_in.out_layer": Rename(TARGET + "linear_2"),
        **{f"{stage}_stream_modulations.{mode}.lin": Rename(f"{stage}_stream_modulations.{mode}.linear") for stage in ("early", "single") for mode in MODES},
    },
    groups=(
        Group("content_mode_blocks.image", "mode_blocks.image", BLOCK),
        Group("content_mode_blocks.image_cond", "mode_blocks.image_cond", BLOCK, beside=True),
        Group("txt_mode_blocks", "txt_mode_blocks", BLOCK, beside=True),
        Group("single_blocks", "single_transformer_blocks", BLOCK),
    ),
    final={
        "final_layer.image.linear": Rename("proj_out"),
        "final_layer.image.adaLN_modulation.1": Swapped("norm_out.linear"),
    },
    hidden="emb_in.image.weight",
)

BASE = Preview("Flux3ModularPipeline", "black-forest-labs/flux-3-image-klein-base", steps=50, guidance=3.5, max_sequence_length=8192, modular=True)
DISTILLED = Preview("Flux3DistilledModularPipeline", "black-forest-labs/flux-3-image-klein", steps=16, guidance=None, max_sequence_length=8192, modular=True)


def derive_config(shapes: Shapes, diffusers_version: str | None = None) -> tuple[dict[str, Any], list[str]]:
    """The config.json of a FLUX.3 transformer with these canonical tensors, and notes on what was assumed.

    Raises ShapeError naming a tensor every FLUX.3 transformer has, when it is missing or not of a shape a
    FLUX.3 transformer can have."""
    config, notes = flux1.flux_config(FAMILY, shapes, diffusers_version, ROPE, flux2.assumed_rope)
    # FLUX.3's class takes no patch_size nor out_channels: its output has its input's channels
    del config["patch_size"]
    if config.pop("out_channels") is not None:
        raise ShapeError(f"'proj_out.weight' has {shapes['proj_out.weight'][0]} rows: a FLUX.3 transformer's output has its input's {config['in_channels']} channels")
    hidden = config["num_attention_heads"] * config["attention_head_dim"]
    mlp = next((k for k in shapes if k.endswith(".ff.linear_in.weight")), "single_transformer_blocks.0.ff.linear_in.weight")
    rows = required(shapes, mlp, 2, FAMILY.name)[0]
    if rows % 2:
        raise ShapeError(f"'{mlp}' has {rows} rows: a FLUX.3 transformer's SwiGLU input holds gate and up, twice the MLP's width")
    config["mlp_ratio"] = rows // 2 / hidden
    config["cond_in_channels"] = required(shapes, "x_embedders.image_cond.weight", 2, FAMILY.name)[1]
    config["timestep_channels"] = required(shapes, "timestep_embedder.linear_1.weight", 2, FAMILY.name)[1]
    config["flow_map"] = any(k.startswith(TARGET) for k in shapes)
    return dict(sorted(config.items())), notes


def variant(shapes: Shapes) -> str:
    """'base' or 'distilled'; a model of another size says its width and blocks ('distilled (width 32, 1+1
    blocks)')."""
    kind = "distilled" if any(k.startswith(TARGET) for k in shapes) else "base"
    width = FAMILY.width(shapes)
    double, single = FAMILY.count(shapes, FAMILY.groups[0]), FAMILY.count(shapes, "single_blocks")
    return kind if (width, double, single) == (WIDTH, DOUBLE, SINGLE) else f"{kind} (width {width}, {double}+{single} blocks)"


def preview(config: dict[str, Any]) -> Preview:
    return DISTILLED if config.get("flow_map") else BASE


def summary(config: dict[str, Any]) -> str:
    width = config.get("num_attention_heads", 0) * config.get("attention_head_dim", 0)
    return f"flow_map: {json.dumps(config.get('flow_map'))}, width {width}, {config.get('num_layers')}+{config.get('num_single_layers')} blocks"


def flow_map_hint(missing: list[str], unexpected: list[str], config: dict[str, Any]) -> str:
    """flow_map decides whether the model has the distilled models' target timestep embedder: the usual
    misfit of a merge of a base and a distilled model."""
    flow_map = config.get("flow_map")
    if flow_map and any(k.startswith(TARGET) for k in missing):
        return (
            " The config says flow_map: true (distilled) but the target timestep embedder is not written: make a distilled source the base "
            "and `take` its target_timestep_embedder keys, or drop them and set `config: {flow_map: false}`."
        )
    if not flow_map and any(k.startswith(TARGET) for k in unexpected):
        return " The config says flow_map: false (base): drop the target timestep embedder (`{match: target_timestep_embedder, op: drop}`) or set `config: {flow_map: true}`."
    return ""


FAMILY = Family(
    name="FLUX.3",
    class_name="Flux3Transformer2DModel",
    # its per-mode modulation heads and per-mode blocks (either layout)
    fingerprints=(r"^(early|single)_stream_modulations\.", r"^(content_mode_blocks|mode_blocks|txt_mode_blocks)\."),
    bfl=TABLE,
    derive_config=derive_config,
    variant=variant,
    preview=preview,
    summary=summary,
    licences="FLUX.3: the licence on each model's card (black-forest-labs/flux-3-image-klein, flux-3-image-klein-base)",
    config_hint=flow_map_hint,
    skipped=(r"^repa_projectors\.",),
    flags=("flow_map",),
)
