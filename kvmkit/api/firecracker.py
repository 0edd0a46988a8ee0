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

import json
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from kvmkit import __version__
from kvmkit.api import fc_bodies as bodies
from kvmkit.api import fc_snapshot
from kvmkit.api.http import BadRequest, Request, Response, fault, parse_json
from kvmkit.api.schema import Body, SchemaError
from kvmkit.devices.virtio.balloon import VirtioBalloon
from kvmkit.errors import ConfigError, KvmkitError
from kvmkit.machine import Machine, VmResources, build_for_boot
from kvmkit.machine.builder import RestoreOptions, build_from_saved
from kvmkit.machine.pause import USER
from kvmkit.machine.resources import (
    BalloonSpec,
    DriveSpec,
    EntropySpec,
    LinuxBoot,
    MachineSpec,
    NetSpec,
    ProgramBoot,
    VsockSpec,
)
from kvmkit.memory.layout import MIB

FC_API_VERSION = "1.17.0"  # the Firecracker API level kvmkit answers as
DEFAULT_MEM_MIB = 128  # Firecracker's default machine-config
INSTANCE_ID = "anonymous-instance"
SNAPSHOT_HOLDER = "fc-snapshot"
START_WAIT_S = 10.0
PRE_BOOT = "is only allowed before InstanceStart: the microVM is already running"
POST_BOOT = "is only allowed after InstanceStart: the microVM is not started yet"


class Fault(Exception):
    """A request refused: answered with `status` and {"fault_message": message}."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Route:
    method: str
    path: str  # with {param} placeholders
    summary: str
    body: Body | None = None
    kvmkit: bool = False  # a kvmkit extension
    response: str = "empty"  # empty (204) or json (200)
    returns: Body | None = None  # the 200 answer's schema, where it has a fixed shape


Handler = Callable[["FirecrackerVmm", dict[str, str], dict[str, Any]], Any]


class FirecrackerVmm:
    """The state of one microVM as Firecracker's API sees it."""

    def __init__(self, machine_spec: MachineSpec | None = None, console: str | None = None) -> None:
        spec = machine_spec or MachineSpec()
        spec = replace(spec, memory_bytes=DEFAULT_MEM_MIB * MIB)
        self.resources = VmResources(machine=spec)
        if console is not None:
            from kvmkit.machine.resources import ConsoleSpec

            self.resources = self.resources.with_console(ConsoleSpec(console))
        self.fc_machine: dict[str, Any] = {
            "vcpu_count": spec.vcpus,
            "mem_size_mib": DEFAULT_MEM_MIB,
            "smt": False,
            "track_dirty_pages": False,
            "huge_pages": "None",
        }
        self.boot_source: dict[str, Any] | None = None
        self.drives: dict[str, dict[str, Any]] = {}
        self.nets: dict[str, dict[str, Any]] = {}
        self.vsock: dict[str, Any] | None = None
        self.balloon: dict[str, Any] | None = None
        self.entropy: dict[str, Any] | None = None
        self.logger: dict[str, Any] | None = None
        self.metrics: dict[str, Any] | None = None
        self.mmds: dict[str, Any] | None = None
        self.mmds_config: dict[str, Any] | None = None
        self.configured = False  # a boot-specific resource was set: no snapshot/load
        self.machine: Machine | None = None
        self.ready = threading.Event()  # set once `machine` exists
        self.requests = 0
        self._lock = threading.RLock()

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

    # -- state ---------------------------------------------------------------------------
    @property
    def started(self) -> bool:
        return self.machine is not None

    def state(self) -> str:
        if self.machine is None:
            return "Not started"
        return "Paused" if _user_paused(self.machine) else "Running"

    def pre_boot(self, what: str) -> None:
        if self.started:
            raise Fault(f"{what} {PRE_BOOT}")

    def post_boot(self, what: str) -> Machine:
        if self.machine is None:
            raise Fault(f"{what} {POST_BOOT}")
        if not self.machine.alive:
            raise Fault(f"{what}: the microVM has ended")
        return self.machine

    def wait_for_machine(self) -> Machine:
        """Block the main thread until InstanceStart or snapshot/load built the machine
        (Ctrl-C and SIGTERM still end the wait)."""
        while not self.ready.wait(0.25):
            pass
        assert self.machine is not None
        return self.machine

    def _set_machine(self, machine: Machine) -> None:
        self.machine = machine
        self.ready.set()

    # -- the logger and metrics --------------------------------------------------------
    def _log(self, level: str, message: str) -> None:
        cfg = self.logger
        if cfg is None or not cfg.get("log_path"):
            return
        wanted = cfg.get("level", "Info")
        order = bodies.LOG_LEVELS
        if wanted == "Off" or order.index(level) > order.index(wanted):
            return
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
        shown = f":{level.upper()}" if cfg.get("show_level") else ""
        _append(cfg["log_path"], f"{stamp} [{INSTANCE_ID}:kvmkit-api{shown}] {message}\n")

    def flush_metrics(self) -> None:
        if self.metrics is None:
            raise Fault("FlushMetrics: configure metrics first (PUT /metrics)")
        line: dict[str, Any] = {
            "utc_timestamp_ms": int(time.time() * 1000),
            "api_server": {"requests": self.requests},
            "vmm": {"state": self.state()},
        }
        if self.machine is not None and self.machine.memory is not None:
            status = self.machine.status()
            line["kvmkit"] = {
                k: status[k] for k in ("vcpus", "memory_bytes", "backend", "uptime_s")
            }
        _append(self.metrics["metrics_path"], json.dumps(line) + "\n")

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
        for key, (method, path, id_field) in CONFIG_KEYS.items():
            if config.get(key) is None:  # GET /vm/config writes null for what is not set
                continue
            items = config[key] if id_field else [config[key]]
            if id_field and not isinstance(items, list):
                raise ConfigError(f"{source}: key '{key}' must be a list of objects")
            for item in items:
                params = {}
                if id_field:
                    if not isinstance(item, dict) or not isinstance(item.get(id_field), str):
                        raise ConfigError(
                            f"{source}: every entry of '{key}' needs a string '{id_field}'"
                        )
                    params["id"] = item[id_field]
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
            _instance_start(self)


