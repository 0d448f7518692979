"""Previews (issue 11): sample images per job through a real (tiny) FluxPipeline, the XY grid, index.html,
keep_weights=false, and the same pixels on a rerun.

One real `python -m fluxrecipe -m ... preview=true` sweep runs in a subprocess (two recipes x two ratios, one
recipe with a NaN in a source, so its jobs pass the pre-flight and fail while merging); everything else runs
in-process against it or on its own.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import compose, load_state, merge, run_cli, write_recipe
from fluxrecipe.cli.arguments import preview_switch
from fluxrecipe.cli.commands import summary as summary_command
from fluxrecipe.cli.exits import EXIT_ERROR
from fluxrecipe.cli.settings import previews_of
from fluxrecipe.sweep import grid, records, summarize
from fluxrecipe.sweep.page import INDEX_HTML
from fluxrecipe.sweep import previews as preview
from fluxrecipe.sweep.summary import SUMMARY_MD
from fluxrecipe.errors import UsageError
from fluxrecipe.families import chroma, flux1
from fluxrecipe.verify import verify_folder
from sweep_helpers import build_pipeline, run_main, run_single, with_nan, write_recipes

FLUX1, CHROMA = flux1.FAMILY, chroma.FAMILY
PROMPTS = ["a photo of the cat", "a red house on the hill"]
SEEDS = [0, 1]
SIZE = 32
PREVIEW = [
    "preview=true",
    f"preview.prompts=[{','.join(PROMPTS)}]",
    f"preview.seeds=[{','.join(map(str, SEEDS))}]",
    f"preview.height={SIZE}",
    f"preview.width={SIZE}",
    "preview.steps=2",
]
ROWS = [(p, s) for p in PROMPTS for s in SEEDS]
JOBS = ["alpha=0,recipe=tiny", "alpha=0.5,recipe=tiny", "alpha=0,recipe=tiny_nan", "alpha=0.5,recipe=tiny_nan"]
LABELS = ["alpha=0, recipe=tiny", "alpha=0.5, recipe=tiny", "alpha=0, recipe=tiny_nan (failed)", "alpha=0.5, recipe=tiny_nan (failed)"]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> Path:
    return build_pipeline(tmp_path_factory.mktemp("pipeline") / "tiny-flux")


@pytest.fixture(scope="module")
def env(tmp_path_factory, schnell, krea) -> dict[str, str]:
    nan_krea = with_nan(krea, tmp_path_factory.mktemp("nan") / "krea")
    return write_recipes(tmp_path_factory.mktemp("preview-recipes"), schnell, krea, nan_krea)


@pytest.fixture(scope="module")
def swept(tmp_path_factory, pipeline, env) -> tuple[Path, object]:
    """The sweep, run once for the module: `-m recipe=tiny,tiny_nan recipe.alpha=0,0.5 preview=true keep_weights=false`."""
    sweep_dir = tmp_path_factory.mktemp("preview-sweep") / "sweep"
    args = ["-m", "recipe=tiny,tiny_nan", "recipe.alpha=0,0.5", *PREVIEW, f"preview.pipeline={pipeline}", "keep_weights=false", "progress=false"]
    r = run_cli([*args, f"hydra.sweep.dir={sweep_dir}"], cwd=sweep_dir.parent, env=env)
    return sweep_dir, r


@pytest.fixture
def single_env(monkeypatch, env):
    monkeypatch.setenv("FLUXRECIPE_RECIPE_PATH", env["FLUXRECIPE_RECIPE_PATH"])
    yield
    compose([])


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_sweep_renders_previews_per_job_and_keeps_no_weights(swept):
    sweep_dir, r = swept
    assert r.returncode == 1, r.stderr  # the tiny_nan jobs failed
    assert "4 jobs, 2 ok, 2 failed" in r.stderr and "Traceback" not in r.stderr
    assert sorted(p.name for p in sweep_dir.iterdir() if p.is_dir()) == sorted(JOBS)  # constant preview.* settings stay out of the names
    for name in JOBS[:2]:
        folder = sweep_dir / name / "previews"
        record = json.loads((folder / "previews.json").read_text())
        assert record["settings"]["steps"] == 2 and record["settings"]["guidance"] is None  # no guidance embedder: none to set
        assert [(i["prompt"], i["seed"]) for i in record["images"]] == ROWS
        for image in record["images"]:
            array = pixels(folder / image["file"])
            assert array.shape == (SIZE, SIZE, 3) and array.std() > 0
        # keep_weights=false: no weights, but the recipe that rebuilds them and the manifest that proves it
        out = sweep_dir / name / "transformer"
        assert not list(out.glob("*.safetensors")) and not (out / "diffusion_pytorch_model.safetensors.index.json").exists()
        assert {"recipe.yaml", "config.json", "fluxrecipe.manifest.json", "diagnostics.json"} <= {p.name for p in out.iterdir()}
        deleted = verify_folder(out).problems  # one line that says what happened and how to rebuild, not "missing" x 3
        assert len(deleted) == 1 and "its weights were deleted or never written" in deleted[0] and f"recipe={out / 'recipe.yaml'} output=DIR" in deleted[0]
    # the merge matters: alpha 0 and 0.5 draw different images from the same seeds
    assert not np.array_equal(pixels(sweep_dir / JOBS[0] / "previews" / "p0-s0.png"), pixels(sweep_dir / JOBS[1] / "previews" / "p0-s0.png"))
    for name in JOBS[2:]:
        assert not (sweep_dir / name / "previews").exists() and not (sweep_dir / name / "transformer").exists()

    with open(sweep_dir / summarize.SUMMARY_CSV, newline="") as f:
        rows = {row["job"]: row for row in csv.DictReader(f)}
    assert [rows[j]["weights"] for j in JOBS] == ["deleted", "deleted", "", ""]
    assert [rows[j]["previews"] for j in JOBS] == ["4", "4", "", ""]
    assert "holds NaN or Inf" in rows[JOBS[2]]["error"]


def test_grid_has_a_column_per_job_and_a_row_per_prompt_and_seed(swept):
    sweep_dir, _ = swept
    layout = grid.read_layout(sweep_dir / grid.GRID_PNG)
    assert [c["label"] for c in layout["columns"]] == LABELS  # sweep order, labelled with the swept values
    assert [c["job"] for c in layout["columns"]] == JOBS
    assert [(r["prompt"], r["seed"]) for r in layout["rows"]] == ROWS
    canvas = pixels(sweep_dir / grid.GRID_PNG)
    for r, (prompt, seed) in enumerate(ROWS):
        for c, job in enumerate(JOBS):
            cell = layout["cells"][r][c]
            x, y, w, h = cell["box"]
            if c < 2:  # the image of that job, prompt and seed, pixel for pixel
                file = f"{job}/previews/p{PROMPTS.index(prompt)}-s{seed}.png"
                assert cell["file"] == file
                assert np.array_equal(canvas[y : y + h, x : x + w], pixels(sweep_dir / file))
            else:  # a failed job: a labelled empty cell
                assert cell["file"] is None and cell["note"].startswith("failed:") and "NaN" in cell["note"]
                assert tuple(canvas[y + h - 1, x + w - 1]) == grid.EMPTY and tuple(canvas[y, x]) == grid.EMPTY

    page = (sweep_dir / INDEX_HTML).read_text()  # one grid, of the images themselves (tests/test_page.py has the rest)
    assert f'src="{grid.GRID_PNG}"' not in page and "holds NaN or Inf" in page
    for label in LABELS:
        assert f'data-label="{label.removesuffix(" (failed)")}"' in page
    assert page.count('<img src="alpha') == 8 and "alpha%3D0.5%2Crecipe%3Dtiny/previews/p1-s1.png" in page
    assert page.count('<tr><td data-sort="alpha=') == 4  # the summary table: a row per job
    assert "![previews: a row per prompt and seed, a column per job](grid.png)" in (sweep_dir / SUMMARY_MD).read_text()


def test_the_sweep_names_local_paths_relative_to_itself(swept, pipeline):
    """No absolute local path in what the sweep writes: the pipeline in previews.json (relative to the
    previews folder), in index.html and in the overrides column (relative to the sweep folder), a job's output
    (relative to its folder)."""
    sweep_dir, _ = swept
    for name in JOBS[:2]:
        settings = json.loads((sweep_dir / name / "previews" / "previews.json").read_text())["settings"]
        assert settings["pipeline"] == os.path.relpath(pipeline, sweep_dir / name / "previews")
        assert json.loads((sweep_dir / name / records.JOB_STATUS_NAME).read_text())["output"] == "transformer"
    for file in (SUMMARY_MD, summarize.SUMMARY_CSV, INDEX_HTML):
        assert str(pipeline) not in (sweep_dir / file).read_text(), file
    assert f"preview.pipeline={os.path.relpath(pipeline, sweep_dir)}" in (sweep_dir / summarize.SUMMARY_CSV).read_text()
    assert f"pipeline {os.path.relpath(pipeline, sweep_dir)}" in (sweep_dir / INDEX_HTML).read_text()


def test_summary_rebuilds_the_grid_from_the_images(swept, tmp_path):
    sweep_dir, _ = swept
    copy = tmp_path / "moved"  # a copied sweep folder: its job records still name the old place
    shutil.copytree(sweep_dir, copy)
    before = (pixels(copy / grid.GRID_PNG), grid.read_layout(copy / grid.GRID_PNG))
    (copy / grid.GRID_PNG).unlink()
    (copy / INDEX_HTML).unlink()
    assert summary_command([str(copy)]) == EXIT_ERROR  # two jobs failed
    assert np.array_equal(pixels(copy / grid.GRID_PNG), before[0])
    assert grid.read_layout(copy / grid.GRID_PNG) == before[1]
    assert (copy / INDEX_HTML).is_file()


def test_recipe_of_a_job_without_weights_rebuilds_them_byte_for_byte(swept, tmp_path, monkeypatch, state_of, schnell, krea):
    sweep_dir, _ = swept
    job = sweep_dir / JOBS[1] / "transformer"  # alpha 0.5
    manifest = json.loads((job / "fluxrecipe.manifest.json").read_text())["files"]
    monkeypatch.setenv("FLUXRECIPE_RECIPE_PATH", str(job))
    rebuilt = tmp_path / "rebuilt"
    merge(["recipe=recipe", f"output={rebuilt}", "progress=false"])
    weights = [name for name in manifest if name.endswith(".safetensors") or name.endswith(".index.json")]
    assert len(weights) >= 2
    for name in weights:
        assert hashlib.sha256((rebuilt / name).read_bytes()).hexdigest() == manifest[name]["sha256"], name
    s, k = state_of(schnell), state_of(krea)
    for key, t in load_state(rebuilt).items():
        assert torch.equal(t, ((s[key].float() + k[key].float()) / 2).to(torch.bfloat16)), key


def test_single_run_previews_are_the_sweeps_pixels(swept, pipeline, single_env, tmp_path):
    """A rerun with the same seeds (here: a single run, in another process than the sweep) gives the same
    pixels; a single run keeps its weights by default and puts its previews into its run folder."""
    sweep_dir, _ = swept
    out, run_dir = tmp_path / "merged", tmp_path / "run"
    result = run_single(["recipe=tiny", "recipe.alpha=0.5", f"output={out}", "progress=false", *PREVIEW, f"preview.pipeline={pipeline}"], run_dir)
    assert result.output == out and list(out.glob("*.safetensors"))
    for i in range(len(PROMPTS)):
        for seed in SEEDS:
            name = f"p{i}-s{seed}.png"
            assert np.array_equal(pixels(run_dir / "previews" / name), pixels(sweep_dir / JOBS[1] / "previews" / name)), name


def test_guided_merge_previews_with_guidance_by_default(pipeline, single_env, tmp_path):
    """A guidance_embeds: true merge gets guidance (3.5) and more steps (20) by default, and guidance changes
    its images; a schnell-like one gets 4 steps and no guidance."""
    common = ["recipe.alpha=0.5", "progress=false", "preview=true", "preview.prompts=[a photo of the cat]", "preview.seeds=[0]",
              f"preview.height={SIZE}", f"preview.width={SIZE}", f"preview.pipeline={pipeline}"]
    runs = {}
    for name, extra in [("guided", []), ("guided_1", ["preview.guidance=1.0"]), ("plain", [])]:
        recipe = "recipe=tiny_guided" if name.startswith("guided") else "recipe=tiny"
        run_single([recipe, *common, *extra, f"output={tmp_path / name / 'model'}"], tmp_path / name)
        runs[name] = json.loads((tmp_path / name / "previews" / "previews.json").read_text())["settings"]
        runs[name]["pixels"] = pixels(tmp_path / name / "previews" / "p0-s0.png")
    assert (runs["guided"]["steps"], runs["guided"]["guidance"]) == (20, 3.5)
    assert runs["guided_1"]["guidance"] == 1.0 and not np.array_equal(runs["guided"]["pixels"], runs["guided_1"]["pixels"])
    assert (runs["plain"]["steps"], runs["plain"]["guidance"]) == (4, None)


def test_single_run_checks_previews_before_merging(pipeline, single_env, tmp_path):
    """A wrong preview setting or pipeline stops a single run before anything is merged."""
    out = tmp_path / "merged"
    for bad, message in [
        ("preview.height=30", "preview.height=30: a multiple of 16"),
        (f"preview.pipeline={tmp_path / 'nowhere'}", "no such folder"),
        ("preview.pipeline=nobody/no-such-flux", "not in the local cache"),
        ("preview.offload=model", "use it with device=cuda"),
    ]:
        with pytest.raises(UsageError, match=message):
            run_single(["recipe=tiny", f"output={out}", "preview=true", f"preview.pipeline={pipeline}", bad], tmp_path / "run")
        assert not out.exists() and not (tmp_path / "run" / "previews").exists()


def test_a_guidance_without_effect_is_refused_before_the_merge(pipeline, single_env, tmp_path, monkeypatch, capsys):
    """preview.guidance for a model without a guidance embedder changes nothing (issue 21, item 2): it was a
    warning and the run went on; it is refused by the pre-flight, before anything is merged or written."""
    monkeypatch.chdir(tmp_path)
    args = ["recipe=tiny", "output=out", "progress=false", *PREVIEW, f"preview.pipeline={pipeline}", "preview.seeds=[0]", "preview.prompts=[a cat]", "preview.guidance=7"]
    assert run_main(args, monkeypatch) == 1
    err = capsys.readouterr().err
    assert err == "fluxrecipe: error: preview.guidance=7 changes nothing: the merged model takes no guidance (FLUX.1, guidance_embeds: false, in_channels 4); leave preview.guidance out\n"
    assert not (tmp_path / "out").exists() and not (tmp_path / "outputs").exists()


def test_preview_settings_and_the_switch():
    assert [preview_switch(a) for a in ["-m", "preview=true", "+preview=false", "preview=true,false", "preview.steps=3", "~preview"]] == [
        "-m", "preview.enabled=true", "preview.enabled=false", "preview.enabled=true,false", "preview.steps=3", "~preview"
    ]
    request = previews_of(compose(["recipe=demo", "preview.enabled=true"]))
    schnell_like, guided = request.for_model(FLUX1, {"guidance_embeds": False}), request.for_model(FLUX1, {"guidance_embeds": True})
    assert (schnell_like.steps, schnell_like.guidance, guided.steps, guided.guidance) == (4, None, 20, 3.5)
    assert (schnell_like.height, schnell_like.width, schnell_like.seeds, schnell_like.pipeline) == (512, 512, (0, 1), "black-forest-labs/FLUX.1-schnell")
    assert (schnell_like.kind.pipeline, schnell_like.model_class) == ("FluxPipeline", "FluxTransformer2DModel")
    assert len(schnell_like.images()) == len(schnell_like.prompts) * 2
    for override, message in [
        ("preview.seeds=[0,0]", "lists '0' more than once"),
        ("preview.seeds=[-1]", "whole numbers from 0"),
        ("preview.prompts=[]", "non-empty prompts"),
        ("preview.steps=0", "from 1 to"),
        ("preview.guidance=-1", "a number from 0"),
        ("preview.width=1000", "multiple of 16"),
        ("preview.offload=cpu", "choose none, model"),
    ]:
        with pytest.raises(UsageError, match=message):
            previews_of(compose(["recipe=demo", "preview.enabled=true", override])).for_model(FLUX1, {"guidance_embeds": True})
    with pytest.raises(UsageError, match="preview=yes: choose true or false"):
        previews_of(compose(["recipe=demo", "preview.enabled=yes"]))
    compose([])


def test_a_pipeline_component_whose_library_backend_is_missing_is_named_before_the_merge(monkeypatch):
    """transformers stands a class whose backend is not installed in as a placeholder that fails only when used
    (FLUX.2 dev's PixtralProcessor without torchvision): the fit check names it, before any merge."""
    import transformers
    from transformers.utils.import_utils import DummyObject

    from fluxrecipe.families import flux2

    class Placeholder(metaclass=DummyObject):
        _backends = ["torchvision"]

    monkeypatch.setattr(transformers, "PixtralProcessor", Placeholder, raising=False)
    dev_kind = flux2.FAMILY.preview({"guidance_embeds": True})
    index = {"scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"], "vae": ["diffusers", "AutoencoderKLFlux2"],
             "text_encoder": ["transformers", "Mistral3ForConditionalGeneration"], "tokenizer": ["transformers", "PixtralProcessor"]}
    configs = {"model_index": index, "text_encoder": {"text_config": {"hidden_size": 5120}}, "vae": {"latent_channels": 32}}
    dev = {"joint_attention_dim": 15360, "in_channels": 128}
    assert preview._fit("p", dev_kind, configs, dev) == [
        "preview.pipeline=p: its tokenizer is transformers' PixtralProcessor, which needs torchvision (not installed): install it (the build that matches your torch)"
    ]
    monkeypatch.setattr(transformers, "PixtralProcessor", type("Loadable", (), {}))
    assert preview._fit("p", dev_kind, configs, dev) == []


