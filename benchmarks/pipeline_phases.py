"""End to end: wall time of every phase of `jasper-pipeline run` from nothing (DESIGN §8).

    python -m benchmarks.pipeline_phases [--preset demo]

Runs the preset in a fresh process into an empty folder and reports the phase times the pipeline
records in phases.json; the full runner uses `demo`, its quick mode the seconds-long `tiny`.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.table import Row, markdown


def measure(preset: str = "demo") -> list[Row]:
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "pipeline", "run", "--preset", preset, "--out", tmp],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        total = time.perf_counter() - started
        phases = json.loads((Path(tmp) / "phases.json").read_text())
    rows = [Row(f"{preset} pipeline: {phase}", seconds, "s") for phase, seconds in phases.items()]
    return rows + [Row(f"{preset} pipeline: total, process start to report", total, "s")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="demo")
    print(markdown(measure(parser.parse_args().preset)))


if __name__ == "__main__":
    main()
