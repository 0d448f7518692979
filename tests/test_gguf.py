"""GGUF in and out (issue 17): `format=gguf` outputs and GGUF sources, against the gguf package and diffusers.

The references: the merge computed here in float32 from the sources read with safetensors (conftest.reference),
laid out in BFL's names (flux_layouts.diffusers_to_bfl), quantized by `gguf.quants.quantize` whole; the types
ComfyUI-GGUF's convert.py would choose (test_gguf_layout.convert_py_type) with FLUX.1's outer layers kept in
BF16 as its llama.cpp patch keeps them; gguf's own GGUFReader; diffusers' from_single_file with its
GGUFQuantizationConfig.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader, GGUFWriter

from conftest import load_state, make_flux, reference
from flux_layouts import diffusers_to_bfl
from test_gguf_layout import OUTPUT, convert_py_type

from fluxrecipe import api
from fluxrecipe.errors import PlanError, SourceError, UsageError

QUANTS = [t for t in OUTPUT if gguf.GGML_QUANT_SIZES[t][0] > 1]
OUTER = ("img_in.", "txt_in.", "time_in.", "vector_in.", "guidance_in.", "final_layer.")  # FLUX.1's layers outside the blocks


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("gguf")
    return make_flux(root / "a", guidance=True, seed=3), make_flux(root / "b", guidance=True, seed=4)


def lerp_recipe(a: Path, b: Path, rules: list | None = None):
    return api.load_recipe({"sources": {"a": str(a), "b": str(b)}, "rules": rules or [{"match": ".*", "op": "lerp:0.3"}]}, name="lerp")


def reference_bfl(a: Path, b: Path) -> dict[str, torch.Tensor]:
    """lerp:0.3 of the two sources in float32, in BFL's names."""
    sa, sb = load_state(a), load_state(b)
    return diffusers_to_bfl({k: reference("lerp:0.3", [sa[k], sb[k]], torch.float32) for k in sa})


def expected_type(name: str, shape: tuple[int, ...], whole_file: Q) -> Q:
    wanted = Q.BF16 if whole_file in QUANTS and name.startswith(OUTER) else whole_file
    return convert_py_type(shape, wanted)


def quantized(values: torch.Tensor, ggml_type: Q) -> bytes:
    return np.ascontiguousarray(gguf.quants.quantize(values.float().numpy(), ggml_type)).tobytes()


def read_back(path: Path) -> dict[str, tuple[Q, tuple[int, ...], bytes]]:
    reader = GGUFReader(path)
    return {t.name: (t.tensor_type, tuple(int(d) for d in reversed(t.shape)), t.data.tobytes()) for t in reader.tensors}


@pytest.mark.parametrize("ggml_type", OUTPUT, ids=lambda t: t.name)
def test_every_tensor_is_gguf_quantize_of_the_float32_merge(pair, tmp_path, ggml_type):
    out = tmp_path / "merged.gguf"
    api.merge(lerp_recipe(*pair), out, format="gguf", gguf_type=ggml_type.name, diagnostics=False)
    want = reference_bfl(*pair)
    got = read_back(out)
    assert sorted(got) == sorted(want)  # BFL's names
    for name, (stored_type, shape, data) in got.items():
        assert shape == tuple(want[name].shape), name
        assert stored_type == expected_type(name, shape, ggml_type), name
        assert data == quantized(want[name], stored_type), name
    assert {Q.F32, ggml_type} <= {t for t, _, _ in got.values()}
    fields = GGUFReader(out).fields
    assert bytes(fields["general.architecture"].parts[-1]).decode() == "flux"
    assert int(fields["general.file_type"].parts[-1][0]) == int(gguf.LlamaFileType.ALL_F32 if ggml_type == Q.F32 else gguf.LlamaFileType[f"MOSTLY_{ggml_type.name}"])
    assert int(fields["general.quantization_version"].parts[-1][0]) == 2
    provenance = json.loads(bytes(fields["fluxrecipe.provenance"].parts[-1]))
    assert provenance["format"] == "gguf" and provenance["gguf_type"] == ggml_type.name and provenance["sources"]["a"]["content_hash"].startswith("xxh3-128:")
    assert json.loads(bytes(fields["fluxrecipe.recipe"].parts[-1]))["rules"] == [{"match": ".*", "op": "lerp:0.3"}]


