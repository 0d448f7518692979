"""FLUX.3 (issue 16), end to end, on tiny models built by diffusers (base and distilled): its Black Forest Labs /
ComfyUI layout against diffusers' own converter (row by row on labelled tensors, and whole files both ways),
outputs loaded by from_pretrained / from_single_file, fp8, merges (lerp, a per-block schedule in FLUX.3's block
names, every merge method), LoRAs baked in (PEFT, kohya and ComfyUI on its per-mode blocks; and as diffusers
fuses them) and extracted, each checked tensor by tensor against a reference written here; the refusal of a
source of another family, `mix_families: true`, and a base merged with a distilled model."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

import family_checks as checks
from conftest import load_state, run_recipe
from flux2_helpers import make_flux2
from flux3_helpers import SWAPPED, flux3_to_bfl, from_bfl, linear_modules, make_flux3
from fluxrecipe.errors import PlanError
from test_methods import METHODS

KEPT = ("emb_in.", "txt_in.", "time_in.", "ref_time_in.", "early_stream_modulations.", "single_stream_modulations.", "final_layer.")
DISTILLED = "FLUX.3 distilled (width 32, 2+2 blocks)"


@pytest.fixture(scope="module")
def f3(tmp_path_factory):
    """Three tiny distilled FLUX.3, shards that do not line up, bf16 / fp32 / bf16; and a base one."""
    root = tmp_path_factory.mktemp("flux3")
    return {
        "a": make_flux3(root / "a", distilled=True, seed=40, shard="40KB"),
        "b": make_flux3(root / "b", distilled=True, seed=41, shard="25KB", dtype=torch.float32),
        "c": make_flux3(root / "c", distilled=True, seed=42, shard="60KB"),
        "base": make_flux3(root / "base", distilled=False, seed=43, shard="40KB"),
    }


@pytest.fixture(scope="module")
def f3_bfl(tmp_path_factory, f3):
    """Source a as one BFL file and as one ComfyUI file (written by the test's own reference)."""
    return checks.bfl_files(tmp_path_factory.mktemp("flux3-files"), f3["a"], flux3_to_bfl)


# --- the layout, against diffusers' converter ------------------------------------------------------------------


@pytest.mark.diffusers
def test_the_table_reads_every_row_where_diffusers_converter_puts_it(tmp_path, f3):
    shapes = {k: tuple(v.shape) for k, v in flux3_to_bfl(load_state(f3["a"])).items()}
    checks.check_rows_where_the_converter_puts_them(tmp_path / "labelled.safetensors", shapes, from_bfl, "FLUX.3")


@pytest.mark.diffusers
@pytest.mark.parametrize("layout", ["bfl", "comfyui"])
def test_a_file_written_by_fluxrecipe_converts_back_to_the_source_in_diffusers(tmp_path, f3, layout):
    checks.check_written_file_converts_back(tmp_path, f3["a"], flux3_to_bfl, from_bfl, layout)


@pytest.mark.diffusers
@pytest.mark.parametrize("layout", ["bfl", "comfyui"])
def test_a_bfl_source_read_by_fluxrecipe_is_what_diffusers_converter_makes_of_it(tmp_path, f3_bfl, layout):
    from diffusers import Flux3Transformer2DModel

    checks.check_bfl_source_reads_as_the_converter(tmp_path, f3_bfl[layout], layout, from_bfl, Flux3Transformer2DModel, DISTILLED)


@pytest.mark.diffusers
def test_training_only_heads_are_read_past_as_diffusers_converter_drops_them(tmp_path, f3):
    """A BFL file with REPA projection heads (`repa_projectors.*`, used in training only): the plan counts them,
    the output is the converter's."""
    bfl = {**flux3_to_bfl(load_state(f3["a"])), "repa_projectors.0.0.weight": torch.ones(8, 32, dtype=checks.BF16)}
    path = tmp_path / "with-repa.safetensors"
    save_file(bfl, path)
    plan = checks.convert("to_diffusers", path, tmp_path / "out", "dry_run=true")
    assert "source 'model': only the transformer is read; ignored 1 keys under repa_projectors" in plan.notes
    checks.convert("to_diffusers", path, tmp_path / "out")
    checks.assert_same(load_state(tmp_path / "out"), from_bfl(load_file(path)))


@pytest.mark.diffusers
def test_outputs_load_with_from_pretrained_and_from_single_file(recipe_dir, tmp_path, f3):
    from diffusers import Flux3Transformer2DModel

    checks.check_outputs_load(recipe_dir, tmp_path, f3["a"], f3["b"], Flux3Transformer2DModel)


# --- fp8 ---------------------------------------------------------------------------------------------------------


def test_to_comfyui_fp8_keeps_what_flux3_keeps_in_high_precision(tmp_path, f3):
    """The input layers, the timestep embedders, the modulation heads, the final layer and the norms in bf16."""
    checks.check_comfyui_fp8(tmp_path, f3["a"], flux3_to_bfl, KEPT)


@pytest.mark.parametrize("dtype, torch_dtype", [("fp8", torch.float8_e4m3fn), ("fp8_e5m2", torch.float8_e5m2), ("fp8_scaled", torch.float8_e4m3fn)])
def test_fp8_and_scaled_fp8_out_and_back_in(tmp_path, f3, dtype, torch_dtype):
    checks.check_fp8_out_and_back_in(tmp_path, f3["b"], flux3_to_bfl, dtype, torch_dtype)


def test_a_rule_s_own_dtype(recipe_dir, tmp_path, f3):
    """The text stream's per-mode blocks in float32, the rest in bf16, as one BFL file."""
    checks.check_dtype_per_rule(recipe_dir, tmp_path, f3["b"], flux3_to_bfl, r"^txt_mode_blocks\.")


# --- merges -------------------------------------------------------------------------------------------------------


def test_lerp_is_its_formula_tensor_by_tensor(recipe_dir, tmp_path, f3):
    checks.check_lerp(recipe_dir, tmp_path, f3["a"], f3["b"])


def test_a_schedule_in_flux3_block_names(recipe_dir, tmp_path, f3):
    """A per-mode group's gradient, a per-mode block, the modulation heads by name, a joint block under its
    group, default."""
    alpha = {
        "default": 0.5, "early_stream_modulations": 1.0, "content_mode_blocks.image": [0.0, 1.0], "txt_mode_blocks.1": 0.25,
        "single_blocks": {"0": 0.75},
    }
    printed = [
        ["emb_in", "..", "ref_time_in", "0.5"],
        ["early_stream_modulations", "1.0"],
        ["single_stream_modulations", "0.5"],
        ["content_mode_blocks.image.0", "0.0"],
        ["content_mode_blocks.image.1", "1.0"],
        ["content_mode_blocks.image_cond.0", "..", "txt_mode_blocks.0", "0.5"],
        ["txt_mode_blocks.1", "0.25"],
        ["single_blocks.0", "0.75"],
        ["single_blocks.1", "..", "final_layer", "0.5"],
    ]
    by_prefix = {
        "early_stream_modulations.": 1.0, "mode_blocks.image.0.": 0.0, "mode_blocks.image.1.": 1.0, "txt_mode_blocks.1.": 0.25,
        "single_transformer_blocks.0.": 0.75,
    }
    checks.check_schedule(recipe_dir, tmp_path, f3["a"], f3["b"], alpha, printed, by_prefix)


@pytest.mark.parametrize("method, params, count", METHODS)
def test_every_merge_method_is_its_formula(recipe_dir, tmp_path, f3, method, params, count):
    """TIES and every other method over FLUX.3 sources, each tensor against test_methods' float64 reference."""
    folders = dict(list({"c": f3["c"], "a": f3["a"], "b": f3["b"]}.items())[:count])
    checks.check_method(recipe_dir, tmp_path, folders, method, params)


def test_a_base_merged_with_a_distilled_model(recipe_dir, tmp_path, f3):
    """With the base model as base, the distilled model's own target timestep embedder is not taken (the output
    is a base model), and a config that calls it distilled is refused saying how to fix it; with the distilled
    model as base, the base model lacks that embedder: refused, naming it."""
    out = tmp_path / "out"
    run_recipe(recipe_dir, out, {"sources": {"base": str(f3["base"]), "d": str(f3["a"])}, "rules": [{"match": ".*", "op": "lerp:0.5"}]})
    base, distilled = load_state(f3["base"]), load_state(f3["a"])
    checks.assert_same(load_state(out), {k: (0.5 * v.float() + 0.5 * distilled[k].float()).to(checks.BF16) for k, v in base.items()})
    recipe = {"sources": {"base": str(f3["base"]), "d": str(f3["a"])}, "rules": [{"match": ".*", "op": "lerp:0.5"}], "config": {"flow_map": True}}
    with pytest.raises(PlanError, match=r"The config says flow_map: true \(distilled\) but the target timestep embedder is not written: make a distilled source the base"):
        run_recipe(recipe_dir, tmp_path / "other", recipe, "dry_run=true")
    with pytest.raises(PlanError, match="needs 'target_timestep_embedder.linear_1.weight', 'target_timestep_embedder.linear_2.weight' from source 'base', which lacks them"):
        run_recipe(recipe_dir, tmp_path / "other", {"sources": {"d": str(f3["a"]), "base": str(f3["base"])}, "rules": [{"match": ".*", "op": "lerp:0.5"}]}, "dry_run=true")


# --- LoRAs ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["peft", "kohya", "comfyui"])
def test_a_lora_is_baked_into_flux3(recipe_dir, tmp_path, f3, scheme):
    """Every Linear module: the per-mode blocks (`lora_unet_content_mode_blocks_image_cond_1_q_proj` in kohya's
    names), the joint blocks, the modulation heads, the final layer's modulation swapped as the weight."""
    modules = linear_modules(load_state(f3["a"]))
    assert {"content_mode_blocks.image_cond.1.q_proj", "txt_mode_blocks.0.mlp_in", "early_stream_modulations.txt.lin", SWAPPED} <= set(dict(modules))
    checks.check_lora_bake(recipe_dir, tmp_path, f3["a"], modules, scheme)


@pytest.mark.diffusers
def test_diffusers_fuses_the_same_flux3_loras(recipe_dir, tmp_path, f3):
    """Flux3LoraLoaderMixin: PEFT on every module; ComfyUI's (`diffusion_model.`) on the blocks, which are what
    its converter renames."""
    from diffusers import Flux3Transformer2DModel
    from diffusers.loaders import Flux3LoraLoaderMixin

    modules = linear_modules(load_state(f3["a"]))
    blocks = [m for m in modules if m[0].startswith(("content_mode_blocks.", "txt_mode_blocks.", "single_blocks."))]
    checks.check_diffusers_fuses_the_same(recipe_dir, tmp_path, f3["a"], Flux3Transformer2DModel, Flux3LoraLoaderMixin, {"peft": modules, "comfyui": blocks})


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, f3):
    return checks.tuned_pair(tmp_path_factory.mktemp("flux3-tuned"), f3["a"])


