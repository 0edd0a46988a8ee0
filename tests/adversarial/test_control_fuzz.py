"""The control API's requests, fuzzed against one running VM: every request (known
commands with arguments of every type and value, unknown ones, raw bytes) is answered
with one JSON object, an error is never a kvmkit "internal error", and the VM is
alive and intact after them all. A longer run:
KVMKIT_CONTROL_FUZZ_EXAMPLES=3000 pytest tests/adversarial/test_control_fuzz.py."""

import json
import os
import socket
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmkit.api.client import call
from tests.adversarial.control_helpers import Vm, settle
from tests.adversarial.test_control_load import runs_on_intact

EXAMPLES = int(os.environ.get("KVMKIT_CONTROL_FUZZ_EXAMPLES", "150"))  # more for a longer run

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(1 << 70), max_value=1 << 70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)


def requests(tmp: Path) -> st.SearchStrategy[bytes]:
    paths = st.one_of(
        st.sampled_from(
            [
                "",
                "/",
                "/dev/null",
                "/proc/self/status",
                str(tmp),
                str(tmp / "fuzz.snap"),
                str(tmp / "no" / "such" / "dir.snap"),
                str(tmp / "nul\x00.snap"),
                str(tmp / ("x" * 300)),
                str(tmp / "\udcff.snap"),
            ]
        ),
        values,
    )
    addresses = st.one_of(
        values,
        st.sampled_from(
            [
                "",
                "tcp:",
                "tcp:127.0.0.1:1",
                "tcp:127.0.0.1:99999",
                "tcp:[::1]:1",
                "unix:",
                f"unix:{tmp / 'nobody-listens.sock'}",
                "unix:\x00",
                "udp:1.2.3.4:5",
            ]
        ),
    )
    snapshot = st.fixed_dictionaries(
        {"cmd": st.just("snapshot")},
        optional={
            "path": paths,
            "resume": values,
            "compress": st.one_of(values, st.integers(-5, 30)),
            "force": values,
        },
    )
    migrate = st.fixed_dictionaries(
        {"cmd": st.just("migrate")},
        optional={
            "to": addresses,
            "max_downtime_ms": values,
            "bandwidth_bps": values,
            "max_iterations": values,
            "auto_converge": values,
        },
    )
    simple = st.fixed_dictionaries(
        {"cmd": st.sampled_from(["status", "pause", "resume", "STATUS", "", "reboot"])},
        optional={"x": values},
    )
    anything = st.one_of(values, st.dictionaries(st.text(max_size=6), values, max_size=4))
    as_json = st.one_of(snapshot, migrate, simple, anything).map(
        lambda v: json.dumps(v, ensure_ascii=False).encode(errors="surrogatepass")
    )
    raw = st.binary(max_size=200).map(lambda b: b.replace(b"\n", b" "))
    return st.one_of(as_json, raw)


@pytest.fixture(scope="module")
def vm(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    machine = Vm(tmp)
    yield machine, tmp
    machine.kill()


def test_every_request_gets_one_clear_answer(vm):
    machine, tmp = vm

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
    @given(requests(tmp))
    def fuzz(line: bytes) -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(machine.socket)
            s.sendall(line + b"\n")
            s.settimeout(60)
            with s.makefile("rb") as f:
                while "event" in (reply := json.loads(answer := f.readline())):
                    pass
        assert isinstance(reply, dict) and isinstance(reply.get("ok"), bool), answer
        if not reply["ok"]:
            error = reply["error"]
            assert isinstance(error, str) and error and "\n" not in error, answer
            assert "internal error" not in error, f"{line!r}: {error}"

    fuzz()
    settle(lambda: call(machine.socket, "status")["in_progress"] == [])
    runs_on_intact(machine)
    machine.stderr_has_no_traceback()


EDGES = [
    {"cmd": "snapshot", "path": "{tmp}/nul\x00.snap"},
    {"cmd": "snapshot", "path": "{tmp}/" + "x" * 300},
    {"cmd": "snapshot", "path": "{tmp}/" + "y/" * 2100 + "z"},
    {"cmd": "snapshot", "path": "/dev/null", "force": True},
    {"cmd": "snapshot", "path": "{tmp}/fifo", "force": True},
    {"cmd": "snapshot", "path": "{tmp}/dangling", "force": True},
    {"cmd": "snapshot", "path": "{tmp}", "force": True},
    {"cmd": "snapshot", "path": "{tmp}/a.snap", "compress": True},
    {"cmd": "migrate", "to": "unix:\x00"},
    {"cmd": "migrate", "to": "unix:{tmp}/" + "w" * 200},
    {"cmd": "migrate", "to": "tcp:127.0.0.1:99999"},
    {"cmd": "migrate", "to": "tcp:127.0.0.1:1", "max_iterations": True},
    {"cmd": "migrate", "to": "tcp:127.0.0.1:1", "max_downtime_ms": float("inf")},
    {"cmd": None},
    {},
]


def test_edge_requests_are_refused_in_one_clear_line(vm):
    machine, tmp = vm
    if not (tmp / "fifo").exists():
        os.mkfifo(tmp / "fifo")  # opening it for reading would block: never opened
        (tmp / "dangling").symlink_to(tmp / "nowhere" / "x")
    for edge in EDGES:
        request = json.loads(json.dumps(edge).replace("{tmp}", str(tmp)))
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(machine.socket)
            s.sendall(json.dumps(request).encode() + b"\n")
            s.settimeout(60)
            with s.makefile("rb") as f:
                while "event" in (reply := json.loads(f.readline())):
                    pass
        assert reply["ok"] is False, (edge, reply)
        assert "internal error" not in reply["error"] and "\n" not in reply["error"], reply
    assert call(machine.socket, "status")["state"] == "running"
