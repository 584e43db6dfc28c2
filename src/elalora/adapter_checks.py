"""Checks of what a save writes and a load reads: finite values, the base-model fingerprint, a
hand-editable ``adapter_config.json``, an optimizer state against its optimizer.

The base-model fingerprint is a few evenly spaced values of each adapted base weight, recorded at
save time; a load compares them (relative L2 distance, :data:`FINGERPRINT_RTOL`) so that an adapter
put onto a different model of the same shapes fails instead of silently giving wrong outputs.

Imports: :mod:`elalora.layers`, :mod:`elalora.errors`; ``safetensors`` lazily.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from .errors import AdapterLoadError, TrainingDivergedError
from .layers import ADAPTER_FORMS, ElasticAdapter, full_tensor

__all__ = ["FINGERPRINT_VALUES", "FINGERPRINT_RTOL", "weight_fingerprint", "base_fingerprint",
           "check_base_model_weights", "check_finite_tensors", "validate_adapter_config", "check_optimizer_state", "slot_shapes",
           "safetensors_metadata", "check_peft_fingerprint"]

ADAPTER_CONFIG = "adapter_config.json"

FINGERPRINT_VALUES = 16
# Relative L2 distance of the sampled weights below which two bases count as the same model:
# far above bf16/fp16 rounding (2^-8) of the same weights, far below the ~1.4 of two different
# initialisations or fine-tunes of the shapes.
FINGERPRINT_RTOL = 0.02


def _frozen_base_weight(a: ElasticAdapter) -> torch.Tensor:
    """The base weight without this adapter's update, merged or not."""
    if a._unmerged_weight is not None:
        return a._unmerged_weight
    w = a.base_layer.weight.detach()
    if a.merged:  # merge_and_unload dropped the copy: subtract ΔW again (exact to fp32 rounding)
        d = a.delta_weight(torch.float32)
        return w.float() - (d.t() if a.fan_in_fan_out else d)
    return w


def weight_fingerprint(w: torch.Tensor, n: int = FINGERPRINT_VALUES) -> list[float]:
    """``n`` evenly spaced entries of ``w`` (flattened), as floats: a cheap identity of a weight."""
    # full_tensor: an FSDP2-sharded base weight is gathered (every process computes the fingerprint)
    flat = full_tensor(w.detach()).reshape(-1)
    idx = torch.linspace(0, flat.numel() - 1, min(n, flat.numel()), device=flat.device).round().long()
    return [float(v) for v in flat.index_select(0, idx).double().cpu()]


def _fingerprint_mismatch(saved: list[float], now: list[float]) -> float:
    a = torch.tensor(saved, dtype=torch.float64, device="cpu")
    b = torch.tensor(now, dtype=torch.float64, device="cpu")
    if a.shape != b.shape:
        return float("inf")
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def base_fingerprint(handle) -> dict[str, list[float]]:
    """The fingerprint of every adapted base weight of ``handle`` (merged or not)."""
    return {n: weight_fingerprint(_frozen_base_weight(a)) for n, a in zip(handle.names, handle.adapters)}


def check_base_model_weights(model: nn.Module, fingerprint: dict[str, list[float]], *, source: str = "") -> None:
    """Raise :class:`AdapterLoadError` when the (unwrapped) modules of ``model`` named in
    ``fingerprint`` do not hold the weights the adapter was trained on."""
    bad = []
    for name, saved in fingerprint.items():
        try:
            m = model.get_submodule(name)
        except AttributeError:
            continue  # reported by the structural checks
        w = m.base_layer.weight if isinstance(m, ElasticAdapter) else getattr(m, "weight", None)
        if w is None:
            continue
        d = _fingerprint_mismatch(saved, weight_fingerprint(w))
        if d > FINGERPRINT_RTOL:
            bad.append((name, d))
    if bad:
        raise AdapterLoadError(
            f"the given model is not the base model this adapter was trained on{source}: the weights of "
            f"{len(bad)} of {len(fingerprint)} adapted modules differ (first: {bad[0][0]!r}, relative difference "
            f"{bad[0][1]:.3g}). Load it onto its base model, or pass check_base_model=False to load it anyway")


def check_finite_tensors(tensors: dict[str, torch.Tensor], what: str) -> None:
    for k, v in tensors.items():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise TrainingDivergedError(
                f"{what}: {k} holds NaN or inf values (the training diverged); nothing was written. "
                "Train again with a lower learning rate")


