"""FLUX.2 (issue 16), end to end, on tiny models built by diffusers: its Black Forest Labs / ComfyUI layout
against diffusers' own converter (row by row on labelled tensors, and whole files both ways), outputs loaded
by from_pretrained / from_single_file, fp8, merges (lerp, a per-block schedule in FLUX.2's block names, TIES),
LoRAs baked in (PEFT on the fused to_qkv_mlp_proj, kohya, ComfyUI; and as diffusers fuses them) and
extracted, each checked tensor by tensor against a reference written here; and the refusals of sources of
another family or width, with `mix_families: true` merging only what they share."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import config_of, load_state, merge, run_recipe, save_sharded
from flux2_helpers import DEV, KLEIN_4B, KLEIN_9B, flux2_to_bfl, from_bfl, linear_modules, make_flux2, sparse_folder
from flux_layouts import COMFY, FINAL_MOD, fuse
from test_methods import off_by_more_than_a_rounding
from test_methods import reference as method_reference
from fluxrecipe.errors import PlanError

BF16 = torch.bfloat16
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
    root = tmp_path_factory.mktemp("flux2-files")
    state = load_state(f2["a"])
    save_file(flux2_to_bfl(state), root / "a-bfl.safetensors")
    save_file(flux2_to_bfl(state, COMFY), root / "a-comfy.safetensors")
    return {"bfl": root / "a-bfl.safetensors", "comfyui": root / "a-comfy.safetensors"}


def convert(recipe: str, source, out, *overrides):
    return merge([f"recipe={recipe}", f"recipe.sources.model={source}", f"output={out}", "progress=false", *overrides])


def assert_same(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    assert [k for k in want if got[k].dtype != want[k].dtype or not torch.equal(got[k].view(torch.uint8), want[k].contiguous().view(torch.uint8))] == []


# --- the layout, against diffusers' converter ------------------------------------------------------------------


@pytest.mark.diffusers
def test_the_table_reads_every_row_where_diffusers_converter_puts_it(tmp_path, f2):
    """Every BFL tensor labelled row by row (row r of tensor i holds i * 10^4 + r): what fluxrecipe reads for
    each canonical tensor (its byte pieces) is exactly what diffusers' converter makes of the same file."""
    from fluxrecipe.formats import recognise
    from fluxrecipe.formats.safetensors import read_header

    bfl = flux2_to_bfl(load_state(f2["a"]))
    labelled = {}
    for i, (key, t) in enumerate(sorted(bfl.items())):
        rows = i * 10_000 + torch.arange(t.shape[0], dtype=torch.float32)
        labelled[key] = rows.reshape(-1, *([1] * (t.dim() - 1))).expand(t.shape).contiguous()
    path = tmp_path / "labelled.safetensors"
    save_file(labelled, path)
    header = read_header(str(path))
    found = recognise("x", str(path), header.entries, header.metadata)
    assert (found.family.name, found.layout) == ("FLUX.2", "bfl")
    converted = from_bfl(labelled)
    assert sorted(found.tensors) == sorted(converted)
    with open(path, "rb") as f:
        for key, ref in found.tensors.items():
            raw = b"".join(_read(f, p.begin, p.nbytes) for p in ref.pieces)
            got = torch.from_numpy(np.frombuffer(raw, dtype=np.float32).copy()).reshape(ref.shape)
            assert torch.equal(got, converted[key]), key


def _read(f, begin: int, nbytes: int) -> bytes:
    f.seek(begin)
    return f.read(nbytes)


@pytest.mark.diffusers
@pytest.mark.parametrize("layout", ["bfl", "comfyui"])
def test_a_file_written_by_fluxrecipe_converts_back_to_the_source_in_diffusers(tmp_path, f2, layout):
    """format=bfl (the built-in to_bfl) and format=comfyui: diffusers' own converter gives back exactly the
    source's diffusers tensors; and the file is the test's reference layout, byte for byte."""
    out = tmp_path / "out.safetensors"
    convert("to_bfl", f2["a"], out, *(["format=comfyui"] if layout == "comfyui" else []))
    written = load_file(out)
    state = load_state(f2["a"])
    assert_same(from_bfl(written, COMFY if layout == "comfyui" else ""), state)
    assert_same(written, flux2_to_bfl(state, COMFY if layout == "comfyui" else ""))


