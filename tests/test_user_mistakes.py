"""Runs tests/replay_user_mistakes.py (issue 14's replay of a new user's mistakes) as a user would run it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent / "replay_user_mistakes.py"


def test_replay_of_user_mistakes_passes_every_case():
    r = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=900)
    summary = re.search(r"^(\d+) cases, (\d+) passed", r.stdout, re.M)
    assert summary, r.stdout[-3000:] + r.stderr[-3000:]
    failed = [ln for ln in r.stdout.splitlines() if ln.startswith("FAIL") or ln.startswith("      ->")]
    assert summary.group(1) == summary.group(2) and r.returncode == 0, "\n".join(failed)
    assert int(summary.group(1)) >= 30
