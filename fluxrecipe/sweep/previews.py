"""Previews: sample images of a merged model, the way people choose between merges.

`preview=true` renders a fixed set of prompts with fixed seeds through the diffusers pipeline of the merged
model's family (families/: its Preview names the pipeline class, its default repo and defaults): the merged
transformer, loaded from the job's output folder or made of a merge's tensors in memory (keep_weights=false:
the candidate is never written), with the text encoders, tokenizers, VAE and scheduler of
`preview.pipeline` (a hub repo or a local pipeline folder; by default the family's). The settings that are
not given follow the merged model, as its family says: FLUX.1: few steps and no guidance for a model without
a guidance embedder (schnell-like), guidance 3.5 for one with (`guidance_embeds: true`); where the models of
these shapes differ only in their pipeline's settings, as the pipeline given says (FLUX.2 klein: a pipeline whose
model_index.json has `is_distilled: false` renders as a base model, with more steps and classifier-free guidance).

The prompts are encoded once per process, by the pipeline's own `encode_prompt`, and the text encoders let go
before the transformer is loaded: the embeddings do not depend on the transformer, so a sweep run by the basic
launcher encodes them once, and the GPU never holds the text encoders and the transformer at once. The rest of
the pipeline (VAE, scheduler) is loaded once per process as well; each job puts its transformer into it and
takes it out again, so a process holds one transformer at a time. Every image is drawn from a CPU generator seeded with its
seed, so the same settings give the same pixels wherever the latents are then denoised.

Each job writes `previews/`: one PNG per prompt and seed, and `previews.json` (the settings, and the prompt,
seed and file of every image), from which the sweep's grid is built (grid.py). The folder appears whole or not
at all.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import math
import os
import re
import shutil
import time
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .. import extras
from ..errors import FluxRecipeError, OutputError, UsageError
from ..families import Family, Preview
from ..files import os_error_text, read_small
from ..plan import human_bytes
from ..writer import replace_json

log = logging.getLogger("fluxrecipe")

PREVIEW_DIR = "previews"
PREVIEWS_JSON = "previews.json"
OFFLOAD = ("none", "model", "sequential")  # diffusers' enable_model_cpu_offload / enable_sequential_cpu_offload
MAX_IMAGES = 256  # per job: prompts x seeds
MAX_STEPS = 500
MAX_SIDE = 4096
TEXT_COMPONENTS = ("text_encoder", "tokenizer")  # a pipeline component whose name starts so encodes prompts
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?")


@dataclass(frozen=True)
class PreviewRequest:
    """The previews a job asks for, checked: `steps` and `guidance` None follow the merged model
    (for_model), which is known only once the job is planned."""

    pipeline: str | None  # None: the family's
    prompts: tuple[str, ...]
    seeds: tuple[int, ...]
    steps: int | None
    guidance: float | None
    height: int
    width: int
    offload: str
    device: str  # where the merge runs, and so the previews

    def __post_init__(self) -> None:
        """Every setting of its kind and range, whoever builds the request (the command line, or a test)."""
        if self.pipeline is not None and (not isinstance(self.pipeline, str) or not self.pipeline.strip()):
            raise UsageError(f"preview.pipeline={self.pipeline}: give a hub repo id (org/name) or a local pipeline folder")
        if not self.prompts or not all(isinstance(p, str) and p.strip() for p in self.prompts):
            raise UsageError(f"preview.prompts={_show(list(self.prompts))}: give a list of non-empty prompts, e.g. preview.prompts='[a red fox in snow, a city at night]'")
        if not self.seeds or not all(_whole(s) and 0 <= s < 2**63 for s in self.seeds):
            raise UsageError(f"preview.seeds={_show(list(self.seeds))}: give a list of whole numbers from 0, e.g. preview.seeds='[0,1,2]'")
        for name, values in (("prompts", self.prompts), ("seeds", self.seeds)):
            twice = sorted({str(v) for v in values if values.count(v) > 1})
            if twice:
                raise UsageError(f"preview.{name} lists {', '.join(repr(t) for t in twice)} more than once")
        if len(self.prompts) * len(self.seeds) > MAX_IMAGES:
            raise UsageError(f"preview: {len(self.prompts)} prompts x {len(self.seeds)} seeds = {len(self.prompts) * len(self.seeds)} images per job; at most {MAX_IMAGES}")
        if self.steps is not None and (not _whole(self.steps) or not 1 <= self.steps <= MAX_STEPS):
            raise UsageError(f"preview.steps={self.steps}: a whole number of denoising steps from 1 to {MAX_STEPS} (null: the model family's default)")
        guidance = self.guidance
        if guidance is not None and (isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not math.isfinite(guidance) or guidance < 0):
            raise UsageError(f"preview.guidance={guidance}: a number from 0 (null: the model family's default)")
        for side in ("height", "width"):
            value = getattr(self, side)
            if not _whole(value) or not 16 <= value <= MAX_SIDE or value % 16:
                raise UsageError(f"preview.{side}={value}: a multiple of 16 from 16 to {MAX_SIDE} (FLUX works in 16-pixel patches)")
        if self.offload not in OFFLOAD:
            raise UsageError(f"preview.offload={self.offload}: choose none, model (whole models move to the GPU in turn) or sequential (layer by layer: least GPU memory, slowest)")
        if self.offload != "none" and not self.device.startswith("cuda"):
            raise UsageError(f"preview.offload={self.offload} offloads to the CPU from a GPU: use it with device=cuda")

    def for_model(self, family: Family, config: dict[str, Any]) -> PreviewSettings:
        """What the job renders for a merged model of `family` with this config: the family's pipeline and
        defaults (FLUX.1: few steps and no guidance without a guidance embedder, guidance 3.5 with one), or,
        where preview.pipeline's model_index.json says it is made for another model of these shapes, that
        model's (FLUX.2 klein's base models). A guidance for a model that takes none would change nothing, and
        is refused; so is a family whose pipeline previews cannot drive."""
        kind = family.preview(config)
        pipeline = kind.repo if self.pipeline is None else self.pipeline.strip()
        if self.pipeline is not None:
            kind = pipeline_kind(kind, pipeline)
        if message := kind.not_offered(family.name):
            raise UsageError(message)
        if kind.guidance is None and self.guidance is not None:
            others = [s for s in kind.by_pipeline if s.preview.guidance is not None]  # pipelines of other models of these shapes
            other = f" with the pipeline {pipeline}" if others else ""
            other += "".join(f"; a pipeline whose model_index.json has {s.key}: {json.dumps(s.value)} (e.g. {s.preview.repo}) takes one, as preview.pipeline" for s in others)
            raise UsageError(
                f"preview.guidance={self.guidance} changes nothing: the merged model takes no guidance ({family.name}, {family.summary(config)}){other}; "
                "leave preview.guidance out"
            )
        guidance = None if kind.guidance is None else float(kind.guidance if self.guidance is None else self.guidance)
        steps = kind.steps if self.steps is None else self.steps
        return PreviewSettings(pipeline, tuple(p.strip() for p in self.prompts), self.seeds, steps, guidance, self.height, self.width, self.offload, family.class_name, kind)


@dataclass(frozen=True)
class PreviewSettings:
    """What one job renders: plain data, written to previews.json beside the images."""

    pipeline: str
    prompts: tuple[str, ...]
    seeds: tuple[int, ...]
    steps: int
    guidance: float | None  # None: the model takes no guidance, so there is nothing to set
    height: int
    width: int
    offload: str
    model_class: str  # the merged transformer's diffusers class
    kind: Preview  # the family's pipeline class, how it encodes prompts, what must fit

    def images(self) -> list[tuple[int, str, int, str]]:
        """(prompt index, prompt, seed, file name) of every image, prompt by prompt, seed by seed."""
        return [(i, prompt, seed, f"p{i}-s{seed}.png") for i, prompt in enumerate(self.prompts) for seed in self.seeds]

    def describe(self) -> str:
        guidance = f"guidance {self.guidance}" if self.guidance is not None else "no guidance (the model takes none)"
        offload = f", offload {self.offload}" if self.offload != "none" else ""
        return (
            f"{len(self.prompts)} prompt(s) x {len(self.seeds)} seed(s), {self.steps} steps, {guidance}, "
            f"{self.width}x{self.height}{offload}, {self.kind.pipeline} {self.pipeline}"
        )

    @property
    def disk_bytes(self) -> int:
        """An upper bound of the PNGs' size (uncompressed RGB), for the sweep's disk check."""
        return len(self.images()) * (self.width * self.height * 3 + 4096)


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _show(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, default=str)[:200]


# --- the pipeline: where it is, and whether it fits the merged model -------------------------------------


def locate(spec: str) -> tuple[str, str | None, bool]:
    """(local folder or repo id, revision, is_local) of `preview.pipeline`."""
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "model_index.json").is_file():
            raise UsageError(f"preview.pipeline={spec}: not a diffusers pipeline folder (it has no model_index.json)")
        return str(path.resolve()), None, True
    if spec.startswith(("/", ".", "~")) or not HUB_ID.fullmatch(spec):
        raise UsageError(f"preview.pipeline={spec}: no such folder, and not a hub repo id (org/name or org/name@revision)")
    repo, _, revision = spec.partition("@")
    return repo, revision or None, False


def recorded_pipeline(spec: str, folder: Path) -> str:
    """The pipeline as previews.json names it: a hub repo by its id, a local folder by its path relative to
    the previews folder (a file of the output names no absolute local path)."""
    location, revision, local = locate(spec)
    return os.path.relpath(location, folder) if local else spec


def pipeline_problems(settings: PreviewSettings, config: dict[str, Any], fetch: bool) -> list[str]:
    """Problems that would stop this job's previews, found before any merge: the libraries, the pipeline (its
    files, and whether its text encoders and VAE fit the merged model's config) and, unless `fetch` is false
    (a dry run), everything the rendering will read from the hub, downloaded now, once for the whole sweep."""
    missing = extras.missing("preview=true")
    if missing:
        return [missing]
    try:
        location, revision, local = locate(settings.pipeline)
        components = ("model_index", *dict.fromkeys(f.component for f in settings.kind.fits))
        configs = {name: _component_config(location, revision, local, name) for name in components}
        problems = _fit(settings.pipeline, settings.kind, configs, config)
        if fetch and not local and not problems:
            pipeline_folder(settings)
    except FluxRecipeError as e:
        return [str(e)]
    return problems


@functools.lru_cache(maxsize=64)
def pipeline_kind(kind: Preview, spec: str) -> Preview:
    """How to render with the pipeline `spec`: `kind`, or the Preview of one of its `by_pipeline` settings that
    the pipeline's model_index.json holds (a setting it lacks has the pipeline class's default, as diffusers
    builds it). Read once per process: a sweep's jobs share their pipeline."""
    if not kind.by_pipeline:
        return kind
    location, revision, local = locate(spec)
    index = _component_config(location, revision, local, "model_index")
    for setting in kind.by_pipeline:
        value = index[setting.key] if setting.key in index else _setting_default(kind.pipeline, setting.key)
        if value == setting.value:
            return setting.preview
    return kind


