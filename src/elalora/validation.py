"""The one validator: every file elalora reads and every state it resumes is checked here, before
anything is built from it.

What it checks:

* **an adapter directory** (:class:`AdapterDir`: read once -- format, ``adapter_config.json``, the
  safetensors header -- and checked on opening): per module the form, rank, capacity (bounded by the
  matrix size, so a hand-edited capacity cannot allocate gigabytes), shape and scale; the method
  config (through the config's own checks: form, budget, grace rounds, ...); the rank history;
  a PEFT LoRA config's ranks and scales. ``load_adapter``, ``eval``, ``export``, ``inspect``,
  ``plot`` and ``analyze`` all open adapters through it.
* **a run directory** (:func:`read_run_dir`): ``config.json`` (the fields ``eval`` / ``export`` take
  from it), ``metrics.json`` (rank patterns, scores), ``rank_history.jsonl`` and ``gelora_plan.json``;
  ranks are integers >= 0 and, when the run's adapter is there, at most their module's capacity.
* **a checkpoint state** (:func:`check_handle_state`): what :meth:`AdaptiveModel.state_dict` wrote, against
  the live handle: method, form, budget, capacities and schedule (a resume into another one is
  refused naming both sides), masks (boolean, of the capacity), the allocator's values, the
  importance state and the history. An optimizer state against its optimizer
  (:func:`check_optimizer_state`).
* **a config object** (:func:`check_config`): the config's checks again, so that a field changed
  after construction (``config.budget = "foo"``) fails in ``get_model``.

Plus the checks of what a save writes and a load reads: finite values and the base-model
fingerprint. The fingerprint is a few evenly spaced values of each adapted base weight, recorded
at save time; a load compares them (relative L2 distance, :data:`FINGERPRINT_RTOL`) so that an
adapter put onto a different model of the same shapes fails instead of silently giving wrong outputs.

Every failure is an :class:`~elalora.errors.ElaLoRAError` whose one-line message names the file or
state, the field, the value and what is allowed; the command line prints it and exits with code 2.

Imports: :mod:`elalora.layers`, :mod:`elalora.config`, :mod:`elalora._io`, :mod:`elalora.errors`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._io import read_json, recover_interrupted_swap
from .config import CONFIG_FORMAT_VERSION, FORMS, config_from_dict
from .errors import AdapterLoadError, ConfigError, ElaLoRAError, RunError, TrainingDivergedError
from .layers import ADAPTER_FORMS, ElasticAdapter, full_tensor

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "HEAD_CONFIG", "RUN_CONFIG", "METRICS", "RANK_HISTORY", "GELORA_PLAN",
           "FINGERPRINT_VALUES", "FINGERPRINT_RTOL", "weight_fingerprint", "base_fingerprint",
           "check_base_model_weights", "check_finite_tensors", "check_adapter_config", "check_peft_config",
           "check_optimizer_state", "slot_shapes", "safetensors_header", "AdapterDir", "check_events",
           "RunFiles", "read_run_dir", "check_run_config", "check_handle_state", "check_config",
           "checkpoint_identity", "read_head_info"]

# ------------------------------------------------------------------------------------ file names
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
HEAD_CONFIG = "elalora_head.json"  # the head an adapter was trained with (elalora.heads.head_info), beside it
RUN_CONFIG = "config.json"
METRICS = "metrics.json"
RANK_HISTORY = "rank_history.jsonl"
GELORA_PLAN = "gelora_plan.json"

FINGERPRINT_VALUES = 16
# Relative L2 distance of the sampled weights below which two bases count as the same model:
# far above bf16/fp16 rounding (2^-8) of the same weights, far below the ~1.4 of two different
# initialisations or fine-tunes of the shapes.
FINGERPRINT_RTOL = 0.02


def _is_count(v, lo: int = 0) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= lo


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _short(v: Any) -> str:
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


# ------------------------------------------------------------------------- base-model fingerprint
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
    try:
        a = torch.tensor(saved, dtype=torch.float64, device="cpu")
    except (TypeError, ValueError):
        return float("inf")
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


# ------------------------------------------------------------------------------ adapter configs
def slot_shapes(info: dict) -> dict[str, tuple[int, ...]]:
    """The saved (compact) shapes of a checked module entry's slot parameters."""
    return ADAPTER_FORMS[info["form"]].slot_shapes(info["rank"], info["in_features"], info["out_features"])


