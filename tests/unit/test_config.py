import pytest

from kvmkit.errors import ConfigError
from kvmkit.machine.config import MachineConfig, parse_int, parse_size


@pytest.mark.parametrize(
    "text, size",
    [
        ("512M", 512 << 20),
        ("1G", 1 << 30),
        ("2GiB", 2 << 30),
        ("4096", 4096),
        ("64k", 64 << 10),
        ("1T", 1 << 40),
        (" 8 MB ", 8 << 20),
    ],
)
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["abc", "", "1.5G", "-1M", "12X", "M"])
def test_parse_size_rejects_with_the_fix(text):
    with pytest.raises(ConfigError, match="is not a size: use a whole number"):
        parse_size(text)


def test_parse_int_accepts_hex_and_names_the_field():
    assert parse_int("0x1000", "entry") == 0x1000
    with pytest.raises(ConfigError, match="entry 'zz' is not a number"):
        parse_int("zz", "entry")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"memory_bytes": 1 << 20}, "too small"),
        ({"memory_bytes": 1 << 40}, "above kvmkit's limit"),
        ({"memory_bytes": (4 << 20) + 1}, "multiple of 4 KiB"),
        ({"vcpus": 0}, "at least 1"),
        ({"memory_backend": "tmpfs"}, "unknown memory backend"),
        ({"mode": "protected"}, "unknown CPU mode"),
        ({"guest": "hello", "mode": "real"}, "runs in long mode"),
        ({"guest": "hello", "entry": 0x1000}, "applies to guest files"),
        ({"guest": "/nonexistent/guest.bin"}, "neither a built-in guest"),
        ({"console": "/nonexistent-dir/console.log"}, "does not exist"),
        ({"dirty_ring_bytes": 3000}, "not a power of two of at least 4 KiB"),
        ({"dirty_ring_bytes": 96 << 10}, "not a power of two"),
    ],
)
def test_validate_rejects(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        MachineConfig(**kwargs).validate(max_vcpus=1024)


def test_validate_vcpus_against_host_limit():
    with pytest.raises(ConfigError, match=r"above this host's KVM_CAP_MAX_VCPUS \(8\)"):
        MachineConfig(vcpus=9).validate(max_vcpus=8)


def test_guest_file_checks(tmp_path):
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    with pytest.raises(ConfigError, match="is empty"):
        MachineConfig(guest=str(empty)).validate()
    with pytest.raises(ConfigError, match="must be a readable file"):
        MachineConfig(guest=str(tmp_path)).validate()
    image = tmp_path / "g.bin"
    image.write_bytes(b"\xf4")
    with pytest.raises(ConfigError, match="outside guest RAM"):
        MachineConfig(guest=str(image), entry=1 << 30, memory_bytes=256 << 20).validate()
    MachineConfig(guest=str(image), entry=0x1000).validate()


def test_defaults_for_files_and_builtins(tmp_path):
    image = tmp_path / "g.bin"
    image.write_bytes(b"\xf4")
    assert MachineConfig(guest=str(image)).load_addr == 0x100000
    assert MachineConfig(guest=str(image), mode="real").load_addr == 0x1000
    assert MachineConfig(guest="hello16").cpu_mode == "real"


def test_numbers_given_as_numbers_pass_through():
    assert parse_size(4096) == 4096 and parse_int(7, "vCPU count") == 7
    with pytest.raises(ConfigError, match="bandwidth '9x' is not a size"):
        parse_size("9x", "bandwidth")
