"""Shared fixtures: tiny models for every supported configuration, built once per session."""

from __future__ import annotations

import os
import shutil

# Tests check values, not speed: on a CPU, skip LLVM's optimisation passes, which dominate compile
# time for tiny models. On an NVIDIA GPU machine keep XLA's optimisation (its GPU backend is made
# for it), make its scatter-adds deterministic (the embedding gradient; the bit-for-bit tests need
# it), and leave JAX's memory unallocated until used (JAX takes 75% at start otherwise). Set before
# JAX starts; a caller's XLA_FLAGS are kept.
os.environ["XLA_FLAGS"] = " ".join([
    os.environ.get("XLA_FLAGS", ""),
    "--xla_gpu_deterministic_ops=true"
    if os.environ.get("JAX_PLATFORMS", "") != "cpu" and shutil.which("nvidia-smi")
    else "--xla_backend_optimization_level=0",
]).strip()  # fmt: skip
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


import dataclasses
import functools
import itertools
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from resstream import ModelConfig, Transformer
from resstream.config import base_config
from resstream.data import STDLIB, load_documents


def _share_compiled_programs() -> None:
    """JAX's persistent compilation cache in one directory for the whole test run: the first process
    to import this file (pytest itself) makes it, and the xdist workers and the subprocess tests it
    starts inherit it through the environment. Many tests train or analyse models of one shape, so
    a program compiled by one is loaded by the rest; the key is the program itself, so a hit can only
    return what compiling again would. A cache the caller chose is kept."""
    import atexit
    import shutil
    import tempfile

    if "JAX_COMPILATION_CACHE_DIR" in os.environ:
        return
    directory = tempfile.mkdtemp(prefix="resstream-test-compiles-")
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = directory  # for the processes started from this one
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
    jax.config.update("jax_compilation_cache_dir", directory)  # this one read the environment already
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)


_share_compiled_programs()


CPU_QUICK_COMPILE = "--xla_backend_optimization_level=0"


def xla_env(devices: int | None = None, *, optimised: bool = False) -> dict[str, str]:
    """The environment for a subprocess on the CPU: this one's XLA_FLAGS with `CPU_QUICK_COMPILE`
    (or with `optimised`, XLA's default optimisation level) and `devices` CPU devices, or XLA's
    default of one when None. JAX_PLATFORMS=cpu, so that on a GPU machine too these subprocesses
    (train.py runs, meshes of CPU devices, hosts with one CPU device each) run as they do here
    rather than all on the one GPU."""
    dropped = ("--xla_force_host_platform_device_count", "--xla_backend_optimization_level")
    flags = [f for f in os.environ["XLA_FLAGS"].split() if not f.startswith(dropped)]
    flags += [] if optimised else [CPU_QUICK_COMPILE]
    if devices is not None:
        flags.append(f"--xla_force_host_platform_device_count={devices}")
    return {**os.environ, "XLA_FLAGS": " ".join(flags), "JAX_PLATFORMS": "cpu"}


def stub_cudnn_checks(monkeypatch, capability: str = "9.0") -> None:
    """jax's cuDNN version and GPU checks answered as on an NVIDIA GPU of `capability` with cuDNN
    9.10, so that cuDNN attention traces and lowers for CUDA on this CPU (never compiles); the test
    is skipped if a JAX version moves them."""
    cudnn = pytest.importorskip("jax._src.cudnn.fused_attention_stablehlo")
    if not all(hasattr(cudnn, n) for n in ("check_cudnn_version", "check_compute_capability")):
        pytest.skip("this JAX checks cuDNN's version or the GPU elsewhere")
    version = lambda text: tuple(map(int, text.split(".")))  # noqa: E731
    monkeypatch.setattr(cudnn, "check_cudnn_version", lambda: 91000)
    monkeypatch.setattr(cudnn, "check_compute_capability", lambda wanted: version(capability) >= version(wanted))
    monkeypatch.setattr(cudnn, "is_cuda_compute_capability_equal", lambda wanted: wanted == capability)