def _is_count(v, lo: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= lo


def slot_shapes(info: dict) -> dict[str, tuple[int, ...]]:
    return ADAPTER_FORMS[info["kind"]].slot_shapes(info["rank"], info["in_features"], info["out_features"])


def validate_adapter_config(cfg: dict, where: str) -> None:
    """Check a hand-editable ``adapter_config.json`` before anything is allocated from it: every
    module entry's kind, rank, capacity (bounded by the matrix size, so a hand-edited capacity
    cannot allocate gigabytes), shape and scale; the method config; the history."""
    def bad(msg):
        raise AdapterLoadError(f"{where}/{ADAPTER_CONFIG}: {msg}; the adapter config was edited or is corrupt")

    modules = cfg.get("modules")
    if not isinstance(modules, dict) or not modules:
        bad("'modules' must be a non-empty object of module entries")
    for n, info in modules.items():
        if not isinstance(info, dict):
            bad(f"module {n!r}: entry must be an object")
        missing = [k for k in ("kind", "rank", "capacity", "in_features", "out_features", "scaling") if k not in info]
        if missing:
            bad(f"module {n!r}: missing {', '.join(missing)}")
        if info["kind"] not in ADAPTER_FORMS:
            bad(f"module {n!r}: kind must be one of {', '.join(repr(k) for k in ADAPTER_FORMS)}, got {info['kind']!r}")
        for k in ("in_features", "out_features"):
            if not _is_count(info[k], 1):
                bad(f"module {n!r}: {k} must be an integer >= 1, got {info[k]!r}")
        if not _is_count(info["capacity"], 1):
            bad(f"module {n!r}: capacity must be an integer >= 1, got {info['capacity']!r}")
        lim = min(info["in_features"], info["out_features"])
        if info["capacity"] > lim:
            bad(f"module {n!r}: capacity {info['capacity']} exceeds min(in_features, out_features) = {lim}")
        if not _is_count(info["rank"], 0) or info["rank"] > info["capacity"]:
            bad(f"module {n!r}: rank must be an integer in [0, capacity={info['capacity']}], got {info['rank']!r}")
        sc = info["scaling"]
        if isinstance(sc, bool) or not isinstance(sc, (int, float)) or not math.isfinite(sc):
            bad(f"module {n!r}: scaling must be a finite number, got {sc!r}")
        if "r_init" in info and not _is_count(info["r_init"], 0):
            bad(f"module {n!r}: r_init must be an integer >= 0, got {info['r_init']!r}")
    if not isinstance(cfg.get("config"), dict):
        bad("'config' (the method configuration) is missing")
    conf = cfg["config"]
    form = conf.get("form") if isinstance(conf, dict) else None
    if form is not None:  # methods with a choice of form (ElaLoRA, AdaLoRA) record it; older saves: svd
        kinds = {info["kind"] for info in modules.values()}
        if kinds != {form}:
            bad(f"the method config says form {form!r} but the modules are of kind {', '.join(sorted(kinds))}")
    if not _is_count(cfg.get("step_count", 0), 0):
        bad(f"step_count must be an integer >= 0, got {cfg.get('step_count')!r}")
    fp = cfg.get("full_parameters", [])
    if not isinstance(fp, list) or not all(isinstance(k, str) for k in fp):
        bad("'full_parameters' must be a list of parameter names")
    ev = cfg.get("events", [])
    if not isinstance(ev, list) or not all(isinstance(e, dict) for e in ev):
        bad("'events' must be a list of objects")


def check_optimizer_state(optimizer, state: dict, path) -> None:
    """The checks ``Optimizer.load_state_dict`` makes, done before anything else is loaded."""
    groups = state.get("param_groups") if isinstance(state, dict) else None
    if not isinstance(groups, list) or len(groups) != len(optimizer.param_groups):
        raise AdapterLoadError(f"checkpoint {path}: the optimizer has {len(optimizer.param_groups)} parameter groups, "
                               f"the checkpoint {len(groups) if isinstance(groups, list) else 'none'}; build the same "
                               "optimizer as when it was saved")
    for i, (g, mine) in enumerate(zip(groups, optimizer.param_groups)):
        if len(g.get("params", [])) != len(mine["params"]):
            raise AdapterLoadError(f"checkpoint {path}: optimizer group {i} has {len(mine['params'])} parameters, the "
                                   f"checkpoint {len(g.get('params', []))}; build the same optimizer as when it was saved")


def safetensors_metadata(path: Path) -> dict:
    """The ``__metadata__`` of a .safetensors file (``{}`` when it cannot be read: the load reports that)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return f.metadata() or {}
    except Exception:  # noqa: BLE001  (the load itself reports corrupt files)
        return {}


def check_peft_fingerprint(model: nn.Module, adir: Path) -> None:
    """A PEFT adapter exported by elalora records the base weights it was trained on: check them."""
    fp = safetensors_metadata(adir / "adapter_model.safetensors").get("elalora_base_fingerprint")
    if not fp:
        return
    try:
        fp = json.loads(fp)
    except ValueError:
        return
    if isinstance(fp, dict):
        try:
            src = json.loads((adir / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
        except (OSError, ValueError, AttributeError):
            src = None
        check_base_model_weights(model, fp, source=f" ({src})")
