"""Crafted files and streams that claim huge sizes cost what they are, not what they
claim: `kvmkit snapshot inspect` and `kvmkit migrate receive` refuse them in one line,
their peak RSS within 50 MB of refusing a 6-byte file. RSS is that of the kvmkit
process itself (wait4), compared with a reference run of the same command."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvmkit.snapshot.format import FLAG_ZSTD, MACHINE, MEMORY, PAGES, zstd_available
from kvmkit.snapshot.memory_image import index_limit
from tests.adversarial.crafting import (
    HEADER,
    Stream,
    head,
    machine_description,
    prelude,
    snapshot_bytes,
    zstd_bomb,
)

GROWTH_LIMIT_KIB = 50 << 10
GIB = 1 << 30
KVMKIT = [sys.executable, "-m", "kvmkit"]


def run_measured(args: list[str], feed=None) -> tuple[int, str, int]:
    """Run kvmkit; its exit status, stderr and peak RSS (KiB). `feed(proc)` runs while
    it does."""
    with open(os.devnull, "wb") as null:
        proc = subprocess.Popen([*KVMKIT, *args], stdout=null, stderr=subprocess.PIPE)
        try:
            if feed is not None:
                feed(proc)
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            if proc.poll() is None:
                proc.kill()
        stderr = proc.stderr.read().decode() if proc.stderr else ""
        proc.stderr.close()
    return os.waitstatus_to_exitcode(status), stderr, usage.ru_maxrss


@pytest.fixture(scope="module")
def reference_rss(tmp_path_factory) -> int:
    path = tmp_path_factory.mktemp("ref") / "text.snap"
    path.write_bytes(b"hello\n")
    code, err, rss = run_measured(["snapshot", "inspect", str(path)])
    assert code == 1 and "is not a kvmkit snapshot: it starts with b'hello\\n'" in err, err
    return rss


def _claims_16_gib_machine() -> bytes:
    return prelude(HEADER) + head(MACHINE, 16 * GIB) + bytes(1000)


def _claims_16_gib_chunk() -> bytes:
    data = bytearray(snapshot_bytes())
    at = data.index(head(MEMORY, 8192))  # the first chunk
    return bytes(data[:at]) + head(MEMORY, 16 * GIB) + bytes(1000)


def _claims_3_gib_index() -> bytes:
    """A 1 TiB machine may have an index of up to 4 GiB: within its limit, but not in a
    1 KB file."""
    machine = machine_description(memory_bytes=1 << 40)
    stream = snapshot_bytes(machine=machine)
    data = bytearray(stream)
    at = data.index(head(MEMORY, 32))
    assert index_limit(1 << 40) > 3 * GIB
    return bytes(data[:at]) + head(MEMORY, 3 * GIB) + bytes(100)


def _zstd_bomb() -> bytes:
    """A 4 MiB chunk whose compressed data says it holds 1 GiB."""
    chunk = 4 << 20
    data = bytearray(snapshot_bytes(memory_bytes=8 << 20, chunks=((0, chunk),)))
    at = data.index(head(MEMORY, chunk))
    bomb = Stream().add(MEMORY, zstd_bomb(GIB), FLAG_ZSTD, raw=chunk)
    return bytes(data[:at]) + bytes(bomb.data[len(prelude({"kind": "test"})) :])


CRAFTED = {
    "machine section claiming 16 GiB": (_claims_16_gib_machine, "section 0 (machine description"),
    "memory chunk claiming 16 GiB": (_claims_16_gib_chunk, "claims 17179869184 bytes"),
    "memory index claiming 3 GiB": (_claims_3_gib_index, "is truncated: it ends at byte"),
    "zstd bomb": (_zstd_bomb, "declares 1073741824 bytes"),
}


@pytest.mark.parametrize("name", sorted(CRAFTED))
def test_a_crafted_snapshot_is_refused_at_the_cost_of_its_size(tmp_path, reference_rss, name):
    make, message = CRAFTED[name]
    if name == "zstd bomb" and not zstd_available():
        pytest.skip("zstandard is not installed")
    path = tmp_path / "crafted.snap"
    path.write_bytes(make())
    assert path.stat().st_size < 256 << 10
    code, err, rss = run_measured(["snapshot", "inspect", str(path)])
    assert code == 1, err
    assert err.startswith("kvmkit: error: snapshot ") and err.count("\n") == 1, err
    assert message in err, err
    assert rss - reference_rss < GROWTH_LIMIT_KIB, (rss, reference_rss)


def _send_and_hold(path: Path, data: bytes, hold_s: float):
    """A source that connects to `path`, sends `data` and waits `hold_s` (or until the
    target closes) before it closes."""

    def feed(proc: subprocess.Popen) -> None:
        end = time.monotonic() + 30
        while not path.exists():
            assert time.monotonic() < end and proc.poll() is None, "the target never listened"
            time.sleep(0.01)
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(path))
            s.sendall(data)
            s.settimeout(hold_s)
            try:
                s.recv(1 << 16)  # the target's error message, or its close
            except (TimeoutError, OSError):
                pass

    return feed


def _receive(tmp_path: Path, data: bytes, hold_s: float = 5.0) -> tuple[int, str, int]:
    path = tmp_path / "m.sock"
    args = ["migrate", "receive", "--listen", f"unix:{path}", "--timeout", "30"]
    return run_measured(args, _send_and_hold(path, data, hold_s))


def test_a_crafted_migration_stream_is_refused_at_the_cost_of_its_size(tmp_path, reference_rss):
    header = {**HEADER, "kind": "migration"}
    data = prelude(header) + head(MACHINE, 16 * GIB)
    assert len(data) < 1024
    code, err, rss = _receive(tmp_path, data)
    assert code == 1, err
    assert "claims 17179869184 bytes" in err and "nothing was started here" in err, err
    assert "Traceback" not in err
    assert rss - reference_rss < GROWTH_LIMIT_KIB, (rss, reference_rss)


def test_a_source_that_closes_mid_section_is_named_as_closed(tmp_path):
    header = {**HEADER, "kind": "migration"}
    data = prelude(header) + head(MACHINE, 4096) + b"{" * 100
    code, err, _ = _receive(tmp_path, data, hold_s=0.2)
    assert code == 1, err
    assert "the source closed the connection at byte" in err and "truncated" not in err, err


def test_a_page_section_claiming_4_gib_is_refused_from_its_head():
    """The same for a PAGE section, read as the target reads it."""
    from kvmkit.snapshot.format import StreamFormatError, StreamReader

    a, b = socket.socketpair()
    with a, b:
        a.sendall(prelude({"kind": "migration"}) + head(PAGES, 4 * GIB))
        r = StreamReader(b.makefile("rb", buffering=0), "the migration stream", peer="the source")
        r.read_header()
        with pytest.raises(
            StreamFormatError,
            match=r"section 0 \(guest pages, .*claims 4294967296 bytes .*, over its limit",
        ):
            r.next_section()
