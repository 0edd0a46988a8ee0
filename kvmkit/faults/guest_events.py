"""Guest-visible faults: an exception, an NMI or a machine check for a vCPU, as a fault
plan names them (how each goes in: kvmkit/kvm/guest_events.py).

An event is delivered before the vCPU's next KVM_RUN, so it lands on the instruction
the vCPU would run next: a handler that returns (IRETQ) resumes the guest there.
"""

import re
from dataclasses import dataclass

from kvmkit.errors import ConfigError

VECTORS = {"GP": 13, "UD": 6, "PF": 14, "NMI": 2, "MCE": 18}
WITH_ERROR_CODE = {"GP", "PF"}

_EVENT_RE = re.compile(r"^(#GP|#UD|#PF|NMI|MCE)(?:=(\w+))?(?:/(\w+))?$", re.IGNORECASE)


@dataclass(frozen=True)
class GuestEvent:
    """`kind`: GP, UD, PF, NMI or MCE; `address`: CR2 for #PF, MCi_ADDR for MCE."""

    kind: str
    error_code: int = 0
    address: int = 0

    @property
    def vector(self) -> int:
        return VECTORS[self.kind]

    def describe(self) -> str:
        name = self.kind if self.kind in ("NMI", "MCE") else f"#{self.kind}"
        if self.kind == "PF":
            return f"{name} at {self.address:#x} (error code {self.error_code:#x})"
        if self.kind == "GP" and self.error_code:
            return f"{name} (error code {self.error_code:#x})"
        if self.kind == "MCE" and self.address:
            return f"{name} at {self.address:#x}"
        return name


def parse_event(what: str, text: str = "") -> GuestEvent | None:
    """`#GP[=ERR]`, `#UD`, `#PF=ADDR[/ERR]`, `NMI`, `MCE[=ADDR]`; None when `what` is
    not a guest event at all; ConfigError when it is one, badly written."""
    m = _EVENT_RE.match(what)
    if m is None:
        return None
    kind = m.group(1).upper().lstrip("#")
    first, second = m.group(2), m.group(3)

    def number(value: str) -> int:
        try:
            return int(value, 0)
        except ValueError:
            raise ConfigError(
                f"fault rule {text or what!r}: {value!r} is not a number (decimal or 0x hex)"
            ) from None

    if kind == "PF":
        if first is None:
            raise ConfigError(
                f"fault rule {text or what!r}: #PF needs the faulting address: #PF=0xADDR[/ERR]"
            )
        return GuestEvent("PF", number(second) if second else 0, number(first))
    if second is not None or (first is not None and kind in ("UD", "NMI")):
        raise ConfigError(
            f"fault rule {text or what!r}: write #GP[=ERR], #UD, #PF=ADDR[/ERR], NMI or MCE[=ADDR]"
        )
    if kind == "GP":
        return GuestEvent("GP", number(first) if first else 0)
    if kind == "MCE":
        return GuestEvent("MCE", address=number(first) if first else 0)
    return GuestEvent(kind)
