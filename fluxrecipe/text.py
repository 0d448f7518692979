"""Text from recipes and files, made safe to show: on a terminal, and in the model card's Markdown.

A recipe or a file name comes from a stranger. Written raw, an ANSI escape could clear the screen or fake a
plan line, and a bidi override could make a rule read as another; in the card, Markdown could fake a heading
or a link. Every such text is shown through these functions where it leaves the program.
"""

from __future__ import annotations

import re

MAX_NAME = 200  # characters of a stranger's name (a tensor key, a module) that a message quotes
# what starts Markdown or HTML anywhere in a line (an underscore only at a word's edge), and at its start
MARKDOWN_SPECIAL = re.compile(r"([\\`*\[\]<>|~]|(?<!\w)_|_(?!\w))")
MARKDOWN_LINE_START = re.compile(r"^(?:([#=+-])|(\d+)([.)]))")


def printable(text: str) -> str:
    """`text` with every character that is not printable (control characters, escapes, line breaks, bidi
    controls) written as its Python escape, e.g. '\\x1b'. Printable text, of any script, stays as it is."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def markdown_text(text: str) -> str:
    """Printable text that Markdown shows as it is (no emphasis, heading, list, link, HTML or table cell break)."""
    return MARKDOWN_LINE_START.sub(lambda m: f"\\{m[1]}" if m[1] else f"{m[2]}\\{m[3]}", markdown_cell(text))


def markdown_cell(text: str) -> str:
    """Printable text that Markdown shows as it is inside a table cell, where no line starts."""
    return MARKDOWN_SPECIAL.sub(r"\\\1", printable(text))


def markdown_code(text: str) -> str:
    """Printable text as an inline code span that no backtick in it can end early; `|` is escaped, as GitHub's
    tables need inside a cell."""
    text = printable(text).replace("|", "\\|")
    fence = "`" * (max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def cut(name: str, limit: int = MAX_NAME) -> str:
    """A name from a file or a recipe as a message quotes it: cut in the middle past `limit` characters, both
    ends kept (where names differ), so that a key of a megabyte makes one short line, not a megabyte."""
    if len(name) <= limit:
        return name
    half = limit // 2
    return f"{name[:half]}...({len(name) - 2 * half} characters)...{name[-half:]}"


def some_keys(keys: list[str], shown: int = 6) -> str:
    """The first `shown` keys, quoted (each cut), and how many more: a message names keys without listing thousands."""
    listed = ", ".join(f"'{cut(k)}'" for k in keys[:shown])
    return listed + (f" and {len(keys) - shown} more" if len(keys) > shown else "")


def counted(n: int, noun: str) -> str:
    """'1 job', '3 jobs': a count with its noun in the right number."""
    return f"{n} {noun}{'s' * (n != 1)}"