def test_pipeline_that_does_not_fit_the_model_is_named():
    kind = FLUX1.preview({"guidance_embeds": False})
    components = ["scheduler", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"]  # FluxPipeline's, written here
    assert sorted(preview.needed_components("FluxPipeline")) == sorted(components)
    configs = {
        "model_index": {n: ["transformers", "X"] for n in components},
        "text_encoder": {"hidden_size": 768},
        "text_encoder_2": {"d_model": 4096},
        "vae": {"latent_channels": 16},
    }
    flux = {"joint_attention_dim": 4096, "pooled_projection_dim": 768, "in_channels": 64}
    assert preview._fit("p", kind, configs, flux) == []
    problems = preview._fit("p", kind, configs, {**flux, "joint_attention_dim": 32, "in_channels": 4})
    assert len(problems) == 2 and "joint_attention_dim=32" in problems[0] and "in_channels=4" in problems[1]
    del configs["model_index"]["vae"]
    assert preview._fit("p", kind, configs, flux) == ["preview.pipeline=p has no vae: give a FluxPipeline (e.g. black-forest-labs/FLUX.1-schnell)"]
    # another family's pipeline: Chroma's has one text encoder (T5) and takes no CLIP
    chroma_kind = CHROMA.preview({})
    assert sorted(preview.needed_components("ChromaPipeline")) == ["scheduler", "text_encoder", "tokenizer", "vae"]
    chroma = {"joint_attention_dim": 4096, "in_channels": 64}
    t5_only = {"model_index": {n: ["x", "X"] for n in ("scheduler", "vae", "text_encoder", "tokenizer")}, "text_encoder": {"d_model": 4096}, "vae": {"latent_channels": 16}}
    assert preview._fit("p", chroma_kind, t5_only, chroma) == []
    assert "joint_attention_dim=2048" in preview._fit("p", chroma_kind, t5_only, {**chroma, "joint_attention_dim": 2048})[0]
    # FLUX.2 klein's pipeline takes a setting besides its components (is_distilled: a value in model_index.json)
    from fluxrecipe.families import flux2

    klein_kind = flux2.FAMILY.preview({"guidance_embeds": False})
    assert sorted(preview.needed_components("Flux2KleinPipeline")) == ["scheduler", "text_encoder", "tokenizer", "vae"]
    qwen3 = {**t5_only, "model_index": {**t5_only["model_index"], "is_distilled": True}, "text_encoder": {"hidden_size": 2560}, "vae": {"latent_channels": 32}}
    assert preview._fit("p", klein_kind, qwen3, {"joint_attention_dim": 7680, "in_channels": 128}) == []


def test_read_previews_refuses_paths_outside_the_folder(tmp_path):
    (tmp_path / "previews.json").write_text(json.dumps({"settings": {}, "images": [{"prompt": "p", "seed": 0, "file": "../../etc/x.png"}]}))
    assert preview.read_previews(tmp_path)[1][0]["file"] == tmp_path / "x.png"
    (tmp_path / "previews.json").write_text(json.dumps({"images": [{"prompt": "p", "seed": "zero", "file": "x.png"}]}))
    with pytest.raises(ValueError, match="not \\{prompt, seed, file\\}"):
        preview.read_previews(tmp_path)


@pytest.mark.diffusers
def test_a_chroma_merge_previews_through_chromas_pipeline(tmp_path, monkeypatch):
    """Previews per family: a Chroma merge is rendered by ChromaPipeline with Chroma's defaults (classifier-free
    guidance 5.0, a negative prompt ""), its prompts encoded before the transformer is loaded, and the pixels
    are those of diffusers' own ChromaPipeline run end to end (prompt in, text encoder loaded) on the merge."""
    from chroma_helpers import TINY_CHROMA, make_chroma
    from sweep_helpers import build_chroma_pipeline

    a, b = make_chroma(tmp_path / "a", seed=80), make_chroma(tmp_path / "b", seed=81)
    pipeline = build_chroma_pipeline(tmp_path / "tiny-chroma", TINY_CHROMA)
    recorded = lerp_with_a_preview(tmp_path, monkeypatch, a, b, pipeline)
    assert (recorded["guidance"], recorded["steps"], recorded["kind"]["pipeline"], recorded["model_class"]) == (5.0, 2, "ChromaPipeline", "ChromaTransformer2DModel")
    assert_diffusers_draws_the_preview(tmp_path, pipeline, "ChromaPipeline", "ChromaTransformer2DModel", guidance_scale=5.0)


@pytest.mark.diffusers
def test_a_flux2_klein_merge_previews_through_the_klein_pipeline(tmp_path, monkeypatch):
    """FLUX.2 end to end: a merge of two klein-shaped models (no guidance embedder) is rendered by
    Flux2KleinPipeline with klein's defaults (no guidance; its prompts encoded by Qwen3 before the transformer is
    loaded), with a tiny pipeline given as preview.pipeline (a tiny width is no klein variant's: the pipeline
    given replaces the family's repo, and its own configs are what must fit), and the pixels are those of
    diffusers' own Flux2KleinPipeline run end to end on the merge, at the guidance its model card gives distilled
    klein (1.0: no classifier-free guidance, as the previews' none)."""
    from flux2_helpers import TINY2, make_flux2
    from sweep_helpers import build_flux2_klein_pipeline

    klein = {**TINY2, "joint_attention_dim": 24}  # 3 x the tiny Qwen3's width
    a, b = (make_flux2(tmp_path / name, guidance=False, seed=seed, joint_attention_dim=24) for name, seed in (("a", 90), ("b", 91)))
    pipeline = build_flux2_klein_pipeline(tmp_path / "tiny-klein", klein)
    recorded = lerp_with_a_preview(tmp_path, monkeypatch, a, b, pipeline)
    assert (recorded["guidance"], recorded["steps"], recorded["kind"]["pipeline"], recorded["model_class"]) == (None, 2, "Flux2KleinPipeline", "Flux2Transformer2DModel")
    assert (recorded["kind"]["steps"], recorded["kind"]["guidance"], recorded["kind"]["text_inputs"]) == (4, None, ["prompt_embeds", None])
    assert recorded["pipeline"] == os.path.relpath(pipeline, tmp_path / "run" / "previews")
    assert_diffusers_draws_the_preview(tmp_path, pipeline, "Flux2KleinPipeline", "Flux2Transformer2DModel", guidance_scale=1.0)


@pytest.mark.diffusers
def test_a_flux2_dev_merge_previews_through_flux2_pipeline(tmp_path, monkeypatch):
    """FLUX.2 dev end to end: a merge of two dev-shaped models (with the guidance embedder) is rendered by
    Flux2Pipeline with dev's defaults (embedded guidance 4.0; its prompts encoded by Mistral's layers 10, 20 and 30
    before the transformer is loaded), with a tiny pipeline given as preview.pipeline, and the pixels are those of
    diffusers' own Flux2Pipeline run end to end on the merge at guidance 4.0."""
    from flux2_helpers import TINY2, make_flux2
    from sweep_helpers import build_flux2_dev_pipeline

    dev = {**TINY2, "joint_attention_dim": 24}  # 3 x the tiny Mistral's width
    a, b = (make_flux2(tmp_path / name, guidance=True, seed=seed, joint_attention_dim=24) for name, seed in (("a", 92), ("b", 93)))
    pipeline = build_flux2_dev_pipeline(tmp_path / "tiny-dev", dev)
    recorded = lerp_with_a_preview(tmp_path, monkeypatch, a, b, pipeline)
    assert (recorded["guidance"], recorded["steps"], recorded["kind"]["pipeline"], recorded["model_class"]) == (4.0, 2, "Flux2Pipeline", "Flux2Transformer2DModel")
    assert (recorded["kind"]["steps"], recorded["kind"]["guidance"], recorded["kind"]["text_inputs"]) == (50, 4.0, ["prompt_embeds", None])
    assert_diffusers_draws_the_preview(tmp_path, pipeline, "Flux2Pipeline", "Flux2Transformer2DModel", guidance_scale=4.0)


@pytest.mark.diffusers
def test_a_merge_of_klein_base_models_previews_with_cfg_through_a_base_pipeline(tmp_path, monkeypatch):
    """FLUX.2 klein base end to end: with a pipeline whose model_index.json says is_distilled false, the merge
    is rendered with the base models' defaults (guidance 4.0: classifier-free guidance against "", whose
    embeddings are encoded up front with the prompts', as the pipeline loads no text encoder), and the pixels
    are those of diffusers' own Flux2KleinPipeline run end to end on the merge at that guidance."""
    from flux2_helpers import TINY2, make_flux2
    from sweep_helpers import build_flux2_klein_pipeline

    klein = {**TINY2, "joint_attention_dim": 24}
    a, b = (make_flux2(tmp_path / name, guidance=False, seed=seed, joint_attention_dim=24) for name, seed in (("a", 92), ("b", 93)))
    pipeline = build_flux2_klein_pipeline(tmp_path / "tiny-klein-base", klein, is_distilled=False)
    recorded = lerp_with_a_preview(tmp_path, monkeypatch, a, b, pipeline)
    assert (recorded["guidance"], recorded["steps"], recorded["kind"]["steps"], recorded["kind"]["repo"]) == (4.0, 2, 50, "black-forest-labs/FLUX.2-klein-base-4B")
    assert recorded["kind"]["negative_inputs"] == ["negative_prompt_embeds", None]
    assert_diffusers_draws_the_preview(tmp_path, pipeline, "Flux2KleinPipeline", "Flux2Transformer2DModel", guidance_scale=4.0)


KLEIN_4B = {"guidance_embeds": False, "num_attention_heads": 24, "attention_head_dim": 128, "num_layers": 5, "num_single_layers": 20}


def klein_index(folder: Path, **settings) -> Path:
    """A pipeline folder of which only model_index.json is read (to tell a klein base pipeline from a distilled one)."""
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "Flux2KleinPipeline", **settings}))
    return folder


