import pytest

from kvmkit.devices import BusError, PostCode, pio_bus


class Dummy:
    def __init__(self, name):
        self.name = name

    def read(self, offset, size):
        return offset

    def write(self, offset, size, value):
        pass


def test_find_returns_the_owning_range():
    bus = pio_bus()
    a, b = Dummy("a"), Dummy("b")
    bus.add(0x3F8, 8, a)
    bus.add(0x80, 1, b)
    assert bus.find(0x3F8).device is a
    assert bus.find(0x3FF).device is a
    assert bus.find(0x3FC, 4).device is a
    assert bus.find(0x80).device is b
    assert bus.find(0x400) is None
    assert bus.find(0x7F) is None


def test_access_running_past_the_end_is_not_claimed():
    bus = pio_bus()
    bus.add(0x3F8, 8, Dummy("a"))
    assert bus.find(0x3FE, 4) is None


@pytest.mark.parametrize("base, length", [(0x3F8, 1), (0x3F0, 9), (0x3FF, 4), (0x3F0, 0x20)])
def test_overlaps_are_refused_naming_both(base, length):
    bus = pio_bus()
    bus.add(0x3F8, 8, Dummy("serial"))
    with pytest.raises(BusError, match="overlaps serial at 0x3f8-0x3ff"):
        bus.add(base, length, Dummy("new"))


def test_adjacent_ranges_are_fine_and_remove_frees():
    bus = pio_bus()
    bus.add(0x10, 0x10, Dummy("a"))
    bus.add(0x20, 0x10, Dummy("b"))
    bus.add(0x0, 0x10, Dummy("c"))
    bus.remove(0x10)
    bus.add(0x18, 0x8, Dummy("d"))
    assert [m.device.name for m in bus.mappings()] == ["c", "d", "b"]
    with pytest.raises(BusError, match="nothing is mapped"):
        bus.remove(0x10)


def test_out_of_space_and_empty_ranges_refused():
    bus = pio_bus()
    with pytest.raises(BusError, match="outside"):
        bus.add(0xFFFF, 2, Dummy("x"))
    with pytest.raises(BusError, match="outside"):
        bus.add(0x10, 0, Dummy("x"))


def test_post_code_remembers_last_byte():
    post = PostCode()
    post.write(0, 1, 0x1AB)
    assert post.read(0, 1) == 0xAB and post.writes == 1
