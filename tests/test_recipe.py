"""The recipe schema (recipe.py): what a recipe may say, what it means, and how each fault is reported.

No source is opened here: a recipe is checked on its own, before any file is looked at.
"""

from __future__ import annotations

import os

import pytest
from omegaconf import OmegaConf

from conftest import compose, write_recipe

from fluxrecipe.errors import RecipeError
from fluxrecipe.recipe import DTYPES, load_recipe

SOURCES = {"a": "org/a", "b": "org/b", "c": "org/c"}


def recipe(**fields):
    """A recipe over three hub sources, averaging everything, with `fields` replaced."""
    return load_recipe({"sources": dict(SOURCES), "rules": [{"match": ".*", "op": "average"}], **fields}, "t")


def refused(*fragments: str, **fields) -> str:
    with pytest.raises(RecipeError) as e:
        recipe(**fields)
    message = str(e.value)
    for fragment in fragments:
        assert fragment in message
    return message


# --- what a recipe means -----------------------------------------------------------------------------------


def test_base_defaults_to_the_first_source():
    assert recipe().base == "a"
    assert recipe(sources={"z": "org/z", "a": "org/a"}).base == "z"


def test_base_names_a_source():
    assert recipe(base="c").base == "c"
    refused("base 'x' is not one of the sources (a, b, c)", base="x")


@pytest.mark.parametrize(
    "text, code",
    [("bf16", "BF16"), ("bfloat16", "BF16"), ("BF16", "BF16"), ("fp16", "F16"), ("float16", "F16"), ("fp32", "F32"), ("float32", "F32"), ("FP32", "F32")],
)
def test_dtype_aliases(text, code):
    assert DTYPES[recipe(dtype=text).dtype] == (code, False)


def test_dtype_defaults_to_bf16():
    assert recipe().dtype == "bf16"


@pytest.mark.parametrize("text", ["int8", "fp4", "q4_k", "half"])
def test_unknown_dtype_is_refused(text):
    refused(f"dtype {text!r} is not one of bf16, fp16, fp32, fp8, fp8_e5m2, fp8_scaled", dtype=text)


def test_rule_inputs_default_to_the_recipe_sources_in_order():
    r = recipe(sources={"c": "org/c", "a": "org/a", "b": "org/b"})
    assert r.rules[0].sources == ("c", "a", "b")


def test_rule_sources_choose_and_order_the_inputs():
    r = recipe(rules=[{"match": "x", "op": "lerp:0.25", "sources": ["c", "a"]}, {"match": ".*", "op": "add_difference:1", "sources": ["b", "c", "a"]}])
    assert [rule.sources for rule in r.rules] == [("c", "a"), ("b", "c", "a")]
    assert r.rules[0].params == {"alpha": 0.25}


def test_take_reads_only_its_source_and_drop_reads_nothing():
    r = recipe(rules=[{"match": "x", "op": "take:b"}, {"match": "y", "op": "drop"}, {"match": ".*", "op": "average"}])
    assert [rule.sources for rule in r.rules] == [("b",), (), ("a", "b", "c")]


def test_rules_keep_their_order_and_index():
    r = recipe(rules=[{"match": "z", "op": "take:c"}, {"match": "a", "op": "take:a"}, {"match": ".*", "op": "average", "optional": True}])
    assert [(x.index, x.match, x.optional) for x in r.rules] == [(0, "z", False), (1, "a", False), (2, ".*", True)]


def test_top_level_numbers_are_named_parameters():
    r = recipe(alpha=0.25, steps=3, description="d", rules=[{"match": ".*", "op": "weighted:${...alpha},${...steps},1"}])
    assert r.params == {"alpha": 0.25, "steps": 3}
    assert r.rules[0].params == {"weights": (0.25, 3.0, 1.0)}
    assert r.description == "d"


@pytest.mark.parametrize(
    "fields, says",
    [
        ({"alhpa": 0.3, "alpha": 0.5, "rules": [{"match": ".*", "op": "lerp:${...alpha}", "sources": ["a", "b"]}]}, "parameter 'alhpa' is used by no rule (did you mean alpha?)"),
        ({"alpha": 0.5}, "parameter 'alpha' is used by no rule: it would change nothing"),
        ({"alpha": 0.5, "description": "alpha is ${.alpha}"}, "parameter 'alpha' is used by no rule"),
        ({"bsae": 2}, "parameter 'bsae' is used by no rule (did you mean base?)"),
    ],
    ids=["typo", "unused", "only-in-the-description", "mistyped-field"],
)
def test_a_parameter_no_rule_uses_is_refused(fields, says):
    """`+recipe.alhpa=0.3` used to merge at the recipe's alpha without a word."""
    refused(says, **fields)


