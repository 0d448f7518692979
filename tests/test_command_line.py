"""The command line as a reviewer found it (review-cli): options Hydra hands over as text, the user's own
folders as an output, recipe files chosen by name or by path, a reader that leaves the pipe, options and
settings that do not exist or were deleted, a launcher that cannot start, a run planned once and refused
before Hydra writes anything. Runs `python -m fluxrecipe` in-process (Hydra and all) unless a test needs a
process of its own.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT, shard_files, write_recipe
from sweep_helpers import run_main

TINY = "description: {description}\nsources: {{schnell: '{schnell}', krea: '{krea}'}}\nbase: schnell\nalpha: 0.5\nrules: [{{match: '.*', op: 'lerp:${{recipe.alpha}}'}}]\n"


@pytest.fixture
def recipes(tmp_path, monkeypatch, schnell, krea) -> Path:
    """A recipe folder on FLUXRECIPE_RECIPE_PATH holding `tiny` (a lerp of the tiny schnell and krea)."""
    folder = tmp_path / "recipes"
    write_recipe(folder, "tiny", tiny_recipe(schnell, krea))
    monkeypatch.setenv("FLUXRECIPE_RECIPE_PATH", str(folder))
    return folder


def tiny_recipe(schnell: Path, krea: Path, description: str = "tiny") -> str:
    return TINY.format(description=description, schnell=schnell, krea=krea)


@pytest.fixture
def cli(monkeypatch, tmp_path, capsys):
    """`fluxrecipe ARGS` in-process, from tmp_path unless the test moves; returns (exit status, stdout, stderr)."""
    monkeypatch.chdir(tmp_path)

    def run(*args: str) -> tuple[int, str, str]:
        code = run_main([*args], monkeypatch)
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


def one_line(result: tuple[int, str, str]) -> str:
    """Refused: status 1 and one line on stderr, no traceback."""
    code, out, err = result
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1, err
    assert "Traceback" not in err + out and len(lines) == 1, err
    assert lines[0].startswith("fluxrecipe: error: "), err
    return lines[0]


def ran(result: tuple[int, str, str]) -> str:
    code, out, err = result
    assert code == 0, err
    return out


# --- yes-or-no options (finding 2) -------------------------------------------------------------------------


@pytest.mark.parametrize("option", ["overwrite=no", "dry_run=off", "diagnostics=maybe", "progress=yes", "traceback=maybe", "keep_weights=no", "preview.enabled=yes"])
def test_a_yes_or_no_option_is_true_or_false_only(cli, recipes, tmp_path, option):
    """Hydra hands `overwrite=no` over as the text 'no', which bool() calls true: it overwrote the output."""
    out = tmp_path / "out"
    ran(cli("recipe=tiny", f"output={out}", "progress=false", f"hydra.run.dir={tmp_path / 'first'}"))
    before = [p.read_bytes() for p in shard_files(out)]
    line = one_line(cli("recipe=tiny", f"output={out}", "recipe.alpha=0.9", option))
    assert f"{option.replace('.enabled', '')}: choose true or false" in line
    assert [p.read_bytes() for p in shard_files(out)] == before
    assert not (tmp_path / "outputs").exists()


# --- the user's own folders as an output (finding 4) -------------------------------------------------------


@pytest.mark.parametrize("where", ["working", "parent", "home"])
def test_the_working_and_home_folders_are_never_an_output(cli, recipes, tmp_path, monkeypatch, where):
    """A folder holding only a diffusers config.json counts as a model folder: output=. overwrite=true replaced
    the working folder with the merge."""
    home = tmp_path / "home"
    work = home / "project"
    work.mkdir(parents=True)
    (work / "config.json").write_text(json.dumps({"_class_name": "FluxTransformer2DModel", "_diffusers_version": "0.31.0"}))
    for folder in (home, work):
        (folder / "notes.txt").write_text("mine")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work if where != "home" else tmp_path)
    output = {"working": ".", "parent": "..", "home": "'~'"}[where]  # quoted: Hydra's grammar reads a bare ~ as a deletion
    says = {"working": "is the working folder", "parent": "is a folder that holds the working folder", "home": "is your home folder"}[where]
    for dry_run in ("false", "true"):
        line = one_line(cli("recipe=tiny", f"output={output}", "overwrite=true", f"dry_run={dry_run}", f"hydra.run.dir={tmp_path / 'run'}", "progress=false"))
        assert says in line
    assert sorted(p.name for p in work.iterdir()) == ["config.json", "notes.txt"]
    assert sorted(p.name for p in home.iterdir()) == ["notes.txt", "project"]


# --- recipe files, by name and by path (findings 5, 9, 10, 11, 15, 19) ------------------------------------


def test_a_symlink_loop_in_a_recipe_folder_breaks_nothing_else(cli, recipes):
    (recipes / "a.yaml").symlink_to("b.yaml")
    (recipes / "b.yaml").symlink_to("a.yaml")
    code, out, _ = cli("--help")
    assert code == 0 and "recipe: a, b, bake_lora" in out
    assert "a.yaml: Too many levels of symbolic links" in one_line(cli("recipe=a", "dry_run=true"))
    assert "recipe tiny (" in ran(cli("recipe=tiny", "dry_run=true", "output=out"))


@pytest.mark.parametrize("name", ["true", "False", "null", "nan", "inf", "2024", "1e3"])
def test_a_recipe_named_like_a_value_of_hydra(cli, recipes, schnell, krea, name):
    write_recipe(recipes, name, tiny_recipe(schnell, krea))
    assert f"recipe {name} (" in ran(cli(f"recipe={name}", "dry_run=true", "output=out"))


@pytest.mark.parametrize("name", ["null", "true"])
def test_no_recipe_of_such_a_name_is_one_line(cli, name):
    assert f"no recipe '{name}' (recipes: bake_lora, convert_lora, demo" in one_line(cli(f"recipe={name}"))


def test_a_mistyped_recipe_name_is_one_line(cli):
    assert "no recipe 'demoo' (did you mean demo?)" in one_line(cli("recipe=demoo"))


def test_a_recipe_path_with_an_equals_sign_or_commas(cli, tmp_path, schnell, krea):
    """A sweep's job folder is named like `alpha=0.5,recipe=tiny`: the model card's rebuild command,
    recipe=THAT_FOLDER/transformer/recipe.yaml, must run."""
    for path in (tmp_path / "a" / "x=y.yaml", tmp_path / "sweep" / "alpha=0.5,recipe=tiny" / "transformer" / "recipe.yaml"):
        write_recipe(path.parent, path.stem, tiny_recipe(schnell, krea))
        relative = path.relative_to(tmp_path)
        assert f"recipe {path.stem} ({path})" in ran(cli(f"recipe={relative}", "dry_run=true", "output=out"))


def test_a_recipe_path_is_that_exact_file(cli, tmp_path, schnell, krea):
    """Two files of the same name in two folders are two recipes in a sweep; mine.yml is not mine.yaml."""
    for folder, text in (("a", "from a"), ("b", "from b")):
        write_recipe(tmp_path / folder, "mine", tiny_recipe(schnell, krea, text))
    (tmp_path / "a" / "mine.yml").write_text(tiny_recipe(schnell, krea, "from a, yml"))
    out = ran(cli("-m", "recipe=a/mine.yaml,b/mine.yaml", "dry_run=true", f"hydra.sweep.dir={tmp_path / 'sweep'}"))
    assert "== job 0: recipe=a_mine.yaml\nrecipe mine" in out and "== job 1: recipe=b_mine.yaml\nrecipe mine" in out
    assert "\n  from a\n" in out and "\n  from b\n" in out
    assert "\n  from a, yml\n" in ran(cli("recipe=./a/mine.yml", "dry_run=true", "output=out"))


def test_a_recipe_file_named_with_an_escape_is_ignored_and_listed(cli, recipes, schnell, krea):
    """A name holding a terminal escape would reach the terminal raw through --help and tab completion."""
    write_recipe(recipes, "x\x1b[31mRED", tiny_recipe(schnell, krea))
    code, out, _ = cli("--help")
    assert code == 0 and "\x1b" not in out
    assert "recipe: bake_lora, convert_lora, demo" in out and "tiny, to_bfl, to_comfyui_fp8" in out
    assert "Ignored (a recipe file's name may hold only A-Z a-z 0-9 _ . -; rename it, or give it as recipe=PATH): 'x\\x1b[31mRED.yaml'" in out
    os.environ["COMP_LINE"] = "fluxrecipe recipe="
    try:
        code, out, _ = cli("-sc", "query=bash")
    finally:
        del os.environ["COMP_LINE"]
    assert code == 0 and "recipe=tiny" in out.split() and "\x1b" not in out


# --- a reader that leaves the pipe (finding 6) -------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [["methods"], ["verify", "{out}"], ["--help"], ["-m", "recipe=demo", "recipe.alpha=0.1,0.2", "dry_run=true", "hydra.sweep.dir={tmp}/sweep"], ["recipe=demo", "dry_run=true", "output={tmp}/o"]],
    ids=["methods", "verify", "help", "sweep-dry-run", "dry-run"],
)
def test_a_reader_that_leaves_the_pipe_is_no_traceback(tmp_path, schnell, args):
    """`fluxrecipe methods | head -1`: stdout is a pipe whose reader is gone (closed here before the command
    starts, so that the first write fails, whatever its size)."""
    read, write = os.pipe()
    os.close(read)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    argv = [a.format(out=schnell, tmp=tmp_path) for a in args]
    try:
        done = subprocess.run([sys.executable, "-m", "fluxrecipe", *argv], cwd=tmp_path, env=env, stdout=write, stderr=subprocess.PIPE, text=True, timeout=300)
    finally:
        os.close(write)
    assert done.returncode == 1 and done.stderr == "", done.stderr
    assert not (tmp_path / "sweep").exists() and not (tmp_path / "o").exists()


# --- options: settings that do not exist, options deleted (findings 8, 16) ----------------------------------


@pytest.mark.parametrize(
    "override, says",
    [
        ("+preview.stepz=8", "unknown option 'preview.stepz' (did you mean preview.steps?)"),
        ("+preview.prompt=[a fox]", "unknown option 'preview.prompt' (did you mean preview.prompts?)"),
        ("threads.x=1", "unknown option 'threads.x' (threads has no settings)"),
        ("~threads", "option 'threads' has no value (~threads deletes it): every option needs one; set it (threads=0 is its default) instead"),
        ("~preview.steps", "option 'preview.steps' has no value (~preview.steps deletes it)"),
        ("~preview", "option 'preview' has no value (~preview deletes it): every option needs one; set its settings (preview.NAME=VALUE) instead"),
    ],
)
def test_an_option_setting_that_does_not_exist_or_is_deleted(cli, override, says):
    assert says in one_line(cli("recipe=demo", override, "dry_run=true"))


def test_options_are_checked_in_the_composed_config_too():
    """The same checks where no command line came first (a config composed by a launcher, or by hand)."""
    from conftest import compose
    from fluxrecipe.errors import UsageError
    from fluxrecipe.cli.settings import options_of

    with pytest.raises(UsageError, match=r"unknown option 'preview.stepz' \(did you mean preview.steps\?\)"):
        options_of(compose(["recipe=demo", "+preview.stepz=8"]))
    with pytest.raises(UsageError, match="option 'threads' has no value"):
        options_of(compose(["recipe=demo", "~threads"]))
    compose([])


# --- a setting that would change nothing (issue 21, item 2) ------------------------------------------------


@pytest.mark.parametrize(
    "args, says",
    [
        (["recipe=every_rule", "+recipe.dtype=fp8_scaled"], "dtype fp8_scaled changes nothing: every rule sets its own dtype; set the dtype of the rules it should apply to instead (e.g. recipe.rules.1.dtype=fp8_scaled)"),
        (["recipe=every_rule", "recipe.dtype=fp8_scaled"], "dtype fp8_scaled changes nothing: every rule sets its own dtype"),
        (["recipe=tiny", "recipe.alhpa=0.3"], "recipe.alhpa: recipe 'tiny' has no 'alhpa' (did you mean recipe.alpha?)"),
        (["recipe=tiny", "recipe.sources.kreaa=x"], "recipe.sources.kreaa: recipe 'tiny' has no 'kreaa' (did you mean recipe.sources.krea?)"),
        (["recipe=tiny", "recipe.rules.0.dtpye=fp8"], "recipe.rules.0.dtpye: recipe 'tiny' has no 'dtpye' (did you mean recipe.rules.0.dtype?)"),
        (["recipe=tiny", "recipe.rules.3.dtype=fp8"], "recipe.rules.3: recipe 'tiny' has no '3' (it has: 0)"),
        (["recipe=tiny", "lora_rank=8"], "lora_rank=8 changes nothing: format=diffusers writes no LoRA; lora_rank is the rank of format=lora or lora_peft or lora_comfyui"),
        (["recipe=tiny", "format=bfl", "shard_size=1GB"], "shard_size=1GB changes nothing: format=bfl writes one file; shards are for format=diffusers (a folder)"),
        (["recipe=every_rule", "+recipe.sources.other=elsewhere"], "recipe.sources.other changes nothing: no rule of recipe 'every_rule' reads source 'other', and it is not the base; name it in a rule (take:other, or a rule's sources), make it the base (recipe.base=other, as a LoRA extraction needs), or leave it out"),
        (["recipe=tiny", "format=comfyui", "diagnostics=true"], "diagnostics=true changes nothing: format=comfyui writes one file, which carries no diagnostics (none are computed); diagnostics.json is written beside a folder's shards (format=diffusers)"),
        (["recipe=tiny", "preview.steps=8", "preview.height=64"], "preview.height=64, preview.steps=8 changes nothing without preview=true"),
        (["recipe=tiny", "format=diffusers", "+recipe.format=bfl"], "recipe.format=bfl changes nothing: format=diffusers is given as well, and wins"),
    ],
    ids=["plus-dtype-every-rule-sets", "dtype-every-rule-sets", "parameter-typo", "source-typo", "rule-field-typo", "no-such-rule", "lora-rank-without-lora", "shard-size-one-file", "source-no-rule-reads", "diagnostics-one-file", "preview-setting-without-preview", "recipe-format-beside-format"],
)
def test_a_setting_that_would_change_nothing_is_refused(cli, recipes, tmp_path, schnell, args, says):
    """`+recipe.dtype=fp8_scaled` on to_comfyui_fp8, whose every rule set its own dtype (Hydra's own advice for
    `recipe.dtype=`), wrote plain fp8 and exited 0 (every_rule is that recipe); lora_rank, shard_size or a
    preview setting the run ignores did nothing, silently; a typo under recipe. got Hydra's advice to add `+`.
    Each is one line saying why and what would work, and nothing is written."""
    write_recipe(recipes, "every_rule", f"sources: {{model: '{schnell}'}}\nformat: comfyui\nrules:\n  - {{match: 'x_embedder', op: 'take:model', dtype: bf16}}\n  - {{match: '.*', op: 'take:model', dtype: fp8}}\n")
    one_file = "format=bfl" in args or "format=comfyui" in args or "recipe=every_rule" in args
    line = one_line(cli(*args, f"output={'merged.safetensors' if one_file else 'merged'}"))
    assert says in line
    assert "+recipe" not in line and "To append to your config" not in line  # never Hydra's advice to add `+`
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipes"]


@pytest.mark.parametrize(
    "override, says",
    [
        ("recipe.alpha.transformer_blocks.0=0.2", "recipe.alpha.transformer_blocks.0: 'transformer_blocks.0' is not a FLUX block name (did you mean"),
        ("recipe.alpha.double_blocks.1.x=0.2", "recipe.alpha.double_blocks.1.x: 'double_blocks.1.x' is not a FLUX block name"),
        ("recipe.alpah.double_blocks.1=0.2", "recipe.alpah: recipe 'tiny' has no 'alpah' (did you mean recipe.alpha?)"),
        ("~recipe.alhpa", "~recipe.alhpa: recipe 'tiny' has no 'alhpa' (did you mean recipe.alpha?)"),
        ("recipe.rules.0.match.x=1", "recipe.rules.0.match.x: recipe 'tiny' gives recipe.rules.0.match one value ('.*'), not a mapping: set recipe.rules.0.match=VALUE"),
        ("recipe.base.path=x", "recipe.base.path: recipe 'tiny' gives recipe.base one value ('schnell'), not a mapping: set recipe.base=VALUE"),
    ],
    ids=["block-name", "below-a-block", "parameter-typo-of-a-block", "deleted-typo", "below-a-value", "below-a-field"],
)
def test_a_recipe_override_hydra_cannot_apply_is_fluxrecipes_own_line(cli, recipes, tmp_path, monkeypatch, override, says):
    """Each gave Hydra's page: 'To append to your config use +recipe...' (advice that adds a value no rule
    reads) or 'Could not delete from config'. One line of fluxrecipe's own, naming what would work."""
    from fluxrecipe.recipe import BLOCK_OVERRIDES_ENV

    monkeypatch.setenv(BLOCK_OVERRIDES_ENV, "")
    line = one_line(cli("recipe=tiny", override, "dry_run=true", "output=out"))
    assert line == f"fluxrecipe: error: {says}" if says.endswith(("?)", "VALUE")) else says in line
    assert "+recipe" not in line and "To append" not in line and "Could not" not in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipes"]


