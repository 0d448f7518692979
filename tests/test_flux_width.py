"""Single files at FLUX.1's width, checked against diffusers itself (issue 8).

diffusers' BFL converter hard-codes FLUX.1's width (inner_dim 3072, mlp_ratio 4), so these tests use a
FLUX-width model with one double and one single block (530 M parameters, 1.06 GB in bf16): a BFL source
read by fluxrecipe equals `convert_flux_transformer_checkpoint_to_diffusers` of it, and `format=bfl` /
`format=comfyui` outputs load with `FluxTransformer2DModel.from_single_file(..., config=<a diffusers
folder>)` into exactly the tensors of the same merge written as diffusers. The files are made once for the
module; the merges run without diagnostics (they are tested elsewhere) to keep the suite short.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import load_state

pytestmark = pytest.mark.diffusers  # every test here compares with diffusers' own from_single_file and converter

CONFIG = dict(
    _class_name="FluxTransformer2DModel",
    patch_size=1,
    in_channels=4,
    num_layers=1,
    num_single_layers=1,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=32,
    pooled_projection_dim=32,
    axes_dims_rope=[16, 56, 56],
    guidance_embeds=True,
)


def generate(folder: Path) -> Path:
    """A diffusers folder of random bf16 weights at FLUX.1's width, written tensor by tensor."""
    from fluxrecipe.architecture import expected_parameters
    from fluxrecipe.writer import open_safetensors

    shapes = expected_parameters(CONFIG, "test")
    folder.mkdir()
    f = open_safetensors(folder / "diffusion_pytorch_model.safetensors", [(k, "BF16", s) for k, s in shapes.items()], {"format": "pt"})
    g = torch.Generator().manual_seed(0)
    for shape in shapes.values():
        f.write(torch.randn(math.prod(shape), generator=g).mul_(0.02).to(torch.bfloat16).view(torch.uint8).numpy())
    f.close()
    (folder / "config.json").write_text(json.dumps(CONFIG))
    return folder


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """The source (diffusers), the source as BFL (take), and one merge (weighted:0.5) as diffusers and ComfyUI."""
    from fluxrecipe import api

    root = tmp_path_factory.mktemp("wide")
    source = generate(root / "source")
    take = api.load_recipe({"sources": {"m": str(source)}, "rules": [{"match": ".*", "op": "take:m"}]}, name="take")
    half = api.load_recipe({"sources": {"m": str(source)}, "rules": [{"match": ".*", "op": "weighted:0.5"}]}, name="half")
    files = {"source": source, "bfl": root / "source-bfl.safetensors", "merged": root / "merged", "comfyui": root / "merged-comfyui.safetensors"}
    api.merge(take, files["bfl"], format="bfl", diagnostics=False)
    api.merge(half, files["merged"], diagnostics=False)
    api.merge(half, files["comfyui"], format="comfyui", diagnostics=False)
    yield files
    shutil.rmtree(root)  # 4.2 GB: not left for the end of the session


def from_single_file(path: Path, config: Path) -> dict[str, torch.Tensor]:
    from diffusers import FluxTransformer2DModel
    from diffusers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        model = FluxTransformer2DModel.from_single_file(str(path), config=str(config), torch_dtype=torch.bfloat16)
    finally:
        logging.set_verbosity(level)
    return model.state_dict()


def assert_equal_states(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    assert [k for k in want if not torch.equal(got[k], want[k])] == []


@pytest.mark.parametrize("fmt, source, reference", [("bfl", "bfl", "source"), ("comfyui", "comfyui", "merged")])
def test_single_file_output_loads_in_diffusers_as_the_diffusers_merge(wide, fmt, source, reference):
    assert_equal_states(from_single_file(wide[source], wide[reference]), load_state(wide[reference]))


def test_bfl_source_reads_as_diffusers_converts_it(wide):
    """fluxrecipe's canonical tensors of a BFL file (the byte pieces its plan reads) equal diffusers'
    conversion of the file, tensor by tensor."""
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    from fluxrecipe.formats import recognise
    from fluxrecipe.formats.safetensors import read_header

    header = read_header(str(wide["bfl"]))
    found = recognise("bfl", str(wide["bfl"]), header.entries, header.metadata)
    assert found.layout == "bfl"
    converted = convert_flux_transformer_checkpoint_to_diffusers(load_file(wide["bfl"]))
    raw = wide["bfl"].read_bytes()
    ours = {}
    for key, ref in found.tensors.items():
        data = bytearray(b"".join(raw[p.begin : p.begin + p.nbytes] for p in ref.pieces))
        ours[key] = torch.frombuffer(data, dtype=torch.bfloat16).reshape(ref.shape)
    assert_equal_states(ours, converted)
    assert_equal_states(ours, load_state(wide["source"]))
