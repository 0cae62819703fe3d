"""L_resim: time and peak memory of the exact blocked form vs the naive P x P form (DESIGN §8).

Each measurement runs in a fresh process, so its peak resident memory is its own. Inputs are a
1024-d student (FC2's size) and a 12288-d teacher (the paper's target), identical for both forms;
the table also shows how far apart their loss values are.

    python -m benchmarks.resim [--batches 32 128 512] [--repeats 3] [--naive-limit-gb 8]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from distill.losses import RESIM_MARGIN, relative_similarity_loss

STUDENT_DIM, TEACHER_DIM = 1024, 12288
# The naive form holds the pair-difference, hinge, mask and product matrices plus their gradients:
# about four float32 P x P matrices at once.
NAIVE_BYTES_PER_PAIR_OF_PAIRS = 16


def naive_relative_similarity_loss(
    student: torch.Tensor, teacher: torch.Tensor, margin: float = RESIM_MARGIN
) -> torch.Tensor:
    """L_resim as written: the full P x P matrix of pair-of-pair hinges, masked by teacher order."""
    s, t = F.normalize(student, dim=1), F.normalize(teacher, dim=1)
    rows, cols = torch.triu_indices(len(s), len(s), offset=1)
    student_pairs, teacher_pairs = (s @ s.T)[rows, cols], (t @ t.T)[rows, cols]
    teacher_higher = teacher_pairs[None, :] > teacher_pairs[:, None]
    hinges = torch.relu(student_pairs[:, None] - student_pairs[None, :] + margin) * teacher_higher
    num_pairs = len(student_pairs)
    return hinges.sum() / (num_pairs * (num_pairs - 1) / 2)


FORMS = {"blocked": relative_similarity_loss, "naive": naive_relative_similarity_loss}


def measure(form: str, batch: int, repeats: int) -> dict:
    """Median forward+backward seconds, peak memory growth and the loss value, in this process."""
    loss_fn = FORMS[form]

    def run(size: int, seed: int) -> tuple[float, float]:
        generator = torch.Generator().manual_seed(seed)
        student = torch.randn(size, STUDENT_DIM, generator=generator).requires_grad_(True)
        teacher = torch.randn(size, TEACHER_DIM, generator=generator)
        start = time.perf_counter()
        loss = loss_fn(student, teacher)
        loss.backward()
        return time.perf_counter() - start, loss.item()

    run(8, seed=1)  # one-time costs (thread pools, kernel selection) stay out of the figures
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    runs = [run(batch, seed=0) for _ in range(repeats)]
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "seconds": statistics.median(seconds for seconds, _ in runs),
        "peak_bytes": (rss_after - rss_before) * 1024,  # ru_maxrss is in KiB on Linux
        "loss": runs[0][1],
    }


def measure_in_subprocess(form: str, batch: int, repeats: int) -> dict:
    command = [sys.executable, "-m", "benchmarks.resim", "--measure", form, str(batch), "--repeats", str(repeats)]
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def naive_estimate_bytes(batch: int) -> int:
    num_pairs = batch * (batch - 1) // 2
    return num_pairs * num_pairs * NAIVE_BYTES_PER_PAIR_OF_PAIRS


def mebibytes(size: float) -> str:
    return f"{size / 2**20:,.1f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[32, 128, 512], help="batch sizes B to time")
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement; the median time is shown")
    parser.add_argument(
        "--naive-limit-gb", type=float, default=8.0, help="skip the naive form where it would need more memory"
    )
    parser.add_argument("--measure", nargs=2, metavar=("FORM", "B"), help=argparse.SUPPRESS)  # child process
    args = parser.parse_args(argv)

    if args.measure:
        form, batch = args.measure
        print(json.dumps(measure(form, int(batch), args.repeats)))
        return

    print(
        f"L_resim forward+backward, student {STUDENT_DIM}-d, teacher {TEACHER_DIM}-d, "
        f"float32, {torch.get_num_threads()} threads, median of {args.repeats}"
    )
    print(
        f"{'B':>5} {'P':>8} {'blocked s':>10} {'blocked MiB':>12} {'naive s':>9} {'naive MiB':>10} "
        f"{'time ratio':>11} {'memory ratio':>13} {'|Δ loss|':>9}"
    )
    skipped = []
    for batch in args.batches:
        blocked = measure_in_subprocess("blocked", batch, args.repeats)
        num_pairs = batch * (batch - 1) // 2
        row = f"{batch:>5} {num_pairs:>8,} {blocked['seconds']:>10.3f} {mebibytes(blocked['peak_bytes']):>12}"
        estimate = naive_estimate_bytes(batch)
        if estimate > args.naive_limit_gb * 1e9:
            skipped.append(f"B={batch}: the naive form needs ~{estimate / 1e9:,.0f} GB (> {args.naive_limit_gb:g} GB)")
            print(f"{row} {'skipped':>9} {'':>10} {'':>11} {'':>13} {'':>9}")
            continue
        naive = measure_in_subprocess("naive", batch, args.repeats)
        print(
            f"{row} {naive['seconds']:>9.3f} {mebibytes(naive['peak_bytes']):>10} "
            f"{naive['seconds'] / blocked['seconds']:>10.1f}x "
            f"{naive['peak_bytes'] / max(blocked['peak_bytes'], 1):>12.1f}x "
            f"{abs(naive['loss'] - blocked['loss']):>9.1e}"
        )
    for line in skipped:
        print("skipped:", line)
    print("ratios are naive / blocked; MiB is the growth of peak resident memory during the runs")


if __name__ == "__main__":
    main()
