"""Saving, loading, exporting and merging (the only module of the library that touches files).

Formats:

* **elalora adapter** (``save_adapter`` / ``load_adapter``): ``adapter_config.json`` (format version,
  method config, per-module rank / capacity / shape / scale, base-model identity) and
  ``adapter_model.safetensors`` compacted to the active ranks (no dead slots on disk). Loading
  rebuilds every module at its capacity with the saved ranks active, so training can resume.
* **PEFT LoRA** (``export_peft``, SPEC §8): per module with active ranks ``k``::

      lora_A = diag(λ_k) · Q_k · s      lora_B = P_k            (fp32, cast at the end)
      rank_pattern[name] = alpha_pattern[name] = r_m             (per-module scale exactly 1)
      top-level r == lora_alpha

  Modules at rank 0 are dropped; modules kept trainable in full go to ``modules_to_save``.
  ``peft.PeftModel.from_pretrained(base, dir)`` loads it with no code from this project.

Every directory is written atomically: into a temporary sibling, then swapped into place, so an
interrupted save leaves the previous contents loadable.

Sharded models (FSDP2 ``fully_shard``: adapter parameters are DTensors): :func:`save_adapter`,
:func:`export_peft` and :func:`save_checkpoint` must then be called on **every** process — the
tensors are gathered (a collective) — and only global rank 0 writes; the others wait at a barrier
until the files exist. :func:`load_checkpoint` is called on every process and writes each process's
shards back.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from .config import CONFIG_FORMAT_VERSION, config_from_dict
from .layers import ElasticAdapter, SVDAdapter, full_tensor, is_dtensor
from .model import AdaptiveModel, handle_of

__all__ = [
    "AdapterLoadError", "save_adapter", "load_adapter", "export_peft", "merge_and_unload",
    "atomic_directory", "atomic_write_bytes", "ADAPTER_CONFIG", "ADAPTER_WEIGHTS",
    "save_checkpoint", "load_checkpoint",
]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


class AdapterLoadError(ValueError):
    """An adapter directory that cannot be loaded onto the given model; the message says why."""


# ------------------------------------------------------------------------------------ atomic I/O
@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary directory; on success it replaces ``path``, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        for f in tmp.iterdir():  # flush file contents before the swap
            if f.is_file():
                with open(f, "rb+") as fh:
                    os.fsync(fh.fileno())
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.rmdir(old)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write a file via a temporary sibling and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path), metadata=metadata)


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise AdapterLoadError(f"{path} is missing: not an adapter directory (expected {ADAPTER_WEIGHTS})")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise AdapterLoadError(f"{path} is truncated or corrupt ({e}); re-save or re-download the adapter") from None


# --------------------------------------------------------------------------------- base identity
def _base_identity(model: nn.Module) -> dict:
    cfg = getattr(model, "config", None)
    return {
        "class": type(model).__name__,
        "name_or_path": getattr(cfg, "_name_or_path", None) or getattr(cfg, "name_or_path", None),
        "model_type": getattr(cfg, "model_type", None),
    }


def _trainable_full_modules(handle: AdaptiveModel) -> dict[str, torch.Tensor]:
    out = {}
    for mname in handle.modules_to_save_names():
        for pname, p in handle.model.get_submodule(mname).named_parameters():
            out[f"{mname}.{pname}"] = full_tensor(p.detach())
    return out


def _sharded(handle: AdaptiveModel) -> bool:
    """Whether the model's parameters are sharded DTensors (FSDP2): then saving is collective."""
    return any(is_dtensor(p) for p in handle.model.parameters())


@contextlib.contextmanager
def _write_on_rank0(handle: AdaptiveModel) -> Iterator[bool]:
    """Yield whether this process writes; on a sharded model only rank 0 does, and every process
    leaves only once the files are complete (a barrier)."""
    if not _sharded(handle):
        yield True
        return
    import torch.distributed as dist

    ok = True
    try:
        yield dist.get_rank() == 0
    except BaseException:
        ok = False
        raise
    finally:
        if ok:
            dist.barrier()


