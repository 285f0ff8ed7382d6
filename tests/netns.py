"""Other "hosts" on this one machine: Linux network namespaces joined to the root one by veth pairs.

A process started with ``Host.popen`` has its own network stack: its 127.0.0.1 is its own, it has no
default route, and the one address it can reach is its gateway, the root namespace's end of its veth.
There, a TCP forwarder (asyncio, in a thread of the test process: no socat or other system tool)
listens for each service and passes the bytes on to the real server (a TCP address or a Unix socket),
so a worker in a namespace reaches Postgres and Redis only over the veth, as one on another machine does.

    with netns.hosts(2, {"database": database_url, "broker": redis_url}) as (a, b):
        proc = a.popen([CLI, "worker"], env=a.env())  # CATALOG_DATABASE_URL / CATALOG_BROKER_URL -> gateway

Needs root and ``ip`` (iproute2); ``netns_available()`` says why not otherwise. The filesystem is
shared with the namespaces (model files, data dirs): only the network is another machine's.
"""

from __future__ import annotations

import asyncio
import fcntl
import functools
import ipaddress
import itertools
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url

# Private /30s (gateway .1, host .2) are taken from here, clear of the routes and addresses already
# inside it. Traffic to them never leaves the veths (see Forwarder.listen).
POOL = ipaddress.IPv4Network("10.251.0.0/16")
# nc-<pid of the test process>-<counter>; its veth's root end adds "h" (at most 15 characters: pids
# have at most 7 digits, so fewer than 1000 namespaces per process)
NAME = re.compile(r"^nc-(\d+)-\d+$")
LOCK = Path(tempfile.gettempdir()) / "neuron-catalog-netns.lock"  # one allocation at a time, across processes
DEFAULT_PORTS = {"postgresql": 5432, "postgres": 5432, "redis": 6379}
_counter = itertools.count()

Target = tuple[str, int] | str  # (host, port), or a Unix socket's path


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True, timeout=30)


def _next_name() -> str:
    return f"nc-{os.getpid()}-{next(_counter)}"


@functools.cache
def netns_available() -> str | None:
    """None when namespaces and veths can be made here, else a one-line reason to skip with."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "no `ip` command (iproute2)"
    name = _next_name()
    try:  # a container without CAP_SYS_ADMIN / CAP_NET_ADMIN fails one of these
        for args in (("netns", "add", name), ("link", "add", f"{name}h", "type", "veth", "peer", "name", "eth0",
                                               "netns", name)):
            p = _ip(*args, check=False)
            if p.returncode != 0:
                return f"`ip {' '.join(args[:2])}` failed: {(p.stderr.strip().splitlines() or ['?'])[0]}"
        return None
    finally:
        _ip("link", "delete", f"{name}h", check=False)
        _ip("netns", "delete", name, check=False)


# --- the forwarder ---------------------------------------------------------------------------------


class Forwarder:
    """TCP listeners in the root namespace, each passing its connections on to one target.

    Postgres sees the forwarded sessions arrive over its Unix socket (or from 127.0.0.1), so its own
    tcp_keepalives_* (which catalog/requests.py sets so that a vanished worker's session and locks are
    dropped) do nothing; the forwarder's accepted sockets carry those keepalives instead, and a client
    that stops answering has its upstream connection, and so its Postgres session, closed.
    """

    def __init__(self, keepalive: tuple[int, int, int], user_timeout_s: float | None = None) -> None:
        self.keepalive = keepalive
        self.user_timeout_ms = None if user_timeout_s is None else int(user_timeout_s * 1000)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="netns-forwarder", daemon=True)
        self.thread.start()
        self.servers: list[asyncio.Server] = []
        self.writers: set[asyncio.StreamWriter] = set()

    def listen(self, address: str, device: str, target: Target) -> int:
        """Listen on ``address`` (a free port) of ``device``; returns the port.

        The socket, and so every connection it accepts, is bound to the veth: when the veth is down
        or gone its packets are dropped there. Unbound, they would follow the default route once the
        veth's route is gone (a cut link, a teardown with a FIN still retransmitting) and leave the
        machine for a private address that is nobody's."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, device.encode())
        sock.bind((address, 0))

        async def start() -> asyncio.Server:
            return await asyncio.start_server(functools.partial(self._pipe, target), sock=sock)

        server = asyncio.run_coroutine_threadsafe(start(), self.loop).result(timeout=30)
        self.servers.append(server)
        return int(sock.getsockname()[1])

    async def _pipe(self, target: Target, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        idle, interval, count = self.keepalive
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, count)
        if self.user_timeout_ms is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, self.user_timeout_ms)
        up_writer: asyncio.StreamWriter | None = None
        self.writers.add(writer)
        try:
            if isinstance(target, str):
                up_reader, up_writer = await asyncio.open_unix_connection(target)
            else:
                up_reader, up_writer = await asyncio.open_connection(*target)
            self.writers.add(up_writer)
            # Either side failing (a reset, a keepalive timeout) ends both: the server sees its client go.
            copies = [asyncio.ensure_future(_copy(reader, up_writer)), asyncio.ensure_future(_copy(up_reader, writer))]
            try:
                await asyncio.wait(copies, return_when=asyncio.FIRST_EXCEPTION)
            finally:
                for t in copies:
                    t.cancel()
                await asyncio.gather(*copies, return_exceptions=True)
        except (OSError, asyncio.CancelledError):
            pass  # target down, or the forwarder closing: the connection just ends (asyncio logs a raise)
        finally:
            for w in (writer, up_writer):
                if w is not None:
                    self.writers.discard(w)
                    w.close()

    def close(self) -> None:
        async def shutdown() -> None:
            for s in self.servers:
                s.close()
            # Server.close() (3.11) leaves open connections alone. Abort them (RST): a graceful close
            # to a cut host would retransmit its FIN for minutes after the veth is gone.
            for w in list(self.writers):
                w.transport.abort()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        try:
            asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(timeout=30)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=30)
            self.loop.close()


