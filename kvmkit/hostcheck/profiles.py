"""Requirement profiles: the one declarative place that says what a workload needs
from a host, why, and what provides it when it is missing. `kvmkit check --profile`
evaluates them against probed facts; `--requirements-doc` renders them."""

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

Facts = dict[str, Any]
Check = Callable[[Facts], tuple[bool, str]]

GMEM_MMAP, GMEM_INIT_SHARED, GMEM_NO_DIRECT_MAP = 1 << 0, 1 << 1, 1 << 2
ATTRIBUTE_PRIVATE = 1 << 3


@dataclass(frozen=True)
class Requirement:
    id: str
    text: str  # what the host must offer
    why: str  # why the workload needs it
    provides: str  # what gives it to a host that lacks it
    check: Check = field(repr=False, compare=False)
    level: str = "required"  # or "recommended": reported, but the profile passes without it


@dataclass(frozen=True)
class Profile:
    name: str
    summary: str
    requirements: tuple[Requirement, ...]


# -- checks over facts ------------------------------------------------------------------
def _kvm(facts: Facts) -> dict[str, Any]:
    return facts.get("kvm") or {}


def cap(name: str, mask: int | None = None) -> Check:
    def check(facts: Facts) -> tuple[bool, str]:
        value = _kvm(facts).get("caps", {}).get(name, 0)
        ok = bool(value) if mask is None else value & mask == mask
        want = "non-zero" if mask is None else f"bits {mask:#x}"
        return ok, f"KVM_CAP_{name} = {value:#x} (needs {want})"

    return check


def probe(name: str) -> Check:
    def check(facts: Facts) -> tuple[bool, str]:
        result = facts.get("probes", {}).get(name)
        if result is None:
            return False, f"probe {name} did not run"
        return bool(result["ok"]), str(result["detail"])

    return check


def backend(*names: str) -> Check:
    def check(facts: Facts) -> tuple[bool, str]:
        have = facts["host"]["kvm_backend"]
        return have in names, f"KVM backend is {have}"

    return check


def vm_type(name: str) -> Check:
    def check(facts: Facts) -> tuple[bool, str]:
        types = _kvm(facts).get("vm_types", [])
        return name in types, f"VM types: {', '.join(types) or 'none'}"

    return check


def dev_kvm(facts: Facts) -> tuple[bool, str]:
    d = facts["host"]["dev_kvm"]
    if not d["exists"]:
        return False, f"{d['path']} does not exist"
    return bool(d["accessible"]), (
        f"{d['path']} mode {d['mode']} {d['owner']}:{d['group']},"
        f" {'read/write' if d['accessible'] else 'not accessible'} for this user"
    )


def api_version(facts: Facts) -> tuple[bool, str]:
    v = _kvm(facts).get("api_version")
    return v == 12, f"KVM_GET_API_VERSION = {v}"


def hugetlb_pool(facts: Facts) -> tuple[bool, str]:
    pools = facts["host"]["hugepages"]["pools"]
    usable = [s for s, p in pools.items() if p["free_hugepages"] or p["resizable"]]
    shown = ", ".join(
        f"{s}: {p['free_hugepages']} free of {p['nr_hugepages']}" for s, p in pools.items()
    )
    return bool(usable), f"hugetlb pools {shown or 'none'}" + (
        f"; resizable: {', '.join(s for s, p in pools.items() if p['resizable'])}" if usable else ""
    )


def thp(kind: str) -> Check:
    def check(facts: Facts) -> tuple[bool, str]:
        mode = facts["host"]["hugepages"][f"thp_{kind}"]
        return mode not in ("never", "deny", "unavailable"), f"{kind} THP is '{mode}'"

    return check


def kvm_param(name: str, good: tuple[str, ...]) -> Check:
    def check(facts: Facts) -> tuple[bool, str]:
        value = facts["host"]["kvm_params"].get(name, "(absent)")
        return value in good, f"kvm.{name} = {value}"

    return check


def backend_param(name: str, good: tuple[str, ...]) -> Check:
    def check(facts: Facts) -> tuple[bool, str]:
        value = facts["host"]["backend_params"].get(name, "(absent)")
        return value in good, f"{name} = {value}"

    return check


