"""A TCP peer for the virtio-net tests, run inside the test's network namespace.

net_peer.py tcp-recv HOST PORT        prints "listening", then "received=N fnv=X"
net_peer.py tcp-send HOST PORT N SEED connects (retrying while nobody listens),
                                      sends pattern(SEED) bytes, prints "sent=N fnv=X"
"""

import socket
import sys
import time

from kvmkit.guests.linux.pattern import FNV64_OFFSET, fnv1a64, pattern


def main() -> None:
    what, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if what == "tcp-recv":
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, port))
        s.listen(1)
        s.settimeout(120)
        print("listening", flush=True)
        c, _ = s.accept()
        c.settimeout(120)
        h, n = FNV64_OFFSET, 0
        while data := c.recv(1 << 20):
            h = fnv1a64(data, h)
            n += len(data)
        print(f"received={n} fnv={h:016x}", flush=True)
    elif what == "tcp-send":
        n, seed = int(sys.argv[4]), int(sys.argv[5])
        data = pattern(seed, 0, n)
        deadline = time.monotonic() + 120
        while True:
            try:
                c = socket.create_connection((host, port), timeout=120)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        c.sendall(data)
        c.close()
        print(f"sent={n} fnv={fnv1a64(data):016x}", flush=True)


if __name__ == "__main__":
    main()
