"""Saving, loading, exporting and merging adapters (with :mod:`elalora.checkpoints`, which holds the
training checkpoints, the only modules of the library that touch files).

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
  This is the default ``layout="compact"``: smallest on disk, read exactly by PEFT and vLLM.
* **PEFT LoRA, uniform layout** (``export_peft(..., layout="uniform")``): every adapted module,
  rank 0 included, padded to one rank ``R = max_m r_m`` with zero rows of A and zero columns of B::

      lora_A = [diag(λ_k) · Q_k · s ; 0]  (R × in)      lora_B = [P_k , 0]  (out × R)
      r = lora_alpha = R, no rank_pattern / alpha_pattern  (scale 1 under every rule)

  ``B·A`` is unchanged by the padding, and because every tensor has rank R and alpha = R, PEFT's
  per-module ``alpha/r``, vLLM's and TGI/LoRAX's global ``lora_alpha / r`` and llama.cpp's
  ``alpha / (rank of the tensor)`` are all exactly 1 (see :mod:`elalora.serving`).

* **adapter summary** (``adapter_summary``): rank pattern, capacities and parameter counts of an
  elalora or PEFT LoRA directory from its JSON and the safetensors header (no tensor data read).

Every directory is written atomically (:mod:`elalora._io`): into a temporary sibling, then swapped
into place, so an interrupted save leaves the previous contents loadable.

Sharded models (FSDP2 ``fully_shard``: adapter parameters are DTensors): :func:`save_adapter`,
:func:`export_peft` (and :func:`elalora.checkpoints.save_checkpoint`) must then be called on **every**
process — the tensors are gathered (a collective) — and only global rank 0 writes
(:func:`write_on_rank0`); the others wait at a barrier until the files exist.

The handle is taken by duck type (``names``, ``adapters``, ``model``, ``config``, ...): this module
sits below :mod:`elalora.model` in the import order; :func:`elalora.model.load_adapter` builds the
handle from what :func:`read_adapter` returns.

Saves never delete what elalora did not write: into a folder holding other files only the adapter
files are replaced (:func:`elalora._io.keep_user_files_directory`), and an existing file at the path
is refused. Non-finite weights are never written nor loaded (:mod:`elalora.validation`).

Imports: :mod:`elalora.layers`, :mod:`elalora.config`, :mod:`elalora.errors`, :mod:`elalora._io`,
:mod:`elalora._handle`, :mod:`elalora.validation`, :mod:`elalora.quant`; ``peft`` and ``safetensors`` lazily.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import uuid
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from ._handle import detach_handle, handle_of
from ._io import atomic_directory, atomic_write_bytes, keep_user_files_directory, output_lock, recover_interrupted_swap
from ._io import json_default, write_json
from .config import CONFIG_FORMAT_VERSION
from .errors import AdapterLoadError, ExportError, OutputLockedError, OutputPathError
from .heads import head_info, replaced_module_names
from .layers import ElasticAdapter, adapter_param_count, base_shape, full_tensor, is_dtensor
from .quant import dequantize_weight, original_dtype
from .validation import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, HEAD_CONFIG, AdapterDir, base_fingerprint,
                         check_base_model_weights, check_finite_tensors, check_peft_fingerprint, read_head_info,
                         safetensors_header, slot_shapes)

__all__ = [
    "AdapterLoadError", "save_adapter", "read_adapter", "restore_adapter", "export_peft", "merge_and_unload",
    "atomic_directory", "atomic_write_bytes", "ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "PEFT_PREFIX",
    "is_sharded", "write_on_rank0", "peft_task_type", "adapter_format", "adapter_summary",
    "check_peft_adapter_fits", "OutputPathError", "OutputLockedError", "output_lock", "recover_interrupted_swap",
    "check_base_model_weights", "safetensors_metadata", "EXPORT_LAYOUTS", "uniform_lora_factors", "AdapterDir",
    "safetensors_header", "HEAD_CONFIG", "read_head_info",
]

EXPORT_LAYOUTS = ("compact", "uniform")  # export_peft(layout=...)
PEFT_PREFIX = "base_model.model."  # PEFT's tensor-name prefix in adapter_model.safetensors


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
def _base_identity(model: nn.Module, handle=None) -> dict:
    cfg = getattr(model, "config", None)
    out = {
        "class": type(model).__name__,
        "name_or_path": getattr(cfg, "_name_or_path", None) or getattr(cfg, "name_or_path", None),
        "model_type": getattr(cfg, "model_type", None),
    }
    if handle is not None:
        out["fingerprint"] = base_fingerprint(handle)
    return out


def _trainable_full_modules(handle) -> dict[str, torch.Tensor]:
    out = {}
    for mname in handle.modules_to_save_names():
        for pname, p in handle.model.get_submodule(mname).named_parameters():
            out[f"{mname}.{pname}"] = full_tensor(p.detach())
    return out


def is_sharded(handle) -> bool:
    """Whether the model's parameters are sharded DTensors (FSDP2): then saving is collective."""
    return any(is_dtensor(p) for p in handle.model.parameters())


