"""What a training run is asked to do: :class:`RunSpec`, and where each of its defaults comes from.

Every default is written once. A field of :class:`RunSpec` either carries its own default (data,
model, training and output knobs) or is a *method knob* whose ``None`` means "the method config's
default": :data:`METHOD_KNOBS` names, per method, the config field it sets (``--b`` is
``ElaLoRAConfig.b``), so the CLI reads its defaults and its help from here and from the configs
(:func:`knob_default`), and a knob given for a method it does not apply to is an error that names the
methods it applies to (:func:`inapplicable_knobs`). The learning rate follows the evidence per
adapter form (:data:`DEFAULT_LR`). The data fields of a run travel together as its
:attr:`RunSpec.data` (:class:`~elalora.tasks.DataSpec`).

Imports: :mod:`elalora.config` (the method configs), :mod:`elalora.tasks` (:class:`~elalora.tasks.DataSpec`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..config import AdaLoRAConfig, ALoRAConfig, ElaLoRAConfig
from ..tasks import DataSpec

__all__ = ["RunSpec", "METHODS", "METHOD_CONFIGS", "METHOD_KNOBS", "DEFAULT_LR", "PEFT_METHODS", "knob_default",
           "inapplicable_knobs", "spec_default"]

#: The methods of ``elalora train`` (``lora`` and ``gelora`` train PEFT's own LoRA).
METHODS = ("lora", "adalora", "elalora", "alora", "gelora", "gelora-elalora")
PEFT_METHODS = ("lora", "gelora")  # trained as PEFT's own LoRA (plain LoRA has this one path)
#: The elalora config class of each adaptive method.
METHOD_CONFIGS = {"elalora": ElaLoRAConfig, "gelora-elalora": ElaLoRAConfig, "adalora": AdaLoRAConfig,
                  "alora": ALoRAConfig}

_SCORED = ("elalora", "gelora-elalora", "adalora")
_ELA = ("elalora", "gelora-elalora")
#: RunSpec field -> {method: config field}. ``None`` in RunSpec leaves the config's default.
METHOD_KNOBS: dict[str, dict[str, str]] = {
    "form": {m: "form" for m in _SCORED},
    "budget": {m: "budget" for m in _SCORED},
    "b": {m: "b" for m in _ELA},
    "k": {m: "k" for m in _ELA},
    "grace_rounds": {m: "grace_rounds" for m in _ELA},
    "tinit": {m: "tinit" for m in _SCORED},
    "tfinal": {m: "tfinal" for m in _SCORED},
    "delta_t": {m: "delta_t" for m in _SCORED},
    "beta1": {m: "beta1" for m in _SCORED},
    "beta2": {m: "beta2" for m in _SCORED},
    "orth_reg_weight": {m: "orth_reg_weight" for m in _SCORED},
    "init_r": {"adalora": "init_r"},
    "max_rank": {**{m: "max_rank" for m in _ELA}, "alora": "max_rank"},
    "min_rank": {**{m: "min_rank" for m in _ELA}, "alora": "min_rank"},
    "alora_rounds": {"alora": "n_rounds"},
    "alora_k1": {"alora": "k1"},
    "alora_k2": {"alora": "k2"},
    "alora_val_size": {"alora": "val_batch_size"},
    "alora_budget": {"alora": "ablation_budget"},
    "alora_chunk": {"alora": "ablation_chunk"},
    "alora_keep_budget": {"alora": "keep_budget"},
}
#: Knobs of the run (not of a config) that apply to some methods only; None = not given.
RUN_KNOBS: dict[str, tuple[str, ...]] = {
    "gelora_samples": ("gelora", "gelora-elalora"),
    "gelora_pooling": ("gelora", "gelora-elalora"),
    "gelora_alpha_scale": ("gelora",),
    "lora_alpha": ("lora", "adalora", "elalora", "alora", "gelora-elalora"),  # gelora: alphas from the plan
}
#: The peak learning rate per adapter form when ``lr`` is not given: chosen by ``benchmarks/lr_select.py``
#: on a split of the GLUE *training* sets (PEFT LoRA for the LoRA form, PEFT AdaLoRA for the SVD form; the
#: dev sets never read; benchmarks/results/lr_select.jsonl, docs/results.md §1): 1e-3 and 3e-3 on every task.
DEFAULT_LR = {"lora": 1e-3, "svd": 3e-3}
#: ``alora_budget`` value meaning "no cap" (``ALoRAConfig.ablation_budget=None``).
NO_CAP = "none"


@dataclass
class RunSpec:
    """Everything a training run is asked to do (the ``elalora train`` flags, whose defaults are these).

    Method knobs (:data:`METHOD_KNOBS`, plus ``lora_alpha``) default to ``None``: the method config's own
    default. ``lr=None`` is :data:`DEFAULT_LR` of the method's adapter form.
    """

    task: str
    data_dir: str | None = None
    train_file: str | None = None
    eval_file: str | None = None
    text_columns: str | None = None
    label_column: str | None = None
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    max_length: int | None = None
    model: str | None = None
    gguf_file: str | None = None
    method: str = "elalora"
    r: int = 8
    target_modules: list[str] | str | None = None
    lora_alpha: float | None = None
    lora_dropout: float = 0.0
    modules_to_save: list[str] | None = None  # trained in full besides the adapters; None: the task head
    # "auto": the checkpoint's sentence-transformers pooling (modules.json + 1_Pooling/config.json), else the
    # model's own head; "cls": the model's own head; "mean": the masked mean of the last hidden states (elalora.heads)
    pooling: str = "auto"
    form: str | None = None
    budget: str | None = None
    b: int | None = None
    k: int | None = None
    grace_rounds: int | None = None
    tinit: int | float | None = None
    tfinal: int | float | None = None
    delta_t: int | float | None = None
    beta1: float | None = None
    beta2: float | None = None
    orth_reg_weight: float | None = None
    init_r: int | None = None
    max_rank: int | None = None
    min_rank: int | None = None
    alora_rounds: int | None = None
    alora_k1: int | float | None = None
    alora_k2: int | float | None = None
    alora_val_size: int | None = None
    alora_budget: float | str | None = None  # NO_CAP ("none"): no cap
    alora_chunk: int | None = None
    alora_keep_budget: bool | None = None
    gelora_samples: int | None = None
    gelora_pooling: str | None = None
    gelora_alpha_scale: float | None = None
    epochs: float = 3.0
    max_steps: int | None = None
    batch_size: int = 32
    eval_batch_size: int | None = None
    grad_accum: int = 1
    lr: float | None = None
    warmup_ratio: float = 0.06
    weight_decay: float = 0.0
    seed: int = 42
    eval_steps: int | None = None
    logging_steps: int | None = None
    bf16: bool = False
    load_in_bits: int | None = None  # 4 or 8: a bitsandbytes-quantised base (generation tasks)
    group_by_length: bool = True
    threads: int | None = None
    max_new_tokens: int = 64
    figures: bool = True
    export_layout: str = "compact"  # peft/: "compact" (rank_pattern) or "uniform" (serving engines)

    @classmethod
    def from_namespace(cls, ns: Any) -> "RunSpec":
        """The fields of ``ns`` (e.g. parsed arguments) that name a field here."""
        return cls(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(cls) if hasattr(ns, f.name)})

    @property
    def data(self) -> DataSpec:
        """The data this run reads: its task, files, columns, sample limits and seed, as one frozen value."""
        return DataSpec.from_fields(self)

    def method_overrides(self) -> dict[str, Any]:
        """``{config field: value}`` of the method knobs given (not ``None``) for ``self.method``."""
        out = {}
        for knob, per_method in METHOD_KNOBS.items():
            v = getattr(self, knob)
            if v is not None and self.method in per_method:
                out[per_method[self.method]] = None if v == NO_CAP else v
        return out


def spec_default(name: str) -> Any:
    """The default of RunSpec field ``name``."""
    f = RunSpec.__dataclass_fields__[name]
    return f.default


def knob_default(knob: str) -> str:
    """``"ElaLoRAConfig.b = 4"``-style text naming where method knob ``knob``'s default comes from."""
    seen: dict[tuple[str, str], list[str]] = {}
    for method, field in METHOD_KNOBS[knob].items():
        cls = METHOD_CONFIGS[method]
        f = cls.__dataclass_fields__[field]
        val = f.default if f.default is not dataclasses.MISSING else "?"
        shown = repr(val) if isinstance(val, str) else str(val)
        if val is None and hasattr(cls, "derived_default"):  # a default computed from other fields
            shown = cls.derived_default(field) or shown
        names = seen.setdefault((field, shown), [])
        if cls.__name__ not in names:
            names.append(cls.__name__)
    return ", ".join(f"{'/'.join(classes)}.{field} = {val}" for (field, val), classes in seen.items())


def inapplicable_knobs(spec: RunSpec) -> list[tuple[str, tuple[str, ...]]]:
    """``(field, methods it applies to)`` of every knob given (not None) that ``spec.method`` does not take."""
    bad = []
    for knob, per_method in METHOD_KNOBS.items():
        if getattr(spec, knob) is not None and spec.method not in per_method:
            bad.append((knob, tuple(per_method)))
    for knob, methods in RUN_KNOBS.items():
        if getattr(spec, knob) is not None and spec.method not in methods:
            bad.append((knob, methods))
    return bad
