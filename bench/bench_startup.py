"""Time from `edgevoice serve` (no arguments) to READY=1 on the notify socket.

    .venv/bin/python -m bench.bench_startup [--runs 5]

Cold: a fresh state directory (the model is installed from its PyPI package and
verified first). Warm: the same state directory again.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from tests.support.daemon import Daemon


def time_to_ready(state: Path, tmp: Path) -> float:
    d = Daemon(tmp, env={"EDGEVOICE_STATE__DIR": str(state)})
    t0 = time.monotonic()
    d.start(wait_ready=True, timeout=120)
    elapsed = time.monotonic() - t0
    rc = d.stop()
    if rc != 0:
        sys.exit(f"daemon exited {rc}:\n{d.log()}")
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    cold, warm = [], []
    for i in range(args.runs):
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            state = root / "state"
            (root / "a").mkdir()
            (root / "b").mkdir()
            cold.append(time_to_ready(state, root / "a"))
            warm.append(time_to_ready(state, root / "b"))
        print(f"run {i + 1}: cold {cold[-1]:.2f} s, warm {warm[-1]:.2f} s", flush=True)
    print(
        f"median to READY: cold {statistics.median(cold):.2f} s, warm {statistics.median(warm):.2f} s (max {max(cold + warm):.2f} s)"
    )


if __name__ == "__main__":
    main()
