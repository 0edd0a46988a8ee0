"""Firecracker's API as kvmkit serves it: a plain HTTP client over the Unix socket,
real kvmkit processes, real guests (kvmkit's guest programs through the
/kvmkit/boot-program extension, and one Linux boot of the test kernel)."""

import http.client
import json
import os
import re
import socket
import subprocess
import time

import pytest

from tests.kvm.fc_helpers import KVMKIT_RUN, FcClient, FcKvmkit, UffdHandler, mode_of


@pytest.fixture
def fc(tmp_path):
    vmm = FcKvmkit(tmp_path)
    yield vmm
    vmm.kill()


def _go_sdk_preboot(client, tmp_path, boot, vcpus=2, mem_mib=64):
    """Firecracker's Go SDK order, up to InstanceStart."""
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"\0" * (1 << 20))
    client.ok("PUT", "/logger", {"log_path": str(tmp_path / "fc.log"), "level": "Debug"})
    client.ok("PUT", "/metrics", {"metrics_path": str(tmp_path / "fc.metrics")})
    client.ok(
        "PUT", "/machine-config", {"vcpu_count": vcpus, "mem_size_mib": mem_mib, "smt": False}
    )
    boot(client)
    client.ok(
        "PUT",
        "/drives/rootfs",
        {
            "drive_id": "rootfs",
            "path_on_host": str(disk),
            "is_root_device": True,
            "is_read_only": False,
        },
    )
    client.ok(
        "PUT",
        "/network-interfaces/eth0",
        {"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00:ac:10:00:02"},
    )
    client.ok("PUT", "/vsock", {"guest_cid": 3, "uds_path": str(tmp_path / "v.sock")})


def _counter(client):
    client.ok("PUT", "/kvmkit/boot-program", {"guest": "counter", "guest_arg": 0})


def _steps(text, cpu):
    return [int(n) for n in re.findall(rf"^cpu{cpu} n=(\d+) ", text, re.M)]


def test_go_sdk_order_boots_and_a_second_kvmkit_restores_the_snapshot(tmp_path):
    first = FcKvmkit(tmp_path, "--id", "vm-1", name="first", tap="tap0")
    second = None
    try:
        c = first.client
        assert mode_of(first.sock) == 0o600
        assert c.ok("GET", "/") == {
            "id": "vm-1",
            "state": "Not started",
            "vmm_version": c.ok("GET", "/version")["kvmkit_version"],
            "app_name": "kvmkit",
        }
        _go_sdk_preboot(c, tmp_path, _counter)
        config = c.ok("GET", "/vm/config")
        assert config["machine-config"]["vcpu_count"] == 2
        assert [d["drive_id"] for d in config["drives"]] == ["rootfs"]
        assert config["network-interfaces"][0]["host_dev_name"] == "tap0"
        assert config["vsock"]["guest_cid"] == 3
        c.ok("PUT", "/actions", {"action_type": "InstanceStart"})
        assert c.ok("GET", "/")["state"] == "Running"
        disk = {"drive_id": "rootfs", "path_on_host": str(tmp_path / "disk.img")}
        c.ok("PATCH", "/drives/rootfs", disk)  # the same file, the same size: nothing to do
        other = {**disk, "path_on_host": str(tmp_path / "other.img")}
        assert "cannot swap its backing file" in c.fault("PATCH", "/drives/rootfs", other)
        with open(tmp_path / "disk.img", "ab") as f:
            f.truncate(2 << 20)
        assert "cannot tell a running guest of a new size" in c.fault(
            "PATCH", "/drives/rootfs", disk
        )
        os.truncate(tmp_path / "disk.img", 1 << 20)  # as it was, for the restore below
        first.wait_console("cpu0 n=3 ")
        c.ok("PATCH", "/vm", {"state": "Paused"})
        assert c.ok("GET", "/")["state"] == "Paused"
        state, mem = tmp_path / "vm.state", tmp_path / "vm.mem"
        c.ok("PUT", "/snapshot/create", {"snapshot_path": str(state), "mem_file_path": str(mem)})
        assert mem.stat().st_size == 64 << 20
        at_snapshot = max(_steps(first.console_text(), 0))
        c.ok("PUT", "/actions", {"action_type": "FlushMetrics"})
        metrics = json.loads((tmp_path / "fc.metrics").read_text().splitlines()[-1])
        assert metrics["vmm"]["state"] == "Paused"
        c.ok("PUT", "/actions", {"action_type": "SendCtrlAltDel"})
        assert first.wait() == 0
        assert "guest rebooted (Ctrl-Alt-Del" in first.stderr
        assert "PUT /actions: done" in (tmp_path / "fc.log").read_text()

        second = FcKvmkit(tmp_path, name="second", tap="tap0")
        c2 = second.client
        # the Go SDK's restore order: logger, metrics, vsock (a new socket), then the load
        c2.ok("PUT", "/logger", {"log_path": str(tmp_path / "fc2.log"), "level": "Info"})
        c2.ok("PUT", "/metrics", {"metrics_path": str(tmp_path / "fc2.metrics")})
        c2.ok("PUT", "/vsock", {"guest_cid": 3, "uds_path": str(tmp_path / "v2.sock")})
        c2.ok(
            "PUT",
            "/snapshot/load",
            {
                "snapshot_path": str(state),
                "mem_backend": {"backend_type": "File", "backend_path": str(mem)},
                "resume_vm": False,
            },
        )
        assert c2.ok("GET", "/")["state"] == "Paused"
        assert (tmp_path / "v2.sock").exists()  # the restored vsock listens where asked
        assert c2.ok("GET", "/machine-config")["vcpu_count"] == 2
        restored = c2.ok("GET", "/vm/config")  # what the snapshot brought
        assert restored["kvmkit-boot-program"] == {"guest": "counter", "guest_arg": 0}
        assert restored["drives"][0]["drive_id"] == "rootfs"
        assert restored["drives"][0]["is_root_device"] is True
        assert restored["network-interfaces"][0]["host_dev_name"] == "tap0"
        assert restored["vsock"]["uds_path"] == str(tmp_path / "v2.sock")
        c2.ok("PATCH", "/vm", {"state": "Resumed"})
        second.wait_console(f"cpu0 n={at_snapshot + 3} ")
        # it carries on where it was saved (the paused console may have ended mid-line)
        steps = _steps(first.console_text() + second.console_text(), 0)
        assert steps == list(range(1, len(steps) + 1)) and steps[-1] > at_snapshot + 2
        c2.ok("PUT", "/actions", {"action_type": "SendCtrlAltDel"})
        assert second.wait() == 0
        assert "restored     from" in second.stderr
    finally:
        first.kill()
        if second is not None:
            second.kill()