def json_report(args: list[str], env: dict[str, str], timeout: float = 600, **kwargs) -> dict:
    """Run `python *args` in a process of its own; the JSON object its last line of output prints."""
    import json
    import subprocess
    import sys

    result = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=timeout, **kwargs)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


TINY = dict(vocab_size=61, n_layers=3, d_model=32, n_heads=4, n_ctx=16)
BATCH, SEQ = 2, 12


def grid() -> list[dict]:
    """Every supported architecture: the 96 of `base_grid()`, then 4 DeepNorm models (post-LN,
    residual) that between them take each norm, each kind of positions and each MLP, then the 8
    `FAMILIES`, which combine the options that Hugging Face checkpoints bring."""
    deepnorm = [
        dict(
            norm=norm,
            norm_placement="post",
            positions=positions,
            mlp=mlp,
            attn_only=False,
            tied_embeddings=tied,
            residual=True,
            deepnorm=True,
        )
        for norm, positions, mlp, tied in (
            ("layernorm", "learned", "gelu", False),
            ("rmsnorm", "rotary", "swiglu", False),
            ("layernorm", "rotary", "swiglu", True),
            ("rmsnorm", "learned", "gelu", True),
        )
    ]
    return [*base_grid(), *deepnorm, *FAMILIES.values()]


def base_grid() -> list[dict]:
    """norm x placement x positions x MLP (or attention-only) x tied/untied x residual on/off (96)."""
    return [
        dict(
            norm=norm,
            norm_placement=placement,
            positions=positions,
            mlp=mlp or "gelu",
            attn_only=mlp is None,
            tied_embeddings=tied,
            residual=residual,
        )
        for norm, placement, positions, mlp, tied, residual in itertools.product(
            ("layernorm", "rmsnorm"),
            ("pre", "post"),
            ("learned", "rotary"),
            ("gelu", "swiglu", None),
            (False, True),
            (True, False),
        )
    ]


_NO_BIASES = dict(qkv_bias=False, attn_out_bias=False, mlp_bias=False, unembed_bias=False)
_PRE_RESID = dict(norm_placement="pre", attn_only=False, residual=True)
_LLAMA = dict(norm="rmsnorm", positions="rotary", mlp="swiglu", tied_embeddings=False, n_kv_heads=2, **_NO_BIASES)
# Architectures as the model families that loaded checkpoints come from combine the options (at TINY's
# d_head = 8, n_heads = 4); between them they take every option and every value of each.
FAMILIES: dict[str, dict] = {
    "gpt2": dict(
        norm="layernorm", positions="learned", mlp="gelu", tied_embeddings=True, unembed_bias=False, **_PRE_RESID
    ),
    # GPT-NeoX / Pythia: rotary on a quarter of each head (rotary_pct 0.25; here a half), parallel blocks, erf GELU
    "neox": dict(
        norm="layernorm",
        positions="rotary",
        rotary_dim=4,
        mlp="gelu_exact",
        parallel_attn=True,
        tied_embeddings=False,
        **_PRE_RESID,
    ),
    # GPT-J-like: parallel blocks and partial rotary without attention biases; here also linear rope scaling
    "gptj_linear": dict(
        norm="layernorm",
        positions="rotary",
        rotary_dim=4,
        rope_scaling="linear",
        rope_factor=2.0,
        mlp="gelu",
        parallel_attn=True,
        qkv_bias=False,
        attn_out_bias=False,
        tied_embeddings=False,
        **_PRE_RESID,
    ),
    "llama": dict(_LLAMA, **_PRE_RESID),
    # Llama 3.1's scaling with a context and base at which TINY's four frequencies take every branch:
    # wavelengths 2 pi * 100^(i/4) = 6.3 (kept, < 32/4), 19.9 (blended), 62.8 and 199 (divided, > 32/1)
    "llama3": dict(
        _LLAMA,
        rotary_base=100.0,
        rope_scaling="llama3",
        rope_factor=4.0,
        rope_low_freq_factor=1.0,
        rope_high_freq_factor=4.0,
        rope_original_n_ctx=32,
        **_PRE_RESID,
    ),
    "qwen2": dict(_LLAMA, n_kv_heads=1, qkv_bias=True, tied_embeddings=True, **_PRE_RESID),
    "mistral": dict(_LLAMA, sliding_window=5, **_PRE_RESID),  # 5 < SEQ: the window masks keys
    # Not a real family: the new attention options under post-LN in an attention-only model
    "post_attn_only": dict(
        norm="layernorm",
        norm_placement="post",
        positions="learned",
        mlp="gelu",
        attn_only=True,
        tied_embeddings=False,
        residual=True,
        n_kv_heads=2,
        sliding_window=5,
        **_NO_BIASES,
    ),
}


