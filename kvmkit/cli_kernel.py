"""`kvmkit kernel`: build and locate the Linux test kernel, initramfs and init."""

import argparse
import json
import sys
from typing import TYPE_CHECKING, Any

from kvmkit.errors import ConfigError

if TYPE_CHECKING:
    from kvmkit.guests.linux.build import TestKernel

KERNEL_EPILOG = """\
The test kernel is Debian's linux-source-6.12 configured for this project's PVM
hosts (kvmkit/guests/linux/config.fragment and patches/), with an initramfs
holding kvmkit's static test init. It is built once (about 7 minutes on 2 CPUs)
and cached under $KVMKIT_CACHE_DIR/linux/<hash>/ (default ~/.cache/kvmkit).

examples:
  kvmkit kernel build                  build if not cached (progress on stderr)
  sudo kvmkit kernel build --install-deps
  kvmkit kernel path                   where the cached files are
  kvmkit kernel path --json | jq -r .vmlinux"""


def add_parser(sub: Any, parser_class: type[argparse.ArgumentParser]) -> None:  # noqa: ANN401
    kernel = sub.add_parser(
        "kernel",
        help="build or locate the Linux test kernel, initramfs and init",
        description="Build or locate the Linux test kernel used by kvmkit's Linux guest tests.",
        epilog=KERNEL_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = kernel.add_subparsers(
        dest="kernel_command", metavar="ACTION", parser_class=parser_class
    )
    build = actions.add_parser(
        "build",
        help="build the test kernel if it is not cached",
        description="Build the test kernel, initramfs and init if the cache has no build"
        " of the current sources; print where they are.",
    )
    build.add_argument(
        "--jobs", "-j", metavar="N", help="parallel make jobs (default: the number of CPUs)"
    )
    build.add_argument(
        "--install-deps",
        action="store_true",
        help="when a build is needed and a prerequisite is missing, apt-get update and"
        " install them first (root only); with a cached build it does nothing",
    )
    build.add_argument("--force", action="store_true", help="rebuild even if a build is cached")
    build.add_argument(
        "--keep-source",
        action="store_true",
        help="keep the extracted, built kernel tree (about 1.5 GB) for incremental rebuilds",
    )
    build.add_argument("--quiet", "-q", action="store_true", help="no progress lines")
    path = actions.add_parser(
        "path",
        help="print where the cached vmlinux, bzImage and initramfs are",
        description="Print the cached build's files and recommended command line; exit 1"
        " if there is none.",
    )
    path.add_argument("--json", action="store_true", help="print as JSON")


def _describe(kernel: "TestKernel", as_json: bool) -> str:
    fields = {
        "vmlinux": str(kernel.vmlinux),
        "bzimage": str(kernel.bzimage),
        "initramfs": str(kernel.initramfs),
        "cmdline": kernel.cmdline,
        "version": kernel.version,
        "hash": kernel.hash,
        "directory": str(kernel.directory),
        "config": str(kernel.config),
        "system_map": str(kernel.system_map),
    }
    if as_json:
        return json.dumps(fields, indent=2)
    return "\n".join(f"{name:<10} {value}" for name, value in fields.items())


def cmd_kernel(args: argparse.Namespace) -> int:
    from kvmkit.guests.linux import build

    if args.kernel_command == "path":
        kernel = build.find_test_kernel()
        if kernel is None:
            reason = build.why_unbuildable()
            hint = f" (it cannot be built here yet: {reason})" if reason else ""
            print(
                f"kvmkit: no test kernel is built for these sources: run 'kvmkit kernel build'"
                f"{hint}",
                file=sys.stderr,
            )
            return 1
        print(_describe(kernel, args.json))
        return 0
    if args.kernel_command != "build":
        raise ConfigError("name an action: 'kvmkit kernel build' or 'kvmkit kernel path'")
    jobs = None
    if args.jobs is not None:
        if not args.jobs.isdigit() or not 1 <= int(args.jobs) <= 1024:
            raise ConfigError(f"--jobs {args.jobs!r} is not a number from 1 to 1024")
        jobs = int(args.jobs)

    def progress(message: str) -> None:
        print(f"kvmkit kernel: {message}", file=sys.stderr, flush=True)

    say = None if args.quiet else progress
    kernel = None if args.force else build.find_test_kernel()
    if kernel is None:
        # apt-get only when something is missing: a cached build needs nothing
        if args.install_deps and build.why_unbuildable() is not None:
            build.install_prerequisites(say)
        kernel = build.build_test_kernel(
            jobs=jobs, progress=say, force=args.force, keep_source=args.keep_source
        )
    print(_describe(kernel, False))
    return 0
