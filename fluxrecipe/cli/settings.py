"""Hydra's composed config, read once into typed settings (sweep.settings.JobSettings): the only place that
reads fluxrecipe's options from it. Everything below gets the typed settings.

Paths: a relative path given on the command line (recipe=PATH.yaml, recipe.sources.NAME=, recipe.loras.NAME=,
recipe.loras.NAME.path=, output=, preview.pipeline=) is found from the working folder, never beside the recipe
file; a relative path written in a recipe file is found from that recipe file's folder (sources.py).

Every option is checked here: its kind (a yes-or-no option is true or false only: Hydra hands `overwrite=no`
over as the text 'no'), its range, that it exists and was not deleted, and that it changes something: a
setting the run would ignore (lora_rank without a LoRA format, shard_size or diagnostics with a one-file format, a preview
setting without preview=true, a recipe's format beside format=) is refused in one line that says why and
what would work, not silently dropped.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, ListConfig, OmegaConf

from .. import api
from ..catalog import recipe_file, recipe_files, recipe_name
from ..errors import UsageError
from .. import formats
from ..loras import LORA_FORMATS
from ..options import ENGINE_ONLY, Options, refuse_unused
from ..recipe import FORMATS, LoraSpec, Recipe, SourceSpec, load_recipe
from ..sweep.previews import PreviewRequest
from ..sweep.scores import Objective, ScoreRequest
from ..sweep.settings import JobSettings, OutputSettings
from .options import BY_NAME, defaults, deleted_option, groups, unknown_option

DEVICE = re.compile(r"cpu|cuda(:\d+)?")
# a recipe's source or LoRA named by a key the command line sets (recipe.sources.NAME, recipe.loras.NAME.path)
RECIPE_PATH_KEY = re.compile(r"recipe\.(?P<kind>sources|loras)(\.(?P<name>[^.]+))?(\..*)?")
_MISSING = object()


def read_job(cfg: DictConfig, multirun: bool = False) -> JobSettings:
    """The job `cfg` asks for, checked and typed; raises one UsageError or RecipeError naming the fault.
    In a multirun, `output` is not read: every job writes into its own folder (cli/preflight.py refuses it)."""
    options = options_of(cfg)  # first: a mistyped option (+dryrun=true) must not start a merge
    _refuse_sweep_without_multirun(cfg)
    given = given_keys(cfg)
    recipe = recipe_of(cfg, given)
    output = output_of(cfg, recipe, given, multirun)
    previews = previews_of(cfg, given)
    scoring = scoring_of(cfg, given, multirun) if previews is not None else None
    return JobSettings(
        recipe=recipe,
        options=options,
        output=output,
        previews=previews,
        scoring=scoring,
        keep_weights=boolean(cfg.keep_weights, "keep_weights"),
        dry_run=dry_run_of(cfg),
    )


def hydra_value(cfg: DictConfig, key: str) -> Any:
    """A value of Hydra's own config: in the composed config (a pre-flight), else where a running job has it."""
    if "hydra" in cfg:
        return OmegaConf.select(cfg, f"hydra.{key}")
    return OmegaConf.select(HydraConfig.get(), key) if HydraConfig.initialized() else None


def given_keys(cfg: DictConfig) -> set[str]:
    """The keys the user set (on the command line, or in a sweep): `recipe.alpha`, `lora_rank`, `preview.steps`."""
    overrides = hydra_value(cfg, "overrides.task") or []
    return {str(o).partition("=")[0].lstrip("+~") for o in overrides}


def boolean(value: object, option: str) -> bool:
    """A yes-or-no option, as Hydra gives it: true or false only. (`overwrite=no` reaches the program as the
    text 'no', which Python's bool() calls true.)"""
    if not isinstance(value, bool):
        raise UsageError(f"{option}={value}: choose true or false")
    return value


def dry_run_of(cfg: DictConfig) -> bool:
    return boolean(cfg.get("dry_run", False), "dry_run")


def show_traceback(cfg: DictConfig) -> bool:
    return cfg.get("traceback") is True or os.environ.get("HYDRA_FULL_ERROR") == "1"


