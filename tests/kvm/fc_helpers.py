"""A plain HTTP client over a Unix socket, and a kvmkit process serving Firecracker's
API, for the Firecracker-compatibility tests."""

import http.client
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

KVMKIT_RUN = [sys.executable, "-m", "kvmkit", "run"]


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float = 60.0):
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.unix_path)


class FcClient:
    """One keep-alive connection; `call` returns (status, JSON body or None)."""

    def __init__(self, path):
        self.path = str(path)
        self.conn = UnixHTTPConnection(self.path)

    def call(self, method, path, body=None, raw=None):
        payload = raw if raw is not None else None if body is None else json.dumps(body)
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        self.conn.request(method, path, body=payload, headers=headers)
        response = self.conn.getresponse()
        data = response.read()
        return response.status, (json.loads(data) if data else None)

    def ok(self, method, path, body=None):
        status, data = self.call(method, path, body)
        assert status in (200, 204), (method, path, status, data)
        return data

    def fault(self, method, path, body=None, raw=None, status=400):
        got, data = self.call(method, path, body, raw)
        assert got == status, (method, path, got, data)
        return data["fault_message"]

    def close(self):
        self.conn.close()


class FcKvmkit:
    """`kvmkit run --api-sock` (plus `args`) as a child process."""

    def __init__(
        self, tmp_path: Path, *args, name="fc", stdin=subprocess.DEVNULL, tap: str | None = None
    ):
        """`tap`: run in a throwaway network namespace holding a tap of that name (for
        the network interfaces a test PUTs), so tests never share or leave a tap."""
        self.sock = tmp_path / f"{name}.sock"
        self.console = tmp_path / f"{name}.console"
        self.err = tmp_path / f"{name}.err"
        self._err = open(self.err, "w")
        command = [*KVMKIT_RUN, "--api-sock", str(self.sock), "--console", str(self.console)]
        if tap is not None:
            script = f'ip tuntap add {tap} mode tap && ip link set {tap} up && exec "$@"'
            command = ["unshare", "--net", "sh", "-c", script, "sh", *command]
        self.proc = subprocess.Popen(
            [*command, *args],
            cwd=tmp_path,  # relative paths a test (or a generated request) names land here
            stdin=stdin,
            stdout=subprocess.DEVNULL,
            stderr=self._err,
            text=True,
        )
        deadline = time.monotonic() + 60
        while not self.sock.exists():
            assert self.proc.poll() is None, self.stderr
            assert time.monotonic() < deadline, "the API socket did not appear"
            time.sleep(0.02)
        self.client = FcClient(self.sock)

    @property
    def stderr(self):
        return self.err.read_text()

    def console_text(self):
        return self.console.read_text() if self.console.exists() else ""

    def wait_console(self, text, timeout=120):
        deadline = time.monotonic() + timeout
        while text not in self.console_text():
            assert self.proc.poll() is None, self.stderr
            assert time.monotonic() < deadline, f"{text!r} not on the console"
            time.sleep(0.05)

    def wait(self, timeout=60):
        try:
            return self.proc.wait(timeout)
        finally:
            self.client.close()
            self._err.close()

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.client.close()
        self._err.close()


def mode_of(path) -> int:
    return os.stat(path).st_mode & 0o777


class UffdHandler:
    """A page-fault handler as Firecracker's examples write one: it listens on a Unix
    socket, receives the regions (JSON) and the userfaultfd, and fills each faulting
    page from the memory file with UFFDIO_COPY."""

    def __init__(self, sock_path, mem_path):
        import threading

        self.sock_path, self.mem_path = str(sock_path), str(mem_path)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.sock_path)
        self.listener.listen(1)
        self.regions = None
        self.faults = 0
        self.error = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        import ctypes
        import mmap

        from kvmkit.memory.userfault import Userfaultfd

        try:
            self.listener.settimeout(120)
            conn, _ = self.listener.accept()
            msg, fds, _, _ = socket.recv_fds(conn, 1 << 16, 1)
            conn.close()
            self.regions = json.loads(msg)
            uffd = Userfaultfd.__new__(Userfaultfd)
            uffd.fd = fds[0]
            with open(self.mem_path, "rb") as f:
                mem = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE)
            src = ctypes.addressof(ctypes.c_char.from_buffer(mem))
            while not self.stop.is_set():
                for addr in uffd.wait_faults(0.2):
                    page = addr & ~0xFFF
                    r = next(
                        r
                        for r in self.regions
                        if r["base_host_virt_addr"] <= page < r["base_host_virt_addr"] + r["size"]
                    )
                    offset = r["offset"] + page - r["base_host_virt_addr"]
                    if not uffd.copy(page, src + offset, r["page_size"]):
                        uffd.wake(page, r["page_size"])
                    self.faults += 1
        except Exception as e:  # the VMM went away, or a bug: the test reads it
            if not self.stop.is_set():
                self.error = repr(e)

    def close(self):
        self.stop.set()
        self.thread.join(5)
        self.listener.close()
