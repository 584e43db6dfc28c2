"""Training checkpoints: one file with everything a plain training loop needs to resume exactly.

:func:`save_checkpoint` writes, atomically, the model's trainable state (adapter parameters, active
masks, modules kept in full), the method's state (EMA scores, step counter, rank history), the
optimizer, the LR scheduler, the CPU RNG state and a user ``extra`` dict. :func:`load_checkpoint`
checks all of it against the live handle and optimizer before it changes anything, and rolls back
what it applied if a later part fails: a failed load leaves everything as it was.

Sharded models (FSDP2): both are called on every process. The optimizer state is gathered into one
full, FQN-keyed state dict (``torch.distributed.checkpoint.state_dict``) and only global rank 0
writes; on load each process writes its own shards back (:func:`elalora.layers.edit_`). A checkpoint
resumes only under the parallelism it was saved with (sharded or not). (The Trainer integration uses
the Trainer's own checkpoints plus the handle's state; see :mod:`elalora.integrations`.)

Imports: :mod:`elalora.persistence` (the rank-0 writer), :mod:`elalora.layers`, :mod:`elalora.validation`,
:mod:`elalora._io`, :mod:`elalora.errors`.
"""

from __future__ import annotations

import copy
import io
import os
from pathlib import Path

import torch

from ._io import atomic_write_bytes
from .validation import check_optimizer_state
from .errors import AdapterLoadError
from .layers import edit_, full_tensor
from .persistence import is_sharded, write_on_rank0

__all__ = ["save_checkpoint", "load_checkpoint"]


def save_checkpoint(path: str | os.PathLike, handle, optimizer=None, lr_scheduler=None,
                    extra: dict | None = None) -> None:
    """Save everything a plain training loop needs to resume exactly, atomically, to one file:
    the model's trainable state (adapter parameters, masks, modules kept in full), the method's
    state (EMA scores, step counter, rank history), optimizer, LR scheduler, the CPU RNG and
    ``extra``. An interrupted save leaves the previous file intact."""
    trainable = {n for n, p in handle.model.named_parameters() if p.requires_grad}
    model_state = {k: full_tensor(v.detach()).cpu().clone() for k, v in handle.model.state_dict().items()
                   if k in trainable or k.endswith(".active")}
    sharded = is_sharded(handle)
    opt_state = None
    if optimizer is not None:
        if sharded:
            # Sharded optimizer state (DTensors): gathered into one full, FQN-keyed state dict.
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            opt_state = get_optimizer_state_dict(handle.model, optimizer,
                                                 options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        else:
            opt_state = optimizer.state_dict()
    blob = {
        "elalora_checkpoint_version": 1,
        "sharded_optimizer": sharded,
        "model": model_state,
        "elalora": handle.state_dict(),
        "optimizer": opt_state,
        "lr_scheduler": None if lr_scheduler is None else lr_scheduler.state_dict(),
        "rng": torch.get_rng_state(),
        "extra": extra or {},
    }
    with write_on_rank0(handle) as writer:
        if writer:
            buf = io.BytesIO()
            torch.save(blob, buf)
            atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: str | os.PathLike, handle, optimizer=None, lr_scheduler=None) -> dict:
    """Restore what :func:`save_checkpoint` wrote; returns its ``extra`` dict."""
    path = Path(path)
    if not path.is_file():
        raise AdapterLoadError(f"checkpoint {path} does not exist")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated zip, pickle errors, …
        raise AdapterLoadError(f"checkpoint {path} is truncated or corrupt ({type(e).__name__}: {e})") from None
    if not isinstance(blob, dict) or "elalora_checkpoint_version" not in blob:
        raise AdapterLoadError(f"{path} is not an elalora training checkpoint")
    v = blob["elalora_checkpoint_version"]
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise AdapterLoadError(f"checkpoint {path}: elalora_checkpoint_version must be an integer >= 1, got {v!r}")
    if v > 1:
        raise AdapterLoadError(f"{path} was written by a newer elalora (checkpoint version "
                               f"{blob['elalora_checkpoint_version']}); upgrade elalora")
    _check_checkpoint_fits(path, blob, handle, optimizer)
    # Everything was checked above; what is applied is rolled back if a later part still fails: a
    # failed load leaves handle, model, optimizer and scheduler as they were.
    own = handle.model.state_dict()
    backup_handle = handle.state_dict()
    # full_tensor: a sharded (FSDP2) parameter is backed up whole (every process calls it, in the same order)
    backup_model = {k: full_tensor(own[k].detach()).clone() for k in blob["model"]}
    backup_opt = None if optimizer is None else copy.deepcopy(optimizer.state_dict())
    backup_sched = None if lr_scheduler is None else copy.deepcopy(lr_scheduler.state_dict())

    def write_model(state):
        with torch.no_grad():
            for k, v in state.items():
                # edit_ writes each process's shard of a sharded (FSDP2) tensor; plain tensors are copied.
                edit_(own[k], lambda t, v=v: t.copy_(v.to(t.device, t.dtype)))

    try:
        handle.load_state_dict(blob["elalora"])
        write_model(blob["model"])
        if optimizer is not None and blob.get("optimizer") is not None:
            if blob.get("sharded_optimizer"):
                from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

                set_optimizer_state_dict(handle.model, optimizer, blob["optimizer"],
                                         options=StateDictOptions(full_state_dict=True))
            else:
                optimizer.load_state_dict(blob["optimizer"])
        if lr_scheduler is not None and blob.get("lr_scheduler") is not None:
            lr_scheduler.load_state_dict(blob["lr_scheduler"])
        torch.set_rng_state(blob["rng"])
    except Exception as e:
        handle._restore_state(backup_handle)
        write_model(backup_model)
        if backup_opt is not None:
            optimizer.load_state_dict(backup_opt)
        if backup_sched is not None:
            lr_scheduler.load_state_dict(backup_sched)
        raise AdapterLoadError(f"checkpoint {path} could not be loaded ({type(e).__name__}: {e}); nothing was "
                               "changed") from None
    return blob["extra"]


