"""The model card (README.md) written beside every merged model: what it is, made from what, how to load it.

A merged folder gets shared (on the hub, between people), and the card is what travels with it: the sources
pinned to what was read, the rules as they were applied, the licence caveat, and how to rebuild it.
"""

from __future__ import annotations

from ..loras import blocks_text
from ..plan import Plan, human_bytes
from ..text import markdown_code, markdown_text

RANDOM_WARNING = (
    "> **RANDOM WEIGHTS - NOT A MODEL.** This merge was made from fluxrecipe's generated demo checkpoints, whose\n"
    "> weights are random noise. It shows the merge path; it does not make images.\n"
)


def model_card(plan: Plan) -> str:
    r, family = plan.recipe, plan.family
    base = next(s for s in plan.sources if s.name == r.base)
    lines = [f"# {markdown_text(r.name)}: a {family.name} transformer merged by fluxrecipe", ""]
    if any("demo" in s.origin for s in plan.sources):
        lines += [RANDOM_WARNING]
    if r.description:  # a stranger's text: shown as text, never as Markdown or HTML
        lines += [markdown_text(r.description), ""]
    dtypes = "/".join(sorted({s.dtype + (" scaled" if s.scaled else "") for s in plan.steps}))
    lines += [
        f"Architecture: `{plan.config.get('_class_name')}` of source `{r.base}` "
        f"({base.model}), {len(plan.steps)} tensors, "
        f"{dtypes}, {human_bytes(plan.bytes_written)}, in {plan.format} layout.",
        "",
        "## Sources",
        "",
        "| name | given as | read from |",
        "|---|---|---|",
    ]
    for s in plan.sources:
        origin = ", ".join(f"{k} {markdown_code(v)}" for k, v in s.origin.items())
        lines.append(f"| {s.name}{' (base)' if s.name == r.base else ''} | {markdown_code(s.spec)} | {origin} |")
    lines += ["", "## Rules (first match wins)", "", "| # | match | op | inputs | keys |", "|---|---|---|---|---|"]
    for x in plan.rule_stats():
        lines.append(f"| {x.rule.index} | {markdown_code(x.rule.match)} | {markdown_code(str(x.rule.op))} | {', '.join(x.rule.sources) or '-'} | {x.keys} |")
    if plan.loras:
        lines += ["", "## LoRAs baked in (before the one rounding)", "", "| name | file | format | strength | changes |", "|---|---|---|---|---|"]
        for lora in plan.loras:
            lines.append(f"| {markdown_text(lora.name)} | {markdown_code(lora.spec)} | {lora.format} | {markdown_text(str(lora.strength))} | {lora.tensors} tensors in {blocks_text(lora.blocks)} |")
    if plan.dropped:
        lines += ["", f"{len(plan.dropped)} keys of the sources are not in the output (see fluxrecipe.json for each and why)."]
    if plan.notes:
        lines += ["", *[f"Note: {markdown_text(n)}." for n in plan.notes]]
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "import torch",
        f"from diffusers import {family.class_name}",
        "",
        f'transformer = {family.class_name}.from_pretrained("PATH/TO/THIS/FOLDER", torch_dtype=torch.bfloat16)',
        "```",
        "",
        f"Pass it to a `{family.preview(plan.config).pipeline}` of the base model's repo (`transformer=transformer`).",
        "",
        "## Licence",
        "",
        f"Merged weights are derived from every source: they carry the terms of each source's licence together ({family.licences}).",
        "",
        "## Rebuild",
        "",
        "`recipe.yaml` here is the recipe with its sources pinned (hub repos to their commit, local folders by their",
        "path relative to this folder); run `python -m fluxrecipe recipe=THIS_FOLDER/recipe.yaml output=NEW_FOLDER`.",
        "`fluxrecipe.json` records what was read,",
        "`fluxrecipe.manifest.json` the sha256 of every file (`python -m fluxrecipe verify FOLDER` checks them),",
        "`diagnostics.json` how far each block moved from each source.",
        "",
    ]
    return "\n".join(lines)
