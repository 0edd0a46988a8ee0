"""Device flags of `kvmkit run` (virtio: --drive, --rng, --balloon, --net, --vsock)
and of the commands that rebuild a saved machine (--drive-path, --net-tap,
--vsock-uds).

Each device flag takes `key=value` options separated by commas (and bare words for
booleans), parsed by `parse_options`; a bad one is a ConfigError naming the flag,
the option and the fix (one line, exit 2). `add_device_arguments(parser)` declares
the flags; `apply_device_args(args, resources)` turns them into VmResources entries.
"""

import argparse
from collections.abc import Callable
from typing import TypeVar

from kvmkit.errors import ConfigError
from kvmkit.machine.resources import (
    BalloonSpec,
    DriveSpec,
    EntropySpec,
    NetSpec,
    VmResources,
    VsockSpec,
)

DEVICES_HELP = """\
virtio-mmio devices (a Linux guest finds them through virtio_mmio.device= entries
kvmkit adds to its command line; the first drive is /dev/vda, the next /dev/vdb...):
  --drive path=disk.img                 a read-write disk
  --drive path=base.img,ro,id=base      a read-only one, id 'base' (default drive0, ...)
  --drive path=root.img,root            the root file system (root=/dev/vdX added)
  --drive path=d.img,serial=SN1,cache=writeback   flush is fsync (default: unsafe)
  --rng                                 /dev/hwrng from the host's getrandom()
  --balloon amount=64,stats=5,deflate_on_oom,free_page_reporting
  --net tap=tap0                        eth0 on host tap tap0 (made beforehand:
                                        ip tuntap add tap0 mode tap && ip link set tap0 up)
  --net tap=tap1,mac=06:00:ac:10:00:03,id=eth1    a second interface, its MAC
  --vsock cid=3,uds=/tmp/v.sock         AF_VSOCK: guest port P -> unix socket
                                        /tmp/v.sock_P; host -> guest: connect to
                                        /tmp/v.sock, send 'CONNECT P', a newline, and
                                        read 'OK <port>' before the stream
"""

DRIVE_KEYS = {"path", "ro", "root", "id", "serial", "cache"}
BALLOON_KEYS = {"amount", "deflate_on_oom", "stats", "free_page_reporting"}
NET_KEYS = {"tap", "mac", "id"}
VSOCK_KEYS = {"cid", "uds"}
FLAGS = {"ro", "root", "deflate_on_oom", "free_page_reporting"}

S = TypeVar("S")


def add_device_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("devices", DEVICES_HELP)
    group.add_argument(
        "--drive",
        action="append",
        default=[],
        metavar="path=FILE[,ro][,root][,id=ID][,serial=S][,cache=writeback]",
        help="a virtio-blk disk on a raw file or block device (repeatable): ro makes it"
        " read-only (the guest's writes fail), root makes it the guest's root device, id"
        " names it (for --drive-path on restore), serial is what the guest reads as its"
        " ID (20 bytes at most), cache=writeback makes the guest's flushes fsync",
    )
    group.add_argument(
        "--rng",
        action="store_true",
        help="a virtio-rng device: the guest's /dev/hwrng, fed from the host's getrandom()",
    )
    group.add_argument(
        "--balloon",
        nargs="?",
        const="",
        default=None,
        metavar="[amount=MIB][,stats=S][,deflate_on_oom][,free_page_reporting]",
        help="a virtio-balloon: amount is the MiB to take from the guest at boot (default"
        " 0), stats asks the guest for memory statistics every S seconds, deflate_on_oom"
        " lets the guest take pages back under memory pressure, free_page_reporting has"
        " it report free pages; pages given are freed from the host's memory backing",
    )
    group.add_argument(
        "--net",
        action="append",
        default=[],
        metavar="tap=TAP[,mac=MAC][,id=ID]",
        help="a virtio-net interface on the existing host tap TAP (repeatable; the guest's"
        " eth0, eth1... in order): mac is the guest's MAC (default 06:00:ac:10:00:02,"
        " :03...), id names it (default eth0, eth1...; for --net-tap on restore). kvmkit"
        " does not create or configure taps: `ip tuntap add TAP mode tap` first",
    )
    group.add_argument(
        "--vsock",
        metavar="cid=CID,uds=PATH",
        help="a virtio-vsock device, Firecracker's hybrid style: the guest's CID (3 or"
        " more); a guest connection to host port P reaches the unix socket PATH_P (listen"
        " there first); a host program connects to PATH, sends 'CONNECT P\\n', reads 'OK"
        " <port>\\n' and then talks to the guest's port P",
    )


