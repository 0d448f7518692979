"""The command line as Hydra should see it, and the mistakes Hydra would answer with a page of text (or a
wrong piece of advice), each turned into one line before Hydra starts.

- `recipe=NAME` is a recipe on the search path, and a mistyped name is one line ("did you mean");
  `recipe=PATH.yaml` runs that exact file (a whole value that is a file is one path, commas and all); a
  recipe choice that Hydra would read as something else goes to it quoted (`recipe=2024` is a name);
- `dryrun=true` or `+dryrun=true`: an option fluxrecipe does not have, named with the closest it has;
- `recipe.KEY=V` where the recipe has no KEY: a field or setting a recipe may have (`recipe.dtype`,
  `recipe.rules.2.dtype`) is set (Hydra wants `+` to add it); anything else is a typo, said with the closest
  name the recipe has (Hydra would advise `+recipe.KEY=V`, which adds a value that changes nothing), and so
  is `~recipe.KEY`; a block of a schedule is a block name (schedule's), and below a value that is no mapping
  (`recipe.base.path=`) nothing can be set;
- `+recipe.KEY=V` (Hydra's habit) sets KEY where the recipe has it already, as `recipe.KEY=V` does (Hydra
  would refuse it, with the advice to add a second `+`);
- `preview=true` is short for `preview.enabled=true`; a launcher or previews whose optional extra is not
  installed is one line naming the `pip install` that adds it (not an ImportError's traceback); a launcher
  is chosen, `+` or not; a launcher without -m, or a launcher's setting (`hydra.launcher.n_jobs=4`) without
  that launcher, is refused (it would change nothing);
- a range of blocks, `recipe.alpha.double_blocks.0-9=V`, is set as Hydra can read it (BLOCK_RANGE);
- in a multirun, `recipe.KEY=V` applies to every job, whichever recipe it chose (defer_recipe_overrides).
"""

from __future__ import annotations

import difflib
import os
import re
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from .. import extras
from ..catalog import is_recipe_path, recipe_file, recipe_problem
from ..errors import UsageError
from ..recipe import BLOCK_OVERRIDES_ENV, LORA_FIELDS, RECIPE_FIELDS, RULE_FIELDS, SOURCE_FIELDS, load_recipe_file
from .. import schedule
from ..schedule import DEFAULT, FINAL, GROUPS, TOP
from ..text import cut, printable
from .options import default_of, deleted_option, unknown_option

