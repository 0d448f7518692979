"""The commands beside the merge itself: `fluxrecipe verify`, `summary` and `methods`, each a function of its
arguments that returns the exit status (a dict of them: app.py dispatches on the first argument). Each takes
--help, as does `fluxrecipe help COMMAND`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

from ..files import os_errors
from ..formats import FORMATS
from ..ops import OPS
from ..ops.registry import listing
from ..sweep.records import MULTIRUN_YAML, is_sweep, read_jobs
from ..sweep.summarize import report, summarize
from ..text import counted, printable
from ..verify import FileReport, verify_file, verify_folder
from .exits import EXIT_ERROR, EXIT_USAGE

PROGRAM = "fluxrecipe"  # the console script: what Hydra's help and shell completion name


def verify(argv: list[str]) -> int:
    """`fluxrecipe verify FOLDER`: check a model folder (or file) before trusting it (verify.py's checks)."""
    parser = argparse.ArgumentParser(
        prog=f"{PROGRAM} verify",
        description="Check a merged model folder against its manifest (sizes, sha256), its index, its safetensors headers and its config.json; or a single .safetensors or .gguf file against its architecture and the sha256 in its metadata.",
    )
    parser.add_argument("folder", help="the output of a merge: a folder (or a pipeline folder holding transformer/), or a single .safetensors or .gguf file")
    parser.add_argument("--no-hash", action="store_true", help="compare sizes only, do not read the data for sha256")
    args = parser.parse_args(argv)
    with os_errors():
        if Path(args.folder).expanduser().is_file():
            return _report_file(verify_file(Path(args.folder).expanduser(), hash_data=not args.no_hash), hashed=not args.no_hash)
        report_ = verify_folder(Path(args.folder), hash_files=not args.no_hash)
    if report_.problems:
        for problem in report_.problems:
            print(f"{PROGRAM} verify: {printable(problem)}", file=sys.stderr)
        if report_.folder.is_dir():  # else the one problem says what it is
            print(f"{PROGRAM} verify: {printable(str(report_.folder))}: {counted(len(report_.problems), 'problem')}: do not use this folder as it is", file=sys.stderr)
        return EXIT_ERROR
    hashed = "sizes and sha256" if not args.no_hash else "sizes (sha256 not checked)"
    files = f"{report_.files} files match the manifest ({hashed})" if report_.manifest else "no fluxrecipe manifest (not a fluxrecipe output): sizes and sha256 not checked"
    values = "; their values are finite" if not args.no_hash else "; values not read"
    print(
        printable(
            f"{report_.folder}: ok: {files}; {report_.tensors} tensors in {report_.shards} shard(s) "
            f"match the index, their headers and config.json ({report_.model}){values}"
        )
    )
    return 0


def _report_file(file_report: FileReport, hashed: bool) -> int:
    if file_report.problems:
        for problem in file_report.problems:
            print(f"{PROGRAM} verify: {printable(problem)}", file=sys.stderr)
        print(f"{PROGRAM} verify: {printable(str(file_report.path))}: {counted(len(file_report.problems), 'problem')}: do not use this file as it is", file=sys.stderr)
        return EXIT_ERROR
    what = "its data matches the sha256 in its metadata and its values are finite" if hashed else "sha256 and values not checked"
    kind = "a LoRA" if FORMATS[file_report.layout].lora_scheme else f"a whole {file_report.family} transformer in {file_report.layout} layout"
    print(printable(f"{file_report.path}: ok: {file_report.tensors} tensors, {kind}; {what}"))
    return 0


def summary(argv: list[str]) -> int:
    """`fluxrecipe summary SWEEP_DIR`: write the summary of an existing sweep folder again."""
    parser = argparse.ArgumentParser(
        prog=f"{PROGRAM} summary",
        description="Rebuild summary.csv, summary.md, summary_blocks.csv, summary.png, grid.png (the previews) and index.html "
        "of a sweep folder from its job folders. Exit status 1 when a job failed or did not finish.",
    )
    parser.add_argument("sweep_dir", type=Path, help="the folder of a multirun (multirun/DATE/TIME, or hydra.sweep.dir)")
    parser.add_argument("--no-plot", action="store_true", help="write the tables only (no summary.png, no grid.png)")
    args = parser.parse_args(argv)
    folder = args.sweep_dir
    refusal = None
    if not folder.is_dir():
        refusal = "no such folder"
    elif not is_sweep(folder):
        refusal = (
            f"a single run, not a sweep: there is nothing to summarize (its model is in {folder / 'transformer'} unless output= was given)"
            if (folder / ".hydra" / "hydra.yaml").is_file()
            else f"not a sweep folder (no {MULTIRUN_YAML}): give the folder of a multirun (multirun/DATE/TIME, or its hydra.sweep.dir)"
        )
    elif not (jobs := read_jobs(folder.resolve())):
        refusal = "no job folders (.hydra/overrides.yaml) found: the sweep started no job"
    if refusal:
        print(printable(f"{PROGRAM} summary: {folder}: {refusal}; nothing was written"), file=sys.stderr)
        return EXIT_USAGE
    try:
        written = summarize(folder, draw=not args.no_plot, jobs=jobs)
    except OSError as e:
        print(printable(f"{PROGRAM} summary: {folder}: cannot write the summary: {e.strerror or e}"), file=sys.stderr)
        return EXIT_USAGE
    print(written.markdown())  # printable already, as report() is
    print(report(written), file=sys.stderr if written.failed else sys.stdout)
    return EXIT_ERROR if written.failed else 0


def methods(argv: list[str]) -> int:
    """`fluxrecipe methods [NAME ...]`: every merge method (op), or the named ones, with its sources,
    parameters (kinds and defaults) and formula, from the ops' own declarations."""
    parser = argparse.ArgumentParser(
        prog=f"{PROGRAM} methods",
        description="Every merge method (a rule's op), or the named ones: its sources, parameters (kinds and defaults) and formula.",
    )
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"methods to describe (of: {', '.join(OPS)})")
    names = parser.parse_args(argv).names
    unknown = [name for name in names if name not in OPS]
    if unknown:
        print(f"{PROGRAM}: error: no method {', '.join(map(repr, unknown))} (methods: {', '.join(OPS)})", file=sys.stderr)
        return EXIT_ERROR
    print(listing(names or None))
    return 0


COMMANDS: dict[str, Callable[[list[str]], int]] = {"verify": verify, "summary": summary, "methods": methods}
