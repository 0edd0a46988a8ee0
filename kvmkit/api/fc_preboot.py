"""Firecracker's pre-boot requests: machine-config, boot-source, drives, network
interfaces, vsock, entropy, balloon, logger, metrics, the MMDS store, and kvmkit's
boot-program extension. Each fills kvmkit's pre-boot resources (VmResources) and
keeps what the client sent, for GET /vm/config."""

from dataclasses import replace
from typing import Any

from kvmkit.api.fc_state import Fault, VmmState
from kvmkit.machine.resources import (
    BalloonSpec,
    DriveSpec,
    EntropySpec,
    LinuxBoot,
    NetSpec,
    ProgramBoot,
    VsockSpec,
)
from kvmkit.memory.layout import MIB


def get_machine_config(vmm: VmmState, p: dict[str, str], d: dict[str, Any]) -> Any:
    spec = vmm.resources.machine
    return {
        **vmm.fc_machine,
        "kvmkit_memory_backend": spec.memory_backend,
        "kvmkit_hide_guest_memory": spec.hide,
    }


def put_machine_config(vmm: VmmState, p: dict[str, str], d: dict[str, Any]) -> None:
    vmm.pre_boot("PUT /machine-config")
    machine_config(vmm, d, {"smt": False, "track_dirty_pages": False, "huge_pages": "None"})


def patch_machine_config(vmm: VmmState, p: dict[str, str], d: dict[str, Any]) -> None:
    vmm.pre_boot("PATCH /machine-config")
    machine_config(vmm, d, {})


def machine_config(vmm: VmmState, d: dict[str, Any], defaults: dict[str, Any]) -> None:
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


def put_boot_source(vmm: VmmState, p: dict[str, str], d: dict[str, Any]) -> None:
    vmm.pre_boot("PUT /boot-source")
    boot = LinuxBoot(
        d["kernel_image_path"], d.get("initrd_path"), d.get("boot_args", "console=ttyS0")
    )
    boot.validate(vmm.resources.machine.memory_bytes)
    vmm.resources = vmm.resources.with_boot(boot)
    vmm.boot_source = d
    vmm.configured = True


def put_boot_program(vmm: VmmState, p: dict[str, str], d: dict[str, Any]) -> None:
    vmm.pre_boot("PUT /kvmkit/boot-program")
    boot = ProgramBoot(d["guest"], guest_arg=d.get("guest_arg", 0))
    boot.validate(vmm.resources.machine.memory_bytes)
    vmm.resources = vmm.resources.with_boot(boot)
    vmm.boot_source = {"kvmkit_boot_program": d}
    vmm.configured = True


def check_id(p: dict[str, str], d: dict[str, Any], field: str) -> str:
    if d[field] != p["id"]:
        raise Fault(
            f"the body's {field} {d[field][:40]!r} differs from the path's {p['id'][:40]!r}:"
            " give the same id"
        )
    return p["id"]


def refuse_rate_limiters(what: str, d: dict[str, Any], *names: str) -> None:
    for name in names:
        if d.get(name) is not None:
            raise Fault(f"{what}: {name} is not supported: kvmkit has no I/O rate limiter")


def put_drive(vmm: VmmState, p: dict[str, str], d: dict[str, Any]) -> None:
    vmm.pre_boot("PUT /drives")
    drive_id = check_id(p, d, "drive_id")
    what = f"drive {drive_id}"
    refuse_rate_limiters(what, d, "rate_limiter")
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


def patch_drive(vmm: VmmState, p: dict[str, str], d: dict[str, Any]) -> None:
    vmm.post_boot("PATCH /drives")
    drive_id = check_id(p, d, "drive_id")
    if drive_id not in vmm.drives:
        raise Fault(f"no drive {drive_id!r}: PATCH changes a drive PUT before InstanceStart")
    refuse_rate_limiters(f"drive {drive_id}", d, "rate_limiter")
    if "path_on_host" in d and d["path_on_host"] != vmm.drives[drive_id]["path_on_host"]:
        raise Fault(
            f"drive {drive_id}: changing path_on_host of a running drive is not supported:"
            " kvmkit's virtio-blk cannot swap its backing file; stop, and boot with the new path"
        )