# -- the requirements -------------------------------------------------------------------
R = Requirement
DEV_KVM = R(
    "dev-kvm",
    "/dev/kvm exists and this user can read and write it",
    "every VM is created through it",
    "load kvm_intel, kvm_amd or kvm_pvm; run as root or join the group owning /dev/kvm",
    dev_kvm,
)
API = R(
    "api-12",
    "KVM API version 12",
    "the only stable KVM API; kvmkit speaks it",
    "any Linux since 2.6.22",
    api_version,
)
USER_MEMORY = R(
    "user-memory",
    "KVM_CAP_USER_MEMORY",
    "guest RAM is bound with memory slots",
    "any Linux with KVM",
    cap("USER_MEMORY"),
)
IRQCHIP = R(
    "irqchip",
    "in-kernel irqchip and PIT work",
    "interrupt delivery without exits",
    "KVM on x86 (CONFIG_KVM)",
    probe("irqchip"),
)
GMEM = R(
    "guest-memfd",
    "KVM_CAP_GUEST_MEMFD and KVM_CAP_USER_MEMORY2",
    "guest memory that KVM allocates and the host need not map",
    "Linux 6.8+ with CONFIG_KVM_GUEST_MEMFD (default VMs need 6.18+ to use it)",
    lambda f: (
        cap("GUEST_MEMFD")(f)[0] and cap("USER_MEMORY2")(f)[0],
        f"{cap('GUEST_MEMFD')(f)[1]}; {cap('USER_MEMORY2')(f)[1]}",
    ),
)
GMEM_CREATE = R(
    "guest-memfd-create",
    "a guest_memfd can be created with each reported flag",
    "a capability can be reported but refused",
    "a kernel whose report is true",
    probe("guest_memfd_flags"),
)
GMEM_MAP = R(
    "guest-memfd-mmap",
    "GUEST_MEMFD_FLAG_MMAP and GUEST_MEMFD_FLAG_INIT_SHARED",
    "the VMM maps guest_memfd to load images, emulate devices and migrate memory",
    "Linux 6.18+ (KVM_CAP_GUEST_MEMFD_FLAGS)",
    cap("GUEST_MEMFD_FLAGS", GMEM_MMAP | GMEM_INIT_SHARED),
)
UNMAPPED = R(
    "gmem-runs-unmapped",
    "a guest runs from guest_memfd with no host mapping",
    "hiding guest memory from the VMM leaves KVM only the file",
    "upstream KVM (VMX/SVM) 6.18+; PVM reaches guest memory through the host mapping",
    probe("guest_memfd_unmapped"),
)
NO_DIRECT_MAP = R(
    "gmem-no-direct-map",
    "GUEST_MEMFD_FLAG_NO_DIRECT_MAP",
    "guest pages also leave the host kernel's direct map (speculation attacks)",
    "the guest_memfd direct-map removal series (not in 6.18 mainline)",
    cap("GUEST_MEMFD_FLAGS", GMEM_NO_DIRECT_MAP),
)
DIRTY_LOG = R(
    "dirty-log",
    "KVM dirty-logs a guest's stores on a plain slot",
    "pre-copy migration resends what the guest wrote",
    "any Linux with KVM",
    probe("dirty_log_memfd"),
)
MANUAL_PROTECT = R(
    "manual-dirty-protect",
    "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2",
    "clearing dirty bits in pieces shortens each iteration's stall",
    "Linux 5.8+",
    cap("MANUAL_DIRTY_LOG_PROTECT2"),
)
DIRTY_RING = R(
    "dirty-ring",
    "the dirty ring can be enabled",
    "per-vCPU rings avoid scanning bitmaps for large, mostly clean guests",
    "Linux 5.11+ (x86)",
    probe("dirty_ring"),
    "recommended",
)
UFFD = R(
    "userfaultfd",
    "userfaultfd missing mode on guest memory",
    "lazy restore and post-copy fill pages on first touch",
    "CONFIG_USERFAULTFD; root, or sysctl vm.unprivileged_userfaultfd=1",
    probe("userfaultfd"),
    "recommended",
)
GMEM_DIRTY_VIEW = R(
    "gmem-dirty-view",
    "dirty logging on a plain slot over guest_memfd pages",
    "KVM refuses LOG_DIRTY_PAGES on guest_memfd slots; kvmkit migrates through"
    " a dirty-logged view of the same pages",
    "Linux 6.18+ with GUEST_MEMFD_FLAG_MMAP",
    probe("dirty_log_gmem_view"),
)
VPMU = R(
    "vpmu",
    "guests get a virtual PMU (CPUID leaf 0xA)",
    "perf, profilers and PMU tests inside guests",
    "kvm.enable_pmu=Y (module parameter) on a CPU with an architectural PMU",
    probe("vpmu"),
)
PMU_FILTER = R(
    "pmu-event-filter",
    "KVM_CAP_PMU_EVENT_FILTER",
    "the host decides which events a guest may count",
    "Linux 5.2+",
    cap("PMU_EVENT_FILTER"),
    "recommended",
)
PMU_CAP = R(
    "pmu-capability",
    "KVM_CAP_PMU_CAPABILITY",
    "per-VM control of the vPMU (and of the mediated PMU where offered)",
    "Linux 6.1+ with enable_pmu=Y",
    cap("PMU_CAPABILITY"),
    "recommended",
)
PRIVATE = R(
    "private-memory",
    "the PRIVATE memory attribute (KVM_CAP_MEMORY_ATTRIBUTES)",
    "confidential guests convert pages between private and shared",
    "a confidential VM type on Linux 6.8+",
    cap("MEMORY_ATTRIBUTES", ATTRIBUTE_PRIVATE),
)


