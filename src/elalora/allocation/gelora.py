"""GeLoRA: per-block LoRA ranks from the intrinsic dimension of the hidden representations.

Reference: Ed-dib et al., "GeLoRA: Geometric Adaptive Ranks For Efficient LoRA Fine-tuning",
arXiv:2412.09250. Intrinsic dimensions are estimated with TwoNN (Facco, d'Errico, Rodriguez &
Laio 2017, "Estimating the intrinsic dimension of datasets by a minimal neighborhood
information", Sci. Rep. 7:12140).

Procedure (SPEC §6)
-------------------
1. Run the *frozen* model (eval mode, no grad) on a sample of task inputs with
   ``output_hidden_states=True`` and keep, for every example, one vector per hidden state:
   ``H_0`` (embedding output = input of block 1) and ``H_1 … H_L`` (output of block ``i``).
2. Estimate the intrinsic dimension ``d_j`` of the point cloud ``H_j`` (N points in R^H) with
   TwoNN (:func:`twonn_dimension`)::

       μ_k = r2(k) / r1(k)                 (distances to the 1st and 2nd nearest neighbour)
       μ_(1) ≤ … ≤ μ_(N) sorted,  F(k) = k / N
       keep k = 1 … ⌊0.9 N⌋               (the largest 10 % of μ are discarded)
       −log(1 − F(k)) = d · log μ_(k)      (least squares through the origin)
       d = Σ_k log μ_(k) · (−log(1 − F(k))) / Σ_k (log μ_(k))²

   Exact duplicate points are removed first (they would give r1 = 0).
3. Rank of block ``i`` (paper's lower bound ``rank ≥ max(d_i − d_{i−1}, 0)`` plus one)::

       r_i = ⌈max(d_i − d_{i−1}, 0)⌉ + 1        i = 1 … L

   shared by every adapted matrix of block ``i``; ``α_i = 32 · r_i`` so that the effective LoRA
   scale ``α_i / r_i`` is 32 for every block. The result is a PEFT ``rank_pattern`` /
   ``alpha_pattern`` for plain LoRA (:func:`gelora_rank_pattern`).

Rounding
--------
The IDs are real numbers, the rank must be an integer. The default ``rounding="ceil"`` rounds the
*difference* ``max(d_i − d_{i−1}, 0)`` up before adding one: the paper derives
``max(d_i − d_{i−1}, 0)`` as a *lower bound* on the rank an update needs, and the only integer
rounding that never falls below a lower bound is the ceiling (a tolerance of 1e-9 keeps e.g.
3.0000000001 at 3). ``rounding="round"`` (half away from zero, not Python's banker's rounding) and
``"floor"`` are available for ablations. Only the difference is rounded, never the individual IDs,
so the rank does not depend on where the integer grid falls relative to ``d_{i−1}``.

Budget (extension)
------------------
The paper enforces no budget: the total rank is whatever the geometry gives. :func:`rescale_ranks`
(and ``plan_gelora(target_avg_rank=r)``) rescales proportionally to an exact integer total, e.g.
``r × number of adapted matrices`` to compare with LoRA at rank ``r``. Shares are
``target · r_i / Σ r``; any share below ``minimum`` is clamped to ``minimum`` and the rest is
re-shared among the others (repeated until stable); the integer parts are then completed to the
exact total by the largest-remainder (Hamilton) method, ties to the earlier entry. In
:func:`plan_gelora` the rescaling is done per adapted *matrix* (each starts from its block's rank),
so the total is exact; matrices of one block may then differ by at most one rank.

Pooling and sample size
-----------------------
* Pooling (``collect_block_states``): default ``"mean"`` = mean over the non-padding tokens
  (``attention_mask``-weighted); ``"cls"`` = first token (BERT-style encoders); ``"last"`` = last
  non-padding token (decoders, where only the last token has seen the whole input; works for left
  and right padding). With mean pooling the padding of a batch changes nothing (checked in the
  tests against unpadded single-example runs, BERT and LLaMA).
* Sample size: TwoNN only looks at two neighbours per point, so it is data-efficient, but it is
  a finite-sample estimator that is biased *low* when the number of points is small for the
  dimension (the neighbours are then not local), and the bias grows with the dimension. Measured
  with this implementation (standard Gaussian on a random d-dimensional subspace of R^64, mean
  [min, max] over 5 seeds):

  ====  ===================  ===================  ===================
  d     N = 100              N = 1000             N = 5000
  ====  ===================  ===================  ===================
  5     4.61 [4.24, 5.11]    4.88 [4.74, 5.10]    5.09 [4.86, 5.18]
  10    8.81 [8.57, 9.21]    9.52 [9.08, 9.87]    9.78 [9.58, 9.97]
  20    14.6 [11.8, 17.3]    16.5 [16.2, 17.0]    17.5 [16.8, 18.1]
  ====  ===================  ===================  ===================

  Use at least a few hundred examples (1000+ if the IDs are above ~10). GeLoRA's ranks are
  *differences* of IDs, so a bias common to all layers partly cancels, but not fully, since it
  grows with the ID. TwoNN also sees the structure at the scale of the nearest-neighbour
  distances: clustered data with few points per cluster read as very low-dimensional (on the tiny
  random BERT below, whose CLS vectors cluster by the random first token — within-cluster variance
  ≈ 2e-5 of the total — 100 examples gave IDs ≈ 0.3 and 2000 examples ≈ 9–10).
  Fewer than 3 distinct points is an error.
* Pooling changes the absolute IDs *and* the differences. Measured on the tiny random test models
  with random-token inputs, padded to random lengths (not on pretrained models): BERT (hidden 32, 3 layers), N = 2000,
  mean pooling d = [18.6, 18.7, 18.7, 18.7], CLS pooling d = [18.6, 8.6, 9.4, 10.2]; tiny LLaMA,
  N = 2000, mean d = [20.5, 18.8, 16.8], last-token d = [18.9, 9.1, 9.4]. We did not verify the
  paper-scale claim that block-to-block differences are pooling-independent, so keep the pooling
  fixed when comparing plans. With ``"cls"`` on real tokenised inputs ``H_0`` is the embedding of
  ``[CLS]`` at position 0, *the same vector for every example*, so its TwoNN dimension is undefined
  (an error is raised naming ``H_0``); ``"last"`` has the same problem when all prompts end with the
  same token. This is why the default is ``"mean"``.
* Decoders: Hugging Face applies the final norm (LLaMA's ``model.norm``, GPT-2's ``ln_f``) to the
  last entry of ``hidden_states``, so ``H_L`` there is the *normalised* output of block L; for
  encoders such as BERT every entry is a raw block output. We keep ``outputs.hidden_states`` as
  SPEC §6 prescribes; this affects only ``r_L``.
* Modules outside any numbered block (e.g. a classifier head) get the median block rank
  (``statistics.median_low``, an actual block rank, so an integer).

Imports: numpy, torch, :mod:`elalora.targets` (the block-index rule).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Mapping

import numpy as np
import torch

from ..targets import block_index as block_index_of  # the one block-index rule

__all__ = [
    "twonn_dimension",
    "collect_block_states",
    "intrinsic_dimensions",
    "gelora_block_ranks",
    "rescale_ranks",
    "block_index_of",
    "gelora_rank_pattern",
    "GeLoRAPlan",
    "plan_gelora",
    "POOLINGS",
    "ROUNDINGS",
]

POOLINGS = ("mean", "cls", "last")
ROUNDINGS = ("ceil", "round", "floor")



# --------------------------------------------------------------------------------------------
# TwoNN
# --------------------------------------------------------------------------------------------

def _as_float64_matrix(x: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        arr = x.detach().to("cpu", torch.float64).numpy()
    else:
        arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"twonn_dimension expects a 2-D array (n_points, dim); got shape {tuple(arr.shape)}")
    if not np.all(np.isfinite(arr)):
        raise ValueError("twonn_dimension: the data contain NaN or infinite values")
    return arr


def _two_nearest(x: np.ndarray, *, n_candidates: int = 4,
                 max_block_bytes: int = 1 << 27) -> tuple[np.ndarray, np.ndarray]:
    """Distances r1 ≤ r2 from every row of ``x`` (distinct rows, n ≥ 3) to its two nearest others.

    Candidates come from a blocked Gram-matrix computation in fp64 (``‖a‖² + ‖b‖² − 2 a·b``, on
    centred data); the distances to the few candidates are then recomputed exactly as ``‖a − b‖``
    and sorted, so the result does not carry the cancellation error of the Gram form.
    """
    X = torch.from_numpy(x - x.mean(axis=0, keepdims=True))
    n = X.shape[0]
    k = min(n_candidates, n - 1)
    sq = (X * X).sum(dim=1)
    rows = max(1, min(n, max_block_bytes // (8 * n), max_block_bytes // (8 * k * X.shape[1])))
    r1 = np.empty(n, dtype=np.float64)
    r2 = np.empty(n, dtype=np.float64)
    for i0 in range(0, n, rows):
        i1 = min(n, i0 + rows)
        d2 = sq[i0:i1, None] + sq[None, :] - 2.0 * (X[i0:i1] @ X.T)
        idx = torch.arange(i0, i1, device="cpu")
        d2[idx - i0, idx] = math.inf
        cand = torch.topk(d2, k, dim=1, largest=False).indices  # (b, k)
        exact = torch.linalg.vector_norm(X[i0:i1, None, :] - X[cand], dim=-1)
        exact, _ = torch.sort(exact, dim=1)
        r1[i0:i1] = exact[:, 0].numpy()
        r2[i0:i1] = exact[:, 1].numpy()
    return r1, r2


def twonn_dimension(x: torch.Tensor | np.ndarray, *, discard_fraction: float = 0.1) -> float:
    """TwoNN intrinsic dimension of a point cloud (Facco et al. 2017, Sci. Rep. 7:12140).

    For every point ``μ = r2 / r1`` (distances to its 2nd and 1st nearest neighbour). Under local
    uniformity ``μ`` is Pareto distributed, ``F(μ) = 1 − μ^(−d)``, i.e. ``−log(1 − F) = d log μ``.
    With the ``μ`` sorted and the empirical ``F(k) = k / N`` (``N`` = number of distinct points,
    counted *before* the discard), the points ``k = 1 … ⌊(1 − discard_fraction) N⌋`` are kept and
    ``d`` is the least-squares slope through the origin::

        d = Σ_k log μ_(k) · (−log(1 − k/N)) / Σ_k (log μ_(k))²

    (with ``discard_fraction = 0`` the point ``k = N``, where ``F = 1``, is left out).

    Args:
        x: ``(n_points, dim)`` tensor or array; any float dtype (the computation is fp64).
        discard_fraction: fraction of the largest ``μ`` left out of the fit (0.1 in the paper).

    Returns:
        the estimated intrinsic dimension (a positive float).

    Raises:
        ValueError: fewer than 3 distinct points, non-finite values, a bad ``discard_fraction`` or
            a degenerate configuration (every ``μ`` equal to 1, e.g. a regular lattice).
    """
    if not (isinstance(discard_fraction, (int, float)) and 0.0 <= discard_fraction < 1.0):
        raise ValueError(f"discard_fraction must be in [0, 1); got {discard_fraction!r}")
    arr = _as_float64_matrix(x)
    n_in = arr.shape[0]
    if n_in < 3:
        raise ValueError(f"TwoNN needs at least 3 points (two neighbours per point); got {n_in}")
    arr = np.unique(arr, axis=0)  # drop duplicate points: they would give r1 = 0
    n = arr.shape[0]
    if n < 3:
        raise ValueError(
            f"TwoNN needs at least 3 distinct points; got {n} distinct among {n_in} "
            "(all or nearly all points are duplicates)"
        )
    r1, r2 = _two_nearest(arr)
    mu = np.sort(r2 / r1)
    n_keep = min(int(math.floor(n * (1.0 - discard_fraction) + 1e-9)), n - 1)
    if n_keep < 1:
        raise ValueError(f"discard_fraction={discard_fraction} leaves no point to fit among {n}")
    log_mu = np.log(mu[:n_keep])
    f = np.arange(1, n_keep + 1, dtype=np.float64) / n
    y = -np.log1p(-f)
    denom = float(np.dot(log_mu, log_mu))
    if denom <= 0.0:
        raise ValueError("TwoNN is degenerate on these data: every kept ratio r2/r1 equals 1")
    return float(np.dot(log_mu, y) / denom)


# --------------------------------------------------------------------------------------------
# Hidden states
# --------------------------------------------------------------------------------------------

def _pool(h: torch.Tensor, mask: torch.Tensor | None, pooling: str) -> torch.Tensor:
    """One vector per example from ``h: (B, T, H)``; ``mask: (B, T)`` with 1 for real tokens."""
    h = h.float()
    if pooling == "cls":
        return h[:, 0]
    if mask is None:
        return h.mean(dim=1) if pooling == "mean" else h[:, -1]
    m = mask.to(device=h.device, dtype=h.dtype)
    if pooling == "mean":
        denom = m.sum(dim=1, keepdim=True)
        if torch.any(denom == 0):
            raise ValueError("mean pooling: an example has no non-padding token (attention_mask all zero)")
        return (h * m.unsqueeze(-1)).sum(dim=1) / denom
    # last non-pad token: the largest position whose mask is 1 (works for left and right padding)
    pos = torch.arange(h.shape[1], device=h.device, dtype=h.dtype)
    last = (m * (pos + 1)).argmax(dim=1)
    return h[torch.arange(h.shape[0], device=h.device), last]


@torch.no_grad()
def collect_block_states(model: torch.nn.Module, batches: Iterable[Mapping[str, Any]], *,
                         pooling: str = "mean") -> list[torch.Tensor]:
    """Pooled hidden states ``H_0 … H_L`` of a frozen model on a sample of inputs.

    Each batch (a mapping of model inputs, e.g. a tokenizer output) is moved to the model's device
    and run as ``model(**batch, output_hidden_states=True)`` in eval mode without gradients (a
    ``labels`` entry is dropped: no loss is needed). ``outputs.hidden_states`` holds ``L + 1``
    tensors ``(B, T, H)``: the embedding output (input of block 1), then each block's output. Each
    is pooled to one vector per example:

    * ``"mean"``: ``Σ_t m_t h_t / Σ_t m_t`` with ``m = batch["attention_mask"]`` (all ones if absent);
    * ``"cls"``: ``h_0`` (first token);
    * ``"last"``: ``h_t`` at the last position with ``m_t = 1`` (the last token if no mask).

    The model's train/eval mode is restored afterwards.

    Returns:
        ``L + 1`` float32 CPU tensors of shape ``(N, H)``, ``N`` the total number of examples.
    """
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}; got {pooling!r}")
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    was_training = model.training
    model.eval()
    per_layer: list[list[torch.Tensor]] | None = None
    try:
        for batch in batches:
            inputs = {k: (v.to(device) if isinstance(v, torch.Tensor) else v)
                      for k, v in batch.items() if k != "labels"}
            out = model(**inputs, output_hidden_states=True)
            hs = getattr(out, "hidden_states", None)
            if hs is None and isinstance(out, Mapping):
                hs = out.get("hidden_states")
            if hs is None:
                raise ValueError(
                    f"{type(model).__name__} returned no hidden_states with output_hidden_states=True; "
                    "GeLoRA needs a model whose output has a `hidden_states` tuple (encoder-only or decoder-only)"
                )
            mask = inputs.get("attention_mask")
            pooled = [_pool(h, mask, pooling).cpu() for h in hs]
            if per_layer is None:
                per_layer = [[p] for p in pooled]
            else:
                if len(pooled) != len(per_layer):
                    raise ValueError("the number of hidden states changed between batches")
                for acc, p in zip(per_layer, pooled):
                    acc.append(p)
    finally:
        model.train(was_training)
    if per_layer is None:
        raise ValueError("collect_block_states: `batches` is empty")
    return [torch.cat(acc, dim=0) for acc in per_layer]


def intrinsic_dimensions(states: list[torch.Tensor], **kw: Any) -> list[float]:
    """TwoNN dimension of each ``H_j`` (``kw`` is passed to :func:`twonn_dimension`).

    A failure is re-raised as ``ValueError`` naming the hidden state ``H_j``.
    """
    out: list[float] = []
    for j, s in enumerate(states):
        try:
            out.append(twonn_dimension(s, **kw))
        except ValueError as e:
            hint = ""
            if j == 0:
                hint = (" (with 'cls' or 'last' pooling the embedding output H_0 is the same vector for every "
                        "example that starts/ends with the same token, e.g. [CLS]; use pooling='mean')")
            raise ValueError(f"H_{j}: {e}{hint}") from e
    return out


# --------------------------------------------------------------------------------------------
# Ranks
# --------------------------------------------------------------------------------------------

def _round_nonneg(x: float, rounding: str) -> int:
    if rounding == "ceil":
        return int(math.ceil(x - 1e-9))
    if rounding == "round":
        return int(math.floor(x + 0.5))
    if rounding == "floor":
        return int(math.floor(x + 1e-9))
    raise ValueError(f"rounding must be one of {ROUNDINGS}; got {rounding!r}")


def gelora_block_ranks(ids: list[float], *, rounding: str = "ceil") -> list[int]:
    """GeLoRA block ranks ``r_i = rnd(max(d_i − d_{i−1}, 0)) + 1`` for ``i = 1 … L``.

    Args:
        ids: intrinsic dimensions ``d_0 … d_L`` (``d_0`` = input of block 1).
        rounding: ``"ceil"`` (default; the difference is a lower bound on the needed rank),
            ``"round"`` (half up) or ``"floor"``; applied to the difference only.

    Returns:
        ``L`` integers ``≥ 1``; ``block_ranks[i − 1]`` is the rank of block ``i`` (module index
        ``i − 1`` in names such as ``encoder.layer.{i-1}``).
    """
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}; got {rounding!r}")
    if len(ids) < 2:
        raise ValueError(f"need at least two intrinsic dimensions (d_0 and d_1); got {len(ids)}")
    if not all(math.isfinite(float(d)) for d in ids):
        raise ValueError("intrinsic dimensions must be finite numbers")
    return [_round_nonneg(max(float(b) - float(a), 0.0), rounding) + 1 for a, b in zip(ids[:-1], ids[1:])]


def rescale_ranks(ranks: list[int], target_total: int, *, minimum: int = 1) -> list[int]:
    """Rescale ranks proportionally to an exact integer total (extension; the paper has no budget).

    Shares ``q_i = T' · r_i / Σ' r`` where the sums run over entries not yet clamped and ``T'`` is
    the target minus ``minimum`` for each clamped entry; an entry whose share falls below
    ``minimum`` is clamped to ``minimum`` and the shares are recomputed until none does. The floors
    ``⌊q_i⌋`` are then completed to ``target_total`` by giving one more to the entries with the
    largest remainders ``q_i − ⌊q_i⌋`` (ties: earlier entry first).

    Returns:
        integers ``≥ minimum`` summing exactly to ``target_total``.

    Raises:
        ValueError: empty or negative ranks, all-zero ranks, or ``target_total < minimum · len(ranks)``.
    """
    n = len(ranks)
    if n == 0:
        raise ValueError("rescale_ranks: empty rank list")
    if any((not isinstance(r, (int, np.integer))) or r < 0 for r in ranks):
        raise ValueError(f"ranks must be non-negative integers; got {ranks}")
    if sum(ranks) <= 0:
        raise ValueError("ranks must not all be zero")
    if not isinstance(minimum, (int, np.integer)) or minimum < 0:
        raise ValueError(f"minimum must be a non-negative integer; got {minimum!r}")
    if not isinstance(target_total, (int, np.integer)) or target_total < minimum * n:
        raise ValueError(
            f"target_total must be an integer >= minimum · len(ranks) = {minimum} · {n} = {minimum * n}; "
            f"got {target_total!r}"
        )
    clamped = [False] * n
    shares = [0.0] * n
    while True:
        free_total = target_total - minimum * sum(clamped)
        free_sum = sum(r for r, c in zip(ranks, clamped) if not c)
        new = False
        for i in range(n):
            if clamped[i]:
                shares[i] = float(minimum)
                continue
            shares[i] = free_total * ranks[i] / free_sum if free_sum > 0 else float(minimum)
            if shares[i] < minimum:
                clamped[i] = True
                new = True
        if not new:
            break
        if all(clamped):
            shares = [float(minimum)] * n
            break
    floors = [int(math.floor(s + 1e-12)) for s in shares]
    floors = [max(f, minimum) for f in floors]
    left = target_total - sum(floors)
    order = sorted(range(n), key=lambda i: (-(shares[i] - floors[i]), i))
    out = list(floors)
    for i in order[:max(left, 0)]:
        out[i] += 1
    if sum(out) != target_total:  # cannot happen; a guard against silent budget drift
        raise RuntimeError(f"rescale_ranks produced total {sum(out)} != {target_total}")
    return out


def gelora_rank_pattern(module_names: list[str], block_ranks: list[int], *,
                        alpha_scale: float = 32.0) -> tuple[dict[str, int], dict[str, float]]:
    """PEFT ``rank_pattern`` / ``alpha_pattern`` from per-block ranks.

    ``rank[name] = block_ranks[block_index_of(name)]`` and ``alpha[name] = alpha_scale · rank``
    (effective scale ``α / r = alpha_scale``, 32 in the paper). A module outside any numbered block
    gets ``statistics.median_low(block_ranks)``.
    """
    if not block_ranks:
        raise ValueError("block_ranks is empty")
    median = int(statistics.median_low(block_ranks))
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    for name in module_names:
        b = block_index_of(name)
        if b is None:
            r = median
        elif b >= len(block_ranks):
            raise ValueError(f"module {name!r} is in block {b} but only {len(block_ranks)} block ranks were given")
        else:
            r = int(block_ranks[b])
        ranks[name] = r
        alphas[name] = float(alpha_scale) * r
    return ranks, alphas


# --------------------------------------------------------------------------------------------
# Plan
# --------------------------------------------------------------------------------------------

@dataclass
class GeLoRAPlan:
    """A GeLoRA rank plan.

    Attributes:
        intrinsic_dims: TwoNN dimensions ``d_0 … d_L``.
        block_ranks: GeLoRA ranks ``r_1 … r_L`` from the rule, *before* any rescaling.
        rank_pattern: final rank per module name (rescaled if ``target_total`` is set).
        alpha_pattern: ``alpha_scale · rank`` per module name.
        pooling: pooling used to collect the hidden states.
        n_samples: number of examples (points per hidden state, before de-duplication).
        rounding: rounding rule of the rank differences.
        target_total: total rank enforced by rescaling, or ``None`` (the paper's unbudgeted rule).
        alpha_scale: effective LoRA scale ``α / r``.
    """

    intrinsic_dims: list[float]
    block_ranks: list[int]
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    pooling: str
    n_samples: int
    rounding: str = "ceil"
    target_total: int | None = None
    alpha_scale: float = 32.0

    def to_dict(self) -> dict:
        """A JSON-serialisable dict (plain Python ints, floats, strings)."""
        d = asdict(self)
        d["intrinsic_dims"] = [float(v) for v in self.intrinsic_dims]
        d["block_ranks"] = [int(v) for v in self.block_ranks]
        d["rank_pattern"] = {str(k): int(v) for k, v in self.rank_pattern.items()}
        d["alpha_pattern"] = {str(k): float(v) for k, v in self.alpha_pattern.items()}
        d["n_samples"] = int(self.n_samples)
        d["target_total"] = None if self.target_total is None else int(self.target_total)
        d["alpha_scale"] = float(self.alpha_scale)
        return d


def plan_gelora(
    model: torch.nn.Module,
    batches: Iterable[Mapping[str, Any]],
    module_names: list[str],
    *,
    pooling: str = "mean",
    target_avg_rank: float | None = None,
    rounding: str = "ceil",
    min_rank: int = 1,
    alpha_scale: float = 32.0,
    discard_fraction: float = 0.1,
) -> GeLoRAPlan:
    """Full GeLoRA planning: hidden states → TwoNN IDs → block ranks → per-module patterns.

    Args:
        model: a Hugging Face encoder or decoder (frozen; run in eval mode without gradients).
        batches: iterable of input mappings (consumed once).
        module_names: names of the matrices to adapt (paths as in ``model.named_modules()``).
        pooling: ``"mean"``, ``"cls"`` or ``"last"`` (see :func:`collect_block_states`).
        target_avg_rank: if given, ranks are rescaled (:func:`rescale_ranks`, per matrix, starting
            from each matrix's block rank) so that the total is exactly
            ``round(target_avg_rank · len(module_names))``; otherwise the paper's unbudgeted rule.
        rounding: see :func:`gelora_block_ranks`.
        min_rank: lower bound on every module's rank (the rule itself gives ≥ 1).
        alpha_scale: ``α / r`` for every module (32 in the paper).
        discard_fraction: TwoNN tail discard (0.1 in the paper).
    """
    if not module_names:
        raise ValueError("module_names is empty: nothing to adapt")
    if not isinstance(min_rank, int) or min_rank < 1:
        raise ValueError(f"min_rank must be an integer >= 1; got {min_rank!r}")
    states = collect_block_states(model, batches, pooling=pooling)
    n_samples = int(states[0].shape[0])
    ids = intrinsic_dimensions(states, discard_fraction=discard_fraction)
    block_ranks = gelora_block_ranks(ids, rounding=rounding)
    rank_pattern, _ = gelora_rank_pattern(module_names, block_ranks, alpha_scale=alpha_scale)
    names = list(rank_pattern)
    ranks = [max(rank_pattern[n], min_rank) for n in names]
    target_total: int | None = None
    if target_avg_rank is not None:
        if not (isinstance(target_avg_rank, (int, float)) and target_avg_rank >= min_rank):
            raise ValueError(f"target_avg_rank must be a number >= min_rank={min_rank}; got {target_avg_rank!r}")
        target_total = int(math.floor(target_avg_rank * len(names) + 0.5))
        ranks = rescale_ranks(ranks, target_total, minimum=min_rank)
    rank_pattern = {n: int(r) for n, r in zip(names, ranks)}
    alpha_pattern = {n: float(alpha_scale) * r for n, r in rank_pattern.items()}
    return GeLoRAPlan(
        intrinsic_dims=[float(d) for d in ids],
        block_ranks=block_ranks,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        pooling=pooling,
        n_samples=n_samples,
        rounding=rounding,
        target_total=target_total,
        alpha_scale=float(alpha_scale),
    )
