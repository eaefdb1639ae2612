"""The agent's Linux container runtime: namespaces, cgroups, overlay rootfs, no runc underneath.

    syscalls    every raw system call (ctypes), with the kernel's preconditions
    cgroups     v1/v2 cgroups: limits, join, kill, OOM, remove
    rootfs      the container's mounts, built inside its mount namespace, and pivot_root
    spawn       fork -> cgroups -> unshare -> fork (PID 1) -> rootfs -> exec, errors over a pipe
    state       the on-disk layout of the state dir, shared with the supervisor
    linux       LinuxExecutor, the Executor the agent uses, talking to agent.supervisor
    security    capabilities, user, ulimits, no_new_privs (issue 3b)
    mounts      -v binds and volumes, --tmpfs, --read-only (issue 3b)
    volumes     named volumes on this host (issue 3b)
    cgroup_limits  swap, CPU shares, CPU sets on v1 and v2 (issue 3b)
    exec        the exec helper: cgroup, setns, user, exec (issue 3b)

agent.supervisor is the per-host process that runs spawn, reaps, writes logs and records exits.
"""
