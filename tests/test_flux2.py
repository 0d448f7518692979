"""FLUX.2 (issue 16), end to end, on tiny models built by diffusers: its Black Forest Labs / ComfyUI layout
against diffusers' own converter (row by row on labelled tensors, and whole files both ways), outputs loaded
by from_pretrained / from_single_file, fp8, merges (lerp, a per-block schedule in FLUX.2's block names, TIES),
LoRAs baked in (PEFT on the fused to_qkv_mlp_proj, kohya, ComfyUI; and as diffusers fuses them) and
extracted, each checked tensor by tensor against a reference written here; and the refusals of sources of
another family or width, with `mix_families: true` merging only what they share."""

from __future__ import annotations

import pytest
import torch

import family_checks as checks
from conftest import load_state, run_recipe
from flux2_helpers import DEV, KLEIN_4B, KLEIN_9B, flux2_to_bfl, from_bfl, linear_modules, make_flux2, sparse_folder
from flux_layouts import FINAL_MOD
from fluxrecipe.errors import PlanError

MODULATION = ("double_stream_modulation_img", "double_stream_modulation_txt", "single_stream_modulation")


@pytest.fixture(scope="module")
def f2(tmp_path_factory):
    """Three tiny FLUX.2 (dev-like: a guidance embedder), shards that do not line up, bf16 / fp32 / bf16."""
    root = tmp_path_factory.mktemp("flux2")
    return {
        "a": make_flux2(root / "a", guidance=True, seed=20, shard="40KB"),
        "b": make_flux2(root / "b", guidance=True, seed=21, shard="25KB", dtype=torch.float32),
        "c": make_flux2(root / "c", guidance=True, seed=22, shard="60KB"),
    }


@pytest.fixture(scope="module")
def f2_bfl(tmp_path_factory, f2):
    """Source a as one BFL file and as one ComfyUI file (written by the test's own reference)."""
    return checks.bfl_files(tmp_path_factory.mktemp("flux2-files"), f2["a"], flux2_to_bfl)


# --- the layout, against diffusers' converter ------------------------------------------------------------------


@pytest.mark.diffusers
def test_the_table_reads_every_row_where_diffusers_converter_puts_it(tmp_path, f2):
    shapes = {k: tuple(v.shape) for k, v in flux2_to_bfl(load_state(f2["a"])).items()}
    checks.check_rows_where_the_converter_puts_them(tmp_path / "labelled.safetensors", shapes, from_bfl, "FLUX.2")


@pytest.mark.diffusers
@pytest.mark.parametrize("layout", ["bfl", "comfyui"])
def test_a_file_written_by_fluxrecipe_converts_back_to_the_source_in_diffusers(tmp_path, f2, layout):
    checks.check_written_file_converts_back(tmp_path, f2["a"], flux2_to_bfl, from_bfl, layout)


@pytest.mark.diffusers
@pytest.mark.parametrize("layout", ["bfl", "comfyui"])
def test_a_bfl_source_read_by_fluxrecipe_is_what_diffusers_converter_makes_of_it(tmp_path, f2_bfl, layout):
    from diffusers import Flux2Transformer2DModel

    checks.check_bfl_source_reads_as_the_converter(tmp_path, f2_bfl[layout], layout, from_bfl, Flux2Transformer2DModel, "FLUX.2 dev (width 32, 2+2 blocks)")


@pytest.mark.diffusers
def test_outputs_load_with_from_pretrained_and_from_single_file(recipe_dir, tmp_path, f2):
    from diffusers import Flux2Transformer2DModel

    checks.check_outputs_load(recipe_dir, tmp_path, f2["a"], f2["b"], Flux2Transformer2DModel)


# --- fp8 ---------------------------------------------------------------------------------------------------------


def test_to_comfyui_fp8_keeps_what_flux2_keeps_in_high_precision(tmp_path, f2):
    """The embedders, the shared modulation, the final layer and the norms in bf16."""
    assert any(k.startswith(MODULATION) for k in load_state(f2["a"]))
    checks.check_comfyui_fp8(tmp_path, f2["a"], flux2_to_bfl, ("img_in.", "txt_in.", "time_in.", "guidance_in.", "final_layer.", *(m + "." for m in MODULATION)))