def _setting_default(pipeline_class: str, key: str) -> Any:
    """A setting's default in a diffusers pipeline class's constructor (None: it has no such setting)."""
    if missing := extras.missing("preview=true"):
        raise UsageError(missing)
    parameter = _constructor(pipeline_class).get(key)
    return None if parameter is None or parameter.default is parameter.empty else parameter.default


def _constructor(pipeline_class: str) -> Mapping[str, inspect.Parameter]:
    """The parameters of a diffusers pipeline class's constructor: its components and its settings."""
    import diffusers

    return inspect.signature(getattr(diffusers, pipeline_class).__init__).parameters


def _fit(spec: str, kind: Preview, configs: dict[str, dict], config: dict[str, Any]) -> list[str]:
    index = configs["model_index"]
    needed = needed_components(kind.pipeline)
    lacking = [name for name in needed if not (isinstance(index.get(name), list) and index[name][0])]
    if lacking:
        return [f"preview.pipeline={spec} has no {', '.join(lacking)}: give a {kind.pipeline} (e.g. {kind.repo})"]
    problems = [f"preview.pipeline={spec}: {problem}" for name in needed if (problem := _unloadable(name, index[name]))]
    for fit in kind.fits:
        value = configs[fit.component]
        for part in fit.key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if not (isinstance(value, int) and not isinstance(value, bool) and value * fit.factor == config.get(fit.model_key)):
            times = f" x {fit.factor}" if fit.factor != 1 else ""
            problems.append(
                f"preview.pipeline={spec}: {fit.what} are {value}{times} wide ({fit.component}/config.json {fit.key}), "
                f"the merged transformer takes {fit.model_key}={config.get(fit.model_key)}: give the pipeline of this model's family ({kind.pipeline}, e.g. {kind.repo})"
            )
    return problems