def test_a_parameter_interpolated_into_an_op_is_resolved():
    """`lerp:${recipe.alpha}` as the built-in recipes write it, with the recipe under `recipe` as Hydra composes it."""
    root = OmegaConf.create({"recipe": {"sources": SOURCES, "alpha": 0.3, "rules": [{"match": ".*", "op": "lerp:${recipe.alpha}", "sources": ["a", "b"]}]}})
    r = load_recipe(root.recipe, "t")
    assert r.rules[0].params == {"alpha": 0.3}
    assert r.resolved["rules"][0]["op"] == "lerp:0.3"


def test_a_mistyped_field_is_not_taken_for_a_parameter():
    refused("unknown field 'rule' (did you mean 'rules'?), or a parameter that is not a number: got [{'match'", "(fields: description, sources, base, rules", rule=[{"match": ".*", "op": "average"}])
    refused("unknown field 'sourcez' (did you mean 'sources'?)", sourcez={"a": 1.0})  # a mapping of numbers, but named like a field


def test_a_parameter_that_is_not_a_number_says_so():
    """`recipe.alpha=abc` on the command line: the message must say alpha needs a number, not that it is unknown."""
    refused("t' (composed config) alpha: unknown field 'alpha', or a parameter that is not a number: got 'abc'", alpha="abc")


def test_a_list_parameter_of_one_number_is_refused():
    refused("t' (composed config) alpha: parameter 'alpha': a list is a gradient over the blocks and needs 2 or more numbers, got [0.5]", alpha=[0.5])


def test_source_mapping_spec():
    r = recipe(sources={"a": {"repo": "org/a", "revision": "v1", "subfolder": "transformer"}, "b": {"path": "/data/b"}})
    assert (r.sources["a"].repo, r.sources["a"].revision, r.sources["a"].subfolder) == ("org/a", "v1", "transformer")
    assert r.sources["b"].path == "/data/b"


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ({"repo": "org/a", "path": "/x"}, "needs exactly one of repo, path or demo"),
        ({"revision": "v1"}, "needs exactly one of repo, path or demo"),
        ({"repo": "org/a", "branch": "v1"}, "unknown field(s) 'branch'"),
        ("", "has no value"),
    ],
)
def test_bad_source_specs(spec, fragment):
    refused("sources.a", fragment, sources={"a": spec, "b": "org/b"})


# --- faults, each named at its line of the recipe file -----------------------------------------------------

FAULTY = """\
description: a recipe with one fault, on the line marked FAULT
sources:
  a: org/a
  b: org/b
  c: org/c
rules:
  - match: guidance
    op: take:a
{rule}
  - match: '.*'
    op: average
"""