def add_drive_path_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--drive-path",
        action="append",
        default=[],
        metavar="ID=PATH",
        help="use PATH as the backing file of drive ID instead of the path it was saved"
        " with (repeatable; ID as given to --drive id=, default drive0, drive1...)",
    )


def add_restore_device_arguments(parser: argparse.ArgumentParser) -> None:
    """The overrides of a rebuilt machine's host ends: disks, taps, the vsock socket."""
    add_drive_path_argument(parser)
    parser.add_argument(
        "--net-tap",
        action="append",
        default=[],
        metavar="ID=TAP",
        help="attach network interface ID to host tap TAP instead of the tap it was saved"
        " with (repeatable; ID as given to --net id=, default eth0, eth1...)",
    )
    parser.add_argument(
        "--vsock-uds",
        metavar="PATH",
        help="the vsock's unix socket path instead of the saved one (needed while the"
        " saved path is in use, e.g. by the source of a migration on this host)",
    )


def parse_options(flag: str, text: str, known: set[str]) -> dict[str, str]:
    """`a=1,b,c=x` as {"a": "1", "b": "", "c": "x"}; unknown or repeated keys refused."""
    out: dict[str, str] = {}
    for item in text.split(","):
        if not item:
            continue
        key, eq, value = item.partition("=")
        key = key.strip()
        if key not in known:
            raise ConfigError(
                f"{flag}: unknown option {key[:40]!r}: use {', '.join(sorted(known))}"
            )
        if key in out:
            raise ConfigError(f"{flag}: option {key!r} is given twice")
        if key in FLAGS and eq:
            raise ConfigError(f"{flag}: {key} takes no value (write just '{key}')")
        if key not in FLAGS and not eq:
            raise ConfigError(f"{flag}: {key} needs a value ({key}=...)")
        out[key] = value
    return out


def _number(flag: str, key: str, value: str) -> int:
    try:
        number = int(value, 10)
    except ValueError:
        raise ConfigError(f"{flag}: {key}={value[:40]!r} is not a whole number") from None
    if number < 0:
        raise ConfigError(f"{flag}: {key}={value} must not be negative")
    return number


def parse_drive(text: str, index: int) -> DriveSpec:
    options = parse_options("--drive", text, DRIVE_KEYS)
    if not options.get("path"):
        raise ConfigError(
            f"--drive {text[:60]!r}: give the backing file as path=FILE (e.g. --drive"
            " path=disk.img)"
        )
    return DriveSpec(
        drive_id=options.get("id") or f"drive{index}",
        path=options["path"],
        read_only="ro" in options,
        root="root" in options,
        serial=options.get("serial"),
        cache=options.get("cache", "unsafe"),
    )


def parse_balloon(text: str) -> BalloonSpec:
    options = parse_options("--balloon", text, BALLOON_KEYS)
    return BalloonSpec(
        amount_mib=_number("--balloon", "amount", options.get("amount", "0")),
        deflate_on_oom="deflate_on_oom" in options,
        stats_interval_s=_number("--balloon", "stats", options.get("stats", "0")),
        free_page_reporting="free_page_reporting" in options,
    )


