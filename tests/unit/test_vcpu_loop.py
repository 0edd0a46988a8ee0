"""The vCPU loop's dispatch, fed scripted exits instead of KVM: which handler runs for
which exit, what reaches the devices, what ends the run and with which reason."""

from kvmkit.devices import PostCode, mmio_bus, pio_bus
from kvmkit.kvm.exits import (
    FAIL_ENTRY,
    HLT,
    INTERNAL_ERROR,
    INTR,
    IO,
    MMIO,
    SHUTDOWN,
    SYSTEM_EVENT,
    InternalError,
    IoExit,
    MmioExit,
    SystemEvent,
)
from kvmkit.machine.result import EXIT_GUEST_CRASH, EXIT_HOST_ERROR, EXIT_OK
from kvmkit.machine.vcpu_loop import VcpuPort, run_vcpu
from kvmkit.uapi.exits import SystemEventType


class FakeExits:
    """A scripted vCPU: each step is (reason, decoded exit or None)."""

    def __init__(self, steps):
        self.steps = list(steps)
        self.current = None
        self.in_values = []  # what the VMM answered to IN exits
        self.mmio_reads = []

    def run(self):
        reason, self.current = self.steps.pop(0)
        return reason

    def io(self):
        return self.current[0]

    def io_value(self, exit, i):
        return self.current[1][i]

    def complete_io_in(self, exit, i, value):
        self.in_values.append(value & ((1 << (8 * exit.size)) - 1))

    def mmio(self):
        return self.current

    def complete_mmio_read(self, exit, value):
        self.mmio_reads.append(value)

    def if_flag(self):
        return False

    def internal_error(self):
        return self.current

    def system_event(self):
        return self.current

    def fail_entry_reason(self):
        return self.current


class Recorder:
    name = "rec"
    state_version = 1
    state_type = object

    def __init__(self, answer=0x5A):
        self.writes = []
        self.reads = []
        self.answer = answer

    def read(self, offset, size):
        self.reads.append((offset, size))
        return self.answer

    def write(self, offset, size, value):
        self.writes.append((offset, size, value))

    def save_state(self):
        return None


def make_port(steps, **kw):
    fake = FakeExits(steps)
    stops = []
    pio, mmio = pio_bus(), mmio_bus()
    port = VcpuPort(
        index=0,
        run=fake.run,
        exits=fake,
        pio=pio,
        mmio=mmio,
        stopping=lambda: bool(stops),
        stop=lambda status, reason, detail: stops.append((status, reason, detail)),
        on_kick=kw.pop("on_kick", lambda: True),
        on_hlt=kw.pop("on_hlt", lambda: False),
        describe=lambda: "rip=...",
        **kw,
    )
    return port, fake, stops, pio, mmio


def io(port, size, values, out=True):
    return (IO, (IoExit(out, size, port, len(values), 0), values))


def test_port_writes_reach_the_device_at_its_offset_and_string_exits_each_element():
    rec = Recorder()
    steps = [io(0x3F9, 1, [0x41]), io(0x3F8, 2, [1, 2, 3]), (SHUTDOWN, None)]
    port, _, stops, pio, _ = make_port(steps)
    pio.add(0x3F8, 8, rec)
    run_vcpu(port)
    assert rec.writes == [(1, 1, 0x41), (0, 2, 1), (0, 2, 2), (0, 2, 3)]
    assert stops[0][:2] == (
        EXIT_GUEST_CRASH,
        "vCPU 0: guest shut down (KVM_EXIT_SHUTDOWN: triple fault)",
    )
    assert port.counts[IO] == 2 and port.counts[SHUTDOWN] == 1


def test_port_reads_are_answered_truncated_to_the_access_size():
    rec = Recorder(answer=0x1234)
    steps = [(IO, (IoExit(False, 1, 0x80, 2, 0), [])), (SHUTDOWN, None)]
    port, fake, _, pio, _ = make_port(steps)
    pio.add(0x80, 1, rec)
    run_vcpu(port)
    assert fake.in_values == [0x34, 0x34] and rec.reads == [(0, 1), (0, 1)]


