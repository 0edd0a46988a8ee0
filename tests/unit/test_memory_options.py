import pytest

from kvmkit.errors import ConfigError
from kvmkit.machine.config import MachineConfig
from kvmkit.memory import hugepages
from kvmkit.memory.hugepages import HugepagePool, grow_command
from kvmkit.memory.layout import approx_size, format_size
from kvmkit.memory.numa import NumaPolicy, host_nodes, parse_nodes


def test_parse_nodes():
    assert parse_nodes("0") == (0,)
    assert parse_nodes("2,0,1") == (0, 1, 2)
    assert parse_nodes("0-3") == (0, 1, 2, 3)
    with pytest.raises(ConfigError, match="not a node list"):
        parse_nodes("zero")


def test_missing_node_refused_naming_the_nodes_there_are():
    with pytest.raises(ConfigError, match=r"NUMA node 4095 does not exist on this host \(nodes: "):
        NumaPolicy("bind", (4095,)).validate()


def test_policy_shapes():
    NumaPolicy("bind", (host_nodes()[0],)).validate()
    with pytest.raises(ConfigError, match="exactly one node"):
        NumaPolicy("preferred", (0, 1)).validate()
    with pytest.raises(ConfigError, match="unknown NUMA policy"):
        NumaPolicy("local", (0,)).validate()


def test_grow_command_uses_sysctl_for_the_default_size(monkeypatch):
    monkeypatch.setattr(hugepages, "default_hugepage_size", lambda: 2 << 20)
    assert grow_command(HugepagePool(2 << 20, 3, 3, 0), 5) == "sysctl -w vm.nr_hugepages=8"
    assert grow_command(HugepagePool(1 << 30, 0, 0, 0), 2) == (
        "echo 2 > /sys/kernel/mm/hugepages/hugepages-1048576kB/nr_hugepages"
    )


def test_format_size():
    assert format_size(256 << 20) == "256 MiB"
    assert format_size(3 << 30) == "3 GiB"
    assert format_size(12 << 10) == "12 KiB"
    assert format_size(1000) == "1000 bytes"
    assert approx_size(262128 << 10) == "256.0 MiB"
    assert approx_size(12 << 10) == "12 KiB"
    assert approx_size(2 << 30) == "2 GiB"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"hide": "sideways"}, "unknown hide mode"),
        ({"hide": "unmap", "memory_backend": "memfd"}, "needs the guest_memfd backend"),
        ({"hugepage_size": 4 << 20}, "is not one of 2M, 1G"),
        ({"numa": NumaPolicy("bind", (4095,))}, "does not exist"),
    ],
)
def test_memory_options_validated(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        MachineConfig(**kwargs).validate()
