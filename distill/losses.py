"""The three distillation losses of Jasper (arXiv 2412.19048, section 2) and their weighted sum.

Every loss takes raw student vectors ``[B, d_s]`` and teacher vectors ``[B, d_t]``, L2-normalises
both rows-wise (``s``, ``t`` below) and returns a scalar tensor. Half-precision inputs are computed
in float32.

- ``L_cosine = mean_x (1 - s_x . t_x)``
- ``L_sim    = MSE(s sᵀ, t tᵀ)`` over the full B x B matrices
- ``L_resim  = (1/N) Σ_{pairs (i,j), (m,n) with t_i.t_j > t_m.t_n} max(0, s_m.s_n - s_i.s_j + margin)``,
  pairs being the P = B(B-1)/2 in-batch pairs i < j and N = P(P-1)/2
- ``L = 10 L_cosine + 200 L_sim + 20 L_resim``
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

RESIM_MARGIN = 0.015
# Up to ~1,000 pairs (B <= 45) the P x P form is the faster one (`python -m benchmarks.resim`:
# half the blocked time at B = 32, even at B = 45, 3x slower at B = 64) and small (4 MiB a matrix).
_DENSE_MAX_PAIRS = 1024


@dataclass(frozen=True)
class LossWeights:
    """Weights of the paper's combination ``L = 10 L_cosine + 200 L_sim + 20 L_resim``."""

    cosine: float = 10.0
    similarity: float = 200.0
    relative_similarity: float = 20.0

    def combine(
        self, cosine: torch.Tensor, similarity: torch.Tensor, relative_similarity: torch.Tensor
    ) -> torch.Tensor:
        """The weighted sum of the three loss values."""
        return (
            self.cosine * cosine
            + self.similarity * similarity
            + self.relative_similarity * relative_similarity
        )


@dataclass(frozen=True)
class DistillationLoss:
    """The combined loss (for backward) and its three unweighted components (for logging)."""

    total: torch.Tensor
    cosine: torch.Tensor
    similarity: torch.Tensor
    relative_similarity: torch.Tensor


def cosine_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``L_cosine = mean_x (1 - s_x . t_x)``: each student vector should point where its teacher's does.

    Args:
        student: raw student vectors ``[B, d]``.
        teacher: raw teacher vectors ``[B, d]`` (same size: a cosine needs one space).

    Example::

        >>> s = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
        >>> t = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
        >>> cosine_loss(s, t)  # mean(1 - 0.7071, 1 - 1)
        tensor(0.1464)
    """
    _check_batch("cosine_loss", student, teacher, min_batch=1)
    if student.shape[1] != teacher.shape[1]:
        raise ValueError(
            f"cosine_loss compares vectors of one size, got student {student.shape[1]}-d and teacher "
            f"{teacher.shape[1]}-d: use the head whose size matches the teacher's (FC1 for the "
            "concatenated target), or similarity_loss / relative_similarity_loss, which accept any sizes."
        )
    s, t = _unit(student), _unit(teacher)
    return (1.0 - (s * t).sum(dim=1)).mean()


def similarity_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``L_sim = MSE(s sᵀ, t tᵀ)``: the student's in-batch similarity matrix should equal the teacher's.

    The mean runs over all B x B entries (the diagonal is 1 on both sides and adds 0).

    Args:
        student: raw student vectors ``[B, d_s]``.
        teacher: raw teacher vectors ``[B, d_t]``; ``d_t`` may differ from ``d_s``.

    Example::

        >>> s = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        >>> t = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
        >>> similarity_loss(s, t)  # off-diagonal 0 vs 0.7071 twice: 2 * 0.5 / 4
        tensor(0.2500)
    """
    _check_batch("similarity_loss", student, teacher, min_batch=2)
    s, t = _unit(student), _unit(teacher)
    return F.mse_loss(s @ s.T, t @ t.T)