def _unloadable(name: str, entry: list) -> str:
    """Why a component that model_index.json names (library, class) cannot be loaded here ('' when it can):
    transformers offers a class whose backend is not installed as a placeholder that fails only when used (FLUX.2
    dev's PixtralProcessor without torchvision), which would stop the previews after the merge."""
    library, class_name = (entry + [None, None])[:2]
    if library != "transformers" or not isinstance(class_name, str):
        return ""
    import transformers
    from transformers.utils.import_utils import DummyObject

    cls = getattr(transformers, class_name, None)
    if not isinstance(cls, DummyObject):
        return ""
    backends = " and ".join(getattr(cls, "_backends", ())) or "a library that is not installed"
    return f"its {name} is transformers' {class_name}, which needs {backends} (not installed): install it (the build that matches your torch)"


def needed_components(pipeline_class: str) -> list[str]:
    """The components a diffusers pipeline class cannot be built without, but the transformer (previews put
    the merge there): its constructor's arguments without a default (as diffusers tells modules from settings
    such as Flux2KleinPipeline's `is_distilled`, which model_index.json holds as a value), less its optional
    components."""
    import diffusers

    optional = set(getattr(getattr(diffusers, pipeline_class), "_optional_components", ()))
    return [p.name for p in _constructor(pipeline_class).values() if p.default is p.empty and p.name not in ("self", "transformer", *optional)]


