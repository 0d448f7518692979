"""Whole merges, in-process: what the built-in recipes write, that diffusers loads it and computes with it,
the seed script's parity, dry runs, the kinds of sources, and the provenance that lets an output be rebuilt."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import (
    REPO_ROOT,
    config_of,
    load_state,
    merge,
    reference,
    save_sharded,
    shard_files,
    source_overrides,
)

GUIDANCE = "time_text_embed.guidance_embedder."


def builtin(name: str, out: Path, schnell: Path, krea: Path, *overrides: str):
    return merge([f"recipe={name}", *source_overrides(schnell, krea), f"output={out}", "progress=false", *overrides])


def lerp_reference(a: dict, b: dict, keys, alpha: float = 0.5) -> dict[str, torch.Tensor]:
    return {k: reference(f"lerp:{alpha}", [a[k], b[k]], torch.bfloat16) for k in keys}


def assert_same_tensors(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    assert [k for k in want if not torch.equal(got[k], want[k])] == []


@pytest.fixture(scope="module")
def guided(tmp_path_factory, schnell, krea) -> Path:
    """krea_schnell_guided on the schnell and krea fixtures, in 60 KB output shards."""
    out = tmp_path_factory.mktemp("guided") / "transformer"
    builtin("krea_schnell_guided", out, schnell, krea, "shard_size=60KB")
    return out


@pytest.fixture(scope="module")
def plain(tmp_path_factory, schnell, krea) -> Path:
    """krea_schnell on the schnell and krea fixtures, in 60 KB output shards."""
    out = tmp_path_factory.mktemp("plain") / "transformer"
    builtin("krea_schnell", out, schnell, krea, "shard_size=60KB")
    return out


# --- the built-in recipes -----------------------------------------------------------------------------------


def test_guided_keeps_krea_guidance_and_lerps_the_rest(guided, state_of, schnell, krea):
    s, k, out = state_of(schnell), state_of(krea), state_of(guided)
    guidance = [key for key in k if key.startswith(GUIDANCE)]
    assert len(guidance) == 4
    assert_same_tensors(out, {**lerp_reference(s, k, s), **{key: k[key] for key in guidance}})
    assert config_of(guided)["guidance_embeds"] is True
    assert config_of(guided) == {key: v for key, v in config_of(krea).items()}


def test_krea_schnell_has_schnell_architecture_and_drops_krea_guidance(plain, state_of, schnell, krea):
    s, k = state_of(schnell), state_of(krea)
    assert_same_tensors(state_of(plain), lerp_reference(s, k, s))
    assert not any(GUIDANCE in key for key in state_of(plain))
    assert config_of(plain)["guidance_embeds"] is False
    dropped = json.loads((plain / "fluxrecipe.json").read_text())["dropped"]
    assert sorted(d["key"] for d in dropped) == sorted(key for key in k if key.startswith(GUIDANCE))
    assert {d["reason"] for d in dropped} == {"krea has it, base 'schnell' lacks it"}


def test_alpha_override_reaches_the_op(tmp_path, state_of, schnell, krea):
    out = tmp_path / "out"
    builtin("krea_schnell", out, schnell, krea, "recipe.alpha=0.2")
    s, k = state_of(schnell), state_of(krea)
    assert_same_tensors(load_state(out), lerp_reference(s, k, s, alpha=0.2))


# --- diffusers loads the output and computes what the reference weights compute -----------------------------


def forward(model) -> torch.Tensor:
    """One forward pass of a tiny FLUX model on fixed inputs (seeded), in float32 on the CPU."""
    g = torch.Generator().manual_seed(0)
    n_img, n_txt = 16, 8
    rows = torch.arange(n_img)
    img_ids = torch.stack([torch.zeros(n_img), rows // 4, rows % 4], dim=1).float()
    with torch.no_grad():
        return model(
            hidden_states=torch.randn(1, n_img, 4, generator=g),
            encoder_hidden_states=torch.randn(1, n_txt, 32, generator=g),
            pooled_projections=torch.randn(1, 32, generator=g),
            timestep=torch.tensor([0.7]),
            img_ids=img_ids,
            txt_ids=torch.zeros(n_txt, 3),
            guidance=torch.tensor([3.5]) if model.config.guidance_embeds else None,
            return_dict=False,
        )[0]


def reference_model(config_folder: Path, state: dict[str, torch.Tensor], **config_changes):
    """A model built from a source's config.json (not the output's), holding the reference weights."""
    from diffusers import FluxTransformer2DModel

    config = {k: v for k, v in config_of(config_folder).items() if not k.startswith("_")}
    model = FluxTransformer2DModel.from_config({**config, **config_changes})
    model.load_state_dict(state, strict=True)  # raises on any missing or unexpected key
    return model.eval()


@pytest.mark.diffusers
@pytest.mark.parametrize("recipe", ["krea_schnell", "krea_schnell_guided"])
def test_output_loads_and_computes_like_the_reference_weights(recipe, guided, plain, state_of, schnell, krea):
    """Same weights, same architecture, same deterministic CPU kernels: the outputs are compared with
    torch.equal, because any tolerance would let one wrong tensor with a small effect pass."""
    from diffusers import FluxTransformer2DModel

    folder, base = (guided, krea) if recipe == "krea_schnell_guided" else (plain, schnell)
    s, k = state_of(schnell), state_of(krea)
    weights = {**lerp_reference(s, k, s), **({key: v for key, v in k.items() if key.startswith(GUIDANCE)} if base == krea else {})}

    model, info = FluxTransformer2DModel.from_pretrained(folder, output_loading_info=True)
    assert info == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}
    got = forward(model.eval())
    assert torch.equal(got, forward(reference_model(base, weights)))
    assert not torch.equal(got, forward(reference_model(base, {key: k[key] for key in weights})))  # the check sees the weights
    assert torch.isfinite(got).all()


# --- parity with the seed script ----------------------------------------------------------------------------


def seed_merge(schnell: Path, krea: Path, out_file: Path) -> None:
    """The seed script's logic, faithfully: pair the i-th shard of schnell with the i-th shard of Krea, load
    both whole, average in bf16 every key of schnell's shard that Krea's shard holds, keep schnell's others."""
    merged = {}
    s_files = sorted(schnell.glob("diffusion_pytorch_model-*.safetensors"))
    k_files = sorted(krea.glob("diffusion_pytorch_model-*.safetensors"))
    for i in range(len(s_files)):
        a_shard, b_shard = load_file(s_files[i]), load_file(k_files[i])
        for key, a in a_shard.items():
            merged[key] = (a + b_shard[key]) / 2 if key in b_shard else a
    save_file(merged, out_file)


