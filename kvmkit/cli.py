"""The `kvmkit` command line."""

import argparse
import os
import sys
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NoReturn

from kvmkit import (
    __version__,
    cli_check,
    cli_firecracker,
    cli_kernel,
    cli_migrate,
    cli_signals,
    cli_snapshot,
)
from kvmkit.cli_args import join_dashed_values, positive_seconds
from kvmkit.cli_devices import add_device_arguments, apply_device_args
from kvmkit.cli_faults import add_fault_arguments, run_with_faults
from kvmkit.cli_progress import Progress
from kvmkit.errors import ConfigError, KvmkitError
from kvmkit.guests.build import BUILTIN
from kvmkit.machine import Machine, MachineConfig, RunResult, VmResources, build_for_boot
from kvmkit.machine.config import DEFAULT_MEMORY, parse_int, parse_size
from kvmkit.machine.console import ConsoleInput, stdin_for_console
from kvmkit.machine.resources import LinuxBoot
from kvmkit.machine.result import (
    EXIT_BROKEN_PIPE,
    EXIT_HOST_ERROR,
    EXIT_INTERRUPTED,
    EXIT_TERMINATED,
    EXIT_TIMEOUT,
    EXIT_USAGE,
    Terminated,
)
from kvmkit.memory.backend import BACKEND_NAMES
from kvmkit.memory.hugepages import HUGEPAGE_SIZES
from kvmkit.memory.layout import approx_size, format_size
from kvmkit.memory.numa import MODES as NUMA_MODES
from kvmkit.memory.numa import NumaPolicy, parse_nodes

if TYPE_CHECKING:
    from kvmkit.api.server import ApiServer

DESCRIPTION = """\
kvmkit: a guest-first VMM and KVM test bench, on /dev/kvm directly.
Guest memory lives in guest_memfd by default (memfd where the host lacks it)."""

RUN_EPILOG = f"""\
built-in guests:
{chr(10).join(f"  {name:<10} {g.summary} ({g.mode} mode)" for name, g in BUILTIN.items())}

guest ABI (long mode): RDI = boot info (RAM size, vCPU count, free RAM ranges,
--guest-arg), RSI = vCPU index, RSP = a private stack; all RAM identity-mapped.
Ports: 0x3f8 COM1 16550A UART (console), 0x501 debug exit (write a status),
0x80 POST code. See kvmkit/guests/src/kvmkit.h.

exit status: the guest's own status (written to port 0x501); 0 when every vCPU
halted, or a Linux guest powered off or rebooted; 2 bad input; 3 the guest crashed
(triple fault, unknown port, KVM internal error, a Linux kernel panic); 1 a
host-side error; 124 --timeout expired; 130 Ctrl-C; 143 SIGTERM. Every ending
prints one line saying why, and a summary unless -q.

examples:
  kvmkit run
  kvmkit run --guest memtest --memory 512M --vcpus 2
  kvmkit run --guest ./my_guest.bin --entry 0x1000 --mode long
  kvmkit run --memory-backend memfd --console /tmp/console.log
  kvmkit run --memory-backend hugetlb --hugepage-size 2M --prealloc
  kvmkit run --numa-node 0 --numa-policy bind
  kvmkit run --hide-guest-memory        # no guest RAM left mapped in kvmkit"""


