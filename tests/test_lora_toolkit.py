"""The LoRA toolkit (issue 19) on tiny models: recipes of LoRAs alone (`loras:`, no `sources:`) merged into one
LoRA, resized, converted; each checked against references written here: baking the merged LoRA equals baking
its LoRAs (test_lora's float32 formula), a cut LoRA's error is the optimal truncated SVD's of the summed
difference (computed here from full matrices, which fluxrecipe never builds), the ranks lora_energy picks are
the ones the singular values say, a kohya -> PEFT -> kohya conversion gives the same bytes, and diffusers
loads the converted file to the same fused weights."""

from __future__ import annotations

import hashlib
import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import load_state, run_cli, run_recipe
from flux_layouts import linear_modules
from fluxrecipe.errors import PlanError, RecipeError, UsageError
from test_lora import bake, describe, extract, kohya, per_module, refused, tuned  # noqa: F401 - tuned: a fixture

F32 = torch.float32


def changes(state: dict, applied) -> dict[str, torch.Tensor]:
    """What the LoRAs add to each weight they change (float64, the documented formula): diffusers module -> difference."""
    out: dict[str, torch.Tensor] = {}
    for lora, ratio, strength in applied:
        for down, ups in lora.values():
            for module, up in ups.items():
                s = strength(module) if callable(strength) else strength
                out[module] = out.get(module, 0) + (up.double() @ down.double()) * (ratio(module) * s)
    return out


@pytest.fixture(scope="module")
def pair(tmp_path_factory, krea, state_of):
    """Two LoRAs in two formats and ranks: kohya of rank 4 (alpha 2) on every module, PEFT of rank 6 on the
    double blocks only (alpha 3, proj... none): so some modules only one of them touches."""
    state = state_of(krea)
    root = tmp_path_factory.mktemp("pair")
    a = describe(state, linear_modules(state), 21)
    save_file(kohya(a, alpha=2.0), root / "a.safetensors")
    doubles = [(b, ms) for b, ms in linear_modules(state) if b.startswith("double_blocks.")]
    b = describe(state, doubles, 22, rank=6)
    config = {"r": 6, "lora_alpha": 3}
    save_file(per_module(b, "lora_A", "lora_B", lambda m: f"transformer.{m}"), root / "b.safetensors",
              metadata={"lora_adapter_metadata": json.dumps({f"transformer.{k}": v for k, v in config.items()})})
    return root / "a.safetensors", a, (lambda m: 2.0 / 4), root / "b.safetensors", b, (lambda m: 3.0 / 6)


A_STRENGTH = {"default": 0.8, "single_blocks": 0.4}  # a per-block schedule


def a_strength(module: str) -> float:
    return 0.4 if module.startswith("single_transformer_blocks.") else 0.8


def loras_of(pair) -> dict:
    return {"a": {"path": str(pair[0]), "strength": A_STRENGTH}, "b": {"path": str(pair[3]), "strength": -0.5}}


@pytest.mark.parametrize("fmt", ["lora", "lora_peft", "lora_comfyui"])
def test_an_exact_merge_bakes_as_its_loras(recipe_dir, tmp_path, krea, state_of, pair, fmt):
    """Two LoRAs (kohya rank 4 with a per-block strength schedule, PEFT rank 6 at -0.5 on the double blocks
    only) merged into one without a model, in every LoRA format, fp32: baked into the model it gives what
    baking the two gives, and the float32 reference, to float32 precision; a module both touch has rank 10,
    one only the kohya LoRA touches rank 4."""
    merged = tmp_path / "merged.safetensors"
    plan = run_recipe(recipe_dir, merged, {"loras": loras_of(pair), "dtype": "fp32"}, f"format={fmt}", "dry_run=true")
    assert plan.lora_space.how == "merge" and not plan.sources and not plan.steps
    result = run_recipe(recipe_dir, merged, {"loras": loras_of(pair), "dtype": "fp32"}, f"format={fmt}")
    assert max(result.lora_errors.values()) < 1e-6
    from fluxrecipe.verify import verify_file

    assert verify_file(merged).problems == [] and verify_file(merged).layout == "lora"
    ranks = result.lora_ranks
    if fmt == "lora_peft":
        assert ranks["transformer_blocks.0.attn.to_q"] == 10 and ranks["single_transformer_blocks.0.proj_out"] == 4
    else:
        # PEFT's to_q, to_k and to_v hold the same down (test_lora's LoRAs share it): one term of rank 6 on qkv
        assert ranks["double_blocks.0.img_attn.qkv"] == 4 + 6 and ranks["single_blocks.0.linear2"] == 4
    baked, direct = tmp_path / "baked", tmp_path / "direct"
    bake(recipe_dir, baked, krea, {"m": str(merged)}, dtype="fp32")
    bake(recipe_dir, direct, krea, loras_of(pair), dtype="fp32")
    got, want = load_state(baked), load_state(direct)
    state = state_of(krea)
    ref = {k: state[k].float() + d.float() for k, d in ((f"{m}.weight", d) for m, d in changes(state, [(pair[1], pair[2], a_strength), (pair[4], pair[5], -0.5)]).items())}
    for key, w in want.items():
        scale = float(w.abs().max()) or 1.0
        assert torch.allclose(got[key], w, rtol=0, atol=2e-6 * scale), key
        if key in ref:
            assert torch.allclose(got[key], ref[key], rtol=0, atol=2e-6 * scale), key
    assert len(ref) > 0


