"""The model families (issue 16): every family module checked the same way, from the keys and shapes diffusers
builds for a model of it (on the meta device: no weights); recognition in registry order; variants named from
shapes at the real widths; configs derived back; the block vocabulary. A new family adds its tiny config to
TINY (and its real variants to VARIANTS) and gets all of these; its layout against diffusers' own converter
is a test of its own (test_flux2.py shows how)."""

from __future__ import annotations

import math

import pytest

from conftest import TINY as FLUX1_TINY
import chroma_helpers
import flux3_helpers
from flux2_helpers import DEV, KLEIN_4B, KLEIN_9B, TINY2
from fluxrecipe import families
from fluxrecipe.architecture import expected_parameters
from fluxrecipe.errors import SourceError
from fluxrecipe.families import chroma, flux1, flux2, flux3
from fluxrecipe.formats import bfl
from fluxrecipe.formats.layout import row_size, rows
from fluxrecipe.formats.safetensors import TensorEntry

TINY = {  # family -> a small config of it (with a guidance embedder where the family has one)
    "FLUX.1": {"_class_name": "FluxTransformer2DModel", **FLUX1_TINY, "num_layers": 2, "num_single_layers": 2, "guidance_embeds": True},
    "FLUX.2": {"_class_name": "Flux2Transformer2DModel", **TINY2, "guidance_embeds": True},
    "Chroma": {"_class_name": "ChromaTransformer2DModel", **chroma_helpers.TINY_CHROMA},
    "FLUX.3": {"_class_name": "Flux3Transformer2DModel", **flux3_helpers.TINY3, "flow_map": True},
}
FLUX1_REAL = {"_class_name": "FluxTransformer2DModel", "patch_size": 1, "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 4096, "pooled_projection_dim": 768, "axes_dims_rope": [16, 56, 56]}
FLUX2_REAL = {"_class_name": "Flux2Transformer2DModel", "patch_size": 1, "timestep_guidance_channels": 256, "axes_dims_rope": [32, 32, 32, 32]}
VARIANTS = [  # (config, what the family says of its shapes)
    ({**FLUX1_REAL, "in_channels": 64, "num_layers": 19, "num_single_layers": 38, "guidance_embeds": False}, "FLUX.1 schnell"),
    ({**FLUX1_REAL, "in_channels": 64, "num_layers": 19, "num_single_layers": 38, "guidance_embeds": True}, "FLUX.1 dev"),
    ({**FLUX1_REAL, "in_channels": 384, "out_channels": 64, "num_layers": 19, "num_single_layers": 38, "guidance_embeds": True}, "FLUX.1 Fill"),
    ({**FLUX1_REAL, "in_channels": 128, "out_channels": 64, "num_layers": 19, "num_single_layers": 38, "guidance_embeds": True}, "FLUX.1 Depth/Canny"),
    ({**FLUX1_REAL, "in_channels": 64, "num_layers": 8, "num_single_layers": 38, "guidance_embeds": True}, "FLUX.1 Flex-style dev (8 double blocks)"),
    ({**FLUX2_REAL, **DEV}, "FLUX.2 dev"),
    ({**FLUX2_REAL, **KLEIN_9B}, "FLUX.2 klein 9B"),
    ({**FLUX2_REAL, **KLEIN_4B}, "FLUX.2 klein 4B"),
    ({"_class_name": "ChromaTransformer2DModel", **chroma_helpers.REAL}, "Chroma"),
    ({"_class_name": "Flux3Transformer2DModel", **flux3_helpers.REAL, "flow_map": False}, "FLUX.3 base"),
    ({"_class_name": "Flux3Transformer2DModel", **flux3_helpers.REAL, "flow_map": True}, "FLUX.3 distilled"),
]


def shapes_of(config: dict) -> dict[str, tuple[int, ...]]:
    return expected_parameters(config, "test")


def bfl_entries(family, shapes: dict) -> dict[str, TensorEntry]:
    """The family's BFL file of a model with these shapes, as header entries (made-up offsets, no file)."""
    tensors = bfl.out_tensors(shapes, dict.fromkeys(shapes, "F32"), "", family.bfl)
    entries, offset = {}, 0
    for t in tensors:
        nbytes = math.prod(t.shape) * 4
        entries[t.name] = TensorEntry("/nowhere", t.name, "F32", t.shape, offset, nbytes)
        offset += nbytes
    return entries


def test_every_family_has_a_tiny_config_here():
    assert sorted(TINY) == sorted(f.name for f in families.FAMILIES)


@pytest.mark.parametrize("name", list(TINY))
def test_a_family_recognises_its_own_files_in_both_layouts_and_no_earlier_family_claims_them(name):
    family = families.by_name(name)
    shapes = shapes_of(TINY[name])
    entries = bfl_entries(family, shapes)
    for keys in (shapes, entries, [family.comfyui_prefixes[0] + k for k in entries]):
        stripped = [k.removeprefix(family.comfyui_prefixes[0]) for k in keys]
        assert families.recognise(stripped) is family
    assert family.is_bfl(entries) and not family.is_diffusers(entries)
    assert family.is_diffusers(shapes) and not family.is_bfl(shapes)


def test_flux2_files_hold_flux1_s_fingerprint_and_are_flux2_s():
    """Order matters: FLUX.2's files hold FLUX.1's block names too."""
    keys = list(bfl_entries(flux2.FAMILY, shapes_of(TINY["FLUX.2"])))
    assert flux1.FAMILY.recognises(keys) and families.recognise(keys) is flux2.FAMILY
    assert families.recognise(["vae.decoder.conv_in.weight", "text_encoders.t5xxl.shared.weight"]) is None


@pytest.mark.parametrize("name", list(TINY))
def test_the_table_places_every_tensor_and_reads_it_back(name):
    """Canonical tensors -> the family's BFL tensors (element ranges) -> canonical tensors (byte pieces):
    every key, its shape, and each of its rows from where it was put."""
    family = families.by_name(name)
    shapes = shapes_of(TINY[name])
    entries = bfl_entries(family, shapes)
    tensors, unknown = bfl.to_canonical("x", entries, {}, family)
    assert unknown == [] and {k: t.shape for k, t in tensors.items()} == shapes
    placed = {}  # canonical key -> (BFL tensor, its first element) of each run of it, in canonical order
    for t in bfl.out_tensors(shapes, dict.fromkeys(shapes, "F32"), "", family.bfl):
        at = 0
        for part in t.parts:
            placed.setdefault(part.key, []).append((part.start, entries[t.name].begin + at * 4))
            at += part.stop - part.start
    for key, ref in tensors.items():
        starts = [begin for _, begin in sorted(placed[key])]
        assert [p.begin for p in ref.pieces] == starts, key
        assert sum(p.nbytes for p in ref.pieces) == math.prod(shapes[key]) * 4 == rows(shapes[key]) * row_size(shapes[key]) * 4


@pytest.mark.parametrize("name", list(TINY))
def test_every_key_has_a_block_and_blocks_sort_in_model_order(name):
    family = families.by_name(name)
    shapes = shapes_of(TINY[name])
    blocks = {family.block_of(k) for k in shapes}
    assert None not in blocks
    counts = [family.count(shapes, g) for g in family.groups]
    want = [*family.top_blocks, *(f"{g}.{i}" for g, n in zip(family.groups, counts) for i in range(n)), *family.final_blocks]
    assert sorted(blocks, key=family.block_order) == [b for b in want if b in blocks]
    assert all(family.diagnostic_block(k) in ("embedders", "output") or family.diagnostic_block(k).rpartition(".")[0] in [g.canonical for g in family.bfl.groups] for k in shapes)


@pytest.mark.parametrize("config, described", VARIANTS, ids=[d for _, d in VARIANTS])
def test_variants_are_named_from_shapes_at_their_real_widths(config, described):
    shapes = shapes_of(config)
    family = families.recognise(shapes)
    assert family.describe(shapes) == described


@pytest.mark.parametrize("config, described", VARIANTS + [(c, n) for n, c in TINY.items()], ids=[d for _, d in VARIANTS] + list(TINY))
def test_a_config_derived_from_shapes_builds_the_same_model(config, described):
    """What a single file's shapes say is the config diffusers builds the same tensors from."""
    shapes = shapes_of(config)
    derived, _ = families.recognise(shapes).derive_config(shapes, None)
    assert shapes_of(derived) == shapes
    same = [k for k in config if k in derived and not (k == "axes_dims_rope" and config["attention_head_dim"] != 128)]  # rope: no weights
    assert {k: derived[k] for k in same} == {k: config[k] for k in same}


@pytest.mark.parametrize("family, high, low", [
    (flux1.FAMILY, ["x_embedder.weight", "time_text_embed.guidance_embedder.linear_1.weight", "norm_out.linear.weight", "transformer_blocks.0.attn.norm_q.weight", "transformer_blocks.0.attn.to_q.bias"],
     ["transformer_blocks.0.attn.to_q.weight", "single_transformer_blocks.0.proj_mlp.weight"]),
    (flux2.FAMILY, ["double_stream_modulation_img.linear.weight", "single_stream_modulation.linear.weight", "context_embedder.weight", "proj_out.weight", "single_transformer_blocks.0.attn.norm_k.weight"],
     ["single_transformer_blocks.0.attn.to_qkv_mlp_proj.weight", "transformer_blocks.1.ff.linear_in.weight"]),
    (chroma.FAMILY, ["distilled_guidance_layer.layers.1.linear_2.weight", "distilled_guidance_layer.norms.0.weight", "x_embedder.weight", "context_embedder.weight", "proj_out.weight"],
     ["transformer_blocks.0.attn.to_q.weight", "single_transformer_blocks.1.proj_mlp.weight", "transformer_blocks.1.ff_context.net.2.weight"]),
    (flux3.FAMILY, ["x_embedders.image_cond.weight", "early_stream_modulations.txt.linear.weight", "target_timestep_embedder.linear_1.weight", "norm_out.linear.weight", "mode_blocks.image.0.attn.norm_q.weight"],
     ["mode_blocks.image_cond.1.ff.linear_in.weight", "txt_mode_blocks.0.attn.to_q.weight", "single_transformer_blocks.1.attn.to_out.0.weight"]),
])
def test_what_an_fp8_export_keeps_in_high_precision(family, high, low):
    shapes = shapes_of(TINY[family.name])
    assert [k for k in high if not family.high_precision(k, shapes[k])] == []
    assert [k for k in low if family.high_precision(k, shapes[k])] == []


def test_a_config_of_another_family_beside_the_tensors_is_refused(tmp_path):
    """A FLUX.2 folder whose config.json names FLUX.1's class: one line, before anything is planned."""
    import json

    from flux2_helpers import make_flux2
    from fluxrecipe.recipe import SourceSpec
    from fluxrecipe.sources import open_source

    folder = make_flux2(tmp_path / "m", guidance=False, seed=1)
    (folder / "config.json").write_text(json.dumps(TINY["FLUX.1"]))
    with pytest.raises(SourceError, match=r"config\.json says FluxTransformer2DModel \(FLUX\.1\), but its tensors are FLUX\.2's"):
        open_source(SourceSpec("m", path=str(folder)))


def test_a_schedule_names_any_family_s_blocks_at_recipe_time():
    from fluxrecipe import schedule

    parsed = schedule.parse({"default": 0.5, "single_stream_modulation": 0.1, "vector_in": 0.2})
    assert dict(parsed.entries) == {"default": 0.5, "vector_in": 0.2, "single_stream_modulation": 0.1}
    blocks = schedule.Blocks.of(shapes_of(TINY["FLUX.2"]), flux2.FAMILY)
    assert blocks.counts == (2, 2) and schedule.value_for(parsed, "single_stream_modulation.linear.weight", blocks) == 0.1
    with pytest.raises(ValueError, match="names vector_in, which a FLUX.2 model does not have"):
        schedule.check_against(parsed, ["x_embedder.weight"], blocks)


def test_a_gradient_gives_flux3_s_side_by_side_streams_the_same_value_at_each_depth():
    """FLUX.3's per-mode blocks (image, image_cond, txt) run side by side, then the joint blocks: a gradient over
    the model follows depth (2 per-mode + 2 joint blocks: 4 depths), and a dotted block name may be written
    nested, as Hydra nests `recipe.alpha.content_mode_blocks.image_cond.1=V`."""
    from fluxrecipe import schedule

    parsed = schedule.parse({"default": [0.0, 3.0], "content_mode_blocks": {"image_cond": {"1": 0.25}}})
    blocks = schedule.Blocks.of(shapes_of(TINY["FLUX.3"]), flux3.FAMILY)
    assert {b: parsed.at(b, blocks) for b in blocks.order()} == {
        **dict.fromkeys(flux3.FAMILY.top_blocks, 0.0),
        "content_mode_blocks.image.0": 0.0, "content_mode_blocks.image.1": 1.0,
        "content_mode_blocks.image_cond.0": 0.0, "content_mode_blocks.image_cond.1": 0.25,
        "txt_mode_blocks.0": 0.0, "txt_mode_blocks.1": 1.0,
        "single_blocks.0": 2.0, "single_blocks.1": 3.0,
        "final_layer": 3.0,
    }


@pytest.mark.parametrize("name", list(TINY))
def test_a_family_s_preview_pipeline_is_one_diffusers_has(name):
    """A pipeline class previews can drive (a DiffusionPipeline), or a modular one, for which the family says
    in one line that previews are not offered (FLUX.3)."""
    import diffusers

    family = families.by_name(name)
    config, _ = family.derive_config(shapes_of(TINY[name]), None)
    preview = family.preview(config)
    pipeline = getattr(diffusers, preview.pipeline)
    if preview.modular:
        assert issubclass(pipeline, diffusers.ModularPipeline) and preview.not_offered(name).startswith(f"previews are not offered for {name}: ")
    else:
        assert issubclass(pipeline, diffusers.DiffusionPipeline) and preview.not_offered(name) == ""


def test_a_diagnostics_block_is_named_as_schedules_name_it():
    """The sweep's plot labels a block as a schedule names it, in any family: the group's BFL name."""
    from fluxrecipe.families import schedule_name

    assert [schedule_name(b) for b in ["embedders", "transformer_blocks.7", "single_transformer_blocks.0", "mode_blocks.image_cond.2", "txt_mode_blocks.1", "output"]] == [
        "embedders", "double_blocks.7", "single_blocks.0", "content_mode_blocks.image_cond.2", "txt_mode_blocks.1", "output"
    ]
