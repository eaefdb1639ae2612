"""The containers' DNS server (issue 5), berth's counterpart of Docker's embedded 127.0.0.11: one server per
agent, listening (UDP and TCP, port 53) on the gateway address of each container network on the host, which
the containers' /etc/resolv.conf names as their only nameserver.

    A     a container's name, its short id (12 hex digits), a service's name or `tasks.<service>` (every
          running task, like Docker's dnsrr): the addresses of the running containers ON THE ASKER'S NETWORK
    AAAA  and any other type for such a name: NOERROR with no answer (containers have no IPv6 address)
    PTR   <address>.in-addr.arpa of a container on the asker's network: its name
    NXDOMAIN  for a berth name that exists only on other networks (never forwarded)
    else  forwarded unchanged to the asker's upstream nameservers (its --dns servers, else the host's) and
          the answer relayed: over UDP for a UDP question, over TCP for a TCP one

The asker's network is the one whose gateway address the question came to; a question from an address
outside that network's subnet on this host is REFUSED, so a container cannot read another network's names by
sending to its gateway. The records come from the controller (controller.dns, Dispatcher.Names): `Names`
holds them, keyed by network, so that each user network plugs in with its own gateway (`listen`).

The wire format is the small part of RFC 1035 this needs, written here (why not a library:
docs/dependencies.md): parse a query's header and single question, build answers that point back at the
question (compression pointer 0xC00C); forwarded messages are relayed as bytes, never parsed.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import socket
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

from agent.network import NetworkError

if TYPE_CHECKING:
    from agent.network.host import HostNetwork
    from agent.worker import Worker
    from berth.api import dispatcher_pb2 as d

log = logging.getLogger(__name__)

PORT = 53
TTL = 10  # seconds: short, so that a client that caches sees a removed or moved container soon
UDP_MAX = 512  # the largest answer sent over UDP (no EDNS); more sets TC and the client asks again over TCP
FORWARD_TIMEOUT_S = 2.0
MAX_UPSTREAMS = 3
MAX_IN_FLIGHT = 512  # UDP questions being answered at once; more are dropped (the client retries)
TCP_IDLE_S = 10.0
MAX_TCP_CONNECTIONS = 256  # open at once on all listeners; more are closed at once (the client retries)

A, PTR, AAAA, ANY = 1, 12, 28, 255
IN = 1
NOERROR, FORMERR, SERVFAIL, NXDOMAIN, NOTIMP, REFUSED = 0, 1, 2, 3, 4, 5
QR, AA, TC, RD, RA = 0x8000, 0x0400, 0x0200, 0x0100, 0x0080


class DnsError(NetworkError):
    """A DNS message that cannot be read, or a listen address that cannot be bound."""


# ---- wire format ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Query:
    id: int
    flags: int
    labels: tuple[bytes, ...]  # as received (case kept: resolvers may check it, "0x20" randomisation)
    qtype: int
    qclass: int

    @property
    def name(self) -> str:
        """Lower case, no trailing dot."""
        return b".".join(self.labels).decode("latin-1").lower()

    @property
    def opcode(self) -> int:
        return (self.flags >> 11) & 0xF


def _read_name(data: bytes, offset: int) -> tuple[tuple[bytes, ...], int]:
    """The labels of the name at `offset` and the offset just after it (compression pointers followed, at
    most 16 of them, so a loop of pointers cannot hang the server)."""
    labels: list[bytes] = []
    end = -1
    total = 0
    for _ in range(128 + 16):
        if offset >= len(data):
            raise DnsError("name runs past the end of the message")
        length = data[offset]
        if length == 0:
            return tuple(labels), (offset + 1 if end < 0 else end)
        if length & 0xC0 == 0xC0:
            if offset + 1 >= len(data):
                raise DnsError("truncated compression pointer")
            if end < 0:
                end = offset + 2
            offset = ((length & 0x3F) << 8) | data[offset + 1]
            continue
        if length & 0xC0:
            raise DnsError("unknown label type")
        label = data[offset + 1 : offset + 1 + length]
        if len(label) != length:
            raise DnsError("label runs past the end of the message")
        total += length + 1
        if total > 255:
            raise DnsError("name longer than 255 bytes")
        labels.append(label)
        offset += 1 + length
    raise DnsError("too many labels or compression pointers")


def parse_query(data: bytes) -> Query:
    """The header and the one question of a query; DnsError if it is not one."""
    if len(data) < 12:
        raise DnsError("message shorter than a DNS header")
    qid, flags, qdcount = struct.unpack("!3H", data[:6])
    if flags & QR:
        raise DnsError("a response, not a query")
    if qdcount != 1:
        raise DnsError(f"{qdcount} questions; one is supported")
    labels, offset = _read_name(data, 12)
    if offset + 4 > len(data):
        raise DnsError("question runs past the end of the message")
    qtype, qclass = struct.unpack("!2H", data[offset : offset + 4])
    return Query(qid, flags, labels, qtype, qclass)


def encode_name(labels: Iterable[bytes]) -> bytes:
    out = bytearray()
    for label in labels:
        if not 0 < len(label) < 64:
            raise DnsError(f"bad label length {len(label)}")
        out += bytes([len(label)]) + label
    return bytes(out) + b"\x00"


def labels_of(name: str) -> tuple[bytes, ...]:
    return tuple(part.encode("latin-1") for part in name.strip(".").split(".") if part)


def a_record(address: str, ttl: int = TTL) -> bytes:
    """An A record for the question's name (0xC00C: the name at offset 12, the question's)."""
    return b"\xc0\x0c" + struct.pack("!HHIH", A, IN, ttl, 4) + ipaddress.IPv4Address(address).packed


def ptr_record(target: str, ttl: int = TTL) -> bytes:
    rdata = encode_name(labels_of(target))
    return b"\xc0\x0c" + struct.pack("!HHIH", PTR, IN, ttl, len(rdata)) + rdata


def response(q: Query, rcode: int, answers: list[bytes] | None = None, limit: int = 65535,
             authoritative: bool = True) -> bytes:
    """The answer to `q`: its question echoed, then as many `answers` as fit in `limit` bytes (TC set when
    some did not)."""
    answers = answers or []
    question = encode_name(q.labels) + struct.pack("!2H", q.qtype, q.qclass)
    flags = QR | (q.flags & (0x7800 | RD)) | RA | (AA if authoritative else 0) | rcode
    room = limit - 12 - len(question)
    fitting: list[bytes] = []
    for rr in answers:
        if len(rr) > room:
            flags |= TC
            break
        fitting.append(rr)
        room -= len(rr)
    return struct.pack("!6H", q.id, flags, 1, len(fitting), 0, 0) + question + b"".join(fitting)


def error_for(data: bytes, rcode: int) -> bytes | None:
    """An answer with `rcode` to a message that could not be parsed as a query (None: not even a header)."""
    if len(data) < 12 or data[2] & 0x80:
        return None
    qid, flags = struct.unpack("!2H", data[:4])
    return struct.pack("!6H", qid, QR | (flags & (0x7800 | RD)) | RA | rcode, 0, 0, 0, 0)


def reverse_address(name: str) -> str | None:
    """10.88.1.5 from 5.1.88.10.in-addr.arpa (None: not an IPv4 reverse name)."""
    suffix = ".in-addr.arpa"
    if not name.endswith(suffix):
        return None
    parts = name[: -len(suffix)].split(".")
    if len(parts) != 4:
        return None
    try:
        return str(ipaddress.IPv4Address(".".join(reversed(parts))))
    except ValueError:
        return None


# ---- the records -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Record:
    container_id: str
    name: str
    network: str
    address: str
    service: str = ""

    def keys(self) -> list[str]:
        """Every name this container answers to, lower case."""
        out = [self.name.lower(), self.container_id[:12].lower()]
        if self.service:
            out += [self.service.lower(), "tasks." + self.service.lower()]
        return [k for k in out if k]


class Names:
    """The running containers' records, from the controller, and the lookups the server makes."""

    def __init__(self) -> None:
        self.records: dict[str, Record] = {}  # container id -> record
        self._by_name: dict[tuple[str, str], list[str]] | None = None  # (network, name) -> addresses
        self._by_address: dict[tuple[str, str], str] = {}  # (network, address) -> container name
        self._anywhere: set[str] = set()
        self.loaded = False  # a whole table has arrived (an agent that just started has none yet)

    def replace(self, records: Iterable[Record]) -> None:
        self.records = {r.container_id: r for r in records}
        self._by_name = None
        self.loaded = True

    def update(self, records: Iterable[Record], removed: Iterable[str]) -> None:
        for cid in removed:
            self.records.pop(cid, None)
        for r in records:
            self.records[r.container_id] = r
        self._by_name = None

    def _index(self) -> dict[tuple[str, str], list[str]]:
        # Rebuilt on the first lookup after a change: a burst of changes costs one rebuild.
        if self._by_name is None:
            by_name: dict[tuple[str, str], list[str]] = {}
            self._by_address = {}
            self._anywhere = set()
            for r in sorted(self.records.values(), key=lambda r: r.container_id):
                for key in dict.fromkeys(r.keys()):
                    by_name.setdefault((r.network, key), []).append(r.address)
                    self._anywhere.add(key)
                self._by_address[(r.network, r.address)] = r.name
            self._by_name = by_name
        return self._by_name

    def lookup(self, network: str, name: str) -> list[str] | None:
        """The addresses `name` has on `network`; None if it is no berth name there."""
        return self._index().get((network, name.lower().rstrip(".")))

    def elsewhere(self, name: str) -> bool:
        """Whether `name` is a berth name on some network."""
        self._index()
        return name.lower().rstrip(".") in self._anywhere

    def reverse(self, network: str, address: str) -> str | None:
        self._index()
        return self._by_address.get((network, address))


