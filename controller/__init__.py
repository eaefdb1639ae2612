"""berth's controller: the control API for berthctl, agent sessions, the scheduler and orchestrator, and
all cluster state in etcd.

    api.py           ControlAPI servicer (berthctl -> controller)
    dispatcher.py    agent sessions: join, heartbeats and node leases, assignment streams, status reports
    orchestrator.py  placement and lifecycle: the one place that writes placement and desired state
    scheduler.py     placement decisions as pure functions
    store.py         the etcd key layout and typed reads and writes
    metrics.py       Prometheus metrics
    main.py          the berth-controller command
"""

from berth import grpc_engine

grpc_engine.choose()  # issue 6 (throughput): before anything of this package imports grpc
