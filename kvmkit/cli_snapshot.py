"""`kvmkit snapshot ...` and `kvmkit ctl ...`: the command-line faces of snapshots and
the control API."""

import argparse
import json
import os
import sys
from collections.abc import Callable
from typing import Any

from kvmkit.api.client import CONNECT_TIMEOUT_S, call
from kvmkit.cli_args import positive_seconds
from kvmkit.cli_devices import add_restore_device_arguments, parse_drive_paths, parse_net_taps
from kvmkit.cli_progress import Progress
from kvmkit.errors import ConfigError
from kvmkit.memory.backend import BACKEND_NAMES
from kvmkit.memory.layout import approx_size, format_size

SNAPSHOT_EPILOG = """\
a snapshot captures a running machine exactly: every vCPU's registers, FPU/xsave,
MSRs, events and debug registers; the VM's clock (and irqchip/PIT when present);
every device's registers; and the populated pages of guest RAM (found with
mincore on guest_memfd, SEEK_DATA/SEEK_HOLE on memfd). The file is written
unnamed (O_TMPFILE; else under a hidden .NAME.partial-PID name), fsynced and
linked into place: a failed or killed write leaves no file and the VM as it was.
Every section is checksummed and bounded; restore verifies all of them first, and
inspect reads every section, verifying each checksum.

examples:
  kvmkit run --guest counter --api-socket /tmp/vm.sock &
  kvmkit snapshot create --socket /tmp/vm.sock --out /tmp/vm.snap --resume
  kvmkit snapshot inspect /tmp/vm.snap
  kvmkit snapshot restore /tmp/vm.snap
  kvmkit snapshot restore /tmp/vm.snap --memory-backend memfd --lazy"""

CTL_TIMEOUT_S = 60.0  # a pause waits at most 10 s for the vCPUs; a hung machine is named
CTL_EPILOG = """\
requests:
  status   the machine's state (created, running, paused, stopped), vCPUs, memory,
           uptime, who holds it paused (paused_by), the operation in progress
           (in_progress), where it was restored or migrated from, and how the run
           ended
  pause    stop every vCPU at a clean point and wait for it; the machine stays
           paused until a resume (a second pause changes nothing)
  resume   let a paused machine run again
  stop     end the run, as the guest's own exit would: 'kvmkit run' prints its
           summary and exits 0; a snapshot or migration in progress is cancelled

one operation at a time: while a migration, a snapshot, a pause or a resume of a
machine is in progress, another of these is refused ("a migration of this machine
is in progress"); status and stop are always answered.

the socket speaks one JSON object per line, {"cmd": ..., arguments}; besides the
four above it takes:
  {"cmd": "snapshot", "path": FILE, "resume": BOOL, "compress": LEVEL, "force": BOOL}
           what 'kvmkit snapshot create' sends; an existing FILE is replaced only
           with "force" and only if it is a kvmkit snapshot
  {"cmd": "migrate", "to": ADDRESS, "max_downtime_ms": N, "bandwidth_bps": N,
   "max_iterations": N, "auto_converge": BOOL}
           what 'kvmkit migrate send' sends
each answer is {"ok": true, ...} or {"ok": false, "error": "..."} ("retry": true when
the machine is too busy to take it: try again); long requests send {"event": {...}}
lines before it, and are cancelled if the client goes away.

examples:
  kvmkit ctl status --socket /tmp/vm.sock
  kvmkit ctl pause --socket /tmp/vm.sock
  kvmkit ctl stop --socket /tmp/vm.sock"""