# ------------------------------------------------------------------------------------- save/load
def save_adapter(handle: AdaptiveModel, path: str | os.PathLike, *, include_history: bool = True) -> None:
    """Save the adapter compacted to its active ranks (see the module docstring)."""
    modules, tensors = {}, {}
    for name, a in zip(handle.names, handle.adapters):
        idx = a.active_indices()
        modules[name] = {
            "kind": a.kind, "rank": int(idx.numel()), "capacity": a.capacity, "in_features": a.in_features,
            "out_features": a.out_features, "fan_in_fan_out": a.fan_in_fan_out, "scaling": a.scaling,
            "r_init": a.r_init,
        }
        for pname, p, dim in a.slot_parameters():
            full = full_tensor(p.detach())
            tensors[f"{name}.{pname}"] = full.index_select(dim, idx.to(full.device))
    full = _trainable_full_modules(handle)
    tensors.update({k: v.detach() for k, v in full.items()})
    cfg = {
        "elalora_format_version": CONFIG_FORMAT_VERSION,
        "method": handle.config.method,
        "config": handle.config.to_dict(),
        "base_model": _base_identity(handle.model),
        "modules": modules,
        "modules_to_save": handle.modules_to_save_names(),
        "full_parameters": sorted(full),
        "rank_pattern": handle.rank_pattern(),
        "initial_rank_pattern": handle.initial_rank_pattern,
        "step_count": handle.step_count,
    }
    if include_history:
        cfg["events"] = [e.to_dict() for e in handle.events]
    with _write_on_rank0(handle) as writer:
        if writer:
            _write_adapter_dir(path, tensors, cfg)


def _write_adapter_dir(path, tensors, cfg) -> None:
    with atomic_directory(path) as tmp:
        _save_safetensors(tensors, tmp / ADAPTER_WEIGHTS, metadata={"format": "pt", "elalora": str(CONFIG_FORMAT_VERSION)})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(cfg, indent=2, default=str))


def read_adapter_config(path: str | os.PathLike) -> dict:
    p = Path(path) / ADAPTER_CONFIG
    if not Path(path).is_dir():
        raise AdapterLoadError(f"adapter directory {path} does not exist")
    if not p.is_file():
        raise AdapterLoadError(f"{path} holds no {ADAPTER_CONFIG}: not an elalora adapter directory")
    try:
        cfg = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterLoadError(f"{p} is not valid JSON ({e}); the adapter is corrupt") from None
    if "elalora_format_version" not in cfg:
        if cfg.get("peft_type"):
            raise AdapterLoadError(f"{path} is a PEFT {cfg['peft_type']} adapter, not an elalora adapter; "
                                   "load it with peft.PeftModel.from_pretrained")
        raise AdapterLoadError(f"{p} has no elalora_format_version: not an elalora adapter")
    v = cfg["elalora_format_version"]
    if not isinstance(v, int) or v > CONFIG_FORMAT_VERSION:
        raise AdapterLoadError(f"{path} was written in elalora format {v}; this elalora reads up to "
                               f"{CONFIG_FORMAT_VERSION}. Upgrade elalora to load it")
    return cfg


