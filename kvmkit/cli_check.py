"""`kvmkit check`: what this host's KVM supports, against requirement profiles."""

import argparse
import json
from typing import Any

from kvmkit.errors import ConfigError

CHECK_EPILOG = """\
every value comes from a probe on this host (an ioctl, /proc or /sys, a short-lived
test VM), never from the kernel version. Exit status: 0, or with --profile 0 when
every required item of every named profile is met and 1 when one is not; 2 for
bad input.

examples:
  kvmkit check
  kvmkit check --profile live-migration-guest-memfd
  if kvmkit check --profile guest-memfd-mmap -q; then echo ready; fi
  kvmkit check --json | jq '.profiles["basic-vm"].met'
  kvmkit check --requirements-doc > REQUIREMENTS.md"""


def _profiles() -> str:
    from kvmkit.hostcheck.profiles import PROFILES

    return "\n\nprofiles:\n" + "\n".join(f"  {p.name:<28} {p.summary}" for p in PROFILES.values())


def add_parser(sub: Any, parser_class: type[argparse.ArgumentParser]) -> None:  # noqa: ANN401
    check = sub.add_parser(
        "check",
        help="what this host's KVM can do, and which requirement profiles it meets",
        description="Report this host's KVM backend, every capability with its value, VM"
        " types, guest_memfd flags, limits, CPUID features and MSRs, the results of"
        " functional probes, and a verdict per requirement profile.",
        epilog=CHECK_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    check.late_epilog = _profiles  # made when the help is shown: a run skips the import
    check.add_argument(
        "--profile",
        "-p",
        action="append",
        metavar="NAME",
        help="judge this host against a profile (repeatable); exit 1 if one is unmet",
    )
    check.add_argument("--json", action="store_true", help="print the report as JSON")
    check.add_argument("--list-profiles", action="store_true", help="list profiles and exit")
    check.add_argument(
        "--requirements-doc",
        action="store_true",
        help="print every profile as a Markdown requirements document and exit",
    )
    check.add_argument(
        "--no-probes", action="store_true", help="skip the functional probes (no test VMs)"
    )
    check.add_argument("--quiet", "-q", action="store_true", help="print nothing; exit status only")


def cmd_check(args: argparse.Namespace) -> int:
    from kvmkit.hostcheck.kvm_probes import gather
    from kvmkit.hostcheck.profiles import PROFILES
    from kvmkit.hostcheck.report import (
        build_report,
        render_profiles,
        render_tables,
        requirements_doc,
    )

    if args.list_profiles:
        for p in PROFILES.values():
            print(f"{p.name:<28} {p.summary}")
        return 0
    if args.requirements_doc:
        print(requirements_doc())
        return 0
    unknown = [p for p in args.profile or [] if p not in PROFILES]
    if unknown:
        raise ConfigError(f"unknown profile {unknown[0]!r}: choose from {', '.join(PROFILES)}")
    report = build_report(gather(probes=not args.no_probes), args.profile)
    met = all(p["met"] for p in report["profiles"].values())
    if args.json:
        print(json.dumps(report, indent=2))
    elif not args.quiet:
        from rich.console import Console

        console = Console(highlight=False)
        if args.profile:
            render_profiles(report, console, detail=True)
        else:
            render_tables(report, console)
    if args.profile:
        return 0 if met else 1
    return 0
