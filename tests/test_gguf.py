"""GGUF in and out (issue 17): `format=gguf` outputs and GGUF sources, against the gguf package and diffusers.

The references: the merge computed here in float32 from the sources read with safetensors (conftest.reference),
laid out in BFL's names (flux_layouts.diffusers_to_bfl), quantized by `gguf.quants.quantize` whole; the types
ComfyUI-GGUF's convert.py would choose (test_gguf_layout.convert_py_type) with FLUX.1's outer layers kept in
BF16 as its llama.cpp patch keeps them; gguf's own GGUFReader; diffusers' from_single_file with its
GGUFQuantizationConfig.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader

from conftest import load_state, make_flux, reference
from flux_layouts import diffusers_to_bfl
from test_gguf_layout import OUTPUT, convert_py_type

from fluxrecipe import api
from fluxrecipe.errors import PlanError, UsageError

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
    assert "fluxrecipe.provenance" in fields and "fluxrecipe.recipe" in fields


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
