"""Chroma (issue 16), end to end: its Black Forest Labs / ComfyUI layout against diffusers' own converter (row by
row on labelled tensors, and whole files both ways, at FLUX.1's width, which the converter hard-codes), outputs
loaded by from_pretrained / from_single_file, fp8, merges (lerp, a per-block schedule naming the guidance
network, every merge method), LoRAs baked in (its own in three schemes, the guidance network's numbered layers
included; FLUX.1's, whose modulation has no place here) and extracted, each checked tensor by tensor against a
reference written here; the refusals of FLUX.1 sources and of Chroma1-Radiance, and `mix_families: true`."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import save_file

import family_checks as checks
from chroma_helpers import WIDE, chroma_to_bfl, from_bfl, linear_modules, make_chroma, make_wide_chroma
from conftest import load_state, run_recipe
from flux_layouts import linear_modules as flux1_linear_modules
from fluxrecipe.errors import PlanError, SourceError
from test_methods import METHODS

KEPT = ("img_in.", "txt_in.", "distilled_guidance_layer.", "final_layer.")  # what an fp8 export keeps in bf16
TINY = "Chroma (width 32, in_channels 4, 2+2 blocks)"


@pytest.fixture(scope="module")
def ch(tmp_path_factory):
    """Three tiny Chroma, shards that do not line up, bf16 / fp32 / bf16."""
    root = tmp_path_factory.mktemp("chroma")
    return {
        "a": make_chroma(root / "a", seed=30, shard="40KB"),
        "b": make_chroma(root / "b", seed=31, shard="25KB", dtype=torch.float32),
        "c": make_chroma(root / "c", seed=32, shard="60KB"),
    }


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """A Chroma of FLUX.1's width (680 MB in bf16): its folder and state; deleted after this module's tests."""
    root = tmp_path_factory.mktemp("chroma-wide")
    state = make_wide_chroma(root / "model", seed=33)
    yield root / "model", state
    shutil.rmtree(root)


@pytest.fixture
def scratch(tmp_path):
    """The test's folder, deleted as soon as it ends: what the wide tests write is large."""
    yield tmp_path
    shutil.rmtree(tmp_path)


# --- the layout, against diffusers' converter (at FLUX.1's width) --------------------------------------------------


@pytest.mark.diffusers
def test_the_table_reads_every_row_where_diffusers_converter_puts_it(tmp_path):
    """Every BFL tensor of a Chroma of FLUX.1's width, cut to one column (both sides work on rows)."""
    from diffusers import ChromaTransformer2DModel

    with torch.device("meta"):
        state = ChromaTransformer2DModel(**{**WIDE, "approximator_layers": 3}).state_dict()
    shapes = {k: (v.shape[0], 1) if v.dim() == 2 else tuple(v.shape) for k, v in chroma_to_bfl(state).items()}
    assert "distilled_guidance_layer.norms.2.scale" in shapes
    checks.check_rows_where_the_converter_puts_them(tmp_path / "labelled.safetensors", shapes, from_bfl, "Chroma")


@pytest.mark.diffusers
@pytest.mark.parametrize("layout", ["bfl", "comfyui"])
def test_a_file_written_by_fluxrecipe_converts_back_to_the_source_in_diffusers(scratch, wide, layout):
    """to_bfl / format=comfyui: the converter gives back the source; the BFL file loads with from_single_file."""
    from diffusers import ChromaTransformer2DModel

    folder, state = wide
    checks.check_written_file_converts_back(scratch, folder, chroma_to_bfl, from_bfl, layout)
    if layout == "bfl":
        model = ChromaTransformer2DModel.from_single_file(str(scratch / "out.safetensors"), config=str(folder), torch_dtype=checks.BF16)
        checks.assert_loaded(model, state)