@pytest.fixture(scope="module")
def aligned(tmp_path_factory, schnell, krea, state_of) -> tuple[Path, Path]:
    """The fixtures' weights re-laid in one shared layout of 4 shards, the seed's precondition; Krea's extra
    guidance keys sit in its second shard, where the seed ignores them."""
    s, k = state_of(schnell), state_of(krea)
    keys = list(s)
    groups = [keys[i::4] for i in range(4)]
    root = tmp_path_factory.mktemp("aligned")
    k_groups = [g + ([key for key in k if key not in s] if i == 1 else []) for i, g in enumerate(groups)]
    return save_sharded(s, root / "schnell", groups, config_of(schnell)), save_sharded(k, root / "krea", k_groups, config_of(krea))


def test_krea_schnell_is_bit_identical_to_the_seed_script(aligned, tmp_path):
    schnell, krea = aligned
    seed_merge(schnell, krea, tmp_path / "seed.safetensors")
    builtin("krea_schnell", tmp_path / "out", schnell, krea)
    seed, ours = load_file(tmp_path / "seed.safetensors"), load_state(tmp_path / "out")
    assert ours.keys() == load_state(schnell).keys()
    assert_same_tensors(ours, seed)


def test_seed_arithmetic_equals_lerp_half_rounded_once_on_any_bf16_pair():
    """The parity above is no accident of the tiny models' values: over 2 million random bf16 bit patterns
    (every finite magnitude below 1e38, where a + b cannot overflow), bf16 (a + b) / 2 equals lerp:0.5."""
    from fluxrecipe.ops.linear import lerp

    bits = torch.randint(0, 1 << 16, (2, 2_000_000), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    a, b = bits.to(torch.int16).view(torch.bfloat16)
    keep = (a.float().abs() < 1e38) & (b.float().abs() < 1e38)  # NaN and Inf fail this too
    a, b = a[keep], b[keep]
    assert len(a) > 1_900_000
    assert torch.equal((a + b) / 2, lerp([a.float(), b.float()], alpha=0.5).to(torch.bfloat16))


def test_seed_script_breaks_when_layouts_differ_and_fluxrecipe_does_not(plain, state_of, schnell, krea, tmp_path):
    """With the fixtures' own layouts (6 shards of 50 KB against 9 of 35 KB) the seed pairs the wrong shards
    and silently keeps schnell's tensor for many keys; fluxrecipe finds every key through the index."""
    seed_merge(schnell, krea, tmp_path / "seed.safetensors")
    seed, s, k = load_file(tmp_path / "seed.safetensors"), state_of(schnell), state_of(krea)
    want = lerp_reference(s, k, s)
    unmerged = [key for key in s if not torch.equal(seed[key], want[key])]
    assert len(unmerged) > len(s) // 4
    assert all(torch.equal(seed[key], s[key]) for key in unmerged)  # kept as schnell's: the merge never happened
    assert_same_tensors(state_of(plain), want)


# --- dry runs -----------------------------------------------------------------------------------------------


def kb(n: int) -> str:
    assert 1000 <= n < 10**6
    return re.escape(f"{n / 1000:.2f} KB")


def test_dry_run_prints_counts_bytes_drops_and_totals_and_writes_nothing(tmp_path, capsys, state_of, schnell, krea):
    out = tmp_path / "out"
    plan = builtin("krea_schnell_guided", out, schnell, krea, "dry_run=true", "shard_size=60KB", "recipe.alpha=0.25")
    text = capsys.readouterr().out
    s, k = state_of(schnell), state_of(krea)
    guidance = [key for key in k if key.startswith(GUIDANCE)]
    g_bytes = sum(k[key].nbytes for key in guidance)
    read = sum(s[key].nbytes + k[key].nbytes for key in s)
    write = sum(s[key].numel() * 2 for key in s)
    assert re.search(rf"\[0\] 'guidance'\s+take:krea\s+4 keys\s+read\s+{kb(g_bytes)}\s+write\s+{kb(g_bytes)}\n", text)
    assert re.search(rf"\[1\] '\.\*'\s+lerp:0\.25 over schnell, krea\s+{len(s)} keys\s+read\s+{kb(read)}\s+write\s+{kb(write)}\n", text)
    assert "dropped" not in text
    total = rf"total: {len(k)} tensors in (\d+) file\(s\), BF16; read {kb(read + g_bytes)}, write {kb(write + g_bytes)}; 4 tensors copied byte for byte\n"
    shards = int(re.search(total, text)[1])
    assert f"dry run: nothing written (the output would go to {out})" in text
    assert list(tmp_path.iterdir()) == []

    # the real run writes what the dry run announced
    builtin("krea_schnell_guided", out, schnell, krea, "shard_size=60KB", "recipe.alpha=0.25")
    assert len(shard_files(out)) == shards == len(plan.files)
    assert sum(t.nbytes for t in load_state(out).values()) == write + g_bytes == plan.bytes_written


def test_dry_run_lists_dropped_keys_and_why(tmp_path, capsys, state_of, schnell, krea):
    plan = builtin("krea_schnell", tmp_path / "out", schnell, krea, "dry_run=true")
    text = capsys.readouterr().out
    guidance = sorted(key for key in state_of(krea) if key.startswith(GUIDANCE))
    assert sorted((d.key, d.reason) for d in plan.dropped) == [(key, "krea has it, base 'schnell' lacks it") for key in guidance]
    line = next(t for t in text.splitlines() if "lacks it" in t)
    assert "dropped (4 keys):" in text
    assert line.startswith("  krea has it, base 'schnell' lacks it: ")
    assert sorted(re.findall(r"'([^']+)'", line.split(": ", 1)[1])) == guidance
    assert "output: a diffusers folder; schnell's architecture (FluxTransformer2DModel, guidance_embeds: false)" in text
    assert not (tmp_path / "out").exists()


# --- kinds of sources ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def source_kinds(tmp_path_factory, schnell, krea, state_of) -> dict[str, dict[str, Path]]:
    """schnell and krea in every local form a source may take."""
    root = tmp_path_factory.mktemp("kinds")
    kinds: dict[str, dict[str, Path]] = {"index": {"schnell": schnell, "krea": krea}, "pipeline": {}, "file": {}, "unsharded": {}, "no-index": {}}
    for name, folder in (("schnell", schnell), ("krea", krea)):
        kinds["pipeline"][name] = folder.parent  # holds only transformer/
        kinds["file"][name] = root / f"{name}.safetensors"
        save_file(state_of(folder), kinds["file"][name])
        unsharded = root / "unsharded" / name
        unsharded.mkdir(parents=True)
        save_file(state_of(folder), unsharded / "diffusion_pytorch_model.safetensors")
        shutil.copy(folder / "config.json", unsharded)
        kinds["unsharded"][name] = unsharded
        no_index = root / "no-index" / name
        shutil.copytree(folder, no_index)
        (no_index / "diffusion_pytorch_model.safetensors.index.json").unlink()
        kinds["no-index"][name] = no_index
    assert [p.name for p in kinds["pipeline"]["schnell"].iterdir()] == ["transformer"]
    return kinds


@pytest.mark.parametrize(
    "schnell_kind, krea_kind",
    [("pipeline", "file"), ("unsharded", "index"), ("no-index", "pipeline"), ("index", "no-index"), ("pipeline", "unsharded")],
)
def test_every_kind_of_source_gives_the_same_merge(source_kinds, schnell_kind, krea_kind, tmp_path, plain, state_of):
    schnell, krea = source_kinds[schnell_kind]["schnell"], source_kinds[krea_kind]["krea"]
    builtin("krea_schnell", tmp_path / "out", schnell, krea)
    assert_same_tensors(load_state(tmp_path / "out"), state_of(plain))
    assert config_of(tmp_path / "out") == config_of(plain)


def test_a_single_file_base_gets_its_config_from_its_shapes(source_kinds, tmp_path, plain, state_of, capsys):
    """A lone .safetensors file has no config.json: the output's is derived from the file's shapes, and the
    plan says so (and what it had to assume: rope has no weights)."""
    out = tmp_path / "out"
    builtin("krea_schnell", out, source_kinds["file"]["schnell"], source_kinds["index"]["krea"])
    assert_same_tensors(load_state(out), state_of(plain))
    derived, real = config_of(out), config_of(plain)
    assert {k: v for k, v in derived.items() if k not in ("axes_dims_rope", "_diffusers_version")} == {k: v for k, v in real.items() if k not in ("axes_dims_rope", "_diffusers_version")}
    notes = json.loads((out / "fluxrecipe.json").read_text())["notes"]
    assert any("its config is derived from its shapes (guidance_embeds: false, in_channels 4)" in n for n in notes)
    assert any("axes_dims_rope cannot be read from weights" in n for n in notes)


def test_local_copy_of_a_whole_flux_repo_is_a_pipeline_folder(tmp_path, schnell, krea, plain, state_of):
    """`hf download black-forest-labs/FLUX.1-schnell --local-dir schnell` gives model_index.json, transformer/
    and flux1-schnell.safetensors (BFL layout) side by side; the source should be the transformer/ inside."""
    repo = tmp_path / "FLUX.1-schnell"
    shutil.copytree(schnell, repo / "transformer")
    (repo / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"]}))
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(48, 16)}, repo / "flux1-schnell.safetensors")
    builtin("krea_schnell", tmp_path / "out", repo, krea)
    assert_same_tensors(load_state(tmp_path / "out"), state_of(plain))