def _user_paused(machine: Machine) -> bool:
    """Paused by the API's (the user's) pause: PATCH /vm Paused, or a load without
    resume_vm (which holds the vCPUs at their first KVM_RUN)."""
    return machine.gate.held_by(USER)


def _append(path: str, text: str) -> None:
    try:
        with open(path, "a") as f:
            f.write(text)
    except OSError:
        pass  # a log or metrics sink that went away must not fail the request


# -- handlers --------------------------------------------------------------------------
def _get_root(vmm: FirecrackerVmm, p: dict[str, str], d: dict[str, Any]) -> Any:
    return {
        "id": INSTANCE_ID,
        "state": vmm.state(),
        "vmm_version": __version__,
        "app_name": "kvmkit",
    }


def _get_version(vmm: FirecrackerVmm, p: dict[str, str], d: dict[str, Any]) -> Any:
    return {"firecracker_version": FC_API_VERSION, "kvmkit_version": __version__}


def _get_machine_config(vmm: FirecrackerVmm, p: dict[str, str], d: dict[str, Any]) -> Any:
    spec = vmm.resources.machine
    return {
        **vmm.fc_machine,
        "kvmkit_memory_backend": spec.memory_backend,
        "kvmkit_hide_guest_memory": spec.hide,
    }


def _put_machine_config(vmm: FirecrackerVmm, p: dict[str, str], d: dict[str, Any]) -> None:
    vmm.pre_boot("PUT /machine-config")
    _machine_config(vmm, d, {"smt": False, "track_dirty_pages": False, "huge_pages": "None"})


def _patch_machine_config(vmm: FirecrackerVmm, p: dict[str, str], d: dict[str, Any]) -> None:
    vmm.pre_boot("PATCH /machine-config")
    _machine_config(vmm, d, {})


