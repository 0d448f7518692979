"""Hostile and broken recipes: each gives one clear RecipeError (or UsageError) and no output; recipes never
run code and never read the environment.

All in-process but one: a recipe whose `defaults` list would make Hydra instantiate a callback can only be
shown harmless by a real `python -m fluxrecipe` run.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import merge, run_cli, write_recipe
from reliability_helpers import assert_no_output, copy_model, digests, pair_recipe, use_recipe

from fluxrecipe.errors import OutputError, PlanError, RecipeError, UsageError

SECRET = "secret-value-7f3a"


def fails(tmp_path, monkeypatch, text: str, error: type = RecipeError, *overrides: str, name: str = "hostile") -> str:
    """Run recipe `text`; it must raise `error` and leave no output. Returns the message."""
    out = tmp_path / "out"
    recipe = use_recipe(monkeypatch, tmp_path / "recipes", name, text)
    with pytest.raises(error) as e:
        merge([recipe, f"output={out}", "progress=false", *overrides])
    assert_no_output(out)
    return str(e.value)


def recipe_text(schnell: Path, krea: Path, **fields: str) -> str:
    """A valid two-source recipe, with some fields replaced (or added) by raw YAML text."""
    base = {
        "description": "a recipe for the tests",
        "sources": f"{{a: '{schnell}', b: '{krea}'}}",
        "base": "a",
        "alpha": "0.5",
        "rules": "[{match: '.*', op: 'lerp:${recipe.alpha}'}]",
    }
    return "".join(f"{k}: {v}\n" for k, v in {**base, **fields}.items())


# --- YAML and schema ---------------------------------------------------------------------------------------


def test_yaml_syntax_error_names_the_file(tmp_path, monkeypatch, schnell, krea):
    write_recipe(tmp_path / "recipes", "good", recipe_text(schnell, krea))
    path = tmp_path / "recipes" / "hostile.yaml"
    msg = fails(tmp_path, monkeypatch, "sources: {a: x\nrules: [\n")
    assert f"recipe 'hostile' ({path}" in msg and "not a valid YAML file" in msg and "line 2" in msg
    plan = merge(["recipe=good", "dry_run=true", f"output={tmp_path / 'out'}"])  # a broken file beside it does not affect other recipes
    assert plan.recipe.name == "good"


def test_recipe_file_not_utf8(tmp_path, monkeypatch):
    folder = tmp_path / "recipes"
    folder.mkdir()
    (folder / "latin1.yaml").write_bytes("description: caf\xe9\n".encode("latin-1"))
    monkeypatch.setenv("FLUXRECIPE_RECIPE_PATH", str(folder))
    with pytest.raises(RecipeError, match=r"latin1\.yaml\).*not a valid YAML file.*utf-8"):
        merge(["recipe=latin1", f"output={tmp_path / 'out'}"])
    assert_no_output(tmp_path / "out")


def test_unknown_field(tmp_path, monkeypatch, schnell, krea):
    msg = fails(tmp_path, monkeypatch, recipe_text(schnell, krea, sourcez="{a: x}"))
    assert "hostile.yaml:6) sourcez" in msg and "unknown field 'sourcez'" in msg


def test_unknown_rule_field(tmp_path, monkeypatch, schnell, krea):
    msg = fails(tmp_path, monkeypatch, recipe_text(schnell, krea, rules="[{match: '.*', op: average, weight: 2}]"))
    assert "rules[0]" in msg and "unknown field(s) 'weight'" in msg


def test_unknown_source_field(tmp_path, monkeypatch, schnell, krea):
    msg = fails(tmp_path, monkeypatch, recipe_text(schnell, krea, sources=f"{{a: {{path: '{schnell}', token: abc}}, b: '{krea}'}}"))
    assert "sources.a" in msg and "unknown field(s) 'token'" in msg


@pytest.mark.parametrize(
    "fields, expected",
    [
        ({"rules": "{match: '.*', op: average}"}, "rules must be a non-empty list"),
        ({"rules": "[]"}, "rules must be a non-empty list"),
        ({"rules": "[{match: 12, op: average}]"}, "match must be a regular expression, got 12"),
        ({"rules": "[{match: '.*', op: average, optional: 'yes'}]"}, "optional must be true or false"),
        ({"rules": "[{match: '.*', op: average, sources: a}]"}, "sources must be a list of source names"),
        ({"rules": "[average]"}, "a rule is a mapping with match and op"),
        ({"dtype": "int8"}, "dtype 'int8' is not one of bf16, fp16, fp32"),
        ({"description": "[a, b]"}, "description must be text"),
        ({"sources": "[a, b]"}, "sources must be a non-empty mapping"),
        ({"sources": "{a: 12, b: x}"}, "hub repo id"),
        ({"sources": "{a: {path: 12}}"}, "path of source 'a' must be text"),
        ({"sources": "{'a b': x}"}, "source name 'a b' must be letters"),
        ({"alpha": "'half'"}, "unknown field 'alpha'"),
        ({"alpha": "[0.5]"}, "needs 2 or more numbers, got [0.5]"),
        ({"alpha": "{singel_blocks: 0.5}"}, "'singel_blocks' is not a FLUX block name (did you mean 'single_blocks'?)"),
        ({"config": "[1]"}, "config must be a mapping"),
    ],
    ids=lambda v: "-".join(v) if isinstance(v, dict) else None,
)
def test_wrong_type(tmp_path, monkeypatch, schnell, krea, fields, expected):
    msg = fails(tmp_path, monkeypatch, recipe_text(schnell, krea, **fields))
    assert expected in msg and "recipe 'hostile' (" in msg


def test_bad_regex(tmp_path, monkeypatch, schnell, krea):
    msg = fails(tmp_path, monkeypatch, recipe_text(schnell, krea, rules="[{match: 'attn.(to_q', op: average}]"))
    assert "rules[0].match" in msg and "'attn.(to_q' is not a valid regular expression" in msg


def test_unknown_op(tmp_path, monkeypatch, schnell, krea):
    msg = fails(tmp_path, monkeypatch, recipe_text(schnell, krea, rules="[{match: '.*', op: 'blend:0.5'}]"))
    assert "rules[0].op" in msg and "unknown op 'blend'" in msg and "lerp:ALPHA" in msg


@pytest.mark.parametrize(
    "op, expected",
    [
        ("lerp:abc", "'abc' is not a number"),
        ("lerp:nan", "'nan' is not a finite number"),
        ("lerp", "lerp needs an argument"),
        ("lerp:0.1,0.2", "lerp takes one number, got 2"),
        ("average:1", "average takes no argument"),
        ("take:c", "unknown source 'c'"),
        ("take:a,b", "take takes one source name"),
        ("weighted:0.5", "gives 1 weights for 2 sources"),
        ("add_difference:0.5", "takes 3 sources but gets 2"),
    ],
)
def test_bad_op_arguments(tmp_path, monkeypatch, schnell, krea, op, expected):
    msg = fails(tmp_path, monkeypatch, recipe_text(schnell, krea, rules=f"[{{match: '.*', op: '{op}'}}]"))
    assert "rules[0]" in msg and expected in msg


def test_base_not_a_source(tmp_path, monkeypatch, schnell, krea):
    msg = fails(tmp_path, monkeypatch, recipe_text(schnell, krea, base="c"))
    assert "base 'c' is not one of the sources (a, b)" in msg


# --- output and sources overlap (sources are copies: a bug here must not destroy the shared fixtures) ----


@pytest.fixture
def own(tmp_path, schnell, krea):
    """Copies of both models; returns (a, b, digests of both before the run)."""
    a, b = copy_model(schnell, tmp_path / "a" / "transformer"), copy_model(krea, tmp_path / "b" / "transformer")
    return a, b, {"a": digests(a.parent), "b": digests(b.parent)}


def untouched(a: Path, b: Path, before: dict) -> bool:
    return digests(a.parent) == before["a"] and digests(b.parent) == before["b"]


def test_output_is_a_source(tmp_path, monkeypatch, own):
    a, b, before = own
    recipe = use_recipe(monkeypatch, tmp_path / "recipes", "r", pair_recipe(a, b))
    with pytest.raises(OutputError, match="already exists"):
        merge([recipe, f"output={a}"])
    with pytest.raises(UsageError, match=f"output {a} and source 'a' .* overlap"):
        merge([recipe, f"output={a}", "overwrite=true"])
    assert untouched(a, b, before)


def test_output_is_a_source_through_a_link(tmp_path, monkeypatch, own):
    a, b, before = own
    (tmp_path / "link").symlink_to(b.parent)
    recipe = use_recipe(monkeypatch, tmp_path / "recipes", "r", pair_recipe(a, b))
    with pytest.raises(UsageError, match="source 'b' .* overlap"):
        merge([recipe, f"output={tmp_path / 'link' / 'transformer'}", "overwrite=true"])
    assert untouched(a, b, before)


def test_output_inside_a_source(tmp_path, monkeypatch, own):
    a, b, before = own
    recipe = use_recipe(monkeypatch, tmp_path / "recipes", "r", pair_recipe(a, b))
    with pytest.raises(UsageError, match="source 'a' .* overlap"):
        merge([recipe, f"output={a / 'merged'}"])
    assert untouched(a, b, before)  # nothing was created inside the source either


def test_output_holds_a_source(tmp_path, monkeypatch, own):
    a, b, before = own
    recipe = use_recipe(monkeypatch, tmp_path / "recipes", "r", pair_recipe(a, b))
    # the folder holding a source is not a model folder: refused before the sources are even opened
    with pytest.raises(OutputError, match="is not a model folder: overwrite=true replaces only a model folder"):
        merge([recipe, f"output={b.parent}", "overwrite=true"])
    assert untouched(a, b, before)


# --- recipes never run code --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "place",
    ["top", "rule", "source", "config"],
)
def test_target_is_never_instantiated(tmp_path, monkeypatch, schnell, krea, place):
    """`_target_` anywhere in a recipe is refused (nothing instantiates recipe content anyway): no file appears."""
    marker = tmp_path / "PWNED"
    target = f"{{_target_: builtins.open, _args_: ['{marker}', 'w']}}"
    fields = {
        "top": {"_target_": "builtins.open", "_args_": f"['{marker}', 'w']"},
        "rule": {"rules": f"[{{match: '.*', op: average, _target_: builtins.open, _args_: ['{marker}', 'w']}}]"},
        "source": {"sources": f"{{a: '{schnell}', b: {target}}}"},
        "config": {"config": target},
    }[place]
    error = PlanError if place == "config" else RecipeError  # config overrides are checked against the model class
    msg = fails(tmp_path, monkeypatch, recipe_text(schnell, krea, **fields), error)
    assert "_target_" in msg or "_args_" in msg or "exactly one of repo, path or demo" in msg
    assert not marker.exists()


RESOLVERS = {
    "env": {"description": "'${oc.env:HF_TOKEN}'"},
    "env-default": {"description": "'${oc.env:NOT_SET,${oc.env:HF_TOKEN}}'"},
    "decode": {"alpha": "'${oc.decode:\"0.5\"}'"},
    "hydra": {"sources": "{a: '${hydra:runtime.cwd}', b: x}"},
    "nested": {"description": "'${recipe.${oc.env:HF_TOKEN}}'"},
    "escape-upwards": {"description": "'${..output}'"},
    "escape-in-rule": {"rules": "[{match: '.*', op: 'lerp:${....alpha}'}]"},
}


@pytest.mark.parametrize("case", list(RESOLVERS))
def test_resolvers_are_refused(tmp_path, monkeypatch, schnell, krea, case):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    msg = fails(tmp_path, monkeypatch, recipe_text(schnell, krea, **RESOLVERS[case]))
    assert "a recipe may only refer to its own values" in msg and SECRET not in msg


@pytest.mark.parametrize("override", ["recipe.description=${oc.env:HF_TOKEN}", "recipe.sources.b=${oc.env:HOME}", "+recipe.beta=${oc.decode:'1'}"])
def test_resolvers_from_the_command_line_are_refused(tmp_path, monkeypatch, schnell, krea, override):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    msg = fails(tmp_path, monkeypatch, recipe_text(schnell, krea), RecipeError, override)
    assert "a recipe may only refer to its own values" in msg and SECRET not in msg


def test_own_values_still_resolve(tmp_path, monkeypatch, schnell, krea):
    """The refusals above do not refuse what recipes are for: ${recipe.NAME} and a relative one inside the recipe."""
    recipe = use_recipe(monkeypatch, tmp_path / "recipes", "ok", recipe_text(schnell, krea, rules="[{match: '.*', op: 'lerp:${...alpha}'}]"))
    plan = merge([recipe, "dry_run=true", "recipe.alpha=0.25", f"output={tmp_path / 'out'}"])
    assert str(plan.recipe.rules[0].op) == "lerp:0.25"


def test_defaults_list_cannot_make_hydra_run_code(tmp_path, schnell, krea):
    """A recipe's `defaults` could put another file's `hydra.callbacks` at the top of the config, and Hydra
    instantiates callbacks: `builtins.open` would create the marker. The recipe is refused; nothing runs."""
    marker = tmp_path / "PWNED"
    folder = tmp_path / "recipes"
    write_recipe(folder, "evil", "defaults:\n  - /recipe@_global_: payload\n  - _self_\n" + recipe_text(schnell, krea))
    write_recipe(folder, "payload", f"hydra:\n  callbacks:\n    pwn:\n      _target_: builtins.open\n      _args_: ['{marker}', 'w']\n")
    out = tmp_path / "out"
    done = run_cli(["recipe=evil", f"output={out}", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, env={"FLUXRECIPE_RECIPE_PATH": str(folder)})
    assert done.returncode == 1, done.stderr
    assert not marker.exists()
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "recipe 'evil'" in lines[0] and "may not have a `defaults` list" in lines[0], done.stderr
    assert_no_output(out)