@pytest.mark.diffusers
@pytest.mark.parametrize("layout", ["bfl", "comfyui"])
def test_a_bfl_source_read_by_fluxrecipe_is_what_diffusers_converter_makes_of_it(tmp_path, f2_bfl, layout):
    """A BFL / ComfyUI FLUX.2 file -> to_diffusers: the converter's output, tensor by tensor; the config
    derived from the shapes builds the same model (from_pretrained loads it)."""
    from diffusers import Flux2Transformer2DModel

    out = tmp_path / "out"
    plan = convert("to_diffusers", f2_bfl[layout], out, "dry_run=true")
    assert plan.sources[0].model == "FLUX.2 dev (width 32, 2+2 blocks)" and plan.sources[0].layout == layout
    convert("to_diffusers", f2_bfl[layout], out)
    assert_same(load_state(out), from_bfl(load_file(f2_bfl[layout]), COMFY if layout == "comfyui" else ""))
    model = Flux2Transformer2DModel.from_pretrained(out, torch_dtype=BF16)
    assert_same(model.state_dict(), load_state(out))


@pytest.mark.diffusers
def test_outputs_load_with_from_pretrained_and_from_single_file(recipe_dir, tmp_path, f2):
    """A merged diffusers folder loads with from_pretrained; the same merge as one BFL file loads with
    from_single_file (for a tiny FLUX.2, diffusers needs `config=` a folder with its config.json)."""
    from diffusers import Flux2Transformer2DModel

    recipe = f"sources: {{a: {f2['a']}, b: {f2['b']}}}\nrules:\n  - match: '.*'\n    op: lerp:0.25\n"
    folder, single = tmp_path / "folder", tmp_path / "single.safetensors"
    for out, fmt in ((folder, "diffusers"), (single, "bfl")):
        run_recipe(recipe_dir, out, recipe, f"format={fmt}")
    want = load_state(folder)
    assert_same(Flux2Transformer2DModel.from_pretrained(folder, torch_dtype=BF16).state_dict(), want)
    loaded = Flux2Transformer2DModel.from_single_file(str(single), config=str(folder), torch_dtype=BF16)
    assert_same(loaded.state_dict(), want)


# --- fp8 ---------------------------------------------------------------------------------------------------------


def test_to_comfyui_fp8_keeps_what_flux2_keeps_in_high_precision(tmp_path, f2):
    """`recipe=to_comfyui_fp8` on FLUX.2 (fp8_mixed): the embedders, the shared modulation, the final layer and
    the norms in bf16; every block's 2-D weight in fp8, clamped and rounded once."""
    out = tmp_path / "fp8.safetensors"
    convert("to_comfyui_fp8", f2["a"], out)
    got, ref = load_file(out), flux2_to_bfl(load_state(f2["a"]), COMFY)
    assert sorted(got) == sorted(ref)
    kept = ("img_in.", "txt_in.", "time_in.", "guidance_in.", "final_layer.", *(m + "." for m in MODULATION))
    assert any(k.removeprefix(COMFY).startswith(MODULATION) for k in ref)
    for key, want in ref.items():
        dtype = BF16 if key.removeprefix(COMFY).startswith(kept) or want.dim() == 1 else torch.float8_e4m3fn
        assert got[key].dtype == dtype and torch.equal(got[key].view(torch.uint8), want.float().clamp(-448, 448).to(dtype).view(torch.uint8)), key