# --- provenance ---------------------------------------------------------------------------------------------


def test_output_carries_its_pinned_recipe(plain, schnell, krea):
    pinned = yaml.safe_load((plain / "recipe.yaml").read_text())
    builtin_text = yaml.safe_load((REPO_ROOT / "recipes" / "krea_schnell.yaml").read_text())
    relative = {name: os.path.relpath(folder.resolve(), plain) for name, folder in (("schnell", schnell), ("krea", krea))}
    hashes = {name: s["content_hash"] for name, s in json.loads((plain / "fluxrecipe.json").read_text())["sources"].items()}
    assert pinned == {  # the recipe as written (its interpolations kept), its sources pinned, relative to the output, with what was read
        **builtin_text,
        "sources": {name: {"path": path, "content_hash": hashes[name]} for name, path in relative.items()},
    }
    assert pinned["rules"] == [{"match": ".*", "op": "lerp:${recipe.alpha}"}]
    for shard in shard_files(plain):  # the shards name local sources by name: their bytes do not depend on the folder's place
        with safe_open(shard, "pt") as f:
            assert json.loads(f.metadata()["fluxrecipe.recipe"]) == {**pinned, "sources": {name: {"local": name} for name in relative}}  # hashes come after the shards
    provenance = json.loads((plain / "fluxrecipe.json").read_text())
    assert {name: {k: v for k, v in s.items() if k != "content_hash"} for name, s in provenance["sources"].items()} == {
        name: {"spec": path, "path": path} for name, path in relative.items()
    }
    assert all(re.fullmatch("xxh3-128:[0-9a-f]{32}", s["content_hash"]) for s in provenance["sources"].values())  # what was read, for a replay to prove
    assert (provenance["recipe"], provenance["base"], provenance["dtype"], provenance["tensors"]) == ("krea_schnell", "schnell", "BF16", len(load_state(plain)))
    assert provenance["rules"] == [{"match": ".*", "op": "lerp:0.5", "params": {"alpha": 0.5}, "sources": ["schnell", "krea"]}]  # as applied