# ---- upstream nameservers --------------------------------------------------------------------------------


class HostResolvConf:
    """The host's nameservers, read again whenever the file changes. Loopback ones included: the server
    runs in the host's namespace, so unlike a container it reaches a local resolver (systemd-resolved)."""

    def __init__(self, path: Path = Path("/etc/resolv.conf")) -> None:
        self.path = path
        self._stamp: tuple[int, int] | None = None
        self._servers: list[str] = []

    def servers(self) -> list[str]:
        try:
            st = os.stat(self.path)
        except OSError:
            return []
        stamp = (st.st_mtime_ns, st.st_ino)
        if stamp != self._stamp:
            servers = []
            try:
                lines = self.path.read_text().splitlines()
            except OSError:
                lines = []
            for line in lines:
                parts = line.split()
                if len(parts) >= 2 and parts[0] == "nameserver":
                    with contextlib.suppress(ValueError):
                        servers.append(str(ipaddress.ip_address(parts[1])))
            self._servers, self._stamp = servers, stamp
        return list(self._servers)


def apply(names: Names, msg: d.NamesMessage) -> None:
    """A message of the controller's Names stream (controller.dns) applied to the table."""
    records = [Record(r.container_id, r.name, r.network, r.address, r.service) for r in msg.records]
    if msg.kind == msg.COMPLETE:
        names.replace(records)
    else:
        names.update(records, msg.removed)