def relative_similarity_loss(
    student: torch.Tensor, teacher: torch.Tensor, margin: float = RESIM_MARGIN, method: str = "auto"
) -> torch.Tensor:
    """``L_resim``: pairs the teacher ranks higher should be ranked higher by the student, by ``margin``.

    With ``P = B(B-1)/2`` in-batch pairs ``i < j`` and ``N = P(P-1)/2``::

        L_resim = (1/N) Σ_{pairs p=(m,n), q=(i,j) with t_i.t_j > t_m.t_n} max(0, s_m.s_n - s_i.s_j + margin)

    Pairs of pairs with equal teacher similarity contribute nothing. The value and its gradient are
    exact, but past ~1,000 pairs the P x P matrix of pair differences (66M entries at B = 128, 17G
    at B = 512) is never built: see :func:`_hinge_sum_over_higher_pairs`, O(P log² P) time and
    O(P) memory.

    Args:
        student: raw student vectors ``[B, d_s]``.
        teacher: raw teacher vectors ``[B, d_t]``; ``d_t`` may differ from ``d_s``. Only the order
            of its similarities matters, so no gradient flows to it.
        margin: how much higher the student must rank each teacher-higher pair (paper: 0.015).
        method: ``"blocked"`` (the O(P) memory form), ``"dense"`` (the P x P matrix) or ``"auto"``:
            dense up to 1,024 pairs, where it is faster, blocked above. Both give the same value
            and gradient.

    Example::

        >>> s = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # pairs 01, 02, 12: 0, .707, .707
        >>> t = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])  # pairs 01, 02, 12: .6, 0, .8
        >>> relative_similarity_loss(s, t)  # 12 over 02: .015; 01 over 02: .707 + .015; N = 3
        tensor(0.2457)
    """
    _check_batch("relative_similarity_loss", student, teacher, min_batch=3)
    s, t = _unit(student), _unit(teacher.detach())
    rows, cols = torch.triu_indices(len(s), len(s), offset=1, device=s.device)
    student_pairs, teacher_pairs = (s @ s.T)[rows, cols], (t @ t.T)[rows, cols]
    num_pairs = len(student_pairs)
    num_pairs_of_pairs = num_pairs * (num_pairs - 1) / 2
    if method not in ("auto", "blocked", "dense"):
        raise ValueError(f"method={method!r}: use 'auto', 'blocked' or 'dense'.")
    if method == "dense" or (method == "auto" and num_pairs <= _DENSE_MAX_PAIRS):
        hinge_sum = _dense_hinge_sum(teacher_pairs, student_pairs, margin)
    else:
        # float64 keeps the long per-block prefix sums exact enough at B = 512 (P = 130,816).
        hinge_sum = _hinge_sum_over_higher_pairs(teacher_pairs.double(), student_pairs.double(), margin)
    return (hinge_sum / num_pairs_of_pairs).to(s.dtype)


def distillation_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    weights: LossWeights = LossWeights(),
    margin: float = RESIM_MARGIN,
) -> DistillationLoss:
    """``L = 10 L_cosine + 200 L_sim + 20 L_resim`` (weights configurable), with its components.

    Example::

        >>> s, t = torch.randn(8, 16, requires_grad=True), torch.randn(8, 16)
        >>> loss = distillation_loss(s, t)
        >>> loss.total.backward()  # log loss.cosine, loss.similarity, loss.relative_similarity
    """
    cosine = cosine_loss(student, teacher)
    similarity = similarity_loss(student, teacher)
    relative_similarity = relative_similarity_loss(student, teacher, margin)
    return DistillationLoss(
        total=weights.combine(cosine, similarity, relative_similarity),
        cosine=cosine,
        similarity=similarity,
        relative_similarity=relative_similarity,
    )


def _dense_hinge_sum(teacher_pairs: torch.Tensor, student_pairs: torch.Tensor, margin: float) -> torch.Tensor:
    """The same sum as :func:`_hinge_sum_over_higher_pairs`, through the P x P matrix."""
    higher = teacher_pairs[None, :] > teacher_pairs[:, None]  # [p, q]: the teacher ranks q above p
    return (torch.relu(student_pairs[:, None] - student_pairs[None, :] + margin) * higher).sum()


