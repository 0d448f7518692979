"""Per-block schedules (issue 9): every form, checked by the value each block gets; in both source layouts;
printed by a dry run; overridden and swept one block at a time; and every bad schedule refused in one line
that names the recipe line.

Expected values are written out here from the issue's words (the blocks in model order double_blocks.0..N-1
then single_blocks.0..M-1, anchors spread evenly, interpolated linearly; embedders take the first value,
final_layer the last; a block over its group over default), not computed by schedule.py.
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from omegaconf import OmegaConf
from safetensors.torch import save_file

from conftest import compose, fake_checkpoint, load_state, merge, reference, run_cli, run_recipe, write_recipe
from flux_layouts import diffusers_to_bfl
from fluxrecipe import schedule
from fluxrecipe.errors import PlanError
from fluxrecipe.families.flux1 import FAMILY as FLUX1
from fluxrecipe.plan import format_plan, make_plan
from fluxrecipe.recipe import load_recipe

EMBEDDERS = ["img_in", "time_in", "guidance_in", "vector_in", "txt_in"]
TINY_BLOCKS = EMBEDDERS + ["double_blocks.0", "double_blocks.1", "single_blocks.0", "single_blocks.1", "final_layer"]
FLUX = schedule.Blocks(FLUX1, (19, 38))
block_of = FLUX1.block_of


def values(value, blocks: schedule.Blocks) -> dict[str, float]:
    """The value of every block of a model with `blocks`, through a representative canonical key of each."""
    keys = {"img_in": "x_embedder.weight", "time_in": "time_text_embed.timestep_embedder.linear_1.weight",
            "guidance_in": "time_text_embed.guidance_embedder.linear_2.bias", "vector_in": "time_text_embed.text_embedder.linear_1.bias",
            "txt_in": "context_embedder.weight", "final_layer": "proj_out.bias"}
    keys |= {f"double_blocks.{i}": f"transformer_blocks.{i}.attn.to_q.weight" for i in range(blocks.count("double_blocks"))}
    keys |= {f"single_blocks.{i}": f"single_transformer_blocks.{i}.proj_mlp.weight" for i in range(blocks.count("single_blocks"))}
    parsed = schedule.parse(value)
    return {block: schedule.value_for(parsed, key, blocks) for block, key in keys.items()}


# --- every form, by the value each block gets ----------------------------------------------------------------


def test_a_number_is_every_block_s_value():
    assert set(values(0.3, FLUX).values()) == {0.3}


def test_a_list_is_a_gradient_over_the_blocks_in_model_order():
    got = values([0.0, 1.0], FLUX)  # 57 blocks: position i of 56
    assert all(got[b] == 0.0 for b in EMBEDDERS) and got["final_layer"] == 1.0
    assert got["double_blocks.0"] == 0.0 and got["single_blocks.37"] == 1.0
    for i in range(19):
        assert got[f"double_blocks.{i}"] == pytest.approx(i / 56, abs=1e-15)
    for j in range(38):
        assert got[f"single_blocks.{j}"] == pytest.approx((19 + j) / 56, abs=1e-15)


def test_more_anchors_are_spread_evenly():
    """[0, 1, 0] over 57 blocks: 1 at position 28 (single_blocks.9), linear on either side."""
    got = values([0.0, 1.0, 0.0], FLUX)
    assert got["single_blocks.9"] == 1.0
    assert got["double_blocks.14"] == pytest.approx(14 / 28) and got["single_blocks.23"] == pytest.approx(14 / 28)
    assert got["img_in"] == 0.0 and got["final_layer"] == 0.0


def test_a_gradient_on_the_tiny_model():
    """4 blocks: positions 0, 1/3, 2/3, 1 of [0.1, 0.7]."""
    got = values([0.1, 0.7], schedule.Blocks(FLUX1, (2, 2)))
    assert got == pytest.approx({**dict.fromkeys(EMBEDDERS, 0.1), "double_blocks.0": 0.1, "double_blocks.1": 0.3, "single_blocks.0": 0.5, "single_blocks.1": 0.7, "final_layer": 0.7})


def test_the_most_specific_name_wins():
    got = values({"default": 0.1, "double_blocks": 0.2, "double_blocks.7": 0.3, "txt_in": 0.4, "final_layer": 0.9}, FLUX)
    assert got["double_blocks.7"] == 0.3
    assert {got[f"double_blocks.{i}"] for i in range(19) if i != 7} == {0.2}
    assert {got[f"single_blocks.{i}"] for i in range(38)} == {0.1}
    assert (got["img_in"], got["txt_in"], got["final_layer"]) == (0.1, 0.4, 0.9)


def test_a_list_under_a_group_is_a_gradient_over_that_group():
    got = values({"default": 0.5, "single_blocks": [0.0, 1.0], "double_blocks": [1.0, 0.5]}, FLUX)
    assert [got[f"single_blocks.{j}"] for j in (0, 37)] == [0.0, 1.0]
    assert got["single_blocks.1"] == pytest.approx(1 / 37)
    assert [got[f"double_blocks.{i}"] for i in (0, 9, 18)] == pytest.approx([1.0, 0.75, 0.5])
    assert got["img_in"] == got["final_layer"] == 0.5


def test_a_list_under_default_is_the_gradient_over_all_blocks():
    assert values({"default": [0.0, 1.0], "final_layer": 0.5}, FLUX) == {**values([0.0, 1.0], FLUX), "final_layer": 0.5}


def test_nested_block_numbers_are_the_flat_names():
    """{double_blocks: {7: ...}} (how Hydra addresses recipe.alpha.double_blocks.7) is {double_blocks.7: ...};
    YAML's int keys and Hydra's string keys alike."""
    flat = values({"default": 0.5, "double_blocks.7": 0.1, "single_blocks.12": 0.2}, FLUX)
    assert values({"default": 0.5, "double_blocks": {7: 0.1}, "single_blocks": {"12": 0.2}}, FLUX) == flat
    assert flat["double_blocks.7"] == 0.1 and flat["single_blocks.12"] == 0.2 and flat["double_blocks.8"] == 0.5


def test_a_mapping_without_default_that_names_every_block():
    every = {"img_in": 0.1, "time_in": 0.2, "guidance_in": 0.3, "vector_in": 0.4, "txt_in": 0.5, "double_blocks": 0.6, "single_blocks": [0.7, 0.8], "final_layer": 0.9}
    got = values(every, FLUX)
    assert [got[b] for b in EMBEDDERS] == [0.1, 0.2, 0.3, 0.4, 0.5]
    assert got["double_blocks.18"] == 0.6 and got["single_blocks.0"] == 0.7 and got["single_blocks.37"] == 0.8 and got["final_layer"] == 0.9


# --- recipe-time faults (no model needed) ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, fragment",
    [
        ([0.5], "a list is a gradient over the blocks and needs 2 or more numbers, got [0.5]"),
        ({"singel_blocks": 0.5}, "'singel_blocks' is not a FLUX block name (did you mean 'single_blocks'?)"),
        ({"doubel_blocks.7": 0.5}, "did you mean 'double_blocks.7'?"),
        ({"img_in": [0.1, 0.2]}, "'img_in' is one block: give it a number"),
        ({"double_blocks.7": 0.1, "double_blocks": {7: 0.2}}, "'double_blocks.7' is given twice"),
        ({"double_blocks": {"x": 0.2}}, "under 'double_blocks', name blocks by their number"),
        ({"default": [0.5, "a"]}, "must hold numbers only"),
        ({}, "an empty mapping"),
        ("half", "must be a number, a list of numbers"),
    ],
)
def test_bad_schedules_are_refused_at_recipe_time(value, fragment):
    with pytest.raises(ValueError) as e:
        schedule.parse(value)
    assert fragment in str(e.value)


# --- plans: the value every key gets, the faults that need the model -------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    return {"a": fake_checkpoint("a", guidance=True), "b": fake_checkpoint("b", guidance=True, dtype="F32")}


def plan_with(checkpoints, alpha=None, rules=None, **fields):
    """A plan of the recipe whose rules (default: lerp:${recipe.alpha} on every key) use `alpha`, if given."""
    rules = rules or [{"match": ".*", "op": "lerp:${recipe.alpha}"}]
    fields = {"alpha": alpha, **fields} if alpha is not None else fields
    root = OmegaConf.create({"recipe": {"sources": {n: f"/nowhere/{n}" for n in checkpoints}, "rules": rules, **fields}})
    return make_plan(load_recipe(root.recipe, "t"), checkpoints, 10**9)


def alpha_by_block(plan) -> dict[str, float]:
    """Every step's alpha, grouped by block; each block must give all its keys one value."""
    seen: dict[str, set] = {}
    for step in (s for s in plan.steps if "alpha" in s.values):
        seen.setdefault(block_of(step.key), set()).add(step.values["alpha"])
    assert all(len(v) == 1 for v in seen.values())
    return {b: v.pop() for b, v in seen.items()}


