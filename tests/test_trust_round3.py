"""Issue 21 (trust, round 3), the engine's findings: each test reproduces a finding as a user meets it and
fails without its fix.

Tests that guard against a hang run the command in a subprocess with a timeout far above its normal time
(or under `hang_guard`), so that a regression fails instead of stalling the suite; no assertion is timed.
"""

from __future__ import annotations

import os
import re
import stat

import pytest
import torch
from safetensors.torch import save_file

from conftest import load_state, run_recipe
from reliability_helpers import assert_no_output

from fluxrecipe.errors import FileError, OutputError, PlanError, SourceError

R = 2  # the rank of the LoRAs made here
HIDDEN = 32  # the tiny models' hidden size (conftest.TINY: 2 heads x 16)


def lora_module(name: str, rows: int, columns: int, seed: int, names=("lora_down", "lora_up")) -> dict[str, torch.Tensor]:
    """One LoRA module's down and up under `name` (rank R, bf16)."""
    g = torch.Generator().manual_seed(seed)
    return {
        f"{name}.{names[0]}.weight": (torch.randn(R, columns, generator=g) * 0.1).to(torch.bfloat16),
        f"{name}.{names[1]}.weight": (torch.randn(rows, R, generator=g) * 0.1).to(torch.bfloat16),
    }


def bake(recipe_dir, tmp_path, model, tensors: dict, *overrides, name="l", **spec):
    """`tensors` saved as a LoRA file and baked into `model` (take: model)."""
    path = tmp_path / f"{name}.safetensors"
    save_file(tensors, path)
    recipe = {"sources": {"model": str(model)}, "rules": [{"match": ".*", "op": "take:model"}], "loras": {name: {"path": str(path), **spec}}}
    return run_recipe(recipe_dir, tmp_path / "out", recipe, *overrides)


# --- 1. one module named twice in one LoRA file is refused, not baked twice -------------------------------

# one module (double block 0's image attention output, 32 x 32) in each scheme's spelling, with its up/down names
PROJ = {
    "kohya": ("lora_unet_double_blocks_0_img_attn_proj", ("lora_down", "lora_up")),
    "comfyui": ("diffusion_model.double_blocks.0.img_attn.proj", ("lora_down", "lora_up")),
    "comfyui_ab": ("diffusion_model.double_blocks.0.img_attn.proj", ("lora_A", "lora_B")),
    "peft": ("transformer.transformer_blocks.0.attn.to_out.0", ("lora_A", "lora_B")),
    "onetrainer": ("lora_transformer_transformer_blocks_0_attn_to_out_0", ("lora_down", "lora_up")),
    "kohya_diffusers": ("lora_unet_transformer_blocks_0_attn_to_out_0", ("lora_down", "lora_up")),
    "xlabs": ("double_blocks.0.processor.proj_lora1", ("down", "up")),
    "bfl": ("double_blocks.0.img_attn.proj", ("lora_A", "lora_B")),
}


@pytest.mark.parametrize("first, second", [("kohya", "comfyui"), ("kohya", "peft"), ("peft", "onetrainer"), ("comfyui", "kohya_diffusers"), ("xlabs", "kohya"), ("bfl", "peft")])
def test_one_module_under_two_names_is_refused(recipe_dir, tmp_path, schnell, first, second):
    (a, a_names), (b, b_names) = PROJ[first], PROJ[second]
    tensors = {**lora_module(a, HIDDEN, HIDDEN, 1, a_names), **lora_module(b, HIDDEN, HIDDEN, 2, b_names)}
    with pytest.raises(SourceError) as e:
        bake(recipe_dir, tmp_path, schnell, tensors)
    message = str(e.value)
    assert f"'{a}" in message and f"'{b}" in message and "transformer_blocks.0.attn.to_out.0.weight" in message and "\n" not in message
    assert_no_output(tmp_path / "out")


def test_a_fused_module_and_a_part_of_it_under_another_name_are_refused(recipe_dir, tmp_path, schnell):
    """kohya's single block linear1 (q, k, v and the MLP's rows) and PEFT's to_k of the same block: to_k twice."""
    tensors = {
        **lora_module("lora_unet_single_blocks_0_linear1", 3 * HIDDEN + 4 * HIDDEN, HIDDEN, 1),
        **lora_module("transformer.single_transformer_blocks.0.attn.to_k", HIDDEN, HIDDEN, 2, ("lora_A", "lora_B")),
    }
    with pytest.raises(SourceError, match=r"'lora_unet_single_blocks_0_linear1.*'transformer.single_transformer_blocks.0.attn.to_k.*single_transformer_blocks.0.attn.to_k.weight"):
        bake(recipe_dir, tmp_path, schnell, tensors)


# --- 3. a kohya module under the other block kind is unmatched, not skipped --------------------------------


@pytest.mark.parametrize("module", ["lora_unet_double_blocks_0_linear1", "lora_unet_single_blocks_1_img_attn_qkv", "lora_unet_single_blocks_0_img_mlp_0"])
def test_a_kohya_module_of_the_other_block_kind_is_unmatched(recipe_dir, tmp_path, schnell, module):
    good = lora_module("lora_unet_double_blocks_0_img_attn_proj", HIDDEN, HIDDEN, 1)
    wrong = lora_module(module, 3 * HIDDEN, HIDDEN, 2)
    with pytest.raises(PlanError, match=rf"2 of its keys change no tensor of the output: '{module}.lora_down.weight' \(no FLUX.1 module"):
        bake(recipe_dir, tmp_path, schnell, {**good, **wrong})
    plan = bake(recipe_dir, tmp_path, schnell, {**good, **wrong}, "dry_run=true", ignore_unmatched=True)
    assert any(f"'{module}.lora_up.weight'" in note for note in plan.notes)
    assert plan.loras[0].unmatched and {k for k, _ in plan.loras[0].unmatched} == set(wrong)


