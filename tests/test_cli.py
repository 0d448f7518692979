"""`python -m fluxrecipe` end to end, in subprocesses from fresh working folders: the demo a new user runs
first, and what a user sees when something is wrong (one line, exit 1, no traceback)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from conftest import REPO_ROOT, run_cli, write_recipe


def only_folder(root: Path, pattern: str) -> Path:
    found = list(root.glob(pattern))
    assert len(found) == 1, found
    return found[0]


@pytest.mark.diffusers
def test_demo_runs_from_a_fresh_folder_and_writes_a_loadable_model(tmp_path):
    """No network, no token, no sources: the demo generates its random checkpoints and merges them."""
    from diffusers import FluxTransformer2DModel

    done = run_cli(["recipe=demo"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    out = only_folder(tmp_path, "outputs/*/*/transformer")  # the default output: <Hydra run dir>/transformer
    assert f"wrote {out}: 140 tensors" in done.stderr + done.stdout

    model, info = FluxTransformer2DModel.from_pretrained(out, output_loading_info=True)
    assert info == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}
    assert model.config.guidance_embeds is True  # the demo's base is its Krea-like source
    assert yaml.safe_load((out / "recipe.yaml").read_text())["sources"] == {"schnell": {"demo": "schnell"}, "krea": {"demo": "krea"}}
    assert "**RANDOM WEIGHTS - NOT A MODEL.**" in (out / "README.md").read_text()  # the merge says so too

    sources = json.loads((out / "fluxrecipe.json").read_text())["sources"]
    layouts = []
    for variant in ("schnell", "krea"):
        assert sources[variant] == {"spec": f"demo:{variant}", "demo": variant}
        folder = only_folder(Path(os.environ["FLUXRECIPE_CACHE"]) / "demo", f"{variant}-*")  # the session's own cache
        assert (folder / "README.txt").read_text().startswith("RANDOM WEIGHTS - NOT A MODEL.")
        layouts.append(sorted(p.name for p in folder.glob("*.safetensors")))
    assert layouts[0] != layouts[1]  # the demo's sources do not share a shard layout either
    assert "DEMO on random-weight" in done.stdout


def error_line(done) -> str:
    """The run failed with exit 1 and said exactly one thing on stderr, without a traceback."""
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 1
    assert "Traceback" not in done.stderr + done.stdout
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("fluxrecipe: error: ")
    return lines[0]


def test_bad_recipe_is_one_line_naming_the_file_and_line(tmp_path, schnell, krea):
    path = write_recipe(tmp_path / "mine", "mine", f"sources: {{schnell: {schnell}, krea: {krea}}}\nrules:\n  - match: '.*'\n    op: mean\n")
    done = run_cli(["recipe=mine", "output=out"], cwd=tmp_path, env={"FLUXRECIPE_RECIPE_PATH": str(path.parent)})
    assert error_line(done) == f"fluxrecipe: error: recipe 'mine' ({path}:4) rules[0].op: unknown op 'mean' (ops: take:NAME, average, lerp:ALPHA, weighted:W1,W2,..., add_difference:ALPHA, drop, slerp:T, task_arithmetic:LAMBDA, ties:DENSITY, dare:P, dare_ties:P, model_stock, train_difference:ALPHA; python -m fluxrecipe methods describes them)"
    assert not (tmp_path / "out").exists()


def test_no_recipe_is_one_line_listing_the_recipes(tmp_path):
    done = run_cli([], cwd=tmp_path)
    builtins = ", ".join(sorted(p.stem for p in (REPO_ROOT / "recipes").glob("*.yaml")))
    assert error_line(done) == f"fluxrecipe: error: no recipe chosen: run `python -m fluxrecipe recipe=NAME` (recipes: {builtins})"


def test_traceback_is_shown_when_asked_for(tmp_path):
    done = run_cli(["traceback=true"], cwd=tmp_path)
    assert done.returncode != 0
    assert "Traceback" in done.stderr and "UsageError: no recipe chosen" in done.stderr
