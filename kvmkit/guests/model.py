"""What kvmkit's deterministic guests print, computed on the host, so tests can check
a guest's output line by line (for example across a snapshot and restore)."""

MASK64 = (1 << 64) - 1
COUNTER_DATA_PAGES = 16
COUNTER_MULTIPLIER = 0xFFFFFFFF9E3779B1  # imul by the sign-extended imm32 0x9e3779b1


def _rol(value: int, bits: int) -> int:
    return ((value << bits) | (value >> (64 - bits))) & MASK64


def counter_lines(vcpu: int, steps: int) -> list[str]:
    """The lines the `counter` guest's vCPU `vcpu` prints for steps 1..`steps`."""
    words = [0] * (COUNTER_DATA_PAGES + 1)
    checksum = 0
    lines = []
    for n in range(1, steps + 1):
        words[(n % COUNTER_DATA_PAGES) + 1] = (n * COUNTER_MULTIPLIER) & MASK64
        for page in range(1, COUNTER_DATA_PAGES + 1):
            checksum = _rol(checksum, 5) ^ words[page]
        lines.append(f"cpu{vcpu} n={n} sum={checksum:#x}")
    return lines
