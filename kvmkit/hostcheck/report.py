"""`kvmkit check` output: the versioned JSON report, the terminal tables (rich), and
the requirements document rendered from the profiles."""

from typing import Any

from kvmkit.hostcheck.profiles import PROFILES, Facts, Profile, evaluate

# What the capabilities that matter most mean, in a few words.
MEANINGS = {
    "USER_MEMORY": "memory slots from host virtual memory",
    "USER_MEMORY2": "memory slots with guest_memfd fields",
    "GUEST_MEMFD": "guest_memfd: guest-first memory",
    "GUEST_MEMFD_FLAGS": "guest_memfd flags offered (bit mask)",
    "MEMORY_ATTRIBUTES": "private/shared page attributes (bit mask)",
    "VM_TYPES": "VM types (bit mask)",
    "PRE_FAULT_MEMORY": "map guest memory before it is touched",
    "READONLY_MEM": "read-only memory slots (ROMs)",
    "NR_MEMSLOTS": "memory slots per address space",
    "MAX_VCPUS": "vCPUs per VM, at most",
    "NR_VCPUS": "vCPUs per VM, recommended",
    "MAX_VCPU_ID": "largest vCPU id + 1",
    "DIRTY_LOG_RING": "per-vCPU dirty ring, max bytes",
    "DIRTY_LOG_RING_ACQ_REL": "dirty ring with acquire/release ordering",
    "DIRTY_LOG_RING_WITH_BITMAP": "dirty ring plus a bitmap for non-vCPU writes",
    "MANUAL_DIRTY_LOG_PROTECT2": "clear dirty bits explicitly, in pieces",
    "IRQCHIP": "in-kernel PIC and IOAPIC",
    "SPLIT_IRQCHIP": "in-kernel LAPIC, userspace PIC/IOAPIC",
    "IRQFD": "interrupts from an eventfd",
    "IOEVENTFD": "port/MMIO writes to an eventfd, no exit",
    "SIGNAL_MSI": "inject an MSI directly",
    "PIT2": "in-kernel PIT",
    "XSAVE": "xsave state get/set",
    "XSAVE2": "xsave state size (bytes)",
    "XCRS": "extended control registers",
    "SREGS2": "sregs with PDPTRs",
    "VCPU_EVENTS": "pending exceptions/interrupts/NMI state",
    "IMMEDIATE_EXIT": "kvm_run.immediate_exit",
    "ADJUST_CLOCK": "get/set the KVM clock",
    "TSC_CONTROL": "per-vCPU TSC frequency",
    "NESTED_STATE": "nested virtualization state (bytes)",
    "PMU_EVENT_FILTER": "allow/deny PMU events per VM",
    "PMU_CAPABILITY": "per-VM vPMU control",
    "PMU_EVENT_MASKED_EVENTS": "masked PMU event filters",
    "X86_SMM": "system management mode",
    "MCE": "machine check injection (banks)",
    "X86_MSR_FILTER": "MSR accesses to userspace by filter",
    "X86_USER_SPACE_MSR": "unhandled MSRs exit to userspace",
    "EXIT_HYPERCALL": "hypercalls exit to userspace",
    "MEMORY_FAULT_INFO": "memory fault exits with details",
    "BINARY_STATS_FD": "binary statistics fds",
    "VM_GPA_BITS": "guest physical address bits",
    "X86_GUEST_MODE": "vCPU in guest mode flag",
    "VM_COPY_ENC_CONTEXT_FROM": "share an encryption context (SEV)",
    "VM_MOVE_ENC_CONTEXT_FROM": "move an encryption context (SEV)",
    "SGX_ATTRIBUTE": "SGX provisioning",
}