@pytest.mark.parametrize("dtype, torch_dtype", [("fp8_e5m2", torch.float8_e5m2), ("fp8_scaled", torch.float8_e4m3fn)])
def test_fp8_and_scaled_fp8_out_and_back_in(tmp_path, f2, dtype, torch_dtype):
    checks.check_fp8_out_and_back_in(tmp_path, f2["b"], flux2_to_bfl, dtype, torch_dtype)


# --- merges -------------------------------------------------------------------------------------------------------


def test_lerp_is_its_formula_tensor_by_tensor(recipe_dir, tmp_path, f2):
    checks.check_lerp(recipe_dir, tmp_path, f2["a"], f2["b"])


def test_a_schedule_in_flux2_block_names(recipe_dir, tmp_path, f2):
    """Its groups, a block, the shared modulation by name, default."""
    alpha = {"default": 0.5, "double_blocks": [0.0, 1.0], "single_blocks.1": 0.25, "double_stream_modulation_img": 1.0, "single_stream_modulation": 0.0}
    printed = [
        ["img_in", "..", "txt_in", "0.5"],
        ["double_stream_modulation_img", "1.0"],
        ["double_stream_modulation_txt", "0.5"],
        ["single_stream_modulation", "..", "double_blocks.0", "0.0"],
        ["double_blocks.1", "1.0"],
        ["single_blocks.0", "0.5"],
        ["single_blocks.1", "0.25"],
        ["final_layer", "0.5"],
    ]
    by_prefix = {
        "double_stream_modulation_img.": 1.0, "single_stream_modulation.": 0.0, "transformer_blocks.0.": 0.0, "transformer_blocks.1.": 1.0,
        "single_transformer_blocks.1.": 0.25,
    }
    checks.check_schedule(recipe_dir, tmp_path, f2["a"], f2["b"], alpha, printed, by_prefix)


def test_a_flux1_block_name_on_flux2_is_refused(recipe_dir, tmp_path, f2):
    recipe = {"sources": {"a": str(f2["a"]), "b": str(f2["b"])}, "alpha": {"default": 0.5, "vector_in": 0.1}, "rules": [{"match": ".*", "op": "lerp:${recipe.alpha}"}]}
    with pytest.raises(PlanError, match=r"names vector_in, which a FLUX\.2 model does not have \(its blocks: img_in, time_in, guidance_in, txt_in, double_stream_modulation_img"):
        run_recipe(recipe_dir, tmp_path / "out", recipe, "dry_run=true")


def test_ties_is_its_formula(recipe_dir, tmp_path, f2):
    """TIES over three FLUX.2 sources, each tensor against the float64 reference of test_methods."""
    checks.check_method(recipe_dir, tmp_path, {"c": f2["c"], "a": f2["a"], "b": f2["b"]}, "ties", {"density": 0.4})


# --- LoRAs ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["peft", "kohya", "comfyui"])
def test_a_lora_is_baked_into_flux2(recipe_dir, tmp_path, f2, scheme):
    """Every Linear module of the model, the fused single-block to_qkv_mlp_proj (BFL's linear1), the fused
    double-block qkv and the shared modulation included."""
    modules = linear_modules(load_state(f2["a"]))
    assert any(".to_qkv_mlp_proj" in m for _, ms in modules for m in ms) and "single_stream_modulation.lin" in dict(modules)
    checks.check_lora_bake(recipe_dir, tmp_path, f2["a"], modules, scheme)


