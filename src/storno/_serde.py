"""JSON text for step arguments, step results and saga inputs, as stored in the journal.

The journal is read back on replay, so encoding must be exact (``decode(encode(x)) == x``),
canonical (equal values give equal text: that is how a retry's arguments are compared with the
recorded ones) and fast (it runs on every step). The C encoder does the work; values it cannot
take go through its ``default`` hook and become ``{"__storno_type__": TAG, "v": ...}`` objects
(plus ``"cls": "module:QualName"`` for user classes). The value is walked in Python only when
the C encoder fails, to say where and why.
"""

from __future__ import annotations

import base64
import dataclasses
import enum
import json
import math
import re
import sys
import threading
import uuid
from collections.abc import Callable, Iterable
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from typing import Any

from storno._errors import PayloadTooLargeError, SerializationError

__all__ = ["DEFAULT_MAX_PAYLOAD_BYTES", "MAX_DEPTH", "TYPE_KEY", "decode", "describe", "encode"]

DEFAULT_MAX_PAYLOAD_BYTES: int = 2 * 1024 * 1024
MAX_DEPTH = 100
"""How deeply lists and objects may nest in a stored value: every reader (the API, the
dashboard, ``storno show --json``) must still be able to parse and render it, with room for
the run around it."""
TYPE_KEY = "__storno_type__"

_MARK = f'"{TYPE_KEY}":'
_HINT = "pass JSON-compatible values, dataclasses or pydantic models"
_OPTS: dict[str, Any] = {"separators": (",", ":"), "ensure_ascii": False, "allow_nan": False}
_Encoder = Callable[[Any], dict[str, Any]]


class _Refused(Exception):
    def __init__(self, path: str, problem: str, hint: str = _HINT) -> None:
        where = f"the value at `{path}`" if path else "the value"
        super().__init__(f"{where} {problem}; {hint}")
        self.problem, self.hint = problem, hint


class _Bad(Exception):
    """A stored value that cannot be rebuilt; decode() adds what it was."""


def _type_name(t: type) -> str:
    return t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


def _resolve(ref: str) -> Any:
    """The class named by ``module:QualName``, from modules already loaded, or ``None``."""
    module_name, _, qualname = ref.partition(":")
    found: Any = sys.modules.get(module_name)
    for part in qualname.split("."):
        found = getattr(found, part, None)
    return found


def _class_ref(cls: type) -> str:
    ref = f"{cls.__module__}:{cls.__qualname__}"
    if _resolve(ref) is not cls:
        # Refused now rather than on replay, where the run would be stuck.
        problem = f"is a {ref}, a class that cannot be found again by that name"
        raise _Refused("", problem, "define the class at module level")
    return ref


def _set_encoder(tag: str) -> _Encoder:
    # Elements are ordered by their own canonical text so that equal sets give equal text.
    return lambda o: {TYPE_KEY: tag, "v": sorted(o, key=_SORT_ENC.encode)}


_ENCODERS: dict[type, _Encoder] = {
    datetime: lambda o: {TYPE_KEY: "datetime", "v": o.isoformat()},
    date: lambda o: {TYPE_KEY: "date", "v": o.isoformat()},
    time: lambda o: {TYPE_KEY: "time", "v": o.isoformat()},
    timedelta: lambda o: {TYPE_KEY: "timedelta", "v": [o.days, o.seconds, o.microseconds]},
    bytes: lambda o: {TYPE_KEY: "bytes", "v": base64.b64encode(o).decode("ascii")},
    Decimal: lambda o: {TYPE_KEY: "Decimal", "v": str(o)},
    uuid.UUID: lambda o: {TYPE_KEY: "UUID", "v": str(o)},
    set: _set_encoder("set"),
    frozenset: _set_encoder("frozenset"),
}
_ENCODERS[bytearray] = _ENCODERS[bytes]
_BASES = tuple(_ENCODERS)  # before user classes are cached, so subclasses are not matched


def _encoder_for(cls: type) -> _Encoder:
    found = next((_ENCODERS[b] for b in _BASES if issubclass(cls, b)), None)
    _ENCODERS[cls] = found = found or _class_encoder(cls)
    return found


