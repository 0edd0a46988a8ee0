"""`kvmkit check` on the real host: the JSON schema, values that agree with direct
ioctls, the PVM backend here, and profile exit codes that work in a shell `if`."""

import json
import os
import subprocess
import sys

import pytest

from kvmkit.kvm import Kvm
from kvmkit.kvm.system import kvm_backend
from kvmkit.uapi.caps import Cap

TOP_KEYS = {"schema", "captured", "host", "kvm", "probes", "profiles"}
REQUIREMENT_KEYS = {"id", "level", "text", "met", "observed", "why", "provided_by"}


@pytest.fixture(scope="module")
def report():
    p = subprocess.run(
        [sys.executable, "-m", "kvmkit", "check", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def test_json_schema(report):
    assert set(report) == TOP_KEYS and report["schema"] == "kvmkit-check/1"
    assert {
        "kernel",
        "cpu",
        "kvm_backend",
        "backend_params",
        "kvm_params",
        "dev_kvm",
        "hugepages",
    } <= set(report["host"])
    assert {
        "api_version",
        "caps",
        "vm_types",
        "guest_memfd_flags",
        "limits",
        "cpuid_features",
        "pmu_version",
        "msrs",
    } <= set(report["kvm"])
    for probe in report["probes"].values():
        assert set(probe) == {"title", "ok", "detail", "seconds"}
    for profile in report["profiles"].values():
        assert set(profile) == {"summary", "met", "requirements"}
        for r in profile["requirements"]:
            assert set(r) == REQUIREMENT_KEYS


def test_values_agree_with_direct_ioctls(report):
    with Kvm() as kvm:
        for cap in Cap:
            assert report["kvm"]["caps"][cap.name] == kvm.check_extension(cap), cap.name
        assert report["kvm"]["vm_types"] == kvm.vm_types()
        assert report["kvm"]["msrs"] == [f"{i:#x}" for i in kvm.msr_index_list()]
    assert report["host"]["kvm_backend"] == kvm_backend()
    assert report["host"]["kernel"] == os.uname().release


@pytest.mark.skipif(kvm_backend() != "pvm", reason="this host's KVM is not PVM")
def test_pvm_host_reported_and_confidential_profiles_unmet_with_reasons(report):
    assert report["host"]["kvm_backend"] == "pvm"
    assert report["host"]["backend_params"]  # kvm_pvm's parameters
    assert report["profiles"]["pvm-host"]["met"]
    for name in ("confidential-sev-snp", "confidential-tdx"):
        profile = report["profiles"][name]
        assert not profile["met"]
        unmet = [r for r in profile["requirements"] if not r["met"]]
        assert unmet and all(r["observed"] and r["provided_by"] for r in unmet)


def test_profile_exit_codes_work_in_a_shell_if():
    check = f"{sys.executable} -m kvmkit check -q --profile"
    script = (
        f"if {check} basic-vm; then echo met; fi;"
        f" if ! {check} confidential-tdx; then echo unmet; fi;"
        f" {check} no-such; echo $?"
    )
    out = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["met", "unmet", "2"], out.stderr


def test_table_names_the_backend_and_profiles():
    p = subprocess.run(
        [sys.executable, "-m", "kvmkit", "check"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "140"},
    )
    assert p.returncode == 0, p.stderr
    assert f"KVM backend │ {kvm_backend()}" in p.stdout
    assert "KVM_CAP_GUEST_MEMFD_FLAGS" in p.stdout and "functional probes" in p.stdout
    assert "requirement profiles" in p.stdout