# `recipe.alpha.GROUP.7=V`, `recipe.loras.style.strength.GROUP=V`: one block (or range, or group) of a
# schedule, in the block names of any family (schedule's vocabulary)
BLOCK_OVERRIDE = re.compile(
    r"\+{0,2}recipe\.(?P<param>[A-Za-z_][\w-]*|loras\.[A-Za-z_][\w-]*\.strength)\."
    rf"({'|'.join(map(re.escape, (DEFAULT, *TOP, *FINAL)))}|({'|'.join(map(re.escape, GROUPS))})(\.[\w-]+)?)=.*",
    re.S,
)
# `recipe.alpha.double_blocks.0-9=V`: a range of blocks, which Hydra cannot read as a key (a part that begins
# with a digit and holds '-'); it is set as `recipe.alpha.double_blocks={0-9: V}`, which Hydra merges in
BLOCK_RANGE = re.compile(r"(\+{0,2})(recipe\.[\w.-]+)\.(\d+-\d+)=(.*)", re.S)
OVERRIDE = re.compile(r"(\+{0,2})([A-Za-z_][\w-]*(?:\.[\w-]+)*)=(.*)", re.S)
DELETION = re.compile(r"~([A-Za-z_][\w-]*(?:\.[\w-]+)*)(=.*)?", re.S)
# Hydra's flags that take the next argument as their value (not an override)
VALUE_FLAGS = {"-sc", "--shell-completion", "-cp", "--config-path", "-cn", "--config-name", "-cd", "--config-dir", "-p", "--package", "--info", "--experimental-rerun"}
PREVIEW_SWITCH = "preview.enabled"
LAUNCHER = re.compile(r"\+{0,2}(hydra/launcher=([\w-]+))")
BASIC_LAUNCHER = "basic"  # Hydra's own: one job after another, no settings
SWEEPER = re.compile(r"\+{0,2}(hydra/sweeper=[\w-]+)")  # a plugin's extra, said before Hydra starts


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
    recipes = _chosen_recipes(args, multirun)
    launchers = {launcher[2] for arg in args if (launcher := LAUNCHER.fullmatch(arg))}
    sweep_file = any(re.match(r"\+{0,2}sweep=", arg) for arg in args)
    out, blocks = [], []
    for previous, arg in zip([None, *args], args):
        if previous in VALUE_FLAGS:
            out.append(arg)
            continue
        arg = preview_switch(arg)
        if launcher := LAUNCHER.fullmatch(arg):
            arg = launcher[1]  # a choice, not an addition (`+hydra/launcher=` is Hydra's 'Multiple values')
            if not multirun and launcher[2] != BASIC_LAUNCHER:
                raise UsageError(f"{arg} changes nothing without -m: a launcher runs the jobs of a sweep, and a single run is one job; add -m")
            if missing := extras.missing(arg):
                raise UsageError(missing)
        if (sweeper := SWEEPER.fullmatch(arg)) and (missing := extras.missing(sweeper[1])):
            raise UsageError(missing)
        arg = _block_range(arg)
        block = BLOCK_OVERRIDE.fullmatch(arg)
        if block:  # the recipe loader gives this parameter a shape the block can be added to
            blocks.append(block["param"])
        m = OVERRIDE.fullmatch(arg)
        if m and (message := unknown_option(m[2])):
            raise UsageError(message)
        if m and m[2].startswith("hydra.launcher.") and launchers <= {BASIC_LAUNCHER} and not sweep_file:  # (which may choose one)
            others = [f.partition("=")[2] for features in extras.EXTRAS.values() for f in features if f.startswith("hydra/launcher=")]
            raise UsageError(
                f"{m[2]}={m[3]} changes nothing: the basic launcher (the default) runs the jobs one at a time and has no settings; "
                f"choose the launcher it belongs to first: hydra/launcher={', '.join(others[:-1])} or {others[-1]}"
            )
        deleted = DELETION.fullmatch(arg)
        if deleted and (default := default_of(deleted[1])) is not None:
            raise UsageError(deleted_option(deleted[1], default[0]))
        if deleted and deleted[1].startswith("recipe."):
            _check_recipe_path(deleted[1], recipes, deleting=True)
        if m and m[1] == "" and m[2] == "recipe" and not re.match(r"\w+\(", m[3]):  # not a sweep function
            arg = "recipe=" + ",".join(_recipe_choice(v, multirun) for v in _recipe_values(m[3]))
        elif m and m[2].startswith("recipe."):
            added = _check_recipe_path(m[2], recipes, given_plus=bool(m[1]))
            arg = f"{'++' if added or m[1] else ''}{m[2]}={m[3]}"
        if m and m[2] == PREVIEW_SWITCH and "true" in m[3].lower() and (missing := extras.missing("preview=true")):
            raise UsageError(missing)
        out.append(arg)
    if blocks:
        os.environ[BLOCK_OVERRIDES_ENV] = ",".join(dict.fromkeys(blocks))
    return out


def _block_range(arg: str) -> str:
    """`recipe.P.GROUP.N-M=V` as Hydra can read it: `recipe.P.GROUP={N-M: V}` (see BLOCK_RANGE)."""
    r = BLOCK_RANGE.fullmatch(arg)
    if r is None or not BLOCK_OVERRIDE.fullmatch(arg):
        return arg
    try:
        float(r[4])
    except ValueError:
        raise UsageError(
            f"{r[2]}.{r[3]}={r[4]}: Hydra reads no key that begins with a digit and holds '-': write the range in the value, as '{r[2]}={{{r[3]}: VALUE}}'"
        ) from None
    return f"{r[1]}{r[2]}={{{r[3]}: {r[4]}}}"


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


# --- recipe values on the command line --------------------------------------------------------------------


def _chosen_recipes(args: list[str], multirun: bool) -> dict[str, Any]:
    """Recipe choice -> its values as written (plain data), for every recipe the command line chooses and
    that can be read (a missing or broken one is said where it is chosen, or in the sweep's pre-flight)."""
    chosen: dict[str, Any] = {}
    for previous, arg in zip([None, *args], args):
        m = OVERRIDE.fullmatch(arg) if previous not in VALUE_FLAGS else None
        if not m or m[1] or m[2] != "recipe" or re.match(r"\w+\(", m[3]):
            continue
        chosen = {}  # the last recipe= wins, as in Hydra
        for value in _recipe_values(m[3]) if multirun else [m[3]]:
            file = recipe_file(value)
            node = load_recipe_file(file) if file is not None else None
            if node is not None and "__load_error__" not in node:
                chosen[value] = OmegaConf.to_container(node, resolve=False)
    return chosen


