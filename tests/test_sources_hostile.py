"""Hostile and broken sources: each defect gives one clear error naming the file (and key), and no output.

Every case takes an intact tiny model (schnell), breaks a copy of it in one way, and merges it with the
intact one in-process; one case runs the CLI to check the message format (one line, no traceback). The
fuzz test at the end mutates headers and bytes at random (deterministically) and accepts nothing but a
SourceError from the parser, or a FluxRecipeError (or success) from a whole merge.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from conftest import merge, run_cli
from reliability_helpers import (
    INDEX,
    assert_no_output,
    copy_model,
    edit_header,
    join,
    leftovers,
    pair_recipe,
    shards,
    split,
    tensors_by_offset,
    use_recipe,
    weight_map,
)

from fluxrecipe.errors import FluxRecipeError, PlanError, SourceError


@pytest.fixture
def broken(tmp_path, schnell) -> Path:
    """A copy of schnell to break; the test merges it (as source b) with the intact schnell (as a)."""
    return copy_model(schnell, tmp_path / "broken")


def merge_pair(tmp_path, monkeypatch, a: Path, b: Path, *options: str, base: str = "a"):
    """Merge a and b (lerp) into tmp_path/out in-process; returns (result, output folder)."""
    out = tmp_path / "out"
    recipe = use_recipe(monkeypatch, tmp_path / "recipes", "pair", pair_recipe(a, b, base=base))
    return merge([recipe, f"output={out}", "progress=false", *options]), out


def fails(tmp_path, monkeypatch, a: Path, b: Path, error: type, *options: str, base: str = "a") -> str:
    """The merge must raise `error` and leave nothing under the output's name; returns the message."""
    with pytest.raises(error) as e:
        merge_pair(tmp_path, monkeypatch, a, b, *options, base=base)
    assert_no_output(tmp_path / "out")
    return str(e.value)


def first_shard(folder: Path) -> Path:
    return shards(folder)[0]


# --- the file itself ---------------------------------------------------------------------------------------


def test_truncated_shard(tmp_path, monkeypatch, schnell, broken):
    shard = first_shard(broken)
    last = tensors_by_offset(shard)[-1]
    shard.write_bytes(shard.read_bytes()[:-10])
    msg = fails(tmp_path, monkeypatch, schnell, broken, SourceError)
    assert str(shard) in msg and f"'{last}'" in msg and "truncated" in msg


def test_empty_shard(tmp_path, monkeypatch, schnell, broken):
    shard = first_shard(broken)
    shard.write_bytes(b"")
    msg = fails(tmp_path, monkeypatch, schnell, broken, SourceError)
    assert str(shard) in msg and "truncated" in msg


def test_not_a_safetensors_file(tmp_path, monkeypatch, schnell, broken):
    shard = first_shard(broken)
    shard.write_text("<html>Access denied</html>\n" * 10)  # what a failed download may leave
    msg = fails(tmp_path, monkeypatch, schnell, broken, SourceError)
    assert str(shard) in msg and "not a safetensors file" in msg


def test_header_length_beyond_the_file(tmp_path, monkeypatch, schnell, broken):
    shard = first_shard(broken)
    raw = shard.read_bytes()
    shard.write_bytes(len(raw).to_bytes(8, "little") + raw[8:])
    msg = fails(tmp_path, monkeypatch, schnell, broken, SourceError)
    assert str(shard) in msg and "runs past the end of the file" in msg


