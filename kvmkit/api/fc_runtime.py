"""Firecracker's actions and post-boot requests: InstanceStart, SendCtrlAltDel,
FlushMetrics, PATCH /vm, GET /, /version, /vm/config, the balloon at run time,
snapshot create and load (kvmkit/api/fc_snapshot.py), and kvmkit's extensions
(the host check, live migration, the OpenAPI document)."""

import threading
import time
from dataclasses import replace
from typing import Any

from kvmkit import __version__
from kvmkit.api import fc_snapshot
from kvmkit.api.fc_preboot import get_machine_config
from kvmkit.api.fc_state import (
    FC_API_VERSION,
    SNAPSHOT_HOLDER,
    START_WAIT_S,
    Fault,
    VmmState,
    user_paused,
)
from kvmkit.devices.virtio.balloon import VirtioBalloon
from kvmkit.devices.virtio.blk import VirtioBlk
from kvmkit.devices.virtio.net import VirtioNet
from kvmkit.devices.virtio.vsock import VirtioVsock
from kvmkit.errors import KvmkitError
from kvmkit.machine import Machine, build_for_boot
from kvmkit.machine.builder import RestoreOptions, build_from_saved
from kvmkit.machine.operations import SNAPSHOT
from kvmkit.memory.layout import MIB


def get_root(vmm: VmmState, p: dict[str, str], d: dict[str, Any]) -> Any:
    return {
        "id": vmm.instance_id,
        "state": vmm.state(),
        "vmm_version": __version__,
        "app_name": "kvmkit",
    }


def get_version(vmm: VmmState, p: dict[str, str], d: dict[str, Any]) -> Any:
    return {"firecracker_version": FC_API_VERSION, "kvmkit_version": __version__}


def balloon_device(vmm: VmmState, what: str) -> VirtioBalloon:
    machine = vmm.post_boot(what)
    if vmm.balloon is None:
        raise Fault(f"{what}: no balloon is configured (PUT /balloon before InstanceStart)")
    for device in machine.devices.values():
        if isinstance(device, VirtioBalloon):
            return device
    raise Fault(f"{what}: this machine has no virtio-balloon device")


def patch_balloon(vmm: VmmState, p: dict[str, str], d: dict[str, Any]) -> None:
    device = balloon_device(vmm, "PATCH /balloon")
    assert vmm.machine is not None and vmm.machine.memory is not None
    size_mib = vmm.machine.memory.size_bytes >> 20
    if d["amount_mib"] > size_mib:
        raise Fault(
            f"balloon: amount_mib {d['amount_mib']} is more than the guest's {size_mib} MiB"
        )
    device.set_target(d["amount_mib"])
    assert vmm.balloon is not None
    vmm.balloon["amount_mib"] = d["amount_mib"]


def get_balloon_stats(vmm: VmmState, p: dict[str, str], d: dict[str, Any]) -> Any:
    device = balloon_device(vmm, "GET /balloon/statistics")
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


def patch_balloon_stats(vmm: VmmState, p: dict[str, str], d: dict[str, Any]) -> None:
    device = balloon_device(vmm, "PATCH /balloon/statistics")
    interval = d["stats_polling_interval_s"]
    if interval != device.config.stats_interval_s:
        raise Fault(
            f"balloon: changing stats_polling_interval_s after boot (from"
            f" {device.config.stats_interval_s} to {interval}) is not supported: kvmkit sets"
            " the statistics timer when it builds the device"
        )


def put_actions(vmm: VmmState, p: dict[str, str], d: dict[str, Any]) -> None:
    action = d["action_type"]
    if action == "InstanceStart":
        instance_start(vmm)
        wait_until_running(vmm)
    elif action == "FlushMetrics":
        vmm.flush_metrics()
    else:
        machine = vmm.post_boot("SendCtrlAltDel")
        machine.control.guest_reset("Ctrl-Alt-Del through the API: the i8042 reset line")


def instance_start(vmm: VmmState) -> None:
    if vmm.started:
        raise Fault("InstanceStart: the microVM is already running; it starts once")
    if vmm.receiving:
        raise Fault("InstanceStart: this kvmkit is receiving a migration (GET /kvmkit/migration)")
    if vmm.boot_source is None:
        raise Fault(
            "InstanceStart: no boot source: PUT /boot-source with kernel_image_path first"
            " (or the kvmkit extension PUT /kvmkit/boot-program)"
        )
    machine = build_for_boot(vmm.resources)
    vmm.set_machine(machine)


