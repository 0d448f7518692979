"""The optional extras of pyproject.toml, by the modules they bring: a feature whose extra is not installed
is one line naming the `pip install` that adds it, not an ImportError's traceback."""

from __future__ import annotations

import importlib.util

# extra -> the modules a feature of it imports (as Python names them, not as pip does)
EXTRAS = {
    "sweep": {
        "hydra/launcher=joblib": ("hydra_plugins.hydra_joblib_launcher", "joblib"),
        "hydra/launcher=submitit_local": ("hydra_plugins.hydra_submitit_launcher", "submitit"),
        "hydra/launcher=submitit_slurm": ("hydra_plugins.hydra_submitit_launcher", "submitit"),
        "hydra/launcher=slurm": ("hydra_plugins.hydra_submitit_launcher", "submitit"),
        "hydra/sweeper=optuna": ("hydra_plugins.hydra_optuna_sweeper", "optuna"),
        "summary.png": ("matplotlib",),
    },
    "preview": {
        "preview=true": ("transformers", "accelerate", "PIL"),
        "preview.score": ("transformers", "PIL"),
    },
}


def installed(module: str) -> bool:
    """Whether `module` can be imported (without importing it: transformers takes seconds)."""
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:  # a parent package that is not there, or a finder that refuses it
        return False


def missing(feature: str) -> str | None:
    """The one line that says which extra `feature` needs and how to install it; None when it is installed,
    or when no extra provides the feature (`hydra/launcher=basic` is Hydra's own)."""
    for extra, features in EXTRAS.items():
        absent = [m for m in features.get(feature, ()) if not installed(m)]
        if absent:
            return f"{feature} needs the {extra} extra ({', '.join(absent)} not installed): pip install 'fluxrecipe[{extra}]'"
    return None