def _check_checkpoint_fits(path, blob: dict, handle, optimizer) -> None:
    """The handle state (:func:`elalora.validation.check_handle_state`: method, form, budget, capacities,
    schedule, allocator values), model state and optimizer state of a checkpoint fit (nothing is changed)."""
    try:
        handle.validate_state_dict(blob.get("elalora"))
    except ValueError as e:
        raise AdapterLoadError(f"checkpoint {path} does not fit this model: {e}") from None
    model_state = blob.get("model")
    own = handle.model.state_dict()
    if not isinstance(model_state, dict) or not all(torch.is_tensor(v) for v in model_state.values()):
        raise AdapterLoadError(f"checkpoint {path} holds no model state (an object of tensors)")
    unexpected = [k for k in model_state if k not in own]
    if unexpected:
        raise AdapterLoadError(f"checkpoint {path} has parameters this model lacks: {unexpected[:3]}")
    wrong = [k for k, v in model_state.items() if tuple(v.shape) != tuple(own[k].shape)]
    if wrong:
        raise AdapterLoadError(f"checkpoint {path}: {wrong[0]} has shape {tuple(model_state[wrong[0]].shape)}, "
                               f"the model {tuple(own[wrong[0]].shape)}")
    for k, v in model_state.items():
        bools = (v.dtype == torch.bool, own[k].dtype == torch.bool)
        if v.is_floating_point() != own[k].is_floating_point() or bools[0] != bools[1]:
            raise AdapterLoadError(f"checkpoint {path}: {k} is {v.dtype}, the model's is {own[k].dtype}")
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise AdapterLoadError(f"checkpoint {path}: {k} holds NaN or inf values (the run had diverged); "
                                   "resume from an earlier checkpoint with a lower learning rate")
    masks = blob["elalora"]["masks"]
    for n in handle.names:
        k = f"{n}.active"
        if k in model_state and not torch.equal(model_state[k], masks[n]):
            raise AdapterLoadError(f"checkpoint {path}: the model's mask {k} and the handle state's disagree; the "
                                   "checkpoint is corrupt")
    if not isinstance(blob.get("extra", {}), dict):
        raise AdapterLoadError(f"checkpoint {path}: extra must be a dict, got {type(blob['extra']).__name__}")
    if optimizer is not None and blob.get("optimizer") is not None:
        if bool(blob.get("sharded_optimizer")) != is_sharded(handle):
            raise AdapterLoadError(f"checkpoint {path} was saved from a "
                                   f"{'sharded' if blob.get('sharded_optimizer') else 'plain'} "
                                   "model; resume it with the same parallelism (FSDP or not)")
        if not blob.get("sharded_optimizer"):  # a sharded save holds the full state, not this process's
            check_optimizer_state(optimizer, blob["optimizer"], path)