@pytest.mark.parametrize("dtype, torch_dtype", [("fp8_e5m2", torch.float8_e5m2), ("fp8_scaled", torch.float8_e4m3fn)])
def test_fp8_and_scaled_fp8_out_and_back_in(tmp_path, f2, dtype, torch_dtype):
    """fp8_e5m2 everywhere, and ComfyUI's scaled fp8 (every 2-D weight scaled, the norms in bf16), read back by
    fluxrecipe as fp8 value x scale: the float32 values the reference computes."""
    out = tmp_path / "out.safetensors"
    convert("to_bfl", f2["b"], out, "format=comfyui", f"recipe.dtype={dtype}")
    got = load_file(out)
    back = tmp_path / "back"
    convert("to_diffusers", out, back, "recipe.dtype=fp32")
    state = load_state(back)
    for key, want in flux2_to_bfl(load_state(f2["b"]), COMFY).items():
        if dtype == "fp8_scaled" and want.dim() == 2:
            scale = got[key.removesuffix(".weight") + ".weight_scale"]
            assert scale.item() == (want.abs().max() / 448.0).item()
            assert torch.equal(got[key].view(torch.uint8), (want / scale).clamp(-448, 448).to(torch_dtype).view(torch.uint8)), key
        elif dtype == "fp8_scaled":
            assert got[key].dtype == BF16 and torch.equal(got[key], want.to(BF16)), key
        else:
            assert torch.equal(got[key].view(torch.uint8), want.clamp(-57344, 57344).to(torch_dtype).view(torch.uint8)), key
    expected = from_bfl({k: (v.float() * got[k.removesuffix(".weight") + ".weight_scale"] if k + "_scale" in got else v.float()) for k, v in got.items() if not k.endswith(("_scale", ".comfy_quant"))}, COMFY)
    assert_same(state, expected)


# --- merges -------------------------------------------------------------------------------------------------------


def test_lerp_is_its_formula_tensor_by_tensor(recipe_dir, tmp_path, f2):
    out = tmp_path / "out"
    run_recipe(recipe_dir, out, {"sources": {"a": str(f2["a"]), "b": str(f2["b"])}, "rules": [{"match": ".*", "op": "lerp:0.3"}]})
    a, b = load_state(f2["a"]), load_state(f2["b"])
    assert_same(load_state(out), {k: (0.7 * a[k].float() + 0.3 * b[k].float()).to(BF16) for k in a})


def test_a_schedule_in_flux2_block_names(recipe_dir, tmp_path, f2):
    """A per-block alpha naming FLUX.2's blocks: its groups, a block, the shared modulation by name, default.
    The plan prints each block's value; each tensor is the lerp at its block's alpha."""
    alpha = {"default": 0.5, "double_blocks": [0.0, 1.0], "single_blocks.1": 0.25, "double_stream_modulation_img": 1.0, "single_stream_modulation": 0.0}
    recipe = {"sources": {"a": str(f2["a"]), "b": str(f2["b"])}, "alpha": alpha, "rules": [{"match": ".*", "op": "lerp:${recipe.alpha}"}]}
    out = tmp_path / "out"
    plan = run_recipe(recipe_dir, out, recipe, "dry_run=true")
    from fluxrecipe.plan import format_plan

    lines = format_plan(plan).split("      alpha by block:\n")[1].splitlines()[:8]
    assert [line.split() for line in lines] == [
        ["img_in", "..", "txt_in", "0.5"],
        ["double_stream_modulation_img", "1.0"],
        ["double_stream_modulation_txt", "0.5"],
        ["single_stream_modulation", "..", "double_blocks.0", "0.0"],
        ["double_blocks.1", "1.0"],
        ["single_blocks.0", "0.5"],
        ["single_blocks.1", "0.25"],
        ["final_layer", "0.5"],
    ]
    run_recipe(recipe_dir, out, recipe)
    by_prefix = {
        "double_stream_modulation_img.": 1.0, "single_stream_modulation.": 0.0, "transformer_blocks.0.": 0.0, "transformer_blocks.1.": 1.0,
        "single_transformer_blocks.1.": 0.25,
    }
    a, b = load_state(f2["a"]), load_state(f2["b"])
    want = {}
    for key in a:
        t = next((v for p, v in by_prefix.items() if key.startswith(p)), 0.5)
        want[key] = ((1 - t) * a[key].float() + t * b[key].float()).to(BF16)
    assert_same(load_state(out), want)


def test_a_flux1_block_name_on_flux2_is_refused(recipe_dir, tmp_path, f2):
    recipe = {"sources": {"a": str(f2["a"]), "b": str(f2["b"])}, "alpha": {"default": 0.5, "vector_in": 0.1}, "rules": [{"match": ".*", "op": "lerp:${recipe.alpha}"}]}
    with pytest.raises(PlanError, match=r"names vector_in, which a FLUX\.2 model does not have \(its blocks: img_in, time_in, guidance_in, txt_in, double_stream_modulation_img"):
        run_recipe(recipe_dir, tmp_path / "out", recipe, "dry_run=true")


