"""Preset loading: JSON files → validated, frozen preset objects, with errors a user can act on.

What it is: file reading, `"extends"` resolution (deep merge, cycle-safe), lookup by name, and
the translation of validation errors into one line per problem naming the file and field path
(with a did-you-mean for unknown keys). What it is not: the schema (see `schema.py`). A preset
is data; nothing in it is ever executed or imported.
"""

from __future__ import annotations

import difflib
import json
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from pdt.presets.kinds import PRESET_KINDS
from pdt.presets.schema import PresetBase

#: The presets shipped with the repository (the folder beside the `pdt` package).
SHIPPED_DIR = Path(__file__).resolve().parent.parent.parent / "presets"


class PresetError(Exception):
    """A preset cannot be used. The message names the file and every problem found."""


@dataclass(frozen=True)
class PresetInfo:
    """One entry of a preset folder listing (valid or not)."""

    name: str
    path: Path
    kind: str
    description: str
    error: str | None = None


def presets_dir() -> Path:
    """The folder presets are listed from: `PDT_PRESETS_DIR`, else ./presets, else the shipped one."""
    import os

    env = os.environ.get("PDT_PRESETS_DIR")
    if env:
        return Path(env)
    local = Path.cwd() / "presets"
    return local if local.is_dir() else SHIPPED_DIR


