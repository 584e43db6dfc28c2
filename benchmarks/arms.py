"""The arms every benchmark compares, as data: one table (:data:`ARMS`) read by every script and by report.py.

An *arm* is one way of training an adapter, named by the key its records carry in their ``"method"`` field
(records are never renamed, so a name keeps its meaning for good). Each :class:`Arm` says:

``name``
    the key (``ARMS[name].name == name``).
``method``
    what trains it: a :class:`elalora.recipe.RunSpec` method (``"lora"``, ``"elalora"``, ``"adalora"``,
    ``"alora"``, ``"gelora"``, ``"gelora-elalora"``: :func:`elalora.recipe.train`), or a PEFT baseline that
    benchmarks/_peft_cells.py builds around :func:`elalora.recipe.prepare` / :func:`elalora.recipe.fit`
    (``"peft-adalora"``, ``"peft-lora-eva"``), or ``"untrained"`` (the base model, scored as a run is).
``overrides``
    the fields the arm fixes, given to ``RunSpec(**...)`` or to the method's config class (``ElaLoRAConfig``,
    ``AdaLoRAConfig``; PEFT's config for the PEFT arms): ``form``, ``grace_rounds``, ``budget``,
    ``orth_reg_weight``. Everything else is the study's protocol (its lr, steps, schedule fractions, and
    knobs a protocol gives a set of arms, such as the GLUE grid's γ 0.1 for the SVD-form arms).
``label``
    how tables name it; ``study_labels`` replaces it in one study where that study's protocol changes what
    the name must say (the planted-rank study runs PEFT's defaults, the GLUE grid γ 0.1): :func:`label`.
``lr_family``
    ``"lora"`` or ``"svd"``: which of a protocol's learning rates the arm takes (``protocol["lr"][family]``;
    the LoRA-form arms take the LoRA family's, chosen on PEFT LoRA, so no method of ours picks its own).
``retired``
    ``None`` for an arm that still runs; otherwise why no cell of it runs any more (superseded, or a bug since
    fixed). Its records stay in ``benchmarks/results/`` and its rows leave the live tables
    (docs/results/history.md keeps them).

Studies name their arms by these keys: ``"glue"`` (benchmarks/accuracy.py, lr_select.py, orth_reg_check.py,
layer_contribution.py, report.py), ``"e2e"`` (generation.py), ``"planted"`` (planted_rank.py). A new benchmark
(benchmarks/llm.py) picks arm names from :data:`ARMS` and adds a study key only where it needs its own labels.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

#: The RunSpec methods with a rank schedule (t_i, t_f, Δt): the only ones that take those knobs.
SCHEDULED = frozenset({"adalora", "elalora", "gelora-elalora"})
#: What ``Arm.method`` may be besides a RunSpec method.
PEFT_RUNNERS = ("peft-adalora", "peft-lora-eva")
LR_FAMILIES = ("lora", "svd")

_GRACE_BUG = "the grace bug (its first rounds moved nothing), fixed in bf750e0: superseded by the fixed arm"


@dataclass(frozen=True)
class Arm:
    name: str
    method: str
    label: str
    lr_family: str
    overrides: Mapping[str, object] = field(default_factory=dict)
    study_labels: Mapping[str, str] = field(default_factory=dict)
    retired: str | None = None

    def __post_init__(self):
        if self.lr_family not in LR_FAMILIES:
            raise ValueError(f"arm {self.name}: lr_family must be one of {LR_FAMILIES}; got {self.lr_family!r}")
        object.__setattr__(self, "overrides", MappingProxyType(dict(self.overrides)))
        object.__setattr__(self, "study_labels", MappingProxyType(dict(self.study_labels)))

    @property
    def recipe(self) -> bool:
        """Trained by :func:`elalora.recipe.train` (``RunSpec(method=self.method, **self.overrides)``)."""
        return self.method not in PEFT_RUNNERS + ("untrained",)


def _arms(*arms: Arm) -> Mapping[str, Arm]:
    return MappingProxyType({a.name: a for a in arms})


_LORA, _SVD = {"form": "lora"}, {"form": "svd"}

ARMS: Mapping[str, Arm] = _arms(
    # ---- baselines
    Arm("peft-lora", "lora", "PEFT LoRA", "lora", study_labels={"planted": "PEFT LoRA (uniform)"}),
    # planted only: PEFT LoRA at lora_alpha 2r, the LoRA form's scale (the planted study's "peft-lora" runs PEFT's
    # own default, lora_alpha 8)
    Arm("peft-lora-2r", "lora", "PEFT LoRA, lora_alpha 2r", "lora"),
    # LLM control only: PEFT LoRA whose ranks are the planted ones (capped at 2r), the rest at r and a few at r - 1 so
    # that the total rank is uniform LoRA's: what a perfect allocation could reach (the control's headroom)
    Arm("peft-lora-oracle", "lora", "PEFT LoRA at the planted ranks (oracle), lora_alpha 2r", "lora"),
    Arm("peft-lora-eva", "peft-lora-eva", "PEFT LoRA + EVA", "lora"),
    Arm("peft-adalora", "peft-adalora", "PEFT AdaLoRA", "svd",
        study_labels={"planted": "PEFT AdaLoRA (γ = 0.5, PEFT default)"}),
    Arm("peft-adalora-noorth", "peft-adalora", "PEFT AdaLoRA, γ = 0", "svd", {"orth_reg_weight": 0.0}),
    Arm("untrained", "untrained", "untrained SmolLM2-135M", "lora"),
    # ---- ours, prune only (AdaLoRA's form is SVD unless given)
    Arm("adalora", "adalora", "AdaLoRA (ours)", "svd", study_labels={"planted": "AdaLoRA (ours, SVD form, γ = 0)"}),
    Arm("adalora-orth", "adalora", "AdaLoRA (ours), γ = 0.1", "svd", {"orth_reg_weight": 0.1}),
    Arm("adalora-lora", "adalora", "AdaLoRA, LoRA form (ours)", "lora", _LORA,
        study_labels={"planted": "AdaLoRA (ours), LoRA form"}),
    # ---- ElaLoRA, SVD form (the papers'); the SVD form's grace period is 0 rounds
    Arm("elalora", "elalora", "ElaLoRA (ours)", "svd", _SVD,
        study_labels={"planted": "ElaLoRA (ours, SVD form, γ = 0)", "e2e": "ElaLoRA (ours), SVD form, γ 0.1"}),
    Arm("elalora-orth", "elalora", "ElaLoRA (ours), γ = 0.1", "svd", {**_SVD, "orth_reg_weight": 0.1}),
    Arm("elalora-svd-g0", "elalora", "ElaLoRA (ours), SVD form, γ 0", "svd", _SVD),
    Arm("elalora-g1", "elalora", "ElaLoRA (ours, SVD form), grace 1 round", "svd", {**_SVD, "grace_rounds": 1}),
    # ---- ElaLoRA, LoRA form (the library's default form); "-g<N>": grace_rounds N (the form's default is 1)
    Arm("elalora-lora", "elalora", "ElaLoRA, LoRA form (ours)", "lora", {**_LORA, "grace_rounds": 0},
        study_labels={"planted": "ElaLoRA, LoRA form", "e2e": "ElaLoRA (ours), LoRA form"}),
    Arm("elalora-lora-params", "elalora", "ElaLoRA, LoRA form, param budget (ours)", "lora",
        {**_LORA, "budget": "params", "grace_rounds": 0}),
    Arm("elalora-lora-g1", "elalora", "ElaLoRA, LoRA form, grace 1 round (ours)", "lora", {**_LORA, "grace_rounds": 1},
        study_labels={"planted": "ElaLoRA, LoRA form, grace 1 round",
                      "e2e": "ElaLoRA (ours), LoRA form, grace 1 round"}),
    Arm("elalora-lora-g2", "elalora", "ElaLoRA, LoRA form, grace 2 rounds", "lora", {**_LORA, "grace_rounds": 2}),
    # ---- other methods
    Arm("alora", "alora", "ALoRA (ours)", "lora"),
    Arm("gelora", "gelora", "GeLoRA", "lora", study_labels={"planted": "GeLoRA (plan)"}),
    Arm("gelora-elalora", "gelora-elalora", "GeLoRA → ElaLoRA", "svd", _SVD),
    # ---- retired: records of the grace bug (grace N, and the first N rounds moved nothing)
    Arm("elalora-lora-g1-skip1", "elalora", "ElaLoRA, LoRA form, grace 1 round, first round idle (bug, ours)",
        "lora", {**_LORA, "grace_rounds": 1}, retired=_GRACE_BUG,
        study_labels={"planted": "ElaLoRA, LoRA form, grace 1 round, first round idle (bug)"}),
    Arm("elalora-g1-skip1", "elalora", "ElaLoRA (ours, SVD form), grace 1 round, first round idle (bug)", "svd",
        {**_SVD, "grace_rounds": 1}, retired=_GRACE_BUG),
    Arm("elalora-lora-g2-skip2", "elalora", "ElaLoRA, LoRA form, grace 2 rounds, first 2 rounds idle (bug)", "lora",
        {**_LORA, "grace_rounds": 2}, retired=_GRACE_BUG),
)


def arm(name: str) -> Arm:
    """The arm called ``name``; a ``KeyError`` naming the known ones otherwise."""
    try:
        return ARMS[name]
    except KeyError:
        raise KeyError(f"unknown arm {name!r}; known: {', '.join(ARMS)}") from None


def label(name: str, study: str | None = None) -> str:
    """How ``study``'s tables name the arm ``name`` (its own label there, else the arm's); an unknown name is
    shown as itself."""
    a = ARMS.get(name)
    if a is None:
        return name
    return a.study_labels.get(study, a.label) if study else a.label


def live(names) -> list[str]:
    """``names`` without the retired arms (what a live table shows)."""
    return [n for n in names if not (n in ARMS and ARMS[n].retired)]
