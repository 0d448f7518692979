"""LoRA files, both ways: read one in any trainer's key scheme into changes of canonical tensors, and name
the tensors of a merge written as a LoRA.

A LoRA module holds down (rank x in) and up (out x rank), and maybe an alpha: it changes a weight W by
(alpha / rank) * up @ down. The key schemes in the wild, told apart by their keys (diffusers' LoRA loaders,
`FluxLoraLoaderMixin.lora_state_dict` and its FLUX.2 / FLUX.3 siblings, detect the same ones), on the names of
the model's family (its tables, families/: BFL = Black Forest Labs' module names, canonical = diffusers'):
- kohya sd-scripts: `lora_unet_<BFL module, `_` for `.`>.lora_up.weight` / `.lora_down.weight` / `.alpha`;
- ComfyUI: `diffusion_model.<BFL module>`, with its dots (`lora_up`/`lora_down` or `lora_A`/`lora_B`);
- diffusers / PEFT: `transformer.<canonical module>.lora_A.weight` / `lora_B`, alpha absent (= rank), as
  `.alpha` tensors, or in the header's `lora_adapter_metadata` (PEFT's LoraConfig: lora_alpha, alpha_pattern,
  use_rslora);
- OneTrainer: `lora_transformer_<canonical module, `_` for `.`>.lora_down.weight`;
- a family's own (its LoraTables): XLabs' processors (`<BFL block>.processor.qkv_lora1.down.weight`, lora1:
  image stream, lora2: text, no alpha) and BFL's control LoRAs (`lora_A`/`lora_B` on BFL's names, a
  `lora_B.bias` added to the layer's bias, whole replacement tensors for the q/k norms) for FLUX.1.
Text-encoder parts (`lora_te*`, `text_encoder*`) are counted and left alone.

A LoRA on a fused BFL module (q/k/v in one, the final layer's modulation) changes the canonical tensors it
covers: its up rows are split, renamed and swapped by the family's own table, as that module's weight rows are
(so the final layer's swap applies to up only), and its down is shared whole. Every change is a TensorRef of
byte pieces of the LoRA file: nothing here reads tensor data but alphas.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from functools import partial

from .. import families
from ..errors import SourceError
from ..families import Family
from ..schedule import is_number
from ..text import cut
from . import bfl
from .layout import Piece, TensorRef
from .safetensors import SCALARS, TensorEntry, read_scalar

ROLES = (  # longest suffix first: `.lora.up.weight` before `.up.weight`
    (".lora_down.weight", "down"),
    (".lora_up.weight", "up"),
    (".lora.down.weight", "down"),
    (".lora.up.weight", "up"),
    (".lora_A.weight", "down"),
    (".lora_B.weight", "up"),
    (".lora_B.bias", "up_bias"),
    (".lora_A.bias", "down_bias"),
    (".down.weight", "down"),
    (".up.weight", "up"),
    (".alpha", "alpha"),
    (".diff_b", "diff_b"),
    (".diff", "diff"),
    (".dora_scale", "dora"),
    (".lora_magnitude_vector", "dora"),
)
TEXT = re.compile(r"^(lora_te\d*_|text_encoders?(_\d+)?\.|lora_te\d*\.)")
UNET = re.compile(r"(^|[._])(input_blocks|output_blocks|middle_block|down_blocks|up_blocks|mid_block)[._]\d")
DIFFUSERS_PREFIXES = ("transformer.", "base_model.model.")
KOHYA_PREFIX, ONETRAINER_PREFIX = "lora_unet_", "lora_transformer_"
COMFYUI_LORA_PREFIX = "diffusion_model."  # what ComfyUI's own LoRA saver writes before BFL's module names
PEFT_PREFIX = "transformer."
PEFT_DEFAULTS = {"r": 8, "lora_alpha": 8}  # LoraConfig's, which diffusers uses when the metadata omits them


@dataclass(frozen=True)
class Change:
    """What one module of a LoRA file does to one canonical tensor of the model.

    kind "product": W + ratio * up @ down, `tensor` the up rows for this tensor (rows x rank), `down` the whole
    down (rank x in); "add": W + ratio * tensor (a control LoRA's lora_B.bias, ComfyUI's .diff / .diff_b);
    "replace": the tensor itself (a control LoRA's q/k norms). `ratio` is alpha / rank (alpha / sqrt(rank) for
    rsLoRA) for a LoRA module and its bias, 1 for a difference."""

    key: str
    kind: str
    tensor: TensorRef
    down: TensorRef | None
    ratio: float
    module: str  # the module as the file names it, for messages


@dataclass(frozen=True)
class Module:
    """One LoRA module of the file, for the plan's summary."""

    name: str
    rank: int
    alpha: float | None  # None: the file gives none (alpha = rank)