@contextlib.contextmanager
def write_on_rank0(handle) -> Iterator[bool]:
    """Yield whether this process writes; on a sharded model only rank 0 does, and every process
    leaves only once the files are complete (a barrier)."""
    if not is_sharded(handle):
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
def save_adapter(handle, path: str | os.PathLike, *, include_history: bool = True) -> None:
    """Save the adapter compacted to its active ranks (see the module docstring).

    ``path`` may be new, empty, or a folder with other files in it: only ``adapter_config.json``
    and ``adapter_model.safetensors`` are written, each atomically, and everything else in the
    folder is left alone. An existing file at ``path`` is refused (:class:`OutputPathError`).
    Non-finite weights are refused (:class:`~elalora.errors.TrainingDivergedError`).
    """
    modules, tensors = {}, {}
    for name, a in zip(handle.names, handle.adapters):
        idx = a.active_indices()
        modules[name] = {
            "form": a.form, "rank": int(idx.numel()), "capacity": a.capacity, "in_features": a.in_features,
            "out_features": a.out_features, "fan_in_fan_out": a.fan_in_fan_out, "scaling": a.scaling,
            "r_init": a.r_init,
        }
        for pname, p, dim in a.slot_parameters():
            full = full_tensor(p.detach())
            tensors[f"{name}.{pname}"] = full.index_select(dim, idx.to(full.device))
    full = _trainable_full_modules(handle)
    tensors.update({k: v.detach() for k, v in full.items()})
    check_finite_tensors(tensors, f"save_adapter({str(path)!r})")
    save_id = uuid.uuid4().hex
    cfg = {
        "elalora_format_version": CONFIG_FORMAT_VERSION,
        "method": handle.config.method,
        "config": handle.config.to_dict(),
        "base_model": _base_identity(handle.model, handle),
        "modules": modules,
        "modules_to_save": handle.modules_to_save_names(),
        "full_parameters": sorted(full),
        "rank_pattern": handle.rank_pattern(),
        "initial_rank_pattern": handle.initial_rank_pattern,
        "step_count": handle.step_count,
        "save_id": save_id,
    }
    if include_history:
        cfg["events"] = [e.to_dict() for e in handle.events]
    with write_on_rank0(handle) as writer:
        if writer:
            _write_adapter_dir(path, tensors, cfg, save_id, handle.model)


def _write_adapter_dir(path, tensors, cfg, save_id: str, model=None) -> None:
    with keep_user_files_directory(path, (ADAPTER_WEIGHTS, HEAD_CONFIG, ADAPTER_CONFIG)) as tmp:
        _save_safetensors(tensors, tmp / ADAPTER_WEIGHTS,
                          metadata={"format": "pt", "elalora": str(CONFIG_FORMAT_VERSION), "elalora_save_id": save_id})
        _write_head_info(tmp, model)
        write_json(tmp / ADAPTER_CONFIG, cfg)


def read_adapter_config(path: str | os.PathLike) -> dict:
    """The checked ``adapter_config.json`` of the elalora adapter at ``path``
    (:class:`~elalora.validation.AdapterDir`)."""
    return _elalora_dir(path).config


def _elalora_dir(path) -> AdapterDir:
    adir = path if isinstance(path, AdapterDir) else AdapterDir(path)
    if adir.format != "elalora":
        raise AdapterLoadError(f"{adir.path} is a PEFT {adir.config.get('peft_type')} adapter, not an elalora "
                               "adapter; load it with peft.PeftModel.from_pretrained")
    return adir