def load_adapter(model: nn.Module, path: str | os.PathLike, *, is_trainable: bool = False) -> AdaptiveModel:
    """Wrap a fresh ``model`` and load the adapter saved at ``path`` onto it.

    Checks that every saved module exists in ``model`` with the same shape before touching the
    model, so a wrong base model fails with a message naming the first mismatch.
    """
    cfg = read_adapter_config(path)
    tensors = _load_safetensors(Path(path) / ADAPTER_WEIGHTS)
    modules = cfg["modules"]
    have = dict(model.named_modules())
    missing = [n for n in modules if n not in have]
    if missing:
        base = cfg.get("base_model", {})
        raise AdapterLoadError(
            f"this adapter was saved from {base.get('class')} ({base.get('name_or_path')}); the given model "
            f"({type(model).__name__}) has no module {missing[0]!r} ({len(missing)} of {len(modules)} missing). "
            "Load it onto the base model it was trained from")
    for n, info in modules.items():
        m = have[n]
        shape = (getattr(m, "in_features", None), getattr(m, "out_features", None))
        if hasattr(m, "weight") and m.weight.dim() == 2 and not isinstance(m, nn.Linear):  # Conv1D
            shape = tuple(m.weight.shape)
        if shape != (info["in_features"], info["out_features"]):
            raise AdapterLoadError(
                f"module {n!r} is {info['in_features']}→{info['out_features']} in the adapter but "
                f"{shape[0]}→{shape[1]} in the given model: wrong base model (saved from "
                f"{cfg.get('base_model', {}).get('name_or_path')})")
    for n, info in modules.items():
        for pname in (("lora_P", "lora_lambda", "lora_Q") if info["kind"] == "svd" else ("lora_B", "lora_A")):
            if f"{n}.{pname}" not in tensors:
                raise AdapterLoadError(f"{path}: tensor {n}.{pname} is missing from {ADAPTER_WEIGHTS}; the adapter is corrupt")
    for k in cfg.get("full_parameters", []):
        if k not in tensors:
            raise AdapterLoadError(f"{path}: tensor {k} is missing from {ADAPTER_WEIGHTS}; the adapter is corrupt")

    conf_d = dict(cfg["config"])
    conf_d["target_modules"] = list(modules)
    conf_d.pop("rank_pattern", None) if conf_d.get("method") == "elalora" else None
    config = config_from_dict(conf_d)
    handle = AdaptiveModel(
        model, config,
        rank_pattern={n: i["rank"] for n, i in modules.items()},
        capacity_pattern={n: i["capacity"] for n, i in modules.items()},
    )
    with torch.no_grad():
        for n, a in zip(handle.names, handle.adapters):
            info = modules[n]
            a.scaling = float(info["scaling"])
            a.r_init = int(info.get("r_init", a.r_init))
            r = info["rank"]
            for pname, p, dim in a.slot_parameters():
                t = tensors[f"{n}.{pname}"]
                expect = list(p.shape)
                expect[dim] = r
                if list(t.shape) != expect:
                    raise AdapterLoadError(f"{path}: {n}.{pname} has shape {tuple(t.shape)}, expected {tuple(expect)}")
                p.zero_()
                p.narrow(dim, 0, r).copy_(t.to(p.dtype))
        params = dict(model.named_parameters())
        for k in cfg.get("full_parameters", []):
            if k not in params or params[k].shape != tensors[k].shape:
                raise AdapterLoadError(f"{path}: full parameter {k} does not fit the given model")
            params[k].copy_(tensors[k].to(params[k].dtype))
    handle.initial_rank_pattern = dict(cfg.get("initial_rank_pattern", handle.rank_pattern()))
    from .allocation.base import RankEvent

    handle.events = [RankEvent(**e) for e in cfg.get("events", [])]
    handle.step_count = int(cfg.get("step_count", 0))
    if not is_trainable:
        for p in model.parameters():
            p.requires_grad_(False)
        model.eval()
    return handle


# ------------------------------------------------------------------------------------ PEFT export
def _peft_task_type(model: nn.Module) -> str | None:
    cls = type(model).__name__
    for suffix, task in (("ForSequenceClassification", "SEQ_CLS"), ("ForCausalLM", "CAUSAL_LM"),
                         ("ForTokenClassification", "TOKEN_CLS"), ("ForQuestionAnswering", "QUESTION_ANS"),
                         ("ForConditionalGeneration", "SEQ_2_SEQ_LM")):
        if cls.endswith(suffix):
            return task
    return None


