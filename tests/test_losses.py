"""The three losses against hand arithmetic and independent naive references (DESIGN §2)."""

from __future__ import annotations

import doctest
import itertools
import json
import math
import subprocess
import sys
import textwrap

import pytest
import torch

import distill.losses
from distill.losses import (
    LossWeights,
    cosine_loss,
    distillation_loss,
    relative_similarity_loss,
    similarity_loss,
)

SQRT_HALF = 1 / math.sqrt(2)


def unit_rows(vectors: torch.Tensor) -> list[torch.Tensor]:
    return [row / row.norm() for row in vectors]


def loop_cosine(student, teacher):
    s, t = unit_rows(student), unit_rows(teacher)
    return sum(1 - float(s[x] @ t[x]) for x in range(len(s))) / len(s)


def loop_similarity(student, teacher):
    s, t = unit_rows(student), unit_rows(teacher)
    size = len(s)
    return sum(float(s[i] @ s[j] - t[i] @ t[j]) ** 2 for i in range(size) for j in range(size)) / size**2


def loop_relative_similarity(student, teacher, margin):
    """The formula read literally: every unordered pair of in-batch pairs, the teacher-lower one as p."""
    s, t = unit_rows(student), unit_rows(teacher)
    pairs = list(itertools.combinations(range(len(s)), 2))
    total = 0.0
    for (i, j), (m, n) in itertools.combinations(pairs, 2):
        teacher_ij, teacher_mn = float(t[i] @ t[j]), float(t[m] @ t[n])
        if teacher_ij == teacher_mn:
            continue
        (hi, hj), (lm, ln) = ((i, j), (m, n)) if teacher_ij > teacher_mn else ((m, n), (i, j))
        total += max(0.0, float(s[lm] @ s[ln] - s[hi] @ s[hj]) + margin)
    return total / math.comb(len(pairs), 2)


def dense_relative_similarity(student, teacher, margin):
    """The naive P x P form, differentiable, for gradient checks."""
    s = torch.nn.functional.normalize(student, dim=1)
    t = torch.nn.functional.normalize(teacher, dim=1)
    rows, cols = torch.triu_indices(len(s), len(s), offset=1)
    student_pairs, teacher_pairs = (s @ s.T)[rows, cols], (t @ t.T)[rows, cols]
    higher = teacher_pairs[None, :] > teacher_pairs[:, None]  # [p, q]: q ranked above p by the teacher
    hinges = torch.relu(student_pairs[:, None] - student_pairs[None, :] + margin) * higher
    num_pairs = len(student_pairs)
    return hinges.sum() / (num_pairs * (num_pairs - 1) / 2)


def random_batch(batch, student_dim, teacher_dim, seed):
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(batch, student_dim, dtype=torch.float64, generator=generator)
    teacher = torch.randn(batch, teacher_dim, dtype=torch.float64, generator=generator)
    return student, teacher


# --- hand-computed values -------------------------------------------------------------------


def test_cosine_loss_by_hand():
    student = torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, -2.0]])  # units (.6,.8), (1,0), (0,-1)
    teacher = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 5.0]])  # units (1,0), (.707,.707), (0,1)
    # dots: 0.6, 1/sqrt(2), -1  ->  mean(1 - 0.6, 1 - 1/sqrt(2), 1 + 1)
    expected = (0.4 + (1 - SQRT_HALF) + 2.0) / 3
    assert cosine_loss(student, teacher).item() == pytest.approx(expected, abs=1e-6)


def test_similarity_loss_by_hand_across_dimensions():
    student = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0]])
    teacher = torch.eye(3)
    # s sᵀ = [[1,0,1],[0,1,0],[1,0,1]], t tᵀ = I: entries (0,2) and (2,0) differ by 1 -> 2 / 9
    assert similarity_loss(student, teacher).item() == pytest.approx(2 / 9, abs=1e-6)


