"""Request bodies described once: checked against requests and written out as OpenAPI.

A `Body` lists its `Field`s; `check(body, data)` returns the object or raises
`SchemaError` naming the field (unknown fields, wrong types, values outside an enum
or a range, a missing required field); `to_openapi()` gives its JSON Schema, so the
OpenAPI document (kvmkit/api/openapi.py) says exactly what the server checks.
"""

from dataclasses import dataclass
from typing import Any

from kvmkit.records import describe

KINDS = {"string": str, "integer": int, "boolean": bool, "object": dict, "array": list}
MAX_STRING = 4096


class SchemaError(Exception):
    """A body that does not match its schema: the message names the field."""


@dataclass(frozen=True)
class Field:
    name: str
    kind: str  # string, integer, boolean, object (then `fields`, or free-form), array
    required: bool = False
    description: str = ""
    enum: tuple[Any, ...] | None = None
    minimum: int | None = None
    maximum: int | None = None
    nullable: bool = False
    fields: "tuple[Field, ...] | None" = None  # an object's fields (None: any object)
    items: "Field | None" = None  # an array's item
    kvmkit: bool = False  # a kvmkit extension, not in Firecracker's API
    fold_case: bool = False  # an enum matched case-insensitively, given back as declared

    def check(self, value: Any, where: str) -> Any:
        label = f"{where}{self.name}"
        if value is None:
            if self.nullable:
                return None
            raise SchemaError(f"field '{label}' is null: give a {self.kind}")
        python = KINDS[self.kind]
        ok = isinstance(value, python) and not (python is int and isinstance(value, bool))
        if not ok:
            raise SchemaError(f"field '{label}' must be {_a(self.kind)}, not {describe(value)}")
        if self.enum is not None and self.fold_case and isinstance(value, str):
            value = next((v for v in self.enum if v.lower() == value.lower()), value)
        if self.enum is not None and value not in self.enum:
            shown = ", ".join(repr(v) if not isinstance(v, str) else v for v in self.enum)
            raise SchemaError(f"field '{label}' is {_short(value)}: use one of {shown}")
        if python is int:
            if self.minimum is not None and value < self.minimum:
                raise SchemaError(f"field '{label}' is {value}: the least is {self.minimum}")
            if self.maximum is not None and value > self.maximum:
                raise SchemaError(f"field '{label}' is {value}: the most is {self.maximum}")
        if python is str and len(value) > MAX_STRING:
            raise SchemaError(f"field '{label}' is longer than {MAX_STRING} characters")
        if python is dict and self.fields is not None:
            return check_fields(self.fields, value, f"{label}.")
        if python is list and self.items is not None:
            return [self.items.check(v, f"{label}[{i}]") for i, v in enumerate(value)]
        return value

    def to_openapi(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.kind}
        if self.description:
            out["description"] = ("kvmkit extension: " if self.kvmkit else "") + self.description
        if self.enum is not None:
            out["enum"] = list(self.enum)
        if self.minimum is not None:
            out["minimum"] = self.minimum
        if self.maximum is not None:
            out["maximum"] = self.maximum
        if self.kind == "string":
            out["maxLength"] = MAX_STRING
        if self.nullable:
            out["nullable"] = True
        if self.kind == "object" and self.fields is not None:
            out.update(object_schema(self.fields))
        if self.kind == "array" and self.items is not None:
            out["items"] = self.items.to_openapi()
        return out


@dataclass(frozen=True)
class Body:
    """A request body: a JSON object of `fields` (unknown ones refused)."""

    name: str  # the resource, for messages: "machine-config"
    fields: tuple[Field, ...]
    description: str = ""
    free_form: bool = False  # any JSON object (the MMDS store)

    def check(self, data: Any) -> dict[str, Any]:
        if not isinstance(data, dict):
            raise SchemaError(f"{self.name}: the body must be an object, not {describe(data)}")
        if self.free_form:
            return data
        try:
            return check_fields(self.fields, data, "")
        except SchemaError as e:
            raise SchemaError(f"{self.name}: {e}") from None

    def to_openapi(self) -> dict[str, Any]:
        if self.free_form:
            return {"type": "object", "description": self.description}
        out = {"type": "object", **object_schema(self.fields)}
        if self.description:
            out["description"] = self.description
        return out


def check_fields(fields: tuple[Field, ...], data: dict[str, Any], where: str) -> dict[str, Any]:
    known = {f.name: f for f in fields}
    for name in data:
        if name not in known:
            names = ", ".join(known) or "no fields"
            shown = name if len(name) <= 40 else name[:40] + "..."
            raise SchemaError(f"unknown field '{where}{shown}': it takes {names}")
    out: dict[str, Any] = {}
    for f in fields:
        if f.name in data:
            out[f.name] = f.check(data[f.name], where)
        elif f.required:
            raise SchemaError(f"missing required field '{where}{f.name}'")
    return out


def object_schema(fields: tuple[Field, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "properties": {f.name: f.to_openapi() for f in fields},
        "additionalProperties": False,
    }
    required = [f.name for f in fields if f.required]
    if required:
        out["required"] = required
    return out


def _a(kind: str) -> str:
    return {"integer": "an integer", "object": "an object", "array": "an array"}.get(
        kind, f"a {kind}"
    )


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
