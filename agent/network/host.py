"""The container network of one host: bridge `berth0` holding the subnet's first address, and per container
a network namespace bind-mounted at `/run/berth/netns/<agent>/<id>` (<agent>: a hash of the agent's state
dir, so several agents of a dev cluster never share one; outside the state dir, as Docker's
/var/run/docker/netns, so that the namespaces are not mounts under it) with `eth0` (a veth whose host end
`bv<id[:12]>` is on the bridge), an address from the host's subnet and a default route via the bridge.

    configure(subnet)  at join: bridge, ip_forward, NAT table; removes links and namespaces that belong to
                       no allocation (left by a crash), so a restart neither loses nor duplicates anything
    attach(id, ports)  before start: the namespace, ready, and its path for ContainerConfig.netns
    detach(id)         after remove: veth, namespace, address, published ports and their rules are gone

A container on a user network (attach(..., network=NAME)) gets its address and this host's gateway from the
controller (`attacher`) and its veth on that network's bridge (agent.network.usernet).

Every method is idempotent. Netlink work is pyroute2's, run in a thread so the agent's loop never blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from pyroute2 import IPRoute, NetlinkError

from agent.network import CONTAINER, NetworkError, files, mac_for, nat, overlay, usernet
from agent.network.bridge import ensure as ensure_bridge
from agent.network.ipam import Allocation, Ipam, Port
from agent.runtime import syscalls as sc

log = logging.getLogger(__name__)

BRIDGE = "berth0"
NETNS_ROOT = Path("/run/berth/netns")
T = TypeVar("T")
HOST_VETH_PREFIX = "bv"
PEER_PREFIX = "bc"


@dataclass(frozen=True)
class Attachment:
    netns: str  # path of the bind-mounted namespace
    address: str
    ports: tuple[Port, ...]


def netns_dir(state_dir: Path) -> Path:
    """Where the agent with this state dir keeps its containers' namespaces."""
    return NETNS_ROOT / hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:12]


