"""The sweep's pre-flight (issue 11): every job composed and planned in the launching process, every problem
reported in one message, nothing launched and no folder made when there is one; dry runs print the plans and
the totals; the disk of the whole sweep against the free space. Runs `python -m fluxrecipe -m ...` in-process.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import compose
from fluxrecipe.cli.multirun import launcher_of
from fluxrecipe.sweep import preflight
from sweep_helpers import run_main, with_nan, write_recipes


@pytest.fixture(scope="module")
def env(tmp_path_factory, schnell, krea) -> dict[str, str]:
    nan_krea = with_nan(krea, tmp_path_factory.mktemp("nan") / "krea")
    return write_recipes(tmp_path_factory.mktemp("preflight-recipes"), schnell, krea, nan_krea)


@pytest.fixture
def sweep(monkeypatch, env, tmp_path, capsys):
    """Run `-m ARGS` into tmp_path/sweep; returns (exit status, stdout, stderr)."""
    monkeypatch.setenv("FLUXRECIPE_RECIPE_PATH", env["FLUXRECIPE_RECIPE_PATH"])
    monkeypatch.chdir(tmp_path)

    def run(*args: str) -> tuple[int, str, str]:
        code = run_main(["-m", *args, f"hydra.sweep.dir={tmp_path / 'sweep'}", "progress=false"], monkeypatch)
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


def refused(result: tuple[int, str, str], tmp_path: Path) -> str:
    """The sweep stopped before anything: status 1, one message, no folder."""
    code, _, err = result
    assert code == preflight.EXIT_PROBLEMS, err
    assert err.count("fluxrecipe: error:") == 1 and "nothing was started" in err and "Traceback" not in err
    assert not (tmp_path / "sweep").exists()
    return err


@pytest.mark.parametrize(
    "args, expected",
    [
        (["recipe=tiny", "recipe.alpha=0.5,oops"], ["1 problem (2 jobs)", "job 1 (alpha=oops): recipe 'tiny'", "not a number: got 'oops'"]),
        (["recipe=tiny,tiny_broken", "recipe.alpha=0.5"], ["job 1 (recipe=tiny_broken): source 'krea'", "no-such-krea"]),
        (["recipe=tiny", "recipe.alpha=0,1", "output=one"], ["every job (2): output=one: a multirun writes one model per job", "hydra.sweep.dir=FOLDER"]),
    ],
    ids=["bad-value", "missing-source", "output"],
)
def test_a_bad_job_stops_the_sweep_before_any_folder(sweep, tmp_path, args, expected):
    err = refused(sweep(*args), tmp_path)
    for text in expected:
        assert text in err


def test_every_problem_of_every_job_in_one_message(sweep, tmp_path):
    err = refused(sweep("recipe=tiny,tiny_broken,nope", "recipe.alpha=0.5,oops", "output=one", "preview=true", f"preview.pipeline={tmp_path / 'no-pipeline'}"), tmp_path)
    lines = err.splitlines()[1:]
    assert lines[0].startswith("  jobs 0 (alpha=0.5,recipe=tiny), 1 (alpha=oops,recipe=tiny), 2 (alpha=0.5,recipe=tiny_broken), 3 ")
    assert "): output=one: a multirun writes one model per job" in lines[0]
    assert "job 0 (alpha=0.5,recipe=tiny): preview.pipeline=" in lines[1] and "no such folder" in lines[1]  # checked where the job planned
    assert "job 1 (alpha=oops,recipe=tiny): recipe 'tiny'" in lines[2] and "got 'oops'" in lines[2]
    assert "job 2 (alpha=0.5,recipe=tiny_broken): source 'krea'" in lines[3] and "no-such-krea" in lines[3]
    assert "job 3 (alpha=oops,recipe=tiny_broken): recipe 'tiny_broken'" in lines[4]
    assert lines[5].startswith("  jobs 4 (recipe=nope recipe.alpha=0.5 output=one") and "no recipe 'nope' (recipes: " in lines[5]  # not even composed
    assert "Config search path" not in lines[5] and "exclude_keys" not in lines[5]
    assert len(lines) == 6 and "found 6 problems (6 jobs)" in err.splitlines()[0]


def test_dry_run_prints_every_plan_and_the_totals(sweep, tmp_path, pipeline_files):
    code, out, err = sweep("recipe=tiny", "recipe.alpha=0,1", "dry_run=true", "preview=true", f"preview.pipeline={pipeline_files}", "preview.height=32", "preview.width=32")
    assert code == 0, err
    assert "== job 0: alpha=0\nrecipe tiny" in out and "== job 1: alpha=1" in out
    assert out.count("total: 108 tensors in 1 file(s)") == 2 and out.count("lerp:1.0 over schnell, krea") == 1
    assert out.count("previews: 3 prompt(s) x 2 seed(s), 4 steps, no guidance") == 2
    assert "sweep: 2 jobs into" in out and "1 at a time; reads 976.93 KB, writes 488.46 KB, renders 12 preview images" in out
    assert "disk: needs" in out and "dry run: nothing was launched and nothing written" in out
    assert not (tmp_path / "sweep").exists()


def test_the_sweeps_disk_is_checked_as_a_whole(sweep, tmp_path, monkeypatch):
    """Three models must fit at once; with keep_weights=false only one exists at a time (basic launcher)."""
    model = 244.23e3 + preflight.SIDE_FILES  # the tiny merge's bytes, and the bound for its side files
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda path: SimpleNamespace(free=int(2 * model)))
    err = refused(sweep("recipe=tiny", "recipe.alpha=0,0.5,1"), tmp_path)
    assert "sweep: not enough free space" in err and "(3 models of up to" in err and "keep_weights=false deletes each model" in err
    code, out, err = sweep("recipe=tiny", "recipe.alpha=0,0.5,1", "keep_weights=false", "dry_run=true")
    assert code == 0, err
    assert "keep_weights=false: 3 of the models are deleted after their previews" in out


def test_need_counts_the_models_that_exist_at_once(tmp_path):
    def job(num: int, keep: bool, size: int) -> preflight.JobCheck:
        return preflight.JobCheck(num, f"j{num}", tmp_path / f"j{num}", job=SimpleNamespace(plan=SimpleNamespace(bytes_written=size)), keep_weights=keep)

    sizes = [10**9, 3 * 10**9, 2 * 10**9]
    for keep, at_once, need in [(True, 1, sum(sizes)), (False, 1, 3 * 10**9), (False, 2, 5 * 10**9), (False, 9, sum(sizes))]:
        report = preflight.SweepReport(tmp_path / "sweep", [job(i, keep, s) for i, s in enumerate(sizes)], at_once)
        preflight._check_disk(report)
        assert report.need == need + preflight.SIDE_FILES * (len(sizes) if keep else min(at_once, 3)), (keep, at_once)


@pytest.mark.filterwarnings(r"ignore:\s*'hydra/launcher/joblib' is validated against ConfigStore schema")  # conf/hydra/launcher/joblib.yaml: on purpose
def test_jobs_at_once_per_launcher():
    cases = {"basic": 1, "joblib": 2, "submitit_local": 5, "slurm": 4}
    for name, expected in cases.items():
        cfg = compose(["recipe=demo", f"hydra/launcher={name}"])
        assert launcher_of(cfg.hydra.launcher).at_once(5) == expected, name
    compose([])


def test_submitit_launcher_gets_nothing_when_a_job_is_bad(sweep, tmp_path):
    err = refused(sweep("recipe=tiny,tiny_broken", "recipe.alpha=0.5", "hydra/launcher=submitit_local"), tmp_path)
    assert "no-such-krea" in err  # and no .submitit folder: the sweep folder does not exist


def test_two_jobs_into_one_folder_are_refused(sweep, tmp_path):
    """Two values that differ only where a folder name cannot hold a character ('/' becomes '_')."""
    err = refused(sweep("recipe=tiny", "recipe.alpha=0.5", "+recipe.description=a/b,a_b"), tmp_path)
    assert "sweep: jobs 0 and 1 would both write to description=a_b: what differs between them makes the same folder name" in err


def test_constant_preview_settings_stay_out_of_folder_names(sweep, tmp_path, pipeline_files):
    code, out, err = sweep("recipe=tiny", "recipe.alpha=0,1", "dry_run=true", "preview=true", f"preview.pipeline={pipeline_files}", "preview.height=32,64", "preview.width=32")
    assert code == 0, err
    assert "== job 0: alpha=0,preview.height=32" in out and "== job 3: alpha=1,preview.height=64" in out


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a GPU")
def test_a_gpu_sweep_on_a_machine_without_one_is_refused(sweep, tmp_path):
    err = refused(sweep("recipe=tiny", "recipe.alpha=0,1", "device=cuda"), tmp_path)
    assert "every job (2): device=cuda: this torch" in err and "sees no CUDA GPU" in err


def test_one_file_outputs_have_no_room_for_previews_or_a_recipe(sweep, tmp_path, pipeline_files, monkeypatch, capsys):
    """format=bfl or comfyui writes one .safetensors file: previews load a diffusers folder, and keep_weights=false
    would leave nothing to rebuild from. Refused before anything runs, in a sweep and in a single run."""
    err = refused(sweep("recipe=tiny", "recipe.alpha=0,1", "format=bfl", "keep_weights=false"), tmp_path)
    assert "every job (2): format=bfl writes one file; keep_weights=false keeps the folder's recipe.yaml" in err
    err = refused(sweep("recipe=tiny", "recipe.alpha=0,1", "format=comfyui", "preview=true", f"preview.pipeline={pipeline_files}"), tmp_path)
    assert "every job (2): format=comfyui writes one file; previews load the merged model as a diffusers folder" in err
    one = tmp_path / "one.safetensors"
    assert run_main(["recipe=tiny", "format=bfl", "keep_weights=false", f"output={one}", "progress=false"], monkeypatch) == 1
    err = capsys.readouterr().err
    assert err.startswith("fluxrecipe: error: format=bfl writes one file") and err.count("\n") == 1 and not one.exists()