@dataclass
class LoraRead:
    """A LoRA file understood against a model: its key scheme, its changes, and what it holds besides."""

    format: str
    changes: list[Change]
    modules: list[Module]
    unmatched: list[tuple[str, str]] = field(default_factory=list)  # (file key, why it changes nothing)
    ignored: int = 0  # text-encoder keys


def read(
    name: str, path: str, entries: dict[str, TensorEntry], metadata: dict[str, str], shapes: dict[str, tuple[int, ...]], family: Family,
    hidden: int | None = None, implied: bool = False,
) -> LoraRead:
    """The changes a LoRA file makes to a model of `family` whose canonical tensors have `shapes`. Raises SourceError
    when the file is not a LoRA, is a LoRA for another kind of model, or does not fit this model's shapes;
    keys that fit nowhere are returned (`unmatched`) for the caller to refuse or list. `hidden`: the model's
    width, where `shapes` lacks its input layer. `implied`: there is no model (a merge of LoRAs alone): any
    module of the family's tables is taken, and `shapes` is filled with the shapes the LoRA gives its tensors."""
    where = f"lora '{name}' ({path})"
    modules, whole = modules_of(entries)
    if not _holds_changes(modules):
        raise SourceError(f"{where} is not a LoRA: {_not_a_lora(list(entries))}")
    unet = next((k for k in modules if UNET.search(k)), None)
    if unet:
        raise SourceError(f"{where} is a LoRA for a Stable Diffusion / SDXL UNet (it holds '{unet}...'), not for {family.name}")
    alphas = _peft_alphas(where, metadata)
    context = _Context(name, where, shapes, family, alphas, hidden, implied)
    found = LoraRead("", [], [])
    schemes: Counter[str] = Counter()
    for module, roles in modules.items():
        if TEXT.match(module):
            found.ignored += len(roles)
            continue
        scheme = context.module(module, roles, found)
        if scheme:
            schemes[scheme] += 1
    for key, entry in whole.items():
        if TEXT.match(key):
            found.ignored += 1
        elif context.replacement(key, entry, found):
            schemes["bfl_control" if not key.startswith(DIFFUSERS_PREFIXES) else "diffusers"] += 1
    _refuse_doubles(where, found.changes)
    if schemes["bfl"] and (schemes["bfl_control"] or any(c.kind == "add" for c in found.changes)):
        schemes["bfl_control"] += schemes.pop("bfl")
    found.format = "+".join(s for s, _ in schemes.most_common()) or "unknown"
    return found


def _refuse_doubles(where: str, changes: list[Change]) -> None:
    """Two modules of one file that change the same tensor are one module named twice (kohya's and ComfyUI's
    spelling of it, a fused module and a part of it): baking both would add its change twice."""
    first: dict[str, Change] = {}
    for c in changes:
        seen = first.setdefault(c.key, c)
        if seen.module != c.module:
            raise SourceError(
                f"{where}: '{cut(seen.module)}' and '{cut(c.module)}' both change '{cut(c.key)}': one module named twice (in two key schemes?) "
                "would be baked twice; keep one of them in the file"
            )


def modules_of(entries: dict[str, TensorEntry]) -> tuple[dict[str, dict[str, TensorEntry]], dict[str, TensorEntry]]:
    """A LoRA file's keys grouped: module path -> role ("up", "down", "alpha", ...) -> entry; and the keys
    that have no LoRA role (whole tensors)."""
    modules: dict[str, dict[str, TensorEntry]] = {}
    whole: dict[str, TensorEntry] = {}
    for key, entry in entries.items():
        role = next(((key[: -len(suffix)], r) for suffix, r in ROLES if key.endswith(suffix)), None)
        if role:
            modules.setdefault(role[0], {})[role[1]] = entry
        else:
            whole[key] = entry
    return modules, whole


