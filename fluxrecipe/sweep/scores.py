"""Scores: numbers for a job's preview images, so that a sweep can be ranked and searched, not only looked at.

`preview.score=[clip, aesthetic]` scores every preview image:

    clip       CLIP score of image and prompt: 100 x the cosine of their CLIP embeddings, floored at 0 (the
               definition torchmetrics' CLIPScore uses); the model `preview.scorers.clip` (a hub id or a local
               folder) is loaded with transformers' CLIPModel and CLIPProcessor.
    aesthetic  the LAION "improved aesthetic predictor" (christophschuhmann/improved-aesthetic-predictor): its MLP
               head on the L2-normalised CLIP image embedding, written here in plain torch (the pip packages
               that wrap it pin transformers below 5 or pull torchvision); the head's weights are
               `preview.scorers.aesthetic` (a local .pth or .safetensors file, or a hub file org/name/FILE)
               and it reads the embedding of the CLIP model `preview.scorers.clip` (ViT-L/14 for LAION's).

A job's scores go into `<job folder>/scores.json`: each image's scores, their mean per job, the objective
(`search.objective`: one score, a weighted sum, or a list for a Pareto front) and, with `preview.reference`,
how many images beat both (all) unmerged parents on every score. The sweep's records and summary read it.
The models are loaded once per process (a sweep run by the basic launcher loads them once).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import FluxRecipeError, UsageError
from ..files import read_small
from ..writer import replace_json
from .previews import read_previews

log = logging.getLogger("fluxrecipe")

SCORERS = ("clip", "aesthetic")
SCORES_JSON = "scores.json"
REFERENCE_DIR = "reference"  # the unmerged parents' previews and scores, once per sweep (or run) folder
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
HUB_FILE = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)/(?P<file>[\w.-]+\.(pth|pt|safetensors))")
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")  # CLIPProcessor's config, as transformers 4 or 5 saves it
# LAION's improved aesthetic predictor: Linear(d, 1024), Dropout, Linear(1024, 128), Dropout, Linear(128, 64),
# Dropout, Linear(64, 16), Linear(16, 1): the indices of its nn.Sequential that hold weights
AESTHETIC_LAYERS = (0, 2, 4, 6, 7)
AESTHETIC_WIDTHS = (1024, 128, 64, 16, 1)


@dataclass(frozen=True)
class Objective:
    """What a search maximises: a weighted sum of the job's mean scores, or (pareto) each of several."""

    terms: tuple[tuple[str, float], ...]  # (score, weight)
    pareto: bool = False

    def value(self, means: dict[str, float]) -> float | list[float]:
        if self.pareto:
            return [means[name] for name, _ in self.terms]
        return sum(weight * means[name] for name, weight in self.terms)

    @property
    def failed(self) -> float | list[float]:
        """What a failed job returns to the sweeper: the worst value, so the search goes on and never picks it
        (Hydra's Optuna sweeper stops the whole search at a NaN)."""
        return [-math.inf] * len(self.terms) if self.pareto else -math.inf

    def describe(self) -> str:
        if self.pareto:
            return "Pareto front of " + ", ".join(name for name, _ in self.terms)
        return " + ".join(name if weight == 1 else f"{weight:g} x {name}" for name, weight in self.terms)


@dataclass(frozen=True)
class ScoreRequest:
    """The scores a job asks for, checked."""

    scores: tuple[str, ...]
    clip: str  # the CLIP model: a hub id or a local folder
    aesthetic: str  # the aesthetic head: a local file, or a hub file org/name/FILE
    reference: tuple[str, ...] = ()  # sources of the recipe compared with the merge
    objective: Objective | None = None

    def __post_init__(self) -> None:
        unknown = [s for s in self.scores if s not in SCORERS]
        if unknown or not self.scores or len(set(self.scores)) != len(self.scores):
            raise UsageError(f"preview.score={json.dumps(list(self.scores))}: a list of scores, each once, from {', '.join(SCORERS)}")
        for name, value in (("clip", self.clip), ("aesthetic", self.aesthetic)):
            if not isinstance(value, str) or not value.strip():
                raise UsageError(f"preview.scorers.{name}={value}: give a hub id or a local path")
        if self.objective is not None:
            missing = [name for name, _ in self.objective.terms if name not in self.scores]
            if missing:
                raise UsageError(f"search.objective names {', '.join(missing)}, which preview.score={json.dumps(list(self.scores))} does not score: add it to preview.score")

    @property
    def models(self) -> dict[str, str]:
        """The models the scores need (aesthetic reads CLIP's image embedding)."""
        return {"clip": self.clip, **({"aesthetic": self.aesthetic} if "aesthetic" in self.scores else {})}


# --- the models: where they are, and whether they are there -----------------------------------------------