@pytest.mark.diffusers
def test_extraction_in_both_lora_formats(recipe_dir, tmp_path, tuned):
    from diffusers import Flux3Transformer2DModel

    named = ("content_mode_blocks.image_cond.1.q_proj", "txt_mode_blocks.0.mlp_in", "single_blocks.1.attn_out", SWAPPED, "early_stream_modulations.txt.lin")
    checks.check_extraction(recipe_dir, tmp_path, *tuned, Flux3Transformer2DModel, flux3_to_bfl, named)


# --- families, previews ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def flux2(tmp_path_factory):
    """A tiny FLUX.2 of FLUX.3's width, text width and channels: they share some tensors by name and shape."""
    return make_flux2(tmp_path_factory.mktemp("flux2-for-flux3") / "m", guidance=False, seed=44)


def test_flux2_and_flux3_sources_are_refused_naming_both_families(recipe_dir, tmp_path, flux2, f3):
    checks.check_other_family_refused(recipe_dir, tmp_path, flux2, f3["a"], ("FLUX.2 klein (width 32, 2+2 blocks)", DISTILLED))


def test_mix_families_takes_only_the_tensors_both_have(recipe_dir, tmp_path, flux2, f3):
    checks.check_mix_families(recipe_dir, tmp_path, f3["a"], flux2)


def test_previews_are_not_offered_for_flux3(f3):
    """diffusers offers FLUX.3 only as modular pipelines, which cannot be driven as a DiffusionPipeline is: the
    family says so, in one line, for base and distilled models alike."""
    import diffusers

    from fluxrecipe.families import flux3

    assert not hasattr(diffusers, "Flux3Pipeline")
    for folder, pipeline in ((f3["base"], "Flux3ModularPipeline"), (f3["a"], "Flux3DistilledModularPipeline")):
        config, _ = flux3.FAMILY.derive_config({k: tuple(v.shape) for k, v in load_state(folder).items()})
        preview = flux3.FAMILY.preview(config)
        assert preview.pipeline == pipeline and issubclass(getattr(diffusers, pipeline), diffusers.ModularPipeline)
        assert not issubclass(getattr(diffusers, pipeline), diffusers.DiffusionPipeline)
        assert preview.not_offered("FLUX.3") == (
            f"previews are not offered for FLUX.3: diffusers offers it only as the modular {pipeline}, whose blocks load their own components and encode their own prompts"
        )


def test_verify_names_the_family_of_a_single_file(tmp_path, f3, capsys):
    checks.check_verify_names_the_family(tmp_path, f3["a"], "FLUX.3", capsys)
