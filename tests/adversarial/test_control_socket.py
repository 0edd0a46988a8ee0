"""The control socket against hostile and careless clients: a request line costs at
most MAX_REQUEST_BYTES however long it is, deep JSON is an error reply, clients that
hang up early leave no traceback, running out of descriptors never ends the API, and
a full queue makes the clients wait and retry instead of crashing."""

import json
import signal
import socket
import struct
import subprocess
import sys
import threading

import pytest

from kvmkit.api.client import call
from kvmkit.api.server import MAX_REQUEST_BYTES
from kvmkit.errors import KvmkitError
from tests.adversarial.control_helpers import Vm, need_kvm, read_line, settle

MIB = 1 << 20


def test_a_300_mb_line_is_refused_without_being_buffered(tmp_path):
    vm = Vm(tmp_path)
    try:
        before = vm.peak_rss_kib()
        s = vm.connect()
        piece = b"x" * MIB
        sent = 0
        try:
            while sent < 300 * MIB:
                s.sendall(piece)
                sent += len(piece)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server closed after answering: what the test wants
        reply = read_line(s)
        s.close()
        assert json.loads(reply)["error"].startswith("request too long"), reply
        assert sent < 300 * MIB  # it stopped reading long before the end
        assert vm.peak_rss_kib() - before < 8 * 1024  # KiB: never near 300 MB
        assert call(vm.socket, "status")["state"] == "running"
    finally:
        vm.kill()
    vm.stderr_has_no_traceback()


def test_a_line_just_over_the_bound_is_refused_and_one_at_it_is_read(tmp_path):
    vm = Vm(tmp_path)
    try:
        s = vm.connect()
        body = '{"cmd": "status"' + " " * (MAX_REQUEST_BYTES - 18) + "}"  # JSON, at the bound
        s.sendall(body.encode() + b"\n")
        assert json.loads(read_line(s))["ok"] is True
        s.sendall(b" " * (MAX_REQUEST_BYTES + 1) + b"\n")
        assert "request too long" in json.loads(read_line(s))["error"]
        s.close()
    finally:
        vm.kill()


@pytest.mark.parametrize("opener", ["[", '{"a":'])
def test_deeply_nested_json_gets_an_error_reply(tmp_path, opener):
    vm = Vm(tmp_path)
    try:
        s = vm.connect()
        s.sendall(opener.encode() * 12000 + b"\n")
        reply = json.loads(read_line(s))
        assert reply == {"ok": False, "error": "not JSON kvmkit takes: nested too deeply"}
        s.sendall(b'{"cmd": "status"}\n')  # the same connection still works
        assert json.loads(read_line(s))["state"] == "running"
        s.close()
    finally:
        vm.kill()
    vm.stderr_has_no_traceback()


def test_clients_hanging_up_early_leave_no_traceback(tmp_path):
    vm = Vm(tmp_path)
    try:
        vm.warm_up(tmp_path)
        threads, fds = vm.threads(), vm.fds()
        for i in range(300):
            s = vm.connect()
            cmd = ["status", "pause", "resume", "snapshot"][i % 4]
            request = {"cmd": cmd, "path": str(tmp_path / f"s{i}.snap")}
            s.sendall(json.dumps(request).encode() + b"\n")
            # close with a reset (SO_LINGER 0) so the server's answer meets ECONNRESET
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()
        settle(lambda: call(vm.socket, "status")["in_progress"] == [])
        settle(lambda: vm.threads() <= threads and vm.fds() <= fds)
        call(vm.socket, "resume")  # a pause may have landed before its client left
        assert call(vm.socket, "status")["state"] == "running"
        call(vm.socket, "stop")
        assert vm.wait() == 0
    finally:
        vm.kill()
    vm.stderr_has_no_traceback()
    assert "kvmkit: control API" not in vm.output


def test_sixty_five_idle_clients_under_a_64_fd_limit_do_not_lock_out_control(tmp_path):
    vm = Vm(tmp_path, prefix=["prlimit", "--nofile=64:64", "--"])
    idle: list[socket.socket] = []
    try:
        for _ in range(65):
            idle.append(vm.connect())  # they connect (or queue) and say nothing
        assert call(vm.socket, "pause")["state"] == "paused"
        snap = tmp_path / "vm.snap"
        call(vm.socket, "snapshot", {"path": str(snap), "resume": True})
        assert snap.stat().st_size > 0
        assert call(vm.socket, "status")["state"] == "paused"  # the user's pause stays
        assert call(vm.socket, "resume")["state"] == "running"
        for _ in range(65):  # more idle ones, while the first are still open
            idle.append(vm.connect())
        call(vm.socket, "stop")
        assert vm.wait() == 0
    finally:
        for s in idle:
            s.close()
        vm.kill()
    vm.stderr_has_no_traceback()


