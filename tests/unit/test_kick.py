"""The vCPU kick needs a signal handler, which Python installs only from the main
thread: elsewhere kvmkit says so instead of installing one behind the program's back."""

import subprocess
import sys

PROGRAM = """
import threading
from kvmkit.kvm.vcpu import install_kick_handler
seen = []
t = threading.Thread(target=lambda: seen.append(install_kick_handler()))
t.start(); t.join()
print(seen[0], install_kick_handler(), install_kick_handler())
"""


def test_the_kick_handler_is_installed_from_the_main_thread_only():
    p = subprocess.run([sys.executable, "-c", PROGRAM], capture_output=True, text=True)
    assert p.stdout.split() == ["False", "True", "True"], p.stderr
