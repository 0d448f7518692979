"""LoRAs (issue 10) on tiny models: every FLUX LoRA format baked in, checked tensor by tensor against a float32
reference written here (W + strength * alpha / rank * up @ down, one rounding) and against diffusers' own
load_lora_adapter + fuse_lora; the final layer's swap on up rows only; chunking, threads and fp8; a merge
written as a LoRA (extraction, LoRA merging) loaded back by diffusers; and the bad inputs.

The LoRAs are built here from a description in diffusers' terms: per BFL module a down, and an up per
diffusers module it holds (flux_layouts' tables fuse them into BFL's rows, the final layer swapped), so the
reference never goes through fluxrecipe's own mapping."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import config_of, load_state, merge, run_recipe, save_sharded, tiny_config
from flux_layouts import COMFY, DOUBLE, FINAL_MOD, blocks, diffusers_to_bfl, fuse, linear_modules
from fluxrecipe.errors import OutputError, PlanError, RecipeError, SourceError, UsageError

R = 4  # the LoRAs' rank
BF16 = torch.bfloat16


def describe(state: dict, modules: list[tuple[str, tuple[str, ...]]], seed: int, rank: int = R) -> dict:
    """A random LoRA: BFL module -> (down, {diffusers module: up rows}); every member of a fused module shares its down."""
    g = torch.Generator().manual_seed(seed)
    lora = {}
    for bfl_module, members in modules:
        width = state[f"{members[0]}.weight"].shape[1]
        down = (torch.randn(rank, width, generator=g) * 0.2).to(BF16)
        lora[bfl_module] = (down, {m: (torch.randn(state[f"{m}.weight"].shape[0], rank, generator=g) * 0.2).to(BF16) for m in members})
    return lora


def biases(state: dict, lora: dict, seed: int) -> dict:
    """A control LoRA's lora_B.bias per module: diffusers module -> its rows."""
    g = torch.Generator().manual_seed(seed)
    return {m: (torch.randn(state[f"{m}.bias"].shape, generator=g) * 0.1).to(BF16) for _, ups in lora.values() for m in ups}


def kohya(lora: dict, alpha: float | None, prefix: str = "lora_unet_", dotted: bool = False, names=("lora_down", "lora_up")) -> dict:
    """kohya's keys (BFL modules, `_` for `.`), ComfyUI's (`diffusion_model.` + BFL's dotted names), or BFL's own."""
    tensors = {}
    for bfl_module, (down, ups) in lora.items():
        name = prefix + (bfl_module if dotted else bfl_module.replace(".", "_"))
        tensors[f"{name}.{names[0]}.weight"] = down
        tensors[f"{name}.{names[1]}.weight"] = fuse(bfl_module, list(ups.values()))
        if alpha is not None:
            tensors[f"{name}.alpha"] = torch.tensor(float(alpha))
    return tensors


def per_module(lora: dict, down_name: str, up_name: str, name=lambda m: m, alpha: float | None = None) -> dict:
    """Keys per diffusers module: diffusers/PEFT (`transformer.` + name, lora_A/lora_B) or OneTrainer (`_` for `.`)."""
    tensors = {}
    for down, ups in lora.values():
        for module, up in ups.items():
            tensors[f"{name(module)}.{down_name}.weight"] = down.clone()  # a file holds each tensor once
            tensors[f"{name(module)}.{up_name}.weight"] = up
            if alpha is not None:
                tensors[f"{name(module)}.alpha"] = torch.tensor(alpha, dtype=BF16)
    return tensors


XLABS = {"img_attn.qkv": "qkv_lora1", "txt_attn.qkv": "qkv_lora2", "img_attn.proj": "proj_lora1", "txt_attn.proj": "proj_lora2"}


def xlabs_modules(state: dict) -> list[tuple[str, tuple[str, ...]]]:
    """What XLabs' LoRAs change: the double blocks' attention, and the single blocks' q/k/v rows of linear1."""
    modules = [(f"double_blocks.{i}.{b}", tuple(f"transformer_blocks.{i}.{d}" for d in DOUBLE[b])) for i in blocks(state, "transformer_blocks") for b in XLABS]
    return modules + [(f"single_blocks.{i}.linear1", tuple(f"single_transformer_blocks.{i}.attn.to_{x}" for x in "qkv")) for i in blocks(state, "single_transformer_blocks")]


def xlabs(lora: dict) -> dict:
    tensors = {}
    for bfl_module, (down, ups) in lora.items():
        group, index, module = bfl_module.split(".", 2)
        name = f"{group}.{index}.processor.{XLABS.get(module, 'qkv_lora')}"
        tensors[f"{name}.down.weight"] = down
        tensors[f"{name}.up.weight"] = torch.cat(list(ups.values()))
    return tensors


def reference(state: dict, applied: list[tuple[dict, object, float]], added: dict | None = None, replaced: dict | None = None) -> dict[str, torch.Tensor]:
    """The documented formula in float32: W + sum over LoRAs of (up @ down) * (alpha / rank * strength), each
    LoRA in order; `ratio(module)` gives alpha / rank. `added`: bias rows (scaled like their module),
    `replaced`: whole tensors."""
    ref = {k: v.float() for k, v in state.items()}
    for lora, ratio, strength in applied:
        for down, ups in lora.values():
            for module, up in ups.items():
                ref[f"{module}.weight"] = ref[f"{module}.weight"] + (up.float() @ down.float()) * (ratio(module) * strength)
                if added:
                    ref[f"{module}.bias"] = ref[f"{module}.bias"] + added[module].float() * (ratio(module) * strength)
    for key, value in (replaced or {}).items():
        ref[key] = value.float()
    return ref