def test_a_block_range_on_the_command_line(cli, recipes, schnell, krea, monkeypatch):
    """`recipe.alpha.double_blocks.0-1=0.75` was Hydra's LexerNoViableAltException (a key part may not begin
    with a digit): it sets the range as the recipe file's `double_blocks: {0-1: 0.75}` does, beside the
    schedule's other blocks; a value that is not one number (a sweep) is one line naming the form that works."""
    from fluxrecipe.recipe import BLOCK_OVERRIDES_ENV

    monkeypatch.setenv(BLOCK_OVERRIDES_ENV, "")
    write_recipe(recipes, "blocks", tiny_recipe(schnell, krea).replace("alpha: 0.5", "alpha: {default: 0.5, single_blocks: {1: 0.25}}"))
    out = ran(cli("recipe=blocks", "recipe.alpha.double_blocks.0-1=0.75", "dry_run=true", "output=out"))
    assert "alpha={default: 0.5, double_blocks.0-1: 0.75, single_blocks.1: 0.25}" in out
    out = ran(cli("recipe=tiny", "recipe.alpha.double_blocks.0-1=0.75", "dry_run=true", "output=out"))
    assert "alpha={default: 0.5, double_blocks.0-1: 0.75}" in out
    line = one_line(cli("-m", "recipe=tiny", "recipe.alpha.double_blocks.0-1=0.25,0.75", "dry_run=true"))
    assert line == "fluxrecipe: error: recipe.alpha.double_blocks.0-1=0.25,0.75: Hydra reads no key that begins with a digit and holds '-': write the range in the value, as 'recipe.alpha.double_blocks={0-1: VALUE}'"


