"""Planning (plan/): rules x keys -> one step per output key, and every check before a tensor byte is read.

The checkpoints here are made by hand (conftest.fake_checkpoint): the keys and shapes of a tiny FLUX model
as diffusers builds it from its config, with no file behind them. A plan is plain data, so every decision
(which rule, which inputs in which order, what is dropped and why, what config is written) is asserted as data.
"""

from __future__ import annotations

import math
import re

import pytest

from conftest import fake_checkpoint
from fluxrecipe.errors import PlanError
from fluxrecipe.plan import format_plan, make_plan
from fluxrecipe.recipe import load_recipe

GUIDANCE = [
    "time_text_embed.guidance_embedder.linear_1.weight",
    "time_text_embed.guidance_embedder.linear_1.bias",
    "time_text_embed.guidance_embedder.linear_2.weight",
    "time_text_embed.guidance_embedder.linear_2.bias",
]
CATCH_ALL = {"match": ".*", "op": "average"}


@pytest.fixture(scope="module")
def checkpoints():
    """s: schnell-like (no guidance), k: Krea-like (guidance), f: Krea-like stored as float32."""
    return {"s": fake_checkpoint("s", guidance=False), "k": fake_checkpoint("k", guidance=True), "f": fake_checkpoint("f", guidance=True, dtype="F32")}


def plan_of(checkpoints, rules, sources=("k", "f"), shard_size=10**9, **fields):
    recipe = load_recipe({"sources": {n: f"/nowhere/{n}" for n in sources}, "rules": rules, **fields}, "t")
    return make_plan(recipe, {n: checkpoints[n] for n in sources}, shard_size)


def refused(checkpoints, rules, *fragments, **kwargs) -> str:
    with pytest.raises(PlanError) as e:
        plan_of(checkpoints, rules, **kwargs)
    message = str(e.value)
    for fragment in fragments:
        assert fragment in message
    return message


def rule_of(plan) -> dict[str, int]:
    return {s.key: s.rule for s in plan.steps}


# --- which rule decides a key ------------------------------------------------------------------------------


def test_first_matching_rule_wins(checkpoints):
    """Order decides, not specificity: 'norm' comes first, so it takes the norms of block 0 as well."""
    plan = plan_of(checkpoints, [{"match": "norm", "op": "take:k"}, {"match": r"^transformer_blocks\.0\.", "op": "take:f"}, CATCH_ALL])
    keys = list(checkpoints["k"].tensors)
    expected = {k: 0 if "norm" in k else 1 if k.startswith("transformer_blocks.0.") else 2 for k in keys}
    assert rule_of(plan) == expected
    assert rule_of(plan)["transformer_blocks.0.norm1.linear.weight"] == 0
    assert rule_of(plan)["transformer_blocks.0.attn.to_q.weight"] == 1


@pytest.mark.parametrize("pattern", ["proj_out", "^proj_out", r"\.bias$", r"blocks\.1\.", "to_[qk]"])
def test_match_is_re_search_anywhere_in_the_key(checkpoints, pattern):
    """`match` is found anywhere in the key (re.search), unless the regex anchors it."""
    plan = plan_of(checkpoints, [{"match": pattern, "op": "take:f"}, CATCH_ALL])
    chosen = sorted(k for k, r in rule_of(plan).items() if r == 0)
    assert chosen == sorted(k for k in checkpoints["k"].tensors if re.search(pattern, k))
    assert chosen  # each pattern matches something in a FLUX model


def test_anchored_pattern_leaves_the_block_keys_alone(checkpoints):
    plan = plan_of(checkpoints, [{"match": "^proj_out", "op": "take:f"}, CATCH_ALL])
    assert sorted(k for k, r in rule_of(plan).items() if r == 0) == ["proj_out.bias", "proj_out.weight"]


def test_every_output_key_must_be_matched(checkpoints):
    message = refused(checkpoints, [{"match": "blocks", "op": "average"}], "matches no rule of recipe 't'", "end the rules with a catch-all")
    assert "key 'x_embedder" in message or "key 'time_text_embed" in message or "key 'context_embedder" in message


# --- inputs and outputs of a step ---------------------------------------------------------------------------


