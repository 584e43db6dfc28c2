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
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import tempfile
import time
import uuid
import warnings
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import nn

from .config import CONFIG_FORMAT_VERSION, config_from_dict
from .layers import ElasticAdapter, SVDAdapter
from .model import AdaptiveModel, handle_of

__all__ = [
    "AdapterLoadError", "save_adapter", "load_adapter", "export_peft", "merge_and_unload",
    "atomic_directory", "atomic_write_bytes", "ADAPTER_CONFIG", "ADAPTER_WEIGHTS",
    "save_checkpoint", "load_checkpoint", "OutputPathError", "OutputLockedError", "output_lock",
    "recover_interrupted_swap",
]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


class AdapterLoadError(ValueError):
    """An adapter directory that cannot be loaded onto the given model; the message says why."""


# ------------------------------------------------------------------------------------ atomic I/O
class OutputPathError(ValueError):
    """A save that would destroy something elalora did not write (a file, a user's folder); the
    message says what to change."""


class OutputLockedError(RuntimeError):
    """Another live process is writing the same output directory."""


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _new_mode(path: Path, *, is_dir: bool) -> int:
    """Mode for a file or folder that replaces ``path``: the old one's if there was one, else the
    default that ``umask`` gives (``mkdtemp``/``mkstemp`` create 0700/0600, which would lock the
    group out of a shared run folder)."""
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        return (0o777 if is_dir else 0o666) & ~_umask()


def _stamp() -> str:
    # sortable in time, unique across processes: the newest leftover of an interrupted swap wins
    return f"{time.time_ns():020d}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def _old_siblings(path: Path) -> list[Path]:
    if not path.parent.is_dir():
        return []
    pre = f".{path.name}.old-"
    return sorted((p for p in path.parent.iterdir() if p.name.startswith(pre) and p.is_dir()), key=lambda p: p.name)


def recover_interrupted_swap(path: str | os.PathLike) -> Path | None:
    """Undo a directory swap that was interrupted between its two renames.

    :func:`atomic_directory` replaces ``NAME`` by renaming it to a hidden ``.NAME.old-<stamp>``
    sibling and then renaming the new folder to ``NAME``. A crash between the two leaves no
    ``NAME``, only the hidden copy of the previous contents. When ``path`` is missing and such a
    copy exists, the newest one is renamed back to ``path`` (a warning says so). Returns ``path``
    when something was restored, else ``None``.
    """
    path = Path(path)
    if path.exists() or path.is_symlink():
        return None
    olds = _old_siblings(path)
    if not olds:
        return None
    os.replace(olds[-1], path)
    warnings.warn(f"{path} was missing after an interrupted save; restored its previous contents from "
                  f"{olds[-1].name}", RuntimeWarning, stacklevel=2)
    return path


