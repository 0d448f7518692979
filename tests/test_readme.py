"""The README's recipes are real: every YAML recipe in it runs (on tiny stand-ins for its hub sources) and
gives a model diffusers loads (a folder), or a single file fluxrecipe's verify accepts. The README's
commands are exercised by the CLI tests and `make demo`/`make test`."""

from __future__ import annotations

import re

import pytest
import yaml

from conftest import REPO_ROOT, merge, write_recipe

BLOCKS = [b for b in re.findall(r"```yaml\n(.*?)```", (REPO_ROOT / "README.md").read_text(), re.S) if "rules:" in b]


def test_the_readme_has_recipes():
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("text", BLOCKS, ids=[f"recipe{i}" for i in range(len(BLOCKS))])
def test_readme_recipe_runs_and_loads(text, recipe_dir, tmp_path, schnell, krea, dev):
    from diffusers import FluxTransformer2DModel

    from fluxrecipe.verify import verify_file

    stand_ins = {"schnell": schnell, "krea": krea, "dev": dev}
    recipe = yaml.safe_load(text)
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
