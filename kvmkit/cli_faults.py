"""`--fault` and `--fault-plan`, for every command that runs a machine (run, migrate
receive): the options, and running a command under the plan with its summary."""

import argparse
import sys
from collections.abc import Callable

from kvmkit.faults import active_plan, load_plan


def add_fault_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--fault",
        action="append",
        default=[],
        metavar="RULE",
        help="inject a failure: WHERE:WHAT@WHEN, e.g. ioctl:KVM_RUN:EINTR@every=100,"
        " ioctl:KVM_CREATE_VCPU:ENOMEM@once, snapshot.write:EIO@nth=3,"
        " migration.send:disconnect@once,after=migration.precopy,"
        " ioctl:KVM_SET_REGS:EFAULT@p=0.05,seed=7 (repeatable); a summary is printed",
    )
    parser.add_argument(
        "--fault-plan",
        metavar="FILE",
        help='fault rules from a TOML file: [[fault]] tables with rule = "WHERE:WHAT@WHEN"',
    )


def run_with_faults(args: argparse.Namespace, body: Callable[[], int]) -> int:
    """`body()` under the plan `args` describe (if any), then how often each rule fired."""
    if not args.fault and not args.fault_plan:
        return body()
    plan = load_plan(args.fault, args.fault_plan)
    try:
        with active_plan(plan):
            return body()
    finally:
        for line in plan.summary():
            print(f"kvmkit: fault {line}", file=sys.stderr)