def _fsync_tree(root: Path) -> None:
    for d, _, files in os.walk(root):
        for f in files:
            fp = Path(d) / f
            if fp.is_file() and not fp.is_symlink():
                with open(fp, "rb+") as fh:
                    os.fsync(fh.fileno())


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary directory; on success it replaces ``path``, on error it is removed.

    ``path`` must be a directory or absent: an existing file is never replaced (``OutputPathError``).
    A symbolic link to a directory is followed, so the swap happens where the link points and the
    link stays. A swap that a crash interrupted earlier is first undone
    (:func:`recover_interrupted_swap`). The new folder gets the old one's permissions (or the
    ``umask`` default), not ``mkdtemp``'s 0700.
    """
    path = Path(path)
    if path.is_symlink() and path.resolve().is_dir():
        path = path.resolve()
    if path.exists() and not path.is_dir():
        raise OutputPathError(f"{path} is an existing file; refusing to replace it with a directory. "
                              "Choose a directory path")
    recover_interrupted_swap(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = _new_mode(path, is_dir=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        os.chmod(tmp, mode)
        yield tmp
        _fsync_tree(tmp)  # flush file contents (sub-folders too) before the swap
        if path.exists():
            old = path.parent / f".{path.name}.old-{_stamp()}"
            os.replace(path, old)
            os.replace(tmp, path)
            for o in _old_siblings(path):  # this one and any left by an earlier interrupted clean-up
                shutil.rmtree(o, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def _adapter_output(path: str | os.PathLike, own: Sequence[str]) -> Iterator[Path]:
    """Where :func:`save_adapter` / :func:`export_peft` write: a temporary folder whose files end
    up in ``path``.

    * ``path`` absent, empty, or holding only files named in ``own``: the whole folder is swapped
      atomically (:func:`atomic_directory`).
    * ``path`` holding anything else (a user's notes, a model's weights, ...): those entries are left
      exactly as they are; each of our files is replaced atomically, in the order of ``own``
      (weights first, the config that makes the folder an adapter last).
    * ``path`` an existing file: ``OutputPathError``.
    """
    path = Path(path)
    if path.is_symlink() and path.resolve().is_dir():
        path = path.resolve()
    if path.exists() and not path.is_dir():
        raise OutputPathError(f"{path} is an existing file; refusing to replace it with an adapter directory. "
                              "Choose a directory path")
    recover_interrupted_swap(path)
    foreign = [e.name for e in path.iterdir() if e.name not in own] if path.is_dir() else []
    if not foreign:
        with atomic_directory(path) as tmp:
            yield tmp
        return
    tmp = Path(tempfile.mkdtemp(prefix=".elalora-save.tmp-", dir=path))
    try:
        yield tmp
        names = [n for n in own if (tmp / n).exists()] + sorted(p.name for p in tmp.iterdir() if p.name not in own)
        for n in names:
            with open(tmp / n, "rb+") as fh:
                os.fsync(fh.fileno())
            os.chmod(tmp / n, _new_mode(path / n, is_dir=False))
            os.replace(tmp / n, path / n)
        os.rmdir(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write a file via a temporary sibling and ``os.replace`` (keeping the old file's mode)."""
    path = Path(path)
    if path.is_dir():
        raise OutputPathError(f"{path} is a directory; refusing to replace it with a file")
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = _new_mode(path, is_dir=False)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def output_lock(path: str | os.PathLike) -> Iterator[Path]:
    """Hold an exclusive lock on the output ``path`` for the duration of a job.

    The lock is ``fcntl.flock`` on a hidden sibling ``.NAME.lock`` (holding the owner's pid and host
    for the message). The kernel releases a flock when its process dies, so a lock left by a
    killed process never blocks: the next job takes it over. A second live job gets
    ``OutputLockedError`` at once instead of silently replacing the first one's output.
    """
    import fcntl
    import socket

    path = Path(path)
    lock = path.parent / f".{path.name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = os.read(fd, 4096).decode(errors="replace").strip() or "unknown"
            finally:
                os.close(fd)
            raise OutputLockedError(
                f"{path} is being written by another elalora process ({holder}); wait for it to finish "
                "or choose another output directory") from None
        try:
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the previous holder removed the file between our open and flock: retry
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
        yield lock
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)
        os.close(fd)


def _save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path), metadata=metadata)


def _safetensors_metadata(path: Path) -> dict:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return f.metadata() or {}
    except Exception:  # noqa: BLE001  (the load itself reports corrupt files)
        return {}


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
    flat = w.detach().reshape(-1)
    idx = torch.linspace(0, flat.numel() - 1, min(n, flat.numel())).round().long().to(flat.device)
    return [float(v) for v in flat.index_select(0, idx).double().cpu()]


def _fingerprint_mismatch(saved: list[float], now: list[float]) -> float:
    a = torch.tensor(saved, dtype=torch.float64)
    b = torch.tensor(now, dtype=torch.float64)
    if a.shape != b.shape:
        return float("inf")
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _base_identity(model: nn.Module, handle: AdaptiveModel | None = None) -> dict:
    cfg = getattr(model, "config", None)
    out = {
        "class": type(model).__name__,
        "name_or_path": getattr(cfg, "_name_or_path", None) or getattr(cfg, "name_or_path", None),
        "model_type": getattr(cfg, "model_type", None),
    }
    if handle is not None:
        out["fingerprint"] = {n: weight_fingerprint(_frozen_base_weight(a)) for n, a in zip(handle.names, handle.adapters)}
    return out


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