def test_ties_is_its_formula(recipe_dir, tmp_path, f2):
    """TIES over three FLUX.2 sources, each tensor against the float64 reference of test_methods."""
    folders = {"c": f2["c"], "a": f2["a"], "b": f2["b"]}
    params = {"density": 0.4}
    out = tmp_path / "out"
    run_recipe(recipe_dir, out, {"sources": {n: str(p) for n, p in folders.items()}, "rules": [{"match": ".*", "op": {"ties": params}}], "dtype": "bf16"})
    states = [load_state(p) for p in folders.values()]
    got = load_state(out)
    for key, tensor in got.items():
        want = method_reference("ties", params, [s[key] for s in states], key, list(folders))
        assert not off_by_more_than_a_rounding(tensor, want, [s[key] for s in states]).any(), key


# --- LoRAs ------------------------------------------------------------------------------------------------------------


R = 4


def lora_of(state: dict, modules, seed: int) -> dict:
    """BFL module -> (down, {diffusers module: up rows}): every member of a fused module shares its down."""
    g = torch.Generator().manual_seed(seed)
    lora = {}
    for bfl_module, members in modules:
        down = (torch.randn(R, state[f"{members[0]}.weight"].shape[1], generator=g) * 0.2).to(BF16)
        lora[bfl_module] = (down, {m: (torch.randn(state[f"{m}.weight"].shape[0], R, generator=g) * 0.2).to(BF16) for m in members})
    return lora


def baked_reference(state: dict, lora: dict, ratio: float) -> dict:
    ref = {k: v.float() for k, v in state.items()}
    for down, ups in lora.values():
        for module, up in ups.items():
            ref[f"{module}.weight"] = ref[f"{module}.weight"] + (up.float() @ down.float()) * ratio
    return {k: v.to(BF16) for k, v in ref.items()}


def write_lora(lora: dict, scheme: str, path) -> float:
    """A LoRA file in a key scheme: "peft" (diffusers' names with PEFT's config: alpha 2 x rank), "kohya"
    (`lora_unet_` + BFL's names with `_`, alpha rank / 2) or "comfyui" (ai-toolkit's and ComfyUI's
    `diffusion_model.` + BFL's names, lora_A / lora_B, no alpha); returns its alpha / rank."""
    tensors = {}
    if scheme == "peft":
        for down, ups in lora.values():
            for module, up in ups.items():
                tensors[f"transformer.{module}.lora_A.weight"], tensors[f"transformer.{module}.lora_B.weight"] = down.clone(), up
        config = {"r": R, "lora_alpha": 2 * R, "target_modules": sorted(m for _, ups in lora.values() for m in ups)}  # as save_lora_weights writes it
        save_file(tensors, path, metadata={"lora_adapter_metadata": json.dumps({f"transformer.{k}": v for k, v in config.items()})})
        return 2.0
    for bfl_module, (down, ups) in lora.items():
        if scheme == "kohya":
            key, names = "lora_unet_" + bfl_module.replace(".", "_"), ("lora_down", "lora_up")
            tensors[f"{key}.alpha"] = torch.tensor(R / 2)
        else:
            key, names = "diffusion_model." + bfl_module, ("lora_A", "lora_B")
        tensors[f"{key}.{names[0]}.weight"], tensors[f"{key}.{names[1]}.weight"] = down, fuse(bfl_module, list(ups.values()))
    save_file(tensors, path)
    return 0.5 if scheme == "kohya" else 1.0


@pytest.mark.parametrize("scheme", ["peft", "kohya", "comfyui"])
def test_a_lora_is_baked_into_flux2(recipe_dir, tmp_path, f2, scheme):
    """Every Linear module of the model, the fused single-block to_qkv_mlp_proj (BFL's linear1), the fused
    double-block qkv and the shared modulation included: W + alpha / rank * up @ down, rounded once."""
    state = load_state(f2["a"])
    lora = lora_of(state, linear_modules(state), 30)
    assert any(".to_qkv_mlp_proj" in m for _, ups in lora.values() for m in ups) and "single_stream_modulation.lin" in lora
    ratio = write_lora(lora, scheme, tmp_path / "lora.safetensors")
    out = tmp_path / "out"
    recipe = {"sources": {"a": str(f2["a"])}, "rules": [{"match": ".*", "op": "take:a"}], "loras": {"x": str(tmp_path / "lora.safetensors")}}
    assert run_recipe(recipe_dir, out, recipe, "dry_run=true").loras[0].format == {"peft": "diffusers"}.get(scheme, scheme)
    run_recipe(recipe_dir, out, recipe)
    assert_same(load_state(out), baked_reference(state, lora, ratio))


