"""Crash-safe rotating checkpoint store: `checkpoints/<preset>/{current,prev,prev2}`.

What it is: the on-disk format and its operations. `save` writes a complete folder
`ckpt-<step:08d>-<suffix>/` (`<name>.safetensors` per tensor state dict, `<name>.pt` per object,
`state.json`, then `manifest.json` with sizes and sha256; every file and folder fsynced), switches
the slot symlinks with atomic `os.replace` so a loadable `current` exists at every instant, and only
then deletes folders no slot points to. `load` verifies `current`, then `prev`, then `prev2`; a
damaged folder is renamed `damaged-<folder>-<time>` (never deleted), with a warning. Tied tensors are
stored once and restored as one tensor; objects load with `torch.load(weights_only=True)` only.

What it is not: it knows nothing of models, optimizers or the loop (callers build the state dicts),
and it is not for two processes saving into one root at once (only rank 0 saves).

Test hook (tests only): if `PDT_TEST_SAVE_HOLD` names a file, `save` creates it after the data files
and before the manifest, then waits (up to 60 s) until it is deleted, so a test can SIGKILL mid-save.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

FORMAT_VERSION = 1
SLOTS = ("current", "prev", "prev2")
HOLD_ENV = "PDT_TEST_SAVE_HOLD"
_HOLD_MAX_S = 60.0
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_CHUNK = 64 << 20  # write/hash in 64 MiB pieces: bounded syscall size, one pass over the bytes
_log = logging.getLogger(__name__)


class CheckpointError(Exception):
    """A checkpoint could not be written or read; the message says what failed and what to do."""


@dataclass
class LoadedCheckpoint:
    """A verified checkpoint folder, fully loaded."""

    path: Path
    slot: str
    state: dict
    tensors: dict[str, dict[str, torch.Tensor]]
    objects: dict[str, Any]
    warnings: list[str] = field(default_factory=list)


class _Damaged(Exception):
    """Internal: a slot failed verification; `args[0]` is the reason shown to the user."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)  # a rename is durable only once its directory is fsynced
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes) -> dict[str, Any]:
    """Write `data` to a new file and fsync it; return its manifest entry {bytes, sha256}."""
    digest = hashlib.sha256()
    view = memoryview(data)
    with open(path, "xb") as f:
        for start in range(0, len(view), _CHUNK):
            piece = view[start : start + _CHUNK]
            f.write(piece)
            digest.update(piece)
        f.flush()
        os.fsync(f.fileno())
    return {"bytes": len(data), "sha256": digest.hexdigest()}


def _os_error_message(exc: OSError, root: Path, step: int) -> str:
    where = exc.filename or root
    head = f"could not save checkpoint step {step}: {exc.strerror or exc} ({where})"
    if exc.errno == errno.ENOSPC or exc.errno == errno.EDQUOT:
        return (
            f"{head}. Free space on the filesystem holding {root} (or point PDT_CHECKPOINTS_DIR "
            f"elsewhere) and run again; the previous checkpoint is untouched."
        )
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return (
            f"{head}. Check permissions of {root} (it must be writable by this user) and run "
            f"again; the previous checkpoint is untouched."
        )
    return f"{head}. The previous checkpoint is untouched; fix the cause and run again."


def _hold_for_test() -> None:
    hold, deadline = os.environ.get(HOLD_ENV), time.monotonic() + _HOLD_MAX_S
    if hold:
        Path(hold).touch()
    while hold and os.path.exists(hold) and time.monotonic() < deadline:
        time.sleep(0.02)


def _view_key(t: torch.Tensor) -> tuple:
    return (t.data_ptr(), t.dtype, tuple(t.shape), t.stride(), t.device)