def assert_baked(got: dict, state: dict, ref: dict, changed: set[str], dtype=BF16) -> None:
    """Changed tensors are the reference rounded once; every other tensor is the source's, byte for byte."""
    assert sorted(got) == sorted(state)
    wrong = [k for k in changed if not torch.equal(got[k].view(torch.uint8), ref[k].to(dtype).view(torch.uint8))]
    assert wrong == []
    untouched = [k for k in state if k not in changed and not torch.equal(got[k].view(torch.uint8), state[k].view(torch.uint8))]
    assert untouched == []


def changed_keys(lora: dict, params=("weight",)) -> set[str]:
    return {f"{m}.{p}" for _, ups in lora.values() for m in ups for p in params}


def bake(recipe_dir, out, source, loras: dict, *overrides, dtype="bf16"):
    recipe = {"sources": {"model": str(source)}, "rules": [{"match": ".*", "op": "take:model"}], "dtype": dtype, "loras": loras}
    return run_recipe(recipe_dir, out, recipe, *overrides)


# --- bake-in, every format --------------------------------------------------------------------------------


def every_format(state: dict, tmp_path) -> dict:
    """One LoRA file per format, each with what the reference needs: (file, metadata, lora, ratio, strength,
    added biases, replaced tensors, format name)."""
    everything = linear_modules(state)
    cases = {}
    lora = describe(state, everything, 1)
    te = {"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.ones(R, 8), "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.ones(8, R)}
    cases["kohya"] = ({**kohya(lora, alpha=2.0), **te}, {}, lora, lambda m: 2.0 / R, 0.8, None, None)
    lora = describe(state, everything, 2)
    cases["comfyui"] = (kohya(lora, alpha=8.0, prefix="diffusion_model.", dotted=True), {}, lora, lambda m: 8.0 / R, 1.0, None, None)
    lora = describe(state, everything, 3)
    targets = sorted(m for _, ups in lora.values() for m in ups)
    config = {"r": R, "lora_alpha": R, "alpha_pattern": {"^proj_out": 2}, "target_modules": targets}  # as diffusers' save_lora_weights writes it
    metadata = {"lora_adapter_metadata": json.dumps({f"transformer.{k}": v for k, v in config.items()})}
    cases["diffusers"] = (per_module(lora, "lora_A", "lora_B", lambda m: f"transformer.{m}"), metadata, lora, lambda m: 2.0 / R if m == "proj_out" else 1.0, 0.6, None, None)
    lora = describe(state, everything, 4)
    cases["onetrainer"] = (per_module(lora, "lora_down", "lora_up", lambda m: "lora_transformer_" + m.replace(".", "_"), alpha=1.0), {}, lora, lambda m: 1.0 / R, 1.0, None, None)
    lora = describe(state, xlabs_modules(state), 5)
    cases["xlabs"] = (xlabs(lora), {}, lora, lambda m: 1.0, 0.9, None, None)
    lora = describe(state, everything, 6)
    added = biases(state, lora, 7)
    norms = {k: (v.float() * 1.5).to(BF16) for k, v in state.items() if ".norm_" in k and "norm_out" not in k}
    control = kohya(lora, alpha=None, prefix="", dotted=True, names=("lora_A", "lora_B"))
    for bfl_module, (_, ups) in lora.items():
        control[f"{bfl_module}.lora_B.bias"] = fuse(bfl_module, [added[m] for m in ups])
    control.update({k: v for k, v in diffusers_to_bfl({**state, **norms}).items() if k.endswith(".scale")})
    cases["bfl_control"] = (control, {}, lora, lambda m: 1.0, 0.5, added, norms)
    files = {}
    for name, (tensors, metadata, *rest) in cases.items():
        save_file(tensors, tmp_path / f"{name}.safetensors", metadata=metadata or None)
        files[name] = (tmp_path / f"{name}.safetensors", *rest)
    return files


@pytest.fixture(scope="module")
def formats(tmp_path_factory, krea, state_of):
    return every_format(state_of(krea), tmp_path_factory.mktemp("loras"))


@pytest.mark.parametrize("fmt", ["kohya", "comfyui", "diffusers", "onetrainer", "xlabs", "bfl_control"])
def test_every_format_bakes_to_the_float32_reference(recipe_dir, tmp_path, krea, state_of, formats, fmt):
    """Each format's keys land on the right canonical tensors and rows (fused q/k/v and linear1 split, the
    final layer's up rows swapped, alphas from tensors or PEFT's metadata, a control LoRA's biases added and
    its q/k norms replaced), rounded once to bf16; every tensor no LoRA changes is the source's bytes."""
    path, lora, ratio, strength, added, replaced = formats[fmt]
    out = tmp_path / "out"
    plan = bake(recipe_dir, out, krea, {"l": {"path": str(path), "strength": strength}}, "dry_run=true")
    summary = plan.loras[0]
    assert summary.format == fmt and set(summary.ranks) == {R}
    changed = changed_keys(lora, ("weight", "bias") if added else ("weight",)) | set(replaced or ())
    assert summary.tensors == len(changed)
    bake(recipe_dir, out, krea, {"l": {"path": str(path), "strength": strength}})
    assert_baked(load_state(out), state_of(krea), reference(state_of(krea), [(lora, ratio, strength)], added, replaced), changed)
    if fmt == "kohya":
        assert summary.ignored == 2 and set(summary.alphas) == {2.0}
        assert summary.blocks[0] == "img_in" and summary.blocks[-1] == "final_layer"


