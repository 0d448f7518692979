"""The same recipe on the same inputs gives byte-identical output files, whatever the threads and chunking.

The recipe uses every op, three sources with three shard layouts, a float32 source among bf16 ones, and
keeps diagnostics on (its sums are the part of the output that depends on how the work is cut). Every file
is compared by sha256: shards, index, config, recipe.yaml, fluxrecipe.json, diagnostics.json, manifest.
CPU only: see the README on what a GPU cannot promise.
"""

from __future__ import annotations

import pytest
import torch

from conftest import make_flux, merge
from reliability_helpers import digests, use_recipe

RUNS = {
    "1 thread, default chunks": ["threads=1"],
    "4 threads, 1000-element chunks": ["threads=4", "chunk_elements=1000"],
    "2 threads, 333-element chunks": ["threads=2", "chunk_elements=333"],
}


@pytest.fixture(scope="module")
def third(tmp_path_factory):
    """schnell-like again, other weights, float32, 20 KB shards: a third layout and an upcast."""
    return make_flux(tmp_path_factory.mktemp("third") / "transformer", guidance=False, seed=2, shard="20KB", dtype=torch.float32)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_output_bytes_do_not_depend_on_threads_or_chunks(tmp_path, monkeypatch, schnell, krea, third, dtype):
    recipe = use_recipe(
        monkeypatch,
        tmp_path / "recipes",
        "everyop",
        f"""sources: {{a: '{schnell}', b: '{krea}', c: '{third}'}}
base: a
rules:
  - {{match: 'attn\\.to_q', op: 'add_difference:0.7'}}
  - {{match: 'norm', op: average}}
  - {{match: 'proj_out', op: 'weighted:0.2,0.3,0.5'}}
  - {{match: 'x_embedder', op: 'take:c'}}
  - {{match: 'context_embedder', op: 'take:a'}}
  - {{match: '.*', op: 'lerp:0.3', sources: [a, b]}}
dtype: {dtype}
""",
    )
    results = {}
    for name, options in RUNS.items():
        out = tmp_path / f"out-{len(results)}"
        merge([recipe, f"output={out}", "shard_size=100KB", "progress=false", *options])
        results[name] = digests(out)
    first, *others = results.values()
    assert len(first) == 10  # 3 shards and 7 side files
    for name, files in results.items():
        assert files == first, f"{name}: {sorted(k for k in files if files[k] != first.get(k))} differ from the first run"
