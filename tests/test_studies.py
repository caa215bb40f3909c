"""Every study at a micro size, through its command (`python -m resstream study NAME`, in-process):
the files it writes and what they hold. The scientific outcome belongs in the reports (README,
"Studies"), not here: at a few training steps no claim can hold or fail meaningfully."""

from __future__ import annotations

import csv
import json
import math

import pytest

from resstream.cli import main
from resstream.studies import STUDIES, study_module

# Models of 1-2 layers, d_model 16, trained 3 steps of 4 x 16 bytes.
MICRO = [
    "--config.base.model.n_layers=2",
    "--config.base.model.d_model=16",
    "--config.base.model.n_heads=2",
    "--config.base.model.n_ctx=16",
    "--config.base.train.steps=3",
    "--config.base.train.batch_size=4",
    "--config.base.train.eval_batches=1",
    "--config.base.train.eval_every=3",
    "--config.base.train.checkpoint_every=3",
    "--config.base.train.log_every=1",
    "--config.base.train.progress=False",
    "--config.base.optimizer.warmup_steps=1",
    "--config.seeds=(0,)",
]
STUDY_MICRO = {
    "degradation": ["--config.depths=(1,2)"],
    "gradient-highway": ["--config.n_layers=2", "--config.batches=1", "--config.checkpoints=1"],
    "warmup": ["--config.learning_rates=(0.001,)", "--config.warmup_steps=2"],
    "deletion": ["--config.batches=1", "--config.draws=2"],
    "stochastic-depth": ["--config.batches=1", "--config.draws=2"],
    "depth": ["--config.base.model.n_layers=3", "--config.base.train.log_every=1"],
    "stream": ["--config.prompts=('def f(x):\\n    return x\\n',)"],
}
# What each study's rows must cover: column -> the values every one of which appears.
COVERS = {
    "degradation": {"depth": {1, 2}, "variant": {"residual", "plain"}},
    "gradient-highway": {"layer": {0, 1, 2}, "step": {0, 3}},
    "warmup": {"placement": {"pre-LN", "post-LN"}, "warmup": {0, 2}},
    "deletion": {"variant": {"residual", "plain"}, "kind": {"curve", "block"}},
    "stochastic-depth": {"variant": {"with", "without"}, "k": {0, 1, 2}},
    "depth": {"variant": {"pre-LN residual", "pre-LN plain", "post-LN residual", "post-LN DeepNorm"}},
    "stream": {"point": {"0_pre", "0_mid", "1_pre", "1_mid", "final"}},
}

# Columns that must be finite wherever they appear (in a run that did not diverge).
FINITE = {
    "degradation": ["train_loss", "val_loss"],
    "gradient-highway": ["loss", "stream_grad_norm"],
    "warmup": ["train_loss", "val_loss"],
    "deletion": ["loss", "delta", "angular_distance"],
    "stochastic-depth": ["loss", "delta", "val_loss"],
    "depth": ["train_loss"],
    "stream": ["lens_loss", "lens_top1", "direct_logit_attribution", "write_over_stream"],
}


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """One pool of trained models for the module (per xdist worker): studies that need the same
    micro model (the residual and plain 2-layer models serve four of them) train it once, as they do
    at full size. (Every study on one worker, so that all share one pool, was tried: the suite took
    14:05 against 13:40 without it, two runs that also differed in a few tests.)"""
    return tmp_path_factory.mktemp("pool")


def test_every_study_is_tested():
    assert set(STUDY_MICRO) == set(STUDIES) == set(COVERS) == set(FINITE)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(STUDIES))
def test_study_writes_its_report(name, pool, corpus_slice, tmp_path, capsys):
    out = tmp_path / name
    args = [f"--config.base.data.source={corpus_slice}", f"--config.base.data.cache_dir={pool / 'cache'}"]
    main(["study", name, *MICRO, *STUDY_MICRO[name], *args, f"--config.out_dir={out}", f"--config.pool_dir={pool}"])
    module = study_module(name)

    results = json.loads((out / "results.json").read_text())
    assert results["study"] == name and results["verdict"] in ("held", "partly held", "did not hold")
    assert results["runs"] and all((pool / p.split("/")[-1]).is_dir() for p in results["runs"].values())
    rows = results["rows"]
    for column, values in COVERS[name].items():
        assert values <= {r.get(column) for r in rows}, (column, values)
    for column in FINITE[name]:
        values = [r[column] for r in rows if r.get(column, "") != "" and not r.get("diverged")]
        assert values and all(math.isfinite(v) for v in values), column

    with open(out / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows) and set(table[0]) == set(rows[0])
    assert (out / f"{module.NAME}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.md").read_text()
    assert module.CLAIM in report and f"## Verdict: {results['verdict']}" in report
    assert f"![{name}]({name}.png)" in report and "|---|" in report
    assert f"{name}: {results['verdict']}" in capsys.readouterr().out