def wait_until_running(vmm: VmmState) -> None:
    """Answer InstanceStart once the main thread runs the machine, as Firecracker does."""
    machine = vmm.machine
    deadline = time.monotonic() + START_WAIT_S
    while machine is not None and machine.started_at is None and machine.alive:
        if time.monotonic() > deadline:
            break
        time.sleep(0.01)


def patch_vm(vmm: VmmState, p: dict[str, str], d: dict[str, Any]) -> None:
    machine = vmm.post_boot("PATCH /vm")
    if d["state"] == "Paused":
        machine.pause()
    else:
        machine.resume()


def get_vm_config(vmm: VmmState, p: dict[str, str], d: dict[str, Any]) -> Any:
    boot = vmm.boot_source or {}
    out: dict[str, Any] = {
        "machine-config": get_machine_config(vmm, p, d),
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


def snapshot_create(vmm: VmmState, p: dict[str, str], d: dict[str, Any]) -> None:
    machine = vmm.post_boot("PUT /snapshot/create")
    if d.get("snapshot_type", "Full") != "Full":
        raise Fault("snapshot_type Diff is not supported: kvmkit writes Full snapshots")
    if not user_paused(machine):
        raise Fault(
            'PUT /snapshot/create needs the microVM paused: PATCH /vm {"state": "Paused"} first'
        )
    if machine.memory is not None and machine.memory.hidden:
        raise Fault("snapshot: guest memory is hidden from kvmkit, so it cannot be saved")
    with machine.operations.begin(SNAPSHOT):  # one operation at a time, whoever asks
        if machine.lazy is not None:
            machine.lazy.finish()
        machine.pause(holder=SNAPSHOT_HOLDER)
        try:
            machine.console.flush()
            fc_snapshot.save_split(machine, d["snapshot_path"], d["mem_file_path"])
        finally:
            machine.resume(SNAPSHOT_HOLDER)


def adopt_saved_devices(vmm: VmmState, machine: Machine) -> None:
    """A restored or received machine brings its own boot record and devices: answer
    for them (GET /vm/config, GET and PATCH /balloon, PATCH /drives) as if they had
    been PUT here."""
    boot = machine.description.boot
    if boot.kind == "linux":
        vmm.boot_source = {"kernel_image_path": boot.guest, "boot_args": boot.cmdline}
    else:
        vmm.boot_source = {
            "kvmkit_boot_program": {"guest": boot.guest, "guest_arg": boot.guest_arg}
        }
    for device in machine.devices.values():
        if isinstance(device, VirtioBlk):
            blk = device.config
            vmm.drives[blk.drive_id] = {
                "drive_id": blk.drive_id,
                "path_on_host": device.path,
                "is_root_device": blk.root,
                "is_read_only": blk.read_only,
                "cache_type": blk.cache.capitalize(),
            }
        elif isinstance(device, VirtioNet):
            net = device.config
            vmm.nets[net.iface_id] = {
                "iface_id": net.iface_id,
                "host_dev_name": net.tap,
                "guest_mac": net.mac,
            }
        elif isinstance(device, VirtioVsock):
            vmm.vsock = {"guest_cid": device.config.cid, "uds_path": device.config.uds}
        elif isinstance(device, VirtioBalloon):
            config = device.config
            vmm.balloon = {
                "amount_mib": device.target_pages >> 8,
                "deflate_on_oom": config.deflate_on_oom,
                "stats_polling_interval_s": config.stats_interval_s,
                "free_page_reporting": config.free_page_reporting,
            }


def snapshot_load(vmm: VmmState, p: dict[str, str], d: dict[str, Any]) -> None:
    if vmm.started:
        raise Fault("PUT /snapshot/load is only allowed before the microVM starts")
    if vmm.configured:
        raise Fault(
            "PUT /snapshot/load is not allowed after configuring boot-specific resources"
            " (machine-config, boot-source, drives, ...): start a fresh kvmkit for a restore"
        )
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
    taps = {o["iface_id"]: o["host_dev_name"] for o in d.get("network_overrides") or []}
    options = RestoreOptions(
        console=vmm.resources.console.target,
        net_taps=taps or None,
        # a vsock PUT before the load (as the Go SDK sends it) moves the saved one there
        vsock_uds=vmm.vsock["uds_path"] if vmm.vsock is not None else None,
    )
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
    adopt_saved_devices(vmm, machine)
    vmm.set_machine(machine)


def get_check(vmm: VmmState, p: dict[str, str], d: dict[str, Any]) -> Any:
    from kvmkit.hostcheck.kvm_probes import gather

    return gather(probes=False)


def put_migrate(vmm: VmmState, p: dict[str, str], d: dict[str, Any]) -> Any:
    from kvmkit.migration import migrate

    machine = vmm.post_boot("PUT /kvmkit/migrate")
    state: dict[str, Any] = {"role": "source", "state": "running", "to": d["to"]}

    def progress(event: dict[str, Any]) -> None:
        state["progress"] = event

    vmm.migration = state
    try:
        report = migrate(
            machine,
            d["to"],
            max_downtime_ms=float(d.get("max_downtime_ms", 20)),
            bandwidth_bps=d.get("bandwidth_bps", 0),
            auto_converge=d.get("auto_converge", False),
            max_iterations=d.get("max_iterations", 30),
            progress=progress,
        )
    except KvmkitError as e:
        vmm.migration = {**state, "state": "failed", "error": str(e)}
        raise
    vmm.migration = {**state, "state": "done", "report": report.to_dict()}
    return report.to_dict()


def put_migrate_receive(vmm: VmmState, p: dict[str, str], d: dict[str, Any]) -> None:
    """Listen for a live migration from another kvmkit; answered once listening. The
    machine it brings runs here as InstanceStart's would (GET /kvmkit/migration)."""
    from kvmkit.migration import IncomingMigration

    if vmm.started or vmm.receiving:
        raise Fault("PUT /kvmkit/migrate-receive is only allowed before the microVM starts")
    if vmm.configured or vmm.vsock is not None:
        raise Fault(
            "PUT /kvmkit/migrate-receive is not allowed after configuring boot-specific"
            " resources (vsock included): the machine and its devices come from the source"
        )
    incoming = IncomingMigration(d["listen"])
    state: dict[str, Any] = {"role": "target", "state": "waiting", "listen": incoming.address}
    vmm.migration = state
    vmm.receiving = True
    spec = vmm.resources.machine
    backend = None if spec.memory_backend == "auto" else spec.memory_backend

    def progress(event: dict[str, Any]) -> None:
        state.update(state="receiving", progress=event)

    def receive() -> None:
        try:
            machine = incoming.receive(
                memory_backend=backend,
                console=vmm.resources.console.target,
                accept_timeout_s=d.get("timeout_s"),
                progress=progress,
            )
            incoming.commit()
        except Exception as e:  # any failure is the migration's, never a dead thread
            why = str(e) if isinstance(e, KvmkitError) else f"{type(e).__name__}: {e}"
            vmm.migration = {**state, "state": "failed", "error": why}
            vmm.receiving = False
            return
        finally:
            incoming.close()
        machine.migrated_from = incoming.report.source
        incoming.confirm_when_running()
        vmm.migration = {**state, "state": "received", "report": vars(incoming.report)}
        vmm.fc_machine.update(
            vcpu_count=machine.description.vcpus,
            mem_size_mib=machine.description.memory_bytes // MIB,
        )
        adopt_saved_devices(vmm, machine)
        vmm.set_machine(machine)

    threading.Thread(target=receive, name="kvmkit-migrate-receive", daemon=True).start()


def get_migration(vmm: VmmState, p: dict[str, str], d: dict[str, Any]) -> Any:
    if vmm.migration is None:
        raise Fault(
            "no migration: PUT /kvmkit/migrate sends this machine, PUT /kvmkit/migrate-receive"
            " (before boot) receives one"
        )
    return vmm.migration


def get_openapi(vmm: VmmState, p: dict[str, str], d: dict[str, Any]) -> Any:
    from kvmkit.api.openapi import document

    return document()