def test_relative_similarity_loss_by_hand():
    student = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    teacher = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    # student pairs: (0,1) 0, (0,2) 1/sqrt2, (1,2) 1/sqrt2; teacher: (0,1) .6, (0,2) 0, (1,2) .8
    # teacher order (1,2) > (0,1) > (0,2); hinge max(0, s_lower - s_higher + .015):
    #   (1,2) over (0,1): 0 - 1/sqrt2 + .015 < 0        -> 0
    #   (1,2) over (0,2): 1/sqrt2 - 1/sqrt2 + .015      -> .015
    #   (0,1) over (0,2): 1/sqrt2 - 0 + .015            -> 1/sqrt2 + .015
    # P = 3 pairs, N = C(3, 2) = 3
    expected = (SQRT_HALF + 0.03) / 3
    assert relative_similarity_loss(student, teacher).item() == pytest.approx(expected, abs=1e-6)


def test_teacher_ties_contribute_nothing_by_hand():
    teacher = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    student = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    # teacher pairs: (0,2) and (1,3) are -1, the other four tie at 0.
    # student pairs: (0,1) 1, (2,3) 1, the rest 0.
    # Only the 4 x 2 (tied-at-0 over -1) pairs-of-pairs count; each lower pair has s = 0:
    #   over (0,1) or (2,3): 0 - 1 + .015 < 0 -> 0;  over (0,3) or (1,2): 0 - 0 + .015 -> .015
    # so 2 lower pairs x .03 = .06; P = 6, N = 15. Counting ties would add 1.015 terms.
    assert relative_similarity_loss(student, teacher).item() == pytest.approx(0.06 / 15, abs=1e-7)


def test_all_tied_teacher_gives_zero_loss_and_gradient():
    student = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    teacher = torch.eye(5, dtype=torch.float64)  # every pair's similarity is 0
    loss = relative_similarity_loss(student, teacher)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.count_nonzero(student.grad) == 0


def test_distillation_loss_weights_the_components_10_200_20():
    student, teacher = random_batch(6, 8, 8, seed=0)
    loss = distillation_loss(student, teacher)
    cosine = cosine_loss(student, teacher)
    similarity = similarity_loss(student, teacher)
    relative = relative_similarity_loss(student, teacher)
    assert (loss.cosine, loss.similarity, loss.relative_similarity) == (cosine, similarity, relative)
    assert loss.total.item() == pytest.approx(10 * cosine.item() + 200 * similarity.item() + 20 * relative.item())
    custom = distillation_loss(student, teacher, weights=LossWeights(1.0, 2.0, 3.0), margin=0.1)
    expected = cosine + 2 * similarity + 3 * relative_similarity_loss(student, teacher, margin=0.1)
    assert custom.total.item() == pytest.approx(expected.item())


def test_docstring_examples_hold():
    assert doctest.testmod(distill.losses).failed == 0


# --- independent naive references ----------------------------------------------------------


@pytest.mark.parametrize("method", ["blocked", "dense"])
@pytest.mark.parametrize("batch", [3, 4, 7])
def test_losses_match_loop_references(batch, method):
    student, teacher = random_batch(batch, 5, 9, seed=batch)
    same_size_teacher = teacher[:, :5]
    expected_cosine = loop_cosine(student, same_size_teacher)
    assert cosine_loss(student, same_size_teacher).item() == pytest.approx(expected_cosine, abs=1e-12)
    assert similarity_loss(student, teacher).item() == pytest.approx(loop_similarity(student, teacher), abs=1e-12)
    for margin in (0.015, 0.0, 0.5):
        expected = loop_relative_similarity(student, teacher, margin)
        assert relative_similarity_loss(student, teacher, margin, method).item() == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("method", ["blocked", "dense"])
def test_relative_similarity_matches_loops_with_many_teacher_ties(method):
    student, _ = random_batch(7, 4, 1, seed=3)
    # integer teacher vectors: many pairs share a similarity exactly
    teacher = torch.tensor(
        [[1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 1], [1, 0, 1], [0, 1, 1], [1, 1, 1]], dtype=torch.float64
    )
    expected = loop_relative_similarity(student, teacher, 0.015)
    assert relative_similarity_loss(student, teacher, method=method).item() == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("method", ["blocked", "dense"])
