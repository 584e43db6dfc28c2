"""Injection and the user-facing handle.

:func:`get_model` wraps the target layers of any ``nn.Module`` *in place* (the model stays the same
object, so a Hugging Face model keeps its class, ``forward`` signature and ``save_pretrained``;
``Trainer``, DDP and ``torch.compile`` see an ordinary module) and returns an
:class:`AdaptiveModel` handle that owns the method's state: importance scores, the allocation
policy, the step counter and the rank history.

The handle does no file I/O; :mod:`elalora.persistence` reads and writes the files, and
:func:`load_adapter` here rebuilds a handle from what it reads.

Imports: :mod:`elalora.targets`, :mod:`elalora.allocation`, :mod:`elalora.importance`,
:mod:`elalora.persistence`, :mod:`elalora.validation`, :mod:`elalora.layers`, :mod:`elalora.config`,
:mod:`elalora.errors`,
:mod:`elalora._handle`; the Trainer callback (:mod:`elalora.integrations.trainer`) lazily, so that
``import elalora`` does not import the Trainer.
"""

from __future__ import annotations

import os
import warnings
import weakref
from typing import Any

import torch
from torch import nn

from . import persistence
from ._handle import attach_handle, carried_handle, detach_handle, handle_of
from .allocation import make_allocator
from .allocation.base import RankEvent
from .config import AdapterConfig, config_from_dict
from .errors import AdapterLoadError, ConfigError, TargetModuleError, TrainingDivergedError, diverged_message
from .importance import ImportanceTracker
from .layers import ElasticAdapter, adapter_form, adapter_param_count, base_shape, is_dtensor, to_host
from .targets import DEFAULT_TARGET_MODULES, find_target_modules, lies_within, matches_suffix
from .validation import AdapterDir, check_config, check_handle_state, checkpoint_identity

__all__ = ["get_model", "AdaptiveModel", "handle_of", "load_adapter", "DEFAULT_TARGET_MODULES",
           "find_target_modules", "TargetModuleError", "TrainingDivergedError"]


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def _build_adapter(base: nn.Module, config: AdapterConfig, r: int, capacity: int, alpha: float,
                   generator: torch.Generator) -> ElasticAdapter:
    return adapter_form(config.form)(base, r=r, capacity=capacity, lora_alpha=alpha, lora_dropout=config.lora_dropout,
                                     generator=generator)


