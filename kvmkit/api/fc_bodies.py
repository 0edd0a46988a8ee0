"""The request bodies of kvmkit's Firecracker-compatible API (Firecracker 1.17's
swagger names and types), with kvmkit's extensions marked `kvmkit=True`.

Fields Firecracker has that kvmkit cannot honour are still declared here (so a
client sending them is told why, not that the field is unknown); the handlers in
kvmkit/api/firecracker.py refuse them with a message that says so."""

from kvmkit.api.schema import Body, Field
from kvmkit.machine.resources import HIDE_MODES
from kvmkit.memory.backend import BACKEND_NAMES

MAX_VCPUS = 32  # Firecracker's limit
RATE_LIMITER = Field(
    "rate_limiter", "object", nullable=True, description="refused: kvmkit has no rate limiter"
)
HUGE_PAGES = ("None", "2M", "Transparent")


def _machine_config(required: bool) -> tuple[Field, ...]:
    return (
        Field("vcpu_count", "integer", required, "vCPUs", minimum=1, maximum=MAX_VCPUS),
        Field("mem_size_mib", "integer", required, "guest RAM in MiB", minimum=2),
        Field("smt", "boolean", description="simultaneous multithreading: false only"),
        Field(
            "cpu_template",
            "string",
            nullable=True,
            description="a CPU template: kvmkit takes only None (the host's CPUID, adjusted)",
        ),
        Field("track_dirty_pages", "boolean", description="dirty page tracking (Diff snapshots)"),
        Field(
            "huge_pages",
            "string",
            enum=HUGE_PAGES,
            description="None, 2M (kvmkit's hugetlb backend) or Transparent (thp)",
        ),
        Field(
            "kvmkit_memory_backend",
            "string",
            enum=("auto", *BACKEND_NAMES),
            description="where guest RAM lives (default auto: guest_memfd when the host can"
            " map it, else memfd)",
            kvmkit=True,
        ),
        Field(
            "kvmkit_hide_guest_memory",
            "string",
            enum=HIDE_MODES,
            description="unmap guest RAM from kvmkit after loading (unmap), and from the host"
            " kernel's direct map (direct-map); guest_memfd only",
            kvmkit=True,
        ),
    )


