"""The Ansible rollout: the playbook parses, and the units it renders start berth's daemons with command
lines that the daemons themselves accept."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from agent.main import parse_args as agent_args
from controller.main import parse_args as controller_args

ANSIBLE = Path(__file__).resolve().parents[2] / "deploy" / "ansible"
BIN = Path(sys.executable).parent


def playbook(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "ansible-playbook"), "-i", "inventory.example.ini", *args],
        cwd=ANSIBLE, capture_output=True, text=True, check=False, timeout=120,
        env={"PATH": f"{BIN}:/usr/bin:/bin", "ANSIBLE_LOCAL_TEMP": "/tmp/berth-ansible-tmp",
             "ANSIBLE_NOCOLOR": "1", "HOME": "/root"},
    )


def test_site_playbook_parses() -> None:
    out = playbook("--syntax-check", "site.yml")
    assert out.returncode == 0, out.stdout + out.stderr


def exec_start(unit: Path) -> list[str]:
    line = next(line for line in unit.read_text().splitlines() if line.startswith("ExecStart="))
    return shlex.split(line.removeprefix("ExecStart="))


def test_rendered_units_start_the_daemons_with_valid_flags(tmp_path: Path) -> None:
    out = playbook("render-units.yml", "-e", f"out={tmp_path}")
    assert out.returncode == 0, out.stdout + out.stderr
    controller = exec_start(tmp_path / "ctl1" / "berth-controller.service")
    assert controller[0] == "/opt/berth/bin/berth-controller"
    args = controller_args(controller[1:])
    assert (args.etcd, args.listen) == ("http://192.0.2.10:2379", "192.0.2.10:7070")
    for node, address in (("node1", "192.0.2.21"), ("node2", "192.0.2.22")):
        unit = tmp_path / node / "berth-agent.service"
        assert "KillMode=process" in unit.read_text()  # containers outlive an agent restart
        agent = exec_start(unit)
        assert agent[0] == "/opt/berth/bin/berth-agent"
        parsed = agent_args(agent[1:])
        assert (parsed.name, parsed.address, parsed.controller) == (node, address, "192.0.2.10:7070")
    etcd = (tmp_path / "ctl1" / "etcd.default").read_text()
    assert 'ETCD_INITIAL_CLUSTER="ctl1=http://192.0.2.10:2380"' in etcd


@pytest.mark.parametrize("role", ["common", "etcd", "controller", "agent"])
def test_every_role_has_tasks(role: str) -> None:
    assert (ANSIBLE / "roles" / role / "tasks" / "main.yml").read_text().strip()
