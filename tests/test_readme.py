"""The README is the front door: its recipes run (on tiny stand-ins for their hub sources) and give a model
diffusers loads (a folder), or a single file fluxrecipe's verify accepts; what it tells a newcomer to install,
type and expect is what the project does. The README's
commands are exercised by the CLI tests and `make demo`/`make test`."""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from conftest import REPO_ROOT, merge, write_recipe

README = (REPO_ROOT / "README.md").read_text()
BLOCKS = [b for b in re.findall(r"```yaml\n(.*?)```", README, re.S) if "rules:" in b]


def test_the_readme_has_recipes():
    assert len(BLOCKS) >= 3


def lora_stand_in(path: Path) -> Path:
    """A tiny kohya LoRA (rank 4, on the first double block's image q/k/v) for a LoRA the README names."""
    g = torch.Generator().manual_seed(0)
    save_file({
        "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.randn(4, 32, generator=g).to(torch.bfloat16),
        "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.randn(96, 4, generator=g).to(torch.bfloat16),
    }, path)
    return path


@pytest.mark.parametrize("text", BLOCKS, ids=[f"recipe{i}" for i in range(len(BLOCKS))])
def test_readme_recipe_runs_and_loads(text, recipe_dir, tmp_path, schnell, krea, dev):
    from diffusers import FluxTransformer2DModel  # here, not at import: see conftest on HF_HUB_OFFLINE

    from fluxrecipe.verify import verify_file

    stand_ins = {"schnell": schnell, "krea": krea, "dev": dev}
    recipe = yaml.safe_load(text)
    if recipe.get("loras"):  # stand-ins for its LoRAs, at the strengths it gives
        lora = lora_stand_in(tmp_path / "lora.safetensors")
        recipe["loras"] = {name: {"path": str(lora), "strength": spec.get("strength", 1.0)} for name, spec in recipe["loras"].items()}
        text = yaml.safe_dump(recipe, sort_keys=False)
    write_recipe(recipe_dir, "readme", text)
    single = recipe.get("format") in ("bfl", "comfyui")
    out = tmp_path / ("out.safetensors" if single else "out")
    merge(["recipe=readme", f"output={out}", "progress=false", *(f"recipe.sources.{n}={stand_ins.get(n, krea)}" for n in recipe["sources"])])
    if single:
        assert verify_file(out).problems == []
        return
    model, info = FluxTransformer2DModel.from_pretrained(out, output_loading_info=True)
    assert info["missing_keys"] == info["unexpected_keys"] == []
    assert model.config.guidance_embeds == recipe.get("config", {}).get("guidance_embeds", recipe.get("base") != "schnell")


def test_the_readme_says_what_rendering_needs():
    """Its FluxPipeline snippet needs transformers (text encoders), sentencepiece and protobuf (tokenizers) and
    accelerate (memory): the README names the extra that installs them, and pyproject defines it so."""
    extras = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    preview = {re.split(r"[<>=\[ ]", r)[0].lower() for r in extras["preview"]}
    assert {"transformers", "accelerate", "sentencepiece", "protobuf"} <= preview
    snippet = README.index("FluxPipeline.from_pretrained")
    assert "pip install 'fluxrecipe[preview]'" in README[snippet - 800 : snippet]


def test_the_readme_documents_completion_and_sweep_disk_cost():
    assert 'eval "$(fluxrecipe -sc install=bash)"' in README
    assert "a sweep costs the model's size on disk per job" in README


def fake_venv(folder, torch_spec: str) -> None:
    """A .venv as the Makefile leaves it after installing `torch_spec` and the project."""
    import os

    stamp = subprocess.run(["sh", "-c", f"printf '%s' '{torch_spec}' | cksum | cut -d' ' -f1"], capture_output=True, text=True).stdout.strip()
    (folder / ".venv" / "bin").mkdir(parents=True)
    (folder / ".venv" / "bin" / "python").write_text("")
    os.chmod(folder / ".venv" / "bin" / "python", 0o755)
    (folder / f".venv/.torch-{stamp}").touch()
    (folder / ".venv/.installed").touch()
    (folder / ".venv/.installed-demo").touch()


@pytest.mark.skipif(shutil.which("make") is None, reason="no make here")
def test_make_honours_torch_once_the_venv_exists(tmp_path):
    """`make demo TORCH=...` after a first `make`: the other torch is installed, not ignored."""
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy(REPO_ROOT / name, tmp_path / name)
    (tmp_path / "pyproject.toml").touch()
    fake_venv(tmp_path, "torch==2.13.0")
    same = subprocess.run(["make", "-n", "demo"], cwd=tmp_path, capture_output=True, text=True)
    assert "pip install" not in same.stdout  # nothing to do: the same torch, and the project installed
    other = "torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
    planned = subprocess.run(["make", "-n", "demo", f"TORCH={other}"], cwd=tmp_path, capture_output=True, text=True)
    assert f"--force-reinstall --no-deps {other}" in planned.stdout, planned.stdout


@pytest.mark.skipif(shutil.which("make") is None, reason="no make here")
def test_the_first_make_says_what_it_does(tmp_path):
    """~2.5 minutes of pip on a first run: never silent (no --quiet), and each step says what it installs."""
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy(REPO_ROOT / name, tmp_path / name)
    planned = subprocess.run(["make", "-n", "test"], cwd=tmp_path, capture_output=True, text=True).stdout
    pips = [line for line in planned.splitlines() if "pip install" in line and not line.startswith("echo")]
    assert len(pips) == 2 and not any("--quiet" in line or " -q " in line for line in pips)
    assert planned.count("echo \"make: ") >= 3
