"""Shared test helpers: tiny FLUX models built offline, an independent reader, and two ways to run a merge.

Tiny models follow DESIGN.md section 4: diffusers builds them with random weights and saves them with a
small max_shard_size, different per source, so shard layouts never line up. The reference reader is
safetensors' own `load_file`, independent of fluxrecipe's header parser.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

# Offline before anything imports huggingface_hub (diffusers does), which reads this once, at import: a test
# module imported first (collection order is random) must not decide whether the suite reaches the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ.pop("FLUXRECIPE_RECIPE_PATH", None)  # a user's recipe folders must not leak into the tests

import pytest
import torch
from safetensors.torch import load_file

REPO_ROOT = Path(__file__).resolve().parent.parent
TINY = dict(
    patch_size=1,
    in_channels=4,
    num_layers=1,
    num_single_layers=1,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,
    pooled_projection_dim=32,
    axes_dims_rope=[4, 4, 8],
)


class NetworkUsed(AssertionError):
    pass


def _no_network(sock: socket.socket, address) -> None:
    """socket.connect for the tests: a local socket (a Unix socket, the loopback) only. A test that reaches out
    fails at once and says so, instead of passing or waiting on a network that may not be there."""
    host = address[0] if isinstance(address, tuple) else None
    if host is not None and host not in ("127.0.0.1", "::1", "localhost"):
        raise NetworkUsed(f"a test tried to reach the network ({address})")
    return _real_connect(sock, address)


_real_connect = socket.socket.connect
socket.socket.connect = _no_network


def pytest_sessionstart(session: pytest.Session) -> None:
    """The random order's seed, first, even under -q (which hides pytest-randomly's own header line): an
    order-dependent failure is repeated with the command this line gives."""
    seed = getattr(session.config.option, "randomly_seed", None)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if isinstance(seed, int) and reporter is not None:
        reporter.write_line(f"random order: seed {seed}; repeat it with .venv/bin/python -m pytest -q --randomly-seed={seed}")


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """Demo checkpoints and cached architectures go to a cache of the session's own."""
    os.environ["FLUXRECIPE_CACHE"] = str(tmp_path_factory.mktemp("fluxrecipe-cache"))


def make_flux(
    folder: Path,
    *,
    guidance: bool,
    seed: int,
    shard: str = "50KB",
    dtype: torch.dtype = torch.bfloat16,
    num_layers: int = 2,
    num_single_layers: int = 2,
) -> Path:
    """A tiny FLUX transformer with random (non-trivial) weights, saved the way diffusers saves it."""
    config = {**TINY, "num_layers": num_layers, "num_single_layers": num_single_layers, "guidance_embeds": guidance}
    return build_model("FluxTransformer2DModel", config, folder, seed=seed, shard=shard, dtype=dtype)


def build_model(class_name: str, config: dict, folder: Path, *, seed: int, shard: str, dtype: torch.dtype) -> Path:
    """A model of a diffusers class with random (non-trivial) weights: its own initialisation plus noise, saved
    the way diffusers saves it, in shards of `shard`."""
    import diffusers

    torch.manual_seed(seed)
    model = getattr(diffusers, class_name)(**config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p), alpha=0.05)
    model.to(dtype).save_pretrained(folder, max_shard_size=shard)
    return folder


@pytest.fixture(scope="session")
def schnell(tmp_path_factory) -> Path:
    """schnell-like: no guidance embedder, 50 KB shards."""
    return make_flux(tmp_path_factory.mktemp("schnell") / "transformer", guidance=False, seed=0, shard="50KB")


@pytest.fixture(scope="session")
def krea(tmp_path_factory) -> Path:
    """Krea-like: a guidance embedder, 35 KB shards (a layout that does not line up with schnell's)."""
    return make_flux(tmp_path_factory.mktemp("krea") / "transformer", guidance=True, seed=1, shard="35KB")


