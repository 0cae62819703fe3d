"""The heads initialised from least-squares fits instead of at random (`fc1_init: lstsq`).

Every head is an affine map of the mean-pooled state, and in stage 1 the encoder is frozen, so on
a sample of the store's rows (texts x, targets t) the affine map closest to the targets in squared
error has a closed form::

    [W; b] = argmin || [P, 1] [W; b] - T ||^2 + ridge * ||W||^2,   P = pooled states (n x h)

solved in float64 (the ridge term, scaled by the mean of diag(PᵀP), only guards a rank-deficient
sample). FC1 fits the targets T themselves: F = [P, 1] [W; b]. A smaller head of d dims has no
target of its own (the paper trains it on similarities alone, in stage 3); it is FC1 projected on
the top d (uncentred) principal directions of F, F V_d. That is the affine head of d dims whose dot
products best preserve the targets': any affine head's outputs H lie in the column space of
[P, 1], where T T^T differs from F F^T only by terms H cannot reach, so the best H H^T is the best
rank-d approximation of F F^T. F has rank at most h + 1, so a head of h + 1 dims or more (the demo's
512-d one over MiniLM's 384) keeps FC1's dot products exactly. The paper's losses act on normalised
vectors, so this is a start, not their optimum; the stages train on from it. Rows were shuffled at
prepare, so the first usable rows are a random sample. The paper preset keeps the paper's random
init; the demo turns this on.

The smaller heads only start training in stage 3, and stages 1-2 move FC1 and the encoder under
them. `stage3_heads_from_fc1: true` projects FC1 again when stage 3 starts (`heads_from_fc1`, on
the pooled states of the same rows, encoded by the encoder as stage 2 left it), so each smaller head
starts from what FC1 has learnt instead of from a start the encoder has left behind.

Example::

    fit = fit_heads(model, model.encode_pooled(tokenizer, texts), targets)   # {"rows": 4096, "cosine": 0.83}
    heads_from_fc1(model, model.encode_pooled(tokenizer, texts))              # FC1 kept, FC2-FC4 from it
"""

from __future__ import annotations

import numpy as np
import torch

from distill.errors import DistillError
from distill.model import JasperStudent, head_names

FC1 = head_names(1)[0]  # the first head, the target's size


@torch.no_grad()
def fit_heads(model: JasperStudent, pooled: torch.Tensor, targets: np.ndarray, ridge: float = 1e-6) -> dict[str, float]:
    """Set FC1 to the ridge least-squares fit of `targets` [n, D] from `pooled` [n, h] (the texts'
    pooled states, `JasperStudent.encode_pooled`), and each smaller head to FC1 projected on the top
    principal directions of FC1's fitted outputs; returns the sample size and the mean cosine of
    FC1's fitted outputs with the targets."""
    design = with_bias(pooled)
    target = torch.as_tensor(targets, dtype=torch.float64)
    gram = design.T @ design
    penalty = ridge * gram.diagonal()[:-1].mean() * torch.eye(gram.shape[0], dtype=torch.float64)
    penalty[-1, -1] = 0.0  # the bias is not shrunk
    solution = torch.linalg.solve(gram + penalty, design.T @ target)  # [h + 1, D]
    fitted = set_heads(model, solution, design)
    cosine = torch.nn.functional.cosine_similarity(fitted, target, dim=1).mean().item()
    return {"rows": len(pooled), "cosine": cosine}


@torch.no_grad()
def heads_from_fc1(model: JasperStudent, pooled: torch.Tensor) -> None:
    """Keep FC1 and set each smaller head to FC1 projected on the top principal directions of FC1's
    outputs on the texts whose pooled states are `pooled` (`stage3_heads_from_fc1`: the encoder under
    FC1 has moved since the heads were last set)."""
    fc1 = model.heads[FC1]
    set_heads(model, torch.cat([fc1.weight.T, fc1.bias[None]]).double(), with_bias(pooled))


def with_bias(pooled: torch.Tensor) -> torch.Tensor:
    """[P, 1] in float64: an affine head is one matrix product with it."""
    return torch.cat([pooled.double(), torch.ones(len(pooled), 1, dtype=torch.float64)], dim=1)


def set_heads(model: JasperStudent, solution: torch.Tensor, design: torch.Tensor) -> torch.Tensor:
    """FC1 = `solution` [h + 1, D]; every smaller head = FC1 on the top principal directions of its
    outputs on `design`; returns those outputs."""
    fitted = design @ solution
    # principal directions of FC1's outputs, uncentred: dot products, not covariances, are what the
    # similarity losses compare
    directions = torch.linalg.svd(fitted, full_matrices=False).Vh  # [min(n, D), D]
    for name, head in model.heads.items():
        if name != FC1 and head.out_features > len(directions):
            raise DistillError(f"head {name} has {head.out_features} dims, but its start from FC1 read only "
                               f"{len(design)} rows: set fc1_init_rows to at least {head.out_features} (on a store "
                               "that has them), or start the heads at random (fc1_init: random, "
                               "stage3_heads_from_fc1: false).")
        weights = solution if name == FC1 else solution @ directions[:head.out_features].T
        head.weight.copy_(weights[:-1].T.to(head.weight.dtype))
        head.bias.copy_(weights[-1].to(head.bias.dtype))
    return fitted