class AdaptiveModel:
    """The handle returned by :func:`get_model`.

    Attributes:
        model: the wrapped ``nn.Module`` (the same object that was passed in).
        config: the method configuration.
        names, adapters: adapted module names and their :class:`~elalora.layers.ElasticAdapter`.
        allocator: the method's allocation policy.
        importance: the EMA score tracker (``None`` for methods without scores).
        events: every rank change so far, as :class:`~elalora.allocation.base.RankEvent`.
        step_count: optimizer steps seen (the ``t`` of the next :meth:`step`).
    """

    def __init__(self, model: nn.Module, config: AdapterConfig, *, rank_pattern: dict[str, int] | None = None,
                 capacity_pattern: dict[str, int] | None = None,
                 alpha_pattern: dict[str, float] | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if carried_handle(model) is not None:
            raise TargetModuleError("this model already carries elalora adapters; build the adapters once per model")
        check_config(config)  # again: a field set after construction (config.budget = "foo") fails here
        self.model = model
        self.config = config
        names = find_target_modules(model, config.target_modules, config.modules_to_save)
        rank_pattern = dict(rank_pattern or getattr(config, "rank_pattern", None) or {})
        alpha_pattern = dict(alpha_pattern or getattr(config, "alpha_pattern", None) or {})
        unknown = set(rank_pattern) - set(names)
        if unknown:
            raise TargetModuleError(f"rank_pattern names modules that are not adapted: {sorted(unknown)[:5]}")
        plan = []
        for name in names:
            r = int(rank_pattern.get(name, config.initial_rank))
            cap = int((capacity_pattern or {}).get(name, max(config.capacity, r)))
            d_in, d_out, _ = base_shape(model.get_submodule(name))
            if cap > min(d_in, d_out):
                # Checked before anything is allocated: a huge r would otherwise allocate
                # capacity × (d_in + d_out) per matrix and only fail (or be killed) much later.
                raise ConfigError(
                    f"rank capacity {cap} (r={r}) of module {name!r} exceeds its matrix size min(d_in, d_out) = "
                    f"min({d_in}, {d_out}) = {min(d_in, d_out)}; lower r (and max_rank / init_r) to at most "
                    f"{min(d_in, d_out)}, or leave this module out of target_modules")
            plan.append((name, r, cap))
        gen = torch.Generator(device="cpu").manual_seed(config.seed)
        self.names: list[str] = names
        self.adapters: list[ElasticAdapter] = []
        for name, r, cap in plan:
            base = model.get_submodule(name)
            a = _build_adapter(base, config, r, cap, float(config.lora_alpha), gen)
            # The scale is fixed for the run (SPEC §1). With an alpha_pattern (PEFT semantics, e.g. a
            # GeLoRA plan) it is alpha_m / r_m; otherwise one global lora_alpha / r, so that a rank
            # moved between matrices weighs the same everywhere.
            if name in alpha_pattern:
                a.scaling = float(alpha_pattern[name]) / max(r, 1)
            else:
                a.scaling = float(config.lora_alpha) / max(config.initial_rank, 1)
            _set_submodule(model, name, a)
            self.adapters.append(a)
        self._freeze()
        if any(a.quantized for a in self.adapters):
            from .quant import allow_trainer_on_quantized_base, keep_standard_4bit_layout

            allow_trainer_on_quantized_base(model)
            for a in self.adapters:  # bitsandbytes' CPU inference repacking would stop gradients (quant.py)
                if a.quantized:
                    keep_standard_4bit_layout(a.base_layer)
        self.importance: ImportanceTracker | None = None
        self.allocator = make_allocator(config, names, self.adapters)
        if self.allocator.uses_importance:
            self.importance = ImportanceTracker(self.adapters, config.beta1, config.beta2)
        self.events: list[RankEvent] = []
        self.step_count = 0
        self.num_steps_without_grad = 0
        self._others: tuple[Any, tuple[int, ...], list[nn.Parameter]] | None = None  # see _other_params
        self.initial_rank_pattern = self.rank_pattern()
        self._hook = None
        if getattr(config, "orth_reg_weight", 0) and adapter_form(config.form).has_orthogonality_penalty:
            self._hook = model.register_forward_hook(self._add_orth_reg)
        attach_handle(model, self)  # lets the Trainer callback and persistence find the handle

    # ------------------------------------------------------------------------------ structure
    def _freeze(self) -> None:
        keep = list(self.config.modules_to_save or [])
        kept = set()
        for name, p in self.model.named_parameters():
            if any(x in name.split(".") for x in ("lora_P", "lora_Q", "lora_lambda", "lora_A", "lora_B")):
                p.requires_grad_(True)
            elif any(lies_within(name.rpartition(".")[0], k) for k in keep):
                if not p.dtype.is_floating_point:
                    raise TargetModuleError(
                        f"modules_to_save: {name} is stored quantised ({p.dtype}) and cannot be trained in full; "
                        "keep that module out of the quantisation (BitsAndBytesConfig(llm_int8_skip_modules=[...])) "
                        "or drop it from modules_to_save")
                p.requires_grad_(True)
                kept.update(k for k in keep if lies_within(name.rpartition(".")[0], k))
            else:
                p.requires_grad_(False)
        missing = set(keep) - kept
        if missing:
            raise TargetModuleError(f"modules_to_save {sorted(missing)} match no parameter of the model")

    def modules_to_save_names(self) -> list[str]:
        """Full names of the modules kept trainable in full (e.g. the classifier head)."""
        keep = list(self.config.modules_to_save or [])
        out = []
        for name, _ in self.model.named_modules():
            if name and any(matches_suffix(name, k) for k in keep):
                if not any(name.startswith(o + ".") for o in out):
                    out.append(name)
        return out

    def rank_pattern(self) -> dict[str, int]:
        """Active rank of every adapted module."""
        return {n: a.rank for n, a in zip(self.names, self.adapters)}

    @property
    def total_rank(self) -> int:
        return sum(a.rank for a in self.adapters)

    def parameter_counts(self) -> dict[str, int]:
        """``trainable``: parameters with ``requires_grad`` (capacity included); ``active``: adapter
        parameters of active ranks plus modules kept in full; ``total``: all model parameters."""
        total = sum(p.numel() for p in self.model.parameters())
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        adapter_cap = sum(p.numel() for a in self.adapters for _, p, _ in a.slot_parameters())
        active = sum(adapter_param_count(a.form, a.rank, a.in_features, a.out_features) for a in self.adapters)
        return {"total": total, "trainable": trainable, "active": trainable - adapter_cap + active,
                "adapter_capacity": adapter_cap, "adapter_active": active}

    def adapter_parameters(self) -> list[nn.Parameter]:
        return [p for a in self.adapters for _, p, _ in a.slot_parameters()]

    # ---------------------------------------------------------------------------- training
    def set_total_steps(self, total_steps: int) -> None:
        """Tell the method how many optimizer steps the run has (the Trainer callback does this)."""
        self.allocator.set_total_steps(total_steps)

    def orthogonal_loss(self) -> torch.Tensor:
        """``R`` of SPEC §1 over active ranks: the unsquared Frobenius norms of ``QQᵀ − I`` and
        ``PᵀP − I`` averaged over tensors (2 per matrix), as PEFT and the authors' code compute it.
        Add ``orth_reg_weight · R`` to a loss computed outside the model (the forward hook adds it
        to ``outputs.loss`` automatically)."""
        svd = [a for a in self.adapters if a.has_orthogonality_penalty]
        if not svd:
            p = next(self.model.parameters())
            return torch.zeros((), device=p.device)
        return torch.stack([a.orthogonality_penalty() for a in svd]).sum() / (2 * len(svd))

    def _add_orth_reg(self, module, args, output):
        if not module.training or not torch.is_grad_enabled():
            return None
        loss = None
        if isinstance(output, dict) or hasattr(output, "keys"):
            loss = output.get("loss") if hasattr(output, "get") else None
            if loss is not None:
                output["loss"] = loss + self.config.orth_reg_weight * self.orthogonal_loss()
                return output
        return None

    @torch.no_grad()
    def step(self, optimizer: torch.optim.Optimizer | None = None, *, step: int | None = None) -> list[RankEvent]:
        """The per-optimizer-step call: place it between ``optimizer.step()`` and ``zero_grad()``.

        Updates the importance scores (when the method's phase asks for it) and runs an allocation
        round when one is due. ``step`` overrides the internal counter (the Trainer callback passes
        ``state.global_step``). Returns the rank changes made at this step.
        """
        t = self.step_count if step is None else int(step)
        if self.allocator.total_steps is None:
            total = getattr(self.config, "total_steps", None)
            if total is None:
                raise ConfigError("total_steps is unknown: pass total_steps in the config, call "
                                  "set_total_steps(T), or train with the Trainer callback")
            self.allocator.set_total_steps(total)
        skipped = False
        if self.importance is not None and self.allocator.wants_importance(t):
            if not any(p.grad is not None for p in self.adapter_parameters()):
                # After zero_grad() or without backward(): scores from nothing would drive the
                # round, so this step neither updates them nor changes ranks.
                self.num_steps_without_grad += 1
                warnings.warn(
                    f"handle.step() at step {t} found no gradient on any adapter (called after optimizer.zero_grad() "
                    "or without loss.backward()): the importance scores were not updated and no ranks changed. Call "
                    "it between optimizer.step() and optimizer.zero_grad()", RuntimeWarning, stacklevel=2)
                skipped = True
            else:
                # the optimizer's other gradients too: a grad scaler skips the step if any of them overflowed
                others = [p.grad for p in self._other_params(optimizer) if p.grad is not None]
                skipped = not self.importance.update(others)
                if skipped:
                    # Non-finite gradients: an fp16 step the grad scaler skipped (weights intact), or a
                    # diverged run (weights already NaN/inf after optimizer.step()). Only here, on the
                    # rare skipped step, are the weights scanned.
                    self.check_finite(t)
        events: list[RankEvent] = []
        if not skipped:
            events = self.allocator.on_step(t, optimizer, importance=self.importance, model=self.model)
            if events:
                self.check_finite(t)  # a round is rare; its decisions must not come from NaN weights
        self.events.extend(events)
        self.step_count = t + 1
        return events

    def __getstate__(self) -> dict[str, Any]:
        # torch.save(model) pickles the handle attached to it; the optimizer cache holds a weak reference
        state = dict(self.__dict__)
        state["_others"] = None
        return state

    def _other_params(self, optimizer: torch.optim.Optimizer | None) -> list[nn.Parameter]:
        """The optimizer's parameters that are not adapter weights (a head trained in full), listed once per
        optimizer and again only when its parameter groups change: the per-step call must not rebuild a set
        of every adapter parameter's id."""
        if optimizer is None:
            return []
        sizes = tuple(len(grp["params"]) for grp in optimizer.param_groups)
        cached = self._others
        if cached is None or cached[0]() is not optimizer or cached[1] != sizes:
            mine = {id(p) for p in self.adapter_parameters()}
            others = [p for grp in optimizer.param_groups for p in grp["params"] if id(p) not in mine]
            self._others = cached = (weakref.ref(optimizer), sizes, others)
        return cached[2]

    @torch.no_grad()
    def check_finite(self, step: int | None = None) -> None:
        """Raise :class:`TrainingDivergedError` if any adapter weight (or module kept in full) is NaN/inf."""
        t = self.step_count if step is None else step
        params = [(f"{n}.{pname}", p) for n, a in zip(self.names, self.adapters)
                  for pname, p, _ in a.slot_parameters()]
        # One flag per weight, read in one transfer per device (a round must not sync once per matrix);
        # sharded (FSDP2) weights keep the per-tensor collective check.
        plain = [(k, p) for k, p in params if not is_dtensor(p)]
        flags = to_host([torch.isfinite(p).all() for _, p in plain])
        for (k, _), ok in zip(plain, flags):
            if not ok.numpy():
                raise TrainingDivergedError(diverged_message(t, f"the adapter weight {k}"))
        for k, p in params:
            if is_dtensor(p) and not bool(torch.isfinite(p).all()):
                raise TrainingDivergedError(diverged_message(t, f"the adapter weight {k}"))

    def callback(self, **kwargs):
        """A Hugging Face ``TrainerCallback`` driving this model (see :mod:`elalora.integrations.trainer`)."""
        from .integrations.trainer import ElaLoRACallback

        return ElaLoRACallback(self, **kwargs)

    # ------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs besides the model and optimizer state dicts."""
        return {
            "format_version": 1,
            # what the state belongs to (a resume into another method, form, budget or schedule is refused:
            # elalora.validation.check_handle_state); "method" was there from the start, the rest since issue 38
            **checkpoint_identity(self.config),
            "capacities": {n: a.capacity for n, a in zip(self.names, self.adapters)},
            "names": list(self.names),
            "step_count": self.step_count,
            "events": [e.to_dict() for e in self.events],
            "initial_rank_pattern": dict(self.initial_rank_pattern),
            "masks": {n: a.active.detach().cpu().clone() for n, a in zip(self.names, self.adapters)},
            "allocator": self.allocator.state_dict(),
            "importance": None if self.importance is None else self.importance.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`. Everything is checked first: a state that does not fit
        raises ``ValueError`` and leaves the handle unchanged."""
        self.validate_state_dict(state)
        masks = [state["masks"][n] for n in self.names]
        events = [RankEvent(**e) for e in state["events"]]
        backup = self.state_dict()
        try:
            for m, a in zip(masks, self.adapters):
                a.active.copy_(m.to(a.active.device))
            self.step_count = int(state["step_count"])
            self.events = events
            self.initial_rank_pattern = dict(state["initial_rank_pattern"])
            self.allocator.load_state_dict(state["allocator"])
            if self.importance is not None and state.get("importance") is not None:
                self.importance.load_state_dict(state["importance"])
        except BaseException:
            self._restore_state(backup)
            raise

    def _restore_state(self, backup: dict[str, Any]) -> None:
        for n, a in zip(self.names, self.adapters):
            a.active.copy_(backup["masks"][n].to(a.active.device))
        self.step_count = backup["step_count"]
        self.events = [RankEvent(**e) for e in backup["events"]]
        self.initial_rank_pattern = dict(backup["initial_rank_pattern"])
        self.allocator.load_state_dict(backup["allocator"])
        if self.importance is not None and backup.get("importance") is not None:
            self.importance.load_state_dict(backup["importance"])

    def validate_state_dict(self, state: dict[str, Any]) -> None:
        """Raise :class:`~elalora.errors.AdapterLoadError` (a ``ValueError``) if ``state`` cannot be loaded into
        this handle (:func:`elalora.validation.check_handle_state`); changes nothing."""
        check_handle_state(state, self)

    # ----------------------------------------------------------------- persistence shortcuts
    def save_pretrained(self, path: str, **kw) -> None:
        persistence.save_adapter(self, path, **kw)

    def export_peft(self, path: str, **kw) -> dict[str, int]:
        """Write a plain PEFT LoRA adapter; returns the exported rank pattern.

        ``layout="compact"`` (default, rank-0 modules dropped) or ``layout="uniform"`` (every module
        zero-padded to the largest rank, for serving engines); see :func:`elalora.persistence.export_peft`."""
        return persistence.export_peft(self, path, **kw)

    def export_gguf(self, path: str, **kw) -> dict:
        """Write a llama.cpp LoRA adapter (``.gguf``, uniform layout); see :func:`elalora.export_gguf.export_gguf`."""
        from .export_gguf import export_gguf

        return export_gguf(self, path, **kw)

    def merge_and_unload(self) -> nn.Module:
        return persistence.merge_and_unload(self)

    def merge(self) -> None:
        if getattr(self, "unloaded", False):
            raise RuntimeError("merge_and_unload() already folded the adapters into the base weights")
        for a in self.adapters:
            a.merge()

    def unmerge(self) -> None:
        if getattr(self, "unloaded", False):
            raise RuntimeError("merge_and_unload() folded the adapters into the base weights and removed them from "
                               "the model; there is nothing to unmerge. Reload the adapter onto a fresh base model "
                               "(the handle can still save_pretrained / export_peft)")
        for a in self.adapters:
            a.unmerge()

    def set_adapters_enabled(self, enabled: bool) -> None:
        """Disable (``False``) or re-enable the adapters: disabled, the model is its base."""
        for a in self.adapters:
            a.disabled = not enabled

    def remove_hooks(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def __repr__(self) -> str:
        c = self.parameter_counts()
        return (f"AdaptiveModel(method={self.config.method}, matrices={len(self.adapters)}, "
                f"total_rank={self.total_rank}, trainable={c['trainable']:,}, active={c['active']:,})")


def get_model(model: nn.Module, config: AdapterConfig, **kw) -> AdaptiveModel:
    """Wrap the target layers of ``model`` in place and return the :class:`AdaptiveModel` handle."""
    return AdaptiveModel(model, config, **kw)


def _unwrap(model: nn.Module, handle: AdaptiveModel | None, grads: dict[str, bool], training: bool,
            before: set[int]) -> None:
    """Undo a wrapping that failed half-way: the base layers of the adapters it added (not in ``before``)
    back in place, no handle, the parameters' ``requires_grad`` and the training mode as they were."""
    for name, m in list(model.named_modules()):
        if isinstance(m, ElasticAdapter) and id(m) not in before:
            _set_submodule(model, name, m.base_layer)
    if handle is not None:
        handle.remove_hooks()
    if carried_handle(model) is not None and carried_handle(model) is handle:
        detach_handle(model)
    for n, p in model.named_parameters():
        if n in grads:
            p.requires_grad_(grads[n])
    model.train(training)


def load_adapter(model: nn.Module, path: str | os.PathLike, *, is_trainable: bool = False,
                 check_base_model: bool = True) -> AdaptiveModel:
    """Wrap a fresh ``model`` and load the adapter saved at ``path`` onto it.

    :func:`elalora.persistence.read_adapter` checks everything before the model is touched, so a
    failed load leaves ``model`` as it was: the config, that every saved module exists in ``model``
    with the same shape, that the weight file holds exactly the listed tensors with the right
    shapes and finite values, and -- unless ``check_base_model=False`` -- that ``model``'s weights
    are the ones the adapter was trained on (a fingerprint recorded at save time). The head the adapter
    was trained with is then restored from its ``elalora_head.json`` (:func:`elalora.heads.restore_head`:
    mean pooling is put back on a fresh base model).
    """
    adir = path if isinstance(path, AdapterDir) else AdapterDir(path)
    cfg, tensors = persistence.read_adapter(model, adir, check_base_model=check_base_model)
    head = persistence.read_head_info(adir.path)  # checked now, put back once the adapter is in place
    modules = cfg["modules"]
    try:
        conf_d = dict(cfg["config"])
        conf_d["target_modules"] = list(modules)
        conf_d.pop("rank_pattern", None) if conf_d.get("method") == "elalora" else None
        config = config_from_dict(conf_d)
        events = [RankEvent(**e) for e in cfg.get("events", [])]
    except (ConfigError, TypeError, ValueError, KeyError) as e:
        raise AdapterLoadError(f"{adir.config_path}: the method config or history is invalid "
                               f"({' '.join(str(e).split())}); the adapter config was edited or is corrupt") from None
    if config.form != next(iter(modules.values()))["form"]:  # checked by AdapterDir; kept as the invariant
        raise AdapterLoadError(f"{adir.config_path}: the config's form {config.form!r} is not the modules' form")
    # Everything was checked; should wrapping or copying still fail, the model is put back as it was.
    if carried_handle(model) is not None:
        raise TargetModuleError("this model already carries elalora adapters; load the adapter onto a fresh model")
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    training = model.training
    before = {id(m) for m in model.modules() if isinstance(m, ElasticAdapter)}
    handle = None
    try:
        handle = AdaptiveModel(
            model, config,
            rank_pattern={n: i["rank"] for n, i in modules.items()},
            capacity_pattern={n: i["capacity"] for n, i in modules.items()},
        )
        persistence.restore_adapter(handle, cfg, tensors, adir.path)
        _restore_head(model, head, adir.path)  # the recorded pooling (elalora_head.json)
    except BaseException:
        _unwrap(model, handle, grads, training, before)
        raise
    handle.events = events
    if not is_trainable:
        for p in model.parameters():
            p.requires_grad_(False)
        model.eval()
    return handle


def _restore_head(model: nn.Module, head: dict | None, path) -> None:
    """The pooling recorded beside the adapter (``head``), put back on ``model`` (AdapterLoadError if it
    cannot take it)."""
    from .heads import restore_head

    try:
        restore_head(model, head)
    except ConfigError as e:
        raise AdapterLoadError(f"{path}: {e}") from None
