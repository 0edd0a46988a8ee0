"""The command line's one rule for bad input: exit status 2 and exactly one line,
`kvmkit: error: ...`, naming the problem (and where there is one, the fix); never a
traceback. Walked over every command's bad inputs a user has hit."""

import os
import subprocess
import sys

import pytest

KVMKIT = [sys.executable, "-m", "kvmkit"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    (d / "text.txt").write_text("not a snapshot, not a kernel\n")
    (d / "plan5.toml").write_text("fault = 5\n")
    (d / "planbin.toml").write_bytes(b"\xff\xfe\x00")
    (d / "planbad.toml").write_text("[[fault]]\nrule = 5\n")
    return d


CASES = [
    # run: sizes, numbers, files, combinations
    ("run --memory -1M", "memory size '-1M' is not a size"),
    ("run --memory 1", "memory 1 byte is too small"),
    ("run --memory " + "9" * 5000, "is not a size"),
    ("run --vcpus 0", "vCPUs must be at least 1"),
    ("run --vcpus many", "vCPU count 'many' is not a number"),
    ("run --guest nope", "is neither a built-in guest"),
    ("run --guest-arg -5", "guest argument '-5' is not a number"),
    ("run --guest-arg 18446744073709551616", "is not a number"),
    ("run --console {d}", "is a directory"),
    ("run --console {d}/missing/c.txt", "does not exist"),
    ("run --dirty-ring 0", "--dirty-ring 0 is no ring"),
    ("run --dirty-ring 3000", "not a power of two"),
    ("run --timeout -1", "must be more than 0"),
    ("run --memory-backend hugetlb --hugepage-size 1G --memory 256M", "hugepage size"),
    ("run --hide-guest-memory --memory-backend memfd", "needs the guest_memfd backend"),
    ("run --kernel {d}/missing", "does not exist"),
    ("run --kernel {d}/text.txt", "is neither an ELF vmlinux nor a bzImage"),
    ("run --initrd {d}/text.txt", "--initrd goes with --kernel"),
    ("run --kernel {d}/text.txt --guest hello", "--guest and --kernel"),
    ("run --fault nonsense", "fault rule"),
    ("run --fault-plan {d}/plan5.toml", "must be [[fault]] tables"),
    ("run --fault-plan {d}/planbin.toml", "is not UTF-8"),
    ("run --fault-plan {d}/planbad.toml", 'needs rule = "..."'),
    ("run --fault-plan {d}/missing.toml", "missing.toml does not exist: give the path"),
    ("run --fault-plan {d}/text.txt", "is not valid TOML"),
    ("run --frobnicate", "unrecognized arguments"),
    # devices
    ("run --drive nope", "--drive: unknown option 'nope'"),
    ("run --drive ro", "give the backing file as path=FILE"),
    ("run --drive path={d}/missing.img", "does not exist"),
    ("run --drive path={d}", "is a directory"),
    ("run --drive path={d}/text.txt,cache=fast", "unknown cache type 'fast'"),
    ("run --drive path={d}/text.txt,id=a/b", "drive id 'a/b' is not valid"),
    ("run --drive path={d}/text.txt,ro=yes", "ro takes no value"),
    ("run --drive path={d}/text.txt,id", "id needs a value"),
    ("run --drive path={d}/text.txt,path={d}/text.txt", "'path' is given twice"),
    ("run --drive path={d}/text.txt,serial=123456789012345678901", "at most 20"),
    ("run --drive path={d}/text.txt,root --drive path={d}/text.txt,root", "already the root"),
    ("run --drive path={d}/text.txt --drive path={d}/text.txt,id=drive0", "two drives have"),
    ("run --drive path={d}/text.txt --drive path={d}/text.txt,id=b", "is already drive drive0"),
    ("run --drive path={d}/text.txt --drive path={d}/text.txt,id=b", "or make one read-only"),
    ("run --balloon amount=999999", "balloon target 999999 MiB is outside"),
    ("run --balloon amount=lots", "amount='lots' is not a whole number"),
    ("run --balloon amount=-5", "amount=-5 must not be negative"),
    ("run --balloon stats=4000", "statistics interval 4000 s"),
    ("run --balloon frob", "--balloon: unknown option 'frob'"),
    ("run --net mac=06:00:ac:10:00:02", "name the host tap as tap=TAP"),
    ("run --net tap=kvk-nonesuch0", "ip tuntap add kvk-nonesuch0 mode tap"),
    ("run --net tap=a/b", "must be 1 to 15 characters"),
    ("run --net tap=t0,mac=01:00:ac:10:00:02", "is a multicast address"),
    ("run --net tap=t0,mac=zz", "is not of the form 06:00:ac:10:00:02"),
    ("run --net tap=t0,speed=10", "--net: unknown option 'speed'"),
    ("run --net tap=t0 --net tap=t0", "tap t0 is already eth0's"),
    ("run --net tap=t0,id=x --net tap=t1,id=x", "two interfaces have the id 'x'"),
    ("run --vsock cid=3", "give both the guest's CID and the socket path"),
    ("run --vsock cid=2,uds={d}/v.sock", "vsock guest CID 2 is out of range"),
    ("run --vsock cid=three,uds={d}/v.sock", "cid='three' is not a whole number"),
    ("run --vsock cid=3,uds={d}/missing/v.sock", "does not exist"),
    ("run --vsock cid=3,uds={d}/text.txt", "already exists"),
    ("run --vsock cid=3,uds=/" + "x" * 120, "too long for a unix socket"),
    ("run --rng --hide-guest-memory", "cannot be used with --hide-guest-memory"),
    ("snapshot restore {d}/missing.snap --drive-path drive0", "write ID=PATH"),
    ("snapshot restore {d}/missing.snap --drive-path a=x --drive-path a=y", "given twice"),
    ("migrate receive --listen unix:{d}/m.sock --drive-path =x", "write ID=PATH"),
    ("snapshot restore {d}/missing.snap --net-tap eth0", "write ID=TAP"),
    ("migrate receive --listen unix:{d}/m.sock --net-tap a=x --net-tap a=y", "given twice"),
    # snapshots and the control API
    ("snapshot restore {d}/missing.snap", "does not exist"),
    ("snapshot restore {d}/missing.snap --console {d}", "is a directory"),
    ("snapshot inspect {d}", "is a directory"),
    ("ctl status --socket {d}/none.sock", "no kvmkit is listening"),
    ("ctl status --socket {d}/none.sock --wait -1", "must be more than 0"),
    ("snapshot create --socket {d}/none.sock --out {d}/text.txt --force", "not a kvmkit snapshot"),
    ("snapshot create --socket {d}/none.sock --out {d}/" + "x" * 300, "is too long"),
    # migration
    ("migrate send --socket {d}/none.sock --to tcp:h:²", "is not tcp:HOST:PORT"),
    ("migrate send --socket {d}/none.sock --to tcp:h:1 --bandwidth 1X", "is not a size"),
    ("migrate receive --listen tcp:127.0.0.1:99999", "is not tcp:HOST:PORT"),
    ("migrate receive --listen unix:{d}/m.sock --timeout -1", "must be more than 0"),
    # the rest
    ("check --profile nope", "unknown profile 'nope'"),
    ("selftest nope", "unknown selftest group 'nope'"),
    ("kernel build --jobs zero", "--jobs 'zero' is not a number"),
    ("frobnicate", "invalid choice"),
]


@pytest.mark.parametrize("argv, message", CASES, ids=[c[0][:50] for c in CASES])
def test_bad_input_is_one_line_and_exit_2(files, argv, message):
    args = [a.replace("{d}", str(files)) for a in argv.split(" ")]
    p = subprocess.run(
        [*KVMKIT, *args],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "COLUMNS": "80"},
    )
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2, p.stderr
    assert len(lines) == 1 and lines[0].startswith("kvmkit: error: "), p.stderr
    assert message in lines[0], lines[0]
