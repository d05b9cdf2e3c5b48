"""Bounded serving for the operator's two ports (progress over TLS, metrics over plain HTTP).

Any pod that can route to the operator can connect, so nothing a client does may grow the
operator's threads, descriptors, memory or API calls without bound:

- one event-loop thread serves both ports (aiohttp); blocking work (a TokenReview, reading and
  writing a run) runs in a small pool, and beyond `Limits.queue` waiting calls the answer is 503;
- at most `max_connections` connections are open per port: beyond that the accept loop waits and
  new clients wait in the kernel's backlog, holding none of our descriptors; at most `per_client`
  from one address (more are closed at accept, before any TLS work);
- the TLS handshake must finish within `handshake_s`, a connection idles at most `idle_s` and
  lives at most `lifetime_s` (a client that trickles bytes is cut off then);
- each client address may send `rate` requests a second (burst `burst`), beyond that 429;
- a handler's exception is logged with its traceback; the client reads only "internal error".

Every per-client map is a bounded LRU (`Recent`): the oldest entry goes when it is full.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from aiohttp import web

from .bounded import Recent

log = logging.getLogger("alignment_operator.listener")


@dataclass(frozen=True)
class Limits:
    max_connections: int = 256   # open at once on one port
    per_client: int = 16         # open at once from one address
    handshake_s: float = 5.0     # to finish the TLS handshake
    idle_s: float = 5.0          # without a request
    lifetime_s: float = 30.0     # a connection's whole life (keep-alive included)
    body_s: float = 10.0         # to send a request's body
    rate: float = 20.0           # requests a second from one address ...
    burst: float = 40.0          # ... with this many at once
    clients: int = 4096          # addresses remembered for rate limiting

    @classmethod
    def from_env(cls, prefix: str, **defaults: Any) -> "Limits":
        """Defaults, each overridable by <prefix>_<FIELD> (e.g. ALIGNMENT_PROGRESS_MAX_CONNECTIONS)."""
        values = dict(defaults)
        for name, kind in ((f, type(getattr(cls, f))) for f in cls.__dataclass_fields__):
            raw = os.environ.get(f"{prefix}_{name.upper()}")
            if raw:
                try:
                    values[name] = kind(raw)
                except ValueError:
                    raise SystemExit(f"{prefix}_{name.upper()}={raw!r}: expected a {kind.__name__}") from None
        return cls(**values)


class RateLimiter:
    """A token bucket per key (a client address): `allow` takes one token or says no."""

    def __init__(self, rate: float, burst: float, size: int = 4096, clock: Callable[[], float] = time.monotonic):
        self.rate, self.burst, self.clock = rate, burst, clock
        self._buckets: Recent = Recent(size)
        self._lock = threading.Lock()

    def allow(self, key: str) -> bool:
        now = self.clock()
        with self._lock:
            tokens, last = self._buckets.touch(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            ok = tokens >= 1
            self._buckets[key] = (tokens - 1 if ok else tokens, now)
            return ok

    def __len__(self) -> int:
        return len(self._buckets)


class Busy(Exception):
    """Too many blocking calls wait already: the client should come back later (503)."""


class Pool:
    """Blocking calls off the event loop, in at most `workers` threads; at most `queue` wait."""

    def __init__(self, workers: int = 4, queue: int = 32):
        self.executor = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="operator-http-work")
        self.queue, self.waiting = queue, 0   # touched only on the loop's thread

    async def run(self, fn: Callable, *args: Any) -> Any:
        if self.waiting >= self.queue:
            raise Busy()
        self.waiting += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)
        finally:
            self.waiting -= 1


def client_of(request: web.BaseRequest) -> str:
    peer = request.transport.get_extra_info("peername") if request.transport else None
    return str(peer[0]) if peer else "?"


def reply(code: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(body, status=code, headers=headers)


Handle = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


class _Server(web.Server):
    """aiohttp's connection manager, telling the listener when a connection ends."""

    def __init__(self, handler: Handle, ended: dict, **kwargs: Any):
        super().__init__(handler, **kwargs)
        self._ended = ended

    def connection_lost(self, handler, exc=None) -> None:
        super().connection_lost(handler, exc)
        done = self._ended.pop(handler, None)
        if done is not None and not done.done():
            done.set_result(None)