def not_pvm(why: str) -> Check:
    def check(facts: Facts) -> tuple[bool, str]:
        have = facts["host"]["kvm_backend"]
        return have != "pvm", f"KVM backend is {have}" + (f": {why}" if have == "pvm" else "")

    return check


LINUX_GUEST = (
    DEV_KVM,
    API,
    IRQCHIP,
    R(
        "tsc-khz",
        "KVM_GET_TSC_KHZ answers",
        "the guest is told its TSC frequency (tsc_early_khz=): under emulation its own PIT"
        " calibration fails and it falls back to jiffies",
        "any Linux with KVM",
        probe("tsc_khz"),
    ),
    R(
        "cpuid-honoured",
        "a vCPU's CPUID is what the VMM sets (KVM_SET_CPUID2)",
        "the VMM hides from a guest what the host cannot run; where it cannot, the guest's"
        " command line must (kvmkit adds noxsave clearcpuid=popcnt,smap,erms,fsrm on PVM)",
        "KVM on VMX or SVM",
        probe("cpuid_honoured"),
        "recommended",
    ),
    R(
        "stock-kernel-syscalls",
        "a stock Linux kernel's system calls work in the guest",
        "a stock kernel reaches userspace only where user-mode SYSCALL enters its kernel",
        "KVM on VMX or SVM; on PVM, a guest kernel that handles the user #PF at LSTAR"
        " (kvmkit's test kernel: kvmkit kernel build) or a PVM-aware one",
        not_pvm(
            "user-mode SYSCALL reaches the guest kernel's U=0 pages and faults: boot a"
            " patched kernel (kvmkit kernel build)"
        ),
        "recommended",
    ),
)


