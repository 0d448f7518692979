"""Sweeps (issue 4): real multiruns through the CLI on the tiny models, with each launcher, and their summary.

Every merged tensor is compared with a reference computed here from the sources (alpha 0: schnell's,
alpha 1: Krea's, 0.5: the float32 mean rounded once); the summary's numbers are compared with what the
jobs wrote and with distances recomputed from the tensors.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import sys
from pathlib import Path

import pytest
import torch

from conftest import compose, load_state, run_cli
from fluxrecipe.cli import arguments
from fluxrecipe.cli import multirun as cli_multirun
from fluxrecipe.cli.commands import summary as summary_command
from fluxrecipe.cli.exits import EXIT_ERROR, EXIT_USAGE
from fluxrecipe.sweep import labels, page, plot, records, summarize
from fluxrecipe.sweep.summary import SUMMARY_MD
from sweep_helpers import with_nan, write_recipes

@pytest.fixture(scope="module")
def recipes(tmp_path_factory, schnell, krea) -> dict[str, str]:
    """The environment that makes the tiny recipes `tiny`, `tiny_guided`, `tiny_nan` (a NaN in Krea: its jobs
    fail while merging) and `tiny_broken` (a missing source) over the conftest models known."""
    nan_krea = with_nan(krea, tmp_path_factory.mktemp("nan") / "krea")
    return write_recipes(tmp_path_factory.mktemp("sweep-recipes"), schnell, krea, nan_krea)


@pytest.fixture(scope="module")
def states(schnell, krea) -> dict[str, dict[str, torch.Tensor]]:
    return {"schnell": load_state(schnell), "krea": load_state(krea)}


def multirun(args: list[str], sweep_dir: Path, env: dict[str, str]):
    return run_cli(["-m", *args, f"hydra.sweep.dir={sweep_dir}"], cwd=sweep_dir.parent, env=env)


def summary_rows(sweep_dir: Path) -> dict[str, dict[str, str]]:
    with open(sweep_dir / summarize.SUMMARY_CSV, newline="") as f:
        return {row["job"]: row for row in csv.DictReader(f)}


def check_merge(folder: Path, alpha: float, states, guided: bool = False) -> None:
    """Every tensor of the merge is exactly what the recipe asks for, and its diagnostics are right."""
    s, k = states["schnell"], states["krea"]
    got = load_state(folder)
    assert set(got) == set(k if guided else s)
    for key, t in got.items():
        if guided and "guidance" in key:
            want = k[key]
        elif alpha == 0:
            want = s[key]
        elif alpha == 1:
            want = k[key]
        else:
            assert alpha == 0.5
            want = ((s[key].float() + k[key].float()) / 2).to(t.dtype)
        assert torch.equal(t, want), key
    config = json.loads((folder / "config.json").read_text())
    assert config["guidance_embeds"] is guided
    assert f"alpha: {alpha}" in (folder / "recipe.yaml").read_text()  # the job's resolved recipe beside it

    diagnostics = json.loads((folder / "diagnostics.json").read_text())
    blocks = diagnostics["blocks"]
    assert list(blocks) == ["embedders", "transformer_blocks.0", "transformer_blocks.1", "single_transformer_blocks.0", "single_transformer_blocks.1", "output"]
    if alpha == 0:
        assert all(b["schnell"] == 0 for b in blocks.values()) and diagnostics["overall"]["schnell"] == 0
    if alpha == 1:
        assert all(b["krea"] == 0 for b in blocks.values()) and diagnostics["overall"]["krea"] == 0
    for src, state in states.items():  # the overall distance, recomputed from the tensors
        keys = [key for key in got if key in state and not (guided and "guidance" in key and src == "schnell")]
        distance = sum(float((got[key].double() - state[key].double()).pow(2).sum()) for key in keys)
        norm = sum(float(state[key].double().pow(2).sum()) for key in keys)
        assert diagnostics["overall"][src] == pytest.approx(math.sqrt(distance / norm), rel=1e-4, abs=1e-7)


def check_row(row: dict[str, str], sweep_dir: Path, job: str) -> None:
    """A summary row of a finished job holds what the job wrote: output, bytes, distances."""
    out = sweep_dir / job / "transformer"
    assert row["status"] == "ok" and row["error"] == ""
    assert row["output"] == f"{job}/transformer"
    assert int(row["bytes_written"]) == sum(f.stat().st_size for f in out.iterdir())
    assert float(row["seconds"]) > 0
    overall = json.loads((out / "diagnostics.json").read_text())["overall"]
    for src, value in overall.items():
        assert float(row[f"distance_to_{src}"]) == pytest.approx(value, rel=1e-5, abs=0)


def test_basic_launcher_alpha_sweep_with_failing_jobs(tmp_path, recipes, states):
    """alpha 0, 0.5, 1 over a good recipe and one whose source holds a NaN (found only while merging, so the
    pre-flight passes it): three merges, three failures reported, exit status 1."""
    sweep_dir = tmp_path / "sweep"
    r = multirun(["recipe=tiny,tiny_nan", "recipe.alpha=0,0.5,1", "progress=false"], sweep_dir, recipes)
    assert r.returncode == 1, r.stderr
    assert "error in job alpha=0,recipe=tiny_nan" in r.stdout + r.stderr
    assert "6 jobs, 3 ok, 3 failed" in r.stderr

    for alpha in (0, 0.5, 1):
        check_merge(sweep_dir / f"alpha={alpha},recipe=tiny" / "transformer", alpha, states)
        assert not (sweep_dir / f"alpha={alpha},recipe=tiny_nan" / "transformer").exists()

    rows = summary_rows(sweep_dir)
    assert list(rows) == [f"alpha={a},recipe={n}" for n in ("tiny", "tiny_nan") for a in ("0", "0.5", "1")]  # in job order, named by what differs
    assert [row["recipe.alpha"] for row in rows.values()] == ["0", "0.5", "1"] * 2  # the swept keys, columns
    assert [row["recipe"] for row in rows.values()] == ["tiny"] * 3 + ["tiny_nan"] * 3
    for job, row in list(rows.items())[:3]:
        check_row(row, sweep_dir, job)
        assert row["overrides"] == f"recipe=tiny recipe.alpha={row['recipe.alpha']} progress=False"  # as Hydra passes it on
    assert rows["alpha=0,recipe=tiny"]["distance_to_schnell"] == "0"
    assert rows["alpha=1,recipe=tiny"]["distance_to_krea"] == "0"
    failed = rows["alpha=0.5,recipe=tiny_nan"]
    assert failed["status"] == "failed" and failed["output"] == "" and failed["distance_to_schnell"] == "" and failed["weights"] == ""
    assert "source 'krea': tensor 'x_embedder.weight'" in failed["error"] and "holds NaN or Inf" in failed["error"]

    markdown = (sweep_dir / SUMMARY_MD).read_text()
    assert "6 jobs: 3 ok, 3 failed" in markdown and "![per-block distance to each source](summary.png)" in markdown
    table = [line for line in markdown.splitlines() if line.startswith("| alpha=")]
    assert len(table) == 6 and all("| failed |" in line and "holds NaN" in line for line in table[3:])
    assert "| ok |" in table[0] and f"| {rows['alpha=0,recipe=tiny']['distance_to_krea']} |" in table[0]

    with open(sweep_dir / summarize.BLOCKS_CSV, newline="") as f:
        blocks = list(csv.DictReader(f))
    assert len(blocks) == 3 * 6 * 2  # jobs x blocks x sources
    for b in blocks:
        diagnostics = json.loads((sweep_dir / b["job"] / "transformer" / "diagnostics.json").read_text())
        assert float(b["distance"]) == diagnostics["blocks"][b["block"]][b["source"]]

    # the plot: a real PNG, and the lines it draws are the per-block distances, one per finished job
    from matplotlib import image

    assert image.imread(sweep_dir / plot.SUMMARY_PNG).shape[2] in (3, 4)
    figure = plot.figure(records.read_jobs(sweep_dir.resolve()), ["schnell", "krea"], "sweep")
    for ax, src in zip(figure.axes, ["schnell", "krea"]):
        assert ax.get_ylabel() == f"distance to {src}"
        lines = {line.get_label(): list(line.get_ydata()) for line in ax.get_lines()}
        assert list(lines) == ["alpha=0", "alpha=0.5", "alpha=1"]
        assert lines[f"alpha={0 if src == 'schnell' else 1}"] == [0.0] * 6
        half = json.loads((sweep_dir / "alpha=0.5,recipe=tiny" / "transformer" / "diagnostics.json").read_text())["blocks"]
        assert lines["alpha=0.5"] == [by_source[src] for by_source in half.values()]
    assert [t.get_text() for t in figure.axes[1].get_xticklabels()] == ["embedders", "double_blocks.0", "double_blocks.1", "single_blocks.0", "single_blocks.1", "output"]

    # `summary` rebuilds the same tables from the files alone
    before = {name: (sweep_dir / name).read_text() for name in (summarize.SUMMARY_CSV, SUMMARY_MD, summarize.BLOCKS_CSV)}
    for name in (*before, plot.SUMMARY_PNG):
        (sweep_dir / name).unlink()
    r = run_cli(["summary", str(sweep_dir)], cwd=tmp_path)
    assert r.returncode == 1, r.stderr  # a job failed
    assert {name: (sweep_dir / name).read_text() for name in before} == before
    assert (sweep_dir / plot.SUMMARY_PNG).stat().st_size > 0
    assert before[SUMMARY_MD] in r.stdout
    assert not (sweep_dir / "grid.png").exists() and "summary.png" in (sweep_dir / page.INDEX_HTML).read_text()  # no previews: no grid


def test_joblib_recipe_group_sweep_from_a_user_sweep_file(tmp_path, recipes, states, krea):
    """hydra/launcher=joblib, both recipes swept from a sweep file of the user's (--config-dir)."""
    user_conf = tmp_path / "my_conf"
    (user_conf / "sweep").mkdir(parents=True)
    (user_conf / "sweep" / "mine.yaml").write_text(
        "# @package _global_\nhydra:\n  sweeper:\n    params:\n      recipe: tiny,tiny_guided\n      recipe.alpha: 0,1\n"
    )
    sweep_dir = tmp_path / "sweep"
    # the recipe is swept (in the sweep file), and a recipe.* option is set as well: applied to every job
    r = multirun(["--config-dir", str(user_conf), "sweep=mine", f"recipe.sources.krea={krea}", "hydra/launcher=joblib"], sweep_dir, recipes)
    assert r.returncode == 0, r.stderr
    assert "n_jobs=2" in r.stdout + r.stderr  # our preset, not the plugin's one job per core
    assert "validated against ConfigStore schema" not in r.stderr
    rows = summary_rows(sweep_dir)
    assert set(rows) == {f"alpha={a},recipe={n}" for a in (0, 1) for n in ("tiny", "tiny_guided")}  # the source, the same in every job: not in the names
    assert {(row["recipe"], row["recipe.alpha"]) for row in rows.values()} == {(n, a) for a in "01" for n in ("tiny", "tiny_guided")}
    for job, row in rows.items():
        check_row(row, sweep_dir, job)
        check_merge(sweep_dir / job / "transformer", int(row["recipe.alpha"]), states, guided=row["recipe"] == "tiny_guided")


