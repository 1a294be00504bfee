"""The opt-in loopback TCP endpoint: sockets from systemd (socket activation), callers by API key.

The service keeps PrivateNetwork=yes: it cannot open a TCP socket itself, so systemd opens it
(packaging/llmosd.socket, 127.0.0.1 only) and passes it in (LISTEN_FDS, no library: the protocol is
three environment variables and fds from 3). Over TCP the kernel says nothing about who is calling, so
each request names its app by a key from the configuration (`[apps."<id>"] api_keys`, in a file that
must be 0600): `Authorization: Bearer <key>` (OpenAI's clients) or `X-Api-Key`. No key, or an unknown
one, is 401; a peer that is not loopback is refused before reading anything. The account is the app
with no uid: a key stands for the app, whoever holds it.
"""

from __future__ import annotations

import hmac
import logging
import os
import socket
import stat
from pathlib import Path
from typing import Any

from system_services.caller import Caller
from system_services.http.wire import HttpError, HttpRequest

log = logging.getLogger("llmosd.http")
FIRST_FD = 3


def activated_tcp_sockets() -> list[socket.socket]:
    """The listening TCP sockets systemd passed to this process (none without socket activation)."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return []
    try:
        count = int(os.environ.get("LISTEN_FDS", "0"))
    except ValueError:
        return []
    for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(var, None)  # not inherited by anything this process starts
    out = []
    for fd in range(FIRST_FD, FIRST_FD + count):
        sock = socket.socket(fileno=fd)
        if sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM:
            out.append(sock)
        else:
            log.warning("ignoring a passed socket of family %s: only TCP is served this way", sock.family)
            sock.detach()
    return out


def keys_file_is_private(path: Path | None) -> bool:
    """API keys are secrets: the configuration holding them must be readable by its owner only."""
    if path is None:
        return False
    try:
        mode = path.stat().st_mode
    except OSError:
        return False
    return not mode & (stat.S_IRWXG | stat.S_IRWXO)


def is_loopback(peer: Any) -> bool:
    host = peer[0] if isinstance(peer, tuple) and peer else ""
    return host.startswith("127.") or host in ("::1", "::ffff:127.0.0.1") or host.startswith("::ffff:127.")


def key_caller(daemon: Any, req: HttpRequest, name: str) -> Caller:
    """The app whose key the request presents; 401 without one."""
    auth = req.headers.get("authorization", "")
    key = auth[7:].strip() if auth[:7].lower() == "bearer " else req.headers.get("x-api-key", "")
    if key:
        for app_id, policy in daemon.config.apps.items():
            if app_id != "default" and any(hmac.compare_digest(key, k) for k in policy.api_keys):
                return Caller(unique_name=name, uid=None, pid=None, app_id=app_id)
    raise HttpError(
        401, 'an API key from the configuration is needed ([apps."<id>"] api_keys)', "invalid_api_key"
    )
