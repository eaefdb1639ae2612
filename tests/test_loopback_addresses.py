"""Every loopback address 127.0.<slot>.N used in tests/ and bench/ is listed in tests/conftest.py's comment of them
(session 7: .134 and .135 were not), so that a new test does not take one in use by another."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
USED = re.compile(r"127\.0\.\{SLOT\}\.(\d+)(?![\d/])")  # not a subnet (.0/24)
LISTED = re.compile(r"^#   (\.\d[^ ]*(?: \.\d[^ ]*)*) ", re.MULTILINE)


def _listed() -> set[int]:
    out: set[int] = set()
    for field in LISTED.findall((REPO / "tests" / "conftest.py").read_text()):
        for item in field.replace(",", " ").split():
            first, _, last = item.lstrip(".").partition("-.")
            out.update(range(int(first), int(last or first) + 1))
    return out


def test_every_loopback_address_used_is_listed() -> None:
    listed = _listed()
    assert {53, 77} <= listed, listed  # the list was read
    used = {(int(n), str(path.relative_to(REPO))) for path in [*REPO.glob("tests/**/*.py"), *REPO.glob("bench/*.py")]
            if path.name != "test_loopback_addresses.py" for n in USED.findall(path.read_text())}
    assert len(used) > 10  # the addresses were found
    missing = sorted((n, where) for n, where in used if n not in listed)
    assert not missing, f"loopback addresses not listed in tests/conftest.py: {missing}"