def check_option_names(cfg: DictConfig) -> None:
    """Every option (and setting of one) is one fluxrecipe has, and none was deleted (`~threads`)."""
    names = [str(name) for name in cfg if name != "hydra"]
    names += [f"{name}.{key}" for name in groups() if isinstance(cfg.get(name), DictConfig) for key in cfg[name]]
    holders = [name for name in names if "." in name and isinstance(OmegaConf.select(cfg, name), DictConfig)]  # preview.scorers
    names += [f"{name}.{key}" for name in holders for key in OmegaConf.select(cfg, name)]
    for name in names:
        if message := unknown_option(name):
            raise UsageError(message)
    for name, default in defaults().items():
        for key, value in [(f"{name}.{k}", v) for k, v in default.items()] if isinstance(default, dict) else [(name, default)]:
            if OmegaConf.select(cfg, key, default=_MISSING) is _MISSING:
                raise UsageError(deleted_option(key, value))


def options_of(cfg: DictConfig) -> Options:
    """The engine's options (cfg's kinds checked here, where the command line's words for them are known)."""
    check_option_names(cfg)
    if cfg.nonfinite not in ("error", "warn"):
        raise UsageError(f"nonfinite={cfg.nonfinite}: choose error or warn")
    if not DEVICE.fullmatch(str(cfg.device)):
        raise UsageError(f"device={str(cfg.device)!r}: choose cpu, cuda or cuda:N")  # as execute.check_device says it, before torch
    for key in ("threads", "chunk_elements"):
        if not isinstance(cfg[key], int) or isinstance(cfg[key], bool) or cfg[key] < (0 if key == "threads" else 1):
            raise UsageError(f"{key}={cfg[key]}: must be a whole number" + (" (0: automatic)" if key == "threads" else " above 0"))
    dry_run_of(cfg)
    boolean(cfg.traceback, "traceback")
    return Options(
        device=str(cfg.device),
        threads=cfg.threads,
        chunk_elements=cfg.chunk_elements,
        in_flight=size_of(cfg.in_flight, "in_flight"),
        nonfinite=cfg.nonfinite,
        diagnostics=boolean(cfg.diagnostics, "diagnostics"),
        progress=boolean(cfg.progress, "progress"),
        overwrite=boolean(cfg.overwrite, "overwrite"),
    )


def size_of(text: object, option: str) -> int:
    try:
        return api.parse_size(text)
    except UsageError as e:
        raise UsageError(f"{option}={e}") from None


def _refuse_sweep_without_multirun(cfg: DictConfig) -> None:
    """A sweep file (sweep=NAME) sets Hydra's sweeper parameters, which only a multirun (-m) runs: without
    -m, Hydra would quietly run one merge with the recipe's own values."""
    params = hydra_value(cfg, "sweeper.params")
    if params and hydra_value(cfg, "mode") != RunMode.MULTIRUN:
        sweep = hydra_value(cfg, "runtime.choices.sweep")
        swept = "; ".join(f"{k}: {v}" for k, v in params.items())
        raise UsageError(f"{f'sweep={sweep}' if sweep else 'the config'} sets a sweep ({swept}), which runs only as a multirun: add -m")


def recipe_of(cfg: DictConfig, given: set[str] | None = None) -> Recipe:
    """The recipe the config chose, loaded and checked; a source or LoRA the command line names (`given`,
    the keys set there) is found from the working folder, not beside the recipe file."""
    if cfg.get("recipe") is None:
        names = ", ".join(sorted(recipe_files()))
        raise UsageError(f"no recipe chosen: run `python -m fluxrecipe recipe=NAME` (recipes: {names})")
    choice = hydra_value(cfg, "runtime.choices.recipe") or "recipe"
    file = recipe_file(choice)
    recipe = load_recipe(cfg.recipe, recipe_name(choice), str(file) if file else None)
    named = [m for key in (given_keys(cfg) if given is None else given) if (m := RECIPE_PATH_KEY.fullmatch(key))]
    if not named:
        return recipe
    kinds = {m["kind"] for m in named if m["name"] is None}  # recipe.sources={...}: every one of them
    names = {(m["kind"], m["name"]) for m in named}
    _refuse_unread_sources(recipe, [n for n in recipe.sources if "sources" in kinds or ("sources", n) in names])
    sources = {n: _from_working_folder(s) if "sources" in kinds or ("sources", n) in names else s for n, s in recipe.sources.items()}
    loras = {n: _from_working_folder(s) if "loras" in kinds or ("loras", n) in names else s for n, s in recipe.loras.items()}
    return dataclasses.replace(recipe, sources=sources, loras=loras)


