"""Hugetlb pools and transparent hugepage settings, read from sysfs, with the exact fix
when a pool cannot back a guest."""

import re
from dataclasses import dataclass
from pathlib import Path

from kvmkit.errors import KvmkitError

HUGEPAGE_SIZES = {"2M": 2 << 20, "1G": 1 << 30}
SYSFS_HUGEPAGES = Path("/sys/kernel/mm/hugepages")
SHMEM_THP = Path("/sys/kernel/mm/transparent_hugepage/shmem_enabled")
ANON_THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


class HugepagePoolError(KvmkitError):
    """The hugetlb pool cannot back the guest; the message has the command that fixes it."""


@dataclass(frozen=True)
class HugepagePool:
    page_size: int
    total: int
    free: int
    reserved: int

    @property
    def available(self) -> int:
        return self.free - self.reserved

    @property
    def sysfs_dir(self) -> Path:
        return pool_dir(self.page_size)


def pool_dir(page_size: int) -> Path:
    """The sysfs directory of the hugetlb pool of `page_size` pages."""
    return SYSFS_HUGEPAGES / f"hugepages-{page_size >> 10}kB"


def size_label(page_size: int) -> str:
    return "1 GiB" if page_size == 1 << 30 else f"{page_size >> 20} MiB"


def read_pool(page_size: int) -> HugepagePool:
    d = pool_dir(page_size)
    if not d.is_dir():
        sizes = sorted(p.name for p in SYSFS_HUGEPAGES.glob("hugepages-*")) or ["none"]
        raise HugepagePoolError(
            f"this host has no {size_label(page_size)} hugetlb pages (pools: {', '.join(sizes)})"
        )

    def read(name: str) -> int:
        return int((d / name).read_text())

    return HugepagePool(
        page_size, read("nr_hugepages"), read("free_hugepages"), read("resv_hugepages")
    )


def default_hugepage_size() -> int:
    m = re.search(r"^Hugepagesize:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.M)
    return int(m.group(1)) << 10 if m else 2 << 20


def grow_command(pool: HugepagePool, pages: int) -> str:
    """The command that makes the pool `pages` pages larger."""
    target = pool.total + pages
    if pool.page_size == default_hugepage_size():
        return f"sysctl -w vm.nr_hugepages={target}"
    return f"echo {target} > {pool.sysfs_dir}/nr_hugepages"


def check_pool(page_size: int, size_bytes: int) -> HugepagePool:
    """Raise HugepagePoolError unless the pool has `size_bytes` free right now."""
    if size_bytes % page_size:
        raise HugepagePoolError(
            f"guest memory must be a multiple of the {size_label(page_size)} hugepage size"
        )
    pool = read_pool(page_size)
    need = size_bytes // page_size
    if pool.available < need:
        missing = need - pool.available
        raise HugepagePoolError(
            f"the {size_label(page_size)} hugetlb pool has {pool.available} free pages and the"
            f" guest needs {need}: run `{grow_command(pool, missing)}` as root"
        )
    return pool


def thp_mode(path: Path = SHMEM_THP) -> str:
    """The bracketed setting of a THP control file (shmem_enabled: always, within_size,
    advise, never, deny, force; enabled: always, madvise, never), or "unavailable"."""
    try:
        m = re.search(r"\[(\w+)\]", path.read_text())
    except OSError:
        return "unavailable"
    return m.group(1) if m else "unavailable"


def shmem_thp_mode() -> str:
    return thp_mode(SHMEM_THP)


def pool_sizes() -> list[int]:
    """The page sizes of this host's hugetlb pools."""
    return sorted(
        int(d.name.removeprefix("hugepages-").removesuffix("kB")) << 10
        for d in SYSFS_HUGEPAGES.glob("hugepages-*kB")
    )
