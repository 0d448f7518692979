"""The user errors of issue 2 (item 10), run in-process on real sources: each is one message that names the
recipe line, key or file at fault, and nothing is written under the output's name (not even its parent)."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import save_file

from conftest import config_of, load_state, merge, run_recipe, shard_files, source_overrides
from fluxrecipe.errors import OutputError, PlanError, RecipeError, SourceError, UsageError


def refused(error: type, fragments: list[str], run, out) -> str:
    """Run `run()`, expect `error` whose one-line message holds every fragment, and no trace of the output."""
    with pytest.raises(error) as e:
        run()
    message = str(e.value)
    for fragment in fragments:
        assert fragment in message
    assert "\n" not in message
    assert not out.parent.exists()
    return message


def fault_line(text: str) -> int:
    return next(i for i, t in enumerate(text.splitlines(), 1) if "# FAULT" in t)


@pytest.fixture
def out(tmp_path):
    return tmp_path / "merged" / "transformer"


@pytest.fixture
def odd_krea(tmp_path, state_of, krea):
    """Krea as one .safetensors file (its folder's config.json beside it), one tensor reshaped."""
    state = dict(state_of(krea))
    state["transformer_blocks.1.ff.net.0.proj.weight"] = torch.zeros(8, 8, dtype=torch.bfloat16)
    folder = tmp_path / "odd"
    folder.mkdir()
    save_file(state, folder / "krea.safetensors")
    return folder / "krea.safetensors"


RECIPE = """\
sources:
  schnell: {schnell}
  krea: {krea}
{head}rules:
{rules}  - match: '.*'{catch_mark}
    op: {catch_all}
"""


def user_recipe(schnell, krea, rules="", catch_all="lerp:0.5", head="", catch_mark="") -> str:
    return RECIPE.format(schnell=schnell, krea=krea, rules=rules, catch_all=catch_all, head=head, catch_mark=catch_mark)


CASES = [
    pytest.param(dict(rules="  - match: guidance_embedder\n    op: take:kera  # FAULT\n", head="base: krea\n"), RecipeError, "rules[0].op", ["take:kera: unknown source 'kera' (sources: schnell, krea)"], id="unknown-source-in-take"),
    pytest.param(dict(rules="  - match: attn\n    op: average\n    sources: [schnell, kera]  # FAULT\n"), RecipeError, "rules[0].sources", ["unknown source 'kera'"], id="unknown-source-in-rule-sources"),
    pytest.param(dict(catch_mark="  # FAULT", head="base: krea\n"), PlanError, "rules[0]", ["(lerp:0.5) needs 'time_text_embed.guidance_embedder.", "from source 'schnell', which lacks them", "{match: 'guidance_embedder', op: 'take:krea'}"], id="missing-key"),
    pytest.param(dict(rules="  - match: 'blocks.(1'  # FAULT\n    op: average\n"), RecipeError, "rules[0].match", ["'blocks.(1' is not a valid regular expression"], id="bad-regex"),
    pytest.param(dict(catch_all="mean  # FAULT"), RecipeError, "rules[0].op", ["unknown op 'mean' (ops: take:NAME, average, lerp:ALPHA"], id="unknown-op"),
    pytest.param(dict(catch_all="lerp:abc  # FAULT"), RecipeError, "rules[0].op", ["'abc' is not a number (usage: lerp:ALPHA)"], id="lerp-not-a-number"),
    pytest.param(dict(catch_all="lerp:${recipe.alhpa}  # FAULT", head="alpha: 0.3\n"), RecipeError, "rules[0].op", ["cannot resolve 'lerp:${recipe.alhpa}': Interpolation key 'recipe.alhpa' not found"], id="interpolation-typo"),
    pytest.param(dict(catch_all="weighted:0.2,0.3,0.5  # FAULT"), RecipeError, "rules[0].op", ["weighted:0.2,0.3,0.5 gives 3 weights for 2 sources (schnell, krea)"], id="weighted-wrong-count"),
    pytest.param(dict(rules="  - match: transfomer_blocks  # FAULT\n    op: take:krea\n"), PlanError, "rules[0]", ["(match 'transfomer_blocks') decides no key", "A typo?", "optional: true"], id="rule-matches-nothing"),
    pytest.param(dict(rules="  - match: guidance  # FAULT\n    op: take:krea\n"), PlanError, "rules[0]", ["decides no key: it matches no key of the base 'schnell' (it matches 4 of krea"], id="rule-matches-only-dropped-keys"),
]


@pytest.mark.parametrize("parts, error, where, fragments", CASES)
def test_recipe_fault_is_named_at_its_line(recipe_dir, out, schnell, krea, parts, error, where, fragments):
    text = user_recipe(schnell, krea, **parts)
    path = recipe_dir / "bad.yaml"
    message = refused(error, fragments, lambda: run_recipe(recipe_dir, out, text, name="bad"), out)
    assert message.startswith(f"recipe 'bad' ({path}:{fault_line(text)}) {where}")


def test_lerp_over_three_sources_is_refused(recipe_dir, out, schnell, krea):
    text = user_recipe(schnell, krea, catch_all="lerp:0.5  # FAULT").replace("sources:\n", f"sources:\n  third: {schnell}\n")
    message = refused(RecipeError, ["lerp:0.5 takes 2 sources but gets 3 (third, schnell, krea)", "sources: [...]"], lambda: run_recipe(recipe_dir, out, text, name="bad"), out)
    assert f"bad.yaml:{fault_line(text)}) rules[0].op" in message


def test_optional_rule_may_match_nothing(recipe_dir, out, schnell, krea, state_of):
    """The escape from the error above: the same rule marked optional, and the merge goes through."""
    text = user_recipe(schnell, krea, rules="  - match: guidance\n    op: take:krea\n    optional: true\n")
    plan = run_recipe(recipe_dir, out, text, "dry_run=true")
    assert [x.keys for x in plan.rule_stats()] == [0, len(state_of(schnell))]
    run_recipe(recipe_dir, out, text)
    assert load_state(out).keys() == state_of(schnell).keys()


def test_shape_mismatch_names_key_shapes_and_file(recipe_dir, out, schnell, odd_krea, state_of):
    key = "transformer_blocks.1.ff.net.0.proj.weight"
    text = user_recipe(schnell, odd_krea, catch_mark="  # FAULT")
    message = refused(PlanError, [], lambda: run_recipe(recipe_dir, out, text), out)
    shape = list(state_of(schnell)[key].shape)
    assert message == f"recipe 't' ({recipe_dir / 't.yaml'}:{fault_line(text)}) rules[0] (lerp:0.5): '{key}' is {shape} in base 'schnell' but [8, 8] in 'krea' ({odd_krea})"


def test_parameter_that_is_not_a_number(out, schnell, krea):
    refused(RecipeError, ["recipe 'krea_schnell' (", "krea_schnell.yaml:", ") alpha: ", "a parameter that is not a number: got 'abc'"], lambda: merge(["recipe=krea_schnell", *source_overrides(schnell, krea), f"output={out}", "recipe.alpha=abc"]), out)


def test_source_that_does_not_exist(out, schnell, tmp_path):
    missing = tmp_path / "nowhere" / "krea"
    refused(SourceError, [f"source 'krea': {missing}: no such file or folder"], lambda: merge(["recipe=krea_schnell", *source_overrides(schnell, missing), f"output={out}"]), out)


@pytest.mark.parametrize("how", ["in-the-recipe", "on-the-command-line"])
def test_resolvers_are_refused(recipe_dir, out, schnell, krea, how):
    """`${oc.env:...}` would let a shared recipe read the user's environment, from the file or an override."""
    if how == "in-the-recipe":
        run = lambda: run_recipe(recipe_dir, out, user_recipe(schnell, "'${oc.env:HOME}/krea'"))  # noqa: E731
        where = f"recipe 't' ({recipe_dir / 't.yaml'}:3) sources.krea: '${{oc.env:HOME}}/krea'"
    else:
        run = lambda: merge(["recipe=krea_schnell", f"recipe.sources.schnell={schnell}", "recipe.sources.krea=${oc.env:HOME}", f"output={out}"])  # noqa: E731
        where = "recipe 'krea_schnell' ("
    refused(RecipeError, [where, "a recipe may only refer to its own values"], run, out)


def test_no_recipe_chosen_lists_the_recipes(out):
    refused(UsageError, ["no recipe chosen: run `python -m fluxrecipe recipe=NAME` (recipes: bake_lora, convert_lora, demo, extract_lora, krea_schnell, krea_schnell_blocks, krea_schnell_guided, merge_loras, to_bfl, to_comfyui_fp8, to_diffusers, to_gguf)"], lambda: merge([f"output={out}"]), out)


@pytest.mark.parametrize("where", ["the-source", "inside-it", "its-parent"])
def test_output_overlapping_a_source_is_refused_even_with_overwrite(tmp_path, schnell, krea, where):
    """overwrite=true must never replace a source (or the folder holding one) with the merge."""
    copy = tmp_path / "krea" / "transformer"
    shutil.copytree(krea, copy)
    before = {p.name: p.read_bytes() for p in copy.iterdir()}
    out = {"the-source": copy, "inside-it": copy / "merged", "its-parent": copy.parent}[where]
    error, message = (UsageError, f"output {out} and source 'krea' \\({copy}\\) overlap: write the merge somewhere else")
    if where == "its-parent":  # not a model folder: refused before the sources are even opened
        error, message = OutputError, f"{out} exists and is not a model folder: overwrite=true replaces only a model folder"
    with pytest.raises(error, match=message):
        merge(["recipe=krea_schnell", *source_overrides(schnell, copy), f"output={out}", "progress=false", "overwrite=true"])
    assert {p.name: p.read_bytes() for p in copy.iterdir()} == before
    assert sorted(p.name for p in copy.parent.iterdir()) == ["transformer"]


def test_overwrite_never_replaces_a_folder_that_is_not_a_model(out, schnell, krea):
    """`output=~ overwrite=true` must not wipe a home folder: only a model folder (or an empty one) is replaced."""
    out.mkdir(parents=True)
    (out / "notes.txt").write_text("mine")
    run = ["recipe=krea_schnell", *source_overrides(schnell, krea), f"output={out}", "progress=false", "overwrite=true"]
    with pytest.raises(OutputError, match="exists and is not a model folder: overwrite=true replaces only a model folder, never other files"):
        merge(run)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_existing_output_is_refused_then_replaced_with_overwrite(out, schnell, krea, state_of):
    run = ["recipe=krea_schnell", *source_overrides(schnell, krea), f"output={out}", "progress=false"]
    merge([*run, "recipe.alpha=0.2"])  # an earlier merge
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(OutputError, match=f"{out} already exists: choose another output=..., or pass overwrite=true to replace it"):
        merge(run)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before

    merge([*run, "overwrite=true"])
    assert load_state(out).keys() == state_of(schnell).keys()
    assert {p.name: p.read_bytes() for p in out.iterdir()} != before
    assert config_of(out)["guidance_embeds"] is False
    assert sorted(p.name for p in out.parent.iterdir()) == ["transformer"]  # no partial or previous folder left
    assert shard_files(out)


def test_overwrite_never_replaces_a_folder_that_merely_holds_a_config_json(out, schnell, krea):
    """A folder holding a config.json is not a model: `output=. overwrite=true` in a project deleted it all."""
    out.mkdir(parents=True)
    (out / "config.json").write_text("{}")
    (out / "old-model.txt").write_text("keep me")
    run = ["recipe=krea_schnell", *source_overrides(schnell, krea), f"output={out}", "progress=false", "overwrite=true"]
    with pytest.raises(OutputError, match="exists and is not a model folder"):
        merge(run)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "old-model.txt"]


