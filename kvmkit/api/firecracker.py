"""Firecracker's API over kvmkit's machine: the routes, their handlers and the state
between requests (pre-boot resources, then the running machine).

`FirecrackerVmm.handle` is the HTTP front's application (kvmkit/api/http.py); the
config file (`apply_config`) goes through the same handlers. Pre-boot requests fill
`VmResources` (kvmkit/machine/resources.py); InstanceStart builds the machine with
`build_for_boot` and hands it to the main thread (`wait_for_machine`), which runs
it; /snapshot/load builds it with `build_from_saved`. Post-boot requests act on the
`Machine` as kvmkit's NDJSON API does. Answers follow Firecracker: 204 for a PUT or
PATCH done, 200 with a body for a GET, 400 `{"fault_message": ...}` for a request
that is wrong or not allowed in this state, 404 for an unknown path, 405 for a
method a path does not take. Fields kvmkit cannot honour are refused by name.
"""

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kvmkit.api import fc_bodies as bodies
from kvmkit.api import fc_preboot as pre
from kvmkit.api import fc_runtime as run
from kvmkit.api.fc_state import FC_API_VERSION, Fault, VmmState
from kvmkit.api.http import BadRequest, Request, Response, fault, parse_json
from kvmkit.api.schema import Body, SchemaError
from kvmkit.errors import ConfigError, KvmkitError

__all__ = ["FC_API_VERSION", "ROUTES", "Fault", "FirecrackerVmm", "Route", "match"]


@dataclass(frozen=True)
class Route:
    method: str
    path: str  # with {param} placeholders
    summary: str
    body: Body | None = None
    kvmkit: bool = False  # a kvmkit extension
    response: str = "empty"  # empty (204) or json (200)
    returns: Body | None = None  # the 200 answer's schema, where it has a fixed shape


Handler = Callable[[VmmState, dict[str, str], dict[str, Any]], Any]


class FirecrackerVmm(VmmState):
    """One microVM behind Firecracker's API: `handle` serves HTTP requests,
    `apply_config` a config file, both through the route table's handlers."""

    # -- the HTTP front's application ----------------------------------------------------
    def handle(self, request: Request) -> Response:
        self.requests += 1
        route, params, allowed = match(request.method, request.path)
        if route is None:
            if allowed:
                response = fault(
                    405,
                    f"{request.method[:16]} is not allowed on {request.path[:80]}: it takes"
                    f" {', '.join(allowed)}",
                )
                response.headers["Allow"] = ", ".join(allowed)
                return response
            return fault(404, f"no such path: {request.path[:80]} (GET /openapi.json lists them)")
        try:
            data: dict[str, Any] = {}
            if route.body is not None:
                if not request.body.strip():
                    raise Fault(f"{route.method} {route.path} needs a JSON body")
                data = route.body.check(parse_json(request.body))
            handler = HANDLERS[(route.method, route.path)]
            if route.method == "GET" or route.path in UNLOCKED:
                result = handler(self, params, data)  # never waits behind a long request
            else:
                with self._lock:
                    result = handler(self, params, data)
        except Fault as e:
            self._log("Error", f"{request.method} {request.path}: {e}")
            return fault(e.status, str(e))
        except BadRequest as e:
            return fault(e.status, str(e))
        except (SchemaError, KvmkitError) as e:
            self._log("Error", f"{request.method} {request.path}: {e}")
            return fault(400, str(e))
        self._log("Info", f"{request.method} {request.path}: done")
        if route.response == "json":
            return Response(200, result)
        return Response(204)

    # -- the config file -----------------------------------------------------------------
    def apply_config(self, config: Any, source: str) -> None:
        """Fill the resources from a Firecracker config file's object (keys as in
        GET /vm/config); ConfigError names the key and the fix."""
        if not isinstance(config, dict):
            raise ConfigError(f"{source}: the config file must hold one JSON object")
        unknown = [k for k in config if k not in CONFIG_KEYS]
        if unknown:
            raise ConfigError(
                f"{source}: unknown key {unknown[0][:40]!r}: the config file takes"
                f" {', '.join(CONFIG_KEYS)}"
            )
        if config.get("boot-source") is None and config.get("kvmkit-boot-program") is None:
            raise ConfigError(
                f"{source}: no 'boot-source': add {{\"kernel_image_path\": ...}} (or the"
                " kvmkit extension 'kvmkit-boot-program')"
            )
        self.apply_keys(config, source)

    def apply_keys(self, config: dict[str, Any], source: str) -> None:
        """Apply each known key of `config` through its PUT handler."""
        for key, (method, path, id_field) in CONFIG_KEYS.items():
            if config.get(key) is None:  # GET /vm/config writes null for what is not set
                continue
            items = config[key] if id_field else [config[key]]
            if id_field and not isinstance(items, list):
                raise ConfigError(f"{source}: key '{key}' must be an array of objects")
            for item in items:
                params = {}
                if id_field:
                    if not isinstance(item, dict) or not isinstance(item.get(id_field), str):
                        raise ConfigError(
                            f"{source}: every entry of '{key}' needs a string '{id_field}'"
                        )
                    params[id_field] = item[id_field]
                route = ROUTE_BY_KEY[(method, path)]
                try:
                    assert route.body is not None
                    data = route.body.check(item)
                    with self._lock:
                        HANDLERS[(method, path)](self, params, data)
                except (Fault, SchemaError, KvmkitError) as e:
                    raise ConfigError(f"{source}: key '{key}': {e}") from None

    def start_instance(self) -> None:
        with self._lock:
            run.instance_start(self)
        self._log("Info", "InstanceStart (from the config file): the machine is built")


