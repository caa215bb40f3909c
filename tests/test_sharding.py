"""Sharded training on 8 CPU devices equals single-device training (the meshes run in a process of
their own: the device count is fixed when JAX starts)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from resstream import sharding as S  # noqa: N812
from resstream.config import ConfigError

HERE = Path(__file__).resolve().parent


def test_sharded_train_steps_equal_the_single_device_steps():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    result = subprocess.run(
        [sys.executable, str(HERE / "sharded_steps.py"), "layernorm"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(result.stdout.strip().splitlines()[-1])
    assert results.pop("devices") == 8
    for mesh, r in results.items():  # 4 steps of AdamW with per-step updates of ~1e-2
        assert r["loss"] < 1e-5 and r["params"] < 1e-5 and r["opt_state"] < 1e-5, (mesh, r)
    assert results["fsdp"]["specs"] == {"W_Q": "P(None, None, 'fsdp', None)",
                                        "W_in": "P(None, None, 'fsdp')"}  # fmt: skip
    assert results["data x tensor"]["specs"] == {"W_Q": "P(None, 'tensor', None, None)",
                                                 "W_in": "P(None, None, 'tensor')"}  # fmt: skip
    assert results["data"]["specs"]["W_Q"] == "P(None, None, None, None)"


def test_mesh_sizes_must_match_the_devices():
    devices = jax.devices() * 8  # shape checks only: the same device repeated
    assert S.make_mesh(S.MeshConfig(data=-1, fsdp=2, tensor=2), devices).shape == {"data": 2, "fsdp": 2, "tensor": 2}
    with pytest.raises(ConfigError, match="needs 12 devices, but there are 8"):
        S.make_mesh(S.MeshConfig(data=3, fsdp=2, tensor=2), devices)
    with pytest.raises(ConfigError, match="do not split into fsdp x tensor = 3"):
        S.make_mesh(S.MeshConfig(data=-1, fsdp=3), devices)
    with pytest.raises(ConfigError, match="at most one -1"):
        S.make_mesh(S.MeshConfig(data=-1, fsdp=-1), devices)
