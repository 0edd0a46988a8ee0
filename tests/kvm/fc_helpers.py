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

    def __init__(self, tmp_path: Path, *args, name="fc", stdin=subprocess.DEVNULL):
        self.sock = tmp_path / f"{name}.sock"
        self.console = tmp_path / f"{name}.console"
        self.err = tmp_path / f"{name}.err"
        self._err = open(self.err, "w")
        self.proc = subprocess.Popen(
            [*KVMKIT_RUN, "--api-sock", str(self.sock), "--console", str(self.console), *args],
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