def test_final_layer_swap_applies_to_up_rows_only(recipe_dir, tmp_path, krea, state_of):
    """kohya on final_layer.adaLN_modulation.1 (BFL's shift, scale): norm_out.linear (scale, shift) gets the
    up's halves swapped and the down as it is; swapping the down's rows too (diffusers' old converter) differs."""
    state = state_of(krea)
    lora = describe(state, [(FINAL_MOD, ("norm_out.linear",))], 8)
    path = tmp_path / "final.safetensors"
    save_file(kohya(lora, alpha=R), path)
    out = tmp_path / "out"
    bake(recipe_dir, out, krea, {"f": str(path)}, dtype="fp32")
    got = load_state(out)["norm_out.linear.weight"]
    down, ups = lora[FINAL_MOD]
    up = ups["norm_out.linear"].float()
    want = state["norm_out.linear.weight"].float() + up @ down.float()
    assert torch.equal(got, want)
    h = R // 2
    both = state["norm_out.linear.weight"].float() + up @ torch.cat([down[h:], down[:h]]).float()
    assert not torch.equal(got, both)


@pytest.mark.diffusers
def test_diffusers_fuses_the_same_tensors(recipe_dir, tmp_path, krea, state_of, formats):
    """diffusers' own load_lora_adapter + fuse_lora (peft), five formats at once in the recipe's order, each
    at strength 0.5, on the model in float32: the same tensors after the one rounding. (diffusers reads
    kohya's, ComfyUI's and XLabs' double blocks at any width, and of OneTrainer's keys the attention; for
    linear1 it needs FLUX.1's width: the next test. BFL control LoRAs it reads only for all 19 + 38 blocks at
    FLUX.1's width, so those are checked against the reference alone.)"""
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders import FluxLoraLoaderMixin

    state = state_of(krea)
    doubles = [(b, ms) for b, ms in linear_modules(state) if b.startswith("double_blocks.")]
    lora = describe(state, doubles, 9)
    kohya_path = tmp_path / "kohya.safetensors"
    save_file(kohya(lora, alpha=R / 2), kohya_path)
    xlabs_lora = describe(state, [m for m in xlabs_modules(state) if m[0].startswith("double_blocks.")], 10)
    xlabs_path = tmp_path / "xlabs.safetensors"
    save_file(xlabs(xlabs_lora), xlabs_path)
    comfy_lora = describe(state, doubles, 13)
    comfy_path = tmp_path / "comfy.safetensors"
    save_file(kohya(comfy_lora, alpha=R * 2, prefix="diffusion_model.", dotted=True), comfy_path)
    attention = [(b, ms) for b, ms in doubles if ".img_attn." in b or ".txt_attn." in b]  # what diffusers maps of OneTrainer's keys
    onetrainer_lora = describe(state, attention, 14)
    onetrainer_path = tmp_path / "onetrainer.safetensors"
    save_file(per_module(onetrainer_lora, "lora_down", "lora_up", lambda m: "lora_transformer_" + m.replace(".", "_"), alpha=1.0), onetrainer_path)
    peft_path, peft_lora, peft_ratio, *_ = formats["diffusers"]
    files = {"peft": peft_path, "kohya": kohya_path, "xlabs": xlabs_path, "comfy": comfy_path, "onetrainer": onetrainer_path}
    out = tmp_path / "out"
    bake(recipe_dir, out, krea, {name: {"path": str(path), "strength": 0.5} for name, path in files.items()})

    model = FluxTransformer2DModel.from_pretrained(krea, torch_dtype=torch.float32)
    for name, path in files.items():
        # as the pipeline's load_lora_weights does: converted keys, and the header's lora_adapter_metadata
        converted, metadata = FluxLoraLoaderMixin.lora_state_dict(str(path), return_lora_metadata=True)
        model.load_lora_adapter(converted, metadata=metadata, adapter_name=name)
    model.set_adapters(list(files), weights=[0.5] * len(files))
    model.fuse_lora(adapter_names=list(files))
    model.unload_lora()
    fused = model.state_dict()
    got = load_state(out)
    applied = [(peft_lora, peft_ratio, 0.5), (lora, lambda m: 0.5, 0.5), (xlabs_lora, lambda m: 1.0, 0.5), (comfy_lora, lambda m: 2.0, 0.5), (onetrainer_lora, lambda m: 0.25, 0.5)]
    changed = set().union(*(changed_keys(described) for described, _, _ in applied))
    assert [k for k in changed if not torch.equal(got[k], fused[k].to(BF16))] == []
    assert_baked(got, state, reference(state, applied), changed)


