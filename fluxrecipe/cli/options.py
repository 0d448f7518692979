"""fluxrecipe's run options: one table, the one home of each option's name, default and meaning.

Hydra gets the defaults from it (registered as the config `fluxrecipe_options`, which conf/config.yaml puts
first in its defaults list), `--help` prints it one line per option, and the command line's checks name an
option that does not exist, or was deleted, from it.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from typing import Any

SUBCOMMAND_OPTIONS = ("recipe", "sweep")  # config groups chosen like options (recipe=NAME, sweep=NAME)
CONFIG_NAME = "fluxrecipe_options"
HELP_COLUMN = 26  # where --help starts the meanings


@dataclass(frozen=True)
class Option:
    name: str  # as the command line sets it: `threads`, `preview.steps`
    default: Any
    meaning: str  # one line: what it does, and when it matters

    @property
    def shown_default(self) -> str:
        """The default as the command line would write it (the prompts counted, not quoted)."""
        if isinstance(self.default, list) and self.default and all(isinstance(v, str) for v in self.default):
            return f"[{len(self.default)} prompts]"
        return self.default if isinstance(self.default, str) else json.dumps(self.default, separators=(",", ":"))


OPTIONS = (
    Option("output", None, "where the merge goes: a folder (format=diffusers), a .safetensors file or (format=gguf) a .gguf file; null: the run folder, outputs/DATE/TIME/"),
    Option("format", None, "diffusers (a folder), bfl or comfyui (one .safetensors file), lora, lora_peft or lora_comfyui (the merge as a LoRA), gguf (one quantized .gguf file); null: the recipe's, else diffusers"),
    Option("shard_size", "10GB", "format=diffusers: the largest output shard (KB, MB, GB, KiB, MiB, GiB)"),
    Option("gguf_type", "Q8_0", "format=gguf: the file's type: Q8_0, Q5_1, Q5_0, Q4_1, Q4_0, BF16, F16 or F32 (a rule's dtype: sets its own)"),
    Option("lora_rank", 16, "format=lora or lora_peft: the rank of each factored matrix (smaller matrices keep their full rank); format=lora_comfyui too; for a recipe of LoRAs alone the rank they are cut to (unset: exact)"),
    Option("lora_energy", None, "a LoRA output: per matrix the smallest rank keeping this fraction (0 < E <= 1) of its squared norm, at most lora_rank"),
    Option("overwrite", False, "replace an existing output (atomically; only a model fluxrecipe recognises)"),
    Option("dry_run", False, "print the plan and write nothing"),
    Option("device", "cpu", "where the arithmetic (and the previews) run: cpu, cuda, cuda:1, ..."),
    Option("threads", 0, "worker threads; 0: from the number of cores"),
    Option("chunk_elements", 1048576, "elements per unit of work"),
    Option("in_flight", "256MB", "work in flight at most (read, being computed, waiting to be written): bounds memory"),
    Option("nonfinite", "error", "NaN/Inf in an input or the merged output: error (stop), or warn (count, report, merge anyway)"),
    Option("diagnostics", True, "format=diffusers: record the distance of the merge to each source, per block (diagnostics.json)"),
    Option("progress", True, "a progress bar, when on a terminal"),
    Option("traceback", False, "show the Python traceback of an error"),
    Option("keep_weights", True, "false: with previews, merge each job in memory and never write its weights; without, delete them once written (its recipe.yaml rebuilds them)"),
    Option("preview.enabled", False, "sample images of each merge (preview=true is short for preview.enabled=true); they go into the run folder"),
    Option("preview.pipeline", None, "preview=true: the text encoders, VAE and scheduler: a hub repo or a local pipeline folder; null: the model family's (FLUX.1: black-forest-labs/FLUX.1-schnell)"),
    Option(
        "preview.prompts",
        [
            "a photo of a red fox sitting in fresh snow, soft morning light",
            'a cozy cafe interior with a chalkboard menu that reads "OPEN", warm light',
            "portrait of an elderly fisherman with a weathered face, detailed skin, overcast sky",
        ],
        "preview=true: the prompts, a list: preview.prompts='[a red fox in snow, a city at night]'",
    ),
    Option("preview.seeds", [0, 1], "preview=true: one image per prompt and seed"),
    Option("preview.steps", None, "preview=true: denoising steps; null: the model family's (FLUX.1: 4 without guidance embedder, schnell-like, 20 with)"),
    Option("preview.guidance", None, "preview=true, a model that takes guidance: the guidance; null: the model family's (FLUX.1 with a guidance embedder: 3.5; FLUX.2 klein with a base model's pipeline: 4.0)"),
    Option("preview.height", 512, "preview=true: image height, a multiple of 16"),
    Option("preview.width", 512, "preview=true: image width, a multiple of 16"),
    Option("preview.offload", "none", "preview=true, device=cuda: model (diffusers' model CPU offload) or sequential (least GPU memory, slowest)"),
    Option("preview.score", [], "preview=true: score every image: [clip, aesthetic] (per image and per job, in the summary, ranked)"),
    Option("preview.scorers.clip", "openai/clip-vit-large-patch14", "preview.score: the CLIP model (hub id or local folder) of the clip score, and whose image embedding aesthetic reads"),
    Option("preview.scorers.aesthetic", "trl-lib/ddpo-aesthetic-predictor/aesthetic-model.pth", "preview.score=[aesthetic]: LAION's aesthetic head, a local .pth/.safetensors or a hub file org/name/FILE"),
    Option("preview.reference", [], "preview.score: sources of the recipe rendered and scored unmerged too: each job is 'better than both parents on N of M images'"),
    Option("search.objective", None, "-m with preview.score: what ranks the jobs and what hydra/sweeper=optuna maximises: clip, {clip: 1.0, aesthetic: 0.5}, or a list (a Pareto front)"),
)
BY_NAME = {o.name: o for o in OPTIONS}


def defaults() -> dict[str, Any]:
    """The options with their defaults, as a config: `preview` a mapping of its settings."""
    tree: dict[str, Any] = {}
    for option in OPTIONS:
        *heads, last = option.name.split(".")
        node = tree
        for head in heads:  # preview.scorers.clip: preview holds scorers, which holds clip
            node = node.setdefault(head, {})
        node[last] = option.default
    return tree


def groups() -> dict[str, list[str]]:
    """Each option that holds settings (`preview`), with its settings."""
    found: dict[str, list[str]] = {}
    for option in OPTIONS:
        head, _, setting = option.name.partition(".")
        if setting:
            found.setdefault(head, []).append(setting)
    return found


def help_table() -> str:
    """The options as `--help` lists them: one line each, `name=default  meaning`."""
    cells = [(f"{o.name}={o.shown_default}", o.meaning) for o in OPTIONS]
    width = min(HELP_COLUMN, max(len(left) for left, _ in cells))  # a longer one pushes its meaning along
    return "\n".join(f"  {left:<{width}}  {meaning}" for left, meaning in cells)


def default_of(name: str) -> tuple[Any] | None:
    """(default,) of an option or a setting of one (`preview.steps`), (settings,) of `preview`; None for any
    other name."""
    if name in BY_NAME:
        return (BY_NAME[name].default,)
    return (defaults()[name],) if name in groups() else None


def known_options() -> list[str]:
    """The run options, and the config groups chosen as options (recipe=, sweep=)."""
    return [*dict.fromkeys(o.name.partition(".")[0] for o in OPTIONS), *SUBCOMMAND_OPTIONS]


def unknown_option(name: str) -> str | None:
    """The message for an option fluxrecipe does not have (with the closest it has), or None if it has it.
    `name` may be a setting of an option (`preview.steps`); a recipe's own values (`recipe.alpha`) are the
    recipe loader's to check."""
    head, _, rest = name.partition(".")
    if head in ("recipe", "hydra", "sweep") and rest:
        return None
    known = known_options()
    if head in known and rest:
        settings = groups().get(head)
        known = [f"{head}.{k}" for k in settings] if settings else []
        holders = {k.rpartition(".")[0] for k in known if k.count(".") > 1}  # settings that hold settings: preview.scorers
        known += sorted(holders)
        name = f"{head}.{rest.partition('.')[0]}"
        if name in holders and "." in rest:
            name = ".".join(f"{head}.{rest}".split(".")[:3])
    if name in known:
        return None
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]}?)" if close else f" (options: {', '.join(known)})" if known else f" ({head} has no settings)"
    return f"unknown option {name!r}{hint}; `fluxrecipe --help` lists them"


def deleted_option(name: str, default: Any) -> str:
    instead = f"its settings ({name}.NAME=VALUE)" if isinstance(default, dict) else f"it ({name}={json.dumps(default)} is its default)"
    return f"option {name!r} has no value (~{name} deletes it): every option needs one; set {instead} instead"