def check_events(events: Any, where: str, capacity: dict[str, int] | None = None, *, error=AdapterLoadError) -> list:
    """A rank history (the adapter config's ``events`` or ``rank_history.jsonl``): a list of objects with
    ``step`` (integer >= 0), ``module`` (a string; one of ``capacity``'s keys when given), ``old_rank`` /
    ``new_rank`` (integers in [0, capacity]), ``pruned`` / ``grown`` (integers >= 0) and ``scores`` (finite
    numbers). Returns ``events``."""
    if not isinstance(events, list):
        raise error(f"{where}: the rank history must be a list of objects, got {_short(events)}")
    for i, e in enumerate(events):
        at = f"{where}: rank change {i + 1}"
        if not isinstance(e, dict):
            raise error(f"{at} must be an object, got {_short(e)}")
        unknown = set(e) - {"step", "module", "old_rank", "new_rank", "pruned", "grown", "scores"}
        if unknown:
            raise error(f"{at}: unknown field {sorted(unknown)[0]!r}; allowed: step, module, old_rank, new_rank, "
                        "pruned, grown, scores")
        for k in ("step", "module", "old_rank", "new_rank"):
            if k not in e:
                raise error(f"{at}: missing {k}")
        if not _is_count(e["step"]):
            raise error(f"{at}: step must be an integer >= 0, got {_short(e['step'])}")
        if not isinstance(e["module"], str) or not e["module"]:
            raise error(f"{at}: module must be a module name, got {_short(e['module'])}")
        if capacity is not None and e["module"] not in capacity:
            raise error(f"{at}: module {e['module']!r} is not one of the adapter's modules")
        cap = (capacity or {}).get(e["module"])
        for k in ("old_rank", "new_rank"):
            if not _is_count(e[k]) or (cap is not None and e[k] > cap):
                allowed = f"an integer in [0, capacity={cap}]" if cap is not None else "an integer >= 0"
                raise error(f"{at}: {k} must be {allowed}, got {_short(e[k])}")
        for k in ("pruned", "grown"):
            if k in e and not _is_count(e[k]):
                raise error(f"{at}: {k} must be an integer >= 0, got {_short(e[k])}")
        sc = e.get("scores", [])
        if not isinstance(sc, list) or not all(_is_number(v) for v in sc):
            raise error(f"{at}: scores must be a list of finite numbers")
    return events


def _check_pattern(pattern: Any, where: str, field: str, capacity: dict[str, int] | None, *,
                   error=AdapterLoadError) -> dict:
    """A rank pattern ``{module: rank}``: integer ranks in [0, capacity] (>= 0 without capacities)."""
    if not isinstance(pattern, dict):
        raise error(f"{where}: {field} must be an object of module -> rank, got {_short(pattern)}")
    for n, r in pattern.items():
        if capacity is not None and n not in capacity:
            raise error(f"{where}: {field} names module {n!r}, which the adapter's module list does not list (a "
                        "module entry is missing?)")
        cap = (capacity or {}).get(n)
        if not _is_count(r) or (cap is not None and r > cap):
            allowed = f"an integer in [0, capacity={cap}]" if cap is not None else "an integer >= 0"
            raise error(f"{where}: {field}[{n!r}] must be {allowed}, got {_short(r)}")
    return pattern


