"""Many clients at once against one running VM: every request is answered or refused
in one clear line, pauses from different clients never cancel each other or linger,
no snapshot is torn, and afterwards the VM runs on exactly as its model says (the
counter guest re-reads its memory every step and prints a checksum) with no more
threads or fds than before."""

import json
import selectors
import socket
import threading
from pathlib import Path

from kvmkit.api.client import ApiCallError, call
from kvmkit.control.snapshots import restore_snapshot
from kvmkit.guests.model import counter_lines
from kvmkit.snapshot.file import SnapshotFile, inspect
from tests.adversarial.control_helpers import Vm, settle

REFUSALS = (
    "of this machine is in progress",  # one operation at a time
    "the control API is busy",  # over the connection cap: retry
    "the pause was cancelled: a resume came before the vCPUs had stopped",
)


def refused_clearly(error: str) -> bool:
    return any(r in error for r in REFUSALS)


def assert_model_output(console: Path) -> int:
    """Every complete line the counter printed is its model's line; how many."""
    text = console.read_text()
    lines = text.splitlines()[: text.count("\n")]
    assert lines == counter_lines(0, len(lines)), "the guest's output left its model"
    return len(lines)


def runs_on_intact(vm: Vm) -> None:
    """Resume; the guest prints more, every line its model's."""
    call(vm.socket, "resume")
    assert call(vm.socket, "status")["state"] == "running"
    printed = assert_model_output(vm.console)
    settle(lambda: assert_model_output(vm.console) > printed + 100)


def test_pauses_and_resumes_from_two_clients_leave_no_stray_hold(tmp_path):
    vm = Vm(tmp_path)
    errors: list[str] = []

    def client(first: str) -> None:
        other = "resume" if first == "pause" else "pause"
        for i in range(150):
            try:
                call(vm.socket, first if i % 2 == 0 else other)
            except ApiCallError as e:
                errors.append(str(e))

    try:
        threads = [threading.Thread(target=client, args=(c,)) for c in ("pause", "resume")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert all(refused_clearly(e) for e in errors), errors[:5]
        # whatever the interleaving, one resume runs it and one pause holds it
        assert call(vm.socket, "resume")["paused_by"] == []
        assert call(vm.socket, "status")["state"] == "running"
        status = call(vm.socket, "pause")
        assert status["state"] == "paused" and status["paused_by"] == ["user"]
        runs_on_intact(vm)
    finally:
        vm.kill()
    vm.stderr_has_no_traceback()


def test_30_snapshots_with_a_second_client_resuming_none_torn(tmp_path):
    vm = Vm(tmp_path)
    done = threading.Event()
    resumes: list[str] = []

    def resumer() -> None:
        while not done.is_set():
            try:
                call(vm.socket, "resume")
                resumes.append("ok")
            except ApiCallError as e:
                resumes.append(str(e))

    outcomes: list[str] = []
    saved: list[Path] = []
    other = threading.Thread(target=resumer)
    other.start()
    try:
        for i in range(30):
            path = tmp_path / f"s{i}.snap"
            try:
                call(vm.socket, "snapshot", {"path": str(path)})  # leaves it paused
                outcomes.append("ok")
                saved.append(path)
            except ApiCallError as e:
                outcomes.append(str(e))
    finally:
        done.set()
        other.join()
    try:
        assert all(o == "ok" or refused_clearly(o) for o in outcomes), outcomes
        assert all(r == "ok" or refused_clearly(r) for r in resumes), resumes
        assert saved and len(resumes) > 30
        # Not torn: each file verifies, and the first and the last continue the guest
        # exactly (what it printed before the snapshot, then what the restored machine
        # prints, is its model's output).
        for path in saved:
            info = inspect(path)
            assert info["checksums"].endswith("verified"), info["checksums"]
        for path in {saved[0], saved[-1]}:
            assert_continues(path, vm.console.read_text(), tmp_path / f"{path.name}.txt")
        runs_on_intact(vm)
    finally:
        vm.kill()
    vm.stderr_has_no_traceback()


def assert_continues(path: Path, source_console: str, console: Path) -> None:
    """Restore `path`, let it print 200 lines, and check them against the model."""
    with SnapshotFile(path) as snap:
        sent = snap.saved.devices["serial0"].state["transmitted"]
    machine = restore_snapshot(path, console=str(console))
    with machine:
        runner = threading.Thread(target=machine.run)
        runner.start()
        try:
            settle(lambda: console.read_text().count("\n") > 200)
        finally:
            machine.stop(0, "test over")
            runner.join()
    text = source_console[:sent] + console.read_text()
    lines = text.splitlines()[: text.count("\n")]
    assert lines == counter_lines(0, len(lines)), f"{path.name} does not continue the guest"


def _ask_all(sock_path: str, requests: list[dict]) -> list[dict]:
    """Open one connection per request at once, send every request, then collect
    every answer (the last line each connection sends)."""
    conns: list[socket.socket] = []
    for _ in requests:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(sock_path)  # blocks only while the backlog (1024) is full
        conns.append(s)
    for s, request in zip(conns, requests, strict=True):
        try:
            s.sendall(json.dumps(request).encode() + b"\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused at once: its answer is still there to read
    sel = selectors.DefaultSelector()
    data = {s: b"" for s in conns}
    for s in conns:
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
    open_ = len(conns)
    while open_:
        for key, _ in sel.select(60):
            s = key.fileobj
            try:
                piece = s.recv(65536)
            except ConnectionResetError:
                piece = b""
            if piece:
                data[s] += piece
                if not data[s].endswith(b"\n") or b'"ok"' not in data[s].rsplit(b"\n", 2)[-2]:
                    continue
            sel.unregister(s)
            s.close()
            open_ -= 1
    replies = []
    for s in conns:
        lines = data[s].splitlines()
        replies.append(json.loads(lines[-1]) if lines else {"ok": False, "error": "(no answer)"})
    return replies


def test_1000_concurrent_clients_mixing_requests(tmp_path):
    vm = Vm(tmp_path)
    try:
        vm.warm_up(tmp_path)
        threads, fds = vm.threads(), vm.fds()
        snap = str(tmp_path / "load.snap")
        mix = [
            {"cmd": "status"},
            {"cmd": "pause"},
            {"cmd": "resume"},
            {"cmd": "snapshot", "path": snap, "resume": True, "force": True},
        ]
        replies = _ask_all(vm.socket, [mix[i % 4] for i in range(1000)])
        unclear = [r for r in replies if not r["ok"] and not refused_clearly(r["error"])]
        assert unclear == [], unclear[:5]
        answered = sum(r["ok"] for r in replies)
        busy = sum("busy" in r.get("error", "") for r in replies)
        print(f"1000 clients: {answered} answered, {busy} told busy, the rest refused")
        assert answered >= 100
        assert inspect(snap)["checksums"].endswith("verified")
        settle(lambda: vm.threads() <= threads and vm.fds() <= fds)
        print(f"threads {threads} -> {vm.threads()}, fds {fds} -> {vm.fds()}")
        runs_on_intact(vm)
        call(vm.socket, "stop")
        assert vm.wait() == 0
    finally:
        vm.kill()
    vm.stderr_has_no_traceback()