# --- 4. overwrite=true on a single file replaces only what fluxrecipe wrote or a FLUX.1 transformer ------


def take_recipe(model) -> dict:
    return {"sources": {"model": str(model)}, "rules": [{"match": ".*", "op": "take:model"}]}


@pytest.mark.parametrize("kind", ["a-users-lora", "an-sdxl-model", "a-header-only-file"])
def test_overwrite_refuses_a_safetensors_file_that_is_not_a_flux_model(recipe_dir, tmp_path, schnell, kind):
    out = tmp_path / "mine.safetensors"
    tensors = {
        "a-users-lora": lora_module("lora_unet_double_blocks_0_img_attn_proj", HIDDEN, HIDDEN, 1),
        "an-sdxl-model": {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3)},
        "a-header-only-file": {},
    }[kind]
    save_file(tensors, out, metadata={"ss_network_dim": "2"})
    before = out.read_bytes()
    with pytest.raises(OutputError, match=r"mine.safetensors exists and is a safetensors file of (\d+|no) tensors?.*that is neither a FLUX transformer nor a file fluxrecipe wrote: overwrite=true replaces only a model file"):
        run_recipe(recipe_dir, out, take_recipe(schnell), "format=bfl", "overwrite=true")
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.safetensors", "recipes"]


def test_overwrite_replaces_a_flux_transformer_and_a_file_fluxrecipe_wrote(recipe_dir, tmp_path, schnell, state_of):
    from flux_layouts import diffusers_to_bfl

    out = tmp_path / "model.safetensors"
    save_file(diffusers_to_bfl(state_of(schnell), "model.diffusion_model."), out)  # ComfyUI's layout, not written by fluxrecipe
    run_recipe(recipe_dir, out, take_recipe(schnell), "format=bfl", "overwrite=true")
    assert "fluxrecipe.version" in safe_metadata(out)
    lora = tmp_path / "l.safetensors"
    save_file(lora_module("lora_unet_double_blocks_0_img_attn_proj", HIDDEN, HIDDEN, 1), lora)
    run_recipe(recipe_dir, out, {**take_recipe(schnell), "loras": {"l": str(lora)}}, "format=lora", "overwrite=true")  # a LoRA, written by fluxrecipe
    run_recipe(recipe_dir, out, take_recipe(schnell), "format=comfyui", "overwrite=true")
    assert safe_metadata(out)["fluxrecipe.recipe"] and sorted(p.name for p in tmp_path.iterdir()) == ["l.safetensors", "model.safetensors", "recipes"]


