"""One measurement in a fresh process, for benchmarks that time each framework on its own (two
frameworks' thread pools in one process slow each other)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def run_json(script: str, *args: str) -> dict:
    """Run `python script *args` with the project on PYTHONPATH; return the JSON of its last line."""
    path = os.pathsep.join([str(Path(script).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, script, *args], env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{Path(script).name} {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