# --- run options --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "option, message",
    [
        ("threads=true", "threads=True: must be a whole number (0: automatic)"),
        ("threads=-1", "threads=-1: must be a whole number (0: automatic)"),
        ("chunk_elements=0", "chunk_elements=0: must be a whole number above 0"),
        ("shard_size=10G", "shard_size=10G: give a size such as 10GB, 500MB or 2GiB"),
        ("shard_size=0MB", "shard_size=0MB: must be above 0"),
        ("nonfinite=ignore", "nonfinite=ignore: choose error or warn"),
    ],
)
def test_bad_run_option_fails_before_any_source_is_opened(out, tmp_path, option, message):
    """The sources do not exist: the option's message must come first (a hub source would be fetched otherwise)."""
    missing = tmp_path / "missing"
    refused(UsageError, [message], lambda: merge(["recipe=krea_schnell", *source_overrides(missing, missing), f"output={out}", option]), out)


@pytest.mark.parametrize(
    "device, message",
    [("gpu", "device='gpu': choose cpu, cuda or cuda:N"), ("meta", "device='meta': choose cpu, cuda or cuda:N"), ("cuda", "device=cuda: this torch (")],
)
@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the machine has a GPU: device=cuda is valid here")
def test_a_device_torch_cannot_use_is_refused_before_writing(out, schnell, krea, device, message):
    refused(UsageError, [message], lambda: merge(["recipe=krea_schnell", *source_overrides(schnell, krea), f"output={out}", f"device={device}"]), out)


