"""`kvmkit` as a user runs it: exit status, console on stdout, one-line errors."""

import subprocess
import sys

import pytest

from .conftest import write_guest


def kvmkit(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kvmkit", *args], capture_output=True, text=True, timeout=timeout
    )


def test_run_default_prints_console_and_summary():
    p = kvmkit("run", "--memory", "32M")
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("hello from kvmkit: 32 MiB, 1 vCPU(s)\n")
    assert "guest exited with status 0" in p.stderr
    assert "on guest_memfd (default)" in p.stderr
    assert "wall time" in p.stderr and "exits" in p.stderr and "vCPUs        1" in p.stderr


def test_run_memtest_two_vcpus_memfd():
    p = kvmkit(
        "run", "--guest", "memtest", "--memory", "64M", "--vcpus", "2", "--memory-backend", "memfd"
    )
    assert p.returncode == 0, p.stderr
    assert "memtest: all 2 vCPUs passed" in p.stdout
    assert "on memfd (requested)" in p.stderr


def test_run_user_flat_binary_long_mode(tmp_path):
    guest = write_guest(tmp_path, "status", load_addr=0x1000)
    p = kvmkit(
        "run", "--guest", guest, "--entry", "0x1000", "--mode", "long", "--guest-arg", "7", "-q"
    )
    assert p.returncode == 7, p.stderr


def test_run_user_flat_binary_real_mode(tmp_path):
    from kvmkit.guests.build import BUILTIN

    path = tmp_path / "rm.bin"
    path.write_bytes(BUILTIN["hello16"].build())
    p = kvmkit("run", "--guest", str(path), "--entry", "0x1000", "--mode", "real", "-q")
    assert p.returncode == 0, p.stderr
    assert p.stdout == "hello from real mode\n"


def test_console_to_file(tmp_path):
    log = tmp_path / "console.log"
    p = kvmkit("run", "--memory", "16M", "--console", str(log), "-q")
    assert p.returncode == 0 and p.stdout == ""
    assert log.read_text().endswith("hello: bye\n")


def test_crash_reports_registers_and_status_3(tmp_path):
    p = kvmkit("run", "--guest", write_guest(tmp_path, "triple_fault"), "--memory", "16M")
    assert p.returncode == 3
    assert "triple fault" in p.stderr and "rip=" in p.stderr
    assert "Traceback" not in p.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--memory", "lots"], "memory size 'lots' is not a size"),
        (["--vcpus", "100000"], "above this host's KVM_CAP_MAX_VCPUS"),
        (["--vcpus", "two"], "vCPU count 'two' is not a number"),
        (["--guest", "/nonexistent/guest.bin"], "neither a built-in guest"),
        (["--guest", "/"], "cannot read guest file '/'"),
        (["--memory-backend", "tmpfs"], "invalid choice"),
        (["--memory", "1M"], "too small"),
    ],
)
def test_bad_input_is_one_clear_line(args, message):
    p = kvmkit("run", *args)
    assert p.returncode == 2
    assert message in p.stderr
    assert "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith("kvmkit: error: ")


def test_entry_outside_ram(tmp_path):
    guest = write_guest(tmp_path, "status", load_addr=0x1000)
    p = kvmkit("run", "--guest", guest, "--entry", "0x40000000", "--memory", "64M")
    assert p.returncode == 2
    assert "entry 0x40000000 is outside guest RAM" in p.stderr
    assert "Traceback" not in p.stderr


def test_help_teaches():
    p = kvmkit("run", "--help")
    assert p.returncode == 0
    for text in ("memtest", "--memory-backend", "exit status", "0x3f8", "examples:"):
        assert text in p.stdout
    assert kvmkit("--help").returncode == 0
    assert kvmkit().returncode == 2


def test_guests_lists_builtins():
    p = kvmkit("guests")
    assert p.returncode == 0 and "hello" in p.stdout and "memtest" in p.stdout


@pytest.mark.parametrize("guest", ["exitloop", "spin"])
def test_ctrl_c_stops_the_machine_with_130(tmp_path, guest):
    """SIGINT ends a run: a guest busy with exits, and one spinning with none (the
    vCPU threads are kicked out of KVM_RUN)."""
    import signal
    import time

    target = guest if guest == "exitloop" else write_guest(tmp_path, "spin")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kvmkit",
            "run",
            "--guest",
            target,
            "--vcpus",
            "2",
            "--memory",
            "16M",
            "--guest-arg",
            str(10**9),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(1.5)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 130, err
    assert "interrupted (Ctrl-C)" in err
    assert "Traceback" not in err


def test_run_with_faults_retries_eintr_and_prints_the_summary():
    p = kvmkit(
        "run",
        "--guest",
        "counter",
        "--guest-arg",
        "50",
        "--console",
        "none",
        "-q",
        "--fault",
        "ioctl:KVM_RUN:EINTR@every=50",
    )
    assert p.returncode == 0, p.stderr
    assert "kvmkit: fault ioctl:KVM_RUN:EINTR@every=50: injected" in p.stderr


def test_run_with_an_enomem_fault_names_the_operation():
    p = kvmkit("run", "-q", "--fault", "ioctl:KVM_CREATE_VCPU:ENOMEM@once")
    assert p.returncode == 1
    assert "kvmkit: error: KVM_CREATE_VCPU failed: ENOMEM" in p.stderr
    assert "Traceback" not in p.stderr


@pytest.mark.parametrize(
    ("image_bytes", "args", "message"),
    [
        (16, ["--entry", "0x0"], "entry 0x0 is in page 0: load the guest at 0x1000 or above"),
        (15 << 20, ["--memory", "16M"], "does not fit below kvmkit's boot"),
        (1 << 20, ["--mode", "real"], "a real-mode guest must fit below 1 MiB"),
    ],
)
def test_guest_files_that_do_not_fit_are_refused(tmp_path, image_bytes, args, message):
    guest = tmp_path / "big.bin"
    guest.write_bytes(b"\xf4" * image_bytes)  # hlt, many times
    p = kvmkit("run", "--guest", str(guest), *args)
    assert p.returncode == 2, p.stderr
    assert message in p.stderr and "Traceback" not in p.stderr