async def serve_networks(server: DnsServer, network: HostNetwork) -> None:
    """Listen on the gateway of each container network present on this host now: the default one (`berth0`)
    and each user network one of its containers is on (agent.network.usernet); stop listening on the others."""
    want: dict[str, tuple[str, str]] = {}
    if network.configured and network.ipam.subnet is not None:
        want[str(network.ipam.gateway.ip)] = ("bridge", str(network.ipam.subnet))
    # Snapshots (one C-level copy each): attach and detach change these dicts in a worker thread meanwhile.
    used = {a.network for a in list(network.ipam.containers.values()) if a.network}
    for net_id, lease in list(network.user.leases.by_id.items()):
        if net_id in used:
            want[lease.gateway] = (lease.name, lease.subnet)
    await server.sync(want)


def container_upstreams(network: HostNetwork, worker: Worker, host: HostResolvConf) -> Callable[[str], list[str]]:
    """Where to forward a question from a container address of this host: its --dns servers, else the
    host's nameservers."""

    def upstreams(client: str) -> list[str]:
        for cid, allocation in list(network.ipam.containers.items()):  # a snapshot: see serve_networks
            if allocation.address == client:
                assignment = worker.assignments.get(cid)
                if assignment is not None and assignment.spec.dns:
                    return list(assignment.spec.dns)
                break
        return host.servers()

    return upstreams


class _Reply(asyncio.DatagramProtocol):
    def __init__(self, qid: bytes) -> None:
        self.qid = qid
        self.answer: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr: tuple[str | object, ...]) -> None:
        if data[:2] == self.qid and len(data) >= 12 and not self.answer.done():
            self.answer.set_result(data)

    def error_received(self, exc: Exception) -> None:
        if not self.answer.done():
            self.answer.set_exception(exc)


async def udp_exchange(server: str, port: int, message: bytes, timeout: float) -> bytes:
    """Send `message` to server:port from a new socket (a fresh random source port per question) and return
    the first answer with its id."""
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_datagram_endpoint(lambda: _Reply(message[:2]), remote_addr=(server, port))
    try:
        transport.sendto(message)
        return await asyncio.wait_for(proto.answer, timeout)
    finally:
        transport.close()