def _machine_config(vmm: FirecrackerVmm, d: dict[str, Any], defaults: dict[str, Any]) -> None:
    if d.get("smt"):
        raise Fault("machine-config: smt true is not supported: kvmkit gives one thread a core")
    template = d.get("cpu_template")
    if template not in (None, "None"):
        raise Fault(
            f"machine-config: cpu_template {str(template)[:20]!r} is not supported: kvmkit"
            " gives the guest the host's CPUID (adjusted); use None"
        )
    fc = {**vmm.fc_machine, **defaults}
    fc.update({k: v for k, v in d.items() if not k.startswith("kvmkit_") and k != "cpu_template"})
    spec = vmm.resources.machine
    backend = d.get("kvmkit_memory_backend", spec.memory_backend)
    huge = fc.get("huge_pages", "None")
    if huge != "None":
        wanted = {"2M": "hugetlb", "Transparent": "thp"}[huge]
        if "kvmkit_memory_backend" in d and backend not in (wanted, "auto"):
            raise Fault(
                f"machine-config: huge_pages {huge} means kvmkit_memory_backend {wanted}, not"
                f" {backend}: give one of them"
            )
        backend = wanted
    elif "huge_pages" in d and spec.memory_backend in ("hugetlb", "thp"):
        backend = "auto"
    spec = replace(
        spec,
        vcpus=fc["vcpu_count"],
        memory_bytes=fc["mem_size_mib"] * MIB,
        memory_backend=backend,
        hugepage_size=2 * MIB,
        hide=d.get("kvmkit_hide_guest_memory", spec.hide),
    )
    vmm.resources = vmm.resources.with_machine(spec)
    vmm.fc_machine = fc
    vmm.configured = True


def _put_boot_source(vmm: FirecrackerVmm, p: dict[str, str], d: dict[str, Any]) -> None:
    vmm.pre_boot("PUT /boot-source")
    boot = LinuxBoot(
        d["kernel_image_path"], d.get("initrd_path"), d.get("boot_args", "console=ttyS0")
    )
    boot.validate(vmm.resources.machine.memory_bytes)
    vmm.resources = vmm.resources.with_boot(boot)
    vmm.boot_source = d
    vmm.configured = True


def _put_boot_program(vmm: FirecrackerVmm, p: dict[str, str], d: dict[str, Any]) -> None:
    vmm.pre_boot("PUT /kvmkit/boot-program")
    boot = ProgramBoot(d["guest"], guest_arg=d.get("guest_arg", 0))
    boot.validate(vmm.resources.machine.memory_bytes)
    vmm.resources = vmm.resources.with_boot(boot)
    vmm.boot_source = {"kvmkit_boot_program": d}
    vmm.configured = True


def _check_id(p: dict[str, str], d: dict[str, Any], field: str) -> str:
    if d[field] != p["id"]:
        raise Fault(
            f"the body's {field} {d[field][:40]!r} differs from the path's {p['id'][:40]!r}:"
            " give the same id"
        )
    return p["id"]


def _refuse_rate_limiters(what: str, d: dict[str, Any], *names: str) -> None:
    for name in names:
        if d.get(name) is not None:
            raise Fault(f"{what}: {name} is not supported: kvmkit has no I/O rate limiter")


def _put_drive(vmm: FirecrackerVmm, p: dict[str, str], d: dict[str, Any]) -> None:
    vmm.pre_boot("PUT /drives")
    drive_id = _check_id(p, d, "drive_id")
    what = f"drive {drive_id}"
    _refuse_rate_limiters(what, d, "rate_limiter")
    if d.get("socket") is not None:
        raise Fault(f"{what}: socket (vhost-user) is not supported: give path_on_host")
    if d.get("partuuid") is not None:
        raise Fault(f"{what}: partuuid is not supported: kvmkit roots on the whole drive")
    if d.get("io_engine", "Sync") != "Sync":
        raise Fault(f"{what}: io_engine Async is not supported: use Sync")
    if "path_on_host" not in d:
        raise Fault(f"{what}: missing path_on_host: the raw file or block device to serve")
    spec = DriveSpec(
        drive_id,
        d["path_on_host"],
        read_only=d.get("is_read_only", False),
        root=d["is_root_device"],
        cache=d.get("cache_type", "Unsafe").lower(),
    )
    vmm.resources = vmm.resources.with_drive(spec)
    vmm.drives[drive_id] = d
    vmm.configured = True


