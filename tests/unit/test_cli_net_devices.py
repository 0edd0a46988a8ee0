"""--net, --vsock and the restore overrides as a user writes them."""

import argparse

import pytest

from kvmkit.cli_devices import apply_device_args, parse_net, parse_net_taps, parse_vsock
from kvmkit.errors import ConfigError
from kvmkit.machine.resources import VmResources
from kvmkit.machine.virtio_devices import KINDS


def test_a_net_with_every_option_and_the_defaults():
    n = parse_net("tap=tap1,mac=06:00:AC:10:00:07,id=uplink", 1)
    assert (n.iface_id, n.tap, n.mac) == ("uplink", "tap1", "06:00:AC:10:00:07")
    d = parse_net("tap=tap0", 2)
    assert (d.iface_id, d.mac) == ("eth2", None)


def test_interfaces_get_device_ids_and_macs_in_order():
    args = argparse.Namespace(net=["tap=t0", "tap=t1,mac=06:00:ac:10:00:09"], vsock=None)
    resources = apply_device_args(args, VmResources())
    configs = KINDS["virtio-net"].configs(resources)
    assert [(i, c.iface_id, c.tap, c.mac) for i, c in configs] == [
        ("net0", "eth0", "t0", "06:00:ac:10:00:02"),
        ("net1", "eth1", "t1", "06:00:ac:10:00:09"),
    ]


def test_vsock_options(tmp_path):
    v = parse_vsock(f"cid=42,uds={tmp_path}/v.sock")
    assert (v.cid, v.uds) == (42, f"{tmp_path}/v.sock")
    args = argparse.Namespace(net=[], vsock=f"uds={tmp_path}/v.sock,cid=3")
    resources = apply_device_args(args, VmResources())
    assert KINDS["virtio-vsock"].configs(resources)[0][0] == "vsock"
    with pytest.raises(ConfigError, match="give both the guest's CID and the socket path"):
        parse_vsock("uds=/tmp/x.sock")


def test_net_taps():
    assert parse_net_taps(["eth0=tap1", "eth1=tap2"]) == {"eth0": "tap1", "eth1": "tap2"}
    with pytest.raises(ConfigError, match="write ID=TAP"):
        parse_net_taps(["eth0"])
    with pytest.raises(ConfigError, match="given twice"):
        parse_net_taps(["eth0=a", "eth0=b"])