def test_a_full_queue_makes_clients_wait_then_say_so(tmp_path):
    """The VM stopped (SIGSTOP) with its listen backlog full: a client waits and
    retries, gets one clear line when it gives up, and is served once the VM runs."""
    vm = Vm(tmp_path)
    queued: list[socket.socket] = []
    try:
        vm.p.send_signal(signal.SIGSTOP)
        with pytest.raises(KvmkitError, match="did not answer 'status' within 0.5 s"):
            call(vm.socket, "status", timeout_s=0.5)  # queued, never answered
        while True:  # fill the backlog until connecting would block
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.setblocking(False)
            try:
                s.connect(vm.socket)
            except BlockingIOError:
                s.close()
                break
            queued.append(s)
        assert len(queued) > 8  # not the old backlog of 8
        with pytest.raises(KvmkitError, match="did not take 'status' within 0.5 s"):
            call(vm.socket, "status", connect_timeout_s=0.5)
        ctl = subprocess.run(
            [sys.executable, "-m", "kvmkit", "ctl", "status", "--socket", vm.socket]
            + ["--wait", "1"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert ctl.returncode == 1, ctl.stderr
        assert ctl.stderr.startswith(f"kvmkit: error: the kvmkit at {vm.socket} did not take")
        assert "it may be overloaded or hung" in ctl.stderr and "Traceback" not in ctl.stderr
        answers: list[str] = []
        waiter = threading.Thread(
            target=lambda: answers.append(call(vm.socket, "status")["state"]), daemon=True
        )
        waiter.start()
        for s in queued[:16]:
            s.close()
        vm.p.send_signal(signal.SIGCONT)
        waiter.join(60)
        assert answers == ["running"]
    finally:
        vm.p.send_signal(signal.SIGCONT)
        for s in queued:
            s.close()
        vm.kill()
    vm.stderr_has_no_traceback()


OUT_OF_FDS_VM = r"""
import os, resource, sys, threading, time
from kvmkit.api.server import ApiServer
from kvmkit.machine import MachineConfig, build_for_boot
m = build_for_boot(MachineConfig(guest="counter", guest_arg=0, console="none"))
server = ApiServer(sys.argv[1], m)
server.max_clients = 100000  # no cap: only the fd limit stops accept()
runner = threading.Thread(target=m.run)
runner.start()
while not m.running:
    time.sleep(0.001)
used = len(os.listdir("/proc/self/fd"))
_, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (used + 8, hard))
server.start()
print("ready", flush=True)
runner.join()
server.close()
m.close()
print(f"refused {server.refused}", flush=True)
"""


def test_accept_failing_with_emfile_refuses_clearly_and_keeps_accepting(tmp_path):
    need_kvm()
    sock = str(tmp_path / "vm.sock")
    p = subprocess.Popen(
        [sys.executable, "-c", OUT_OF_FDS_VM, sock],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    idle: list[socket.socket] = []
    try:
        assert p.stdout is not None and p.stdout.readline() == "ready\n"
        for _ in range(20):  # more than the descriptors left: accept() fails (EMFILE)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(sock)
            idle.append(s)
        with pytest.raises(KvmkitError, match="out of file descriptors"):
            call(sock, "status", connect_timeout_s=1.0)
        for s in idle:
            s.close()
        idle.clear()
        settle(lambda: _answers(sock))
        assert call(sock, "pause")["state"] == "paused"
        snap = tmp_path / "vm.snap"
        call(sock, "snapshot", {"path": str(snap), "resume": True})
        assert snap.stat().st_size > 0
        call(sock, "stop")
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        assert int(out.split()[-1]) >= 1  # clients were refused, in one line each
        assert "Traceback" not in err and "stopped accepting" not in err, err
    finally:
        for s in idle:
            s.close()
        if p.poll() is None:
            p.kill()
            p.communicate()


def _answers(sock: str) -> bool:
    try:
        return call(sock, "status", connect_timeout_s=0.2)["state"] == "running"
    except KvmkitError:
        return False


def test_a_client_that_only_stops_sending_still_gets_its_snapshot(tmp_path):
    """socat shuts down its sending side when its input ends: not a hang-up."""
    vm = Vm(tmp_path)
    try:
        s = vm.connect()
        path = tmp_path / "vm.snap"
        s.sendall(json.dumps({"cmd": "snapshot", "path": str(path), "resume": True}).encode())
        s.sendall(b"\n")
        s.shutdown(socket.SHUT_WR)
        lines = s.makefile("rb").read().splitlines()
        s.close()
        assert json.loads(lines[-1])["ok"] is True, lines[-1]
        assert path.stat().st_size > 0
    finally:
        vm.kill()