def read_adapter(model: nn.Module, path: str | os.PathLike | AdapterDir, *,
                 check_base_model: bool = True) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(adapter config, tensors)`` of the elalora adapter at ``path``, checked against ``model``.

    Everything is checked before anything touches the model, so a wrong base model or a corrupt
    file fails with a message naming the first mismatch: the config (:class:`~elalora.validation.AdapterDir`,
    returned normalised: each module's ``form``), that config and weights come from the same save, every
    saved module exists in ``model`` with the same shape, the weight file holds exactly the listed tensors
    with the right shapes and finite values, and (unless ``check_base_model=False``) the base weights
    match the saved fingerprint.
    """
    adir = _elalora_dir(path)
    cfg, path = adir.config, adir.path
    adir.check_header()
    tensors = _load_safetensors(adir.weights_path)
    meta_id = adir.metadata.get("elalora_save_id")
    if cfg.get("save_id") and meta_id and cfg["save_id"] != meta_id:
        raise AdapterLoadError(f"{path}: {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS} come from different saves "
                               "(an interrupted save into a folder with other files?); save the adapter again")
    base = cfg.get("base_model") or {}
    _check_modules_fit(model, cfg["modules"], base)
    _check_tensors(model, cfg, tensors, path)
    if check_base_model and isinstance(base.get("fingerprint"), dict):
        check_base_model_weights(model, base["fingerprint"], source=f" ({base.get('name_or_path')})")
    return cfg, tensors


def _check_modules_fit(model: nn.Module, modules: dict, base: dict) -> None:
    have = dict(model.named_modules())
    missing = [n for n in modules if n not in have]
    if missing:
        raise AdapterLoadError(
            f"this adapter was saved from {base.get('class')} ({base.get('name_or_path')}); the given model "
            f"({type(model).__name__}) has no module {missing[0]!r} ({len(missing)} of {len(modules)} missing). "
            "Load it onto the base model it was trained from")
    for n, info in modules.items():
        if isinstance(have[n], ElasticAdapter):
            raise AdapterLoadError(f"module {n!r} of the given model already carries an adapter; "
                                   "load onto a fresh model")
        try:
            shape = base_shape(have[n])[:2]
        except TypeError:
            shape = (getattr(have[n], "in_features", None), getattr(have[n], "out_features", None))
        if shape != (info["in_features"], info["out_features"]):
            raise AdapterLoadError(
                f"module {n!r} is {info['in_features']}→{info['out_features']} in the adapter but "
                f"{shape[0]}→{shape[1]} in the given model: wrong base model (saved from "
                f"{base.get('name_or_path')})")


def _check_tensors(model: nn.Module, cfg: dict, tensors: dict[str, torch.Tensor], path) -> None:
    """The weight file holds exactly the tensors the config lists, with their shapes, all finite."""
    expected: dict[str, tuple[int, ...]] = {}
    for n, info in cfg["modules"].items():
        for pname, shp in slot_shapes(info).items():
            expected[f"{n}.{pname}"] = shp
    params = dict(model.named_parameters())
    for k in cfg.get("full_parameters", []):
        if k not in params:
            raise AdapterLoadError(f"{path}: full parameter {k} does not fit the given model")
        expected[k] = tuple(params[k].shape)
    for k, shp in expected.items():
        if k not in tensors:
            raise AdapterLoadError(f"{path}: tensor {k} is missing from {ADAPTER_WEIGHTS}; the adapter is corrupt")
        if tuple(tensors[k].shape) != shp:
            raise AdapterLoadError(f"{path}: {k} has shape {tuple(tensors[k].shape)}, expected {shp} "
                                   f"from {ADAPTER_CONFIG}; the adapter is corrupt or was edited")
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise AdapterLoadError(f"{path}: {ADAPTER_WEIGHTS} holds {len(extra)} tensor(s) that {ADAPTER_CONFIG} does "
                               f"not list (first: {extra[0]}); a module entry is missing from the config")
    for k, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise AdapterLoadError(f"{path}: {k} holds NaN or inf values (the training diverged); "
                                   "train again with a lower learning rate")


@torch.no_grad()
def restore_adapter(handle, cfg: dict, tensors: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Copy what :func:`read_adapter` returned into a handle built with the saved ranks and capacities
    (scales, saved ranks, modules kept in full, initial rank pattern, step count)."""
    modules = cfg["modules"]
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
    params = dict(handle.model.named_parameters())
    for k in cfg.get("full_parameters", []):
        if k not in params or params[k].shape != tensors[k].shape:
            raise AdapterLoadError(f"{path}: full parameter {k} does not fit the given model")
        params[k].copy_(tensors[k].to(params[k].dtype))
    handle.initial_rank_pattern = dict(cfg.get("initial_rank_pattern", handle.rank_pattern()))
    handle.step_count = int(cfg.get("step_count", 0))


# ------------------------------------------------------------------------------------ PEFT export
def peft_task_type(model: nn.Module) -> str | None:
    """PEFT ``task_type`` of a Hugging Face model, from its class name (``None``: the generic PeftModel)."""
    cls = type(model).__name__
    for suffix, task in (("ForSequenceClassification", "SEQ_CLS"), ("ForCausalLM", "CAUSAL_LM"),
                         ("ForTokenClassification", "TOKEN_CLS"), ("ForQuestionAnswering", "QUESTION_ANS"),
                         ("ForConditionalGeneration", "SEQ_2_SEQ_LM")):
        if cls.endswith(suffix):
            return task
    return None


@torch.no_grad()
def peft_lora_factors(a: ElasticAdapter, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lora_A, lora_B)`` of a plain LoRA equal to the adapter's active part with scale 1, computed in
    at least float32 (float64 when ``dtype`` is float64) and stored in ``dtype``."""
    work = torch.promote_types(dtype, torch.float32)
    idx = a.active_indices()
    down, gate, up = a._factors()
    down = down.detach().to(work).index_select(0, idx.to(down.device))
    gate = gate.detach().to(work).index_select(0, idx.to(gate.device))
    up = up.detach().to(work).index_select(1, idx.to(up.device))
    lora_a = gate[:, None] * down * a.scaling
    return lora_a.to(dtype).contiguous(), up.to(dtype).contiguous()


@torch.no_grad()
def uniform_lora_factors(handle, dtype: torch.dtype = torch.float32
                         ) -> tuple[int, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """``(R, {module: (lora_A, lora_B)})`` of the uniform layout (module docstring).

    ``R`` is the largest active rank; each module's factors from :func:`peft_lora_factors` (scale
    folded into A) are padded with zero rows of A (``R × in``) and zero columns of B (``out × R``),
    so ``B·A`` is the module's ΔW exactly. A module at rank 0 gets all-zero factors."""
    if any(a.merged for a in handle.adapters):
        raise RuntimeError("unmerge() the adapters before exporting")
    top = max((a.rank for a in handle.adapters), default=0)
    if top == 0:
        raise RuntimeError("every adapted module is at rank 0: nothing to export")
    out = {}
    work = torch.promote_types(dtype, torch.float32)
    for name, a in zip(handle.names, handle.adapters):
        la, lb = peft_lora_factors(a, work)
        r = la.shape[0]
        pa = torch.zeros(top, la.shape[1], dtype=work, device=la.device)
        pb = torch.zeros(lb.shape[0], top, dtype=work, device=lb.device)
        pa[:r] = la
        pb[:, :r] = lb
        out[name] = (pa.to(dtype).contiguous(), pb.to(dtype).contiguous())
    return top, out