@pytest.mark.parametrize(
    "alpha, want",
    [
        (0.25, dict.fromkeys(TINY_BLOCKS, 0.25)),
        ([0.1, 0.7], {**dict.fromkeys(EMBEDDERS, 0.1), "double_blocks.0": 0.1, "double_blocks.1": 0.3, "single_blocks.0": 0.5, "single_blocks.1": 0.7, "final_layer": 0.7}),
        ({"default": 0.5, "double_blocks": {1: 0.0}, "single_blocks": [0.2, 0.4], "final_layer": 1.0}, {**dict.fromkeys(EMBEDDERS, 0.5), "double_blocks.0": 0.5, "double_blocks.1": 0.0, "single_blocks.0": 0.2, "single_blocks.1": 0.4, "final_layer": 1.0}),
    ],
    ids=["number", "list", "mapping"],
)
def test_each_step_holds_its_block_s_plain_number(tiny, alpha, want):
    plan = plan_with(tiny, alpha)
    assert alpha_by_block(plan) == pytest.approx(want)
    assert all(isinstance(s.values["alpha"], float) for s in plan.steps)


def test_a_schedule_written_in_the_op_itself(tiny):
    rules = [{"match": "^single", "op": {"lerp": {"alpha": [0.0, 1.0]}}}, {"match": ".*", "op": {"lerp": {"alpha": {"default": 0.5, "txt_in": 0.25}}}}]
    got = alpha_by_block(plan_with(tiny, rules=rules))
    assert got["single_blocks.0"] == pytest.approx(2 / 3) and got["single_blocks.1"] == 1.0  # over all 4 blocks, though the rule decides 2
    assert got["txt_in"] == 0.25 and got["double_blocks.1"] == 0.5


