"""The README is the front door and docs/ the rest: what they tell a newcomer to install, type and expect is
what the project does.

- Their recipes run (on tiny stand-ins for their hub sources) and give a model diffusers loads (a folder), or
  a single file fluxrecipe's verify accepts.
- The README's commands run as written, in order, in a fresh folder, with its hub models replaced by tiny
  stand-ins of FLUX.1's depth (19 double and 38 single blocks); a sweep's jobs are planned.
- Every other command of the docs passes what the command line checks before Hydra (options, recipe names)
  and Hydra's composition, job by job; subcommands and benchmark scripts know the flags the docs give them.
- The command-line reference lists every option of conf/config.yaml, with its default, and no other.
docs/cookbook.md runs for real: tests/test_cookbook.py."""

from __future__ import annotations

import itertools
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from conftest import REPO_ROOT, compose, make_flux, merge, write_recipe

README = (REPO_ROOT / "README.md").read_text()
DOCS = {path.name: path.read_text() for path in sorted((REPO_ROOT / "docs").glob("*.md"))}
PAGES = {"README.md": README, **DOCS}
BUILTIN_RECIPES = {path.stem for path in (REPO_ROOT / "recipes").glob("*.yaml")}
HUB_MODELS = {"black-forest-labs/FLUX.1-schnell": "schnell", "black-forest-labs/FLUX.1-Krea-dev": "krea", "black-forest-labs/FLUX.1-dev": "dev"}
TITLED = re.compile(r"# (?:\S+/)?(\w+)\.yaml\b")  # a yaml block's first line naming its file: `# mine.yaml: ...`