@pytest.mark.parametrize("plus", ["+", "++"])
def test_a_recipe_value_given_with_hydras_plus_is_set(cli, recipes, tmp_path, monkeypatch, schnell, krea, plus):
    """`+recipe.dtype=fp8_scaled` (Hydra's habit, and its own advice) on a recipe that has a dtype was Hydra's
    'Could not append to config. An item is already at recipe.dtype', on a single run and in every job of a
    sweep. A value the recipe has, or may have, is set, with one plus, two, or none."""
    from fluxrecipe.recipe import BLOCK_OVERRIDES_ENV

    monkeypatch.setenv(BLOCK_OVERRIDES_ENV, "")
    write_recipe(recipes, "blocks", tiny_recipe(schnell, krea).replace("alpha: 0.5", "alpha: {default: 0.5, double_blocks: {1: 0.25}}"))
    out = ran(cli("recipe=tiny", f"{plus}recipe.alpha=0.3", f"{plus}recipe.dtype=fp16", "dry_run=true", "output=out"))
    assert "lerp:0.3" in out and "F16" in out
    out = ran(cli("recipe=blocks", f"{plus}recipe.alpha.double_blocks.1=0.75", "dry_run=true", "output=out"))
    assert "alpha={default: 0.5, double_blocks.1: 0.75}" in out
    ran(cli("-m", "recipe=tiny", f"{plus}recipe.alpha=0.1,0.2", f"{plus}recipe.dtype=fp16", "dry_run=true", f"hydra.sweep.dir={tmp_path / 'sweep'}"))