class _Parser(argparse.ArgumentParser):
    # Help text that needs heavy imports (selftest groups, check profiles): made only
    # when the help is shown, so a run does not import the selftest and the profiles.
    late_epilog: Callable[[], str] | None = None

    def format_help(self) -> str:
        if self.late_epilog is not None:
            self.epilog = (self.epilog or "") + self.late_epilog()
            self.late_epilog = None
        return super().format_help()

    def error(self, message: str) -> NoReturn:  # one line, exit 2, like every other bad input
        print(f"kvmkit: error: {message} (see '{self.prog} --help')", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def _selftest_groups() -> str:
    from kvmkit.testing.selftest import GROUPS

    return "\n\ngroups:\n" + "\n".join(
        f"  {name:<8} {title}" for name, (title, _) in GROUPS.items()
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="kvmkit", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"kvmkit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    run = sub.add_parser(
        "run",
        help="boot a guest with its console on stdout; exit with the guest's status",
        description="Boot a guest program on /dev/kvm, console on stdout, and exit with the"
        " guest's status. A summary (wall time, exits, memory) goes to stderr.",
        epilog=RUN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument(
        "--guest",
        default=None,
        metavar="NAME|PATH",
        help="a built-in guest (below) or a flat binary file (default: hello)",
    )
    linux = run.add_argument_group(
        "Linux guests",
        "boot a Linux kernel instead of a guest program: an uncompressed vmlinux (fastest:"
        " entered through PVH or the 64-bit boot protocol) or a bzImage",
    )
    linux.add_argument("--kernel", metavar="PATH", help="the kernel: vmlinux or bzImage")
    linux.add_argument("--initrd", metavar="PATH", help="an initrd / initramfs to load with it")
    linux.add_argument(
        "--cmdline",
        metavar="TEXT",
        help="the kernel command line (default: console=ttyS0; with --test-kernel, the"
        " test kernel's recommended one); kvmkit adds tsc_early_khz= from KVM",
    )
    linux.add_argument(
        "--append", metavar="TEXT", default="", help="more command line, after the rest"
    )
    linux.add_argument(
        "--boot-protocol",
        choices=["auto", "pvh", "boot64"],
        default="auto",
        help="how to enter a vmlinux: PVH when it has the note (auto), or the 64-bit boot"
        " protocol; a bzImage always uses the 64-bit boot protocol",
    )
    linux.add_argument(
        "--test-kernel",
        action="store_true",
        help="boot the project's test kernel and initramfs ('kvmkit kernel build' builds"
        " them once) with its recommended command line",
    )
    run.add_argument(
        "--memory",
        "-m",
        default=str(DEFAULT_MEMORY >> 20) + "M",
        metavar="SIZE",
        help="guest RAM, e.g. 512M or 2G (default: %(default)s)",
    )
    run.add_argument("--vcpus", "-c", default="1", metavar="N", help="number of vCPUs (default: 1)")
    run.add_argument(
        "--memory-backend",
        default="auto",
        choices=["auto", *BACKEND_NAMES],
        help="where guest RAM lives: guest_memfd, memfd, hugetlb (memfd with MFD_HUGETLB)"
        " or thp (memfd advised MADV_HUGEPAGE); auto picks guest_memfd when the host can"
        " map it, else memfd, and says which (default: auto)",
    )
    run.add_argument(
        "--hugepage-size",
        default="2M",
        choices=list(HUGEPAGE_SIZES),
        help="page size for --memory-backend hugetlb (default: 2M)",
    )
    run.add_argument(
        "--prealloc",
        action="store_true",
        help="allocate all guest RAM before the guest starts (fallocate)",
    )
    run.add_argument(
        "--numa-node",
        metavar="NODES",
        help="host NUMA node(s) for guest RAM, e.g. 0, 0,1 or 0-3 (mbind before first touch)",
    )
    run.add_argument(
        "--numa-policy",
        default="bind",
        choices=list(NUMA_MODES),
        help="how --numa-node applies (default: bind)",
    )
    run.add_argument(
        "--hide-guest-memory",
        nargs="?",
        const="unmap",
        default="off",
        choices=["unmap", "direct-map"],
        metavar="unmap|direct-map",
        help="after loading the guest, unmap all guest RAM from kvmkit except windows devices"
        " declare; =direct-map also takes it out of the host kernel's direct map (needs"
        " GUEST_MEMFD_FLAG_NO_DIRECT_MAP in KVM_CAP_GUEST_MEMFD_FLAGS)",
    )
    run.add_argument(
        "--entry",
        metavar="ADDR",
        help="load address and entry point of a guest file (default: 0x100000 in"
        " long mode, 0x1000 in real mode)",
    )
    run.add_argument(
        "--mode", choices=["long", "real"], help="CPU mode a guest file starts in (default: long)"
    )
    run.add_argument(
        "--console",
        metavar="PATH",
        help="write the console to PATH instead of stdout; 'none' discards it",
    )
    run.add_argument(
        "--guest-arg",
        default="0",
        metavar="N",
        help="a number passed to the guest in boot info (exitloop: iterations)",
    )
    run.add_argument(
        "--irqchip",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="KVM's in-kernel PIC, IOAPIC, LAPICs and PIT (default: on; the UART then"
        " interrupts on IRQ 4); --no-irqchip leaves them out: a HLT then exits to kvmkit",
    )
    run.add_argument(
        "--dirty-ring",
        nargs="?",
        const="64K",
        default=None,
        metavar="SIZE",
        help="give each vCPU a KVM dirty ring of SIZE bytes (a power of two; default 64K),"
        " used instead of the dirty bitmap when the machine is migrated. The bitmap is"
        " faster unless the guest is large and dirties few pages between passes"
        " (benchmarks/dirty_tracking.py); on a PVM host a guest writing more than 64 pages"
        " between exits overflows the ring, and kvmkit then resends all memory",
    )
    run.add_argument(
        "--api-socket",
        metavar="PATH",
        help="serve the control API (status, pause, resume, snapshot, migrate, stop) on a"
        " Unix socket at PATH, mode 0600; see 'kvmkit ctl', 'kvmkit snapshot' and"
        " 'kvmkit migrate'",
    )
    run.add_argument(
        "--timeout",
        type=positive_seconds,
        dest="run_timeout",
        metavar="S",
        help="stop the guest after S seconds (exit status 124, like timeout(1))",
    )
    add_device_arguments(run)
    cli_firecracker.add_arguments(run)
    add_fault_arguments(run)
    run.add_argument(
        "--quiet",
        "-q",
        action="store_true",
        help="do not print the summary (errors are still printed)",
    )

    selftest = sub.add_parser(
        "selftest",
        help="run kvmkit's behaviour checks against this host's KVM: a pass/fail table",
        description="Run kvmkit's bundled behaviour checks against this host's kernel. Each"
        " check states the outcome it expects (an errno, a value, an exit); DEVIATES marks a"
        " measured, known difference of this host from upstream KVM, SKIP one that cannot"
        " run here (with the reason). Exit status 1 if any check fails.",
        epilog="examples:\n  kvmkit selftest                 every group\n"
        "  kvmkit selftest vcpu exits      two groups\n"
        "  kvmkit selftest -k event.       checks whose name has 'event.'\n"
        "  kvmkit selftest --json > r.json for machines (schema kvmkit-selftest/1)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    selftest.late_epilog = _selftest_groups
    selftest.add_argument(
        "groups",
        nargs="*",
        metavar="GROUP",
        help="groups to run, listed below (default: all)",
    )
    selftest.add_argument(
        "--filter", "-k", default="", metavar="TEXT", help="run only checks whose name has TEXT"
    )
    selftest.add_argument("--list", action="store_true", help="list the checks, run nothing")
    selftest.add_argument("--json", action="store_true", help="print results as JSON")

    cli_snapshot.add_parsers(sub, _Parser)
    cli_check.add_parser(sub, _Parser)
    cli_migrate.add_parser(sub, _Parser)
    cli_kernel.add_parser(sub, _Parser)

    sub.add_parser(
        "guests",
        help="list the built-in guest programs",
        description="List the built-in guest programs kvmkit can run.",
    )
    return parser


def config_from_args(args: argparse.Namespace) -> MachineConfig:
    return MachineConfig(
        memory_bytes=parse_size(args.memory),
        vcpus=parse_int(args.vcpus, "vCPU count"),
        memory_backend=args.memory_backend,
        guest=args.guest or "hello",
        entry=None if args.entry is None else parse_int(args.entry, "entry"),
        mode=args.mode,
        console=args.console,
        guest_arg=parse_int(args.guest_arg, "guest argument"),
        hugepage_size=HUGEPAGE_SIZES[args.hugepage_size],
        prealloc=args.prealloc,
        numa=None
        if args.numa_node is None
        else NumaPolicy(args.numa_policy, parse_nodes(args.numa_node)),
        hide=args.hide_guest_memory,
        irqchip=args.irqchip,
        dirty_ring_bytes=_dirty_ring(args.dirty_ring),
    )


def _dirty_ring(text: str | None) -> int:
    if text is None:
        return 0
    size = parse_size(text, "dirty ring size")
    if size == 0:
        raise ConfigError(
            "--dirty-ring 0 is no ring: give a power of two of at least 4K (e.g. 64K), or"
            " leave --dirty-ring out to track with the dirty bitmap"
        )
    return size


def resources_from_args(args: argparse.Namespace) -> VmResources:
    """The run's resources: a guest program, or a Linux kernel (--kernel, --test-kernel)."""
    resources = config_from_args(args).resources()
    if not (args.kernel or args.test_kernel):
        for flag in ("initrd", "cmdline"):
            if getattr(args, flag) is not None:
                raise ConfigError(f"--{flag} goes with --kernel or --test-kernel")
        return resources
    if args.guest is not None:
        raise ConfigError("--guest and --kernel both name what to boot: give one of them")
    if args.kernel and args.test_kernel:
        raise ConfigError("--kernel and --test-kernel both name a kernel: give one of them")
    if args.test_kernel:
        from kvmkit.guests.linux.build import find_test_kernel

        tk = find_test_kernel()
        if tk is None:
            raise ConfigError("the test kernel is not built: run 'kvmkit kernel build' first")
        kernel, initrd, cmdline = str(tk.vmlinux), str(tk.initramfs), tk.cmdline
        initrd = args.initrd or initrd
    else:
        kernel, initrd, cmdline = args.kernel, args.initrd, "console=ttyS0"
    if args.cmdline is not None:
        cmdline = args.cmdline
    cmdline = f"{cmdline} {args.append}".strip()
    return resources.with_boot(LinuxBoot(kernel, initrd, cmdline, args.boot_protocol))


def format_summary(r: RunResult) -> str:
    exits = ", ".join(f"{name} {n}" for name, n in sorted(r.exits.items(), key=lambda x: -x[1]))
    dropped = ""
    if r.console_dropped:
        dropped = f" ({r.console_dropped} dropped: the console's reader fell behind)"
    lines = [
        f"kvmkit: {r.reason} (exit status {r.status})",
        f"  wall time    {r.wall_s:.3f} s",
        f"  exits        {r.total_exits} ({exits or 'none'})",
        f"  memory       {format_size(r.memory_bytes)} on {r.backend} ({r.backend_reason}),"
        f" {approx_size(r.populated_bytes)} populated",
        f"  exposure     {r.exposure}",
        f"  vCPUs        {r.vcpus}",
        f"  console      {r.console_bytes} bytes{dropped}",
        *(f"  note         {note}" for note in r.memory_notes),
    ]
    return "\n".join(lines)


def cmd_run(args: argparse.Namespace) -> int:
    if cli_firecracker.wanted(args):  # Firecracker's API or config file configures it
        spec = config_from_args(args).resources().machine
        return run_with_faults(args, lambda: cli_firecracker.cmd_run(args, spec, run_machine))
    resources = apply_device_args(args, resources_from_args(args))
    return run_with_faults(args, lambda: run_machine(build_for_boot(resources), args))


def run_machine(machine: Machine, args: argparse.Namespace) -> int:
    """Run a built (or restored) machine to its end, with the control API if asked;
    print the summary; return the exit status."""
    with machine:
        if (fd := stdin_for_console()) is not None:
            ConsoleInput(fd, machine.serial, machine.events)
        server: ApiServer | None = None
        timer = None
        try:
            try:  # a signal before the run starts ends it as one during the run would
                if args.api_socket:
                    from kvmkit.api import server as api  # a run without the API skips it

                    with cli_signals.deferred():  # once bound, `server` removes the socket
                        server = api.ApiServer(args.api_socket, machine).start()
                if limit := getattr(args, "run_timeout", None):
                    why = f"stopped: the run reached its --timeout of {limit:g} s"
                    timer = threading.Timer(limit, machine.stop, (EXIT_TIMEOUT, why))
                    timer.daemon = True
                    timer.start()
            except Terminated:
                machine.stop(EXIT_TERMINATED, "terminated (SIGTERM)")
            except KeyboardInterrupt:
                machine.stop(EXIT_INTERRUPTED, "interrupted (Ctrl-C)")
            result = machine.run()
        finally:  # however the run ended (a second signal included), nothing is left
            if timer is not None:
                timer.cancel()
            if server is not None:
                server.close()
        notes = run_notes(machine)  # while the machine still has its parts
    if result.detail:
        print(f"kvmkit: {result.reason}\n{result.detail}", file=sys.stderr)
    if not args.quiet:
        print(format_summary(result), file=sys.stderr)
        for note in notes:
            print(f"  note         {note}", file=sys.stderr)
        if machine.restored_from:
            print(f"  restored     from {machine.restored_from}", file=sys.stderr)
    elif result.status and not result.detail:
        print(f"kvmkit: {result.reason}", file=sys.stderr)
    return result.status


def run_notes(machine: Machine) -> list[str]:
    """What the build and a Linux guest's console tell about the run."""
    notes = list(machine.notes)
    if machine.migrated_from:
        notes.append(f"migrated from {machine.migrated_from}")
    stats = getattr(machine.lazy, "stats", None)
    if stats is not None:
        notes.append(
            f"lazy restore: {stats.faults} userfaultfd faults served"
            f" ({stats.windows_on_demand} windows on demand, {stats.windows_prefetched}"
            f" prefetched, {stats.zero_pages} zero pages), {approx_size(stats.bytes_loaded)}"
            " loaded"
            + (
                f", complete after {stats.seconds_to_complete:.2f} s"
                if stats.seconds_to_complete
                else ""
            )
        )
    for device in machine.devices.values():  # virtio devices say what they did
        summary, health = getattr(device, "summary", None), getattr(device, "health", None)
        if summary is not None:
            notes.append(summary())
        if health is not None and (trouble := health()) is not None:
            notes.append(trouble)
    kernel = machine.control.kernel
    if kernel is not None:
        if kernel.decompressed_s is not None:
            notes.append(
                f"the bzImage decompressor ran {kernel.decompressed_s:.1f} s before the kernel"
                " started (emulated on this host: boot the uncompressed vmlinux to skip it)"
            )
        if kernel.first_line_s is not None:
            notes.append(f"first console line after {kernel.first_line_s:.2f} s")
    return notes


def cmd_selftest(args: argparse.Namespace) -> int:
    from kvmkit.testing import selftest
    from kvmkit.testing.checks import format_table

    unknown = [g for g in args.groups if g not in selftest.GROUPS]
    if unknown:
        raise ConfigError(
            f"unknown selftest group {unknown[0]!r}: choose from {', '.join(selftest.GROUPS)}"
        )
    chosen = selftest.select(args.groups, args.filter)
    if not chosen:
        raise ConfigError(f"no check name contains {args.filter!r}; see --list")
    if args.list:
        for item in chosen:
            print(f"{item.label:<28} expects {item.check.expect:<32} {item.check.title}")
        return 0
    with Progress("selftest") as progress:

        def step(i: int, item: selftest.Selected) -> None:
            progress.update(item.label, i, len(chosen), f"{i}/{len(chosen)}", milestone=False)

        results = selftest.run_selected(chosen, step)
    if args.json:
        print(selftest.dumps(results))
    else:
        print(format_table([(s.label, r) for s, r in results]))
    return 1 if any(r.status == "FAIL" for _, r in results) else 0


def cmd_guests(args: argparse.Namespace) -> int:
    for name, g in BUILTIN.items():
        print(f"{name:<10} {g.mode:<5} load {g.load_addr:#08x}  {g.summary}")
    return 0


# Options whose value may start with "-" (a negative number: refused by its own check).
VALUED = frozenset(
    {
        "--memory",
        "-m",
        "--vcpus",
        "-c",
        "--guest-arg",
        "--entry",
        "--dirty-ring",
        "--timeout",
        "--bandwidth",
        "--max-downtime-ms",
        "--max-iterations",
        "--wait",
        "--jobs",
        "-j",
    }
)


def main(argv: Sequence[str] | None = None) -> int:
    cli_signals.install()  # SIGTERM ends a command as Ctrl-C does: cleanly, said
    parser = build_parser()
    args = parser.parse_args(join_dashed_values(sys.argv[1:] if argv is None else argv, VALUED))
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        commands = {
            "run": cmd_run,
            "selftest": cmd_selftest,
            "guests": cmd_guests,
            "snapshot": lambda a: cli_snapshot.cmd_snapshot(a, run_machine),
            "migrate": lambda a: cli_migrate.cmd_migrate(a, run_machine),
            "ctl": cli_snapshot.cmd_ctl,
            "check": cli_check.cmd_check,
            "kernel": cli_kernel.cmd_kernel,
        }
        return commands[args.command](args)
    except ConfigError as e:
        print(f"kvmkit: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KvmkitError as e:
        print(f"kvmkit: error: {e}", file=sys.stderr)
        return EXIT_HOST_ERROR
    except Terminated:
        print("kvmkit: terminated (SIGTERM)", file=sys.stderr)
        return EXIT_TERMINATED
    except KeyboardInterrupt:
        print("kvmkit: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `kvmkit ... | head`: the reader has what it wanted
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so the exit's own flush cannot fail again
        return EXIT_BROKEN_PIPE


if __name__ == "__main__":
    sys.exit(main())