def test_a_schedule_in_a_list_of_weights(tiny):
    rules = [{"match": ".*", "op": {"weighted": {"weights": [{"default": 1.0, "double_blocks": 0.0}, [0.0, 1.0]]}}}]
    plan = plan_with(tiny, rules=rules)
    by_block = {block_of(s.key): s.values["weights"] for s in plan.steps}
    assert by_block["img_in"] == (1.0, 0.0) and by_block["double_blocks.1"] == pytest.approx((0.0, 1 / 3)) and by_block["final_layer"] == (1.0, 1.0)


def test_a_block_the_model_does_not_have_is_refused_with_its_range(tiny):
    with pytest.raises(PlanError) as e:
        plan_with(tiny, {"default": 0.5, "double_blocks": {2: 0.1}})
    assert "alpha: lerp parameter 'alpha' names double_blocks.2, but the model has double_blocks.0..1" in str(e.value)


def test_full_size_double_blocks_19_is_refused(tmp_path):
    """The issue's example: double_blocks.19 on FLUX.1's 19 double blocks."""
    full = {n: fake_checkpoint(n, guidance=True, num_layers=19, num_single_layers=38) for n in ("a", "b")}
    with pytest.raises(PlanError, match=r"names double_blocks\.19, but the model has double_blocks\.0\.\.18"):
        plan_with(full, {"default": 0.5, "double_blocks.19": 0.1})
    assert alpha_by_block(plan_with(full, {"default": 0.5, "double_blocks.18": 0.1}))["double_blocks.18"] == 0.1


def test_a_mapping_without_default_must_cover_the_rule_s_keys(tiny):
    with pytest.raises(PlanError) as e:
        plan_with(tiny, {"double_blocks": 0.1, "single_blocks": 0.2, "final_layer": 0.3})
    assert "gives no value for img_in, time_in, guidance_in, vector_in, txt_in (e.g. key 'x_embedder" in str(e.value) and "add a default" in str(e.value)
    # a rule that decides only block keys needs only those
    rules = [{"match": "^(single_)?transformer_blocks", "op": "lerp:${recipe.alpha}"}, {"match": ".*", "op": "average"}]
    assert alpha_by_block(plan_with(tiny, {"double_blocks": 0.1, "single_blocks": 0.2}, rules))["single_blocks.1"] == 0.2