async def tcp_exchange(server: str, port: int, message: bytes, timeout: float) -> bytes:
    async def exchange() -> bytes:
        reader, writer = await asyncio.open_connection(server, port)
        try:
            writer.write(struct.pack("!H", len(message)) + message)
            await writer.drain()
            (length,) = struct.unpack("!H", await reader.readexactly(2))
            return await reader.readexactly(length)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    return await asyncio.wait_for(exchange(), timeout)


# ---- the server --------------------------------------------------------------------------------------------


@dataclass
class _Listener:
    network: str
    address: str
    subnet: ipaddress.IPv4Network
    udp: asyncio.DatagramTransport
    udp_protocol: _UdpServer
    tcp: asyncio.Server


class _UdpServer(asyncio.DatagramProtocol):
    def __init__(self, server: DnsServer, address: str) -> None:
        self.server = server
        self.address = address
        self.transport: asyncio.DatagramTransport | None = None
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)

    def datagram_received(self, data: bytes, addr: tuple[str | object, ...]) -> None:
        self.server._on_datagram(self, data, addr)


class DnsServer:
    """Listens on the gateway of each container network of this host and answers as the module says.

    `upstreams(address)` gives the nameservers to forward a question from that container address to."""

    def __init__(self, names: Names, upstreams: Callable[[str], list[str]], port: int = PORT,
                 upstream_port: int = PORT, timeout: float = FORWARD_TIMEOUT_S) -> None:
        self.names = names
        self.upstreams = upstreams
        self.port = port
        self.upstream_port = upstream_port
        self.timeout = timeout
        self._listeners: dict[str, _Listener] = {}  # listen address -> listener
        self._tasks: set[asyncio.Task[None]] = set()
        self._conns: set[asyncio.StreamWriter] = set()
        self._lock = asyncio.Lock()

    # ---- where ---------------------------------------------------------------------------------------

    async def listen(self, network: str, address: str, subnet: str) -> None:
        """Answer `network`'s containers (addresses in `subnet`) at address:port. Idempotent; a network that
        moved to another address or subnet is listened for at the new one only."""
        async with self._lock:  # containers of a new network may start at once, each making sure of it
            await self._listen(network, address, ipaddress.IPv4Network(subnet, strict=False))

    async def _listen(self, network: str, address: str, net: ipaddress.IPv4Network) -> None:
        old = self._listeners.get(address)
        if old is not None and old.network == network and old.subnet == net:
            return
        for other in [a for a, lst in self._listeners.items() if lst.network == network or a == address]:
            await self.close(other)
        loop = asyncio.get_running_loop()
        try:
            udp, proto = await loop.create_datagram_endpoint(lambda: _UdpServer(self, address),
                                                             local_addr=(address, self.port))
        except OSError as e:
            raise DnsError(f"cannot listen for DNS on {address}:{self.port}/udp: {e.strerror or e}; is another "
                           "DNS server bound to it (or to 0.0.0.0:53)?") from e
        try:
            tcp = await asyncio.start_server(lambda r, w: self._on_tcp(r, w, address), host=address,
                                             port=self.port, reuse_address=True)
        except OSError as e:
            udp.close()
            raise DnsError(f"cannot listen for DNS on {address}:{self.port}/tcp: {e.strerror or e}") from e
        self._listeners[address] = _Listener(network, address, net, udp, proto, tcp)
        log.info("DNS for network %s on %s:%d", network, address, self.port)

    async def sync(self, want: dict[str, tuple[str, str]]) -> None:
        """Listen on exactly these addresses (address -> (network, subnet)). A network that cannot be listened
        for is logged, and its containers keep the host's nameservers (`nameserver` says "")."""
        for address in [a for a in self._listeners if a not in want]:
            await self.close(address)
        for address, (network, subnet) in sorted(want.items()):
            try:
                await self.listen(network, address, subnet)
            except DnsError as e:
                log.error("network %s: %s", network, e)

    def nameserver(self, network: str) -> str:
        """The address containers on `network` use as their nameserver ("" when not listening for it)."""
        for lst in self._listeners.values():
            if lst.network == network:
                return lst.address
        return ""

    async def close(self, address: str) -> None:
        lst = self._listeners.pop(address, None)
        if lst is None:
            return
        lst.udp.close()
        lst.tcp.close()
        for writer in [w for w in self._conns if w.get_extra_info("sockname", ("",))[0] == address]:
            writer.close()
        await lst.tcp.wait_closed()
        await lst.udp_protocol.closed  # the socket is closed one loop iteration after close()

    async def close_all(self) -> None:
        for address in list(self._listeners):
            await self.close(address)
        for task in list(self._tasks):
            task.cancel()

    # ---- what ----------------------------------------------------------------------------------------

    async def answer(self, data: bytes, network: str, client: str, limit: int, tcp: bool) -> bytes | None:
        """The reply to one message from `client` on `network` (None: no reply at all)."""
        try:
            q = parse_query(data)
        except DnsError:
            return error_for(data, FORMERR)
        if q.opcode != 0:
            return response(q, NOTIMP, authoritative=False)
        name = q.name
        if q.qclass in (IN, ANY):
            if q.qtype in (PTR, ANY):
                address = reverse_address(name)
                target = self.names.reverse(network, address) if address else None
                if target:
                    return response(q, NOERROR, [ptr_record(target)], limit)
            addresses = self.names.lookup(network, name)
            if addresses is not None:
                answers = [a_record(a) for a in addresses] if q.qtype in (A, ANY) else []
                return response(q, NOERROR, answers, limit)
            if self.names.elsewhere(name):
                return response(q, NXDOMAIN, limit=limit)
            if not self.names.loaded and "." not in name:
                # Perhaps a container's name, and the table is not here yet (the agent just started): ask
                # again, rather than an upstream's NXDOMAIN that a client may keep.
                return response(q, SERVFAIL, limit=limit, authoritative=False)
        return await self.forward(q, data, client, tcp)

    async def forward(self, q: Query, data: bytes, client: str, tcp: bool) -> bytes:
        own = set(self._listeners)
        servers = [s for s in self.upstreams(client) if s not in own][:MAX_UPSTREAMS]
        exchange = tcp_exchange if tcp else udp_exchange
        for server in servers:
            try:
                return await exchange(server, self.upstream_port, data, self.timeout)
            except (OSError, TimeoutError, asyncio.IncompleteReadError, struct.error) as e:
                log.debug("forwarding %s to %s: %s", q.name, server, e or type(e).__name__)
        return response(q, SERVFAIL, authoritative=False)

    def _allowed(self, lst: _Listener, client: str) -> bool:
        try:
            return ipaddress.IPv4Address(client) in lst.subnet
        except ValueError:
            return False

    def _on_datagram(self, proto: _UdpServer, data: bytes, addr: tuple[str | object, ...]) -> None:
        lst = self._listeners.get(proto.address)
        if lst is None or len(self._tasks) >= MAX_IN_FLIGHT:
            return
        client = str(addr[0])
        if not self._allowed(lst, client):
            reply = error_for(data, REFUSED)
            if reply is not None and proto.transport is not None:
                proto.transport.sendto(reply, addr)
            return

        async def run() -> None:
            reply = await self.answer(data, lst.network, client, UDP_MAX, tcp=False)
            if reply is not None and proto.transport is not None and not proto.transport.is_closing():
                proto.transport.sendto(reply, addr)

        task = asyncio.create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("answering a DNS question: %s", task.exception())

    async def _on_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, address: str) -> None:
        if len(self._conns) >= MAX_TCP_CONNECTIONS:  # each is held up to TCP_IDLE_S: keep their number bounded
            sock = writer.get_extra_info("socket")
            if sock is not None:  # a reset, not a close: a flood leaves no TIME_WAIT on the server's address
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            return
        self._conns.add(writer)
        try:
            lst = self._listeners.get(address)
            client = str(writer.get_extra_info("peername", ("",))[0])
            if lst is None:
                return
            while True:
                try:
                    (length,) = struct.unpack("!H", await asyncio.wait_for(reader.readexactly(2), TCP_IDLE_S))
                    data = await asyncio.wait_for(reader.readexactly(length), TCP_IDLE_S)
                except (asyncio.IncompleteReadError, TimeoutError, OSError):
                    return
                if self._allowed(lst, client):
                    reply = await self.answer(data, lst.network, client, 65535, tcp=True)
                else:
                    reply = error_for(data, REFUSED)
                if reply is None:
                    return
                writer.write(struct.pack("!H", len(reply)) + reply)
                await writer.drain()
        except (ConnectionError, OSError):
            return
        finally:
            self._conns.discard(writer)
            writer.close()
