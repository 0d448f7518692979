"""Every op, run through the whole merge, checked tensor by tensor and bit for bit against conftest.reference:
plain torch, inputs upcast to float32, the formula ops.py documents in its order, one rounding at the end.

The sources differ in dtype (krea bf16, dev fp32, half fp16) and in shard layout (35 / 90 / 25 KB shards),
and the output is cut into 40 KB shards of its own, so a key found through the wrong shard, a second
rounding or a reordered formula all change bits somewhere.
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import OUT_DTYPES, reference, run_recipe, shard_files
from fluxrecipe.ops import OPS, OpCall, parse_op

CASES = [
    pytest.param("take:krea", ("krea", "dev"), id="take-bf16"),
    pytest.param("take:dev", ("krea", "dev"), id="take-fp32"),
    pytest.param("take:half", ("krea", "half"), id="take-fp16"),
    pytest.param("average", ("krea", "dev"), id="average-2"),
    pytest.param("average", ("half", "krea", "dev"), id="average-3"),
    pytest.param("lerp:0.3", ("krea", "dev"), id="lerp"),
    pytest.param("lerp:-0.5", ("dev", "half"), id="lerp-extrapolate-below"),
    pytest.param("lerp:1.75", ("half", "krea"), id="lerp-extrapolate-above"),
    pytest.param("weighted:0.2,0.5,0.3", ("krea", "dev", "half"), id="weighted"),
    pytest.param("weighted:1.5,-0.25,2", ("half", "krea", "dev"), id="weighted-unnormalised"),
    pytest.param("add_difference:0.7", ("krea", "dev", "half"), id="add_difference"),
    pytest.param("add_difference:-1.25", ("dev", "half", "krea"), id="add_difference-negative"),
]


def inputs_of(op: str, names: tuple[str, ...]) -> tuple[str, ...]:
    return (op.split(":")[1],) if op.startswith("take:") else names


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("op, names", CASES)
def test_op_equals_float32_reference_bit_for_bit(request, recipe_dir, tmp_path, state_of, op, names, dtype):
    folders = {n: request.getfixturevalue(n) for n in names}
    out = tmp_path / "out"
    run_recipe(recipe_dir, out, {"sources": {n: str(p) for n, p in folders.items()}, "rules": [{"match": ".*", "op": op}], "dtype": dtype}, "shard_size=40KB")

    merged = state_of(out)
    base = state_of(folders[names[0]])
    assert len(shard_files(out)) > 3
    assert merged.keys() == base.keys()
    inputs = [state_of(folders[n]) for n in inputs_of(op, names)]
    wrong = [k for k in base if not torch.equal(merged[k], reference(op, [s[k] for s in inputs], OUT_DTYPES[dtype]))]
    assert wrong == []
    assert {t.dtype for t in merged.values()} == {OUT_DTYPES[dtype]}


def test_rounding_once_is_what_is_checked(state_of, krea, half):
    """The bit-for-bit check above is sharp: on these inputs, bf16 arithmetic (rounding at every step) gives
    other bits than float32 arithmetic rounded once, in many tensors."""
    a, b = state_of(krea), state_of(half)
    twice = [k for k in a if not torch.equal(reference("lerp:0.3", [a[k], b[k]], torch.bfloat16), (0.7 * a[k] + 0.3 * b[k].to(torch.bfloat16)))]
    assert len(twice) > len(a) // 2


@pytest.mark.diffusers
def test_drop_leaves_keys_out_and_the_rest_merged(recipe_dir, tmp_path, state_of, krea, dev):
    """Base Krea, guidance dropped, config says no guidance: a schnell-architecture model of averaged weights."""
    out = tmp_path / "out"
    plan_rules = [{"match": "guidance", "op": "drop"}, {"match": ".*", "op": "average"}]
    result = run_recipe(recipe_dir, out, {"sources": {"krea": str(krea), "dev": str(dev)}, "rules": plan_rules, "config": {"guidance_embeds": False}})

    merged, a, b = state_of(out), state_of(krea), state_of(dev)
    kept = {k for k in a if "guidance" not in k}
    assert len(a) - len(kept) == 4
    assert merged.keys() == kept
    assert all(torch.equal(merged[k], reference("average", [a[k], b[k]], torch.bfloat16)) for k in kept)
    assert json.loads((out / "config.json").read_text())["guidance_embeds"] is False
    dropped = json.loads((out / "fluxrecipe.json").read_text())["dropped"]
    assert sorted(d["key"] for d in dropped) == sorted(set(a) - kept)
    assert {d["reason"] for d in dropped} == {"dropped by rules[0] (match 'guidance', op drop)"}
    assert result.bytes_read == sum(a[k].nbytes + b[k].nbytes for k in kept)

    from diffusers import FluxTransformer2DModel

    model, info = FluxTransformer2DModel.from_pretrained(out, output_loading_info=True)
    assert info == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}
    assert model.config.guidance_embeds is False and model.time_text_embed.__class__.__name__ == "CombinedTimestepTextProjEmbeddings"


def test_chunking_threads_and_diagnostics_do_not_change_a_bit(recipe_dir, tmp_path, state_of, krea, dev, half):
    """Chunks of 61 elements (a prime) cut every tensor mid-row, 3 threads finish them out of order, and without
    diagnostics a same-dtype take copies raw bytes: the shards must still be those of the default run, byte
    for byte, and the default run must be the reference (take:half is a byte copy, take:dev a conversion)."""
    rules = [{"match": "attn", "op": "take:half"}, {"match": "norm", "op": "take:dev"}, {"match": ".*", "op": "add_difference:0.3"}]
    recipe = {"sources": {"krea": str(krea), "dev": str(dev), "half": str(half)}, "rules": rules, "dtype": "fp16"}
    runs = {"default": [], "chunked": ["chunk_elements=61", "threads=3"], "raw": ["diagnostics=false", "chunk_elements=61"]}
    for name, options in runs.items():
        run_recipe(recipe_dir, tmp_path / name, recipe, "shard_size=40KB", *options)
    default = shard_files(tmp_path / "default")
    for name in ("chunked", "raw"):
        other = shard_files(tmp_path / name)
        assert [p.name for p in other] == [p.name for p in default]
        assert all(a.read_bytes() == b.read_bytes() for a, b in zip(default, other))

    merged, sources = state_of(tmp_path / "default"), [state_of(krea), state_of(dev), state_of(half)]
    for key, tensor in merged.items():
        op, inputs = ("take", [sources[2]]) if "attn" in key else ("take", [sources[1]]) if "norm" in key else ("add_difference:0.3", sources)
        assert torch.equal(tensor, reference(op, [s[key] for s in inputs], torch.float16)), key


# --- the op functions themselves ----------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["average", "lerp:0.3", "weighted:0.2,0.5,0.3", "add_difference:0.7", "take:x"])
def test_op_functions_leave_their_inputs_unchanged(text):
    """The executor hands ops views of its read buffers and measures distances to the inputs afterwards."""
    op = parse_op(text)
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(64, generator=g) for _ in range(op.spec.inputs[1] or 3)]
    before = [x.clone() for x in xs]
    op.spec.fn(xs, **op.values)
    assert all(torch.equal(x, y) for x, y in zip(xs, before))


@pytest.mark.parametrize(
    "text, call",
    [
        ("take:krea", OpCall("take", (("source", "krea"),))),
        ("average", OpCall("average")),
        (" lerp : 0.25 ", OpCall("lerp", (("alpha", 0.25),))),
        ("lerp:-1e-1", OpCall("lerp", (("alpha", -0.1),))),
        ("lerp:2", OpCall("lerp", (("alpha", 2.0),))),
        ("weighted:1, 2 ,3", OpCall("weighted", (("weights", (1.0, 2.0, 3.0)),))),
        ("add_difference:1.5", OpCall("add_difference", (("alpha", 1.5),))),
        ("drop", OpCall("drop")),
        ({"lerp": {"alpha": 0.25}}, OpCall("lerp", (("alpha", 0.25),))),
        ({"average": None}, OpCall("average")),
    ],
)
def test_parse_op(text, call):
    assert parse_op(text) == call
    assert parse_op(str(call)) == call  # an op prints as it is written


def test_every_registered_op_is_covered():
    """Every op in the registry is run through a whole merge and checked against the reference above (CASES),
    or, for drop, by test_drop_leaves_keys_out_and_the_rest_merged, or, for the advanced methods, against
    their float64 references in test_methods.py (METHODS): a new op without a case fails here."""
    from test_methods import METHODS

    tested = {case.values[0].split(":")[0] for case in CASES} | {"drop"} | {case.values[0] for case in METHODS}
    assert tested == set(OPS)
    assert all(op.split(":")[0] in tested for op in ("take", "average", "lerp", "weighted", "add_difference"))