def group_of(name: str) -> str:
    if name.startswith(("GUEST_MEMFD", "MEMORY_ATTRIBUTES", "VM_TYPES", "PRE_FAULT")):
        return "guest_memfd"
    if "DIRTY" in name:
        return "dirty tracking"
    if name.startswith("PMU"):
        return "PMU"
    if "ENC_CONTEXT" in name or name.startswith(("SGX", "MEMORY_FAULT")):
        return "confidential computing"
    if any(k in name for k in ("IRQ", "MSI", "PIT", "IOAPIC", "IOEVENTFD", "NMI", "APIC", "INTR")):
        return "interrupts"
    if any(k in name for k in ("MEM", "MMU", "SLOT", "TSS", "IDENTITY_MAP", "GPA", "MAXPHY")):
        return "memory"
    if any(
        k in name
        for k in (
            "VCPU",
            "XSAVE",
            "XCRS",
            "REGS",
            "EVENTS",
            "DEBUG",
            "MP_STATE",
            "TSC",
            "CPUID",
            "ONE_REG",
            "IMMEDIATE",
            "CLOCK",
            "HALT",
        )
    ):
        return "vCPU"
    if name.startswith(("X86", "HYPERV", "MSR", "SMALLER", "EXT_", "GET_MSR", "VAPIC")):
        return "x86 specifics"
    return "other"


GROUPS = (
    "memory",
    "guest_memfd",
    "dirty tracking",
    "interrupts",
    "vCPU",
    "PMU",
    "confidential computing",
    "x86 specifics",
    "other",
)


def build_report(facts: Facts, profiles: list[str] | None = None) -> dict[str, Any]:
    """The JSON document `kvmkit check --json` prints (schema "kvmkit-check/1")."""
    out = dict(facts)
    out["profiles"] = {}
    for name in profiles or list(PROFILES):
        met, verdicts = evaluate(PROFILES[name], facts)
        out["profiles"][name] = {
            "summary": PROFILES[name].summary,
            "met": met,
            "requirements": [
                {
                    "id": v.requirement.id,
                    "level": v.requirement.level,
                    "text": v.requirement.text,
                    "met": v.met,
                    "observed": v.observed,
                    "why": v.requirement.why,
                    "provided_by": v.requirement.provides,
                }
                for v in verdicts
            ],
        }
    return out


