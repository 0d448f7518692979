"""Candidates that are never written (issue 18, item 3): with previews on and keep_weights=false a job merges
into memory and renders from those tensors. They equal the written merge's tensors byte for byte (dtype too),
the job writes no .safetensors, the pipeline's text encoders and VAE are loaded once per process across a
sweep, and the images are those rendered from the written merge. The reference is safetensors' own reader of
the written merge, and diffusers' from_pretrained of it for the images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import load_state
from fluxrecipe import api, package
from fluxrecipe.errors import UsageError
from fluxrecipe.execute import InMemory, execute
from fluxrecipe.options import Options
from fluxrecipe.sweep import previews
from sweep_helpers import build_pipeline, run_main, run_single, write_recipes

PREVIEW = ["preview=true", "preview.prompts=[a photo of the cat,a red house]", "preview.seeds=[0,3]", "preview.height=32", "preview.width=32", "preview.steps=2"]
IMAGES = ["p0-s0.png", "p0-s3.png", "p1-s0.png", "p1-s3.png"]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> Path:
    return build_pipeline(tmp_path_factory.mktemp("pipeline") / "tiny-flux")


@pytest.fixture(scope="module")
def recipes(tmp_path_factory, schnell, krea) -> Path:
    folder = tmp_path_factory.mktemp("recipes")
    write_recipes(folder, schnell, krea, krea)
    return folder


def recipe_of(schnell: Path, krea: Path, dtype: str):
    """Two ops, one of them with a statistics pass (slerp), so the in-memory run has every kind of chunk."""
    rules = [{"match": "transformer_blocks", "op": "slerp:0.4"}, {"match": ".*", "op": "lerp:0.3"}]
    return api.load_recipe({"sources": {"schnell": str(schnell), "krea": str(krea)}, "base": "schnell", "rules": rules, "dtype": dtype}, name="pair")


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


@pytest.mark.parametrize("dtype", ["bf16", "fp32", "fp8"])
def test_in_memory_merge_is_the_written_merge_byte_for_byte(tmp_path, schnell, krea, dtype):
    """Every tensor, its dtype and its bytes equal the written shards' (read back by safetensors itself); the
    folder holds no weights and no index, and its manifest lists the very sha256 of every shard written."""
    recipe = recipe_of(schnell, krea, dtype)
    written = api.write(api.plan(recipe, tmp_path / "written", shard_size="60KB"), tmp_path / "written", Options(progress=False, threads=3))
    result, tensors = api.merge_in_memory(api.plan(recipe, tmp_path / "memory", shard_size="60KB"), tmp_path / "memory", Options(progress=False, chunk_elements=997))
    reference = load_state(tmp_path / "written")
    assert sorted(tensors) == sorted(reference) and len(reference) > 20
    for key, t in reference.items():
        assert tensors[key].dtype == t.dtype and tensors[key].shape == t.shape, key
        assert torch.equal(tensors[key].view(torch.uint8), t.view(torch.uint8)), key
    memory = tmp_path / "memory"
    assert not list(memory.rglob("*.safetensors")) and not list(memory.glob("*.index.json"))
    shards = {name: r for name, r in written.files.items() if name.endswith(".safetensors")}
    manifest = json.loads((memory / "fluxrecipe.manifest.json").read_text())["files"]
    assert len(shards) >= 2 and {n: (r.size, r.sha256) for n, r in shards.items()} == {n: (manifest[n]["size"], manifest[n]["sha256"]) for n in shards}
    assert result.bytes_written == sum(p.stat().st_size for p in memory.iterdir())
    assert (memory / "recipe.yaml").read_bytes() == (tmp_path / "written" / "recipe.yaml").read_bytes()


def test_the_sink_takes_bfl_fused_tensors_back_apart(tmp_path, schnell, krea):
    """A plan in BFL's layout (fused qkv, the final layer's halves swapped) lands in memory as the same
    canonical tensors; its file's record is the written file's (the data's sha256: the header is rewritten)."""
    recipe = recipe_of(schnell, krea, "bf16")
    _, canonical = api.merge_in_memory(api.plan(recipe, tmp_path / "d"), tmp_path / "d", Options(progress=False))
    target = tmp_path / "bfl.safetensors"
    plan = api.plan(recipe, target, "bfl")
    assert any(len(t.parts) > 1 for t in plan.files[0].tensors)  # fused tensors: parts of several canonical ones
    written = api.write(plan, target, Options(progress=False))
    recorded = package.as_recorded(plan, target)
    metadata, header_size = package.file_metadata(recorded), package.header_size(recorded)
    sinks: list[InMemory] = []
    result = execute(plan, None, Options(progress=False, chunk_elements=333), metadata, header_size, sink=lambda r: sinks.append(InMemory(plan, metadata, header_size, r)) or sinks[0])
    assert result.files == written.files
    assert sorted(sinks[0].tensors) == sorted(canonical)
    for key, t in canonical.items():
        assert torch.equal(sinks[0].tensors[key].view(torch.uint8), t.view(torch.uint8)), key


def test_what_memory_cannot_hold_is_refused(tmp_path, schnell, krea):
    recipe = recipe_of(schnell, krea, "fp8_scaled")
    with pytest.raises(UsageError, match="format=comfyui is one file: a merge in memory keeps the other files of a diffusers folder"):
        api.merge_in_memory(api.plan(recipe, tmp_path / "x.safetensors", "comfyui"), tmp_path / "x.safetensors")
    plan = api.plan(recipe, tmp_path / "x.safetensors", "comfyui")
    with pytest.raises(UsageError, match=r"format=comfyui: this output holds scaled fp8 \('.*'\), not the transformer's tensors"):
        InMemory(plan, {}, 0, None)
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.diffusers
def test_a_sweep_of_candidates_writes_no_weights_and_loads_the_pipeline_once(tmp_path, monkeypatch, recipes, pipeline):
    """Three jobs through the basic launcher (one process): the text encoders and the VAE are loaded once, no
    .safetensors appears anywhere in the sweep folder, and each job's images are those that the written merge
    of its recipe renders (a single run that keeps its weights, diffusers' from_pretrained of the folder)."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, T5EncoderModel

    loads: dict[str, int] = {}
    for cls in (CLIPTextModel, T5EncoderModel, AutoencoderKL):
        original = cls.from_pretrained

        def counted(*args, _original=original, _name=cls.__name__, **kwargs):
            loads[_name] = loads.get(_name, 0) + 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", counted)
    monkeypatch.setattr(previews, "_embeddings", {})  # what earlier tests of this process left
    monkeypatch.setattr(previews, "_pipelines", {})
    monkeypatch.setenv("FLUXRECIPE_RECIPE_PATH", str(recipes))
    sweep = tmp_path / "sweep"
    args = ["-m", "recipe=tiny", "recipe.alpha=0,0.5,1", "keep_weights=false", "progress=false", *PREVIEW, f"preview.pipeline={pipeline}", f"hydra.sweep.dir={sweep}"]
    assert run_main(args, monkeypatch) == 0
    assert loads == {"CLIPTextModel": 1, "T5EncoderModel": 1, "AutoencoderKL": 1}
    assert not list(sweep.rglob("*.safetensors"))
    jobs = sorted(p for p in sweep.iterdir() if (p / "previews").is_dir())
    assert [p.name for p in jobs] == ["alpha=0", "alpha=0.5", "alpha=1"]

    written = tmp_path / "written"
    run_single(["recipe=tiny", "recipe.alpha=0.5", f"output={written / 'model'}", "progress=false", *PREVIEW, f"preview.pipeline={pipeline}"], written)
    assert list((written / "model").glob("*.safetensors"))
    for name in IMAGES:
        assert np.array_equal(pixels(sweep / "alpha=0.5" / "previews" / name), pixels(written / "previews" / name)), name
    assert not np.array_equal(pixels(sweep / "alpha=0" / "previews" / IMAGES[0]), pixels(sweep / "alpha=1" / "previews" / IMAGES[0]))


@pytest.mark.diffusers
def test_a_float32_candidate_renders_as_its_written_merge_loads(tmp_path, monkeypatch, recipes, pipeline):
    """An fp32 merge: the written shards hold float32, which from_pretrained converts to the pipeline's bf16;
    the in-memory transformer is converted the same way, so a single run with keep_weights=false (in memory)
    draws the pixels of one that writes its weights."""
    monkeypatch.setenv("FLUXRECIPE_RECIPE_PATH", str(recipes))
    common = ["recipe=tiny", "recipe.alpha=0.3", "recipe.dtype=fp32", "progress=false", *PREVIEW, f"preview.pipeline={pipeline}"]
    run_single([*common, f"output={tmp_path / 'kept' / 'model'}"], tmp_path / "kept")
    run_single([*common, "keep_weights=false", f"output={tmp_path / 'memory' / 'model'}"], tmp_path / "memory")
    assert not list((tmp_path / "memory").rglob("*.safetensors"))
    assert load_state(tmp_path / "kept" / "model")["x_embedder.weight"].dtype == torch.float32
    for name in IMAGES:
        assert np.array_equal(pixels(tmp_path / "memory" / "previews" / name), pixels(tmp_path / "kept" / "previews" / name)), name


def test_the_preflight_counts_no_disk_for_candidates(tmp_path, monkeypatch, capsys, recipes, pipeline):
    """A dry run says which models are merged in memory, and the sweep's disk holds no weights of theirs."""
    monkeypatch.setenv("FLUXRECIPE_RECIPE_PATH", str(recipes))
    common = ["-m", "recipe=tiny", "recipe.alpha=0,0.5,1", "dry_run=true", *PREVIEW, f"preview.pipeline={pipeline}", f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    needs = {}
    for keep in ("true", "false"):
        assert run_main([*common, f"keep_weights={keep}"], monkeypatch) == 0
        out = capsys.readouterr().out
        needs[keep] = next(line for line in out.splitlines() if line.startswith("  disk: needs"))
        assert ("3 of the models are merged in memory for their previews, their weights never written" in out) == (keep == "false")
        assert ("writes 0 B" in out) == (keep == "false")
    assert needs["true"] != needs["false"]
    assert not (tmp_path / "sweep").exists()
