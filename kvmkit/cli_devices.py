"""Device flags of `kvmkit run` (virtio: --drive, --rng, --balloon; --net and --vsock
join here) and of the commands that rebuild a saved machine (--drive-path).

Each device flag takes `key=value` options separated by commas (and bare words for
booleans), parsed by `parse_options`; a bad one is a ConfigError naming the flag,
the option and the fix (one line, exit 2). `add_device_arguments(parser)` declares
the flags; `apply_device_args(args, resources)` turns them into VmResources entries.
"""

import argparse
from collections.abc import Callable

from kvmkit.errors import ConfigError
from kvmkit.machine.resources import BalloonSpec, DriveSpec, EntropySpec, VmResources

DEVICES_HELP = """\
virtio-mmio devices (a Linux guest finds them through virtio_mmio.device= entries
kvmkit adds to its command line; the first drive is /dev/vda, the next /dev/vdb...):
  --drive path=disk.img                 a read-write disk
  --drive path=base.img,ro,id=base      a read-only one, id 'base' (default drive0, ...)
  --drive path=root.img,root            the root file system (root=/dev/vdX added)
  --drive path=d.img,serial=SN1,cache=writeback   flush is fsync (default: unsafe)
  --rng                                 /dev/hwrng from the host's getrandom()
  --balloon amount=64,stats=5,deflate_on_oom,free_page_reporting
"""

DRIVE_KEYS = {"path", "ro", "root", "id", "serial", "cache"}
BALLOON_KEYS = {"amount", "deflate_on_oom", "stats", "free_page_reporting"}
FLAGS = {"ro", "root", "deflate_on_oom", "free_page_reporting"}


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


def add_drive_path_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--drive-path",
        action="append",
        default=[],
        metavar="ID=PATH",
        help="use PATH as the backing file of drive ID instead of the path it was saved"
        " with (repeatable; ID as given to --drive id=, default drive0, drive1...)",
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


# Each applies one flag's values to the resources; the net branch adds --net, --vsock.
DEVICE_APPLIERS: list[Callable[[argparse.Namespace, VmResources], VmResources]] = []


def _drives(args: argparse.Namespace, r: VmResources) -> VmResources:
    seen: set[str] = set()
    for i, text in enumerate(getattr(args, "drive", None) or []):
        spec = parse_drive(text, i)
        if spec.drive_id in seen:
            raise ConfigError(f"--drive: two drives have the id {spec.drive_id!r}")
        seen.add(spec.drive_id)
        r = r.with_drive(spec)
    return r


def _rng(args: argparse.Namespace, r: VmResources) -> VmResources:
    return r.with_entropy(EntropySpec()) if getattr(args, "rng", False) else r


def _balloon(args: argparse.Namespace, r: VmResources) -> VmResources:
    text = getattr(args, "balloon", None)
    return r if text is None else r.with_balloon(parse_balloon(text))


DEVICE_APPLIERS += [_drives, _rng, _balloon]


def apply_device_args(args: argparse.Namespace, resources: VmResources) -> VmResources:
    for apply in DEVICE_APPLIERS:
        resources = apply(args, resources)
    return resources
