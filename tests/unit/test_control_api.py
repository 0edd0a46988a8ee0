"""The control API's pure parts: `kvmkit ctl --help` describes every request, the
operation table refuses what it says, and request lines are bounded as they are read."""

import socket
import threading

import pytest

from kvmkit.api.server import MAX_REQUEST_BYTES, RequestTooLong, _LineReader
from kvmkit.cli import main
from kvmkit.machine.operations import (
    EXCLUSIVE,
    MIGRATION,
    PAUSE,
    SNAPSHOT,
    OperationCancelled,
    OperationRefused,
    Operations,
)


def test_ctl_help_describes_its_requests(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["ctl", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for request in ("status", "pause", "resume", "stop"):
        assert f"\n  {request} " in text, request
    for detail in ('"cmd": "snapshot", "path": FILE', '"cmd": "migrate", "to": ADDRESS'):
        assert detail in text
    assert "a migration of this machine" in text and "is in progress" in text


def test_one_operation_at_a_time():
    stopping = threading.Event()
    ops = Operations(stopping)
    with ops.begin(MIGRATION):
        assert ops.in_progress == [MIGRATION]
        for other in EXCLUSIVE:
            with pytest.raises(OperationRefused, match="a migration of this machine is in"):
                with ops.begin(other):
                    pass
    assert ops.in_progress == []
    with ops.begin(SNAPSHOT) as op:
        with pytest.raises(OperationRefused, match="a snapshot of this machine is in progress"):
            with ops.begin(PAUSE):
                pass
        op.check()  # running: nothing to say
        stopping.set()
        with pytest.raises(OperationCancelled, match="stopped during the snapshot"):
            op.check()
    assert ops.wait_idle(0)


def _reader(data: bytes) -> tuple[_LineReader, socket.socket]:
    a, b = socket.socketpair()

    def send() -> None:
        try:
            b.sendall(data)
        except BrokenPipeError:
            pass  # the reader stopped reading: what the bound is for
        b.close()

    threading.Thread(target=send, daemon=True).start()
    return _LineReader(a), a


def test_request_lines_are_bounded_while_read():
    reader, a = _reader(b'{"cmd": "status"}\n' + b"x" * (MAX_REQUEST_BYTES * 8))
    assert reader.next_line() == b'{"cmd": "status"}'
    with pytest.raises(RequestTooLong):
        reader.next_line()
    assert len(reader.buffer) <= MAX_REQUEST_BYTES + (1 << 16)  # never the whole line
    a.close()
    reader, a = _reader(b"a" * MAX_REQUEST_BYTES + b"\nb\n")
    assert reader.next_line() == b"a" * MAX_REQUEST_BYTES
    assert reader.next_line() == b"b"
    assert reader.next_line() is None
    a.close()