@pytest.mark.parametrize("batch", [8, 16])
def test_gradients_match_the_dense_form(batch, method):
    student, teacher = random_batch(batch, 6, 12, seed=batch)
    student.requires_grad_(True)
    teacher[:4] = teacher[0]  # identical teacher rows: ties inside the batch
    (fast,) = torch.autograd.grad(relative_similarity_loss(student, teacher, method=method), student)
    (dense,) = torch.autograd.grad(dense_relative_similarity(student, teacher, 0.015), student)
    torch.testing.assert_close(fast, dense, rtol=0, atol=1e-12)


def test_relative_similarity_value_matches_dense_form_at_batch_64():
    student, teacher = random_batch(64, 16, 32, seed=64)
    expected = dense_relative_similarity(student, teacher, 0.015)
    assert relative_similarity_loss(student, teacher).item() == pytest.approx(expected.item(), abs=1e-12)


def test_half_precision_inputs_are_computed_in_float32():
    student, teacher = random_batch(6, 8, 8, seed=1)
    for loss_fn in (cosine_loss, similarity_loss, relative_similarity_loss):
        value = loss_fn(student.to(torch.bfloat16), teacher.to(torch.float16))
        assert value.dtype == torch.float32
        assert value.item() == pytest.approx(loss_fn(student, teacher).item(), abs=2e-2)


# --- scale ----------------------------------------------------------------------------------

PEAK_MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys
    import torch
    from distill.losses import relative_similarity_loss

    def run(batch):
        student = torch.randn(batch, 256, requires_grad=True)
        relative_similarity_loss(student, torch.randn(batch, 1024)).backward()

    run(32)  # one-time allocations (thread pools, kernels) do not count
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    run(int(sys.argv[1]))
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_growth_bytes": (after - before) * 1024}))
    """
)


@pytest.mark.slow
def test_relative_similarity_memory_is_a_small_fraction_of_the_dense_form():
    batch = 128
    result = subprocess.run(
        [sys.executable, "-c", PEAK_MEMORY_SCRIPT, str(batch)], capture_output=True, text=True, check=True
    )
    peak_growth = json.loads(result.stdout.strip().splitlines()[-1])["peak_growth_bytes"]
    num_pairs = batch * (batch - 1) // 2
    # The dense form holds at least one P x P float32 matrix (264 MB here), so its peak is at least that.
    dense_lower_bound = num_pairs * num_pairs * 4
    assert peak_growth < 0.2 * dense_lower_bound


def test_relative_similarity_runs_at_batch_512():
    student = torch.randn(512, 64, requires_grad=True)
    loss = relative_similarity_loss(student, torch.randn(512, 128))
    loss.backward()
    assert torch.isfinite(loss)
    assert student.grad.shape == student.shape and torch.isfinite(student.grad).all()


# --- errors ---------------------------------------------------------------------------------


def test_cosine_loss_rejects_different_sizes_and_says_what_to_use():
    with pytest.raises(ValueError, match="similarity_loss / relative_similarity_loss"):
        cosine_loss(torch.randn(4, 8), torch.randn(4, 16))


@pytest.mark.parametrize(
    ("loss_fn", "smallest"), [(cosine_loss, 1), (similarity_loss, 2), (relative_similarity_loss, 3)]
)
def test_too_small_batches_are_rejected(loss_fn, smallest):
    loss_fn(torch.randn(smallest, 4), torch.randn(smallest, 4))
    with pytest.raises(ValueError, match=f"at least {smallest} texts"):
        loss_fn(torch.randn(smallest - 1, 4), torch.randn(smallest - 1, 4))


def test_mismatched_batches_and_shapes_are_rejected():
    with pytest.raises(ValueError, match="one teacher vector per student vector"):
        similarity_loss(torch.randn(4, 8), torch.randn(5, 8))
    with pytest.raises(ValueError, match=r"\[batch, dim\] matrix"):
        relative_similarity_loss(torch.randn(4, 2, 8), torch.randn(4, 8))


def test_an_unknown_method_is_refused():
    student, teacher = random_batch(4, 3, 3, seed=0)
    with pytest.raises(ValueError, match="'auto', 'blocked' or 'dense'"):
        relative_similarity_loss(student, teacher, method="fast")
