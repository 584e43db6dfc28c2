"""Where a wrapped model keeps its elalora handle, and how to find it again.

:func:`elalora.get_model` stores the :class:`~elalora.model.AdaptiveModel` on the model it wraps;
persistence, the Trainer callback and the CLI find it with :func:`handle_of`, also through DDP /
accelerate wrappers (``.module``). Kept apart from :mod:`elalora.model` so that modules below the
model in the import order can take "a handle or a wrapped model" without importing it.

Imports: the standard library and :mod:`elalora.errors` only.
"""

from __future__ import annotations

from typing import Any

__all__ = ["HANDLE_ATTR", "attach_handle", "detach_handle", "carried_handle", "handle_of"]

HANDLE_ATTR = "_elalora_handle"


def attach_handle(model: Any, handle: Any) -> None:
    setattr(model, HANDLE_ATTR, handle)


def detach_handle(model: Any) -> None:
    setattr(model, HANDLE_ATTR, None)


def carried_handle(model: Any) -> Any:
    """The handle stored on ``model`` itself (not through wrappers), or ``None``."""
    return getattr(model, HANDLE_ATTR, None)


def handle_of(model: Any) -> Any:
    """The handle of ``model``: the handle itself (anything with ``adapters`` and ``names``), or the
    one attached to a wrapped model (also through DDP/accelerate wrappers)."""
    if all(hasattr(model, a) for a in ("adapters", "names", "allocator", "model")):
        return model
    m = model
    for _ in range(4):
        h = getattr(m, HANDLE_ATTR, None)
        if h is not None:
            return h
        m = getattr(m, "module", None)
        if m is None:
            break
    raise ValueError("this model carries no elalora adapters; wrap it with elalora.get_model first")