def test_a_rule_dtype_sets_the_type_of_its_tensors(pair, tmp_path):
    """Per rule: the single blocks in Q8_0 and the final layer in F16 in a Q4_0 file; chunks of any size give the same bytes."""
    rules = [
        {"match": "^single_transformer_blocks\\.", "op": "lerp:0.3", "dtype": "q8_0"},
        {"match": "^norm_out\\.", "op": "lerp:0.3", "dtype": "f16"},
        {"match": ".*", "op": "lerp:0.3"},
    ]
    out = tmp_path / "mixed.gguf"
    plan = api.plan(lerp_recipe(*pair, rules), out, format="gguf", gguf_type="Q4_0")
    text = api.describe(plan)
    assert "gguf types (gguf_type=Q4_0" in text and "  Q8_0 " in text and "  Q4_0 " in text and "  F16 " in text
    api.write(plan, out, api.Options(progress=False, chunk_elements=1000, diagnostics=False))
    want = reference_bfl(*pair)
    for name, (stored_type, shape, data) in read_back(out).items():
        wanted = Q.Q8_0 if name.startswith("single_blocks.") else Q.F16 if name.startswith("final_layer.adaLN") else Q.Q4_0
        assert stored_type == convert_py_type(shape, wanted if wanted != Q.Q4_0 else expected_type(name, shape, Q.Q4_0)), name
        assert data == quantized(want[name], stored_type), name


def test_gguf_settings_that_cannot_work_are_one_line(pair, tmp_path):
    a, b = pair
    with pytest.raises(UsageError, match=r"^gguf_type=Q4_K is not offered: the gguf package cannot quantize Q4_K bit-exactly as ggml does; GGUF outputs are Q8_0, Q5_1, Q5_0, Q4_1, Q4_0, BF16, F16, F32$"):
        api.plan(lerp_recipe(a, b), tmp_path / "x.gguf", format="gguf", gguf_type="Q4_K")
    with pytest.raises(UsageError, match="^gguf_type=Q8_0 changes nothing: format=bfl writes no GGUF file"):
        api.plan(lerp_recipe(a, b), tmp_path / "x.safetensors", format="bfl", gguf_type="Q8_0")
    with pytest.raises(PlanError, match=r"rules\[0\]: dtype fp8 cannot be written in a GGUF file \(format=gguf\): a rule's dtype there is one of q8_0, q5_1"):
        api.plan(lerp_recipe(a, b, [{"match": ".*", "op": "lerp:0.3", "dtype": "fp8"}]), tmp_path / "x.gguf", format="gguf")
    with pytest.raises(PlanError, match="dtype q4_0 is a GGUF type, which only format=gguf writes"):
        api.plan(lerp_recipe(a, b, [{"match": ".*", "op": "lerp:0.3", "dtype": "q4_0"}]), tmp_path / "x.safetensors", format="bfl")
    with pytest.raises(PlanError, match="a fused tensor has one dtype"):
        api.plan(lerp_recipe(a, b, [{"match": "to_q", "op": "lerp:0.3", "dtype": "q8_0"}, {"match": ".*", "op": "lerp:0.3"}]), tmp_path / "x.gguf", format="gguf", gguf_type="Q4_0")
    with pytest.raises(UsageError, match=r"format=gguf writes one file: name it, as output=merged/model\.gguf"):
        api.merge(lerp_recipe(a, b), tmp_path / "x.safetensors", format="gguf")
    assert not list(tmp_path.iterdir())  # nothing half-written