def _trainable_full_modules(handle: AdaptiveModel) -> dict[str, torch.Tensor]:
    out = {}
    for mname in handle.modules_to_save_names():
        for pname, p in handle.model.get_submodule(mname).named_parameters():
            out[f"{mname}.{pname}"] = p
    return out


def _check_finite(tensors: dict[str, torch.Tensor], what: str) -> None:
    from .model import TrainingDivergedError

    for k, v in tensors.items():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise TrainingDivergedError(
                f"{what}: {k} holds NaN or inf values (the training diverged); nothing was written. "
                "Train again with a lower learning rate")


# ------------------------------------------------------------------------------------- save/load
def save_adapter(handle: AdaptiveModel, path: str | os.PathLike, *, include_history: bool = True) -> None:
    """Save the adapter compacted to its active ranks (see the module docstring).

    ``path`` may be new, empty, or a folder with other files in it: only ``adapter_config.json``
    and ``adapter_model.safetensors`` are written, each atomically, and everything else in the
    folder is left alone. An existing file at ``path`` is refused (:class:`OutputPathError`).
    Non-finite weights are refused (:class:`~elalora.model.TrainingDivergedError`).
    """
    modules, tensors = {}, {}
    for name, a in zip(handle.names, handle.adapters):
        idx = a.active_indices()
        modules[name] = {
            "kind": a.kind, "rank": int(idx.numel()), "capacity": a.capacity, "in_features": a.in_features,
            "out_features": a.out_features, "fan_in_fan_out": a.fan_in_fan_out, "scaling": a.scaling,
            "r_init": a.r_init,
        }
        for pname, p, dim in a.slot_parameters():
            tensors[f"{name}.{pname}"] = p.detach().index_select(dim, idx.to(p.device))
    full = _trainable_full_modules(handle)
    tensors.update({k: v.detach() for k, v in full.items()})
    _check_finite(tensors, f"save_adapter({str(path)!r})")
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
    with _adapter_output(path, (ADAPTER_WEIGHTS, ADAPTER_CONFIG)) as tmp:
        _save_safetensors(tensors, tmp / ADAPTER_WEIGHTS,
                          metadata={"format": "pt", "elalora": str(CONFIG_FORMAT_VERSION), "elalora_save_id": save_id})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(cfg, indent=2, default=str))


def read_adapter_config(path: str | os.PathLike) -> dict:
    recover_interrupted_swap(path)  # a save interrupted mid-swap: put the previous adapter back
    p = Path(path) / ADAPTER_CONFIG
    if Path(path).is_file():
        raise AdapterLoadError(f"{path} is a file, not an adapter directory")
    if not Path(path).is_dir():
        raise AdapterLoadError(f"adapter directory {path} does not exist")
    if not p.is_file():
        raise AdapterLoadError(f"{path} holds no {ADAPTER_CONFIG}: not an elalora adapter directory")
    try:
        cfg = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterLoadError(f"{p} is not valid JSON ({e}); the adapter is corrupt") from None
    except OSError as e:
        raise AdapterLoadError(f"cannot read {p}: {e.strerror or e}") from None
    if not isinstance(cfg, dict):
        raise AdapterLoadError(f"{p} is not a JSON object; the adapter is corrupt")
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


