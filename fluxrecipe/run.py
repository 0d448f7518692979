"""One merge job, from a composed Hydra config: recipe -> plan -> execution -> report (through api.py)."""

from __future__ import annotations

import difflib
import functools
import json
import logging
import os
import re
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, read_write

from . import api
from .catalog import conf_dir, recipe_file, recipe_files, recipe_name
from .errors import FileError, FluxRecipeError, UsageError
from .files import os_errors
from .formats import OUTPUT_FORMATS
from .options import Options
from .plan import Plan, format_plan, human_bytes
from .recipe import FORMATS, Recipe, load_recipe
from .text import printable
from .writer import check_target

if TYPE_CHECKING:
    from .execute import Result

log = logging.getLogger("fluxrecipe")
_MISSING = object()
EXIT_ERROR = 1
DEVICE = re.compile(r"cpu|cuda(:\d+)?")


@dataclass(frozen=True)
class JobPlan:
    """Everything a job decides before reading a tensor: what to merge (the Plan), how, and where to."""

    recipe: Recipe
    options: Options
    output: Path | None  # None: Hydra's run folder, not made yet (a pre-flight before Hydra starts the run)
    plan: Plan


def plan_job(cfg: DictConfig, dry_run: bool = False) -> JobPlan:
    """Check the config and plan its merge: every check a run makes before it reads or writes tensor data.
    A sweep's pre-flight calls this for every job before any job starts; a single run's (Preflight) calls it
    before Hydra makes the run folder."""
    with os_errors():
        options = options_of(cfg)  # first: a mistyped option (+dryrun=true) must not start a merge
        _refuse_sweep_without_multirun(cfg)
        recipe = recipe_of(cfg)
        output_format = format_of(cfg, recipe)
        output = output_of(cfg, recipe, output_format)
        if output is not None:  # fails fast, before any source is fetched; a dry run reports every fault but an existing output
            output = api.output_path(output, output_format)
            check_target(output, options.overwrite, single_file=OUTPUT_FORMATS[output_format], dry_run=dry_run)
        plan = api.plan(recipe, output, output_format, parse_size(cfg.shard_size), lora_rank_of(cfg), download=not dry_run)
        if output is not None:  # apart from every source (the target itself was checked above)
            api.check_output(plan, output, options.overwrite, dry_run=True)
        return JobPlan(recipe, options, output, plan)


def run_job(cfg: DictConfig) -> Result | Plan:
    """Plan the merge the config asks for; print it (dry run) or execute it. Returns the Plan or the Result."""
    dry_run = dry_run_of(cfg)
    with os_errors():
        return execute_job(plan_job(cfg, dry_run), dry_run)


def execute_job(job: JobPlan, dry_run: bool) -> Result | Plan:
    """A planned job: its plan printed (dry run), or merged into its output."""
    plan, options, output = job.plan, job.options, job.output
    if output is None:
        raise UsageError("no output folder: give output=DIR")
    shown = printable(str(output))
    if dry_run:
        text = [format_plan(plan), f"dry run: nothing written (the output would go to {shown})"]
        if output.exists() and not options.overwrite:
            text.append(f"note: {shown} already exists: the merge will refuse it unless you pass overwrite=true")
        try:
            print("\n".join(text), flush=True)
        except OSError as e:
            raise FileError(f"standard output: {e.strerror or e}") from None
        return plan
    log.info(format_plan(plan))
    result = api.write(plan, output, options)
    rate = result.bytes_written / result.seconds if result.seconds else 0.0
    where = shown if plan.single_file else f"{shown}: {len(plan.steps)} tensors in {len(plan.files)} shard(s)"
    if plan.factors:
        log.info(format_lora_errors(plan, result))
    log.info(f"wrote {where}, {human_bytes(result.bytes_written)} in {result.seconds:.1f} s ({human_bytes(rate)}/s)")
    report = shown if plan.single_file else f"{shown}/fluxrecipe.json"
    inputs = {k: v for k, v in result.nonfinite.items() if not k.startswith("output: ")}
    if inputs:
        log.warning(f"warning: {sum(inputs.values())} NaN/Inf input values in {len(inputs)} tensor(s), listed in {report}")
    if len(inputs) != len(result.nonfinite):
        outputs = len(result.nonfinite) - len(inputs)
        log.warning(f"warning: {outputs} tensor(s) came out with NaN/Inf values from finite inputs, listed in {report}: do not use the model as it is")
    if result.clamped:
        log.warning(f"warning: {sum(result.clamped.values())} values in {len(result.clamped)} tensor(s) lay beyond their dtype's finite range and were clamped to it, listed in {report}")
    return result


