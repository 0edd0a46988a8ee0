"""Guest memory against the real kernel: host exposure and hide mode, discard,
prealloc, hugetlb and THP backends, NUMA policy, memory attributes."""

import io
import os
import struct
import subprocess
import sys

import pytest

from kvmkit import libc
from kvmkit.errors import ConfigError, KvmkitError
from kvmkit.hostcheck.probes import guest_memfd_runs_unmapped
from kvmkit.kvm import KvmUnsupportedError
from kvmkit.machine import MachineConfig, build_for_boot
from kvmkit.memory import GuestMemory, GuestMemoryError, NumaPolicy
from kvmkit.memory.hugepages import HugepagePoolError, read_pool
from kvmkit.uapi.memory import GUEST_MEMFD_FLAG_NO_DIRECT_MAP

MIB = 1 << 20


def gmem_maps(fd: int) -> list[tuple[int, int]]:
    """(start, end) of every mapping of this guest_memfd file in /proc/self/maps."""
    ino = os.fstat(fd).st_ino
    spans = []
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 6 and int(fields[4]) == ino and "kvm-gmem" in fields[5]:
                start, end = (int(x, 16) for x in fields[0].split("-"))
                spans.append((start, end))
    return spans


# -- host exposure --------------------------------------------------------------------------
def test_memory_knows_its_host_windows(vm):
    with GuestMemory(vm, 8 * MIB) as mem:
        assert mem.host_mapped_bytes == 8 * MIB
        assert [(w.offset, w.size, w.owner) for w in mem.windows] == [(0, 8 * MIB, "vmm")]
        assert sum(e - s for s, e in gmem_maps(mem.backend.fd)) == 8 * MIB


def test_hide_leaves_no_mapping_of_the_guest_memfd(vm):
    with GuestMemory(vm, 8 * MIB) as mem:
        mem.write(0x3000, b"secret")
        mem.hide()
        assert gmem_maps(mem.backend.fd) == []
        assert mem.host_mapped_bytes == 0
        assert mem.exposure_report() == "no guest RAM mapped in the VMM"
        with pytest.raises(GuestMemoryError, match="hidden from the host"):
            mem.read(0x3000, 6)


def test_hide_keeps_only_declared_windows(vm):
    with GuestMemory(vm, 8 * MIB) as mem:
        mem.write(0x5008, b"ring")
        mem.hide(keep=[(0x5000, 100, "virtio-ring")])
        spans = gmem_maps(mem.backend.fd)
        assert len(spans) == 1 and spans[0][1] - spans[0][0] == 4096
        assert mem.read(0x5008, 4) == b"ring"  # the window sees the same file
        assert mem.host_mapped_bytes == 4096
        assert "virtio-ring 4 KiB" in mem.exposure_report()
        with pytest.raises(GuestMemoryError, match="hidden"):
            mem.read(0x6000, 1)


def test_hide_refused_on_memfd(vm):
    with GuestMemory(vm, 4 * MIB, "memfd") as mem:
        with pytest.raises(KvmUnsupportedError, match="needs guest_memfd"):
            mem.hide()


@pytest.mark.skipif(
    not guest_memfd_runs_unmapped().ok,
    reason="this host's KVM needs a host mapping to run guest_memfd memory"
    f" ({guest_memfd_runs_unmapped().detail})",
)
def test_hidden_guest_runs_with_nothing_mapped():
    console = io.BytesIO()
    with build_for_boot(MachineConfig(memory_bytes=16 * MIB, hide="unmap"), console=console) as m:
        assert gmem_maps(m.memory.backend.fd) == []
        result = m.run()
    assert result.status == 0 and result.host_mapped_bytes == 0
    assert console.getvalue().endswith(b"hello: bye\n")


@pytest.mark.skipif(
    guest_memfd_runs_unmapped().ok, reason="this host runs guest_memfd without a host mapping"
)
def test_hide_refused_where_kvm_needs_the_mapping():
    with pytest.raises(
        KvmUnsupportedError,
        match="cannot run a guest from guest_memfd without a host mapping \\(measured: ",
    ):
        build_for_boot(MachineConfig(memory_bytes=16 * MIB, hide="unmap"))


