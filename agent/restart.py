"""Restart policies as Docker defines them, and the back-off between restarts: pure decisions, no I/O, no
sleeping; time comes in as arguments, so the worker (agent.worker) and the tests drive them with any clock.

    no                 never restart
    on-failure[:N]     restart when the exit code is not 0, at most N times (no N: without limit)
    always             restart whatever the exit code
    unless-stopped     as always; the difference (not restarted after the host restarts if the user had
                       stopped it) needs no code here: a user's stop sets desired state stopped, and no
                       policy restarts a container that is desired stopped

Back-off (Docker's restartmanager): the first restart waits 100 ms, each further one twice the last, at
most 1 min; a run that lasted 10 s or more resets it to 100 ms.

Exceptions: RestartPolicyError (a ValueError) for a policy that does not parse; its message is for a user.
"""

from __future__ import annotations

from dataclasses import dataclass

BACKOFF_INITIAL_S = 0.1
BACKOFF_MAX_S = 60.0
BACKOFF_RESET_AFTER_S = 10.0
POLICIES = ("no", "on-failure", "always", "unless-stopped")


class RestartPolicyError(ValueError):
    """A restart policy that does not parse."""


@dataclass(frozen=True)
class RestartPolicy:
    name: str = "no"
    max_retries: int = 0  # on-failure only; 0: no limit

    @classmethod
    def parse(cls, text: str) -> RestartPolicy:
        """`no`, `on-failure`, `on-failure:N`, `always`, `unless-stopped`; empty means `no`."""
        name, sep, count = text.strip().partition(":")
        name = name or "no"
        if name not in POLICIES:
            raise RestartPolicyError(
                f"invalid restart policy {text!r}: use no, on-failure[:N], always or unless-stopped"
            )
        if not sep:
            return cls(name)
        if name != "on-failure":
            raise RestartPolicyError(f"invalid restart policy {text!r}: only on-failure takes a retry count")
        try:
            retries = int(count)
        except ValueError:
            raise RestartPolicyError(f"invalid restart policy {text!r}: the retry count must be a number") from None
        if retries < 0:
            raise RestartPolicyError(f"invalid restart policy {text!r}: the retry count must not be negative")
        return cls(name, retries)

    def __str__(self) -> str:
        return f"{self.name}:{self.max_retries}" if self.name == "on-failure" and self.max_retries else self.name

    def wants_restart(self, exit_code: int, restart_count: int) -> bool:
        """Whether a container that exited with exit_code, already restarted restart_count times, is run
        again (a user's stop is not an exit this is asked about)."""
        if self.name in ("always", "unless-stopped"):
            return True
        if self.name == "on-failure":
            return exit_code != 0 and (self.max_retries == 0 or restart_count < self.max_retries)
        return False


@dataclass
class RestartTracker:
    """One container's restart count and back-off. `next_delay` is asked at each exit."""

    policy: RestartPolicy
    restart_count: int = 0
    _delay_s: float = 0.0

    def next_delay(self, exit_code: int, ran_s: float) -> float | None:
        """Seconds to wait before restarting a container that exited with exit_code after running ran_s
        seconds; None when the policy says it stays exited. Counts the restart when there is one."""
        if not self.policy.wants_restart(exit_code, self.restart_count):
            return None
        if ran_s >= BACKOFF_RESET_AFTER_S or self._delay_s == 0.0:
            self._delay_s = BACKOFF_INITIAL_S
        else:
            self._delay_s = min(self._delay_s * 2, BACKOFF_MAX_S)
        self.restart_count += 1
        return self._delay_s

    def reset(self) -> None:
        """A new run asked by a user (start, restart): count and back-off start afresh, as in Docker."""
        self.restart_count = 0
        self._delay_s = 0.0