MACHINE_CONFIG = Body("machine-config", _machine_config(True), "vCPUs and memory")
MACHINE_CONFIG_PATCH = Body("machine-config", _machine_config(False), "a partial machine-config")
BOOT_SOURCE = Body(
    "boot-source",
    (
        Field("kernel_image_path", "string", True, "a vmlinux (PVH or 64-bit boot) or bzImage"),
        Field("boot_args", "string", description="the kernel command line"),
        Field("initrd_path", "string", description="an initrd / initramfs"),
    ),
)
DRIVE = Body(
    "drive",
    (
        Field("drive_id", "string", True, "the drive's id: the path's {drive_id}"),
        Field("is_root_device", "boolean", True, "the guest's root file system"),
        Field("path_on_host", "string", description="a raw file or block device (required)"),
        Field("is_read_only", "boolean"),
        Field("cache_type", "string", enum=("Unsafe", "Writeback")),
        Field("io_engine", "string", enum=("Sync", "Async"), description="Sync only"),
        RATE_LIMITER,
        Field("partuuid", "string", nullable=True, description="refused: no partition tables"),
        Field("socket", "string", nullable=True, description="refused: no vhost-user"),
    ),
)
DRIVE_PATCH = Body(
    "drive",
    (
        Field("drive_id", "string", True),
        Field("path_on_host", "string"),
        RATE_LIMITER,
    ),
)
NET = Body(
    "network-interface",
    (
        Field("iface_id", "string", True, "the interface's id: the path's {iface_id}"),
        Field("host_dev_name", "string", True, "the host tap device"),
        Field("guest_mac", "string", description="the guest's MAC, e.g. 06:00:ac:10:00:02"),
        Field("rx_rate_limiter", "object", nullable=True, description="refused"),
        Field("tx_rate_limiter", "object", nullable=True, description="refused"),
    ),
)
NET_PATCH = Body(
    "network-interface",
    (
        Field("iface_id", "string", True),
        Field("rx_rate_limiter", "object", nullable=True, description="refused"),
        Field("tx_rate_limiter", "object", nullable=True, description="refused"),
    ),
)
VSOCK = Body(
    "vsock",
    (
        Field("guest_cid", "integer", True, minimum=3, maximum=(1 << 32) - 1),
        Field("uds_path", "string", True, "the host unix socket"),
        Field("vsock_id", "string", description="deprecated, ignored as in Firecracker"),
    ),
)
ENTROPY = Body("entropy", (RATE_LIMITER,))
BALLOON = Body(
    "balloon",
    (
        Field("amount_mib", "integer", True, minimum=0),
        Field("deflate_on_oom", "boolean", True),
        Field("stats_polling_interval_s", "integer", minimum=0, maximum=3600),
        Field("free_page_hinting", "boolean", description="refused when true"),
        Field("free_page_reporting", "boolean"),
    ),
)
BALLOON_PATCH = Body("balloon", (Field("amount_mib", "integer", True, minimum=0),))
BALLOON_STATS_PATCH = Body(
    "balloon statistics",
    (Field("stats_polling_interval_s", "integer", True, minimum=0, maximum=3600),),
)
LOG_LEVELS = ("Error", "Warning", "Info", "Debug", "Trace", "Off")
LOGGER = Body(
    "logger",
    (
        Field("log_path", "string", description="a file (or FIFO) the API log is appended to"),
        Field("level", "string", enum=LOG_LEVELS),
        Field("show_level", "boolean"),
        Field("show_log_origin", "boolean"),
        Field("module", "string"),
    ),
)
METRICS = Body(
    "metrics",
    (Field("metrics_path", "string", True, "a file (or FIFO): one JSON object a line"),),
)
MMDS = Body("mmds", (), "any JSON object: the metadata store", free_form=True)
MMDS_CONFIG = Body(
    "mmds-config",
    (
        Field("network_interfaces", "array", True, items=Field("", "string")),
        Field("version", "string", enum=("V1", "V2")),
        Field("ipv4_address", "string"),
        Field("imds_compat", "boolean"),
    ),
)
ACTIONS = Body(
    "actions",
    (
        Field(
            "action_type",
            "string",
            True,
            enum=("InstanceStart", "SendCtrlAltDel", "FlushMetrics"),
        ),
    ),
)
VM_STATE = Body("vm", (Field("state", "string", True, enum=("Paused", "Resumed")),))
SNAPSHOT_CREATE = Body(
    "snapshot/create",
    (
        Field("snapshot_path", "string", True, "where the VM state goes"),
        Field("mem_file_path", "string", True, "where guest memory goes (a raw image)"),
        Field("snapshot_type", "string", enum=("Full", "Diff"), description="Full only"),
        Field("version", "string", description="deprecated, ignored as in Firecracker"),
    ),
)
MEM_BACKEND = Field(
    "mem_backend",
    "object",
    fields=(
        Field("backend_type", "string", True, enum=("File", "Uffd")),
        Field("backend_path", "string", True, "the memory file, or a page-fault handler's socket"),
    ),
)
SNAPSHOT_LOAD = Body(
    "snapshot/load",
    (
        Field("snapshot_path", "string", True),
        Field("mem_file_path", "string", description="deprecated: mem_backend File"),
        MEM_BACKEND,
        Field("enable_diff_snapshots", "boolean"),
        Field("track_dirty_pages", "boolean"),
        Field("resume_vm", "boolean"),
        Field(
            "network_overrides",
            "array",
            items=Field(
                "",
                "object",
                fields=(Field("iface_id", "string", True), Field("host_dev_name", "string", True)),
            ),
            description="attach another host tap to a saved interface",
        ),
    ),
)
BOOT_PROGRAM = Body(
    "kvmkit/boot-program",
    (
        Field("guest", "string", True, "a built-in guest ('kvmkit guests') or a flat binary"),
        Field("guest_arg", "integer", minimum=0, maximum=(1 << 64) - 1),
    ),
    "kvmkit extension: boot one of kvmkit's guest programs instead of a kernel",
)
MIGRATE = Body(
    "kvmkit/migrate",
    (
        Field("to", "string", True, "tcp:HOST:PORT or unix:PATH of 'kvmkit migrate receive'"),
        Field("max_downtime_ms", "integer", minimum=1),
        Field("bandwidth_bps", "integer", minimum=0),
        Field("max_iterations", "integer", minimum=1),
        Field("auto_converge", "boolean"),
    ),
    "kvmkit extension: live-migrate the running machine",
)
MIGRATE_RECEIVE = Body(
    "kvmkit/migrate-receive",
    (
        Field("listen", "string", True, "unix:PATH or tcp:HOST:PORT to wait on"),
        Field("timeout_s", "integer", minimum=1, description="give up after this long"),
    ),
    "kvmkit extension: receive a live migration instead of booting (pre-boot)",
)

# -- what GETs answer (in the OpenAPI document; tests check real answers against them) --
INSTANCE_INFO = Body(
    "instance info",
    (
        Field("id", "string", True),
        Field("state", "string", True, enum=("Not started", "Running", "Paused")),
        Field("vmm_version", "string", True),
        Field("app_name", "string", True),
    ),
)
VERSION = Body(
    "version",
    (
        Field("firecracker_version", "string", True, "the Firecracker API level served"),
        Field("kvmkit_version", "string", True, kvmkit=True),
    ),
)
MACHINE_CONFIG_INFO = Body(
    "machine-config",
    tuple(
        Field(
            f.name,
            f.kind,
            f.name != "cpu_template",
            f.description,
            f.enum,
            f.minimum,
            f.maximum,
            f.nullable,
            kvmkit=f.kvmkit,
        )
        for f in _machine_config(True)
        if f.name != "cpu_template"
    ),
)
BALLOON_STATS = Body(
    "balloon statistics",
    tuple(
        Field(name, "integer", name.endswith(("_pages", "_mib")), minimum=0)
        for name in (
            "target_pages",
            "actual_pages",
            "target_mib",
            "actual_mib",
            "swap_in",
            "swap_out",
            "major_faults",
            "minor_faults",
            "free_memory",
            "total_memory",
            "available_memory",
            "disk_caches",
            "hugetlb_allocations",
            "hugetlb_failures",
        )
    ),
)