def load_state(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a diffusers folder, read with safetensors itself (through the index when there is one)."""
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["diffusion_pytorch_model.safetensors"]
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(load_file(folder / name))
    return state


def write_recipe(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.yaml"
    path.write_text(text)
    return path


def run_cli(args: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m fluxrecipe ARGS` in a subprocess, importing this checkout's fluxrecipe."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HYDRA_FULL_ERROR": "0", **(env or {})}
    return subprocess.run([sys.executable, "-m", "fluxrecipe", *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


def compose(overrides: list[str]):
    """The config `python -m fluxrecipe OVERRIDES` would run with, composed in-process (no subprocess)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    from fluxrecipe.catalog import conf_dir
    from fluxrecipe.cli.hydra_setup import register

    register()
    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        cfg = hydra_compose("config", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    return cfg


def merge(overrides: list[str]):
    """Run one merge in-process; returns its Result (or the Plan for a dry run)."""
    from fluxrecipe.cli.job import run_config

    return run_config(compose(overrides))


# --- additions for the core suite (ops, recipes, plans, merges, CLI) ---------------------------------------

OUT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@pytest.fixture(scope="session")
def dev(tmp_path_factory) -> Path:
    """A third source, Krea's architecture (guidance embedder), saved as float32 in 90 KB shards."""
    return make_flux(tmp_path_factory.mktemp("dev") / "transformer", guidance=True, seed=2, shard="90KB", dtype=torch.float32)


@pytest.fixture(scope="session")
def half(tmp_path_factory) -> Path:
    """A fourth source, Krea's architecture, saved as float16 in 25 KB shards."""
    return make_flux(tmp_path_factory.mktemp("half") / "transformer", guidance=True, seed=3, shard="25KB", dtype=torch.float16)


@pytest.fixture
def recipe_dir(tmp_path, monkeypatch) -> Path:
    """A user recipe folder on FLUXRECIPE_RECIPE_PATH for this test only."""
    folder = tmp_path / "recipes"
    folder.mkdir()
    monkeypatch.setenv("FLUXRECIPE_RECIPE_PATH", str(folder))
    return folder


def reference(op: str, inputs: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """The documented formula of `op` (as `name:args`) in plain torch: inputs upcast to float32, the float32
    operations in the order ops.py documents, one rounding to `dtype` at the end. Independent of fluxrecipe."""
    name, _, rest = op.partition(":")
    args = [float(a) for a in rest.split(",")] if rest and name != "take" else []
    xs = [x.to(torch.float32) for x in inputs]
    if name == "take":
        out = xs[0]
    elif name == "average":
        out = xs[0]
        for x in xs[1:]:
            out = out + x
        out = out / len(xs)
    elif name == "lerp":
        out = (1.0 - args[0]) * xs[0] + args[0] * xs[1]
    elif name == "weighted":
        out = args[0] * xs[0]
        for w, x in zip(args[1:], xs[1:]):
            out = out + w * x
    elif name == "add_difference":
        out = xs[0] + args[0] * (xs[1] - xs[2])
    else:
        raise ValueError(op)
    return out.to(dtype)


def shard_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def tiny_config(guidance: bool, **changes) -> dict:
    """The config.json diffusers writes for a tiny FLUX model (see TINY), without building one."""
    return {"_class_name": "FluxTransformer2DModel", **TINY, "num_layers": 2, "num_single_layers": 2, "guidance_embeds": guidance, **changes}


def fake_checkpoint(name: str, guidance: bool, dtype: str = "BF16", *, drop=(), reshape=None, config=True, **changes):
    """A Checkpoint of a tiny FLUX model made by hand (no file is ever read): the keys and shapes diffusers
    builds from tiny_config (with `changes`, e.g. num_layers=19), laid out in two made-up files. `drop`
    removes keys, `reshape` maps key -> shape."""
    from fluxrecipe.architecture import expected_parameters
    from fluxrecipe.formats.layout import Piece, TensorRef
    from fluxrecipe.formats.safetensors import ITEMSIZE
    from fluxrecipe.sources import Checkpoint

    cfg = tiny_config(guidance, **changes)
    shapes = expected_parameters(cfg, "test")
    tensors, offset = {}, 0
    for i, (key, shape) in enumerate(shapes.items()):
        if key in drop:
            continue
        shape = tuple((reshape or {}).get(key, shape))
        nbytes = math.prod(shape) * ITEMSIZE[dtype]
        tensors[key] = TensorRef(name, key, key, dtype, shape, (Piece(f"/nowhere/{name}/part{i % 2}.safetensors", offset, nbytes),))
        offset += nbytes
    return Checkpoint(name=name, folder=f"/nowhere/{name}", tensors=tensors, config=cfg if config else None, origin={"path": f"/nowhere/{name}"})


def run_recipe(recipe_dir: Path, output: Path, recipe: dict | str, *overrides: str, name: str = "t"):
    """Write `recipe` (fields, or YAML text) as NAME.yaml into the test's recipe folder and merge it in-process
    into `output`; returns its Result (the Plan for a dry run)."""
    import yaml

    text = recipe if isinstance(recipe, str) else yaml.safe_dump(recipe, sort_keys=False)
    write_recipe(recipe_dir, name, text)
    return merge([f"recipe={name}", f"output={output}", "progress=false", *overrides])


@pytest.fixture(scope="session")
def state_of():
    """load_state, remembered per folder for the session (the source models never change)."""
    cache: dict[Path, dict[str, torch.Tensor]] = {}

    def get(folder: Path) -> dict[str, torch.Tensor]:
        if folder not in cache:
            cache[folder] = load_state(folder)
        return cache[folder]

    return get


def save_sharded(state: dict[str, torch.Tensor], folder: Path, groups: list[list[str]], config: dict) -> Path:
    """A diffusers folder laid out by hand: shard i holds exactly the keys of groups[i], plus index and config."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    weight_map = {}
    for i, keys in enumerate(groups, 1):
        name = f"diffusion_pytorch_model-{i:05d}-of-{len(groups):05d}.safetensors"
        save_file({k: state[k].contiguous() for k in keys}, folder / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, name))
    total = sum(state[k].nbytes for k in weight_map)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def config_of(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def source_overrides(schnell: Path, krea: Path) -> list[str]:
    return [f"recipe.sources.schnell={schnell}", f"recipe.sources.krea={krea}"]


@pytest.fixture
def pipeline_files(tmp_path) -> Path:
    """A pipeline folder as far as a dry run reads one: model_index.json and its components' configs."""
    folder = tmp_path / "pipeline"
    index = {"_class_name": "FluxPipeline", **{n: ["x", "Y"] for n in ("scheduler", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "vae", "transformer")}}
    configs = {
        "model_index.json": index,
        "text_encoder/config.json": {"hidden_size": TINY["pooled_projection_dim"]},
        "text_encoder_2/config.json": {"d_model": TINY["joint_attention_dim"]},
        "vae/config.json": {"latent_channels": TINY["in_channels"] // 4},
    }
    for name, value in configs.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(json.dumps(value))
    return folder
