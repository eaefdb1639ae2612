"""The containers' DNS server (agent.network.dns, issue 5) over real sockets on this slot's loopback addresses:
names by network, services, AAAA/PTR, NXDOMAIN for other networks' names, REFUSED outside the network,
forwarding to an upstream over UDP and TCP, truncation, a real client (glibc's resolver, through getent),
and closing leaves no listener. The whole path on a cluster is tests/e2e/test_dns.py."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
import struct
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import cast

import pytest

from agent.network import dns
from agent.network.dns import DnsServer, Names, Record
from tests.conftest import SLOT

GW = f"127.0.{SLOT}.53"  # the server, as on a network's gateway
SUBNET = f"127.0.{SLOT}.0/24"
CLIENT = f"127.0.{SLOT}.54"  # a container on that network
UPSTREAM = f"127.0.{SLOT}.55"  # a nameserver the server forwards to
NOBODY = f"127.0.{SLOT}.56"  # nothing listens there
OUTSIDER = f"127.1.{SLOT}.54"  # an address outside the network's subnet

CID_WEB = "a1" * 32
CID_DB = "b2" * 32
CID_T1, CID_T2 = "c3" * 32, "d4" * 32
CID_OTHER = "e5" * 32

RECORDS = [
    Record(CID_WEB, "web", "bridge", f"127.0.{SLOT}.60"),
    Record(CID_DB, "db", "bridge", f"127.0.{SLOT}.61"),
    Record(CID_T1, "api.1.aaaaaa", "bridge", f"127.0.{SLOT}.62", service="api"),
    Record(CID_T2, "api.2.bbbbbb", "bridge", f"127.0.{SLOT}.63", service="api"),
    Record(CID_OTHER, "secret", "backend", "10.200.0.9"),
]


# ---- an independent client: queries and answers taken apart by hand, not with the module under test ----


def query(name: str, qtype: int = 1, qid: int = 0x1234, rd: bool = True) -> bytes:
    qname = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    return struct.pack("!6H", qid, 0x0100 if rd else 0, 1, 0, 0, 0) + qname + struct.pack("!2H", qtype, 1)


def decode(reply: bytes) -> tuple[int, int, list[tuple[int, bytes]]]:
    """(id, rcode, [(type, rdata)]) with TC reported as rcode | 0x100."""
    qid, flags, qd, an = struct.unpack("!4H", reply[:8])
    assert flags & 0x8000, "not a response"
    off = 12
    for _ in range(qd):
        while reply[off]:
            off += 1 + reply[off]
        off += 5
    answers = []
    for _ in range(an):
        assert reply[off:off + 2] == b"\xc0\x0c"
        rtype, _cls, _ttl, rdlen = struct.unpack("!HHIH", reply[off + 2:off + 12])
        answers.append((rtype, reply[off + 12:off + 12 + rdlen]))
        off += 12 + rdlen
    return qid, (flags & 0xF) | (0x100 if flags & 0x0200 else 0), answers


def addresses(answers: list[tuple[int, bytes]]) -> list[str]:
    return sorted(socket.inet_ntoa(rdata) for rtype, rdata in answers if rtype == 1)


async def ask_udp(message: bytes, source: str = CLIENT, server: str = GW, timeout: float = 5) -> bytes:
    loop = asyncio.get_running_loop()
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setblocking(False)
    try:
        s.bind((source, 0))
        await loop.sock_sendto(s, message, (server, 53))
        data, _ = await asyncio.wait_for(loop.sock_recvfrom(s, 65535), timeout)
        return data
    finally:
        s.close()


async def ask_tcp(message: bytes, source: str = CLIENT) -> bytes:
    reader, writer = await asyncio.open_connection(GW, 53, local_addr=(source, 0))
    try:
        writer.write(struct.pack("!H", len(message)) + message)
        (n,) = struct.unpack("!H", await asyncio.wait_for(reader.readexactly(2), 5))
        return await reader.readexactly(n)
    finally:
        writer.close()


class Upstream(asyncio.DatagramProtocol):
    """A nameserver that answers example.test with 192.0.2.7 and everything else NXDOMAIN (UDP and TCP); it
    records the questions it got."""

    def __init__(self) -> None:
        self.got: list[bytes] = []
        self.transport: asyncio.DatagramTransport | None = None

    def reply(self, data: bytes) -> bytes:
        self.got.append(data)
        q = data[12:]
        end = q.index(b"\0") + 5
        name = q[:end]
        if name.startswith(b"\x07example\x04test\x00"):
            return (data[:2] + struct.pack("!5H", 0x8180, 1, 1, 0, 0) + name +
                    b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 300, 4) + socket.inet_aton("192.0.2.7"))
        return data[:2] + struct.pack("!5H", 0x8183, 1, 0, 0, 0) + name

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | object, ...]) -> None:
        assert self.transport is not None
        self.transport.sendto(self.reply(data), addr)

    async def on_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        (n,) = struct.unpack("!H", await reader.readexactly(2))
        answer = self.reply(await reader.readexactly(n))
        writer.write(struct.pack("!H", len(answer)) + answer)
        await writer.drain()
        writer.close()


def run(test: Callable[[DnsServer, Upstream], Awaitable[None]], upstreams: list[str] | None = None) -> None:
    """Run `test` with a server listening for network "bridge" on GW and an upstream on UPSTREAM."""

    async def main() -> None:
        names = Names()
        names.replace(RECORDS)
        server = DnsServer(names, lambda client: list(upstreams if upstreams is not None else [UPSTREAM]),
                           timeout=1.0)
        loop = asyncio.get_running_loop()
        up = Upstream()
        udp, _ = await loop.create_datagram_endpoint(lambda: up, local_addr=(UPSTREAM, 53))
        tcp = await asyncio.start_server(up.on_tcp, UPSTREAM, 53, reuse_address=True)
        try:
            await server.listen("bridge", GW, SUBNET)
            await test(server, up)
        finally:
            await server.close_all()
            udp.close()
            tcp.close()
            await tcp.wait_closed()

    asyncio.run(main())


# ---- tests -------------------------------------------------------------------------------------------------


def test_names_ids_and_services_resolve_on_their_network_over_udp_and_tcp() -> None:
    async def test(server: DnsServer, up: Upstream) -> None:
        for ask in (ask_udp, ask_tcp):
            qid, rcode, answers = decode(await ask(query("web")))
            assert (qid, rcode, addresses(answers)) == (0x1234, 0, [f"127.0.{SLOT}.60"])
            _, rcode, answers = decode(await ask(query("Db")))  # any case
            assert (rcode, addresses(answers)) == (0, [f"127.0.{SLOT}.61"])
            _, rcode, answers = decode(await ask(query(CID_WEB[:12])))  # the short id
            assert (rcode, addresses(answers)) == (0, [f"127.0.{SLOT}.60"])
            for name in ("api", "tasks.api"):  # every running task of the service
                _, rcode, answers = decode(await ask(query(name)))
                assert (rcode, addresses(answers)) == (0, [f"127.0.{SLOT}.62", f"127.0.{SLOT}.63"])
        assert up.got == []  # none of these was forwarded

    run(test)


def test_aaaa_is_empty_ptr_names_the_container_and_other_networks_names_do_not_exist() -> None:
    async def test(server: DnsServer, up: Upstream) -> None:
        _, rcode, answers = decode(await ask_udp(query("web", qtype=28)))
        assert (rcode, answers) == (0, [])
        _, rcode, answers = decode(await ask_udp(query(f"61.{SLOT}.0.127.in-addr.arpa", qtype=12)))
        assert rcode == 0 and answers == [(12, b"\x02db\x00")]
        # "secret" runs on network backend only: not here, and the question does not leave the host.
        _, rcode, answers = decode(await ask_udp(query("secret")))
        assert (rcode, answers) == (3, [])
        assert up.got == []
        # The server's answers change with the table.
        server.names.update([Record(CID_OTHER, "secret", "bridge", f"127.0.{SLOT}.64")], removed=[CID_WEB])
        _, rcode, answers = decode(await ask_udp(query("secret")))
        assert (rcode, addresses(answers)) == (0, [f"127.0.{SLOT}.64"])
        _, rcode, _ = decode(await ask_udp(query("web")))
        assert rcode == 3  # forwarded now: upstream says NXDOMAIN
        assert len(up.got) == 1

    run(test)


def test_other_names_are_forwarded_and_the_upstream_answer_relayed() -> None:
    async def test(server: DnsServer, up: Upstream) -> None:
        message = query("example.test", qid=0x4242)
        reply = await ask_udp(message)
        assert reply == up.reply(message)  # relayed byte for byte
        assert up.got[0] == message  # the question forwarded unchanged
        _, rcode, answers = decode(await ask_tcp(query("example.test")))  # TCP to TCP
        assert (rcode, addresses(answers)) == (0, ["192.0.2.7"])
        _, rcode, _ = decode(await ask_udp(query("nowhere.test")))
        assert rcode == 3

    run(test)


def test_an_unreachable_upstream_gives_servfail_and_the_next_one_is_tried() -> None:
    async def test(server: DnsServer, up: Upstream) -> None:
        _, rcode, answers = decode(await ask_udp(query("example.test")))
        assert (rcode, addresses(answers)) == (0, ["192.0.2.7"])  # NOBODY failed, UPSTREAM answered

    run(test, upstreams=[NOBODY, UPSTREAM])

    async def alone(server: DnsServer, up: Upstream) -> None:
        _, rcode, _ = decode(await ask_udp(query("example.test")))
        assert rcode == 2

    run(alone, upstreams=[NOBODY])


def test_questions_from_outside_the_network_are_refused() -> None:
    async def test(server: DnsServer, up: Upstream) -> None:
        _, rcode, answers = decode(await ask_udp(query("web"), source=OUTSIDER))
        assert (rcode, answers) == (5, [])
        _, rcode, answers = decode(await ask_tcp(query("example.test"), source=OUTSIDER))
        assert (rcode, answers) == (5, [])
        assert up.got == []

    run(test)


def test_a_large_service_is_truncated_over_udp_and_whole_over_tcp() -> None:
    async def test(server: DnsServer, up: Upstream) -> None:
        many = [Record(f"{i:064x}", f"big.{i}.x", "bridge", f"10.1.{i // 250}.{i % 250 + 1}", service="big")
                for i in range(100)]
        server.names.update(many, removed=[])
        _, rcode, answers = decode(await ask_udp(query("big")))
        assert rcode & 0x100 and 0 < len(answers) < 100  # TC: ask again over TCP
        _, rcode, answers = decode(await ask_tcp(query("big")))
        assert rcode == 0 and len(addresses(answers)) == 100

    run(test)


def test_malformed_messages_get_formerr_or_nothing() -> None:
    async def test(server: DnsServer, up: Upstream) -> None:
        loop_ptr = struct.pack("!6H", 7, 0x0100, 1, 0, 0, 0) + b"\xc0\x0c" + struct.pack("!2H", 1, 1)
        _, rcode, _ = decode(await ask_udp(loop_ptr))  # a compression pointer to itself
        assert rcode == 1
        two = struct.pack("!6H", 8, 0, 2, 0, 0, 0) + query("web")[12:] * 2
        _, rcode, _ = decode(await ask_udp(two))
        assert rcode == 1
        with pytest.raises(TimeoutError):
            await ask_udp(b"\x00\x01", timeout=0.5)  # not even a header: no answer
        # The server still answers after all that.
        _, rcode, answers = decode(await ask_udp(query("web")))
        assert (rcode, addresses(answers)) == (0, [f"127.0.{SLOT}.60"])

    run(test)


def test_glibc_resolver_finds_names_through_the_server() -> None:
    """A real client: getent in a mount namespace whose /etc/resolv.conf names the server."""

    async def test(server: DnsServer, up: Upstream) -> None:
        with tempfile.TemporaryDirectory() as d:
            conf = Path(d) / "resolv.conf"
            conf.write_text(f"nameserver {GW}\noptions ndots:0 attempts:1 timeout:2\n")
            script = f"mount --bind {conf} /etc/resolv.conf && getent ahostsv4 {{}}"
            out = {}
            for name in ("web", "api", "example.test"):
                proc = await asyncio.create_subprocess_exec(
                    "unshare", "-m", "--propagation", "private", "sh", "-c", script.format(name),
                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
                stdout, stderr = await asyncio.wait_for(proc.communicate(), 30)
                assert proc.returncode == 0, (name, stderr.decode())
                out[name] = sorted({line.split()[0] for line in stdout.decode().splitlines()})
            assert out == {"web": [f"127.0.{SLOT}.60"], "api": [f"127.0.{SLOT}.62", f"127.0.{SLOT}.63"],
                           "example.test": ["192.0.2.7"]}

    # getent's questions come from 127.0.0.1 (the kernel's choice of source on lo).
    async def wide(server: DnsServer, up: Upstream) -> None:
        await server.listen("bridge", GW, "127.0.0.0/8")
        await test(server, up)

    run(wide)


def test_before_the_first_table_single_labels_get_servfail_not_an_upstream_nxdomain() -> None:
    async def main() -> None:
        names = Names()
        asked: list[str] = []
        server = DnsServer(names, lambda client: asked.append(client) or [], timeout=0.5)
        await server.listen("bridge", GW, SUBNET)
        try:
            _, rcode, _ = decode(await ask_udp(query("web")))
            assert rcode == 2 and asked == []
            names.replace(RECORDS[:1])
            _, rcode, answers = decode(await ask_udp(query("web")))
            assert (rcode, addresses(answers)) == (0, [f"127.0.{SLOT}.60"])
            _, rcode, _ = decode(await ask_udp(query("nothere")))
            assert rcode == 2 and asked == [CLIENT]  # now forwarded (and no upstream: SERVFAIL)
        finally:
            await server.close_all()

    asyncio.run(main())


def test_closing_leaves_no_listener_and_listen_is_idempotent() -> None:
    async def main() -> None:
        server = DnsServer(Names(), lambda client: [])
        await server.listen("bridge", GW, SUBNET)
        await server.listen("bridge", GW, SUBNET)  # again: nothing changes
        assert server.nameserver("bridge") == GW and server.nameserver("backend") == ""
        other = DnsServer(Names(), lambda client: [])
        with pytest.raises(dns.DnsError, match=f"cannot listen for DNS on {GW}:53/udp"):
            await other.listen("bridge", GW, SUBNET)
        await server.close_all()
        assert server.nameserver("bridge") == ""
        for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):  # the port is free again
            with socket.socket(socket.AF_INET, kind) as s:
                s.bind((GW, 53))

    asyncio.run(main())


def test_sync_listens_on_exactly_the_networks_present() -> None:
    gw2 = f"127.0.{SLOT}.57"

    async def main() -> None:
        server = DnsServer(Names(), lambda client: [])
        try:
            await server.sync({GW: ("bridge", SUBNET), gw2: ("front", "127.0.0.0/8")})
            assert (server.nameserver("bridge"), server.nameserver("front")) == (GW, gw2)
            await server.sync({GW: ("bridge", SUBNET)})  # front left this host
            assert server.nameserver("front") == ""
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.bind((gw2, 53))  # its port is free
            # One that cannot be bound is logged and left out; the others are served.
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
                taken.bind((gw2, 53))
                await server.sync({GW: ("bridge", SUBNET), gw2: ("front", "127.0.0.0/8")})
                assert (server.nameserver("bridge"), server.nameserver("front")) == (GW, "")
        finally:
            await server.close_all()

    asyncio.run(main())


def test_host_resolv_conf_is_read_again_when_it_changes(tmp_path: Path) -> None:
    path = tmp_path / "resolv.conf"
    conf = dns.HostResolvConf(path)
    assert conf.servers() == []
    path.write_text("search example.org\nnameserver 127.0.0.53\nnameserver bogus\nnameserver 2001:db8::1\n")
    assert conf.servers() == ["127.0.0.53", "2001:db8::1"]  # loopback kept: the agent reaches it
    path.write_text("nameserver 192.0.2.1\n")
    os.utime(path, ns=(1, 1))  # a change within the same mtime tick is still seen (inode or mtime)
    assert conf.servers() == ["192.0.2.1"]


def test_resolv_conf_names_the_server_alone_and_keeps_checking_dns(tmp_path: Path) -> None:
    from agent.network import NetworkError, files

    host_resolv = tmp_path / "resolv.conf"
    host_resolv.write_text("nameserver 10.0.0.2\nsearch example.org\n")
    text = files.resolv_text(["10.96.0.53"], host_resolv, nameserver="10.88.1.1")
    assert text == "nameserver 10.88.1.1\nsearch example.org\noptions ndots:0\n"
    with pytest.raises(NetworkError, match="invalid --dns"):
        files.resolv_text(["dns.example"], host_resolv, nameserver="10.88.1.1")


def test_codec_edges() -> None:
    q = dns.parse_query(query("Web.Example", qtype=28, qid=9))
    assert (q.id, q.name, q.qtype, q.labels) == (9, "web.example", 28, (b"Web", b"Example"))
    with pytest.raises(dns.DnsError):
        dns.parse_query(query("web")[:-3])
    with pytest.raises(dns.DnsError):
        dns.parse_query(struct.pack("!6H", 1, 0x8000, 1, 0, 0, 0) + query("web")[12:])  # a response
    assert dns.reverse_address("5.1.88.10.in-addr.arpa") == "10.88.1.5"
    assert dns.reverse_address("1.88.10.in-addr.arpa") is None
    reply = dns.response(q, 0, [dns.a_record("10.0.0.1")] * 40, limit=512)
    _, rcode, answers = decode(reply)
    assert len(reply) <= 512 and rcode & 0x100 and len(answers) == (512 - 12 - 17) // 16
    assert ipaddress.IPv4Address(answers[0][1]) == ipaddress.IPv4Address("10.0.0.1")


def test_tcp_connections_beyond_the_limit_are_closed_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dns, "MAX_TCP_CONNECTIONS", 2)

    async def test(server: DnsServer, up: Upstream) -> None:
        idle = [await asyncio.open_connection(GW, 53, local_addr=(CLIENT, 0)) for _ in range(2)]
        try:
            reader, writer = await asyncio.open_connection(GW, 53, local_addr=(CLIENT, 0))
            with pytest.raises(ConnectionResetError):  # reset by the server at once, not held
                await asyncio.wait_for(reader.read(), 5)  # (a close would have left a TIME_WAIT on GW:53)
            writer.close()
        finally:
            for _, w in idle:
                w.close()
                await w.wait_closed()
        _, rcode, answers = decode(await asyncio.wait_for(until_answered(), 10))  # served again once below
        assert (rcode, addresses(answers)) == (0, [f"127.0.{SLOT}.60"])

    async def until_answered() -> bytes:
        while True:
            try:
                return await ask_tcp(query("web"))
            except (asyncio.IncompleteReadError, ConnectionError):
                await asyncio.sleep(0.01)  # the server has not seen the idle ones close yet

    run(test)
