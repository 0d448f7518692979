"""The checks every model family gets, end to end (test_flux2.py, test_chroma.py, test_flux3.py call them with
their family's pieces): its Black Forest Labs / ComfyUI layout against diffusers' own converter, fp8 out and back
in, merges and LoRAs each against a reference written here, refusals of other families and `mix_families`.

A family's pieces: `to_bfl(state, prefix)` (the test's own BFL layout of a diffusers state dict, written from
diffusers' converter), `from_bfl(bfl, prefix)` (diffusers' converter itself), `linear_modules(state)` (its
Linear modules in BFL's names, with the diffusers modules whose rows each holds)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import config_of, load_state, merge, run_recipe, save_sharded
from flux_layouts import COMFY, fuse
from fluxrecipe.errors import PlanError
from test_methods import off_by_more_than_a_rounding
from test_methods import reference as method_reference

BF16 = torch.bfloat16
R = 4  # the rank of the LoRAs made here


def convert(recipe: str, source, out, *overrides):
    return merge([f"recipe={recipe}", f"recipe.sources.model={source}", f"output={out}", "progress=false", *overrides])


def assert_same(got: dict, want: dict) -> None:
    """The same keys, dtypes and bytes."""
    assert sorted(got) == sorted(want)
    assert [k for k in want if got[k].dtype != want[k].dtype or not torch.equal(got[k].view(torch.uint8), want[k].contiguous().view(torch.uint8))] == []


def assert_loaded(model, want: dict) -> None:
    """A model diffusers loaded holds these tensors (cast back to their dtype: diffusers keeps some modules in
    float32, FLUX.3's q/k norms)."""
    state = model.state_dict()
    assert sorted(state) == sorted(want)
    assert_same({k: state[k].to(want[k].dtype) for k in want}, want)


def prefix_of(layout: str) -> str:
    return COMFY if layout == "comfyui" else ""


def bfl_files(root, folder, to_bfl) -> dict:
    """A source as one BFL file and as one ComfyUI file, written by the test's own reference: layout -> path."""
    state = load_state(folder)
    files = {layout: root / f"{layout}.safetensors" for layout in ("bfl", "comfyui")}
    for layout, path in files.items():
        save_file(to_bfl(state, prefix_of(layout)), path)
    return files


# --- the layout, against diffusers' converter ------------------------------------------------------------------


def check_rows_where_the_converter_puts_them(path, bfl_shapes: dict[str, tuple[int, ...]], from_bfl, family: str) -> None:
    """Every BFL tensor of these shapes labelled row by row (row r of tensor i holds i * 10^4 + r): what
    fluxrecipe reads for each canonical tensor (its byte pieces) is exactly what diffusers' converter makes of
    the same file. Both work on rows, so a family whose converter needs a large width may give its tensors one
    column."""
    from fluxrecipe.formats import recognise
    from fluxrecipe.formats.safetensors import read_header

    labelled = {}
    for i, (key, shape) in enumerate(sorted(bfl_shapes.items())):
        rows = i * 10_000 + torch.arange(shape[0], dtype=torch.float32)
        labelled[key] = rows.reshape(-1, *([1] * (len(shape) - 1))).expand(shape).contiguous()
    save_file(labelled, path)
    header = read_header(str(path))
    found = recognise("x", str(path), header.entries, header.metadata)
    assert (found.family.name, found.layout) == (family, "bfl")
    converted = from_bfl(labelled)
    assert sorted(found.tensors) == sorted(converted)
    with open(path, "rb") as f:
        for key, ref in found.tensors.items():
            raw = b""
            for p in ref.pieces:
                f.seek(p.begin)
                raw += f.read(p.nbytes)
            got = torch.from_numpy(np.frombuffer(raw, dtype=np.float32).copy()).reshape(ref.shape)
            assert torch.equal(got, converted[key]), key


def check_written_file_converts_back(tmp_path, folder, to_bfl, from_bfl, layout: str) -> dict:
    """format=bfl (the built-in to_bfl) and format=comfyui: diffusers' own converter gives back exactly the
    source's diffusers tensors; and the file is the test's reference layout, byte for byte. Returns the file's
    tensors."""
    out = tmp_path / "out.safetensors"
    convert("to_bfl", folder, out, *(["format=comfyui"] if layout == "comfyui" else []))
    written = load_file(out)
    state = load_state(folder)
    assert_same(from_bfl(dict(written), prefix_of(layout)), state)
    assert_same(written, to_bfl(state, prefix_of(layout)))
    return written


def check_bfl_source_reads_as_the_converter(tmp_path, bfl_file, layout: str, from_bfl, model_class, described: str) -> None:
    """A BFL / ComfyUI file -> to_diffusers: the plan names its family, variant and layout; the output is the
    converter's, tensor by tensor; the config derived from the shapes builds the same model (from_pretrained
    loads it)."""
    out = tmp_path / "out"
    plan = convert("to_diffusers", bfl_file, out, "dry_run=true")
    assert (plan.sources[0].model, plan.sources[0].layout) == (described, layout)
    convert("to_diffusers", bfl_file, out)
    assert_same(load_state(out), from_bfl(load_file(bfl_file), prefix_of(layout)))
    assert_loaded(model_class.from_pretrained(out, torch_dtype=BF16), load_state(out))


def check_outputs_load(recipe_dir, tmp_path, a, b, model_class) -> None:
    """A merged diffusers folder loads with from_pretrained; the same merge as one BFL file loads with
    from_single_file (for a tiny model, diffusers needs `config=` a folder with its config.json)."""
    recipe = f"sources: {{a: {a}, b: {b}}}\nrules:\n  - match: '.*'\n    op: lerp:0.25\n"
    folder, single = tmp_path / "folder", tmp_path / "single.safetensors"
    for out, fmt in ((folder, "diffusers"), (single, "bfl")):
        run_recipe(recipe_dir, out, recipe, f"format={fmt}")
    want = load_state(folder)
    assert_loaded(model_class.from_pretrained(folder, torch_dtype=BF16), want)
    assert_loaded(model_class.from_single_file(str(single), config=str(folder), torch_dtype=BF16), want)


# --- fp8 ---------------------------------------------------------------------------------------------------------


def check_comfyui_fp8(tmp_path, folder, to_bfl, kept: tuple[str, ...]) -> None:
    """`recipe=to_comfyui_fp8` (fp8_mixed): the BFL modules `kept` names (those before and after the blocks)
    and every 1-D tensor in bf16; every block's 2-D weight in fp8, clamped and rounded once."""
    out = tmp_path / "fp8.safetensors"
    convert("to_comfyui_fp8", folder, out)
    got, ref = load_file(out), to_bfl(load_state(folder), COMFY)
    assert sorted(got) == sorted(ref)
    assert {got[k].dtype for k in ref} == {BF16, torch.float8_e4m3fn}
    for key, want in ref.items():
        dtype = BF16 if key.removeprefix(COMFY).startswith(kept) or want.dim() == 1 else torch.float8_e4m3fn
        assert got[key].dtype == dtype and torch.equal(got[key].view(torch.uint8), want.float().clamp(-448, 448).to(dtype).view(torch.uint8)), key


def check_fp8_out_and_back_in(tmp_path, folder, to_bfl, dtype: str, torch_dtype) -> None:
    """fp8_e5m2 everywhere, and ComfyUI's scaled fp8 (every 2-D weight scaled, the rest in bf16), read back by
    fluxrecipe as fp8 value x scale: the float32 values the reference computes (compared in the BFL layout,
    where the reference lays out what fluxrecipe read back)."""
    out = tmp_path / "out.safetensors"
    convert("to_bfl", folder, out, "format=comfyui", f"recipe.dtype={dtype}")
    got = load_file(out)
    back = tmp_path / "back"
    convert("to_diffusers", out, back, "recipe.dtype=fp32")
    for key, want in to_bfl(load_state(folder), COMFY).items():
        if dtype == "fp8_scaled" and want.dim() == 2:
            scale = got[key.removesuffix(".weight") + ".weight_scale"]
            assert scale.item() == (want.abs().max() / 448.0).item()
            assert torch.equal(got[key].view(torch.uint8), (want / scale).clamp(-448, 448).to(torch_dtype).view(torch.uint8)), key
        elif dtype == "fp8_scaled":
            assert got[key].dtype == BF16 and torch.equal(got[key], want.to(BF16)), key
        else:
            assert torch.equal(got[key].view(torch.uint8), want.clamp(-57344, 57344).to(torch_dtype).view(torch.uint8)), key
    values = {k: (v.float() * got[k.removesuffix(".weight") + ".weight_scale"] if k + "_scale" in got else v.float()) for k, v in got.items() if not k.endswith(("_scale", ".comfy_quant"))}
    assert_same(to_bfl(load_state(back), COMFY), values)


def check_dtype_per_rule(recipe_dir, tmp_path, folder, to_bfl, match: str) -> None:
    """A rule's own dtype: the keys `match` finds in float32, the rest in the recipe's bf16, written as one BFL
    file: the reference layout of the source with each tensor in its rule's dtype, byte for byte."""
    out = tmp_path / "out.safetensors"
    recipe = {"sources": {"a": str(folder)}, "rules": [{"match": match, "op": "take:a", "dtype": "fp32"}, {"match": ".*", "op": "take:a"}], "dtype": "bf16"}
    run_recipe(recipe_dir, out, recipe, "format=bfl")
    state = load_state(folder)
    cast = {k: v.float() if re.search(match, k) else v.to(BF16) for k, v in state.items()}
    written = load_file(out)
    assert {t.dtype for t in written.values()} == {torch.float32, BF16}
    assert_same(written, to_bfl(cast, ""))


# --- merges -------------------------------------------------------------------------------------------------------


def check_lerp(recipe_dir, tmp_path, a, b) -> None:
    out = tmp_path / "out"
    run_recipe(recipe_dir, out, {"sources": {"a": str(a), "b": str(b)}, "rules": [{"match": ".*", "op": "lerp:0.3"}]})
    sa, sb = load_state(a), load_state(b)
    assert_same(load_state(out), {k: (0.7 * sa[k].float() + 0.3 * sb[k].float()).to(BF16) for k in sa})


def check_schedule(recipe_dir, tmp_path, a, b, alpha: dict, printed: list[list[str]], by_prefix: dict[str, float]) -> None:
    """A per-block alpha in the family's block names: the plan prints each block's value (`printed`: its first
    lines, split); each tensor is the lerp at its block's alpha (`by_prefix`: canonical key prefix -> alpha,
    the rest alpha's default)."""
    from fluxrecipe.plan import format_plan

    recipe = {"sources": {"a": str(a), "b": str(b)}, "alpha": alpha, "rules": [{"match": ".*", "op": "lerp:${recipe.alpha}"}]}
    out = tmp_path / "out"
    plan = run_recipe(recipe_dir, out, recipe, "dry_run=true")
    lines = format_plan(plan).split("      alpha by block:\n")[1].splitlines()[: len(printed)]
    assert [line.split() for line in lines] == printed
    run_recipe(recipe_dir, out, recipe)
    sa, sb = load_state(a), load_state(b)
    want = {}
    for key in sa:
        t = next((v for p, v in by_prefix.items() if key.startswith(p)), alpha["default"])
        want[key] = ((1 - t) * sa[key].float() + t * sb[key].float()).to(BF16)
    assert_same(load_state(out), want)


def check_method(recipe_dir, tmp_path, folders: dict, method: str, params: dict) -> None:
    """A merge method over the family's sources, each tensor within one rounding of the float64 reference of
    test_methods."""
    out = tmp_path / "out"
    run_recipe(recipe_dir, out, {"sources": {n: str(p) for n, p in folders.items()}, "rules": [{"match": ".*", "op": {method: params}}], "dtype": "bf16"})
    states = [load_state(p) for p in folders.values()]
    got = load_state(out)
    assert got.keys() == states[0].keys()
    for key, tensor in got.items():
        want = method_reference(method, params, [s[key] for s in states], key, list(folders))
        assert not off_by_more_than_a_rounding(tensor, want, [s[key] for s in states]).any(), key


# --- LoRAs ------------------------------------------------------------------------------------------------------------


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


def check_lora_bake(recipe_dir, tmp_path, folder, modules, scheme: str) -> None:
    """A LoRA on `modules` in a key scheme: W + alpha / rank * up @ down, rounded once; the plan names its scheme."""
    state = load_state(folder)
    lora = lora_of(state, modules, 30)
    ratio = write_lora(lora, scheme, tmp_path / "lora.safetensors")
    out = tmp_path / "out"
    recipe = {"sources": {"a": str(folder)}, "rules": [{"match": ".*", "op": "take:a"}], "loras": {"x": str(tmp_path / "lora.safetensors")}}
    assert run_recipe(recipe_dir, out, recipe, "dry_run=true").loras[0].format == {"peft": "diffusers"}.get(scheme, scheme)
    run_recipe(recipe_dir, out, recipe)
    assert_same(load_state(out), baked_reference(state, lora, ratio))


def check_diffusers_fuses_the_same(recipe_dir, tmp_path, folder, model_class, loader, subsets: dict) -> None:
    """diffusers' `loader.lora_state_dict` + load_lora_adapter + fuse_lora, in float32: the same tensors as
    fluxrecipe's bake-in of the files at once, after the one rounding (`subsets`: scheme -> the modules of
    the file written in it, those diffusers' converter for the scheme reads)."""
    state = load_state(folder)
    files = {}
    for seed, (scheme, subset) in enumerate(subsets.items(), 40):
        path = tmp_path / f"{scheme}.safetensors"
        write_lora(lora_of(state, subset, seed), scheme, path)
        files[scheme] = path
    out = tmp_path / "out"
    run_recipe(recipe_dir, out, {"sources": {"a": str(folder)}, "rules": [{"match": ".*", "op": "take:a"}], "loras": {n: str(p) for n, p in files.items()}})
    fused = fused_by_diffusers(model_class, folder, {n: loader.lora_state_dict(str(p), return_lora_metadata=True) for n, p in files.items()})
    got = load_state(out)
    assert [k for k in got if not torch.equal(got[k], fused[k].to(BF16))] == []
    assert [k for k in got if not torch.equal(got[k], state[k])]  # the LoRAs changed something


def fused_by_diffusers(model_class, folder, loras: dict[str, tuple[dict, dict | None]]) -> dict:
    """The model in float32 with LoRAs (name -> (state dict as diffusers' loader converts it, its metadata))
    loaded by load_lora_adapter and fused at weight 1, as a pipeline's load_lora_weights + fuse_lora does."""
    model = model_class.from_pretrained(folder, torch_dtype=torch.float32)
    for name, (converted, metadata) in loras.items():
        model.load_lora_adapter(converted, metadata=metadata, adapter_name=name)
    model.set_adapters(list(loras), weights=[1.0] * len(loras))
    model.fuse_lora(adapter_names=list(loras))
    model.unload_lora()
    return model.state_dict()


def tuned_pair(root, folder) -> tuple:
    """A source as float32, and the same plus a difference of rank 3 on every weight matrix."""
    state = {k: v.float() for k, v in load_state(folder).items()}
    g = torch.Generator().manual_seed(12)
    tuned = {k: (v + torch.randn(v.shape[0], 3, generator=g) @ torch.randn(3, v.shape[1], generator=g) * 0.02 if v.dim() == 2 else v) for k, v in state.items()}
    return save_sharded(state, root / "base", [list(state)], config_of(folder)), save_sharded(tuned, root / "tuned", [list(tuned)], config_of(folder))


def check_extraction(recipe_dir, tmp_path, base, model, model_class, to_bfl, named: tuple[str, ...]) -> None:
    """format=lora_peft (diffusers loads it; base + LoRA fused is the tuned model) and format=lora (kohya keys on
    the family's BFL modules: up @ down of each of `named` is its fused difference; baked back it gives the tuned
    model)."""
    recipe = {"sources": {"tuned": str(model), "base": str(base)}, "base": "base", "rules": [{"match": ".*", "op": "take:tuned"}], "dtype": "fp32"}
    peft = tmp_path / "peft.safetensors"
    result = run_recipe(recipe_dir, peft, recipe, "format=lora_peft", "lora_rank=4")
    assert max(result.lora_errors.values()) < 1e-5
    fused = model_class.from_pretrained(base, torch_dtype=torch.float32)
    fused.load_lora_adapter(str(peft), adapter_name="x")
    fused.fuse_lora(adapter_names=["x"])
    fused.unload_lora()
    got, want = fused.state_dict(), load_state(model)
    assert all(torch.allclose(got[k], want[k], atol=1e-5) for k in want)

    kohya = tmp_path / "kohya.safetensors"
    result = run_recipe(recipe_dir, kohya, recipe, "format=lora", "lora_rank=12")
    assert max(result.lora_errors.values()) < 1e-5
    written = load_file(kohya)
    diff = to_bfl({k: v - load_state(base)[k] for k, v in want.items()}, "")
    for name in named:
        key = "lora_unet_" + name.replace(".", "_")
        assert torch.allclose(written[f"{key}.lora_up.weight"] @ written[f"{key}.lora_down.weight"], diff[f"{name}.weight"], atol=1e-6), name
    back = tmp_path / "back"
    run_recipe(recipe_dir, back, {"sources": {"m": str(base)}, "rules": [{"match": ".*", "op": "take:m"}], "dtype": "fp32", "loras": {"x": str(kohya)}})
    assert all(torch.allclose(load_state(back)[k], want[k], atol=1e-6) for k in want)


# --- families: refused, or mixed -----------------------------------------------------------------------------------


def check_other_family_refused(recipe_dir, tmp_path, flux1, other, described: tuple[str, str]) -> None:
    """A FLUX.1 source and one of another family: refused before any byte is read, in one line naming both."""
    out = tmp_path / "out"
    recipe = {"sources": {"a": str(flux1), "b": str(other)}, "rules": [{"match": ".*", "op": "lerp:0.5"}]}
    with pytest.raises(PlanError) as e:
        run_recipe(recipe_dir, out, recipe)
    message = str(e.value)
    assert message.startswith(f"sources 'a' ({described[0]}) and 'b' ({described[1]}) are different model families: fluxrecipe merges models of one family"), message
    assert "mix_families: true" in message and "\n" not in message and not out.exists()


def check_mix_families(recipe_dir, tmp_path, base, other) -> None:
    """A base and a source of another family with `mix_families: true`: a tensor of the same name and shape in
    both is merged; every other one is the base's alone; the plan says how many of each."""
    one, two = load_state(base), load_state(other)
    shared = [k for k in one if k in two and one[k].shape == two[k].shape]
    assert shared and len(shared) < len(one)
    out = tmp_path / "out"
    recipe = {"sources": {"one": str(base), "two": str(other)}, "mix_families": True, "rules": [{"match": ".*", "op": "lerp:0.5"}]}
    plan = run_recipe(recipe_dir, out, recipe, "dry_run=true")
    note = next(n for n in plan.notes if n.startswith("mix_families:"))
    assert f"shares {len(shared)} tensors (name and shape)" in note and f"{len(shared)} merged from it; {len(one) - len(shared)} " in note
    run_recipe(recipe_dir, out, recipe)
    want = {k: (0.5 * v.float() + 0.5 * two[k].float()).to(BF16) if k in shared else v for k, v in one.items()}
    assert_same(load_state(out), want)


def check_verify_names_the_family(tmp_path, folder, family: str, capsys) -> None:
    from fluxrecipe.cli.commands import verify as main
    from fluxrecipe.verify import verify_file

    out = tmp_path / "x.safetensors"
    convert("to_bfl", folder, out)
    assert verify_file(out).problems == []
    assert main([str(out)]) == 0
    assert f"a whole {family} transformer in bfl layout" in capsys.readouterr().out