def flux_width_single_block(folder) -> dict:
    """A FLUX.1-wide model (3072 = 24 heads of 128) with one single block and no double block, written as a
    diffusers folder from a repeated random tile (cheap to fill); its state, as bf16."""
    from fluxrecipe.architecture import expected_parameters

    config = {"_class_name": "FluxTransformer2DModel", "patch_size": 1, "in_channels": 4, "attention_head_dim": 128, "num_attention_heads": 24,
              "joint_attention_dim": 32, "pooled_projection_dim": 32, "axes_dims_rope": [16, 56, 56], "num_layers": 0, "num_single_layers": 1, "guidance_embeds": False}
    tile = torch.randn(100_003, generator=torch.Generator().manual_seed(0)) * 0.02
    state = {k: tile.repeat(math.prod(s) // tile.numel() + 1)[: math.prod(s)].view(s).to(BF16) for k, s in expected_parameters(config, "test").items()}
    save_sharded(state, folder, [list(state)], config)
    return state


@pytest.mark.diffusers
def test_diffusers_fuses_kohya_linear1_at_flux_width(recipe_dir, tmp_path):
    """diffusers splits kohya's single-block linear1 as FLUX.1's (3072 x 3 + 12288 rows), so this one runs at
    FLUX.1's width, on one single block: every module of the block, fused by diffusers, gives our tensors."""
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders import FluxLoraLoaderMixin

    folder = tmp_path / "wide"
    state = flux_width_single_block(folder)
    lora = describe(state, [m for m in linear_modules(state) if m[0].startswith("single_blocks.")], 12)
    path = tmp_path / "kohya.safetensors"
    save_file(kohya(lora, alpha=R * 2), path)
    out = tmp_path / "out"
    bake(recipe_dir, out, folder, {"k": {"path": str(path), "strength": 0.5}})
    model = FluxTransformer2DModel.from_pretrained(folder, torch_dtype=torch.float32)
    model.load_lora_adapter(FluxLoraLoaderMixin.lora_state_dict(str(path)), adapter_name="k")
    model.set_adapters(["k"], weights=[0.5])
    model.fuse_lora(adapter_names=["k"])
    model.unload_lora()
    fused = model.state_dict()
    got = load_state(out)
    changed = changed_keys(lora)
    assert len(changed) == 6 and [k for k in changed if not torch.equal(got[k], fused[k].to(BF16))] == []
    assert [k for k in state if k not in changed and not torch.equal(got[k], state[k])] == []


def test_chunking_threads_and_layouts_give_the_same_bytes(recipe_dir, tmp_path, krea, state_of, formats):
    """A patched step is computed in fixed blocks of 64 rows: any chunk size (here 1 or 2 blocks a chunk, or
    whole tensors: norm1.linear has 3 blocks) and thread count give the same bytes; and written as ComfyUI's layout (fused, swapped
    final layer, chunks cut at the seams) it is the diffusers output's tensors in BFL's layout."""
    path = str(formats["kohya"][0])
    runs = {}
    for name, options in (("a", ["chunk_elements=100", "threads=1"]), ("b", ["chunk_elements=5000", "threads=3"]), ("c", [])):
        bake(recipe_dir, tmp_path / name, krea, {"k": path}, *options)
        runs[name] = load_state(tmp_path / name)
    assert all(torch.equal(runs["a"][k].view(torch.uint8), runs[x][k].view(torch.uint8)) for x in "bc" for k in runs["a"])
    single = tmp_path / "comfy.safetensors"
    bake(recipe_dir, single, krea, {"k": path}, "format=comfyui", "chunk_elements=700")
    want = diffusers_to_bfl(runs["c"], COMFY)
    got = load_file(single)
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("dtype", ["fp8", "fp8_scaled"])
def test_fp8_sees_the_baked_values_and_rounds_once(recipe_dir, tmp_path, krea, state_of, formats, dtype):
    """fp8: the float32 result with the LoRA, rounded once (no bf16 step between); fp8_scaled: the absmax pass
    sees the LoRA'd values, so each scale is absmax(W + delta) / 448."""
    path, lora, ratio, strength, *_ = formats["kohya"]
    state = state_of(krea)
    ref = reference(state, [(lora, ratio, 1.0)])
    out = tmp_path / "out.safetensors"
    bake(recipe_dir, out, krea, {"k": str(path)}, "format=comfyui", dtype=dtype)
    got = load_file(out)
    want = diffusers_to_bfl(ref, COMFY)
    qkv = f"{COMFY}double_blocks.0.img_attn.qkv.weight"
    if dtype == "fp8":
        assert torch.equal(got[qkv].view(torch.uint8), want[qkv].clamp(-448, 448).to(torch.float8_e4m3fn).view(torch.uint8))
    else:
        scale = got[f"{COMFY}double_blocks.0.img_attn.qkv.weight_scale"]
        assert scale.item() == (want[qkv].abs().max() / 448.0).item()
        assert torch.equal(got[qkv].view(torch.uint8), (want[qkv] / scale).clamp(-448, 448).to(torch.float8_e4m3fn).view(torch.uint8))


def test_strength_zero_and_untouched_keys_stay_byte_copies(recipe_dir, tmp_path, krea, state_of, formats):
    """A LoRA at strength 0 changes nothing, and a tensor no LoRA changes is still copied byte for byte."""
    path = str(formats["xlabs"][0])
    out = tmp_path / "out"
    plan = bake(recipe_dir, out, krea, {"x": {"path": path, "strength": 0.0}}, "dry_run=true")
    assert not any(s.patches for s in plan.steps) and all(s.copies_bytes for s in plan.steps)
    plan = bake(recipe_dir, out, krea, {"x": {"path": path, "strength": 1.0}}, "dry_run=true")
    assert sum(s.copies_bytes for s in plan.steps) == len(plan.steps) - plan.loras[0].tensors


def test_hub_lora_is_fetched_and_pinned(recipe_dir, tmp_path, krea, state_of, formats, monkeypatch):
    """`repo` + `file` goes through huggingface_hub's cache (offline here); the output's recipe.yaml pins the commit."""
    from huggingface_hub import constants

    path, lora, ratio, strength, *_ = formats["comfyui"]
    commit = "3" * 40
    root = tmp_path / "cache" / "models--someone--flux-lora"
    (root / "snapshots" / commit).mkdir(parents=True)
    (root / "snapshots" / commit / "style.safetensors").write_bytes(path.read_bytes())
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    out = tmp_path / "out"
    bake(recipe_dir, out, krea, {"s": {"repo": "someone/flux-lora", "file": "style.safetensors", "strength": 0.5}})
    assert_baked(load_state(out), state_of(krea), reference(state_of(krea), [(lora, ratio, 0.5)]), changed_keys(lora))
    import yaml

    pinned = yaml.safe_load((out / "recipe.yaml").read_text())["loras"]["s"]
    assert pinned == {"repo": "someone/flux-lora", "revision": commit, "file": "style.safetensors", "strength": 0.5}
    provenance = json.loads((out / "fluxrecipe.json").read_text())["loras"][0]
    assert provenance["commit"] == commit and provenance["format"] == "comfyui"
    with pytest.raises(SourceError, match="has no file 'other.safetensors'|not in the local cache"):
        bake(recipe_dir, tmp_path / "out2", krea, {"s": {"repo": "someone/flux-lora", "file": "other.safetensors"}})


# --- a merge written as a LoRA -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, krea, state_of):
    """krea plus a difference of rank 3 on every weight matrix (float32): what a fine-tune of rank <= 4 learned."""
    state = {k: v.float() for k, v in state_of(krea).items()}
    g = torch.Generator().manual_seed(11)
    tuned = {k: (v + torch.randn(v.shape[0], 3, generator=g) @ torch.randn(3, v.shape[1], generator=g) * 0.02 if v.dim() == 2 else v) for k, v in state.items()}
    root = tmp_path_factory.mktemp("tuned")
    return save_sharded(state, root / "base", [list(state)], config_of(krea)), save_sharded(tuned, root / "tuned", [list(tuned)], config_of(krea))


EXTRACT = {"sources": {"tuned": None, "base": None}, "base": "base", "rules": [{"match": ".*", "op": "take:tuned"}], "dtype": "fp32"}


def extract(recipe_dir, out, tuned, *overrides):
    base, model = tuned
    return run_recipe(recipe_dir, out, {**EXTRACT, "sources": {"tuned": str(model), "base": str(base)}}, *overrides)


@pytest.mark.diffusers
def test_extraction_recovers_a_low_rank_difference_and_loads_in_diffusers(recipe_dir, tmp_path, tuned, caplog):
    """format=lora_peft, lora_rank=4 over a difference of rank 3: every matrix to float32 precision, the
    error of each printed and recorded; diffusers loads the file (load_lora_adapter) and base + LoRA fused is
    the tuned model within that error."""
    from diffusers import FluxTransformer2DModel

    caplog.set_level(logging.INFO, logger="fluxrecipe")
    out = tmp_path / "extracted.safetensors"
    plan = extract(recipe_dir, out, tuned, "format=lora_peft", "lora_rank=4", "dry_run=true")
    assert plan.lora_rank == 4 and all(f.rank in (0, 4) for f in plan.factors)
    assert any("1-D tensors (biases, norms)" in n for n in plan.notes)
    result = extract(recipe_dir, out, tuned, "format=lora_peft", "lora_rank=4")
    assert max(result.lora_errors.values()) < 1e-5
    assert set(result.lora_unheld.values()) == {0.0}
    with safe_open(out, "pt") as f:
        provenance = json.loads(f.metadata()["fluxrecipe.provenance"])["lora"]
    assert provenance["rank"] == 4 and {k: v["relative_error"] for k, v in provenance["matrices"].items()} == result.lora_errors
    assert "relative error" in caplog.text and "transformer_blocks.0.attn.to_q" in caplog.text

    from fluxrecipe.verify import verify_file

    assert verify_file(out).problems == [] and verify_file(out).layout == "lora"
    base, model = tuned
    fused = FluxTransformer2DModel.from_pretrained(base, torch_dtype=torch.float32)
    fused.load_lora_adapter(str(out), adapter_name="x")
    fused.fuse_lora(adapter_names=["x"])
    fused.unload_lora()
    got, want, original = fused.state_dict(), load_state(model), load_state(base)
    for key, w in want.items():
        if w.dim() != 2:
            continue
        stated = result.lora_errors[key[: -len(".weight")]]
        assert float((got[key] - w).norm() / (w - original[key]).norm()) <= stated + 1e-5, key


def test_kohya_output_holds_the_fused_difference_and_bakes_back(recipe_dir, tmp_path, tuned):
    """The built-in extract_lora recipe (format=lora): kohya keys on BFL's modules with an alpha (= rank): each
    up @ down is the difference of the BFL module's rows (the final layer in BFL's order); rank 12 holds the
    fused q/k/v (3 differences of rank 3) and linear1 (4) exactly, and baking the file into the base gives
    the tuned model back."""
    base, model = tuned
    out = tmp_path / "kohya.safetensors"
    result = merge(["recipe=extract_lora", f"recipe.sources.tuned={model}", f"recipe.sources.base={base}", "recipe.dtype=fp32", "lora_rank=12", f"output={out}", "progress=false"])
    assert max(result.lora_errors.values()) < 1e-5
    written = load_file(out)
    diff = {k: v - load_state(base)[k] for k, v in load_state(model).items()}
    bfl_diff = diffusers_to_bfl(diff)
    for name in ("double_blocks.0.img_attn.qkv", "single_blocks.1.linear1", FINAL_MOD, "img_in"):
        key = "lora_unet_" + name.replace(".", "_")
        up, down, alpha = written[f"{key}.lora_up.weight"], written[f"{key}.lora_down.weight"], written[f"{key}.alpha"]
        assert alpha.item() == down.shape[0] == min(12, *bfl_diff[f"{name}.weight"].shape)
        assert torch.allclose(up @ down, bfl_diff[f"{name}.weight"], atol=1e-6), name
    back = tmp_path / "back"
    bake(recipe_dir, back, base, {"x": str(out)}, dtype="fp32")
    got, want = load_state(back), load_state(model)
    assert all(torch.allclose(got[k], want[k], atol=1e-6) for k in want)


def test_several_loras_merged_into_one(recipe_dir, tmp_path, krea, formats):
    """A base plus two LoRAs written as one LoRA: the difference is the two products summed (no base added and
    taken away again), so rank 8 holds two rank-4 LoRAs on the same module to float32 precision."""
    out = tmp_path / "merged.safetensors"
    loras = {"a": {"path": str(formats["onetrainer"][0])}, "b": {"path": str(formats["diffusers"][0]), "strength": 0.6}}
    result = bake(recipe_dir, out, krea, loras, "format=lora_peft", "lora_rank=8", dtype="fp32")
    assert max(result.lora_errors.values()) < 1e-5
    written = load_file(out)
    module = "transformer_blocks.1.ff.net.0.proj"
    _, lora_a, ratio_a, *_ = formats["onetrainer"]
    _, lora_b, ratio_b, *_ = formats["diffusers"]
    want = sum((ups[module].float() @ down.float()) * (r(module) * s) for lora, r, s in ((lora_a, ratio_a, 1.0), (lora_b, ratio_b, 0.6)) for down, ups in lora.values() if module in ups)
    got = written[f"transformer.{module}.lora_B.weight"] @ written[f"transformer.{module}.lora_A.weight"]
    assert torch.allclose(got, want, atol=1e-6) and "single_transformer_blocks.0.attn.norm_q" not in str(list(written))


def test_randomized_svd_is_exact_for_low_rank_and_deterministic():
    """Large matrices (smaller side over 1024) use the randomized range finder, seeded: a rank-6 difference comes back
    to float32 precision at rank 8, and the same input gives the same bytes."""
    from fluxrecipe.ops.lora import factor, relative_error

    g = torch.Generator().manual_seed(0)
    diff = torch.randn(1500, 6, generator=g) @ torch.randn(6, 1100, generator=g)
    up, down = factor(lambda: (diff,), (1500, 1100), 8, exact=False, seed=7)
    assert relative_error(lambda: (diff,), (1500, 1100), up, down) < 1e-5
    again = factor(lambda: diff.split(7), (1500, 1100), 8, exact=False, seed=7)  # cut otherwise: the same bits
    assert torch.equal(up, again[0]) and torch.equal(down, again[1])


# --- bad inputs: one line, no output -----------------------------------------------------------------------


def refused(error: type, fragment: str, run, out) -> str:
    with pytest.raises(error) as e:
        run()
    message = str(e.value)
    assert fragment in message and "\n" not in message, message
    assert not out.exists()
    return message


def test_a_rank_larger_than_the_matrices_allow(recipe_dir, tmp_path, krea, state_of):
    """A hostile rank (more than min(out, in)) would only cost memory: refused before anything is read."""
    w = state_of(krea)["transformer_blocks.0.attn.to_q.weight"]
    rank = min(w.shape) + 8
    path = tmp_path / "big.safetensors"
    save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(rank, w.shape[1]), "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(w.shape[0], rank)}, path)
    out = tmp_path / "out"
    refused(SourceError, f"has rank {rank}, more than its matrices allow", lambda: bake(recipe_dir, out, krea, {"x": str(path)}), out)


def test_lora_of_another_width(recipe_dir, tmp_path, krea):
    """A LoRA made for a FLUX twice as wide (64: 4 heads of 16) on the 32-wide model."""
    from fluxrecipe.architecture import expected_parameters

    wide = {k: torch.zeros(s) for k, s in expected_parameters(tiny_config(True, num_attention_heads=4), "test").items()}
    path = tmp_path / "wide.safetensors"
    save_file(kohya(describe(wide, linear_modules(wide), 1), alpha=1.0), path)
    out = tmp_path / "out"
    refused(SourceError, "a LoRA for a", lambda: bake(recipe_dir, out, krea, {"w": str(path)}), out)


def test_sdxl_lora(recipe_dir, tmp_path, krea):
    path = tmp_path / "sdxl.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(R, 8), "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(8, R)}, path)
    out = tmp_path / "out"
    refused(SourceError, "is a LoRA for a Stable Diffusion / SDXL UNet", lambda: bake(recipe_dir, out, krea, {"s": str(path)}), out)