def _uniform_target_modules(handle) -> list[str]:
    """Module-type suffixes (``q_proj``, ...) when they name exactly the adapted modules, else full names.

    Serving engines key their LoRA slots by module type (TGI/LoRAX and SGLang per layer type), so
    the short form is the conventional one; it is only used when it selects nothing more, also in the
    base model as loaded afresh (a pooler replaced by mean pooling has its ``dense`` layer again there)."""
    names = set(handle.names)
    suffixes = {n.rsplit(".", 1)[-1] for n in names}
    module_names = [n for n, _ in handle.model.named_modules()] + replaced_module_names(handle.model)
    matched = {n for n in module_names
               if n.rsplit(".", 1)[-1] in suffixes and ".base_layer" not in n and n}
    return sorted(suffixes) if matched == names else sorted(names)


def export_peft(handle, path: str | os.PathLike, *, dtype: torch.dtype | None = None,
                base_model_name_or_path: str | None = None, layout: str = "compact") -> dict[str, int]:
    """Write a standard PEFT LoRA adapter directory (SPEC §8). Returns the exported rank pattern.

    ``layout="compact"`` (default): each module at its own rank through ``rank_pattern`` /
    ``alpha_pattern``, rank-0 modules dropped. ``layout="uniform"``: every adapted module at one rank
    ``R`` (zero-padded), ``r = lora_alpha = R`` and no patterns, for serving engines that apply one
    global scale (vLLM, TGI/LoRAX, SGLang) or ``alpha / own rank`` (llama.cpp); see the module docstring.
    """
    from peft import LoraConfig

    if layout not in EXPORT_LAYOUTS:
        raise ExportError(f"unknown export layout {layout!r}; choose one of {', '.join(EXPORT_LAYOUTS)}")
    handle = handle_of(handle)  # a handle or a wrapped model
    # Merged or not (even after merge_and_unload), the factors are unchanged, so the export is the same.
    tensors: dict[str, torch.Tensor] = {}
    pattern: dict[str, int] = {}
    fan_in_fan_out = {a.fan_in_fan_out for a in handle.adapters if layout == "uniform" or a.rank > 0}
    if layout == "uniform":
        top, factors = uniform_lora_factors(handle, dtype or torch.float32)
        for name, (la, lb) in factors.items():
            tensors[f"base_model.model.{name}.lora_A.weight"] = la
            tensors[f"base_model.model.{name}.lora_B.weight"] = lb
            pattern[name] = top
    else:
        for name, a in zip(handle.names, handle.adapters):
            r = a.rank
            if r == 0:
                continue  # a module at rank 0 contributes nothing: PEFT gets no adapter there
            la, lb = peft_lora_factors(a, dtype or torch.float32)
            tensors[f"base_model.model.{name}.lora_A.weight"] = la
            tensors[f"base_model.model.{name}.lora_B.weight"] = lb
            pattern[name] = r
    if not pattern:
        raise RuntimeError("every adapted module is at rank 0: nothing to export")
    if len(fan_in_fan_out) > 1:
        raise RuntimeError("cannot export a mix of Linear and Conv1D adapters into one PEFT LoRA config")
    for k, v in _trainable_full_modules(handle).items():
        tensors[f"base_model.model.{k}"] = v.detach().to(dtype) if dtype else v.detach()
    top = max(pattern.values())
    task_type = peft_task_type(handle.model)
    saved = handle.modules_to_save_names()
    if task_type == "SEQ_CLS" and not any(n.split(".")[-1] in ("classifier", "score") for n in saved):
        # PEFT's sequence-classification wrapper insists on a saved head; without a trained head the
        # generic PeftModel reproduces the outputs.
        task_type = None
    ident = _base_identity(handle.model)
    if layout == "uniform":
        shape_kw = dict(target_modules=_uniform_target_modules(handle))
    else:
        shape_kw = dict(target_modules=sorted(pattern), rank_pattern=dict(pattern),
                        alpha_pattern={k: float(v) for k, v in pattern.items()})
    lcfg = LoraConfig(
        r=top, lora_alpha=top, **shape_kw, lora_dropout=0.0, bias="none",
        fan_in_fan_out=fan_in_fan_out.pop(), modules_to_save=handle.modules_to_save_names() or None,
        task_type=task_type,
        base_model_name_or_path=base_model_name_or_path or ident["name_or_path"],
    )
    check_finite_tensors(tensors, f"export_peft({str(path)!r})")
    meta = {"format": "pt", "elalora_base_fingerprint": json.dumps(base_fingerprint(handle), default=json_default)}
    with write_on_rank0(handle) as writer:
        if writer:
            with keep_user_files_directory(path, (ADAPTER_WEIGHTS, HEAD_CONFIG, ADAPTER_CONFIG)) as tmp:
                lcfg.save_pretrained(str(tmp))
                _save_safetensors(tensors, tmp / ADAPTER_WEIGHTS, metadata=meta)
                _write_head_info(tmp, handle.model)
    return pattern


