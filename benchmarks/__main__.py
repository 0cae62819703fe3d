"""Every DESIGN §8 measurement in one run, as one table: `python -m benchmarks [--quick]`.

Each row compares ours with its baseline measured back to back on this machine (ratios; absolute
figures hold for this machine only). The table is printed and written to OUT/results.md and
OUT/results.json with the machine's description. `--quick` (CI-sized, under 2 minutes) shrinks
every workload and runs the `tiny` pipeline instead of `demo`: a smoke test, not figures to quote.
"""

import argparse
import json
import os
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from benchmarks import build_throughput, paper_models, pipeline_phases, resim, scale, store_io, train_throughput
from benchmarks.table import markdown

GROUPS = {
    "build": lambda quick: build_throughput.measure(n_texts=300 if quick else 2000),
    "store": lambda quick: store_io.measure(quick),
    "train": lambda quick: (train_throughput.measure(rows=512, steps=6, workers=1, repeats=1)
                            + train_throughput.measure_length_groups(rows=256, steps=3, repeats=1) if quick
                            else train_throughput.measure() + train_throughput.measure_length_groups()),
    "resim": lambda quick: resim.measure(quick),
    "pipeline": lambda quick: pipeline_phases.measure("tiny" if quick else "demo"),
    "paper-models": lambda quick: paper_models.measure(quick),
    "scale": lambda quick: scale.measure([5_000, 20_000] if quick else [1_000_000, 8_000_000]),
}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")]
        cpu = names[0] if names else cpu
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}, {os.cpu_count()} cores, {gpu}; Python {platform.python_version()}, torch {torch.__version__}, "
            f"{platform.system()} {platform.release()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CI-sized smoke test (< 2 min), figures not to quote")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="where results.md/.json go")
    parser.add_argument("--only", nargs="+", choices=sorted(GROUPS), help="run only these groups")
    args = parser.parse_args()
    rows, seconds = [], {}
    for name in args.only or GROUPS:
        print(f"[benchmarks] {name} ...", flush=True)
        started = time.perf_counter()
        rows += GROUPS[name](args.quick)
        seconds[name] = round(time.perf_counter() - started, 1)
        print(f"[benchmarks] {name}: {seconds[name]} s", flush=True)
    table = markdown(rows)
    description = machine()
    print(f"\n{table}\n\nmachine: {description}")
    args.out.mkdir(parents=True, exist_ok=True)
    mode = "quick" if args.quick else "full"
    (args.out / "results.md").write_text(f"{table}\n\nMachine: {description}. Mode: {mode}.\n", encoding="utf-8")
    (args.out / "results.json").write_text(json.dumps({
        "machine": description, "mode": mode, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "group_seconds": seconds, "rows": [row.to_dict() for row in rows],
    }, indent=1, ensure_ascii=False), encoding="utf-8")


if __name__ == "__main__":
    main()