def _holds_changes(modules: dict[str, dict[str, TensorEntry]]) -> bool:
    """Whether a file's modules change weights as a LoRA does: low-rank matrices, or ComfyUI's whole
    differences (`.diff`, `.diff_b`), which some files hold alone."""
    return any({"up", "down", "diff", "diff_b"} & set(roles) for roles in modules.values())


def module_problems(entries: dict[str, TensorEntry]) -> list[str] | None:
    """For `verify`: None if the file is not a LoRA; else what is wrong with its modules (an up without its
    down, matrices whose ranks differ)."""
    modules, _ = modules_of(entries)
    if not _holds_changes(modules):
        return None
    problems = []
    for module, roles in modules.items():
        up, down = roles.get("up"), roles.get("down")
        if bool(up) != bool(down):
            problems.append(f"'{cut((up or down).name)}' has no {'down' if up else 'up'} matrix beside it")
        elif up and (len(up.shape) != 2 or len(down.shape) != 2 or up.shape[1] != down.shape[0]):
            problems.append(f"'{cut(module)}': up {list(up.shape)} and down {list(down.shape)} are not a LoRA's matrices of one rank")
    return problems


class _Context:
    """What resolving a file's modules needs: the model's shapes and names, the file's PEFT alphas."""

    def __init__(
        self, name: str, where: str, shapes: dict[str, tuple[int, ...]], family: Family, alphas: "_PeftAlphas | None", hidden: int | None, implied: bool,
    ):
        self.name, self.where, self.shapes, self.family, self.alphas, self.implied = name, where, shapes, family, alphas, implied
        self.hidden = hidden or family.width(shapes)
        self.tables = family.lora
        self.canonical = family.bfl.canonical_modules(family.max_blocks) if implied else {k.rsplit(".", 1)[0] for k in shapes}
        self.underscored = {m.replace(".", "_"): m for m in self.canonical}
        self.find = partial(bfl.lookup, family.bfl)

    def resolve(self, module: str) -> tuple[str, str, str] | None:
        """A module path -> (scheme, "bfl" or "canonical" or "xlabs", the module in that naming)."""
        if module.startswith(KOHYA_PREFIX):
            rest = module[len(KOHYA_PREFIX):]
            bfl_module = self.family.bfl.from_underscored(rest)
            if bfl_module:
                return "kohya", "bfl", bfl_module
            return ("kohya", "canonical", self.underscored[rest]) if rest in self.underscored else None
        if module.startswith(ONETRAINER_PREFIX):
            rest = module[len(ONETRAINER_PREFIX):]
            return ("onetrainer", "canonical", self.underscored[rest]) if rest in self.underscored else None
        scheme = "bfl"
        for prefix in self.family.comfyui_prefixes:
            if module.startswith(prefix):
                module, scheme = module[len(prefix):], "comfyui"
                break
        if self.tables.xlabs and self.tables.xlabs.match(module):
            return "xlabs", "xlabs", module
        for prefix in DIFFUSERS_PREFIXES:
            if module.startswith(prefix):
                module = module[len(prefix):]
                return ("diffusers", "canonical", module) if module in self.canonical else None
        if self.find(module + ".weight") or self.find(module + ".scale"):
            return scheme, "bfl", module
        return ("diffusers", "canonical", module) if module in self.canonical else None

    def module(self, module: str, roles: dict[str, TensorEntry], found: LoraRead) -> str | None:
        """Resolve one LoRA module into changes (appended to `found`); its scheme, or None if it fits nowhere."""
        keys = sorted(e.name for e in roles.values())
        resolved = self.resolve(module)
        if resolved is None:
            found.unmatched += [(k, f"no {self.family.name} module has this name") for k in keys]
            return None
        scheme, naming, target = resolved
        if "dora" in roles:
            found.unmatched += [(k, "a DoRA module: its magnitude rescales the whole weight, which a LoRA bake-in does not do") for k in keys]
            return None
        if "down_bias" in roles:
            found.unmatched += [(k, "a bias on lora_A, which no FLUX trainer writes and fluxrecipe does not bake") for k in keys]
            return None
        if naming == "xlabs" and target.endswith(".proj_lora"):
            found.unmatched += [(k, "XLabs' single-block proj_lora acts on a block's output, not on a weight") for k in keys]
            return None
        up, down = roles.get("up"), roles.get("down")
        changes: list[Change] = []
        if up or down:
            if not (up and down):
                have, lack = ("up", "down") if up else ("down", "up")
                raise SourceError(f"{self.where}: '{cut((up or down).name)}' has no {lack} matrix beside it: the LoRA file is incomplete")
            if len(up.shape) != 2 or len(down.shape) != 2 or up.shape[1] != down.shape[0] or not down.shape[0]:
                raise SourceError(
                    f"{self.where}: '{cut(module)}' is not a LoRA module of matrices: up {list(up.shape)}, down {list(down.shape)} "
                    "(fluxrecipe bakes linear LoRAs: up [out, rank] and down [rank, in])"
                )
            rank = down.shape[0]
            if rank > min(up.shape[0], down.shape[1]):  # a hostile rank would only cost memory: down is decoded whole
                raise SourceError(
                    f"{self.where}: '{cut(module)}' has rank {rank}, more than its matrices allow (up {list(up.shape)}, down {list(down.shape)}): "
                    "not a LoRA fluxrecipe can bake"
                )
            alpha = self._alpha(module, roles.get("alpha"), target if naming == "canonical" else None)
            ratio = (alpha if alpha is not None else rank) / (math.sqrt(rank) if self.alphas and self.alphas.rslora else rank)
            down_ref = TensorRef(self.name, "", down.name, down.dtype, down.shape, _pieces(down))
            for key, ref in self._split(module, naming, target, "weight", up).items():
                changes.append(Change(key, "product", ref, down_ref, ratio, module))
            if "up_bias" in roles:
                changes += [Change(k, "add", ref, None, ratio, module) for k, ref in self._split(module, naming, target, "bias", roles["up_bias"]).items()]
            found.modules.append(Module(module, rank, alpha))
        elif "alpha" in roles and not ({"diff", "diff_b"} & set(roles)):
            found.unmatched.append((roles["alpha"].name, "an alpha without up and down matrices"))
            return None
        for role, param in (("diff", "weight"), ("diff_b", "bias")):
            if role in roles:
                changes += [Change(k, "add", ref, None, 1.0, module) for k, ref in self._split(module, naming, target, param, roles[role]).items()]
        found.changes += self._fitting(changes, found)
        return scheme

    def replacement(self, key: str, entry: TensorEntry, found: LoraRead) -> bool:
        """A whole tensor in the file: a control LoRA's q/k norm (replaced), or a key that fits nowhere."""
        module, _, param = key.rpartition(".")
        resolved = self.resolve(module) if module else None
        if resolved and resolved[1] != "xlabs":
            refs = self._split(module, resolved[1], resolved[2], param, entry)
            if refs and self.tables.replaced and all(self.tables.replaced.search(k) for k in refs):
                found.changes += self._fitting([Change(k, "replace", ref, None, 1.0, module) for k, ref in refs.items()], found)
                return True
        why = "a whole tensor, not a LoRA module (fluxrecipe replaces only the q/k norm scales of control LoRAs)" if resolved else f"no {self.family.name} module has this name"
        found.unmatched.append((key, why))
        return False

    def _split(self, module: str, naming: str, target: str, param: str, entry: TensorEntry) -> dict[str, TensorRef]:
        """The canonical tensors (key -> rows of `entry`) that `entry`, the module's `param`, changes."""
        if naming == "canonical":
            key = f"{target}.{param}"
            return {key: TensorRef(self.name, key, entry.name, entry.dtype, entry.shape, _pieces(entry))}
        find = self.find
        if naming == "xlabs":
            group, index, processor = self.tables.xlabs.match(target).groups()
            if processor in self.tables.xlabs_double:
                target = f"{group}.{index}.{self.tables.xlabs_double[processor]}"
            else:  # a single block's qkv_lora: the rows of its fused projection that hold q, k and v
                target = f"{group}.{index}.{processor}"
                prefix = f"{self.family.bfl.group(group).canonical}.{index}."
                find = lambda k: (prefix, self.tables.xlabs_single_qkv, k.rsplit(".", 1)[1])  # noqa: E731
        try:
            refs, unknown = bfl.split(self.name, {f"{target}.{param}": entry}, self.hidden, self.family.name, find=find)
        except SourceError:
            raise SourceError(
                f"{self.where}: '{cut(entry.name)}' {list(entry.shape)} does not fit {self.family.name} of hidden size {self.hidden}: a LoRA for a model of another width?"
            ) from None
        return {} if unknown else refs

    def _fitting(self, changes: list[Change], found: LoraRead) -> list[Change]:
        """The changes whose tensor the output has; the others are listed as unmatched. A change whose shapes
        do not fit its tensor means the LoRA is for another model: an error."""
        fitting = []
        for c in changes:
            if self.implied and c.key not in self.shapes:
                self.shapes[c.key] = (c.tensor.shape[0], c.down.shape[1]) if c.kind == "product" else c.tensor.shape
            shape = self.shapes.get(c.key)
            if shape is None:
                found.unmatched.append((c.tensor.file_key, f"it changes '{cut(c.key)}', which the output does not have"))
                continue
            if c.kind == "product":
                fits = len(shape) == 2 and c.tensor.shape[0] == shape[0] and c.down.shape[1] == shape[1]
                got = f"up {list(c.tensor.shape)} x down {list(c.down.shape)}"
            else:
                fits, got = c.tensor.shape == shape, str(list(c.tensor.shape))
            if not fits:
                hint = ""
                if c.key == self.family.hidden_key and c.kind == "product" and c.down.shape[1] != shape[1] and self.tables.control_hint:
                    hint = f" (the LoRA's input layer takes {c.down.shape[1]} channels, the model {shape[1]}: {self.tables.control_hint})"
                raise SourceError(
                    f"{self.where}: '{cut(c.module)}' does not fit '{cut(c.key)}' {list(shape)}: it is {got}; a LoRA for another model (width, variant)?{hint}"
                )
            fitting.append(c)
        return fitting

    def _alpha(self, module: str, entry: TensorEntry | None, canonical: str | None) -> float | None:
        if entry is not None:
            if entry.numel != 1 or entry.dtype not in SCALARS:
                raise SourceError(f"{self.where}: '{cut(entry.name)}' is {entry.dtype} {list(entry.shape)}: an alpha is one number")
            value = read_scalar(entry)
            if not math.isfinite(value):
                raise SourceError(f"{self.where}: '{cut(entry.name)}' is {value}: an alpha must be a finite number")
            return value
        if self.alphas and canonical is not None:
            return self.alphas.alpha(canonical)
        return None