def test_submitit_local_sweep_over_recipes_with_a_failing_one(tmp_path, recipes, states):
    """hydra/launcher=submitit_local, the recipe group swept at a fixed alpha, one recipe failing in its job."""
    sweep_dir = tmp_path / "sweep"
    r = multirun(["recipe=tiny,tiny_nan", "recipe.alpha=0.5", "hydra/launcher=submitit_local"], sweep_dir, recipes)
    assert r.returncode == 1, r.stderr
    assert "2 jobs, 1 ok, 1 failed" in r.stderr
    rows = summary_rows(sweep_dir)
    assert list(rows) == ["recipe=tiny", "recipe=tiny_nan"]
    check_row(rows["recipe=tiny"], sweep_dir, "recipe=tiny")
    check_merge(sweep_dir / "recipe=tiny" / "transformer", 0.5, states)
    broken = rows["recipe=tiny_nan"]
    assert broken["status"] == "failed" and "holds NaN or Inf" in broken["error"] and broken["recipe"] == "tiny_nan"
    assert (sweep_dir / ".submitit").is_dir() and (sweep_dir / plot.SUMMARY_PNG).is_file()


def test_job_folders_are_named_by_what_differs(tmp_path, recipes, states, krea):
    """Issue 21, item 14: every job's folder carried every override (the source's path, the recipe), the same
    in every job. It is named by what differs (`alpha=1`), the job record keeps the full overrides, and the
    recipe.yaml in such a folder still rebuilds the model."""
    sweep_dir = tmp_path / "sweep"
    r = multirun(["recipe=tiny", "recipe.alpha=0,1", f"recipe.sources.krea={krea}", "progress=false"], sweep_dir, recipes)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in sweep_dir.iterdir() if p.is_dir()) == ["alpha=0", "alpha=1"]
    record = json.loads((sweep_dir / "alpha=1" / records.JOB_STATUS_NAME).read_text())
    assert record["overrides"] == ["recipe=tiny", "recipe.alpha=1", f"recipe.sources.krea={krea}", "progress=False"]
    assert list(summary_rows(sweep_dir)) == ["alpha=0", "alpha=1"]
    rebuilt = tmp_path / "rebuilt"
    r = run_cli([f"recipe={sweep_dir / 'alpha=1' / 'transformer' / 'recipe.yaml'}", f"output={rebuilt}", "progress=false"], cwd=tmp_path, env=recipes)
    assert r.returncode == 0, r.stderr
    check_merge(rebuilt, 1, states)


