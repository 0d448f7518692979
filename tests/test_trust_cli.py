"""Issue 12 through the command line, in subprocesses from fresh folders: runs that a user's habit (Hydra's
`+key=value`, a sweep file without -m) would have made silently wrong are refused before anything is
written (not even Hydra's outputs/ folder), and the first hour's commands (a recipe file by its path, the
version, tab completion, a closed pipe) do what they say.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from conftest import REPO_ROOT, run_cli, write_recipe


def one_error_line(done) -> str:
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 1, done.stderr + done.stdout
    assert "Traceback" not in done.stderr + done.stdout
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("fluxrecipe: error: ")
    return lines[0]


@pytest.mark.parametrize(
    "args, says",
    [
        (["recipe=demo", "+dryrun=true"], "unknown option 'dryrun' (did you mean dry_run?)"),
        (["recipe=demo", "dryrun=true"], "unknown option 'dryrun' (did you mean dry_run?)"),
        (["recipe=demo", "+recipe.alhpa=0.3"], "parameter 'alhpa' is used by no rule (did you mean alpha?)"),
        (["recipe=demo", "sweep=alpha_grid"], "sweep=alpha_grid sets a sweep (recipe.alpha: 0.0,0.25,0.5,0.75,1.0), which runs only as a multirun: add -m"),
    ],
    ids=["plus-dryrun", "dryrun", "parameter-typo", "sweep-without-m"],
)
def test_a_silently_wrong_run_is_refused_and_writes_nothing(tmp_path, args, says):
    done = run_cli(args, cwd=tmp_path)
    assert says in one_error_line(done)
    assert list(tmp_path.iterdir()) == []  # no outputs/ folder, no merge


def test_a_dry_run_writes_nothing_at_all(tmp_path):
    done = run_cli(["recipe=demo", "dry_run=true"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "dry run: nothing written (the output would go to " in done.stdout
    assert list(tmp_path.iterdir()) == []  # not even Hydra's outputs/DATE/TIME with its log


def test_a_recipe_file_runs_by_its_path(tmp_path, schnell, krea):
    """`recipe=./mine.yaml`, a newcomer's first try; its sources relative to the recipe file."""
    folder = tmp_path / "work"
    write_recipe(folder / "recipes", "mine", "sources: {a: ../models/a, b: ../models/b}\nrules: [{match: '.*', op: average}]\n")
    (folder / "models").mkdir()
    (folder / "models" / "a").symlink_to(schnell)
    (folder / "models" / "b").symlink_to(krea)
    done = run_cli(["recipe=./recipes/mine.yaml", "dry_run=true", "output=out"], cwd=folder)
    assert done.returncode == 0, done.stderr
    assert "recipe mine (" in done.stdout and "average over a, b" in done.stdout


def test_a_recipe_named_like_a_number(tmp_path, schnell):
    write_recipe(tmp_path / "r", "2024", f"sources: {{a: '{schnell}'}}\nrules: [{{match: '.*', op: 'take:a'}}]\n")
    done = run_cli(["recipe=2024", "dry_run=true", "output=out"], cwd=tmp_path, env={"FLUXRECIPE_RECIPE_PATH": str(tmp_path / "r")})
    assert done.returncode == 0, done.stderr
    assert "recipe 2024 (" in done.stdout


def test_a_missing_recipe_folder_is_named(tmp_path):
    done = run_cli(["recipe=demo", "dry_run=true"], cwd=tmp_path, env={"FLUXRECIPE_RECIPE_PATH": str(tmp_path / "nowhere")})
    assert f"FLUXRECIPE_RECIPE_PATH names {tmp_path / 'nowhere'}, which is not a folder" in one_error_line(done)


def test_an_alias_bomb_in_a_recipe_folder_stalls_nothing(tmp_path):
    """A 300-byte YAML file whose aliases expand to 10^9 values, in FLUXRECIPE_RECIPE_PATH: --help still lists
    the recipes (no file is parsed to list them), and choosing it is one error."""
    levels = ["a: &a [x, x, x, x, x, x, x, x, x, x]"] + [f"{c}: &{c} [{', '.join([f'*{p}'] * 10)}]" for p, c in zip("abcdefgh", "bcdefghi")]
    write_recipe(tmp_path / "r", "bomb", "\n".join(levels) + "\n")
    env = {"FLUXRECIPE_RECIPE_PATH": str(tmp_path / "r")}
    listed = run_cli(["--help"], cwd=tmp_path, env=env, timeout=120)
    assert listed.returncode == 0 and "recipe: bake_lora, bomb, convert_lora, demo" in listed.stdout
    chosen = run_cli(["recipe=bomb"], cwd=tmp_path, env=env, timeout=120)
    assert "expands to more than" in one_error_line(chosen)