@pytest.mark.diffusers
@pytest.mark.parametrize("layout", ["bfl", "comfyui"])
def test_a_bfl_source_read_by_fluxrecipe_is_what_diffusers_converter_makes_of_it(scratch, wide, layout):
    from diffusers import ChromaTransformer2DModel

    path = scratch / "source.safetensors"
    save_file(chroma_to_bfl(wide[1], checks.prefix_of(layout)), path)
    checks.check_bfl_source_reads_as_the_converter(scratch, path, layout, from_bfl, ChromaTransformer2DModel, "Chroma (width 3072, in_channels 4, 1+1 blocks)")


@pytest.mark.diffusers
def test_a_merge_loads_with_from_pretrained(recipe_dir, tmp_path, ch):
    from diffusers import ChromaTransformer2DModel

    out = tmp_path / "out"
    run_recipe(recipe_dir, out, {"sources": {"a": str(ch["a"]), "b": str(ch["b"])}, "rules": [{"match": ".*", "op": "lerp:0.25"}]})
    checks.assert_loaded(ChromaTransformer2DModel.from_pretrained(out, torch_dtype=checks.BF16), load_state(out))


# --- fp8 ---------------------------------------------------------------------------------------------------------


def test_to_comfyui_fp8_keeps_what_chroma_keeps_in_high_precision(tmp_path, ch):
    """The embedders, the guidance network, the final layer and every 1-D tensor in bf16."""
    checks.check_comfyui_fp8(tmp_path, ch["a"], chroma_to_bfl, KEPT)


@pytest.mark.parametrize("dtype, torch_dtype", [("fp8", torch.float8_e4m3fn), ("fp8_e5m2", torch.float8_e5m2), ("fp8_scaled", torch.float8_e4m3fn)])
def test_fp8_and_scaled_fp8_out_and_back_in(tmp_path, ch, dtype, torch_dtype):
    checks.check_fp8_out_and_back_in(tmp_path, ch["b"], chroma_to_bfl, dtype, torch_dtype)


def test_a_rule_s_own_dtype(recipe_dir, tmp_path, ch):
    """The guidance network in float32, the rest in bf16, as one BFL file."""
    checks.check_dtype_per_rule(recipe_dir, tmp_path, ch["b"], chroma_to_bfl, r"^distilled_guidance_layer\.")


# --- merges -------------------------------------------------------------------------------------------------------


def test_lerp_is_its_formula_tensor_by_tensor(recipe_dir, tmp_path, ch):
    checks.check_lerp(recipe_dir, tmp_path, ch["a"], ch["b"])


def test_a_schedule_in_chroma_block_names(recipe_dir, tmp_path, ch):
    """Its groups, a block, the guidance network by name, default."""
    alpha = {"default": 0.5, "distilled_guidance_layer": 0.0, "double_blocks": [1.0, 0.0], "single_blocks.1": 0.25, "final_layer": 1.0}
    printed = [
        ["img_in", "0.5"],
        ["distilled_guidance_layer", "0.0"],
        ["txt_in", "0.5"],
        ["double_blocks.0", "1.0"],
        ["double_blocks.1", "0.0"],
        ["single_blocks.0", "0.5"],
        ["single_blocks.1", "0.25"],
        ["final_layer", "1.0"],
    ]
    by_prefix = {"distilled_guidance_layer.": 0.0, "transformer_blocks.0.": 1.0, "transformer_blocks.1.": 0.0, "single_transformer_blocks.1.": 0.25, "proj_out.": 1.0}
    checks.check_schedule(recipe_dir, tmp_path, ch["a"], ch["b"], alpha, printed, by_prefix)


def test_a_flux1_block_name_on_chroma_is_refused(recipe_dir, tmp_path, ch):
    recipe = {"sources": {"a": str(ch["a"]), "b": str(ch["b"])}, "alpha": {"default": 0.5, "time_in": 0.1}, "rules": [{"match": ".*", "op": "lerp:${recipe.alpha}"}]}
    with pytest.raises(PlanError, match=r"names time_in, which a Chroma model does not have \(its blocks: img_in, distilled_guidance_layer, txt_in, double_blocks\.0\.\.1"):
        run_recipe(recipe_dir, tmp_path / "out", recipe, "dry_run=true")


