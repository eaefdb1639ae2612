"""Health checks on the host (issue 6): the agent runs each running container's check inside it and reports
starting, healthy or unhealthy with the container's status (Docker's semantics: berth.healthcheck).

`HealthReporter` is the worker's status reporter with this added: every status the worker reports for a
container passes through it, so a running container with a check gets a probe task (one per run, told
apart by its start time) and its current health in each report, and a container that stops running loses
its probe. The probe's results are reported as the last status sent with a new `health`.

A check is one more process in the container: the exec helper (agent.runtime.exec, a short-lived process
that joins the container's namespaces and cgroup), with the container's user, environment and working
directory, its output captured (4 KiB kept) and killed when it runs past the timeout. A container that gives
no check runs its image's HEALTHCHECK (`["NONE"]`, from `--no-healthcheck`, runs none). Health is not kept
across an agent restart: an adopted container starts again from `starting` (Docker keeps it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from collections.abc import Awaitable, Callable, Mapping

from agent.images.store import ImageConfig
from agent.runtime.exec import ExecError
from agent.runtime.linux import LinuxExecutor
from agent.worker import Images, Reporter
from berth import healthcheck
from berth.api import types_pb2 as t

log = logging.getLogger(__name__)


def image_check(config: ImageConfig, given: t.HealthCheck | None = None) -> t.HealthCheck:
    """An image's HEALTHCHECK as a container's check (none: an empty one); one berth cannot run (a Test that
    is not CMD, CMD-SHELL or NONE) is left out, with a warning, as if the image had none. `given`: the
    container's check with no command, whose interval, timeout, retries and start period (each one set) replace
    the image's, as Docker merges them (session 6: `--health-interval` without `--health-cmd`)."""
    check = t.HealthCheck(test=config.health_test, interval_s=config.health_interval_s,
                          timeout_s=config.health_timeout_s, retries=config.health_retries,
                          start_period_s=config.health_start_period_s)
    if given is not None:
        check.interval_s = given.interval_s or check.interval_s
        check.timeout_s = given.timeout_s or check.timeout_s
        check.retries = given.retries or check.retries
        check.start_period_s = given.start_period_s or check.start_period_s
    problem = healthcheck.validate(check) if check.test else None
    if problem is not None:
        log.warning("the image's HEALTHCHECK %s is not run: %s", list(config.health_test), problem)
        return t.HealthCheck()
    return check


class HealthReporter(Reporter):
    """A Reporter that also runs health checks; with no executor (hollow agents) it is a plain Reporter."""

    def __init__(self, executor: LinuxExecutor | None,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep, images: Images | None = None) -> None:
        super().__init__()
        self.executor = executor
        self.images = images  # the host's images: a container that gives no check runs its image's HEALTHCHECK
        self.assignments: Mapping[str, t.Assignment] = {}  # the worker's, set once it exists
        self._sleep = sleep
        self._probes: dict[str, tuple[int, asyncio.Task[None]]] = {}  # cid -> (started_at_ns, probe)
        self._health: dict[str, t.Health] = {}

    def report(self, cid: str, status: t.ContainerStatus) -> None:
        check = self._check(cid) if status.state == t.STATE_RUNNING else None  # the image lookup only then
        if check is not None:
            current = self._probes.get(cid)
            if current is None or current[0] != status.started_at_ns:
                self._stop(cid)
                self._health[cid] = t.Health(status="starting")
                task = asyncio.get_running_loop().create_task(self._probe(cid, status.started_at_ns, check))
                self._probes[cid] = (status.started_at_ns, task)
            if not status.HasField("health"):
                status.health.CopyFrom(self._health[cid])
        else:
            self._stop(cid)
        super().report(cid, status)

    def forget(self, cid: str) -> None:
        self._stop(cid)
        super().forget(cid)

    def _check(self, cid: str) -> t.HealthCheck | None:
        """The container's check: its own, else its image's (Docker's HEALTHCHECK; `--no-healthcheck` gives
        ["NONE"], which turns the image's off); None when it has none."""
        a = self.assignments.get(cid)
        if self.executor is None or a is None:
            return None
        check = a.spec.healthcheck
        if not check.test and self.images is not None:
            image = self.images.get(a.spec.image)
            if image is not None:
                check = image_check(image.config, check)
        return check if healthcheck.enabled(check) else None

    def _stop(self, cid: str) -> None:
        probe = self._probes.pop(cid, None)
        self._health.pop(cid, None)
        if probe is not None:
            probe[1].cancel()

    async def _probe(self, cid: str, started_at_ns: int, check: t.HealthCheck) -> None:
        hc = healthcheck.effective(check)
        health = self._health[cid]
        while True:
            await self._sleep(hc.interval_s)
            last = self.sent.get(cid)
            if last is None or last.state != t.STATE_RUNNING or last.started_at_ns != started_at_ns:
                return
            if last.message == "paused":  # a frozen container cannot answer; Docker skips it too
                continue
            try:
                result = await self.run_check(cid, hc)
            except Exception as exc:  # a failed check: ending the probe would freeze the health it reports
                log.exception("health check of %s", cid[:12])
                now = time.time_ns()
                result = t.HealthResult(start_ns=now, end_ns=now, exit_code=-1,
                                        output=f"the health check could not run: {exc}")
            in_start_period = time.time_ns() - started_at_ns < hc.start_period_s * 1e9
            if result.exit_code == 0:
                health.status, health.failing_streak = "healthy", 0
            elif not (in_start_period and health.status == "starting"):
                health.failing_streak += 1
                if health.failing_streak >= hc.retries:
                    health.status = "unhealthy"
            health.log.append(result)
            del health.log[:-healthcheck.LOG_ENTRIES]
            last = self.sent.get(cid)
            if self._probes.get(cid, (0,))[0] != started_at_ns or last is None or last.state != t.STATE_RUNNING:
                return  # it stopped while the check ran
            update = t.ContainerStatus()
            update.CopyFrom(last)
            update.health.CopyFrom(health)
            super().report(cid, update)

    async def run_check(self, cid: str, hc: healthcheck.Effective) -> t.HealthResult:
        """Run the check once in the container: exit code 0 passes; -1 when it timed out or could not run."""
        from agent import exec_session

        assert self.executor is not None
        start = time.time_ns()
        try:
            spec = await exec_session.prepare(self.executor, t.ExecStart(container=cid, args=hc.args))
        except ExecError as exc:
            return t.HealthResult(start_ns=start, end_ns=time.time_ns(), exit_code=-1, output=str(exc))
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "agent.runtime.exec", spec.to_json(),
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
                cwd="/",
            )
        except OSError as exc:  # a failed check, not the end of the probe (which would keep the last health)
            return t.HealthResult(start_ns=start, end_ns=time.time_ns(), exit_code=-1,
                                  output=f"cannot run the health check on this host: {exc.strerror or exc}")
        try:
            async with asyncio.timeout(hc.timeout_s):
                out, _ = await proc.communicate()
            code = proc.returncode if proc.returncode is not None else -1
            output = out[: healthcheck.MAX_OUTPUT].decode(errors="replace")
        except TimeoutError:
            code, output = -1, f"Health check exceeded timeout ({hc.timeout_s:g}s)"
        finally:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()  # the command in the container dies with the helper (PDEATHSIG)
                await proc.wait()
        return t.HealthResult(start_ns=start, end_ns=time.time_ns(), exit_code=code, output=output)
