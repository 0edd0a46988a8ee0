"""Facts about the host that come from /proc and /sys: kernel, CPU, which KVM
backend serves /dev/kvm, its parameters, /dev/kvm permissions, hugepages, THP."""

import grp
import os
import pwd
import re
import stat
from pathlib import Path
from typing import Any

from kvmkit.arch.x86.host_cpu import host_cpu
from kvmkit.memory.hugepages import SHMEM_THP, SYSFS_HUGEPAGES

MODULES = Path("/sys/module")
BACKEND_MODULES = ("kvm_intel", "kvm_amd", "kvm_pvm")
KVM_PARAMS = ("enable_pmu", "tdp_mmu", "nx_huge_pages", "halt_poll_ns", "mmio_caching")
ANON_THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


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


def kvm_backend() -> str:
    """kvm_intel, kvm_amd, pvm (the kvm_pvm module), or none."""
    for module in BACKEND_MODULES:
        if (MODULES / module).is_dir():
            return "pvm" if module == "kvm_pvm" else module
    return "none"


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


def _bracketed(path: Path) -> str:
    try:
        m = re.search(r"\[(\w+)\]", path.read_text())
    except OSError:
        return "unavailable"
    return m.group(1) if m else "unknown"


def hugepages() -> dict[str, Any]:
    pools = {}
    if SYSFS_HUGEPAGES.is_dir():
        for d in sorted(SYSFS_HUGEPAGES.iterdir()):
            size_kb = int(d.name.removeprefix("hugepages-").removesuffix("kB"))
            fields = {}
            for f in ("nr_hugepages", "free_hugepages", "resv_hugepages"):
                try:
                    fields[f] = int((d / f).read_text())
                except (OSError, ValueError):
                    fields[f] = 0
            fields["resizable"] = os.access(d / "nr_hugepages", os.W_OK)
            pools[f"{size_kb // 1024}M" if size_kb < 1 << 20 else f"{size_kb >> 20}G"] = fields
    return {"pools": pools, "thp_anon": _bracketed(ANON_THP), "thp_shmem": _bracketed(SHMEM_THP)}


def host_facts() -> dict[str, Any]:
    backend = kvm_backend()
    module = {"pvm": "kvm_pvm"}.get(backend, backend)
    return {
        "kernel": os.uname().release,
        "cpu": host_cpu().to_dict(),
        "kvm_backend": backend,
        "backend_params": module_params(module) if backend != "none" else {},
        "kvm_params": module_params("kvm", KVM_PARAMS),
        "dev_kvm": dev_kvm(),
        "hugepages": hugepages(),
    }
