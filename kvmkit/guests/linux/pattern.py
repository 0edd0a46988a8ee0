"""The test init's data pattern and checksum, host side (init/pattern.h is the guest side).

pattern(SEED) is a byte stream: a 64-bit xorshift state starts at
SEED * 0x9E3779B97F4A7C15 + 1 (mod 2**64); for each 8-byte block the state is first
advanced once (x ^= x << 13; x ^= x >> 7; x ^= x << 17) and its 8 bytes, least
significant first, are the block. fnv is FNV-1a 64.

The guest's `blk-write DEV OFFSET LEN SEED` writes pattern(SEED) bytes 0..LEN-1 at
OFFSET, so the disk holds `pattern(seed, 0, LEN)` at OFFSET and the printed fnv is
`fnv1a64(pattern(seed, 0, LEN))`.
"""

import struct

MASK64 = (1 << 64) - 1
SEED_MUL = 0x9E3779B97F4A7C15
FNV64_OFFSET = 0xCBF29CE484222325
FNV64_PRIME = 0x100000001B3
BLOCK = 8


def _step(x: int) -> int:
    x ^= (x << 13) & MASK64
    x ^= x >> 7
    x ^= (x << 17) & MASK64
    return x


# The xorshift step is linear over GF(2): a 64x64 bit matrix, kept as the images of
# the 64 unit vectors (column i = step(1 << i)). Jumping n steps ahead costs
# O(log n) matrix products instead of n steps.
def _apply(columns: list[int], x: int) -> int:
    r = 0
    i = 0
    while x:
        if x & 1:
            r ^= columns[i]
        x >>= 1
        i += 1
    return r


def _compose(a: list[int], b: list[int]) -> list[int]:
    """The matrix of a(b(x))."""
    return [_apply(a, col) for col in b]


_STEP_MATRIX = [_step(1 << i) for i in range(64)]


def _advance(x: int, n: int) -> int:
    """The state after n steps from x."""
    power = _STEP_MATRIX
    while n:
        if n & 1:
            x = _apply(power, x)
        n >>= 1
        if n:
            power = _compose(power, power)
    return x


def initial_state(seed: int) -> int:
    if not 0 <= seed <= MASK64:
        raise ValueError(f"pattern seed {seed} is not a 64-bit unsigned number")
    return (seed * SEED_MUL + 1) & MASK64


def pattern(seed: int, offset: int, length: int) -> bytes:
    """Bytes offset .. offset+length-1 of pattern(seed)."""
    if offset < 0 or length < 0:
        raise ValueError(f"pattern offset {offset} and length {length} must be >= 0")
    if length == 0:
        return b""
    first = offset // BLOCK
    last = (offset + length - 1) // BLOCK
    x = _advance(initial_state(seed), first)
    words = []
    for _ in range(last - first + 1):
        x = _step(x)
        words.append(x)
    data = struct.pack(f"<{len(words)}Q", *words)
    skip = offset - first * BLOCK
    return data[skip : skip + length]


def fnv1a64(data: bytes, h: int = FNV64_OFFSET) -> int:
    """FNV-1a 64 of data; pass a previous result as h to continue over more bytes."""
    for byte in data:
        h = ((h ^ byte) * FNV64_PRIME) & MASK64
    return h


def fnv_hex(data: bytes) -> str:
    """fnv1a64 as the init prints it: 16 lower-case hex digits."""
    return f"{fnv1a64(data):016x}"
