"""Requirement profiles judged on recorded facts: this PVM host as captured by
scripts/capture_host_facts.py, and variants of it for hosts we do not have."""

import copy
import json
from pathlib import Path

import pytest

from kvmkit.hostcheck.profiles import PROFILES, evaluate
from kvmkit.hostcheck.report import build_report, requirements_doc

RECORDED = json.loads((Path(__file__).parent / "data" / "host_facts_pvm.json").read_text())


def verdicts(facts, profile):
    met, items = evaluate(PROFILES[profile], facts)
    return met, {v.requirement.id: v for v in items}


def test_recorded_facts_carry_their_capture_date_and_schema():
    assert RECORDED["schema"] == "kvmkit-check/1"
    assert RECORDED["captured"].startswith("20")
    assert RECORDED["host"]["kvm_backend"] == "pvm"


@pytest.mark.parametrize(
    "profile",
    [
        "basic-vm",
        "guest-memfd",
        "guest-memfd-mmap",
        "live-migration",
        "live-migration-guest-memfd",
        "pvm-host",
    ],
)
def test_this_pvm_host_meets(profile):
    met, items = verdicts(RECORDED, profile)
    assert met, {k: v.observed for k, v in items.items() if not v.met}


def test_this_pvm_host_is_not_confidential_and_says_why():
    met, items = verdicts(RECORDED, "confidential-sev-snp")
    assert not met
    assert not items["kvm-amd"].met and items["kvm-amd"].observed == "KVM backend is pvm"
    assert not items["snp-vm-type"].met and "VM types: default" in items["snp-vm-type"].observed
    assert "sev_snp=1" in items["snp-vm-type"].requirement.provides
    met, items = verdicts(RECORDED, "confidential-tdx")
    assert not met and not items["private-memory"].met


def test_hide_guest_memory_unmet_on_pvm_with_both_reasons():
    met, items = verdicts(RECORDED, "hide-guest-memory")
    assert not met
    assert "INTERNAL_ERROR" in items["gmem-runs-unmapped"].observed
    assert not items["gmem-no-direct-map"].met


def test_pmu_unmet_because_enable_pmu_is_off():
    met, items = verdicts(RECORDED, "pmu")
    assert not met and "enable_pmu=N" in items["vpmu"].observed


def test_a_snp_host_meets_the_snp_profile():
    snp = copy.deepcopy(RECORDED)
    snp["host"]["kvm_backend"] = "kvm_amd"
    snp["kvm"]["vm_types"] = ["default", "sev", "sev_es", "snp"]
    snp["kvm"]["caps"]["MEMORY_ATTRIBUTES"] = 0x8
    met, items = verdicts(snp, "confidential-sev-snp")
    assert met, {k: v.observed for k, v in items.items() if not v.met}


def test_missing_guest_memfd_names_the_kernel_that_has_it():
    old = copy.deepcopy(RECORDED)
    old["kvm"]["caps"].update(GUEST_MEMFD=0, GUEST_MEMFD_FLAGS=0)
    met, items = verdicts(old, "guest-memfd-mmap")
    assert not met
    assert "6.18" in items["guest-memfd-mmap"].requirement.provides


def test_recommended_items_do_not_fail_a_profile():
    no_ring = copy.deepcopy(RECORDED)
    no_ring["probes"]["dirty_ring"]["ok"] = False
    no_ring["probes"]["userfaultfd"]["ok"] = False
    met, items = verdicts(no_ring, "live-migration")
    assert (
        met
        and not items["dirty-ring"].met
        and items["dirty-ring"].requirement.level == ("recommended")
    )


def test_no_dev_kvm_fails_cleanly_everywhere():
    none = copy.deepcopy(RECORDED)
    none["host"]["dev_kvm"] = {"path": "/dev/kvm", "exists": False, "accessible": False}
    none["kvm"], none["probes"] = None, {}
    report = build_report(none)
    assert not any(p["met"] for p in report["profiles"].values())
    dev = report["profiles"]["basic-vm"]["requirements"][0]
    assert dev["id"] == "dev-kvm" and dev["observed"] == "/dev/kvm does not exist"


def test_every_requirement_says_why_and_what_provides_it():
    for profile in PROFILES.values():
        for r in profile.requirements:
            assert r.why and r.provides and r.level in ("required", "recommended"), r.id
    doc = requirements_doc()
    for name in PROFILES:
        assert f"## {name}" in doc
    assert "| `snp-vm-type`: VM type KVM_X86_SNP_VM in KVM_CAP_VM_TYPES | required |" in doc
