"""The document model shared by every source: `Document`, `DocRef`, `Source`, `DataSourceError`.

What it is: the small contract a source fulfils — a deterministic natural order of documents,
`count()` where known, cheap `ref(i)` (the document's stable id plus whatever is needed to read
it) and `load(ref)` (the text, or None when that one document is unreadable: skipped and
counted) — plus helpers for turning records into text and for user-facing labels.
What it is not: any concrete source (`pdt.data.sources`, `pdt.data.records`), mixing, splitting
or sharding (`pdt.data.mixing`).

Why ids are separate from text: every shard walks the same global document order but reads the
text of only its own documents, and the train/validation split is a hash of the id alone.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Any

MAX_WARNINGS = 20  # per source; beyond that skips are only counted (a 1M-record file can't flood a log)


class DataSourceError(Exception):
    """A data source cannot be read; the message names the source and what to do about it."""


@dataclass(frozen=True, slots=True)
class Document:
    """One training document: `id` is stable and unique within its source."""

    id: str
    text: str


@dataclass(frozen=True, slots=True)
class DocRef:
    """A document before its text is read: its id and a source-specific payload."""

    id: str
    payload: Any = None


class _Blank(dict):
    """format_map mapping where a missing field formats as the empty string."""

    def __missing__(self, key: str) -> str:
        return ""


def format_lenient(fmt: str, fields: dict[str, Any]) -> str:
    """`fmt` over `fields`; missing fields become "" (used for the wiki corpus's optional fields)."""
    return fmt.format_map(_Blank(fields))


def format_fields(fmt: str) -> list[str]:
    """The top-level field names a format string reads ("{a}-{b[0]}" -> ["a", "b"])."""
    names: list[str] = []
    for _, name, _, _ in string.Formatter().parse(fmt):
        if name:
            root = name.split(".", 1)[0].split("[", 1)[0]
            if root and root not in names:
                names.append(root)
    return names


def record_text(record: Any, field: str | None, fmt: str | None) -> str | None:
    """A record's text via `field` or `format`; None when a key is missing, null or not text."""
    if not isinstance(record, dict):
        return None
    if field is not None:
        value = record.get(field)
        if value is None or isinstance(value, dict | list):
            return None
        return value if isinstance(value, str) else str(value)
    assert fmt is not None
    try:
        if any(record.get(name) is None for name in format_fields(fmt)):
            return None
        return fmt.format(**record)
    except (KeyError, IndexError, AttributeError, ValueError, TypeError):
        return None


class Source:
    """Base class of a document source. Subclasses set `type` and implement the four methods.

    `open()` raises DataSourceError for a user mistake (missing path, bad field); `ref(i)` is the
    i-th document of the natural order (None past the end); `load(ref)` returns the Document or
    None (skipped, counted in `skipped`, with a capped list of `warnings`).
    """

    type = "source"

    def __init__(self, cfg: Any, index: int) -> None:
        self.cfg = cfg
        self.index = index
        self.weight = float(getattr(cfg, "weight", 1.0))
        self.limit: int | None = getattr(cfg, "limit", None)
        self.skipped = 0
        self.warnings: list[str] = []

    # ----------------------------------------------------------------- the contract
    def open(self) -> None:
        """Check the source exists and build its index. Raises DataSourceError."""

    def count(self) -> int | None:
        """Number of documents in the natural order, or None when unknown (streaming)."""
        return None

    def ref(self, i: int) -> DocRef | None:
        raise NotImplementedError

    def load(self, ref: DocRef) -> Document | None:
        raise NotImplementedError

    def groups(self) -> list[int] | None:
        """Sizes of consecutive runs that are cheap to read together (Parquet row groups); shuffling
        permutes runs and rows within a run so a shard never jumps between runs row by row."""
        return None

    # ----------------------------------------------------------------- shared helpers
    @property
    def label(self) -> str:
        """How messages name this source: `source 1 (text_dir 'notes/')`."""
        what = (
            getattr(self.cfg, "path", None)
            or getattr(self.cfg, "dataset", None)
            or getattr(self.cfg, "lang", "")
        )
        return f"source {self.index} ({self.type} {what!r})" if what else f"source {self.index} ({self.type})"

    def fail(self, why: str) -> DataSourceError:
        return DataSourceError(f"{self.label}: {why}")

    def skip(self, why: str) -> None:
        """Count one unreadable document; keep the first few reasons for the caller to show."""
        self.skipped += 1
        if len(self.warnings) < MAX_WARNINGS:
            self.warnings.append(f"{self.label}: skipped {why}")
        elif len(self.warnings) == MAX_WARNINGS:
            self.warnings.append(f"{self.label}: further skipped documents are counted, not listed")

    def capped(self, n: int) -> int:
        """`n` documents after honouring `limit`."""
        return n if self.limit is None else min(n, self.limit)

    def reset_caches(self) -> None:
        """Forget open files and stream readers (attributes named `_cache*`); they reopen lazily.
        A forked worker must: an inherited file descriptor shares its read offset with the parent."""
        for key in self.__dict__:
            if key.startswith("_cache"):
                self.__dict__[key] = None

    def __getstate__(self) -> dict[str, Any]:
        return {k: (None if k.startswith("_cache") else v) for k, v in self.__dict__.items()}
