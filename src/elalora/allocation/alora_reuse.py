"""Prefix reuse for ALoRA's ablations: skip the part of the forward pass an ablation cannot change.

An ablation mask of ALoRA (SPEC §5; :mod:`elalora.allocation.alora`) differs from one of two
reference models only at a single adapter ``a``:

* "only rank ρ of ``a`` removed" differs from the **full** model (every active rank on) only at ``a``;
* "only rank ρ of ``a`` kept" differs from the **base** model (every adapter off) only at ``a``.

So every module whose forward call *finished before ``a``'s forward started* computes exactly what it
computes in that reference model: for an adapter in block ℓ, the embeddings, blocks ``0 … ℓ−1`` and
the parts of block ℓ run before ``a`` (e.g. ``query`` and ``key`` when ``a`` is ``value``, the whole
attention sub-layer when ``a`` is ``intermediate.dense``). :class:`PrefixCache` records, once per
round, the outputs of those modules in the two reference models (two no-grad passes over ``B_val``)
and then evaluates each chunk of masks with them *stubbed*: their ``forward`` returns the cached
output, tiled to the chunk's copies (copy ``i`` gets the output of its own reference model), and
the rest of the model — the model's own code, so the head, the loss inputs, attention-mask and
position-embedding plumbing are whatever the model does — runs on the real tiled batch.

Which modules, generically
--------------------------
No block list or head is hard-coded. A first pass (the base model) traces every module's forward
call with hooks: the order calls start and end, and how many times each module is called. A module
is *stubbable* if it contains an adapter (or is one: such modules carry per-example activations with
the batch on dimension 0, which the batched ablations need anyway), is called exactly once per
forward, and returns a tensor, or a tuple / list / dict / ``ModelOutput`` of tensors and ``None``,
whose tensors all have the batch on dimension 0. For adapter ``a`` the modules cached are the
outermost stubbable modules that finished before ``a`` started (for a BERT or Llama layer stack:
the earlier layers, and the finished sub-modules of ``a``'s own layer); stubbing any module that
finished before ``a`` started is exact, so a module left out only costs time, never correctness.

Why it is exact (and to what tolerance)
---------------------------------------
The model's control flow does not depend on the gates, so a module that finished before ``a``
started cannot have read ``a``'s output: its output equals the reference model's output. The cached
value is computed on ``B_val`` alone instead of on the ``c`` stacked copies of the batched path, so
matrix products may be blocked differently and round differently: losses agree with the batched
path to float rounding (float32: about 1e-6 relative; the tests pin ``rtol = 1e-5`` against the
slow one-forward-per-mask reference).

Assumptions, checked where possible
-----------------------------------
* Every pass calls the same modules in the same order (checked: the trace of each caching pass must
  match the first; otherwise the round falls back to the plain batched path with a warning).
* A stubbed module would have been called once per forward (checked: a stub called twice raises
  internally and the round falls back to the plain batched path).
* Modules do not modify their *inputs* in place (a stub would skip that side effect) and have no
  other side effect the rest of the forward pass reads (the KV cache is switched off with
  ``use_cache=False`` where the model's forward takes it). Hugging Face models satisfy both.

Fallback: with no stubbable module before any adapter (e.g. a model whose adapted layers are called
more than once per forward, or return objects that are not batch-shaped) every mask runs the full
forward pass, exactly as with ``prefix_reuse=False``.

Cost and memory: the two caching passes and the trace cost three forward passes over ``B_val`` (the
batched path needs one for the full model, which the full-model caching pass provides). The
evaluation of a mask at adapter ``a`` costs the part of the forward pass from ``a`` on, plus the
embeddings and other un-adapted modules before it. The cache holds, for both reference models, the
outputs of the modules listed above: for an ``L``-layer stack about ``2 × L × k`` activations of
``|B_val| × T × hidden`` (``k`` ≈ 3–6 with the default targets), e.g. 2 × 6 × 6 × 32 × 128 × 384
float32 ≈ 72 MB for MiniLM at 128 tokens; a 32-layer, 4096-wide decoder at 512 tokens needs
≈ 2 × 32 × 5 × 0.27 GB ≈ 86 GB, so on such models use a smaller ``B_val`` or ``T`` or
``prefix_reuse=False``.

Imports: torch only (the adapters are plain ``nn.Module`` objects here; the caller sets their gates).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Callable, Sequence

import torch
from torch import nn

__all__ = ["PrefixCache", "StubMisuse", "TraceMismatch"]


class StubMisuse(RuntimeError):
    """A stubbed module was called more than once in one forward pass (the trace said once)."""


class TraceMismatch(RuntimeError):
    """A caching pass called modules in a different order from the trace."""


# ----------------------------------------------------------------------------- nested outputs
def _leaves(obj) -> list | None:
    """Tensor leaves of a module output, or None if the output holds anything but tensors/None."""
    if torch.is_tensor(obj):
        return [obj]
    if obj is None:
        return []
    if isinstance(obj, (tuple, list)):
        items = list(obj)
    elif isinstance(obj, Mapping):
        items = list(obj.values())
    else:
        return None
    out = []
    for v in items:
        sub = _leaves(v)
        if sub is None:
            return None
        out.extend(sub)
    return out


def _map(obj, fn: Callable[[torch.Tensor], torch.Tensor]):
    """``obj`` with every tensor leaf replaced by ``fn(leaf)`` (same container types)."""
    if torch.is_tensor(obj):
        return fn(obj)
    if obj is None:
        return None
    if isinstance(obj, tuple):
        vals = [_map(v, fn) for v in obj]
        return type(obj)(*vals) if hasattr(obj, "_fields") else type(obj)(vals)
    if isinstance(obj, list):
        return [_map(v, fn) for v in obj]
    if isinstance(obj, Mapping):
        vals = {k: _map(v, fn) for k, v in obj.items()}
        try:
            return type(obj)(**vals)  # ModelOutput and other dataclass-like mappings
        except TypeError:
            return type(obj)(vals)
    raise TypeError(f"cannot map over a {type(obj).__name__}")


def _zip_map(objs: Sequence, fn: Callable[[list[torch.Tensor]], torch.Tensor]):
    """Like :func:`_map` over several outputs of the same structure, ``fn`` taking aligned leaves."""
    first = objs[0]
    if torch.is_tensor(first):
        return fn(list(objs))
    if first is None:
        return None
    if isinstance(first, tuple):
        vals = [_zip_map([o[i] for o in objs], fn) for i in range(len(first))]
        return type(first)(*vals) if hasattr(first, "_fields") else type(first)(vals)
    if isinstance(first, list):
        return [_zip_map([o[i] for o in objs], fn) for i in range(len(first))]
    if isinstance(first, Mapping):
        vals = {k: _zip_map([o[k] for o in objs], fn) for k in first.keys()}
        try:
            return type(first)(**vals)
        except TypeError:
            return type(first)(vals)
    raise TypeError(f"cannot map over a {type(first).__name__}")


def _batch_shaped(obj, size: int) -> bool:
    leaves = _leaves(obj)
    return bool(leaves) and all(t.dim() >= 1 and t.shape[0] == size for t in leaves)


# ------------------------------------------------------------------------------------ tracing
class _Tracer:
    """Hooks on every module: call order (start / end ticks), call counts, optional output capture."""

    def __init__(self, modules: Sequence[nn.Module], capture: dict[int, int] | None = None, size: int = 0):
        self.modules = list(modules)
        self.start: dict[int, int] = {}
        self.end: dict[int, int] = {}
        self.calls: dict[int, int] = {}
        self.sequence: list[int] = []
        self.capture = capture or {}
        self.size = size
        self.outputs: dict[int, object] = {}
        self.tick = 0
        self._handles = []

    def __enter__(self) -> "_Tracer":
        for i, m in enumerate(self.modules):
            self._handles.append(m.register_forward_pre_hook(self._pre(i)))
            self._handles.append(m.register_forward_hook(self._post(i)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _pre(self, i):
        def hook(module, args):
            self.calls[i] = self.calls.get(i, 0) + 1
            self.start.setdefault(i, self.tick)
            self.sequence.append(i)
            self.tick += 1
        return hook

    def _post(self, i):
        def hook(module, args, output):
            self.end[i] = self.tick
            self.tick += 1
            if i in self.capture:
                if _batch_shaped(output, self.size):
                    # a copy: the rest of the forward pass may update its tensors in place
                    self.outputs[i] = _map(output, lambda t: t.detach().clone())
                else:
                    self.outputs[i] = None
        return hook


class PrefixCache:
    """Outputs of the modules each adapter's ablations can skip, in the full and the base model.

    Build with :meth:`build` (it runs the passes), then wrap each chunk's forward pass in
    :meth:`stubbed`. ``full_outputs`` are the model outputs of the full-model pass (the loss of the
    mask "every rank on").
    """

    def __init__(self, modules, stubs_for_adapter, cached, size, full_outputs, adapter_order):
        self.modules: list[nn.Module] = modules
        self.stubs_for_adapter: list[list[int]] = stubs_for_adapter  # per adapter: module indices
        self.cached: dict[int, tuple[object, object]] = cached       # index -> (full, base) outputs
        self.size = int(size)
        self.full_outputs = full_outputs
        self.adapter_order: list[int] = adapter_order  # per adapter: the tick its forward started (-1: unseen)

    @property
    def useful(self) -> bool:
        """Whether any adapter's ablations skip anything (else: use the plain batched path)."""
        return any(self.stubs_for_adapter)

    def skipped(self, adapter_index: int) -> int:
        """How many cached modules the adapter's ablations may skip."""
        return len(self.stubs_for_adapter[adapter_index])

    # -------------------------------------------------------------------------------- build
    @classmethod
    @torch.no_grad()
    def build(cls, model: nn.Module, adapters: Sequence[nn.Module], inputs: dict, size: int,
              set_gates: Callable[[float], None]) -> "PrefixCache":
        """Trace and cache. ``set_gates(v)`` sets every adapter's ``example_gate`` to ``v`` (1 = full
        model, 0 = base model) for one copy of the batch. Raises :class:`TraceMismatch` if the
        passes call modules in different orders."""
        named = list(model.named_modules())
        modules = [m for _, m in named]
        index = {id(m): i for i, m in enumerate(modules)}
        names = [n for n, _ in named]
        adapter_ids = {id(a) for a in adapters}
        # modules holding an adapter (or being one): every ancestor of every adapter, by name
        holds = set()
        for n, m in named:
            if id(m) in adapter_ids:
                parts = n.split(".") if n else []
                for k in range(len(parts) + 1):
                    holds.add(".".join(parts[:k]))
        holder = [names[i] in holds for i in range(len(modules))]

        # pass 1: base model, trace only
        set_gates(0.0)
        with _Tracer(modules) as tr:
            model(**inputs)
        seq = tr.sequence
        cand = {i for i in range(len(modules))
                if holder[i] and tr.calls.get(i) == 1 and i in tr.end and names[i] != ""}

        def ancestors(i):
            n = names[i]
            parts = n.split(".")
            for k in range(len(parts) - 1, 0, -1):
                j = name_index.get(".".join(parts[:k]))
                if j is not None:
                    yield j

        name_index = {n: i for i, n in enumerate(names)}
        starts: list[int | None] = []
        needed: set[int] = set()
        for a in adapters:
            ai = index.get(id(a))
            s = tr.start.get(ai) if ai is not None else None
            starts.append(s)
            if s is None:  # never called through __call__: no reuse for this adapter
                continue
            # cache only the outermost finished modules: the inner ones are never called
            done = {i for i in cand if tr.end[i] < s}
            needed.update(i for i in done if not any(j in done for j in ancestors(i)))

        capture = {i: 1 for i in needed}
        outs = []
        full_outputs = None
        for v in (1.0, 0.0):  # pass 2: full model (also the full-model loss), pass 3: base model
            set_gates(v)
            with _Tracer(modules, capture, size) as t2:
                o = model(**inputs)
            if t2.sequence != seq:
                raise TraceMismatch("the model called its modules in a different order in two passes")
            if v == 1.0:
                full_outputs = o
            outs.append(t2.outputs)
        cached = {}
        for i in needed:
            f, b = outs[0].get(i), outs[1].get(i)
            if f is not None and b is not None:
                cached[i] = (f, b)
        # every cached module that finished before the adapter started may be stubbed for it
        stubs = [[] if s is None else sorted((i for i in cached if tr.end[i] < s), key=lambda i: tr.start[i])
                 for s in starts]
        order = [-1 if s is None else int(s) for s in starts]
        return cls(modules, stubs, cached, size, full_outputs, order)

    # ------------------------------------------------------------------------------ evaluate
    def stubbed(self, adapter_indices: Sequence[int], use_base: Sequence[bool]) -> "_Stubs":
        """Context manager for one chunk: copy ``i`` of the batch ablates adapter
        ``adapter_indices[i]`` against the base model if ``use_base[i]`` else against the full one.
        The modules stubbed are those every copy may skip."""
        # the modules that finished before the earliest of the chunk's adapters started
        sets = [set(self.stubs_for_adapter[a]) for a in adapter_indices]
        common = set.intersection(*sets) if sets else set()
        return _Stubs(self, sorted(common), [bool(b) for b in use_base])