def create_netns(path: Path) -> None:
    """A new, empty network namespace kept alive by a bind mount on `path`.

    A short-lived thread unshares its own network namespace (CLONE_NEWNET moves one thread only) and binds
    it; no fork of the (multi-threaded) agent, and no thread of the agent's pool ever changes namespace."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o444)
    os.close(fd)
    failure: list[OSError] = []

    def run() -> None:
        try:
            sc.unshare(sc.CLONE_NEWNET)
            sc.mount(f"/proc/self/task/{threading.get_native_id()}/ns/net", str(path), None, sc.MS_BIND)
        except OSError as e:
            failure.append(e)

    thread = threading.Thread(target=run, name="berth-netns")
    thread.start()
    thread.join()
    if failure:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        raise failure[0]


def in_netns(path: Path, fn: Callable[[], T]) -> T:
    """fn() run in a short-lived thread that has joined the namespace at `path` (setns moves one thread).

    pyroute2's IPRoute(netns=...) forks a helper to open its socket, and a fork of the multi-threaded agent
    (gRPC) can crash; a netlink socket opened by a thread inside the namespace stays bound to it."""
    result: list[T] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                sc.setns(fd, sc.CLONE_NEWNET)
            finally:
                os.close(fd)
            result.append(fn())
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread, which raises it
            failure.append(e)

    thread = threading.Thread(target=run, name="berth-netns")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return result[0]


def remove_netns(path: Path) -> None:
    """Unmount (its last reference gone, the namespace dies with its links) and delete the file."""
    if os.path.ismount(path):
        with contextlib.suppress(OSError):
            sc.umount2(str(path), sc.MNT_DETACH)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def host_veth(cid: str) -> str:
    return HOST_VETH_PREFIX + cid[:12]


def _lookup(ipr: IPRoute, ifname: str) -> int | None:
    found = ipr.link_lookup(ifname=ifname)
    return int(found[0]) if found else None


def _why(e: BaseException) -> str:
    if isinstance(e, NetlinkError):
        return os.strerror(e.code)
    if isinstance(e, OSError):
        return e.strerror or str(e)
    return str(e)


class HostNetwork:
    def __init__(self, state_dir: Path, bridge: str = BRIDGE) -> None:
        self.bridge = bridge
        self.ipam = Ipam(state_dir)
        self.state_dir = state_dir
        self.ns_dir = netns_dir(state_dir)
        self._lock = asyncio.Lock()
        self.configured = False
        self.address = ""  # the host's own address: the overlay's tunnel end ("" : no overlay)
        self.mtu = 0  # containers' MTU under the overlay (0: the kernel's default)
        self._nat_applied: str | None = None  # the ruleset nft holds now, as this process loaded it
        self.user = usernet.Present(state_dir)  # issue 5: user networks present here
        # issue 5: container id -> (its user network, its address on it), asked of the controller
        self.attacher: Callable[[str], Awaitable[tuple[usernet.Lease, str]]] | None = None

    # ---- host ---------------------------------------------------------------------------------------

    async def configure(self, subnet: str, keep: set[str] | None = None, address: str = "") -> None:
        """Set up the host for `subnet`; forget allocations of containers not in `keep` (when given). With the
        host's `address`, also the VXLAN overlay to other hosts (agent.network.overlay)."""
        async with self._lock:
            await asyncio.to_thread(self._configure, subnet, keep, address)
            self.configured = True

    async def set_peers(self, peers: list[overlay.Peer]) -> None:
        """Routes, neighbour and FDB entries for exactly these other hosts."""
        async with self._lock:
            if self.configured and self.address:
                await asyncio.to_thread(self._set_peers, peers)

    def _set_peers(self, peers: list[overlay.Peer]) -> None:
        try:
            with IPRoute() as ipr:
                overlay.sync(ipr, self.address, peers)
                self.user.set_peers(ipr, self.ipam, self.address, [p.address for p in peers])
        except NetlinkError as e:
            raise NetworkError(f"cannot update the overlay's routes: {_why(e)}") from e

    def _configure(self, subnet: str, keep: set[str] | None, address: str = "") -> None:
        self.ipam.set_subnet(subnet)
        gw = self.ipam.gateway
        if address:
            try:
                with IPRoute() as ipr:
                    self.mtu = overlay.ensure(ipr, address, gw.network)
            except NetlinkError as e:
                raise NetworkError(f"cannot set up the overlay device {overlay.VXLAN}: {_why(e)}") from e
            self.address = address
        try:
            with IPRoute() as ipr:
                idx = ensure_bridge(ipr, self.bridge, gw)
                ipr.link("set", index=idx, state="up")
        except NetlinkError as e:
            raise NetworkError(f"cannot set up bridge {self.bridge}: {_why(e)}") from e
        with open("/proc/sys/net/ipv4/ip_forward", "w") as f:
            f.write("1")
        if keep is not None:
            for cid in set(self.ipam.containers) - keep:
                self.ipam.release(cid)
        self._prune()
        try:
            with IPRoute() as ipr:
                self.user.reconcile(ipr, self.ipam, self.address, self.mtu)
        except NetlinkError as e:
            # The host's own network works without them: say so and go on; the start of a container on a
            # broken one fails saying why (_setup_user), and the next join tries them again.
            log.error("cannot set up network %s on this host: %s; its containers here are cut off until it is fixed",
                      ", ".join(repr(x.name) for x in self.user.in_use(self.ipam)), _why(e))
        self._apply_nat()

    def _prune(self) -> None:
        """Remove veths and namespaces that belong to no allocation."""
        ours = {host_veth(cid) for cid in self.ipam.containers}
        with IPRoute() as ipr:
            for link in ipr.get_links():
                name = link.get("ifname") or ""
                if (name.startswith(HOST_VETH_PREFIX) and len(name) == 14 and name not in ours) or (
                    name.startswith(PEER_PREFIX) and len(name) == 14
                ):
                    with contextlib.suppress(NetlinkError):
                        ipr.link("del", index=link["index"])
        if self.ns_dir.is_dir():
            for path in self.ns_dir.iterdir():
                if path.name not in self.ipam.containers:
                    self._remove_ns(path)

    def _apply_nat(self) -> None:
        """Load the NAT table computed from the current state, unless it is what this process last loaded:
        most containers publish no port, and `nft -f` costs tens of milliseconds per container start."""
        published = [(a.address, p) for a in self.ipam.containers.values() for p in a.ports]
        rules = nat.ruleset(self.bridge, str(self.ipam.subnet) if self.ipam.subnet else None, published,
                            overlay=overlay.VXLAN if self.address else None, user_networks=self.user.nat(self.ipam))
        if rules == self._nat_applied:
            return
        self._nat_applied = None  # unknown until nft has said yes
        nat.apply(rules)
        self._nat_applied = rules

    async def teardown(self) -> None:
        """Remove the bridge and the NAT table (when the host leaves container networking)."""
        async with self._lock:
            await asyncio.to_thread(self._teardown)

    def _teardown(self) -> None:
        for cid in list(self.ipam.containers):
            self._detach(cid, apply=False)
        with IPRoute() as ipr:
            idx = _lookup(ipr, self.bridge)
            if idx is not None:
                ipr.link("del", index=idx)
            overlay.remove(ipr)
            self.user.reconcile(ipr, self.ipam, "", 0)
        nat.remove()
        self._nat_applied = None
        with contextlib.suppress(OSError):
            self.ns_dir.rmdir()
        self.configured = False

    # ---- containers ---------------------------------------------------------------------------------

    async def attach(self, cid: str, ports: list[Port], network: str = "") -> Attachment:
        """`network`: a user network's name ("": the host's default network)."""
        lease, address = None, ""
        if network and cid not in self.ipam.containers:
            if self.attacher is None:
                raise NetworkError(f"network {network!r} is not available on this host")
            lease, address = await self.attacher(cid)
        async with self._lock:
            return await asyncio.to_thread(self._attach, cid, ports, lease, address)

    def _attach(self, cid: str, ports: list[Port], lease: usernet.Lease | None = None,
                address: str = "") -> Attachment:
        if not self.configured:
            raise NetworkError("this host has no container network yet (not joined to a controller)")
        new = cid not in self.ipam.containers
        a = self.ipam.allocate(cid, ports, address, lease.id if lease is not None else "")
        path = self.ns_dir / cid
        try:
            if a.network:
                self._setup_user(a.network, lease)
            if new or not self._wired(cid, path, a):
                self._rewire(cid, path, a, fresh=new)
            elif a.network:
                self._link_state(cid, "up")  # issue 5: down while it was stopped (quiesce)
            if new:
                self._apply_nat()
        except BaseException:
            self._unwire(cid, path)
            if new:
                self.ipam.release(cid)
                if a.network:
                    with IPRoute() as ipr:
                        self.user.release_if_unused(ipr, self.ipam, a.network)
                with contextlib.suppress(NetworkError):
                    self._apply_nat()
            raise
        return Attachment(str(path), a.address, tuple(a.ports))

    def _rewire(self, cid: str, path: Path, a: Allocation, fresh: bool) -> None:
        """Wire the container, clearing what is left of an earlier try first. A fresh allocation has nothing
        left (configure prunes what no allocation owns), so it skips that (~1.5 ms of netlink per start) unless
        wiring fails, e.g. on the veth of a namespace of the same container that the kernel has not reaped yet."""
        if fresh:
            try:
                self._wire(cid, path, a)
                return
            except NetworkError as e:
                log.info("container %s: %s; clearing and trying again", cid[:12], e)
        self._unwire(cid, path)
        self._wire(cid, path, a)

    def _setup_user(self, net_id: str, lease: usernet.Lease | None) -> None:
        lease = lease or self.user.leases.by_id.get(net_id)
        if lease is None:
            raise NetworkError(f"network {net_id[:12]} is unknown here; remove the container and run it again")
        try:
            with IPRoute() as ipr:
                self.user.setup(ipr, lease, self.address, self.mtu)
        except NetlinkError as e:
            raise NetworkError(f"cannot set up network {lease.name!r} on this host: {_why(e)}") from e

    def network_name(self, cid: str) -> str:
        """The network a container with an address here is on ("bridge" or a user network's name)."""
        a = self.ipam.containers.get(cid)
        lease = self.user.leases.by_id.get(a.network) if a is not None and a.network else None
        return lease.name if lease is not None else "bridge"

    def _wired(self, cid: str, path: Path, a: Allocation) -> bool:
        if not os.path.ismount(path):
            return False
        with IPRoute() as ipr:
            if _lookup(ipr, host_veth(cid)) is None:
                return False

        def check() -> bool:
            with IPRoute() as ns:
                eth0 = _lookup(ns, "eth0")
                if eth0 is None:
                    return False
                return any(x.get("address") == a.address for x in ns.get_addr(index=eth0, family=2))

        try:
            return in_netns(path, check)
        except (NetlinkError, OSError):
            return False

    def _wire(self, cid: str, path: Path, a: Allocation) -> None:
        """The container's namespace with eth0 (the veth's peer, made directly inside it: moving a link
        between namespaces waits for an RCU grace period, 15-40 ms here, on every container start), its
        address and default route, and lo up; the host end on the bridge."""
        lease = self.user.leases.by_id.get(a.network) if a.network else None
        gw = lease.interface if lease is not None else self.ipam.gateway
        bridge = lease.bridge if lease is not None else self.bridge
        veth = host_veth(cid)
        step = "create its network namespace"
        try:
            create_netns(path)
            step = f"create veth {veth}"
            with IPRoute() as ipr:
                mtu = {"mtu": self.mtu} if self.mtu else {}
                br = _lookup(ipr, bridge)
                if br is None:
                    raise NetworkError(f"bridge {bridge} vanished")
                # One request makes the pair and puts the host end on the bridge, up.
                # eth0's MAC follows its address (mac_for): a neighbour's ARP entry for a reused or moved address
                # stays right.
                ipr.link("add", ifname=veth, kind="veth", peer={"ifname": "eth0", "net_ns_fd": str(path),
                                                                "address": mac_for(a.address, CONTAINER), **mtu},
                         master=br, state="up", **mtu)
            step = "configure eth0"

            def inside() -> None:
                with IPRoute() as ns:
                    eth0 = _lookup(ns, "eth0")
                    lo = _lookup(ns, "lo")
                    if eth0 is None or lo is None:
                        raise NetworkError("eth0 did not arrive in the namespace")
                    ns.addr("add", index=eth0, address=a.address, prefixlen=gw.network.prefixlen)
                    ns.link("set", index=eth0, state="up")
                    ns.link("set", index=lo, state="up")
                    ns.route("add", dst="default", gateway=str(gw.ip))

            in_netns(path, inside)
        except (NetlinkError, OSError) as e:
            raise NetworkError(f"container {cid[:12]}: cannot {step}: {_why(e)}") from e

    def _unwire(self, cid: str, path: Path) -> None:
        with IPRoute() as ipr:
            for name in (host_veth(cid), PEER_PREFIX + cid[:12]):
                idx = _lookup(ipr, name)
                if idx is not None:
                    with contextlib.suppress(NetlinkError):
                        ipr.link("del", index=idx)
        self._remove_ns(path)

    def _remove_ns(self, path: Path) -> None:
        remove_netns(path)

    async def quiesce(self, cid: str) -> None:
        """A stopped container on a user network: its veth down until attach on its next start. It keeps its
        address, and on a user network (one segment across hosts) a container moved to another host has the
        same address there: its stopped copy here must not answer for it."""
        a = self.ipam.containers.get(cid)
        if a is not None and a.network:
            async with self._lock:
                await asyncio.to_thread(self._link_state, cid, "down")

    def _link_state(self, cid: str, state: str) -> None:
        try:
            with IPRoute() as ipr:
                idx = _lookup(ipr, host_veth(cid))
                if idx is not None:
                    ipr.link("set", index=idx, state=state)
        except (NetlinkError, OSError) as e:
            raise NetworkError(f"container {cid[:12]}: cannot set its veth {state}: {_why(e)}") from e

    async def detach(self, cid: str) -> None:
        async with self._lock:
            await asyncio.to_thread(self._detach, cid)

    def _detach(self, cid: str, apply: bool = True) -> None:
        # Unmounting the namespace is enough: the kernel then destroys it and its veth pair in the background.
        # Deleting the veth here would wait for an RCU grace period (15-50 ms) while holding the lock that
        # the next container's start needs.
        self._remove_ns(self.ns_dir / cid)
        files.remove(self.state_dir, cid)
        a = self.ipam.containers.get(cid)
        if a is not None:
            self.ipam.release(cid)
            if a.network:  # issue 5: the last container of a user network here takes its links with it
                with IPRoute() as ipr:
                    self.user.release_if_unused(ipr, self.ipam, a.network)
            if apply and self.configured:
                self._apply_nat()

    def allocation(self, cid: str) -> Allocation | None:
        return self.ipam.containers.get(cid)