def _is_count(v, lo: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= lo


def _slot_shapes(info: dict) -> dict[str, tuple[int, ...]]:
    r, din, dout = info["rank"], info["in_features"], info["out_features"]
    if info["kind"] == "svd":
        return {"lora_P": (dout, r), "lora_lambda": (r,), "lora_Q": (r, din)}
    return {"lora_B": (dout, r), "lora_A": (r, din)}


def validate_adapter_config(cfg: dict, where: str) -> None:
    """Check a hand-editable ``adapter_config.json`` before anything is allocated from it: every
    module entry's kind, rank, capacity (bounded by the matrix size, so a hand-edited capacity
    cannot allocate gigabytes), shape and scale; the method config; the history."""
    import math

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
        if info["kind"] not in ("svd", "lora"):
            bad(f"module {n!r}: kind must be 'svd' or 'lora', got {info['kind']!r}")
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
    if not _is_count(cfg.get("step_count", 0), 0):
        bad(f"step_count must be an integer >= 0, got {cfg.get('step_count')!r}")
    fp = cfg.get("full_parameters", [])
    if not isinstance(fp, list) or not all(isinstance(k, str) for k in fp):
        bad("'full_parameters' must be a list of parameter names")
    ev = cfg.get("events", [])
    if not isinstance(ev, list) or not all(isinstance(e, dict) for e in ev):
        bad("'events' must be a list of objects")


def load_adapter(model: nn.Module, path: str | os.PathLike, *, is_trainable: bool = False,
                 check_base_model: bool = True) -> AdaptiveModel:
    """Wrap a fresh ``model`` and load the adapter saved at ``path`` onto it.

    Everything is checked before the model is touched, so a failed load leaves ``model`` as it
    was: the config (:func:`validate_adapter_config`), that every saved module exists in ``model``
    with the same shape, that the weight file holds exactly the tensors the config lists (no
    missing, no leftover ones) with the right shapes and finite values, and — unless
    ``check_base_model=False`` — that ``model``'s weights are the ones the adapter was trained on
    (a fingerprint of a few values per adapted matrix, recorded at save time).
    """
    from .allocation.base import RankEvent
    from .config import ConfigError

    cfg = read_adapter_config(path)
    validate_adapter_config(cfg, str(path))
    tensors = _load_safetensors(Path(path) / ADAPTER_WEIGHTS)
    meta_id = _safetensors_metadata(Path(path) / ADAPTER_WEIGHTS).get("elalora_save_id")
    if cfg.get("save_id") and meta_id and cfg["save_id"] != meta_id:
        raise AdapterLoadError(f"{path}: {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS} come from different saves "
                               "(an interrupted save into a folder with other files?); save the adapter again")
    modules = cfg["modules"]
    base = cfg.get("base_model") if isinstance(cfg.get("base_model"), dict) else {}
    have = dict(model.named_modules())
    missing = [n for n in modules if n not in have]
    if missing:
        raise AdapterLoadError(
            f"this adapter was saved from {base.get('class')} ({base.get('name_or_path')}); the given model "
            f"({type(model).__name__}) has no module {missing[0]!r} ({len(missing)} of {len(modules)} missing). "
            "Load it onto the base model it was trained from")
    for n, info in modules.items():
        m = have[n]
        if isinstance(m, ElasticAdapter):
            raise AdapterLoadError(f"module {n!r} of the given model already carries an adapter; load onto a fresh model")
        shape = (getattr(m, "in_features", None), getattr(m, "out_features", None))
        if hasattr(m, "weight") and m.weight.dim() == 2 and not isinstance(m, nn.Linear):  # Conv1D
            shape = tuple(m.weight.shape)
        if shape != (info["in_features"], info["out_features"]):
            raise AdapterLoadError(
                f"module {n!r} is {info['in_features']}→{info['out_features']} in the adapter but "
                f"{shape[0]}→{shape[1]} in the given model: wrong base model (saved from "
                f"{base.get('name_or_path')})")
    expected: dict[str, tuple[int, ...] | None] = {}
    for n, info in modules.items():
        for pname, shp in _slot_shapes(info).items():
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
    if check_base_model and isinstance(base.get("fingerprint"), dict):
        check_base_model_weights(model, base["fingerprint"], source=f" ({base.get('name_or_path')})")
    try:
        conf_d = dict(cfg["config"])
        conf_d["target_modules"] = list(modules)
        conf_d.pop("rank_pattern", None) if conf_d.get("method") == "elalora" else None
        config = config_from_dict(conf_d)
        events = [RankEvent(**e) for e in cfg.get("events", [])]
    except (ConfigError, TypeError, ValueError, KeyError) as e:
        raise AdapterLoadError(f"{path}/{ADAPTER_CONFIG}: the method config or history is invalid "
                               f"({' '.join(str(e).split())}); the adapter config was edited or is corrupt") from None
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
                p.zero_()
                p.narrow(dim, 0, r).copy_(tensors[f"{n}.{pname}"].to(p.dtype))
        for k in cfg.get("full_parameters", []):
            params[k].copy_(tensors[k].to(params[k].dtype))
    handle.initial_rank_pattern = dict(cfg.get("initial_rank_pattern", handle.rank_pattern()))
    handle.events = events
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
    # Merged or not (even after merge_and_unload), the factors are unchanged, so the export is the same.
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
    _check_finite(tensors, f"export_peft({str(path)!r})")
    meta = {"format": "pt", "elalora_base_fingerprint": json.dumps(_base_identity(handle.model, handle)["fingerprint"])}
    with _adapter_output(path, (ADAPTER_WEIGHTS, ADAPTER_CONFIG)) as tmp:
        lcfg.save_pretrained(str(tmp))
        _save_safetensors(tensors, tmp / ADAPTER_WEIGHTS, metadata=meta)
    return pattern


# ------------------------------------------------------------------------------------------ merge
@torch.no_grad()
def merge_and_unload(handle: AdaptiveModel | nn.Module) -> nn.Module:
    """Fold every ΔW into its base weight and put the plain base layers back. Returns the model."""
    if not isinstance(handle, AdaptiveModel):
        handle = handle_of(handle)
    model = handle.model
    for name, a in zip(handle.names, handle.adapters):
        a.merge()
        a._unmerged_weight = None
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, a.base_layer)
    handle.remove_hooks()
    handle.unloaded = True  # the handle's adapters are no longer in the model: unmerge() is impossible
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
    model_state = {k: v.detach().cpu().clone() for k, v in handle.model.state_dict().items()
                   if k in trainable or k.endswith(".active")}
    blob = {
        "elalora_checkpoint_version": 1,
        "model": model_state,
        "elalora": handle.state_dict(),
        "optimizer": None if optimizer is None else optimizer.state_dict(),
        "lr_scheduler": None if lr_scheduler is None else lr_scheduler.state_dict(),
        "rng": torch.get_rng_state(),
        "extra": extra or {},
    }
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
    # Everything is checked before anything is applied, and what is applied is rolled back if a
    # later part still fails: a failed load leaves handle, model, optimizer and scheduler as they were.
    try:
        handle.validate_state_dict(blob.get("elalora"))
    except ValueError as e:
        raise AdapterLoadError(f"checkpoint {path} does not fit this model: {e}") from None
    model_state = blob.get("model")
    own = handle.model.state_dict()
    if not isinstance(model_state, dict):
        raise AdapterLoadError(f"checkpoint {path} holds no model state")
    unexpected = [k for k in model_state if k not in own]
    if unexpected:
        raise AdapterLoadError(f"checkpoint {path} has parameters this model lacks: {unexpected[:3]}")
    wrong = [k for k, v in model_state.items() if tuple(v.shape) != tuple(own[k].shape)]
    if wrong:
        raise AdapterLoadError(f"checkpoint {path}: {wrong[0]} has shape {tuple(model_state[wrong[0]].shape)}, the model "
                               f"{tuple(own[wrong[0]].shape)}")
    if optimizer is not None and blob.get("optimizer") is not None:
        _check_optimizer_state(optimizer, blob["optimizer"], path)
    backup_handle = handle.state_dict()
    backup_model = {k: own[k].detach().clone() for k in model_state}
    backup_opt = None if optimizer is None else copy.deepcopy(optimizer.state_dict())
    backup_sched = None if lr_scheduler is None else copy.deepcopy(lr_scheduler.state_dict())
    try:
        handle.load_state_dict(blob["elalora"])
        handle.model.load_state_dict(model_state, strict=False)
        if optimizer is not None and blob.get("optimizer") is not None:
            optimizer.load_state_dict(blob["optimizer"])
        if lr_scheduler is not None and blob.get("lr_scheduler") is not None:
            lr_scheduler.load_state_dict(blob["lr_scheduler"])
        torch.set_rng_state(blob["rng"])
    except Exception as e:
        handle._restore_state(backup_handle)
        handle.model.load_state_dict(backup_model, strict=False)
        if backup_opt is not None:
            optimizer.load_state_dict(backup_opt)
        if backup_sched is not None:
            lr_scheduler.load_state_dict(backup_sched)
        raise AdapterLoadError(f"checkpoint {path} could not be loaded ({type(e).__name__}: {e}); nothing was "
                               "changed") from None
    return blob["extra"]


def _check_optimizer_state(optimizer, state: dict, path) -> None:
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
