"""On-disk layout of a dataset build and the atomic writes that make every unit resumable.

What it is: where each stage writes under `$PDT_DATA_DIR/processed/<name>/` (default
`data/processed/<name>/`), canonical JSON (sorted keys, fixed separators: byte-identical reruns)
and `write_atomic` (temp file + `os.replace`: a unit's file exists only once complete, so the
file itself is the completion marker). What it is not: any stage logic.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pdt.runs import data_root


def build_root(name: str) -> Path:
    """`$PDT_DATA_DIR/processed/<name>` (default `data/processed/<name>`)."""
    return data_root() / "processed" / name


def dumps(obj: Any) -> str:
    """Canonical JSON: sorted keys, no whitespace variation, UTF-8 kept."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that `path` is either absent or complete (temp + fsync + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    """Atomically write one canonical JSON object per line."""
    write_atomic(path, "".join(dumps(r) + "\n" for r in rows).encode("utf-8"))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Read a file written by `write_jsonl`; the error names the file when it is damaged."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines if line]
    except (OSError, ValueError) as exc:
        raise OSError(f"{path} is unreadable ({exc}); delete it and run the build again") from exc


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.jsonl"
