"""Configuration: the model (`ModelConfig`, validated when it is built), the optimizer, the device
mesh, and the run-config schema that train.py reads (`base_config`), whose defaults come from
these dataclasses."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict, config_dict

NORMS = ("layernorm", "rmsnorm")
NORM_PLACEMENTS = ("pre", "post")
POSITIONS = ("learned", "rotary")
# "gelu": GELU's tanh approximation (GPT-2's "gelu_new"); "gelu_exact": the erf form (GPT-NeoX's "gelu").
MLPS = ("gelu", "gelu_exact", "swiglu")
# Rotary frequency scaling for long contexts: "linear" divides every frequency by rope_factor;
# "llama3" divides only the low frequencies, blending in between (Llama 3.1's scheme).
ROPE_SCALINGS = ("none", "linear", "llama3")
DTYPES = ("float32", "bfloat16", "float16")
REMATS = ("none", "dots", "full")
ATTENTIONS = ("auto", "xla", "cudnn")
# The largest d_head cuDNN's fused attention takes: on Hopper (compute capability 9.0) and later
# GPUs; earlier ones take up to 128 (resstream.devices.cudnn_max_d_head).
CUDNN_MAX_D_HEAD = 256
# The norm that each kind of sublayer owns (its parameters blocks.ln1 / blocks.ln2, its recorded
# scale "ln1_scale" / "ln2_scale"): pre-LN reads the stream through it, post-LN applies it after the write.
SUBLAYER_NORM = {"attn": "ln1", "mlp": "ln2"}
# Fields that change how the model is computed, not which model it is: checkpoints restore across them.
RUNTIME_FIELDS = frozenset({"remat", "attention"})


class ConfigError(ValueError):
    """A ModelConfig field, or a combination of fields, is invalid."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and architecture of a resstream Transformer.

    Frozen and hashable, so it can be a static argument of `jax.jit`. `d_head` defaults to
    `d_model // n_heads` and `d_mlp` to `4 * d_model` (None for attention-only models).
    """

    vocab_size: int = 256
    n_layers: int = 4
    d_model: int = 128
    n_heads: int = 4
    # Key/value heads: n_heads (multi-head attention, the default), fewer (grouped-query: query head h
    # reads key/value head h // (n_heads // n_kv_heads)), or 1 (multi-query). Must divide n_heads.
    n_kv_heads: int | None = None
    d_head: int | None = None
    d_mlp: int | None = None
    n_ctx: int = 256
    norm: str = "layernorm"  # "layernorm" | "rmsnorm"
    norm_placement: str = "pre"  # "pre": x + f(norm(x));  "post": norm(x + f(x))
    positions: str = "learned"  # "learned" (W_pos, the "pos_embed" write) | "rotary"
    mlp: str = "gelu"  # "gelu" (tanh approximation) | "gelu_exact" | "swiglu"
    attn_only: bool = False
    # GPT-NeoX / GPT-J blocks: x + attn(ln1(x)) + mlp(ln2(x)), both sublayers reading the layer's input
    # stream (and writing "{l}_attn_out", "{l}_mlp_out" as usual). Pre-LN residual models with an MLP.
    parallel_attn: bool = False
    # Biases per projection (a False one is no parameter at all): the query/key/value projections,
    # attention's output projection b_O, the MLP's (b_in, b_gate, b_out) and the unembedding's b_U.
    qkv_bias: bool = True
    attn_out_bias: bool = True
    mlp_bias: bool = True
    unembed_bias: bool = True
    # Causal attention to at most the last `sliding_window` positions (the query's own included), as
    # Mistral; None attends to every earlier position.
    sliding_window: int | None = None
    tied_embeddings: bool = False
    residual: bool = True  # False: each sublayer's output replaces the stream (a plain network)
    # DeepNorm (Wang et al. 2022): a post-LN block norm(alpha * x + f(x)) that carries the stream
    # scaled up by alpha = (2 n_layers)^(1/4), with W_V, W_O and the MLP weights drawn with std
    # init_std * (8 n_layers)^(-1/4): trains very deep post-LN models. Needs norm_placement="post"
    # and residual=True.
    deepnorm: bool = False
    dropout: float = 0.0  # on the embedding and on every write, in training only
    stochastic_depth: float = 0.0  # drop probability of the last layer; grows linearly from 0
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    norm_eps: float = 1e-5
    rotary_base: float = 10_000.0
    # Rotary positions on the first rotary_dim dimensions of each head only (GPT-NeoX's rotary_pct);
    # None rotates all d_head. Even, at most d_head.
    rotary_dim: int | None = None
    rope_scaling: str = "none"  # "none" | "linear" | "llama3" (see ROPE_SCALINGS)
    rope_factor: float = 1.0  # "linear", "llama3": how much longer a context the frequencies serve
    rope_low_freq_factor: float = 1.0  # "llama3": wavelengths above original_n_ctx / this are divided by rope_factor
    rope_high_freq_factor: float = 4.0  # "llama3": wavelengths below original_n_ctx / this are kept
    rope_original_n_ctx: int = 8192  # "llama3": the context the model was first trained at
    init_std: float = 0.02
    # Rematerialisation of the layer body in the backward pass: "none" keeps every activation;
    # "dots" keeps only matmul outputs (jax.checkpoint_policies.dots_with_no_batch_dims_saveable) and
    # recomputes the cheap elementwise work; "full" keeps only each layer's input. Losses and
    # gradients are the same. "dots" is the default: on XLA's CPU backend the backward scan over
    # stored activations is slow (benchmarks/train_throughput.py).
    remat: str = "dots"
    # The attention that computes z (resstream/attention.py): "auto" takes cuDNN's fused (flash)
    # attention on an NVIDIA GPU where cuDNN takes the shapes (16-bit compute, d_head a multiple of 8
    # up to 128, or 256 on Hopper and later), and XLA ops with a flash-style backward everywhere else;
    # "xla" or "cudnn" insist on one.
    attention: str = "auto"

    def __post_init__(self) -> None:
        _validate(self)
        if self.d_head is None:
            object.__setattr__(self, "d_head", self.d_model // self.n_heads)
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        if self.d_mlp is None and not self.attn_only:
            object.__setattr__(self, "d_mlp", 4 * self.d_model)
        if self.positions == "rotary" and self.rotary_dim is None and self.d_head % 2:
            raise ConfigError(
                f"positions='rotary' needs an even d_head, got d_head={self.d_head}: "
                "choose d_model / n_heads even, set d_head to an even number, or use positions='learned'"
            )
        if self.rotary_dim is not None and (self.rotary_dim % 2 or self.rotary_dim > self.d_head):
            raise ConfigError(
                f"rotary_dim={self.rotary_dim} must be even and at most d_head={self.d_head}: rotary "
                "positions rotate pairs of a head's dimensions"
            )
        if self.attention == "cudnn" and not self.cudnn_fits:
            raise ConfigError(
                "attention='cudnn' needs dtype bfloat16 or float16 and d_head a multiple of 8 up to "
                f"{CUDNN_MAX_D_HEAD} (cuDNN's fused attention), got dtype={self.dtype!r}, d_head={self.d_head}: "
                "use attention='auto', which falls back to XLA's"
            )

    @property
    def rotary_dims(self) -> int:
        """The dimensions of each head that rotary positions rotate (rotary_dim, or all of d_head)."""
        return self.d_head if self.rotary_dim is None else self.rotary_dim

    @property
    def compute_dtype(self) -> jnp.dtype:
        """The dtype activations and matmuls are computed in."""
        return jnp.dtype(self.dtype)

    @property
    def params_dtype(self) -> jnp.dtype:
        """The dtype parameters are stored in."""
        return jnp.dtype(self.param_dtype)

    @property
    def residual_scale(self) -> float:
        """alpha, the factor the carried stream is scaled by at every write: (2 n_layers)^(1/4) with
        DeepNorm, else 1."""
        return (2 * self.n_layers) ** 0.25 if self.deepnorm else 1.0

    @property
    def deepnorm_beta(self) -> float:
        """DeepNorm's beta = (8 n_layers)^(-1/4), the init gain of W_V, W_O and the MLP weights."""
        return (8 * self.n_layers) ** -0.25

    @property
    def sublayers_per_layer(self) -> int:
        """2 (attention, MLP), or 1 for an attention-only model."""
        return 1 if self.attn_only else 2

    @property
    def n_sublayers(self) -> int:
        """Sublayers in the model: the points where the stream is read and written."""
        return self.n_layers * self.sublayers_per_layer

    def sublayer(self, k: int) -> tuple[int, str]:
        """Sublayer index k (0 .. n_sublayers - 1, in the order the stream meets them) -> (layer,
        "attn" | "mlp")."""
        if self.attn_only:
            return k, "attn"
        return k // 2, ("attn", "mlp")[k % 2]

    @property
    def cudnn_fits(self) -> bool:
        """Whether cuDNN's fused attention takes this model's shapes on some GPU: 16-bit compute and
        d_head a multiple of 8, at most 256 (at most 128 before Hopper: `devices.cudnn_max_d_head`)."""
        return self.dtype in ("bfloat16", "float16") and self.d_head % 8 == 0 and self.d_head <= CUDNN_MAX_D_HEAD

    def check_layer(
        self, layer: int, *, what: str = "layer", error: type[Exception] = IndexError, hint: str = ""
    ) -> int:
        """`layer` as an index 0..n_layers-1 (a negative one counts from the last layer, as in Python);
        `error` (naming `what`, followed by `hint`) when the model has no such layer."""
        if isinstance(layer, bool) or not isinstance(layer, int | np.integer):
            raise error(f"{what}={layer!r} must be an integer layer index{hint}")
        if not -self.n_layers <= layer < self.n_layers:
            raise error(f"{what}={layer} is out of range: the model has layers 0..{self.n_layers - 1}{hint}")
        return int(layer) % self.n_layers

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict (JSON-ready; saved with checkpoints)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        """A ModelConfig from `to_dict()`'s output; unknown fields are a ConfigError."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown ModelConfig fields {unknown}; valid fields are {sorted(known)}")
        return cls(**values)


def _choice(cfg: ModelConfig, field: str, choices: tuple[str, ...]) -> None:
    value = getattr(cfg, field)
    if value not in choices:
        raise ConfigError(f"{field}={value!r} is not supported: choose one of {list(choices)}")


def _positive_int(cfg: ModelConfig, field: str) -> None:
    value = getattr(cfg, field)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{field} must be a positive integer, got {value!r}")


def _validate(cfg: ModelConfig) -> None:
    for field in ("vocab_size", "n_layers", "d_model", "n_heads", "n_ctx"):
        _positive_int(cfg, field)
    for field in ("d_head", "d_mlp", "n_kv_heads", "rotary_dim", "sliding_window", "rope_original_n_ctx"):
        if getattr(cfg, field) is not None:
            _positive_int(cfg, field)
    _choice(cfg, "norm", NORMS)
    _choice(cfg, "norm_placement", NORM_PLACEMENTS)
    _choice(cfg, "positions", POSITIONS)
    _choice(cfg, "mlp", MLPS)
    _choice(cfg, "dtype", DTYPES)
    _choice(cfg, "param_dtype", DTYPES)
    _choice(cfg, "remat", REMATS)
    _choice(cfg, "attention", ATTENTIONS)
    _choice(cfg, "rope_scaling", ROPE_SCALINGS)
    _validate_architecture(cfg)
    if cfg.d_head is None and cfg.d_model % cfg.n_heads:
        raise ConfigError(
            f"d_model={cfg.d_model} is not divisible by n_heads={cfg.n_heads}: choose d_model a multiple "
            f"of n_heads (e.g. {cfg.n_heads * max(1, cfg.d_model // cfg.n_heads)}), or set d_head explicitly"
        )
    if cfg.attn_only and cfg.d_mlp is not None:
        raise ConfigError(f"d_mlp={cfg.d_mlp} is set but attn_only=True has no MLP: drop d_mlp or set attn_only=False")
    if not 0.0 <= cfg.dropout < 1.0:
        raise ConfigError(f"dropout must be in [0, 1), got {cfg.dropout}")
    if not 0.0 <= cfg.stochastic_depth < 1.0:
        raise ConfigError(f"stochastic_depth must be in [0, 1), got {cfg.stochastic_depth}")
    if cfg.stochastic_depth > 0 and not cfg.residual:
        raise ConfigError(
            "stochastic_depth > 0 needs residual=True: dropping a layer of a plain network leaves no "
            "stream to pass on; set stochastic_depth=0.0 or residual=True"
        )
    if cfg.deepnorm and (cfg.norm_placement != "post" or not cfg.residual):
        raise ConfigError(
            f"deepnorm=True is a post-LN residual block norm(alpha * x + f(x)), got norm_placement="
            f"{cfg.norm_placement!r}, residual={cfg.residual}: set norm_placement='post' and residual=True, "
            "or deepnorm=False"
        )
    if cfg.norm_eps <= 0:
        raise ConfigError(f"norm_eps must be positive, got {cfg.norm_eps}")
    if cfg.init_std <= 0:
        raise ConfigError(f"init_std must be positive, got {cfg.init_std}")
    if cfg.rotary_base <= 1:
        raise ConfigError(f"rotary_base must be greater than 1, got {cfg.rotary_base}")


def _validate_architecture(cfg: ModelConfig) -> None:
    """The options that loaded checkpoints (GPT-NeoX, Llama, ...) bring: each with what it needs."""
    if cfg.n_kv_heads is not None and cfg.n_heads % cfg.n_kv_heads:
        raise ConfigError(
            f"n_kv_heads={cfg.n_kv_heads} must divide n_heads={cfg.n_heads}: each key/value head serves "
            "an equal group of query heads"
        )
    if cfg.parallel_attn and (cfg.norm_placement != "pre" or not cfg.residual or cfg.attn_only):
        raise ConfigError(
            f"parallel_attn=True is the pre-LN residual block x + attn(ln1(x)) + mlp(ln2(x)), got "
            f"norm_placement={cfg.norm_placement!r}, residual={cfg.residual}, attn_only={cfg.attn_only}: "
            "set norm_placement='pre', residual=True and attn_only=False, or parallel_attn=False"
        )
    if cfg.positions != "rotary":
        for field, default in (("rotary_dim", None), ("rope_scaling", "none")):
            if getattr(cfg, field) != default:
                raise ConfigError(
                    f"{field}={getattr(cfg, field)!r} needs positions='rotary', got {cfg.positions!r}: "
                    f"set positions='rotary' or {field}={default!r}"
                )
    if cfg.rope_scaling != "none" and cfg.rope_factor < 1:
        raise ConfigError(
            f"rope_factor must be at least 1 with rope_scaling={cfg.rope_scaling!r}, got {cfg.rope_factor}"
        )
    if cfg.rope_scaling == "llama3" and not 0 < cfg.rope_low_freq_factor < cfg.rope_high_freq_factor:
        raise ConfigError(
            f"rope_scaling='llama3' needs 0 < rope_low_freq_factor < rope_high_freq_factor, got "
            f"{cfg.rope_low_freq_factor} and {cfg.rope_high_freq_factor}"
        )


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with linear warmup and cosine decay, after clipping the global gradient norm."""

    learning_rate: float = 1e-3
    warmup_steps: int = 100
    total_steps: int = 1000
    min_lr_ratio: float = 0.1  # the cosine decays to learning_rate * min_lr_ratio
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    grad_clip: float = 1.0


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Devices as data x fsdp x tensor (see resstream/sharding.py); -1 takes the devices left over."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1