def format_lora_errors(plan: Plan, result: Result) -> str:
    """A merge written as a LoRA: the relative error of each factored matrix, and what the LoRA could not hold."""
    lines = [f"lora: rank {plan.lora_rank}; relative error ||difference - up @ down|| / ||difference|| of each matrix, after rounding to {plan.files[0].tensors[0].dtype}:"]
    width = max((len(f.module) for f in plan.factors), default=0)
    lines += [f"  {f.module:<{width}}  rank {f.rank:>4}  {result.lora_errors[f.module]:.3e}" for f in plan.factors if f.rank]
    differ = {k: v for k, v in result.lora_unheld.items() if v}
    if result.lora_unheld:
        worst = max(differ, key=differ.get, default=None)
        lines.append(
            f"not held by the LoRA (1-D): {len(differ)} of {len(result.lora_unheld)} tensors differ from the base"
            + (f", the most '{worst}' (largest |difference| {differ[worst]:.3e})" if worst else "")
        )
    return "\n".join(lines)


def recipe_of(cfg: DictConfig) -> Recipe:
    if cfg.get("recipe") is None:
        names = ", ".join(sorted(recipe_files()))
        raise UsageError(f"no recipe chosen: run `python -m fluxrecipe recipe=NAME` (recipes: {names})")
    choice = _hydra(cfg, "runtime.choices.recipe") or "recipe"
    file = recipe_file(choice)
    return load_recipe(cfg.recipe, recipe_name(choice), str(file) if file else None)


def _hydra(cfg: DictConfig, key: str) -> Any:
    """A value of Hydra's own config: in the composed config (a pre-flight), else where a running job has it."""
    if "hydra" in cfg:
        return OmegaConf.select(cfg, f"hydra.{key}")
    return OmegaConf.select(HydraConfig.get(), key) if HydraConfig.initialized() else None


@functools.cache
def option_defaults() -> dict[str, Any]:
    """The run options conf/config.yaml defines, with their defaults (`preview`: a mapping of its settings)."""
    config = OmegaConf.to_container(OmegaConf.load(conf_dir() / "config.yaml"))
    return {k: v for k, v in config.items() if k not in ("defaults", "hydra")}


def option_default(name: str) -> tuple[Any] | None:
    """(default,) of an option or a setting of one (`preview.steps`); None for any other name."""
    head, _, rest = name.partition(".")
    defaults = option_defaults()
    if head not in defaults or (rest and not (isinstance(defaults[head], dict) and rest in defaults[head])):
        return None
    return (defaults[head][rest] if rest else defaults[head],)


def known_options() -> list[str]:
    """The run options, and the config groups chosen as options (recipe=, sweep=)."""
    return [*option_defaults(), "recipe", "sweep"]


def unknown_option(name: str) -> str | None:
    """The message for an option fluxrecipe does not have (with the closest it has), or None if it has it.
    `name` may be a setting of an option (`preview.steps`); a recipe's own values (`recipe.alpha`) are the
    recipe loader's to check."""
    head, _, rest = name.partition(".")
    if head in ("recipe", "hydra", "sweep") and rest:
        return None
    known = known_options()
    if head in known and rest:
        settings = option_defaults().get(head)
        known = [f"{head}.{k}" for k in settings] if isinstance(settings, dict) else []
        name = f"{head}.{rest.partition('.')[0]}"
    if name in known:
        return None
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]}?)" if close else f" (options: {', '.join(known)})" if known else f" ({head} has no settings)"
    return f"unknown option {name!r}{hint}; `fluxrecipe --help` lists them"


def _refuse_sweep_without_multirun(cfg: DictConfig) -> None:
    """A sweep file (sweep=NAME) sets Hydra's sweeper parameters, which only a multirun (-m) runs: without
    -m, Hydra would quietly run one merge with the recipe's own values."""
    params = _hydra(cfg, "sweeper.params")
    if params and _hydra(cfg, "mode") != RunMode.MULTIRUN:
        sweep = _hydra(cfg, "runtime.choices.sweep")
        swept = "; ".join(f"{k}: {v}" for k, v in params.items())
        raise UsageError(f"{f'sweep={sweep}' if sweep else 'the config'} sets a sweep ({swept}), which runs only as a multirun: add -m")


def options_of(cfg: DictConfig) -> Options:
    _check_option_names(cfg)
    if cfg.nonfinite not in ("error", "warn"):
        raise UsageError(f"nonfinite={cfg.nonfinite}: choose error or warn")
    if not DEVICE.fullmatch(str(cfg.device)):
        raise UsageError(f"device={str(cfg.device)!r}: choose cpu, cuda or cuda:N")  # as execute.check_device says it, before torch
    for key in ("threads", "chunk_elements"):
        if not isinstance(cfg[key], int) or isinstance(cfg[key], bool) or cfg[key] < (0 if key == "threads" else 1):
            raise UsageError(f"{key}={cfg[key]}: must be a whole number" + (" (0: automatic)" if key == "threads" else " above 0"))
    boolean(cfg.dry_run, "dry_run")
    boolean(cfg.traceback, "traceback")
    return Options(
        device=str(cfg.device),
        threads=cfg.threads,
        chunk_elements=cfg.chunk_elements,
        in_flight=parse_size(cfg.in_flight, "in_flight"),
        nonfinite=cfg.nonfinite,
        diagnostics=boolean(cfg.diagnostics, "diagnostics"),
        progress=boolean(cfg.progress, "progress"),
        overwrite=boolean(cfg.overwrite, "overwrite"),
    )