def clip_folder(spec: str, download: bool = True) -> Path:
    """The local folder of the CLIP model `spec` (a local folder, or a hub id fetched into the cache)."""
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file() or not any((path / f).is_file() for f in PROCESSOR_FILES):
            raise UsageError(f"preview.scorers.clip={spec}: not a CLIP model folder (no config.json, or no {' or '.join(PROCESSOR_FILES)}): give one saved by transformers' CLIPModel and CLIPProcessor")
        return path.resolve()
    if spec.startswith(("/", ".", "~")) or not HUB_ID.fullmatch(spec):
        raise UsageError(f"preview.scorers.clip={spec}: no such folder, and not a hub repo id (org/name)")
    from huggingface_hub import snapshot_download

    from ..hub import hub_access

    hint = f"hf download {spec} --include '*.json' '*.txt' '*.safetensors'"
    with hub_access(f"preview.scorers.clip={spec}", spec, lambda: hint, "give a local CLIP model folder") as local_only:
        patterns = ["*.json", "*.txt", "*.safetensors"] if download else ["config.json"]
        return Path(snapshot_download(spec, allow_patterns=patterns, local_files_only=local_only))


def aesthetic_file(spec: str) -> Path:
    """The local file of the aesthetic head `spec` (a local file, or a hub file org/name/FILE, fetched)."""
    path = Path(spec).expanduser()
    if path.is_file():
        return path.resolve()
    m = HUB_FILE.fullmatch(spec)
    if m is None or spec.startswith(("/", ".", "~")):
        raise UsageError(f"preview.scorers.aesthetic={spec}: no such file, and not a hub file (org/name/FILE.pth or .safetensors)")
    from ..hub import fetch_file

    return fetch_file(f"preview.scorers.aesthetic={spec}", m["repo"], m["file"], None, local="give a local .pth or .safetensors file")[0]


def _clip_width(folder: Path) -> int | None:
    """The width of the CLIP model's image embedding (its projection_dim), from its config.json."""
    try:
        config = json.loads(read_small(folder / "config.json", 1 << 20))
    except (OSError, ValueError):
        return None
    width = config.get("projection_dim") if isinstance(config, dict) else None
    return width if isinstance(width, int) and not isinstance(width, bool) else None


def scorer_problems(request: ScoreRequest, download: bool) -> list[str]:
    """What would stop this job's scores, found before any merge: the libraries, the CLIP model's files and
    the aesthetic head (loaded: it is small; its width against CLIP's embedding). `download`: fetch
    everything the scoring reads (false for a dry run: the configs only)."""
    from .. import extras

    if missing := extras.missing("preview.score"):
        return [missing]
    try:
        width = _clip_width(clip_folder(request.clip, download))
        if "aesthetic" in request.scores:
            head = _load_head(aesthetic_file(request.aesthetic), request.aesthetic)
            if width is not None and head[0].in_features != width:
                raise UsageError(
                    f"preview.scorers.aesthetic={request.aesthetic} reads image embeddings {head[0].in_features} wide, "
                    f"preview.scorers.clip={request.clip} makes them {width} wide: give the CLIP model the head was trained on (LAION's: openai/clip-vit-large-patch14)"
                )
    except FluxRecipeError as e:
        return [str(e)]
    return []


