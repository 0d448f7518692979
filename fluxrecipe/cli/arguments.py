"""The command line as Hydra should see it, and the mistakes Hydra would answer with a page of text (or a
wrong piece of advice), each turned into one line before Hydra starts.

- `recipe=NAME` is a recipe on the search path, and a mistyped name is one line ("did you mean");
  `recipe=PATH.yaml` runs that exact file (a whole value that is a file is one path, commas and all); a
  recipe choice that Hydra would read as something else goes to it quoted (`recipe=2024` is a name);
- `dryrun=true` or `+dryrun=true`: an option fluxrecipe does not have, named with the closest it has;
- `preview=true` is short for `preview.enabled=true`;
- in a multirun, `recipe.KEY=V` applies to every job, whichever recipe it chose.
"""

from __future__ import annotations

import os
import re

from hydra.core.override_parser.overrides_parser import OverridesParser

from ..catalog import is_recipe_path, recipe_file, recipe_problem
from ..errors import UsageError
from ..recipe import BLOCK_OVERRIDES_ENV
from .options import default_of, deleted_option, unknown_option

# `recipe.alpha.double_blocks.7=V`, `recipe.loras.style.strength.single_blocks=V`: one block of a schedule
BLOCK_OVERRIDE = re.compile(
    r"\+?recipe\.(?P<param>[A-Za-z_][\w-]*|loras\.[A-Za-z_][\w-]*\.strength)\."
    r"(default|img_in|time_in|guidance_in|vector_in|txt_in|final_layer|(double_blocks|single_blocks)(\.\w+)?)=.*",
    re.S,
)
OVERRIDE = re.compile(r"(\+{0,2})([A-Za-z_][\w-]*(?:\.[\w-]+)*)=(.*)", re.S)
DELETION = re.compile(r"~([A-Za-z_][\w-]*(?:\.[\w-]+)*)(=.*)?", re.S)
# Hydra's flags that take the next argument as their value (not an override)
VALUE_FLAGS = {"-sc", "--shell-completion", "-cp", "--config-path", "-cn", "--config-name", "-cd", "--config-dir", "-p", "--package", "--info", "--experimental-rerun"}
PREVIEW_SWITCH = "preview.enabled"


def is_multirun(argv: list[str]) -> bool:
    return any(a in ("-m", "--multirun", "hydra.mode=MULTIRUN") for a in argv)


def preview_switch(arg: str) -> str:
    """`preview=true` is short for `preview.enabled=true` (`preview` also holds the settings, `preview.steps=8`).

    Hydra can neither assign a value to a node that holds settings nor choose a config group by a boolean,
    so the short form is spelled out before Hydra sees it (a sweep, `preview=true,false`, as well)."""
    return re.sub(r"^\+{0,2}preview=", f"{PREVIEW_SWITCH}=", arg)


def command_line(args: list[str]) -> list[str]:
    """The overrides as Hydra should see them (see the module's docstring); raises UsageError for a mistake."""
    multirun = is_multirun(args)
    out, blocks = [], []
    for previous, arg in zip([None, *args], args):
        if previous in VALUE_FLAGS:
            out.append(arg)
            continue
        arg = preview_switch(arg)
        block = BLOCK_OVERRIDE.fullmatch(arg)
        if block:  # the recipe loader gives this parameter a shape the block can be added to
            blocks.append(block["param"])
        m = OVERRIDE.fullmatch(arg)
        if m and (message := unknown_option(m[2])):
            raise UsageError(message)
        deleted = DELETION.fullmatch(arg)
        if deleted and (default := default_of(deleted[1])) is not None:
            raise UsageError(deleted_option(deleted[1], default[0]))
        if m and m[1] == "" and m[2] == "recipe" and not re.match(r"\w+\(", m[3]):  # not a sweep function
            arg = "recipe=" + ",".join(_recipe_choice(v, multirun) for v in _recipe_values(m[3]))
        out.append(arg)
    if blocks:
        os.environ[BLOCK_OVERRIDES_ENV] = ",".join(dict.fromkeys(blocks))
    return defer_recipe_overrides(out) if multirun else out


def _recipe_values(value: str) -> list[str]:
    """The recipes of `recipe=VALUE`: one file, when the whole value is one (a sweep's job folder has commas
    in its name), else the comma-separated choices of a sweep."""
    return [value] if is_recipe_path(value) and recipe_file(value) is not None else value.split(",")


def _recipe_choice(value: str, multirun: bool) -> str:
    """One recipe choice, checked (a sweep's pre-flight reports it with the sweep's other problems), as Hydra
    should read it."""
    if not multirun and (problem := recipe_problem(value)):
        raise UsageError(problem)
    return _hydra_string(value)


def _hydra_string(text: str) -> str:
    """`text` written so that Hydra's override parser reads back that very string: as it is where it would
    (a plain name keeps the job folders' names plain), else quoted (a backslash escapes a quote, and itself
    before a quote or at the end)."""
    try:
        if OverridesParser.create().parse_override(f"recipe={text}").value() == text:
            return text
    except Exception:  # noqa: BLE001 - any value the parser refuses is quoted
        pass
    escaped = re.sub(r"(\\*)('|$)", lambda q: q[1] * 2 + ("\\'" if q[2] else ""), text)
    return f"'{escaped}'"


# --- a multirun ---------------------------------------------------------------------------------------------


def defer_recipe_overrides(argv: list[str]) -> list[str]:
    """`-m recipe=a,b recipe.alpha=0.2`: make `recipe.alpha=0.2` a sweep of one value, applied per job.

    Hydra composes a multirun's own config without its sweeps, so where the recipe is swept (on the command
    line or in a sweep file) that config has no `recipe` node and a plain `recipe.X=V` cannot be applied to
    it ("Key 'recipe' is not in struct"). As a sweep of one value, `recipe.X=choice(V)`, it is applied to
    each job's config only, where the recipe is chosen; each job gets exactly `recipe.X=V`.
    """
    parser = OverridesParser.create()
    out = []
    for arg in argv:
        if re.match(r"\+*recipe\.", arg):
            try:
                o = parser.parse_override(arg)
            except Exception:  # noqa: BLE001 - not an override we understand: Hydra will say what is wrong
                o = None
            if o is not None and not o.is_sweep_override() and not o.is_delete():
                arg = f"{o.get_key_element()}=choice({o.get_value_element_as_str()})"
        out.append(arg)
    return out