def fenced(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```$", text, re.S | re.M)


RECIPES = {text: f"{page}:{i}" for page, body in PAGES.items() for i, text in enumerate(b for b in fenced(body, "yaml") if "rules:" in b)}


def commands(text: str) -> list[list[str]]:
    """The commands of a page's ```sh blocks, continued lines joined and comments dropped, split as the shell
    splits them; leading VAR=value assignments dropped."""
    found = []
    for block in fenced(text, "sh"):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
                words = words[1:]
            if words:
                found.append(words)
    return found


def fluxrecipe_args(words: list[str]) -> list[str] | None:
    """The arguments of a `fluxrecipe` (or `python -m fluxrecipe`) command, else None."""
    if words[:1] == ["fluxrecipe"]:
        return words[1:]
    if words[:3] == ["python", "-m", "fluxrecipe"]:
        return words[3:]
    return None


def test_the_pages_have_recipes_and_commands():
    assert len(RECIPES) >= 8 and sum(1 for c in commands(README) if fluxrecipe_args(c)) >= 10
    assert README.count("\n") < 250  # a front door; the rest is in docs/


def lora_stand_in(path: Path) -> Path:
    """A tiny kohya LoRA (rank 4, on the first double block's image q/k/v) for a LoRA a page names."""
    g = torch.Generator().manual_seed(0)
    save_file({
        "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.randn(4, 32, generator=g).to(torch.bfloat16),
        "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.randn(96, 4, generator=g).to(torch.bfloat16),
    }, path)
    return path


@pytest.fixture(scope="module")
def family_stand_ins(tmp_path_factory) -> dict[str, Path]:
    """Tiny stand-ins for the hub models of the other families that the docs' recipes name: repo -> folder."""
    from chroma_helpers import make_chroma
    from flux3_helpers import make_flux3

    root = tmp_path_factory.mktemp("families")
    return {
        "lodestones/Chroma1-HD": make_chroma(root / "chroma-hd", seed=70),
        "lodestones/Chroma1-Base": make_chroma(root / "chroma-base", seed=71),
        "black-forest-labs/flux-3-image-klein": make_flux3(root / "flux3", distilled=True, seed=72),
        "black-forest-labs/flux-3-image-klein-base": make_flux3(root / "flux3-base", distilled=False, seed=73),
    }


@pytest.mark.diffusers
@pytest.mark.parametrize("text", list(RECIPES), ids=list(RECIPES.values()))
def test_a_documented_recipe_runs_and_loads(text, recipe_dir, tmp_path, schnell, krea, dev, family_stand_ins):
    import diffusers  # here, not at import: see conftest on HF_HUB_OFFLINE

    from fluxrecipe.verify import verify_file

    stand_ins = {"schnell": schnell, "krea": krea, "dev": dev}
    recipe = yaml.safe_load(text)
    if recipe.get("loras"):  # stand-ins for its LoRAs, at the strengths it gives
        lora = lora_stand_in(tmp_path / "lora.safetensors")
        recipe["loras"] = {name: {"path": str(lora), "strength": spec.get("strength", 1.0)} for name, spec in recipe["loras"].items()}
        text = yaml.safe_dump(recipe, sort_keys=False)
    write_recipe(recipe_dir, "readme", text)
    single = recipe.get("format") in ("bfl", "comfyui", "gguf")
    out = tmp_path / (f"out.{'gguf' if recipe.get('format') == 'gguf' else 'safetensors'}" if single else "out")
    sources = {n: family_stand_ins.get(spec) if isinstance(spec, str) and spec in family_stand_ins else stand_ins.get(n, krea) for n, spec in recipe["sources"].items()}
    merge(["recipe=readme", f"output={out}", "progress=false", *(f"recipe.sources.{n}={path}" for n, path in sources.items())])
    if single:
        assert verify_file(out).problems == []
        return
    model_class = getattr(diffusers, json.loads((out / "config.json").read_text())["_class_name"])
    model, info = model_class.from_pretrained(out, output_loading_info=True)
    assert info["missing_keys"] == info["unexpected_keys"] == []
    if model_class is diffusers.FluxTransformer2DModel:
        assert model.config.guidance_embeds == recipe.get("config", {}).get("guidance_embeds", recipe.get("base") != "schnell")


# --- the README's commands, run ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def deep_stand_ins(tmp_path_factory) -> dict[str, Path]:
    """The README's hub models at FLUX.1's depth (19 double, 38 single blocks) and a tiny width: its per-block
    commands name FLUX.1's blocks."""
    root = tmp_path_factory.mktemp("hub")
    return {
        name: make_flux(root / name / "transformer", guidance=guidance, seed=seed, num_layers=19, num_single_layers=38)
        for name, guidance, seed in (("schnell", False, 0), ("krea", True, 1), ("dev", True, 2))
    }


def hub_sources(recipe: str) -> dict[str, str]:
    """A built-in recipe's sources that are hub repos: name -> repo."""
    sources = yaml.safe_load((REPO_ROOT / "recipes" / f"{recipe}.yaml").read_text()).get("sources", {})  # LoRAs alone: none
    return {name: spec for name, spec in sources.items() if isinstance(spec, str) and spec in HUB_MODELS}


def jobs(overrides: list[str]) -> list[list[str]]:
    """A multirun's jobs, as Hydra's basic sweeper makes them: every combination of the swept values."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    choices = [
        [f"{o.get_key_element()}={o.value().start}"] if o.is_interval_sweep()  # a search's range (hydra/sweeper=optuna): its low end
        else [f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()] if o.is_sweep_override() else [o.input_line]
        for o in OverridesParser.create().parse_overrides(overrides)
    ]
    return [list(job) for job in itertools.product(*choices)]


def test_the_readmes_commands_run_as_written(tmp_path, monkeypatch, deep_stand_ins):
    """In order, as a newcomer types them: each one's files are there for the next (the fp8 conversion reads
    the merge, the bake reads the extracted LoRA). `hf download` writes the stand-in's Black Forest Labs file."""
    from fluxrecipe.cli.arguments import command_line
    from fluxrecipe.recipe import BLOCK_OVERRIDES_ENV

    monkeypatch.chdir(tmp_path)
    stand_in = {repo: str(deep_stand_ins[name]) for repo, name in HUB_MODELS.items()}
    ran = 0
    for words in commands(README):
        if words[:2] == ["hf", "download"]:
            repo, file, folder = words[2], words[3], words[words.index("--local-dir") + 1]
            merge(["recipe=to_diffusers", f"recipe.sources.model={stand_in[repo]}", "format=bfl", f"output={Path(folder) / file}", "progress=false"])
            continue
        args = fluxrecipe_args(words)
        if args is None or args == ["--version"]:
            continue  # set-up (make, pip, venv, hf auth login): the Makefile's tests and `make test` itself
        args = [re.sub(r"=(.*)$", lambda m: "=" + stand_in.get(m[1], m[1]), a) for a in args]
        args = [re.sub(r"^lora_rank=\d+$", "lora_rank=16", a) for a in args]  # the stand-ins' matrices are 32 wide
        recipe = next(a.partition("=")[2] for a in args if a.startswith("recipe="))
        given = {a.partition("=")[0] for a in args}
        args += [f"recipe.sources.{name}={stand_in[repo]}" for name, repo in hub_sources(recipe).items() if f"recipe.sources.{name}" not in given]
        monkeypatch.setenv(BLOCK_OVERRIDES_ENV, "")
        args = command_line(args)  # as `fluxrecipe` hands them to Hydra
        if "-m" in args:  # each job planned, as the sweep's pre-flight does
            for number, job in enumerate(jobs([a for a in args if a != "-m"])):
                merge([a for a in job if not a.startswith("hydra.sweep.")] + ["dry_run=true", f"output={tmp_path / 'sweep' / str(number)}", "progress=false"])
        else:  # Hydra's run folder, where no output= is given: here, in-process, none is made
            merge([*args, *([] if "output" in given else [f"output={tmp_path / 'run' / str(ran)}"]), "progress=false"])
        ran += 1
    assert ran >= 10
    assert (tmp_path / "merged/krea_schnell_fp8.safetensors").is_file() and (tmp_path / "merged/dev_half_krea/config.json").is_file()


# --- every other command of the docs, checked ----------------------------------------------------------


def documented_commands() -> list[tuple[str, list[str]]]:
    return [(page, words) for page, text in PAGES.items() if page != "cookbook.md" for words in commands(text)]


def page_recipes(folder: Path) -> Path:
    """The recipes the pages name as files of yours (a yaml block headed `# NAME.yaml`), written to `folder`."""
    for text in RECIPES:
        titled = TITLED.match(text)
        if titled and titled[1] not in BUILTIN_RECIPES:
            write_recipe(folder, titled[1], text)
    return folder


def test_every_documented_command_is_one_the_command_line_takes(tmp_path, monkeypatch):
    from fluxrecipe.cli.arguments import command_line
    from fluxrecipe.ops import OPS
    from fluxrecipe.recipe import BLOCK_OVERRIDES_ENV

    monkeypatch.setenv("FLUXRECIPE_RECIPE_PATH", str(page_recipes(tmp_path / "recipes")))
    subcommand_flags = {"verify": {"--no-hash"}, "summary": {"--no-plot"}}
    helps: dict[str, str] = {}  # benchmark script -> its --help
    checked = 0
    for page, words in documented_commands():
        if words[0].endswith("python") and words[1].startswith("benchmarks/"):
            if words[1] not in helps:
                helps[words[1]] = subprocess.run([sys.executable, words[1], "--help"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600).stdout
            assert all(flag in helps[words[1]] for flag in words[2:] if flag.startswith("--")), (page, words)
            continue
        args = fluxrecipe_args(words)
        if args is None:
            continue
        checked += 1
        if args and args[0] in subcommand_flags:
            assert {a for a in args if a.startswith("-")} <= subcommand_flags[args[0]], (page, words)
            continue
        if args and args[0] == "methods":
            assert set(args[1:]) <= set(OPS), (page, words)
            continue
        monkeypatch.setenv(BLOCK_OVERRIDES_ENV, "")
        if any(a.startswith("recipe=") and ("/" in a or a.endswith(".yaml")) for a in args):
            command_line([a for a in args if not a.startswith("recipe=")])  # a file the page's reader has: its options
            continue
        overrides = command_line(args)  # unknown options and recipes: UsageError
        if {a for a in overrides if a.startswith("-")} - {"-m"}:
            continue  # Hydra's own flags (--help, --config-dir): nothing of fluxrecipe's to compose
        for job in jobs([a for a in overrides if a != "-m"]):
            compose(job)  # Hydra: every key and config group exists
    assert checked >= 40


# --- the command-line reference -------------------------------------------------------------------------


def reference_rows() -> dict[str, str]:
    """option -> its default cell, from the tables of docs/cli.md's 'Run options', 'Previews' and 'Scores and
    search' sections."""
    rows = {}
    for section in re.split(r"^## ", DOCS["cli.md"], flags=re.M):
        if section.startswith(("Run options", "Previews", "Scores and search")):
            for names, default in re.findall(r"^\| (`[^|]+`) \| ([^|]*) \|", section, re.M):
                for name in re.findall(r"`([^`]+)`", names):
                    rows[name] = default.strip()
    return rows


def test_the_reference_documents_every_option_and_its_default():
    """A new option in the options table (fluxrecipe/cli/options.py) cannot go undocumented, nor a removed one
    stay documented."""
    from fluxrecipe.cli.options import defaults

    config = defaults()
    groups = {next(iter(d)) for d in yaml.safe_load((REPO_ROOT / "conf" / "config.yaml").read_text())["defaults"] if isinstance(d, dict)}
    def flat(tree: dict, prefix: str = "") -> dict:
        return {name: v for k, value in tree.items() for name, v in (flat(value, f"{prefix}{k}.") if isinstance(value, dict) else {f"{prefix}{k}": value}).items()}

    options = flat(config)
    rows = reference_rows()
    assert set(rows) == set(options) | groups | {"preview"}
    for name, value in options.items():
        if value is None or (isinstance(value, list) and value and not all(isinstance(v, int) for v in value)):
            continue  # described in words: the run folder, the recipe's format, three prompts
        shown = str(value).lower() if isinstance(value, bool) else str(value)
        assert rows[name] == f"`{shown}`", (name, rows[name], value)


# --- what the pages promise about set-up ----------------------------------------------------------------


def test_the_docs_say_what_rendering_needs():
    """The FluxPipeline snippets need transformers (text encoders), sentencepiece and protobuf (tokenizers) and
    accelerate (memory): the page names the extra that installs them, and pyproject defines it so."""
    extras = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    preview = {re.split(r"[<>=\[ ]", r)[0].lower() for r in extras["preview"]}
    assert {"transformers", "accelerate", "sentencepiece", "protobuf"} <= preview
    snippets = [(page, text.index("FluxPipeline.from_pretrained(")) for page, text in PAGES.items() if "transformer=transformer" in text]
    assert len(snippets) >= 2
    for page, at in snippets:
        assert "the `preview` extra" in PAGES[page][at - 800 : at], page


def test_the_docs_document_completion_sweep_disk_cost_and_their_own_build():
    assert 'eval "$(fluxrecipe -sc install=bash)"' in DOCS["getting-started.md"]
    assert "a sweep costs the model's size on disk per job" in DOCS["sweeps.md"]
    extras = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert {re.split(r"[<>=]", r)[0] for r in extras["docs"]} == {"mkdocs", "mkdocs-material"}
    assert "mkdocs build --strict" in (REPO_ROOT / ".ci" / "run").read_text()
    assert yaml.safe_load((REPO_ROOT / "mkdocs.yml").read_text())["theme"]["font"] is False  # no web fonts: offline


def test_make_test_prints_the_random_orders_seed_first():
    """Even under -q, which hides pytest-randomly's own line: a failure that depends on the order repeats."""
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "randomly", "--randomly-seed=4242", "tests/test_cookbook.py::test_missing_line_reads_the_page_as_a_reader_would"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines()[0] == "random order: seed 4242; repeat it with .venv/bin/python -m pytest -q --randomly-seed=4242"


def fake_venv(folder, torch_spec: str) -> None:
    """A .venv as the Makefile leaves it after installing `torch_spec` and the project."""
    import os

    stamp = subprocess.run(["sh", "-c", f"printf '%s' '{torch_spec}' | cksum | cut -d' ' -f1"], capture_output=True, text=True).stdout.strip()
    (folder / ".venv" / "bin").mkdir(parents=True)
    (folder / ".venv" / "bin" / "python").write_text("")
    os.chmod(folder / ".venv" / "bin" / "python", 0o755)
    (folder / f".venv/.torch-{stamp}").touch()
    (folder / ".venv/.installed").touch()
    (folder / ".venv/.installed-demo").touch()


@pytest.mark.skipif(shutil.which("make") is None, reason="no make here")
def test_make_honours_torch_once_the_venv_exists(tmp_path):
    """`make demo TORCH=...` after a first `make`: the other torch is installed, not ignored."""
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy(REPO_ROOT / name, tmp_path / name)
    (tmp_path / "pyproject.toml").touch()
    fake_venv(tmp_path, "torch==2.13.0")
    same = subprocess.run(["make", "-n", "demo"], cwd=tmp_path, capture_output=True, text=True)
    assert "pip install" not in same.stdout  # nothing to do: the same torch, and the project installed
    other = "torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
    planned = subprocess.run(["make", "-n", "demo", f"TORCH={other}"], cwd=tmp_path, capture_output=True, text=True)
    assert f"--force-reinstall --no-deps {other}" in planned.stdout, planned.stdout


@pytest.mark.skipif(shutil.which("make") is None, reason="no make here")
def test_the_first_make_says_what_it_does(tmp_path):
    """~2.5 minutes of pip on a first run: never silent (no --quiet), and each step says what it installs."""
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy(REPO_ROOT / name, tmp_path / name)
    planned = subprocess.run(["make", "-n", "test"], cwd=tmp_path, capture_output=True, text=True).stdout
    pips = [line for line in planned.splitlines() if "pip install" in line and not line.startswith("echo")]
    assert len(pips) == 2 and not any("--quiet" in line or " -q " in line for line in pips)
    assert planned.count("echo \"make: ") >= 3


@pytest.mark.skipif(shutil.which("make") is None, reason="no make here")
def test_the_slurm_script_runs_only_when_asked(tmp_path):
    """tests/slurm/test-slurm.sh installs packages as root and starts daemons: `make test-slurm` runs it, and
    neither `make test`, CI's script nor pytest's collection does."""
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy(REPO_ROOT / name, tmp_path / name)
    fake_venv(tmp_path, "torch==2.13.0")
    # --no-print-directory: under CI's own `make test` a nested make names its directory, and pytest's tmp_path
    # holds this test's name
    planned = {target: subprocess.run(["make", "-n", "--no-print-directory", target], cwd=tmp_path, capture_output=True, text=True).stdout
               for target in ("test", "test-slurm")}
    assert "tests/slurm/test-slurm.sh" in planned["test-slurm"] and "slurm" not in planned["test"]
    assert "slurm" not in (REPO_ROOT / ".ci" / "run").read_text()
    collected = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:randomly", str(REPO_ROOT / "tests" / "slurm")],
                               cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert collected.returncode == 5 and "no tests collected" in collected.stdout, collected.stdout  # 5: pytest found none
