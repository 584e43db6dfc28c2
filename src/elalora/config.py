"""Method configurations: one validated dataclass per method.

Every check happens in ``__post_init__`` (or in :meth:`resolve_schedule` once the total number of
optimizer steps is known), so a bad configuration fails before any training starts, with a message
that names the field and its allowed range.

Schedule knobs (``tinit``, ``tfinal``, ``delta_t``) accept either an absolute number of optimizer
steps (an ``int``) or a fraction of the run's total steps (a ``float`` in (0, 1)), so that a short run
still adjusts ranks.

Plain LoRA has no config here: ``elalora train --method lora`` trains PEFT's own LoRA.

Forms (``form="svd" | "lora"`` on ElaLoRA and AdaLoRA) are the adapter classes of
:data:`elalora.layers.ADAPTER_FORMS`; a config asks the class for its default ``lora_alpha`` and whether
it has an orthogonal regulariser, so a new form needs no change here.

Imports: :mod:`elalora.errors`, :mod:`elalora.layers` (the form registry).
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any, ClassVar

from .errors import ConfigError
from .layers import ADAPTER_FORMS

__all__ = [
    "ConfigError",
    "AdapterConfig",
    "ElaLoRAConfig",
    "AdaLoRAConfig",
    "ALoRAConfig",
    "Schedule",
    "ALoRASchedule",
    "config_from_dict",
    "CONFIG_FORMAT_VERSION",
    "FORMS",
    "BUDGETS",
]

CONFIG_FORMAT_VERSION = 1

#: The adapter forms (``form=``; the keys of :data:`elalora.layers.ADAPTER_FORMS`) and the budgets
#: (``budget=``): the config checks and the command line's ``choices`` both read these.
FORMS: tuple[str, ...] = tuple(ADAPTER_FORMS)
BUDGETS: tuple[str, ...] = ("rank", "params")


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_step_knob(name: str, v: Any, *, allow_zero: bool) -> None:
    if _is_int(v):
        _require(v >= (0 if allow_zero else 1),
                 f"{name} must be an integer number of steps >= {0 if allow_zero else 1} "
                 f"or a fraction in (0, 1) of the total steps; got {v}")
    elif isinstance(v, float):
        lo_ok = v >= 0 if allow_zero else v > 0
        rng = "[0, 1)" if allow_zero else "(0, 1)"
        _require(lo_ok and v < 1, f"{name} as a fraction of the total steps must be in {rng}; got {v}")
    else:
        raise ConfigError(f"{name} must be an int (steps) or a float fraction in (0, 1); got {v!r}")


def _to_steps(v: int | float, total: int) -> int:
    return int(v) if _is_int(v) else int(round(v * total))


@dataclass(frozen=True)
class Schedule:
    """The schedule in absolute optimizer steps (SPEC notation: T, t_i, t_f, Δt)."""

    total_steps: int
    tinit: int
    tfinal: int
    delta_t: int


@dataclass(frozen=True)
class ALoRASchedule:
    """ALoRA's schedule in absolute optimizer steps: a round after ``k1`` steps and then every ``k2`` steps,
    at most ``n_rounds`` rounds (before the ``ablation_budget`` cap), in a run of ``total_steps`` steps."""

    total_steps: int
    k1: int
    k2: int
    n_rounds: int


@dataclass
class AdapterConfig:
    """Fields common to every method.

    Args:
        r: the rank budget: the average rank per adapted matrix (ElaLoRA holds it throughout;
            AdaLoRA prunes to it; ALoRA spreads it evenly at the start).
        target_modules: which ``nn.Linear`` / ``Conv1D`` layers to adapt. A list matches exact
            module names or name suffixes (``"query"`` matches ``"...attention.self.query"``); a
            string is a regular expression that must match the whole module name (as in PEFT).
            ``None`` picks a default for known architectures.
        lora_alpha: the scale numerator; the scale ``s = lora_alpha / r_init`` is fixed for the run.
        lora_dropout: dropout on the adapter input.
        modules_to_save: modules (name suffixes) kept trainable and saved in full, e.g. a task head.
        seed: seeds every random draw of the method (initialisation, new ranks), identically on
            every process.
    """

    r: int = 8
    target_modules: list[str] | str | None = None
    lora_alpha: float | None = None
    lora_dropout: float = 0.0
    modules_to_save: list[str] | None = None
    seed: int = 0
    method: ClassVar[str] = "abstract"
    form: ClassVar[str] = "svd"  # a field (user choice) on ElaLoRA and AdaLoRA; fixed for the others

    @property
    def adapter_kind(self) -> str:
        """Deprecated alias of :attr:`form` (kept for code written before the form had one name)."""
        return self.form

    def __post_init__(self) -> None:
        _require(_is_int(self.r) and self.r >= 1, f"r must be an integer >= 1; got {self.r!r}")
        if self.lora_alpha is None:
            self.lora_alpha = float(self.default_alpha())
        _require(isinstance(self.lora_alpha, (int, float)) and 0 < self.lora_alpha < math.inf,
                 f"lora_alpha must be > 0 and finite; got {self.lora_alpha!r}")
        _require(isinstance(self.lora_dropout, (int, float)) and 0 <= self.lora_dropout < 1,
                 f"lora_dropout must be in [0, 1); got {self.lora_dropout!r}")
        tm = self.target_modules
        if isinstance(tm, str):
            try:
                re.compile(tm)
            except re.error as e:
                raise ConfigError(f"target_modules is not a valid regular expression: {e}") from None
        elif tm is not None:
            tm = list(tm)
            _require(len(tm) > 0 and all(isinstance(t, str) and t for t in tm),
                     f"target_modules must be a non-empty list of module names, a regex string, or None; got {tm!r}")
            self.target_modules = tm
        if self.modules_to_save is not None:
            self.modules_to_save = list(self.modules_to_save)
        _require(_is_int(self.seed), f"seed must be an integer; got {self.seed!r}")

    def default_alpha(self) -> float:
        """The form's default (:meth:`elalora.layers.ElasticAdapter.default_alpha`): 16 for ``svd`` (the
        authors' scripts), ``2 × initial rank`` for ``lora`` (PEFT LoRA at ``elalora train --method lora``'s
        alpha, so the scale is 2)."""
        return float(ADAPTER_FORMS[self.form].default_alpha(self.initial_rank))

    @property
    def initial_rank(self) -> int:
        """Rank every adapted matrix starts with."""
        return self.r

    @property
    def capacity(self) -> int:
        """Rank slots allocated per matrix (the maximum rank a matrix can reach)."""
        return self.r

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["method"] = self.method
        return d


@dataclass
class _ScoredConfig(AdapterConfig):
    """Shared by the methods that use sensitivity × uncertainty scores (SPEC §2).

    ``orth_reg_weight`` (γ) weighs the orthogonal regulariser ``R`` of SPEC §1 (PEFT's formula: the
    mean over tensors of ``‖QQᵀ − I‖_F`` and ``‖PᵀP − I‖_F``). It defaults to **0** (off), not to the
    authors' 0.1 or PEFT's 0.5: with the SVD-form start (``λ = 0``, ``P, Q ~ N(0, 0.02²)``) the task
    gradient on P and Q is ``∂L/∂P = s·G·Qᵀ·diag(λ)`` (``G = ∂L/∂ΔW``), exactly 0 at the start and
    ∝ λ afterwards, while R's gradient does not depend on λ and, the norm being unsquared, does not
    vanish near orthonormality (it keeps a size of about ``2γ/(2N√r)`` per rank row). Adam normalises
    each element's step, so whichever gradient is larger owns the element: at γ > 0, R's gradient owns
    P and Q, which keep their random directions while only λ fits the task, and R dominates the P/Q
    importance mass ``|w·∂L/∂w|``; its per-rank gradient shrinks like ``1/√r_m``, so it favours
    low-rank matrices and pulls the allocation back to uniform. The measurements are in
    docs/results/planted_rank.md ("Why the SVD-form methods lost"). Set γ > 0 to reproduce the papers'
    setups.
    The LoRA form has no regulariser: γ > 0 with ``form="lora"`` is an error.

    ``form``: the adapter form the allocation runs on (a key of :data:`elalora.layers.ADAPTER_FORMS`):
    ``"svd"`` is ``ΔW = P·diag(λ)·Q·s`` (the papers), ``"lora"`` is ``ΔW = B·diag(m)·A·s`` with PEFT
    LoRA's initialisation and scale (``A`` Kaiming, ``B = 0``, ``lora_alpha = 2 r``). Scores are
    ``|w·∂L/∂w|`` over the form's slot parameters either way. ElaLoRA defaults to ``"lora"`` (the evidence,
    docs/results/glue_grid.md), AdaLoRA to ``"svd"`` (PEFT's AdaLoRA, the reference it is pinned against). A saved
    config without ``form`` was written before forms existed and loads as ``"svd"``.

    ``budget``: what a round conserves. ``"rank"``: the total rank (the papers). ``"params"``: the number
    of active adapter parameters, a rank of a ``d_out × d_in`` matrix costing ``d_in + d_out`` (plus 1 for
    λ): ElaLoRA never exceeds the parameters of its uniform start (LoRA's at the same r), AdaLoRA prunes
    to the parameters of ``r`` ranks per matrix. Moving rank into the wide feed-forward matrices under
    ``"rank"`` gives more active parameters than LoRA at the same total rank.
    """

    tinit: int | float = 0.1
    tfinal: int | float = 0.2
    delta_t: int | float = 0.02
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.0  # off by default: see the class docstring (planted-rank study)
    total_steps: int | None = None
    form: str = "svd"
    budget: str = "rank"

    def __post_init__(self) -> None:
        _require(isinstance(self.form, str) and self.form in FORMS,
                 f"form must be one of {', '.join(repr(f) for f in FORMS)}; got {self.form!r}")
        super().__post_init__()
        _require(isinstance(self.budget, str) and self.budget in BUDGETS,
                 f"budget must be one of {', '.join(repr(b) for b in BUDGETS)}; got {self.budget!r}")
        _check_step_knob("tinit", self.tinit, allow_zero=True)
        _check_step_knob("tfinal", self.tfinal, allow_zero=True)
        _check_step_knob("delta_t", self.delta_t, allow_zero=False)
        for name in ("beta1", "beta2"):
            v = getattr(self, name)
            _require(isinstance(v, (int, float)) and 0 < v < 1, f"{name} must be in (0, 1); got {v!r}")
        _require(isinstance(self.orth_reg_weight, (int, float)) and 0 <= self.orth_reg_weight < math.inf,
                 f"orth_reg_weight must be >= 0 and finite; got {self.orth_reg_weight!r}")
        _require(not self.orth_reg_weight or ADAPTER_FORMS[self.form].has_orthogonality_penalty,
                 f"orth_reg_weight={self.orth_reg_weight} applies to a form with an orthogonal regulariser "
                 f"({', '.join(repr(k) for k, c in ADAPTER_FORMS.items() if c.has_orthogonality_penalty)}); "
                 f"form={self.form!r} has none: set orth_reg_weight to 0")
        if self.total_steps is not None:
            self.resolve_schedule(self.total_steps)

    def resolve_schedule(self, total_steps: int) -> Schedule:
        """Absolute steps for a run of ``total_steps`` optimizer steps; raises if impossible."""
        _require(_is_int(total_steps) and total_steps >= 1,
                 f"total_steps must be an integer >= 1; got {total_steps!r}")
        ti, tf = _to_steps(self.tinit, total_steps), _to_steps(self.tfinal, total_steps)
        dt = max(1, _to_steps(self.delta_t, total_steps))
        _require(ti + tf < total_steps,
                 f"tinit + tfinal must be < total_steps so that the adjustment phase is not empty; got "
                 f"tinit={ti} + tfinal={tf} >= total_steps={total_steps}. Lower tinit/tfinal or train longer")
        return Schedule(total_steps=total_steps, tinit=ti, tfinal=tf, delta_t=dt)


@dataclass
class ElaLoRAConfig(_ScoredConfig):
    """ElaLoRA (Chang et al. 2025, arXiv:2504.00254): prune *and* expand under a fixed total rank.

    Args:
        b: ranks moved per adjustment round at the start (decays to 0 with the cubic scheduler).
        k: how many of each matrix's weakest ranks enter the candidate pool; bounds |Δr| per round.
        min_rank: no matrix is pruned below this rank.
        max_rank: per-matrix capacity (default ``2 r``); a matrix at capacity can still shrink.
        use_scheduler: decay ``b`` with ``b_t = round(b (1 − p³))``; otherwise ``b_t = b``.
        rank_pattern: optional starting rank per module name (e.g. a GeLoRA plan); the total budget
            is then the sum of this pattern.
        form: the adapter form, default ``"lora"`` (``B·diag(m)·A``, PEFT LoRA's start and scale): the
            form that won protocol v3's rule (docs/results/glue_grid.md); ``"svd"`` is the paper's ``P·diag(λ)·Q``.
        grace_rounds: a rank grown in a round is no candidate (neither for pruning nor as its matrix's
            weakest rank in the growth criterion) for this many following rounds. A newborn rank scores
            about 0 under ``|w·∂L/∂w|`` (λ = 0 on the SVD form, B = 0 on the LoRA form), so without a
            grace period it is the first to be pruned again (docs/results/planted_rank.md, churn). Default:
            the form's (``ElasticAdapter.default_grace_rounds``), set by the planted-rank rule written in
            advance (docs/results/planted_rank.md, "The grace rule"); 0 on the SVD form, the paper's.
    """

    b: int = 4
    k: int = 2
    min_rank: int = 1
    max_rank: int | None = None
    use_scheduler: bool = True
    rank_pattern: dict[str, int] | None = None
    lora_alpha: float | None = None
    grace_rounds: int | None = None
    # The LoRA form by default: under protocol v3 it beat the SVD form by the rule written before the cells
    # ran (docs/results/glue_grid.md, "ElaLoRA's default form"); ``form="svd"`` reproduces the paper.
    form: str = "lora"
    method: ClassVar[str] = "elalora"

    @classmethod
    def derived_default(cls, field: str) -> str | None:
        """How a field whose default is ``None`` gets its value, for help texts (``elalora train --help``)."""
        if field == "grace_rounds":
            return "the form's: " + ", ".join(f"{f} {c.default_grace_rounds}" for f, c in ADAPTER_FORMS.items())
        return None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.grace_rounds is None:  # the form's default (validated form: super() checked it)
            self.grace_rounds = int(ADAPTER_FORMS[self.form].default_grace_rounds)
        _require(_is_int(self.grace_rounds) and self.grace_rounds >= 0,
                 f"grace_rounds must be an integer >= 0; got {self.grace_rounds!r}")
        _require(_is_int(self.b) and self.b >= 1, f"b (ranks moved per round) must be an integer >= 1; got {self.b!r}")
        _require(_is_int(self.k) and self.k >= 1, f"k (candidates per matrix) must be an integer >= 1; got {self.k!r}")
        _require(_is_int(self.min_rank) and 0 <= self.min_rank <= self.r,
                 f"min_rank must be an integer in [0, r={self.r}]; got {self.min_rank!r}")
        if self.max_rank is None:
            self.max_rank = 2 * self.r
        _require(_is_int(self.max_rank) and self.max_rank >= self.r,
                 f"max_rank (capacity) must be an integer >= r={self.r}; got {self.max_rank!r}")
        if self.rank_pattern is not None:
            _require(all(_is_int(v) and self.min_rank <= v <= self.max_rank for v in self.rank_pattern.values()),
                     f"rank_pattern values must be integers in [min_rank={self.min_rank}, max_rank={self.max_rank}]")

    @property
    def capacity(self) -> int:
        return int(self.max_rank)

    def check_pool(self, n_matrices: int) -> None:
        """The candidate pool must hold 2 b entries so that pruned and grown ranks are disjoint."""
        pool = n_matrices * min(self.k, self.r)
        _require(2 * self.b <= pool,
                 f"b={self.b} is too large for the candidate pool: {n_matrices} matrices "
                 f"× min(k={self.k}, r={self.r}) "
                 f"= {pool} candidates, and a round needs 2·b <= pool. Lower b to <= {pool // 2} or raise k")


@dataclass
class AdaLoRAConfig(_ScoredConfig):
    """AdaLoRA (Zhang et al. 2023, arXiv:2303.10512): prune from ``init_r`` to ``r`` (= target_r).

    ``init_r`` defaults to ``ceil(1.5 r)`` (PEFT's default is 12 → 8).
    """

    init_r: int | None = None
    lora_alpha: float | None = None
    method: ClassVar[str] = "adalora"

    def __post_init__(self) -> None:
        if self.init_r is None and _is_int(self.r):  # before the default alpha, which may depend on it
            self.init_r = int(math.ceil(1.5 * self.r))
        super().__post_init__()
        _require(_is_int(self.init_r) and self.init_r >= self.r,
                 f"init_r must be an integer >= r (target rank) = {self.r}; got {self.init_r!r}")

    @property
    def target_r(self) -> int:
        return self.r

    @property
    def initial_rank(self) -> int:
        return int(self.init_r)

    @property
    def capacity(self) -> int:
        return int(self.init_r)


@dataclass
class ALoRAConfig(AdapterConfig):
    """ALoRA / AB-LoRA (Liu et al. 2024, arXiv:2403.16187 §3.2–3.3; SPEC §5): ablation importance,
    prune ``n_a`` ranks per round and give them to the modules that lost none.

    Every adapted matrix starts at ``r`` ranks (budget ``r × N``). After ``k1`` optimizer steps, and
    then every ``k2`` steps, for at most ``n_rounds`` rounds: score every active rank by ablation on
    the held-out batch given to ``handle.allocator.set_validation_batch(batch)``, prune the ``n_a``
    lowest-scoring ones and add as many new ranks to the modules that lost none (see
    :mod:`elalora.allocation.alora`).

    Args:
        n_a: ranks pruned per round (default ``None``: one per adapted module, as in the paper).
        n_rounds: maximum number of rounds (the paper's ``N_A``; 0 = plain LoRA).
        k1: warm-up before the first round, in optimizer steps (int) or a fraction of the run (float).
            The first round runs after ``max(k1, 1)`` optimizer steps.
        k2: training between rounds, in steps (int >= 1) or a fraction of the run (float).
        val_batch_size: size of the held-out batch ``B_val`` the integrations draw for the ablations
            (the paper uses 32). The allocator itself uses whatever batch it is given.
        max_rank: per-module capacity (default ``2 r``); a module at capacity gets no new rank.
        min_rank: no module is pruned below this rank (default 1; 0 lets a module lose every rank,
            as the paper's rule allows — such a module then stays at rank 0).
        keep_budget: prune only ranks that can be given back in the same round, so the total rank
            ``r × N`` is kept (default True). ``False`` is the paper's rule, under which a round where
            every module lost a rank adds nothing back: with ``min_rank = 1`` at r = 2 the first round
            would halve the budget (:mod:`elalora.allocation.alora`, "Keep the budget").
        ablation_chunk: ablation masks evaluated per forward pass, each pass over
            ``ablation_chunk`` copies of ``B_val`` (memory vs speed).
        prefix_reuse: evaluate each mask from its adapter onwards, reusing the outputs of the modules
            run before it, cached once per round from the full and the base model (same scores to
            float rounding; about half the cost of a round on a 6-layer encoder, more saved on deeper
            models; see :mod:`elalora.allocation.alora_reuse`). ``False``: every mask runs the full
            forward pass.
        ablation_budget: cap on the rounds so that ablation does not swamp a short run. A round costs
            ``(1 + 2 R) × |B_val|`` example forward passes (``R = r × N`` ranks: the full model, and
            every rank removed / kept only; prefix reuse makes it cheaper, the cap does not count
            that); training costs ``2 × T × examples_per_step`` (forward + backward of a LoRA step
            ≈ 2 forward passes: the frozen base weights need no weight gradient). The number of
            rounds is ``min(n_rounds, max(1, ⌊ablation_budget × training / round⌋))``: at most
            ``n_rounds``, no more than the budget allows, but at least one (ALoRA with no round is
            plain LoRA). With the default 1.0 the ablations of a long run cost at most about as much
            as its training. ``None``: no cap. Needs the examples per optimizer step (per process):
            the Trainer callback sets it; in a plain loop call
            ``handle.allocator.set_step_examples(batch_size × grad_accum)``, else no cap applies.
        total_steps: the run's optimizer steps, needed to resolve fractional ``k1``/``k2`` and by the
            plain-loop ``handle.step`` (the Trainer callback sets it from ``max_steps``).

    Defaults. The paper (§4) trains ``K1 = 1`` epoch, then ``N_A = 8`` rounds ``K2 = 0.25`` epoch
    apart, on a held-out batch of 32 examples. Here ``k1 = 0.25`` and ``k2 = 0.06`` of the run (the
    paper's spacing for a run of about four epochs: 8 rounds between 25 % and 73 % of the run),
    ``n_rounds = 8``, ``val_batch_size = 32``, and ``ablation_budget = 1.0`` caps the rounds of a
    short run (e.g. 40 steps of 8 examples on MiniLM at r = 4: one round instead of eight). On a
    GPU, raise ``ablation_chunk`` (32–64: more masks per pass; memory is one no-grad pass over
    ``ablation_chunk × |B_val|`` examples) and, for the paper's schedule on any run length, set
    ``ablation_budget=None``.
    """

    n_a: int | None = None
    n_rounds: int = 8
    k1: int | float = 0.25
    k2: int | float = 0.06
    val_batch_size: int = 32
    max_rank: int | None = None
    min_rank: int = 1
    keep_budget: bool = True
    ablation_chunk: int = 8
    prefix_reuse: bool = True
    ablation_budget: float | None = 1.0
    total_steps: int | None = None
    method: ClassVar[str] = "alora"
    form: ClassVar[str] = "lora"

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(self.n_a is None or (_is_int(self.n_a) and self.n_a >= 1),
                 f"n_a must be an integer >= 1; got {self.n_a!r}")
        _require(_is_int(self.n_rounds) and self.n_rounds >= 0,
                 f"n_rounds must be an integer >= 0; got {self.n_rounds!r}")
        _check_step_knob("k1", self.k1, allow_zero=True)
        _check_step_knob("k2", self.k2, allow_zero=False)
        _require(_is_int(self.val_batch_size) and self.val_batch_size >= 1,
                 f"val_batch_size must be an integer >= 1; got {self.val_batch_size!r}")
        _require(_is_int(self.ablation_chunk) and self.ablation_chunk >= 1,
                 f"ablation_chunk must be an integer >= 1; got {self.ablation_chunk!r}")
        _require(isinstance(self.prefix_reuse, bool), f"prefix_reuse must be True or False; got {self.prefix_reuse!r}")
        _require(isinstance(self.keep_budget, bool), f"keep_budget must be True or False; got {self.keep_budget!r}")
        _require(self.ablation_budget is None
                 or (isinstance(self.ablation_budget, (int, float)) and not isinstance(self.ablation_budget, bool)
                     and self.ablation_budget > 0),
                 f"ablation_budget must be a number > 0 or None (no cap); got {self.ablation_budget!r}")
        if self.max_rank is None:
            self.max_rank = 2 * self.r
        _require(_is_int(self.max_rank) and self.max_rank >= self.r,
                 f"max_rank (capacity) must be an integer >= r={self.r}; got {self.max_rank!r}")
        _require(_is_int(self.min_rank) and 0 <= self.min_rank <= self.r,
                 f"min_rank must be an integer in [0, r={self.r}]; got {self.min_rank!r}")
        if self.total_steps is not None:
            self.resolve_schedule(self.total_steps)

    @property
    def capacity(self) -> int:
        return int(self.max_rank)

    def resolve_schedule(self, total_steps: int) -> ALoRASchedule:
        """``K1`` and ``K2`` in optimizer steps for a run of ``total_steps`` steps (``K1 >= 1``, ``K2 >= 1``).

        Raises if ``n_rounds > 0`` and the first round would fall after the end of the run.
        """
        _require(_is_int(total_steps) and total_steps >= 1,
                 f"total_steps must be an integer >= 1; got {total_steps!r}")
        k1 = max(1, _to_steps(self.k1, total_steps))
        k2 = max(1, _to_steps(self.k2, total_steps))
        _require(self.n_rounds == 0 or k1 <= total_steps,
                 f"k1={self.k1!r} puts the first ALoRA round after {k1} steps, past the end of the run "
                 f"(total_steps={total_steps}); lower k1 or train longer")
        return ALoRASchedule(total_steps=int(total_steps), k1=int(k1), k2=int(k2), n_rounds=int(self.n_rounds))


_CONFIGS = {c.method: c for c in (ElaLoRAConfig, AdaLoRAConfig, ALoRAConfig)}


def config_from_dict(d: dict) -> AdapterConfig:
    """Rebuild a config saved with :meth:`AdapterConfig.to_dict`."""
    d = dict(d)
    method = d.pop("method", None)
    if method not in _CONFIGS:
        raise ConfigError(f"unknown method {method!r} in saved config; known: {sorted(_CONFIGS)}")
    cls = _CONFIGS[method]
    names = {f.name for f in dataclasses.fields(cls)}
    if "form" in names and "form" not in d:
        d["form"] = "svd"  # saved before forms existed: every adapter then was the SVD form
    unknown = set(d) - names
    if unknown:
        raise ConfigError(f"saved {method} config has unknown fields {sorted(unknown)}; "
                          "was it written by a newer elalora?")
    return cls(**d)