def _hinge_sum_over_higher_pairs(
    teacher_pairs: torch.Tensor, student_pairs: torch.Tensor, margin: float
) -> torch.Tensor:
    """``Σ_p Σ_{q: a_q > a_p} max(0, x_p - x_q + margin)`` for teacher values ``a`` and student values ``x``.

    Sort the P pairs by teacher value, highest first. The pairs ranked strictly above pair p then
    form a prefix ``[0, k_p)`` (``k_p`` = how many are strictly higher, so ties drop out), and p's
    hinge sum is ``c (x_p + margin) - Σ x_q`` over the c pairs q of that prefix with
    ``x_q < x_p + margin``. The prefix splits into at most log2(P) aligned power-of-two blocks (one
    per set bit of ``k_p``); within each block the student values are sorted once per block width,
    so c is a binary search and Σ x_q a lookup in the block's prefix sums. Everything is plain
    differentiable indexing, so autograd yields the exact (sub)gradient: ``+c`` for x_p, ``-1`` for
    each active x_q, per term.
    """
    order = torch.argsort(teacher_pairs, descending=True, stable=True)
    teacher_sorted, student_sorted = teacher_pairs[order], student_pairs[order]
    num_pairs = len(order)
    # -teacher_sorted ascends, so a left search counts the pairs with a strictly higher teacher value.
    higher_count = torch.searchsorted(-teacher_sorted, -teacher_sorted, side="left")

    # Compare integer ranks, not floats: blocks become disjoint key ranges of one sorted array.
    student_values = student_sorted.detach()
    ranks = torch.unique(torch.cat([student_values, student_values + margin]), return_inverse=True)[1]
    value_rank, threshold_rank = ranks[:num_pairs], ranks[num_pairs:]
    rank_span = num_pairs * 2 + 1  # larger than any rank, so the padding below sorts last

    padded_size = 1 << max(num_pairs - 1, 1).bit_length()
    padding = padded_size - num_pairs
    value_rank = torch.cat([value_rank, value_rank.new_full((padding,), rank_span - 1)])
    student_padded = torch.cat([student_sorted, student_sorted.new_zeros(padding)])
    positions = torch.arange(padded_size, device=order.device)

    # Starts as 0 * x rather than a constant, so the result stays differentiable (with a zero
    # gradient) when no pair ranks above another, e.g. all teacher similarities tied.
    total = 0.0 * student_sorted.sum()
    width = 1
    while width < padded_size:
        # Blocks of this width that lie in a prefix [0, k): one per set bit, namely block k // width - 1.
        queries = (higher_count & width).nonzero().flatten()
        if len(queries):
            block_keys = ((positions // width) * rank_span + value_rank).view(-1, width)
            sorted_keys, permutation = block_keys.sort(dim=1)
            block_values = student_padded.view(-1, width).gather(1, permutation)
            prefix_sums = F.pad(block_values.cumsum(dim=1), (1, 0))  # [blocks, width + 1]

            block = higher_count[queries] // width - 1
            first_at_or_above = torch.searchsorted(
                sorted_keys.flatten(), block * rank_span + threshold_rank[queries], side="left"
            )
            active = first_at_or_above - block * width  # pairs of the block with x_q < x_p + margin
            total = total + (
                active * (student_sorted[queries] + margin) - prefix_sums[block, active]
            ).sum()
        width *= 2
    return total


def _unit(vectors: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit length, in at least float32."""
    return F.normalize(vectors.to(torch.promote_types(vectors.dtype, torch.float32)), dim=-1)


def _check_batch(loss_name: str, student: torch.Tensor, teacher: torch.Tensor, min_batch: int) -> None:
    for role, vectors in (("student", student), ("teacher", teacher)):
        if vectors.dim() != 2:
            raise ValueError(
                f"{loss_name} expects {role} vectors as a [batch, dim] matrix, got shape "
                f"{tuple(vectors.shape)}: stack one vector per text (reshape(len(texts), -1))."
            )
    if len(student) != len(teacher):
        raise ValueError(
            f"{loss_name} needs one teacher vector per student vector, got {len(student)} student and "
            f"{len(teacher)} teacher rows: pass the targets of the same texts, in the same order."
        )
    if len(student) < min_batch:
        raise ValueError(
            f"{loss_name} needs a batch of at least {min_batch} texts, got {len(student)}: increase the "
            "batch size (or drop the last, smaller batch)."
        )
