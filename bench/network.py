"""Container networking across two hosts (issue 5): TCP throughput and round-trip time container-to-container
over the VXLAN overlay, against host-to-host over the same underlying link, in one run on a 2-host dev
cluster of its own.

- throughput: iperf3 (Debian's), one TCP stream for --seconds, server in the receiving container's (or
  host's) network namespace, client in the sender's; the receiver's figure.
- RTT: a 1-byte TCP ping-pong (TCP_NODELAY) --pings times; the median of a run.
- each measure runs --rounds times, interleaved; the best round is reported (on a shared machine other
  load only ever makes a round slower).

The containers are busybox `sleep`s placed with constraints on host1 and host2; the tools run in their network
namespaces (/run/berth/netns/...), so the path measured is exactly a container's: veth, bridge, berth.vx,
the underlay link, and back up on the other host. Traffic stays on the dev cluster's own addresses.

Prints one last line: RESULT {"overlay_gbps", "underlay_gbps", "ratio" (overlay / underlay), "overlay_rtt_us",
"underlay_rtt_us", and the same between two containers of a user network (one L2 segment: veth, the network's
bridge, its own VXLAN device): "user_gbps", "user_ratio" (user / underlay), "user_rtt_us"}.

    sudo .venv/bin/python bench/network.py [--seconds 5] [--pings 2000]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.network.host import netns_dir  # noqa: E402
from berthctl.dev import cluster as dev  # noqa: E402

SLOT = int(os.environ.get("BERTH_TEST_SLOT", "0"))
NAME = "bnetbench" if SLOT == 0 else f"bnetbench{SLOT}"
SUBNET = f"10.{77 + SLOT}.63.0/24"
CIDR = f"10.{88 + 2 * SLOT}.0.0/16"

PINGER = r"""
import socket, statistics, sys, time
from pyroute2 import netns
netns.setns(sys.argv[1], flags=0)
role, host, port, n = sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
if role == "server":
    srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); srv.bind((host, port))
    srv.listen(1); print("ready", flush=True); conn, _ = srv.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for _ in range(n):
        conn.sendall(conn.recv(1))