@pytest.mark.parametrize(
    "rule, where, fragments",
    [
        ("  - match: 'a(b'  # FAULT\n    op: average", "rules[1].match", ["'a(b' is not a valid regular expression"]),
        ("  - match: x\n    op: blend  # FAULT", "rules[1].op", ["unknown op 'blend'", "lerp:ALPHA", "add_difference:ALPHA"]),
        ("  - match: x\n    op: lerp:abc  # FAULT\n    sources: [a, b]", "rules[1].op", ["'abc' is not a number (usage: lerp:ALPHA)"]),
        ("  - match: x\n    op: lerp:nan  # FAULT\n    sources: [a, b]", "rules[1].op", ["'nan' is not a finite number"]),
        ("  - match: x\n    op: lerp:0.1,0.2  # FAULT\n    sources: [a, b]", "rules[1].op", ["lerp takes one number, got 2"]),
        ("  - match: x\n    op: lerp:0.5  # FAULT", "rules[1].op", ["lerp:0.5 takes 2 sources but gets 3 (a, b, c)", "sources: [...]"]),
        ("  - match: x\n    op: add_difference:1\n    sources: [a, b]  # FAULT", "rules[1].sources", ["add_difference:1.0 takes 3 sources but gets 2"]),
        ("  - match: x\n    op: weighted:0.5,0.5  # FAULT", "rules[1].op", ["weighted:0.5,0.5 gives 2 weights for 3 sources (a, b, c)"]),
        ("  - match: x\n    op: average:2  # FAULT", "rules[1].op", ["average takes no argument, got '2'"]),
        ("  - match: x\n    op: take  # FAULT", "rules[1].op", ["take needs an argument (usage: take:NAME)"]),
        ("  - match: x\n    op: take:nope  # FAULT", "rules[1].op", ["unknown source 'nope' (sources: a, b, c)"]),
        ("  - match: x\n    op: average\n    sources: [a, nope]  # FAULT", "rules[1].sources", ["unknown source 'nope' (sources: a, b, c)"]),
        ("  - match: x\n    op: average\n    sources: [a, a]  # FAULT", "rules[1].sources", ["a source is named twice"]),
        ("  - match: x\n    op: take:a\n    sources: [a]  # FAULT", "rules[1].sources", ["take:NAME chooses its source itself"]),
        ("  - match: x\n    op: drop\n    sources: [a, nope]  # FAULT", "rules[1].sources", ["drop reads no source"]),
        ("  - match: x\n    op: lerp:${recipe.alhpa}  # FAULT\n    sources: [a, b]", "rules[1].op", ["cannot resolve 'lerp:${recipe.alhpa}': Interpolation key 'recipe.alhpa' not found"]),
        ("  - match: x\n    op: average\n    optional: maybe  # FAULT", "rules[1].optional", ["optional must be true or false"]),
        ("  - match: x  # FAULT\n    op: average\n    sourcse: [a]", "rules[1]", ["unknown field(s) 'sourcse'"]),
        ("  - match: x  # FAULT", "rules[1]", ["rule has no op"]),
        ("  - match: x\n    op: lerp:0.5\n    sources: ['${oc.env:HOME}', a]  # FAULT", "rules[1].sources[0]", ["may only refer to its own values"]),
    ],
    ids=[
        "bad-regex", "unknown-op", "lerp-not-a-number", "lerp-nan", "lerp-two-numbers", "lerp-three-sources",
        "add_difference-two-sources", "weighted-wrong-count", "average-with-argument", "take-without-source",
        "take-unknown-source", "rule-sources-unknown", "rule-sources-twice", "take-with-rule-sources", "drop-with-rule-sources",
        "interpolation-typo",
        "optional-not-bool", "unknown-rule-field", "no-op", "resolver-in-rule-sources",
    ],
)
def test_a_fault_is_named_with_file_line_and_place(tmp_path, rule, where, fragments):
    """Every message starts with the recipe's name, its file and the line of the fault, then says what is wrong."""
    path = tmp_path / "faulty.yaml"
    text = FAULTY.format(rule=rule)
    path.write_text(text)
    line = next(i for i, t in enumerate(text.splitlines(), 1) if "# FAULT" in t)
    with pytest.raises(RecipeError) as e:
        load_recipe(OmegaConf.load(path), "faulty", str(path))
    message = str(e.value)
    assert message.startswith(f"recipe 'faulty' ({path}:{line}) {where}: ")
    for fragment in fragments:
        assert fragment in message
    assert "\n" not in message


@pytest.mark.parametrize(
    "value",
    ["${oc.env:HOME}", "${oc.decode:'[1]'}", "${hydra:runtime.cwd}", "${output}", "/data/${oc.env:USER}/krea", "${recipe.alpha}${oc.env:HOME}", "${now:%Y}"],
)
def test_interpolations_other_than_own_values_are_refused(value):
    """A shared recipe must not read the environment or anything outside itself."""
    refused("sources.b: ", "may only refer to its own values", "refused", sources={"a": "org/a", "b": value})


def test_refused_resolver_is_never_called(monkeypatch):
    """The refusal comes before resolution: a resolver in a recipe is not even evaluated."""
    calls = []
    OmegaConf.register_new_resolver("fluxrecipe_test_spy", lambda: calls.append(1) or "org/x", replace=True)
    try:
        refused("may only refer to its own values", sources={"a": "org/a", "b": "${fluxrecipe_test_spy:}"})
    finally:
        OmegaConf.clear_resolver("fluxrecipe_test_spy")
    assert calls == []


# --- where recipes come from --------------------------------------------------------------------------------


def test_user_recipe_shadows_a_builtin_and_the_first_folder_listed_wins(tmp_path, monkeypatch):
    from fluxrecipe.catalog import recipe_files
    from fluxrecipe.cli.settings import recipe_of

    body = "sources: {{a: org/a, b: org/b}}\nalpha: {}\nrules:\n  - match: '.*'\n    op: lerp:${{recipe.alpha}}\n"
    first = write_recipe(tmp_path / "first", "krea_schnell", body.format(0.1))
    write_recipe(tmp_path / "second", "krea_schnell", body.format(0.2))
    write_recipe(tmp_path / "second", "only_second", body.format(0.3))
    monkeypatch.setenv("FLUXRECIPE_RECIPE_PATH", os.pathsep.join([str(tmp_path / "first"), str(tmp_path / "second")]))

    files = recipe_files()
    assert files["krea_schnell"] == first.resolve()
    assert {"demo", "krea_schnell_guided", "only_second"} <= set(files)
    r = recipe_of(compose(["recipe=krea_schnell"]))
    assert (r.file, r.params, r.rules[0].params) == (str(first.resolve()), {"alpha": 0.1}, {"alpha": 0.1})
    assert recipe_of(compose(["recipe=only_second", "recipe.alpha=0.7"])).rules[0].params == {"alpha": 0.7}
