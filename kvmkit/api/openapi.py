"""The OpenAPI 3.0 document of what kvmkit's Firecracker-compatible API serves, built
from the route table and the body schemas the server checks (so the two cannot
disagree); served at GET /openapi.json. kvmkit's own paths and fields are marked
`x-kvmkit-extension` and described as "kvmkit extension"."""

from typing import Any

from kvmkit import __version__
from kvmkit.api.firecracker import FC_API_VERSION, ROUTES, Route

FAULT = {
    "description": "refused: the message says why and what to do",
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "required": ["fault_message"],
                "properties": {"fault_message": {"type": "string"}},
            }
        }
    },
}


def _operation(route: Route) -> dict[str, Any]:
    op: dict[str, Any] = {
        "summary": route.summary,
        "operationId": f"{route.method.lower()}{_camel(route.path)}",
        "responses": {"400": FAULT},
    }
    if route.response == "json":
        schema = route.returns.to_openapi() if route.returns else {"type": "object"}
        op["responses"]["200"] = {
            "description": "the resource",
            "content": {"application/json": {"schema": schema}},
        }
    else:
        op["responses"]["204"] = {"description": "done"}
    if route.kvmkit:
        op["x-kvmkit-extension"] = True
    if "{id}" in route.path:
        op["parameters"] = [
            {
                "name": "id",
                "in": "path",
                "required": True,
                "schema": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"},
            }
        ]
    if route.body is not None:
        op["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": route.body.to_openapi()}},
        }
    return op


def _camel(path: str) -> str:
    words = [w for w in path.replace("{id}", "by-id").replace("/", "-").split("-") if w]
    words = [w.split(".")[0] for w in words]
    return "".join(w.capitalize() for w in words) or "Root"


def document() -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for route in ROUTES:
        paths.setdefault(route.path, {})[route.method.lower()] = _operation(route)
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "kvmkit's Firecracker-compatible API",
            "version": __version__,
            "description": (
                f"Firecracker's API (at {FC_API_VERSION}) as kvmkit serves it over HTTP/1.1"
                " on a Unix socket (kvmkit run --api-sock PATH). Errors are"
                ' {"fault_message": "..."} with 400 (a bad request, or one not allowed in'
                " this state), 404 (no such path) or 405 (a method the path does not take)."
                " Fields Firecracker has that kvmkit cannot honour are refused by name."
                " Paths and fields marked x-kvmkit-extension are kvmkit's own."
            ),
        },
        "paths": paths,
    }