def put_net(vmm: VmmState, p: dict[str, str], d: dict[str, Any]) -> None:
    vmm.pre_boot("PUT /network-interfaces")
    iface_id = check_id(p, d, "iface_id")
    refuse_rate_limiters(f"network interface {iface_id}", d, "rx_rate_limiter", "tx_rate_limiter")
    spec = NetSpec(iface_id, d["host_dev_name"], d.get("guest_mac"))
    vmm.resources = vmm.resources.with_net(spec)
    vmm.nets[iface_id] = d
    vmm.configured = True


def patch_net(vmm: VmmState, p: dict[str, str], d: dict[str, Any]) -> None:
    vmm.post_boot("PATCH /network-interfaces")
    iface_id = check_id(p, d, "iface_id")
    if iface_id not in vmm.nets:
        raise Fault(f"no network interface {iface_id!r}: PUT it before InstanceStart")
    refuse_rate_limiters(f"network interface {iface_id}", d, "rx_rate_limiter", "tx_rate_limiter")


def put_vsock(vmm: VmmState, p: dict[str, str], d: dict[str, Any]) -> None:
    vmm.pre_boot("PUT /vsock")
    vmm.resources = vmm.resources.with_vsock(VsockSpec(d["guest_cid"], d["uds_path"]))
    vmm.vsock = d


def put_entropy(vmm: VmmState, p: dict[str, str], d: dict[str, Any]) -> None:
    vmm.pre_boot("PUT /entropy")
    refuse_rate_limiters("entropy", d, "rate_limiter")
    vmm.resources = vmm.resources.with_entropy(EntropySpec())
    vmm.entropy = d
    vmm.configured = True


def get_balloon(vmm: VmmState, p: dict[str, str], d: dict[str, Any]) -> Any:
    if vmm.balloon is None:
        raise Fault("no balloon is configured: PUT /balloon before InstanceStart")
    return vmm.balloon


def put_balloon(vmm: VmmState, p: dict[str, str], d: dict[str, Any]) -> None:
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


def put_logger(vmm: VmmState, p: dict[str, str], d: dict[str, Any]) -> None:
    path = d.get("log_path")
    if path is not None:
        check_sink(path, "log_path")
    vmm.logger = {"level": "Info", **d}


def put_metrics(vmm: VmmState, p: dict[str, str], d: dict[str, Any]) -> None:
    if vmm.metrics is not None:
        raise Fault("metrics are already configured: they can be set once, as in Firecracker")
    check_sink(d["metrics_path"], "metrics_path")
    vmm.metrics = d


def check_sink(path: str, field: str) -> None:
    try:
        with open(path, "a"):
            pass
    except OSError as e:
        raise Fault(f"{field} {path[:80]}: cannot open it for writing: {e.strerror}") from None


def get_mmds(vmm: VmmState, p: dict[str, str], d: dict[str, Any]) -> Any:
    return vmm.mmds or {}


def put_mmds(vmm: VmmState, p: dict[str, str], d: dict[str, Any]) -> None:
    vmm.mmds = d


def patch_mmds(vmm: VmmState, p: dict[str, str], d: dict[str, Any]) -> None:
    if vmm.mmds is None:
        raise Fault("the MMDS store is empty: PUT /mmds before PATCH")
    vmm.mmds = merge_patch(vmm.mmds, d)


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7396 JSON merge patch."""
    if not isinstance(patch, dict):
        return patch
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


def put_mmds_config(vmm: VmmState, p: dict[str, str], d: dict[str, Any]) -> None:
    vmm.pre_boot("PUT /mmds/config")
    raise Fault(
        "mmds-config is not supported: kvmkit has no MMDS network stack, so the guest cannot"
        " reach the store at 169.254.169.254 (PUT/PATCH/GET /mmds still keep a store for"
        " clients)"
    )