# ---------------------------------------------------------------------------------------------- diffusers


@pytest.mark.diffusers
def test_diffusers_loads_the_file_at_flux_width_and_dequantizes_the_reference(tmp_path):
    """`FluxTransformer2DModel.from_single_file(FILE, quantization_config=GGUFQuantizationConfig(...), config=...)`
    on a Q8_0 file of a FLUX-width model (one double and one single block): every weight it holds is the
    source's, quantized by gguf.quants and dequantized as diffusers does (in float16 for Q8_0); BF16 and F32
    ones exactly the source's values."""
    from diffusers import FluxTransformer2DModel, GGUFQuantizationConfig
    from diffusers.quantizers.gguf.utils import GGUFParameter, dequantize_gguf_tensor
    from diffusers.utils import logging

    from test_flux_width import generate

    source = generate(tmp_path / "source")
    out = tmp_path / "flux-q8.gguf"
    take = api.load_recipe({"sources": {"m": str(source)}, "rules": [{"match": ".*", "op": "take:m"}]}, name="take")
    api.merge(take, out, format="gguf", diagnostics=False)
    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        model = FluxTransformer2DModel.from_single_file(str(out), quantization_config=GGUFQuantizationConfig(compute_dtype=torch.float32), config=str(source))
    finally:
        logging.set_verbosity(level)
    state = load_state(source)
    loaded = dict(model.named_parameters())
    assert sorted(loaded) == sorted(state)
    kinds = set()
    for key, param in loaded.items():
        want = state[key].float()
        if not isinstance(param, GGUFParameter):
            kinds.add("plain")
            assert torch.equal(param.data.float(), want), key
            continue
        kinds.add(param.quant_type.name)
        if param.quant_type == Q.BF16:
            assert torch.equal(dequantize_gguf_tensor(param), want), key
            continue
        assert param.quant_type == Q.Q8_0, key
        values = gguf.quants.dequantize(gguf.quants.quantize(want.numpy(), Q.Q8_0), Q.Q8_0)
        assert torch.equal(dequantize_gguf_tensor(param), torch.from_numpy(values).half()), key
    assert kinds == {"plain", "BF16", "Q8_0"}


# ---------------------------------------------------------------------------------------------- GGUF sources


def write_gguf(path: Path, tensors: dict[str, torch.Tensor], types: dict[str, Q], architecture: str = "flux") -> None:
    """A GGUF file written by gguf's own GGUFWriter, each tensor quantized whole by gguf.quants."""
    writer = GGUFWriter(path, architecture)
    for name, value in tensors.items():
        data = gguf.quants.quantize(value.float().numpy(), types[name])
        writer.add_tensor(name, data, raw_shape=data.shape, raw_dtype=types[name])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def gguf_source(pair, tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor], dict[str, Q]]:
    """Source a as ComfyUI-GGUF would write it in Q4_1 (its blocks) and Q5_0 (its single blocks), with gguf's
    writer; its values as gguf.quants.dequantize gives them, in BFL's names."""
    bfl = diffusers_to_bfl({k: v for k, v in load_state(pair[0]).items()})
    types = {n: convert_py_type(tuple(t.shape), Q.Q5_0 if n.startswith("single_blocks.") else Q.Q4_1) for n, t in bfl.items()}
    path = tmp_path_factory.mktemp("gguf-source") / "a.gguf"
    write_gguf(path, bfl, types)
    values = {n: torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(t.float().numpy(), types[n]), types[n])) for n, t in bfl.items()}
    return path, values, types