def check_adapter_config(cfg: Any, where: str) -> dict:
    """Check an elalora ``adapter_config.json`` (already parsed) before anything is allocated from it and
    return it normalised: each module entry's form under ``"form"`` (files before the rename say
    ``"kind"``), and the method config's ``form`` filled in from the modules when it is missing.

    Checked: the format version; every module entry's form, rank, capacity (<= min(in, out)), shape and
    scale; the method config (rebuilt through its own checks, so a bad form, budget or grace value
    fails here); that the form of the config and of the modules agree; the rank patterns, step count,
    full parameters and the rank history."""
    def bad(msg):
        raise AdapterLoadError(f"{where}: {msg}; the adapter config was edited or is corrupt")

    if not isinstance(cfg, dict):
        raise AdapterLoadError(f"{where} is not a JSON object; the adapter is corrupt")
    v = cfg.get("elalora_format_version")
    if not _is_count(v, 1):
        raise AdapterLoadError(f"{where}: elalora_format_version must be an integer >= 1, got {_short(v)}; the "
                               "adapter config was edited or is corrupt")
    if v > CONFIG_FORMAT_VERSION:
        raise AdapterLoadError(f"{where} was written in elalora format {v}; this elalora reads up to "
                               f"{CONFIG_FORMAT_VERSION}. Upgrade elalora to load it")
    cfg = dict(cfg)
    modules = cfg.get("modules")
    if not isinstance(modules, dict) or not modules:
        bad("'modules' must be a non-empty object of module entries")
    modules = cfg["modules"] = {n: dict(i) if isinstance(i, dict) else i for n, i in modules.items()}
    for n, info in modules.items():
        if not isinstance(info, dict):
            bad(f"module {n!r}: entry must be an object")
        if "form" not in info and "kind" in info:  # saved before the form had one name
            info["form"] = info.pop("kind")
        missing = [k for k in ("form", "rank", "capacity", "in_features", "out_features", "scaling") if k not in info]
        if missing:
            bad(f"module {n!r}: missing {', '.join(missing)}")
        if not isinstance(info["form"], str) or info["form"] not in FORMS:
            bad(f"module {n!r}: form must be one of {', '.join(repr(k) for k in FORMS)}, got {_short(info['form'])}")
        for k in ("in_features", "out_features"):
            if not _is_count(info[k], 1):
                bad(f"module {n!r}: {k} must be an integer >= 1, got {_short(info[k])}")
        if not _is_count(info["capacity"], 1):
            bad(f"module {n!r}: capacity must be an integer >= 1, got {_short(info['capacity'])}")
        lim = min(info["in_features"], info["out_features"])
        if info["capacity"] > lim:
            bad(f"module {n!r}: capacity {info['capacity']} exceeds min(in_features, out_features) = {lim}")
        if not _is_count(info["rank"]) or info["rank"] > info["capacity"]:
            bad(f"module {n!r}: rank must be an integer in [0, capacity={info['capacity']}], "
                f"got {_short(info['rank'])}")
        if not _is_number(info["scaling"]):
            bad(f"module {n!r}: scaling must be a finite number, got {_short(info['scaling'])}")
        if "r_init" in info and not _is_count(info["r_init"]):
            bad(f"module {n!r}: r_init must be an integer >= 0, got {_short(info['r_init'])}")
        if "fan_in_fan_out" in info and not isinstance(info["fan_in_fan_out"], bool):
            bad(f"module {n!r}: fan_in_fan_out must be true or false, got {_short(info['fan_in_fan_out'])}")
    forms = {info["form"] for info in modules.values()}
    if len(forms) > 1:
        bad(f"the modules mix forms {', '.join(sorted(forms))}; an adapter has one form")
    if not isinstance(cfg.get("config"), dict):
        bad("'config' (the method configuration) is missing")
    conf = cfg["config"] = dict(cfg["config"])
    if "form" not in conf and conf.get("method") in ("elalora", "adalora"):
        conf["form"] = forms.pop()  # a config saved without its form: the modules say which
    elif "form" in conf and {conf["form"]} != forms:
        bad(f"the method config says form {_short(conf['form'])} but the modules are of form "
            f"{', '.join(sorted(forms))}")
    try:
        d = dict(conf, target_modules=list(modules))
        if d.get("method") == "elalora":
            d.pop("rank_pattern", None)  # the modules' ranks are the pattern
        config_from_dict(d)
    except ConfigError as e:
        bad(f"config: {e}")
    except (TypeError, ValueError, AttributeError) as e:
        bad(f"config: {' '.join(str(e).split())}")
    capacity = {n: i["capacity"] for n, i in modules.items()}
    for field in ("rank_pattern", "initial_rank_pattern"):
        if field in cfg:
            _check_pattern(cfg[field], where, field, capacity)
    if not _is_count(cfg.get("step_count", 0)):
        bad(f"step_count must be an integer >= 0, got {_short(cfg.get('step_count'))}")
    fp = cfg.get("full_parameters", [])
    if not isinstance(fp, list) or not all(isinstance(k, str) for k in fp):
        bad("'full_parameters' must be a list of parameter names")
    mts = cfg.get("modules_to_save", [])
    if mts is not None and (not isinstance(mts, list) or not all(isinstance(k, str) for k in mts)):
        bad("'modules_to_save' must be a list of module names")
    check_events(cfg.get("events", []), where, capacity)
    base = cfg.get("base_model")
    if base is not None and not isinstance(base, dict):
        bad(f"base_model must be an object, got {_short(base)}")
    return cfg


