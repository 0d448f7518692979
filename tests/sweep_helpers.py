"""Shared by the sweep tests: a tiny FLUX pipeline built offline, a source with a NaN, recipes over the tiny
models, and ways to run fluxrecipe in-process as the command line would."""

from __future__ import annotations

import json
import shutil
import signal
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from conftest import TINY, compose, write_recipe

LERP = """\
sources:
  schnell: {schnell}
  krea: {krea}
base: {base}
alpha: 0.5
rules:
{guidance}  - match: '.*'
    op: lerp:${{recipe.alpha}}
dtype: bf16
"""
WORDS = "a photo of the cat red house on hill in snow".split()


def write_recipes(folder: Path, schnell: Path, krea: Path, nan_krea: Path) -> dict[str, str]:
    """`tiny` (schnell's architecture), `tiny_guided` (Krea's, guidance embedder kept), `tiny_nan` (a NaN in
    Krea: found only while merging, so it passes the pre-flight and fails its job) and `tiny_broken` (a
    missing source). Returns the environment that makes them known."""
    guided = "  - match: 'guidance'\n    op: take:krea\n"
    write_recipe(folder, "tiny", LERP.format(schnell=schnell, krea=krea, base="schnell", guidance=""))
    write_recipe(folder, "tiny_guided", LERP.format(schnell=schnell, krea=krea, base="krea", guidance=guided))
    write_recipe(folder, "tiny_nan", LERP.format(schnell=schnell, krea=nan_krea, base="schnell", guidance=""))
    write_recipe(folder, "tiny_broken", LERP.format(schnell=schnell, krea=folder / "no-such-krea", base="schnell", guidance=""))
    return {"FLUXRECIPE_RECIPE_PATH": str(folder)}


def with_nan(source: Path, folder: Path, key: str = "x_embedder.weight") -> Path:
    """A copy of a diffusers folder with one NaN in `key` (same shapes, dtypes and layout otherwise)."""
    shutil.copytree(source, folder)
    index = json.loads((folder / "diffusion_pytorch_model.safetensors.index.json").read_text())
    shard = folder / index["weight_map"][key]
    state = load_file(shard)
    state[key] = state[key].clone()
    state[key].view(-1)[3] = float("nan")
    save_file(state, shard, metadata={"format": "pt"})
    return folder