@dataclass(frozen=True)
class _PeftAlphas:
    """PEFT's LoraConfig as diffusers stores it in the header (`lora_adapter_metadata`): a module's alpha is
    the first `alpha_pattern` entry naming it (a module name, or a suffix of one after a dot; `^` anchors
    it at the start), else `lora_alpha`."""

    lora_alpha: float
    patterns: tuple[tuple[str, float], ...]
    rslora: bool

    def alpha(self, module: str) -> float:
        for pattern, value in self.patterns:
            if pattern.startswith("^") and module == pattern[1:] or module == pattern or module.endswith("." + pattern):
                return value
        return self.lora_alpha


def _peft_alphas(where: str, metadata: dict[str, str]) -> _PeftAlphas | None:
    raw = metadata.get("lora_adapter_metadata")
    if raw is None:
        return None
    try:
        config = json.loads(raw)
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
    except (ValueError, RecursionError) as e:
        raise SourceError(f"{where}: lora_adapter_metadata is not valid JSON ({e})") from None
    if any(k.startswith(PEFT_PREFIX) for k in config):  # a pipeline's file: one config per component
        config = {k[len(PEFT_PREFIX):]: v for k, v in config.items() if k.startswith(PEFT_PREFIX)}
    config = {**PEFT_DEFAULTS, **config}
    if config.get("use_dora"):
        raise SourceError(f"{where} is a DoRA (lora_adapter_metadata says use_dora): its magnitude rescales whole weights, which a LoRA bake-in does not do")
    patterns = config.get("alpha_pattern") or {}
    if not is_number(config["lora_alpha"]) or not isinstance(patterns, dict) or not all(is_number(v) for v in patterns.values()):
        raise SourceError(f"{where}: lora_adapter_metadata's lora_alpha / alpha_pattern are not numbers")
    for pattern in patterns:
        if re.search(r"[\\()\[\]{}*+?|$]", pattern.lstrip("^")):
            raise SourceError(f"{where}: lora_adapter_metadata's alpha_pattern {cut(pattern)!r} is a regular expression; fluxrecipe reads module names (optionally ^-anchored)")
    literal = tuple((p, float(v)) for p, v in patterns.items())
    return _PeftAlphas(float(config["lora_alpha"]), literal, bool(config.get("use_rslora")))


