"""berth's agent: one per host. It keeps a session with a controller, runs the containers assigned to its
host, and serves their logs.

    session.py     join, heartbeats, the assignment stream, status reports
    worker.py      the reconcile loop: assigned containers vs what runs
    executor.py    the runtime interface the worker drives
    runtime/       the Linux runtime: namespaces, cgroups, overlay rootfs (through the supervisor)
    supervisor.py  the per-host process that is parent, reaper and log writer of every container
    images/        references, the registry client, the content-addressed image store
    api.py, logs.py  the agent API (logs) for controllers
    metrics.py     Prometheus metrics
    main.py        the berth-agent command
"""

from berth import grpc_engine

grpc_engine.choose()  # issue 6 (throughput): before anything of this package imports grpc