def _patch_drive(vmm: FirecrackerVmm, p: dict[str, str], d: dict[str, Any]) -> None:
    vmm.post_boot("PATCH /drives")
    drive_id = _check_id(p, d, "drive_id")
    if drive_id not in vmm.drives:
        raise Fault(f"no drive {drive_id!r}: PATCH changes a drive PUT before InstanceStart")
    _refuse_rate_limiters(f"drive {drive_id}", d, "rate_limiter")
    if "path_on_host" in d and d["path_on_host"] != vmm.drives[drive_id]["path_on_host"]:
        raise Fault(
            f"drive {drive_id}: changing path_on_host of a running drive is not supported:"
            " kvmkit's virtio-blk cannot swap its backing file; stop, and boot with the new path"
        )


def _put_net(vmm: FirecrackerVmm, p: dict[str, str], d: dict[str, Any]) -> None:
    vmm.pre_boot("PUT /network-interfaces")
    iface_id = _check_id(p, d, "iface_id")
    _refuse_rate_limiters(f"network interface {iface_id}", d, "rx_rate_limiter", "tx_rate_limiter")
    spec = NetSpec(iface_id, d["host_dev_name"], d.get("guest_mac"))
    vmm.resources = vmm.resources.with_net(spec)
    vmm.nets[iface_id] = d
    vmm.configured = True


def _patch_net(vmm: FirecrackerVmm, p: dict[str, str], d: dict[str, Any]) -> None:
    vmm.post_boot("PATCH /network-interfaces")
    iface_id = _check_id(p, d, "iface_id")
    if iface_id not in vmm.nets:
        raise Fault(f"no network interface {iface_id!r}: PUT it before InstanceStart")
    _refuse_rate_limiters(f"network interface {iface_id}", d, "rx_rate_limiter", "tx_rate_limiter")


def _put_vsock(vmm: FirecrackerVmm, p: dict[str, str], d: dict[str, Any]) -> None:
    vmm.pre_boot("PUT /vsock")
    vmm.resources = vmm.resources.with_vsock(VsockSpec(d["guest_cid"], d["uds_path"]))
    vmm.vsock = d


def _put_entropy(vmm: FirecrackerVmm, p: dict[str, str], d: dict[str, Any]) -> None:
    vmm.pre_boot("PUT /entropy")
    _refuse_rate_limiters("entropy", d, "rate_limiter")
    vmm.resources = vmm.resources.with_entropy(EntropySpec())
    vmm.entropy = d
    vmm.configured = True


def _get_balloon(vmm: FirecrackerVmm, p: dict[str, str], d: dict[str, Any]) -> Any:
    if vmm.balloon is None:
        raise Fault("no balloon is configured: PUT /balloon before InstanceStart")
    return vmm.balloon


def _put_balloon(vmm: FirecrackerVmm, p: dict[str, str], d: dict[str, Any]) -> None:
    vmm.pre_boot("PUT /balloon")
    if d.get("free_page_hinting"):
        raise Fault("balloon: free_page_hinting is not supported: use free_page_reporting")
    spec = BalloonSpec(
        d["amount_mib"],
        d["deflate_on_oom"],
        d.get("stats_polling_interval_s", 0),
        d.get("free_page_reporting", False),
    )
    vmm.resources = vmm.resources.with_balloon(spec)
    vmm.balloon = {"stats_polling_interval_s": 0, **d}
    vmm.configured = True


