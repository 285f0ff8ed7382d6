"""tests/netns.py itself: a process in a namespace reaches Postgres and Redis through its gateway and
in no other way, a cut link ends its Postgres session, and nothing is left behind."""

from __future__ import annotations

import ipaddress
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import netns
import pytest
from sqlalchemy import Engine, make_url, text

pytestmark = [pytest.mark.netns,
              pytest.mark.skipif(netns.netns_available() is not None, reason=str(netns.netns_available()))]

LIMIT_S = 60.0  # a stuck process, not a speed assertion

# Run inside a namespace with Host.env(): the catalog's own env vars, as a worker reads them.
PROBE = r"""
import json, os, socket, sys
import redis
from sqlalchemy import create_engine, text

out = {"hostname": socket.gethostname()}
engine = create_engine(os.environ["CATALOG_DATABASE_URL"], connect_args={"connect_timeout": 10})
with engine.connect() as c:
    out["select"] = c.execute(text("SELECT 1")).scalar()
out["ping"] = redis.Redis.from_url(os.environ["CATALOG_BROKER_URL"], socket_timeout=10).ping()

def reach(family, address):
    try:
        with socket.socket(family) as s:
            s.settimeout(5)
            s.connect(address)
        return "connected"
    except OSError as e:
        return type(e).__name__

redis_port = int(sys.argv[1])
out["loopback_redis"] = reach(socket.AF_INET, ("127.0.0.1", redis_port))
out["root_address_redis"] = reach(socket.AF_INET, (sys.argv[2], redis_port))  # the root's other address
if len(sys.argv) > 3:
    out["unix_socket"] = reach(socket.AF_UNIX, sys.argv[3])
print(json.dumps(out))
"""


@pytest.fixture(autouse=True)
def no_leak() -> Iterator[None]:
    """No packet for the pool's addresses leaves by another interface than the hosts' veths (this
    workplace flags traffic to private addresses; a socket not bound to its veth would send some
    out of the default route once the veth's route is gone)."""
    leaks: list[str] = []
    stop = threading.Event()
    # ETH_P_ALL: only such sockets see outgoing frames; SOCK_DGRAM: without their link-layer header
    with socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(0x0003)) as sniffer:
        sniffer.settimeout(0.1)

        def sniff() -> None:
            while not stop.is_set():
                try:
                    data, (ifname, proto, pkttype, *_) = sniffer.recvfrom(1 << 16)
                except TimeoutError:
                    continue
                if proto != 0x0800 or pkttype != socket.PACKET_OUTGOING or ifname.startswith("nc-"):
                    continue
                if (dst := ipaddress.ip_address(data[16:20])) in netns.POOL:
                    leaks.append(f"{ifname} -> {dst}")

        thread = threading.Thread(target=sniff, daemon=True)
        thread.start()
        yield
        stop.set()
        thread.join()
    assert not leaks


def sockets_to(hs: list[netns.Host]) -> str:
    """The root namespace's TCP sockets to these hosts that could still send (TIME-WAIT ones only answer)."""
    return "".join(subprocess.run(["ss", "-Htan", "exclude", "time-wait", "dst", h.address], check=True, capture_output=True,
                                  text=True).stdout for h in hs)


def namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], check=True, capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def root_address() -> str:
    """An address of the root namespace other than loopback (eth0's): a worker must not reach it either."""
    out = subprocess.run(["ip", "-4", "-o", "addr"], check=True, capture_output=True, text=True).stdout
    addrs = [line.split()[3].split("/")[0] for line in out.splitlines() if " lo " not in line]
    return next((a for a in addrs if not a.startswith("10.251.")), "127.0.0.1")


def test_hosts_reach_services_only_through_their_veth(database_url: str, redis_url: str) -> None:
    before = namespaces()
    redis_port = make_url(redis_url).port
    target = netns.target_of(database_url)
    with netns.hosts(2, {"database": database_url, "broker": redis_url}) as hs:
        assert len({h.name for h in hs}) == 2 and len({h.gateway for h in hs}) == 2
        assert namespaces() >= {h.name for h in hs}
        for h in hs:
            env = h.env()
            assert make_url(env["CATALOG_DATABASE_URL"]).host == h.gateway
            assert make_url(env["CATALOG_BROKER_URL"]).host == h.gateway
            argv = [sys.executable, "-c", PROBE, str(redis_port), root_address()]
            if isinstance(target, str):
                argv.append(target)  # pgserver's Unix socket: a file, reachable unless hidden
            p = h.run(argv, env=env, capture_output=True, text=True, timeout=LIMIT_S)
            assert p.returncode == 0, p.stderr
            out = json.loads(p.stdout)
            assert out["select"] == 1 and out["ping"] is True
            assert out["hostname"] == h.name
            assert out["loopback_redis"] == "ConnectionRefusedError"  # the namespace's own 127.0.0.1
            assert out["root_address_redis"] != "connected"  # no route out but the /30
            if isinstance(target, str):
                assert out["unix_socket"] == "ConnectionRefusedError"  # /dev/null bound over it
    assert namespaces() == before
    assert sockets_to(hs) == ""
    links = subprocess.run(["ip", "-o", "link"], check=True, capture_output=True, text=True).stdout
    assert not any(h.veth in links for h in hs)


def test_a_cut_link_ends_the_postgres_session(database_url: str, engine: Engine) -> None:
    """Postgres sees the forwarder, not the worker: its own keepalives cannot notice a vanished
    worker, so the forwarder's must, and close the session (and so free the worker's locks)."""
    holder = r"""
import os, sys, time
from sqlalchemy import create_engine, text
with create_engine(os.environ["CATALOG_DATABASE_URL"]).connect() as c:
    print(c.execute(text("SELECT pg_backend_pid()")).scalar(), flush=True)
    time.sleep(3600)
"""
    with netns.hosts(1, {"database": database_url}, keepalive=(1, 1, 2)) as (h,):
        proc = h.popen([sys.executable, "-c", holder], env=h.env(), stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        pid = int(proc.stdout.readline())

        def alive() -> bool:
            with engine.connect() as c:
                return bool(c.execute(text("SELECT count(*) FROM pg_stat_activity WHERE pid = :p"), {"p": pid}).scalar())

        assert alive()
        # Past the client's delayed ACK of that reply: data still unacknowledged at the cut would be
        # TCP's retransmission timeout's (~15 min, see netns.hosts), not the keepalives'.
        time.sleep(0.5)
        h.set_link(False)  # no FIN, no RST: only keepalives can tell
        deadline = time.monotonic() + LIMIT_S
        while alive():
            assert time.monotonic() < deadline, "the session outlived its cut link"
            time.sleep(0.2)
        assert proc.poll() is None  # the client itself never noticed: its session ended at the far end
    proc.wait(timeout=LIMIT_S)  # killed by the teardown
    assert sockets_to([h]) == ""