def _write_head_info(folder: Path, model) -> None:
    """``HEAD_CONFIG``: the head ``model`` was trained with (:func:`elalora.heads.head_info`), beside the adapter."""
    if model is not None:
        write_json(Path(folder) / HEAD_CONFIG, head_info(model))


# ------------------------------------------------------------------------------------------ merge
@torch.no_grad()
def merge_and_unload(handle) -> nn.Module:
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
    handle = handle_of(handle)  # a handle or a wrapped model
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
    handle.unloaded = True  # the handle's adapters are no longer in the model: unmerge() is impossible
    detach_handle(model)
    return model


# ------------------------------------------------------------------------------- adapter summary
def safetensors_metadata(path: Path) -> dict:
    """The ``__metadata__`` of a .safetensors file (``{}`` when it cannot be read: the load reports that)."""
    try:
        return safetensors_header(path, with_metadata=True)[1]
    except AdapterLoadError:
        return {}


def adapter_format(adir: str | os.PathLike | AdapterDir) -> str:
    """``"elalora"`` or ``"peft"`` (a PEFT LoRA adapter) for an adapter directory; raises otherwise."""
    return (adir if isinstance(adir, AdapterDir) else AdapterDir(adir)).format


def _peft_module_of(name: str, tags: tuple[str, ...]) -> str | None:
    for tag in tags:
        if name.endswith(tag):
            return name[: -len(tag)]
    return None