@pytest.fixture
def job_config(monkeypatch):
    """A job's config as a multirun hands it to its task, composed in-process (its failures not counted after)."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import read_write

    monkeypatch.setattr(cli_multirun, "_failed_here", 0)

    def make(job_dir: Path, overrides: list[str]):

        cfg = compose([*overrides, "hydra.mode=MULTIRUN"])
        with read_write(cfg.hydra.runtime):
            cfg.hydra.runtime.output_dir = str(job_dir)
        HydraConfig.instance().set_config(cfg)
        assert cli_multirun.in_multirun()
        return cfg

    yield make
    compose([])  # leave Hydra's global state as a single run's


def test_output_is_refused_in_a_multirun(tmp_path, job_config):
    """All jobs would write to that one folder: the job fails at once and says what to do instead."""
    cfg = job_config(tmp_path, ["recipe=krea_schnell", f"output={tmp_path / 'one'}"])
    record = cli_multirun.run_job(cfg)
    assert record["status"] == "failed" and "a multirun writes one model per job" in record["error"] and "hydra.sweep.dir=" in record["error"]
    assert json.loads((tmp_path / records.JOB_STATUS_NAME).read_text()) == record
    jobs = [["recipe=krea_schnell", "output=one", f"recipe.alpha={a}"] for a in (0, 1)]
    assert [job[-1] for job in cli_multirun.named_jobs(jobs)] == ["hydra.sweep.subdir='alpha=0'", "hydra.sweep.subdir='alpha=1'"]  # nor in the names


def test_a_job_records_a_bug_and_an_interruption(tmp_path, caplog, job_config):
    """In-process: what run_recorded leaves in the job folder when the job is not a clean FluxRecipeError."""
    cfg = job_config(tmp_path, ["recipe=krea_schnell", "recipe.alpha=0.3"])

    def bug(cfg):
        raise ValueError("boom")

    assert cli_multirun.run_job(cfg, bug)["error"] == "ValueError: boom"
    status = json.loads((tmp_path / records.JOB_STATUS_NAME).read_text())
    assert status["status"] == "failed" and status["overrides"] == ["recipe=krea_schnell", "recipe.alpha=0.3"]
    assert "Traceback" in caplog.text and "in bug" in caplog.text  # a bug shows where it is

    def interrupted(cfg):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cli_multirun.run_job(cfg, interrupted)
    assert "interrupted" in json.loads((tmp_path / records.JOB_STATUS_NAME).read_text())["error"]


def test_a_slurm_job_stopped_at_its_time_limit_says_which_setting(tmp_path, caplog, job_config):
    """SLURM warns a job signal_delay_s before its time limit and submitit answers inside the job with an
    UncompletedJobError (seen in a real run on tests/slurm/test-slurm.sh's cluster): the record names the
    setting to change, in one line, with no traceback (it is not a bug)."""
    from submitit.core.utils import UncompletedJobError

    cfg = job_config(tmp_path, ["recipe=krea_schnell", "recipe.alpha=0.3"])

    def timed_out(cfg):
        raise UncompletedJobError("Job not requeued because: timed-out too many times.")

    def timed_out_in_an_import(cfg):  # as diffusers' lazy imports wrap it when the signal comes during one
        try:
            timed_out(cfg)
        except UncompletedJobError as e:
            raise RuntimeError("Failed to import diffusers.pipelines.flux.pipeline_flux") from e

    for job in (timed_out, timed_out_in_an_import):
        record = cli_multirun.run_job(cfg, job)
        assert record["status"] == "failed" and record["error"] == records.TIME_LIMIT and "hydra.launcher.timeout_min" in record["error"]
        assert json.loads((tmp_path / records.JOB_STATUS_NAME).read_text()) == record
    assert "Traceback" not in caplog.text


def test_a_failed_job_is_recorded_when_the_signal_broke_an_import(tmp_path, job_config, monkeypatch):
    """A signal that strikes during an import leaves that module unimportable in the job's process (on the
    one-node cluster: torch's 'Only a single TORCH_LIBRARY ...' on importing fluxrecipe.execute again); the
    job's record must not need it, or the launcher gets an exception and the sweep ends without a summary."""
    cfg = job_config(tmp_path, ["recipe=krea_schnell", "recipe.alpha=0.3"])
    monkeypatch.setitem(sys.modules, "fluxrecipe.execute", None)  # importing it now raises ImportError

    def failed(cfg):
        raise ValueError("boom")

    assert cli_multirun.run_job(cfg, failed)["error"] == "ValueError: boom"
    assert json.loads((tmp_path / records.JOB_STATUS_NAME).read_text())["status"] == "failed"


@pytest.mark.filterwarnings(r"ignore:\s*'hydra/launcher/joblib' is validated against ConfigStore schema")  # conf/hydra/launcher/joblib.yaml: on purpose
def test_builtin_sweep_files_compose():
    cfg = compose(["recipe=krea_schnell", "sweep=alpha_grid"])
    assert dict(cfg.hydra.sweeper.params) == {"recipe.alpha": "0.0,0.25,0.5,0.75,1.0"}
    cfg = compose(["sweep=recipes_alpha"])
    assert dict(cfg.hydra.sweeper.params) == {"recipe": "krea_schnell,krea_schnell_guided", "recipe.alpha": "0.25,0.5,0.75"}
    jobs = [["sweep=recipes_alpha", f"recipe={r}", f"recipe.alpha={a}"] for r in ("krea_schnell", "krea_schnell_guided") for a in (0.25, 0.5)]
    assert labels.folder_names(jobs) == ["alpha=0.25,recipe=krea_schnell", "alpha=0.5,recipe=krea_schnell", "alpha=0.25,recipe=krea_schnell_guided", "alpha=0.5,recipe=krea_schnell_guided"]
    for name in ("joblib", "slurm"):
        cfg = compose(["recipe=krea_schnell", f"hydra/launcher={name}"])
        assert cfg.hydra.launcher._target_.endswith("JoblibLauncher" if name == "joblib" else "SlurmLauncher")
    assert cfg.hydra.launcher.partition is None and cfg.hydra.launcher.timeout_min == 120 and cfg.hydra.launcher.mem_gb == 16


@pytest.mark.filterwarnings(r"ignore:\s*'hydra/launcher/joblib' is validated against ConfigStore schema")
def test_slurm_preset_makes_an_sbatch_script(tmp_path, monkeypatch):
    """hydra/launcher=slurm as submitit would submit it (no cluster here: a stand-in srun, and no submission)."""
    import submitit
    from hydra.utils import instantiate

    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "srun").write_text("#!/bin/sh\nexit 1\n")
    (tmp_path / "bin" / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    cfg = compose(["recipe=krea_schnell", "hydra/launcher=slurm", "hydra.launcher.partition=cpu", f"hydra.sweep.dir={tmp_path / 'sweep'}"])
    launcher = instantiate(cfg.hydra.launcher)
    launcher.setup(hydra_context=None, task_function=print, config=cfg)
    executors = []

    def capture(executor, fn, *args):
        executors.append(executor)
        raise StopIteration

    monkeypatch.setattr(submitit.AutoExecutor, "map_array", capture)
    with pytest.raises(StopIteration):
        launcher.launch([["recipe.alpha=0.5"]], 0)
    script = executors[0]._executor._make_submission_file_text("python -m fluxrecipe", "uid")
    for line in ("--partition=cpu", "--time=120", "--cpus-per-task=8", "--mem=16GB", "--job-name=fluxrecipe", f"--output={tmp_path / 'sweep'}/.submitit/"):
        assert f"#SBATCH {line}" in script


def test_plain_recipe_overrides_of_a_multirun_become_one_value_sweeps():
    argv = ["-m", "recipe=a,b", "recipe.alpha=0.2", "+recipe.beta=1", "recipe.alpha=0,1", "~recipe.x", "output=o", "--config-dir", "recipe.d"]
    assert arguments.defer_recipe_overrides(argv) == [
        "-m", "recipe=a,b", "recipe.alpha=choice(0.2)", "+recipe.beta=choice(1)", "recipe.alpha=0,1", "~recipe.x", "output=o", "--config-dir", "recipe.d"
    ]
    assert arguments.is_multirun(["recipe=a", "--multirun"]) and not arguments.is_multirun(["recipe=a"])


@pytest.mark.parametrize(
    "dirname, expected",
    [
        ("recipe.alpha=0.25,recipe=krea_schnell", "recipe.alpha=0.25,recipe=krea_schnell"),
        ("recipe.alpha=-0.5", "recipe.alpha=-0.5"),
        ("recipe.sources.krea=/data/krea", "recipe.sources.krea=_data_krea"),
        ("recipe.sources.krea=C:\\krea dev", "recipe.sources.krea=C__krea_dev"),
        ("", "job3"),
    ],
)
def test_job_dirname_is_a_safe_folder_name(dirname, expected):
    assert labels.folder_name(dirname, 3) == expected


def test_job_dirname_of_long_overrides_is_cut_and_unique():
    a, b = labels.folder_name("x=" + "a" * 300, 0), labels.folder_name("x=" + "a" * 299 + "b", 0)
    assert a != b and len(a) < 200 and len(b) < 200


def test_summary_of_an_unfinished_job_and_of_no_sweep(tmp_path):
    """A job killed before it recorded itself (a SLURM timeout, say) is reported as unfinished."""
    job = tmp_path / "sweep" / "recipe.alpha=0.5"
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("- recipe.alpha=0.5\n")
    (tmp_path / "sweep" / records.MULTIRUN_YAML).write_text("hydra: {}\n")
    assert summary_command([str(tmp_path / "sweep")]) == EXIT_ERROR
    rows = summary_rows(tmp_path / "sweep")
    assert rows["recipe.alpha=0.5"]["status"] == "unfinished" and "did not finish" in rows["recipe.alpha=0.5"]["error"]
    assert not (tmp_path / "sweep" / plot.SUMMARY_PNG).exists()
    assert summary_command([str(tmp_path / "nothing")]) == EXIT_USAGE
    (tmp_path / "empty").mkdir()
    assert summary_command([str(tmp_path / "empty")]) == EXIT_USAGE


def test_summary_refuses_a_folder_that_is_not_a_sweep(tmp_path, capsys):
    """Nothing of a folder that is not a sweep is overwritten or deleted (issue 12), and a single run is
    called what it is, not an unfinished sweep."""
    mine = tmp_path / "project"
    (mine / "notes" / ".hydra").mkdir(parents=True)
    (mine / "notes" / ".hydra" / "overrides.yaml").write_text("- x=1\n")
    files = {SUMMARY_MD: b"# my notes\n", summarize.SUMMARY_CSV: b"a,b\n", plot.SUMMARY_PNG: b"\x89PNG mine"}
    for name, data in files.items():
        (mine / name).write_bytes(data)
    assert summary_command([str(mine)]) == EXIT_USAGE
    assert {name: (mine / name).read_bytes() for name in files} == files and not (mine / page.INDEX_HTML).exists()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a sweep folder (no multirun.yaml)" in err and "nothing was written" in err

    single = tmp_path / "outputs" / "12-00-00"  # what `python -m fluxrecipe recipe=demo` leaves
    (single / ".hydra").mkdir(parents=True)
    (single / ".hydra" / "overrides.yaml").write_text("- recipe=demo\n")
    (single / ".hydra" / "hydra.yaml").write_text("hydra:\n  mode: RUN\n")
    assert summary_command([str(single)]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "a single run, not a sweep" in err and "unfinished" not in err and not (single / summarize.SUMMARY_CSV).exists()


def test_summary_escapes_what_job_records_hold(tmp_path, capsys):
    """A job record's error and a job's overrides come from a stranger's recipe or file: `summary` printed an
    escape sequence raw to the terminal and summary.md carried raw HTML (issue 21, item 8). Both are escaped,
    as index.html's are."""
    root = tmp_path / "sweep"
    job = root / "a"
    (job / ".hydra").mkdir(parents=True)
    (root / records.MULTIRUN_YAML).write_text("hydra: {}\n")
    (job / ".hydra" / "overrides.yaml").write_text('- "recipe.description=<img src=x onerror=alert(1)>"\n')
    error = "\x1b[2J\x1b]0;pwned\x07<script>alert(1)</script> [click](javascript:alert(1))"
    (job / records.JOB_STATUS_NAME).write_text(json.dumps({"status": "failed", "error": error}))
    assert summary_command([str(root)]) == EXIT_ERROR
    shown = capsys.readouterr()
    assert "\x1b" not in shown.out + shown.err and "\x07" not in shown.out + shown.err
    assert "\\x1b[2J" in shown.err  # written out, as the terminal shows any other text
    markdown = (root / SUMMARY_MD).read_text()
    assert not re.search(r"(?<!\\)[<>]", markdown) and "[click](javascript" not in markdown and "\x1b" not in markdown  # no HTML, no link
    assert "\\<script\\>alert(1)\\</script\\>" in markdown and "\\<img src=x onerror=alert(1)\\>" in markdown


def test_summary_of_damaged_sweep_state_files(tmp_path, capsys):
    """Damaged job records and Hydra files: one line per job, no traceback, never a hang (a FIFO)."""
    root = tmp_path / "sweep"
    root.mkdir()
    (root / records.MULTIRUN_YAML).write_text("hydra: {}\n")
    damage = {
        "list": {"fluxrecipe-job.json": "[1, 2]"},
        "types": {"fluxrecipe-job.json": json.dumps({"status": "ok", "seconds": "soon", "output": None})},
        "status": {"fluxrecipe-job.json": json.dumps({"status": "done"})},
        "garbage": {"fluxrecipe-job.json": "{not json"},
        "fifo": {"fluxrecipe-job.json": None},
        "overrides": {".hydra/overrides.yaml": "{a: [1, 2"},
        "overrides_dict": {".hydra/overrides.yaml": "a: 1\n"},
        "hydra_fifo": {".hydra/hydra.yaml": None, "fluxrecipe-job.json": json.dumps({"status": "ok"})},
        "previews": {"fluxrecipe-job.json": json.dumps({"status": "ok"}), "previews/previews.json": "[]"},
    }
    for num, (name, files) in enumerate(damage.items()):
        (root / name / ".hydra").mkdir(parents=True)
        (root / name / ".hydra" / "overrides.yaml").write_text(f"- case={name}\n")
        (root / name / ".hydra" / "hydra.yaml").write_text(f"hydra:\n  job:\n    num: {num}\n")
        for file, text in files.items():
            path = root / name / file
            path.parent.mkdir(exist_ok=True)
            path.unlink(missing_ok=True)
            if text is None:
                os.mkfifo(path)
            else:
                path.write_text(text)
    assert summary_command([str(root)]) == EXIT_ERROR
    err = capsys.readouterr().err
    assert "Traceback" not in err
    rows = summary_rows(root)
    assert set(rows) == set(damage)
    expected = {
        "list": "is not a job record", "types": "seconds is \"soon\"", "status": "status 'done' is none of",
        "garbage": "cannot be read", "fifo": "cannot be read: not a regular file", "overrides": "overrides.yaml cannot be read",
        "overrides_dict": "is not a list of overrides", "previews": "previews.json cannot be read",
    }
    for name, text in expected.items():
        assert text in rows[name]["error"], (name, rows[name]["error"])
        assert f"{name}: " in err and err.count(f"{name}: ") == 1
    assert rows["hydra_fifo"]["status"] == "ok"  # a hydra.yaml that cannot be read only loses the job's place
    assert rows["previews"]["status"] == "ok" and rows["previews"]["previews"] == ""