def _pieces(entry: TensorEntry) -> tuple[Piece, ...]:
    return (Piece(entry.file, entry.begin, entry.nbytes),) if entry.nbytes else ()


def _not_a_lora(keys: list[str]) -> str:
    """What a file without LoRA modules holds, as the end of a sentence."""
    from . import _looks_like

    stripped = [k[len(p):] for k in keys for p in families.comfyui_prefixes() if k.startswith(p)] or keys
    lycoris = next((k for k in keys if re.search(r"\.(lokr|hada)_", k)), None)
    if lycoris:
        return f"it is a LyCORIS LoKr/LoHa (it holds '{cut(lycoris)}'), which fluxrecipe does not bake"
    if families.recognise(stripped):
        return f"it holds no lora_up/lora_down or lora_A/lora_B matrices (nor .diff differences) but a model's weights ('{cut(keys[0])}', ...): use a model as one of the recipe's sources"
    return "it holds no lora_up/lora_down or lora_A/lora_B matrices (nor .diff differences); it " + _looks_like(keys)


# --- a merge written as a LoRA -----------------------------------------------------------------------------


def module_names(scheme: str, module: str) -> tuple[str, str, str | None]:
    """(down, up, alpha) tensor names of a module written in a LoRA key scheme: "kohya" and "comfyui" name
    BFL modules (kohya's `lora_unet_` and `_` for `.`; ComfyUI's `diffusion_model.` as its LoRA saver writes
    it), "diffusers" canonical ones (as diffusers' `save_lora_weights` writes them: no alpha tensor, PEFT's
    config holds the alphas)."""
    if scheme == "diffusers":
        return f"{PEFT_PREFIX}{module}.lora_A.weight", f"{PEFT_PREFIX}{module}.lora_B.weight", None
    base = KOHYA_PREFIX + module.replace(".", "_") if scheme == "kohya" else COMFYUI_LORA_PREFIX + module
    return f"{base}.lora_down.weight", f"{base}.lora_up.weight", f"{base}.alpha"