def add_parsers(sub: Any, parser_class: type[argparse.ArgumentParser]) -> None:  # noqa: ANN401
    snap = sub.add_parser(
        "snapshot",
        help="save a running machine to a file, restore it, inspect a file",
        description="Save a running machine to a file (through its control socket), restore"
        " it in this process, or inspect a snapshot file.",
        epilog=SNAPSHOT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = snap.add_subparsers(dest="action", metavar="ACTION", parser_class=parser_class)
    actions.required = True

    create = actions.add_parser(
        "create",
        help="snapshot the machine serving --socket",
        description="Pause the machine serving --socket, write its snapshot to --out, and"
        " leave it paused (or running, with --resume). If the write fails, or is cancelled"
        " (Ctrl-C here, or 'kvmkit ctl stop'), the machine returns to how it was, no new"
        " file is left and a file that was at --out stays. An existing --out is refused"
        " unless --force, and a file that is not a kvmkit snapshot is never replaced.",
    )
    create.add_argument("--socket", required=True, metavar="PATH", help="its --api-socket")
    create.add_argument("--out", required=True, metavar="FILE", help="the snapshot file to write")
    create.add_argument(
        "--resume",
        action="store_true",
        help="let the machine run on after the snapshot (one paused before, by 'kvmkit ctl"
        " pause' or an earlier snapshot, stays paused: resume it with 'kvmkit ctl resume')",
    )
    create.add_argument(
        "--force",
        action="store_true",
        help="replace --out if it is an existing kvmkit snapshot (a file that is not a"
        " snapshot is never replaced)",
    )
    create.add_argument(
        "--compress",
        nargs="?",
        const=3,
        type=int,
        metavar="LEVEL",
        help="compress memory chunks with zstd (level 1-22, default 3; needs kvmkit[zstd])",
    )

    restore = actions.add_parser(
        "restore",
        help="continue a snapshot in this process",
        description="Verify a snapshot, rebuild its machine and continue the guest where it"
        " was. Exit status as for 'kvmkit run'.",
    )
    restore.add_argument("file", metavar="FILE")
    restore.add_argument(
        "--memory-backend",
        choices=list(BACKEND_NAMES),
        help="put guest RAM in another backend than the snapshot's",
    )
    restore.add_argument(
        "--lazy",
        action="store_true",
        help="start the guest at once and load memory on first touch (userfaultfd),"
        " prefetching the rest in the background; memfd backends only",
    )
    restore.add_argument("--console", metavar="PATH", help="as for 'kvmkit run'")
    add_restore_device_arguments(restore)
    restore.add_argument("--api-socket", metavar="PATH", help="serve the control API here")
    restore.add_argument("--quiet", "-q", action="store_true", help="no summary")

    inspect = actions.add_parser(
        "inspect",
        help="show a snapshot's header and sections, verifying every checksum",
        description="Print a snapshot's header, sections, sizes and checksum verdict.",
    )
    inspect.add_argument("file", metavar="FILE")
    inspect.add_argument("--json", action="store_true", help="print JSON")

    ctl = sub.add_parser(
        "ctl",
        help="pause, resume, stop or query a machine through its control socket",
        description="Send one control request to a machine started with --api-socket and"
        " print its JSON answer.",
        epilog=CTL_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ctl.add_argument(
        "request",
        choices=["status", "pause", "resume", "stop"],
        help="status, pause, resume or stop (see below)",
    )
    ctl.add_argument("--socket", required=True, metavar="PATH", help="its --api-socket")
    ctl.add_argument(
        "--wait",
        type=positive_seconds,
        default=CONNECT_TIMEOUT_S,
        metavar="SECONDS",
        help="how long to keep trying while the machine's control queue is full"
        f" (default {CONNECT_TIMEOUT_S:g})",
    )


def cmd_ctl(args: argparse.Namespace) -> int:
    reply = call(args.socket, args.request, timeout_s=CTL_TIMEOUT_S, connect_timeout_s=args.wait)
    print(json.dumps(reply, indent=2))
    return 0


def cmd_snapshot(args: argparse.Namespace, run_machine: Callable[..., int]) -> int:
    if args.action == "create":
        return _create(args)
    if args.action == "inspect":
        return _inspect(args)
    return _restore(args, run_machine)


def _create(args: argparse.Namespace) -> int:
    if args.compress is not None and not 1 <= args.compress <= 22:
        raise ConfigError(f"--compress level {args.compress} is not between 1 and 22")
    from kvmkit.control.snapshots import check_replaceable

    out = os.path.abspath(args.out)  # the machine may run in another directory
    check_replaceable(out, args.force)  # here too, so that the refusal exits 2
    request = {"path": out, "resume": args.resume, "compress": args.compress, "force": args.force}
    with Progress("snapshot") as progress:

        def show(event: dict[str, Any]) -> None:
            if event.get("phase") == "memory":
                bytes_progress(progress, "saving memory")(event["done"], event["total"])

        # Ctrl-C closes the connection, and the machine cancels the snapshot.
        reply = call(args.socket, "snapshot", request, on_event=show)
    r = reply["snapshot"]
    print(
        f"kvmkit: snapshot {r['path']}: {approx_size(r['file_bytes'])}, memory"
        f" {approx_size(r['memory_bytes'])} in {r['chunks']} chunks (found by {r['method']}),"
        f" {r['seconds'] * 1000:.0f} ms; the machine is {reply['state']}",
        file=sys.stderr,
    )
    return 0


def bytes_progress(progress: Progress, stage: str) -> Callable[[int, int], None]:
    """A (done, total) byte counter shown on `progress`."""

    def show(done: int, total: int) -> None:
        numbers = f"{approx_size(done)} of {approx_size(total)}"
        progress.update(stage, done, total, numbers, milestone=done >= total)

    return show


def _restore(args: argparse.Namespace, run_machine: Callable[..., int]) -> int:
    from kvmkit.control.snapshots import restore_snapshot
    from kvmkit.machine.resources import ConsoleSpec

    ConsoleSpec(args.console).validate()  # before the snapshot is read
    drive_paths = parse_drive_paths(args.drive_path)
    net_taps = parse_net_taps(args.net_tap)
    with Progress("restoring") as progress:
        machine = restore_snapshot(
            args.file,
            memory_backend=args.memory_backend,
            console=args.console,
            lazy=args.lazy,
            progress=bytes_progress(progress, "restoring memory"),
            drive_paths=drive_paths,
            net_taps=net_taps,
            vsock_uds=args.vsock_uds,
        )
    for note in machine.restore_notes:
        print(f"kvmkit: note: {note}", file=sys.stderr)
    return run_machine(machine, args)


def _inspect(args: argparse.Namespace) -> int:
    from kvmkit.snapshot.file import inspect

    info = inspect(args.file)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    h, m, mem = info["header"], info["machine"], info["memory"]
    cpu = h.get("host_cpu", {})
    print(f"{info['path']}: kvmkit state stream, format {info['format_version']}")
    print(f"  written by     kvmkit {h.get('kvmkit_version')} at {h.get('created')}")
    print(
        f"  host           {cpu.get('vendor')} family {cpu.get('family')} model"
        f" {cpu.get('model')}, kernel {h.get('kernel')}, KVM backend {h.get('kvm_backend')}"
    )
    print(f"  machine        {h.get('summary')}")
    print(f"  needs          {', '.join('KVM_CAP_' + c for c in h.get('requires', {}))}")
    print(
        f"  memory         {format_size(int(m['memory_bytes']))} configured,"
        f" {approx_size(mem['bytes'])} saved in {mem['chunks']} chunks"
        f" ({approx_size(mem['stored_bytes'])} stored, {mem['compressed_chunks']} compressed)"
    )
    print(f"  file           {info['file_bytes']} bytes; {info['checksums']}")
    print("  sections")
    for s in info["sections"]:
        print(
            f"    {s['index']:>3}  {s['section']:<22} at {s['offset']:>10}  {s['raw_bytes']:>8} B"
        )
    if mem["chunks"]:
        print(f"    ...  memory chunks x{mem['chunks']}, then the end marker")
    return 0