def test_plan_faults_name_the_parameter_s_line(tmp_path, tiny):
    path = write_recipe(tmp_path, "t", "sources: {a: x, b: y}\nalpha:\n  default: 0.5\n  double_blocks.5: 0.1\nrules:\n  - match: '.*'\n    op: lerp:${recipe.alpha}\n")
    node = OmegaConf.create({"recipe": yaml.safe_load(path.read_text())})
    with pytest.raises(PlanError) as e:
        make_plan(load_recipe(node.recipe, "t", str(path)), tiny, 10**9)
    assert str(e.value).startswith(f"recipe 't' ({path}:2) alpha: lerp parameter 'alpha' names double_blocks.5")


def test_dry_run_prints_every_block_s_value_in_runs(tiny):
    text = format_plan(plan_with(tiny, {"default": 0.5, "double_blocks": {1: 0.25}, "single_blocks": [0.5, 1.0]}))
    assert "  parameters: alpha={default: 0.5, double_blocks.1: 0.25, single_blocks: [0.5, 1.0]}" in text
    assert "lerp{alpha: per block} over a, b" in text
    block_lines = text.split("      alpha by block:\n")[1].splitlines()[:5]
    assert [line.split() for line in block_lines] == [
        ["img_in", "..", "double_blocks.0", "0.5"],
        ["double_blocks.1", "0.25"],
        ["single_blocks.0", "0.5"],
        ["single_blocks.1", "1.0"],
        ["final_layer", "0.5"],
    ]


# --- both layouts, through the merge ---------------------------------------------------------------------


FORMS = {
    "number": (0.3, dict.fromkeys(TINY_BLOCKS, 0.3)),
    "list": ([0.1, 0.7], {**dict.fromkeys(EMBEDDERS, 0.1), "double_blocks.0": 0.1, "double_blocks.1": 0.3, "single_blocks.0": 0.5, "single_blocks.1": 0.7, "final_layer": 0.7}),
    "mapping": (
        {"default": 0.5, "double_blocks": {1: 0.0}, "single_blocks": [0.25, 1.0], "txt_in": 1.0},
        {**dict.fromkeys(EMBEDDERS, 0.5), "txt_in": 1.0, "double_blocks.0": 0.5, "double_blocks.1": 0.0, "single_blocks.0": 0.25, "single_blocks.1": 1.0, "final_layer": 0.5},
    ),
}


@pytest.fixture(scope="module")
def bfl_sources(tmp_path_factory, krea, dev, state_of):
    root = tmp_path_factory.mktemp("bfl-sources")
    files = {}
    for name, folder in (("krea", krea), ("dev", dev)):
        files[name] = root / f"{name}.safetensors"
        save_file(diffusers_to_bfl(state_of(folder)), files[name])
    return files


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("layout", ["diffusers", "bfl"])
def test_a_scheduled_merge_gives_each_block_its_value_in_either_source_layout(recipe_dir, tmp_path, state_of, krea, dev, bfl_sources, layout, form):
    """Every form, on diffusers folders and on BFL single files (block names are the same in both): the plan
    gives each block its value, and each merged tensor is the lerp at its block's alpha."""
    alpha, want = FORMS[form]
    sources = {"krea": str(krea), "dev": str(dev)} if layout == "diffusers" else {n: str(p) for n, p in bfl_sources.items()}
    recipe = {"sources": sources, "alpha": alpha, "rules": [{"match": ".*", "op": "lerp:${recipe.alpha}"}], "dtype": "fp32"}
    got_alpha = alpha_by_block(run_recipe(recipe_dir, tmp_path / "plan", recipe, "dry_run=true"))
    assert got_alpha == pytest.approx(want)
    out = tmp_path / "out"
    run_recipe(recipe_dir, out, recipe)
    got, a, b = state_of(out), state_of(krea), state_of(dev)
    assert got.keys() == a.keys()
    wrong = [k for k in got if not torch.equal(got[k], reference(f"lerp:{got_alpha[block_of(k)]!r}", [a[k], b[k]], torch.float32))]
    assert wrong == []