def _refuse_unread_sources(recipe: Recipe, given: list[str]) -> None:
    """A source the command line sets that no rule reads and that is not the base changes nothing
    (`+recipe.sources.other=PATH` beside a recipe whose rules take one model)."""
    for name in given:
        if name != recipe.base and not any(name in rule.sources for rule in recipe.rules):
            raise UsageError(
                f"recipe.sources.{name} changes nothing: no rule of recipe '{recipe.name}' reads source '{name}', and it is not the base; "
                f"name it in a rule (take:{name}, or a rule's sources), make it the base (recipe.base={name}, as a LoRA extraction needs), or leave it out"
            )


def _from_working_folder(spec: SourceSpec | LoraSpec) -> SourceSpec | LoraSpec:
    """A source's or LoRA's spec whose relative path is found from the working folder only."""
    return dataclasses.replace(spec, recipe_dir=None)


def output_of(cfg: DictConfig, recipe: Recipe, given: set[str], multirun: bool) -> OutputSettings:
    """Where and how the job writes; a setting the chosen format ignores is refused."""
    chosen = cfg.get("format") or recipe.format or "diffusers"
    if chosen not in FORMATS:
        raise UsageError(f"format={chosen}: choose one of {', '.join(FORMATS)}")
    if "format" in given and "recipe.format" in given:
        raise UsageError(f"recipe.format={recipe.format} changes nothing: format={chosen} is given as well, and wins; give one of them")
    rank = cfg.lora_rank
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise UsageError(f"lora_rank={rank}: must be a whole number above 0 (the rank of a merge written as a LoRA)")
    if "lora_rank" in given and chosen not in LORA_FORMATS:
        raise UsageError(f"lora_rank={rank} changes nothing: format={chosen} writes no LoRA; lora_rank is the rank of format={' or '.join(LORA_FORMATS)}")
    energy = cfg.get("lora_energy")
    if energy is not None:
        if isinstance(energy, bool) or not isinstance(energy, (int, float)) or not 0 < energy <= 1:
            raise UsageError(f"lora_energy={energy}: must be a number above 0 and at most 1 (the fraction of each module's squared norm its rank keeps)")
        if chosen not in LORA_FORMATS:
            raise UsageError(f"lora_energy={energy} changes nothing: format={chosen} writes no LoRA; lora_energy chooses the ranks of format={' or '.join(LORA_FORMATS)}")
    refuse_unused({k: cfg.get(k) for k in ENGINE_ONLY if k in given}, not recipe.sources, formats.FORMATS[chosen].single_file, chosen)
    if "gguf_type" in given and chosen != "gguf":
        raise UsageError(f"gguf_type={cfg.gguf_type} changes nothing: format={chosen} writes no GGUF file; gguf_type is the type of format=gguf")
    if "shard_size" in given and formats.FORMATS[chosen].single_file:
        raise UsageError(f"shard_size={cfg.shard_size} changes nothing: format={chosen} writes one file; shards are for format=diffusers (a folder)")
    path = None
    if cfg.output and not multirun:
        path = Path(os.path.abspath(os.path.expanduser(str(cfg.output))))
    return OutputSettings(path, chosen, size_of(cfg.shard_size, "shard_size"), rank if "lora_rank" in given else None, energy, str(cfg.gguf_type) if chosen == "gguf" else None)


