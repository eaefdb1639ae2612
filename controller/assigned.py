"""What each node must run, derived from the container keys (issue 6: no /berth/assignments/ keys).

A container names the node it is placed on (`node_id`) and the nodes that still hold a stopped copy of it
after it was moved off them (`stale_nodes`); its spec, desired state, generation and stop timeout are what the
node's agent needs. So a node's assignments are the containers that name it, each seen through
`assignment_for`: the container's run on its own node; on a node it was moved off, the same container stopped
with generation 0 (no run of it is current there: any report of that copy is of an older run than the
container's, so it is dropped, and the agent stops the copy and keeps its files). Removing the container (or
placing it back on that node) is what removes (or replaces) the stopped copy's assignment.

The agents' streams follow these from the cluster cache (controller.cache) or, without one, from an etcd watch
on the container keys with their previous values (controller.store.watch_assigned).
"""

from __future__ import annotations

from berth.api import dispatcher_pb2 as d
from berth.api import types_pb2 as t


def nodes_of(c: t.Container) -> tuple[str, ...]:
    """The nodes with an assignment of this container: its own node first, then those holding a stopped copy."""
    stale = tuple(n for n in c.stale_nodes if n and n != c.node_id)
    return (c.node_id, *stale) if c.node_id else stale


def assignment_for(c: t.Container, node_id: str) -> t.Assignment | None:
    """The container's assignment on one node, None when the node has none of it."""
    a = t.Assignment()
    return a if _write(a, c, node_id) else None


def fill(change: d.AssignmentChange, c: t.Container, node_id: str) -> bool:
    """Fill an AssignmentChange's assignment from the container (without building a second message); False when
    the node has none of it (the change is a removal)."""
    return _write(change.assignment, c, node_id)


def _write(a: t.Assignment, c: t.Container, node_id: str) -> bool:
    """The one rule: the container's run on its own node, a stopped copy with generation 0 on a node it was
    moved off; False (a left as it was) on any other node."""
    if not node_id or (node_id != c.node_id and node_id not in c.stale_nodes):
        return False
    a.container_id = c.id
    a.spec.CopyFrom(c.spec)
    a.stop_timeout_s = c.stop_timeout_s
    if node_id == c.node_id:
        a.desired_state = c.desired_state
        a.generation = c.generation
    else:
        a.desired_state = t.DESIRED_STOPPED
        a.generation = 0
    return True