def _text_components(pipeline_class: str) -> list[str]:
    return [n for n in needed_components(pipeline_class) if n.startswith(TEXT_COMPONENTS)]


def _component_config(location: str, revision: str | None, local: bool, name: str) -> dict:
    from ..hub import fetch_file

    filename = "model_index.json" if name == "model_index" else f"{name}/config.json"
    if local:
        path = Path(location) / filename
    else:
        hint = f"hf download {location}" + (f" --revision {revision}" if revision else "") + " --include model_index.json --include '*/*' --exclude 'transformer/*'"
        path, _ = fetch_file(f"preview.pipeline={location}", location, filename, revision, hint, "give a local pipeline folder")
    try:
        value = json.loads(read_small(path, 1 << 20))
    except (OSError, ValueError, RecursionError):
        value = None
    if not isinstance(value, dict):
        raise UsageError(f"preview.pipeline={location}: {filename} is missing or not a JSON object")
    return value


def pipeline_folder(settings: PreviewSettings) -> Path:
    """The local folder of the preview pipeline: a local one as it is; from the hub, its files but the
    transformer, downloaded into the cache (the cache alone where the hub cannot be reached)."""
    from ..hub import hub_access

    location, revision, local = locate(settings.pipeline)
    if local:
        return Path(location)
    where = f"preview.pipeline={settings.pipeline}"
    hint = f"hf download {location}" + (f" --revision {revision}" if revision else "") + " --exclude 'transformer/*'"
    try:
        with hub_access(where, location, lambda: hint, "give a local pipeline folder") as local_only, _quiet():
            import diffusers

            pipeline_class = getattr(diffusers, settings.kind.pipeline)
            return Path(pipeline_class.download(location, revision=revision, transformer=None, local_files_only=local_only))
    except FluxRecipeError:
        raise
    except Exception as e:  # noqa: BLE001 - diffusers' own errors (a file it cannot find, ...): the job cannot render
        raise UsageError(f"{where}: cannot download its text encoders, VAE and scheduler: {type(e).__name__}: {e}") from None


