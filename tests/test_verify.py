"""`python -m fluxrecipe verify FOLDER`: a merged folder passes; every kind of damage is one clear problem.

One merge makes the folder; each test damages a copy. `resign` rewrites the manifest to match the damaged
files, to show that the index, header and config checks find what a consistent manifest would not.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import pytest

from conftest import merge
from reliability_helpers import INDEX, edit_header, join, pair_recipe, shards, split, tensors_by_offset, use_recipe, weight_map

from fluxrecipe.cli.commands import verify as main
from fluxrecipe.verify import verify_folder

MANIFEST = "fluxrecipe.manifest.json"


@pytest.fixture(scope="module")
def merged(tmp_path_factory, schnell, krea) -> Path:
    tmp = tmp_path_factory.mktemp("verify")
    with pytest.MonkeyPatch.context() as mp:
        recipe = use_recipe(mp, tmp / "recipes", "pair", pair_recipe(schnell, krea))
        merge([recipe, f"output={tmp / 'out'}", "shard_size=60KB", "progress=false"])
    return tmp / "out"


@pytest.fixture
def folder(tmp_path, merged) -> Path:
    return Path(shutil.copytree(merged, tmp_path / "out"))


def resign(folder: Path) -> None:
    """Make the manifest agree with the files as they are now."""
    files = {p.name: {"size": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()} for p in sorted(folder.iterdir()) if p.name != MANIFEST}
    (folder / MANIFEST).write_text(json.dumps({"fluxrecipe": "test", "files": files}))


def problems(folder: Path, *flags: str) -> list[str]:
    return verify_folder(folder, hash_files="--no-hash" not in flags).problems


def test_a_merged_folder_passes(folder, capsys):
    assert main([str(folder)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{folder}: ok: 11 files match the manifest (sizes and sha256); ") and "in 5 shard(s)" in out and "(FluxTransformer2DModel)" in out


def test_the_command_is_dispatched(folder, monkeypatch, capsys):
    from fluxrecipe.__main__ import main as entry

    monkeypatch.setattr(sys, "argv", ["fluxrecipe", "verify", str(folder.parent)])  # a pipeline folder: its transformer/
    (folder.parent / "model_index.json").write_text("{}")
    folder.rename(folder.parent / "transformer")
    with pytest.raises(SystemExit) as e:
        entry()
    assert e.value.code == 0 and ": ok: " in capsys.readouterr().out


def test_a_flipped_byte(folder, capsys):
    shard = shards(folder)[2]
    raw = bytearray(shard.read_bytes())
    raw[-100] ^= 0x10
    shard.write_bytes(bytes(raw))
    assert main([str(folder)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith(f"fluxrecipe verify: {shard}: sha256 ") and "differs from the manifest's" in err[0]
    assert err[-1] == f"fluxrecipe verify: {folder}: 1 problem: do not use this folder as it is"
    assert problems(folder, "--no-hash") == []  # sizes only: a flipped data byte is not seen


def test_a_truncated_shard(folder):
    shard = shards(folder)[1]
    shard.write_bytes(shard.read_bytes()[:-50])
    found = problems(folder)
    assert any(p.startswith(f"{shard}: ") and "bytes, the manifest says" in p for p in found)
    assert any(p.startswith(f"{shard}: tensor '") and "truncated" in p for p in found)


def test_a_missing_shard(folder):
    shard = shards(folder)[3]
    shard.unlink()
    found = problems(folder)
    assert f"{shard}: missing (the manifest lists it)" in found
    assert any(p.startswith(f"{folder / INDEX}: names shard '{shard.name}' (for '") and p.endswith("which does not exist") for p in found)


def test_a_stray_shard(folder):
    stray = folder / "diffusion_pytorch_model-00001-of-00009.safetensors"
    shutil.copy(shards(folder)[0], stray)
    assert problems(folder) == [
        f"{stray}: not listed in the manifest: added or renamed after the merge",
        f"{stray}: is not named by the index: a stray shard (from another merge?)",
    ]


def test_index_assigns_a_key_to_the_wrong_shard(folder):
    index = json.loads((folder / INDEX).read_text())
    first, second = shards(folder)[:2]
    key = next(k for k, v in index["weight_map"].items() if v == first.name)
    index["weight_map"][key] = second.name
    (folder / INDEX).write_text(json.dumps(index))
    resign(folder)
    assert sorted(problems(folder)) == [
        f"{first}: holds '{key}', but the index assigns it to '{second.name}'",
        f"{second}: lacks '{key}', which the index assigns to it",
    ]


def test_index_total_size(folder):
    index = json.loads((folder / INDEX).read_text())
    index["metadata"]["total_size"] += 2
    (folder / INDEX).write_text(json.dumps(index))
    resign(folder)
    assert problems(folder) == [f"{folder / INDEX}: metadata.total_size is {index['metadata']['total_size']}, the shards hold {index['metadata']['total_size'] - 2} bytes of tensors"]


def test_config_that_disagrees_with_the_keys(folder):
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "guidance_embeds": True}))
    assert problems(folder, "--no-hash")[0].startswith(f"{folder / 'config.json'}: ") and "the manifest says" in problems(folder, "--no-hash")[0]
    resign(folder)
    (found,) = problems(folder)
    assert found.startswith(f"{folder / 'config.json'}: FluxTransformer2DModel needs 4 key(s) that no shard holds ('time_text_embed.guidance_embedder.")
    assert found.endswith("diffusers would fill them with random weights")


def test_config_missing(folder):
    (folder / "config.json").unlink()
    assert problems(folder) == [f"{folder / 'config.json'}: missing (the manifest lists it)", f"{folder / 'config.json'}: missing: diffusers cannot load the folder without it"]


def test_a_gap_in_a_shard(folder):
    shard = shards(folder)[4]
    last = tensors_by_offset(shard)[-1]
    doc, data = split(shard)
    begin, end = doc[last]["data_offsets"]
    doc[last]["data_offsets"] = [begin + 8, end + 8]
    join(shard, doc, data[:begin] + bytes(8) + data[begin:])
    resign(folder)
    (found,) = problems(folder)
    assert found.startswith(f"{shard}: tensor '{last}' starts at byte ") and found.endswith(", 8 bytes after the previous one ends: a gap in the data")


def test_bytes_after_the_last_tensor(folder):
    shard = shards(folder)[0]
    shard.write_bytes(shard.read_bytes() + b"\0" * 16)
    resign(folder)
    assert problems(folder) == [f"{shard}: 16 bytes follow the last tensor's data: the file is not what its header describes"]


def test_a_broken_header(folder):
    shard = shards(folder)[0]
    key = tensors_by_offset(shard)[0]
    edit_header(shard, lambda doc: doc[key].update(dtype="Q8"))
    resign(folder)
    (found,) = problems(folder)
    assert found.startswith(f"{shard}: tensor '{key}': unsupported dtype 'Q8'")


def test_manifest_missing(folder, capsys):
    """Without a manifest the folder is checked as any diffusers folder is, and the ok line says what was not."""
    (folder / MANIFEST).unlink()
    assert problems(folder) == []
    assert main([str(folder)]) == 0
    assert "no fluxrecipe manifest (not a fluxrecipe output): sizes and sha256 not checked" in capsys.readouterr().out


def test_manifest_not_json(folder):
    (folder / MANIFEST).write_text("{")
    (found,) = problems(folder)
    assert found.startswith(f"{folder / MANIFEST}: not a valid manifest (JSONDecodeError")


def test_manifest_names_a_file_outside_the_folder(folder):
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["files"]["../../etc/passwd"] = {"size": 1, "sha256": "0"}
    (folder / MANIFEST).write_text(json.dumps(manifest))
    assert problems(folder) == [f"{folder / MANIFEST}: lists '../../etc/passwd', which is not a file name in this folder"]


def test_not_a_folder(tmp_path, capsys):
    assert main([str(tmp_path / "nothing")]) == 1
    assert f"fluxrecipe verify: {tmp_path / 'nothing'}: no such folder" in capsys.readouterr().err
    (tmp_path / "file.safetensors").write_bytes(b"")
    assert problems(tmp_path / "file.safetensors") == [f"{tmp_path / 'file.safetensors'}: not a folder (verify checks a model folder)"]


def test_a_model_of_its_own_with_no_manifest(schnell, capsys):
    """A good folder diffusers wrote (a hub download has no manifest): the index, headers, values and config
    are checked, and pass; verify does not call it unusable."""
    assert weight_map(schnell)
    assert problems(schnell) == []
    assert main([str(schnell)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{schnell}: ok: no fluxrecipe manifest") and "their values are finite" in out


@pytest.mark.parametrize("name", ["diffusion_pytorch_model.bin", "model.ckpt", "convert.py"])
def test_a_file_that_can_run_code_is_a_problem(folder, schnell, name):
    """An unlisted pickle or script beside the weights: with or without a manifest, verify does not pass it."""
    (folder / name).write_bytes(b"\x80\x04cos\nsystem\n")
    (found,) = problems(folder)
    assert found.startswith(f"{folder / name}: a file that can run code when it is loaded (a pickle) or run (a script)")
    hub = Path(shutil.copytree(schnell, folder.parent / "hub"))
    (hub / name).write_bytes(b"x")
    assert [p.split(": ")[0] for p in problems(hub)] == [str(hub / name)]


def test_any_unlisted_file_is_a_problem(folder):
    (folder / "notes.txt").write_text("added later")
    assert problems(folder) == [f"{folder / 'notes.txt'}: not listed in the manifest: added or renamed after the merge"]


def test_index_total_size_that_is_not_a_number(folder):
    index = json.loads((folder / INDEX).read_text())
    total = index["metadata"]["total_size"]
    index["metadata"]["total_size"] = "a lot"
    (folder / INDEX).write_text(json.dumps(index))
    resign(folder)
    assert problems(folder) == [f'{folder / INDEX}: metadata.total_size is "a lot", not a number of bytes (the shards hold {total})']


@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_nonfinite_values_are_a_problem_even_when_the_manifest_agrees(folder, value):
    """The values are read in the same pass as the sha256, element by element, across read blocks."""
    import torch
    from safetensors.torch import load_file, save_file

    shard = shards(folder)[1]
    state = load_file(shard)
    key = sorted(state)[0]
    state[key] = state[key].flatten().index_fill(0, torch.tensor([0, 2]), value).view(state[key].shape)
    save_file(state, shard, metadata={"format": "pt"})
    resign(folder)
    assert problems(folder) == [f"{shard}: tensor '{key}' holds 2 NaN/Inf value(s): the model would compute NaN"]
    assert problems(folder, "--no-hash") == []  # sizes only: values are not read