def test_bad_header_json(tmp_path, monkeypatch, schnell, broken):
    shard = first_shard(broken)
    doc, data = split(shard)
    text = json.dumps(doc)
    join(shard, text[: len(text) // 2].encode(), data)  # cut in the middle of the JSON
    msg = fails(tmp_path, monkeypatch, schnell, broken, SourceError)
    assert str(shard) in msg and "not valid JSON" in msg


def test_header_not_utf8(tmp_path, monkeypatch, schnell, broken):
    shard = first_shard(broken)
    doc, data = split(shard)
    join(shard, json.dumps(doc).encode().replace(b'"dtype"', b'"dty\xffe"', 1), data)
    msg = fails(tmp_path, monkeypatch, schnell, broken, SourceError)
    assert str(shard) in msg and "not valid JSON" in msg


def test_header_not_an_object(tmp_path, monkeypatch, schnell, broken):
    shard = first_shard(broken)
    _, data = split(shard)
    join(shard, b"[1, 2, 3]", data)
    msg = fails(tmp_path, monkeypatch, schnell, broken, SourceError)
    assert str(shard) in msg and "not a JSON object" in msg


def test_tensor_named_twice(tmp_path, monkeypatch, schnell, broken):
    shard = first_shard(broken)
    doc, data = split(shard)
    key = tensors_by_offset(shard)[0]
    text = json.dumps(doc)
    join(shard, (text[:-1] + f", {json.dumps(key)}: {json.dumps(doc[key])}}}").encode(), data)
    msg = fails(tmp_path, monkeypatch, schnell, broken, SourceError)
    assert str(shard) in msg and f"'{key}' twice" in msg


def test_tensor_name_with_control_characters(tmp_path, monkeypatch, schnell, broken):
    """A name that would clear the terminal (or worse) when printed in a message is refused, and shown escaped."""
    shard = first_shard(broken)
    key = tensors_by_offset(shard)[0]
    evil = "\x1b[2J\x1b]0;pwned\x07" + key
    edit_header(shard, lambda doc: doc.update({evil: doc.pop(key)}))
    index = json.loads((broken / INDEX).read_text())
    index["weight_map"][evil] = index["weight_map"].pop(key)
    (broken / INDEX).write_text(json.dumps(index))
    msg = fails(tmp_path, monkeypatch, schnell, broken, SourceError)
    assert "unprintable characters" in msg and "\x1b" not in msg and "\\x1b[2J" in msg
    from fluxrecipe.formats.safetensors import read_header

    with pytest.raises(SourceError, match="tensor name .* holds unprintable characters") as e:
        read_header(str(shard))  # the header alone, without the index
    assert "\x1b" not in str(e.value)


# --- one tensor's entry ------------------------------------------------------------------------------------


def test_offsets_past_the_end(tmp_path, monkeypatch, schnell, broken):
    shard = first_shard(broken)
    key = tensors_by_offset(shard)[0]
    _, data = split(shard)

    def past_the_end(doc):
        begin, end = doc[key]["data_offsets"]
        doc[key]["data_offsets"] = [len(data) + 64, len(data) + 64 + end - begin]

    edit_header(shard, past_the_end)
    msg = fails(tmp_path, monkeypatch, schnell, broken, SourceError)
    assert str(shard) in msg and f"'{key}'" in msg and "truncated or its header is corrupt" in msg


def test_overlapping_offsets(tmp_path, monkeypatch, schnell, broken):
    shard = first_shard(broken)
    first, second = tensors_by_offset(shard)[:2]

    def overlap(doc):
        begin, end = doc[second]["data_offsets"]
        doc[second]["data_offsets"] = [begin - 2, end - 2]  # two bytes inside the first tensor's data

    edit_header(shard, overlap)
    msg = fails(tmp_path, monkeypatch, schnell, broken, SourceError)
    assert str(shard) in msg and f"'{first}'" in msg and f"'{second}'" in msg and "overlap" in msg


def test_offsets_disagree_with_shape(tmp_path, monkeypatch, schnell, broken):
    shard = first_shard(broken)
    key = tensors_by_offset(shard)[0]
    edit_header(shard, lambda doc: doc[key]["shape"].append(3))
    msg = fails(tmp_path, monkeypatch, schnell, broken, SourceError)
    assert str(shard) in msg and f"'{key}'" in msg and "needs" in msg


def test_unknown_dtype(tmp_path, monkeypatch, schnell, broken):
    shard = first_shard(broken)
    key = tensors_by_offset(shard)[0]
    edit_header(shard, lambda doc: doc[key].update(dtype="Q4_K"))
    msg = fails(tmp_path, monkeypatch, schnell, broken, SourceError)
    assert str(shard) in msg and f"'{key}'" in msg and "unsupported dtype 'Q4_K'" in msg


def test_integer_dtype(tmp_path, monkeypatch, schnell, broken):
    shard = first_shard(broken)
    key = tensors_by_offset(shard)[0]
    edit_header(shard, lambda doc: doc[key].update(dtype="I16"))  # a real safetensors dtype, of the same size
    msg = fails(tmp_path, monkeypatch, schnell, broken, SourceError)
    assert str(shard) in msg and f"'{key}'" in msg and "unsupported dtype 'I16'" in msg


# --- the index ---------------------------------------------------------------------------------------------


def test_index_names_a_missing_shard(tmp_path, monkeypatch, schnell, broken):
    shard = shards(broken)[2]
    key = next(k for k, v in weight_map(broken).items() if v == shard.name)
    shard.unlink()
    msg = fails(tmp_path, monkeypatch, schnell, broken, SourceError)
    assert str(broken / INDEX) in msg and f"'{shard.name}'" in msg and f"'{key}'" in msg and "does not exist" in msg


def test_index_names_a_key_its_shard_lacks(tmp_path, monkeypatch, schnell, broken):
    index = json.loads((broken / INDEX).read_text())
    first, second = shards(broken)[:2]
    key = next(k for k, v in index["weight_map"].items() if v == first.name)
    index["weight_map"][key] = second.name
    (broken / INDEX).write_text(json.dumps(index))
    msg = fails(tmp_path, monkeypatch, schnell, broken, SourceError)
    assert str(second) in msg and f"'{key}'" in msg and "does not hold it" in msg


def test_index_names_a_shard_outside_its_folder(tmp_path, monkeypatch, schnell, broken):
    index = json.loads((broken / INDEX).read_text())
    key = next(iter(index["weight_map"]))
    index["weight_map"][key] = f"../../{schnell.parent.name}/transformer/{shards(schnell)[0].name}"
    (broken / INDEX).write_text(json.dumps(index))
    msg = fails(tmp_path, monkeypatch, schnell, broken, SourceError)
    assert str(broken / INDEX) in msg and f"'{key}'" in msg and "a file name in the index's own folder" in msg


def test_index_not_json(tmp_path, monkeypatch, schnell, broken):
    (broken / INDEX).write_text('{"weight_map": {')
    msg = fails(tmp_path, monkeypatch, schnell, broken, SourceError)
    assert str(broken / INDEX) in msg and "not a valid safetensors index" in msg


# --- config.json of the base -------------------------------------------------------------------------------


def test_base_without_config(tmp_path, monkeypatch, schnell, broken):
    (broken / "config.json").unlink()
    msg = fails(tmp_path, monkeypatch, broken, schnell, PlanError)
    assert "base 'a'" in msg and str(broken) in msg and "no config.json" in msg


def test_base_config_not_json(tmp_path, monkeypatch, schnell, broken):
    (broken / "config.json").write_text('{"_class_name": "FluxTransformer2DModel",')
    msg = fails(tmp_path, monkeypatch, broken, schnell, SourceError)
    assert str(broken / "config.json") in msg and "not valid JSON" in msg


def test_base_config_not_a_model(tmp_path, monkeypatch, schnell, broken):
    (broken / "config.json").write_text(json.dumps({"_class_name": "os.system", "num_layers": 2}))
    msg = fails(tmp_path, monkeypatch, broken, schnell, PlanError)
    assert "base 'a'" in msg and "'os.system' is not a diffusers model class" in msg


def test_base_config_disagrees_with_keys(tmp_path, monkeypatch, schnell, broken):
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "num_layers": 3}))
    msg = fails(tmp_path, monkeypatch, broken, schnell, PlanError)
    assert "would not load as FluxTransformer2DModel" in msg and "'transformer_blocks.2." in msg