def _balloon_device(vmm: FirecrackerVmm, what: str) -> VirtioBalloon:
    machine = vmm.post_boot(what)
    if vmm.balloon is None:
        raise Fault(f"{what}: no balloon is configured (PUT /balloon before InstanceStart)")
    for device in machine.devices.values():
        if isinstance(device, VirtioBalloon):
            return device
    raise Fault(f"{what}: this machine has no virtio-balloon device")


def _patch_balloon(vmm: FirecrackerVmm, p: dict[str, str], d: dict[str, Any]) -> None:
    device = _balloon_device(vmm, "PATCH /balloon")
    assert vmm.machine is not None and vmm.machine.memory is not None
    size_mib = vmm.machine.memory.size_bytes >> 20
    if d["amount_mib"] > size_mib:
        raise Fault(
            f"balloon: amount_mib {d['amount_mib']} is more than the guest's {size_mib} MiB"
        )
    device.set_target(d["amount_mib"])
    assert vmm.balloon is not None
    vmm.balloon["amount_mib"] = d["amount_mib"]


def _get_balloon_stats(vmm: FirecrackerVmm, p: dict[str, str], d: dict[str, Any]) -> Any:
    device = _balloon_device(vmm, "GET /balloon/statistics")
    if not device.config.stats_interval_s:
        raise Fault(
            "balloon statistics are not enabled: PUT /balloon with stats_polling_interval_s"
            " above 0 before InstanceStart"
        )
    stats = dict(device.stats)
    return {
        "target_pages": device.target_pages,
        "actual_pages": device.actual_pages,
        "target_mib": device.target_pages >> 8,
        "actual_mib": device.actual_pages >> 8,
        **{k: v for k, v in stats.items() if not k.startswith("tag")},
    }


def _patch_balloon_stats(vmm: FirecrackerVmm, p: dict[str, str], d: dict[str, Any]) -> None:
    device = _balloon_device(vmm, "PATCH /balloon/statistics")
    interval = d["stats_polling_interval_s"]
    if interval != device.config.stats_interval_s:
        raise Fault(
            f"balloon: changing stats_polling_interval_s after boot (from"
            f" {device.config.stats_interval_s} to {interval}) is not supported: kvmkit sets"
            " the statistics timer when it builds the device"
        )


def _put_logger(vmm: FirecrackerVmm, p: dict[str, str], d: dict[str, Any]) -> None:
    path = d.get("log_path")
    if path is not None:
        _check_sink(path, "log_path")
    vmm.logger = {"level": "Info", **d}


def _put_metrics(vmm: FirecrackerVmm, p: dict[str, str], d: dict[str, Any]) -> None:
    if vmm.metrics is not None:
        raise Fault("metrics are already configured: they can be set once, as in Firecracker")
    _check_sink(d["metrics_path"], "metrics_path")
    vmm.metrics = d


def _check_sink(path: str, field: str) -> None:
    try:
        with open(path, "a"):
            pass
    except OSError as e:
        raise Fault(f"{field} {path[:80]}: cannot open it for writing: {e.strerror}") from None


def _get_mmds(vmm: FirecrackerVmm, p: dict[str, str], d: dict[str, Any]) -> Any:
    return vmm.mmds or {}


def _put_mmds(vmm: FirecrackerVmm, p: dict[str, str], d: dict[str, Any]) -> None:
    vmm.mmds = d


def _patch_mmds(vmm: FirecrackerVmm, p: dict[str, str], d: dict[str, Any]) -> None:
    if vmm.mmds is None:
        raise Fault("the MMDS store is empty: PUT /mmds before PATCH")
    vmm.mmds = _merge_patch(vmm.mmds, d)


