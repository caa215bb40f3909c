"""Sharded training on 8 CPU devices equals single-device training (the meshes run in a process of
their own: the device count is fixed when JAX starts)."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from conftest import json_report, xla_env
from resstream import ModelConfig, Transformer
from resstream import sharding as S  # noqa: N812
from resstream.checkpoint import Checkpoints
from resstream.config import ConfigError
from resstream.train import OptimizerConfig, init_state, make_optimizer, train_step

HERE = Path(__file__).resolve().parent
EIGHT_DEVICES = xla_env(devices=8)


def _eight_devices(script: str, *args: str) -> dict:
    """Run tests/`script` in a process with 8 CPU devices; its last stdout line is JSON."""
    result = subprocess.run(
        [sys.executable, str(HERE / script), *args], capture_output=True, text=True, env=EIGHT_DEVICES, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_sharded_train_steps_equal_the_single_device_steps():
    results = json_report([str(HERE / "sharded_steps.py"), "layernorm"], EIGHT_DEVICES)
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


@pytest.mark.slow
def test_checkpoints_move_between_8_devices_and_1(tmp_path):
    """Written under an 8-device FSDP mesh, restored onto 1 device bit for bit; and the other way."""
    config = ModelConfig(vocab_size=61, n_layers=2, d_model=32, n_heads=4, n_ctx=16, d_mlp=64)
    optimizer = make_optimizer(OptimizerConfig(learning_rate=1e-3, warmup_steps=1, total_steps=10))
    saved = _eight_devices("sharded_checkpoint.py", "save", str(tmp_path))
    assert saved["W_Q"] == "P(None, None, 'fsdp', None)"

    graphdef, state = init_state(Transformer(config, rngs=nnx.Rngs(0)), optimizer, 0)
    restored, _ = Checkpoints(tmp_path / "from8").restore(state, config)
    expected = np.load(tmp_path / "from8.npz")
    flat = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(restored)[0]}
    assert sorted(flat) == sorted(expected.files)
    for key, value in flat.items():
        assert np.array_equal(np.asarray(value), expected[key]), key
        assert len(value.devices()) == 1

    for batch in jax.random.randint(jax.random.key(2), (2, 1, 8, 17), 0, 61):
        state, _ = train_step(state, batch, graphdef=graphdef, optimizer=optimizer)
    Checkpoints(tmp_path / "from1").save(2, state, {"model_config": config.to_dict()})
    np.savez(tmp_path / "from1.npz", **{jax.tree_util.keystr(p): np.asarray(x)
                                         for p, x in jax.tree_util.tree_flatten_with_path(state)[0]})  # fmt: skip
    back = _eight_devices("sharded_checkpoint.py", "restore", str(tmp_path))
    assert back == {"equal": True, "W_Q": "P(None, None, 'fsdp', None)", "devices": 8}


@pytest.mark.slow
def test_analysis_sweeps_and_patching_run_on_a_sharded_model():
    """No code changes: a model whose parameters are sharded over 2 x 2 x 2 devices, fed tokens
    split over the batch, gives the one-device forward pass, cache, decomposition, logit lens,
    head-ablation sweep and patching grid (also run in cohorts, as a deep model runs them); the
    logits and every record of the cache come back split
    on their batch axis over data x fsdp, like the tokens (z's heads over tensor too)."""
    result = _eight_devices("sharded_analysis.py")
    assert result.pop("W_Q") == "P(None, 'tensor', 'fsdp', None)"
    for counted, expected in result.pop("resident"):  # each device: its shards' bytes
        assert counted == expected > 0
    room, expected_room = result.pop("room")  # devices 0, 3 and 6 report the least free bytes
    assert room == expected_room
    specs = result.pop("specs")
    batch = "('data', 'fsdp')"
    for name, spec in specs.items():
        lead = (
            f"P({batch},"
            if name in ("logits", "embed", "pos_embed", "resid_final", "ln_final_scale")
            else f"P(None, {batch}"
        )
        assert spec.startswith(lead), (name, spec)
    assert specs["z"] == f"P(None, {batch}, None, 'tensor')"
    assert {"attn_out", "mlp_out", "z", "ln1_scale", "embed", "resid_final"} <= set(specs)
    for name, error in result.items():
        assert error < 1e-5, (name, error)


def test_sharding_is_a_leaf():
    """sharding.py imports nothing of resstream's but the config, not even inside a function: the
    model imports it, so anything more could close an import cycle again."""
    import ast

    source = Path(S.__file__).read_text()
    imported = {
        node.module
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("resstream")
    }
    imported |= {
        alias.name
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Import)
        for alias in node.names
        if alias.name.startswith("resstream")
    }
    assert imported == {"resstream.config"}