def check_peft_config(cfg: Any, where: str) -> dict:
    """Check a PEFT LoRA ``adapter_config.json``: LoRA, a rank ``r`` >= 1, a finite ``lora_alpha``, and rank /
    alpha patterns of the same kinds (what ``inspect`` and the serving report read)."""
    def bad(msg):
        raise AdapterLoadError(f"{where}: {msg}; the adapter config was edited or is corrupt")

    if str(cfg.get("peft_type")).upper() != "LORA":
        raise AdapterLoadError(f"{where}: a PEFT {cfg.get('peft_type')} adapter; only LoRA adapters are supported")
    if "r" in cfg and not _is_count(cfg["r"], 1):
        bad(f"r must be an integer >= 1, got {_short(cfg['r'])}")
    if "lora_alpha" in cfg and not _is_number(cfg["lora_alpha"]):
        bad(f"lora_alpha must be a finite number, got {_short(cfg['lora_alpha'])}")
    for field, ok, allowed in (("rank_pattern", lambda x: _is_count(x, 1), "integers >= 1"),
                               ("alpha_pattern", _is_number, "finite numbers")):
        p = cfg.get(field)
        if p is not None and (not isinstance(p, dict) or not all(ok(x) for x in p.values())):
            bad(f"{field} must be an object of module -> {allowed}")
    tm = cfg.get("target_modules")
    names_ok = isinstance(tm, list) and all(isinstance(t, str) for t in tm)
    if tm is not None and not isinstance(tm, str) and not names_ok:
        bad(f"target_modules must be a list of module names or a regex string, got {_short(tm)}")
    mts = cfg.get("modules_to_save")
    if mts is not None and (not isinstance(mts, list) or not all(isinstance(t, str) for t in mts)):
        bad(f"modules_to_save must be a list of module names, got {_short(mts)}")
    return cfg


