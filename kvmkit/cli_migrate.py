"""`kvmkit migrate send|receive`: live migration from the command line."""

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from kvmkit.api.client import call
from kvmkit.cli_args import positive_seconds
from kvmkit.cli_devices import add_restore_device_arguments, parse_drive_paths, parse_net_taps
from kvmkit.cli_faults import add_fault_arguments, run_with_faults
from kvmkit.cli_progress import Progress
from kvmkit.errors import ConfigError, KvmkitError
from kvmkit.machine.config import parse_size
from kvmkit.memory.backend import BACKEND_NAMES
from kvmkit.memory.layout import approx_size
from kvmkit.migration.address import parse_address

MIGRATE_EPILOG = """\
examples:
  # on the target host: wait for one incoming machine, then run it
  kvmkit migrate receive --listen tcp:0.0.0.0:4444 --console /tmp/target.log
  # on the source: the machine was started with --api-socket /tmp/vm.sock
  kvmkit migrate send --socket /tmp/vm.sock --to tcp:TARGET:4444 --max-downtime-ms 20
  kvmkit migrate send --socket /tmp/vm.sock --to unix:/tmp/m.sock --bandwidth 500M \\
      --auto-converge --json

The source keeps running while memory is copied (pre-copy: dirty pages are sent
again, iteration after iteration), pauses only for the last pages and the CPU and
device state, and stops for good only after the target says it is running.
guest_memfd memory is dirty-tracked through plain memory slots over the same
guest_memfd pages while the migration runs (KVM refuses dirty logging on
guest_memfd slots). A machine started with --dirty-ring is tracked with KVM's
dirty ring instead of the bitmap. If anything fails before the target's go, the
source carries on as it was and the target exits 1 having started nothing.

exit status (send): 0 migrated; 1 failed (the message says what the source is
doing now); 2 bad input. (receive): as 'kvmkit run' for the migrated guest; 1 if
the migration failed."""