def peft_metadata(ranks: dict[str, int], rank: int, alphas: dict[str, float] | None = None) -> str:
    """`lora_adapter_metadata` for `load_lora_weights` / `load_lora_adapter`: PEFT's LoraConfig of the
    transformer, under diffusers' `transformer.` prefix: `r` = `rank` and `lora_alpha` = the most common alpha
    (`alphas`, module -> alpha; none: alpha = rank everywhere, so the scale is 1), the others as patterns. Its
    target_modules is a regex of exactly the modules the file holds: as a list, PEFT would also target every
    module whose name ends in one of them (`proj_out` is also each single block's)."""
    lora_alpha = rank if alphas is None else Counter(alphas.values()).most_common(1)[0][0]
    alphas = ranks if alphas is None else alphas
    odd_ranks = {f"^{m}": r for m, r in ranks.items() if r != rank}
    odd_alphas = {f"^{m}": a for m, a in alphas.items() if a != lora_alpha}
    targets = "^(?:" + "|".join(re.escape(m) for m in sorted(ranks)) + ")$"
    config = {
        "r": rank, "lora_alpha": lora_alpha, "rank_pattern": odd_ranks, "alpha_pattern": odd_alphas,
        "target_modules": targets, "lora_bias": False, "use_dora": False, "use_rslora": False,
    }
    return json.dumps({f"{PEFT_PREFIX}{k}": v for k, v in config.items()}, indent=2, sort_keys=True)
