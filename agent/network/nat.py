"""The host's NAT rules for containers, as one nftables table `ip berth` that is always replaced whole.

Why nftables and not iptables: the rules are a pure function of the agent's IPAM state (agent.network.ipam),
and nft replaces a whole table in one atomic transaction (`table ip berth; delete table ip berth; table ip
berth {...}` in one `nft -f`). An agent restart therefore rewrites exactly the rules it should have, never
duplicates one, and removing the last container leaves no rule behind; nothing else's rules are touched
(iptables' chains are shared with every other tool on the host and need rule-by-rule bookkeeping).

    prerouting (dstnat)  published ports: `fib daddr type local` (or the given host address) + port
                         -> DNAT to the container; the client's source address is kept (no proxy, no SNAT)
    output (dstnat)      the same for connections made on the host itself to its own addresses
    postrouting (srcnat) containers' traffic leaving through any other link than the bridge is masqueraded,
                         and so is hairpin traffic (a container to a port published on its own host)
    forward (filter)     only while user networks are present (issue 5): isolation. Into a user network's
                         bridge only from that bridge (its containers, here and, through its vxlan port, on
                         other hosts), replies, and published ports (DNAT); from it, never into the default
                         network (berth0, berth.vx) except to a published port. So containers of two networks
                         never reach each other, on one host or across hosts, in either direction.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterable

from agent.network import NetworkError
from agent.network.ipam import Port

TABLE = "berth"


def ruleset(bridge: str, subnet: str | None, published: Iterable[tuple[str, Port]],
            overlay: str | None = None, user_networks: Iterable[tuple[str, str]] = ()) -> str:
    """The whole `ip berth` table for a bridge, its subnet and (container address, port) pairs. Traffic into
    the `overlay` device goes to other hosts' containers and keeps its source address. `user_networks`:
    (bridge, subnet) of each user network present."""
    dnat: list[str] = []
    for address, p in sorted(published, key=lambda x: (x[1].protocol, x[1].host_port, x[1].host_ip)):
        match = f"ip daddr {p.host_ip}" if p.host_ip else "fib daddr type local"
        dnat.append(f"    {match} {p.protocol} dport {p.host_port} dnat to {address}:{p.container_port}")
    lines = [
        f"table ip {TABLE}",
        f"delete table ip {TABLE}",
        f"table ip {TABLE} {{",
        "  chain prerouting {",
        "    type nat hook prerouting priority dstnat; policy accept;",
        *dnat,
        "  }",
        "  chain output {",
        "    type nat hook output priority -100; policy accept;",
        *dnat,
        "  }",
        "  chain postrouting {",
        "    type nat hook postrouting priority srcnat; policy accept;",
    ]
    if subnet:
        keep = f' oifname != "{overlay}"' if overlay else ""
        lines.append(f'    ip saddr {subnet} oifname != "{bridge}"{keep} masquerade')
        # Hairpin: a container reaching a port published on its own host comes back out on the bridge;
        # without this the server would answer it directly and the client would drop the reply.
        lines.append(f'    ip saddr {subnet} oifname "{bridge}" ct status dnat masquerade')
    users = sorted(user_networks)
    for ubridge, usubnet in users:
        lines.append(f'    ip saddr {usubnet} oifname != "{ubridge}" masquerade')
        lines.append(f'    ip saddr {usubnet} oifname "{ubridge}" ct status dnat masquerade')
    lines.append("  }")
    if users:
        lines += ["  chain forward {", "    type filter hook forward priority filter; policy accept;"]
        for ubridge, _ in users:
            lines += [
                f'    oifname "{ubridge}" iifname != "{ubridge}" ct state established,related accept',
                f'    oifname "{ubridge}" iifname != "{ubridge}" ct status dnat accept',
                f'    oifname "{ubridge}" iifname != "{ubridge}" drop',
            ]
            for default in (bridge, overlay):
                if default:
                    lines += [f'    iifname "{ubridge}" oifname "{default}" ct status dnat accept',
                              f'    iifname "{ubridge}" oifname "{default}" drop']
        lines.append("  }")
    lines += ["}", ""]
    return "\n".join(lines)


def apply(rules: str) -> None:
    """Load a ruleset with `nft -f -` (one transaction: all of it or nothing)."""
    try:
        out = subprocess.run(["nft", "-f", "-"], input=rules, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise NetworkError("nft not found: install nftables (scripts/install-deps)") from None
    if out.returncode != 0:
        raise NetworkError(f"nft rejected berth's NAT rules: {out.stderr.strip().splitlines()[0:1]}")


def remove() -> None:
    """Delete the table (no-op when absent)."""
    apply(f"table ip {TABLE}\ndelete table ip {TABLE}\n")