def test_direct_map_removal_needs_the_kernel_flag(vm):
    if vm.guest_memfd_flags() & GUEST_MEMFD_FLAG_NO_DIRECT_MAP:
        pytest.skip("this kernel has GUEST_MEMFD_FLAG_NO_DIRECT_MAP")
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "kvmkit",
            "run",
            "--memory",
            "16M",
            "--hide-guest-memory=direct-map",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 1
    assert "this kernel lacks GUEST_MEMFD_FLAG_NO_DIRECT_MAP" in p.stderr
    assert "Traceback" not in p.stderr


# -- discard, prealloc, populated ------------------------------------------------------------
@pytest.mark.parametrize("backend", ["guest_memfd", "memfd"])
def test_discard_zeroes_and_returns_memory(vm, backend):
    with GuestMemory(vm, 8 * MIB, backend) as mem:
        assert mem.populated_bytes() == 0
        mem.write(0, b"\xab" * (4 * MIB))
        assert mem.populated_bytes() == 4 * MIB
        mem.discard(MIB, 2 * MIB)
        assert mem.populated_bytes() == 2 * MIB  # measured before reading faults pages back
        assert mem.read(MIB, 2 * MIB) == bytes(2 * MIB)
        assert mem.read(0, MIB) == b"\xab" * MIB
        assert mem.read(3 * MIB, MIB) == b"\xab" * MIB
        with pytest.raises(GuestMemoryError, match="multiples of 4 KiB"):
            mem.discard(100, 4096)


@pytest.mark.parametrize("backend", ["guest_memfd", "memfd"])
def test_guest_reads_zeros_after_a_host_discard(backend):
    from kvmkit.testing.gmem_bench import PORT_DISCARD_PROBE, _DiscardOnWrite

    target = 0x800000
    config = MachineConfig(
        guest="discard_probe",
        memory_bytes=16 * MIB,
        memory_backend=backend,
        guest_arg=target,
        console="none",
    )
    with build_for_boot(config) as m:
        m.pio_bus.add(
            PORT_DISCARD_PROBE, 1, _DiscardOnWrite(lambda: m.memory.discard(target, 4096))
        )
        result = m.run()
    assert result.status == 0, "the guest still saw its old data after the discard"


def test_prealloc_populates_every_page_of_memfd(vm):
    with GuestMemory(vm, 16 * MIB, "memfd", prealloc=True) as mem:
        assert mem.populated_bytes() == 16 * MIB


def test_prealloc_run_reports_populated():
    with build_for_boot(
        MachineConfig(
            guest="exitloop",
            memory_bytes=16 * MIB,
            memory_backend="memfd",
            prealloc=True,
            console="none",
        )
    ) as m:
        result = m.run()
    assert result.status == 0 and result.populated_bytes == 16 * MIB


def test_run_reports_populated_vs_configured():
    with build_for_boot(
        MachineConfig(guest="exitloop", memory_bytes=64 * MIB, console="none")
    ) as m:
        result = m.run()
    # exitloop touches only its own page, boot info, page tables and stack
    assert 0 < result.populated_bytes < MIB


# -- hugepages --------------------------------------------------------------------------------
@pytest.fixture
def hugetlb_pool(request):
    """Grow a hugetlb pool by the pages a test needs, and put it back afterwards."""
    page_size, pages = request.param
    try:
        pool = read_pool(page_size)
    except HugepagePoolError as e:
        pytest.skip(str(e))
    path = pool.sysfs_dir / "nr_hugepages"
    if not os.access(path, os.W_OK):
        pytest.skip(f"cannot write {path} (not root)")
    path.write_text(str(pool.total + pages))
    try:
        if read_pool(page_size).available < pages:
            pytest.skip(f"the host could not provide {pages} hugepages of {page_size >> 20} MiB")
        yield page_size
    finally:
        path.write_text(str(pool.total))