def add_parser(sub: Any, parser_class: type[argparse.ArgumentParser]) -> None:  # noqa: ANN401
    mig = sub.add_parser(
        "migrate",
        help="live-migrate a running machine to another kvmkit (pre-copy)",
        description="Move a running machine to a kvmkit listening elsewhere, with pre-copy.",
        epilog=MIGRATE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = mig.add_subparsers(dest="action", metavar="ACTION", parser_class=parser_class)
    actions.required = True
    send = actions.add_parser(
        "send",
        help="migrate the machine serving --socket to --to",
        description="Migrate the machine serving --socket (its --api-socket) to a target"
        " started with 'kvmkit migrate receive'. Shows progress; prints a report.",
    )
    send.add_argument("--socket", required=True, metavar="PATH", help="the source's --api-socket")
    send.add_argument("--to", required=True, metavar="ADDR", help="tcp:HOST:PORT or unix:PATH")
    send.add_argument(
        "--max-downtime-ms",
        type=float,
        default=20.0,
        metavar="MS",
        help="pause for the last pages once they fit in this time at the measured"
        " bandwidth (default: 20)",
    )
    send.add_argument(
        "--bandwidth",
        default="0",
        metavar="RATE",
        help="limit the link to RATE bytes per second, e.g. 100M or 1G (default: no limit)",
    )
    send.add_argument(
        "--auto-converge",
        action="store_true",
        help="throttle the vCPUs (20%%, then 10%% more each iteration) while the guest"
        " dirties memory faster than half the link's rate",
    )
    send.add_argument(
        "--max-iterations",
        type=int,
        default=30,
        metavar="N",
        help="pre-copy passes before giving up on converging and pausing (default: 30)",
    )
    send.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    receive = actions.add_parser(
        "receive",
        help="wait for one incoming machine, then run it",
        description="Listen for one migration, verify and load everything, start on the"
        " source's go, and run the machine to its end (exit status as for 'kvmkit run').",
    )
    receive.add_argument(
        "--listen",
        required=True,
        action="append",
        metavar="ADDR",
        help="tcp:HOST:PORT or unix:PATH; repeat to listen on several (the first source to"
        " connect is taken)",
    )
    receive.add_argument(
        "--memory-backend", choices=list(BACKEND_NAMES), help="another backend than the source's"
    )
    receive.add_argument("--console", metavar="PATH", help="as for 'kvmkit run'")
    add_restore_device_arguments(receive)
    receive.add_argument("--api-socket", metavar="PATH", help="serve the control API here")
    receive.add_argument(
        "--timeout",
        type=positive_seconds,
        default=None,
        metavar="S",
        help="give up if no source connects within S seconds",
    )
    receive.add_argument("--quiet", "-q", action="store_true", help="no summary")
    add_fault_arguments(receive)


def cmd_migrate(args: argparse.Namespace, run_machine: Callable[..., int]) -> int:
    if args.action == "send":
        return _send(args)
    return run_with_faults(args, lambda: _receive(args, run_machine))


def _send(args: argparse.Namespace) -> int:
    parse_address(args.to)  # a bad address is refused here, before the machine is asked
    bandwidth = parse_size(args.bandwidth, "bandwidth")
    if args.max_downtime_ms <= 0:
        raise ConfigError("--max-downtime-ms must be a positive number of milliseconds")
    if args.max_iterations < 1:
        raise ConfigError("--max-iterations must be at least 1")
    request = {
        "to": args.to,
        "max_downtime_ms": args.max_downtime_ms,
        "bandwidth_bps": bandwidth,
        "auto_converge": args.auto_converge,
        "max_iterations": args.max_iterations,
    }
    try:
        with _MigrationProgress("migrating", _source_line) as progress:
            reply = call(args.socket, "migrate", request, timeout_s=None, on_event=progress.update)
    except KeyboardInterrupt:
        why = (
            "migration cancelled: the source rolls back and carries on as it was"
            " (see 'kvmkit ctl status')"
        )
        if args.json:
            print(json.dumps({"ok": False, "error": why, "cancelled": True}, indent=2))
        print(f"kvmkit: {why}", file=sys.stderr)
        return 130
    except KvmkitError as e:
        if args.json:  # scripts always get an object
            print(json.dumps({"ok": False, "error": str(e)}, indent=2))
        raise
    r = reply["migration"]
    if args.json:
        print(json.dumps(r, indent=2))
    print(format_send_report(r), file=sys.stderr)
    return 0


def _link(r: dict[str, Any]) -> str:
    if not r["bandwidth_bps"]:
        return "not measured (no pass sent 1 MiB or more)"
    return f"{approx_size(int(r['bandwidth_bps']))}/s measured"


def format_send_report(r: dict[str, Any]) -> str:
    iterations = f"{r['iterations']} pre-copy + 1 final" if r["precopy"] else "none: stop-and-copy"
    lines = [
        f"kvmkit: migrated to {r['target']} in {r['total_s']:.2f} s, downtime"
        f" {r['downtime_ms']:.1f} ms (source pause to target running)",
        f"  iterations   {iterations} ({approx_size(r['final_dirty_bytes'])} with the guest"
        " paused)",
        f"  sent         {approx_size(r['bytes_sent'])}: {r['pages_sent']} pages,"
        f" {r['pages_resent']} resent, {r['zero_pages']} zero (markers only)",
        f"  link         {_link(r)}",
        f"  memory       {r['backend']}, dirty tracking: {r['dirty_tracking'] or 'none'}",
        f"  throttle     {r['throttle_max'] * 100:.0f}% at most",
        *(f"  note         {note}" for note in r["notes"]),
    ]
    return "\n".join(lines)


def _source_line(event: dict[str, Any]) -> str:
    phase = event.get("phase", "")
    text = f"{approx_size(int(event.get('bytes_sent', 0)))} sent"
    if phase == "precopy" and "dirty_bytes" in event:
        text += (
            f", {approx_size(event['dirty_bytes'])} dirty"
            f" ({approx_size(int(event['dirty_rate_bps']))}/s),"
            f" ~{event['estimated_downtime_ms']:.1f} ms downtime"
        )
    if event.get("bandwidth_bps"):
        text += f", link {approx_size(int(event['bandwidth_bps']))}/s"
    if event.get("throttle"):
        text += f", throttle {event['throttle'] * 100:.0f}%"
    return text


def _target_line(event: dict[str, Any]) -> str:
    text = (
        f"{approx_size(int(event.get('bytes_received', 0)))} received,"
        f" {event.get('pages', 0)} pages"
    )
    if event.get("iteration_bytes"):
        text += (
            f", this pass {approx_size(event['done'])} of {approx_size(event['iteration_bytes'])}"
        )
    return text


class _MigrationProgress:
    """Migration events on the one progress display (kvmkit/cli_progress.py)."""

    def __init__(self, what: str, line: Callable[[dict[str, Any]], str]) -> None:
        self.progress = Progress(what)
        self.line = line

    def __enter__(self) -> "_MigrationProgress":
        self.progress.__enter__()
        return self

    def update(self, event: dict[str, Any]) -> None:
        phase = event.get("phase", "")
        label = f"{phase} {event.get('iteration', '')}".strip() if phase == "precopy" else phase
        total = event.get("iteration_bytes")
        self.progress.update(
            label,
            done=event.get("done", 0) if total else None,
            total=total or None,
            numbers=self.line(event),
            milestone="dirty_bytes" in event or phase != "precopy",
        )

    def __exit__(self, *exc: Any) -> None:
        self.progress.__exit__(*exc)


def _receive(args: argparse.Namespace, run_machine: Callable[..., int]) -> int:
    from kvmkit.migration import IncomingMigration
    from kvmkit.unix_socket import claim_unix_path

    if args.api_socket:  # refuse a busy path now, not after the source has let go
        claim_unix_path(args.api_socket, "the API socket")
    drive_paths = parse_drive_paths(args.drive_path)
    net_taps = parse_net_taps(args.net_tap)
    incoming = IncomingMigration(args.listen)
    print(f"kvmkit: waiting for a migration on {incoming.address}", file=sys.stderr)
    try:
        with _MigrationProgress("receiving", _target_line) as progress:
            machine = incoming.receive(
                memory_backend=args.memory_backend,
                console=args.console,
                accept_timeout_s=args.timeout,
                progress=progress.update,
                drive_paths=drive_paths,
                net_taps=net_taps,
                vsock_uds=args.vsock_uds,
            )
        incoming.commit()
    finally:
        incoming.close()
    r = incoming.report
    print(
        f"kvmkit: received {approx_size(r.bytes_received)} from {r.source} on {r.listened_on}"
        f" in {r.receive_s:.2f} s ({r.iterations} pre-copy iterations, {r.pages} pages,"
        f" {r.zero_pages} zero); starting",
        file=sys.stderr,
    )
    incoming.confirm_when_running()
    try:
        return run_machine(machine, args)
    except BaseException as e:
        if machine.started_at is None:  # it never ran: the source may carry on
            incoming.abort(f"the target could not start the machine: {e}")
        raise