class _Stubs:
    def __init__(self, cache: PrefixCache, indices: list[int], use_base: list[bool]):
        self.cache, self.indices, self.use_base = cache, indices, use_base
        self._saved: list[tuple[nn.Module, bool, object]] = []

    def _stub(self, i: int):
        full, base = self.cache.cached[i]
        kinds = self.use_base
        calls = [0]

        def forward(*args, **kwargs):
            calls[0] += 1
            if calls[0] > 1:
                raise StubMisuse(f"module {i} was called twice in one forward pass")
            if all(kinds) or not any(kinds):
                src = base if kinds[0] else full
                return _map(src, lambda t: t.repeat(len(kinds), *([1] * (t.dim() - 1))))
            return _zip_map([base if k else full for k in kinds], lambda ts: torch.cat(ts, 0))
        return forward

    def __enter__(self) -> "_Stubs":
        for i in self.indices:
            m = self.cache.modules[i]
            had = "forward" in m.__dict__
            self._saved.append((m, had, m.__dict__.get("forward")))
            m.forward = self._stub(i)  # an instance attribute shadows the class's forward
        return self

    def __exit__(self, *exc) -> None:
        for m, had, old in reversed(self._saved):
            if had:
                m.forward = old
            else:
                del m.forward
        self._saved.clear()


def warn_fallback(reason: str) -> None:
    warnings.warn(f"ALoRA prefix reuse is off for this round ({reason}); every mask runs the full forward pass",
                  RuntimeWarning, stacklevel=3)