else:
    c = socket.create_connection((host, port), timeout=10); c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    samples = []
    for _ in range(n):
        t0 = time.perf_counter(); c.sendall(b"x"); c.recv(1); samples.append(time.perf_counter() - t0)
    print(statistics.median(samples[n // 10:]) * 1e6)
"""


def berthctl(controller: str, *args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "berthctl", *args], capture_output=True, text=True, check=False,
                         env={**os.environ, "BERTH_CONTROLLER": controller}, cwd=ROOT, timeout=120)
    if out.returncode != 0:
        raise SystemExit(f"bench: berthctl {' '.join(args)}: {out.stderr.strip()}")
    return out.stdout


def in_ns(ns: str, cmd: list[str]) -> list[str]:
    return ["nsenter", f"--net={ns}", *cmd]


def iperf(server_ns: str, client_ns: str, address: str, seconds: int) -> float:
    """Gbit/s received, one TCP stream."""
    srv = subprocess.Popen(in_ns(server_ns, ["iperf3", "-s", "-1", "-B", address, "-p", "5201"]),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            out = subprocess.run(in_ns(client_ns, ["iperf3", "-c", address, "-p", "5201", "-t", str(seconds), "-J"]),
                                 capture_output=True, text=True, check=False, timeout=seconds + 30)
            try:
                result = json.loads(out.stdout)
            except ValueError:
                result = {"error": out.stderr}
            if out.returncode == 0 and "error" not in result:
                return float(result["end"]["sum_received"]["bits_per_second"]) / 1e9
            if time.monotonic() > deadline:
                raise SystemExit(f"bench: iperf3 to {address} failed: {result.get('error')}")
            time.sleep(0.2)
    finally:
        srv.kill()
        srv.wait()


def rtt(server_ns: str, client_ns: str, address: str, pings: int) -> float:
    srv = subprocess.Popen([sys.executable, "-c", PINGER, server_ns, "server", address, "5300", str(pings)],
                           stdout=subprocess.PIPE, text=True)
    try:
        assert srv.stdout is not None and srv.stdout.readline().strip() == "ready"
        out = subprocess.run([sys.executable, "-c", PINGER, client_ns, "client", address, "5300", str(pings)],
                             capture_output=True, text=True, check=True, timeout=120)
        return float(out.stdout.strip())
    finally:
        srv.kill()
        srv.wait()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=int, default=5, help="iperf3 duration of each throughput run")
    p.add_argument("--pings", type=int, default=2000, help="round trips in each RTT run")
    p.add_argument("--rounds", type=int, default=3,
                   help="interleaved rounds of each measure; the best is kept (load on a shared machine only adds)")
    args = p.parse_args()
    if not shutil.which("iperf3"):
        raise SystemExit("bench: iperf3 not found: run scripts/install-deps")
    state = Path(tempfile.gettempdir()) / "berth-bench-state"
    dev.down(NAME, state)
    info = dev.up(NAME, 2, SUBNET, state, write_config=False, container_cidr=CIDR)
    try:
        ctl = info.controller
        berthctl(ctl, "network", "create", "benchnet")
        for i in (1, 2):
            berthctl(ctl, "run", "-d", "--name", f"n{i}", "--constraint", f"node.name==host{i}", "busybox",
                     "sleep", "100000")
            berthctl(ctl, "run", "-d", "--name", f"u{i}", "--network", "benchnet", "--constraint",
                     f"node.name==host{i}", "busybox", "sleep", "100000")
        names = ("n1", "n2", "u1", "u2")
        deadline = time.monotonic() + 60
        while True:
            cs = {c["name"]: c for c in json.loads(berthctl(ctl, "ps", "-o", "json"))}
            if all(cs.get(n, {}).get("state") == "running" and cs[n]["ip_address"] for n in names):
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"bench: containers did not start: {cs}")
            time.sleep(0.2)
        hosts = {h.name: h for h in info.hosts}
        cns = {n: str(netns_dir(Path(hosts[cs[n]["node"]].state_dir)) / cs[n]["id"]) for n in names}
        hns = {n: f"/var/run/netns/{hosts[n].netns}" for n in ("host1", "host2")}
        ip2, host2 = cs["n2"]["ip_address"], hosts["host2"].address
        # Interleaved, so that a passing load on the machine touches both about alike.
        uip2 = cs["u2"]["ip_address"]
        overlay, underlay, user, o_rtt, u_rtt, user_rtt = [], [], [], [], [], []
        for _ in range(args.rounds):
            overlay.append(iperf(cns["n2"], cns["n1"], ip2, args.seconds))
            underlay.append(iperf(hns["host2"], hns["host1"], host2, args.seconds))
            user.append(iperf(cns["u2"], cns["u1"], uip2, args.seconds))
            o_rtt.append(rtt(cns["n2"], cns["n1"], ip2, args.pings))
            u_rtt.append(rtt(hns["host2"], hns["host1"], host2, args.pings))
            user_rtt.append(rtt(cns["u2"], cns["u1"], uip2, args.pings))
        result = {
            "overlay_gbps": round(max(overlay), 2),
            "underlay_gbps": round(max(underlay), 2),
            "ratio": round(max(overlay) / max(underlay), 3),
            "overlay_rtt_us": round(min(o_rtt), 1),
            "underlay_rtt_us": round(min(u_rtt), 1),
            "user_gbps": round(max(user), 2),
            "user_ratio": round(max(user) / max(underlay), 3),
            "user_rtt_us": round(min(user_rtt), 1),
        }
        print(f"overlay  (container host1 -> container host2 {ip2}): {overlay} Gbit/s, RTT {o_rtt} us")
        print(f"underlay (host1 -> host2 {host2}): {underlay} Gbit/s, RTT {u_rtt} us")
        print(f"user network (container host1 -> container host2 {uip2}): {user} Gbit/s, RTT {user_rtt} us")
        print("RESULT " + json.dumps(result))
    finally:
        dev.down(NAME, state)


if __name__ == "__main__":
    main()
