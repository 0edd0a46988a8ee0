"""Linux guests: the project's test kernel on the real /dev/kvm. One boot per session
(the `linux_snapshot` fixture) serves most tests through a restored snapshot; the
few tests that must boot (SMP, another backend) boot once each."""

import re
import subprocess
import sys
import time

import pytest

from kvmkit.errors import KvmkitError
from kvmkit.machine import build_for_boot
from kvmkit.testing.linux import boot_test_kernel, kernel_resources

from .conftest import open_fds
from .migration_helpers import KVMKIT, Proc, free_port

KVMKIT_RUN = [sys.executable, "-m", "kvmkit", "run"]


def test_the_session_boot_reached_the_prompt_on_guest_memfd(linux_guest, linux_snapshot):
    assert linux_guest.machine.memory.backend_name == "guest_memfd"
    result = linux_guest.command("cpus")
    assert (result.rc, result.value("cpus")) == (0, "1")
    assert linux_snapshot.boot_s < 180


def test_the_command_line_and_the_initrd_reach_the_guest(linux_guest, test_kernel):
    cmdline = linux_guest.command("cmdline").text
    assert "kvmkit.test=booted-once" in cmdline  # the user's part
    assert re.search(r"tsc_early_khz=\d+", cmdline)  # what kvmkit adds from KVM
    listing = linux_guest.command("ls /")
    assert listing.rc == 0 and "init" in listing.text.split()  # the initramfs's own file


def test_poweroff_ends_the_run_with_status_0(linux_guest):
    linux_guest.send("poweroff")
    result = linux_guest.finish()
    assert (result.status, result.reason) == (0, "guest powered off")


def test_reboot_ends_the_run_as_a_reboot(linux_guest):
    linux_guest.send("reboot")
    result = linux_guest.finish()
    assert result.status == 0 and result.reason.startswith("guest rebooted"), result.reason


def test_a_kernel_panic_ends_the_run_with_status_3_and_the_message(linux_guest):
    linux_guest.send("panic")
    result = linux_guest.finish()
    assert result.status == 3, result.reason
    assert result.reason.startswith("guest kernel panicked: sysrq triggered crash"), result.reason


def test_init_exiting_is_a_panic_naming_it(linux_guest):
    linux_guest.send("exit 7")
    result = linux_guest.finish()
    assert result.status == 3 and "Attempted to kill init" in result.reason, result.reason


