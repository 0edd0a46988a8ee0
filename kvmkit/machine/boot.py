"""Put a guest image into guest RAM and set each vCPU up to enter it.

Long mode layout (the top of the RAM region that starts at 0, going down):
one page holding boot info (at +0) and the GDT (at +0x800), then the identity
page tables, then one stack per vCPU. RAM below the stacks that the image does
not occupy is reported to the guest as free.
"""

from dataclasses import dataclass, field

from kvmkit.arch.x86.cpuid import vcpu_cpuid
from kvmkit.arch.x86.long_mode import (
    GDT,
    identity_page_tables,
    long_mode_regs,
    long_mode_sregs,
    page_table_bytes,
)
from kvmkit.arch.x86.real_mode import REAL_MODE_LIMIT, real_mode_regs, real_mode_sregs
from kvmkit.errors import ConfigError
from kvmkit.guests.abi import BI_MAX_RANGES, BootInfo
from kvmkit.kvm import Vcpu
from kvmkit.memory import PAGE_SIZE, GuestMemory
from kvmkit.memory.layout import page_align_up
from kvmkit.uapi.cpu import kvm_cpuid_entry2

STACK_SIZE = 16 << 10
GDT_OFFSET = 0x800


@dataclass
class BootPlan:
    """Where everything went, and what each vCPU starts with."""

    mode: str
    entry: int
    image_size: int
    boot_info_gpa: int = 0
    gdt_gpa: int = 0
    cr3: int = 0
    stack_tops: list[int] = field(default_factory=list)
    free_ranges: list[tuple[int, int]] = field(default_factory=list)


def load_long_mode(
    memory: GuestMemory,
    image: bytes,
    load_addr: int,
    nr_vcpus: int,
    arg: int = 0,
    flags: int = 0,
) -> BootPlan:
    low = memory.regions[0]
    top_gpa = memory.regions[-1].end
    boot_page = low.end - PAGE_SIZE
    tables = page_table_bytes(top_gpa)
    pt_base = boot_page - tables
    stacks_base = pt_base - nr_vcpus * STACK_SIZE
    image_end = load_addr + len(image)
    if stacks_base < page_align_up(image_end) or load_addr < PAGE_SIZE:
        need = page_align_up(image_end) + nr_vcpus * STACK_SIZE + tables + PAGE_SIZE
        if load_addr < PAGE_SIZE:
            raise ConfigError(
                f"entry {load_addr:#x} is in page 0: load the guest at 0x1000 or above"
            )
        raise ConfigError(
            f"guest image ({len(image)} bytes at {load_addr:#x}) does not fit below kvmkit's boot"
            f" area: give the guest at least {need >> 20 or 1} MiB more or load it lower"
        )
    free = [(PAGE_SIZE, load_addr), (page_align_up(image_end), stacks_base)]
    free += [(r.gpa, r.end) for r in memory.regions[1:]]
    free = [(s, e) for s, e in free if e - s >= PAGE_SIZE][:BI_MAX_RANGES]

    memory.write(load_addr, image)
    info = BootInfo(
        ram_bytes=memory.size_bytes, nr_vcpus=nr_vcpus, free_ranges=free, arg=arg, flags=flags
    )
    memory.write(boot_page, info.pack())
    memory.write(boot_page + GDT_OFFSET, GDT)
    memory.write(pt_base, identity_page_tables(pt_base, top_gpa))
    return BootPlan(
        mode="long",
        entry=load_addr,
        image_size=len(image),
        boot_info_gpa=boot_page,
        gdt_gpa=boot_page + GDT_OFFSET,
        cr3=pt_base,
        stack_tops=[stacks_base + (i + 1) * STACK_SIZE for i in range(nr_vcpus)],
        free_ranges=free,
    )


def load_real_mode(memory: GuestMemory, image: bytes, load_addr: int) -> BootPlan:
    if load_addr + len(image) > REAL_MODE_LIMIT:
        raise ConfigError(
            f"a real-mode guest must fit below 1 MiB: {len(image)} bytes at {load_addr:#x}"
            f" end at {load_addr + len(image):#x}"
        )
    memory.write(load_addr, image)
    return BootPlan(mode="real", entry=load_addr, image_size=len(image))


def setup_vcpu(vcpu: Vcpu, plan: BootPlan, supported_cpuid: list[kvm_cpuid_entry2]) -> None:
    """CPUID, segment/control registers and general registers for the plan's mode."""
    vcpu.set_cpuid(vcpu_cpuid(supported_cpuid, vcpu.index))
    if plan.mode == "long":
        vcpu.set_sregs(long_mode_sregs(vcpu.get_sregs(), plan.gdt_gpa, plan.cr3))
        vcpu.set_regs(
            long_mode_regs(
                plan.entry, plan.stack_tops[vcpu.index], rdi=plan.boot_info_gpa, rsi=vcpu.index
            )
        )
    else:
        vcpu.set_sregs(real_mode_sregs(vcpu.get_sregs(), plan.entry))
        vcpu.set_regs(real_mode_regs(plan.entry))
