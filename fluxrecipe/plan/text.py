"""The plan as a person reads it (format_plan: what a dry run prints), and byte counts as text."""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any

from .. import schedule
from ..formats import gguf_model
from ..text import printable, some_keys
from .data import Plan, PlannedRule


def format_plan(plan: Plan) -> str:
    """The plan as a person reads it: sources, per-rule counts and bytes, drops, totals, notes."""
    r = plan.recipe
    lines = [f"recipe {r.name}" + (f" ({r.file})" if r.file else "")]
    if r.description:
        lines.append(f"  {r.description}")
    if r.params:
        lines.append("  parameters: " + ", ".join(f"{k}={_brief(v)}" for k, v in r.params.items()))
    lines += ["sources:"] if plan.sources else []
    for s in plan.sources:
        where = ", ".join(f"{k} {v}" for k, v in s.origin.items())
        mark = "  (base)" if s.name == r.base else ""
        lines.append(f"  {s.name:<12} {s.spec}{mark}")
        lines.append(f"  {'':<12} {s.model}: {s.tensors} tensors ({s.layout} layout), {human_bytes(s.nbytes)}, {'/'.join(s.dtypes)}; {where}")
        lines.append(f"  {'':<12} {s.folder}" + ("" if s.downloaded else "  (headers read on the hub; weights not downloaded)"))
    where = f"one {plan.format} file, {plan.files[0].name}" if plan.single_file else f"a {plan.format} folder"
    if plan.lora_space:
        lines.append(f"output: {where}: a LoRA made of LoRAs, no model: {plan.lora_space.describe()}")
    elif plan.factors:
        matrices = [f for f in plan.factors if f.rank]
        exact = sum(f.exact for f in matrices)
        lines.append(
            f"output: {where}: a LoRA of rank {plan.lora_rank}, the difference between the recipe's result and base '{r.base}'; "
            f"{len(matrices)} matrices factored ({exact} by exact SVD, {len(matrices) - exact} by randomized SVD), the relative error of each reported after the run"
            + (f"; each matrix's rank the smallest keeping {plan.lora_energy:g} of its squared norm, at most {plan.lora_rank}" if plan.lora_energy is not None else "")
        )
    else:
        flag = "".join(f", {f}: {json.dumps(plan.config[f])}" for f in plan.family.flags if f in plan.config)
        lines.append(f"output: {where}; {r.base}'s architecture ({plan.config.get('_class_name')}{flag})")
    if plan.gguf_type:
        lines.append(f"gguf types (gguf_type={plan.gguf_type}; 1-D and small tensors F32, the family's outer layers BF16, unless a rule names a dtype):")
        lines += gguf_model.type_lines(plan.files[0])
    lines += ["rules:"] if plan.recipe.rules else []
    width = max((len(repr(x.rule.match)) for x in plan.rule_stats()), default=0)
    for x in plan.rule_stats():
        src = f" over {', '.join(x.rule.sources)}" if x.rule.op.spec.over_rule_sources else ""
        dtype = f" -> {x.rule.dtype}" if x.rule.dtype else ""
        lines.append(
            f"  [{x.rule.index}] {x.rule.match!r:<{width}}  {_op_text(x.rule) + src + dtype:<32} {x.keys:>5} keys"
            f"  read {human_bytes(x.bytes_read):>9}  write {human_bytes(x.bytes_written):>9}"
        )
        lines += _block_values(plan, x.rule)
    if plan.loras:
        lines.append("loras (combined as LoRAs):" if plan.lora_space else "loras (added to the rules' result in float32, before the one rounding):")
        for lora in plan.loras:
            lines.append(f"  {lora.name:<12} {lora.spec}")
            lines.append(f"  {'':<12} {lora.describe()}")
    if plan.dropped:
        lines.append(f"dropped ({len(plan.dropped)} keys):")
        by_reason: dict[str, list[str]] = defaultdict(list)
        for d in plan.dropped:
            by_reason[d.reason].append(d.key)
        for reason, keys in by_reason.items():
            lines.append(f"  {reason}: {some_keys(keys)}")
    copies = 0 if plan.factors else sum(s.copies_bytes for s in plan.steps)
    dtypes = "/".join(sorted({s.dtype + (" scaled" if s.scaled else "") for s in plan.steps} | ({plan.lora_space.dtype} if plan.lora_space else set())))
    tensors = sum(len(f.entries()) for f in plan.files)
    lines.append(
        f"total: {tensors} tensors in {len(plan.files)} file(s), {dtypes}; "
        f"read {human_bytes(plan.bytes_read)}, write {human_bytes(plan.bytes_written)}"
        + (f"; {copies} tensors copied byte for byte" if copies else "")
    )
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(printable(line) for line in lines)


def _brief(value: Any) -> str:
    """A recipe parameter for the plan's header: a long schedule is printed block by block under its rules."""
    if not isinstance(value, (list, dict)):
        return str(value)
    text = str(schedule.parse(value))
    return text if len(text) <= 80 else "per block (values under the rules)"


def _op_text(rule: PlannedRule) -> str:
    """The op as the rules table shows it: a schedule (printed block by block below) as `per block`."""
    scheduled = {n for n, v in rule.params.items() if schedule.schedules_in(v)}
    if not scheduled:
        return str(rule.op)
    shown = ", ".join(f"{n}: per block" if n in scheduled else f"{n}: {v}" for n, v in rule.op.params)
    return f"{rule.op.name}{{{shown}}}"


def _block_values(plan: Plan, rule: PlannedRule) -> list[str]:
    """The value each block gets from the rule's scheduled parameters, in model order; a run of blocks with
    the same value on one line."""
    lines = []
    for name in (n for n, v in rule.params.items() if schedule.schedules_in(v)):
        per_block = {}
        for step in plan.steps:
            if step.rule == rule.index:
                per_block.setdefault(plan.family.block_of(step.key) or step.key, step.values[name])
        runs: list[list] = []  # [first block, last block, value]
        for block in sorted(per_block, key=plan.family.block_order):
            if runs and runs[-1][2] == per_block[block]:
                runs[-1][1] = block
            else:
                runs.append([block, block, per_block[block]])
        lines.append(f"      {name} by block:")
        width = max(len(_run_name(a, b)) for a, b, _ in runs)
        lines += [f"        {_run_name(a, b):<{width}}  {_number_text(v)}" for a, b, v in runs]
    return lines


def _run_name(first: str, last: str) -> str:
    return first if first == last else f"{first} .. {last}"


def _number_text(value: Any) -> str:
    if isinstance(value, tuple):
        return "[" + ", ".join(_number_text(v) for v in value) + "]"
    return schedule.number_text(value)


def human_bytes(n: float) -> str:
    if n < 1000:
        return f"{n:.0f} B"
    for unit in ("KB", "MB", "GB", "TB"):
        n /= 1000
        if n < 1000 or unit == "TB":
            return f"{n:.2f} {unit}"
