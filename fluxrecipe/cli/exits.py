"""How the command line ends: a user's error is one line on stderr and exit status 1 (or the traceback, when
asked for with traceback=true or HYDRA_FULL_ERROR=1); Ctrl-C or SIGTERM is 130."""

from __future__ import annotations

import sys
from typing import NoReturn

from ..errors import FluxRecipeError
from ..text import printable

EXIT_ERROR = 1
EXIT_USAGE = 2  # a subcommand's arguments (argparse's own status)
EXIT_INTERRUPTED = 130


def fail(error: FluxRecipeError, show_traceback: bool) -> NoReturn:
    """How the command line ends on a user's error: one line and exit status 1, or the traceback if asked for."""
    if show_traceback:
        raise error
    print(f"fluxrecipe: error: {printable(str(error))}", file=sys.stderr)
    sys.exit(EXIT_ERROR)