def _class_encoder(cls: type) -> _Encoder:
    dump: Callable[[Any], Any]
    if issubclass(cls, enum.Enum):
        kind, dump = "enum", lambda o: o.value
    elif dataclasses.is_dataclass(cls):
        names = [f.name for f in dataclasses.fields(cls)]
        kind, dump = "dataclass", lambda o: {n: getattr(o, n) for n in names}
    elif callable(getattr(cls, "model_dump", None)) and hasattr(cls, "model_validate"):
        # round_trip leaves out computed fields, which model_validate would not accept back.
        kind, dump = "pydantic", lambda o: o.model_dump(by_alias=True, round_trip=True)
    else:
        raise _Refused("", f"is of type {_type_name(cls)}")
    ref = _class_ref(cls)
    return lambda o: {TYPE_KEY: kind, "cls": ref, "v": dump(o)}


def _tag(o: Any) -> dict[str, Any]:
    return (_ENCODERS.get(type(o)) or _encoder_for(type(o)))(o)


class _Counter(threading.local):
    tags = 0


_emitted = _Counter()


def _hook(o: Any) -> dict[str, Any]:
    # Counted so that a user dict holding TYPE_KEY can be told apart from the tags we emit.
    _emitted.tags += 1
    return _tag(o)


_FAST_ENC = json.JSONEncoder(default=_hook, sort_keys=True, **_OPTS)
_SORT_ENC = json.JSONEncoder(default=_tag, sort_keys=True, **_OPTS)
_TREE_ENC = json.JSONEncoder(sort_keys=False, **_OPTS)


def encode(value: object, *, what: str, limit: int = DEFAULT_MAX_PAYLOAD_BYTES) -> str:
    """Canonical JSON text for ``value`` (sorted keys, compact), for the journal.

    Raises SerializationError naming ``what``, the path inside the value and the offending
    type, or PayloadTooLargeError when the text is over ``limit`` UTF-8 bytes.

    Like ``json``, some types come back as a near relative: tuples as lists (but tuples inside
    sets stay tuples), dict keys that are int/float/bool/None as strings (``1`` -> ``"1"``,
    ``None`` -> ``"null"``), subclasses of str/int/float/list/dict (IntEnum, StrEnum,
    namedtuple, OrderedDict) as the base type, bytearray as bytes, and aware datetimes keep
    their UTC offset but not a zone name. Dataclass fields are stored by name (init=False ones
    too, set back after construction); pydantic models as ``model_dump(by_alias=True)``.
    """
    start = _emitted.tags
    try:
        text = _FAST_ENC.encode(value)
    except Exception:
        text = _slow(value, what)
    else:
        # More marks than tags: a user dict holds TYPE_KEY, or a key merely ends with it.
        if _MARK in text and text.count(_MARK) != _emitted.tags - start:
            _slow(value, what)
    if text.isascii():
        size = len(text)
    else:
        try:
            size = len(text.encode("utf-8"))
        except UnicodeEncodeError:
            _slow(value, what)
            raise SerializationError(f"{what} holds text that is not valid Unicode") from None
    if size > limit:
        raise PayloadTooLargeError(what, size, limit)
    # Counting brackets is cheap; only text with many of them is measured properly.
    if text.count("[") + text.count("{") > MAX_DEPTH and _depth(text) > MAX_DEPTH:
        raise SerializationError(
            f"{what} is nested more than {MAX_DEPTH} levels deep, which storno cannot show "
            f"again; flatten it, or store it elsewhere and pass a reference"
        )
    return text


_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_INNERMOST = re.compile(r"\[\]|\{\}")


def _depth(text: str) -> int:
    """How deeply JSON text nests (up to MAX_DEPTH + 1): each pass drops the innermost pairs."""
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text))
    for level in range(MAX_DEPTH + 1):
        if not brackets:
            return level
        brackets = _INNERMOST.sub("", brackets)
    return MAX_DEPTH + 1


def _slow(value: object, what: str) -> str:
    try:
        return _TREE_ENC.encode(_build(value, "", set()))
    except _Refused as e:
        raise SerializationError(f"{what} cannot be stored as JSON: {e}") from None
    except RecursionError:
        raise SerializationError(f"{what} is nested too deeply to store as JSON") from None