def previews_of(cfg: DictConfig, given: set[str] = frozenset()) -> PreviewRequest | None:
    """The previews asked for (None for preview=false); a preview setting `given` without preview=true is
    refused."""
    node = cfg.preview
    if not boolean(node.get("enabled") if isinstance(node, DictConfig) else node, "preview"):
        settings = sorted(k for k in given if k.startswith(("preview.", "search.")) and k != "preview.enabled")
        if settings:
            shown = ", ".join(f"{k}={OmegaConf.select(cfg, k)}" for k in settings)
            raise UsageError(f"{shown} changes nothing without preview=true: add preview=true, or leave {' and '.join(settings)} out")
        return None
    return PreviewRequest(
        pipeline=node.get("pipeline"),
        prompts=tuple(_list(node.get("prompts"), "prompts")),
        seeds=tuple(_list(node.get("seeds"), "seeds")),
        steps=node.get("steps"),
        guidance=node.get("guidance"),
        height=node.get("height"),
        width=node.get("width"),
        offload=node.get("offload") or BY_NAME["preview.offload"].default,
        device=str(cfg.device),
    )


def scoring_of(cfg: DictConfig, given: set[str] = frozenset(), multirun: bool = False) -> ScoreRequest | None:
    """The scores asked for (None for preview.score=[]); a scorer, reference or objective that would change
    nothing is refused."""
    node = cfg.preview
    names = tuple(_list(node.get("score"), "score"))
    reference = tuple(str(r) for r in _list(node.get("reference"), "reference"))
    objective = objective_of(OmegaConf.select(cfg, "search.objective"))
    unused = [k for k in ("preview.scorers.clip", "preview.reference", "search.objective") if k in given] if not names else []
    if "preview.scorers.aesthetic" in given and "aesthetic" not in names:
        unused.append("preview.scorers.aesthetic")
    if unused:
        shown = ", ".join(f"{k}={OmegaConf.select(cfg, k)}" for k in unused)
        raise UsageError(f"{shown} changes nothing without its score: add it to preview.score (e.g. preview.score=[clip,aesthetic]), or leave {' and '.join(unused)} out")
    if objective is not None and not multirun:
        raise UsageError("search.objective ranks the jobs of a sweep and is what hydra/sweeper=optuna maximises: use it with -m")
    if not names:
        return None
    scorers = node.get("scorers")
    return ScoreRequest(names, str(scorers.get("clip")), str(scorers.get("aesthetic")), reference, objective)


def objective_of(value: Any) -> Objective | None:
    """`search.objective`: a score (clip), weights of scores ({clip: 1.0, aesthetic: 0.5}) or a list of scores
    (a Pareto front)."""
    example = "search.objective=clip, search.objective='{clip: 1.0, aesthetic: 0.5}' or search.objective='[clip,aesthetic]'"
    if value is None:
        return None
    if isinstance(value, str):
        return Objective(((value, 1.0),))
    if isinstance(value, DictConfig):
        terms = tuple((str(k), v) for k, v in value.items())
        if terms and all(isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) for _, w in terms):
            return Objective(tuple((k, float(w)) for k, w in terms))
    if isinstance(value, ListConfig):
        names = list(OmegaConf.to_container(value))
        if len(names) >= 2 and all(isinstance(n, str) for n in names) and len(set(names)) == len(names):
            return Objective(tuple((n, 1.0) for n in names), pareto=True)
    raise UsageError(f"search.objective={str(value)[:200]}: give a score, weights of scores or a list of scores: {example}")


def _list(value: Any, name: str) -> list:
    """A preview list as Hydra gives it: a list, or one value (`preview.seeds=3`: one seed)."""
    if isinstance(value, ListConfig):
        return list(OmegaConf.to_container(value))
    if isinstance(value, (str, int)) and not isinstance(value, bool):
        return [value]
    if value is None:
        return []
    raise UsageError(f"preview.{name}={str(value)[:200]}: give a list")


def task_config(cfg: DictConfig) -> dict:
    """A job's config as plain data, without Hydra's own part: what tells a job's task from another's."""
    data = OmegaConf.to_container(cfg, resolve=False)
    data.pop("hydra", None)
    return data

