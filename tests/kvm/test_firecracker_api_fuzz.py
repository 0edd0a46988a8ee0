"""Requests generated from kvmkit's own OpenAPI document (GET /openapi.json), valid and
broken, against a running kvmkit: never a 5xx, never a traceback, and the guest keeps
running. Hypothesis draws bodies from each operation's JSON Schema, then sometimes
breaks them (an unknown field, a wrong type, a missing required field, not JSON)."""

import string
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmkit.api.openapi import document
from tests.kvm.fc_helpers import FcKvmkit

# Operations left out: they end the machine on purpose (SendCtrlAltDel is filtered
# from /actions below), hand it to another process, or wait for one.
SKIP = {("put", "/kvmkit/migrate"), ("put", "/kvmkit/migrate-receive")}
SMALL = {"vcpu_count": 2, "mem_size_mib": 256}  # keep generated guests small on a shared host
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)


def _from_schema(schema, name, tmp):
    if "enum" in schema:
        values = [v for v in schema["enum"] if v != "SendCtrlAltDel"]
        base = st.sampled_from(values)
    elif schema.get("type") == "integer":
        top = SMALL.get(name, schema.get("maximum"))
        base = st.integers(schema.get("minimum", -(1 << 70)), top if top is not None else 1 << 70)
    elif schema.get("type") == "boolean":
        base = st.booleans()
    elif schema.get("type") == "string":
        text = st.text(max_size=12)
        if name.endswith("_path") or name in ("path_on_host", "backend_path"):
            # files the server may create stay in the test's directory
            text = st.text(string.ascii_letters, min_size=1, max_size=8).map(lambda t: str(tmp / t))
        base = text
    elif schema.get("type") == "array":
        base = st.lists(_from_schema(schema.get("items", {}), name, tmp), max_size=3)
    elif schema.get("type") == "object" and "properties" in schema:
        base = _object(schema, tmp)
    else:
        base = st.dictionaries(st.text(max_size=6), JSON, max_size=4)
    if schema.get("nullable"):
        base = st.none() | base
    return base


def _object(schema, tmp):
    props = schema["properties"]
    required = set(schema.get("required", []))
    return st.fixed_dictionaries(
        {k: _from_schema(v, k, tmp) for k, v in props.items() if k in required},
        optional={k: _from_schema(v, k, tmp) for k, v in props.items() if k not in required},
    )


def _break(body):
    """Valid bodies, and bodies broken in the ways clients break them."""
    return st.one_of(
        st.just(body),
        st.builds(lambda k, v: {**body, k: v}, st.text(max_size=10), JSON),
        st.builds(lambda v: {k: v for k in body}, JSON),
        st.builds(
            lambda k: {x: y for x, y in body.items() if x != k},
            st.sampled_from(sorted(body) or [""]),
        ),
        st.sampled_from(["", "{", "[1,", "null", '"x"', "1e999", '{"a":' * 40]),
    )


def _requests(tmp):
    doc = document()
    ops = []
    for path, methods in doc["paths"].items():
        for method, op in methods.items():
            if (method, path) in SKIP:
                continue
            body = op.get("requestBody", {}).get("content", {}).get("application/json", {})
            ops.append((method.upper(), path, body.get("schema")))
    ids = st.sampled_from(["rootfs", "eth0", "x", "a%20b", "..%2F..", "%C3%A9"])

    def one(op):
        method, path, schema = op
        path_st = st.builds(lambda i: path.replace("{id}", i), ids)
        if schema is None:
            return st.tuples(st.just(method), path_st, st.just(None))
        bodies = _from_schema(schema, "", tmp).flatmap(_break)
        return st.tuples(st.just(method), path_st, bodies)

    return st.sampled_from(ops).flatmap(one)


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    vmm = FcKvmkit(tmp, tap="fuzz0")  # its own network namespace: no host tap is touched
    vmm.client.ok("PUT", "/kvmkit/boot-program", {"guest": "counter", "guest_arg": 0})
    yield vmm, tmp
    vmm.kill()


def test_generated_requests_never_crash_the_server_or_the_vm(fuzzed):
    vmm, tmp = fuzzed

    @settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
    @given(_requests(tmp))
    def one_request(req):
        method, path, body = req
        raw = body if isinstance(body, str) else None
        status, _ = vmm.client.call(method, path, None if raw is not None else body, raw)
        assert status < 500, (method, path, body, status)

    one_request()  # before boot (a generated InstanceStart may boot it)
    c = vmm.client
    if c.call("GET", "/")[1]["state"] == "Not started":
        c.ok(
            "PUT",
            "/machine-config",
            {
                "vcpu_count": 1,
                "mem_size_mib": 64,
                "huge_pages": "None",
                "kvmkit_memory_backend": "auto",
                "kvmkit_hide_guest_memory": "off",
            },
        )
        c.ok("PUT", "/kvmkit/boot-program", {"guest": "counter", "guest_arg": 0})
        c.ok("PUT", "/actions", {"action_type": "InstanceStart"})
    one_request()  # against the running machine
    c.ok("PATCH", "/vm", {"state": "Resumed"})
    assert c.ok("GET", "/")["state"] == "Running"
    _wait_for_more_console(vmm)  # the guest still runs
    c.ok("PUT", "/actions", {"action_type": "SendCtrlAltDel"})
    assert vmm.wait() == 0
    assert "Traceback" not in vmm.stderr, vmm.stderr


def _wait_for_more_console(vmm, timeout=60):
    start = len(vmm.console_text())
    deadline = time.monotonic() + timeout
    while len(vmm.console_text()) <= start + 100:
        assert vmm.proc.poll() is None, vmm.stderr
        assert time.monotonic() < deadline, "the guest stopped printing"
        time.sleep(0.05)