PROFILES: dict[str, Profile] = {
    p.name: p
    for p in (
        Profile(
            "basic-vm",
            "create and run a VM with in-kernel interrupt controllers",
            (DEV_KVM, API, USER_MEMORY, IRQCHIP),
        ),
        Profile("guest-memfd", "guest memory in guest_memfd", (DEV_KVM, API, GMEM, GMEM_CREATE)),
        Profile("linux-guest", "Linux guests (kvmkit run --kernel)", LINUX_GUEST),
        Profile(
            "guest-memfd-mmap",
            "guest_memfd the VMM can map (kvmkit's default)",
            (DEV_KVM, API, GMEM, GMEM_CREATE, GMEM_MAP),
        ),
        Profile(
            "hide-guest-memory",
            "guest memory out of the VMM and the direct map",
            (DEV_KVM, GMEM, GMEM_MAP, UNMAPPED, NO_DIRECT_MAP),
        ),
        Profile(
            "hugepages",
            "guest memory on hugetlb or transparent hugepages",
            (
                DEV_KVM,
                R(
                    "hugetlb-pool",
                    "a hugetlb pool with free pages, or one root can grow",
                    "the hugetlb backend takes 2 MiB or 1 GiB pages from the pool",
                    "sysctl vm.nr_hugepages=N, or hugepagesz=1G hugepages=N on the kernel"
                    " command line",
                    hugetlb_pool,
                ),
                R(
                    "thp-anon",
                    "anonymous THP not 'never'",
                    "THP for anonymous guest memory",
                    "echo madvise > /sys/kernel/mm/transparent_hugepage/enabled",
                    thp("anon"),
                    "recommended",
                ),
                R(
                    "thp-shmem",
                    "shmem THP not 'never'",
                    "the thp backend (memfd + MADV_HUGEPAGE)",
                    "echo advise > /sys/kernel/mm/transparent_hugepage/shmem_enabled",
                    thp("shmem"),
                    "recommended",
                ),
            ),
        ),
        Profile(
            "live-migration",
            "pre-copy live migration of memfd-backed guests",
            (DEV_KVM, API, DIRTY_LOG, MANUAL_PROTECT, DIRTY_RING, UFFD),
        ),
        Profile(
            "live-migration-guest-memfd",
            "live migration of guest_memfd guests",
            (DEV_KVM, API, GMEM, GMEM_MAP, DIRTY_LOG, GMEM_DIRTY_VIEW, MANUAL_PROTECT, DIRTY_RING),
        ),
        Profile("pmu", "a virtual PMU in guests", (DEV_KVM, VPMU, PMU_FILTER, PMU_CAP)),
        Profile(
            "confidential-sev-snp",
            "AMD SEV-SNP confidential guests",
            (
                DEV_KVM,
                R(
                    "kvm-amd",
                    "the kvm_amd backend",
                    "SEV-SNP is an AMD SVM feature",
                    "an AMD EPYC CPU (Milan or later) with kvm_amd loaded",
                    backend("kvm_amd"),
                ),
                R(
                    "snp-vm-type",
                    "VM type KVM_X86_SNP_VM in KVM_CAP_VM_TYPES",
                    "SNP guests are a VM type of their own",
                    "SEV-SNP enabled in the BIOS, kvm_amd sev_snp=1, Linux 6.11+",
                    vm_type("snp"),
                ),
                GMEM,
                PRIVATE,
            ),
        ),
        Profile(
            "confidential-tdx",
            "Intel TDX confidential guests",
            (
                DEV_KVM,
                R(
                    "kvm-intel",
                    "the kvm_intel backend",
                    "TDX is an Intel VMX feature",
                    "an Intel Xeon with TDX (Sapphire Rapids or later) and kvm_intel loaded",
                    backend("kvm_intel"),
                ),
                R(
                    "tdx-vm-type",
                    "VM type KVM_X86_TDX_VM in KVM_CAP_VM_TYPES",
                    "TD guests are a VM type of their own",
                    "TDX enabled in the BIOS with the TDX module loaded, kvm_intel tdx=1,"
                    " Linux 6.16+",
                    vm_type("tdx"),
                ),
                GMEM,
                PRIVATE,
            ),
        ),
        Profile(
            "pvm-host",
            "KVM guests on a host without VMX/SVM, through PVM",
            (
                DEV_KVM,
                R(
                    "kvm-pvm",
                    "the kvm_pvm backend serves /dev/kvm",
                    "PVM runs guests on shadow page tables at CPL 3, without hardware"
                    " virtualization",
                    "a kernel with CONFIG_KVM_PVM (the PVM series; not in mainline) and"
                    " kvm_pvm loaded",
                    backend("pvm"),
                ),
                R(
                    "pvm-native",
                    "kvm_pvm pvm_native=Y",
                    "PVM-aware guest code runs natively instead of through the instruction"
                    " emulator",
                    "the kvm_pvm module parameter pvm_native=Y",
                    backend_param("pvm_native", ("Y",)),
                    "recommended",
                ),
                IRQCHIP,
                GMEM_MAP,
            ),
        ),
    )
}


@dataclass
class Verdict:
    requirement: Requirement
    met: bool
    observed: str


def evaluate(profile: Profile, facts: Facts) -> tuple[bool, list[Verdict]]:
    """Whether `facts` meet every required item of `profile`, and each verdict."""
    verdicts = []
    for req in profile.requirements:
        try:
            met, observed = req.check(facts)
        except (KeyError, TypeError) as e:  # facts without this piece (no /dev/kvm)
            met, observed = False, f"not known: {e}"
        verdicts.append(Verdict(req, met, observed))
    return all(v.met for v in verdicts if v.requirement.level == "required"), verdicts
