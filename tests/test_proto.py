"""The generated code in berth/api matches proto/: regenerate it with scripts/genproto."""

from __future__ import annotations

import filecmp
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    env_path = f"{Path(sys.executable).parent}:/usr/bin:/bin"
    subprocess.run(["bash", str(ROOT / "scripts" / "genproto"), str(tmp_path)], check=True, cwd=ROOT,
                   env={"PATH": env_path}, capture_output=True)
    fresh = sorted(p.name for p in (tmp_path / "berth" / "api").iterdir())
    committed = sorted(p.name for p in (ROOT / "berth" / "api").iterdir()
                       if p.is_file() and p.name != "__init__.py")
    assert fresh == committed, "generated files differ from berth/api: run scripts/genproto"
    generated, ours = tmp_path / "berth" / "api", ROOT / "berth" / "api"
    stale = [n for n in fresh if not filecmp.cmp(generated / n, ours / n, shallow=False)]
    assert not stale, f"stale generated code {stale}: run scripts/genproto and commit the result"
    shutil.rmtree(tmp_path / "berth")
