"""`kvmkit run --api-sock PATH` and `--config-file FILE`: Firecracker's way in.

With --api-sock, kvmkit serves Firecracker's HTTP API (kvmkit/api/firecracker.py) and
waits for a client to configure the machine and send InstanceStart (or
/snapshot/load); with --config-file it configures the machine from Firecracker's JSON
layout and boots at once (--no-api: without a socket). The machine then runs as any
`kvmkit run` does (the summary, the exit status, --api-socket's NDJSON API beside).
"""

import argparse
import re
from collections.abc import Callable
from pathlib import Path

from kvmkit import cli_signals
from kvmkit.errors import ConfigError
from kvmkit.machine import Machine
from kvmkit.machine.resources import MachineSpec

MAX_CONFIG_BYTES = 1 << 20
INSTANCE_ID_RE = re.compile(r"^[A-Za-z0-9-]{1,64}$", re.ASCII)
BOOT_FLAGS = ("guest", "kernel", "initrd", "cmdline", "test_kernel", "entry", "mode")


def add_arguments(run: argparse.ArgumentParser) -> None:
    fc = run.add_argument_group(
        "Firecracker's API",
        "configure and boot the machine as Firecracker does: over its HTTP API, or from its"
        " JSON config file (see README, 'Coming from Firecracker'); the machine options"
        " above (--memory-backend, --hide-guest-memory, --console, ...) are the defaults"
        " the API's machine-config starts from",
    )
    fc.add_argument(
        "--api-sock",
        metavar="PATH",
        help="serve Firecracker's HTTP API on a Unix socket at PATH (mode 0600) and wait for"
        " PUT /actions InstanceStart or PUT /snapshot/load",
    )
    fc.add_argument(
        "--config-file",
        metavar="FILE",
        help="configure the machine from a Firecracker JSON config file and boot it at once",
    )
    fc.add_argument("--no-api", action="store_true", help="with --config-file: serve no API socket")
    fc.add_argument(
        "--id",
        dest="instance_id",
        metavar="ID",
        help="the instance id GET / and the API log show, as Firecracker's --id: 1 to 64"
        " letters, digits or '-' (default: anonymous-instance)",
    )
    # Firecracker's own command-line flags, so a script named `firecracker` that runs
    # `kvmkit run "$@"` serves an orchestrator that starts Firecracker with them.
    fc.add_argument("--log-path", metavar="PATH", help="as PUT /logger's log_path")
    fc.add_argument(
        "--level", metavar="LEVEL", help="as PUT /logger's level (Error ... Trace, Off)"
    )
    fc.add_argument("--metrics-path", metavar="PATH", help="as PUT /metrics")
    fc.add_argument(
        "--http-api-max-payload-size",
        type=int,
        metavar="BYTES",
        help="the largest request body the API takes (default: 51200, Firecracker's)",
    )
    fc.add_argument(
        "--no-seccomp",
        action="store_true",
        help="accepted for Firecracker's command lines: kvmkit installs no seccomp filter",
    )
    fc.add_argument(
        "--seccomp-filter", metavar="FILE", help="refused: kvmkit has no seccomp filters"
    )


FIRECRACKER_ONLY = ("log_path", "level", "metrics_path", "no_seccomp", "seccomp_filter")


def wanted(args: argparse.Namespace) -> bool:
    return bool(
        args.api_sock
        or args.config_file
        or args.no_api
        or args.instance_id is not None
        or args.http_api_max_payload_size is not None
        or any(getattr(args, flag) for flag in FIRECRACKER_ONLY)
    )


def _check_flags(args: argparse.Namespace) -> None:
    if args.no_api and not args.config_file:
        raise ConfigError("--no-api needs --config-file: nothing else could configure the machine")
    if not (args.api_sock or args.config_file):
        raise ConfigError(
            "--id, --log-path, --level, --metrics-path and the other Firecracker flags go"
            " with a machine configured through --api-sock or --config-file: give one"
        )
    if args.seccomp_filter:
        raise ConfigError(
            "--seccomp-filter: kvmkit has no seccomp filters: drop it (or --no-seccomp), and"
            " sandbox kvmkit yourself"
        )
    size = args.http_api_max_payload_size
    if size is not None and not 1024 <= size <= 1 << 24:
        raise ConfigError("--http-api-max-payload-size: give 1024 to 16777216 bytes")
    if args.no_api and args.api_sock:
        raise ConfigError("--no-api and --api-sock contradict each other: give one of them")
    if (
        getattr(args, "drive", None)
        or getattr(args, "net", None)
        or getattr(args, "vsock", None)
        or getattr(args, "rng", False)
        or (getattr(args, "balloon", None) is not None)
    ):
        raise ConfigError(
            "--drive, --net, --vsock, --rng and --balloon do not go with --api-sock or"
            " --config-file: devices come from PUT /drives, /network-interfaces, /vsock,"
            " /entropy, /balloon (or the config file's keys)"
        )
    if args.instance_id is not None and not INSTANCE_ID_RE.match(args.instance_id):
        raise ConfigError(f"--id {args.instance_id[:70]!r}: use 1 to 64 letters, digits or '-'")
    for flag in BOOT_FLAGS:
        if getattr(args, flag, None):
            name = "--" + flag.replace("_", "-")
            raise ConfigError(
                f"{name} does not go with --api-sock or --config-file: the boot source comes"
                " from PUT /boot-source (or the config file's 'boot-source')"
            )


def load_config(path: str) -> object:
    from kvmkit.api.http import BadRequest, parse_json  # only for a config file

    p = Path(path)
    try:
        with open(p, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a directory: give a JSON file") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file {path} is larger than 1 MiB: is it the right file?")
    try:
        return parse_json(data, f"config file {path}")
    except BadRequest as e:
        raise ConfigError(str(e)) from None


def cmd_run(
    args: argparse.Namespace,
    spec: MachineSpec,
    run_machine: Callable[[Machine, argparse.Namespace], int],
) -> int:
    from kvmkit.api.fc_state import INSTANCE_ID  # a plain run skips these imports
    from kvmkit.api.firecracker import Fault, FirecrackerVmm
    from kvmkit.api.http import MAX_BODY_BYTES, HttpServer

    _check_flags(args)
    max_body = args.http_api_max_payload_size or MAX_BODY_BYTES
    vmm = FirecrackerVmm(spec, args.console, args.instance_id or INSTANCE_ID)
    flags: dict[str, dict[str, object]] = {}
    if args.log_path or args.level:
        flags["logger"] = {
            **({"log_path": args.log_path} if args.log_path else {}),
            **({"level": args.level} if args.level else {}),
        }
    if args.metrics_path:
        flags["metrics"] = {"metrics_path": args.metrics_path}
    vmm.apply_keys(flags, "the command line")
    if args.config_file:
        vmm.apply_config(load_config(args.config_file), f"config file {args.config_file}")
    server = None
    try:
        if args.api_sock:
            with cli_signals.deferred():  # once bound, the socket is `server`'s to remove
                server = HttpServer(args.api_sock, vmm.handle, max_body=max_body).start()
        if args.config_file:
            try:
                vmm.start_instance()
            except Fault as e:
                raise ConfigError(f"config file {args.config_file}: {e}") from None
        machine = vmm.wait_for_machine()
        return run_machine(machine, args)
    finally:
        vmm.close()
        if server is not None:
            server.close()
        if vmm.machine is not None:
            vmm.machine.close()  # built but never run (Ctrl-C between start and run)