def _key_text(k: object, path: str) -> str:
    if isinstance(k, str):
        return k
    if k is None or isinstance(k, bool | int) or (isinstance(k, float) and math.isfinite(k)):
        return _TREE_ENC.encode(k)
    problem = f"is a dict with a key {k!r} of type {_type_name(type(k))}"
    raise _Refused(path, problem, "use keys of type str, int, float, bool or None")


def _build(o: Any, path: str, active: set[int]) -> Any:
    """``o`` as plain JSON data, tags included, or _Refused saying where it breaks."""
    if o is None or isinstance(o, bool | int):
        return o
    if isinstance(o, str):
        if not o.isascii():
            try:
                o.encode("utf-8")
            except UnicodeEncodeError:
                raise _Refused(path, "is text with a lone surrogate", "fix the text") from None
        return o
    if isinstance(o, float):
        if not math.isfinite(o):
            raise _Refused(path, f"is the float {o}, which JSON cannot hold", "use None or a str")
        return o
    if id(o) in active:
        raise _Refused(path, "contains itself", "break the cycle")
    active.add(id(o))
    try:
        if isinstance(o, list | tuple):
            return [_build(x, f"{path}[{i}]", active) for i, x in enumerate(o)]
        if isinstance(o, dict):
            return _build_dict(o, path, active, attrs=False)
        if isinstance(o, set | frozenset):
            items = [_build(x, f"{path}{{…}}", active) for x in o]
            tag = "frozenset" if isinstance(o, frozenset) else "set"
            return {TYPE_KEY: tag, "v": sorted(items, key=_TREE_ENC.encode)}
        try:
            tagged = _tag(o)
        except _Refused as e:
            raise _Refused(path, e.problem, e.hint) from None
        except Exception as e:
            raise _Refused(path, f"({_type_name(type(o))}) failed to encode: {e!r}", _HINT) from e
        v, kind = tagged["v"], tagged[TYPE_KEY]
        if kind in ("dataclass", "pydantic") and isinstance(v, dict):
            tagged["v"] = _build_dict(v, path, active, attrs=True)
        elif kind in ("enum", "pydantic"):
            tagged["v"] = _build(v, f"{path}.value" if kind == "enum" else path, active)
        return tagged
    finally:
        active.discard(id(o))


def _build_dict(d: dict[Any, Any], path: str, active: set[int], attrs: bool) -> dict[str, Any]:
    if TYPE_KEY in d:
        raise _Refused(path, f"is a dict with the reserved key {TYPE_KEY!r}", "rename the key")
    try:
        keys = sorted(d)  # as the C encoder orders them
    except TypeError:
        keys = sorted(d, key=lambda k: _key_text(k, path))
    out: dict[str, Any] = {}
    for k in keys:
        text = _key_text(k, path)
        if text in out:
            problem = f"is a dict with two keys that become {text!r} in JSON"
            raise _Refused(path, problem, "use one type of key")
        sub = f".{k}" if attrs else f"[{_TREE_ENC.encode(k)}]"
        out[text] = _build(d[k], path + sub, active)
    return out


def _freeze(x: Any) -> Any:
    # Set elements are hashable, so a list found in one was a tuple when it was encoded.
    return tuple(map(_freeze, x)) if isinstance(x, list) else x


def _enum_from(cls: Any, v: Any) -> Any:
    try:
        return cls(v)
    except (ValueError, TypeError):
        if isinstance(v, list):
            return cls(_freeze(v))
        raise


def _dataclass_from(cls: Any, v: dict[str, Any]) -> Any:
    late = {f.name for f in dataclasses.fields(cls) if not f.init}
    obj = cls(**{k: x for k, x in v.items() if k not in late})
    for k in late & v.keys():
        object.__setattr__(obj, k, v[k])  # works on frozen dataclasses too
    return obj


_DECODERS: dict[str, Callable[[Any, Any], Any]] = {
    "datetime": lambda _, v: datetime.fromisoformat(v),
    "date": lambda _, v: date.fromisoformat(v),
    "time": lambda _, v: time.fromisoformat(v),
    "timedelta": lambda _, v: timedelta(*v),
    "bytes": lambda _, v: base64.b64decode(v, validate=True),
    "Decimal": lambda _, v: Decimal(v),
    "UUID": lambda _, v: uuid.UUID(v),
    "set": lambda _, v: set(map(_freeze, v)),
    "frozenset": lambda _, v: frozenset(map(_freeze, v)),
    "enum": _enum_from,
    "dataclass": _dataclass_from,
    "pydantic": lambda cls, v: cls.model_validate(v),
}
_IS_KIND: dict[str, Callable[[type], bool]] = {
    "enum": lambda c: issubclass(c, enum.Enum),
    "dataclass": dataclasses.is_dataclass,
    "pydantic": lambda c: callable(getattr(c, "model_validate", None)),
}