def test_mmio_write_and_read():
    rec = Recorder(answer=0xC3)
    steps = [
        (MMIO, MmioExit(0xD0000010, (0xBEEF).to_bytes(2, "little"), 2, True)),
        (MMIO, MmioExit(0xD0000004, b"\0" * 4, 4, False)),
        (SHUTDOWN, None),
    ]
    port, fake, _, _, mmio = make_port(steps)
    mmio.add(0xD0000000, 0x1000, rec)
    run_vcpu(port)
    assert rec.writes == [(0x10, 2, 0xBEEF)] and fake.mmio_reads == [0xC3]


def test_an_unclaimed_port_ends_the_run_as_a_guest_crash_naming_it():
    port, _, stops, _, _ = make_port([io(0x1234, 1, [0x5A])])
    run_vcpu(port)
    status, reason, detail = stops[0]
    assert status == EXIT_GUEST_CRASH and detail == "rip=..."
    assert reason == "vCPU 0 wrote 0x5a (1 byte) to port 0x1234, which no device claims"


def test_unclaimed_accesses_can_be_ignored_reads_seeing_all_ones():
    steps = [io(0x2F8, 1, [1]), (IO, (IoExit(False, 1, 0x2F9, 1, 0), [])), (SHUTDOWN, None)]
    port, fake, stops, _, _ = make_port(steps, ignore_unclaimed=True)
    run_vcpu(port)
    assert fake.in_values == [0xFF] and port.unclaimed == 2
    assert stops[0][0] == EXIT_GUEST_CRASH and "shut down" in stops[0][1]


def test_a_kick_goes_to_on_kick_and_hlt_to_on_hlt():
    kicks = []
    port, _, stops, _, _ = make_port(
        [(INTR, None), (INTR, None), (HLT, None)],
        on_kick=lambda: kicks.append(1) or True,
        on_hlt=lambda: False,
    )
    run_vcpu(port)
    assert kicks == [1, 1] and stops == []  # on_hlt ended this vCPU's loop quietly


def test_ending_exits_give_their_status_and_reason():
    cases = [
        (
            INTERNAL_ERROR,
            InternalError(1, (0x10, 0x20)),
            EXIT_GUEST_CRASH,
            "vCPU 0: KVM internal error, suberror EMULATION, data 0x10 0x20",
        ),
        (
            FAIL_ENTRY,
            0x80000021,
            EXIT_GUEST_CRASH,
            "vCPU 0: VM entry failed, hardware reason 0x80000021",
        ),
        (
            SYSTEM_EVENT,
            SystemEvent(int(SystemEventType.SHUTDOWN), ()),
            EXIT_OK,
            "vCPU 0: guest powered off",
        ),
        (4, None, EXIT_GUEST_CRASH, "vCPU 0: unhandled exit reason DEBUG (4)"),
        (200, None, EXIT_GUEST_CRASH, "vCPU 0: unhandled exit reason exit 200 (200)"),
    ]
    for reason, decoded, status, text in cases:
        port, _, stops, _, _ = make_port([(reason, decoded)])
        run_vcpu(port)
        assert stops[0][:2] == (status, text)
    assert port.counts[0] == 1  # reasons past the table count as 0


def test_a_device_bug_stops_the_machine_with_a_reason_instead_of_raising():
    class Broken(Recorder):
        def write(self, offset, size, value):
            raise ZeroDivisionError("oops")

    port, _, stops, pio, _ = make_port([io(0x80, 1, [1])])
    pio.add(0x80, 1, Broken())
    run_vcpu(port)
    assert stops == [(EXIT_HOST_ERROR, "vCPU 0: internal error: ZeroDivisionError: oops", "")]


def test_the_loop_ends_when_the_machine_stops():
    port, _, stops, pio, _ = make_port([io(0x80, 1, [1])] * 3)
    post = PostCode()
    pio.add(0x80, 1, post)
    stops.append((0, "stopped elsewhere", ""))  # the machine was stopped: no KVM_RUN at all
    run_vcpu(port)
    assert post.writes == 0