class Listener:
    """One port: accept within the limits, then aiohttp serves `handle` on the connection."""

    def __init__(self, name: str, handle: Handle, port: int, host: str = "0.0.0.0",
                 ssl_context: ssl.SSLContext | None = None, limits: Limits = Limits()):
        self.name, self.handle, self.host, self.port = name, handle, host, port
        self.ssl_context, self.limits = ssl_context, limits
        self.rate = RateLimiter(limits.rate, limits.burst, limits.clients)
        self.open = 0                          # connections held now (the loop's thread only)
        self.by_client: dict[str, int] = {}    # address -> open connections (entries removed at 0)
        self.turned_away = 0                   # closed at accept: over per_client
        self._ended: dict = {}
        self._slots: asyncio.Semaphore | None = None
        self._http: _Server | None = None
        self._sock: socket.socket | None = None
        self._task: asyncio.Task | None = None

    async def start(self) -> int:
        """Listen; returns the bound port (port 0 picks a free one)."""
        self._slots = asyncio.Semaphore(self.limits.max_connections)
        self._http = _Server(self._guarded, self._ended, keepalive_timeout=self.limits.idle_s,
                             lingering_time=1.0, max_line_size=8190, max_field_size=8190, max_headers=64,
                             access_log=None)
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.port))
            sock.listen(128)
        except OSError:
            sock.close()
            raise
        sock.setblocking(False)
        self._sock, self.port = sock, sock.getsockname()[1]
        self._task = asyncio.get_running_loop().create_task(self._accept(), name=f"{self.name}-accept")
        return self.port

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
        if self._sock:
            self._sock.close()
        if self._http:
            await self._http.shutdown(1.0)

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._slots.acquire()
            try:
                conn, addr = await loop.sock_accept(self._sock)
            except asyncio.CancelledError:
                raise
            except OSError as e:  # EMFILE and the like: say so, wait, go on
                self._slots.release()
                log.warning("%s: accept failed: %s", self.name, e)
                await asyncio.sleep(0.5)
                continue
            ip = str(addr[0])
            if self.by_client.get(ip, 0) >= self.limits.per_client:
                self.turned_away += 1
                conn.close()
                self._slots.release()
                continue
            self.by_client[ip] = self.by_client.get(ip, 0) + 1
            self.open += 1
            loop.create_task(self._serve(conn, ip))

    async def _serve(self, conn: socket.socket, ip: str) -> None:
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        made: list = []

        def protocol():
            handler = self._http()
            self._ended[handler] = done
            made.append(handler)
            return handler

        transport = None
        try:
            transport, _ = await loop.connect_accepted_socket(
                protocol, conn, ssl=self.ssl_context,
                ssl_handshake_timeout=self.limits.handshake_s if self.ssl_context else None)
            await asyncio.wait_for(asyncio.shield(done), self.limits.lifetime_s)
        except (OSError, ssl.SSLError, asyncio.TimeoutError, ConnectionError):
            pass  # a failed or slow handshake, a reset, the lifetime's end: the connection goes
        except Exception:  # noqa: BLE001 - one connection's trouble never stops the others
            log.exception("%s: connection from %s", self.name, ip)
        finally:
            for handler in made:
                self._ended.pop(handler, None)
            if transport is not None and not transport.is_closing():
                transport.abort()
            elif transport is None:
                conn.close()
            self.open -= 1
            left = self.by_client.get(ip, 1) - 1
            if left:
                self.by_client[ip] = left
            else:
                self.by_client.pop(ip, None)
            self._slots.release()

    async def _guarded(self, request: web.BaseRequest) -> web.StreamResponse:
        if not self.rate.allow(client_of(request)):
            return reply(429, {"error": "too many requests"}, {"Retry-After": "1"})
        try:
            return await self.handle(request)
        except Busy:
            return reply(503, {"error": "busy; retry later"}, {"Retry-After": "2"})
        except Exception:  # noqa: BLE001 - the details go to the log, never to the client
            log.exception("%s: %s %s failed", self.name, request.method, request.path[:200])
            return reply(500, {"error": "internal error"})


class Loop:
    """The one thread that runs the operator's listeners (kopf's own loop stays kopf's)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="operator-http", daemon=True)
        self.thread.start()

    def call(self, coro: Awaitable, timeout: float = 30.0) -> Any:
        """Run a coroutine on the loop from any other thread and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)


_loop: Loop | None = None
_loop_guard = threading.Lock()


def shared_loop() -> Loop:
    global _loop
    with _loop_guard:
        if _loop is None:
            _loop = Loop()
        return _loop


def serve(listener: Listener, loop: Loop | None = None) -> int:
    """Start `listener` on the shared loop thread (or `loop`); returns its port."""
    return (loop or shared_loop()).call(listener.start())