def test_a_gguf_source_merged_with_a_safetensors_source_is_the_merge_of_its_dequantized_values(pair, gguf_source, tmp_path):
    path, values, _ = gguf_source
    recipe = api.load_recipe({"sources": {"g": str(path), "b": str(pair[1])}, "rules": [{"match": ".*", "op": "lerp:0.3"}], "dtype": "fp32"}, name="mix")
    plan = api.plan(recipe, tmp_path / "out.safetensors", format="bfl")
    assert plan.sources[0].layout == "gguf" and {"Q4_1", "Q5_0", "F32"} <= set(plan.sources[0].dtypes)
    api.write(plan, tmp_path / "out.safetensors", api.Options(progress=False, chunk_elements=1000))
    from safetensors.torch import load_file

    got = load_file(tmp_path / "out.safetensors")
    other = diffusers_to_bfl(load_state(pair[1]))
    assert sorted(got) == sorted(values)
    for name, value in values.items():
        assert torch.equal(got[name], reference("lerp:0.3", [value, other[name]], torch.float32)), name


def test_a_gguf_source_to_gguf_of_its_own_types_copies_every_tensor(gguf_source, tmp_path):
    """take from a GGUF source into the same types: the bytes as they are (no second quantization)."""
    path, _, types = gguf_source
    recipe = api.load_recipe({"sources": {"g": str(path)}, "rules": [{"match": "^single_transformer_blocks\\.", "op": "take:g", "dtype": "q5_0"}, {"match": ".*", "op": "take:g"}]}, name="copy")
    api.merge(recipe, tmp_path / "copy.gguf", format="gguf", gguf_type="Q4_1")
    source = read_back(path)
    for name, (stored_type, _, data) in read_back(tmp_path / "copy.gguf").items():
        if stored_type == types[name]:
            assert data == source[name][2], name
    assert {read_back(tmp_path / "copy.gguf")[n][0] for n in types} >= {Q.Q4_1, Q.Q5_0}


def corrupt(path: Path, data: bytes, case: str) -> bytes:
    """`data` (a good GGUF file) broken one way."""
    first = gguf.GGUFReader(path).tensors[0]
    info = data.index(first.name.encode()) + len(first.name)  # n_dims, dims, type, offset follow the name
    n_dims = len(first.shape)
    type_at = info + 4 + 8 * n_dims
    if case == "truncated":
        return data[: len(data) - 100]
    if case == "magic":
        return b"GGUG" + data[4:]
    if case == "past the end":
        return data[: type_at + 4] + (len(data)).to_bytes(8, "little") + data[type_at + 12 :]
    if case == "unknown type":
        return data[:type_at] + (99).to_bytes(4, "little") + data[type_at + 4 :]
    if case == "absurd shape":
        return data[: info + 4] + (1 << 62).to_bytes(8, "little") + data[info + 12 :]
    raise ValueError(case)


@pytest.mark.parametrize(
    "case, said",
    [
        ("truncated", "past the end of the file"),
        ("magic", "not a GGUF file"),
        ("past the end", "is not a multiple of the file's alignment|past the end of the file"),
        ("unknown type", "unknown ggml type 99"),
        ("absurd shape", "larger than the whole file"),
    ],
)
def test_a_bad_gguf_source_is_one_line_naming_the_file(gguf_source, tmp_path, case, said):
    path = tmp_path / "bad.gguf"
    path.write_bytes(corrupt(gguf_source[0], gguf_source[0].read_bytes(), case))
    recipe = api.load_recipe({"sources": {"g": str(path)}, "rules": [{"match": ".*", "op": "take:g"}]}, name="bad")
    with pytest.raises(SourceError, match=said) as e:
        api.plan(recipe, tmp_path / "out.gguf", format="gguf")
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_a_gguf_file_of_another_architecture_is_one_line(tmp_path):
    path = tmp_path / "llm.gguf"
    write_gguf(path, {"token_embd.weight": torch.ones(8, 32)}, {"token_embd.weight": Q.Q8_0}, architecture="llama")
    recipe = api.load_recipe({"sources": {"g": str(path)}, "rules": [{"match": ".*", "op": "take:g"}]}, name="llm")
    with pytest.raises(SourceError, match=rf"^{path}: a GGUF file of architecture 'llama' \(general.architecture\), not a FLUX transformer"):
        api.plan(recipe, tmp_path / "out.gguf", format="gguf")