def test_a_klein_base_pipeline_takes_a_guidance_and_a_distilled_one_refuses_it(tmp_path):
    """The pipeline's model_index.json decides klein's defaults: is_distilled false, the base models' (50 steps,
    guidance 4.0, or the one given); is_distilled true, the distilled models' (a guidance given is refused in
    one line that says which pipeline would take it)."""
    from fluxrecipe.families import flux2

    base = klein_index(tmp_path / "base", is_distilled=False)
    distilled = klein_index(tmp_path / "distilled", is_distilled=True)
    settings = previews_of(compose(["recipe=demo", "preview.enabled=true", f"preview.pipeline={base}"])).for_model(flux2.FAMILY, KLEIN_4B)
    assert (settings.pipeline, settings.steps, settings.guidance, settings.kind.negative_inputs) == (str(base), 50, 4.0, ("negative_prompt_embeds", None))
    guided = previews_of(compose(["recipe=demo", "preview.enabled=true", f"preview.pipeline={base}", "preview.guidance=2.5"])).for_model(flux2.FAMILY, KLEIN_4B)
    assert (guided.steps, guided.guidance) == (50, 2.5)
    request = previews_of(compose(["recipe=demo", "preview.enabled=true", f"preview.pipeline={distilled}", "preview.guidance=2.5"]))
    compose([])
    with pytest.raises(UsageError) as refused:
        request.for_model(flux2.FAMILY, KLEIN_4B)
    assert str(refused.value) == (
        f"preview.guidance=2.5 changes nothing: the merged model takes no guidance (FLUX.2, guidance_embeds: false, width 3072, 5+20 blocks) with the pipeline {distilled}; "
        "a pipeline whose model_index.json has is_distilled: false (e.g. black-forest-labs/FLUX.2-klein-base-4B) takes one, as preview.pipeline; leave preview.guidance out"
    )