def test_version_is_fluxrecipe_s(tmp_path):
    from fluxrecipe import __version__

    done = run_cli(["--version"], cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.strip() == f"fluxrecipe {__version__}"


def test_tab_completion_through_the_fluxrecipe_command(tmp_path):
    """Hydra's completion, as its bash function calls it: the recipe names complete, and --hydra-help's
    install line names the `fluxrecipe` command (not `python .../__main__.py`, which cannot run)."""
    done = run_cli(["-sc", "query=bash"], cwd=tmp_path, env={"COMP_LINE": "fluxrecipe recipe="})
    assert done.returncode == 0, done.stderr
    assert {"recipe=demo", "recipe=krea_schnell"} <= set(done.stdout.split())
    hydra_help = run_cli(["--hydra-help"], cwd=tmp_path)
    assert 'eval "$(fluxrecipe -sc install=bash)"' in hydra_help.stdout
    assert "__main__.py" not in hydra_help.stdout


def test_stdout_a_closed_pipe_is_no_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run(
        f"{sys.executable} -m fluxrecipe recipe=demo dry_run=true output=out | head -c0", shell=True, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert "Traceback" not in done.stderr and "Exception ignored" not in done.stderr, done.stderr


def test_stderr_closed_is_no_crash(tmp_path):
    """`2>&-`: the error has nowhere to go, but the exit status still says it, and nothing is written."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run(f"{sys.executable} -m fluxrecipe recipe=demo +dryrun=true 2>&-", shell=True, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "Traceback" not in done.stdout
    assert list(tmp_path.iterdir()) == []


# --- issue 21: a missing extra (item 10), relative paths (item 12) ------------------------------------------

WITHOUT = """import importlib.abc, runpy, sys
BLOCKED = {blocked!r}
class NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in BLOCKED):
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None
sys.meta_path.insert(0, NotInstalled())
runpy.run_module("fluxrecipe", run_name="__main__", alter_sys=True)
"""


@pytest.mark.parametrize(
    "blocked, args, says",
    [
        (["hydra_plugins.hydra_joblib_launcher", "joblib"], ["-m", "recipe=demo", "recipe.alpha=0.1,0.2", "hydra/launcher=joblib"],
         "hydra/launcher=joblib needs the sweep extra (hydra_plugins.hydra_joblib_launcher, joblib not installed): pip install 'fluxrecipe[sweep]'"),
        (["hydra_plugins.hydra_submitit_launcher", "submitit"], ["-m", "recipe=demo", "recipe.alpha=0.1,0.2", "hydra/launcher=submitit_local"],
         "hydra/launcher=submitit_local needs the sweep extra (hydra_plugins.hydra_submitit_launcher, submitit not installed): pip install 'fluxrecipe[sweep]'"),
        (["transformers", "accelerate"], ["recipe=demo", "preview=true", "dry_run=true"],
         "preview=true needs the preview extra (transformers, accelerate not installed): pip install 'fluxrecipe[preview]'"),
    ],
    ids=["joblib", "submitit", "preview"],
)
def test_a_missing_extra_is_one_line_naming_the_pip_install(tmp_path, blocked, args, says):
    """The README's `hydra/launcher=joblib` sweep after `make demo` (which installs no extra) was a 20-line
    traceback. Here the extra's modules cannot be imported, as where it is not installed."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run([sys.executable, "-c", WITHOUT.format(blocked=blocked), *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert one_error_line(done) == f"fluxrecipe: error: {says}"
    assert list(tmp_path.iterdir()) == []


def test_a_path_on_the_command_line_is_found_from_the_working_folder(tmp_path, schnell, krea):
    """Relative paths (issue 21, item 12): a path written in a recipe file is found from the recipe file's
    folder; a path given on the command line from the working folder, never beside the recipe (it was: the
    same name beside the recipe shadowed the user's file)."""
    work = tmp_path / "work"
    write_recipe(work / "recipes", "mine", "sources: {a: models/m}\nrules: [{match: '.*', op: 'take:a'}]\n")
    (work / "recipes" / "models").mkdir()
    (work / "recipes" / "models" / "m").symlink_to(krea)  # beside the recipe
    (work / "models").mkdir()
    (work / "models" / "m").symlink_to(schnell)  # in the working folder
    beside = run_cli(["recipe=recipes/mine.yaml", "dry_run=true", "output=out"], cwd=work)
    assert beside.returncode == 0, beside.stderr
    assert f"path {krea.resolve()}" in beside.stdout and "guidance_embeds: true" in beside.stdout  # Krea's
    given = run_cli(["recipe=recipes/mine.yaml", "recipe.sources.a=models/m", "dry_run=true", "output=out"], cwd=work)
    assert given.returncode == 0, given.stderr
    assert f"path {schnell.resolve()}" in given.stdout and "guidance_embeds: false" in given.stdout  # schnell's


def test_the_readme_states_the_relative_paths_rule_once():
    """The rule was in docs/recipes.md only; the issue asks for it in the README, once."""
    readme = (REPO_ROOT / "README.md").read_text()
    assert readme.count("Relative paths") == 1
    rule = " ".join(readme.split("**Relative paths**")[1].split("\n\n")[0].split())
    assert "command line" in rule and "from the working folder" in rule and "recipe file from that file's folder" in rule


# --- help (issue 21, item 15) ----------------------------------------------------------------------------------


def test_help_lists_every_option_with_its_meaning(tmp_path):
    """`--help` dumped the config (names and defaults, no meanings); `fluxrecipe help` and `methods --help`
    were errors. Every option of the composed config is one line, `name=default  meaning`."""
    from conftest import compose
    from omegaconf import OmegaConf

    config = OmegaConf.to_container(compose(["recipe=demo"]))

    def names(node: dict, prefix: str = "") -> set[str]:  # preview.scorers.clip: settings that hold settings
        return set().union(*(names(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}"} for k, v in node.items()))

    options = names({k: v for k, v in config.items() if k not in ("recipe", "hydra")})
    compose([])
    done = run_cli(["--help"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    lines = {m[1]: m[2] for line in done.stdout.splitlines() if (m := re.fullmatch(r"  ([\w.]+)=(?:\S| \S)+ {2,}(\S.*)", line))}
    assert set(lines) == options and all(len(meaning.split()) >= 3 for meaning in lines.values())
    assert lines["lora_rank"].startswith("format=lora or lora_peft: the rank of each factored matrix")
    assert run_cli(["help"], cwd=tmp_path).stdout == done.stdout
    for args in (["methods", "--help"], ["help", "methods"]):
        methods = run_cli(args, cwd=tmp_path)
        assert methods.returncode == 0 and methods.stdout.startswith("usage: fluxrecipe methods [-h] [NAME ...]"), methods.stderr


def test_help_for_a_command_there_is_not_is_one_line(tmp_path):
    """`fluxrecipe help verfy` printed the whole help and exited 0, as if the command existed."""
    done = run_cli(["help", "verfy"], cwd=tmp_path)
    assert done.stdout == ""
    assert one_error_line(done) == "fluxrecipe: error: help verfy: no command 'verfy' (did you mean verify?); the commands: verify, summary, methods"


# --- a full disk on stdout, and a stranger's text in a sweep's summary (issue 21, item 8) ------------------------


@pytest.mark.parametrize("args", [["recipe=demo", "output=out", "progress=false"], ["methods"], ["--help"]], ids=["merge-log", "methods", "help"])
def test_stdout_on_a_full_disk_is_one_line_and_a_failure(tmp_path, args):
    """`> /dev/full`: every log line printed a '--- Logging error ---' block with a traceback, and the merge went
    on. The command stops at the first line it cannot write: one line on stderr, exit status 1."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    with open("/dev/full", "w") as full:
        done = subprocess.run([sys.executable, "-m", "fluxrecipe", *args], cwd=tmp_path, env=env, stdout=full, stderr=subprocess.PIPE, text=True, timeout=300)
    assert done.returncode == 1 and done.stderr == "fluxrecipe: error: standard output: No space left on device\n", done.stderr
    assert not (tmp_path / "out").exists()
