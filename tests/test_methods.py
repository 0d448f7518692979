"""The advanced methods of issue 9 through the whole merge, each against a float64 reference written here from
the issue's formulas (base = the rule's first source, tau_i = x_i - base in float32, everything after in
float64, one rounding at the end): the output must be within one rounding of the output dtype, element by
element, and mostly the reference rounded to nearest. Runs with chunks of 61, 97, 1000 and 2^20 elements on
1 to 3 threads give the same bytes. DARE's masks are recomputed here with numpy from the documented hash.

Two sets of sources: "plain" (krea bf16, half fp16, dev fp32: mixed dtypes and shard layouts) and "edge"
(krea, and two float32 sources made from it with the cases each method must get right: collinear and zero
tensors for slerp, ties at TIES' threshold, an all-zero task vector, opposite task vectors, 0/0 in train
difference).
"""

from __future__ import annotations

import hashlib
import json
import math
from decimal import Decimal
from fractions import Fraction

import numpy as np
import pytest
import torch

from conftest import OUT_DTYPES, compose, config_of, load_state, make_flux, run_recipe, save_sharded, shard_files
from fluxrecipe.errors import PlanError, RecipeError
from fluxrecipe.ops import OPS
from fluxrecipe.ops.advanced import dare_kept, stream_key, uniform_bits
from test_user_errors import fault_line, refused

COLLINEAR, ZERO_TAU, TIED, ZERO_NORM, NO_CHANGE, OPPOSITE = (
    "transformer_blocks.0.attn.to_q.weight",  # edge_a = 2 x base: slerp's |cos| = 1
    "transformer_blocks.0.attn.to_k.weight",  # edge_b = base: a zero task vector
    "transformer_blocks.0.ff.net.0.proj.weight",  # tau in {0, +-1/4, +-1/2}: ties at TIES' threshold
    "x_embedder.weight",  # edge_a = 0: a zero norm for slerp
    "proj_out.weight",  # both equal base in half the elements: train difference's 0/0
    "transformer_blocks.1.attn.to_q.weight",  # edge_b - base = -(edge_a - base): a sign vote of 0
)