def safe_metadata(path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return f.metadata()


# --- 5. scaled fp8: a scale that makes no sense, two scales, a marker that contradicts the dtype ----------

LAYER = "model.diffusion_model.double_blocks.0.img_attn.proj"  # a scaled layer of the ComfyUI files made here


def scaled_file(tmp_path, state: dict, convention: str, edit) -> object:
    """The model as a ComfyUI scaled-fp8 file (flux_layouts' writer), `edit`ed (tensors, metadata) before saving."""
    from flux_layouts import COMFY, diffusers_to_bfl, scaled_fp8

    tensors, metadata, _ = scaled_fp8(diffusers_to_bfl(state, COMFY), convention)
    edit(tensors, metadata)
    path = tmp_path / "scaled.safetensors"
    save_file(tensors, path, metadata=metadata)
    return path


def to_diffusers(tmp_path, source, *options):
    from conftest import merge

    return merge(["recipe=to_diffusers", f"recipe.sources.model={source}", f"output={tmp_path / 'out'}", "progress=false", *options])


@pytest.mark.parametrize("value, says", [
    (0.0, r"is 0 but 'model.diffusion_model.double_blocks.0.img_attn.proj.weight' holds values other than 0"),
    (-0.01, r"is -0.01: a scale is a finite number above 0"),
    (float("nan"), r"is nan: a scale is a finite number above 0"),
    (float("inf"), r"is inf: a scale is a finite number above 0"),
    (1e30, r"is 1e\+30: .* values up to 4.48e\+32"),
])
@pytest.mark.parametrize("convention, suffix", [("old", ".scale_weight"), ("new", ".weight_scale")])
def test_a_scale_that_makes_no_sense_is_refused(tmp_path, schnell, state_of, value, says, convention, suffix):
    def edit(tensors, metadata):
        tensors[LAYER + suffix] = torch.full_like(tensors[LAYER + suffix], value)

    path = scaled_file(tmp_path, state_of(schnell), convention, edit)
    with pytest.raises(SourceError, match=rf"{path}: '{LAYER}{suffix}' {says}") as e:
        to_diffusers(tmp_path, path)
    assert "\n" not in str(e.value)
    assert_no_output(tmp_path / "out")


def test_a_zero_scale_of_an_all_zero_weight_is_a_plan_note(tmp_path, schnell, state_of):
    """A layer of zeros stored with scale 0 (what absmax / 448 gives for it) is odd but means what it says."""
    def edit(tensors, metadata):
        tensors[LAYER + ".weight_scale"] = torch.zeros(())
        tensors[LAYER + ".weight"] = torch.zeros_like(tensors[LAYER + ".weight"]).view(torch.uint8).fill_(0x80).view(torch.float8_e4m3fn)  # -0.0

    path = scaled_file(tmp_path, state_of(schnell), "new", edit)
    result = to_diffusers(tmp_path, path, "recipe.dtype=fp32")

    assert not load_state(tmp_path / "out")["transformer_blocks.0.attn.to_out.0.weight"].any()
    plan = to_diffusers(tmp_path, path, "dry_run=true")
    assert any(f"'{LAYER}.weight_scale' is 0" in note and "all zero" in note for note in plan.notes), plan.notes
    assert result.files


def test_two_scales_for_one_weight_are_refused(tmp_path, schnell, state_of):
    def edit(tensors, metadata):
        tensors[LAYER + ".scale_weight"] = tensors[LAYER + ".weight_scale"].reshape(1) * 2

    path = scaled_file(tmp_path, state_of(schnell), "new", edit)
    with pytest.raises(SourceError, match=rf"{path}: '{LAYER}.weight' has two scales, '{LAYER}.scale_weight' and '{LAYER}.weight_scale'"):
        to_diffusers(tmp_path, path)


@pytest.mark.parametrize("convention", ["new", "metadata"])
def test_a_quantization_marker_that_contradicts_the_dtype_is_refused(tmp_path, schnell, state_of, convention):
    """The marker says float8_e4m3fn; the weight is stored as float8_e5m2 (its scale beside it)."""
    def edit(tensors, metadata):
        tensors[LAYER + ".weight"] = tensors[LAYER + ".weight"].float().to(torch.float8_e5m2)

    path = scaled_file(tmp_path, state_of(schnell), convention, edit)
    with pytest.raises(SourceError, match=rf"{path}: layer '{LAYER.removeprefix('model.diffusion_model.')}' is marked float8_e4m3fn .* but its weight is F8_E5M2"):
        to_diffusers(tmp_path, path)


# --- 6. a FIFO where a file should be: one line, never a hang ------------------------------------------

HANG = 120  # seconds: far above what any of these commands takes; a regression fails instead of stalling the suite


def one_error_line(done) -> str:
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode != 0 and "Traceback" not in done.stderr + done.stdout, done.stderr + done.stdout
    assert len(lines) == 1, done.stderr
    return lines[0]


def cli(recipe_dir, tmp_path, recipe: dict, *args):
    import yaml

    from conftest import run_cli, write_recipe

    write_recipe(recipe_dir, "t", yaml.safe_dump(recipe))
    return run_cli(["recipe=t", "progress=false", f"hydra.run.dir={tmp_path / 'run'}", *args], cwd=tmp_path, timeout=HANG)


def test_a_lora_path_that_is_a_fifo_is_one_line(recipe_dir, tmp_path, schnell):
    fifo = tmp_path / "l.safetensors"
    os.mkfifo(fifo)
    done = cli(recipe_dir, tmp_path, {**take_recipe(schnell), "loras": {"l": str(fifo)}}, f"output={tmp_path / 'out'}", "dry_run=true")
    assert f"lora 'l': {fifo}: not a regular file" in one_error_line(done)


def test_a_single_file_output_that_is_a_fifo_is_one_line(recipe_dir, tmp_path, schnell):
    fifo = tmp_path / "out.safetensors"
    os.mkfifo(fifo)
    done = cli(recipe_dir, tmp_path, take_recipe(schnell), f"output={fifo}", "format=bfl", "overwrite=true")
    assert f"{fifo} exists and is not a file (a FIFO" in one_error_line(done)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


@pytest.mark.parametrize("name", ["config.json", "fluxrecipe.manifest.json", "diffusion_pytorch_model.safetensors.index.json"])
def test_verify_on_a_folder_with_a_fifo_for_a_json_file_does_not_hang(recipe_dir, tmp_path, schnell, name):
    from conftest import run_cli

    out = tmp_path / "out"
    run_recipe(recipe_dir, out, take_recipe(schnell), "shard_size=60KB")
    (out / name).unlink()
    os.mkfifo(out / name)
    done = run_cli(["verify", str(out)], cwd=tmp_path, timeout=HANG)
    assert done.returncode != 0 and "Traceback" not in done.stderr + done.stdout
    assert f"{out / name}: " in done.stdout + done.stderr and "not a regular file" in done.stdout + done.stderr


# --- 7. a hub LoRA's file outside its repo; an output folder the OS refuses ----------------------------


@pytest.mark.parametrize("file", ["../../etc/passwd.safetensors", "a/../../x.safetensors", "/etc/x.safetensors", "..\\x.safetensors"])
def test_a_hub_lora_file_outside_its_repo_is_one_line_and_writes_nothing(recipe_dir, tmp_path, schnell, file):
    import yaml

    from conftest import run_cli, write_recipe

    work = tmp_path / "work"
    work.mkdir()
    write_recipe(recipe_dir, "t", yaml.safe_dump({**take_recipe(schnell), "loras": {"l": {"repo": "org/name", "file": file}}}))
    done = run_cli(["recipe=t", f"output={tmp_path / 'out'}", "dry_run=true"], cwd=work, timeout=HANG)
    assert "loras.l.file: file of LoRA 'l' must be a path inside the repo" in one_error_line(done)
    assert list(work.iterdir()) == []  # no outputs/DATE/TIME either


def test_an_output_folder_the_os_refuses_is_one_line_from_the_writer(tmp_path, monkeypatch, recipe_dir, schnell):
    """A read-only parent folder, as a user who is not root meets it (the tests run as root, whom a mode never
    stops): the OS refuses the lock file beside the output. The writer says so in one line, whichever layer
    called it (here the API, below the command line's own net for OS errors)."""
    import errno

    from fluxrecipe import api, writer

    real_open = os.open

    def refusing(path, flags, *args):
        if str(path).endswith(".fluxrecipe-lock"):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_open(path, flags, *args)

    plan = run_recipe(recipe_dir, tmp_path / "out", take_recipe(schnell), "dry_run=true")
    monkeypatch.setattr(writer.os, "open", refusing)
    with pytest.raises(FileError, match=rf"^{tmp_path / '.out.fluxrecipe-lock'}: Permission denied$"):
        api.write(plan, tmp_path / "out")
    assert_no_output(tmp_path / "out")


def test_an_output_under_sysfs_is_one_line_through_the_command_line(recipe_dir, tmp_path, schnell):
    """A place no one may create files in, for root too (sysfs): one line, no traceback."""
    done = cli(recipe_dir, tmp_path, take_recipe(schnell), "output=/sys/fluxrecipe-out")
    assert one_error_line(done).endswith("/sys/.fluxrecipe-out.fluxrecipe-lock: Permission denied")


# --- 8. a name of a megabyte makes a message of one short line; a LoRA of .diff / .diff_b is read --------

LONG = "x" * (1 << 20)  # a tensor name of 1 MB
SANE = 2000  # characters: longer than any message needs, far shorter than the name


def long_name_cases(tmp_path, state: dict) -> dict:
    """Files that hold a 1 MB name where each reader quotes it: path, what the run does with it, the error."""
    from flux_layouts import COMFY, diffusers_to_bfl

    from conftest import save_sharded, tiny_config

    cases = {}
    model = save_sharded({**state, f"transformer_blocks.0.{LONG}.weight": torch.zeros(2)}, tmp_path / "diffusers", [list(state) + [f"transformer_blocks.0.{LONG}.weight"]], tiny_config(False))
    cases["a-key-the-config-has-no-place-for"] = (model, "source", PlanError)
    bfl_file = tmp_path / "bfl.safetensors"
    save_file({**diffusers_to_bfl(state, COMFY), f"{COMFY}double_blocks.0.{LONG}.weight": torch.zeros(2)}, bfl_file)
    cases["a-key-bfl-does-not-know"] = (bfl_file, "source", SourceError)
    odd_dtype = tmp_path / "odd.safetensors"
    save_file({**state, LONG: torch.zeros(2, dtype=torch.int32)}, odd_dtype)
    cases["a-tensor-of-an-integer-dtype"] = (odd_dtype, "source", SourceError)
    lora = tmp_path / "lora.safetensors"
    save_file({**lora_module("lora_unet_double_blocks_0_img_attn_proj", HIDDEN, HIDDEN, 1), **lora_module(f"lora_unet_{LONG}", HIDDEN, HIDDEN, 2)}, lora)
    cases["a-lora-module-that-fits-nowhere"] = (lora, "lora", PlanError)
    twice = tmp_path / "twice.safetensors"
    save_file({**lora_module("lora_unet_double_blocks_0_img_attn_proj", HIDDEN, HIDDEN, 1), **lora_module(f"transformer.transformer_blocks.0.attn.to_out.0.{LONG}", HIDDEN, HIDDEN, 2, ("lora_A", "lora_B"))}, twice)
    cases["a-lora-of-a-long-unmatched-and-a-module"] = (twice, "lora", PlanError)
    return cases


@pytest.mark.parametrize("case", ["a-key-the-config-has-no-place-for", "a-key-bfl-does-not-know", "a-tensor-of-an-integer-dtype", "a-lora-module-that-fits-nowhere", "a-lora-of-a-long-unmatched-and-a-module"])
def test_a_name_of_a_megabyte_is_cut_in_the_message(recipe_dir, tmp_path, schnell, state_of, case):
    path, role, error = long_name_cases(tmp_path, state_of(schnell))[case]
    recipe = take_recipe(path) if role == "source" else {**take_recipe(schnell), "loras": {"l": str(path)}}
    with pytest.raises(error) as e:
        run_recipe(recipe_dir, tmp_path / "out", recipe, "dry_run=true")
    message = str(e.value)
    assert len(message) < SANE and "\n" not in message and "characters)" in message, message[:SANE]


def test_a_plan_note_of_a_megabyte_name_is_cut(recipe_dir, tmp_path, schnell):
    """ignore_unmatched lists the keys that change nothing in the plan's notes, the plan and the provenance."""
    lora = tmp_path / "lora.safetensors"
    save_file({**lora_module("lora_unet_double_blocks_0_img_attn_proj", HIDDEN, HIDDEN, 1), **lora_module(f"lora_unet_{LONG}", HIDDEN, HIDDEN, 2)}, lora)
    plan = run_recipe(recipe_dir, tmp_path / "out", {**take_recipe(schnell), "loras": {"l": {"path": str(lora), "ignore_unmatched": True}}}, "dry_run=true")
    from fluxrecipe.plan import format_plan

    assert all(len(line) < SANE for line in format_plan(plan).splitlines())


def test_a_comfyui_lora_of_full_differences_only_is_read(recipe_dir, tmp_path, schnell, state_of):
    """`.diff` (a weight's whole difference) and `.diff_b` (a bias's), as ComfyUI reads them: W + strength * diff,
    split like the weight they change (a fused qkv into q, k, v; the final layer's halves swapped)."""

    g = torch.Generator().manual_seed(5)
    state = state_of(schnell)

    def rand(*shape):
        return (torch.randn(*shape, generator=g) * 0.05).to(torch.bfloat16)

    proj, proj_b, qkv, final = rand(HIDDEN, HIDDEN), rand(HIDDEN), rand(3 * HIDDEN, HIDDEN), rand(*state["norm_out.linear.weight"].shape)
    tensors = {
        "diffusion_model.double_blocks.0.img_attn.proj.diff": proj,
        "diffusion_model.double_blocks.0.img_attn.proj.diff_b": proj_b,
        "diffusion_model.double_blocks.1.img_attn.qkv.diff": qkv,
        "diffusion_model.final_layer.adaLN_modulation.1.diff": final,
    }
    half = final.shape[0] // 2
    changes = {  # canonical key -> its difference, by hand: qkv's rows are q, k, v; BFL's final layer is (shift, scale)
        "transformer_blocks.0.attn.to_out.0.weight": proj,
        "transformer_blocks.0.attn.to_out.0.bias": proj_b,
        "transformer_blocks.1.attn.to_q.weight": qkv[:HIDDEN],
        "transformer_blocks.1.attn.to_k.weight": qkv[HIDDEN : 2 * HIDDEN],
        "transformer_blocks.1.attn.to_v.weight": qkv[2 * HIDDEN :],
        "norm_out.linear.weight": torch.cat([final[half:], final[:half]]),
    }
    result = bake(recipe_dir, tmp_path, schnell, tensors, strength=0.5)
    got = load_state(tmp_path / "out")
    assert result.files and sorted(got) == sorted(state)
    for key, value in state.items():
        want = (value.float() + 0.5 * changes[key].float()).to(torch.bfloat16) if key in changes else value
        assert torch.equal(got[key].view(torch.uint8), want.view(torch.uint8)), key


# --- 11. rules written in Black Forest Labs' names; block ranges in schedules -------------------------------


def bfl_sources(state: dict) -> dict[str, set[str]]:
    """BFL key -> the diffusers keys whose rows it holds, from flux_layouts' hand-written tables (not fluxrecipe's)."""
    from flux_layouts import blocks, linear_modules

    sources = {f"{bfl}.{p}": {f"{d}.{p}" for d in difs} for bfl, difs in linear_modules(state) for p in ("weight", "bias")}
    norms = {"img_attn.norm.query_norm": "attn.norm_q", "img_attn.norm.key_norm": "attn.norm_k", "txt_attn.norm.query_norm": "attn.norm_added_q", "txt_attn.norm.key_norm": "attn.norm_added_k"}
    for i in blocks(state, "transformer_blocks"):
        sources.update({f"double_blocks.{i}.{b}.scale": {f"transformer_blocks.{i}.{d}.weight"} for b, d in norms.items()})
    for i in blocks(state, "single_transformer_blocks"):
        sources.update({f"single_blocks.{i}.norm.{q}_norm.scale": {f"single_transformer_blocks.{i}.attn.norm_{q[0]}.weight"} for q in ("query", "key")})
    return sources


@pytest.mark.parametrize("match", [r"double_blocks\.[0-9]\.", r"^model\.diffusion_model\.single_blocks\.1\.", r"img_attn\.qkv", "final_layer", r"double_blocks\.1\.txt_mlp"])
def test_a_rule_in_bfl_names_is_told_the_diffusers_spelling(recipe_dir, tmp_path, schnell, state_of, match):
    import re

    state = state_of(schnell)
    recipe = {"sources": {"a": str(schnell)}, "rules": [{"match": match, "op": "take:a"}, {"match": ".*", "op": "take:a"}]}
    with pytest.raises(PlanError) as e:
        run_recipe(recipe_dir, tmp_path / "out", recipe, "dry_run=true")
    message = str(e.value)
    assert "rules match diffusers' names (the canonical keys), not Black Forest Labs' or ComfyUI's" in message and "\n" not in message
    expected = set().union(*(keys for bfl, keys in bfl_sources(state).items() if re.search(match, bfl) or re.search(match, "model.diffusion_model." + bfl)))
    assert "{match: " in message, message
    suggested = message[message.rindex("{match: '") + len("{match: '") : message.rindex("', op: 'take:a'}")]
    assert {k for k in state if re.search(suggested, k)} == expected, suggested


def test_a_rule_that_matches_nothing_in_any_spelling_still_asks_for_a_typo(recipe_dir, tmp_path, schnell):
    recipe = {"sources": {"a": str(schnell)}, "rules": [{"match": "transfomer_blocks", "op": "take:a"}, {"match": ".*", "op": "take:a"}]}
    with pytest.raises(PlanError, match="A typo?") as e:
        run_recipe(recipe_dir, tmp_path / "out", recipe, "dry_run=true")
    assert "Black Forest Labs" not in str(e.value)


def flux1_blocks():
    """FLUX.1's 19 double and 38 single blocks."""
    from fluxrecipe.families import by_name
    from fluxrecipe.schedule import Blocks

    return Blocks(by_name("FLUX.1"), (19, 38))


def values(schedule_value, blocks) -> dict[str, float]:
    from fluxrecipe import schedule

    parsed = schedule.parse(schedule_value)
    return {block: parsed.at(block, blocks) for block in blocks.order()}


def test_a_block_range_gives_its_blocks_a_value():
    flux = flux1_blocks()
    got = values({"double_blocks.0-9": 1.0, "default": 0.25}, flux)
    assert [got[f"double_blocks.{i}"] for i in range(19)] == [1.0] * 10 + [0.25] * 9
    assert got["img_in"] == got["single_blocks.0"] == got["final_layer"] == 0.25
    assert values({"double_blocks": {"0-9": 1.0, "default": 0.25}, "default": 0.25}, flux) == got  # as Hydra addresses it


def test_the_most_specific_of_overlapping_ranges_and_names_wins():
    got = values({"double_blocks": 0.2, "double_blocks.0-9": 0.5, "double_blocks.2-4": 0.7, "double_blocks.3": 0.9, "default": 0.0}, flux1_blocks())
    assert [got[f"double_blocks.{i}"] for i in range(12)] == [0.5, 0.5, 0.7, 0.9, 0.7, 0.5, 0.5, 0.5, 0.5, 0.5, 0.2, 0.2]
    assert got["single_blocks.3"] == 0.0


def test_a_gradient_over_a_range():
    got = values({"single_blocks.10-14": [0.0, 1.0], "default": 0.5}, flux1_blocks())
    assert [got[f"single_blocks.{i}"] for i in range(9, 16)] == [0.5, 0.0, 0.25, 0.5, 0.75, 1.0, 0.5]


@pytest.mark.parametrize("value, says", [
    ({"double_blocks.9-0": 1.0}, "'double_blocks.9-0': a range runs from the lower block to the higher (double_blocks.0-9)"),
    ({"double_blocks.0-9": 1.0, "double_blocks.5-14": 0.5, "default": 0.0}, "'double_blocks.0-9' and 'double_blocks.5-14' overlap and are as wide"),
    ({"double_blocks.0-9": 1.0, "double_blocks.00-09": 0.5}, "'double_blocks.0-9' is given twice"),
    ({"img_in.0-3": 1.0}, "'img_in.0-3' is not a FLUX block name"),
])
def test_a_malformed_range_is_refused(value, says):
    from fluxrecipe import schedule

    with pytest.raises(ValueError, match=re.escape(says)):
        schedule.parse(value)


def test_a_range_past_the_models_blocks_is_one_line(recipe_dir, tmp_path, schnell, krea):
    """The tiny models have double_blocks.0..1."""
    recipe = {"sources": {"a": str(schnell), "b": str(krea)}, "base": "a", "rules": [{"match": "guidance", "op": "drop", "optional": True}, {"match": ".*", "op": {"lerp": {"alpha": {"double_blocks.0-9": 1.0, "default": 0.0}}}}]}
    with pytest.raises(PlanError, match=r"rules\[1\].*alpha.*names double_blocks.0-9, but the model has double_blocks.0..1$"):
        run_recipe(recipe_dir, tmp_path / "out", recipe, "dry_run=true")


def test_a_range_in_a_merge(recipe_dir, tmp_path, schnell, krea, state_of):

    recipe = {"sources": {"a": str(schnell), "b": str(krea)}, "base": "a", "rules": [{"match": "guidance", "op": "drop", "optional": True}, {"match": ".*", "op": {"lerp": {"alpha": {"double_blocks.0-1": 1.0, "single_blocks.1-1": 1.0, "default": 0.0}}}}], "dtype": "fp32"}
    run_recipe(recipe_dir, tmp_path / "out", recipe)
    got, a, b = load_state(tmp_path / "out"), state_of(schnell), state_of(krea)
    for key in a:
        taken = key.startswith(("transformer_blocks.", "single_transformer_blocks.1."))
        want = (b if taken else a)[key].float()
        assert torch.equal(got[key], want), key


# --- 13. a LoRA extracted from a merge leaves out the matrices that do not differ -------------------------

CHANGED = ("transformer_blocks.0.attn.to_q.weight", "proj_out.weight")  # the only matrices the tuned model changes


@pytest.fixture(scope="module")
def partly_tuned(tmp_path_factory, krea, state_of):
    """krea (float32) and a copy that differs from it in two weight matrices only (rank 2 each)."""
    from conftest import config_of, save_sharded

    state = {k: v.float() for k, v in state_of(krea).items()}
    g = torch.Generator().manual_seed(13)
    tuned = {k: v + torch.randn(v.shape[0], 2, generator=g) @ torch.randn(2, v.shape[1], generator=g) * 0.02 if k in CHANGED else v for k, v in state.items()}
    root = tmp_path_factory.mktemp("partly")
    return save_sharded(state, root / "base", [list(state)], config_of(krea)), save_sharded(tuned, root / "tuned", [list(tuned)], config_of(krea))


@pytest.mark.parametrize("fmt, written", [
    pytest.param("lora_peft", {"transformer.transformer_blocks.0.attn.to_q", "transformer.proj_out"}, marks=pytest.mark.diffusers),
    ("lora", {"lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_final_layer_linear"}),
])
def test_an_extracted_lora_leaves_out_the_matrices_that_do_not_differ(recipe_dir, tmp_path, partly_tuned, state_of, krea, fmt, written):
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file

    from fluxrecipe.verify import verify_file

    base, tuned = partly_tuned
    out = tmp_path / "x.safetensors"
    recipe = {"sources": {"tuned": str(tuned), "base": str(base)}, "base": "base", "rules": [{"match": ".*", "op": "take:tuned"}], "dtype": "fp32"}
    plan = run_recipe(recipe_dir, out, recipe, f"format={fmt}", "lora_rank=4", "dry_run=true")
    assert any("exactly 0" in note and "left out" in note for note in plan.notes), plan.notes
    result = run_recipe(recipe_dir, out, recipe, f"format={fmt}", "lora_rank=4")
    got = load_file(out)
    assert {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in got} == written
    matrices = [f for f in plan.factors if f.rank]
    assert len(result.lora_left_out) == len(matrices) - 2 and set(result.lora_left_out).isdisjoint({m.removeprefix("transformer.").removeprefix("lora_unet_") for m in written})
    with safe_open(out, "pt") as f:
        provenance = json.loads(f.metadata()["fluxrecipe.provenance"])["lora"]
    assert provenance["left_out"]["count"] == len(matrices) - 2 and set(provenance["matrices"]) == {f.module for f in matrices} - set(result.lora_left_out)
    assert verify_file(out).problems == []
    tuned_state, base_state = load_state(tuned), load_state(base)
    q, proj = (tuned_state[k] - base_state[k] for k in CHANGED)
    for key, up in got.items():
        if key.endswith(("lora_B.weight", "lora_up.weight")):
            product = up @ got[key.replace("lora_B", "lora_A").replace("lora_up", "lora_down")]
            if "proj_out" in key or "final_layer" in key:
                want = proj
            else:  # kohya's module is BFL's fused q, k, v: only q's rows differ
                want = torch.cat([q, torch.zeros_like(q), torch.zeros_like(q)]) if fmt == "lora" else q
            assert torch.allclose(product, want, atol=1e-6), key
    if fmt == "lora_peft":  # diffusers loads it as the LoRA of those two matrices, its config naming no other
        assert_diffusers_fuses_it(base, out, tuned_state)


def assert_diffusers_fuses_it(base, lora, want: dict) -> None:
    """As FluxPipeline.load_lora_weights loads a LoRA: its state dict and its PEFT config (the file's
    lora_adapter_metadata), which must name exactly the modules the file holds (PEFT warns of any other)."""
    import warnings

    from diffusers import FluxTransformer2DModel
    from diffusers.loaders import FluxLoraLoaderMixin

    state, metadata = FluxLoraLoaderMixin.lora_state_dict(str(lora), return_lora_metadata=True)
    model = FluxTransformer2DModel.from_pretrained(base, torch_dtype=torch.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.load_lora_adapter(state, prefix="transformer", metadata=metadata, adapter_name="x")
    assert not [str(w.message) for w in caught if "inconsistency" in str(w.message)]
    model.fuse_lora(adapter_names=["x"])
    model.unload_lora()
    got = model.state_dict()
    assert all(torch.allclose(got[k], want[k], atol=1e-6) for k in want)


def test_an_extracted_lora_of_no_difference_at_all_is_refused(recipe_dir, tmp_path, partly_tuned):
    """A source that equals the base bit for bit: the plan cannot know it, the run finds every matrix left out."""
    base, _ = partly_tuned
    out = tmp_path / "x.safetensors"
    recipe = {"sources": {"same": str(base), "base": str(base)}, "base": "base", "rules": [{"match": ".*", "op": "take:same"}], "dtype": "fp32"}
    with pytest.raises(OutputError, match=r"every weight matrix of the recipe's result equals the base's \(\d+ matrices\): the LoRA would be empty"):
        run_recipe(recipe_dir, out, recipe, "format=lora_peft", "lora_rank=4")
    assert_no_output(out)



# --- tests that could not catch their bug (issue 21's mutation test) ----------------------------------------


@pytest.mark.diffusers
def test_rslora_scales_by_alpha_over_the_square_root_of_the_rank(recipe_dir, tmp_path, schnell, state_of):
    """A PEFT LoRA with use_rslora: W + strength * (alpha / sqrt(rank)) * up @ down (alpha 8, rank 4: x4, not
    the x2 of alpha / rank), against a float32 reference written here and against diffusers' own loader."""
    import json

    from diffusers import FluxTransformer2DModel
    from diffusers.loaders import FluxLoraLoaderMixin

    state = state_of(schnell)
    module, rank, alpha, strength = "transformer_blocks.1.ff.net.2", 4, 8.0, 0.5
    rows, columns = state[f"{module}.weight"].shape
    g = torch.Generator().manual_seed(21)
    down, up = (torch.randn(rank, columns, generator=g) * 0.1), (torch.randn(rows, rank, generator=g) * 0.1)
    config = {"r": rank, "lora_alpha": alpha, "use_rslora": True, "target_modules": [module]}
    path = tmp_path / "rs.safetensors"
    save_file({f"transformer.{module}.lora_A.weight": down, f"transformer.{module}.lora_B.weight": up}, path,
              metadata={"lora_adapter_metadata": json.dumps({f"transformer.{k}": v for k, v in config.items()})})
    recipe = {**take_recipe(schnell), "loras": {"rs": {"path": str(path), "strength": strength}}, "dtype": "fp32"}
    run_recipe(recipe_dir, tmp_path / "out", recipe)
    got = load_state(tmp_path / "out")[f"{module}.weight"]
    want = state[f"{module}.weight"].float() + (up @ down) * (strength * alpha / rank**0.5)
    assert torch.equal(got, want)

    model = FluxTransformer2DModel.from_pretrained(schnell, torch_dtype=torch.float32)
    converted, metadata = FluxLoraLoaderMixin.lora_state_dict(str(path), return_lora_metadata=True)
    model.load_lora_adapter(converted, metadata=metadata, adapter_name="rs")
    model.set_adapters(["rs"], weights=[strength])
    model.fuse_lora(adapter_names=["rs"])
    model.unload_lora()
    assert torch.allclose(model.state_dict()[f"{module}.weight"], got, atol=1e-6)


@pytest.mark.parametrize("fmt, output", [("diffusers", "out"), ("bfl", "out.safetensors")])
def test_the_partial_output_is_made_durable_before_it_is_renamed_into_place(recipe_dir, tmp_path, schnell, monkeypatch, fmt, output):
    """Every file is fsynced, then the partial folder (its entries), then the rename, then the parent folder
    (the rename itself): a crash at any moment leaves the old output or the whole new one, never a renamed
    folder whose files' entries were not yet on disk."""
    from fluxrecipe import writer

    events: list[tuple[str, str]] = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd):
        path = os.readlink(f"/proc/self/fd/{fd}")
        events.append(("fsync-dir" if os.path.isdir(path) else "fsync-file", path))
        return real_fsync(fd)

    def rename(src, dst, *args, **kwargs):
        events.append(("rename", f"{os.fspath(src)} -> {os.fspath(dst)}"))
        return real_rename(src, dst, *args, **kwargs)

    monkeypatch.setattr(writer.os, "fsync", fsync)
    monkeypatch.setattr(writer.os, "rename", rename)
    target = tmp_path / output
    run_recipe(recipe_dir, target, take_recipe(schnell), f"format={fmt}")
    partial = str(writer.partial_name(target))
    into_place = next(i for i, (kind, what) in enumerate(events) if kind == "rename" and what.endswith(f" -> {target}"))
    before, after = events[:into_place], events[into_place + 1:]
    written = {what for kind, what in before if kind == "fsync-file" and what.startswith(partial + "/")}
    assert written == {str(p).replace(str(target), partial, 1) if fmt == "diffusers" else f"{partial}/{output}" for p in (target.rglob("*") if fmt == "diffusers" else [target])}
    last_file = max(i for i, (kind, what) in enumerate(before) if kind == "fsync-file")
    assert ("fsync-dir", partial) in before[last_file:]  # the folder's entries, after its files
    assert after[:1] == [("fsync-dir", str(tmp_path))]  # the rename, at once


def test_an_extracted_loras_reported_error_is_its_own(recipe_dir, tmp_path, partly_tuned):
    """The relative error the run reports for each matrix, against one computed here in float64 from the
    factors in the file and the difference of the two models' files: rank 1 of a rank-2 difference errs by
    far more than float rounding, so an error that is not measured (0, or the difference's own) shows."""
    import math

    from safetensors.torch import load_file

    base, tuned = partly_tuned
    out = tmp_path / "x.safetensors"
    recipe = {"sources": {"tuned": str(tuned), "base": str(base)}, "base": "base", "rules": [{"match": ".*", "op": "take:tuned"}], "dtype": "fp32"}
    result = run_recipe(recipe_dir, out, recipe, "format=lora_peft", "lora_rank=1")
    written, tuned_state, base_state = load_file(out), load_state(tuned), load_state(base)
    for key in CHANGED:
        module = key.removesuffix(".weight")
        difference = (tuned_state[key] - base_state[key]).double()
        product = written[f"transformer.{module}.lora_B.weight"].double() @ written[f"transformer.{module}.lora_A.weight"].double()
        independent = float((difference - product).norm() / difference.norm())
        assert 0.05 < independent < 1 and math.isclose(result.lora_errors[module], independent, rel_tol=1e-4), (module, result.lora_errors[module], independent)


def labelled(rows: int, columns: int) -> torch.Tensor:
    """A matrix whose row i holds i everywhere: where a row lands says where it came from."""
    return torch.arange(rows, dtype=torch.float32)[:, None].expand(rows, columns).contiguous()


def test_the_final_layers_halves_swap_in_both_directions(recipe_dir, tmp_path, schnell, state_of):
    """Written out by hand, not through any table: diffusers' norm_out.linear is (scale, shift), BFL's
    final_layer.adaLN_modulation.1 is (shift, scale). Rows 0..H-1 of one are rows H..2H-1 of the other, both
    ways; a round trip through one table would pass with no swap at all."""
    from conftest import config_of, save_sharded

    state = {k: v.float() for k, v in state_of(schnell).items()}
    rows, columns = state["norm_out.linear.weight"].shape
    half = rows // 2
    state["norm_out.linear.weight"], state["norm_out.linear.bias"] = labelled(rows, columns), torch.arange(rows, dtype=torch.float32)
    model = save_sharded(state, tmp_path / "labelled", [list(state)], config_of(schnell))
    bfl_file = tmp_path / "bfl.safetensors"
    run_recipe(recipe_dir, bfl_file, {**take_recipe(model), "dtype": "fp32"}, "format=bfl")
    from safetensors.torch import load_file

    written = load_file(bfl_file)
    swapped = list(range(half, rows)) + list(range(half))
    assert written["final_layer.adaLN_modulation.1.weight"][:, 0].tolist() == swapped
    assert written["final_layer.adaLN_modulation.1.bias"].tolist() == swapped

    by_hand = dict(written)  # a BFL file whose final layer holds row labels, read into diffusers' layout
    by_hand["final_layer.adaLN_modulation.1.weight"] = labelled(rows, columns)
    save_file(by_hand, tmp_path / "by_hand.safetensors")
    run_recipe(recipe_dir, tmp_path / "back", {**take_recipe(tmp_path / "by_hand.safetensors"), "dtype": "fp32"})
    assert load_state(tmp_path / "back")["norm_out.linear.weight"][:, 0].tolist() == swapped


DIFFUSERS_CHECKS = {"from_pretrained", "from_single_file", "load_lora_adapter", "fuse_lora", "load_gguf_checkpoint", "dequantize_gguf_tensor"}


def compares_with_diffusers(name: str) -> bool:
    """A name of diffusers' loaders and converters (convert_*_to_diffusers: each family's converter)."""
    return name in DIFFUSERS_CHECKS or bool(re.fullmatch(r"convert_\w+_to_diffusers", name))


def diffusers_comparisons() -> dict[str, bool]:
    """Every test function (file::name) that calls one of diffusers' loaders or converters, itself or through a
    helper of its module, and whether it carries the `diffusers` marker (or its module does)."""
    import ast

    from conftest import REPO_ROOT

    found = {}
    for path in sorted((REPO_ROOT / "tests").glob("test_*.py")):
        tree = ast.parse(path.read_text())
        functions = {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef)}
        module_marked = "pytestmark = pytest.mark.diffusers" in path.read_text()

        def calls(node) -> set[str]:
            return {n.attr if isinstance(n, ast.Attribute) else n.id for n in ast.walk(node) if isinstance(n, (ast.Attribute, ast.Name))}

        for name, node in functions.items():
            if not name.startswith("test_"):
                continue
            used = calls(node)
            used |= set().union(*(calls(functions[helper]) for helper in used & set(functions)))
            if any(compares_with_diffusers(n) for n in used):
                marked = any("diffusers" in ast.unparse(d) and "mark" in ast.unparse(d) for d in node.decorator_list)
                found[f"{path.name}::{name}"] = marked or module_marked
    return found


def test_every_comparison_with_diffusers_carries_the_marker():
    comparisons = diffusers_comparisons()
    assert len(comparisons) >= 10 and [name for name, marked in comparisons.items() if not marked] == []


def test_the_diffusers_marker_is_registered_and_selects_them(tmp_path):
    """`pytest -m diffusers` runs every comparison found above (--strict-markers: the marker must be declared);
    it may run more (a test that compares through a helper of another module)."""
    import subprocess
    import sys

    from conftest import REPO_ROOT

    done = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "--strict-markers", "-m", "diffusers", "-p", "no:randomly", "-p", "no:cacheprovider"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=HANG,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    selected = {line.split("[")[0].removeprefix("tests/") for line in done.stdout.splitlines() if "::" in line}
    assert set(diffusers_comparisons()) <= selected
