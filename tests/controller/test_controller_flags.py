"""berth-controller refuses a negative --sample in one line that says what is allowed (a number of fitting hosts,
0 for all of them), before it reaches etcd: -1 was taken, and meant every host (session 6's known-left). The
controller as a real process, given an etcd address where nothing listens."""

from __future__ import annotations

import subprocess
import sys

from controller.main import parse_args
from tests.controller.conftest import HOST


def test_a_negative_sample_is_refused_in_one_line() -> None:
    out = subprocess.run([sys.executable, "-m", "controller", "--sample", "-1", "--etcd", f"http://{HOST}:1",
                          "--listen", f"{HOST}:0", "--metrics-listen", f"{HOST}:0"],
                         capture_output=True, text=True, timeout=60, check=False)
    assert (out.returncode, out.stdout) == (2, ""), out
    assert out.stderr == ("berth-controller: invalid --sample -1: give how many fitting hosts a placement looks at, "
                          "or 0 for all of them\n")


def test_zero_and_positive_samples_are_taken() -> None:
    assert [parse_args(["--sample", n]).sample for n in ("0", "10")] == [0, 10]
    assert parse_args([]).sample == 0  # every fitting host