def _load_head(file: Path, spec: str):
    """LAION's aesthetic MLP with the weights of `file` (a state dict: layers.N.weight/bias)."""
    import torch

    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(file)
        else:
            state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - pickle's and safetensors' errors: the file is not a state dict
        raise UsageError(f"preview.scorers.aesthetic={spec}: cannot be read as a state dict ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict):
        raise UsageError(f"preview.scorers.aesthetic={spec}: not a state dict")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    expected = [f"layers.{i}.{p}" for i in AESTHETIC_LAYERS for p in ("weight", "bias")]
    first = state.get("layers.0.weight")
    if sorted(state) != sorted(expected) or first is None or first.dim() != 2:
        raise UsageError(f"preview.scorers.aesthetic={spec}: not LAION's improved aesthetic predictor (it holds {', '.join(sorted(state)[:6])}, not layers.0/2/4/6/7 .weight and .bias)")
    head = aesthetic_head(first.shape[1])
    try:
        head.load_state_dict(state)
    except RuntimeError as e:
        raise UsageError(f"preview.scorers.aesthetic={spec}: its layers are not LAION's widths {AESTHETIC_WIDTHS}: {str(e).splitlines()[-1].strip()}") from None
    return head["layers"].eval()


def aesthetic_head(width: int):
    """LAION's improved-aesthetic MLP over a CLIP image embedding `width` wide (768 for ViT-L/14), as its
    repository defines it (its nn.Sequential `layers`, Dropout included, so that the state dict's names
    match: layers.0.weight, ...)."""
    from torch import nn

    widths = (width, *AESTHETIC_WIDTHS)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths, widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < 3:
            layers.append(nn.Dropout((0.2, 0.2, 0.1)[i]))
    return nn.ModuleDict({"layers": nn.Sequential(*layers)})


# --- scoring ---------------------------------------------------------------------------------------------


class Scorer:
    """The scoring models of one request on one device: loaded once per process (`scorer()`)."""

    def __init__(self, request: ScoreRequest, device: str) -> None:
        import torch
        from transformers import CLIPModel, CLIPProcessor

        from .previews import _quiet

        folder = clip_folder(request.clip)
        with _quiet():
            self.clip = CLIPModel.from_pretrained(folder, torch_dtype=torch.float32).to(device).eval()
            self.processor = CLIPProcessor.from_pretrained(folder)
        self.head = _load_head(aesthetic_file(request.aesthetic), request.aesthetic).to(device) if "aesthetic" in request.scores else None
        self.scores, self.device = request.scores, device

    def __call__(self, images: list, prompts: list[str]) -> list[dict[str, float]]:
        """Each image's scores (image i drawn for prompts[i])."""
        import torch
        from torch.nn.functional import normalize

        with torch.inference_mode():
            pixels = self.processor(images=images, return_tensors="pt")["pixel_values"].to(self.device)
            image = normalize(_features(self.clip.get_image_features(pixel_values=pixels)).float(), dim=-1)
            out: list[dict[str, float]] = [{} for _ in images]
            if "clip" in self.scores:
                text = self.processor(text=prompts, return_tensors="pt", padding=True, truncation=True)
                text = normalize(_features(self.clip.get_text_features(**{k: v.to(self.device) for k, v in text.items()})).float(), dim=-1)
                for row, value in zip(out, (100 * (image * text).sum(-1)).clamp(min=0).tolist()):
                    row["clip"] = value
            if self.head is not None:
                for row, value in zip(out, self.head(image).squeeze(-1).tolist()):
                    row["aesthetic"] = value
        return [{name: row[name] for name in self.scores} for row in out]


def _features(output):
    """transformers 5 returns the projected features in a model output (pooler_output), 4 a tensor."""
    return output if hasattr(output, "dim") else output.pooler_output


_scorers: dict[tuple, Scorer] = {}


def scorer(request: ScoreRequest, device: str) -> Scorer:
    key = (request.scores, request.clip, request.aesthetic, device)
    if key not in _scorers:
        _scorers.clear()  # one set of models in memory at a time
        _scorers[key] = Scorer(request, device)
    return _scorers[key]


def score_previews(previews: Path, request: ScoreRequest, device: str) -> list[dict[str, Any]]:
    """Every image of a previews folder scored: [{prompt (its index), seed, clip, ...}], in the folder's order."""
    from PIL import Image

    settings, images = read_previews(previews)
    prompts = list(settings.get("prompts") or [])
    opened = []
    for image in images:
        with Image.open(image["file"]) as picture:
            opened.append(picture.convert("RGB"))
    values = scorer(request, device)(opened, [image["prompt"] for image in images])
    return [{"prompt": prompts.index(image["prompt"]), "seed": image["seed"], **v} for image, v in zip(images, values)]


def job_scores(image_scores: list[dict[str, Any]], request: ScoreRequest, parents: list[list[dict[str, Any]]] | None = None) -> dict[str, Any]:
    """A job's scores.json: its images' scores, their means, the objective, and the parents comparison (an
    image is better than the parents when each of its scores beats each parent's on the same prompt and seed)."""
    means = {name: sum(s[name] for s in image_scores) / len(image_scores) for name in request.scores}
    data: dict[str, Any] = {"scores": means, "image_scores": image_scores}
    if request.objective is not None:
        data["objective"] = request.objective.value(means)
    if parents:
        by_image = [{(s["prompt"], s["seed"]): s for s in parent} for parent in parents]
        better = sum(
            all(all(s[name] > parent[(s["prompt"], s["seed"])][name] for name in request.scores) for parent in by_image)
            for s in image_scores
        )
        data["parents"] = {"better": better, "of": len(image_scores)}
    return data


def write_scores(folder: Path, data: dict[str, Any]) -> None:
    replace_json(folder / SCORES_JSON, data)
    shown = ", ".join(f"{name} {value:.4g}" for name, value in data["scores"].items())
    parents = data.get("parents")
    log.info(f"scores: {shown}" + (f"; better than the parents on {parents['better']} of {parents['of']} images" if parents else ""))


def reference_name(source: str, settings: Any, request: ScoreRequest) -> str:
    """The folder of a parent's reference previews: its name, and a digest of what it was rendered and scored
    with (jobs of a sweep that differ in a preview setting compare with their own)."""
    what = json.dumps([asdict(settings), request.scores, request.models], sort_keys=True, default=str)
    return f"{source}-{hashlib.sha256(what.encode()).hexdigest()[:8]}"


def read_scores(folder: Path) -> dict[str, Any] | None:
    """A job's scores.json, or None where it has none or it cannot be read."""
    path = folder / SCORES_JSON
    try:
        data = json.loads(read_small(path, 4 << 20)) if path.is_file() else None
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