def test_a_launcher_setting_without_its_launcher_is_refused(cli, recipes, tmp_path):
    """`hydra.launcher.n_jobs=4` (as the sweeps page says to raise it) without `hydra/launcher=joblib` was
    Hydra's page, advising `+hydra.launcher.n_jobs=4`: a setting the basic launcher would ignore."""
    line = one_line(cli("-m", "recipe=tiny", "recipe.alpha=0,1", "hydra.launcher.n_jobs=4", f"hydra.sweep.dir={tmp_path / 'sweep'}"))
    assert line == (
        "fluxrecipe: error: hydra.launcher.n_jobs=4 changes nothing: the basic launcher (the default) runs the jobs one at a time "
        "and has no settings; choose the launcher it belongs to first: hydra/launcher=joblib, submitit_local, submitit_slurm or slurm"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipes"]


def test_a_launcher_without_a_sweep_is_refused(cli, recipes, tmp_path):
    """A single run starts no launcher: `hydra/launcher=joblib` without -m ran one merge, as without it."""
    line = one_line(cli("recipe=tiny", "hydra/launcher=joblib", "output=out"))
    assert line == "fluxrecipe: error: hydra/launcher=joblib changes nothing without -m: a launcher runs the jobs of a sweep, and a single run is one job; add -m"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipes"]


def test_a_launcher_chosen_with_hydras_plus_is_chosen(cli, recipes, tmp_path):
    """`+hydra/launcher=joblib` was Hydra's 'Multiple values for hydra/launcher'."""
    ran(cli("-m", "recipe=tiny", "recipe.alpha=0,1", "+hydra/launcher=joblib", "hydra.launcher.n_jobs=1", "dry_run=true", f"hydra.sweep.dir={tmp_path / 'sweep'}"))


def test_a_single_file_computes_no_diagnostics(recipes, tmp_path):
    """A single file carries no diagnostics, yet every merge into one computed them (~30% of a merge's time
    on 2 cores) and threw them away."""
    from conftest import merge

    result = merge(["recipe=tiny", "format=bfl", f"output={tmp_path / 'm.safetensors'}", "progress=false"])
    assert result.distances is None and (tmp_path / "m.safetensors").is_file()
    result = merge(["recipe=tiny", f"output={tmp_path / 'folder'}", "progress=false"])
    assert result.distances is not None and (tmp_path / "folder" / "diagnostics.json").is_file()


def test_a_recipe_value_a_recipe_may_have_is_set_without_plus(cli, recipes, tmp_path, schnell):
    """recipe.dtype on a recipe that names none (Hydra asks for `+`), a rule's dtype: set as asked."""
    write_recipe(recipes, "nodtype", f"sources: {{a: '{schnell}'}}\nrules: [{{match: 'x_embedder', op: 'take:a', dtype: fp32}}, {{match: '.*', op: 'take:a'}}]\n")
    assert "total: 108 tensors in 1 file(s), F16/F32;" in ran(cli("recipe=nodtype", "recipe.dtype=fp16", "dry_run=true", "output=out"))
    write_recipe(recipes, "every_rule", f"sources: {{model: '{schnell}'}}\nformat: comfyui\nrules:\n  - {{match: 'x_embedder', op: 'take:model', dtype: bf16}}\n  - {{match: '.*', op: 'take:model', dtype: fp8}}\n")
    out = ran(cli("recipe=every_rule", "recipe.rules.1.dtype=fp8_scaled", "dry_run=true", "output=m.safetensors"))
    assert "take:model -> fp8_scaled" in out and "BF16/F8_E4M3 scaled" in out


# --- run records only where a user expects them (issue 21, item 14) ----------------------------------------


def test_a_run_given_its_output_leaves_nothing_else_in_the_working_folder(cli, recipes, tmp_path):
    """Every run left outputs/DATE/TIME/ (.hydra/ and a log) in the working folder, even with output=."""
    out = ran(cli("recipe=tiny", "output=merged", "progress=false"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged", "recipes"] and shard_files(tmp_path / "merged")
    assert not list(tmp_path.glob("*.log")) and not (tmp_path / ".hydra").exists()
    assert f"wrote {tmp_path / 'merged'}: 108 tensors" in out  # the log still reaches the terminal
    ran(cli("recipe=tiny", "output=again", "progress=false", f"hydra.run.dir={tmp_path / 'records'}"))  # a folder asked for is made
    assert (tmp_path / "records" / ".hydra" / "overrides.yaml").is_file() and (tmp_path / "records" / "fluxrecipe.log").is_file()
    ran(cli("recipe=tiny", "progress=false"))  # no output=: the model goes into the run folder, as before
    assert len(list(tmp_path.glob("outputs/*/*/transformer/*.safetensors"))) == 1


# --- a launcher that cannot start (finding 14) --------------------------------------------------------------


def test_slurm_without_slurm_is_refused_by_the_preflight(cli, recipes, tmp_path, monkeypatch):
    """submitit looked for `srun` only as it launched: a traceback, after the sweep folder was made."""
    monkeypatch.setenv("PATH", str(Path(sys.executable).parent))  # python, and no srun
    code, _, err = cli("-m", "recipe=tiny", "recipe.alpha=0.2,0.4", "hydra/launcher=slurm", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert code == 1 and "Traceback" not in err
    assert "sweep: hydra/launcher=slurm: this machine has no SLURM (no `srun` on the PATH)" in err and "nothing was started" in err
    assert not (tmp_path / "sweep").exists()


# --- planned once, refused before Hydra writes (findings 12, 17) ---------------------------------------------


@pytest.fixture
def plans(monkeypatch) -> list[str]:
    """The recipes planned (api.plan called) from now on."""
    from fluxrecipe import api

    planned, real = [], api.plan
    monkeypatch.setattr(api, "plan", lambda recipe, *a, **k: planned.append(recipe.name) or real(recipe, *a, **k))
    return planned


def test_a_run_is_planned_once(cli, recipes, tmp_path, plans, pipeline_files):
    """Its pre-flight plans it (sources opened, every regex run, hub sources fetched); the job runs on that plan.
    A single run planned two or three times, a sweep's job twice."""
    ran(cli("recipe=tiny", "output=out", "progress=false"))
    assert plans == ["tiny"] and shard_files(tmp_path / "out")
    plans.clear()
    out = ran(cli("recipe=tiny", "output=out2", "dry_run=true", "preview=true", f"preview.pipeline={pipeline_files}"))
    assert plans == ["tiny"] and "previews: 3 prompt(s) x 2 seed(s)" in out
    plans.clear()
    ran(cli("-m", "recipe=tiny", "recipe.alpha=0,1", f"hydra.sweep.dir={tmp_path / 'sweep'}", "progress=false"))
    assert plans == ["tiny", "tiny"] and len(list((tmp_path / "sweep").glob("*/transformer/*.safetensors"))) == 2


def test_a_refused_preview_run_writes_nothing(cli, recipes, tmp_path, pipeline_files):
    """Its checks ran inside the job, after Hydra had made outputs/DATE/TIME."""
    for bad, says in [("preview.steps=0", "preview.steps=0: a whole number"), (f"preview.pipeline={tmp_path / 'none'}", "no such folder"), ("keep_weights=false", "keep_weights=false deletes")]:
        preview = [] if bad.startswith("keep") else ["preview=true", f"preview.pipeline={pipeline_files}"] if not bad.startswith("preview.pipeline") else ["preview=true"]
        assert says in one_line(cli("recipe=tiny", *preview, bad))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipeline", "recipes"]


def test_regexes_have_a_budget_for_the_whole_recipe(cli, recipes, tmp_path, schnell, krea, monkeypatch):
    """Each search of a slow regex stays under its own bound (0.25 s); all of them together did not: optional
    rules with backtracking regexes took minutes on a small model, and longer at FLUX's size. The clock is the
    test's: every search takes 0.1 s of it, so the budget runs out at the 50th search on any machine, under
    any load, and no search comes near its own bound."""
    from fluxrecipe import recipe

    ticks = itertools.count()
    monkeypatch.setattr(recipe, "clock", lambda: next(ticks) * 0.1)  # read before and after each search
    monkeypatch.setattr(recipe, "_matched", {})  # searched by no other test
    slow = "".join(f"  - {{match: 'slow_{n}', op: 'take:krea', optional: true}}\n" for n in range(6))
    write_recipe(recipes, "slow", f"sources: {{schnell: '{schnell}', krea: '{krea}'}}\nbase: schnell\nrules:\n{slow}  - {{match: '.*', op: 'lerp:0.5'}}\n")
    line = one_line(cli("recipe=slow", "dry_run=true", "output=out"))
    assert "slow.yaml:4) rules[0].match: 'slow_0' took " in line
    assert " s of the 5.0 s all the recipe's regexes may take on the model's keys: it backtracks on every key" in line


def test_a_regex_is_searched_once_per_key(recipes, monkeypatch):
    """Planned again (a sweep's jobs, the API), a recipe's regexes are not searched again."""
    from fluxrecipe import api
    from fluxrecipe import recipe as recipe_module

    monkeypatch.setattr(recipe_module, "_matched", {})  # what other tests searched
    recipe = api.load_recipe(recipes / "tiny.yaml")
    rule, searched = recipe.rules[0], []
    real = rule.pattern
    counting = type("Counting", (), {"search": lambda self, key, timeout=None: searched.append(key) or real.search(key, timeout=timeout)})
    object.__setattr__(rule, "pattern", counting())
    api.plan(recipe)
    first = len(searched)
    api.plan(recipe)
    assert first == 108 and len(searched) == first  # every key of the tiny base, once