@pytest.mark.diffusers
def test_diffusers_fuses_the_same_flux2_loras(recipe_dir, tmp_path, f2):
    """diffusers' Flux2LoraLoaderMixin.lora_state_dict + load_lora_adapter + fuse_lora, in float32: the same
    tensors as fluxrecipe's bake-in of three files at once, after the one rounding. (diffusers' kohya
    converter for FLUX.2 reads the blocks, img_in, txt_in, time_in and final_layer.linear only; and it renames
    an ai-toolkit LoRA's final_layer.adaLN_modulation.1 without swapping its up rows' halves, as it swaps the
    weight's: that module is left out here, fluxrecipe swaps it as the weight.)"""
    from diffusers import Flux2Transformer2DModel
    from diffusers.loaders import Flux2LoraLoaderMixin

    state = load_state(f2["a"])
    modules = linear_modules(state)
    kohya_reads = ("double_blocks.", "single_blocks.", "img_in", "txt_in", "time_in.", "final_layer.linear")
    subsets = {"peft": modules, "kohya": [m for m in modules if m[0].startswith(kohya_reads)], "comfyui": [m for m in modules if m[0] != FINAL_MOD]}
    files = {}
    for seed, (scheme, subset) in enumerate(subsets.items(), 40):
        path = tmp_path / f"{scheme}.safetensors"
        write_lora(lora_of(state, subset, seed), scheme, path)
        files[scheme] = path
    out = tmp_path / "out"
    run_recipe(recipe_dir, out, {"sources": {"a": str(f2["a"])}, "rules": [{"match": ".*", "op": "take:a"}], "loras": {n: str(p) for n, p in files.items()}})
    model = Flux2Transformer2DModel.from_pretrained(f2["a"], torch_dtype=torch.float32)
    for name, path in files.items():
        converted, metadata = Flux2LoraLoaderMixin.lora_state_dict(str(path), return_lora_metadata=True)
        model.load_lora_adapter(converted, metadata=metadata, adapter_name=name)
    model.set_adapters(list(files), weights=[1.0] * len(files))
    model.fuse_lora(adapter_names=list(files))
    model.unload_lora()
    fused, got = model.state_dict(), load_state(out)
    assert [k for k in got if not torch.equal(got[k], fused[k].to(BF16))] == []


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, f2):
    """Source a plus a difference of rank 3 on every weight matrix (float32)."""
    state = {k: v.float() for k, v in load_state(f2["a"]).items()}
    g = torch.Generator().manual_seed(12)
    tuned = {k: (v + torch.randn(v.shape[0], 3, generator=g) @ torch.randn(3, v.shape[1], generator=g) * 0.02 if v.dim() == 2 else v) for k, v in state.items()}
    root = tmp_path_factory.mktemp("flux2-tuned")
    return save_sharded(state, root / "base", [list(state)], config_of(f2["a"])), save_sharded(tuned, root / "tuned", [list(tuned)], config_of(f2["a"]))