@pytest.mark.parametrize("method, params, count", METHODS)
def test_every_merge_method_is_its_formula(recipe_dir, tmp_path, ch, method, params, count):
    """TIES and every other method over Chroma sources, each tensor against test_methods' float64 reference."""
    folders = dict(list({"c": ch["c"], "a": ch["a"], "b": ch["b"]}.items())[:count])
    checks.check_method(recipe_dir, tmp_path, folders, method, params)


# --- LoRAs ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["peft", "kohya", "comfyui"])
def test_a_lora_is_baked_into_chroma(recipe_dir, tmp_path, ch, scheme):
    """Every Linear module: the fused qkv and linear1, the guidance network's numbered layers
    (`lora_unet_distilled_guidance_layer_layers_1_out_layer` in kohya's names), the final layer unswapped."""
    modules = linear_modules(load_state(ch["a"]))
    assert "distilled_guidance_layer.layers.1.out_layer" in dict(modules) and "final_layer.linear" in dict(modules)
    checks.check_lora_bake(recipe_dir, tmp_path, ch["a"], modules, scheme)


@pytest.mark.diffusers
def test_diffusers_fuses_the_same_chroma_loras(recipe_dir, tmp_path, ch):
    """FluxLoraLoaderMixin (ChromaPipeline's): PEFT on every module; kohya's double blocks (its kohya converter
    splits linear1 at FLUX.1's width only and knows no guidance network; ai-toolkit's lora_A / lora_B behind
    `diffusion_model.` it does not read for FLUX)."""
    from diffusers import ChromaTransformer2DModel
    from diffusers.loaders import FluxLoraLoaderMixin

    modules = linear_modules(load_state(ch["a"]))
    subsets = {"peft": modules, "kohya": [m for m in modules if m[0].startswith("double_blocks.")]}
    checks.check_diffusers_fuses_the_same(recipe_dir, tmp_path, ch["a"], ChromaTransformer2DModel, FluxLoraLoaderMixin, subsets)


def test_a_flux1_lora_changes_what_chroma_has_and_lists_its_modulation_as_unmatched(recipe_dir, tmp_path, ch, schnell):
    """A kohya LoRA trained on FLUX.1 (every Linear module of a FLUX.1 of Chroma's size): refused with its
    modulation and time/vector embedder keys listed, which have no module in Chroma; with `ignore_unmatched:
    true`, every module Chroma has is baked, as diffusers' loader fuses the same file."""
    from diffusers import ChromaTransformer2DModel
    from diffusers.loaders import FluxLoraLoaderMixin

    flux1_modules = flux1_linear_modules(load_state(schnell))
    chroma_state = load_state(ch["a"])
    shared = [m for m in flux1_modules if f"{m[1][0]}.weight" in chroma_state]
    unmatched = [m for m in flux1_modules if m not in shared]
    assert {b.split(".")[-2] for b, _ in unmatched if b.startswith("double_blocks.")} == {"img_mod", "txt_mod"} and "single_blocks.0.modulation.lin" in dict(unmatched)
    lora = checks.lora_of(load_state(schnell), flux1_modules, 50)
    ratio = checks.write_lora(lora, "kohya", tmp_path / "flux1.safetensors")
    recipe = {"sources": {"a": str(ch["a"])}, "rules": [{"match": ".*", "op": "take:a"}], "loras": {"x": str(tmp_path / "flux1.safetensors")}}
    with pytest.raises(PlanError) as e:
        run_recipe(recipe_dir, tmp_path / "out", recipe, "dry_run=true")
    assert f"{3 * len(unmatched)} of its keys change no tensor of the output" in str(e.value)  # each module: down, up, alpha
    assert "lora_unet_double_blocks_0_img_mod_lin" in str(e.value) and "no Chroma module has this name" in str(e.value)
    out = tmp_path / "out"
    recipe["loras"]["x"] = {"path": str(tmp_path / "flux1.safetensors"), "ignore_unmatched": True}
    run_recipe(recipe_dir, out, recipe)
    got = load_state(out)
    checks.assert_same(got, checks.baked_reference(chroma_state, {b: lora[b] for b, _ in shared}, ratio))
    doubles = tmp_path / "doubles.safetensors"  # diffusers' kohya converter: double blocks at any width
    checks.write_lora({b: lora[b] for b, _ in flux1_modules if b.startswith("double_blocks.")}, "kohya", doubles)
    converted = {k: v for k, v in FluxLoraLoaderMixin.lora_state_dict(str(doubles)).items() if ".norm1" not in k}  # Chroma has no norm1.linear
    fused = checks.fused_by_diffusers(ChromaTransformer2DModel, ch["a"], {"x": (converted, None)})
    changed = [k for k in chroma_state if k.startswith("transformer_blocks.") and not torch.equal(got[k], chroma_state[k])]
    assert changed and [k for k in changed if not torch.equal(got[k], fused[k].to(checks.BF16))] == []


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, ch):
    return checks.tuned_pair(tmp_path_factory.mktemp("chroma-tuned"), ch["a"])


