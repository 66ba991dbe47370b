"""Optional dependencies, installed with an extra of the vlpet package: `vlpet[video]` (PyAV, to read and write
videos), `vlpet[plots]` (matplotlib, to draw plots) and the experiment trackers of `train.report_to`
(`vlpet[tensorboard]`, `vlpet[mlflow]`, `vlpet[wandb]`). Code that needs one calls `require_extra` just before it
imports it, and commands call it before any expensive work, so a missing one is one line naming the extra."""

from __future__ import annotations

import importlib
from types import ModuleType

from vlpet_cli.errors import VlpetError

# extra -> (the module it installs, what needs it)
EXTRAS = {
    "video": ("av", "reading and writing videos"),
    "plots": ("matplotlib", "drawing plots"),
    "tensorboard": ("tensorboard", "logging to TensorBoard (train.report_to)"),
    "mlflow": ("mlflow", "logging to MLflow (train.report_to)"),  # the mlflow-skinny package installs it
    "wandb": ("wandb", "logging to Weights & Biases (train.report_to)"),
}


class MissingExtraError(VlpetError):
    """An optional dependency is not installed (or does not import); the message names the extra to install."""


def require_extra(extra: str) -> ModuleType:
    """The module `extra` installs, imported; MissingExtraError when it is missing or broken."""
    module, purpose = EXTRAS[extra]
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        missing = isinstance(exc, ModuleNotFoundError) and exc.name == module
        why = "is not installed" if missing else f"does not import ({exc})"
        raise MissingExtraError(f"{purpose} needs {module}, which {why}; install it with: "
                                f"pip install 'vlpet[{extra}]'") from None


def has_extra(extra: str) -> bool:
    """Whether the module `extra` installs imports."""
    try:
        require_extra(extra)
    except MissingExtraError:
        return False
    return True