def test_keys_that_map_nowhere_stop_the_plan_unless_ignored(recipe_dir, tmp_path, krea, state_of, formats):
    tensors = load_file(formats["kohya"][0])
    tensors["lora_unet_double_blocks_0_img_attn_qkvx.lora_down.weight"] = torch.zeros(R, 32)
    tensors["lora_unet_double_blocks_0_img_attn_qkvx.lora_up.weight"] = torch.zeros(96, R)
    path = tmp_path / "odd.safetensors"
    save_file(tensors, path)
    out = tmp_path / "out"
    message = refused(PlanError, "lora_unet_double_blocks_0_img_attn_qkvx.lora_down.weight", lambda: bake(recipe_dir, out, krea, {"odd": str(path)}), out)
    assert "loras.odd" in message and "ignore_unmatched: true" in message
    plan = bake(recipe_dir, out, krea, {"odd": {"path": str(path), "ignore_unmatched": True}}, "dry_run=true")
    assert len(plan.loras[0].unmatched) == 2 and any("warning: lora 'odd': 2 keys change nothing" in n for n in plan.notes)


def test_guidance_lora_on_a_model_without_guidance(recipe_dir, tmp_path, schnell, krea, state_of):
    state = state_of(krea)
    path = tmp_path / "guidance.safetensors"
    save_file(kohya(describe(state, [m for m in linear_modules(state) if m[0].startswith("guidance_in")], 1), alpha=R), path)
    out = tmp_path / "out"
    refused(PlanError, "which the output does not have", lambda: bake(recipe_dir, out, schnell, {"g": str(path)}), out)