def _merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7396 JSON merge patch."""
    if not isinstance(patch, dict):
        return patch
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = _merge_patch(out.get(key), value)
    return out


def _put_mmds_config(vmm: FirecrackerVmm, p: dict[str, str], d: dict[str, Any]) -> None:
    vmm.pre_boot("PUT /mmds/config")
    raise Fault(
        "mmds-config is not supported: kvmkit has no MMDS network stack, so the guest cannot"
        " reach the store at 169.254.169.254 (PUT/PATCH/GET /mmds still keep a store for"
        " clients)"
    )


def _put_actions(vmm: FirecrackerVmm, p: dict[str, str], d: dict[str, Any]) -> None:
    action = d["action_type"]
    if action == "InstanceStart":
        _instance_start(vmm)
        _wait_until_running(vmm)
    elif action == "FlushMetrics":
        vmm.flush_metrics()
    else:
        machine = vmm.post_boot("SendCtrlAltDel")
        machine.control.guest_reset("Ctrl-Alt-Del through the API: the i8042 reset line")


def _instance_start(vmm: FirecrackerVmm) -> None:
    if vmm.started:
        raise Fault("InstanceStart: the microVM is already running; it starts once")
    if vmm.boot_source is None:
        raise Fault(
            "InstanceStart: no boot source: PUT /boot-source with kernel_image_path first"
            " (or the kvmkit extension PUT /kvmkit/boot-program)"
        )
    machine = build_for_boot(vmm.resources)
    vmm._set_machine(machine)


def _wait_until_running(vmm: FirecrackerVmm) -> None:
    """Answer InstanceStart once the main thread runs the machine, as Firecracker does."""
    machine = vmm.machine
    deadline = time.monotonic() + START_WAIT_S
    while machine is not None and machine.started_at is None and machine.alive:
        if time.monotonic() > deadline:
            break
        time.sleep(0.01)


def _patch_vm(vmm: FirecrackerVmm, p: dict[str, str], d: dict[str, Any]) -> None:
    machine = vmm.post_boot("PATCH /vm")
    if d["state"] == "Paused":
        machine.pause()
    else:
        machine.resume()


def _get_vm_config(vmm: FirecrackerVmm, p: dict[str, str], d: dict[str, Any]) -> Any:
    boot = vmm.boot_source or {}
    out: dict[str, Any] = {
        "machine-config": _get_machine_config(vmm, p, d),
        "drives": list(vmm.drives.values()),
        "network-interfaces": list(vmm.nets.values()),
        "vsock": vmm.vsock,
        "balloon": vmm.balloon,
        "entropy": vmm.entropy,
        "logger": vmm.logger,
        "metrics": vmm.metrics,
        "mmds-config": vmm.mmds_config,
    }
    if "kvmkit_boot_program" in boot:
        out["kvmkit-boot-program"] = boot["kvmkit_boot_program"]
        out["boot-source"] = None
    else:
        out["boot-source"] = boot or None
    return out


def _snapshot_create(vmm: FirecrackerVmm, p: dict[str, str], d: dict[str, Any]) -> None:
    machine = vmm.post_boot("PUT /snapshot/create")
    if d.get("snapshot_type", "Full") != "Full":
        raise Fault("snapshot_type Diff is not supported: kvmkit writes Full snapshots")
    if not _user_paused(machine):
        raise Fault(
            'PUT /snapshot/create needs the microVM paused: PATCH /vm {"state": "Paused"} first'
        )
    if machine.memory is not None and machine.memory.hidden:
        raise Fault("snapshot: guest memory is hidden from kvmkit, so it cannot be saved")
    if machine.lazy is not None:
        machine.lazy.finish()
    machine.pause(holder=SNAPSHOT_HOLDER)
    try:
        machine.console.flush()
        fc_snapshot.save_split(machine, d["snapshot_path"], d["mem_file_path"])
    finally:
        machine.resume(SNAPSHOT_HOLDER)


def _snapshot_load(vmm: FirecrackerVmm, p: dict[str, str], d: dict[str, Any]) -> None:
    if vmm.started:
        raise Fault("PUT /snapshot/load is only allowed before the microVM starts")
    if vmm.configured:
        raise Fault(
            "PUT /snapshot/load is not allowed after configuring boot-specific resources"
            " (machine-config, boot-source, drives, ...): start a fresh kvmkit for a restore"
        )
    if d.get("network_overrides"):
        raise Fault("network_overrides is not supported: kvmkit snapshots hold no network devices")
    if d.get("enable_diff_snapshots") or d.get("track_dirty_pages"):
        raise Fault("Diff snapshots are not supported: leave enable_diff_snapshots false")
    backend = d.get("mem_backend")
    if backend is not None and "mem_file_path" in d:
        raise Fault("give mem_backend or the older mem_file_path, not both")
    if backend is None:
        if "mem_file_path" not in d:
            raise Fault("PUT /snapshot/load needs mem_backend (or the older mem_file_path)")
        backend = {"backend_type": "File", "backend_path": d["mem_file_path"]}
    snap = fc_snapshot.open_state(d["snapshot_path"])
    options = RestoreOptions(console=vmm.resources.console.target)
    source: fc_snapshot.SplitSource | None = None
    try:
        if backend["backend_type"] == "Uffd":
            source = fc_snapshot.UffdSource(snap, backend["backend_path"])
            wanted = vmm.resources.machine.memory_backend
            if wanted == "auto" and snap.saved.description.backend == "guest_memfd":
                wanted = "memfd"  # userfaultfd cannot register guest_memfd (EINVAL on 6.18)
            if wanted != "auto":
                options = replace(options, memory_backend=wanted)
        else:
            source = fc_snapshot.SplitSource(snap, backend["backend_path"])
        machine = build_from_saved(source, options)
    except BaseException:
        if isinstance(source, fc_snapshot.UffdSource) and source.served is not None:
            source.served.close()
        raise
    finally:
        snap.close()
    if isinstance(source, fc_snapshot.UffdSource) and source.served is not None:
        machine.lazy = source.served
    machine.restored_from = d["snapshot_path"]
    if not d.get("resume_vm", False):
        machine.request_pause()  # held at the first KVM_RUN until PATCH /vm Resumed
    vmm.fc_machine.update(
        vcpu_count=machine.description.vcpus,
        mem_size_mib=machine.description.memory_bytes // MIB,
    )
    vmm._set_machine(machine)


def _get_check(vmm: FirecrackerVmm, p: dict[str, str], d: dict[str, Any]) -> Any:
    from kvmkit.hostcheck.kvm_probes import gather

    return gather(probes=False)


def _put_migrate(vmm: FirecrackerVmm, p: dict[str, str], d: dict[str, Any]) -> Any:
    from kvmkit.migration import migrate

    machine = vmm.post_boot("PUT /kvmkit/migrate")
    report = migrate(
        machine,
        d["to"],
        max_downtime_ms=float(d.get("max_downtime_ms", 20)),
        bandwidth_bps=d.get("bandwidth_bps", 0),
        auto_converge=d.get("auto_converge", False),
        max_iterations=d.get("max_iterations", 30),
    )
    return report.to_dict()


def _get_openapi(vmm: FirecrackerVmm, p: dict[str, str], d: dict[str, Any]) -> Any:
    from kvmkit.api.openapi import document

    return document()


# -- the route table -------------------------------------------------------------------
B = bodies
ROUTES: dict[Route, Handler] = {
    Route("GET", "/", "the instance: id, state, version", None, False, "json", B.INSTANCE_INFO): (
        _get_root
    ),
    Route("GET", "/version", "the API version", None, False, "json", B.VERSION): _get_version,
    Route("PUT", "/actions", "InstanceStart, SendCtrlAltDel, FlushMetrics", B.ACTIONS): (
        _put_actions
    ),
    Route(
        "GET", "/machine-config", "vCPUs and memory", None, False, "json", B.MACHINE_CONFIG_INFO
    ): (_get_machine_config),
    Route("PUT", "/machine-config", "set vCPUs and memory (pre-boot)", B.MACHINE_CONFIG): (
        _put_machine_config
    ),
    Route("PATCH", "/machine-config", "change some fields (pre-boot)", B.MACHINE_CONFIG_PATCH): (
        _patch_machine_config
    ),
    Route("PUT", "/boot-source", "the kernel (pre-boot)", B.BOOT_SOURCE): _put_boot_source,
    Route("PUT", "/drives/{id}", "a virtio-blk drive (pre-boot)", B.DRIVE): _put_drive,
    Route("PATCH", "/drives/{id}", "change a drive (post-boot)", B.DRIVE_PATCH): _patch_drive,
    Route("PUT", "/network-interfaces/{id}", "a virtio-net on a tap (pre-boot)", B.NET): _put_net,
    Route("PATCH", "/network-interfaces/{id}", "change an interface", B.NET_PATCH): _patch_net,
    Route("PUT", "/vsock", "a virtio-vsock (pre-boot)", B.VSOCK): _put_vsock,
    Route("PUT", "/entropy", "a virtio-rng (pre-boot)", B.ENTROPY): _put_entropy,
    Route("GET", "/balloon", "the balloon's configuration", None, False, "json", B.BALLOON): (
        _get_balloon
    ),
    Route("PUT", "/balloon", "a virtio-balloon (pre-boot)", B.BALLOON): _put_balloon,
    Route("PATCH", "/balloon", "a new balloon target (post-boot)", B.BALLOON_PATCH): (
        _patch_balloon
    ),
    Route(
        "GET", "/balloon/statistics", "balloon statistics", None, False, "json", B.BALLOON_STATS
    ): (_get_balloon_stats),
    Route("PATCH", "/balloon/statistics", "the statistics interval", B.BALLOON_STATS_PATCH): (
        _patch_balloon_stats
    ),
    Route("PUT", "/logger", "the API log", B.LOGGER): _put_logger,
    Route("PUT", "/metrics", "the metrics file (JSON lines)", B.METRICS): _put_metrics,
    Route("GET", "/mmds", "the metadata store", response="json"): _get_mmds,
    Route("PUT", "/mmds", "replace the metadata store", B.MMDS): _put_mmds,
    Route("PATCH", "/mmds", "merge into the metadata store (RFC 7396)", B.MMDS): _patch_mmds,
    Route("PUT", "/mmds/config", "refused: no MMDS network stack", B.MMDS_CONFIG): (
        _put_mmds_config
    ),
    Route("PATCH", "/vm", "pause or resume (post-boot)", B.VM_STATE): _patch_vm,
    Route("GET", "/vm/config", "the whole configuration", response="json"): _get_vm_config,
    Route("PUT", "/snapshot/create", "state and memory files (paused)", B.SNAPSHOT_CREATE): (
        _snapshot_create
    ),
    Route("PUT", "/snapshot/load", "restore (pre-boot, nothing configured)", B.SNAPSHOT_LOAD): (
        _snapshot_load
    ),
    Route("GET", "/openapi.json", "this API's OpenAPI document", kvmkit=True, response="json"): (
        _get_openapi
    ),
    Route("PUT", "/kvmkit/boot-program", "boot a kvmkit guest program", B.BOOT_PROGRAM, True): (
        _put_boot_program
    ),
    Route("GET", "/kvmkit/check", "the host's KVM facts", kvmkit=True, response="json"): (
        _get_check
    ),
    Route(
        "PUT", "/kvmkit/migrate", "live-migrate (the report)", B.MIGRATE, True, "json"
    ): _put_migrate,
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
    "drives": ("PUT", "/drives/{id}", "drive_id"),
    "network-interfaces": ("PUT", "/network-interfaces/{id}", "iface_id"),
    "vsock": ("PUT", "/vsock", None),
    "balloon": ("PUT", "/balloon", None),
    "entropy": ("PUT", "/entropy", None),
    "mmds-config": ("PUT", "/mmds/config", None),
}
_PATTERNS = [
    (r, re.compile("^" + re.sub(r"\\\{id\\\}", r"(?P<id>[^/]+)", re.escape(r.path)) + "$"))
    for r in ROUTES
]


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
