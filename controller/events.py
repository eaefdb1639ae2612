"""Cluster events from etcd revisions (issue 6): container, service, node and controller changes, each
stamped with the revision it happened at, so `berthctl events --since REV` resumes exactly where a previous
stream left off (as long as etcd has not compacted that revision away).

Events are not stored anywhere: they are the store's own history, read through one etcd watch with the
previous values, and translated here (a pure function per key) into what a user understands.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import grpc.aio

from berth.api import control_pb2
from berth.api import types_pb2 as t
from controller import store as keys
from controller.store import Change, Store, StoreError, Unavailable

STATE_ACTIONS = {
    t.STATE_PENDING: "pending", t.STATE_ASSIGNED: "assigned", t.STATE_PREPARING: "preparing",
    t.STATE_RUNNING: "start", t.STATE_EXITED: "die", t.STATE_FAILED: "fail", t.STATE_LOST: "lost",
}


def _parse(cls: Any, data: bytes) -> Any:
    msg = cls()
    if data:
        msg.ParseFromString(data)
    return msg


def translate(change: Change) -> control_pb2.Event | None:
    """The event a user sees for one key's change, or None for internal keys (names, assignments)."""
    key, rev = change.key, change.revision
    if key.startswith(keys.CONTAINERS):
        cid = key[len(keys.CONTAINERS):].decode()
        c = _parse(t.Container, change.value if change.put else change.previous)
        before = _parse(t.Container, change.previous)
        event = control_pb2.Event(revision=rev, type="container", id=cid, name=c.spec.name)
        if not change.put:
            event.action = "destroy"
        elif change.version == 1:
            event.action = "create"
            event.attributes["image"] = c.spec.image
        elif c.node_id and c.node_id != before.node_id:
            event.action = "assign"
            event.attributes["node"] = c.node_id
        elif before.node_id and not c.node_id:
            event.action = "move"
            event.attributes["from"] = before.node_id
        elif c.desired_state != before.desired_state:
            event.action = "desire-" + t.DesiredState.Name(c.desired_state)[8:].lower()
        else:
            event.action = "update"
        if c.service_id:
            event.attributes["service"] = c.spec.labels.get("berth.service", c.service_id)
        return event
    if key.startswith(keys.STATUS):
        if not change.put:
            return None  # the container's destroy says it
        s = _parse(t.ContainerStatus, change.value)
        event = control_pb2.Event(revision=rev, type="container", id=key[len(keys.STATUS):].decode(),
                                  action=STATE_ACTIONS.get(s.state, "status"))
        if s.state in (t.STATE_EXITED, t.STATE_FAILED):
            event.attributes["exit_code"] = str(s.exit_code)
        if s.message:
            event.attributes["message"] = s.message
        return event
    if key.startswith(keys.ALIVE):
        node = key[len(keys.ALIVE):].decode()
        return control_pb2.Event(revision=rev, type="node", id=node, name=node,
                                 action="ready" if change.put else "down")
    if key.startswith(keys.NODES):
        n = _parse(t.Node, change.value if change.put else change.previous)
        action = "remove" if not change.put else "join" if change.version == 1 else "update"
        return control_pb2.Event(revision=rev, type="node", id=n.id, name=n.name, action=action)
    if key.startswith(keys.SERVICES):
        svc = _parse(t.Service, change.value if change.put else change.previous)
        action = "remove" if not change.put else "create" if change.version == 1 else "update"
        event = control_pb2.Event(revision=rev, type="service", id=svc.id, name=svc.spec.name, action=action)
        if svc.update_state:
            event.attributes["update_state"] = svc.update_state
        return event
    if key == keys.LEADER:
        leader = change.value.decode() if change.put else change.previous.decode()
        return control_pb2.Event(revision=rev, type="controller", id=leader, name=leader,
                                 action="leader" if change.put else "resign")
    return None


def translate_all(change: Change) -> list[control_pb2.Event]:
    """The events of one key's change: translate's, and for a container created already placed (a Run
    group-committed on the leader) its assignment too, at the same revision, as if placed right after."""
    event = translate(change)
    if event is None:
        return []
    if event.action == "create" and change.put and change.key.startswith(keys.CONTAINERS):
        node = _parse(t.Container, change.value).node_id
        if node:
            assign = control_pb2.Event()
            assign.CopyFrom(event)
            assign.action = "assign"
            del assign.attributes["image"]
            assign.attributes["node"] = node
            return [event, assign]
    return [event]


def matches(event: control_pb2.Event, filters: dict[str, set[str]]) -> bool:
    values = {"type": event.type, "id": event.id, "name": event.name, "action": event.action}
    for field, wanted in filters.items():
        value = values.get(field, event.attributes.get(field, ""))
        if value not in wanted and not (field == "id" and any(value.startswith(w) for w in wanted)):
            return False
    return True


def parse_filters(filters: list[str]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for f in filters:
        field, sep, value = f.partition("=")
        if not sep or not field or not value:
            raise ValueError(f"invalid filter {f!r}: write KEY=VALUE (type, id, name, action, node, service)")
        out.setdefault(field, set()).add(value)
    return out


class EventsAPI:
    """The Events RPC, mixed into controller.api.ControlAPI."""

    store: Store

    async def Events(self, request: control_pb2.EventsRequest,
                     context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[control_pb2.Event]:
        try:
            filters = parse_filters(list(request.filters))
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        names: dict[str, str] = {}
        try:
            since = request.since_revision if request.since_revision > 0 else await self.store.revision()
            async for change in self.store.watch_changes(since):
                for event in translate_all(change):
                    if event.type == "container":  # status changes name the container too
                        if event.name:
                            names[event.id] = event.name
                        elif event.id in names:
                            event.name = names[event.id]
                        else:
                            found = await self.store.container_at(event.id, change.revision)
                            if found is not None:
                                event.name = names[event.id] = found.spec.name
                        if event.action == "destroy":
                            names.pop(event.id, None)
                    if matches(event, filters):
                        yield event
                since = change.revision
        except Unavailable as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"{exc}; resume with --since {since}")
        except StoreError as exc:
            await context.abort(grpc.StatusCode.OUT_OF_RANGE,
                                f"cannot stream events after revision {request.since_revision}: {exc}")
