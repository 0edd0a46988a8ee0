"""Facts about the host that come from /proc and /sys: kernel, CPU, which KVM
backend serves /dev/kvm, its parameters, /dev/kvm permissions, hugepages, THP."""

import grp
import os
import pwd
import stat
from pathlib import Path
from typing import Any

from kvmkit.arch.x86.host_cpu import host_cpu
from kvmkit.kvm.system import BACKEND_MODULES, kvm_backend
from kvmkit.memory.hugepages import (
    ANON_THP,
    SHMEM_THP,
    HugepagePoolError,
    pool_dir,
    pool_sizes,
    read_pool,
    thp_mode,
)

MODULES = Path("/sys/module")
KVM_PARAMS = ("enable_pmu", "tdp_mmu", "nx_huge_pages", "halt_poll_ns", "mmio_caching")


def module_params(module: str, names: tuple[str, ...] | None = None) -> dict[str, str]:
    params = MODULES / module / "parameters"
    if not params.is_dir():
        return {}
    out = {}
    for path in sorted(params.iterdir()):
        if names is None or path.name in names:
            try:
                out[path.name] = path.read_text().strip()
            except OSError:
                out[path.name] = "(unreadable)"
    return out


def dev_kvm(path: str = "/dev/kvm") -> dict[str, Any]:
    try:
        st = os.stat(path)
    except OSError as e:
        return {"path": path, "exists": False, "accessible": False, "error": e.strerror}

    def name(lookup: Any, ident: int) -> str:  # noqa: ANN401
        try:
            return str(lookup(ident)[0])
        except KeyError:
            return str(ident)

    return {
        "path": path,
        "exists": True,
        "char_device": stat.S_ISCHR(st.st_mode),
        "mode": f"{stat.S_IMODE(st.st_mode):04o}",
        "owner": name(pwd.getpwuid, st.st_uid),
        "group": name(grp.getgrgid, st.st_gid),
        "accessible": os.access(path, os.R_OK | os.W_OK),
    }


def hugepages() -> dict[str, Any]:
    pools = {}
    for page_size in pool_sizes():
        try:
            pool = read_pool(page_size)
            counts = (pool.total, pool.free, pool.reserved)
        except (OSError, ValueError, HugepagePoolError):
            counts = (0, 0, 0)
        label = f"{page_size >> 30}G" if page_size >= 1 << 30 else f"{page_size >> 20}M"
        pools[label] = {
            "nr_hugepages": counts[0],
            "free_hugepages": counts[1],
            "resv_hugepages": counts[2],
            "resizable": os.access(pool_dir(page_size) / "nr_hugepages", os.W_OK),
        }
    return {"pools": pools, "thp_anon": thp_mode(ANON_THP), "thp_shmem": thp_mode(SHMEM_THP)}


def host_facts() -> dict[str, Any]:
    backend = kvm_backend()
    module = {name: module for module, name in BACKEND_MODULES.items()}.get(backend, backend)
    return {
        "kernel": os.uname().release,
        "cpu": host_cpu().to_dict(),
        "kvm_backend": backend,
        "backend_params": module_params(module) if backend != "none" else {},
        "kvm_params": module_params("kvm", KVM_PARAMS),
        "dev_kvm": dev_kvm(),
        "hugepages": hugepages(),
    }