# --- dtypes and values -------------------------------------------------------------------------------------


def rewrite_tensors(folder: Path, change) -> None:
    """Rewrite every shard of `folder` with `change(key, tensor) -> tensor` (same keys, same shards)."""
    for shard in shards(folder):
        state = {k: change(k, v) for k, v in load_file(shard).items()}
        save_file(state, shard, metadata={"format": "pt"})


def test_sources_of_different_dtypes_merge_with_a_note(tmp_path, monkeypatch, schnell, broken):
    rewrite_tensors(broken, lambda k, v: v.float())
    result, out = merge_pair(tmp_path, monkeypatch, schnell, broken)
    note = "inputs hold a BF16, b F32; all arithmetic is float32, rounded once to BF16"
    assert note in json.loads((out / "fluxrecipe.json").read_text())["notes"]
    assert result.nonfinite == {}


def poison(folder: Path, value: float) -> str:
    """Put `value` into one element of one tensor of `folder`; returns the key."""
    key = tensors_by_offset(shards(folder)[1])[0]
    rewrite_tensors(folder, lambda k, v: v.flatten().index_fill(0, torch.tensor([1]), value).view(v.shape) if k == key else v)
    return key


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_nonfinite_input_stops_the_merge(tmp_path, monkeypatch, schnell, broken, value):
    key = poison(broken, value)
    msg = fails(tmp_path, monkeypatch, schnell, broken, SourceError, "nonfinite=error")
    assert "source 'b'" in msg and f"'{key}'" in msg and str(broken) in msg and "NaN or Inf" in msg and "nonfinite=warn" in msg