def test_both_layouts_give_the_same_bytes(recipe_dir, tmp_path, krea, dev, bfl_sources):
    outs = []
    for layout, sources in (("diffusers", {"krea": str(krea), "dev": str(dev)}), ("bfl", {n: str(p) for n, p in bfl_sources.items()})):
        outs.append(tmp_path / layout)
        run_recipe(recipe_dir, outs[-1], {"sources": sources, "alpha": [0.0, 1.0], "rules": [{"match": ".*", "op": "lerp:${recipe.alpha}"}]}, "diagnostics=false")
    a, b = load_state(outs[0]), load_state(outs[1])  # (the headers differ: they name the sources)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- overrides and sweeps of one block -------------------------------------------------------------------


BLOCKWISE = """\
sources:
  schnell: {schnell}
  krea: {krea}
alpha:
  default: 0.5
  double_blocks:
    0: 0.5
    1: 0.5
rules:
  - match: '.*'
    op: lerp:${{recipe.alpha}}
"""


def test_one_block_is_overridden_from_the_command_line_without_plus(recipe_dir, tmp_path, schnell, krea):
    """YAML's `1:` is an int key; loading the recipe makes it '1', which recipe.alpha.double_blocks.1 finds."""
    write_recipe(recipe_dir, "blockwise", BLOCKWISE.format(schnell=schnell, krea=krea))
    plan = merge(["recipe=blockwise", "recipe.alpha.double_blocks.1=0.125", "dry_run=true", f"output={tmp_path / 'o'}"])
    assert alpha_by_block(plan)["double_blocks.1"] == 0.125 and alpha_by_block(plan)["double_blocks.0"] == 0.5


def test_a_plain_alpha_becomes_a_schedule_from_the_command_line(recipe_dir, tmp_path, schnell, krea):
    """What README tells a user whose recipe's alpha is a number: give the whole mapping (or list) instead."""
    write_recipe(recipe_dir, "plain", f"sources: {{schnell: {schnell}, krea: {krea}}}\nalpha: 0.5\nrules:\n  - match: '.*'\n    op: lerp:${{recipe.alpha}}\n")
    common = ["recipe=plain", "dry_run=true", f"output={tmp_path / 'o'}"]
    got = alpha_by_block(merge([*common, "recipe.alpha={default:0.5,double_blocks.1:0}"]))
    assert got["double_blocks.1"] == 0.0 and got["single_blocks.0"] == 0.5
    got = alpha_by_block(merge([*common, "recipe.alpha=[0,1]"]))
    assert got["img_in"] == 0.0 and got["final_layer"] == 1.0


@pytest.mark.parametrize(
    "alpha, others",
    [
        ("0.5", 0.5),  # a plain number: the override makes it {default: 0.5, double_blocks.1: V}
        ("[0, 1]", None),  # a gradient over all blocks
        ("{default: 0.5, double_blocks: [0, 1]}", None),  # a gradient over a group: `.1` must not be its second anchor
        ("{default: 0.5}", 0.5),  # a mapping that does not name the block yet: no `+` needed
    ],
)
def test_one_block_of_any_schedule_is_overridden_alone(recipe_dir, tmp_path, schnell, krea, monkeypatch, alpha, others):
    """`recipe.alpha.double_blocks.1=V` sets that block and no other, whatever shape alpha has in the recipe."""
    from fluxrecipe.cli.arguments import command_line
    from fluxrecipe.recipe import BLOCK_OVERRIDES_ENV

    monkeypatch.setenv(BLOCK_OVERRIDES_ENV, "")  # command_line sets it; the test's end takes it away again
    write_recipe(recipe_dir, "shaped", f"sources: {{schnell: {schnell}, krea: {krea}}}\nalpha: {alpha}\nrules:\n  - match: '.*'\n    op: lerp:${{recipe.alpha}}\n")
    common = ["recipe=shaped", "dry_run=true", f"output={tmp_path / 'o'}"]
    before = alpha_by_block(merge(command_line(common)))
    after = alpha_by_block(merge(command_line([*common, "recipe.alpha.double_blocks.1=0.125"])))
    assert after["double_blocks.1"] == 0.125
    assert {k: v for k, v in after.items() if k != "double_blocks.1"} == {k: v for k, v in before.items() if k != "double_blocks.1"}
    if others is not None:
        assert set(before.values()) == {others}


