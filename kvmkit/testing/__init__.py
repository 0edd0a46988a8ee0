"""Test benches users run against their own kernels (`kvmkit selftest ...`)."""