def test_a_panic_with_no_panic_timeout_ends_the_run_at_its_last_line(test_kernel):
    """No `panic=` on the command line (Linux's default: wait forever) and no root file
    system: the kernel panics and spins; the run ends at the panic's last console line
    instead of running until killed."""
    p = subprocess.run(
        [*KVMKIT_RUN, "--kernel", str(test_kernel.vmlinux), "--cmdline", "console=ttyS0"],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert p.returncode == 3, p.stderr
    assert "guest kernel panicked: VFS: Unable to mount root fs" in p.stderr, p.stderr
    assert "end Kernel panic" in p.stdout


def test_the_bzimage_boots_as_fast_as_its_vmlinux(test_kernel):
    """The test kernel's bzImage (an xz payload: tens of minutes for the guest's own
    decompressor under PVM) is decompressed by kvmkit and runs a command."""
    bzimage = test_kernel.vmlinux.with_name("bzImage")
    p = subprocess.run(
        [
            *KVMKIT_RUN,
            "--kernel",
            str(bzimage),
            "--initrd",
            str(test_kernel.initramfs),
            "--cmdline",
            test_kernel.cmdline,
            "--append",
            'kvmkit.cmd="echo from-the-bzimage"',
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert p.returncode == 0, p.stderr
    assert "from-the-bzimage" in p.stdout
    assert "xz payload decompressed by kvmkit on the host" in p.stderr, p.stderr


def test_two_vcpus_on_memfd_boot_and_both_come_online(test_kernel):
    before = open_fds()
    guest, cpus = boot_test_kernel(test_kernel, vcpus=2, memory_backend="memfd")
    try:
        assert cpus == 2
        assert guest.machine.memory.backend_name == "memfd"
        guest.send("poweroff")
        result = guest.finish()
        assert (result.status, result.reason) == (0, "guest powered off")
    finally:
        guest.close()
    assert open_fds() == before


def test_snapshot_of_a_running_linux_guest_carries_on_in_a_new_process(linux_guest, tmp_path):
    """The init's heartbeat runs; a snapshot is taken mid-way; a new kvmkit process
    restores it and the heartbeat goes on with no number missing or repeated."""
    from kvmkit.control.snapshots import take_snapshot

    linux_guest.send("heartbeat 0 100")
    linux_guest.wait_for(re.compile(r"^hb 5$"))
    take_snapshot(linux_guest.machine, tmp_path / "hb.snap", resume=True)
    linux_guest.wait_for(re.compile(r"^hb 8$"))
    before = [int(m.group(1)) for m in re.finditer(r"^hb (\d+)$", linux_guest.console, re.M)]
    console = tmp_path / "restored.txt"
    p = subprocess.Popen(
        [*KVMKIT, "snapshot", "restore", str(tmp_path / "hb.snap"), "--console", str(console)],
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while "hb 12" not in (console.read_text() if console.exists() else ""):
        assert time.monotonic() < deadline and p.poll() is None, p.stderr.read() if p.poll() else ""
        time.sleep(0.05)
    p.stdin.write("\npoweroff\n")  # a line stops the heartbeat; then power off
    p.stdin.flush()
    _, err = p.communicate(timeout=60)
    assert p.returncode == 0 and "guest powered off" in err, err
    after = [int(n) for n in re.findall(r"^hb (\d+)$", console.read_text(), re.M)]
    assert before[:5] == [1, 2, 3, 4, 5]
    # the snapshot was taken after some hb k (5 <= k < 8): the restored run goes on at k+1
    k = after[0] - 1
    assert 5 <= k <= 8 and after == list(range(k + 1, k + 1 + len(after))), after[:20]
    assert before[:k] == list(range(1, k + 1))


def test_live_migration_of_a_linux_guest_over_a_unix_socket(linux_snapshot, tmp_path):
    _migrate_linux(linux_snapshot.path, tmp_path, f"unix:{tmp_path / 'in.sock'}")


def test_live_migration_of_a_linux_guest_over_tcp(linux_snapshot, tmp_path):
    _migrate_linux(linux_snapshot.path, tmp_path, f"tcp:127.0.0.1:{free_port()}")


def _migrate_linux(snapshot, tmp_path, address):
    """Restore the booted guest in a source process, start its heartbeat, migrate it
    to a target process, and check the heartbeat is continuous across the two."""
    source_sock = tmp_path / "src.sock"
    target = Proc(
        ["migrate", "receive", "--listen", address, "--console", str(tmp_path / "t.txt")],
        tmp_path / "t.err",
    )
    target.wait_for("waiting for a migration")
    src_console = tmp_path / "s.txt"
    source = subprocess.Popen(
        [
            *KVMKIT,
            "snapshot",
            "restore",
            str(snapshot),
            "--console",
            str(src_console),
            "--api-socket",
            str(source_sock),
        ],
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        source.stdin.write("heartbeat 0 50\n")
        source.stdin.flush()
        deadline = time.monotonic() + 60
        while "hb 10\n" not in (src_console.read_text() if src_console.exists() else ""):
            assert time.monotonic() < deadline and source.poll() is None
            time.sleep(0.05)
        send = subprocess.run(
            [*KVMKIT, "migrate", "send", "--socket", str(source_sock), "--to", address, "--json"],
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert send.returncode == 0, send.stderr
        assert source.wait(60) == 0
        t_console = tmp_path / "t.txt"
        deadline = time.monotonic() + 60
        while len(re.findall(r"^hb \d+$", t_console.read_text(), re.M)) < 5:
            assert time.monotonic() < deadline, target.output
            time.sleep(0.05)
    finally:
        if source.poll() is None:
            source.kill()
    target.p.kill()
    target.wait()
    before = [int(n) for n in re.findall(r"^hb (\d+)$", src_console.read_text(), re.M)]
    after = [int(n) for n in re.findall(r"^hb (\d+)$", (tmp_path / "t.txt").read_text(), re.M)]
    assert before == list(range(1, len(before) + 1))
    assert after[0] == before[-1] + 1 and after == list(range(after[0], after[0] + len(after)))


def test_hide_guest_memory_with_linux_is_refused_on_pvm(test_kernel):
    from kvmkit.kvm import Kvm

    with Kvm() as kvm:
        if not kvm.is_pvm:
            pytest.skip("this host's KVM can run guest_memfd without a host mapping")
    resources = kernel_resources(test_kernel)
    resources = resources.with_machine(
        type(resources.machine)(memory_bytes=resources.machine.memory_bytes, hide="unmap")
    )
    with pytest.raises(KvmkitError, match="cannot run a guest from guest_memfd without a host"):
        build_for_boot(resources)


@pytest.mark.parametrize(
    "make, args, message",
    [
        (lambda t: t / "text.txt", [], "is neither an ELF vmlinux nor a bzImage"),
        (lambda t: t / "missing", [], "does not exist"),
        (lambda t: t / "elf32", [], "32-bit"),
        (lambda t: t / "cut.elf", [], "truncated"),
    ],
)
def test_bad_kernels_get_one_line_and_exit_2(tmp_path, make, args, message, test_kernel):
    (tmp_path / "text.txt").write_text("hello, not a kernel\n")
    elf32 = bytearray(test_kernel.vmlinux.read_bytes()[:4096])
    elf32[4] = 1  # ELFCLASS32
    (tmp_path / "elf32").write_bytes(elf32)
    (tmp_path / "cut.elf").write_bytes(test_kernel.vmlinux.read_bytes()[:300000])
    p = subprocess.run(
        [*KVMKIT_RUN, "--kernel", str(make(tmp_path)), *args, "-q"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], p.stderr


def test_bad_initrds_and_command_lines_get_one_line_and_exit_2(tmp_path, test_kernel):
    big = tmp_path / "big.img"
    with open(big, "wb") as f:
        f.truncate(200 << 20)  # sparse: never read, refused by its size
    cases = [
        (["--initrd", str(big), "--memory", "64M"], "initrd"),
        (["--initrd", str(tmp_path / "none.img")], "does not exist"),
        (["--cmdline", "x" * 5000], "command line"),
        (["--memory", "4M"], "needs guest RAM"),
    ]
    for extra, message in cases:
        p = subprocess.run(
            [*KVMKIT_RUN, "--kernel", str(test_kernel.vmlinux), *extra, "-q"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert p.returncode == 2, (extra, p.stderr)
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], (extra, p.stderr)


def test_kernel_and_guest_flags_exclude_each_other(tmp_path):
    p = subprocess.run(
        [*KVMKIT_RUN, "--kernel", "/nonexistent", "--guest", "hello"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 2 and "--guest and --kernel" in p.stderr