def test_inputs_follow_the_rule_sources_order(checkpoints):
    plan = plan_of(checkpoints, [{"match": "attn", "op": "lerp:0.3", "sources": ["f", "k"]}, CATCH_ALL])
    for step in plan.steps:
        names = ("f", "k") if "attn" in step.key else ("k", "f")
        assert tuple(t.source for t in step.inputs) == names
        assert step.inputs == tuple(checkpoints[n].tensors[step.key] for n in names)


def test_output_keys_and_shapes_are_the_base_keys(checkpoints):
    plan = plan_of(checkpoints, [{"match": "guidance", "op": "take:k"}, {"match": ".*", "op": "average", "sources": ["s", "k"]}], sources=("s", "k"), base="k")
    assert {s.key: s.shape for s in plan.steps} == {k: t.shape for k, t in checkpoints["k"].tensors.items()}
    assert plan.config["guidance_embeds"] is True


def test_base_defaults_to_the_first_source_for_the_plan(checkpoints):
    plan = plan_of(checkpoints, [{"match": ".*", "op": "take:k"}], sources=("s", "k"))
    assert plan.recipe.base == "s"
    assert sorted(s.key for s in plan.steps) == sorted(checkpoints["s"].tensors)
    assert plan.config == checkpoints["s"].config


@pytest.mark.parametrize("dtype, code, size", [("bf16", "BF16", 2), ("fp16", "F16", 2), ("fp32", "F32", 4)])
def test_steps_carry_the_output_dtype(checkpoints, dtype, code, size):
    plan = plan_of(checkpoints, [CATCH_ALL], dtype=dtype)
    assert {s.dtype for s in plan.steps} == {code}
    assert plan.bytes_written == sum(math.prod(t.shape) * size for t in checkpoints["k"].tensors.values())
    assert plan.bytes_read == checkpoints["k"].nbytes + checkpoints["f"].nbytes


def test_take_into_the_same_dtype_copies_bytes(checkpoints):
    plan = plan_of(checkpoints, [{"match": "attn", "op": "take:k"}, {"match": ".*", "op": "take:f"}], dtype="bf16")
    assert {s.key for s in plan.steps if s.copies_bytes} == {k for k in checkpoints["k"].tensors if "attn" in k}


def test_keys_only_other_sources_hold_are_dropped_with_the_reason(checkpoints):
    """krea_schnell's case: base schnell, Krea's 4 guidance keys are listed as dropped, by name."""
    plan = plan_of(checkpoints, [{"match": ".*", "op": "lerp:0.5"}], sources=("s", "k"))
    assert sorted(d.key for d in plan.dropped) == sorted(GUIDANCE)
    assert {d.reason for d in plan.dropped} == {"k has it, base 's' lacks it"}
    assert plan.config["guidance_embeds"] is False
    assert not any("guidance" in s.key for s in plan.steps)


def test_extra_keys_of_several_sources_name_them_all(checkpoints):
    plan = plan_of(checkpoints, [{"match": ".*", "op": "average"}], sources=("s", "k", "f"))
    assert {d.reason for d in plan.dropped} == {"k, f have it, base 's' lacks it"}


# --- drop and config overrides ------------------------------------------------------------------------------


def test_dropping_guidance_with_config_override_gives_schnell_architecture(checkpoints):
    """Base Krea, guidance dropped, `config: {guidance_embeds: false}`: a plan whose keys fit a schnell config."""
    plan = plan_of(checkpoints, [{"match": "guidance", "op": "drop"}, CATCH_ALL], config={"guidance_embeds": False})
    assert plan.config == {**checkpoints["k"].config, "guidance_embeds": False}
    assert sorted(s.key for s in plan.steps) == sorted(checkpoints["s"].tensors)
    assert sorted(d.key for d in plan.dropped) == sorted(GUIDANCE)
    assert {(d.rule, d.reason) for d in plan.dropped} == {(0, "dropped by rules[0] (match 'guidance', op drop)")}
    assert [x.keys for x in plan.rule_stats()] == [4, len(checkpoints["s"].tensors)]


def test_guidance_kept_but_config_says_false_is_refused(checkpoints):
    refused(
        checkpoints, [CATCH_ALL], "would not load as FluxTransformer2DModel", "holds 4 key(s) the config has no place for",
        "time_text_embed.guidance_embedder.linear_1.weight", "drop the guidance keys", config={"guidance_embeds": False},
    )


