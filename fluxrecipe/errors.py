"""The few exception types a user can see.

Every failure a user can act on is raised as one of these, with a message that names the recipe line,
file or key at fault. The entry point catches `FluxRecipeError` once and turns it into that message and a
non-zero exit; anything else is a bug and keeps its traceback.
"""


class FluxRecipeError(Exception):
    """Base class: the message is meant for the user as it is."""


class UsageError(FluxRecipeError):
    """A run option is wrong: an unknown value, a missing recipe, an output that collides with a source."""


class RecipeError(FluxRecipeError):
    """The recipe is malformed: syntax, fields, regexes, ops, names."""


class SourceError(FluxRecipeError):
    """A source cannot be found, fetched or read: missing files, broken headers, hub failures."""


class PlanError(FluxRecipeError):
    """Recipe and sources do not fit together: unmatched keys, missing inputs, shapes, config."""


class OutputError(FluxRecipeError):
    """The output cannot be written: folder exists, no space, write failure, non-finite values."""


class FileError(FluxRecipeError):
    """The operating system refused a file operation: permissions, a read-only disk, a name too long, a full disk."""
