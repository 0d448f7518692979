"""One job as the command line asks for it, as typed data: the command layer (cli/settings.py) builds it once
from Hydra's config, and everything below reads only this."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .. import formats
from ..options import Options
from ..recipe import Recipe
from .previews import PreviewRequest
from .scores import ScoreRequest

DEFAULT_MODEL_FOLDER = "transformer"  # a job's model in its own folder, where no output is given


@dataclass(frozen=True)
class OutputSettings:
    """Where and how a job writes its merge."""

    path: Path | None  # absolute; None: in the job's own folder (default_output)
    format: str  # one of formats.FORMATS
    shard_size: int  # bytes per shard at most (format=diffusers)
    lora_rank: int | None  # the rank of a LoRA output (format=lora, lora_peft, lora_comfyui); None: not given (16, or LoRAs alone: exact)
    lora_energy: float | None = None  # LoRAs alone: the fraction of each module's squared norm that sets its rank
    gguf_type: str | None = None  # format=gguf: the whole file's type

    @property
    def single_file(self) -> bool:
        return formats.FORMATS[self.format].single_file

    def in_folder(self, folder: Path, recipe: Recipe) -> Path:
        """The output: the one asked for, else `transformer` (or RECIPE.safetensors) in the job's folder."""
        if self.path is not None:
            return self.path
        return folder / (f"{recipe.name}{formats.FORMATS[self.format].suffix}" if self.single_file else DEFAULT_MODEL_FOLDER)


@dataclass(frozen=True)
class JobSettings:
    """Everything one job was asked for, checked and typed."""

    recipe: Recipe
    options: Options  # how the engine executes the plan
    output: OutputSettings
    previews: PreviewRequest | None  # None: no previews (preview=false)
    scoring: ScoreRequest | None = None  # None: no scores (preview.score=[])
    keep_weights: bool = True  # false: delete the weights once the previews are done
    dry_run: bool = False  # plan and print, write nothing