def test_index_maps_every_key_to_the_shard_that_holds_it(guided):
    index = json.loads((guided / "diffusion_pytorch_model.safetensors.index.json").read_text())
    held = {}
    for shard in shard_files(guided):
        with safe_open(shard, "pt") as f:
            held.update(dict.fromkeys(f.keys(), shard.name))
    assert len(set(held.values())) > 1
    assert index["weight_map"] == held
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in load_state(guided).values())


def test_written_recipe_replays_to_byte_identical_shards(plain, recipe_dir, tmp_path):
    """recipe.yaml beside the weights is a recipe: run as one, it rebuilds the same shards, byte for byte."""
    shutil.copy(plain / "recipe.yaml", recipe_dir / "replay.yaml")
    merge(["recipe=replay", f"output={tmp_path / 'again'}", "progress=false", "shard_size=60KB"])
    first, again = shard_files(plain), shard_files(tmp_path / "again")
    assert len(first) > 1
    assert [p.name for p in again] == [p.name for p in first]
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(first, again))
    for name in ("config.json", "diffusion_pytorch_model.safetensors.index.json", "recipe.yaml"):
        assert (tmp_path / "again" / name).read_bytes() == (plain / name).read_bytes()


def test_a_replay_proves_it_read_the_same_bytes(plain, recipe_dir, tmp_path, schnell, krea):
    """fluxrecipe.json records a content hash of what was read from each local source: a replay on the same
    files records the same; a source changed by one byte records another."""
    shutil.copy(plain / "recipe.yaml", recipe_dir / "replay.yaml")
    merge(["recipe=replay", f"output={tmp_path / 'again'}", "progress=false", "shard_size=60KB"])
    hashes = {p: {n: s["content_hash"] for n, s in json.loads((p / "fluxrecipe.json").read_text())["sources"].items()} for p in (plain, tmp_path / "again")}
    assert hashes[plain] == hashes[tmp_path / "again"]
    changed = tmp_path / "krea-changed"
    shutil.copytree(krea, changed)
    shard = sorted(changed.glob("*.safetensors"))[-1]
    data = bytearray(shard.read_bytes())
    data[-2] ^= 0x01  # one bit of one weight
    shard.write_bytes(bytes(data))
    merge(["recipe=replay", f"output={tmp_path / 'other'}", "progress=false", f"recipe.sources.krea={changed}"])
    other = {n: s["content_hash"] for n, s in json.loads((tmp_path / "other" / "fluxrecipe.json").read_text())["sources"].items()}
    assert other["schnell"] == hashes[plain]["schnell"] and other["krea"] != hashes[plain]["krea"]


