"""The scheduler's one-pass check of the default filters and its tie-break among tied hosts only (session 6) give
the decisions and explanations of the plain filter chain and of the full score, over random clusters."""

from __future__ import annotations

import hashlib
import random
from collections import Counter

from controller import scheduler
from controller.scheduler import FILTERS, Constraint, Demand, HostView

GIB = 1 << 30
CONSTRAINTS = ("node.labels.disk==ssd", "node.labels.disk!=ssd", "node.name!=h3", "node.platform.arch==arm64",
               "node.platform==linux/amd64", "node.labels.rack==r1", "node.id==n7")


def random_host(rnd: random.Random, i: int) -> HostView:
    memory = rnd.choice([1, 2, 4]) * GIB
    cpus = rnd.choice([1, 2]) * 10**9
    labels = {"disk": rnd.choice(["ssd", "hdd"])}
    if rnd.random() < 0.3:
        labels["rack"] = "r1"
    return HostView(
        f"n{i}", f"h{i}", rnd.random() < 0.9, memory, cpus, rnd.randrange(0, memory + 1, GIB // 4),
        rnd.randrange(0, cpus + 1, 10**8), rnd.choice([0, 0, 1, 2, 5]), tuple(sorted(labels.items())),
        rnd.choice(["linux/amd64", "linux/arm64"]), rnd.random() < 0.9,
        frozenset(rnd.sample([("tcp", 80), ("udp", 80), ("tcp", 443)], rnd.randrange(3))))


def random_demand(rnd: random.Random) -> Demand:
    return Demand(rnd.choice([0, 0, GIB // 4, GIB, 3 * GIB]), rnd.choice([0, 0, 5 * 10**8, 10**9]),
                  tuple(Constraint.parse(c) for c in rnd.sample(CONSTRAINTS, rnd.choice([0, 0, 0, 1, 2]))),
                  frozenset(rnd.sample([("tcp", 80), ("tcp", 443)], rnd.choice([0, 0, 0, 1]))))


def reference(container_id: str, demand: Demand, hosts: list[HostView], strategy: str, sample: int
              ) -> scheduler.Decision:
    """The decision as the scheduler took it before session 6: each filter called in turn for each host and its
    reason counted, the fitting host with the lowest (count, memory, hash of container and host ids)."""
    fits: list[HostView] = []
    rejections: Counter[str] = Counter()
    n = len(hosts)
    start = int.from_bytes(hashlib.blake2s(container_id.encode(), digest_size=4).digest()) % n if sample and n else 0
    for i in range(n):
        host = hosts[(start + i) % n]
        for check in FILTERS:
            why = check(host, demand)
            if why is not None:
                rejections[why] += 1
                break
        else:
            fits.append(host)
            if sample and len(fits) >= sample:
                break
    if not fits:
        return scheduler.Decision(None, scheduler.explain(n, rejections))
    sign = -1 if strategy == "binpack" else 1
    return scheduler.Decision(min(fits, key=lambda h: (
        sign * h.containers, sign * h.allocated_memory,
        hashlib.blake2s((container_id + h.id).encode(), digest_size=8).digest())), "")


def test_decisions_and_reasons_are_those_of_the_filter_chain_and_the_full_score() -> None:
    rnd = random.Random(6)
    placed = refused = 0
    for round_ in range(60):
        hosts = [random_host(rnd, i) for i in range(rnd.choice([0, 1, 3, 20, 200]))]
        for k in range(40):
            demand = random_demand(rnd)
            strategy = rnd.choice(["spread", "binpack"])
            sample = rnd.choice([0, 0, 2, 10])
            cid = f"c{round_}-{k}"
            want = reference(cid, demand, hosts, strategy, sample)
            assert scheduler.place(cid, demand, hosts, strategy=strategy, sample=sample) == want
            # the plain chain (any filters but the default tuple itself), as services use it
            assert scheduler.place(cid, demand, hosts, tuple(FILTERS), strategy=strategy, sample=sample) == want
            placed += want.host is not None
            refused += want.host is None
    assert placed > 1000 and refused > 500, "both outcomes are exercised"


def test_hosts_that_tie_are_told_apart_by_the_hash_of_container_and_host() -> None:
    hosts = [HostView(f"n{i}", f"h{i}", True, GIB, 10**9, 0, 0, 1) for i in range(8)]
    hosts.append(HostView("busy", "busy", True, GIB, 10**9, 0, 0, 2))
    for i in range(50):
        chosen = scheduler.place(f"c{i}", Demand(0, 0), hosts).host
        assert chosen == min(hosts[:8], key=lambda h: hashlib.blake2s(f"c{i}{h.id}".encode(), digest_size=8).digest())
