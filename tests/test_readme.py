"""The README's recipes are real: every YAML recipe in it runs (on tiny stand-ins for its hub sources) and
gives a model diffusers loads. The README's commands are exercised by the CLI tests and `make demo`/`make test`."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml
from diffusers import FluxTransformer2DModel
from safetensors.torch import save_file

from conftest import REPO_ROOT, merge, write_recipe

BLOCKS = [b for b in re.findall(r"```yaml\n(.*?)```", (REPO_ROOT / "README.md").read_text(), re.S) if "rules:" in b]


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
    stand_ins = {"schnell": schnell, "krea": krea, "dev": dev}
    recipe = yaml.safe_load(text)
    if recipe.get("loras"):  # stand-ins for its LoRAs, at the strengths it gives
        lora = lora_stand_in(tmp_path / "lora.safetensors")
        recipe["loras"] = {name: {"path": str(lora), "strength": spec.get("strength", 1.0)} for name, spec in recipe["loras"].items()}
        text = yaml.safe_dump(recipe, sort_keys=False)
    write_recipe(recipe_dir, "readme", text)
    out = tmp_path / "out"
    merge(["recipe=readme", f"output={out}", "progress=false", *(f"recipe.sources.{n}={stand_ins[n]}" for n in recipe["sources"])])
    model, info = FluxTransformer2DModel.from_pretrained(out, output_loading_info=True)
    assert info["missing_keys"] == info["unexpected_keys"] == []
    assert model.config.guidance_embeds == recipe.get("config", {}).get("guidance_embeds", recipe.get("base") != "schnell")