def test_a_study_run_twice_reuses_its_models(tmp_path, corpus_slice, capsys):
    """The second run trains nothing: every model is found in the pool under its config's key."""
    args = ["study", "stream", *MICRO, *STUDY_MICRO["stream"], f"--config.base.data.source={corpus_slice}",
            f"--config.base.data.cache_dir={tmp_path / 'cache'}", f"--config.pool_dir={tmp_path / 'pool'}",
            f"--config.out_dir={tmp_path / 'out'}"]  # fmt: skip
    main(args)
    first = json.loads((tmp_path / "out" / "results.json").read_text())
    capsys.readouterr()
    main(args)
    assert "already trained: reused" in capsys.readouterr().out
    assert json.loads((tmp_path / "out" / "results.json").read_text())["rows"] == first["rows"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["study", "nope"], "no study 'nope'"),
        (["study", "depth", "--config.base.model.n_layer=3"], "n_layer"),
        (["study", "depth", "--config.margin=abc"], "margin"),
    ],
)
def test_a_bad_study_command_is_one_error_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


@pytest.mark.parametrize(
    "arch",
    [{"residual": False}, {"norm_placement": "post", "deepnorm": True}],
    ids=["plain", "deepnorm"],
)
def test_gradient_norms_are_the_models_own_gradients(arch):
    """gradient-highway's forward pass with stream offsets is the model's: the same loss, the same
    parameter gradients; and its gradient at the final stream is the unembedding's."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from resstream import ModelConfig, Transformer
    from resstream.losses import cross_entropy
    from resstream.studies.gradient_highway import gradient_norms
    from resstream.train import layer_norms

    model = Transformer(ModelConfig(n_layers=3, d_model=16, n_heads=2, n_ctx=8, **arch), rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    tokens = jax.random.randint(jax.random.key(0), (2, 9), 0, model.cfg.vocab_size)
    norms = gradient_norms(state, tokens, graphdef=graphdef)

    def loss(state):
        return cross_entropy(nnx.merge(graphdef, state)(tokens[:, :-1]), tokens[:, 1:])

    value, grads = jax.value_and_grad(loss)(state)
    np.testing.assert_allclose(norms["loss"], value, rtol=1e-6)
    np.testing.assert_allclose(norms["params"], layer_norms(grads["blocks"], 3), rtol=1e-5)
    _, cache = model.run_with_cache(tokens[:, :-1])
    final = jax.grad(lambda x: cross_entropy(model.unembed(x)[0], tokens[:, 1:]))(cache["resid_final"])
    np.testing.assert_allclose(norms["stream"][-1], jnp.sqrt(jnp.sum(final**2)), rtol=1e-5)


@pytest.mark.slow
def test_a_study_whose_model_diverged_still_reports(tmp_path, corpus_slice, corrupt_batch, capsys):
    """The residual model diverges at its first step (a corrupted batch): the deletion study still
    writes its report, with that model's row empty, and a 1-layer plain model is measured."""
    corrupt_batch(0)
    args = ["study", "deletion", *MICRO, *STUDY_MICRO["deletion"], "--config.base.model.n_layers=1",
            f"--config.base.data.source={corpus_slice}", f"--config.base.data.cache_dir={tmp_path / 'cache'}",
            f"--config.pool_dir={tmp_path / 'pool'}", f"--config.out_dir={tmp_path / 'out'}"]  # fmt: skip
    main(args)
    assert "diverged" in capsys.readouterr().out
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert {r["variant"] for r in results["rows"]} == {"plain"}
    report = (tmp_path / "out" / "report.md").read_text()
    assert "| residual | 0 | nan |" in report and "| plain | 0 |" in report
    main(args)  # the diverged run is found, not trained again
    assert "diverged when it was trained" in capsys.readouterr().out
