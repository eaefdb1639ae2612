"""agent.fingerprint: labels from a file and flags over the automatic ones, and bad labels refused in one line."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.fingerprint import FingerprintError, take
from berth.api import dispatcher_pb2 as d


def test_flags_win_over_the_file_which_wins_over_automatic_labels(tmp_path: Path) -> None:
    labels = tmp_path / "labels"
    labels.write_text("# rack and disk\nrack = r7\n\ndisk=hdd\nberth.storage.driver=custom\n")
    fp = take(["disk=ssd", "empty="], str(labels))
    assert fp.labels["rack"] == "r7" and fp.labels["disk"] == "ssd" and fp.labels["empty"] == ""
    assert fp.labels["berth.storage.driver"] == "custom"
    assert fp.labels["berth.kernel.version"] == os.uname().release == fp.kernel_version
    join = d.JoinRequest(name="h")
    fp.fill(join)
    assert join.platform == fp.platform and join.capacity.memory_bytes > 0 and join.capacity.nano_cpus >= 10**9
    assert dict(join.labels) == fp.labels and join.hostname == os.uname().nodename


@pytest.mark.parametrize(("flags", "content", "message"), [
    (["disk"], None, r"invalid label 'disk' in --label: write KEY=VALUE"),
    (["=ssd"], None, r"invalid label '=ssd' in --label: write KEY=VALUE"),
    ([], "ok=1\nnot a label\n", "line 2: write KEY=VALUE"),
])
def test_bad_labels_are_refused(tmp_path: Path, flags: list[str], content: str | None, message: str) -> None:
    path = ""
    if content is not None:
        (tmp_path / "labels").write_text(content)
        path = str(tmp_path / "labels")
    with pytest.raises(FingerprintError, match=message):
        take(flags, path)


def test_a_missing_labels_file_says_so(tmp_path: Path) -> None:
    with pytest.raises(FingerprintError, match=r"cannot read the labels file .*: No such file or directory; fix"):
        take([], str(tmp_path / "nope"))