def test_lora_rank_is_the_optimal_truncation_of_the_sum(recipe_dir, tmp_path, state_of, krea, pair):
    """lora_rank=3 (fp32, PEFT): per module the relative error of the written factors to the summed difference
    is the optimal truncated SVD's (Eckart-Young, from the full matrix here), to float32 precision; the
    reported error is that error."""
    out = tmp_path / "cut.safetensors"
    result = run_recipe(recipe_dir, out, {"loras": loras_of(pair), "dtype": "fp32"}, "format=lora_peft", "lora_rank=3")
    written = load_file(out)
    state = state_of(krea)
    for module, diff in changes(state, [(pair[1], pair[2], a_strength), (pair[4], pair[5], -0.5)]).items():
        s = torch.linalg.svdvals(diff)
        optimal = float(s[3:].square().sum().sqrt() / s.square().sum().sqrt())
        up, down = written[f"transformer.{module}.lora_B.weight"].double(), written[f"transformer.{module}.lora_A.weight"].double()
        assert down.shape[0] == min(3, *diff.shape)
        got = float((diff - up @ down).norm() / diff.norm())
        assert abs(got - optimal) < 1e-6, module
        assert abs(result.lora_errors[module] - got) < 1e-6, module


def spectrum_lora(state: dict, values: list[float], seed: int) -> dict:
    """A LoRA whose every module's product has exactly these singular values (orthonormal factors)."""
    g = torch.Generator().manual_seed(seed)
    lora = {}
    for bfl_module, members in linear_modules(state):
        if len(members) != 1 or min(state[f"{members[0]}.weight"].shape) < len(values):
            continue
        out, width = state[f"{members[0]}.weight"].shape
        u = torch.linalg.qr(torch.randn(out, len(values), generator=g, dtype=torch.float64)).Q
        v = torch.linalg.qr(torch.randn(width, len(values), generator=g, dtype=torch.float64)).Q
        lora[bfl_module] = ((v.T * torch.tensor(values, dtype=torch.float64)[:, None]).float(), {members[0]: u.float()})
    return lora


@pytest.mark.parametrize("settings, want", [(["lora_rank=2"], 2), (["lora_energy=0.9"], 2), (["lora_energy=0.99"], 4), (["lora_energy=0.99", "lora_rank=2"], 2), (["lora_energy=1"], 6)])
def test_resize_and_energy_pick_the_ranks_the_singular_values_say(recipe_dir, tmp_path, krea, state_of, settings, want):
    """One LoRA whose modules have singular values 8, 4, 2, 1, 0.5, 0.25 (squares: 64 of 85.3 is 75%, 80 is
    93.8%, 84 is 98.5%, 85 is 99.6%): lora_rank=2 cuts to 2; lora_energy=0.9 keeps 2, 0.99 keeps 4 (84 < 0.99
    x 85.3), capped by lora_rank; 1 keeps all 6; the run gives each module's rank and relative error (that of
    the singular values cut away), the provenance and the file's shapes too."""
    values = [8.0, 4.0, 2.0, 1.0, 0.5, 0.25]
    state = state_of(krea)
    lora = spectrum_lora(state, values, 31)
    path = tmp_path / "spectrum.safetensors"
    save_file(kohya(lora, alpha=None), path)
    out = tmp_path / "resized.safetensors"
    result = run_recipe(recipe_dir, out, {"loras": {"x": str(path)}, "dtype": "fp32"}, "format=lora", *settings)
    squares = [v * v for v in values]
    optimal = (sum(squares[want:]) / sum(squares)) ** 0.5
    assert set(result.lora_ranks.values()) == {want}
    assert all(abs(e - optimal) < 1e-6 for e in result.lora_errors.values())
    with safe_open(out, "pt") as f:
        record = json.loads(f.metadata()["fluxrecipe.provenance"])["lora"]
        assert {m["rank"] for m in record["modules"]} == {want}
        assert all(f.get_tensor(k).shape[0] == want for k in f.keys() if k.endswith("lora_down.weight"))