def safetensors_header(path: str | os.PathLike, *, with_metadata: bool = False):
    """Tensor names -> {dtype, shape} from a .safetensors header (no tensor data is read); with
    ``with_metadata``, ``(tensors, __metadata__)``. A header that promises more bytes than the file
    holds, or shapes that are not lists of integers, is refused."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ValueError("file too short")
            (n,) = struct.unpack("<Q", raw)
            if n > 100_000_000:
                raise ValueError("header too large")
            header = json.loads(f.read(n))
            if not isinstance(header, dict):
                raise ValueError("header is not a JSON object")
            size = f.seek(0, 2)
            end = 0
            for k, v in header.items():
                if k == "__metadata__":
                    continue
                if not isinstance(v, dict) or not isinstance(v.get("shape"), list) or not all(
                        _is_count(s) for s in v["shape"]):
                    raise ValueError(f"tensor {k!r} has no valid shape")
                if "data_offsets" in v:
                    end = max(end, int(v["data_offsets"][1]))
            if 8 + n + end > size:
                raise ValueError(f"file is {size} bytes, its header promises {8 + n + end}")
    except (OSError, ValueError, UnicodeDecodeError, TypeError, KeyError, IndexError) as e:
        raise AdapterLoadError(f"cannot read the safetensors header of {str(path)!r} ({e}); the file is truncated "
                               "or corrupt") from None
    meta = header.pop("__metadata__", None)
    meta = meta if isinstance(meta, dict) else {}
    return (header, meta) if with_metadata else header


class AdapterDir:
    """An adapter directory read once: its format (``"elalora"`` or ``"peft"``), its ``adapter_config.json``
    (checked on opening: :func:`check_adapter_config` / :func:`check_peft_config`) and, read on first use,
    the safetensors header and metadata of its weights. Every reader of an adapter takes one of these.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        path = Path(path).expanduser()
        recover_interrupted_swap(path)  # a save interrupted mid-swap: put the previous adapter back
        if path.is_file():
            raise AdapterLoadError(f"{path} is a file, not an adapter directory")
        if not path.is_dir():
            raise AdapterLoadError(f"adapter directory {path} does not exist")
        self.path = path
        if not self.config_path.is_file():
            raise AdapterLoadError(f"{path} holds no {ADAPTER_CONFIG}: not an adapter directory")
        where = str(self.config_path)
        raw = read_json(self.config_path, error=AdapterLoadError)  # the one place adapter_config.json is opened
        if not isinstance(raw, dict):
            raise AdapterLoadError(f"{where} is not a JSON object; the adapter is corrupt")
        self.raw = raw
        if "elalora_format_version" in raw:
            self.format = "elalora"
            self.config = check_adapter_config(raw, where)
        elif raw.get("peft_type"):
            self.format = "peft"
            self.config = check_peft_config(raw, where)
        else:
            raise AdapterLoadError(f"{where} is neither an elalora nor a PEFT adapter config")

    def __fspath__(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        return str(self.path)

    @property
    def config_path(self) -> Path:
        return self.path / ADAPTER_CONFIG

    @property
    def weights_path(self) -> Path:
        return self.path / ADAPTER_WEIGHTS

    @cached_property
    def _header(self) -> tuple[dict, dict]:
        if not self.weights_path.is_file():
            raise AdapterLoadError(f"{self.weights_path} is missing: not an adapter directory (expected "
                                   f"{ADAPTER_WEIGHTS})")
        return safetensors_header(self.weights_path, with_metadata=True)

    @property
    def header(self) -> dict:
        """``{tensor name: {dtype, shape, data_offsets}}`` of the weights (no tensor data read)."""
        return self._header[0]

    @property
    def metadata(self) -> dict:
        """The weights' ``__metadata__`` (``elalora_save_id``, ``elalora_base_fingerprint``, ...)."""
        return self._header[1]

    @property
    def modules(self) -> dict:
        return self.config["modules"] if self.format == "elalora" else {}

    @property
    def capacity(self) -> dict[str, int] | None:
        """Capacity per module (elalora adapters; ``None`` for PEFT)."""
        return {n: i["capacity"] for n, i in self.modules.items()} if self.format == "elalora" else None

    @property
    def base_model_name(self) -> str | None:
        if self.format == "elalora":
            return (self.config.get("base_model") or {}).get("name_or_path")
        return self.config.get("base_model_name_or_path")

    def check_header(self) -> None:
        """For an elalora adapter: the weights' header lists exactly the tensors the config describes, with
        their shapes (what ``inspect`` and ``plot`` read without loading the tensors)."""
        if self.format != "elalora":
            return
        header = self.header
        expected = {f"{n}.{p}": list(s) for n, i in self.modules.items() for p, s in slot_shapes(i).items()}
        for k, shp in expected.items():
            if k not in header:
                raise AdapterLoadError(f"{self.path}: tensor {k} is missing from {ADAPTER_WEIGHTS}; the adapter is "
                                       "corrupt")
            if list(header[k]["shape"]) != shp:
                raise AdapterLoadError(f"{self.path}: {k} has shape {tuple(header[k]['shape'])}, expected "
                                       f"{tuple(shp)} from {ADAPTER_CONFIG}; the adapter is corrupt or was edited")
        extra = sorted(set(header) - set(expected) - set(self.config.get("full_parameters", [])))
        if extra:
            raise AdapterLoadError(f"{self.path}: {ADAPTER_WEIGHTS} holds {len(extra)} tensor(s) that "
                                   f"{ADAPTER_CONFIG} does not list (first: {extra[0]}); a module entry is missing "
                                   "from the config")


# ------------------------------------------------------------------------------- run directories
@dataclasses.dataclass
class RunFiles:
    """What :func:`read_run_dir` read and checked (a file that is absent: ``None``; no history: ``[]``)."""

    path: Path
    config: dict | None
    metrics: dict | None
    events: list
    plan: dict | None
    adapter: AdapterDir | None


_INT_FIELDS = ("seed", "max_length", "eval_batch_size", "batch_size", "max_new_tokens", "logging_steps")


def check_run_config(cfg: Any, where: str) -> dict:
    """A run's ``config.json``: the fields ``eval``, ``export`` and ``analyze`` take from it."""
    def bad(msg):
        raise RunError(f"{where}: {msg}; the run's config.json was edited or is corrupt")

    if not isinstance(cfg, dict):
        bad(f"must be a JSON object, got {_short(cfg)}")
    for k in ("task", "model", "gguf_file", "data_dir", "train_file", "eval_file", "text_columns", "label_column",
              "pooling", "method"):
        if cfg.get(k) is not None and not isinstance(cfg[k], str):
            bad(f"{k} must be a string, got {_short(cfg[k])}")
    if cfg.get("max_eval_samples") is not None and not _is_count(cfg["max_eval_samples"], 1):
        bad(f"max_eval_samples must be an integer >= 1, got {_short(cfg['max_eval_samples'])}")
    if cfg.get("total_steps") is not None and not _is_count(cfg["total_steps"], 1):
        bad(f"total_steps must be an integer >= 1, got {_short(cfg['total_steps'])}")
    tr = cfg.get("training", {})
    if not isinstance(tr, dict):
        bad(f"training must be an object, got {_short(tr)}")
    for k in _INT_FIELDS:
        lo = 0 if k == "seed" else 1
        if tr.get(k) is not None and not _is_count(tr[k], lo):
            bad(f"training.{k} must be an integer >= {lo}, got {_short(tr[k])}")
    ts = cfg.get("task_spec", {})
    if not isinstance(ts, dict):
        bad(f"task_spec must be an object, got {_short(ts)}")
    kinds = ("classification", "regression", "generation", "image")
    if ts.get("kind") is not None and ts["kind"] not in kinds:
        bad(f"task_spec.kind must be one of {', '.join(kinds)}, got {_short(ts['kind'])}")
    if ts.get("num_labels") is not None and not _is_count(ts["num_labels"], 0):  # 0: generation tasks
        bad(f"task_spec.num_labels must be an integer >= 0, got {_short(ts['num_labels'])}")
    ln = ts.get("label_names")
    if ln is not None and (not isinstance(ln, list) or not all(isinstance(x, str) for x in ln)):
        bad(f"task_spec.label_names must be a list of strings, got {_short(ln)}")
    return cfg


def _check_metrics(met: Any, where: str, capacity: dict[str, int] | None) -> dict:
    if not isinstance(met, dict):
        raise RunError(f"{where} must be a JSON object, got {_short(met)}")
    for field in ("rank_pattern", "initial_rank_pattern"):
        if met.get(field) is not None:
            _check_pattern(met[field], where, field, capacity, error=RunError)
    if met.get("steps") is not None and not _is_count(met["steps"]):
        raise RunError(f"{where}: steps must be an integer >= 0, got {_short(met['steps'])}")
    sc = met.get("importance_scores")
    if sc is not None:
        if not isinstance(sc, dict) or not all(
                isinstance(v, list) and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)
                for v in sc.values()):
            raise RunError(f"{where}: importance_scores must be an object of module -> list of numbers")
    return met