# --- rendering ---------------------------------------------------------------------------------------------

_embeddings: dict[tuple, list[dict[str, Any]]] = {}  # (pipeline, prompts, device, ...) -> per prompt the call's text inputs
_pipelines: dict[tuple, Any] = {}  # (pipeline, class, device, offload, dtype) -> the pipeline without text encoders and transformer


@dataclass(frozen=True)
class InMemoryModel:
    """A merged transformer that was never written: its tensors by diffusers parameter name (api.merge_in_memory)
    and its config. The renderer takes the tensors out of the dict, so the transformer is their only holder."""

    tensors: dict[str, Any]
    config: dict[str, Any]


def prepare(settings: PreviewSettings, device: str) -> None:
    """What rendering needs besides the transformer, made before a merge in memory (so the text encoders and the
    merged tensors are never in memory together) and kept for the process's later jobs."""
    import torch

    location = pipeline_folder(settings)
    _prompt_embeddings(settings, location, device, torch.bfloat16)
    _pipeline(settings, location, device, torch.bfloat16)


def render(model: Path | InMemoryModel, settings: PreviewSettings, device: str, folder: Path) -> Path:
    """Render every image of `settings` into `folder`, whole or not at all, with the merged transformer: loaded
    from the folder `model`, or made of a merge's tensors in memory. Returns the folder."""
    import torch

    if folder.exists():
        raise OutputError(f"{folder} already exists: previews are written once per job folder")
    partial = folder.with_name(f".{folder.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    started = time.monotonic()
    location = pipeline_folder(settings)  # local: loading it never asks the hub again
    dtype = torch.bfloat16
    embeddings = _prompt_embeddings(settings, location, device, dtype)
    pipe = _pipeline(settings, location, device, dtype)
    try:
        pipe.transformer = _transformer(model, settings, dtype)
        _place(pipe, device, settings.offload)
        partial.mkdir(parents=True)
        images = []
        for index, prompt, seed, name in settings.images():
            with torch.inference_mode():
                image = pipe(
                    **{name: tensor.to(device) for name, tensor in embeddings[index].items()},
                    num_inference_steps=settings.steps,
                    guidance_scale=settings.guidance if settings.guidance is not None else 0.0,
                    height=settings.height,
                    width=settings.width,
                    generator=torch.Generator("cpu").manual_seed(seed),
                    max_sequence_length=settings.kind.max_sequence_length,
                ).images[0]
            image.save(partial / name)
            images.append({"prompt": prompt, "seed": seed, "file": name})
        seconds = round(time.monotonic() - started, 3)
        recorded = {**asdict(settings), "pipeline": recorded_pipeline(settings.pipeline, folder)}
        replace_json(partial / PREVIEWS_JSON, {"settings": recorded, "device": device, "seconds": seconds, "images": images})
        partial.rename(folder)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    finally:
        pipe.remove_all_hooks()  # the offload hooks hold the transformer: the pipeline kept for the next job holds none
        pipe.transformer = None
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    size = sum(f.stat().st_size for f in folder.iterdir())
    log.info(f"previews: {len(images)} image(s) in {folder} ({human_bytes(size)}, {seconds:.1f} s)")
    return folder


def _transformer(model: Path | InMemoryModel, settings: PreviewSettings, dtype):
    """The merged transformer in `dtype`, as diffusers' from_pretrained(torch_dtype=dtype) makes it of the written
    folder: from a merge in memory, its tensors converted as that loader converts them (none for a bf16 merge:
    the tensors the merge filled are the parameters), the model built under that default dtype, in eval mode."""
    import torch

    with _quiet():
        import diffusers

        model_class = getattr(diffusers, settings.model_class)
        if isinstance(model, Path):
            return model_class.from_pretrained(model, torch_dtype=dtype)
        from accelerate import init_empty_weights

    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with init_empty_weights():
            transformer = model_class.from_config(model.config)
    finally:
        torch.set_default_dtype(default)
    state = {key: model.tensors.pop(key).to(dtype) for key in list(model.tensors)}  # a converted tensor's original goes at once
    transformer.load_state_dict(state, strict=True, assign=True)
    return transformer.eval()


def _pipeline(settings: PreviewSettings, location: Path, device: str, dtype):
    """The preview pipeline but its text encoders (the prompts are encoded once: _prompt_embeddings) and its
    transformer (each job's): the VAE and scheduler, loaded once per process and pipeline."""
    with _quiet():
        import diffusers

    key = (location, settings.kind.pipeline, device, settings.offload, str(dtype))
    if key not in _pipelines:
        _pipelines.clear()  # one at a time: another pipeline's VAE need not stay in memory
        with _quiet():
            pipe = getattr(diffusers, settings.kind.pipeline).from_pretrained(
                location, transformer=None, torch_dtype=dtype, **dict.fromkeys(_text_components(settings.kind.pipeline))
            )
        pipe.set_progress_bar_config(disable=True)
        _pipelines[key] = pipe
    return _pipelines[key]


def _prompt_embeddings(settings: PreviewSettings, location: Path, device: str, dtype) -> list[dict[str, Any]]:
    """Every prompt's text inputs of the pipeline's call (on the CPU), by its own encode_prompt, encoded once
    per process and pipeline."""
    import torch

    with _quiet():
        import diffusers

    kind = settings.kind
    key = (location, kind, settings.prompts, device, str(dtype))
    if key not in _embeddings:
        with _quiet():
            text = getattr(diffusers, kind.pipeline).from_pretrained(location, transformer=None, vae=None, torch_dtype=dtype)
        _place(text, device, settings.offload)
        def encode(prompt: str, names: tuple[str | None, ...]) -> dict[str, Any]:
            outputs = text.encode_prompt(prompt, device=torch.device(device), max_sequence_length=kind.max_sequence_length, **dict(kind.encode_options))
            return {name: out.cpu() for name, out in zip(names, outputs, strict=True) if name is not None}

        with torch.inference_mode():
            negative = encode("", kind.negative_inputs) if kind.negative_inputs else {}
            encoded = [{**encode(prompt, kind.text_inputs), **negative} for prompt in settings.prompts]
        _embeddings.clear()  # one set at a time: another sweep's prompts need not stay in memory
        _embeddings[key] = encoded
        del text
    return _embeddings[key]


def _place(pipe, device: str, offload: str) -> None:
    if offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    else:
        pipe.to(device)


class _quiet:
    """diffusers' and transformers' loading bars and notices (deprecations, optional backends) stay out of
    the run's output; their errors still raise."""

    def __enter__(self):
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        self._loggers = (diffusers_logging, transformers_logging)
        self._levels = [lib.get_verbosity() for lib in self._loggers]
        for lib in self._loggers:
            lib.set_verbosity_error()
            lib.disable_progress_bar()
        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        warnings.simplefilter("ignore", FutureWarning)
        return self

    def __exit__(self, *exc) -> None:
        self._warnings.__exit__(*exc)
        for lib, level in zip(self._loggers, self._levels):
            lib.set_verbosity(level)
            lib.enable_progress_bar()


# --- reading previews back -------------------------------------------------------------------------------


def read_previews(folder: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The settings and the images a job's previews.json lists (each {prompt, seed, file (a Path)}); nothing
    when there is no such file. Raises ValueError for a damaged one (the summary reports it on the job's row)."""
    path = folder / PREVIEWS_JSON
    if not path.exists():
        return {}, []
    try:
        data = json.loads(read_small(path, 4 << 20))
    except OSError as e:
        raise ValueError(os_error_text(e)) from None
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list):
        raise ValueError(f"{path} has no list of images")
    out = []
    for image in images:
        if not (isinstance(image, dict) and isinstance(image.get("prompt"), str) and _whole(image.get("seed")) and isinstance(image.get("file"), str)):
            raise ValueError(f"{path}: an image entry is not {{prompt, seed, file}}: {_show(image)}")
        out.append({"prompt": image["prompt"], "seed": image["seed"], "file": folder / Path(image["file"]).name})  # never a path elsewhere
    settings = data.get("settings")
    return (settings if isinstance(settings, dict) else {}), out