def build_pipeline(folder: Path, architecture: dict = TINY) -> Path:
    """A tiny FLUX pipeline, as diffusers saves one, built offline: CLIP and T5 encoders from transformers
    configs, their tokenizers made here from a small vocabulary (CLIP: characters, BPE without merges; T5: a
    Unigram model of words and characters), a VAE with in_channels / 4 latent channels (the transformer takes
    2x2 packed latents), FLUX's scheduler, and a transformer of `architecture` (which previews replace by the
    merge). tests/slurm/ builds one for the demo checkpoints' architecture."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    chars = sorted(set("abcdefghijklmnopqrstuvwxyz0123456789"))
    scratch = folder.parent / f"{folder.name}-tokenizers"
    (scratch / "clip").mkdir(parents=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, **{c: 2 + i for i, c in enumerate(chars)}}
    vocab.update({f"{c}</w>": len(vocab) + i for i, c in enumerate(chars)})
    (scratch / "clip" / "vocab.json").write_text(json.dumps(vocab))
    (scratch / "clip" / "merges.txt").write_text("#version: 0.2\n")
    clip_tokenizer = CLIPTokenizer.from_pretrained(scratch / "clip", model_max_length=77)
    t5_tokenizer, t5_encoder = _tiny_t5(scratch, architecture["joint_attention_dim"])
    torch.manual_seed(0)
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=architecture["pooled_projection_dim"], intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1, projection_dim=32,
    ))
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=_tiny_vae(architecture["in_channels"] // 4), text_encoder=clip, tokenizer=clip_tokenizer,
        text_encoder_2=t5_encoder, tokenizer_2=t5_tokenizer, transformer=FluxTransformer2DModel(**architecture),
    )
    pipe.save_pretrained(folder)
    shutil.rmtree(scratch)
    return folder


def build_chroma_pipeline(folder: Path, config: dict) -> Path:
    """A tiny ChromaPipeline, built offline as build_pipeline builds FLUX's: T5 alone (Chroma has no CLIP), a
    VAE of a quarter of the transformer's input channels, FLUX's scheduler, a tiny Chroma transformer of
    `config`."""
    from diffusers import ChromaPipeline, ChromaTransformer2DModel, FlowMatchEulerDiscreteScheduler

    scratch = folder.parent / f"{folder.name}-tokenizers"
    scratch.mkdir(parents=True)
    t5_tokenizer, t5_encoder = _tiny_t5(scratch, config["joint_attention_dim"])
    pipe = ChromaPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=_tiny_vae(config["in_channels"] // 4), text_encoder=t5_encoder,
        tokenizer=t5_tokenizer, transformer=ChromaTransformer2DModel(**config),
    )
    pipe.save_pretrained(folder)
    shutil.rmtree(scratch)
    return folder


def build_flux2_klein_pipeline(folder: Path, config: dict, is_distilled: bool = True) -> Path:
    """A tiny Flux2KleinPipeline (a distilled model's, or with `is_distilled` false a base model's), built
    offline: a Qwen3 of 27 layers (the pipeline stacks the hidden states of layers 9, 18 and 27: the
    transformer's joint_attention_dim is 3 x its width) with a byte-level BPE tokenizer made here and a
    Qwen3-like chat template, FLUX.2's VAE with in_channels / 4 latent channels (packed 2x2), FLUX's scheduler,
    and a tiny FLUX.2 transformer of `config` without a guidance embedder."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Transformer2DModel
    from tokenizers import pre_tokenizers
    from transformers import Qwen2TokenizerFast, Qwen3Config, Qwen3ForCausalLM

    width, rest = divmod(config["joint_attention_dim"], 3)
    assert not rest, "FLUX.2 klein's transformer takes 3 of Qwen3's layers side by side"
    tokenizer = Qwen2TokenizerFast(vocab={c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}, merges=[])
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<think>", "</think>"]})
    tokenizer.chat_template = QWEN3_TEMPLATE
    torch.manual_seed(3)
    qwen3 = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=27, num_attention_heads=2,
        num_key_value_heads=1, head_dim=width // 2, max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
    ))
    pipe = Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=_tiny_flux2_vae(config), text_encoder=qwen3, tokenizer=tokenizer,
        transformer=Flux2Transformer2DModel(**config, guidance_embeds=False), is_distilled=is_distilled,
    )
    pipe.save_pretrained(folder)
    return folder


