"""Record sources: JSON-lines and Parquet files (or globs), and Hugging Face streaming datasets.

What it is: sources whose documents are records turned into text by a `field` or a `format`
string ("Q: {question}\\nA: {answer}"). A record missing a key is skipped and counted; a source
where *every* record fails is an error naming the keys it does have. JSONL is indexed by line
offsets; Parquet is read in record batches (sequential reads stream 1,024 rows at a time; a
shuffled read holds one row group's text columns); `hf` streams with `datasets`, imported lazily.
What it is not: folders of text/PDF or the registry (`pdt.data.sources`), and never a download
that the user did not configure.
"""

from __future__ import annotations

import glob
import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np

from pdt.data.documents import DocRef, Document, Source, format_fields, record_text

_PARQUET_BATCH = 1024  # rows per streamed record batch: small enough for long texts, big enough for speed
_HF_PROBE = 1000  # records checked when opening a stream before concluding none has the field


def _resolve_files(source: Source, suffix: str) -> tuple[list[Path], Path]:
    """(sorted files, root the ids are relative to) for a path, a glob or a folder."""
    pattern = str(Path(source.cfg.path).expanduser())
    if glob.has_magic(pattern):
        files = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
        if not files:
            raise source.fail(f"no files match {pattern!r}")
        parts = Path(pattern).parts
        fixed = next(i for i, part in enumerate(parts) if glob.has_magic(part))
        return files, Path(*parts[:fixed]) if fixed else Path(".")
    path = Path(pattern)
    if path.is_dir():
        files = sorted(p for p in path.rglob(f"*{suffix}") if p.is_file())
        if not files:
            raise source.fail(f"no *{suffix} files under {path.resolve()}")
        return files, path
    if not path.is_file():
        raise source.fail(f"file not found: {path.resolve()}")
    return [path], path.parent