@pytest.mark.parametrize("block", ["txt_mode_blocks.1", "content_mode_blocks.image.0", "distilled_guidance_layer", "double_blocks.0-1", "single_stream_modulation"])
def test_a_block_override_in_any_familys_names_is_known_as_one(recipe_dir, schnell, krea, monkeypatch, block):
    """`recipe.alpha.BLOCK=V` in the block names of FLUX.3, Chroma or FLUX.2, or a range, is one block of a
    schedule (the recipe loader then gives alpha a shape the block can be added to), as FLUX.1's names are."""
    import os

    from fluxrecipe.cli.arguments import command_line
    from fluxrecipe.recipe import BLOCK_OVERRIDES_ENV

    monkeypatch.setenv(BLOCK_OVERRIDES_ENV, "")
    write_recipe(recipe_dir, "shaped", f"sources: {{schnell: {schnell}, krea: {krea}}}\nalpha: 0.5\nrules:\n  - match: '.*'\n    op: lerp:${{recipe.alpha}}\n")
    command_line(["recipe=shaped", "dry_run=true", f"recipe.alpha.{block}=0.125"])
    assert os.environ[BLOCK_OVERRIDES_ENV] == "alpha"


def test_a_sweep_over_one_block(tmp_path, schnell, krea, state_of):
    """`-m recipe.alpha.double_blocks.1=0,1`: two merges, double block 1 is schnell's in one and Krea's in
    the other; every other tensor is the lerp at 0.5 in both."""
    folder = write_recipe(tmp_path / "recipes", "blockwise", BLOCKWISE.format(schnell=schnell, krea=krea)).parent
    sweep_dir = tmp_path / "sweep"
    done = run_cli(["-m", "recipe=blockwise", "recipe.alpha.double_blocks.1=0,1", f"hydra.sweep.dir={sweep_dir}"], cwd=tmp_path, env={"FLUXRECIPE_RECIPE_PATH": str(folder)})
    assert done.returncode == 0, done.stderr
    a, b = state_of(schnell), state_of(krea)
    for value, source in ((0, a), (1, b)):
        job = sweep_dir / f"alpha.double_blocks.1={value}"  # named by what differs
        assert json.loads((job / "fluxrecipe-job.json").read_text())["status"] == "ok"
        got = load_state(job / "transformer")
        for key, tensor in got.items():
            want = source[key] if block_of(key) == "double_blocks.1" else reference("lerp:0.5", [a[key], b[key]], torch.bfloat16)
            assert torch.equal(tensor, want), key


# --- the built-in ModelMergeFlux1-style recipe -----------------------------------------------------------


def test_the_builtin_block_recipe_spells_out_all_63_slots_and_sweeps_any_block(tmp_path):
    cfg = compose(["recipe=krea_schnell_blocks", "recipe.alpha.double_blocks.7=0.125", "recipe.alpha.single_blocks.37=0.875"])
    alpha = OmegaConf.to_container(cfg.recipe.alpha)
    slots = [k for k in alpha if k not in ("double_blocks", "single_blocks")] + [f"double_blocks.{i}" for i in alpha["double_blocks"]] + [f"single_blocks.{i}" for i in alpha["single_blocks"]]
    assert sorted(slots) == sorted(EMBEDDERS + [f"double_blocks.{i}" for i in range(19)] + [f"single_blocks.{i}" for i in range(38)] + ["final_layer"])
    assert len(slots) == 63
    recipe = load_recipe(cfg.recipe, "krea_schnell_blocks")
    full = {n: fake_checkpoint(n, guidance=n == "krea", num_layers=19, num_single_layers=38) for n in ("schnell", "krea")}
    got = alpha_by_block(make_plan(recipe, full, 10**9))
    assert got["double_blocks.7"] == 0.125 and got["single_blocks.37"] == 0.875
    schnell_blocks = ["img_in", "time_in", "vector_in", "txt_in"] + [f"double_blocks.{i}" for i in range(19)] + [f"single_blocks.{i}" for i in range(38)] + ["final_layer"]
    assert set(got) == set(schnell_blocks)  # guidance_in has a slot, but schnell, the base, has no guidance embedder
