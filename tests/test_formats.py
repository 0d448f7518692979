"""Every FLUX checkpoint format in and out (issue 8), on tiny models: Black Forest Labs and ComfyUI single
files read and written, cross-layout merges, fp8 and scaled fp8 both ways, the conversion recipes, single-file
verify, the Python API, and the bad inputs. The references are written in the tests (flux_layouts.py) from
diffusers' converter; tests at FLUX.1's width against diffusers itself are in test_flux_width.py."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import load_state, merge, run_recipe
from flux_layouts import COMFY, diffusers_to_bfl, is_linear_weight, scaled_fp8
from fluxrecipe.errors import OutputError, PlanError, SourceError, UsageError

H = 32  # the tiny models' hidden size (2 heads of 16)


@pytest.fixture(scope="module")
def bfl_files(tmp_path_factory, krea, schnell, state_of):
    """krea and schnell as BFL files, krea as a ComfyUI file and as an all-in-one ComfyUI checkpoint."""
    root = tmp_path_factory.mktemp("single")
    files = {}
    for name, folder in (("krea", krea), ("schnell", schnell)):
        files[f"{name}-bfl"] = root / f"{name}-bfl.safetensors"
        save_file(diffusers_to_bfl(state_of(folder)), files[f"{name}-bfl"])
    files["krea-comfyui"] = root / "krea-comfyui.safetensors"
    save_file(diffusers_to_bfl(state_of(krea), COMFY), files["krea-comfyui"])
    extra = {"text_encoders.clip_l.transformer.text_model.embeddings.token_embedding.weight": torch.zeros(8, 4), "vae.decoder.conv_in.weight": torch.zeros(4, 4, 3, 3)}
    files["krea-aio"] = root / "krea-aio.safetensors"
    save_file({**diffusers_to_bfl(state_of(krea), COMFY), **extra}, files["krea-aio"])
    return files


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    different = [k for k in want if got[k].dtype != want[k].dtype or not torch.equal(got[k].view(torch.uint8), want[k].contiguous().view(torch.uint8))]
    assert different == []


def to_diffusers(out, source, *options):
    return merge(["recipe=to_diffusers", f"recipe.sources.model={source}", f"output={out}", "progress=false", *options])


# --- reading ---------------------------------------------------------------------------------------------


@pytest.mark.diffusers
@pytest.mark.parametrize("kind", ["krea-bfl", "krea-comfyui", "krea-aio"])
def test_single_files_read_as_the_diffusers_model(bfl_files, kind, tmp_path, krea, state_of):
    """A BFL or ComfyUI file (all-in-one included) becomes the very tensors of the diffusers model it was
    made from, byte for byte, and diffusers loads the result with the config derived from the file."""
    from diffusers import FluxTransformer2DModel

    out = tmp_path / "out"
    plan = to_diffusers(out, bfl_files[kind], "dry_run=true")
    assert plan.sources[0].layout == ("bfl" if kind == "krea-bfl" else "comfyui")
    if kind == "krea-aio":
        assert dict(plan.sources[0].ignored) == {"text_encoders.clip_l": 1, "vae": 1}
        assert any("ignored 1 keys under text_encoders.clip_l, 1 keys under vae" in n for n in plan.notes)
    to_diffusers(out, bfl_files[kind])
    assert_same(load_state(out), state_of(krea))
    model, info = FluxTransformer2DModel.from_pretrained(out, output_loading_info=True)
    assert info["missing_keys"] == info["unexpected_keys"] == []
    assert model.config.guidance_embeds is True


def test_golden_fused_split_swapped_and_renamed_tensors(tmp_path):
    """Each tricky part of the BFL layout, on a file whose every row says where it came from: the fused
    q/k/v split in thirds, linear1 split four ways (3 x hidden, then the MLP), the final layer's halves
    swapped, `.scale` norms as `.weight`, and the ComfyUI prefix."""
    from fluxrecipe.formats import recognise
    from fluxrecipe.formats.safetensors import read_header

    from conftest import tiny_config
    from fluxrecipe.architecture import expected_parameters

    shapes = expected_parameters(tiny_config(guidance=False, num_layers=1, num_single_layers=1), "test")
    state = {k: (torch.arange(math.prod(s), dtype=torch.float32).reshape(s) + 1000 * i) for i, (k, s) in enumerate(shapes.items())}
    for prefix in ("", COMFY):
        bfl = diffusers_to_bfl(state, prefix)
        path = tmp_path / f"golden{len(prefix)}.safetensors"
        save_file(bfl, path)
        header = read_header(str(path))
        found = recognise("g", str(path), header.entries, header.metadata)
        raw = path.read_bytes()

        def canonical(key):
            ref = found.tensors[key]
            data = b"".join(raw[p.begin : p.begin + p.nbytes] for p in ref.pieces)
            return torch.frombuffer(bytearray(data), dtype=torch.float32).reshape(ref.shape)

        qkv = bfl[f"{prefix}double_blocks.0.img_attn.qkv.weight"]
        assert torch.equal(canonical("transformer_blocks.0.attn.to_k.weight"), qkv[H : 2 * H])
        assert torch.equal(canonical("transformer_blocks.0.attn.add_v_proj.bias"), bfl[f"{prefix}double_blocks.0.txt_attn.qkv.bias"][2 * H :])
        linear1 = bfl[f"{prefix}single_blocks.0.linear1.weight"]
        assert torch.equal(canonical("single_transformer_blocks.0.attn.to_v.weight"), linear1[2 * H : 3 * H])
        assert torch.equal(canonical("single_transformer_blocks.0.proj_mlp.weight"), linear1[3 * H :])
        assert linear1.shape[0] - 3 * H == 4 * H  # the MLP part: mlp_ratio 4
        ada = bfl[f"{prefix}final_layer.adaLN_modulation.1.weight"]
        assert torch.equal(canonical("norm_out.linear.weight"), torch.cat([ada[H:], ada[:H]]))
        assert torch.equal(canonical("norm_out.linear.bias"), torch.cat([bfl[f"{prefix}final_layer.adaLN_modulation.1.bias"][H:], bfl[f"{prefix}final_layer.adaLN_modulation.1.bias"][:H]]))
        assert torch.equal(canonical("transformer_blocks.0.attn.norm_added_q.weight"), bfl[f"{prefix}double_blocks.0.txt_attn.norm.query_norm.scale"])
        assert torch.equal(canonical("single_transformer_blocks.0.attn.norm_k.weight"), bfl[f"{prefix}single_blocks.0.norm.key_norm.scale"])
        assert all(torch.equal(canonical(k), state[k]) for k in state)  # and every other tensor, renamed


# --- writing ---------------------------------------------------------------------------------------------


GUIDED = {
    "sources": {"schnell": None, "krea": None},
    "base": "krea",
    "rules": [{"match": "guidance", "op": "take:krea"}, {"match": ".*", "op": "lerp:0.3"}],
}


def guided_recipe(schnell, krea, **fields):
    return {**GUIDED, "sources": {"schnell": str(schnell), "krea": str(krea)}, **fields}


def lerp_reference(a: dict, b: dict, alpha: float, dtype=torch.bfloat16) -> dict[str, torch.Tensor]:
    return {k: b[k] if "guidance" in k else ((1.0 - alpha) * a[k].float() + alpha * b[k].float()).to(dtype) for k in b}


@pytest.mark.parametrize("fmt, prefix", [("bfl", ""), ("comfyui", COMFY)])
def test_single_file_output_is_the_reference_layout(recipe_dir, tmp_path, schnell, krea, state_of, fmt, prefix):
    """format=bfl / comfyui: one file in BFL keys (behind ComfyUI's prefix), equal to the reference
    conversion of the reference merge, carrying its recipe and provenance in its metadata."""
    out = tmp_path / "merged" / "flux.safetensors"
    result = run_recipe(recipe_dir, out, guided_recipe(schnell, krea), f"format={fmt}")
    want = diffusers_to_bfl(lerp_reference(state_of(schnell), state_of(krea), 0.3), prefix)
    assert_same(load_file(out), want)
    assert list(out.parent.iterdir()) == [out]  # nothing beside it, nothing half-written
    with safe_open(out, "pt") as f:
        metadata = f.metadata()
    assert json.loads(metadata["fluxrecipe.recipe"])["rules"] == GUIDED["rules"]
    provenance = json.loads(metadata["fluxrecipe.provenance"])
    assert provenance["format"] == fmt and provenance["tensors"] == len(state_of(krea))
    assert result.output == out


def test_round_trip_diffusers_bfl_diffusers_is_byte_identical(recipe_dir, tmp_path, krea, state_of):
    one = tmp_path / "krea.safetensors"
    run_recipe(recipe_dir, one, {"sources": {"m": str(krea)}, "rules": [{"match": ".*", "op": "take:m"}]}, "format=bfl")
    back = tmp_path / "back"
    to_diffusers(back, one)
    assert_same(load_state(back), state_of(krea))


def test_cross_layout_merge_bfl_file_with_diffusers_folder_into_comfyui(recipe_dir, tmp_path, bfl_files, schnell, state_of, krea):
    """A BFL file lerped with a diffusers folder into a ComfyUI file, and back: every direction at once."""
    out = tmp_path / "mixed.safetensors"
    run_recipe(recipe_dir, out, guided_recipe(schnell, bfl_files["krea-bfl"]), "format=comfyui")
    want = diffusers_to_bfl(lerp_reference(state_of(schnell), state_of(krea), 0.3), COMFY)
    assert_same(load_file(out), want)
    back = tmp_path / "back"
    run_recipe(recipe_dir, back, guided_recipe(bfl_files["schnell-bfl"], out), name="again")
    first = lerp_reference(state_of(schnell), state_of(krea), 0.3)
    assert_same(load_state(back), lerp_reference(state_of(schnell), first, 0.3))


# --- fp8 out ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, dtype, limit", [("fp8", torch.float8_e4m3fn, 448.0), ("fp8_e5m2", torch.float8_e5m2, 57344.0)])
def test_fp8_output_is_the_float32_result_clamped_and_rounded_once(recipe_dir, tmp_path, schnell, krea, state_of, name, dtype, limit, caplog):
    """Values beyond the dtype's finite range are clamped to it and counted (provenance, a warning): never a
    silent NaN. Here one rule scales a block up so that some of its values overflow."""
    k = state_of(krea)
    big = "transformer_blocks.0.ff.net.0.proj.weight"
    factor = 1.5 * limit / float(k[big].float().abs().max())
    rules = [{"match": "ff\\.net\\.0\\.proj\\.weight", "op": f"weighted:{factor}", "sources": ["krea"]}, {"match": ".*", "op": "take:krea", "dtype": "bf16"}]
    out = tmp_path / "out"
    run_recipe(recipe_dir, out, {"sources": {"krea": str(krea)}, "rules": rules, "dtype": name})
    got = load_state(out)
    for key in k:
        if "ff.net.0.proj.weight" in key:
            x = k[key].float() * factor
            assert got[key].dtype == dtype and torch.equal(got[key].view(torch.uint8), x.clamp(-limit, limit).to(dtype).view(torch.uint8)), key
        else:
            assert torch.equal(got[key], k[key]), key
    over = int((k[big].float() * factor).abs().gt(limit).sum())
    assert over > 0
    assert json.loads((out / "fluxrecipe.json").read_text())["clamped"][big] == over
    assert "were clamped to it" in caplog.text


def test_fp8_scaled_output_stores_absmax_over_448_and_dequantizes_to_the_reference(recipe_dir, tmp_path, schnell, krea, state_of):
    """fp8_scaled (ComfyUI's newer convention): each Linear weight as fp8 of value / scale, scale = absmax /
    448 as an F32 `<layer>.weight_scale`, a `<layer>.comfy_quant` marker and `_quantization_metadata`; the
    rest (1-D tensors) stays bf16. Fused q/k/v share one scale: it is the file's tensor that is scaled."""
    out = tmp_path / "scaled.safetensors"
    run_recipe(recipe_dir, out, guided_recipe(schnell, krea, dtype="fp8_scaled"), "format=comfyui")
    reference = {k: v.float() for k, v in diffusers_to_bfl({k: ((0.7 * state_of(schnell)[k].float() + 0.3 * state_of(krea)[k].float()) if "guidance" not in k else state_of(krea)[k].float()) for k in state_of(krea)}, COMFY).items()}
    got = load_file(out)
    with safe_open(out, "pt") as f:
        layers = json.loads(f.metadata()["_quantization_metadata"])["layers"]
    scaled = [k for k, v in reference.items() if is_linear_weight(k, v)]
    assert sorted(layers) == sorted(k[: -len(".weight")] for k in scaled)
    for key, want in reference.items():
        if key not in scaled:
            assert got[key].dtype == torch.bfloat16 and torch.equal(got[key], want.to(torch.bfloat16)), key
            continue
        layer = key[: -len(".weight")]
        scale = got[f"{layer}.weight_scale"]
        assert scale.dtype == torch.float32 and scale.shape == ()
        assert scale.item() == (want.abs().max() / 448.0).item()
        assert got[key].dtype == torch.float8_e4m3fn
        assert torch.equal(got[key].view(torch.uint8), (want / scale).clamp(-448, 448).to(torch.float8_e4m3fn).view(torch.uint8)), key
        assert json.loads(bytes(got[f"{layer}.comfy_quant"].tolist())) == {"format": "float8_e4m3fn"} == layers[layer]


def test_verify_accepts_a_scaled_fp8_file_with_its_markers(recipe_dir, tmp_path, schnell, krea):
    from fluxrecipe.verify import verify_file

    out = tmp_path / "scaled.safetensors"
    run_recipe(recipe_dir, out, guided_recipe(schnell, krea, dtype="fp8_scaled"), "format=comfyui")
    assert verify_file(out).problems == []


def test_fp8_scaled_needs_a_single_file_format(recipe_dir, tmp_path, krea):
    with pytest.raises(PlanError, match="fp8_scaled is written only in the single-file formats"):
        run_recipe(recipe_dir, tmp_path / "out", {"sources": {"k": str(krea)}, "rules": [{"match": ".*", "op": "take:k"}], "dtype": "fp8_scaled"})
    assert not (tmp_path / "out").exists()


# --- scaled fp8 in ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("convention", ["old", "new", "metadata"])
def test_scaled_fp8_sources_are_dequantized_exactly(tmp_path, krea, state_of, convention):
    """Both ComfyUI conventions: the float32 value of each weight is its fp8 value x its scale, before any op."""
    tensors, metadata, meaning = scaled_fp8(diffusers_to_bfl(state_of(krea), COMFY), convention)
    path = tmp_path / f"scaled-{convention}.safetensors"
    save_file(tensors, path, metadata=metadata)
    out = tmp_path / "out"
    to_diffusers(out, path, "recipe.dtype=fp32")
    bfl_back = diffusers_to_bfl(load_state(out), COMFY)
    assert sorted(bfl_back) == sorted(meaning)
    assert [k for k in meaning if not torch.equal(bfl_back[k], meaning[k])] == []


@pytest.mark.parametrize("prefix", [COMFY, "diffusion_model."])
@pytest.mark.parametrize("convention, missing", [("old", ".scale_weight"), ("new", ".weight_scale"), ("metadata", ".weight_scale")])
def test_a_scaled_fp8_file_missing_a_scale_is_refused(tmp_path, krea, state_of, convention, missing, prefix):
    tensors, metadata, _ = scaled_fp8(diffusers_to_bfl(state_of(krea), prefix), convention)
    gone = next(k for k in tensors if k.endswith(missing))
    del tensors[gone]
    path = tmp_path / "broken.safetensors"
    save_file(tensors, path, metadata=metadata)
    with pytest.raises(SourceError) as e:
        to_diffusers(tmp_path / "out", path)
    assert str(path) in str(e.value) and gone.removesuffix(missing).removeprefix(prefix) in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


# --- the conversion recipes and the API ------------------------------------------------------------------


def test_to_comfyui_fp8_recipe(tmp_path, krea, state_of):
    """`recipe=to_comfyui_fp8 recipe.sources.model=PATH output=FILE`: fp8 blocks, bf16 exceptions."""
    out = tmp_path / "flux-fp8.safetensors"
    merge(["recipe=to_comfyui_fp8", f"recipe.sources.model={krea}", f"output={out}", "progress=false"])
    got, ref = load_file(out), diffusers_to_bfl(state_of(krea), COMFY)
    assert sorted(got) == sorted(ref)
    kept = ("img_in.", "txt_in.", "time_in.", "vector_in.", "guidance_in.", "final_layer.")
    for key, want in ref.items():
        bf16 = key.removeprefix(COMFY).startswith(kept) or want.dim() == 1
        dtype = torch.bfloat16 if bf16 else torch.float8_e4m3fn
        assert got[key].dtype == dtype and torch.equal(got[key].view(torch.uint8), want.float().clamp(-448, 448).to(dtype).view(torch.uint8)), key


def test_python_api_without_hydra(tmp_path, schnell, krea, state_of):
    from fluxrecipe import api

    recipe = api.load_recipe(guided_recipe(schnell, krea))
    plan = api.plan(recipe, tmp_path / "x.safetensors", format="comfyui")
    assert "one comfyui file, x.safetensors" in api.describe(plan)
    result = api.write(plan, tmp_path / "x.safetensors")
    assert result.output == tmp_path / "x.safetensors"
    assert_same(load_file(result.output), diffusers_to_bfl(lerp_reference(state_of(schnell), state_of(krea), 0.3), COMFY))
    api.merge(recipe, tmp_path / "folder", threads=1)
    assert_same(load_state(tmp_path / "folder"), lerp_reference(state_of(schnell), state_of(krea), 0.3))
    for bad, message in (({"chunk_elements": 0}, "chunk_elements=0: must be a whole number above 0"), ({"chunkelements": 9}, "unknown option(s) chunkelements")):
        with pytest.raises(UsageError, match=re.escape(message)):
            api.merge(guided_recipe(schnell, krea), tmp_path / "refused", **bad)
    assert not (tmp_path / "refused").exists()


# --- verify on a single file ------------------------------------------------------------------------------


def test_verify_checks_a_single_file(recipe_dir, tmp_path, krea, capsys):
    from fluxrecipe.cli.commands import verify as main

    out = tmp_path / "k.safetensors"
    run_recipe(recipe_dir, out, {"sources": {"k": str(krea)}, "rules": [{"match": ".*", "op": "take:k"}]}, "format=comfyui")
    assert main([str(out)]) == 0
    assert "a whole FLUX.1 transformer in comfyui layout" in capsys.readouterr().out
    data = bytearray(out.read_bytes())
    data[-3] ^= 0xFF
    out.write_bytes(bytes(data))
    assert main([str(out)]) == 1
    assert "the file changed after the merge" in capsys.readouterr().err


# --- bad inputs: one line, no output ----------------------------------------------------------------------


def refused(error, fragment, run, out):
    with pytest.raises(error) as e:
        run()
    assert fragment in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert not out.exists()
    return str(e.value)


def test_an_all_in_one_file_without_a_transformer(tmp_path):
    path = tmp_path / "encoders.safetensors"
    save_file({"text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.weight": torch.zeros(4, 4), "vae.encoder.down.0.block.0.conv1.weight": torch.zeros(4, 4)}, path)
    refused(SourceError, "holds a text encoder and a VAE but no FLUX.1 transformer", lambda: to_diffusers(tmp_path / "out", path), tmp_path / "out")


def test_a_lora_given_as_a_source(tmp_path):
    path = tmp_path / "style.safetensors"
    save_file({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(4, 32), "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.zeros(96, 4)}, path)
    message = refused(SourceError, "is a LoRA", lambda: to_diffusers(tmp_path / "out", path), tmp_path / "out")
    assert "loras:" in message and len(message) < 300


def test_an_sdxl_unet_given_as_a_source(tmp_path):
    path = tmp_path / "sdxl.safetensors"
    save_file({f"model.diffusion_model.input_blocks.{i}.0.weight": torch.zeros(4, 4) for i in range(300)}, path)
    message = refused(SourceError, "looks like a Stable Diffusion / SDXL UNet", lambda: to_diffusers(tmp_path / "out", path), tmp_path / "out")
    assert len(message) < 300


def test_a_flux_variant_mismatch_without_a_rule(recipe_dir, tmp_path, krea):
    """A Fill-like source (other in_channels) merged with a base-like one: x_embedder's shapes differ."""
    from conftest import make_flux

    fill = make_flux(tmp_path / "fill", guidance=True, seed=5)
    config = json.loads((fill / "config.json").read_text())
    state = load_state(fill)
    state["x_embedder.weight"] = torch.zeros(state["x_embedder.weight"].shape[0], 12, dtype=torch.bfloat16)
    (fill / "config.json").write_text(json.dumps({**config, "in_channels": 12, "out_channels": 4}))
    for shard in fill.glob("*.safetensors"):
        shard.unlink()
    (fill / "diffusion_pytorch_model.safetensors.index.json").unlink()
    save_file(state, fill / "diffusion_pytorch_model.safetensors")
    out = tmp_path / "out"
    message = refused(PlanError, "a FLUX variant mismatch", lambda: run_recipe(recipe_dir, out, {"sources": {"base": str(krea), "fill": str(fill)}, "rules": [{"match": ".*", "op": "lerp:0.5"}]}), out)
    assert "'x_embedder.weight'" in message and "take:base" in message


def test_single_file_format_needs_a_file_as_output(recipe_dir, tmp_path, krea):
    out = tmp_path / "folder"
    refused(UsageError, "format=bfl writes one file", lambda: run_recipe(recipe_dir, out, {"sources": {"k": str(krea)}, "rules": [{"match": ".*", "op": "take:k"}]}, "format=bfl"), out)
    existing = tmp_path / "existing"
    existing.mkdir()
    with pytest.raises(UsageError, match="writes one file"):
        run_recipe(recipe_dir, existing, {"sources": {"k": str(krea)}, "rules": [{"match": ".*", "op": "take:k"}]}, "format=bfl")


def test_single_file_output_over_an_existing_file(recipe_dir, tmp_path, krea):
    recipe = {"sources": {"k": str(krea)}, "rules": [{"match": ".*", "op": "take:k"}]}
    out = tmp_path / "model.safetensors"
    out.write_bytes(b"my notes, not a model")
    with pytest.raises(OutputError, match="already exists: choose another output"):
        run_recipe(recipe_dir, out, recipe, "format=bfl")
    with pytest.raises(OutputError, match="is not a safetensors model: overwrite=true replaces only a model file"):
        run_recipe(recipe_dir, out, recipe, "format=bfl", "overwrite=true")
    assert out.read_bytes() == b"my notes, not a model"
    out.unlink()
    run_recipe(recipe_dir, out, recipe, "format=bfl")
    first = out.read_bytes()
    run_recipe(recipe_dir, out, recipe, "format=comfyui", "overwrite=true")
    assert out.read_bytes() != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors", "recipes"]


def test_a_single_file_header_holds_whatever_the_plan_lists(recipe_dir, tmp_path, krea, state_of):
    """A single file's metadata (provenance included) is sized from the plan before a byte is written: a LoRA
    with thousands of keys that map nowhere (ignore_unmatched: true) cannot make the run fail at its end."""
    from safetensors.torch import save_file as save

    w = state_of(krea)["transformer_blocks.0.attn.to_q.weight"]
    lora = {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(4, w.shape[1]).to(torch.bfloat16),
            "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.randn(w.shape[0], 4).to(torch.bfloat16)}
    for i in range(3000):
        for part in ("lora_A", "lora_B"):
            lora[f"transformer.other_architecture_block_{i}.attention.projection_layer.{part}.weight"] = torch.zeros(1, 1)
    save(lora, tmp_path / "big.safetensors")
    recipe = {"sources": {"k": str(krea)}, "rules": [{"match": ".*", "op": "take:k"}], "loras": {"x": {"path": str(tmp_path / "big.safetensors"), "ignore_unmatched": True}}}
    out = tmp_path / "out.safetensors"
    run_recipe(recipe_dir, out, recipe, "format=comfyui")
    with safe_open(out, "pt") as f:
        unmatched = json.loads(f.metadata()["fluxrecipe.provenance"])["loras"][0]["unmatched"]
    assert len(unmatched) == 101 and unmatched[-1] == {"and more": 6000 - 100}  # every key of the 3000 modules


@pytest.mark.parametrize("key, shape", [("img_in.weight", ()), ("double_blocks.0.img_attn.norm.query_norm.scale", (0,)), ("txt_in.weight", (32,))])
def test_a_single_file_with_impossible_shapes(tmp_path, krea, state_of, key, shape):
    """Shapes no FLUX.1 transformer has, where the config is derived from them: one line, not a traceback."""
    state = diffusers_to_bfl(state_of(krea))
    state[key] = torch.zeros(shape, dtype=torch.bfloat16)
    path = tmp_path / "odd.safetensors"
    save_file(state, path)
    message = refused(SourceError, "FLUX.1 transformer", lambda: to_diffusers(tmp_path / "out", path), tmp_path / "out")
    assert str(path) in message


def test_a_fused_tensor_with_fp8_and_fp8_scaled_parts_is_refused(recipe_dir, tmp_path, krea):
    rules = [{"match": "attn\\.to_q\\.weight", "op": "take:k", "dtype": "fp8"}, {"match": ".*", "op": "take:k", "dtype": "fp8_scaled"}]
    out = tmp_path / "x.safetensors"
    refused(PlanError, "which the recipe gives fp8 and fp8_scaled: a fused tensor has one scale", lambda: run_recipe(recipe_dir, out, {"sources": {"k": str(krea)}, "rules": rules}, "format=comfyui"), out)