@pytest.mark.parametrize("hugetlb_pool", [(2 * MIB, 16)], indirect=True)
def test_hugetlb_2m_backend_runs_a_guest(hugetlb_pool):
    console = io.BytesIO()
    config = MachineConfig(
        memory_bytes=32 * MIB, memory_backend="hugetlb", hugepage_size=hugetlb_pool
    )
    with build_for_boot(config, console=console) as m:
        result = m.run()
    assert result.status == 0 and result.backend == "hugetlb"
    assert console.getvalue().endswith(b"hello: bye\n")
    assert "2 MiB hugetlb pages" in result.memory_notes


@pytest.mark.parametrize("hugetlb_pool", [(1 << 30, 1)], indirect=True)
def test_hugetlb_1g_backend_runs_a_guest(hugetlb_pool):
    config = MachineConfig(
        guest="exitloop",
        memory_bytes=1 << 30,
        memory_backend="hugetlb",
        hugepage_size=1 << 30,
        console="none",
    )
    with build_for_boot(config) as m:
        result = m.run()
    assert result.status == 0 and "1 GiB hugetlb pages" in result.memory_notes


def test_short_hugetlb_pool_names_the_sysctl():
    pool = read_pool(2 * MIB)
    need = pool.available + 1
    config = MachineConfig(memory_bytes=need * 2 * MIB, memory_backend="hugetlb")
    with pytest.raises(HugepagePoolError) as info:
        build_for_boot(config)
    message = str(info.value)
    assert f"has {pool.available} free pages and the guest needs {need}" in message
    assert "vm.nr_hugepages=" in message or "nr_hugepages" in message


def test_hugetlb_size_must_divide_memory():
    with pytest.raises(ConfigError, match="multiple of the 2 MiB hugepage size"):
        build_for_boot(MachineConfig(memory_bytes=3 * MIB, memory_backend="hugetlb"))


def test_thp_backend_runs_and_says_what_the_advice_does():
    with build_for_boot(
        MachineConfig(memory_bytes=16 * MIB, memory_backend="thp", console="none")
    ) as m:
        result = m.run()
    assert result.status == 0 and result.backend == "thp"
    assert any("MADV_HUGEPAGE given" in note for note in result.memory_notes)


def test_guest_memfd_reports_no_hugepage_flag():
    with build_for_boot(
        MachineConfig(guest="exitloop", memory_bytes=16 * MIB, console="none")
    ) as m:
        notes = m.memory.notes
    assert any("guest_memfd hugepage flag" in n or "hugepage" in n for n in notes)


# -- NUMA -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "mode, mpol",
    [
        ("bind", libc.MPOL_BIND),
        ("interleave", libc.MPOL_INTERLEAVE),
        ("preferred", libc.MPOL_PREFERRED),
    ],
)
def test_numa_policy_is_on_the_mapping(mode, mpol):
    config = MachineConfig(
        guest="exitloop", memory_bytes=16 * MIB, console="none", numa=NumaPolicy(mode, (0,))
    )
    with build_for_boot(config) as m:
        window = m.memory.windows[0]
        assert libc.get_mempolicy_at(window.addr) == (mpol, (0,))
        assert m.run().status == 0
        assert any(n.startswith(f"NUMA policy {mode} to node 0") for n in m.memory.notes)


def test_numa_prealloc_uses_the_thread_policy():
    config = MachineConfig(
        guest="exitloop",
        memory_bytes=16 * MIB,
        console="none",
        numa=NumaPolicy("bind", (0,)),
        prealloc=True,
    )
    with build_for_boot(config) as m:
        assert m.run().status == 0