def sample() -> list[dict]:
    """17 configurations spread over the grid, for checks that do not need all 108: every 7th of the
    96 of `base_grid()` (7 is coprime to their strides, so every value of every axis appears), then one
    DeepNorm model, then the Mistral-like and the GPT-NeoX-like families (grouped-query attention,
    sliding window, no biases; parallel blocks, partial rotary, erf GELU). `sample()[1::3]` keeps six
    configurations, the NeoX-like last, and not the DeepNorm model (tests/test_ablation.py compares them
    with tests/reference.py directly, which knows no DeepNorm; see `reference_inputs`)."""
    deepnorm = next(kw for kw in grid() if kw.get("deepnorm"))
    return [*base_grid()[::7], deepnorm, FAMILIES["mistral"], FAMILIES["neox"]]


def grid_id(kw: dict) -> str:
    """A readable, unique test id: a family's name, or the base axes (and "deepnorm")."""
    family = next((name for name, config in FAMILIES.items() if config == kw), None)
    if family is not None:
        return family
    return "-".join(
        [
            kw["norm"],
            kw["norm_placement"],
            kw["positions"],
            "attn_only" if kw["attn_only"] else kw["mlp"],
            "tied" if kw["tied_embeddings"] else "untied",
            "resid" if kw["residual"] else "plain",
            *(["deepnorm"] if kw.get("deepnorm") else []),
        ]
    )


def randomize(model: Transformer, seed: int = 0, scale: float = 0.1) -> Transformer:
    """Perturb every parameter (biases and norm weights included), so that no term of the
    decomposition can hide behind a zero or one initialisation."""
    state = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    noisy = [x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys, strict=True)]
    nnx.update(model, jax.tree.unflatten(treedef, noisy))
    return model


@functools.cache
def built(**kw) -> tuple[Transformer, jax.Array, jax.Array, dict]:
    """(model, tokens, logits, full cache) for a tiny randomised model; memoised across tests."""
    cfg = ModelConfig(**{**TINY, **kw})
    model = randomize(Transformer(cfg, rngs=nnx.Rngs(0)))
    tokens = jax.random.randint(jax.random.key(1), (BATCH, SEQ), 0, cfg.vocab_size)
    logits, cache = model.run_with_cache(tokens, record=("resid_pre", "resid_mid"))
    return model, tokens, logits, cache


