"""Every parser of the state stream, fuzzed briefly (scripts/fuzz_stream.py runs the
same targets for longer): only kvmkit's typed errors escape, and no input under
1 MiB makes the parse hold more than 64 MiB."""

import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.adversarial.targets import TARGETS, run_one

EXAMPLES = 40
PEAK_LIMIT = 64 << 20


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_only_typed_errors_escape_and_memory_stays_bounded(name):
    target = TARGETS[name]

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(st.binary(max_size=4096))
    def fuzz(data: bytes) -> None:
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        error = run_one(target, data)
        peak = tracemalloc.get_traced_memory()[1] - before
        assert error is None, f"{name}: {type(error).__name__}: {error} for {data!r}"
        assert peak < PEAK_LIMIT, f"{name}: {peak} bytes held for a {len(data)}-byte input"

    tracemalloc.start()
    try:
        fuzz()
    finally:
        tracemalloc.stop()
