"""Record this host's `kvmkit check` facts (with the capture date) for the unit tests,
which run the profile logic on them without KVM.

    python3 scripts/capture_host_facts.py tests/unit/data/host_facts_pvm.json
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kvmkit.hostcheck.kvm_probes import gather  # noqa: E402


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    facts = gather()
    Path(sys.argv[1]).write_text(json.dumps(facts, indent=1, sort_keys=True) + "\n")
    print(f"captured {facts['captured']}: backend {facts['host']['kvm_backend']}")


if __name__ == "__main__":
    main()