# -- terminal -------------------------------------------------------------------------------
def render_tables(report: dict[str, Any], console: Any) -> None:  # noqa: ANN401 (rich Console)
    from rich.table import Table

    host = report["host"]
    t = Table(title="host", show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column()
    cpu = host["cpu"]
    t.add_row("kernel", host["kernel"])
    t.add_row(
        "CPU", f"{cpu['vendor']} family {cpu['family']} model {cpu['model']} ({cpu['model_name']})"
    )
    params = " ".join(f"{k}={v}" for k, v in host["backend_params"].items())
    t.add_row("KVM backend", f"{host['kvm_backend']}" + (f"  [dim]{params}[/]" if params else ""))
    d = host["dev_kvm"]
    t.add_row(
        "/dev/kvm",
        (
            f"mode {d['mode']} {d['owner']}:{d['group']}, "
            + ("read/write for you" if d["accessible"] else "[red]not accessible[/]")
        )
        if d["exists"]
        else "[red]missing[/]",
    )
    t.add_row("kvm module", " ".join(f"{k}={v}" for k, v in host["kvm_params"].items()))
    hp = host["hugepages"]
    pools = ", ".join(
        f"{s} {p['free_hugepages']}/{p['nr_hugepages']} free" for s, p in hp["pools"].items()
    )
    t.add_row(
        "hugepages", f"{pools or 'no pools'}; THP anon {hp['thp_anon']}, shmem {hp['thp_shmem']}"
    )
    console.print(t)

    kvm = report.get("kvm")
    if kvm:
        t = Table(
            title="KVM capabilities (KVM_CHECK_EXTENSION on /dev/kvm), by group",
            title_justify="left",
        )
        t.add_column("capability", no_wrap=True)
        t.add_column("value", justify="right", no_wrap=True)
        t.add_column("meaning")
        caps = kvm["caps"]
        for group in GROUPS:
            names = [n for n in caps if group_of(n) == group]
            t.add_row(f"[bold]{group}[/]", "", "")
            for i, name in enumerate(names):
                value = caps[name]
                hexed = name.endswith(("FLAGS", "ATTRIBUTES", "TYPES"))
                shown = f"{value:#x}" if hexed else str(value)
                t.add_row(
                    f"  KVM_CAP_{name}",
                    shown if value else "[dim]0[/]",
                    MEANINGS.get(name, ""),
                    end_section=i == len(names) - 1,
                )
        console.print(t)
        lim = kvm["limits"]
        console.print(
            f"VM types: {', '.join(kvm['vm_types'])}; guest_memfd flags:"
            f" {'|'.join(kvm['guest_memfd_flags']['names'])}; max vCPUs {lim['max_vcpus']}"
            f" (recommended {lim['recommended_vcpus']}); memslots {lim['memslots']};"
            f" dirty ring {lim['dirty_ring_bytes']} bytes; vPMU version {kvm['pmu_version']}"
        )
        console.print(f"CPUID features offered: {' '.join(kvm['cpuid_features'])}")
        console.print(f"MSRs ({len(kvm['msrs'])}): {' '.join(kvm['msrs'])}\n")

    if report.get("probes"):
        t = Table(title="functional probes", title_justify="left")
        t.add_column("probe")
        t.add_column("result")
        t.add_column("what was seen")
        for name, p in report["probes"].items():
            t.add_row(name, "[green]works[/]" if p["ok"] else "[yellow]no[/]", p["detail"])
        console.print(t)
    render_profiles(report, console, detail=False)


def render_profiles(report: dict[str, Any], console: Any, detail: bool) -> None:  # noqa: ANN401
    from rich.table import Table

    if not detail:
        t = Table(title="requirement profiles", title_justify="left")
        t.add_column("profile", no_wrap=True)
        t.add_column("verdict", no_wrap=True)
        t.add_column("required items unmet")
        for name, p in report["profiles"].items():
            unmet = [
                r["id"] for r in p["requirements"] if not r["met"] and r["level"] == "required"
            ]
            t.add_row(name, "[green]MET[/]" if p["met"] else "[red]UNMET[/]", ", ".join(unmet))
        console.print(t)
        return
    for name, p in report["profiles"].items():
        verdict = "[green]MET[/]" if p["met"] else "[red]UNMET[/]"
        console.print(f"[bold]{name}[/]: {verdict}  ({p['summary']})")
        for r in p["requirements"]:
            if r["met"]:
                mark = "[green]ok     [/]"
            elif r["level"] == "required":
                mark = "[red]MISSING[/]"
            else:
                mark = "[yellow]advised[/]"
            console.print(f"  {mark} {r['text']}  [dim]({r['id']})[/]")
            console.print(f"          seen: {r['observed']}")
            if not r["met"]:
                console.print(f"          why: {r['why']}")
                console.print(f"          fix: {r['provided_by']}")
        console.print()


# -- the requirements document ----------------------------------------------------------------
def requirements_doc(profiles: dict[str, Profile] = PROFILES) -> str:
    lines = [
        "# Host requirements for kvmkit workloads",
        "",
        "Generated by `kvmkit check --requirements-doc` from `kvmkit/hostcheck/profiles.py`.",
        "Check a host against a profile with `kvmkit check --profile NAME` (exit 0 when",
        "every required item is met, 1 when not). Recommended items are reported but do",
        "not fail a profile.",
        "",
    ]
    for p in profiles.values():
        lines += [
            f"## {p.name}",
            "",
            p.summary[0].upper() + p.summary[1:] + ".",
            "",
            "| requirement | level | why | provided by |",
            "|---|---|---|---|",
        ]
        for r in p.requirements:
            lines.append(f"| `{r.id}`: {r.text} | {r.level} | {r.why} | {r.provides} |")
        lines.append("")
    return "\n".join(lines)