async def _copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(1 << 16):
        writer.write(data)
        await writer.drain()
    if writer.can_write_eof():
        writer.write_eof()  # a half-close passes on as one


# --- services: where the forwarder connects, and the URL a namespace uses ---------------------------


def target_of(url: str) -> Target:
    """Where a service URL's server is: libpq's ``?host=/dir`` means the Unix socket dir/.s.PGSQL.<port>."""
    u = make_url(url)
    scheme = u.drivername.split("+")[0]
    port = u.port or DEFAULT_PORTS.get(scheme)
    socket_dir = u.query.get("host")
    if isinstance(socket_dir, str) and socket_dir.startswith("/"):
        return f"{socket_dir}/.s.PGSQL.{port or 5432}"
    if u.host is None or port is None:
        raise ValueError(f"no host or port in {u.render_as_string()}")
    return (u.host, port)


def rewrite(url: str, host: str, port: int) -> str:
    """The URL with its server at host:port over TCP (user, password, database and options kept)."""
    u = make_url(url).difference_update_query(["host", "hostaddr", "port"])
    return u.set(host=host, port=port).render_as_string(hide_password=False)


@dataclass
class Host:
    """One namespace: ``address`` is its own, ``gateway`` the root namespace's end of its veth."""

    name: str
    veth: str  # the root namespace's end (the namespace's is eth0)
    address: str
    gateway: str
    urls: dict[str, str] = field(default_factory=dict)  # service -> its URL as seen from here
    sockets: list[str] = field(default_factory=list)  # Unix sockets hidden from this host's processes

    def url_for(self, service: str) -> str:
        return self.urls[service]

    def env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """``base`` (os.environ) with ``CATALOG_<SERVICE>_URL`` for each service ("database" ->
        CATALOG_DATABASE_URL, "broker" -> CATALOG_BROKER_URL): the test's own URLs (often in os.environ
        already) point at 127.0.0.1 or a Unix socket, so a worker must get these instead."""
        return {**(os.environ if base is None else base),
                **{f"CATALOG_{s.upper()}_URL": url for s, url in self.urls.items()}}

    def argv(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside the namespace, as its own machine: a hostname of its own (the name;
        holder_name() and Celery's node names use it), and no Unix sockets of the services. Those
        are files, which a network namespace does not hide: ``ip netns exec`` gives each command a
        private mount namespace, where /dev/null is bound over each, so the veth is the only way in."""
        script = [f"echo {self.name} >/proc/sys/kernel/hostname",
                  *(f"mount --bind /dev/null {shlex.quote(s)}" for s in self.sockets), 'exec "$@"']
        return ["ip", "netns", "exec", self.name, "unshare", "--uts", "sh", "-c", " && ".join(script), "sh", *argv]

    def popen(self, argv: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` inside the namespace (``ip netns exec`` execs it: same pid, so
        start_new_session=True still makes its pid its process group). Stopping it is the caller's job."""
        return subprocess.Popen(self.argv(argv), **kw)

    def run(self, argv: Sequence[str], check: bool = False, **kw: Any) -> subprocess.CompletedProcess[Any]:
        return subprocess.run(self.argv(argv), check=check, **kw)

    def set_link(self, up: bool) -> None:
        """Cut (or mend) this host's network without a FIN or RST, as a pulled cable: its TCP
        connections hang until keepalives time them out (the forwarder's packets meanwhile are dropped
        at the veth, not routed elsewhere)."""
        _ip("link", "set", self.veth, "up" if up else "down")


# --- namespaces ------------------------------------------------------------------------------------


def _delete(name: str) -> None:
    """Kill what still runs inside, then delete the namespace and its veth. Idempotent."""
    deadline = time.monotonic() + 10
    while True:
        pids = _ip("netns", "pids", name, check=False).stdout.split()
        if not pids or time.monotonic() > deadline:
            break
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)
    _ip("link", "delete", f"{name}h", check=False)  # deleting one end of a veth deletes both
    _ip("netns", "delete", name, check=False)


def _free_subnets(n: int) -> list[ipaddress.IPv4Network]:
    """n /30s of POOL that no address or route inside POOL overlaps (a route as broad as POOL or
    broader, e.g. a 10.0.0.0/8 of some VPN, is only shadowed by ours while the test runs)."""
    taken: list[ipaddress.IPv4Network] = []
    for line in _ip("-4", "-o", "route", "show", "table", "all").stdout.splitlines() \
            + _ip("-4", "-o", "addr").stdout.splitlines():
        for word in (w for w in line.split() if "." in w):  # ip_network("1000") would be 0.0.3.232
            try:
                net = ipaddress.ip_network(word, strict=False)
            except ValueError:
                continue
            if isinstance(net, ipaddress.IPv4Network) and net.prefixlen > POOL.prefixlen:
                taken.append(net)
    free = (s for s in POOL.subnets(new_prefix=30) if not any(s.overlaps(t) for t in taken))
    out = list(itertools.islice(free, n))
    if len(out) < n:
        raise RuntimeError(f"fewer than {n} free /30s in {POOL}")
    return out


def _remove_stale() -> None:
    """Namespaces left by test processes that died (SIGKILL, a crashed run): no teardown ran for them."""
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        m = NAME.match(line.split()[0]) if line.strip() else None
        if m and not Path(f"/proc/{m.group(1)}").exists():
            _delete(line.split()[0])


@contextmanager
def hosts(n: int, services: Mapping[str, str], keepalive: tuple[int, int, int] = (10, 5, 3),
          user_timeout_s: float | None = None) -> Iterator[list[Host]]:
    """n namespaces, each with a forwarder per service (name -> URL) on its gateway.

    ``keepalive`` (idle, interval, count seconds) is what the forwarder applies to the connections
    from the namespaces, in Postgres' place: catalog's keepalives_*_s defaults. Keepalives only run
    on an idle connection; one with data unacknowledged when its host vanished is given up by TCP's
    retransmissions (~15 min) unless ``user_timeout_s`` (TCP_USER_TIMEOUT, Postgres' tcp_user_timeout)
    is set. Everything made is removed on the way out, a failing test included.
    """
    targets = {s: target_of(url) for s, url in services.items()}
    sockets = [t for t in targets.values() if isinstance(t, str)]
    made: list[Host] = []
    with ExitStack() as stack:
        forwarder = Forwarder(keepalive, user_timeout_s)

        def delete_all() -> None:
            for h in made:
                _delete(h.name)

        stack.callback(delete_all)  # runs last: after the forwarder has let go of the veths
        stack.callback(forwarder.close)
        with LOCK.open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # subnets are picked and taken by one process at a time
            _remove_stale()
            for subnet in _free_subnets(n):
                gateway, address = (str(a) for a in itertools.islice(subnet.hosts(), 2))
                name = _next_name()
                host = Host(name, f"{name}h", address, gateway, sockets=sockets)
                _ip("netns", "add", name)
                made.append(host)
                _ip("link", "add", host.veth, "type", "veth", "peer", "name", "eth0", "netns", name)
                _ip("addr", "add", f"{gateway}/30", "dev", host.veth)
                _ip("link", "set", host.veth, "up")
                for args in (("addr", "add", f"{address}/30", "dev", "eth0"), ("link", "set", "eth0", "up"),
                             ("link", "set", "lo", "up")):
                    _ip("-n", name, *args)
                for service, url in services.items():
                    host.urls[service] = rewrite(url, gateway, forwarder.listen(gateway, host.veth, targets[service]))
        yield made