@pytest.mark.diffusers
def test_extraction_in_both_lora_formats(recipe_dir, tmp_path, tuned):
    from diffusers import ChromaTransformer2DModel

    named = ("double_blocks.0.img_attn.qkv", "single_blocks.1.linear1", "distilled_guidance_layer.layers.1.out_layer", "final_layer.linear")
    checks.check_extraction(recipe_dir, tmp_path, *tuned, ChromaTransformer2DModel, chroma_to_bfl, named)


# --- families: refused, or mixed -----------------------------------------------------------------------------------


def test_flux1_and_chroma_sources_are_refused_naming_both_families(recipe_dir, tmp_path, schnell, ch):
    checks.check_other_family_refused(recipe_dir, tmp_path, schnell, ch["a"], ("FLUX.1 schnell (width 32, in_channels 4, 2+2 blocks)", TINY))


def test_mix_families_takes_only_the_tensors_both_have(recipe_dir, tmp_path, schnell, ch):
    checks.check_mix_families(recipe_dir, tmp_path, schnell, ch["a"])


@pytest.mark.parametrize("layout", ["bfl", "comfyui"])
def test_chroma1_radiance_is_refused_by_name(recipe_dir, tmp_path, ch, layout):
    """Chroma1-Radiance: Chroma's blocks and guidance network, a patch convolution for img_in and a NeRF decoder
    head (`nerf_*`) for the final layer. Refused in one line naming it, as a source and by verify."""
    from fluxrecipe.verify import verify_file

    prefix = checks.prefix_of(layout)
    state = {k: v for k, v in chroma_to_bfl(load_state(ch["a"]), prefix).items() if not k.startswith((f"{prefix}img_in.", f"{prefix}final_layer."))}
    state.update({f"{prefix}{k}": torch.zeros(shape, dtype=checks.BF16) for k, shape in {
        "img_in_patch.weight": (32, 3, 2, 2), "nerf_image_embedder.embedder.0.weight": (16, 7), "nerf_blocks.0.param_generator.weight": (64, 32),
        "nerf_final_layer_conv.conv.weight": (3, 16, 3, 3),
    }.items()})
    path = tmp_path / "radiance.safetensors"
    save_file(state, path)
    with pytest.raises(SourceError) as e:
        checks.convert("to_diffusers", path, tmp_path / "out")
    head = f"source 'model': {path} is Chroma1-Radiance, a pixel-space Chroma (a NeRF decoder head in place of the final layer) (it holds 'nerf_"
    assert str(e.value).startswith(head) and str(e.value).endswith("'), which fluxrecipe does not merge"), str(e.value)
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()
    assert "Chroma1-Radiance" in verify_file(path).problems[0]


def test_verify_names_the_family_of_a_single_file(tmp_path, ch, capsys):
    checks.check_verify_names_the_family(tmp_path, ch["a"], "Chroma", capsys)

