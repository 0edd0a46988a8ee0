"""Device flags as a user writes them, and the guest command line kvmkit derives."""

import pytest

from kvmkit.cli_devices import parse_balloon, parse_drive, parse_drive_paths
from kvmkit.errors import ConfigError
from kvmkit.machine.device_manager import Placement
from kvmkit.machine.virtio_devices import cmdline_params


def test_a_drive_with_every_option():
    d = parse_drive("path=/x.img,ro,root,id=base,serial=SN 1,cache=writeback", 3)
    assert (d.drive_id, d.path, d.read_only, d.root, d.serial, d.cache) == (
        "base", "/x.img", True, True, "SN 1", "writeback"
    )  # fmt: skip
    assert parse_drive("path=/y.img", 2).drive_id == "drive2"


def test_balloon_options():
    b = parse_balloon("amount=64,stats=5,deflate_on_oom,free_page_reporting")
    assert (b.amount_mib, b.stats_interval_s, b.deflate_on_oom, b.free_page_reporting) == (
        64, 5, True, True
    )  # fmt: skip
    assert parse_balloon("").amount_mib == 0


def test_drive_paths():
    assert parse_drive_paths(["a=/p", "b=/q=r"]) == {"a": "/p", "b": "/q=r"}
    with pytest.raises(ConfigError, match="write ID=PATH"):
        parse_drive_paths(["a"])


def test_command_line_entries_and_the_root_device():
    placements = [
        Placement("serial0", "pio", 0x3F8, 8, 4),
        Placement("blk0", "mmio", 0xD0000000, 0x1000, 5),
        Placement("blk1", "mmio", 0xD0001000, 0x1000, 6),
        Placement("rng", "mmio", 0xD0002000, 0x1000, 7),
    ]
    assert cmdline_params(placements, "blk1") == [
        "virtio_mmio.device=4K@0xd0000000:5",
        "virtio_mmio.device=4K@0xd0001000:6",
        "virtio_mmio.device=4K@0xd0002000:7",
        "root=/dev/vdb",
    ]
    assert "root=" not in " ".join(cmdline_params(placements, None))