# -- the route table -------------------------------------------------------------------
B = bodies
ROUTES: dict[Route, Handler] = {
    Route("GET", "/", "the instance: id, state, version", None, False, "json", B.INSTANCE_INFO): (
        run.get_root
    ),
    Route("GET", "/version", "the API version", None, False, "json", B.VERSION): run.get_version,
    Route("PUT", "/actions", "InstanceStart, SendCtrlAltDel, FlushMetrics", B.ACTIONS): (
        run.put_actions
    ),
    Route(
        "GET", "/machine-config", "vCPUs and memory", None, False, "json", B.MACHINE_CONFIG_INFO
    ): (pre.get_machine_config),
    Route("PUT", "/machine-config", "set vCPUs and memory (pre-boot)", B.MACHINE_CONFIG): (
        pre.put_machine_config
    ),
    Route("PATCH", "/machine-config", "change some fields (pre-boot)", B.MACHINE_CONFIG_PATCH): (
        pre.patch_machine_config
    ),
    Route("PUT", "/boot-source", "the kernel (pre-boot)", B.BOOT_SOURCE): pre.put_boot_source,
    Route("PUT", "/drives/{drive_id}", "a virtio-blk drive (pre-boot)", B.DRIVE): pre.put_drive,
    Route(
        "PATCH", "/drives/{drive_id}", "change a drive (post-boot)", B.DRIVE_PATCH
    ): pre.patch_drive,
    Route(
        "PUT", "/network-interfaces/{iface_id}", "a virtio-net on a tap (pre-boot)", B.NET
    ): pre.put_net,
    Route(
        "PATCH", "/network-interfaces/{iface_id}", "change an interface", B.NET_PATCH
    ): pre.patch_net,
    Route("PUT", "/vsock", "a virtio-vsock (pre-boot)", B.VSOCK): pre.put_vsock,
    Route("PUT", "/entropy", "a virtio-rng (pre-boot)", B.ENTROPY): pre.put_entropy,
    Route("GET", "/balloon", "the balloon's configuration", None, False, "json", B.BALLOON): (
        pre.get_balloon
    ),
    Route("PUT", "/balloon", "a virtio-balloon (pre-boot)", B.BALLOON): pre.put_balloon,
    Route("PATCH", "/balloon", "a new balloon target (post-boot)", B.BALLOON_PATCH): (
        run.patch_balloon
    ),
    Route(
        "GET", "/balloon/statistics", "balloon statistics", None, False, "json", B.BALLOON_STATS
    ): (run.get_balloon_stats),
    Route("PATCH", "/balloon/statistics", "the statistics interval", B.BALLOON_STATS_PATCH): (
        run.patch_balloon_stats
    ),
    Route("PUT", "/logger", "the API log", B.LOGGER): pre.put_logger,
    Route("PUT", "/metrics", "the metrics file (JSON lines)", B.METRICS): pre.put_metrics,
    Route("GET", "/mmds", "the metadata store", response="json"): pre.get_mmds,
    Route("PUT", "/mmds", "replace the metadata store", B.MMDS): pre.put_mmds,
    Route("PATCH", "/mmds", "merge into the metadata store (RFC 7396)", B.MMDS): pre.patch_mmds,
    Route("PUT", "/mmds/config", "refused: no MMDS network stack", B.MMDS_CONFIG): (
        pre.put_mmds_config
    ),
    Route("PATCH", "/vm", "pause or resume (post-boot)", B.VM_STATE): run.patch_vm,
    Route("GET", "/vm/config", "the whole configuration", response="json"): run.get_vm_config,
    Route("PUT", "/snapshot/create", "state and memory files (paused)", B.SNAPSHOT_CREATE): (
        run.snapshot_create
    ),
    Route("PUT", "/snapshot/load", "restore (pre-boot, nothing configured)", B.SNAPSHOT_LOAD): (
        run.snapshot_load
    ),
    Route("GET", "/openapi.json", "this API's OpenAPI document", kvmkit=True, response="json"): (
        run.get_openapi
    ),
    Route("PUT", "/kvmkit/boot-program", "boot a kvmkit guest program", B.BOOT_PROGRAM, True): (
        pre.put_boot_program
    ),
    Route("GET", "/kvmkit/check", "the host's KVM facts", kvmkit=True, response="json"): (
        run.get_check
    ),
    Route(
        "PUT", "/kvmkit/migrate", "live-migrate (the report)", B.MIGRATE, True, "json"
    ): run.put_migrate,
    Route(
        "PUT", "/kvmkit/migrate-receive", "wait for a live migration", B.MIGRATE_RECEIVE, True
    ): run.put_migrate_receive,
    Route("GET", "/kvmkit/migration", "the migration's progress", None, True, "json"): (
        run.get_migration
    ),
}
HANDLERS = {(r.method, r.path): h for r, h in ROUTES.items()}
# Requests that may take long and change nothing the others check under the lock: a
# migration runs beside pauses and GETs, as with kvmkit's NDJSON API.
UNLOCKED = {"/kvmkit/migrate"}
ROUTE_BY_KEY = {(r.method, r.path): r for r in ROUTES}
# The config file's keys: (method, path, the id field of a list's entries).
CONFIG_KEYS: dict[str, tuple[str, str, str | None]] = {
    "logger": ("PUT", "/logger", None),
    "metrics": ("PUT", "/metrics", None),
    "machine-config": ("PUT", "/machine-config", None),
    "boot-source": ("PUT", "/boot-source", None),
    "kvmkit-boot-program": ("PUT", "/kvmkit/boot-program", None),
    "drives": ("PUT", "/drives/{drive_id}", "drive_id"),
    "network-interfaces": ("PUT", "/network-interfaces/{iface_id}", "iface_id"),
    "vsock": ("PUT", "/vsock", None),
    "balloon": ("PUT", "/balloon", None),
    "entropy": ("PUT", "/entropy", None),
    "mmds-config": ("PUT", "/mmds/config", None),
}
PARAM = re.compile(r"\{(\w+)\}")  # a path parameter, as Firecracker names it: {drive_id}
_PATTERNS = [(r, re.compile("^" + PARAM.sub(r"(?P<\1>[^/]+)", r.path) + "$")) for r in ROUTES]


def match(method: str, path: str) -> tuple[Route | None, dict[str, str], list[str]]:
    """The route for `method path` and its parameters; else the methods the path takes."""
    allowed = []
    for route, pattern in _PATTERNS:
        m = pattern.match(path)
        if m is None:
            continue
        if route.method == method:
            return route, m.groupdict(), []
        allowed.append(route.method)
    return None, {}, allowed