@pytest.mark.diffusers
def test_extraction_in_both_lora_formats(recipe_dir, tmp_path, tuned):
    """format=lora_peft (diffusers loads it; base + LoRA fused is the tuned model) and format=lora (kohya keys
    on FLUX.2's BFL modules: up @ down is the fused difference; baked back it gives the tuned model)."""
    from diffusers import Flux2Transformer2DModel

    base, model = tuned
    recipe = {"sources": {"tuned": str(model), "base": str(base)}, "base": "base", "rules": [{"match": ".*", "op": "take:tuned"}], "dtype": "fp32"}
    peft = tmp_path / "peft.safetensors"
    result = run_recipe(recipe_dir, peft, recipe, "format=lora_peft", "lora_rank=4")
    assert max(result.lora_errors.values()) < 1e-5
    fused = Flux2Transformer2DModel.from_pretrained(base, torch_dtype=torch.float32)
    fused.load_lora_adapter(str(peft), adapter_name="x")
    fused.fuse_lora(adapter_names=["x"])
    fused.unload_lora()
    got, want = fused.state_dict(), load_state(model)
    assert all(torch.allclose(got[k], want[k], atol=1e-5) for k in want)

    kohya = tmp_path / "kohya.safetensors"
    result = run_recipe(recipe_dir, kohya, recipe, "format=lora", "lora_rank=12")
    assert max(result.lora_errors.values()) < 1e-5
    written = load_file(kohya)
    diff = flux2_to_bfl({k: v - load_state(base)[k] for k, v in want.items()})
    for name in ("double_blocks.0.img_attn.qkv", "single_blocks.1.linear1", FINAL_MOD, "double_stream_modulation_txt.lin"):
        key = "lora_unet_" + name.replace(".", "_")
        assert torch.allclose(written[f"{key}.lora_up.weight"] @ written[f"{key}.lora_down.weight"], diff[f"{name}.weight"], atol=1e-6), name
    back = tmp_path / "back"
    run_recipe(recipe_dir, back, {"sources": {"m": str(base)}, "rules": [{"match": ".*", "op": "take:m"}], "dtype": "fp32", "loras": {"x": str(kohya)}})
    assert all(torch.allclose(load_state(back)[k], want[k], atol=1e-6) for k in want)


# --- families and variants: refused, or mixed -----------------------------------------------------------------------


def test_flux1_and_flux2_sources_are_refused_naming_both_families(recipe_dir, tmp_path, schnell, f2):
    out = tmp_path / "out"
    recipe = {"sources": {"a": str(schnell), "b": str(f2["a"])}, "rules": [{"match": ".*", "op": "lerp:0.5"}]}
    with pytest.raises(PlanError) as e:
        run_recipe(recipe_dir, out, recipe)
    message = str(e.value)
    assert message.startswith(
        "sources 'a' (FLUX.1 schnell (width 32, in_channels 4, 2+2 blocks)) and 'b' (FLUX.2 dev (width 32, 2+2 blocks)) are different model "
        "families: fluxrecipe merges models of one family"
    ), message
    assert "mix_families: true" in message and "\n" not in message and not out.exists()


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
    """A FLUX.1 base and a FLUX.2 source with `mix_families: true`: a tensor of the same name and shape in both
    is merged; every other one is the base's alone; the plan says how many of each."""
    one = load_state(schnell)
    two = load_state(f2["a"])
    shared = [k for k in one if k in two and one[k].shape == two[k].shape]
    assert shared and len(shared) < len(one)
    out = tmp_path / "out"
    recipe = {"sources": {"one": str(schnell), "two": str(f2["a"])}, "mix_families": True, "rules": [{"match": ".*", "op": "lerp:0.5"}]}
    plan = run_recipe(recipe_dir, out, recipe, "dry_run=true")
    note = next(n for n in plan.notes if n.startswith("mix_families:"))
    assert f"shares {len(shared)} tensors (name and shape)" in note and f"{len(shared)} merged from it; {len(one) - len(shared)} " in note
    run_recipe(recipe_dir, out, recipe)
    want = {k: (0.5 * v.float() + 0.5 * two[k].float()).to(BF16) if k in shared else v for k, v in one.items()}
    assert_same(load_state(out), want)


def test_mix_families_that_mixes_nothing_is_refused(recipe_dir, tmp_path, f2):
    recipe = {"sources": {"a": str(f2["a"]), "b": str(f2["c"])}, "mix_families": True, "rules": [{"match": ".*", "op": "lerp:0.5"}]}
    with pytest.raises(PlanError, match="mix_families: true changes nothing"):
        run_recipe(recipe_dir, tmp_path / "out", recipe, "dry_run=true")


def test_verify_names_the_family_of_a_single_file(tmp_path, f2, capsys):
    from fluxrecipe.cli.commands import verify as main
    from fluxrecipe.verify import verify_file

    out = tmp_path / "x.safetensors"
    convert("to_bfl", f2["a"], out)
    assert verify_file(out).problems == []
    assert main([str(out)]) == 0
    assert "a whole FLUX.2 transformer in bfl layout" in capsys.readouterr().out