def test_nonfinite_input_counted_with_warn(tmp_path, monkeypatch, schnell, broken, caplog):
    key = poison(broken, -math.inf)
    result, out = merge_pair(tmp_path, monkeypatch, schnell, broken, "nonfinite=warn")
    assert result.nonfinite == {f"b: {key}": 1}
    assert json.loads((out / "fluxrecipe.json").read_text())["nonfinite_inputs"] == {f"b: {key}": 1}
    assert any(r.levelname == "WARNING" and "1 NaN/Inf input values in 1 tensor(s)" in r.getMessage() for r in caplog.records)


# --- through the command line: one line, no traceback ------------------------------------------------------


def test_cli_gives_one_line_and_no_traceback(tmp_path, schnell, broken):
    shard = first_shard(broken)
    shard.write_bytes(shard.read_bytes()[:-10])
    from conftest import write_recipe

    write_recipe(tmp_path / "recipes", "pair", pair_recipe(schnell, broken))
    out = tmp_path / "out"
    env = {"FLUXRECIPE_RECIPE_PATH": str(tmp_path / "recipes")}
    args = ["recipe=pair", f"output={out}", f"hydra.run.dir={tmp_path / 'run'}"]
    done = run_cli(args, cwd=tmp_path, env=env)
    assert done.returncode == 1, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.strip()]
    assert errors == [errors[0]] and errors[0].startswith("fluxrecipe: error: ") and str(shard) in errors[0], done.stderr
    assert "Traceback" not in done.stderr
    assert_no_output(out)
    asked = run_cli([*args, "traceback=true"], cwd=tmp_path, env=env)  # the traceback when asked for
    assert asked.returncode != 0 and "Traceback" in asked.stderr and "SourceError" in asked.stderr
    assert_no_output(out)


# --- fuzz: mutated headers and bytes -----------------------------------------------------------------------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8) | st.sampled_from(["F16", "BF16", "F32", "F64", "I8", "F8_E4M3"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
FIELDS = st.sampled_from(["dtype", "shape", "data_offsets", "extra"])


