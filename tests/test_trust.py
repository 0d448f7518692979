"""Issue 12, in-process: nothing of the user's is ever replaced, no silently wrong merge, hostile recipes and
files bounded, one line for every fault of the file system, and outputs that name no local path.

Tests that guard against a hang use `hang_guard`: an alarm far above the normal time, so that a regression
fails instead of stalling the suite (not a timed assertion).
"""

from __future__ import annotations

import errno
import json
import os
import signal
import shutil
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import load_state, merge, run_recipe, shard_files, source_overrides, tiny_config, write_recipe
from reliability_helpers import assert_no_output, copy_model, digests, leftovers, pair_recipe, use_recipe

from fluxrecipe.errors import FluxRecipeError, OutputError, PlanError, RecipeError, SourceError, UsageError


@contextmanager
def hang_guard(seconds: int):
    def alarm(signum, frame):
        raise TimeoutError(f"still running after {seconds} s: it hangs")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def krea_schnell(schnell, krea, out, *more):
    return merge(["recipe=krea_schnell", *source_overrides(schnell, krea), f"output={out}", "progress=false", *more])


# --- overwrite=true replaces only what fluxrecipe wrote, or a model it can prove ---------------------------


def test_overwrite_refuses_a_folder_that_merely_holds_a_config_json(tmp_path, schnell, krea):
    """`output=~ overwrite=true` with a config.json in the home folder: nothing of it may go."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.json").write_text('{"editor": "vim"}')
    (home / "thesis.tex").write_text("years of work")
    before = digests(home)
    with pytest.raises(OutputError, match=r"is not a model folder: .*'config.json', which is not a model file"):
        krea_schnell(schnell, krea, home, "overwrite=true")
    assert digests(home) == before and leftovers(home) == ["home"]


def test_overwrite_refuses_a_merge_folder_the_user_added_to(tmp_path, schnell, krea):
    out = tmp_path / "out"
    krea_schnell(schnell, krea, out)
    (out / "samples.png").write_bytes(b"the user's images")
    with pytest.raises(OutputError, match=r"'samples.png', which fluxrecipe did not write"):
        krea_schnell(schnell, krea, out, "overwrite=true")
    assert (out / "samples.png").read_bytes() == b"the user's images"


@pytest.mark.parametrize("earlier", ["a-merge", "a-diffusers-folder", "an-empty-folder"])
def test_overwrite_replaces_a_model(tmp_path, schnell, krea, state_of, earlier):
    out = tmp_path / "out"
    if earlier == "a-merge":
        krea_schnell(schnell, krea, out, "recipe.alpha=0.2")
    elif earlier == "a-diffusers-folder":
        copy_model(krea, out)
    else:
        out.mkdir()
    krea_schnell(schnell, krea, out, "overwrite=true")
    assert load_state(out).keys() == state_of(schnell).keys() and leftovers(out) == ["out"]


def test_an_output_that_is_a_link_is_refused(tmp_path, schnell, krea):
    """With overwrite=true the link used to be renamed away, leaving a hidden link that broke every later run."""
    real = tmp_path / "real"
    krea_schnell(schnell, krea, real)
    before = digests(real)
    link = tmp_path / "link"
    link.symlink_to(real)
    for options in ([], ["overwrite=true"]):
        with pytest.raises(OutputError, match=f"{link} is a symbolic link \\(to {real}\\)"):
            krea_schnell(schnell, krea, link, *options)
    assert digests(real) == before and leftovers(link) == ["link"]


def test_a_dangling_link_as_output_is_refused_before_merging(tmp_path, schnell, krea, monkeypatch):
    from fluxrecipe import execute

    link = tmp_path / "out"
    link.symlink_to(tmp_path / "gone")
    monkeypatch.setattr(execute, "execute", lambda *a: pytest.fail("the merge ran"))
    with pytest.raises(OutputError, match="is a symbolic link"):
        krea_schnell(schnell, krea, link)


def test_an_output_name_too_long_is_one_line(tmp_path, schnell, krea):
    out = tmp_path / ("m" * 240)
    with pytest.raises(OutputError, match="the output's name is 240 bytes long, longer than the 234 this folder leaves room for"):
        krea_schnell(schnell, krea, out)
    assert list(tmp_path.iterdir()) == []


def test_a_stale_partial_that_is_a_file_is_removed(tmp_path, schnell, krea):
    (tmp_path / ".out.fluxrecipe-partial").write_text("left by something")
    krea_schnell(schnell, krea, tmp_path / "out")
    assert leftovers(tmp_path / "out") == ["out"]


# --- no silently wrong merge --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, error, says",
    [
        ("+dryrun=true", UsageError, "unknown option 'dryrun' (did you mean dry_run?)"),
        ("+recipe.alhpa=0.3", RecipeError, "parameter 'alhpa' is used by no rule (did you mean alpha?)"),
        ("sweep=alpha_grid", UsageError, "which runs only as a multirun: add -m"),
        ("device=meta", UsageError, "device='meta': choose cpu, cuda or cuda:N"),
    ],
)
def test_a_run_that_would_be_wrong_is_refused(tmp_path, schnell, krea, override, error, says):
    with pytest.raises(error) as e:
        krea_schnell(schnell, krea, tmp_path / "out", override)
    assert says in str(e.value)
    assert_no_output(tmp_path / "out")


def test_a_parameter_used_by_another_used_parameter_counts(recipe_dir, tmp_path, schnell, krea):
    text = f"sources: {{a: '{schnell}', b: '{krea}'}}\nbeta: 0.25\nalpha: ${{recipe.beta}}\nrules: [{{match: '.*', op: 'lerp:${{recipe.alpha}}'}}]\n"
    plan = run_recipe(recipe_dir, tmp_path / "out", text, "dry_run=true")
    assert str(plan.recipe.rules[0].op) == "lerp:0.25"


def big_source(folder: Path, like: Path, value: float, dtype=torch.bfloat16) -> tuple[Path, str]:
    """A copy of `like` whose first tensor holds `value` at one element (finite in the source's dtype)."""
    state = {k: v.to(dtype) for k, v in load_state(like).items()}
    key = sorted(state)[0]
    state[key] = state[key].flatten().index_fill(0, torch.tensor([3]), value).view(state[key].shape)
    folder.mkdir()
    save_file(state, folder / "diffusion_pytorch_model.safetensors", metadata={"format": "pt"})
    shutil.copy(like / "config.json", folder / "config.json")
    return folder, key


def test_overflow_into_the_output_dtype_is_reported(recipe_dir, tmp_path, schnell, caplog):
    """1e5 is a finite bf16 value; fp16 ends at 65504: the value is clamped (never written as Inf), counted,
    said, and recorded."""
    big, key = big_source(tmp_path / "big", schnell, 1e5)
    out = tmp_path / "out"
    result = run_recipe(recipe_dir, out, {"sources": {"big": str(big)}, "rules": [{"match": ".*", "op": "take:big"}], "dtype": "fp16"})
    assert result.clamped == {key: 1} and result.nonfinite == {}
    assert json.loads((out / "fluxrecipe.json").read_text())["clamped"] == {key: 1}
    assert load_state(out)[key].flatten()[3].item() == 65504.0
    assert any("lay beyond their dtype's finite range and were clamped" in r.getMessage() for r in caplog.records)


def test_arithmetic_overflow_is_reported_and_verify_sees_it(recipe_dir, tmp_path, schnell, krea, caplog):
    """An extrapolating lerp of two finite values near bf16's largest overflows float32 itself: it stops the
    merge; with nonfinite=warn the merge goes on, says so, records it, and verify refuses the folder."""
    from fluxrecipe.verify import verify_folder

    big, key = big_source(tmp_path / "big", schnell, 3e38)
    out = tmp_path / "out"
    recipe = {"sources": {"big": str(big), "b": str(schnell)}, "rules": [{"match": ".*", "op": "lerp:-1.5"}]}
    with pytest.raises(OutputError, match=f"'{key}' .* comes out with 1 NaN/Inf values from finite inputs"):
        run_recipe(recipe_dir, out, recipe)
    assert_no_output(out)
    result = run_recipe(recipe_dir, out, recipe, "nonfinite=warn")
    assert result.nonfinite == {f"output: {key}": 1}
    assert json.loads((out / "fluxrecipe.json").read_text())["nonfinite_outputs"] == {key: 1}
    assert any("came out with NaN/Inf values from finite inputs" in r.getMessage() for r in caplog.records)
    found = verify_folder(out).problems
    assert len(found) == 1 and f"tensor '{key}' holds 1 NaN/Inf value(s)" in found[0]


def test_a_config_override_of_the_wrong_type_is_refused(recipe_dir, tmp_path, schnell, krea):
    text = f"sources: {{a: '{krea}'}}\nconfig: {{guidance_embeds: 'false'}}\nrules: [{{match: guidance, op: drop}}, {{match: '.*', op: 'take:a'}}]\n"
    with pytest.raises(PlanError, match=r"guidance_embeds is \"false\" \(str\), but FluxTransformer2DModel takes true or false"):
        run_recipe(recipe_dir, tmp_path / "out", text)
    assert_no_output(tmp_path / "out")


# --- hostile recipes and files, bounded ---------------------------------------------------------------------


def test_a_catastrophic_regex_is_an_error_not_a_hang(recipe_dir, tmp_path, schnell, monkeypatch):
    """A word split every possible way before a test that fails: seconds per key even for the `regex` package
    (Python's `re` takes far longer), for every key of the model. The search's own limit is the one tested:
    the recipe's total budget is lifted (which limit a loaded machine hits first is not this test's business;
    tests/test_command_line.py tests the budget with a clock of its own), and the limit is a hundredth of a
    second, which the search on a key such as 'single_transformer_blocks.0.proj_mlp.weight' (tens of millions
    of ways to split its first word) passes by orders of magnitude on any machine."""
    from fluxrecipe import recipe

    monkeypatch.setattr(recipe, "MATCH_BUDGET_SECONDS", float("inf"))
    monkeypatch.setattr(recipe, "MATCH_SECONDS", 0.01)
    monkeypatch.setattr(recipe, "_matched", {})  # no key's answer remembered from another test
    # one rule, the only regex searched (no other can be the one a loaded machine stops), that every key the
    # catastrophic part lets go of quickly matches through `|.*` (so no key is left without a rule first)
    pattern = "^(?:(\\w|\\w\\w|\\w\\w\\w|\\w\\w\\w\\w|\\w\\w\\w\\w\\w)+\\.\\d|.*)$"
    text = f"sources: {{a: '{schnell}'}}\nrules: [{{match: '{pattern}', op: 'take:a'}}]\n"
    with hang_guard(60), pytest.raises(RecipeError, match=r"rules\[0\]\.match: .* took more than 0.01 s on the key .* backtracks catastrophically"):
        run_recipe(recipe_dir, tmp_path / "out", text, "dry_run=true")


def test_a_catastrophic_regex_on_a_key_of_a_megabyte_is_a_short_line(monkeypatch):
    """The message quoted the key whole: a tensor name of a megabyte made a line of a megabyte (issue 21, item 8)."""
    from fluxrecipe import recipe

    monkeypatch.setattr(recipe, "_matched", {})
    monkeypatch.setattr(recipe, "MATCH_SECONDS", 0.01)
    rule = recipe.load_recipe({"sources": {"a": "x"}, "rules": [{"match": "^(a|aa)+$", "op": "take:a"}]}, "t").rules[0]
    with hang_guard(60), pytest.raises(RecipeError, match="backtracks catastrophically") as e:
        rule.matches("a" * (1 << 20) + "b")
    assert len(str(e.value)) < 1000 and "characters)" in str(e.value)


@pytest.mark.parametrize("layers", [20000, 10**6])
def test_a_config_of_absurd_size_is_refused_before_building_it(recipe_dir, tmp_path, krea, layers):
    text = f"sources: {{a: '{krea}'}}\nconfig: {{num_single_layers: {layers}}}\nrules: [{{match: '.*', op: 'take:a'}}]\n"
    with hang_guard(60), pytest.raises(PlanError, match=f"num_single_layers is {layers}: more than the 100 a FLUX transformer can have"):
        run_recipe(recipe_dir, tmp_path / "out", text, "dry_run=true")


def test_a_source_config_of_absurd_size_is_refused(tmp_path, monkeypatch, schnell, krea):
    broken = copy_model(krea, tmp_path / "k")
    (broken / "config.json").write_text(json.dumps({**json.loads((krea / "config.json").read_text()), "num_single_layers": 20000}))
    recipe = use_recipe(monkeypatch, tmp_path / "recipes", "r", pair_recipe(broken, schnell, rules="[{match: '.*', op: 'take:a'}]"))
    with hang_guard(60), pytest.raises(PlanError, match="num_single_layers is 20000"):
        merge([recipe, f"output={tmp_path / 'out'}", "dry_run=true"])


@pytest.mark.parametrize("name", ["config.json", "diffusion_pytorch_model.safetensors.index.json"])
def test_a_fifo_named_like_a_model_file_does_not_block(tmp_path, monkeypatch, schnell, name):
    broken = copy_model(schnell, tmp_path / "b")
    (broken / name).unlink()
    os.mkfifo(broken / name)
    recipe = use_recipe(monkeypatch, tmp_path / "recipes", "r", pair_recipe(broken, schnell))
    with hang_guard(60), pytest.raises(SourceError, match=f"{broken / name}: not a regular file"):
        merge([recipe, f"output={tmp_path / 'out'}", "dry_run=true"])


class CountedKey(str):
    """A key that counts how often it is hashed or compared: the work a path does per key, counted, not timed."""

    calls = 0

    def __hash__(self) -> int:
        CountedKey.calls += 1
        return str.__hash__(self)

    def __eq__(self, other: object) -> bool:
        CountedKey.calls += 1
        return str.__eq__(self, other)


def test_the_missing_key_path_is_not_quadratic():
    """4 000 keys, half of them missing from the second source: one message, with work in proportion to the
    keys. It rebuilt a set of the missing keys for every key, 45 s at 20 000 keys: n * n / 2 hashes, here 8
    million, against the few per key a linear path takes."""
    from fluxrecipe.plan import make_plan
    from fluxrecipe.recipe import load_recipe
    from fluxrecipe.formats.layout import Piece, TensorRef
    from fluxrecipe.sources import Checkpoint

    def checkpoint(name, keys):
        file = f"/nowhere/{name}/x.safetensors"
        return Checkpoint(name, f"/nowhere/{name}", {k: TensorRef(name, k, k, "BF16", (1,), (Piece(file, 0, 2),)) for k in keys}, tiny_config(False))

    keys = [CountedKey(f"single_transformer_blocks.{i}.proj_mlp.weight") for i in range(4_000)]
    checkpoints = {"a": checkpoint("a", keys), "b": checkpoint("b", keys[::2])}
    recipe = load_recipe({"sources": {"a": "x", "b": "y"}, "rules": [{"match": ".*", "op": "average"}]}, "t")
    CountedKey.calls = 0
    with hang_guard(600), pytest.raises(PlanError) as e:
        make_plan(recipe, checkpoints, 10**9)
    assert "which lacks them" in str(e.value) and len(str(e.value)) < 1000
    assert len(keys) <= CountedKey.calls <= 50 * len(keys)


def test_a_lora_as_a_source_is_named_in_one_short_line(tmp_path, monkeypatch, schnell, state_of):
    lora = tmp_path / "lora.safetensors"
    tensors = {f"transformer.{k.removesuffix('.weight')}.lora_A.weight": torch.zeros(4, 4) for k in state_of(schnell) if k.endswith(".weight")}
    save_file(tensors, lora)
    recipe = use_recipe(monkeypatch, tmp_path / "recipes", "r", pair_recipe(schnell, lora))
    with pytest.raises(FluxRecipeError) as e:
        merge([recipe, f"output={tmp_path / 'out'}"])
    message = str(e.value)
    assert len(message) < 1000 and "LoRA" in message and "\n" not in message


def test_another_model_as_a_source_is_named_in_one_short_line(tmp_path, monkeypatch, schnell, state_of):
    """A source that shares few of the base's keys (another model's file, named like a FLUX one): one short
    line, not a regex listing every key it lacks (55 KB)."""
    other = tmp_path / "other.safetensors"
    state = state_of(schnell)
    save_file({k: v for k, v in list(state.items())[: len(state) // 4]} | {"encoder.layers.0.weight": torch.zeros(2, 2)}, other)
    recipe = use_recipe(monkeypatch, tmp_path / "recipes", "r", pair_recipe(schnell, other))
    with pytest.raises(FluxRecipeError) as e:
        merge([recipe, f"output={tmp_path / 'out'}"])
    message = str(e.value)
    assert len(message) < 1000 and "\n" not in message


def test_a_damaged_architecture_cache_is_rebuilt(tmp_path, schnell, krea):
    krea_schnell(schnell, krea, tmp_path / "out", "dry_run=true")
    cache = Path(os.environ["FLUXRECIPE_CACHE"]) / "architectures"
    damaged = {}
    for entry in cache.glob("*.json"):
        damaged[entry] = entry.read_bytes()
        entry.write_text('{"x_embedder.weight": 3}')
    try:
        plan = krea_schnell(schnell, krea, tmp_path / "out", "dry_run=true")
        assert plan.steps
    finally:
        for entry, data in damaged.items():
            entry.write_bytes(data)


# --- the file system's refusals are one line ----------------------------------------------------------------


def test_an_output_under_a_file_is_one_line(tmp_path, schnell, krea):
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(FluxRecipeError, match="a-file"):
        krea_schnell(schnell, krea, tmp_path / "a-file" / "out")


def test_a_permission_refused_on_the_output_is_one_line(tmp_path, monkeypatch, schnell, krea):
    """What a read-only output folder gives a user who is not root (the tests may run as root, who is never
    refused): the OS's refusal to create the lock file beside the output."""
    from fluxrecipe import writer

    real_open = os.open

    def refusing(path, flags, *args):
        if str(path).endswith(".fluxrecipe-lock"):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(writer.os, "open", refusing)
    with pytest.raises(FluxRecipeError) as e:
        krea_schnell(schnell, krea, tmp_path / "out")
    assert str(e.value) == f"{tmp_path / '.out.fluxrecipe-lock'}: Permission denied"
    assert_no_output(tmp_path / "out")


# --- outputs name no local path, and replay from anywhere --------------------------------------------------


def test_outputs_hold_no_absolute_local_path(tmp_path, schnell, krea, monkeypatch):
    out = tmp_path / "merged" / "out"
    krea_schnell(schnell, krea, out)
    roots = {str(schnell.parent.parent), str(tmp_path), os.path.expanduser("~")}
    for file in sorted(out.iterdir()):
        data = file.read_bytes()
        for root in roots:
            assert root.encode() not in data, f"{file.name} holds {root}"
    pinned = json.loads(json.dumps(__import__("yaml").safe_load((out / "recipe.yaml").read_text())))
    provenance = json.loads((out / "fluxrecipe.json").read_text())
    assert pinned["sources"]["schnell"] == {"path": os.path.relpath(schnell, out), "content_hash": provenance["sources"]["schnell"]["content_hash"]}
    assert provenance["recipe_file"] == "krea_schnell.yaml"

    # its recipe.yaml runs from anywhere: relative paths are found from the recipe's folder too
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FLUXRECIPE_RECIPE_PATH", str(out))
    again = tmp_path / "merged" / "again"
    merge(["recipe=recipe", f"output={again}", "progress=false"])
    assert [p.read_bytes() for p in shard_files(again)] == [p.read_bytes() for p in shard_files(out)]


def test_recipe_text_is_escaped_on_the_terminal_and_in_the_card(recipe_dir, tmp_path, schnell, capsys):
    evil = "\x1b[2J\x1b[1A[0] '.*'  take:a  fake line\u202e"
    text = json.dumps({"description": evil, "sources": {"a": str(schnell)}, "rules": [{"match": "`x`|\x1b|zzz", "op": "take:a", "optional": True}, {"match": ".*", "op": "take:a"}]})
    run_recipe(recipe_dir, tmp_path / "out", text, "dry_run=true")
    shown = capsys.readouterr().out
    assert "\x1b" not in shown and "\u202e" not in shown and "\\x1b[2J" in shown
    run_recipe(recipe_dir, tmp_path / "out", text)
    card = (tmp_path / "out" / "README.md").read_text()
    assert "\x1b" not in card and "\u202e" not in card
    assert "| 0 | `` `x`\\|\\x1b\\|zzz `` |" in card  # a code span no backtick ends early; the pipes escaped


def test_a_recipe_name_with_escapes_is_shown_escaped(tmp_path, monkeypatch, capsys):
    from fluxrecipe.cli.exits import fail

    folder = tmp_path / "recipes"
    path = write_recipe(folder, "bad\x1b[31m", "sources: {a: x}\nrules: []\n")  # not a recipe name (see test_cli_recipes): run by its path
    with pytest.raises(RecipeError) as e:
        merge([f"recipe='{path}'", f"output={tmp_path / 'out'}"])
    with pytest.raises(SystemExit):
        fail(e.value, False)
    err = capsys.readouterr().err
    assert "\x1b" not in err and "bad\\x1b[31m" in err
