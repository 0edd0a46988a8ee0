"""Typed records: dataclasses that are written as JSON and read back with one decoder.

`decode(cls, value, where, error)` turns JSON-shaped data (from a snapshot, a migration
stream, a config file or an API request) into an instance of the dataclass `cls`,
checking every field against its annotation: a missing field, an unknown one, a wrong
type or a value out of the range a field declares raises `error` (StreamFormatError,
ConfigError, ...) with one line naming where, the field and what was expected. Nothing
else escapes: no KeyError, TypeError or RecursionError, whatever the input.

Supported annotations: int, float, bool, str, bytes (written as hex), Literal of
strings or ints, X | None, list[X], tuple[X, ...], dict[str, X], and nested dataclasses.
A field declares bounds with `field(metadata=bounds(lo, hi))` (ints: the value; str,
bytes, list, dict: the length). `encode(obj)` gives the JSON-shaped data back.
"""

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, TypeVar, get_args, get_origin

from kvmkit.errors import KvmkitError

T = TypeVar("T")

MAX_DEPTH = 32  # records nest a few levels; deeper input is refused, not recursed into
U8 = (0, 0xFF)
U16 = (0, 0xFFFF)
U32 = (0, 0xFFFF_FFFF)
U64 = (0, (1 << 64) - 1)


def bounds(
    lo: int | None = None, hi: int | None = None
) -> dict[str, tuple[int | None, int | None]]:
    """Field metadata: the inclusive range of an int field, or of a container's length."""
    return {"bounds": (lo, hi)}


def encode(obj: Any) -> Any:  # noqa: ANN401 (JSON-shaped data)
    """A record (or a value inside one) as JSON-shaped data."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: encode(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, bytes | bytearray | memoryview):
        return bytes(obj).hex()
    if isinstance(obj, list | tuple):
        return [encode(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): encode(v) for k, v in obj.items()}
    return obj


def decode(
    cls: type[T],
    value: object,
    where: str,
    error: type[KvmkitError],
    *,
    allow_unknown: bool = False,
) -> T:
    """`value` as a `cls` record, or `error` naming `where` and the field at fault."""
    return _Decoder(error, allow_unknown).record(cls, value, where, 0)


def describe(value: object) -> str:
    """What a decoded JSON or TOML value is, in JSON's words ("an integer", "an array"),
    for messages that say what was expected and what came instead."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