@torch.no_grad()
def peft_lora_factors(a: ElasticAdapter, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lora_A, lora_B)`` of a plain LoRA equal to the adapter's active part with scale 1."""
    idx = a.active_indices()
    down, gate, up = a._factors()
    down = down.detach().float().index_select(0, idx.to(down.device))
    gate = gate.detach().float().index_select(0, idx.to(gate.device))
    up = up.detach().float().index_select(1, idx.to(up.device))
    lora_a = gate[:, None] * down * a.scaling
    return lora_a.to(dtype).contiguous(), up.to(dtype).contiguous()


def export_peft(handle: AdaptiveModel | nn.Module, path: str | os.PathLike, *, dtype: torch.dtype | None = None,
                base_model_name_or_path: str | None = None) -> dict[str, int]:
    """Write a standard PEFT LoRA adapter directory (SPEC §8). Returns the exported rank pattern."""
    from peft import LoraConfig

    if not isinstance(handle, AdaptiveModel):
        handle = handle_of(handle)
    if any(a.merged for a in handle.adapters):
        raise RuntimeError("unmerge() the adapters before exporting")
    tensors: dict[str, torch.Tensor] = {}
    pattern: dict[str, int] = {}
    fan_in_fan_out = set()
    for name, a in zip(handle.names, handle.adapters):
        r = a.rank
        if r == 0:
            continue  # a module at rank 0 contributes nothing: PEFT gets no adapter there
        la, lb = peft_lora_factors(a, dtype or torch.float32)
        tensors[f"base_model.model.{name}.lora_A.weight"] = la
        tensors[f"base_model.model.{name}.lora_B.weight"] = lb
        pattern[name] = r
        fan_in_fan_out.add(a.fan_in_fan_out)
    if not pattern:
        raise RuntimeError("every adapted module is at rank 0: nothing to export")
    if len(fan_in_fan_out) > 1:
        raise RuntimeError("cannot export a mix of Linear and Conv1D adapters into one PEFT LoRA config")
    for k, v in _trainable_full_modules(handle).items():
        tensors[f"base_model.model.{k}"] = v.detach().to(dtype) if dtype else v.detach()
    top = max(pattern.values())
    task_type = _peft_task_type(handle.model)
    saved = handle.modules_to_save_names()
    if task_type == "SEQ_CLS" and not any(n.split(".")[-1] in ("classifier", "score") for n in saved):
        # PEFT's sequence-classification wrapper insists on a saved head; without a trained head the
        # generic PeftModel reproduces the outputs.
        task_type = None
    ident = _base_identity(handle.model)
    lcfg = LoraConfig(
        r=top, lora_alpha=top, target_modules=sorted(pattern), rank_pattern=dict(pattern),
        alpha_pattern={k: float(v) for k, v in pattern.items()}, lora_dropout=0.0, bias="none",
        fan_in_fan_out=fan_in_fan_out.pop(), modules_to_save=handle.modules_to_save_names() or None,
        task_type=task_type,
        base_model_name_or_path=base_model_name_or_path or ident["name_or_path"],
    )
    with _write_on_rank0(handle) as writer:
        if writer:
            with atomic_directory(path) as tmp:
                lcfg.save_pretrained(str(tmp))
                _save_safetensors(tensors, tmp / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    return pattern


# ------------------------------------------------------------------------------------------ merge
@torch.no_grad()
def merge_and_unload(handle: AdaptiveModel | nn.Module) -> nn.Module:
    """Fold every ΔW into its base weight and put plain base layers back. Returns the model (the same
    object), which no longer carries adapters.

    On a float base each adapter is merged into its own base layer (``W ← W0 + ΔW``), which is then put
    back in the adapter's place.

    On a quantised base (bitsandbytes ``Linear4bit`` / ``Linear8bitLt``) the merged weight cannot be
    stored in 4 or 8 bits without a second quantisation error (PEFT re-quantises and warns that
    generations may differ). Here each adapted quantised layer is **replaced by a float**
    ``nn.Linear`` holding ``dequant(W0) + ΔW`` (fp32 ΔW added to the dequantised weight, then cast to
    the dtype the base was quantised from, e.g. fp32 or bf16; bias copied). For a 4-bit base the
    merged model computes what the trained model computed (``Linear4bit`` dequantises before its
    matmul); for an 8-bit base it drops LLM.int8()'s activation quantisation, so its outputs differ by
    that error. Layers that were not adapted stay quantised; the model's ``quantization_config`` is
    left alone. To deploy a fully float merged model, load the base in float, load the
    :func:`export_peft` directory with PEFT and call PEFT's ``merge_and_unload`` there.
    """
    from .quant import dequantize_weight, original_dtype

    if not isinstance(handle, AdaptiveModel):
        handle = handle_of(handle)
    model = handle.model
    for name, a in zip(handle.names, handle.adapters):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if a.quantized:
            base = a.base_layer
            dtype = original_dtype(base)
            w = dequantize_weight(base).float() + a.delta_weight(torch.float32).to(base.weight.device)
            lin = nn.Linear(a.in_features, a.out_features, bias=base.bias is not None,
                            device=base.weight.device, dtype=dtype)
            lin.weight.copy_(w.to(dtype))
            if base.bias is not None:
                lin.bias.copy_(base.bias.to(dtype))
            lin.requires_grad_(False)
            setattr(parent, child, lin)
            continue
        a.merge()
        a._unmerged_weight = None
        setattr(parent, child, a.base_layer)
    handle.remove_hooks()
    model._elalora_handle = None
    return model


# ------------------------------------------------------------------------- training checkpoints
def save_checkpoint(path: str | os.PathLike, handle: AdaptiveModel, optimizer=None, lr_scheduler=None,
                    extra: dict | None = None) -> None:
    """Save everything a plain training loop needs to resume exactly, atomically, to one file:
    the model's trainable state (adapter parameters, masks, modules kept in full), the method's
    state (EMA scores, step counter, rank history), optimizer, LR scheduler, the CPU RNG and
    ``extra``. An interrupted save leaves the previous file intact."""
    import io

    trainable = {n for n, p in handle.model.named_parameters() if p.requires_grad}
    model_state = {k: full_tensor(v.detach()).cpu().clone() for k, v in handle.model.state_dict().items()
                   if k in trainable or k.endswith(".active")}
    sharded = _sharded(handle)
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
    with _write_on_rank0(handle) as writer:
        if writer:
            buf = io.BytesIO()
            torch.save(blob, buf)
            atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: str | os.PathLike, handle: AdaptiveModel, optimizer=None, lr_scheduler=None) -> dict:
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
    if blob["elalora_checkpoint_version"] > 1:
        raise AdapterLoadError(f"{path} was written by a newer elalora (checkpoint version "
                               f"{blob['elalora_checkpoint_version']}); upgrade elalora")
    handle.load_state_dict(blob["elalora"])
    current = handle.model.state_dict()
    unexpected = [k for k in blob["model"] if k not in current]
    if unexpected:
        raise AdapterLoadError(f"checkpoint {path} has parameters this model lacks: {unexpected[:3]}")
    from .layers import edit_

    with torch.no_grad():
        for k, v in blob["model"].items():
            # edit_ writes each process's shard of a sharded (FSDP2) tensor; plain tensors are copied.
            edit_(current[k], lambda t, v=v: t.copy_(v.to(t.device, t.dtype)))
    if optimizer is not None and blob["optimizer"] is not None:
        if blob.get("sharded_optimizer") != _sharded(handle):
            raise AdapterLoadError(f"checkpoint {path} was saved from a {'sharded' if blob.get('sharded_optimizer') else 'plain'} "
                                   "model; resume it with the same parallelism (FSDP or not)")
        if blob.get("sharded_optimizer"):
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(handle.model, optimizer, blob["optimizer"],
                                     options=StateDictOptions(full_state_dict=True))
        else:
            optimizer.load_state_dict(blob["optimizer"])
    if lr_scheduler is not None and blob["lr_scheduler"] is not None:
        lr_scheduler.load_state_dict(blob["lr_scheduler"])
    torch.set_rng_state(blob["rng"])
    return blob["extra"]