def _read_json(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PresetError(f"{path}: file not found") from None
    except OSError as exc:
        raise PresetError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PresetError(
            f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"
        ) from None
    if not isinstance(data, dict):
        raise PresetError(f"{path}: a preset must be a JSON object, found {type(data).__name__}")
    return data


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Objects merge key by key; anything else (lists included) in `over` replaces `base`."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _resolve_extends(path: Path, data: dict[str, Any], chain: tuple[Path, ...]) -> dict[str, Any]:
    parent_ref = data.pop("extends", None)
    if parent_ref is None:
        return data
    if not isinstance(parent_ref, str) or not parent_ref:
        raise PresetError(f'{path}: extends: expected a preset file name such as "pretrain_tiny.json"')
    ref = parent_ref if parent_ref.endswith(".json") else parent_ref + ".json"
    candidates = [path.parent / ref, SHIPPED_DIR / ref]
    parent = next((c.resolve() for c in candidates if c.is_file()), None)
    if parent is None:
        raise PresetError(
            f'{path}: extends: "{parent_ref}" not found (looked in {path.parent} and {SHIPPED_DIR})'
        )
    if parent in chain:
        cycle = " -> ".join(p.name for p in (*chain, parent))
        raise PresetError(f"{path}: extends: cycle {cycle}")
    parent_data = _resolve_extends(parent, _read_json(parent), (*chain, parent))
    return _deep_merge(parent_data, data)


def load_preset_file(path: str | Path) -> PresetBase:
    """Read, resolve `extends`, validate. Raises PresetError with every problem listed."""
    path = Path(path)
    data = _resolve_extends(path, _read_json(path), (path.resolve(),))
    return validate_preset(data, source=str(path))


def validate_preset(data: dict[str, Any], source: str = "<preset>") -> PresetBase:
    """Validate an already-merged preset mapping."""
    kind = data.get("kind")
    if kind not in PRESET_KINDS:
        known = ", ".join(sorted(PRESET_KINDS))
        hint = _did_you_mean(str(kind), PRESET_KINDS) if isinstance(kind, str) else ""
        what = "missing" if kind is None else f"unknown kind {kind!r}"
        raise PresetError(f"{source}: kind: {what}{hint}; valid kinds: {known}")
    cls = PRESET_KINDS[kind]
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        lines = [format_error(cls, err) for err in exc.errors()]
        raise PresetError(
            f"{source}: "
            + ("\n  ".join(lines) if len(lines) == 1 else f"{len(lines)} problems:\n  " + "\n  ".join(lines))
        ) from None


def _did_you_mean(word: str, options: typing.Iterable[str]) -> str:
    match = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f'; did you mean "{match[0]}"?' if match else ""


def _loc_text(loc: tuple[Any, ...], model: type[BaseModel]) -> str:
    out = ""
    ann: Any = model
    for part in loc:
        tag_models = _models_in(ann)
        if isinstance(part, int):
            out += f"[{part}]"
        elif out and any(_tag_of(m) == part for m in tag_models):
            pass  # discriminator tag inserted by pydantic, not a real key
        else:
            out += ("." if out else "") + str(part)
        ann = _step(ann, part)
    return out or "(top level)"


def format_error(model: type[BaseModel], err: Any) -> str:
    """One line for one pydantic error: `field.path: what is wrong`."""
    loc = tuple(err.get("loc", ()))
    where = _loc_text(loc, model)
    etype = err.get("type", "")
    if etype == "extra_forbidden":
        known = _fields_at(model, loc[:-1])
        return f"{where}: unknown key{_did_you_mean(str(loc[-1]), known)}" + (
            f" (valid keys: {', '.join(sorted(known))})" if known else ""
        )
    if etype == "missing":
        return f"{where}: required field missing"
    msg = str(err.get("msg", "invalid value"))
    msg = msg.removeprefix("Value error, ")
    if (
        "input" in err
        and etype not in ("value_error", "assertion_error")
        and not isinstance(err["input"], dict)
    ):
        return f"{where}: {msg} (got {json.dumps(err['input'], default=str)})"
    return f"{where}: {msg}"


# --- walking the schema along an error location (for did-you-mean) ---------------------------


def _unwrap(ann: Any) -> list[Any]:
    origin = typing.get_origin(ann)
    if origin is typing.Annotated:
        return _unwrap(typing.get_args(ann)[0])
    if origin in (typing.Union, types.UnionType):
        return [a for arg in typing.get_args(ann) for a in _unwrap(arg)]
    return [ann]


def _models_in(ann: Any) -> list[type[BaseModel]]:
    return [a for a in _unwrap(ann) if isinstance(a, type) and issubclass(a, BaseModel)]


def _tag_of(model: type[BaseModel]) -> Any:
    field = model.model_fields.get("type")
    return field.default if field is not None else None


def _step(ann: Any, part: Any) -> Any:
    if isinstance(part, int):
        for a in _unwrap(ann):
            if typing.get_origin(a) in (list, tuple):
                return typing.get_args(a)[0]
        return None
    for m in _models_in(ann):
        if part in m.model_fields:
            return m.model_fields[part].annotation
    for m in _models_in(ann):
        if _tag_of(m) == part:
            return m
    return None


def _fields_at(model: type[BaseModel], loc: tuple[Any, ...]) -> set[str]:
    ann: Any = model
    for part in loc:
        ann = _step(ann, part)
        if ann is None:
            return set()
    return {name for m in _models_in(ann) for name in m.model_fields}


# --- listing and lookup -----------------------------------------------------------------------


def list_presets(folder: Path | None = None) -> list[PresetInfo]:
    """Every *.json in the folder, valid or not (invalid ones carry their error)."""
    folder = folder or presets_dir()
    infos: list[PresetInfo] = []
    for path in sorted(folder.glob("*.json")):
        try:
            preset = load_preset_file(path)
            infos.append(PresetInfo(preset.name, path, getattr(preset, "kind", "?"), preset.description))
        except PresetError as exc:
            infos.append(PresetInfo(path.stem, path, "invalid", "", error=str(exc)))
    return infos


def find_preset(ref: str, folder: Path | None = None) -> PresetBase:
    """A preset by name (file stem in the presets folder) or by path to a .json file."""
    candidate = Path(ref)
    if ref.endswith(".json") or candidate.is_file():
        preset = load_preset_file(candidate)
    else:
        folder = folder or presets_dir()
        path = folder / f"{ref}.json"
        if not path.is_file():
            names = sorted(p.stem for p in folder.glob("*.json"))
            raise PresetError(
                f'unknown preset "{ref}"{_did_you_mean(ref, names)}; available presets: '
                + (", ".join(names) if names else f"(none in {folder})")
            )
        preset = load_preset_file(path)
        if preset.name != path.stem:
            raise PresetError(
                f'{path}: name: "{preset.name}" does not match the file name "{path.stem}" — '
                "checkpoints are stored by name, so two presets must not share one"
            )
    return preset


def preset_to_json(preset: PresetBase) -> str:
    """The fully resolved preset (extends merged, defaults filled) as stable JSON."""
    return json.dumps(preset.model_dump(mode="json"), indent=2, sort_keys=True)


def preset_hash(preset: PresetBase) -> str:
    import hashlib

    return hashlib.sha256(preset_to_json(preset).encode()).hexdigest()[:16]