def test_guidance_dropped_but_config_says_true_is_refused(checkpoints):
    refused(
        checkpoints, [{"match": "guidance", "op": "drop"}, CATCH_ALL], "lacks 4 key(s) the config needs",
        "config says guidance_embeds: true but the guidance embedder is not written",
    )


def test_schnell_base_with_guidance_config_is_refused(checkpoints):
    refused(checkpoints, [CATCH_ALL], "lacks 4 key(s) the config needs", sources=("s",), config={"guidance_embeds": True})


def test_config_override_that_changes_shapes_is_refused(checkpoints):
    refused(checkpoints, [CATCH_ALL], "other shapes than the config implies", config={"num_attention_heads": 4})


def test_config_override_of_an_unknown_field_is_refused(checkpoints):
    refused(checkpoints, [CATCH_ALL], "config: guidance_embed not a field of FluxTransformer2DModel", config={"guidance_embed": False})


def test_base_without_config_is_refused(checkpoints):
    bare = fake_checkpoint("k", guidance=True, config=False)
    recipe = load_recipe({"sources": {"k": "/nowhere/k"}, "rules": [CATCH_ALL]}, "t")
    with pytest.raises(PlanError, match="base 'k' .* has no config.json"):
        make_plan(recipe, {"k": bare}, 10**9)


# --- inputs a step needs ------------------------------------------------------------------------------------


def test_missing_input_names_every_key_and_the_source(checkpoints):
    """Base Krea with a plain `.*` lerp: schnell lacks the guidance embedder."""
    message = refused(checkpoints, [{"match": ".*", "op": "lerp:0.5"}], "rules[0] (lerp:0.5) needs", "from source 's', which lacks them", sources=("s", "k"), base="k")
    for key in GUIDANCE:
        assert key in message
    assert "e.g. {match: 'guidance_embedder', op: 'take:k'}" in message


LACKING = {
    "guidance": GUIDANCE,
    "a-whole-block": [k for k in fake_checkpoint("x", guidance=True).tensors if k.startswith("single_transformer_blocks.1.")],
    "two-unrelated-keys": ["norm_out.linear.weight", "proj_out.weight"],
    "one-key": ["transformer_blocks.0.attn.to_q.weight"],
}


@pytest.mark.parametrize("lacking", LACKING.values(), ids=LACKING.keys())
def test_the_rule_a_missing_key_error_suggests_fixes_exactly_those_keys(checkpoints, lacking):
    """The suggested rule, put before the failing one, must take exactly the lacking keys from the base and
    leave every other key to the rule the user wrote (a broader regex would silently stop merging them)."""
    thin = fake_checkpoint("t", guidance=True, drop=lacking)
    recipe = {"sources": {"k": "x", "t": "y"}, "rules": [{"match": "embedder", "op": "take:t"}, {"match": ".*", "op": "average"}]}
    if "guidance" in lacking[0]:
        recipe["rules"] = recipe["rules"][1:]
    with pytest.raises(PlanError) as e:
        make_plan(load_recipe(recipe, "t"), {"k": checkpoints["k"], "t": thin}, 10**9)
    match, op = re.search(r"e\.g\. \{match: '([^']+)', op: '([^']+)'\}", str(e.value)).groups()
    assert op == "take:k"
    recipe["rules"].insert(len(recipe["rules"]) - 1, {"match": match, "op": op})
    plan = make_plan(load_recipe(recipe, "t"), {"k": checkpoints["k"], "t": thin}, 10**9)
    hint_rule = len(recipe["rules"]) - 2
    assert sorted(k for k, r in rule_of(plan).items() if r == hint_rule) == sorted(lacking)


def test_shape_mismatch_names_key_shapes_and_file(checkpoints):
    key = "transformer_blocks.1.ff.net.0.proj.weight"
    odd = fake_checkpoint("f", guidance=True, reshape={key: (8, 8)})
    recipe = load_recipe({"sources": {"k": "x", "f": "y"}, "rules": [CATCH_ALL]}, "t")
    with pytest.raises(PlanError) as e:
        make_plan(recipe, {"k": checkpoints["k"], "f": odd}, 10**9)
    shape = list(checkpoints["k"].tensors[key].shape)
    assert f"'{key}' is {shape} in base 'k' but [8, 8] in 'f' ({odd.tensors[key].file})" in str(e.value)


# --- rules that decide nothing ------------------------------------------------------------------------------