@pytest.mark.diffusers
def test_kohya_to_peft_to_kohya_is_exact_and_loads_in_diffusers(recipe_dir, tmp_path, krea, state_of, pair):
    """convert_lora: the kohya LoRA (bf16, alpha 2, fused q/k/v and linear1) written as PEFT (split modules,
    each its rows of up and the shared down, alpha in PEFT's config) and back as kohya: the same tensors, byte
    for byte, and alphas; the PEFT file loads in diffusers' load_lora_adapter (as load_lora_weights reads it)
    and fuses to the weights the original's formula gives (W + alpha / rank * up @ down), to float32 precision."""
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders import FluxLoraLoaderMixin

    kohya_file = pair[0]
    peft = tmp_path / "peft.safetensors"
    back = tmp_path / "back.safetensors"
    from conftest import merge

    first = merge(["recipe=convert_lora", f"recipe.loras.lora.path={kohya_file}", "format=lora_peft", f"output={peft}", "progress=false"])
    assert set(first.lora_errors.values()) == {0.0}
    merge(["recipe=convert_lora", f"recipe.loras.lora.path={peft}", "format=lora", f"output={back}", "progress=false"])
    original, again = load_file(kohya_file), load_file(back)
    assert sorted(original) == sorted(again)
    for key, tensor in original.items():
        if key.endswith(".alpha"):
            assert float(again[key]) == float(tensor), key
        else:
            assert again[key].dtype == tensor.dtype and torch.equal(again[key].view(torch.uint8), tensor.view(torch.uint8)), key

    model = FluxTransformer2DModel.from_pretrained(krea, torch_dtype=F32)
    converted, metadata = FluxLoraLoaderMixin.lora_state_dict(str(peft), return_lora_metadata=True)
    model.load_lora_adapter(converted, metadata=metadata, adapter_name="peft")
    model.fuse_lora(adapter_names=["peft"])
    model.unload_lora()
    fused, state = model.state_dict(), state_of(krea)
    want = changes(state, [(pair[1], pair[2], 1.0)])  # the kohya original's change (diffusers reads its linear1 at FLUX.1's width only)
    assert len(want) == len([k for k in fused if not torch.equal(fused[k], state[k].float())])
    for module, diff in want.items():
        key = f"{module}.weight"
        assert torch.allclose(fused[key].double(), state[key].double() + diff, rtol=0, atol=1e-6 * float(diff.abs().max())), key


def test_comfyui_keys(recipe_dir, tmp_path, pair):
    """format=lora_comfyui: ComfyUI's LoRA saver's keys (`diffusion_model.` + BFL's module), alphas kept."""
    out = tmp_path / "comfy.safetensors"
    run_recipe(recipe_dir, out, {"loras": {"x": str(pair[0])}}, "format=lora_comfyui")
    written, original = load_file(out), load_file(pair[0])
    assert torch.equal(written["diffusion_model.double_blocks.0.img_attn.qkv.lora_up.weight"], original["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"])
    assert float(written["diffusion_model.single_blocks.1.linear1.alpha"]) == 2.0