def _check_recipe_path(key: str, recipes: dict[str, Any], given_plus: bool = False, deleting: bool = False) -> bool:
    """Whether `recipe.KEY=V` adds a value some chosen recipe does not have yet (Hydra wants `++` for it); a
    UsageError where Hydra could not apply it: a name the recipe lacks where it may hold no new one (a typo,
    said with the closest name it has; with `+` the user adds it on purpose, and the recipe loader checks
    it), a schedule's block that is no block name, a path below a value that is no mapping."""
    path = key.split(".")[1:]
    added = False
    for choice, data in recipes.items():
        walked, node = _walk(data, path)
        if len(walked) == len(path):
            continue
        rest = path[len(walked):]
        schedule_at = _schedule_path(data, path)
        if schedule_at is not None and len(walked) >= schedule_at and not deleting:
            _check_block_name(key, ".".join(path[schedule_at:]))
            added = True
        elif not isinstance(node, (dict, list)) and node is not None:
            place = "recipe." + ".".join(walked)
            raise UsageError(f"{key}: recipe {choice!r} gives {place} one value ({cut(printable(str(node)))!r}), not a mapping: set {place}=VALUE")
        elif not deleting and (given_plus or node is None or _may_hold(walked, rest[0])):
            added = True
        else:
            known = sorted({*map(str, _keys(node)), *(_allowed(walked) or ())}, key=str)
            close = difflib.get_close_matches(rest[0], known, n=1, cutoff=0.6)
            hint = f"did you mean recipe.{'.'.join([*walked, close[0]])}?" if close else f"it has: {', '.join(known) or 'nothing there'}"
            shown = "recipe." + ".".join([*walked, rest[0]])
            raise UsageError(f"{'~' + shown if deleting else shown}: recipe {choice!r} has no {rest[0]!r} ({hint})")
    return added


def _walk(data: Any, path: list[str]) -> tuple[list[str], Any]:
    """How far `path` leads into a recipe's data (the names found), and the value it reached there."""
    node, walked = data, []
    for name in path:
        if isinstance(node, dict) and name in node:
            node = node[name]
        elif isinstance(node, list) and name.isdigit() and int(name) < len(node):
            node = node[int(name)]
        else:
            break
        walked.append(name)
    return walked, node


def _schedule_path(data: dict, path: list[str]) -> int | None:
    """The length of the part of `path` that names a schedule the recipe has (a parameter, a LoRA's
    strength), where `path` goes below it to a block; else None."""
    if len(path) > 1 and path[0] not in RECIPE_FIELDS and path[0] in data:
        return 1
    loras = data.get("loras")
    if len(path) > 3 and path[0] == "loras" and path[2] == "strength" and isinstance(loras, dict) and path[1] in loras:
        return 3
    return None


def _check_block_name(key: str, name: str) -> None:
    """A block of a schedule, `recipe.alpha.NAME=V`, named as a schedule names it (schedule's words)."""
    try:
        schedule.parse({name: 0.0})
    except ValueError as e:
        raise UsageError(f"{key}: {e}") from None


def _may_hold(walked: list[str], name: str) -> bool:
    allowed = _allowed(walked)
    return allowed is None or name in allowed


def _allowed(walked: list[str]) -> tuple[str, ...] | None:
    """What a recipe may hold below `walked` that it need not have yet: a recipe's fields at the top, a
    source's, LoRA's or rule's fields in one; anything (None) in `config` and deeper (an op's arguments, a
    schedule's blocks), where the recipe loader checks it; nothing new in the mappings the recipe itself
    names (its sources, LoRAs, rules and parameters)."""
    if not walked:
        return RECIPE_FIELDS
    if walked[0] == "config" or len(walked) > 2:
        return None
    return {"sources": SOURCE_FIELDS, "loras": LORA_FIELDS, "rules": RULE_FIELDS}.get(walked[0], ()) if len(walked) == 2 else ()


def _keys(node: Any) -> list:
    if isinstance(node, dict):
        return list(node)
    return [str(i) for i in range(len(node))] if isinstance(node, list) else []


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
