"""The state of one microVM as Firecracker's API sees it, between requests: the
pre-boot resources and what the API was told (to answer GET /vm/config as given),
then the running machine; the API's logger and metrics."""

import json
import threading
import time
from dataclasses import replace
from typing import Any

from kvmkit.api import fc_bodies as bodies
from kvmkit.machine import Machine, VmResources
from kvmkit.machine.pause import USER
from kvmkit.machine.resources import ConsoleSpec, MachineSpec
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


class VmmState:
    """The state of one microVM as Firecracker's API sees it."""

    def __init__(self, machine_spec: MachineSpec | None = None, console: str | None = None) -> None:
        spec = machine_spec or MachineSpec()
        spec = replace(spec, memory_bytes=DEFAULT_MEM_MIB * MIB)
        self.resources = VmResources(machine=spec)
        if console is not None:
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
        self.migration: dict[str, Any] | None = None  # GET /kvmkit/migration
        self.receiving = False  # PUT /kvmkit/migrate-receive is waiting for a source
        self._lock = threading.RLock()

    # -- state ---------------------------------------------------------------------------
    @property
    def started(self) -> bool:
        return self.machine is not None

    def state(self) -> str:
        if self.machine is None:
            return "Not started"
        return "Paused" if user_paused(self.machine) else "Running"

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

    def set_machine(self, machine: Machine) -> None:
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
        append_line(cfg["log_path"], f"{stamp} [{INSTANCE_ID}:kvmkit-api{shown}] {message}\n")

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
        append_line(self.metrics["metrics_path"], json.dumps(line) + "\n")


def user_paused(machine: Machine) -> bool:
    """Paused by the API's (the user's) pause: PATCH /vm Paused, or a load without
    resume_vm (which holds the vCPUs at their first KVM_RUN)."""
    return machine.gate.held_by(USER)


def append_line(path: str, text: str) -> None:
    try:
        with open(path, "a") as f:
            f.write(text)
    except OSError:
        pass  # a log or metrics sink that went away must not fail the request