def _load_class(ref: object, kind: str) -> type:
    # Only modules already loaded: journal data must never make the worker import code.
    if not isinstance(ref, str) or ":" not in ref:
        raise _Bad(f"names its {kind} class as {ref!r}, not as 'module:QualName'")
    module = ref.partition(":")[0]
    if module not in sys.modules:
        hint = f"import module {module} in the worker before reading this value"
        raise _Bad(f"needs class {ref}, but module {module} is not loaded; {hint}")
    cls = _resolve(ref)
    if not isinstance(cls, type):
        raise _Bad(f"needs class {ref}, which module {module} does not define (renamed?)")
    if not _IS_KIND[kind](cls):
        raise _Bad(f"needs class {ref} to be a {kind} class, and it is not")
    return cls


def _untag(d: dict[str, Any]) -> Any:
    if TYPE_KEY not in d:
        return d
    kind = d[TYPE_KEY]
    if not isinstance(kind, str) or kind not in _DECODERS or "v" not in d:
        raise _Bad(f"holds an unknown tagged value {describe(_TREE_ENC.encode(d))}")
    cls = _load_class(d.get("cls"), kind) if kind in _IS_KIND else None
    try:
        return _DECODERS[kind](cls, d["v"])
    except Exception as e:
        text = _TREE_ENC.encode(d["v"])
        raise _Bad(f"holds a {kind} that cannot be rebuilt from {describe(text)}: {e}") from e


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not allowed")


_PLAIN_DEC = json.JSONDecoder(parse_constant=_no_constant)
_TAGGED_DEC = json.JSONDecoder(object_hook=_untag, parse_constant=_no_constant)


def decode(text: str, *, what: str = "value") -> object:
    """The value ``text`` was encoded from; SerializationError naming ``what`` if it cannot be."""
    try:
        return (_TAGGED_DEC if TYPE_KEY in text else _PLAIN_DEC).decode(text)
    except _Bad as e:
        raise SerializationError(f"cannot read {what}: it {e}") from None
    except (ValueError, RecursionError) as e:
        raise SerializationError(f"{what} is not valid JSON ({e}): {describe(text)}") from None


def describe(text: str, max_chars: int = 120) -> str:
    """Short human rendering of encoded JSON text for error messages (truncate with '…')."""
    try:
        shown = _render(json.loads(text), max_chars)
    except (ValueError, RecursionError):
        shown = text
    return shown if len(shown) <= max_chars else shown[: max_chars - 1] + "…"


def _join(parts: Iterable[str], limit: int) -> str:
    # Stops early: a huge payload is only ever shown as its first few characters.
    out: list[str] = []
    size = 0
    for part in parts:
        out.append(part)
        size += len(part) + 2
        if size > limit:
            break
    return ", ".join(out)


def _render(v: Any, limit: int) -> str:
    if isinstance(v, list):
        return "[" + _join((_render(x, limit) for x in v), limit) + "]"
    if not isinstance(v, dict):
        return _TREE_ENC.encode(v[: limit + 1] if isinstance(v, str) else v)
    kind, inner = v.get(TYPE_KEY), v.get("v")
    if not isinstance(kind, str):
        items = (f"{_TREE_ENC.encode(k)}: {_render(x, limit)}" for k, x in v.items())
        return "{" + _join(items, limit) + "}"
    name = str(v.get("cls", kind)).rpartition(":")[2].rpartition(".")[2]
    if kind in ("dataclass", "pydantic") and isinstance(inner, dict):
        body = _join((f"{k}={_render(x, limit)}" for k, x in inner.items()), limit)
    elif kind == "set" and isinstance(inner, list):
        return "{" + _join((_render(x, limit) for x in inner), limit) + "}"
    else:
        body = inner if isinstance(inner, str) else _render(inner, limit)
    return f"{name}({body})"
