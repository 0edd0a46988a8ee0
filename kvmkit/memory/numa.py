"""NUMA policy for guest memory: which host nodes back it, applied with mbind before
the first touch."""

import os
import re
from dataclasses import dataclass
from pathlib import Path

from kvmkit import libc
from kvmkit.errors import ConfigError

NODE_DIR = Path("/sys/devices/system/node")
MODES = {
    "bind": libc.MPOL_BIND,
    "preferred": libc.MPOL_PREFERRED,
    "interleave": libc.MPOL_INTERLEAVE,
}
# guest_memfd consults the mapping's policy when allocating from v6.19 on; earlier
# kernels store it but allocate by the faulting thread's policy.
GMEM_HONOURS_MBIND = (6, 19)


def host_nodes() -> list[int]:
    found = [
        int(m.group(1)) for p in NODE_DIR.glob("node*") if (m := re.match(r"node(\d+)$", p.name))
    ]
    return sorted(found) or [0]


def kernel_version() -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", os.uname().release)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def parse_nodes(text: str) -> tuple[int, ...]:
    """ "0", "0,1", "0-3" -> node numbers."""
    nodes: list[int] = []
    try:
        for part in text.split(","):
            lo, _, hi = part.strip().partition("-")
            nodes.extend(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise ConfigError(
            f"NUMA nodes {text!r} are not a node list: use e.g. 0, 0,1 or 0-3"
        ) from None
    return tuple(sorted(set(nodes)))


@dataclass(frozen=True)
class NumaPolicy:
    mode: str
    nodes: tuple[int, ...]

    def validate(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"unknown NUMA policy {self.mode!r}: choose {', '.join(MODES)}")
        if not self.nodes:
            raise ConfigError("a NUMA policy needs at least one node (--numa-node)")
        if self.mode == "preferred" and len(self.nodes) != 1:
            raise ConfigError("the preferred NUMA policy takes exactly one node")
        have = host_nodes()
        missing = [n for n in self.nodes if n not in have]
        if missing:
            raise ConfigError(
                f"NUMA node {missing[0]} does not exist on this host (nodes: "
                f"{', '.join(map(str, have))})"
            )

    @property
    def mpol(self) -> int:
        return MODES[self.mode]

    def describe(self) -> str:
        return f"{self.mode} to node{'s' if len(self.nodes) > 1 else ''} " + ",".join(
            map(str, self.nodes)
        )

    def apply(self, addr: int, length: int) -> None:
        libc.mbind(addr, length, self.mpol, self.nodes)
