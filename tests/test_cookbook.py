"""The cookbook (docs/cookbook.md) runs as written: every ```sh block of the page, in order, in one fresh
folder, with this checkout's `fluxrecipe` and `python` on PATH and the hub offline. Each block must exit 0 and
print what the page shows under it: a ```text block marked `<!-- cookbook: expect -->` after a shell block
lists lines its output must hold, in that order (`...` stands for anything, within a line or for lines)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from conftest import REPO_ROOT

PAGE = REPO_ROOT / "docs" / "cookbook.md"
FENCE = re.compile(r"^(<!-- cookbook: expect -->\n)?```(\w*)\n(.*?)^```$", re.S | re.M)


@dataclass
class Example:
    script: str
    line: int  # where the block starts on the page, for messages
    expected: list[str] = field(default_factory=list)  # the text blocks marked as its output


def examples(page: str) -> list[Example]:
    found: list[Example] = []
    for m in FENCE.finditer(page):
        marked, language, body = m.groups()
        if language == "sh":
            found.append(Example(body, page.count("\n", 0, m.start()) + 2))
        elif marked:
            assert language == "text" and found, f"cookbook.md:{page.count(chr(10), 0, m.start()) + 1}: an expected output must be a text block after a shell block"
            found[-1].expected.append(body)
    return found


def missing_line(output: str, expected: str) -> str | None:
    """The first line of `expected` that `output` does not show (in order after the previous one), or None."""
    lines = [line.rstrip() for line in output.splitlines()]
    at = 0
    for wanted in expected.splitlines():
        if wanted.strip() == "...":
            continue
        pattern = re.compile(".*?".join(re.escape(part) for part in wanted.rstrip().split("...")))
        while at < len(lines) and not pattern.fullmatch(lines[at]):
            at += 1
        if at == len(lines):
            return wanted
        at += 1
    return None


def test_missing_line_reads_the_page_as_a_reader_would():
    output = "recipe demo (/x/recipes/demo.yaml)\n  parameters: alpha=0.3\nwrote /tmp/a/out: 4.72 MB in 0.2 s\n"
    assert missing_line(output, "  parameters: alpha=0.3\n...\nwrote .../out: ... in ... s\n") is None
    assert missing_line(output, "  parameters: alpha=0.5\n") == "  parameters: alpha=0.5"
    assert missing_line(output, "wrote .../out: ...\n  parameters: alpha=0.3\n") == "  parameters: alpha=0.3"  # order counts


def command_folder(folder: Path) -> Path:
    """`fluxrecipe` and `python` as the page's reader has them, running this test's interpreter and checkout."""
    folder.mkdir()
    for name, command in (("fluxrecipe", f'"{sys.executable}" -m fluxrecipe'), ("python", f'"{sys.executable}"')):
        (folder / name).write_text(f'#!/bin/sh\nexec {command} "$@"\n')
        (folder / name).chmod(0o755)
    return folder


def test_every_cookbook_example_runs_and_shows_what_the_page_says(tmp_path):
    page = PAGE.read_text()
    steps = examples(page)
    assert len(steps) >= 10 and sum(len(s.expected) for s in steps) >= 10
    work = tmp_path / "work"
    work.mkdir()
    env = {
        **os.environ,
        "PATH": f"{command_folder(tmp_path / 'bin')}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(REPO_ROOT),
        "HF_HUB_OFFLINE": "1",  # the page promises offline; conftest's socket guard does not reach a subprocess
        "HYDRA_FULL_ERROR": "0",
    }
    env.pop("FLUXRECIPE_RECIPE_PATH", None)
    for step in steps:
        # a guard against a hang, far above the seconds a step takes, not a timed assertion
        done = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", step.script], cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900)
        assert done.returncode == 0, f"cookbook.md:{step.line} exited {done.returncode}:\n{step.script}\n--- output:\n{done.stdout[-4000:]}"
        for expected in step.expected:
            missing = missing_line(done.stdout, expected)
            assert missing is None, f"cookbook.md:{step.line}: the output lacks {missing!r} (the page shows it):\n--- output:\n{done.stdout[-4000:]}"