# --- sources --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def edge(tmp_path_factory, krea, half, dev, state_of) -> dict[str, object]:
    """edge_a and edge_b: float32 diffusers folders made from half and dev, with the edge cases above."""
    base = {k: v.float() for k, v in state_of(krea).items()}
    g = torch.Generator().manual_seed(7)
    a = {k: v.float().clone() for k, v in state_of(half).items()}
    b = {k: v.float().clone() for k, v in state_of(dev).items()}
    a[COLLINEAR], b[ZERO_TAU] = 2 * base[COLLINEAR], base[ZERO_TAU].clone()
    levels = torch.tensor([0.0, 0.25, -0.25, 0.5, -0.5])
    for s in (a, b):
        s[TIED] = base[TIED] + levels[torch.randint(0, 5, base[TIED].shape, generator=g)]  # exact in float32
    a[ZERO_NORM] = torch.zeros_like(base[ZERO_NORM])
    half_rows = base[NO_CHANGE].shape[0] // 2
    a[NO_CHANGE][:half_rows], b[NO_CHANGE][:half_rows] = base[NO_CHANGE][:half_rows], base[NO_CHANGE][:half_rows]
    a[OPPOSITE] = base[OPPOSITE] + levels[torch.randint(1, 5, base[OPPOSITE].shape, generator=g)]
    b[OPPOSITE] = 2 * base[OPPOSITE] - a[OPPOSITE]
    root = tmp_path_factory.mktemp("edge")
    keys = sorted(base)
    folders = {}
    for name, state in (("edge_a", a), ("edge_b", b)):
        folders[name] = save_sharded(state, root / name, [keys[: len(keys) // 2], keys[len(keys) // 2 :]], config_of(krea))
    return {"krea": krea, **folders}


@pytest.fixture(scope="module")
def fourth(tmp_path_factory):
    """A fourth Krea-architecture source (bf16), for model stock over three task vectors."""
    return make_flux(tmp_path_factory.mktemp("fourth") / "transformer", guidance=True, seed=4, shard="60KB")


# --- the float64 references ------------------------------------------------------------------------------------


def splitmix_bits(seed: int, key: str, source: str, n: int) -> np.ndarray:
    """The documented draws: stream = BLAKE2b-64 of 'SEED\\0KEY\\0SOURCE' (little-endian); element i gets
    SplitMix64's output number i of that stream; its top 53 bits."""
    stream = int.from_bytes(hashlib.blake2b(f"{seed}\0{key}\0{source}".encode(), digest_size=8).digest(), "little")
    with np.errstate(over="ignore"):
        z = np.uint64(stream) + np.arange(1, n + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return z >> np.uint64(11)


def kept_mask(seed: int, key: str, source: str, n: int, p: float) -> torch.Tensor:
    return torch.from_numpy(splitmix_bits(seed, key, source, n) >= np.uint64(math.ceil(Fraction(p) * 2**53)))


def disjoint(base, ts, w, lam, sign):
    vote = sum(wi * t for wi, t in zip(w, ts)) if sign == "sum" else sum(torch.sign(t) for t in ts)
    gamma = torch.where(vote >= 0, 1.0, -1.0).double()
    agree = [torch.sign(t) == gamma for t in ts]
    total = sum(torch.where(m, wi * t, 0.0) for m, wi, t in zip(agree, w, ts))
    share = sum(torch.where(m, torch.tensor(wi, dtype=torch.float64), 0.0) for m, wi in zip(agree, w))
    return base + lam * torch.where(share == 0, 0.0, total / torch.where(share == 0, 1.0, share))


def reference(method: str, params: dict, xs: list[torch.Tensor], key: str, sources: list[str]) -> torch.Tensor:
    """The issue's formula for one tensor, in float64 (flattened; tau_i computed in float32, as specified)."""
    x = [t.double().flatten() for t in xs]
    base = x[0]
    taus = [(t.float() - xs[0].float()).double().flatten() for t in xs[1:]]
    w = params.get("weights", [1.0] * len(taus))
    lam = params.get("lambda", 1.0)
    if method == "slerp":
        t = params["t"]
        n1, n2 = x[0].norm(), x[1].norm()
        cos = (x[0] @ x[1]) / (n1 * n2) if n1 and n2 else torch.tensor(1.0)
        if abs(cos) > 0.9995:
            return (1 - t) * x[0] + t * x[1]
        theta = torch.arccos(cos)
        return torch.sin((1 - t) * theta) / torch.sin(theta) * x[0] + torch.sin(t * theta) / torch.sin(theta) * x[1]
    if method == "task_arithmetic":
        return base + lam * sum(wi * t for wi, t in zip(w, taus))
    if method == "ties":
        trimmed = []
        for t in taus:
            k = math.ceil(Decimal(str(params["density"])) * t.numel())
            threshold = t.abs().sort(descending=True).values[k - 1]
            trimmed.append(torch.where(t.abs() >= threshold, t, 0.0))
        return disjoint(base, trimmed, w, lam, params.get("sign", "sum"))
    if method in ("dare", "dare_ties"):
        p, seed = params["p"], params.get("seed", 0)
        kept = [torch.where(kept_mask(seed, key, s, t.numel(), p), t / (1 - p), 0.0) for t, s in zip(taus, sources[1:])]
        if method == "dare":
            return base + lam * sum(wi * t for wi, t in zip(w, kept))
        return disjoint(base, kept, w, lam, params.get("sign", "sum"))
    if method == "model_stock":
        n = len(taus)
        cosines = []
        for i in range(n):
            for j in range(i + 1, n):
                ni, nj = taus[i].norm(), taus[j].norm()
                cosines.append(float((taus[i] @ taus[j]) / (ni * nj)) if ni and nj else 0.0)
        cos = sum(cosines) / len(cosines)
        t = n * cos / (1 + (n - 1) * cos) if 1 + (n - 1) * cos >= 1e-6 else 0.0  # cancelling task vectors: the base
        return t * sum(x[1:]) / n + (1 - t) * base
    if method == "train_difference":
        a, b, c = x
        near, whole = (b - a).abs(), (b - a).abs() + (b - c).abs()
        return a + 1.8 * params["alpha"] * (b - c) * torch.where(whole == 0, 0.0, near / torch.where(whole == 0, 1.0, whole))
    raise ValueError(method)


MANTISSA = {torch.bfloat16: (7, -126), torch.float16: (10, -14), torch.float32: (23, -126)}


def off_by_more_than_a_rounding(got: torch.Tensor, want: torch.Tensor, inputs: list[torch.Tensor]) -> torch.Tensor:
    """Elements of `got` (the output dtype) farther from the float64 `want` than one unit in the last place of
    the output dtype, plus what float32 arithmetic (the methods' own, as specified) may lose: 16 float32
    roundings of the inputs' magnitude. That slack matters only where the terms cancel (a result of 1e-6
    from inputs of 0.2); a wrong formula is off by far more."""
    bits, emin = MANTISSA[got.dtype]
    g = got.double().flatten()
    _, exponent = torch.frexp(torch.maximum(want.abs(), g.abs()))
    ulp = torch.pow(2.0, torch.clamp(exponent.double() - 1, min=emin) - bits)
    float32_slack = sum(x.double().abs().flatten() for x in inputs) * 2.0**-20
    return (g - want).abs() > ulp + float32_slack


# --- every method against its reference ----------------------------------------------------------------------

METHODS = [
    pytest.param("slerp", {"t": 0.3}, 2, id="slerp"),
    pytest.param("task_arithmetic", {"weights": [0.7, 0.4], "lambda": 0.9}, 3, id="task_arithmetic"),
    pytest.param("ties", {"density": 0.3, "weights": [1.0, 0.6], "lambda": 1.2}, 3, id="ties-sum"),
    pytest.param("ties", {"density": 0.55, "sign": "count"}, 3, id="ties-count"),
    pytest.param("dare", {"p": 0.3, "weights": [0.8, 0.5], "lambda": 1.1, "seed": 42}, 3, id="dare"),
    pytest.param("dare_ties", {"p": 0.6, "seed": 7}, 3, id="dare_ties"),
    pytest.param("model_stock", {}, 3, id="model_stock"),
    pytest.param("train_difference", {"alpha": 0.8}, 3, id="train_difference"),
]
SETS = {"plain": ("krea", "half", "dev"), "edge": ("krea", "edge_a", "edge_b")}


def merged(recipe_dir, out, folders: dict, method: str, params: dict, dtype: str, *options: str):
    recipe = {"sources": {n: str(p) for n, p in folders.items()}, "rules": [{"match": ".*", "op": {method: params}}], "dtype": dtype}
    return run_recipe(recipe_dir, out, recipe, "shard_size=40KB", *options)


def folders_of(request, edge, names: tuple[str, ...]) -> dict:
    return {n: edge[n] if n.startswith("edge") else request.getfixturevalue(n) for n in names}


@pytest.mark.parametrize("sources, dtype", [("plain", "bf16"), ("edge", "fp16")])
@pytest.mark.parametrize("method, params, count", METHODS)
def test_method_is_its_formula_within_one_rounding(request, recipe_dir, tmp_path, state_of, edge, method, params, count, sources, dtype):
    names = SETS[sources][:count]
    folders = folders_of(request, edge, names)
    out = tmp_path / "out"
    merged(recipe_dir, out, folders, method, params, dtype)
    got, states = state_of(out), [state_of(f) for f in folders.values()]
    assert got.keys() == states[0].keys() and len(shard_files(out)) > 3
    off, exact, total = [], 0, 0
    for key, tensor in got.items():
        want = reference(method, params, [s[key] for s in states], key, list(names))
        assert tensor.dtype == OUT_DTYPES[dtype] and tensor.shape == states[0][key].shape
        if off_by_more_than_a_rounding(tensor, want, [s[key] for s in states]).any():
            off.append(key)
        exact += int((tensor.flatten() == want.to(tensor.dtype)).sum())
        total += tensor.numel()
    assert off == []
    assert exact > 0.99 * total  # one rounding of the exact value, but for a few float32 ties


def test_model_stock_over_three_task_vectors(recipe_dir, tmp_path, state_of, krea, half, dev, fourth):
    folders = {"krea": krea, "half": half, "dev": dev, "fourth": fourth}
    merged(recipe_dir, tmp_path / "out", folders, "model_stock", {}, "bf16")
    got, states = state_of(tmp_path / "out"), [state_of(f) for f in folders.values()]
    assert [k for k in got if off_by_more_than_a_rounding(got[k], reference("model_stock", {}, [s[k] for s in states], k, list(folders)), [s[k] for s in states]).any()] == []


def test_the_edge_cases_are_in_the_edge_sources(state_of, edge, krea):
    """The edge sources hold what they claim (so the reference test above covers those branches)."""
    base, a, b = state_of(krea), state_of(edge["edge_a"]), state_of(edge["edge_b"])
    x1, x2 = base[COLLINEAR].double().flatten(), a[COLLINEAR].double().flatten()
    assert float(x1 @ x2 / (x1.norm() * x2.norm())) > 0.9995
    assert not a[ZERO_NORM].any() and torch.equal(b[ZERO_TAU].float(), base[ZERO_TAU].float())
    tau = (a[TIED].float() - base[TIED].float()).abs()
    k = math.ceil(0.3 * tau.numel())
    threshold = tau.flatten().sort(descending=True).values[k - 1]
    assert int((tau == threshold).sum()) > 100 and int((tau >= threshold).sum()) > k  # many ties, all kept
    assert torch.equal(a[OPPOSITE].float() - base[OPPOSITE].float(), -(b[OPPOSITE].float() - base[OPPOSITE].float()))


@pytest.mark.parametrize("method, params, count", METHODS)
def test_threads_and_chunk_sizes_do_not_change_a_byte(request, recipe_dir, tmp_path, edge, method, params, count):
    """Chunks of 61 and 97 elements (primes: they cut rows, segments and slices anywhere), 1000, and 2^20 (every
    tiny tensor whole), on 3, 1 and 2 threads: the same shards, byte for byte."""
    folders = folders_of(request, edge, SETS["edge"][:count])
    runs = {"whole": ["chunk_elements=1048576"], "61": ["chunk_elements=61", "threads=3"], "97": ["chunk_elements=97", "threads=1"], "1000": ["chunk_elements=1000", "threads=2"]}
    for name, options in runs.items():
        merged(recipe_dir, tmp_path / name, folders, method, params, "fp32", *options)
    first = [p.read_bytes() for p in shard_files(tmp_path / "whole")]
    for name in ("61", "97", "1000"):
        assert [p.read_bytes() for p in shard_files(tmp_path / name)] == first, name


@pytest.fixture
def reads(monkeypatch) -> list[int]:
    """The bytes of every pread the merges make from now on (the reader's own count, summed over its calls)."""
    from fluxrecipe.execute.reader import Reader

    counted: list[int] = []
    pread = Reader._pread

    def counting(self, path, offset, view, what):
        counted.append(len(view))
        return pread(self, path, offset, view, what)

    monkeypatch.setattr(Reader, "_pread", counting)
    return counted


@pytest.mark.parametrize("chunk", ["1048576", "4096"])
def test_ties_reads_its_inputs_twice(recipe_dir, tmp_path, krea, half, dev, reads, chunk):
    """One statistics pass and the output pass (issue 22): the threshold's low bits are counted in the same
    pass as its high bits, within a window around each chunk's own estimate (ample for chunks of 4096
    elements of one tensor); lerp, for scale, reads its inputs once."""
    folders = {"krea": krea, "half": half, "dev": dev}
    once = merged(recipe_dir, tmp_path / "task", folders, "task_arithmetic", {}, "bf16", f"chunk_elements={chunk}").bytes_read
    assert sum(reads) == once
    reads.clear()
    result = merged(recipe_dir, tmp_path / "ties", folders, "ties", {"density": 0.3}, "bf16", f"chunk_elements={chunk}")
    assert sum(reads) == 2 * once == result.bytes_read  # the result counts what was read, passes included


@pytest.mark.parametrize("method, params, names", [("slerp", {"t": 0.6}, ("krea", "half")), ("model_stock", {}, ("krea", "half", "dev"))])
def test_slerp_and_model_stock_read_their_inputs_twice(recipe_dir, tmp_path, krea, half, dev, reads, method, params, names):
    """Their per-tensor statistics (slerp's angle, model stock's cosines) come from one pass, then the output
    pass: twice what an average of the same sources reads (issue 22)."""
    folders = {n: {"krea": krea, "half": half, "dev": dev}[n] for n in names}
    once = merged(recipe_dir, tmp_path / "average", folders, "average", {}, "bf16").bytes_read
    assert sum(reads) == once
    reads.clear()
    result = merged(recipe_dir, tmp_path / method, folders, method, params, "bf16")
    assert sum(reads) == 2 * once == result.bytes_read


def test_single_file_sources_give_the_same_merge(recipe_dir, tmp_path, state_of, krea, half, dev):
    """Statistics are per canonical tensor: TIES and slerp over BFL single files equal the same over diffusers
    folders (the fused qkv and linear1 of BFL are split into their canonical tensors first)."""
    from safetensors.torch import save_file

    from flux_layouts import diffusers_to_bfl

    files = {}
    for name, folder in (("krea", krea), ("half", half), ("dev", dev)):
        files[name] = tmp_path / f"{name}.safetensors"
        save_file(diffusers_to_bfl(state_of(folder)), files[name])
    for method, params, names in (("ties", {"density": 0.3}, ("krea", "half", "dev")), ("slerp", {"t": 0.6}, ("krea", "half"))):
        merged(recipe_dir, tmp_path / f"{method}-d", {n: {"krea": krea, "half": half, "dev": dev}[n] for n in names}, method, params, "bf16")
        merged(recipe_dir, tmp_path / f"{method}-b", {n: files[n] for n in names}, method, params, "bf16")
        a, b = load_state(tmp_path / f"{method}-d"), load_state(tmp_path / f"{method}-b")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), method


@pytest.mark.diffusers
def test_output_loads_in_diffusers_and_records_the_seed(recipe_dir, tmp_path, krea, half, dev):
    from diffusers import FluxTransformer2DModel

    out = tmp_path / "out"
    merged(recipe_dir, out, {"krea": krea, "half": half, "dev": dev}, "dare_ties", {"p": 0.5, "seed": 1234}, "bf16")
    model, info = FluxTransformer2DModel.from_pretrained(out, output_loading_info=True)
    assert info == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}
    rule = json.loads((out / "fluxrecipe.json").read_text())["rules"][0]
    assert rule["params"] == {"p": 0.5, "weights": None, "lambda": 1.0, "seed": 1234, "sign": "sum"}
    merged(recipe_dir, tmp_path / "default", {"krea": krea, "half": half, "dev": dev}, "dare", {"p": 0.5}, "bf16")
    assert json.loads((tmp_path / "default" / "fluxrecipe.json").read_text())["rules"][0]["params"]["seed"] == 0  # a default seed is recorded too


def test_a_scheduled_method_parameter(recipe_dir, tmp_path, state_of, krea, half, dev):
    """density per block: each block's tensors are TIES at that block's density."""
    params = {"density": {"default": 0.5, "double_blocks": [0.2, 0.9], "single_blocks.1": 1.0}}
    folders = {"krea": krea, "half": half, "dev": dev}
    merged(recipe_dir, tmp_path / "out", folders, "ties", params, "bf16")
    from fluxrecipe.families.flux1 import FAMILY

    block_of = FAMILY.block_of

    density = {"double_blocks.0": 0.2, "double_blocks.1": 0.9, "single_blocks.1": 1.0}
    got, states = state_of(tmp_path / "out"), [state_of(f) for f in folders.values()]
    for key, tensor in got.items():
        want = reference("ties", {"density": density.get(block_of(key), 0.5)}, [s[key] for s in states], key, list(folders))
        assert not off_by_more_than_a_rounding(tensor, want, [s[key] for s in states]).any(), key


# --- DARE's masks ----------------------------------------------------------------------------------------


def test_splitmix64_is_the_published_generator():
    """SplitMix64 seeded with 0 starts 0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4 (the published reference values)."""
    assert uniform_bits(0, 0, 2).tolist() == [0xE220A8397B1DCDAF >> 11, 0x6E789E6AA1B965F4 >> 11]


def test_masks_are_the_documented_hash_whatever_the_chunking():
    n, key = 5000, "single_transformer_blocks.3.proj_mlp.weight"
    stream = stream_key(9, key, "krea")
    whole = uniform_bits(stream, 0, n)
    assert whole.numpy().astype(np.uint64).tolist() == splitmix_bits(9, key, "krea", n).tolist()
    pieces = torch.cat([uniform_bits(stream, a, min(a + 61, n)) for a in range(0, n, 61)])
    assert torch.equal(pieces, whole)


def test_dare_keeps_the_fraction_1_minus_p_and_rescales_exactly():
    g = torch.Generator().manual_seed(3)
    tau = torch.randn(200_000, generator=g)
    for p in (0.1, 0.3, 0.9):
        out = dare_kept(tau, p, 5, "transformer_blocks.0.attn.to_q.weight", "krea", 0)
        kept = out != 0
        n = tau.numel()
        assert abs(int(kept.sum()) - (1 - p) * n) < 5 * math.sqrt(n * p * (1 - p))
        assert torch.equal(out[kept], tau[kept] / (1 - p))  # exactly tau / (1 - p) in float32, before any mixing
    assert torch.equal(dare_kept(tau, 0.0, 5, "k", "s", 0), tau)  # p = 0 keeps everything, unscaled


def test_dare_masks_differ_by_seed_key_and_source_and_not_by_the_chunk():
    tau, key = torch.ones(100_000), "transformer_blocks.0.attn.to_q.weight"

    def mask(seed=1, key=key, source="half"):
        return dare_kept(tau, 0.5, seed, key, source, 0) != 0

    same_shape_key = "transformer_blocks.0.attn.to_k.weight"
    for other in (mask(seed=2), mask(key=same_shape_key), mask(source="dev")):
        assert 0.45 < float((other == mask()).double().mean()) < 0.55  # independent masks agree half the time
    assert torch.equal(mask(), mask())
    chunked = torch.cat([dare_kept(tau[a : a + 97], 0.5, 1, key, "half", a) != 0 for a in range(0, tau.numel(), 97)])
    assert torch.equal(chunked, mask())


def test_dare_merges_use_different_masks_for_same_shape_keys(recipe_dir, tmp_path, state_of, krea, half):
    """In a real merge (weights [1], lambda 1): where the output equals the base, the element was dropped; two
    same-shape keys are dropped in different places, and another seed drops elsewhere again."""

    def dropped(seed: int, key: str) -> torch.Tensor:
        out = tmp_path / f"s{seed}"
        if not out.exists():
            merged(recipe_dir, out, {"krea": krea, "half": half}, "dare", {"p": 0.5, "seed": seed}, "fp32")
        base, a = state_of(krea)[key].float(), state_of(half)[key].float()
        return (state_of(out)[key] == base) & (a != base)

    q, k = dropped(1, "transformer_blocks.0.attn.to_q.weight"), dropped(1, "transformer_blocks.0.attn.to_k.weight")
    assert q.shape == k.shape and 0.4 < float(q.double().mean()) < 0.6
    assert not torch.equal(q, k) and not torch.equal(q, dropped(2, "transformer_blocks.0.attn.to_q.weight"))


# --- bad recipes: one line, naming the line ----------------------------------------------------------------


BAD = """\
sources:
  krea: {krea}
  half: {half}
{extra}{head}rules:
  - match: '.*'
    op: {op}
"""


@pytest.mark.parametrize(
    "op, head, extra, error, where, fragment",
    [
        ("{ties: {density: 0.2, lamda: 1}}  # FAULT", "", "", RecipeError, "rules[0].op", "ties: unknown parameter 'lamda' (did you mean 'lambda'? parameters: density, weights, lambda, sign)"),
        ("{ties: {weights: [1]}}  # FAULT", "", "", RecipeError, "rules[0].op", "ties: missing parameter 'density' (density: NUMBER)"),
        ("{dare: {p: 0.3, seed: 1.5}}  # FAULT", "", "", RecipeError, "rules[0].op", "dare: parameter 'seed' must be a whole number, got 1.5"),
        ("lerp:${recipe.alpha}", "alpha: [0.5]  # FAULT\n", "", RecipeError, "alpha", "a list is a gradient over the blocks and needs 2 or more numbers, got [0.5]"),
        ("lerp:${recipe.alpha}", "alpha: {default: 0.5, singel_blocks: 1}  # FAULT\n", "", RecipeError, "alpha", "'singel_blocks' is not a FLUX block name (did you mean 'single_blocks'?)"),
        ("lerp:${recipe.alpha}", "alpha: {default: 0.5, double_blocks.2: 1}  # FAULT\n", "", PlanError, "alpha", "lerp parameter 'alpha' names double_blocks.2, but the model has double_blocks.0..1"),
        ("lerp:${recipe.alpha}", "alpha: {double_blocks: 0.5, single_blocks: 1, final_layer: 1}  # FAULT\n", "", PlanError, "alpha", "lerp parameter 'alpha' gives no value for img_in, time_in, guidance_in, vector_in, txt_in"),
        ("{lerp: {alpha: {double_blocks: 0.5}}}  # FAULT", "", "", PlanError, "rules[0].op", "lerp parameter 'alpha' gives no value for img_in"),
        ("slerp:0.5  # FAULT", "", "  dev: {dev}\n", RecipeError, "rules[0].op", "slerp:0.5 takes 2 sources but gets 3 (krea, half, dev)"),
        ("ties:1.5  # FAULT", "", "", RecipeError, "rules[0].op", "ties: density must lie in (0, 1]"),
        ("ties:0  # FAULT", "", "", RecipeError, "rules[0].op", "ties: density must lie in (0, 1]"),
        ("{ties: {density: [0.5, 1.2]}}  # FAULT", "", "", RecipeError, "rules[0].op", "ties: density must lie in (0, 1] (the fraction of each task vector kept), got 1.2"),
        ("dare:1  # FAULT", "", "", RecipeError, "rules[0].op", "dare: p must lie in [0, 1)"),
        ("{dare_ties: {p: -0.1}}  # FAULT", "", "", RecipeError, "rules[0].op", "dare_ties: p must lie in [0, 1)"),
        ("model_stock  # FAULT", "", "", RecipeError, "rules[0].op", "model_stock takes 3 or more sources but gets 2"),
        ("{task_arithmetic: {weights: [1, 1]}}  # FAULT", "", "", RecipeError, "rules[0].op", "gives 2 weights for 1 task vectors (the sources after the base 'krea': half)"),
        ("{ties: {density: 0.5, sign: majority}}  # FAULT", "", "", RecipeError, "rules[0].op", "ties: parameter 'sign' must be one of sum, count, got 'majority'"),
    ],
    ids=["unknown-parameter", "missing-parameter", "seed-not-integer", "list-of-one", "misspelt-block", "block-beyond-the-model", "mapping-without-default", "op-mapping-without-default", "slerp-three-sources", "density-above-1", "density-0", "density-in-a-schedule", "p-1", "p-negative", "model-stock-two-sources", "weights-count", "sign-choice"],
)
def test_bad_method_recipes_are_one_line_naming_the_line(recipe_dir, tmp_path, krea, half, dev, op, head, extra, error, where, fragment):
    text = BAD.format(krea=krea, half=half, op=op, head=head, extra=extra.format(dev=dev))
    out = tmp_path / "merged" / "transformer"
    message = refused(error, [fragment], lambda: run_recipe(recipe_dir, out, text, name="bad"), out)
    assert message.startswith(f"recipe 'bad' ({recipe_dir / 'bad.yaml'}:{fault_line(text)}) {where}")


# --- the listing ---------------------------------------------------------------------------------------------


def test_methods_lists_every_op_with_parameters_and_formula(capsys):
    from fluxrecipe.cli.commands import methods as main

    assert main([]) == 0
    text = capsys.readouterr().out
    for spec in OPS.values():
        assert f"\n{spec.usage}  (" in text and f"= {spec.formula}" in text
        assert all(p.usage() in text for p in spec.params)
    assert "density: NUMBER" in text and "sign: sum|count (default sum)" in text and "seed: INTEGER (default 0)" in text
    assert main(["ties", "slerp"]) == 0 and "dare" not in capsys.readouterr().out
    assert main(["tie"]) == 1 and "no method 'tie'" in capsys.readouterr().err


def test_help_names_the_methods_listing():
    assert "python -m fluxrecipe methods" in compose([]).hydra.help.header


def test_a_scheduled_dare_merge_replays_from_its_recipe_yaml(recipe_dir, tmp_path, krea, half, dev):
    """recipe.yaml beside the weights rebuilds a merge with a per-block schedule and a seed, byte for byte (the
    schedule's block numbers, nested under their group, come back as the strings Hydra overrides find)."""
    import shutil

    from conftest import merge

    text = f"""\
sources: {{krea: {krea}, half: {half}, dev: {dev}}}
lam:
  default: 1.0
  double_blocks: {{0: 0.5, 1: 0.75}}
rules:
  - match: '.*'
    op: {{dare: {{p: 0.5, seed: 11, lambda: '${{recipe.lam}}'}}}}
"""
    run_recipe(recipe_dir, tmp_path / "first", text, name="scheduled")
    shutil.copy(tmp_path / "first" / "recipe.yaml", recipe_dir / "replay.yaml")
    merge(["recipe=replay", f"output={tmp_path / 'again'}", "progress=false"])
    assert [p.read_bytes() for p in shard_files(tmp_path / "again")] == [p.read_bytes() for p in shard_files(tmp_path / "first")]
    merge(["recipe=replay", f"output={tmp_path / 'other'}", "progress=false", "recipe.lam.double_blocks.1=0.25"])
    a, b = load_state(tmp_path / "first"), load_state(tmp_path / "other")
    assert {k for k in a if not torch.equal(a[k], b[k])} == {k for k in a if k.startswith("transformer_blocks.1.")}


# --- NaN in a source under nonfinite=warn ----------------------------------------------------------------------


@pytest.mark.parametrize("op", ["slerp:0.5", {"ties": {"density": 0.5}}, "model_stock"])
def test_a_nan_spoils_its_own_element_only_in_a_method_with_statistics(recipe_dir, tmp_path, krea, half, dev, state_of, op):
    """With nonfinite=warn a NaN counts as 0 in an op's statistics (slerp's angle, TIES' threshold, model
    stock's cosine), so one NaN in a source makes one NaN in the output, not a whole tensor of them; with
    nonfinite=error the first pass that reads it stops the merge."""
    from fluxrecipe.errors import SourceError

    key = "transformer_blocks.0.attn.to_q.weight"
    state = {k: v.float().clone() for k, v in state_of(half).items()}
    state[key].view(-1)[5] = float("nan")
    keys = sorted(state)
    nan_source = save_sharded(state, tmp_path / "nan", [keys], config_of(krea))
    sources = {"krea": str(krea), "nan": str(nan_source)} | ({"dev": str(dev)} if op != "slerp:0.5" else {})
    recipe = {"sources": sources, "rules": [{"match": ".*", "op": op}], "dtype": "fp32"}
    with pytest.raises(SourceError, match="holds NaN or Inf values"):
        run_recipe(recipe_dir, tmp_path / "refused", recipe)
    run_recipe(recipe_dir, tmp_path / "out", recipe, "nonfinite=warn")
    got = load_state(tmp_path / "out")[key]
    assert int(torch.isnan(got).sum()) <= 1 and torch.isfinite(got.view(-1)[torch.arange(got.numel()) != 5]).all()


def threshold_passes(taus: list[torch.Tensor], density: float, chunk: int) -> tuple[list[float], int]:
    """TIES' statistics passes run as the executor runs them (chunks folded in order, a pass skipped where it
    is not needed): the thresholds, and how many passes read the inputs."""
    from fluxrecipe.ops import Where
    from fluxrecipe.ops.threshold import TIES_PASSES

    base = torch.zeros_like(taus[0])
    xs, n, stats, passes = [base, *taus], base.numel(), (), 0
    for stat_pass in TIES_PASSES:
        if stat_pass.needed is not None and not stat_pass.needed(stats):
            continue
        state, passes = None, passes + 1
        for a in range(0, n, chunk):
            b = min(a + chunk, n)
            state = stat_pass.fold(state, stat_pass.partial([x[a:b] for x in xs], Where("k", a, b, ("a", "b", "c"), n), stats, {"density": density}))
        stats += (stat_pass.result(state, {"density": density}),)
    return [s.threshold for s in stats[-1]], passes


def test_ties_threshold_is_exact_in_one_pass_or_two():
    """Rows alike from chunk to chunk: one pass; rows a thousand times larger in the second half (the chunks'
    windows cannot agree), or density 1 (the smallest |tau|, whose size varies by octaves from chunk to chunk):
    a second pass; the exact k-th largest |tau| either way, as torch's kthvalue says."""
    g = torch.Generator().manual_seed(3)
    alike = [torch.randn(400_000, generator=g) * 0.01, torch.randn(400_000, generator=g)]
    unlike = [torch.cat([torch.randn(200_000, generator=g), torch.randn(200_000, generator=g) * 1000]) for _ in range(2)]
    for taus, density, want_passes in ((alike, 0.05, 1), (alike, 0.3, 1), (alike, 0.7, 1), (alike, 1.0, 2), (unlike, 0.3, 2)):
        k = math.ceil(density * taus[0].numel())
        want = [float(t.abs().kthvalue(t.numel() - k + 1).values) for t in taus]
        assert threshold_passes(taus, density, 100_000) == (want, want_passes), density


def test_ties_threshold_counts_a_crowded_window_densely_and_exactly():
    """A task vector whose sizes lie within 1% of each other puts most of a chunk in its window, which is then
    counted by one bincount instead of a sort; a chunk of zeros is counted from one test: the same exact
    threshold, in one pass (two where chunks of zeros and of values disagree)."""
    from fluxrecipe.ops import Where
    from fluxrecipe.ops.threshold import _high_partial

    g = torch.Generator().manual_seed(4)
    def alike() -> torch.Tensor:  # +-0.02 give or take 1%, in 101 steps
        return (torch.randint(0, 2, (n,), generator=g) * 2 - 1) * (0.02 + torch.randint(0, 101, (n,), generator=g) * 2e-6)

    n, chunk = 3_600_000, 1_200_000
    half = torch.cat([torch.zeros(n // 2), alike()[n // 2 :]])  # zeros, then values: the chunks' windows disagree
    for taus, dense, passes in (([alike(), alike()], True, 1), ([torch.zeros(n), alike()], False, 1), ([alike(), half], True, 2)):
        window = _high_partial([torch.zeros(chunk), *(t[:chunk] for t in taus)], Where("k", 0, chunk, ("a", "b", "c"), n), (), {"density": 0.3})[0][1]
        assert (window[2] is None) == dense  # (first, last, keys, counts): dense counts; or zeros, counted from one test
        k = math.ceil(0.3 * n)
        want = [float(t.abs().kthvalue(t.numel() - k + 1).values) for t in taus]
        assert threshold_passes(taus, 0.3, chunk) == (want, passes)