def _rel(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


class _RecordSource(Source):
    """Shared: text from a record, and the open-time check that at least one record converts."""

    def _text(self, record: Any) -> str | None:
        return record_text(record, self.cfg.field, self.cfg.format)

    def _check_format(self) -> None:
        if self.cfg.format is not None and not format_fields(self.cfg.format):
            raise self.fail(f'format {self.cfg.format!r} names no record field, e.g. "{{text}}"')

    def _wanted(self) -> str:
        return f"field {self.cfg.field!r}" if self.cfg.field else f"the keys of format {self.cfg.format!r}"

    def _require_one(self, records: Any) -> None:
        """Scan records until one converts (usually the first); none at all -> DataSourceError."""
        first_keys: list[str] | None = None
        seen = 0
        for record in records:
            seen += 1
            if isinstance(record, dict) and first_keys is None:
                first_keys = list(record)
            text = self._text(record)
            if text is not None and text.strip():
                return
        keys = f" (the first record has keys: {', '.join(first_keys)})" if first_keys is not None else ""
        raise self.fail(f"none of the {seen} records checked has {self._wanted()} as text{keys}")


class JsonlFile(_RecordSource):
    """One document per non-blank line; id = relative file path + ":" + record index in that file."""

    type = "jsonl"

    def open(self) -> None:
        self._check_format()
        files, root = _resolve_files(self, ".jsonl")
        self._paths: list[Path] = []
        self._names: list[str] = []
        self._offsets: list[np.ndarray] = []
        total = 0
        for path in files:
            if self.limit is not None and total >= self.limit:
                break
            offsets = self._index(path, None if self.limit is None else self.limit - total)
            self._paths.append(path)
            self._names.append(_rel(path, root))
            self._offsets.append(offsets)
            total += len(offsets)
        self._starts = np.cumsum([0] + [len(o) for o in self._offsets])
        self._cache_handles: dict[int, Any] | None = None
        if total:
            self._require_one(self._record(self.ref(i)) for i in range(total))

    def _index(self, path: Path, at_most: int | None) -> np.ndarray:
        offsets: list[int] = []
        pos = 0
        try:
            with open(path, "rb") as f:
                for line in f:
                    if line.strip():
                        offsets.append(pos)
                        if at_most is not None and len(offsets) >= at_most:
                            break
                    pos += len(line)
        except OSError as exc:
            raise self.fail(f"cannot read {path}: {exc.strerror or exc}") from exc
        return np.asarray(offsets, dtype=np.int64)

    def count(self) -> int:
        return int(self._starts[-1])

    def ref(self, i: int) -> DocRef | None:
        if i >= self._starts[-1]:
            return None
        f = int(np.searchsorted(self._starts, i, side="right")) - 1
        row = i - int(self._starts[f])
        return DocRef(f"{self._names[f]}:{row}", (f, int(self._offsets[f][row])))

    def _record(self, ref: DocRef | None) -> Any:
        assert ref is not None
        f, offset = ref.payload
        if self._cache_handles is None:
            self._cache_handles = {}
        handle = self._cache_handles.get(f)
        if handle is None:
            handle = self._cache_handles[f] = open(self._paths[f], "rb")  # kept open: one seek per document
        handle.seek(offset)
        line = handle.readline()
        try:
            return json.loads(line)
        except ValueError:
            return None

    def load(self, ref: DocRef) -> Document | None:
        try:
            record = self._record(ref)
        except OSError as exc:
            self.skip(f"{ref.id}: {exc.strerror or exc}")
            return None
        text = self._text(record) if record is not None else None
        if text is None or not text.strip():
            self.skip(f"{ref.id}: " + ("invalid JSON" if record is None else f"no {self._wanted()}"))
            return None
        return Document(ref.id, text)


class ParquetFile(_RecordSource):
    """One document per row; id = relative file path + ":" + row index in that file."""

    type = "parquet"

    def open(self) -> None:
        try:
            import pyarrow.parquet as pq
        except ImportError as exc:
            raise self.fail("reading Parquet needs pyarrow: pip install pyarrow") from exc
        self._check_format()
        files, root = _resolve_files(self, ".parquet")
        self._columns = [self.cfg.field] if self.cfg.field else format_fields(self.cfg.format)
        self._paths, self._names = files, [_rel(p, root) for p in files]
        # One row per row group: (file index, row group, first row of the group within its file, rows).
        self._groups: list[tuple[int, int, int, int]] = []
        total = 0
        for f, path in enumerate(files):
            try:
                meta = pq.ParquetFile(path).metadata
            except Exception as exc:  # noqa: BLE001 - pyarrow raises ArrowInvalid/OSError for bad files
                raise self.fail(f"cannot read {path} as Parquet ({exc})") from exc
            missing = [c for c in self._columns if c not in meta.schema.names]
            if missing:
                raise self.fail(
                    f"{path} has no column {', '.join(map(repr, missing))} "
                    f"(columns: {', '.join(meta.schema.names)})"
                )
            in_file = 0
            for g in range(meta.num_row_groups):
                rows = meta.row_group(g).num_rows
                if self.limit is not None:
                    rows = min(rows, self.limit - total)
                if rows > 0:
                    self._groups.append((f, g, in_file, rows))
                in_file += meta.row_group(g).num_rows
                total += max(rows, 0)
        self._starts = np.cumsum([0] + [g[3] for g in self._groups])
        self._cache_group: tuple[int, dict[str, list]] | None = None
        self._cache_stream: tuple[int, Any, int, dict[str, list]] | None = None
        if total:
            self._require_one(self._row(*self._locate(i)) for i in range(total))

    def count(self) -> int:
        return int(self._starts[-1])

    def groups(self) -> list[int]:
        return [g[3] for g in self._groups]

    def _locate(self, i: int) -> tuple[int, int]:
        g = int(np.searchsorted(self._starts, i, side="right")) - 1
        return g, i - int(self._starts[g])

    def ref(self, i: int) -> DocRef | None:
        if i >= self._starts[-1]:
            return None
        g, r = self._locate(i)
        f, _, first, _ = self._groups[g]
        return DocRef(f"{self._names[f]}:{first + r}", (g, r))

    def _reader(self, g: int) -> tuple[Any, int]:
        import pyarrow.parquet as pq

        f, rg, _, _ = self._groups[g]
        return pq.ParquetFile(self._paths[f]), rg

    def _row(self, g: int, r: int) -> dict[str, Any]:
        """Row r of group g: from the cached whole group, the current streamed batch, or a new read."""
        if self._cache_group is not None and self._cache_group[0] == g:
            return {c: v[r] for c, v in self._cache_group[1].items()}
        stream = self._cache_stream
        if stream is not None and stream[0] == g and stream[2] <= r:
            g, batches, start, cols = stream
            while r >= start + len(next(iter(cols.values()))):
                start += len(next(iter(cols.values())))
                cols = next(batches).to_pydict()
            self._cache_stream = (g, batches, start, cols)
            return {c: v[r - start] for c, v in cols.items()}
        reader, rg = self._reader(g)
        if r == 0:  # a sequential read entering a group: stream it in small batches
            batches = reader.iter_batches(batch_size=_PARQUET_BATCH, row_groups=[rg], columns=self._columns)
            self._cache_stream = (g, batches, 0, next(batches).to_pydict())
            return self._row(g, r)
        # a shuffled read: hold this row group's text columns until the order leaves it
        self._cache_group = (g, reader.read_row_group(rg, columns=self._columns).to_pydict())
        return self._row(g, r)

    def load(self, ref: DocRef) -> Document | None:
        try:
            record = self._row(*ref.payload)
        except Exception as exc:  # noqa: BLE001 - a damaged page/file must not stop training
            self.skip(f"{ref.id}: unreadable ({type(exc).__name__}: {str(exc)[:120]})")
            return None
        text = self._text(record)
        if text is None or not text.strip():
            self.skip(f"{ref.id}: no {self._wanted()}")
            return None
        return Document(ref.id, text)


class HFDataset(_RecordSource):
    """A Hugging Face dataset streamed in order (not indexable: never shuffled); id = name:split:row."""

    type = "hf"

    def open(self) -> None:
        self._check_format()
        self._cache_ds: Any = None
        self._cache_iter: tuple[int, Any] | None = None  # (index of the next record, iterator)
        self._dataset()
        probe = (self.ref(i) for i in range(self.capped(_HF_PROBE)))
        self._require_one(ref.payload for ref in itertools.takewhile(lambda ref: ref is not None, probe))

    def _dataset(self) -> Any:
        if self._cache_ds is not None:
            return self._cache_ds
        try:
            import datasets
        except ImportError as exc:
            raise self.fail(
                "the hf source needs the `datasets` package: pip install 'pdt-workbench[hf]'"
            ) from exc
        try:
            self._cache_ds = datasets.load_dataset(
                self.cfg.dataset, self.cfg.config, split=self.cfg.split, streaming=True
            )
        except Exception as exc:  # noqa: BLE001 - offline, unknown name, bad config: all the user's to fix
            raise self.fail(
                f"could not load dataset {self.cfg.dataset!r} (config {self.cfg.config!r}, split "
                f"{self.cfg.split!r}): {type(exc).__name__}: {str(exc)[:300]} — offline? "
                "a Hub dataset needs network or a local cache"
            ) from exc
        return self._cache_ds

    def ref(self, i: int) -> DocRef | None:
        if self.limit is not None and i >= self.limit:
            return None
        state = self._cache_iter
        if state is None or state[0] != i:  # a resume or a restart: reopen and skip ahead
            state = (i, iter(self._dataset().skip(i) if i else self._dataset()))
        try:
            record = next(state[1])
        except StopIteration:
            self._cache_iter = None
            return None
        except Exception as exc:  # noqa: BLE001 - network errors surface here, mid-stream
            raise self.fail(
                f"dataset {self.cfg.dataset!r} failed while streaming record {i}: "
                f"{type(exc).__name__}: {str(exc)[:300]}"
            ) from exc
        self._cache_iter = (i + 1, state[1])
        return DocRef(f"{self.cfg.dataset}:{self.cfg.split}:{i}", record)

    def load(self, ref: DocRef) -> Document | None:
        text = self._text(ref.payload)
        if text is None or not text.strip():
            self.skip(f"{ref.id}: no {self._wanted()}")
            return None
        return Document(ref.id, text)