def _check_plan(plan: Any, where: str) -> dict:
    def bad(msg):
        raise RunError(f"{where}: {msg}; the plan was edited or is corrupt")

    if not isinstance(plan, dict):
        bad(f"must be a JSON object, got {_short(plan)}")
    if plan.get("rank_pattern") is not None:
        _check_pattern(plan["rank_pattern"], where, "rank_pattern", None, error=RunError)
    ids = plan.get("intrinsic_dims")
    if ids is not None and (not isinstance(ids, list) or not all(_is_number(x) and x >= 0 for x in ids)):
        bad("intrinsic_dims must be a list of finite numbers >= 0")
    br = plan.get("block_ranks")
    if br is not None and (not isinstance(br, list) or not all(_is_count(x) for x in br)):
        bad("block_ranks must be a list of integers >= 0")
    ap = plan.get("alpha_pattern")
    if ap is not None and (not isinstance(ap, dict) or not all(_is_number(x) and x > 0 for x in ap.values())):
        bad("alpha_pattern must be an object of module -> finite number > 0")
    return plan


def _read_history(path: Path, capacity: dict[str, int] | None) -> list:
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise RunError(f"cannot read {str(path)!r}: {' '.join(str(e).split())}") from None
    events = []
    for i, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            raise RunError(f"{str(path)!r} line {i} is not valid JSON") from None
    return check_events(events, str(path), capacity, error=RunError)


def read_run_dir(run_dir: str | os.PathLike) -> RunFiles:
    """Read and check the files of a run directory (module docstring); the run's adapter (``adapter/``),
    when it is an elalora adapter, bounds every rank by its module's capacity."""
    run_dir = Path(run_dir).expanduser()
    adapter = None
    if (run_dir / "adapter" / ADAPTER_CONFIG).is_file():
        adapter = AdapterDir(run_dir / "adapter")
    capacity = adapter.capacity if adapter is not None else None

    def load(name, check):
        p = run_dir / name
        return check(read_json(p, error=RunError), str(p)) if p.is_file() else None

    cfg = load(RUN_CONFIG, check_run_config)
    met = load(METRICS, lambda m, w: _check_metrics(m, w, capacity))
    plan = load(GELORA_PLAN, _check_plan)
    hist = run_dir / RANK_HISTORY
    events = _read_history(hist, capacity) if hist.is_file() else []
    return RunFiles(run_dir, cfg, met, events, plan, adapter)


# ------------------------------------------------------------------------------ checkpoint states
_SCHEDULE_FIELDS = ("tinit", "tfinal", "delta_t", "k1", "k2", "n_rounds")


def checkpoint_identity(config) -> dict:
    """What a checkpoint state records about the run it belongs to: method, form, budget and schedule (the
    capacities are the masks' lengths)."""
    d = config.to_dict()
    return {"method": config.method, "form": config.form, "budget": getattr(config, "budget", "rank"),
            "schedule": {k: d[k] for k in _SCHEDULE_FIELDS if k in d}}


def _state_error(msg: str) -> AdapterLoadError:
    return AdapterLoadError(f"checkpoint state: {msg}")


