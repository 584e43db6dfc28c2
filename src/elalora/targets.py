"""Which layers get adapters: default target modules per architecture and the naming rules.

Each naming rule of the package lives here, once:

* :func:`matches_suffix` -- a list entry of ``target_modules`` / ``modules_to_save`` selects a
  module whose full name equals it or ends with ``"." + entry``;
* :func:`lies_within` -- a module (or parameter) belongs to a module kept in full when one of the
  dotted components of its name path is that module (``"classifier"`` holds
  ``"classifier.out_proj"``);
* :func:`split_block_name` / :func:`block_index` -- the transformer block index in a module name
  (one regex for GeLoRA's per-block ranks, the figures and the fallback target selection).

Imports: :mod:`elalora.layers` (the wrappable layer types) and :mod:`elalora.errors`.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from typing import Sequence

from torch import nn

from .errors import TargetModuleError
from .layers import SUPPORTED_BASE_LAYERS, ElasticAdapter

__all__ = ["DEFAULT_TARGET_MODULES", "matches_suffix", "lies_within", "find_target_modules",
           "select_target_modules", "block_index", "split_block_name"]

# Defaults per model_type: every projection of every block, as in the ElaLoRA / AdaLoRA GLUE
# experiments (q, k, v, attention output, intermediate, output).
_ENCODER = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
_LLAMA = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    "bert": _ENCODER, "roberta": _ENCODER, "xlm-roberta": _ENCODER, "electra": _ENCODER,
    # ViT: transformers >= 5 names (q/k/v/o_proj, mlp.fc1/fc2) and the 4.x names.
    "vit": ["q_proj", "k_proj", "v_proj", "attention.o_proj", "mlp.fc1", "mlp.fc2"] + _ENCODER,
    "deberta-v2": ["query_proj", "key_proj", "value_proj", "attention.output.dense", "intermediate.dense",
                   "output.dense"],
    "llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA, "gemma": _LLAMA,
    "gpt2": ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"],
    "bart": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "t5": ["q", "k", "v", "o", "wi", "wo"],
}

# The first ".(layer|layers|h|block|blocks).<k>" component, also at the start or the end of a name.
_BLOCK_RE = re.compile(r"(?:^|\.)(layer|layers|h|block|blocks)\.(\d+)(?=\.|$)")


# ------------------------------------------------------------------------------------ name rules
def matches_suffix(name: str, key: str) -> bool:
    """``name`` is ``key`` or ends with ``"." + key`` (``"query"`` selects ``"...self.query"``)."""
    return name == key or name.endswith("." + key)


def lies_within(name: str, key: str) -> bool:
    """``name`` is, ends with, or lies inside a module path component sequence ``key``."""
    return f".{key}." in f".{name}."


def split_block_name(name: str) -> tuple[str, int | None, str]:
    """``(prefix, block index, rest)`` of a module name; ``("", None, name)`` outside numbered blocks.

    ``"bert.encoder.layer.3.attention.self.query"`` -> ``("bert.encoder", 3, "attention.self.query")``.
    The first match is used, so in ``encoder.block.3.layer.1.…`` (T5) the block is 3.
    """
    m = _BLOCK_RE.search(name)
    if m is None:
        return "", None, name
    return name[: m.start()], int(m.group(2)), name[m.end() + 1:]


def block_index(name: str) -> int | None:
    """Transformer block index in a module path, or ``None`` outside numbered blocks.

    ``bert.encoder.layer.3.attention.self.query`` → 3, ``model.layers.11.mlp.up_proj`` → 11,
    ``transformer.h.2.attn.c_attn`` → 2, ``vit.encoder.layer.0.attention.attention.query`` → 0.
    """
    return split_block_name(name)[1]


# ------------------------------------------------------------------------------------- selection
def _matches(name: str, target: list[str] | str) -> bool:
    if isinstance(target, str):
        return re.fullmatch(target, name) is not None
    return any(matches_suffix(name, t) for t in target)


def _candidate_names(model: nn.Module) -> list[str]:
    """Distinct trailing names of wrappable layers, for error messages."""
    seen: "OrderedDict[str, None]" = OrderedDict()
    for name, mod in model.named_modules():
        if isinstance(mod, SUPPORTED_BASE_LAYERS):
            parts = name.split(".")
            tail = ".".join(p for p in parts[-2:] if not p.isdigit()) if len(parts) > 1 else name
            seen[tail] = None
    return list(seen)


def find_target_modules(model: nn.Module, target_modules, modules_to_save: Sequence[str] | None = None) -> list[str]:
    """Names of the layers of ``model`` that ``target_modules`` selects (in module order)."""
    explicit = target_modules is not None
    if target_modules is None:
        mtype = getattr(getattr(model, "config", None), "model_type", None)
        if mtype not in DEFAULT_TARGET_MODULES:
            raise TargetModuleError(
                f"no default target_modules for model type {mtype!r}; pass target_modules, e.g. one of: "
                + ", ".join(_candidate_names(model)[:20]))
        target_modules = DEFAULT_TARGET_MODULES[mtype]
    keep = list(modules_to_save or [])
    names, bad, hit = [], [], set()
    for name, mod in model.named_modules():
        if not name or not _matches(name, target_modules):
            continue
        if isinstance(target_modules, list):
            hit.update(t for t in target_modules if matches_suffix(name, t))
        if any(lies_within(name, k) for k in keep):
            continue  # a module kept trainable in full is not adapted as well
        if isinstance(mod, ElasticAdapter):
            raise TargetModuleError(f"module {name!r} is already adapted; build the adapters once per model")
        if isinstance(mod, SUPPORTED_BASE_LAYERS):
            names.append(name)
        elif not any(isinstance(c, SUPPORTED_BASE_LAYERS) for c in mod.children()):
            bad.append(f"{name} ({type(mod).__name__})")
    if not names:
        extra = f"; matched only unsupported layers: {', '.join(bad[:5])}" if bad else ""
        raise TargetModuleError(
            f"target_modules={target_modules!r} matched no nn.Linear/Conv1D layer{extra}. "
            f"Candidate names in this model: {', '.join(_candidate_names(model)[:30])}")
    if explicit and isinstance(target_modules, list):
        _check_explicit_list(model, target_modules, bad, hit)
    return names


def _check_explicit_list(model: nn.Module, target_modules: list[str], bad: list[str], hit: set[str]) -> None:
    """Names the user listed: each must select something, and nothing they select may be skipped
    silently (a Conv2d named in the list would otherwise just not be adapted). Regexes and the
    per-architecture defaults keep PEFT's lenient matching."""
    if bad:
        raise TargetModuleError(
            f"target_modules names layers that cannot be adapted: {', '.join(bad[:5])}; only nn.Linear and "
            "transformers' Conv1D are supported. Remove them from target_modules")
    unused = [t for t in target_modules if t not in hit]
    if unused:
        raise TargetModuleError(
            f"target_modules entr{'y' if len(unused) == 1 else 'ies'} {unused} matched no layer (a typo?). "
            f"Candidate names in this model: {', '.join(_candidate_names(model)[:30])}")


def select_target_modules(model: nn.Module, targets, keep: Sequence[str] | None) -> tuple[list[str], object]:
    """``(adapted module names, target_modules for the config)``.

    With ``targets=None`` the default for the model type is used; when that matches nothing (e.g.
    a transformers release renamed the layers, as ViT's ``attention.q_proj`` in transformers 5)
    every ``nn.Linear``/``Conv1D`` inside the numbered blocks is adapted instead -- the same
    "every projection of every block" default -- and the explicit names are returned.
    """
    try:
        return find_target_modules(model, targets, keep), targets
    except TargetModuleError:
        if targets is not None:
            raise
        names = [n for n, m in model.named_modules()
                 if n and isinstance(m, SUPPORTED_BASE_LAYERS) and block_index(n) is not None
                 and not any(lies_within(n, k) for k in (keep or []))]
        if not names:
            raise
        return names, list(names)