def parse_net(text: str, index: int) -> NetSpec:
    options = parse_options("--net", text, NET_KEYS)
    if not options.get("tap"):
        raise ConfigError(
            f"--net {text[:60]!r}: name the host tap as tap=TAP (e.g. --net tap=tap0)"
        )
    return NetSpec(
        iface_id=options.get("id") or f"eth{index}",
        tap=options["tap"],
        mac=options.get("mac") or None,
    )


def parse_vsock(text: str) -> VsockSpec:
    options = parse_options("--vsock", text, VSOCK_KEYS)
    if "cid" not in options or not options.get("uds"):
        raise ConfigError(
            f"--vsock {text[:60]!r}: give both the guest's CID and the socket path, e.g."
            " --vsock cid=3,uds=/tmp/v.sock"
        )
    cid = _number("--vsock", "cid", options["cid"])
    return VsockSpec(cid=cid, uds=options["uds"])


def parse_net_taps(items: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        iface_id, eq, tap = item.partition("=")
        if not eq or not iface_id or not tap:
            raise ConfigError(f"--net-tap {item[:60]!r}: write ID=TAP (e.g. --net-tap eth0=tap1)")
        if iface_id in out:
            raise ConfigError(f"--net-tap: interface {iface_id[:40]!r} is given twice")
        out[iface_id] = tap
    return out


def parse_drive_paths(items: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        drive_id, eq, path = item.partition("=")
        if not eq or not drive_id or not path:
            raise ConfigError(
                f"--drive-path {item[:60]!r}: write ID=PATH (e.g. --drive-path"
                " drive0=/new/disk.img)"
            )
        if drive_id in out:
            raise ConfigError(f"--drive-path: drive {drive_id[:40]!r} is given twice")
        out[drive_id] = path
    return out


# Each applies one flag's values to the resources.
DEVICE_APPLIERS: list[Callable[[argparse.Namespace, VmResources], VmResources]] = []


def _parsed_once_each(
    texts: list[str] | None,
    parse: Callable[[str, int], S],
    key: Callable[[S], str],
    refusal: str,
) -> list[S]:
    """Each of a repeated flag's values parsed; two with the same id are refused
    (`refusal` names the flag and the thing, the id follows)."""
    seen: set[str] = set()
    specs = []
    for i, text in enumerate(texts or []):
        spec = parse(text, i)
        if key(spec) in seen:
            raise ConfigError(f"{refusal} {key(spec)!r}")
        seen.add(key(spec))
        specs.append(spec)
    return specs


def _drives(args: argparse.Namespace, r: VmResources) -> VmResources:
    drives = getattr(args, "drive", None)
    for spec in _parsed_once_each(
        drives, parse_drive, lambda d: d.drive_id, "--drive: two drives have the id"
    ):
        r = r.with_drive(spec)
    return r


def _rng(args: argparse.Namespace, r: VmResources) -> VmResources:
    return r.with_entropy(EntropySpec()) if getattr(args, "rng", False) else r


def _balloon(args: argparse.Namespace, r: VmResources) -> VmResources:
    text = getattr(args, "balloon", None)
    return r if text is None else r.with_balloon(parse_balloon(text))


def _nets(args: argparse.Namespace, r: VmResources) -> VmResources:
    nets = getattr(args, "net", None)
    for spec in _parsed_once_each(
        nets, parse_net, lambda n: n.iface_id, "--net: two interfaces have the id"
    ):
        r = r.with_net(spec)
    return r


def _vsock(args: argparse.Namespace, r: VmResources) -> VmResources:
    text = getattr(args, "vsock", None)
    return r if text is None else r.with_vsock(parse_vsock(text))


DEVICE_APPLIERS += [_drives, _rng, _balloon, _nets, _vsock]


def apply_device_args(args: argparse.Namespace, resources: VmResources) -> VmResources:
    for apply in DEVICE_APPLIERS:
        resources = apply(args, resources)
    return resources
