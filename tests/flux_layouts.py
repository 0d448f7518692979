"""Test-side references for FLUX's layouts, written out by hand from diffusers' converter (independent of
fluxrecipe's table): diffusers state dict -> Black Forest Labs / ComfyUI state dict, and ComfyUI's two
scaled-fp8 conventions."""

from __future__ import annotations

import json
import re

import torch

COMFY = "model.diffusion_model."


def _swap(t: torch.Tensor) -> torch.Tensor:
    """diffusers' norm_out.linear is (scale, shift); BFL's final_layer.adaLN_modulation.1 is (shift, scale)."""
    scale, shift = t.chunk(2, dim=0)
    return torch.cat([shift, scale])


TOP = {  # BFL module -> diffusers module, renamed as they are
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer.linear": "proj_out",
}
DOUBLE = {  # double_blocks.N.X -> the transformer_blocks.N. modules whose rows it holds, in order
    "img_mod.lin": ("norm1.linear",),
    "txt_mod.lin": ("norm1_context.linear",),
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "img_attn.proj": ("attn.to_out.0",),
    "txt_attn.proj": ("attn.to_add_out",),
    "img_mlp.0": ("ff.net.0.proj",),
    "img_mlp.2": ("ff.net.2",),
    "txt_mlp.0": ("ff_context.net.0.proj",),
    "txt_mlp.2": ("ff_context.net.2",),
}
SINGLE = {"modulation.lin": ("norm.linear",), "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), "linear2": ("proj_out",)}
FINAL_MOD = "final_layer.adaLN_modulation.1"  # norm_out.linear, halves swapped


def blocks(state: dict, group: str) -> list[int]:
    return sorted({int(m[1]) for k in state if (m := re.match(rf"{group}\.(\d+)\.", k))})


def linear_modules(state: dict, top: dict = TOP, double: dict = DOUBLE, single: dict = SINGLE) -> list[tuple[str, tuple[str, ...]]]:
    """Every Linear module of a FLUX model (diffusers keys) in BFL's names, with the diffusers modules whose
    rows it holds in order (FINAL_MOD: norm_out.linear, its halves swapped). The tables: FLUX.1's, or another
    family's of the same design (flux2_helpers)."""
    modules = [(bfl, (dif,)) for bfl, dif in top.items() if f"{dif}.weight" in state]
    for i in blocks(state, "transformer_blocks"):
        modules += [(f"double_blocks.{i}.{b}", tuple(f"transformer_blocks.{i}.{d}" for d in ds)) for b, ds in double.items()]
    for i in blocks(state, "single_transformer_blocks"):
        modules += [(f"single_blocks.{i}.{b}", tuple(f"single_transformer_blocks.{i}.{d}" for d in ds)) for b, ds in single.items()]
    return modules + ([(FINAL_MOD, ("norm_out.linear",))] if "norm_out.linear.weight" in state else [])  # Chroma has no final modulation


def fuse(bfl_module: str, parts: list[torch.Tensor]) -> torch.Tensor:
    """The rows of a BFL module's tensor from its diffusers modules' rows (a final layer's modulation,
    `...adaLN_modulation.1` in every family's BFL layout, swapped)."""
    return _swap(parts[0]) if bfl_module.endswith("adaLN_modulation.1") else torch.cat(parts)


def diffusers_to_bfl(state: dict[str, torch.Tensor], prefix: str = "", modules: list | None = None) -> dict[str, torch.Tensor]:
    """The inverse of diffusers' convert_flux_transformer_checkpoint_to_diffusers (`modules`: another family's
    linear_modules of the same design, Chroma's)."""
    out: dict[str, torch.Tensor] = {}
    for bfl, difs in modules or linear_modules(state):
        for p in ("weight", "bias"):
            out[f"{bfl}.{p}"] = fuse(bfl, [state[f"{d}.{p}"] for d in difs])
    for i in blocks(state, "transformer_blocks"):
        d, b = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        out[f"{b}img_attn.norm.query_norm.scale"] = state[f"{d}attn.norm_q.weight"]
        out[f"{b}img_attn.norm.key_norm.scale"] = state[f"{d}attn.norm_k.weight"]
        out[f"{b}txt_attn.norm.query_norm.scale"] = state[f"{d}attn.norm_added_q.weight"]
        out[f"{b}txt_attn.norm.key_norm.scale"] = state[f"{d}attn.norm_added_k.weight"]
    for i in blocks(state, "single_transformer_blocks"):
        s, b = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        out[f"{b}norm.query_norm.scale"] = state[f"{s}attn.norm_q.weight"]
        out[f"{b}norm.key_norm.scale"] = state[f"{s}attn.norm_k.weight"]
    return {prefix + k: v.contiguous() for k, v in out.items()}


def is_linear_weight(key: str, t: torch.Tensor) -> bool:
    return key.endswith(".weight") and t.dim() == 2


def scaled_fp8(state: dict[str, torch.Tensor], convention: str) -> tuple[dict[str, torch.Tensor], dict[str, str], dict[str, torch.Tensor]]:
    """A BFL/ComfyUI state dict as ComfyUI's scaled fp8: every 2-D weight as fp8 with a per-tensor scale
    (absmax / 448). convention: "old" (scaled_fp8 marker + .scale_weight), "new" (.weight_scale +
    .comfy_quant), or "metadata" (.weight_scale + _quantization_metadata). Returns the file's tensors, its
    metadata, and the float32 values they stand for (fp8 x scale), key by key."""
    tensors, meaning, layers = {}, {}, {}
    for key, t in state.items():
        if not is_linear_weight(key, t):
            tensors[key] = t
            meaning[key] = t.float()
            continue
        layer = key[: -len(".weight")]
        scale = (t.float().abs().max() / 448.0).reshape(())
        q = (t.float() / scale).clamp(-448, 448).to(torch.float8_e4m3fn)
        tensors[key] = q
        meaning[key] = q.float() * scale
        if convention == "old":
            tensors[f"{layer}.scale_weight"] = scale.reshape(1)
        else:
            tensors[f"{layer}.weight_scale"] = scale
            layers[layer] = {"format": "float8_e4m3fn"}
            if convention == "new":
                tensors[f"{layer}.comfy_quant"] = torch.tensor(list(json.dumps({"format": "float8_e4m3fn"}).encode()), dtype=torch.uint8)
    metadata = {"format": "pt"}
    if convention == "old":
        prefix = next((p for p in (COMFY, "diffusion_model.") if any(k.startswith(p) for k in state)), "")
        tensors[f"{prefix}scaled_fp8"] = torch.zeros(0, dtype=torch.float8_e4m3fn)
    if convention == "metadata":
        metadata["_quantization_metadata"] = json.dumps({"format_version": "1.0", "layers": layers})
    return tensors, metadata, meaning
