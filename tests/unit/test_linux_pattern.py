import random
import shutil
import subprocess
from pathlib import Path

import pytest

from kvmkit.guests.linux import pattern as pat

INIT_DIR = Path(pat.__file__).parent / "init"

# Computed with init/pattern.h compiled on the host (seed, length, first 24 bytes, fnv).
C_VECTORS = [
    (0, 24, "41208240000000004114010c064100102926866e2f841e9b", "6f423fe00d993980"),
    (1, 1000, "6e2d75caae771bdcb45c6f16b32df0540d2f185ee4c324d6", "af362f03aa4f4531"),
    (12345, 4096, "0fc82b0c8c60dc8c5f7c7e9f4bb55af567779af68111e6e0", "24e40e386d92b58d"),
    (2**64 - 1, 100, "eb937fb7af771bdc0cf6902953d70e0be0d4ff5c7a914c26", "16ace02cfda95015"),
]


@pytest.mark.parametrize("seed, length, head, fnv", C_VECTORS)
def test_known_vectors_from_the_c_init(seed, length, head, fnv):
    data = pat.pattern(seed, 0, length)
    assert len(data) == length
    assert data[:24].hex() == head
    assert pat.fnv_hex(data) == fnv


def test_fnv1a64_standard_vectors():
    assert pat.fnv1a64(b"") == 0xCBF29CE484222325
    assert pat.fnv1a64(b"a") == 0xAF63DC4C8601EC8C
    assert pat.fnv1a64(b"foobar") == 0x85944171F73967E8
    assert pat.fnv1a64(b"bar", pat.fnv1a64(b"foo")) == pat.fnv1a64(b"foobar")


def test_any_window_equals_the_slice_of_the_whole_stream():
    whole = pat.pattern(7, 0, 5000)
    for offset, length in [(0, 1), (1, 7), (5, 17), (8, 8), (999, 1234), (4999, 1), (3, 0)]:
        assert pat.pattern(7, offset, length) == whole[offset : offset + length]


def test_far_offsets_jump_ahead_consistently():
    base = 10**12 + 3
    window = pat.pattern(9, base, 64)
    assert pat.pattern(9, base + 16, 16) == window[16:32]
    assert len(window) == 64


def test_seeds_are_64_bit_and_lengths_non_negative():
    with pytest.raises(ValueError, match="64-bit"):
        pat.pattern(2**64, 0, 8)
    with pytest.raises(ValueError, match=">= 0"):
        pat.pattern(1, -1, 8)


@pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is needed to build the C pattern")
def test_python_matches_the_c_functions_the_init_uses(tmp_path):
    program = tmp_path / "pattern_check.c"
    program.write_text(
        """
#include <stdio.h>
#include <stdlib.h>
#include "pattern.h"
int main(int argc, char **argv)
{
    pat_u64 seed = strtoull(argv[1], 0, 0), len = strtoull(argv[2], 0, 0), done = 0, piece = 1;
    unsigned char *buf = malloc(len + 1);
    struct pattern p;
    pattern_init(&p, seed);
    while (done < len) {  /* uneven pieces, as the init's chunked writes */
        pat_u64 n = len - done < piece ? len - done : piece;
        pattern_fill(&p, buf + done, n);
        done += n;
        piece = piece * 3 + 1;
    }
    for (pat_u64 i = 0; i < len; i++)
        printf("%02x", buf[i]);
    printf(" %016llx\\n", fnv1a64_update(FNV64_OFFSET, buf, len));
    return 0;
}
"""
    )
    exe = tmp_path / "pattern_check"
    subprocess.run(
        ["gcc", "-O2", f"-I{INIT_DIR}", "-o", str(exe), str(program)],
        check=True,
        capture_output=True,
    )
    rng = random.Random(1234)
    cases = [(0, 0), (0, 1), (3, 9), (2**64 - 1, 33)]
    cases += [(rng.getrandbits(64), rng.randrange(1, 3000)) for _ in range(6)]
    for seed, length in cases:
        out = subprocess.run(
            [str(exe), str(seed), str(length)], check=True, capture_output=True, text=True
        ).stdout.split()
        data = pat.pattern(seed, 0, length)
        assert out[0] == data.hex() if length else out == [f"{pat.fnv1a64(b''):016x}"]
        assert out[-1] == pat.fnv_hex(data)
