"""The endpoint's listener: a unix socket, callers named by the kernel, requests routed to the APIs.

Identity is SO_PEERCRED (uid and pid, which a client cannot choose), turned into an app id exactly as
for a D-Bus caller, so one app has one account whichever way it calls. The socket itself may be 0666
in a 0755 directory: who connects is known per connection, and the policy and quotas do the rest.

Each connection reads requests in turn (keep-alive); each request is checked for a local Host/Origin,
routed, and answered in its API's error shape whatever goes wrong; a connection that closes takes its
running work with it (`Ownership.owner_left`, as a D-Bus client leaving the bus does).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from system_services.caller import Caller, peer_caller
from system_services.config import DEFAULT_CONFIG
from system_services.http.errors import as_http_error, ollama_error, openai_error
from system_services.http.exchange import Exchange
from system_services.http.generation import ClientGone
from system_services.http.local_origin import check_local
from system_services.http.responses import send_json
from system_services.http.tcp_access import (
    activated_tcp_sockets,
    is_loopback,
    key_caller,
    keys_file_is_private,
)
from system_services.http.wire import Connection, HttpError

log = logging.getLogger("llmosd.http")
Handler = Callable[[Exchange], Awaitable[None]]
UNKNOWN = Caller(unique_name="", uid=None, pid=None, app_id="unknown")  # until a key names the app


def default_socket(system: bool) -> Path | None:
    """/run/llmos/http.sock for the system daemon, $XDG_RUNTIME_DIR/llmos/http.sock for a user's."""
    if system:
        return Path("/run/llmos/http.sock")
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    return Path(runtime) / "llmos" / "http.sock" if runtime else None


class HttpServer:
    def __init__(self, daemon: Any, path: Path, routes: dict[tuple[str, str], Handler]) -> None:
        self.daemon, self.path, self.routes = daemon, path, routes
        cfg = daemon.config.http
        self.max_body, self.idle_s, self.max_connections = (
            cfg.max_body_bytes,
            cfg.idle_timeout_s,
            cfg.max_connections,
        )
        self._servers: list[asyncio.AbstractServer] = []
        self._ids = itertools.count(1)
        self._open: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        _remove_stale(self.path)
        self._servers.append(await asyncio.start_unix_server(self._serve, str(self.path)))
        os.chmod(self.path, 0o666)  # identity comes from the kernel, per connection
        log.info("HTTP endpoint (OpenAI, Ollama) on unix:%s", self.path)

    async def start_tcp(self, sock: socket.socket) -> None:
        """A loopback TCP socket from systemd: callers by API key (tcp_access.py)."""
        self._servers.append(await asyncio.start_server(self._serve_tcp, sock=sock))
        log.info("HTTP endpoint on tcp:%s (API keys)", sock.getsockname())

    async def stop(self) -> None:
        for server in self._servers:
            server.close()
        for task in list(self._open):
            task.cancel()
        if self._servers:
            with contextlib.suppress(OSError):
                self.path.unlink()

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not is_loopback(writer.get_extra_info("peername")):
            writer.close()
            return
        await self._serve(reader, writer, by_key=True)

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, by_key: bool = False
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._open.add(task)
        name = f"http:{next(self._ids)}"
        try:
            if len(self._open) > self.max_connections:
                await send_json(writer, 503, openai_error(HttpError(503, "too many connections")), False)
                return
            caller = None if by_key else peer_caller(writer.get_extra_info("socket"), name)
            conn = Connection(reader, writer, self.max_body, self.idle_s)
            while await self._one(conn, caller, name):
                pass
        except (ConnectionError, ClientGone, asyncio.CancelledError):
            pass
        except Exception as e:  # a fault of the daemon: logged once per kind, the connection closed
            as_http_error(e)
        finally:
            self._open.discard(task)
            self.daemon.ownership.owner_left(name)  # whatever it still had running is cancelled
            writer.close()

    async def _one(self, conn: Connection, caller: Caller | None, name: str) -> bool:
        """Read and answer one request; whether the connection stays open for the next."""
        try:
            req = await conn.next_request()
        except HttpError as e:  # the request could not be read: answer, then close (framing is lost)
            await send_json(conn.writer, e.status, openai_error(e), False)
            return False
        if req is None:
            return False
        shape = ollama_error if req.path.startswith("/api/") else openai_error
        ex = Exchange(self.daemon, caller or UNKNOWN, conn, req, shape)
        try:
            check_local(req)
            if caller is None:  # TCP: the request names its app by its key
                ex.caller = key_caller(self.daemon, req, name)
            handler = self.routes.get((req.method, req.path))
            if handler is None:
                if any(path == req.path for _, path in self.routes):
                    raise HttpError(405, f"{req.method} is not allowed on {req.path}")
                raise HttpError(404, f"no endpoint {req.path[:200]}", "not_found")
            await handler(ex)
        except ClientGone:
            return False
        except ConnectionError:
            return False
        except Exception as e:  # named or not, the client gets an answer and never a traceback
            err = as_http_error(e)
            try:
                await ex.fail(err)
            except ConnectionError:
                return False
        return req.keep_alive and not conn.eof


def _remove_stale(path: Path) -> None:
    """A socket left by a daemon that died is removed; one another daemon listens on is not taken."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise OSError(f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        path.unlink()
    else:
        raise OSError(f"{path} is in use (another llmosd?)")
    finally:
        probe.close()


async def start_endpoint(
    daemon: Any, system: bool, routes: dict[tuple[str, str], Handler]
) -> HttpServer | None:
    """The endpoint as configured ([http]), or None: disabled, no place for it, or the socket is taken.
    D-Bus is served either way; the reason is logged."""
    cfg = daemon.config.http
    path = cfg.socket or default_socket(system)
    if not cfg.enabled:
        return None
    if path is None:
        log.info("no HTTP endpoint: XDG_RUNTIME_DIR is not set (set [http] socket in the configuration)")
        return None
    server = HttpServer(daemon, path, routes)
    try:
        await server.start()
    except OSError as e:
        log.error("no HTTP endpoint on %s: %s", path, e.strerror or e)
        return None
    if tcp := activated_tcp_sockets():
        keys_path = daemon.config_path or DEFAULT_CONFIG
        if not keys_file_is_private(keys_path):
            log.error(
                "not serving TCP: %s holds the API keys and must be mode 0600 (chmod 600 it)", keys_path
            )
            for sock in tcp:
                sock.close()
        else:
            for sock in tcp:
                await server.start_tcp(sock)
    return server