def test_rule_that_matches_nothing_is_refused(checkpoints):
    refused(checkpoints, [{"match": "transfomer_blocks", "op": "take:k"}, CATCH_ALL], "rules[0] (match 'transfomer_blocks') decides no key", "matches no key of the base 'k'", "A typo?", "optional: true")


def test_rule_shadowed_by_an_earlier_rule_is_refused(checkpoints):
    refused(checkpoints, [{"match": "attn", "op": "take:k"}, {"match": "to_q", "op": "take:f"}, CATCH_ALL], "rules[1]", "is taken by an earlier rule", "transformer_blocks.0.attn.to_q.weight")


def test_rule_that_matches_only_keys_outside_the_base_says_so(checkpoints):
    refused(checkpoints, [{"match": "guidance", "op": "take:k"}, {"match": ".*", "op": "lerp:0.5"}], "it matches 4 of k; the output has only the base's keys", sources=("s", "k"))


def test_optional_rule_may_match_nothing(checkpoints):
    plan = plan_of(checkpoints, [{"match": "guidance", "op": "take:k", "optional": True}, {"match": ".*", "op": "lerp:0.5"}], sources=("s", "k"))
    assert [x.keys for x in plan.rule_stats()] == [0, len(checkpoints["s"].tensors)]


# --- sharding, counts and notes -----------------------------------------------------------------------------


def test_shards_respect_the_size_and_keep_plan_order(checkpoints):
    plan = plan_of(checkpoints, [CATCH_ALL], shard_size=20_000)
    sizes = [shard.nbytes for shard in plan.files]
    assert len(plan.files) > 3
    assert all(size <= 20_000 or len(shard.tensors) == 1 for size, shard in zip(sizes, plan.files))
    n = len(plan.files)
    assert [shard.name for shard in plan.files] == [f"diffusion_pytorch_model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert [t.name for shard in plan.files for t in shard.tensors] == [s.key for s in plan.steps]
    assert [s.key for s in plan.steps] == list(checkpoints["k"].tensors)


def test_rule_stats_count_keys_and_bytes_per_rule(checkpoints):
    plan = plan_of(checkpoints, [{"match": "attn", "op": "take:f"}, {"match": "guidance", "op": "drop"}, CATCH_ALL], dtype="fp16", config={"guidance_embeds": False})
    k, f = checkpoints["k"].tensors, checkpoints["f"].tensors
    attn = [key for key in k if "attn" in key]
    rest = [key for key in k if "attn" not in key and "guidance" not in key]
    stats = [(x.keys, x.bytes_read, x.bytes_written) for x in plan.rule_stats()]
    assert stats == [
        (len(attn), sum(f[x].nbytes for x in attn), sum(f[x].nbytes // 2 for x in attn)),
        (4, 0, 0),
        (len(rest), sum(k[x].nbytes + f[x].nbytes for x in rest), sum(k[x].nbytes for x in rest)),
    ]


def test_notes_say_extrapolation_and_mixed_dtypes(checkpoints):
    plan = plan_of(checkpoints, [{"match": "attn", "op": "lerp:1.5"}, {"match": ".*", "op": "lerp:-0.25"}])
    assert plan.notes == (
        "rules[0] (match 'attn', op lerp:1.5) extrapolates: alpha = 1.5 lies outside [0, 1]",
        "rules[1] (match '.*', op lerp:-0.25) extrapolates: alpha = -0.25 lies outside [0, 1]",
        "inputs hold f F32, k BF16; all arithmetic is float32, rounded once to BF16",
    )
    same_dtype = {**checkpoints, "k2": fake_checkpoint("k2", guidance=True)}
    assert plan_of(same_dtype, [{"match": ".*", "op": "lerp:1"}], sources=("k", "k2")).notes == ()  # alpha = 1 is inside


def test_printed_plan_lists_rules_drops_and_totals(checkpoints):
    plan = plan_of(checkpoints, [{"match": ".*", "op": "lerp:0.5"}], sources=("s", "k"))
    text = format_plan(plan)
    n = len(checkpoints["s"].tensors)
    assert re.search(rf"\[0\] '\.\*'\s+lerp:0\.5 over s, k\s+{n} keys", text)
    assert "dropped (4 keys):" in text
    assert f"k has it, base 's' lacks it: '{GUIDANCE[0]}'" in text
    assert f"total: {n} tensors in 1 file(s), BF16" in text
