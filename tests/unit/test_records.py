"""Typed records: one decoder for every saved or configured record, naming the field at
fault for each kind of bad input, and never anything but the caller's error class."""

import json
from dataclasses import dataclass, field
from typing import Any, Literal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmkit.devices.i8042 import I8042State
from kvmkit.devices.rtc import RtcState
from kvmkit.devices.serial import SerialState
from kvmkit.errors import ConfigError, KvmkitError
from kvmkit.records import MAX_DEPTH, bounds, decode, encode
from kvmkit.snapshot.format import StreamFormatError
from kvmkit.snapshot.model import (
    MODEL_VERSION,
    BootRecord,
    DevicePlacementRecord,
    MachineDescription,
    RegionRecord,
    decode_description,
    decode_devices,
)


@dataclass(frozen=True)
class Inner:
    n: int = field(metadata=bounds(0, 10))


@dataclass(frozen=True)
class Outer:
    name: str = field(metadata=bounds(1, 8))
    inner: Inner
    items: list[int] = field(default_factory=list, metadata=bounds(0, 3))
    data: bytes = b""
    kind: Literal["a", "b"] = "a"
    maybe: int | None = None
    free: dict[str, Any] = field(default_factory=dict)


GOOD = {"name": "x", "inner": {"n": 3}, "items": [1], "data": "00ff", "kind": "b"}


def test_a_good_record_round_trips():
    value = decode(Outer, GOOD, "thing", ConfigError)
    assert value == Outer("x", Inner(3), [1], b"\x00\xff", "b")
    assert decode(Outer, encode(value), "thing", ConfigError) == value


@pytest.mark.parametrize(
    "change, message",
    [
        ({"name": None}, "thing: field 'name': must be a string, not null"),
        ({"name": ""}, "thing: field 'name': 0 characters is out of range (1..8 characters)"),
        ({"inner": {"n": 11}}, "thing: field 'inner': field 'n': 11 is out of range (0..10)"),
        ({"inner": {"n": True}}, "field 'n': must be a whole number, not a boolean"),
        ({"inner": {}}, "thing: field 'inner': field 'n' is missing"),
        ({"items": [1, "2"]}, "field 'items'[1]: must be a whole number, not a string"),
        ({"items": [1, 2, 3, 4]}, "field 'items': 4 items is out of range (0..3 items)"),
        ({"data": "xyz"}, "field 'data': is not a hex string"),
        ({"kind": "c"}, "field 'kind': must be one of 'a', 'b', not 'c'"),
        ({"maybe": "1"}, "field 'maybe': must be a whole number, not a string"),
        ({"extra": 1}, "thing: unknown field 'extra' (known: name, inner, items"),
    ],
)
def test_each_wrong_field_is_named(change, message):
    with pytest.raises(ConfigError) as e:
        decode(Outer, {**GOOD, **change}, "thing", ConfigError)
    assert message in str(e.value)


def test_missing_and_wrong_top_level():
    with pytest.raises(StreamFormatError, match="section: field 'name' is missing"):
        decode(Outer, {"inner": {"n": 1}}, "section", StreamFormatError)
    with pytest.raises(StreamFormatError, match="section: must be an object, not an array"):
        decode(Outer, [], "section", StreamFormatError)


def test_deep_free_form_json_is_refused_without_recursing():
    deep: Any = 1
    for _ in range(MAX_DEPTH * 10):
        deep = [deep]
    with pytest.raises(ConfigError, match="nested deeper than"):
        decode(Outer, {**GOOD, "free": {"x": deep}}, "thing", ConfigError)


def description(**change):
    d = MachineDescription(
        model=MODEL_VERSION,
        memory_bytes=16 << 20,
        vcpus=2,
        backend="memfd",
        hugepage_size=2 << 20,
        boot=BootRecord("program", "counter", 5, "long"),
        irqchip=True,
        pit=True,
        regions=[RegionRecord(0, 0, 16 << 20, 0)],
        devices=[DevicePlacementRecord("serial0", "serial-16550a", "pio", 0x3F8, 8, 4)],
    )
    data = encode(d)
    data.update(change)
    return data


def test_machine_description_round_trips_and_names_each_bad_field():
    assert encode(decode_description(description())) == description()
    cases = {
        "vcpus": (0, "machine section: field 'vcpus': 0 is out of range (1..1024)"),
        "backend": ("tmpfs", "field 'backend': must be one of 'guest_memfd'"),
        "irqchip": ("yes", "field 'irqchip': must be true or false, not a string"),
        "regions": ([], "field 'regions': 0 items is out of range (1..64 items)"),
        "hugepage_size": (4096, "'hugepage_size': 4096 is not a hugepage size"),
        "model": (1, "machine model 1 was written by another kvmkit version"),
    }
    for key, (value, message) in cases.items():
        with pytest.raises(StreamFormatError) as e:
            decode_description(description(**{key: value}))
        assert message in str(e.value), (key, str(e.value))
    missing = description()
    del missing["irqchip"]
    with pytest.raises(StreamFormatError, match="machine section: field 'irqchip' is missing"):
        decode_description(missing)
    twice = description(devices=[description()["devices"][0]] * 2)
    with pytest.raises(StreamFormatError, match="two devices share an id"):
        decode_description(twice)


def test_device_records_are_keyed_by_id_and_checked():
    ok = decode_devices({"serial0": {"kind": "serial-16550a", "version": 2, "state": {}}})
    assert ok["serial0"].version == 2
    with pytest.raises(StreamFormatError, match="device section: 'blk0': field 'version'"):
        decode_devices({"blk0": {"kind": "virtio-blk", "version": -1}})
    with pytest.raises(StreamFormatError, match="must be an object keyed by device id"):
        decode_devices([])


@pytest.mark.parametrize(
    "cls, bad, message",
    [
        (SerialState, {"ier": 256}, "field 'ier': 256 is out of range (0..255)"),
        (SerialState, {"rx": "00" * 17}, "field 'rx': 17 bytes is out of range (0..16 bytes)"),
        (RtcState, {"ram": "00"}, "field 'ram': 1 bytes is out of range (128..128 bytes)"),
        (I8042State, {"output": "x"}, "field 'output': must be a whole number, not a string"),
    ],
)
def test_device_states_are_checked_field_by_field(cls, bad, message):
    with pytest.raises(StreamFormatError) as e:
        decode(cls, bad, "device section: serial0: state", StreamFormatError)
    assert message in str(e.value)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(list(description()) + ["x"]), json_values, max_size=12))
def test_no_input_escapes_as_anything_but_the_stream_error(data):
    value = {**description(), **data}
    try:
        decode_description(json.loads(json.dumps(value)))
    except StreamFormatError:
        pass


@settings(max_examples=200, deadline=None)
@given(json_values)
def test_device_states_never_raise_untyped(data):
    for cls in (SerialState, RtcState, I8042State):
        try:
            decode(cls, data, "state", StreamFormatError)
        except KvmkitError:
            pass