def _check_allocator_state(state: Any, handle) -> None:
    """The allocator's values: counters are integers >= 0, ``total_steps`` an integer >= 1 or None, the budget
    values (``param_budget``, AdaLoRA's ``b0`` / ``bT``) those this model's allocator derives from its config
    (another value means another budget or model: refused naming both), birth rounds of the capacities."""
    if not isinstance(state, dict):
        raise _state_error(f"allocator must be an object, got {_short(state)}")
    own = handle.allocator.state_dict()
    unknown = set(state) - set(own)
    if unknown:
        raise _state_error(f"allocator holds {sorted(unknown)[0]!r}, which this model's {handle.config.method} "
                           f"allocator does not have (allowed: {', '.join(sorted(own))})")
    ts = state.get("total_steps")
    if ts is not None and not _is_count(ts, 1):
        raise _state_error(f"allocator.total_steps must be an integer >= 1 or null, got {_short(ts)}")
    for k in ("param_budget", "b0", "bT"):
        if k in state and state[k] != own.get(k):
            what = {"param_budget": "parameter budget", "b0": "initial budget", "bT": "target budget"}[k]
            raise _state_error(f"allocator.{k} (the {what}) is {_short(state[k])}, this model's is "
                               f"{_short(own.get(k))}: the checkpoint was saved under another budget or model; "
                               "resume with the config it was saved with")
    for k, v in state.items():
        if k in ("total_steps", "param_budget", "b0", "bT", "born"):
            continue
        if isinstance(own.get(k), list):
            if not isinstance(v, list) or not all(_is_number(x) and x >= 0 for x in v):
                raise _state_error(f"allocator.{k} must be a list of numbers >= 0")
        elif isinstance(own.get(k), float):
            if not _is_number(v) or v < 0:
                raise _state_error(f"allocator.{k} must be a finite number >= 0, got {_short(v)}")
        elif v is not None and not _is_count(v):
            raise _state_error(f"allocator.{k} must be an integer >= 0, got {_short(v)}")
    born = state.get("born")
    if born is not None:
        caps = [a.capacity for a in handle.adapters]
        if (not isinstance(born, list) or [len(b) if isinstance(b, list) else -1 for b in born] != caps
                or not all(_is_count(x, -(2 ** 62)) for b in born for x in b)):
            raise _state_error("allocator.born (the birth rounds) must hold one list of integers per module, of its "
                               "capacity")


def check_handle_state(state: Any, handle) -> None:
    """Raise :class:`AdapterLoadError` if ``state`` (:meth:`AdaptiveModel.state_dict`) cannot be loaded into
    ``handle``; changes nothing. A checkpoint that records method, form, budget and schedule must match the
    handle's (message naming both sides); an older one without them must be consistent with it (masks of
    the capacities, the allocator's budget values)."""
    need = {"names", "masks", "step_count", "events", "allocator"}
    if not isinstance(state, dict) or not need <= set(state):
        raise _state_error("not an elalora handle state (missing names/masks/step_count/events/allocator)")
    fv = state.get("format_version", 1)
    if not _is_count(fv, 1) or fv > 1:
        raise _state_error(f"format {_short(fv)} is newer than this elalora reads (1); upgrade elalora")
    mine = checkpoint_identity(handle.config)
    if state.get("method") != mine["method"]:
        raise _state_error(f"saved for method {_short(state.get('method'))}, this model uses {mine['method']!r}; "
                           "resume with the method it was saved with")
    for k in ("form", "budget", "schedule"):
        if k in state and state[k] != mine[k]:
            raise _state_error(f"saved with {k} {_short(state[k])}, this model has {k} {mine[k]!r}; resume with the "
                               f"{k} it was saved with")
    names = state["names"]
    if not isinstance(names, list) or names != handle.names:
        other = set(names) if isinstance(names, list) else set()
        raise _state_error(f"adapts different modules than this model: {sorted(other ^ set(handle.names))[:5]}")
    masks = state["masks"]
    if not isinstance(masks, dict):
        raise _state_error("masks must be an object of module -> boolean tensor")
    caps = state.get("capacities")
    for n, a in zip(handle.names, handle.adapters):
        m = masks.get(n)
        if not torch.is_tensor(m) or m.dim() != 1 or m.numel() != a.capacity:
            got = "none" if not torch.is_tensor(m) else m.numel()
            raise _state_error(f"{n}: saved capacity {got}, this model's capacity {a.capacity}")
        if m.dtype != torch.bool:
            raise _state_error(f"{n}: the active mask must be a boolean tensor, got {m.dtype}")
        if isinstance(caps, dict) and caps.get(n) != a.capacity:
            raise _state_error(f"{n}: saved capacity {_short(caps.get(n))}, this model's capacity {a.capacity}")
    capacity = dict(zip(handle.names, (a.capacity for a in handle.adapters)))
    if not _is_count(state["step_count"]):
        raise _state_error(f"step_count must be an integer >= 0, got {_short(state['step_count'])}")
    check_events(state["events"], "checkpoint state", capacity)
    _check_pattern(state.get("initial_rank_pattern", {}), "checkpoint state", "initial_rank_pattern", capacity)
    _check_allocator_state(state["allocator"], handle)
    imp = state.get("importance")
    if imp is not None:
        if handle.importance is None or not isinstance(imp, dict):
            raise _state_error("holds importance scores, which this model's method does not keep")
        for k in ("num_updates", "num_skipped"):
            if k in imp and not _is_count(imp[k]):
                raise _state_error(f"importance.{k} must be an integer >= 0, got {_short(imp[k])}")
        sens, unc = imp.get("sens"), imp.get("unc")
        if (sens is None) != (unc is None):
            raise _state_error("importance holds sensitivities without uncertainties (or the reverse)")
        if sens is not None:
            own = handle.importance._params
            for what, ts in (("sens", sens), ("unc", unc)):
                if not isinstance(ts, list) or len(ts) != len(own):
                    raise _state_error(f"importance.{what} must hold {len(own)} tensors (one per adapter parameter)")
                for t, p in zip(ts, own):
                    if not torch.is_tensor(t) or t.shape != p.shape or not bool(torch.isfinite(t).all()):
                        raise _state_error(f"importance.{what}: every tensor must be finite and of its parameter's "
                                           f"shape {tuple(p.shape)}")


