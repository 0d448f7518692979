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


def diffusers_to_bfl(state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """The inverse of diffusers' convert_flux_transformer_checkpoint_to_diffusers."""
    out: dict[str, torch.Tensor] = {}
    top = {
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
    for bfl, dif in top.items():
        for p in ("weight", "bias"):
            if f"{dif}.{p}" in state:
                out[f"{bfl}.{p}"] = state[f"{dif}.{p}"]
    for p in ("weight", "bias"):
        out[f"final_layer.adaLN_modulation.1.{p}"] = _swap(state[f"norm_out.linear.{p}"])
    doubles = sorted({int(m[1]) for k in state if (m := re.match(r"transformer_blocks\.(\d+)\.", k))})
    for i in doubles:
        d, b = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        for p in ("weight", "bias"):
            out[f"{b}img_mod.lin.{p}"] = state[f"{d}norm1.linear.{p}"]
            out[f"{b}txt_mod.lin.{p}"] = state[f"{d}norm1_context.linear.{p}"]
            out[f"{b}img_attn.qkv.{p}"] = torch.cat([state[f"{d}attn.to_{x}.{p}"] for x in "qkv"])
            out[f"{b}txt_attn.qkv.{p}"] = torch.cat([state[f"{d}attn.add_{x}_proj.{p}"] for x in "qkv"])
            out[f"{b}img_attn.proj.{p}"] = state[f"{d}attn.to_out.0.{p}"]
            out[f"{b}txt_attn.proj.{p}"] = state[f"{d}attn.to_add_out.{p}"]
            out[f"{b}img_mlp.0.{p}"] = state[f"{d}ff.net.0.proj.{p}"]
            out[f"{b}img_mlp.2.{p}"] = state[f"{d}ff.net.2.{p}"]
            out[f"{b}txt_mlp.0.{p}"] = state[f"{d}ff_context.net.0.proj.{p}"]
            out[f"{b}txt_mlp.2.{p}"] = state[f"{d}ff_context.net.2.{p}"]
        out[f"{b}img_attn.norm.query_norm.scale"] = state[f"{d}attn.norm_q.weight"]
        out[f"{b}img_attn.norm.key_norm.scale"] = state[f"{d}attn.norm_k.weight"]
        out[f"{b}txt_attn.norm.query_norm.scale"] = state[f"{d}attn.norm_added_q.weight"]
        out[f"{b}txt_attn.norm.key_norm.scale"] = state[f"{d}attn.norm_added_k.weight"]
    singles = sorted({int(m[1]) for k in state if (m := re.match(r"single_transformer_blocks\.(\d+)\.", k))})
    for i in singles:
        s, b = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        for p in ("weight", "bias"):
            out[f"{b}modulation.lin.{p}"] = state[f"{s}norm.linear.{p}"]
            out[f"{b}linear1.{p}"] = torch.cat([state[f"{s}attn.to_{x}.{p}"] for x in "qkv"] + [state[f"{s}proj_mlp.{p}"]])
            out[f"{b}linear2.{p}"] = state[f"{s}proj_out.{p}"]
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
        prefix = COMFY if any(k.startswith(COMFY) for k in state) else ""
        tensors[f"{prefix}scaled_fp8"] = torch.zeros(0, dtype=torch.float8_e4m3fn)
    if convention == "metadata":
        metadata["_quantization_metadata"] = json.dumps({"format_version": "1.0", "layers": layers})
    return tensors, metadata, meaning