def test_a_replay_of_other_bytes_is_refused(plain, tmp_path, krea, schnell, monkeypatch):
    """recipe.yaml pins each local source's content hash: a replay that finds other bytes (a changed source)
    writes nothing and says so; a relative path is found beside recipe.yaml first, not from where the replay
    runs (where another model may lie at the same relative path)."""
    from fluxrecipe.errors import SourceError

    monkeypatch.setenv("FLUXRECIPE_RECIPE_PATH", str(plain))
    pinned = yaml.safe_load((plain / "recipe.yaml").read_text())["sources"]["krea"]["path"]
    elsewhere = tmp_path / "cwd" / "a" / "b" / "c"
    elsewhere.mkdir(parents=True)
    shutil.copytree(schnell, (elsewhere / pinned).resolve())  # the wrong model, at the same relative path
    monkeypatch.chdir(elsewhere)
    merge(["recipe=recipe", f"output={tmp_path / 'ok'}", "progress=false", "shard_size=60KB"])
    assert [p.read_bytes() for p in shard_files(tmp_path / "ok")] == [p.read_bytes() for p in shard_files(plain)]
    changed = tmp_path / "krea-changed"
    shutil.copytree(krea, changed)
    shard = sorted(changed.glob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-2] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(SourceError, match="is not what this recipe was made from: its content hash is"):
        merge(["recipe=recipe", f"output={tmp_path / 'refused'}", "progress=false", f"recipe.sources.krea.path={changed}"])
    assert not (tmp_path / "refused").exists()