def boolean(value: object, option: str) -> bool:
    """A yes-or-no option, as Hydra gives it: true or false only. (`overwrite=no` reaches the program as the
    text 'no', which Python's bool() calls true.)"""
    if not isinstance(value, bool):
        raise UsageError(f"{option}={value}: choose true or false")
    return value


def dry_run_of(cfg: DictConfig) -> bool:
    return boolean(cfg.get("dry_run", False), "dry_run")


def _check_option_names(cfg: DictConfig) -> None:
    """Every option (and setting of one) is one fluxrecipe has, and none was deleted (`~threads`)."""
    names = [str(name) for name in cfg if name != "hydra"]
    names += [f"{name}.{key}" for name in option_defaults() if isinstance(cfg.get(name), DictConfig) for key in cfg[name]]
    for name in names:
        if message := unknown_option(name):
            raise UsageError(message)
    for name, default in option_defaults().items():
        for key, value in [(f"{name}.{k}", v) for k, v in default.items()] if isinstance(default, dict) else [(name, default)]:
            if OmegaConf.select(cfg, key, default=_MISSING) is _MISSING:
                raise UsageError(deleted_option(key, value))


def deleted_option(name: str, default: Any) -> str:
    instead = f"its settings ({name}.NAME=VALUE)" if isinstance(default, dict) else f"it ({name}={json.dumps(default)} is its default)"
    return f"option {name!r} has no value (~{name} deletes it): every option needs one; set {instead} instead"


def lora_rank_of(cfg: DictConfig) -> int:
    rank = cfg.get("lora_rank", 16)
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise UsageError(f"lora_rank={rank}: must be a whole number above 0 (the rank of a merge written as a LoRA)")
    return rank


def format_of(cfg: DictConfig, recipe: Recipe) -> str:
    chosen = cfg.get("format") or recipe.format or "diffusers"
    if chosen not in FORMATS:
        raise UsageError(f"format={chosen}: choose one of {', '.join(FORMATS)}")
    return chosen


def output_of(cfg: DictConfig, recipe: Recipe, output_format: str) -> Path | None:
    """The output asked for; by default, in Hydra's run folder (None before Hydra has made it: a pre-flight)."""
    if cfg.output:
        return Path(os.path.abspath(os.path.expanduser(str(cfg.output))))
    run_dir = _hydra(cfg, "runtime.output_dir")
    name = f"{recipe.name}.safetensors" if OUTPUT_FORMATS[output_format] else "transformer"
    return Path(run_dir) / name if run_dir else None


def parse_size(text: object, option: str = "shard_size") -> int:
    try:
        return api.parse_size(text)
    except UsageError as e:
        raise UsageError(f"{option}={e}") from None


def fail(error: FluxRecipeError, show_traceback: bool) -> NoReturn:
    """How the command line ends on a user's error: one line and exit status 1, or the traceback if asked for."""
    if show_traceback:
        raise error
    print(f"fluxrecipe: error: {printable(str(error))}", file=sys.stderr)
    sys.exit(EXIT_ERROR)


def show_traceback(cfg: DictConfig) -> bool:
    return cfg.get("traceback") is True or os.environ.get("HYDRA_FULL_ERROR") == "1"


class Preflight(Callback):
    """Registered in conf/config.yaml under hydra.callbacks: a single run's checks, before Hydra makes the run
    folder (preflight.check_run: the plan, the previews, keep_weights). A run that is refused (a mistyped
    option, an unused recipe parameter, a sweep without -m, a bad recipe, source or preview setting) writes
    nothing at all, not even outputs/DATE/TIME/; a dry run is printed here and ends (nothing written either);
    a run that passes runs on the plan made here."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        from .job import print_dry_run
        from .preflight import check_run

        try:
            with read_write(config.hydra.runtime):  # the run folder, as Hydra's run_job will set it
                config.hydra.runtime.output_dir = os.path.abspath(str(config.hydra.run.dir))
            check = check_run(config)
            if dry_run_of(config):
                print_dry_run(check)
            else:
                _check_run_dir(Path(str(config.hydra.run.dir)))
        except FluxRecipeError as e:
            if show_traceback(config):
                traceback.print_exception(e)
                sys.exit(EXIT_ERROR)
            fail(e, False)
        if dry_run_of(config):
            sys.exit(0)  # the dry run is done: Hydra is not to make its run folder


def _check_run_dir(run_dir: Path) -> None:
    """Hydra makes the run folder (its log, its .hydra/) before a job starts: say so if it cannot."""
    existing = Path(os.path.abspath(run_dir))
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{existing}: cannot create the run folder {run_dir} here (not a writable folder): run elsewhere, or choose it with hydra.run.dir=FOLDER (or output=FOLDER for the model)")
