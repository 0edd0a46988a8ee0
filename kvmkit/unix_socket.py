"""Unix socket paths: claiming one for a server (the control API, a migration target)."""

import os
import socket
import stat
from pathlib import Path

from kvmkit.errors import ConfigError


def claim_unix_path(path: str | os.PathLike[str], what: str) -> None:
    """Check that `what` (a server's socket) can be created at `path`: remove a stale
    socket that a process which is gone left behind; refuse a live one, any other kind
    of file, or a missing directory, naming the fix."""
    path = Path(path)
    if not path.parent.is_dir():
        raise ConfigError(f"{what} directory {path.parent} does not exist")
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ConfigError(f"{path} exists and is not a socket: choose another path for {what}")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        path.unlink()  # nobody listens: a stale socket
        return
    finally:
        probe.close()
    raise ConfigError(f"another process is listening on {path}: choose another path for {what}")