def test_written_recipe_replays_with_a_new_parameter(plain, recipe_dir, tmp_path, schnell, krea, state_of):
    """recipe.yaml keeps `lerp:${recipe.alpha}`, so a replay can sweep alpha again like the original."""
    shutil.copy(plain / "recipe.yaml", recipe_dir / "replay.yaml")
    merge(["recipe=replay", f"output={tmp_path / 'other'}", "progress=false", "recipe.alpha=0.25"])
    a, b, got = state_of(schnell), state_of(krea), load_state(tmp_path / "other")
    assert all(torch.equal(got[k], (a[k].float() * 0.75 + b[k].float() * 0.25).to(torch.bfloat16)) for k in got)


def test_model_card_says_what_was_merged_from_what(plain, schnell, guided):
    card = (plain / "README.md").read_text()
    assert card.startswith("# krea_schnell: a FLUX.1 transformer merged by fluxrecipe")
    relative = os.path.relpath(schnell.resolve(), plain)
    assert f"| schnell (base) | `{relative}` | path `{relative}` |" in card
    assert "| 0 | `.*` | `lerp:0.5` | schnell, krea |" in card
    assert "RANDOM WEIGHTS" not in card
    assert "4 keys of the sources are not in the output" in card  # Krea's guidance embedder
    assert "| 0 | `guidance` | `take:krea` | krea | 4 |" in (guided / "README.md").read_text()
    manifest = json.loads((plain / "fluxrecipe.manifest.json").read_text())["files"]
    assert "README.md" in manifest


def test_a_replay_differs_only_where_the_readme_says(plain, tmp_path, monkeypatch):
    """docs/recipes.md: run from the output's own recipe.yaml into a folder at the same depth, every file is byte
    for byte the original's except fluxrecipe.json and README.md (the recipe's name as run) and the manifest."""
    from reliability_helpers import digests

    monkeypatch.setenv("FLUXRECIPE_RECIPE_PATH", str(plain))
    monkeypatch.chdir(tmp_path)
    naming = {"fluxrecipe.json", "README.md", "fluxrecipe.manifest.json"}
    for again, differ in ((tmp_path / "transformer", naming), (tmp_path / "deeper" / "down" / "here", naming | {"recipe.yaml"})):
        assert (len(again.parts) == len(plain.parts)) == (differ == naming)
        merge(["recipe=recipe", f"output={again}", "progress=false", "shard_size=60KB"])
        first, second = digests(plain), digests(again)
        assert first.keys() == second.keys()
        assert {name for name in first if first[name] != second[name]} == differ, again
    page = " ".join((REPO_ROOT / "docs" / "recipes.md").read_text().split())
    assert "Three files differ in any case" in page and all(f"`{name}`" in page for name in naming)