def test_a_full_model_given_as_a_lora(recipe_dir, tmp_path, krea, schnell, state_of):
    path = tmp_path / "model.safetensors"
    save_file(diffusers_to_bfl(state_of(schnell)), path)
    out = tmp_path / "out"
    refused(SourceError, "use a model as one of the recipe's sources", lambda: bake(recipe_dir, out, krea, {"m": str(path)}), out)


def test_a_missing_lora_file(recipe_dir, tmp_path, krea):
    out = tmp_path / "out"
    refused(SourceError, "lora 'gone': ", lambda: bake(recipe_dir, out, krea, {"gone": str(tmp_path / "gone.safetensors")}), out)


@pytest.mark.parametrize("spec, fragment", [
    ({"path": "x.safetensors", "strength": "strong"}, "strength of LoRA 'l' must be a number"),
    ({"path": "x.safetensors", "weight": 1}, "unknown field(s) 'weight'"),
    ({"repo": "org/name"}, "but no file"),
    ({"path": "x.safetensors", "ignore_unmatched": "yes"}, "ignore_unmatched must be true or false"),
])
def test_bad_lora_fields(recipe_dir, tmp_path, krea, spec, fragment):
    out = tmp_path / "out"
    message = refused(RecipeError, fragment, lambda: bake(recipe_dir, out, krea, {"l": spec}), out)
    assert "loras.l" in message