def test_missing_numa_node_is_a_clear_cli_error():
    p = subprocess.run(
        [sys.executable, "-m", "kvmkit", "run", "--numa-node", "63"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 2 and "NUMA node 63 does not exist on this host" in p.stderr


# -- attributes and VM types -----------------------------------------------------------------
def test_private_conversion_refused_clearly_without_the_capability(vm):
    from kvmkit.uapi.caps import Cap

    if vm.check_extension(Cap.MEMORY_ATTRIBUTES):
        pytest.skip("this host has KVM_CAP_MEMORY_ATTRIBUTES")
    with GuestMemory(vm, 4 * MIB) as mem:
        with pytest.raises(KvmUnsupportedError, match="KVM_CAP_MEMORY_ATTRIBUTES is 0x0"):
            mem.set_private(0, 4096)
        assert mem.attributes.ranges() == []


def test_vm_types(kvm):
    assert "default" in kvm.vm_types()
    if "sw_protected" not in kvm.vm_types():
        with pytest.raises(KvmUnsupportedError, match="this host offers VM types default"):
            kvm.create_vm(1)


def test_bad_memory_backend_config_is_a_config_error():
    with pytest.raises(ConfigError):
        MachineConfig(hide="unmap", memory_backend="hugetlb").validate()


def test_windows_survive_struct_reads(vm):
    with GuestMemory(vm, 4 * MIB) as mem:
        mem.write(0x2000, struct.pack("<Q", 42))
        assert struct.unpack("<Q", bytes(mem.view(0x2000, 8)))[0] == 42


# -- file ranges (what migration and snapshots use) --------------------------------------
@pytest.mark.parametrize("backend", ["guest_memfd", "memfd"])
def test_file_ranges_outside_ram_are_refused_or_ignored(vm, backend):
    with GuestMemory(vm, 8 * MIB, backend) as mem:
        with pytest.raises(GuestMemoryError, match="0x800000\\+0x1000 is not mapped in the host"):
            mem.file_view(8 * MIB, 4096)
        mem.populate_file_range(8 * MIB, MIB)  # best effort: nothing there, nothing done
        mem.populate_file_range(MIB, 2 * MIB)
        assert mem.populated_bytes() >= 2 * MIB  # allocated without a byte written


@pytest.mark.parametrize("backend", ["guest_memfd", "memfd"])
def test_zeroing_a_file_range_punches_whole_pages_and_writes_the_rest(vm, backend):
    with GuestMemory(vm, 8 * MIB, backend) as mem:
        mem.file_view(0, 4 * MIB)[:] = b"\x5a" * (4 * MIB)
        mem.zero_file_range(MIB, MIB)  # whole pages: punched, so freed
        assert mem.populated_bytes() == 3 * MIB
        assert bytes(mem.file_view(MIB, MIB)) == bytes(MIB)
        mem.zero_file_range(100, 5000)  # not page aligned: written
        view = mem.file_view(0, 8192)
        assert view[99] == 0x5A and bytes(view[100:5100]) == bytes(5000) and view[5100] == 0x5A


def test_numa_on_memfd_needs_no_guest_memfd_caveat(vm):
    with GuestMemory(vm, 8 * MIB, "memfd", numa=NumaPolicy("bind", (0,))) as mem:
        assert "NUMA policy bind to node 0 (mbind before first touch)" in mem.notes


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"backend": "tmpfs"}, "unknown memory backend 'tmpfs'"),
        ({"backend": "memfd", "no_direct_map": True}, "direct map needs guest_memfd"),
    ],
)
def test_memory_from_python_refuses_impossible_requests(vm, kwargs, message):
    with pytest.raises(KvmkitError, match=message):
        GuestMemory(vm, 8 * MIB, **kwargs)


def test_closing_memory_twice_is_harmless(vm):
    mem = GuestMemory(vm, 8 * MIB, "memfd")
    mem.close()
    mem.close()
    assert mem.backend.fd == -1 and mem.host_mapped_bytes == 0


def test_a_hugepage_size_the_host_has_no_pool_for_is_named():
    with pytest.raises(HugepagePoolError, match=r"no 16384 MiB hugetlb pages \(pools: hugepages-"):
        read_pool(16 << 30)
