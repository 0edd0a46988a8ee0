"""The vCPU loop's dispatch, fed scripted exits instead of KVM: each exit is written
into a kvm_run-shaped buffer as KVM would write it and read back through the real
decoder. Which handler runs for which exit, what reaches the devices, what ends the
run and with which reason."""

from kvmkit.devices import PostCode, mmio_bus, pio_bus
from kvmkit.kvm.exits import HLT, INTR, IO, SHUTDOWN, ExitDecoder
from kvmkit.machine.result import EXIT_GUEST_CRASH, EXIT_HOST_ERROR, EXIT_OK
from kvmkit.machine.vcpu_loop import VcpuPort, run_vcpu
from kvmkit.testing.exits import ExitWriter
from kvmkit.uapi.exits import SystemEventType


class ScriptedVcpu:
    """A vCPU whose KVM_RUN writes the next scripted exit into its kvm_run page. Each
    step is an exit reason, or a function that writes an exit with the ExitWriter."""

    def __init__(self, steps):
        self.page = memoryview(bytearray(3 * 4096))
        self.writer = ExitWriter(self.page)
        self.steps = list(steps)
        self.after = []  # the writer, after each step's handler ran (for IN/MMIO reads)

    def run(self):
        step = self.steps.pop(0)
        if callable(step):
            step(self.writer)
        else:
            self.writer.reason(step)
        return self.page.cast("I")[2]


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
    fake = ScriptedVcpu(steps)
    stops = []
    pio, mmio = pio_bus(), mmio_bus()
    port = VcpuPort(
        index=0,
        run=fake.run,
        exits=ExitDecoder(fake.page),
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


def io(port, size, values):
    return lambda w: w.io(True, size, port, values)


def io_in(port, size, count):
    return lambda w: w.io(False, size, port, [], count)


def test_port_writes_reach_the_device_at_its_offset_and_string_exits_each_element():
    rec = Recorder()
    steps = [io(0x3F9, 1, [0x41]), io(0x3F8, 2, [1, 2, 3]), SHUTDOWN]
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
    port, fake, _, pio, _ = make_port([io_in(0x80, 1, 2), SHUTDOWN])
    pio.add(0x80, 1, rec)
    run_vcpu(port)
    assert fake.writer.io_data(1, 3) == [0x34, 0x34, 0]  # two accesses, one byte each
    assert rec.reads == [(0, 1), (0, 1)]


def test_mmio_write_and_read():
    rec = Recorder(answer=0xC3)
    steps = [
        lambda w: w.mmio(0xD0000010, 2, True, 0xFFFF_BEEF),  # bytes past the length: ignored
        lambda w: w.mmio(0xD0000004, 4, False),
        SHUTDOWN,
    ]
    port, fake, _, _, mmio = make_port(steps)
    mmio.add(0xD0000000, 0x1000, rec)
    run_vcpu(port)
    assert rec.writes == [(0x10, 2, 0xBEEF)] and rec.reads == [(4, 4)]
    assert fake.writer.mmio_data() == 0xC3


def test_an_unclaimed_port_ends_the_run_as_a_guest_crash_naming_it():
    port, _, stops, _, _ = make_port([io(0x1234, 1, [0x5A])])
    run_vcpu(port)
    status, reason, detail = stops[0]
    assert status == EXIT_GUEST_CRASH and detail == "rip=..."
    assert reason == "vCPU 0 wrote 0x5a (1 byte) to port 0x1234, which no device claims"


def test_unclaimed_accesses_can_be_ignored_reads_seeing_all_ones():
    steps = [io(0x2F8, 1, [1]), io_in(0x2F9, 2, 1), lambda w: w.mmio(0x10, 4, False), SHUTDOWN]
    port, fake, stops, _, _ = make_port(steps, ignore_unclaimed=True)
    run_vcpu(port)
    assert fake.writer.io_data(2, 1) == [0xFFFF] and fake.writer.mmio_data() == 0xFFFF_FFFF
    assert port.unclaimed == 3
    assert stops[0][0] == EXIT_GUEST_CRASH and "shut down" in stops[0][1]


def test_a_kick_goes_to_on_kick_and_hlt_to_on_hlt():
    kicks = []
    port, _, stops, _, _ = make_port(
        [INTR, INTR, HLT],
        on_kick=lambda: kicks.append(1) or True,
        on_hlt=lambda: False,
    )
    run_vcpu(port)
    assert kicks == [1, 1] and stops == []  # on_hlt ended this vCPU's loop quietly


def test_ending_exits_give_their_status_and_reason():
    cases = [
        (
            lambda w: w.internal_error(1, (0x10, 0x20)),
            EXIT_GUEST_CRASH,
            "vCPU 0: KVM internal error, suberror EMULATION, data 0x10 0x20",
        ),
        (
            lambda w: w.fail_entry(0x80000021),
            EXIT_GUEST_CRASH,
            "vCPU 0: VM entry failed, hardware reason 0x80000021",
        ),
        (
            lambda w: w.system_event(int(SystemEventType.SHUTDOWN)),
            EXIT_OK,
            "vCPU 0: guest powered off",
        ),
        (4, EXIT_GUEST_CRASH, "vCPU 0: unhandled exit reason DEBUG (4)"),
        (200, EXIT_GUEST_CRASH, "vCPU 0: unhandled exit reason exit 200 (200)"),
    ]
    for step, status, text in cases:
        port, _, stops, _, _ = make_port([step])
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


def test_a_stop_during_the_run_ends_the_loop_at_the_kick_it_brings():
    """The loop does not poll the machine's stop: a stop kicks every vCPU, and the INTR
    exit that follows goes to on_kick, which ends the loop."""
    steps = [io(0x501, 1, [0]), INTR, io(0x80, 1, [2])]
    port, fake, stops, pio, _ = make_port(steps, on_kick=lambda: not stops)
    post = PostCode()

    class DebugExit(Recorder):
        def write(self, offset, size, value):
            port.stop(EXIT_OK, "the guest asked", "")

    pio.add(0x80, 1, post)
    pio.add(0x501, 1, DebugExit())
    run_vcpu(port)
    assert stops == [(EXIT_OK, "the guest asked", "")]
    assert post.writes == 0 and fake.steps == [steps[-1]]