# Qwen3's chat template, as Flux2KleinPipeline calls it (one user message, a generation prompt, thinking off)
QWEN3_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def build_flux2_dev_pipeline(folder: Path, config: dict) -> Path:
    """A tiny Flux2Pipeline (FLUX.2 dev's), built offline: a Mistral3ForConditionalGeneration whose language model
    has 30 layers (the pipeline stacks the hidden states of layers 10, 20 and 30: the transformer's
    joint_attention_dim is 3 x its width) and a 1-layer Pixtral vision tower, a byte-level BPE tokenizer made here
    with Mistral's special tokens and a chat template of a system and a user message, FLUX.2's VAE, FLUX's
    scheduler, and a tiny FLUX.2 transformer of `config` with dev's guidance embedder. The tokenizer stands in for
    FLUX.2-dev's PixtralProcessor (whose apply_chat_template is the only call the pipeline makes on it): transformers
    refuses to build a PixtralProcessor without torchvision, which the preview extra does not install."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2Pipeline, Flux2Transformer2DModel
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, MistralConfig, PixtralVisionConfig, PreTrainedTokenizerFast

    width, rest = divmod(config["joint_attention_dim"], 3)
    assert not rest, "FLUX.2 dev's transformer takes 3 of Mistral's layers side by side"
    specials = ["<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[IMG]", "[IMG_BREAK]", "[IMG_END]"]
    vocab = {token: i for i, token in enumerate(specials + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tokenizer.add_special_tokens({"additional_special_tokens": specials[4:]})
    tokenizer.chat_template = MISTRAL_TEMPLATE
    torch.manual_seed(4)
    mistral = Mistral3ForConditionalGeneration(Mistral3Config(
        text_config=MistralConfig(
            vocab_size=len(vocab), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=30, num_attention_heads=2,
            num_key_value_heads=1, head_dim=width // 2, max_position_embeddings=1024, pad_token_id=vocab["<pad>"],
        ),
        vision_config=PixtralVisionConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, head_dim=4, image_size=16, patch_size=4),
        image_token_index=vocab["[IMG]"], spatial_merge_size=2,
    ))
    pipe = Flux2Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=_tiny_flux2_vae(config), text_encoder=mistral, tokenizer=tokenizer,
        transformer=Flux2Transformer2DModel(**config, guidance_embeds=True),
    )
    pipe.save_pretrained(folder)
    return folder


# Mistral's chat template, as Flux2Pipeline calls it (a system message and a user message, each one text part)
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% set text = m.content[0].text %}"
    "{% if m.role == 'system' %}[SYSTEM_PROMPT]{{ text }}[/SYSTEM_PROMPT]{% else %}[INST]{{ text }}[/INST]{% endif %}{% endfor %}"
)


def _tiny_flux2_vae(config: dict):
    """FLUX.2's VAE, one block of 4 channels, with the transformer's in_channels / 4 latent channels (packed 2x2)."""
    from diffusers import AutoencoderKLFlux2

    torch.manual_seed(2)
    return AutoencoderKLFlux2(
        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",), block_out_channels=(4,), layers_per_block=1,
        latent_channels=config["in_channels"] // 4, norm_num_groups=1, sample_size=32,
    )


def _tiny_t5(scratch: Path, width: int):
    """A T5 tokenizer (a Unigram model of WORDS and characters) and a 2-layer T5 encoder `width` wide."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast

    chars = sorted(set("abcdefghijklmnopqrstuvwxyz0123456789"))
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -3.0)]
    pieces += [(f"\u2581{w}", -1.0) for w in WORDS] + [(c, -5.0) for c in chars]
    t5 = Tokenizer(models.Unigram(pieces, unk_id=2))
    t5.pre_tokenizer = pre_tokenizers.Metaspace()
    t5.decoder = decoders.Metaspace()
    t5.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
    t5.save(str(scratch / "t5.json"))
    tokenizer = T5TokenizerFast(tokenizer_file=str(scratch / "t5.json"), extra_ids=0, model_max_length=512)
    torch.manual_seed(1)
    encoder = T5EncoderModel(T5Config(
        vocab_size=len(pieces), d_model=width, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
    ))
    return tokenizer, encoder


def _tiny_vae(latent_channels: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(2)
    return AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1, latent_channels=latent_channels,
        norm_num_groups=1, sample_size=32, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035,
    )


def run_single(overrides: list[str], run_dir: Path):
    """One run as `python -m fluxrecipe OVERRIDES` makes it, in-process, with `run_dir` as Hydra's run folder."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import read_write

    from fluxrecipe.cli import job
    from fluxrecipe.cli.arguments import preview_switch

    cfg = compose([preview_switch(o) for o in overrides])
    with read_write(cfg.hydra.runtime):
        cfg.hydra.runtime.output_dir = str(run_dir)
    HydraConfig.instance().set_config(cfg)
    return job.run_config(cfg)


def run_main(argv: list[str], monkeypatch) -> int:
    """`python -m fluxrecipe ARGV` in-process (Hydra and all); returns its exit status."""
    from fluxrecipe.cli import app as entry
    from fluxrecipe.cli import multirun

    monkeypatch.setattr(sys, "argv", ["fluxrecipe", *argv])
    monkeypatch.setattr(sys, "stdout", sys.stdout)  # main() wraps it (a reader that leaves a pipe): unwrapped after the test
    for name, value in (("_failed_here", 0), ("_last_summary", None), ("_summary_error", None)):
        monkeypatch.setattr(multirun, name, value)  # what an earlier in-process sweep counted
    previous = signal.getsignal(signal.SIGTERM)
    try:
        entry.main()
        return 0
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    finally:
        signal.signal(signal.SIGTERM, previous)
        compose([])  # leave Hydra's global state as a single run's