def base_config() -> ConfigDict:
    """Every field a run reads, with defaults; the presets in configs/ change what they need."""
    model = ModelConfig().to_dict()
    model["d_head"] = config_dict.placeholder(int)
    model["d_mlp"] = config_dict.placeholder(int)
    for field in ("n_kv_heads", "rotary_dim", "sliding_window"):
        model[field] = config_dict.placeholder(int)
    optimizer = dataclasses.asdict(OptimizerConfig())
    del optimizer["total_steps"]  # the run's train.steps
    return ConfigDict(
        {
            "run_dir": "runs/default",
            "mesh": dataclasses.asdict(MeshConfig()),
            # join a multi-host job (TPU pod, SLURM, or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
            # JAX_PROCESS_ID in the environment) with jax.distributed.initialize before anything else
            "distributed": False,
            "model": model,
            "optimizer": optimizer,
            "data": {
                "source": "stdlib",
                "text_column": "text",
                "validation_fraction": 0.05,
                "cache_dir": "runs/.token_cache",
                # "bytes" (ids 0..255), "bpe:N" (a byte-level BPE of N tokens trained on the training
                # split, kept as run_dir/tokenizer.json) or the path of a tokenizer.json; model.vocab_size
                # must be at least the tokenizer's vocabulary (resstream/tokenizer.py)
                "tokenizer": "bytes",
            },
            "train": {
                "steps": 1000,
                "batch_size": 16,
                "grad_accum": 1,
                "seed": 0,
                "log_every": 10,
                "eval_every": 200,
                "eval_batches": 8,
                "checkpoint_every": 200,
                "keep_last": 3,
                "telemetry": True,
                "tensorboard": True,
                "progress": True,
                "sample_tokens": 200,
                # a corrupt latest checkpoint: False refuses to resume (naming the newest intact one);
                # True moves the corrupt ones to run_dir/corrupt_checkpoints/ and resumes from it
                "resume_intact": False,
            },
        }
    )


def model_config(config: ConfigDict) -> ModelConfig:
    """The ModelConfig of a run config."""
    return ModelConfig.from_dict(dict(config.model))


def optimizer_config(config: ConfigDict) -> OptimizerConfig:
    """The OptimizerConfig of a run config (its schedule spans train.steps)."""
    return OptimizerConfig(**{**dict(config.optimizer), "total_steps": config.train.steps})
