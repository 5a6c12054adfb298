"""Dataset build: wall time and peak RSS of the full `dataset_wiki` build (all 10,033 summaries).

Runs the real job (`python main.py` with PDT_PRESET=dataset_wiki) in a scratch folder, so nothing
is cached from an earlier build, and reads the counts from the build's own manifests. Peak RSS is
the child's maximum resident set (getrusage of the finished child). Writes
bench/results/dataset_build.json (or $OUT/...) and prints a table last.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(
            os.environ,
            PDT_PRESET="dataset_wiki",
            PDT_HEADLESS="1",
            PDT_DATA_DIR=f"{tmp}/data",
            PDT_LOGS_DIR=f"{tmp}/logs",
            PDT_CHECKPOINTS_DIR=f"{tmp}/checkpoints",
        )
        start = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, str(ROOT / "main.py")],
            env=env,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
        )
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            raise SystemExit(
                f"the build failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}"
            )
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # Linux reports KiB
        out = Path(tmp) / "data" / "processed" / "dataset_wiki"
        stats = json.loads((out / "preflight" / "stats.json").read_text())
        export = json.loads((out / "export" / "manifest.json").read_text())
        manifest = json.loads((out / "manifest.json").read_text())
    record = {
        "device": "cpu",
        "cpus": os.cpu_count(),
        "preset": "dataset_wiki",
        "wall_s": round(wall, 1),
        "peak_rss_bytes": peak,
        # documents read from the corpus; examples = rows exported for the trainer (all splits)
        "documents": stats["kept"] + sum(stats["rejected"].values()),
        "examples": sum(f["rows"] for f in export["files"].values()),
        "examples_per_split": {k: f["rows"] for k, f in export["files"].items()},
        "rejected": manifest.get("rejected"),
        "python": platform.python_version(),
    }
    out_dir = Path(os.environ.get("OUT") or ROOT / "bench" / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "dataset_build.json").write_text(json.dumps(record, indent=2))
    print(f"\n{'preset':<14} {'wall':>8} {'peak RSS':>10} {'documents':>10} {'examples':>9}")
    print(
        f"{'dataset_wiki':<14} {wall:>7.1f}s {peak / 2**30:>8.2f}GiB {record['documents']!s:>10} "
        f"{record['examples']!s:>9}"
    )


if __name__ == "__main__":
    main()