def adapter_summary(adir: str | os.PathLike | AdapterDir) -> dict:
    """Rank pattern, capacities and parameter counts of an adapter from its JSON and safetensors header
    (both checked: :class:`~elalora.validation.AdapterDir`)."""
    adir = adir if isinstance(adir, AdapterDir) else AdapterDir(adir)
    fmt, cfg = adir.format, adir.config
    adir.check_header()
    header = adir.header if (fmt == "elalora" or adir.weights_path.is_file()) else {}
    numel = {k: math.prod(v.get("shape", [])) for k, v in header.items()}
    if fmt == "elalora":
        modules = cfg["modules"]
        pattern = {n: int(i["rank"]) for n, i in modules.items()}
        capacity = {n: int(i["capacity"]) for n, i in modules.items()}
        params = {n: adapter_param_count(i["form"], i["rank"], i["in_features"], i["out_features"])
                  for n, i in modules.items()}
        full = {k: numel.get(k, 0) for k in cfg.get("full_parameters", [])}
        return {"format": "elalora", "method": cfg.get("method"), "form": cfg["config"].get("form"),
                "base_model": cfg.get("base_model"),
                "rank_pattern": pattern, "capacity": capacity, "module_params": params,
                "full_params": sum(full.values()), "modules_to_save": cfg.get("modules_to_save"),
                "step_count": cfg.get("step_count"), "events": len(cfg.get("events", []) or [])}
    pattern, params = {}, {}
    full = 0
    for k, info in header.items():
        name = k[len(PEFT_PREFIX):] if k.startswith(PEFT_PREFIX) else k
        shape = info.get("shape", [])
        mod_a = _peft_module_of(name, (".lora_A.weight", ".lora_A.default.weight"))
        mod_b = _peft_module_of(name, (".lora_B.weight", ".lora_B.default.weight"))
        if mod_a is not None:
            pattern[mod_a] = int(shape[0])
        mod = mod_a if mod_a is not None else mod_b
        if mod is not None:
            params[mod] = params.get(mod, 0) + math.prod(shape)
        else:
            full += math.prod(shape)
    return {"format": "peft", "method": "lora", "base_model": {"name_or_path": cfg.get("base_model_name_or_path")},
            "rank_pattern": pattern, "capacity": None, "module_params": params, "full_params": full,
            "modules_to_save": cfg.get("modules_to_save"), "task_type": cfg.get("task_type"),
            "lora_alpha": cfg.get("lora_alpha"), "r": cfg.get("r")}


def check_peft_adapter_fits(model: nn.Module, adir: str | os.PathLike | AdapterDir) -> None:
    """Every module of a PEFT LoRA adapter exists in ``model`` with matching shapes (else AdapterLoadError)."""
    adir = adir if isinstance(adir, AdapterDir) else AdapterDir(adir)
    header = adir.header
    check_peft_fingerprint(model, adir)
    mods = dict(model.named_modules())
    params = dict(model.named_parameters())
    src = adir.base_model_name
    for k, info in header.items():
        name = k[len(PEFT_PREFIX):] if k.startswith(PEFT_PREFIX) else k
        shape = list(info.get("shape", []))
        for tag, dim, attr in ((".lora_A.weight", 1, "in"), (".lora_B.weight", 0, "out")):
            if name.endswith(tag):
                mod = name[: -len(tag)]
                m = mods.get(mod)
                if m is None:
                    raise AdapterLoadError(f"this PEFT adapter (trained on {src}) adapts module {mod!r}, "
                                           f"which the given model ({type(model).__name__}) does not have; "
                                           "use the base model it was trained from")
                try:
                    d_in, d_out, _ = base_shape(m)
                except TypeError:
                    raise AdapterLoadError(f"module {mod!r} of the given model is not a linear layer; "
                                           "wrong base model") from None
                feat = d_in if attr == "in" else d_out
                if shape[dim] != feat:
                    raise AdapterLoadError(f"module {mod!r} has {attr}_features {feat} in the given model but "
                                           f"{shape[dim]} in the adapter (trained on {src}): wrong base model")
                break
        else:
            if ".lora_" in name:
                continue
            p = params.get(name)
            if p is not None and list(p.shape) != shape:
                raise AdapterLoadError(f"{name} has shape {tuple(shape)} in the adapter but {tuple(p.shape)} in the "
                                       f"given model: wrong base model or a different number of labels")

