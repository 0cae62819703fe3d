"""L_resim: time and peak memory of `relative_similarity_loss` vs the naive P x P form (DESIGN §8).

Each measurement runs in a fresh process, so its peak resident memory is its own. Inputs are a
1024-d student (FC2's size) and a 12288-d teacher (the paper's target), identical for both forms.
Ours picks the dense form itself below 1,024 pairs (B <= 45), where it is the faster one.

    python -m benchmarks.resim [--batches 32 128 512] [--repeats 3] [--naive-limit-gb 8]
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.table import Row, markdown
from distill.losses import relative_similarity_loss

STUDENT_DIM, TEACHER_DIM = 1024, 12288
# The naive form holds the pair-difference, hinge, mask and product matrices plus their gradients:
# about four float32 P x P matrices at once.
NAIVE_BYTES_PER_PAIR_OF_PAIRS = 16


# The naive form is the loss's own P x P path, the formula as written: every pair-of-pair hinge,
# masked by teacher order. "ours" is what training calls (that same path below 1,024 pairs).
FORMS = {"ours": relative_similarity_loss, "naive": functools.partial(relative_similarity_loss, method="dense")}


def measure_form(form: str, batch: int, repeats: int) -> dict:
    """Median forward+backward seconds (of `repeats` runs, more while they add up to under 0.5 s),
    peak memory growth and the loss value, in this process."""
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
    rss_before = peak_resident_bytes()
    runs = [run(batch, seed=0) for _ in range(repeats)]
    rss_after = peak_resident_bytes()
    while sum(seconds for seconds, _ in runs) < 0.5:  # millisecond runs: a median of 3 is mostly noise
        runs.append(run(batch, seed=0))
    return {
        "seconds": statistics.median(seconds for seconds, _ in runs),
        "peak_bytes": rss_after - rss_before,
        "loss": runs[0][1],
    }


def peak_resident_bytes() -> int:
    """This process's peak resident memory. Not getrusage's ru_maxrss: Linux carries that across
    execve, so a child of a big process (the benchmark runner) would inherit its parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status: peak memory is measured on Linux only")


def measure_in_subprocess(form: str, batch: int, repeats: int) -> dict:
    command = [sys.executable, "-m", "benchmarks.resim", "--measure", form, str(batch), "--repeats", str(repeats)]
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def naive_estimate_bytes(batch: int) -> int:
    num_pairs = batch * (batch - 1) // 2
    return num_pairs * num_pairs * NAIVE_BYTES_PER_PAIR_OF_PAIRS


def measure_all(batches: list[int], repeats: int, naive_limit_gb: float = 8.0) -> list[Row]:
    """Time and memory rows per batch size: ours (`relative_similarity_loss`) vs the naive form."""
    rows = []
    for batch in batches:
        ours = measure_in_subprocess("ours", batch, repeats)
        naive = None
        if naive_estimate_bytes(batch) <= naive_limit_gb * 1e9:
            naive = measure_in_subprocess("naive", batch, repeats)
        against = "naive P x P form" if naive else f"naive form: needs ~{naive_estimate_bytes(batch) / 1e9:,.0f} GB"
        rows += [
            Row(f"L_resim forward+backward time, B = {batch}", ours["seconds"], "s", against,
                naive and naive["seconds"], ("≤", 1.0)),
            Row(f"L_resim peak memory, B = {batch}", ours["peak_bytes"] / 2**20, "MiB", against,
                naive and naive["peak_bytes"] / 2**20, ("≤", 0.1) if batch == 128 else None),
        ]
    return rows


def measure(quick: bool = False) -> list[Row]:
    return measure_all([32, 128] if quick else [32, 128, 512], repeats=1 if quick else 3)


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
        print(json.dumps(measure_form(form, int(batch), args.repeats)))
        return
    print(markdown(measure_all(args.batches, args.repeats, args.naive_limit_gb)))
    print(f"\nstudent {STUDENT_DIM}-d, teacher {TEACHER_DIM}-d, float32, {torch.get_num_threads()} threads, "
          f"median of {args.repeats}; MiB is the growth of peak resident memory during the runs")


if __name__ == "__main__":
    main()