def _dedup(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Store each storage once (first name in sorted order); identical views become aliases. A tensor
    sharing storage as a different view (slice, transpose) is copied: safetensors refuses overlaps."""
    stored: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen_storage: set[tuple] = set()
    seen_view: dict[tuple, str] = {}
    for name in sorted(sd):
        t = sd[name].detach()
        shares = t.untyped_storage().nbytes() > 0 and t.device.type != "meta"
        skey = (t.untyped_storage().data_ptr(), t.device)
        if shares and _view_key(t) in seen_view:
            aliases[name] = seen_view[_view_key(t)]
            continue
        if shares and skey in seen_storage:
            stored[name] = t.to("cpu", copy=True).contiguous()
            continue
        if shares:
            seen_storage.add(skey)
            seen_view[_view_key(t)] = name
        stored[name] = t.contiguous().cpu()
    return stored, aliases


def _check_names(names: list[str]) -> None:
    for name in names:
        if not _NAME_RE.match(name):
            raise CheckpointError(
                f"checkpoint entry name {name!r} is not usable as a file name; use "
                "letters, digits, '_', '-' and '.'"
            )


# --------------------------------------------------------------------------- the store


class CheckpointManager:
    """Rotating checkpoints under `root` (= `checkpoints/<preset-name>/`)."""

    def __init__(self, root: str | Path, warn: Callable[[str], None] | None = None) -> None:
        self.root = Path(root)
        self._warn = warn or _log.warning

    # ------------------------------------------------------------------ save

    def save(
        self,
        *,
        step: int,
        tensors: dict[str, dict[str, torch.Tensor]],
        objects: dict[str, Any],
        state: dict[str, Any],
    ) -> Path:
        """Write a complete checkpoint, make it `current`, and return its real folder."""
        _check_names([*tensors, *objects])
        try:
            state_bytes = json.dumps({**state, "step": step}, indent=1).encode()
        except (TypeError, ValueError) as exc:
            raise CheckpointError(
                f"checkpoint state for step {step} is not JSON-serialisable ({exc}); "
                "put tensors in `tensors`/`objects`, not in `state`"
            ) from None
        name = f"ckpt-{step:08d}-{secrets.token_hex(4)}"
        tmp = self.root / f".tmp-{name}"
        final = self.root / name
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            tmp.mkdir()
            self._write_folder(tmp, step, tensors, objects, state_bytes)
            os.rename(tmp, final)
            _fsync_dir(self.root)
            self._rotate(name)
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if final.exists() and name not in self._targets():
                shutil.rmtree(final, ignore_errors=True)
            if isinstance(exc, OSError):
                raise CheckpointError(_os_error_message(exc, self.root, step)) from exc
            raise
        self._cleanup()
        return final

    def _write_folder(
        self,
        folder: Path,
        step: int,
        tensors: dict[str, dict[str, torch.Tensor]],
        objects: dict[str, Any],
        state_bytes: bytes,
    ) -> None:
        files: dict[str, dict[str, Any]] = {}
        aliases: dict[str, dict[str, str]] = {}
        for name in sorted(tensors):
            stored, alias = _dedup(tensors[name])
            files[f"{name}.safetensors"] = _write_file(
                folder / f"{name}.safetensors", safetensors_save(stored)
            )
            aliases[f"{name}.safetensors"] = alias
        for name in sorted(objects):
            buf = io.BytesIO()
            torch.save(objects[name], buf)
            self._check_weights_only(name, buf, step)
            files[f"{name}.pt"] = _write_file(folder / f"{name}.pt", buf.getvalue())
        files["state.json"] = _write_file(folder / "state.json", state_bytes)
        _fsync_dir(folder)  # the data files' names are durable before the manifest that vouches for them
        _hold_for_test()
        manifest = {
            "format_version": FORMAT_VERSION,
            "step": step,
            "files": files,
            "aliases": aliases,
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        _write_file(folder / "manifest.json", json.dumps(manifest, indent=1).encode())
        _fsync_dir(folder)

    @staticmethod
    def _check_weights_only(name: str, buf: io.BytesIO, step: int) -> None:
        """Refuse at save time what `torch.load(weights_only=True)` would refuse at resume time."""
        buf.seek(0)
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(buf)
        if unsafe:
            raise CheckpointError(
                f"checkpoint object {name!r} (step {step}) holds types that "
                f"torch.load(weights_only=True) refuses: {', '.join(unsafe)}; convert "
                "them to tensors, lists or plain numbers before saving"
            )

    def _rotate(self, name: str) -> None:
        """prev2 <- prev, prev <- current, current <- new, each one atomic os.replace. Links to missing
        or repeated folders are dropped, so a slot broken by a crash or a quarantine never propagates."""
        chain = [name]
        for slot in SLOTS:
            target = self._target(slot)
            if target and target not in chain and (self.root / target).is_dir():
                chain.append(target)
        chain = chain[: len(SLOTS)]
        for i in reversed(range(len(SLOTS))):
            self._set_slot(SLOTS[i], chain[i] if i < len(chain) else None)
        _fsync_dir(self.root)

    def _set_slot(self, slot: str, target: str | None) -> None:
        link = self.root / slot
        if target is None and os.path.islink(link):
            os.unlink(link)
        if target is None or self._target(slot) == target:
            return
        tmp = self.root / f".tmp-link-{secrets.token_hex(4)}"
        os.symlink(target, tmp)
        try:
            os.replace(tmp, link)
        except BaseException:
            os.unlink(tmp)
            raise

    def _target(self, slot: str) -> str | None:
        """The folder name a slot symlink points to (None: no symlink)."""
        link = self.root / slot
        return os.readlink(link) if os.path.islink(link) else None

    def _targets(self) -> set[str]:
        return {t for t in (self._target(s) for s in SLOTS) if t}

    def _cleanup(self) -> None:
        """After the switch: remove folders no slot points to, and leftovers of crashed saves."""
        keep = {os.path.basename(t) for t in self._targets()}
        try:
            for entry in self.root.iterdir():
                if not (
                    entry.name.startswith(".tmp-")
                    or (entry.name.startswith("ckpt-") and entry.name not in keep)
                ):
                    continue
                if entry.is_symlink() or entry.is_file():
                    entry.unlink(missing_ok=True)
                else:
                    shutil.rmtree(entry, ignore_errors=True)
        except OSError as exc:  # the new checkpoint is committed; stale folders only cost space
            self._warn(f"could not remove old checkpoint folders in {self.root} ({exc.strerror})")

    # ------------------------------------------------------------------ load

    def load(self, map_location: str = "cpu") -> LoadedCheckpoint | None:
        """Load the newest valid slot; quarantine damaged ones. None when there is no checkpoint."""
        if not any(os.path.lexists(self.root / s) for s in SLOTS):
            return None
        problems: list[tuple[str, str, str, str]] = []  # (slot, folder, reason, where it went)
        for i, slot in enumerate(SLOTS):
            folder = self._target(slot) or slot
            try:
                loaded = self._read(slot, map_location)
            except _Damaged as exc:
                shown = folder if os.path.lexists(self.root / slot) else "-"
                problems.append((slot, shown, str(exc), self._quarantine(folder)))
                continue
            instead = f"loaded '{slot}' (step {loaded.state.get('step')}) instead"
            loaded.warnings = [
                f"checkpoint '{s}' ({f}) is damaged ({r}); {instead}{w}" for s, f, r, w in problems
            ]
            if problems:
                self._repoint(i)
            for message in loaded.warnings:
                self._warn(message)
            return loaded
        listing = "; ".join(f"'{s}' ({f}): {r}{w}" for s, f, r, w in problems)
        raise CheckpointError(
            f"no loadable checkpoint in {self.root}: {listing}. The damaged folders were "
            f"kept (renamed damaged-*) for you to inspect; to start from scratch, move "
            f"{self.root} aside and run again."
        )

    def _read(self, slot: str, map_location: str) -> LoadedCheckpoint:
        link = self.root / slot
        if not os.path.lexists(link):
            raise _Damaged("the slot is missing")
        folder = self.root / self._target(slot) if link.is_symlink() else link
        if not folder.is_dir():
            raise _Damaged(
                f"the link points to a missing folder {folder.name}" + self._where_moved(folder.name)
            )
        manifest = self._read_manifest(folder)
        state: dict = {}
        tensors: dict[str, dict[str, torch.Tensor]] = {}
        objects: dict[str, Any] = {}
        for fname, entry in sorted(manifest["files"].items()):
            data = self._read_verified(folder, fname, entry)
            try:
                if fname == "state.json":
                    state = json.loads(data)
                elif fname.endswith(".safetensors"):
                    sd = {k: v.to(map_location) for k, v in safetensors_load(data).items()}
                    for alias, stored in manifest.get("aliases", {}).get(fname, {}).items():
                        sd[alias] = sd[stored]
                    tensors[fname.removesuffix(".safetensors")] = sd
                elif fname.endswith(".pt"):
                    objects[fname.removesuffix(".pt")] = torch.load(
                        io.BytesIO(data), map_location=map_location, weights_only=True
                    )
            except Exception as exc:  # noqa: BLE001 - any failure to decode a verified file is damage
                raise _Damaged(
                    f"{fname} does not load ({type(exc).__name__}: "
                    f"{str(exc).splitlines()[0] if str(exc) else ''})"
                ) from None
        if not isinstance(state, dict) or state.get("step") != manifest.get("step"):
            raise _Damaged("state.json is missing or disagrees with the manifest's step")
        return LoadedCheckpoint(path=folder, slot=slot, state=state, tensors=tensors, objects=objects)

    @staticmethod
    def _read_manifest(folder: Path) -> dict:
        try:
            manifest = json.loads((folder / "manifest.json").read_bytes())
        except FileNotFoundError:
            raise _Damaged("manifest.json is missing (the save did not finish)") from None
        except (ValueError, UnicodeDecodeError) as exc:
            raise _Damaged(f"manifest.json is not valid JSON ({exc})") from None
        if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
            raise _Damaged("manifest.json has no 'files' table")
        if (version := manifest.get("format_version")) != FORMAT_VERSION:
            raise _Damaged(f"manifest.json has format_version {version!r}, this code reads {FORMAT_VERSION}")
        return manifest

    @staticmethod
    def _read_verified(folder: Path, fname: str, entry: Any) -> bytes:
        path = folder / fname
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise _Damaged(f"{fname} is missing") from None
        except PermissionError as exc:
            raise CheckpointError(
                f"cannot read {path} ({exc.strerror}); check permissions of {folder} and run again"
            ) from None
        except OSError as exc:
            raise _Damaged(f"{fname} cannot be read ({exc.strerror})") from None
        if not isinstance(entry, dict):
            raise _Damaged(f"manifest.json has a malformed entry for {fname}")
        if len(data) != entry.get("bytes"):
            raise _Damaged(
                f"{fname} has {len(data)} bytes, the manifest says {entry.get('bytes')} (truncated?)"
            )
        if hashlib.sha256(data).hexdigest() != entry.get("sha256"):
            raise _Damaged(f"sha256 mismatch in {fname}")
        return data

    def _quarantine(self, folder: str) -> str:
        """Rename a damaged folder to `damaged-<folder>-<time>` (never delete); say where it went."""
        src = self.root / folder
        if not src.is_dir() or src.is_symlink():
            return ""
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        dest, n = self.root / f"damaged-{src.name}-{stamp}", 1
        while os.path.lexists(dest):
            dest, n = self.root / f"damaged-{src.name}-{stamp}-{n}", n + 1
        try:
            os.rename(src, dest)
        except OSError as exc:
            return f"; it could not be moved aside ({exc.strerror}) and was left at {src}"
        return f"; the damaged folder was moved to {dest}"

    def _where_moved(self, folder: str) -> str:
        moved = sorted(self.root.glob(f"damaged-{folder}-*"))
        return f" (it was moved aside as damaged: {moved[-1]})" if moved else ""

    def _repoint(self, loaded_index: int) -> None:
        """After a fallback, shift the slots up so `current` is the folder just loaded."""
        chain = list(dict.fromkeys(t for t in (self._target(s) for s in SLOTS[loaded_index:]) if t))
        try:
            for i, slot in enumerate(SLOTS):
                self._set_slot(slot, chain[i] if i < len(chain) else None)
            _fsync_dir(self.root)
        except OSError as exc:
            self._warn(
                f"could not repoint the checkpoint slots in {self.root} ({exc.strerror}); the next "
                "save will repair them"
            )

    def current_state(self) -> dict | None:
        """`state.json` of `current`, unverified (cheap, for status displays); None if unreadable."""
        try:
            state = json.loads((self.root / "current" / "state.json").read_bytes())
        except (OSError, ValueError):
            return None
        return state if isinstance(state, dict) else None