@pytest.mark.parametrize("setting", ["lora_rank=5", "lora_energy=0.95", "recipe.dtype=bf16"])
def test_resize_bytes_do_not_depend_on_threads(tmp_path, pair, monkeypatch, setting):
    """A merge cut to lora_rank=5 (or to the ranks lora_energy=0.95 picks, or exact in bf16) in subprocesses
    under OMP_NUM_THREADS=1 with threads=1 (one module at a time), the defaults, and OMP_NUM_THREADS=4 with
    threads=3 (three modules at once): the same file."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    recipe = tmp_path / "two.yaml"
    recipe.write_text(json.dumps({"loras": loras_of(pair), "format": "lora"}))
    digests = set()
    for i, (env, threads) in enumerate((({"OMP_NUM_THREADS": "1"}, ["threads=1"]), ({}, []), ({"OMP_NUM_THREADS": "4"}, ["threads=3"]))):
        out = tmp_path / f"cut{i}.safetensors"
        done = run_cli([f"recipe={recipe}", setting, *threads, f"output={out}", "progress=false"], cwd=tmp_path, env=env)
        assert done.returncode == 0, done.stderr
        digests.add(hashlib.sha256(out.read_bytes()).hexdigest())
    assert len(digests) == 1


@pytest.mark.parametrize("fmt", ["lora", "lora_peft", "lora_comfyui"])
def test_energy_picks_the_ranks_of_an_extraction(recipe_dir, tmp_path, tuned, fmt):  # noqa: F811 - the fixture
    """Extraction from models with lora_energy=0.9, lora_rank=8 (a difference of rank 3 on every weight, fused
    modules up to 12): each matrix's rank is the smallest whose singular values (computed here, float64, from the
    BFL or diffusers matrix) keep 90% of its squared norm, at most 8; the file's shapes, alphas (kohya) and
    PEFT config say those ranks; the relative error is the singular values' cut away."""
    from flux_layouts import diffusers_to_bfl

    base, model = tuned
    out = tmp_path / "energy.safetensors"
    result = extract(recipe_dir, out, tuned, f"format={fmt}", "lora_rank=8", "lora_energy=0.9")
    diff = {k: v.double() - load_state(base)[k].double() for k, v in load_state(model).items()}
    matrices = {k[: -len(".weight")]: v for k, v in (diff if fmt == "lora_peft" else diffusers_to_bfl(diff)).items() if k.endswith(".weight") and v.dim() == 2}
    written = load_file(out)
    with safe_open(out, "pt") as f:
        config = json.loads(f.metadata().get("lora_adapter_metadata", "{}"))
    seen = set()
    for module, rank in result.lora_ranks.items():
        s = torch.linalg.svdvals(matrices[module])
        energy = torch.cumsum(s.square(), 0) / s.square().sum()
        want = min(8, int((energy < 0.9).sum()) + 1)
        assert rank == want, module
        assert abs(result.lora_errors[module] - float(s[want:].square().sum().sqrt() / s.square().sum().sqrt())) < 1e-5, module
        if fmt != "lora_peft":
            key = "lora_unet_" + module.replace(".", "_") if fmt == "lora" else "diffusion_model." + module
            assert written[f"{key}.lora_down.weight"].shape[0] == rank == float(written[f"{key}.alpha"])
        else:
            assert written[f"transformer.{module}.lora_A.weight"].shape[0] == rank
            assert config["transformer.rank_pattern"].get(f"^{module}", config["transformer.r"]) == rank
        seen.add(rank)
    assert len(seen) > 1


def test_a_large_difference_is_factored_from_a_scratch_file(recipe_dir, tmp_path, tuned, monkeypatch):  # noqa: F811 - the fixture
    """Extraction with every difference over HELD (set to 0 here) written to a scratch file of the output's
    folder and factored from row blocks read back from it (the range finder on every matrix: EXACT_SVD 0;
    small blocks: BLOCK_ELEMENTS 256): the same tensors, byte for byte, as with the differences in memory; no
    block read back is the whole matrix; no file left behind."""
    from fluxrecipe import loras
    from fluxrecipe.execute import factoring
    from fluxrecipe.ops import lowrank

    monkeypatch.setattr(loras, "EXACT_SVD", 0)
    monkeypatch.setattr(lowrank, "BLOCK_ELEMENTS", 256)
    held, scratch = tmp_path / "held.safetensors", tmp_path / "scratch" / "scratch.safetensors"
    scratch.parent.mkdir()
    extract(recipe_dir, held, tuned, "format=lora", "lora_rank=4")
    monkeypatch.setattr(factoring, "HELD", 0)
    blocks, rows = [], factoring.Difference.rows  # (rows of a block read back, of its matrix, the most a block may have)
    monkeypatch.setattr(factoring.Difference, "rows", lambda self: (blocks.append((b.shape[0], self.shape[0], lowrank.block_rows(self.shape[1]))) or b for b in rows(self)))
    extract(recipe_dir, scratch, tuned, "format=lora", "lora_rank=4")
    a, b = load_file(held), load_file(scratch)
    assert sorted(a) == sorted(b) and all(torch.equal(a[k].reshape(-1).view(torch.uint8), b[k].reshape(-1).view(torch.uint8)) for k in a)
    assert sorted(p.name for p in scratch.parent.iterdir()) == ["scratch.safetensors"]
    assert any(height > most for _, height, most in blocks) and all(got <= most for got, _, most in blocks)