def test_lora_rank_larger_than_any_matrix(recipe_dir, tmp_path, tuned):
    out = tmp_path / "x.safetensors"
    refused(PlanError, "lora_rank=200 is larger than any matrix of this LoRA allows: the largest rank one can hold is 32", lambda: extract(recipe_dir, out, tuned, "format=lora_peft", "lora_rank=200"), out)


def test_format_lora_with_no_base(recipe_dir, tmp_path, tuned):
    base, model = tuned
    out = tmp_path / "x.safetensors"
    recipe = {"sources": {"tuned": str(model), "base": str(base)}, "rules": [{"match": ".*", "op": "take:tuned"}]}
    refused(PlanError, "name the base with `base: SOURCE`", lambda: run_recipe(recipe_dir, out, recipe, "format=lora"), out)
    single = {"sources": {"base": str(base)}, "rules": [{"match": ".*", "op": "take:base"}]}
    refused(PlanError, "the LoRA would be empty", lambda: run_recipe(recipe_dir, out, single, "format=lora"), out)


def test_output_over_a_lora_is_refused(recipe_dir, tmp_path, krea, formats):
    path = tmp_path / "mine.safetensors"
    path.write_bytes(formats["kohya"][0].read_bytes())
    with pytest.raises(OutputError, match="is a safetensors file of .* that is neither a FLUX transformer nor a file fluxrecipe wrote"):
        bake(recipe_dir, path, krea, {"k": str(path)}, "format=comfyui", "overwrite=true")
    assert path.read_bytes() == formats["kohya"][0].read_bytes()


@pytest.mark.parametrize("value", ["0", "abc"])
def test_lora_rank_must_be_a_whole_number(recipe_dir, tmp_path, tuned, value):
    out = tmp_path / "x.safetensors"
    refused(UsageError, f"lora_rank={value}: must be a whole number above 0", lambda: extract(recipe_dir, out, tuned, "format=lora", f"lora_rank={value}"), out)


def test_nan_in_a_lora_stops_the_merge(recipe_dir, tmp_path, krea, formats):
    tensors = load_file(formats["xlabs"][0])
    tensors["double_blocks.1.processor.proj_lora2.up.weight"][3, 1] = float("nan")
    path = tmp_path / "nan.safetensors"
    save_file(tensors, path)
    out = tmp_path / "out"
    refused(SourceError, "lora 'n': tensor 'double_blocks.1.processor.proj_lora2.up.weight'", lambda: bake(recipe_dir, out, krea, {"n": str(path)}), out)