@pytest.mark.diffusers
def test_a_klein_pipeline_without_is_distilled_is_a_base_models_as_diffusers_builds_it(tmp_path):
    """A model_index.json without is_distilled: Flux2KleinPipeline's default (false), as diffusers loads it."""
    import inspect

    from diffusers import Flux2KleinPipeline

    from fluxrecipe.families import flux2

    assert inspect.signature(Flux2KleinPipeline.__init__).parameters["is_distilled"].default is False
    assert preview.pipeline_kind(flux2.FAMILY.preview(KLEIN_4B), str(klein_index(tmp_path / "p"))).guidance == 4.0


def lerp_with_a_preview(tmp_path: Path, monkeypatch, a: Path, b: Path, pipeline: Path) -> dict:
    """`recipe=lerp` (a and b, half each) written to tmp_path/run/model with one preview (PROMPTS[0], seed 0, 2
    steps) through `pipeline`; returns the settings its previews.json records."""
    recipes = tmp_path / "recipes"
    write_recipe(recipes, "lerp", f"sources: {{a: {a}, b: {b}}}\nbase: a\nrules:\n  - match: '.*'\n    op: lerp:0.5\ndtype: bf16\n")
    monkeypatch.setenv("FLUXRECIPE_RECIPE_PATH", str(recipes))
    run_single(["recipe=lerp", f"output={tmp_path / 'run' / 'model'}", "progress=false", "preview=true", f"preview.prompts=[{PROMPTS[0]}]",
                "preview.seeds=[0]", f"preview.height={SIZE}", f"preview.width={SIZE}", "preview.steps=2", f"preview.pipeline={pipeline}"], tmp_path / "run")
    compose([])
    return json.loads((tmp_path / "run" / "previews" / "previews.json").read_text())["settings"]