def test_a_difference_in_a_scratch_file_reads_back_as_put(tmp_path, monkeypatch):
    """Chunks put in order with a part skipped (a module the recipe leaves as the base's) read back as rows of
    block_rows each, zeros where nothing was put, on every pass; `largest` is max |element|, NaN once one is."""
    from fluxrecipe.execute import factoring
    from fluxrecipe.ops import lowrank

    monkeypatch.setattr(factoring, "HELD", 0)
    monkeypatch.setattr(lowrank, "BLOCK_ELEMENTS", 300)
    want = torch.randn(37, 70, generator=torch.Generator().manual_seed(3))
    want[10:20] = 0
    with factoring.Difference((37, 70), torch.device("cpu"), tmp_path) as diff:
        flat = want.reshape(-1)
        for a in (*range(0, 700, 250), *range(1400, 37 * 70, 250)):
            diff.put(a, flat[a : min(a + 250, 700 if a < 700 else 37 * 70)])
        assert diff.held is None and diff.largest == float(want.abs().max())
        for _ in range(2):
            got = list(diff.rows())
            assert [g.shape[0] for g in got] == [4] * 9 + [1] and torch.equal(torch.cat(got), want)
        diff.put(5, torch.tensor([float("nan")]))
        diff.put(6, torch.tensor([1e30]))
        assert math.isnan(diff.largest)
    assert list(tmp_path.iterdir()) == []


# --- refused: one line, nothing written ------------------------------------------------------------------------


def test_settings_that_change_nothing_are_refused(recipe_dir, tmp_path, krea, pair):
    out = tmp_path / "x.safetensors"
    refused(UsageError, "lora_energy=0.9 changes nothing: format=diffusers writes no LoRA", lambda: bake(recipe_dir, tmp_path / "m", krea, {"a": str(pair[0])}, "lora_energy=0.9"), tmp_path / "m")
    refused(UsageError, "lora_energy=1.5: must be a number above 0 and at most 1", lambda: run_recipe(recipe_dir, out, {"loras": {"a": str(pair[0])}}, "format=lora", "lora_energy=1.5"), out)
    refused(UsageError, "chunk_elements=4096 changes nothing: a recipe of LoRAs alone (no sources) is combined module by module on the CPU", lambda: run_recipe(recipe_dir, out, {"loras": {"a": str(pair[0])}}, "format=lora", "chunk_elements=4096"), out)
    refused(RecipeError, "rules changes nothing in a recipe without sources", lambda: run_recipe(recipe_dir, out, {"loras": {"a": str(pair[0])}, "rules": [{"match": ".*", "op": "take:a"}]}, "format=lora"), out)
    refused(PlanError, "a recipe with loras and no sources writes a LoRA: choose format=lora, lora_peft or lora_comfyui", lambda: run_recipe(recipe_dir, out, {"loras": {"a": str(pair[0])}}, "format=bfl"), out)


def test_the_python_api_refuses_what_the_command_line_refuses(tmp_path, krea, pair):
    """api.merge takes the engine's options as keywords: one that the run would ignore is refused there too,
    with the command line's message, and nothing is written."""
    from fluxrecipe import api

    out = tmp_path / "x.safetensors"
    loras_alone = {"loras": {"a": str(pair[0])}}
    refused(UsageError, "chunk_elements=4096 changes nothing: a recipe of LoRAs alone (no sources)", lambda: api.merge(loras_alone, out, format="lora", chunk_elements=4096), out)
    refused(UsageError, "diagnostics=true, nonfinite=warn changes nothing: a recipe of LoRAs alone", lambda: api.merge(loras_alone, out, format="lora", nonfinite="warn", diagnostics=True), out)
    refused(UsageError, "diagnostics=true changes nothing: format=comfyui writes one file", lambda: api.merge({"sources": {"k": str(krea)}, "rules": [{"match": ".*", "op": "take:k"}]}, out, format="comfyui", diagnostics=True), out)
    api.merge(loras_alone, out, format="lora", threads=2, diagnostics=False, device="cpu")  # threads: a recipe of LoRAs alone runs on
    assert out.is_file()  # them too; from Python, diagnostics off and an option's default value are accepted for any output


def test_only_a_small_matrix_is_factored_by_the_exact_svd():
    """The exact SVD holds its matrix (and about 5 times it in float64): a matrix whose smaller side is small
    but which is tall (FLUX.2 dev's fused projection cut to 1024 columns would be 226 MB) goes to the range
    finder over row blocks, which never holds it."""
    from fluxrecipe.loras import Factor

    def exact(shape: tuple[int, int]) -> bool:
        return Factor("m", (), (), (), shape, 16).exact

    assert exact((3072, 64)) and exact((6144, 1024)) and exact((8192, 1024))  # 32 MB in float32: the limit
    assert not exact((8193, 1024)) and not exact((55296, 1024)) and not exact((3072, 3072))