def test_every_error_is_400_with_a_fault_message_and_the_vm_survives(fc, tmp_path):
    c = fc.client
    c.ok("PUT", "/logger", {"log_path": str(tmp_path / "errors.log"), "level": "Info"})
    # before boot: post-boot operations, bad bodies, a missing kernel
    assert "not started" in c.fault("PATCH", "/vm", {"state": "Paused"})
    assert "InstanceStart" in c.fault(
        "PUT",
        "/snapshot/create",
        {"snapshot_path": str(tmp_path / "s"), "mem_file_path": str(tmp_path / "m")},
    )
    assert "no boot source" in c.fault("PUT", "/actions", {"action_type": "InstanceStart"})
    msg = c.fault("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 64, "vcpus": 2})
    assert "unknown field 'vcpus'" in msg
    msg = c.fault("PUT", "/machine-config", {"vcpu_count": "2", "mem_size_mib": 64})
    assert "'vcpu_count' must be an integer, not a string" in msg
    assert "missing required field 'mem_size_mib'" in c.fault(
        "PUT", "/machine-config", {"vcpu_count": 1}
    )
    assert "smt true is not supported" in c.fault(
        "PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 64, "smt": True}
    )
    assert "track_dirty_pages true is not supported" in c.fault(
        "PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 64, "track_dirty_pages": True}
    )
    assert "cpu_template 'T2' is not supported" in c.fault(
        "PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 64, "cpu_template": "T2"}
    )
    missing = tmp_path / "no-such-vmlinux"
    assert f"kernel {missing} does not exist" in c.fault(
        "PUT", "/boot-source", {"kernel_image_path": str(missing)}
    )
    assert "differs from the path's" in c.fault(
        "PUT", "/drives/a", {"drive_id": "b", "is_root_device": False, "path_on_host": "/x"}
    )
    assert "rate limiter" in c.fault(
        "PUT", "/entropy", {"rate_limiter": {"bandwidth": {"size": 1, "refill_time": 1}}}
    )
    assert "no MMDS network stack" in c.fault(
        "PUT", "/mmds/config", {"network_interfaces": ["eth0"]}
    )
    assert "not valid JSON" in c.fault("PUT", "/machine-config", raw="{nope")
    assert "nested deeper" in c.fault("PUT", "/mmds", raw="[" * 100 + "]" * 100)
    big = socket.socket(socket.AF_UNIX)  # refused from its headers, before the body
    big.connect(str(fc.sock))
    big.sendall(b"PUT /mmds HTTP/1.1\r\nContent-Length: 60000\r\n\r\n")
    answer = big.recv(4096)
    big.close()
    assert answer.startswith(b"HTTP/1.1 413") and b"at most 51200" in answer
    assert "no such path" in c.fault("GET", "/nope", status=404)
    raw = socket.socket(socket.AF_UNIX)  # a path with a CR in it: answered, logged on one line
    raw.connect(str(fc.sock))
    raw.sendall(b"PUT /drives/a\rb HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}")
    assert raw.recv(4096).startswith(b"HTTP/1.1 400")
    raw.close()
    log = (tmp_path / "errors.log").read_text().splitlines()
    assert log and all(line.startswith("20") for line in log), log
    assert "it takes PATCH" in c.fault("DELETE", "/vm", status=405)
    # the MMDS store
    c.ok("PUT", "/mmds", {"latest": {"meta-data": {"id": "i-1", "zone": "a"}}})
    c.ok("PATCH", "/mmds", {"latest": {"meta-data": {"zone": None, "ami": "x"}}})
    assert c.ok("GET", "/mmds") == {"latest": {"meta-data": {"id": "i-1", "ami": "x"}}}

    c.ok("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 32})
    _counter(c)
    c.ok("PUT", "/actions", {"action_type": "InstanceStart"})
    # after boot: pre-boot operations, a second start, a snapshot while running
    assert "already running; it starts once" in c.fault(
        "PUT", "/actions", {"action_type": "InstanceStart"}
    )
    for path, body in [
        ("/machine-config", {"vcpu_count": 1, "mem_size_mib": 32}),
        ("/boot-source", {"kernel_image_path": "/vmlinux"}),
        ("/vsock", {"guest_cid": 3, "uds_path": str(tmp_path / "v")}),
        ("/kvmkit/boot-program", {"guest": "hello"}),
        ("/logger", {"level": "Debug"}),
        ("/metrics", {"metrics_path": str(tmp_path / "late.metrics")}),
    ]:
        assert "only allowed before InstanceStart" in c.fault("PUT", path, body)
    assert "needs the microVM paused" in c.fault(
        "PUT",
        "/snapshot/create",
        {"snapshot_path": str(tmp_path / "s"), "mem_file_path": str(tmp_path / "m")},
    )
    assert "only allowed before the microVM starts" in c.fault(
        "PUT",
        "/snapshot/load",
        {"snapshot_path": str(tmp_path / "s"), "mem_file_path": str(tmp_path / "m")},
    )
    assert "FlushMetrics: configure metrics first" in c.fault(
        "PUT", "/actions", {"action_type": "FlushMetrics"}
    )
    c.ok("PATCH", "/vm", {"state": "Paused"})
    assert "Diff is not supported" in c.fault(
        "PUT",
        "/snapshot/create",
        {
            "snapshot_path": str(tmp_path / "s"),
            "mem_file_path": str(tmp_path / "m"),
            "snapshot_type": "Diff",
        },
    )
    ro = tmp_path / "ro"  # a read-only file system, where the host lets us mount one
    ro.mkdir()
    if subprocess.run(["mount", "--bind", str(ro), str(ro)], capture_output=True).returncode == 0:
        try:
            subprocess.run(["mount", "-o", "remount,bind,ro", str(ro)], check=True)
            msg = c.fault(
                "PUT",
                "/snapshot/create",
                {"snapshot_path": str(ro / "s"), "mem_file_path": str(ro / "m")},
            )
            assert f"Read-only file system ({ro / 'm'})" in msg, msg
            assert f"{ro} is on a read-only file system: write elsewhere or remount it" in msg
        finally:
            subprocess.run(["umount", str(ro)], check=False)
    c.ok("PATCH", "/vm", {"state": "Resumed"})
    assert c.ok("GET", "/")["state"] == "Running"
    c.ok("PUT", "/actions", {"action_type": "SendCtrlAltDel"})
    assert fc.wait() == 0
    assert "Traceback" not in fc.stderr


def test_snapshot_load_is_refused_after_configuration_and_for_a_wrong_file(fc, tmp_path):
    c = fc.client
    (tmp_path / "junk").write_bytes(b"not a snapshot")
    msg = c.fault(
        "PUT",
        "/snapshot/load",
        {"snapshot_path": str(tmp_path / "junk"), "mem_file_path": str(tmp_path / "junk")},
    )
    assert "not a kvmkit snapshot" in msg
    c.ok("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 32})
    assert "after configuring boot-specific resources" in c.fault(
        "PUT",
        "/snapshot/load",
        {"snapshot_path": str(tmp_path / "junk"), "mem_file_path": str(tmp_path / "junk")},
    )
    assert c.ok("GET", "/")["state"] == "Not started"


def test_a_stalled_or_hung_up_client_never_stalls_another(fc):
    stalled = socket.socket(socket.AF_UNIX)
    stalled.connect(str(fc.sock))
    stalled.sendall(b"PUT /machine-config HTTP/1.1\r\nContent-Length: 100\r\n\r\n{")  # and waits
    gone = socket.socket(socket.AF_UNIX)
    gone.connect(str(fc.sock))
    gone.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")  # hangs up mid-headers
    gone.close()
    garbage = socket.socket(socket.AF_UNIX)
    garbage.connect(str(fc.sock))
    garbage.sendall(b"\x00\xff" * 5000 + b"\r\n")
    assert garbage.recv(4096).startswith(b"HTTP/1.1 400")
    garbage.close()
    assert fc.client.ok("GET", "/")["state"] == "Not started"
    assert fc.client.ok("GET", "/")["state"] == "Not started"  # kept alive
    stalled.close()
    _counter(fc.client)
    fc.client.ok("PUT", "/actions", {"action_type": "InstanceStart"})
    fc.client.ok("PUT", "/actions", {"action_type": "SendCtrlAltDel"})
    assert fc.wait() == 0
    assert "Traceback" not in fc.stderr


def test_the_openapi_document_matches_the_route_table(fc):
    from kvmkit.api.firecracker import ROUTES

    doc = fc.client.ok("GET", "/openapi.json")
    served = {(m.upper(), path) for path, ops in doc["paths"].items() for m in ops}
    assert served == {(r.method, r.path) for r in ROUTES}
    for firecracker_path in [
        "/",
        "/actions",
        "/machine-config",
        "/boot-source",
        "/drives/{drive_id}",
        "/network-interfaces/{iface_id}",
        "/vsock",
        "/entropy",
        "/balloon",
        "/logger",
        "/metrics",
        "/mmds",
        "/mmds/config",
        "/vm",
        "/vm/config",
        "/snapshot/create",
        "/snapshot/load",
        "/version",
    ]:
        assert firecracker_path in doc["paths"]
    machine = doc["paths"]["/machine-config"]["put"]["requestBody"]["content"]
    schema = machine["application/json"]["schema"]
    assert schema["required"] == ["vcpu_count", "mem_size_mib"]
    assert schema["additionalProperties"] is False
    assert "kvmkit extension" in schema["properties"]["kvmkit_memory_backend"]["description"]
    assert doc["paths"]["/kvmkit/boot-program"]["put"]["x-kvmkit-extension"] is True
    # what GETs answer has the shape the document gives
    for route in ROUTES:
        if route.returns is not None and route.path in ("/", "/version", "/machine-config"):
            route.returns.check(fc.client.ok("GET", route.path))
    # every path the document names answers something other than 404 / 5xx
    for path, ops in doc["paths"].items():
        for method in ops:
            status, _ = fc.client.call(method.upper(), re.sub(r"\{\w+\}", "x", path), raw="{}")
            assert status in (200, 204, 400), (method, path, status)


def test_config_file_boots_without_the_api_and_errors_name_the_key(tmp_path):
    config = {
        "machine-config": {"vcpu_count": 2, "mem_size_mib": 32},
        "kvmkit-boot-program": {"guest": "memtest"},
        "drives": [],
        "logger": {"log_path": str(tmp_path / "log"), "level": "Info"},
    }
    path = tmp_path / "vm.json"
    path.write_text(json.dumps(config))
    run = subprocess.run(
        [*KVMKIT_RUN, "--config-file", str(path), "--no-api"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert "vCPUs        2" in run.stderr
    # Firecracker's own flags, as an orchestrator starting `firecracker` passes them
    del config["logger"]
    path.write_text(json.dumps(config))
    flags = ["--id", "vm-2", "--log-path", str(tmp_path / "flag.log"), "--level", "debug"]
    flags += ["--metrics-path", str(tmp_path / "flag.metrics"), "--no-seccomp"]
    run = subprocess.run(
        [*KVMKIT_RUN, "--config-file", str(path), "--no-api", *flags],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert "[vm-2:kvmkit-api] InstanceStart" in (tmp_path / "flag.log").read_text()
    assert json.loads((tmp_path / "flag.metrics").read_text().splitlines()[-1])["vmm"]
    for bad, message in [
        ({**config, "machine_config": {}}, "unknown key 'machine_config'"),
        ({"machine-config": {"vcpu_count": 1, "mem_size_mib": 32}}, "no 'boot-source'"),
        (
            {**config, "machine-config": {"vcpu_count": 0, "mem_size_mib": 32}},
            "key 'machine-config': machine-config: field 'vcpu_count' is 0: the least is 1",
        ),
        (
            {**config, "boot-source": {"kernel_image_path": str(tmp_path / "nope")}},
            "key 'boot-source': kernel",
        ),
        ({**config, "drives": {"drive_id": "x"}}, "key 'drives' must be an array"),
    ]:
        path.write_text(json.dumps(bad))
        run = subprocess.run(
            [*KVMKIT_RUN, "--config-file", str(path), "--no-api"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert run.returncode == 2, run.stderr
        assert message in run.stderr and len(run.stderr.strip().splitlines()) == 1, run.stderr
    for args, message in [
        (["--no-api"], "--no-api needs --config-file"),
        (["--id", "vm1"], "go with a machine configured through --api-sock"),
        (["--config-file", str(path), "--seccomp-filter", "f.bpf"], "no seccomp filters"),
        (["--api-sock", str(tmp_path / "s"), "--net", "tap=tap0"], "do not go with --api-sock"),
        (["--api-sock", str(tmp_path / "s"), "--id", "no spaces"], "use 1 to 64 letters"),
        (["--api-sock", str(tmp_path / "s"), "--guest", "hello"], "--guest does not go with"),
        (["--config-file", str(tmp_path / "missing.json")], "does not exist"),
        (["--api-sock", str(tmp_path / ("x" * 120))], "path too long"),
        (["--api-sock", str(tmp_path / "no" / "s")], "directory"),
    ]:
        run = subprocess.run([*KVMKIT_RUN, *args], capture_output=True, text=True, timeout=60)
        assert run.returncode == 2 and message in run.stderr, run.stderr


def test_linux_boots_in_the_go_sdk_order_and_restores_in_a_second_kvmkit(test_kernel, tmp_path):
    first = FcKvmkit(tmp_path, name="linux", tap="tap0")
    second = None
    try:
        c = first.client

        def boot(client):
            client.ok(
                "PUT",
                "/boot-source",
                {
                    "kernel_image_path": str(test_kernel.vmlinux),
                    "initrd_path": str(test_kernel.initramfs),
                    "boot_args": test_kernel.cmdline,
                },
            )

        _go_sdk_preboot(c, tmp_path, boot, vcpus=1, mem_mib=128)
        c.ok("PUT", "/entropy", {})
        c.ok(
            "PUT",
            "/balloon",
            {"amount_mib": 0, "deflate_on_oom": True, "stats_polling_interval_s": 1},
        )
        c.ok("PUT", "/actions", {"action_type": "InstanceStart"})
        first.wait_console("kvmkit-init: ready", timeout=180)
        c.ok("PATCH", "/balloon", {"amount_mib": 16})  # the guest gives 16 MiB back
        deadline = time.monotonic() + 120
        while True:
            stats = c.ok("GET", "/balloon/statistics")
            if stats["actual_mib"] == 16 and "free_memory" in stats:
                break
            assert time.monotonic() < deadline, stats
            time.sleep(0.2)
        assert stats["target_pages"] == 16 * 256 and stats["total_memory"] > 64 << 20
        from kvmkit.api.fc_bodies import BALLOON_STATS

        BALLOON_STATS.check(stats)  # the shape the OpenAPI document gives
        c.ok("PATCH", "/vm", {"state": "Paused"})
        state, mem = tmp_path / "linux.state", tmp_path / "linux.mem"
        c.ok("PUT", "/snapshot/create", {"snapshot_path": str(state), "mem_file_path": str(mem)})
        c.ok("PUT", "/actions", {"action_type": "SendCtrlAltDel"})
        assert first.wait() == 0

        second = FcKvmkit(tmp_path, name="restored", stdin=subprocess.PIPE, tap="tap0")
        second.client.ok(
            "PUT",
            "/snapshot/load",
            {"snapshot_path": str(state), "mem_file_path": str(mem), "resume_vm": True},
        )
        # the restored balloon answers as if it had been PUT here
        balloon = second.client.ok("GET", "/balloon")
        assert balloon["amount_mib"] == 16 and balloon["stats_polling_interval_s"] == 1
        second.client.ok("PATCH", "/balloon", {"amount_mib": 0})
        second.proc.stdin.write("echo carried-on\n")
        second.proc.stdin.flush()
        second.wait_console("carried-on\nkvmkit-init: done rc=0", timeout=120)
        # the root drive PUT over the API is the guest's /dev/vda, root=/dev/vda added
        second.proc.stdin.write("cat /sys/block/vda/serial\ncmdline\nblk-size /dev/vda\n")
        second.proc.stdin.flush()
        second.wait_console("rootfs\nkvmkit-init: done rc=0", timeout=120)
        second.wait_console("root=/dev/vda", timeout=60)
        second.wait_console(str(1 << 20), timeout=60)
        second.proc.stdin.write("poweroff\n")
        second.proc.stdin.flush()
        assert second.wait(120) == 0
        assert "guest powered off" in second.stderr
    finally:
        first.kill()
        if second is not None:
            second.kill()


def _counter_snapshot(tmp_path):
    """A counter guest booted over the API, paused and snapshotted; its console."""
    vmm = FcKvmkit(tmp_path, name="source")
    try:
        c = vmm.client
        c.ok("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 32})
        _counter(c)
        c.ok("PUT", "/actions", {"action_type": "InstanceStart"})
        vmm.wait_console("cpu0 n=3 ")
        c.ok("PATCH", "/vm", {"state": "Paused"})
        state, mem = tmp_path / "vm.state", tmp_path / "vm.mem"
        c.ok("PUT", "/snapshot/create", {"snapshot_path": str(state), "mem_file_path": str(mem)})
        c.ok("PUT", "/actions", {"action_type": "SendCtrlAltDel"})
        assert vmm.wait() == 0
        return state, mem, vmm.console_text()
    finally:
        vmm.kill()


def test_uffd_backend_hands_memory_to_a_page_fault_handler(tmp_path):
    state, mem, before = _counter_snapshot(tmp_path)
    handler = UffdHandler(tmp_path / "pf-handler.sock", mem)
    vmm = FcKvmkit(tmp_path, name="uffd")
    try:
        c = vmm.client
        body = {
            "snapshot_path": str(state),
            "mem_backend": {
                "backend_type": "Uffd",
                "backend_path": str(tmp_path / "pf-handler.sock"),
            },
            "resume_vm": True,
        }
        c.ok("PUT", "/snapshot/load", body)
        at = max(_steps(before, 0))
        vmm.wait_console(f"cpu0 n={at + 3} ")
        steps = _steps(before + vmm.console_text(), 0)
        assert steps == list(range(1, len(steps) + 1))
        assert handler.error is None and handler.faults > 0
        region = handler.regions[0]
        assert set(region) == {
            "base_host_virt_addr",
            "size",
            "offset",
            "page_size",
            "page_size_kib",
        }
        assert sum(r["size"] for r in handler.regions) == 32 << 20
        c.ok("PATCH", "/vm", {"state": "Paused"})
        msg = c.fault(
            "PUT",
            "/snapshot/create",
            {
                "snapshot_path": str(tmp_path / "again.state"),
                "mem_file_path": str(tmp_path / "again.mem"),
            },
        )
        assert "served on demand by the page-fault handler" in msg
        c.ok("PUT", "/actions", {"action_type": "SendCtrlAltDel"})
        assert vmm.wait() == 0
    finally:
        vmm.kill()
        handler.close()


def test_uffd_backend_without_a_handler_is_a_clear_400(tmp_path):
    state, mem, _ = _counter_snapshot(tmp_path)
    vmm = FcKvmkit(tmp_path, name="nohandler")
    try:
        msg = vmm.client.fault(
            "PUT",
            "/snapshot/load",
            {
                "snapshot_path": str(state),
                "mem_backend": {
                    "backend_type": "Uffd",
                    "backend_path": str(tmp_path / "none.sock"),
                },
            },
        )
        assert "cannot reach the page-fault handler" in msg
        assert vmm.client.ok("GET", "/")["state"] == "Not started"
    finally:
        vmm.kill()


def test_kvmkit_migrate_extensions_move_the_guest_between_two_api_kvmkits(tmp_path):
    target = FcKvmkit(tmp_path, name="target")
    source = FcKvmkit(tmp_path, name="source")
    address = f"unix:{tmp_path / 'in.sock'}"
    try:
        t = target.client
        t.ok("PUT", "/kvmkit/migrate-receive", {"listen": address})
        assert t.ok("GET", "/kvmkit/migration")["state"] == "waiting"
        assert "receiving a migration" in t.fault(
            "PUT", "/actions", {"action_type": "InstanceStart"}
        )
        c = source.client
        c.ok("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 32})
        _counter(c)
        c.ok("PUT", "/actions", {"action_type": "InstanceStart"})
        source.wait_console("cpu0 n=3 ")
        report = c.ok("PUT", "/kvmkit/migrate", {"to": address})
        assert report["target"].startswith("unix:") and report["iterations"] >= 1, report
        assert source.wait() == 0
        target.wait_console(f"cpu0 n={max(_steps(source.console_text(), 0)) + 3} ")
        steps = _steps(source.console_text() + target.console_text(), 0)
        assert steps == list(range(1, len(steps) + 1))
        received = t.ok("GET", "/kvmkit/migration")
        assert received["state"] == "received" and received["report"]["pages"] > 0, received
        assert t.ok("GET", "/")["state"] == "Running"
        t.ok("PUT", "/actions", {"action_type": "SendCtrlAltDel"})
        assert target.wait() == 0
        assert "migrated from" in target.stderr
    finally:
        source.kill()
        target.kill()


def test_get_vm_config_is_a_config_file_that_boots_the_same_machine(fc, tmp_path):
    c = fc.client
    c.ok("PUT", "/machine-config", {"vcpu_count": 2, "mem_size_mib": 48})
    c.ok("PUT", "/kvmkit/boot-program", {"guest": "memtest"})
    c.ok("PUT", "/entropy", {})
    c.ok("PUT", "/logger", {"log_path": str(tmp_path / "round.log"), "level": "info"})
    config = c.ok("GET", "/vm/config")
    assert config["logger"]["level"] == "Info"  # matched as Firecracker does, any case
    path = tmp_path / "round.json"
    path.write_text(json.dumps(config))
    run = subprocess.run(
        [*KVMKIT_RUN, "--config-file", str(path), "--no-api"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert "48 MiB" in run.stderr and "vCPUs        2" in run.stderr


def test_kvmkit_machine_config_extensions(fc):
    c = fc.client
    c.ok(
        "PUT",
        "/machine-config",
        {"vcpu_count": 1, "mem_size_mib": 32, "kvmkit_memory_backend": "memfd"},
    )
    assert c.ok("GET", "/machine-config")["kvmkit_memory_backend"] == "memfd"
    c.ok("PATCH", "/machine-config", {"huge_pages": "Transparent"})
    assert c.ok("GET", "/machine-config")["kvmkit_memory_backend"] == "thp"
    msg = c.fault(
        "PATCH", "/machine-config", {"huge_pages": "2M", "kvmkit_memory_backend": "memfd"}
    )
    assert "huge_pages 2M means kvmkit_memory_backend hugetlb, not memfd" in msg
    msg = c.fault("PATCH", "/machine-config", {"kvmkit_hide_guest_memory": "unmap"})
    assert "needs the guest_memfd backend" in msg
    c.ok("PATCH", "/machine-config", {"huge_pages": "None", "kvmkit_memory_backend": "guest_memfd"})
    c.ok("PATCH", "/machine-config", {"kvmkit_hide_guest_memory": "unmap"})
    facts = c.ok("GET", "/kvmkit/check")
    assert facts  # the host check's facts, as `kvmkit check` has them
    _counter(c)
    status, body = c.call("PUT", "/actions", {"action_type": "InstanceStart"})
    if status == 400:  # a host whose KVM needs the host mapping (PVM) refuses, and says why
        assert "without a host mapping" in body["fault_message"]
        assert c.ok("GET", "/")["state"] == "Not started"
    else:
        assert status == 204 and c.ok("GET", "/")["state"] == "Running"
        c.ok("PUT", "/actions", {"action_type": "SendCtrlAltDel"})
        assert fc.wait() == 0


def test_sigterm_while_waiting_for_instance_start_ends_cleanly(fc):
    import signal

    assert fc.client.ok("GET", "/")["state"] == "Not started"
    fc.proc.send_signal(signal.SIGTERM)
    assert fc.wait() == 143
    assert "terminated (SIGTERM)" in fc.stderr and "Traceback" not in fc.stderr
    assert not fc.sock.exists()


def test_snapshot_load_network_overrides_attach_another_tap(tmp_path):
    first = FcKvmkit(tmp_path, name="withnet", tap="tap0")
    try:
        c = first.client
        c.ok("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 32})
        _counter(c)
        c.ok("PUT", "/network-interfaces/eth0", {"iface_id": "eth0", "host_dev_name": "tap0"})
        c.ok("PUT", "/actions", {"action_type": "InstanceStart"})
        first.wait_console("cpu0 n=2 ")
        c.ok("PATCH", "/vm", {"state": "Paused"})
        state, mem = tmp_path / "net.state", tmp_path / "net.mem"
        c.ok("PUT", "/snapshot/create", {"snapshot_path": str(state), "mem_file_path": str(mem)})
        c.ok("PUT", "/actions", {"action_type": "SendCtrlAltDel"})
        assert first.wait() == 0
        at = max(_steps(first.console_text(), 0))
    finally:
        first.kill()
    second = FcKvmkit(tmp_path, name="othertap", tap="tap7")
    try:
        c = second.client
        load = {"snapshot_path": str(state), "mem_file_path": str(mem), "resume_vm": True}
        assert "tap0" in c.fault("PUT", "/snapshot/load", load)  # not in this namespace
        assert c.ok("GET", "/")["state"] == "Not started"
        overrides = [{"iface_id": "eth0", "host_dev_name": "tap7"}]
        c.ok("PUT", "/snapshot/load", {**load, "network_overrides": overrides})
        second.wait_console(f"cpu0 n={at + 3} ")
        c.ok("PUT", "/actions", {"action_type": "SendCtrlAltDel"})
        assert second.wait() == 0
    finally:
        second.kill()


def test_idle_connections_at_the_client_limit_make_room_for_a_new_client(fc):
    from kvmkit.api.http import MAX_CLIENTS

    idle = []
    for _ in range(MAX_CLIENTS):
        client = FcClient(fc.sock)
        client.ok("GET", "/version")  # connected, then idle between requests
        idle.append(client)
    newcomer = FcClient(fc.sock)
    assert newcomer.ok("GET", "/")["state"] == "Not started"
    with pytest.raises((ConnectionError, http.client.HTTPException)):
        idle[0].call("GET", "/")  # the one idle longest was closed for it
    assert idle[-1].ok("GET", "/")["state"] == "Not started"
    for client in [*idle, newcomer]:
        client.close()


def test_a_client_over_the_limit_while_every_other_is_mid_request_gets_a_503(fc):
    """No connection to evict (each has begun a request): the newcomer is told why and
    to retry, the others finish their requests."""
    from kvmkit.api.http import MAX_CLIENTS

    def connect():
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        s.connect(str(fc.sock))
        return s

    started = []
    for _ in range(MAX_CLIENTS):
        s = connect()
        s.sendall(b"GET /version HTTP/1.1\r\n")  # the request begun, its headers not sent
        started.append(s)
    time.sleep(0.5)  # every one of them is being read by now
    with connect() as newcomer:  # answered at once, before it sends anything
        answer = newcomer.makefile("rb").read()
    assert answer.startswith(b"HTTP/1.1 503 "), answer
    assert f"busy ({MAX_CLIENTS} connections, the most it serves at once)".encode() in answer
    for s in started:
        s.sendall(b"Host: localhost\r\n\r\n")
        assert s.recv(4096).startswith(b"HTTP/1.1 200 "), "a begun request was not answered"
        s.close()