@st.composite
def mutations(draw):
    """One mutation of a safetensors file: ('flip', byte, bit), ('cut', length), ('set', entry, field, value),
    ('drop', entry, field), ('metadata', value) or ('raw', header text edit)."""
    kind = draw(st.sampled_from(["flip", "flip_header", "cut", "set", "drop", "metadata", "splice"]))
    if kind in ("flip", "flip_header"):
        return (kind, draw(st.integers(0, 1 << 30)), draw(st.integers(0, 7)))
    if kind == "cut":
        return (kind, draw(st.integers(0, 1 << 30)))
    if kind == "set":
        return (kind, draw(st.integers(0, 1000)), draw(FIELDS), draw(JSON_VALUES))
    if kind == "drop":
        return (kind, draw(st.integers(0, 1000)), draw(FIELDS))
    if kind == "metadata":
        return (kind, draw(JSON_VALUES))
    return (kind, draw(st.integers(0, 1 << 30)), draw(st.binary(max_size=6)))


def mutate(path: Path, mutation: tuple) -> None:
    raw = path.read_bytes()
    kind = mutation[0]
    if kind in ("flip", "flip_header"):
        n = 8 + int.from_bytes(raw[:8], "little") if kind == "flip_header" else len(raw)
        i = mutation[1] % n
        path.write_bytes(raw[:i] + bytes([raw[i] ^ (1 << mutation[2])]) + raw[i + 1 :])
    elif kind == "cut":
        path.write_bytes(raw[: mutation[1] % len(raw)])
    elif kind == "splice":  # replace a few header bytes with arbitrary ones
        n = 8 + int.from_bytes(raw[:8], "little")
        i = mutation[1] % n
        path.write_bytes(raw[:i] + mutation[2] + raw[i + len(mutation[2]) :])
    else:
        doc, data = split(path)
        names = sorted(k for k in doc if k != "__metadata__")
        if kind == "metadata":
            doc["__metadata__"] = mutation[1]
        else:
            entry = doc[names[mutation[1] % len(names)]]
            if kind == "set":
                entry[mutation[2]] = mutation[3]
            else:
                entry.pop(mutation[2], None)
        join(path, json.dumps(doc, allow_nan=True).encode(), data)


FUZZ = settings(derandomize=True, database=None, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@settings(FUZZ, max_examples=300)
@given(mutation=mutations())
def test_fuzz_parser_and_source(schnell, mutation):
    """read_header and open_source on a mutated shard: success or a SourceError, nothing else."""
    from fluxrecipe.recipe import SourceSpec
    from fluxrecipe.sources import open_source
    from fluxrecipe.formats.safetensors import read_header

    with tempfile.TemporaryDirectory() as tmp:
        folder = copy_model(schnell, Path(tmp) / "m")
        shard = shards(folder)[1]
        mutate(shard, mutation)
        try:
            read_header(str(shard))
        except SourceError as e:
            assert str(shard) in str(e)
        try:
            open_source(SourceSpec(name="m", path=str(folder)))
        except SourceError as e:
            assert str(folder) in str(e)


@settings(FUZZ, max_examples=25)
@given(mutation=mutations())
def test_fuzz_merge(schnell, tmp_path_factory, monkeypatch, mutation):
    """A whole merge with a mutated source: success, or a FluxRecipeError and no output; nothing else."""
    tmp = tmp_path_factory.mktemp("fuzz")
    folder = copy_model(schnell, tmp / "m")
    mutate(shards(folder)[1], mutation)
    try:
        merge_pair(tmp, monkeypatch, schnell, folder, "diagnostics=false")
    except FluxRecipeError:
        assert_no_output(tmp / "out")
    else:
        from fluxrecipe.verify import verify_folder

        assert leftovers(tmp / "out") == ["out"] and verify_folder(tmp / "out", hash_files=False).problems == []