def assert_diffusers_draws_the_preview(tmp_path: Path, pipeline: Path, pipeline_class: str, model_class: str, guidance_scale: float) -> None:
    """The preview lerp_with_a_preview rendered has the pixels of diffusers' own `pipeline_class` run end to end
    (prompt in, text encoder loaded) on the merged transformer it wrote, and is not one colour."""
    import diffusers

    transformer = getattr(diffusers, model_class).from_pretrained(tmp_path / "run" / "model", torch_dtype=torch.bfloat16)
    pipe = getattr(diffusers, pipeline_class).from_pretrained(pipeline, transformer=transformer, torch_dtype=torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    with torch.inference_mode():
        image = pipe(prompt=PROMPTS[0], num_inference_steps=2, guidance_scale=guidance_scale, height=SIZE, width=SIZE,
                     generator=torch.Generator("cpu").manual_seed(0), max_sequence_length=512).images[0]
    preview_pixels = pixels(tmp_path / "run" / "previews" / "p0-s0.png")
    assert np.array_equal(preview_pixels, np.asarray(image.convert("RGB")))
    assert preview_pixels.std() > 0


def test_previews_take_the_familys_pipeline_and_refuse_a_guidance_it_does_not_take():
    """With preview.pipeline, steps and guidance left null, each family's own: FLUX.2 klein's pipeline of its
    width and no guidance (a guidance given is refused), Chroma's 35 steps and guidance 5."""
    from fluxrecipe.families import flux2

    request = previews_of(compose(["recipe=demo", "preview.enabled=true"]))
    compose([])
    klein = request.for_model(flux2.FAMILY, {"guidance_embeds": False, "num_attention_heads": 24, "attention_head_dim": 128, "num_layers": 5, "num_single_layers": 20})
    assert (klein.pipeline, klein.kind.pipeline, klein.steps, klein.guidance, klein.model_class) == (
        "black-forest-labs/FLUX.2-klein-4B", "Flux2KleinPipeline", 4, None, "Flux2Transformer2DModel")
    chroma_settings = request.for_model(CHROMA, {})
    assert (chroma_settings.pipeline, chroma_settings.steps, chroma_settings.guidance) == ("lodestones/Chroma1-HD", 35, 5.0)
    guided = previews_of(compose(["recipe=demo", "preview.enabled=true", "preview.guidance=2"]))
    compose([])
    with pytest.raises(UsageError, match=r"preview.guidance=2 changes nothing: the merged model takes no guidance \(FLUX.2, guidance_embeds: false, width 3072, 5\+20 blocks\)"):
        guided.for_model(flux2.FAMILY, {"guidance_embeds": False, "num_attention_heads": 24, "attention_head_dim": 128, "num_layers": 5, "num_single_layers": 20})