class _Decoder:
    def __init__(self, error: type[KvmkitError], allow_unknown: bool) -> None:
        self.error = error
        self.allow_unknown = allow_unknown

    def fail(self, where: str, what: str) -> KvmkitError:
        return self.error(f"{where}: {what}")

    def record(self, cls: type[T], value: object, where: str, depth: int) -> T:
        if depth > MAX_DEPTH:
            raise self.fail(where, f"nested deeper than {MAX_DEPTH} levels")
        if not isinstance(value, Mapping):
            raise self.fail(where, f"must be an object, not {describe(value)}")
        hints = _hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = [k for k in value if k not in fields]
        if unknown and not self.allow_unknown:
            known = ", ".join(fields) or "none"
            raise self.fail(where, f"unknown field {str(unknown[0])!r} (known: {known})")
        args: dict[str, Any] = {}
        for name, f in fields.items():
            if not f.init:
                continue
            here = f"{where}: field {name!r}" if where else f"field {name!r}"
            if name not in value:
                has_default = (
                    f.default is not dataclasses.MISSING
                    or f.default_factory is not dataclasses.MISSING
                )
                if has_default:
                    continue
                raise self.fail(where, f"field {name!r} is missing")
            args[name] = self.value(hints[name], value[name], here, depth + 1, f.metadata)
        try:
            return cls(**args)
        except (ValueError, TypeError) as e:  # a record's own __post_init__ check
            raise self.fail(where, str(e)) from None

    def value(
        self,
        tp: Any,  # noqa: ANN401 (a type annotation)
        value: object,
        where: str,
        depth: int,
        metadata: Mapping[str, Any],
    ) -> Any:  # noqa: ANN401
        if depth > MAX_DEPTH:
            raise self.error(f"{where}: nested deeper than {MAX_DEPTH} levels")
        origin = get_origin(tp)
        if origin in (types.UnionType, typing.Union):
            options = get_args(tp)
            if value is None and type(None) in options:
                return None
            rest = [o for o in options if o is not type(None)]
            if len(rest) == 1:
                return self.value(rest[0], value, where, depth, metadata)
            for option in rest:  # the first that fits
                try:
                    return self.value(option, value, where, depth, metadata)
                except KvmkitError:
                    continue
            raise self.error(f"{where}: {describe(value)} fits none of its types")
        if origin is Literal:
            allowed = get_args(tp)
            if value not in allowed or isinstance(value, bool) != any(
                isinstance(a, bool) for a in allowed
            ):
                choices = ", ".join(repr(a) for a in allowed)
                raise self.error(f"{where}: must be one of {choices}, not {value!r}"[:300])
            return value
        if dataclasses.is_dataclass(tp):
            return self.record(tp, value, where, depth)  # type: ignore[arg-type]
        if tp is bool:
            if not isinstance(value, bool):
                raise self.error(f"{where}: must be true or false, not {describe(value)}")
            return value
        if tp is int:
            if not isinstance(value, int) or isinstance(value, bool):
                raise self.error(f"{where}: must be a whole number, not {describe(value)}")
            self._check_bounds(value, value, where, metadata, "")
            return value
        if tp is float:
            if not isinstance(value, int | float) or isinstance(value, bool):
                raise self.error(f"{where}: must be a number, not {describe(value)}")
            if value != value or value in (float("inf"), float("-inf")):
                raise self.error(f"{where}: must be a finite number")
            return float(value)
        if tp is str:
            if not isinstance(value, str):
                raise self.error(f"{where}: must be a string, not {describe(value)}")
            self._check_bounds(len(value), value, where, metadata, " characters")
            return value
        if tp is bytes:
            if not isinstance(value, str):
                raise self.error(f"{where}: must be a hex string, not {describe(value)}")
            try:
                data = bytes.fromhex(value)
            except ValueError:
                raise self.error(f"{where}: is not a hex string") from None
            self._check_bounds(len(data), value, where, metadata, " bytes")
            return data
        if origin in (list, tuple):
            if not isinstance(value, list):
                raise self.error(f"{where}: must be an array, not {describe(value)}")
            self._check_bounds(len(value), value, where, metadata, " items")
            args = get_args(tp)
            if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
                if len(value) != len(args):
                    raise self.error(f"{where}: must have {len(args)} items, not {len(value)}")
                return tuple(
                    self.value(a, v, f"{where}[{i}]", depth + 1, {})
                    for i, (a, v) in enumerate(zip(args, value, strict=True))
                )
            item = args[0] if args else Any
            items = [
                self.value(item, v, f"{where}[{i}]", depth + 1, {}) for i, v in enumerate(value)
            ]
            return tuple(items) if origin is tuple else items
        if origin is dict:
            if not isinstance(value, Mapping):
                raise self.error(f"{where}: must be an object, not {describe(value)}")
            self._check_bounds(len(value), value, where, metadata, " entries")
            _, item = get_args(tp)
            return {
                str(k): self.value(item, v, f"{where}[{str(k)[:40]!r}]", depth + 1, {})
                for k, v in value.items()
            }
        if tp is Any or tp is object:
            _check_depth(value, where, depth, self.error)
            return value
        raise TypeError(f"records.decode: unsupported annotation {tp!r}")

    def _check_bounds(
        self, n: int, value: object, where: str, metadata: Mapping[str, Any], unit: str
    ) -> None:
        lo, hi = metadata.get("bounds", (None, None))
        if (lo is not None and n < lo) or (hi is not None and n > hi):
            shown = f"{value}" if not unit else f"{n}{unit}"
            if len(shown) > 60:
                shown = shown[:40] + "..."
            lo_s = "" if lo is None else f"{lo:#x}" if lo > 0xFFFF else str(lo)
            hi_s = "" if hi is None else f"{hi:#x}" if hi > 0xFFFF else str(hi)
            raise self.error(f"{where}: {shown} is out of range ({lo_s}..{hi_s}{unit})")


def _check_depth(value: object, where: str, depth: int, error: type[KvmkitError]) -> None:
    """Refuse free-form JSON nested deeper than MAX_DEPTH, without recursing."""
    stack = [(value, depth)]
    while stack:
        v, d = stack.pop()
        if d > MAX_DEPTH:
            raise error(f"{where}: nested deeper than {MAX_DEPTH} levels")
        if isinstance(v, list):
            stack.extend((x, d + 1) for x in v)
        elif isinstance(v, dict):
            stack.extend((x, d + 1) for x in v.values())


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    hints = _HINTS.get(cls)
    if hints is None:
        hints = _HINTS[cls] = typing.get_type_hints(cls)
    return hints
