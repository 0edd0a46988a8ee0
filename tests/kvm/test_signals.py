"""Ending kvmkit from outside: SIGTERM ends a run or a receive as Ctrl-C does (one
line, the summary, no socket file left), and run --timeout stops a guest on time."""

import os
import signal
import subprocess
import sys
import time

KVMKIT = [sys.executable, "-m", "kvmkit"]


def wait_for_path(path, p, timeout_s=30):
    deadline = time.monotonic() + timeout_s
    while not os.path.exists(path):
        assert time.monotonic() < deadline and p.poll() is None, p.stderr.read() if p.poll() else ""
        time.sleep(0.02)


def test_sigterm_ends_a_run_cleanly_with_a_summary(tmp_path):
    sock = tmp_path / "vm.sock"
    p = subprocess.Popen(
        [
            *KVMKIT,
            "run",
            "--guest",
            "counter",
            "--guest-arg",
            "0",
            "--console",
            "none",
            "--memory",
            "16M",
            "--api-socket",
            str(sock),
        ],
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    wait_for_path(sock, p)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=30)
    assert p.returncode == 143, err
    assert "kvmkit: terminated (SIGTERM) (exit status 143)" in err and "wall time" in err, err
    assert "Traceback" not in err and not sock.exists()


def test_sigterm_ends_a_waiting_receive_and_removes_its_socket(tmp_path):
    sock = tmp_path / "in.sock"
    p = subprocess.Popen(
        [*KVMKIT, "migrate", "receive", "--listen", f"unix:{sock}"],
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    wait_for_path(sock, p)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=30)
    assert p.returncode == 143, err
    assert err.strip().splitlines()[-1] == "kvmkit: terminated (SIGTERM)", err
    assert "Traceback" not in err and not sock.exists()


def test_run_timeout_stops_the_guest_with_status_124():
    p = subprocess.run(
        [
            *KVMKIT,
            "run",
            "--guest",
            "counter",
            "--guest-arg",
            "0",
            "--console",
            "none",
            "--memory",
            "16M",
            "--timeout",
            "0.5",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 124, p.stderr
    assert "stopped: the run reached its --timeout of 0.5 s" in p.stderr