# ---------------------------------------------------------------------------------------------- the command line


def test_to_gguf_then_verify_then_overwrite(pair, tmp_path):
    from conftest import run_cli

    out = tmp_path / "flux-Q4_0.gguf"
    ran = run_cli(["recipe=to_gguf", f"recipe.sources.model={pair[0]}", f"output={out}", "gguf_type=Q4_0", "progress=false"], tmp_path)
    assert ran.returncode == 0, ran.stderr
    assert {t for t, _, _ in read_back(out).values()} == {Q.Q4_0, Q.BF16, Q.F32}
    checked = run_cli(["verify", str(out)], tmp_path)
    assert checked.returncode == 0 and "its data matches the sha256 in its metadata and its values are finite" in checked.stdout, checked.stderr
    again = run_cli(["recipe=to_gguf", f"recipe.sources.model={pair[0]}", f"output={out}", "overwrite=true", "progress=false"], tmp_path)
    assert again.returncode == 0, again.stderr
    assert Q.Q8_0 in {t for t, _, _ in read_back(out).values()}
    data = bytearray(out.read_bytes())
    data[-100] ^= 0xFF
    out.write_bytes(bytes(data))
    broken = run_cli(["verify", str(out)], tmp_path)
    assert broken.returncode == 1 and "the file changed after the merge" in broken.stderr
    refused = run_cli(["recipe=to_bfl", f"recipe.sources.model={pair[0]}", f"output={tmp_path / 'x.safetensors'}", "gguf_type=Q4_0"], tmp_path)
    assert refused.returncode != 0 and "gguf_type=Q4_0 changes nothing: format=bfl writes no GGUF file" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1


def test_a_gguf_source_bakes_a_lora_as_the_file_of_its_dequantized_values_does(gguf_source, tmp_path):
    """A LoRA baked into a GGUF source gives what it gives baked into a float32 BFL file of the source's
    dequantized values, bit for bit: the GGUF source is those values."""
    from safetensors.torch import load_file, save_file

    from test_readme import lora_stand_in

    path, values, _ = gguf_source
    plain = tmp_path / "dequantized.safetensors"
    save_file({k: v.contiguous() for k, v in values.items()}, plain)
    lora = lora_stand_in(tmp_path / "lora.safetensors")
    outputs = []
    for source in (path, plain):
        out = tmp_path / f"baked-{source.suffix[1:]}.safetensors"
        recipe = api.load_recipe({"sources": {"m": str(source)}, "rules": [{"match": ".*", "op": "take:m"}], "loras": {"l": {"path": str(lora), "strength": 0.7}}, "dtype": "fp32"}, name="bake")
        api.merge(recipe, out, format="bfl")
        outputs.append(load_file(out))
    changed = [k for k in values if not torch.equal(outputs[0][k], values[k])]
    assert changed == ["double_blocks.0.img_attn.qkv.weight"]
    assert all(torch.equal(outputs[0][k], outputs[1][k]) for k in values)


def test_the_recipes_own_dtype_is_said_to_be_unused(pair, tmp_path):
    a, b = pair
    recipe = api.load_recipe({"sources": {"a": str(a), "b": str(b)}, "rules": [{"match": ".*", "op": "lerp:0.3"}], "dtype": "bf16"}, name="lerp")
    plan = api.plan(recipe, tmp_path / "x.gguf", format="gguf")
    assert "format=gguf: the recipe's dtype bf16 is not used; tensors whose rule names no dtype are Q8_0 (gguf_type=), or kept in high precision" in plan.notes
    assert "format=gguf" not in " ".join(api.plan(lerp_recipe(a, b), tmp_path / "x.gguf", format="gguf").notes)