@pytest.mark.parametrize("option, size", [("shard_size=60KB", 60_000), ("shard_size=64KiB", 65_536), ("shard_size=0.1 MB", 100_000), ("shard_size=70000", 70_000)])
def test_shard_size_units(tmp_path, schnell, krea, option, size):
    plan = merge(["recipe=krea_schnell", *source_overrides(schnell, krea), f"output={tmp_path / 'out'}", "dry_run=true", option])
    assert len(plan.files) > 1
    assert all(shard.nbytes <= size for shard in plan.files)
    assert all(a.nbytes + b.tensors[0].nbytes > size for a, b in zip(plan.files, plan.files[1:]))  # each shard as full as it can be


def test_dry_run_refuses_an_output_inside_a_source(schnell, krea):
    """A dry run reports what the real run would refuse."""
    with pytest.raises(UsageError, match="overlap: write the merge somewhere else"):
        merge(["recipe=krea_schnell", *source_overrides(schnell, krea), f"output={schnell.parent}", "dry_run=true"])


def test_dry_run_warns_of_an_existing_output(out, schnell, krea, capsys):
    out.mkdir(parents=True)
    merge(["recipe=krea_schnell", *source_overrides(schnell, krea), f"output={out}", "dry_run=true"])
    assert f"note: {out} already exists: the merge will refuse it unless you pass overwrite=true" in capsys.readouterr().out
    merge(["recipe=krea_schnell", *source_overrides(schnell, krea), f"output={out}", "dry_run=true", "overwrite=true"])
    assert "already exists" not in capsys.readouterr().out


def test_overwriting_an_output_that_is_a_file_leaves_nothing_behind(tmp_path, schnell, krea):
    """A user's file under the output's name is never replaced by the merge's folder, however often asked."""
    folder = tmp_path / "o"
    folder.mkdir()
    (folder / "model").write_text("not a model folder")
    run = ["recipe=krea_schnell", *source_overrides(schnell, krea), f"output={folder / 'model'}", "progress=false", "overwrite=true"]
    for _ in range(2):
        with pytest.raises(OutputError, match="is not a model folder: .*it is a file, not a safetensors model"):
            merge(run)
        assert [p.name for p in folder.iterdir()] == ["model"]
        assert (folder / "model").read_text() == "not a model folder"


def test_a_mistyped_local_path_is_named_as_such_too(tmp_path, monkeypatch, schnell):
    """`models/krea` looks like a hub repo id; when ./models exists, the hub's error also says the path is missing."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    with pytest.raises(SourceError, match=r"\(and there is no local path 'models/krea' either\)$"):
        merge(["recipe=krea_schnell", f"recipe.sources.schnell={schnell}", "recipe.sources.krea=models/krea", f"output={tmp_path / 'out'}"])