def check_optimizer_state(optimizer, state: dict, path) -> None:
    """The checks ``Optimizer.load_state_dict`` makes, done before anything else is loaded."""
    groups = state.get("param_groups") if isinstance(state, dict) else None
    if not isinstance(groups, list) or len(groups) != len(optimizer.param_groups):
        raise AdapterLoadError(f"checkpoint {path}: the optimizer has {len(optimizer.param_groups)} parameter groups, "
                               f"the checkpoint {len(groups) if isinstance(groups, list) else 'none'}; build the same "
                               "optimizer as when it was saved")
    for i, (g, mine) in enumerate(zip(groups, optimizer.param_groups)):
        if len(g.get("params", [])) != len(mine["params"]):
            raise AdapterLoadError(f"checkpoint {path}: optimizer group {i} has {len(mine['params'])} parameters, "
                                   f"the checkpoint {len(g.get('params', []))}; build the same optimizer as when it "
                                   "was saved")


# ------------------------------------------------------------------------------------- configs
def check_config(config) -> None:
    """Run a config's checks again (``get_model``): a field set after construction (``config.budget = "foo"``)
    fails like it would have in the constructor. Raises :class:`~elalora.errors.ConfigError`."""
    if not dataclasses.is_dataclass(config) or not hasattr(config, "method"):
        raise ConfigError(f"config must be an elalora method config (ElaLoRAConfig, AdaLoRAConfig, ALoRAConfig), "
                          f"got {type(config).__name__}")
    kw = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.init}
    try:
        type(config)(**kw)
    except ElaLoRAError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"invalid {type(config).__name__}: {' '.join(str(e).split())}") from None


def check_peft_fingerprint(model: nn.Module, adir: AdapterDir) -> None:
    """A PEFT adapter exported by elalora records the base weights it was trained on: check them."""
    fp = adir.metadata.get("elalora_base_fingerprint")
    if not fp:
        return
    try:
        fp = json.loads(fp)
    except ValueError:
        return
    if isinstance(fp, dict):
        check_base_model_weights(model, fp, source=f" ({adir.base_model_name})")


# ------------------------------------------------------------------------------------ head description
def read_head_info(folder: str | os.PathLike) -> dict | None:
    """The checked ``HEAD_CONFIG`` of an adapter or export folder (``None`` when there is none, e.g. older
    saves): a JSON object whose ``pooling`` is ``"cls"`` or ``"mean"`` (or absent)."""
    p = Path(folder) / HEAD_CONFIG
    if not p.is_file():
        return None
    info = read_json(p, error=AdapterLoadError)
    if not isinstance(info, dict) or info.get("pooling") not in (None, "cls", "mean"):
        raise AdapterLoadError(f"{str(p)!r} is not a head description (pooling must be 'cls' or 'mean', "
                               f"got {_short(info.get('pooling') if isinstance(info, dict) else info)})")
    return info