def reference_inputs(model: Transformer) -> tuple[dict, ModelConfig]:
    """(parameters as a nested dict, config) to give tests/reference.py for `model`. A DeepNorm model
    is given as the plain post-LN model it equals, which the reference implements: norm(alpha x + f(x))
    == norm'(x + f(x) / alpha), where norm' has eps / alpha^2 (a norm is scale-invariant but for its
    eps) and f / alpha is f with its output projection (W_O, b_O or W_out, b_out) divided by alpha.
    The stream is the same at every point, with any sublayer, head or write removed."""
    params, cfg = nnx.to_pure_dict(nnx.state(model, nnx.Param)), model.cfg
    if not cfg.deepnorm:
        return params, cfg
    alpha = cfg.residual_scale
    blocks = {name: dict(sub) for name, sub in params["blocks"].items()}
    for sub, names in (("attn", ("W_O", "b_O")), ("mlp", ("W_out", "b_out"))):
        for name in names:
            blocks[sub][name] = np.asarray(blocks[sub][name], np.float64) / alpha
    plain = dataclasses.replace(cfg, deepnorm=False, norm_eps=cfg.norm_eps / alpha**2)
    return {**params, "blocks": blocks}, plain


def max_rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def roundoff_tolerance(cfg) -> float:
    """Relative tolerance for two float32 computations of the same logits that XLA fuses
    differently (a write kept as an output or not, a scan or a loop). One layer differs by a few
    ulps (~3e-7). Residual networks keep that flat with depth; a plain network (residual=False)
    amplifies it layer by layer (measured ~3e-6 at 3 layers, through LayerNorm's centring of
    large-mean activations), a property of the network and not of the code path."""
    return 1e-6 if cfg.residual else 1e-5


@pytest.fixture(params=grid(), ids=grid_id)
def arch(request) -> dict:
    return request.param


@pytest.fixture(params=sample(), ids=grid_id)
def sampled_arch(request) -> dict:
    return request.param


@pytest.fixture(scope="session")
def corpus_slice(tmp_path_factory) -> Path:
    """~400 kB of the default corpus (standard-library sources), as local text files."""

    def write(directory: Path) -> None:
        size = 0
        for i, text in enumerate(load_documents(STDLIB, "train")["text"]):
            (directory / f"doc{i:04d}.txt").write_text(text)
            size += len(text.encode())
            if size > 400_000:
                break

    return shared_dir(tmp_path_factory, "corpus", write)


def shared_dir(tmp_path_factory, name: str, make) -> Path:
    """A directory that `make(directory)` fills once per test session, however many xdist workers
    ask for it: the first builds it under a lock, the others wait and reuse it (a trained run costs
    a compile and a training loop per process otherwise). Treat it as read-only."""
    import fcntl
    import shutil

    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # the session's, under xdist
    directory = root / f"shared-{name}"
    with open(root / f"shared-{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (directory / ".complete").exists():
            shutil.rmtree(directory, ignore_errors=True)
            directory.mkdir()
            make(directory)
            (directory / ".complete").touch()
    return directory


def tiny_config(corpus: Path, tmp_path: Path, **train):
    config = base_config()
    config.model.update(vocab_size=256, n_layers=2, d_model=32, n_heads=4, n_ctx=32)
    config.optimizer.update(learning_rate=3e-3, warmup_steps=10)
    config.data.update(source=str(corpus), cache_dir=str(tmp_path / "cache"), validation_fraction=0.1)
    config.train.update(
        steps=40,
        batch_size=8,
        log_every=1,
        eval_every=20,
        eval_batches=2,
        checkpoint_every=10,
        progress=False,
        tensorboard=False,
        sample_tokens=16,
    )
    config.train.update(**train)
    return config


@pytest.fixture
def corrupt_batch(monkeypatch):
    """`corrupt_batch(n)`: the n-th training batch a run draws (0-based) gets an out-of-vocabulary
    token id, which the model's embedding turns into NaN: a divergence injected from outside."""

    def corrupt_at(index: int) -> None:
        from resstream.data import Sampler

        draw = Sampler.next_batch
        calls = iter(range(1 << 30))

        def next_batch(self, rows):
            batch = draw(self, rows)
            if next(calls) == index:
                batch = batch.copy()
                batch[0, 0] = 1 << 30
            return batch

        monkeypatch.setattr(Sampler, "next_batch", next_batch)

    return corrupt_at