def test_bake_lora_recipe(tmp_path, krea, state_of, formats):
    """The built-in bake_lora recipe: a model and one LoRA from the command line."""
    path, lora, ratio, *_ = formats["onetrainer"]
    out = tmp_path / "out"
    merge(["recipe=bake_lora", f"recipe.sources.model={krea}", f"recipe.loras.lora.path={path}", "recipe.loras.lora.strength=0.7", f"output={out}", "progress=false"])
    assert_baked(load_state(out), state_of(krea), reference(state_of(krea), [(lora, ratio, 0.7)]), changed_keys(lora))
    with pytest.raises(RecipeError, match=r"LoRA 'lora' has no file: give its path \(recipe.loras.lora.path=FILE\)"):
        merge(["recipe=bake_lora", f"recipe.sources.model={krea}", f"output={tmp_path / 'x'}", "progress=false"])


def test_strength_per_block(recipe_dir, tmp_path, krea, state_of, formats):
    """`strength` takes the per-block schedules op parameters take: here 1 by default, 0.5 on the single
    blocks and 0 (untouched) on double block 1."""
    path, lora, ratio, *_ = formats["kohya"]
    state = state_of(krea)
    strength = {"default": 1.0, "single_blocks": 0.5, "double_blocks.1": 0.0}
    out = tmp_path / "out"
    plan = bake(recipe_dir, out, krea, {"k": {"path": str(path), "strength": strength}}, "dry_run=true")
    assert "strength per block {default: 1.0, double_blocks.1: 0.0, single_blocks: 0.5}" in plan.loras[0].describe()
    bake(recipe_dir, out, krea, {"k": {"path": str(path), "strength": strength}})
    ref = {k: v.float() for k, v in state.items()}
    for down, ups in lora.values():
        for module, up in ups.items():
            s = 0.0 if module.startswith("transformer_blocks.1.") else 0.5 if module.startswith("single_transformer_blocks.") else 1.0
            if s:
                ref[f"{module}.weight"] = ref[f"{module}.weight"] + (up.float() @ down.float()) * (ratio(module) * s)
    changed = {k for k in changed_keys(lora) if not k.startswith("transformer_blocks.1.")}
    assert_baked(load_state(out), state, ref, changed)


@pytest.mark.parametrize("strength, error, fragment", [
    ({"default": 1.0, "singel_blocks": 0.5}, RecipeError, "'singel_blocks' is not a FLUX block name (did you mean 'single_blocks'?)"),
    ({"double_blocks": 1.0}, PlanError, "strength gives no value for"),
    ([0.5], RecipeError, "needs 2 or more numbers"),
])
def test_bad_strength_schedules(recipe_dir, tmp_path, krea, formats, strength, error, fragment):
    out = tmp_path / "out"
    message = refused(error, fragment, lambda: bake(recipe_dir, out, krea, {"k": {"path": str(formats["kohya"][0]), "strength": strength}}), out)
    assert "loras.k" in message


def test_a_lora_on_a_method_with_statistics_passes(recipe_dir, tmp_path, schnell, krea, formats):
    """The LoRAs are added to whatever the rule computes, here slerp (a statistics pass over each whole tensor
    first, in whole blocks of rows for a patched step): in fp32, the merge without the LoRA plus its products."""
    path, lora, ratio, *_ = formats["kohya"]
    recipe = {"sources": {"schnell": str(schnell), "krea": str(krea)}, "base": "krea", "dtype": "fp32",
              "rules": [{"match": "guidance", "op": "take:krea"}, {"match": ".*", "op": {"slerp": {"t": 0.3}}}]}
    run_recipe(recipe_dir, tmp_path / "plain", recipe)
    run_recipe(recipe_dir, tmp_path / "lora", {**recipe, "loras": {"k": str(path)}}, "chunk_elements=300")
    plain = load_state(tmp_path / "plain")
    assert_baked(load_state(tmp_path / "lora"), plain, reference(plain, [(lora, ratio, 1.0)]), changed_keys(lora), dtype=torch.float32)


def test_a_lora_is_recorded_without_its_absolute_path_and_pinned_by_its_content(recipe_dir, tmp_path, krea, formats):
    """Like a source: the output names a local LoRA relative to itself (recipe.yaml, fluxrecipe.json, shard
    metadata), a relative path in a recipe is found beside the recipe first, and a replay whose LoRA file
    changed is refused before anything is read."""
    import shutil

    import yaml

    from fluxrecipe.errors import SourceError

    lora = tmp_path / "loras" / "style.safetensors"
    lora.parent.mkdir()
    shutil.copy(formats["kohya"][0], lora)
    out = tmp_path / "out"
    bake(recipe_dir, out, krea, {"style": {"path": str(lora), "strength": 0.5}})
    for file in out.iterdir():
        assert str(tmp_path).encode() not in file.read_bytes(), file.name
    pinned = yaml.safe_load((out / "recipe.yaml").read_text())["loras"]["style"]
    assert pinned["path"] == "../loras/style.safetensors" and pinned["content_hash"].startswith("xxh3-128:")
    shutil.copy(out / "recipe.yaml", recipe_dir / "again.yaml")  # recipes/../loras/style.safetensors: the same file
    again = tmp_path / "again"
    merge(["recipe=again", f"output={again}", "progress=false"])
    assert sorted(p.read_bytes() for p in again.glob("*.safetensors")) == sorted(p.read_bytes() for p in out.glob("*.safetensors"))
    data = bytearray((recipe_dir / pinned["path"]).resolve().read_bytes())
    data[-1] ^= 0x01
    (recipe_dir / pinned["path"]).resolve().write_bytes(bytes(data))
    with pytest.raises(SourceError, match="is not the file this recipe was made with"):
        merge(["recipe=again", f"output={tmp_path / 'refused'}", "progress=false"])
    assert not (tmp_path / "refused").exists()