@pytest.mark.diffusers
def test_diffusers_fuses_the_same_flux2_loras(recipe_dir, tmp_path, f2):
    """Flux2LoraLoaderMixin. (diffusers' kohya converter for FLUX.2 reads the blocks, img_in, txt_in, time_in and
    final_layer.linear only; and it renames an ai-toolkit LoRA's final_layer.adaLN_modulation.1 without swapping
    its up rows' halves, as it swaps the weight's: that module is left out here, fluxrecipe swaps it as the
    weight.)"""
    from diffusers import Flux2Transformer2DModel
    from diffusers.loaders import Flux2LoraLoaderMixin

    modules = linear_modules(load_state(f2["a"]))
    kohya_reads = ("double_blocks.", "single_blocks.", "img_in", "txt_in", "time_in.", "final_layer.linear")
    subsets = {"peft": modules, "kohya": [m for m in modules if m[0].startswith(kohya_reads)], "comfyui": [m for m in modules if m[0] != FINAL_MOD]}
    checks.check_diffusers_fuses_the_same(recipe_dir, tmp_path, f2["a"], Flux2Transformer2DModel, Flux2LoraLoaderMixin, subsets)


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, f2):
    return checks.tuned_pair(tmp_path_factory.mktemp("flux2-tuned"), f2["a"])


@pytest.mark.diffusers
def test_extraction_in_both_lora_formats(recipe_dir, tmp_path, tuned):
    from diffusers import Flux2Transformer2DModel

    named = ("double_blocks.0.img_attn.qkv", "single_blocks.1.linear1", FINAL_MOD, "double_stream_modulation_txt.lin")
    checks.check_extraction(recipe_dir, tmp_path, *tuned, Flux2Transformer2DModel, flux2_to_bfl, named)


# --- families and variants: refused, or mixed -----------------------------------------------------------------------


def test_flux1_and_flux2_sources_are_refused_naming_both_families(recipe_dir, tmp_path, schnell, f2):
    described = ("FLUX.1 schnell (width 32, in_channels 4, 2+2 blocks)", "FLUX.2 dev (width 32, 2+2 blocks)")
    checks.check_other_family_refused(recipe_dir, tmp_path, schnell, f2["a"], described)


def test_klein_4b_and_9b_are_refused_naming_both_variants(recipe_dir, tmp_path):
    """At their real widths, from headers alone (sparse files: no weights)."""
    root = tmp_path / "models"
    four, nine = sparse_folder(root / "klein4b", KLEIN_4B), sparse_folder(root / "klein9b", KLEIN_9B)
    recipe = {"sources": {"small": str(four), "large": str(nine)}, "rules": [{"match": ".*", "op": "lerp:0.5"}]}
    with pytest.raises(PlanError) as e:
        run_recipe(recipe_dir, tmp_path / "out", recipe, "dry_run=true")
    assert str(e.value).startswith("sources 'small' (FLUX.2 klein 4B) and 'large' (FLUX.2 klein 9B) are variants of FLUX.2 whose shapes differ (width 3072 and 4096)")


def test_a_plan_names_each_source_s_family_and_variant(recipe_dir, tmp_path):
    root = tmp_path / "models"
    folders = {"dev": sparse_folder(root / "dev", DEV), "dev2": sparse_folder(root / "dev2", DEV)}
    plan = run_recipe(recipe_dir, tmp_path / "out", {"sources": {n: str(p) for n, p in folders.items()}, "rules": [{"match": ".*", "op": "average"}]}, "dry_run=true")
    assert [s.model for s in plan.sources] == ["FLUX.2 dev", "FLUX.2 dev"]
    from fluxrecipe.plan import format_plan

    assert "FLUX.2 dev: 331 tensors (diffusers layout), 64.45 GB" in format_plan(plan)


def test_mix_families_takes_only_the_tensors_both_have(recipe_dir, tmp_path, schnell, f2):
    checks.check_mix_families(recipe_dir, tmp_path, schnell, f2["a"])


def test_mix_families_that_mixes_nothing_is_refused(recipe_dir, tmp_path, f2):
    recipe = {"sources": {"a": str(f2["a"]), "b": str(f2["c"])}, "mix_families": True, "rules": [{"match": ".*", "op": "lerp:0.5"}]}
    with pytest.raises(PlanError, match="mix_families: true changes nothing"):
        run_recipe(recipe_dir, tmp_path / "out", recipe, "dry_run=true")


def test_verify_names_the_family_of_a_single_file(tmp_path, f2, capsys):
    checks.check_verify_names_the_family(tmp_path, f2["a"], "FLUX.2", capsys)
