"""A decoder-only transformer whose blocks read from and write to a carried residual stream.

Parameter names follow TransformerLens: W_E, W_pos, blocks.{ln1,attn,ln2,mlp}, ln_final, W_U, b_U,
with attention weights per head (W_Q [n_heads, d_model, d_head], W_O [n_heads, d_head, d_model]).
Every block parameter carries a leading layer axis: the layers are created with `nnx.vmap` and run
with one `jax.lax.scan`, so compile time does not grow with depth.

The mathematics, for a pre-LN model with residual connections:

    x = W_E[tokens] + W_pos[:seq]                              (writes "embed", "pos_embed")
    for each layer l:
        x = x + attn_l(ln1_l(x))                               (writes "{l}_attn_out")
        x = x + mlp_l(ln2_l(x))                                (writes "{l}_mlp_out")
    logits = ln_final(x) @ W_U + b_U

post-LN: x = ln1_l(x + attn_l(x)); x = ln2_l(x + mlp_l(x)); no final norm.
parallel attention (GPT-NeoX): x = x + attn_l(ln1_l(x)) + mlp_l(ln2_l(x)), both reading the layer's input.
DeepNorm: post-LN with the carried stream scaled, x = ln1_l(alpha * x + attn_l(x)), alpha = (2 n_layers)^(1/4).
residual=False: the `x +` is dropped, each sublayer's output becomes the stream.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from resstream.attention import remat_policy
from resstream.config import SUBLAYER_NORM, ModelConfig
from resstream.layers import MLP, Attention, Norm, add_bias, bias_param, dropout, normal_param
from resstream.matmul import dense
from resstream.memory import run_within
from resstream.rotary import rotary_tables
from resstream.sharding import BATCH_AXES, FREE, constrain, mesh_context
from resstream.stream import MODES, OPTIONAL_RECORDS, ResidualStream, token_norm

if TYPE_CHECKING:
    from resstream.interventions import Ablation, Replacement

Cache = dict[str, jax.Array]

# Records whose leading axis is the layer axis (stacked by the scan); the rest start at batch.
LAYER_RECORDS = frozenset({"attn_out", "mlp_out", "z", "ln1_scale", "ln2_scale", *OPTIONAL_RECORDS})


class TokenError(ValueError):
    """Token ids or sequence lengths that the model cannot take."""


class Block(nnx.Module):
    """One layer: attention then (unless attention-only) MLP, each reading and writing the stream."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.post_ln = cfg.norm_placement == "post"
        self.parallel = cfg.parallel_attn
        self.dropout = cfg.dropout
        self.ln1 = Norm(cfg)
        self.attn = Attention(cfg, rngs=rngs)
        self.ln2 = None if cfg.attn_only else Norm(cfg)
        self.mlp = None if cfg.attn_only else MLP(cfg, rngs=rngs)

    def __call__(
        self,
        stream: ResidualStream,
        rope: tuple[jax.Array, jax.Array] | None = None,
        rng: jax.Array | None = None,
        drop_prob: jax.Array | float = 0.0,
    ) -> ResidualStream:
        """Apply the layer. `rng` (training only) drives dropout and stochastic depth, which drops
        the whole layer for a batch element with probability `drop_prob` (and rescales survivors)."""
        if rng is not None:
            attn_key, mlp_key, depth_key = jax.random.split(rng, 3)
            batch = stream.resid.shape[0]
            keep = jax.random.bernoulli(depth_key, 1.0 - drop_prob, (batch, 1, 1))
            depth_mask = keep / (1.0 - drop_prob)
        else:
            attn_key = mlp_key = depth_mask = None

        def finish(write: jax.Array, key: jax.Array | None) -> jax.Array:
            write = dropout(write, self.dropout, key)
            return write if depth_mask is None else (write * depth_mask).astype(write.dtype)

        stream = stream.record("resid_pre", stream.read())
        stream = stream.record_stat("resid_pre_norm", jnp.mean(token_norm(stream.read())))
        layer_input = stream.read()
        stream = self.sublayer("attn", stream, rope, attn_key, finish)
        if self.mlp is not None:
            stream = stream.record("resid_mid", stream.read())
            reads = layer_input if self.parallel else None
            stream = self.sublayer("mlp", stream, rope, mlp_key, finish, reads=reads)
        return stream

    def sublayer(
        self,
        kind: str,
        stream: ResidualStream,
        rope: tuple[jax.Array, jax.Array] | None = None,
        key: jax.Array | None = None,
        finish: Callable[[jax.Array, jax.Array | None], jax.Array] | None = None,
        compute: bool = True,
        reads: jax.Array | None = None,
    ) -> ResidualStream:
        """Apply one sublayer ("attn" or "mlp"): read the stream, compute, write, and (post-LN)
        normalise. `compute=False` skips the sublayer's own computation and writes zeros in its
        place: for a stream whose ablation replaces or deletes this write anyway. `reads`: the stream
        [batch, seq, d_model] a pre-LN sublayer reads instead of the current one (a parallel block's
        MLP reads the layer's input, not the stream after attention's write)."""
        norm_name, write_name = SUBLAYER_NORM[kind], f"{kind}_out"
        norm = getattr(self, norm_name)
        run = self._attn(rope, stream) if kind == "attn" else self._mlp()
        if not compute:
            run = lambda s, h: (s, jnp.zeros(stream.resid.shape, stream.resid.dtype))  # noqa: E731
        finish = finish or (lambda write, _: write)
        before = stream.read()
        if self.post_ln:  # x = norm(x + f(x))
            stream, out = run(stream, stream.read())
            stream = stream.write(write_name, finish(out, key))
            y, scale = norm(stream.read())
            stream = stream.record(f"{norm_name}_scale", scale).replace_resid(y)
        else:  # x = x + f(norm(x))
            h, scale = norm(stream.read() if reads is None else reads)
            stream = stream.record(f"{norm_name}_scale", scale)
            stream, out = run(stream, h)
            stream = stream.write(write_name, finish(out, key))
        return stream.skip(write_name, before)

    def _attn(self, rope, stream: ResidualStream):
        want_pattern = stream.wants("pattern")

        def run(s: ResidualStream, h: jax.Array) -> tuple[ResidualStream, jax.Array]:
            out, z, pattern = self.attn(h, rope, want_pattern, s.edit_z)
            s = s.record("z", z)
            if pattern is not None:
                s = s.record("pattern", pattern)
            return s, out

        return run

    def _mlp(self):
        def run(s: ResidualStream, h: jax.Array) -> tuple[ResidualStream, jax.Array]:
            out, post = self.mlp(h)
            return s.record("mlp_post", post), out

        return run


def check_tokens(tokens: Any, cfg: ModelConfig) -> jax.Array:
    """Validate token ids [batch, seq] and return them as an int32 array.

    Concrete arrays are checked against the vocabulary here. Traced arrays (inside a user's `jit`)
    cannot raise; for them the embedding lookup returns NaN for out-of-range ids instead of
    clamping them, so the error surfaces as a non-finite loss rather than as wrong numbers.
    """
    if not isinstance(tokens, jax.core.Tracer):
        tokens = np.asarray(tokens) if not isinstance(tokens, jax.Array) else tokens
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise TokenError(f"tokens must be integer ids, got dtype {tokens.dtype}")
    if tokens.ndim != 2:
        hint = ": use tokens[None] for a single sequence" if tokens.ndim == 1 else ""
        raise TokenError(f"tokens must have shape [batch, seq], got shape {tuple(tokens.shape)}{hint}")
    if tokens.shape[1] == 0 or tokens.shape[0] == 0:
        raise TokenError(f"tokens must hold at least one sequence of one token, got shape {tokens.shape}")
    if tokens.shape[1] > cfg.n_ctx:
        raise TokenError(
            f"sequence length {tokens.shape[1]} exceeds the model's context n_ctx={cfg.n_ctx}: "
            f"truncate or split the input to at most {cfg.n_ctx} tokens, or use a config with larger n_ctx"
        )
    if not isinstance(tokens, jax.core.Tracer):
        host = np.asarray(tokens)
        bad = np.argwhere((host < 0) | (host >= cfg.vocab_size))
        if len(bad):
            b, t = (int(i) for i in bad[0])
            raise TokenError(
                f"token id {int(host[b, t])} at [batch {b}, position {t}] is outside the vocabulary "
                f"[0, {cfg.vocab_size}) ({len(bad)} such ids in all): check the tokenizer, or raise "
                "vocab_size in the config"
            )
    return jnp.asarray(tokens, jnp.int32)


class Transformer(nnx.Module):
    """The residual-stream transformer.

    >>> model = Transformer(ModelConfig(n_layers=2, d_model=64, n_heads=4), rngs=nnx.Rngs(0))
    >>> logits = model(tokens)                       # [batch, seq, vocab], float32
    >>> logits, cache = model.run_with_cache(tokens)  # cache: every write, z, norm scales

    Pass `rng` to train (dropout and stochastic depth); without it the model is deterministic.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        pdt = cfg.params_dtype
        self.W_E = normal_param(rngs, (cfg.vocab_size, cfg.d_model), cfg.init_std, pdt)
        learned = cfg.positions == "learned"
        self.W_pos = normal_param(rngs, (cfg.n_ctx, cfg.d_model), cfg.init_std, pdt) if learned else None

        @nnx.split_rngs(splits=cfg.n_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_blocks(rngs: nnx.Rngs) -> Block:
            return Block(cfg, rngs=rngs)

        self.blocks = make_blocks(rngs)  # every parameter has a leading [n_layers] axis
        self.ln_final = Norm(cfg) if cfg.norm_placement == "pre" else None
        self.W_U = None if cfg.tied_embeddings else normal_param(rngs, (cfg.d_model, cfg.vocab_size), cfg.init_std, pdt)
        self.b_U = bias_param(cfg.unembed_bias, (cfg.vocab_size,), pdt)

    # ----------------------------------------------------------------------------------- pieces
    @property
    def unembed_matrix(self) -> jax.Array:
        """W_U [d_model, vocab] (W_E transposed when the embeddings are tied)."""
        return self.W_E[...].T if self.W_U is None else self.W_U[...]

    def rope(self, seq: int) -> tuple[jax.Array, jax.Array] | None:
        """Rotary cos/sin tables [seq, rotary_dims] for rotary positions, else None."""
        cfg = self.cfg
        return rotary_tables(seq, cfg) if cfg.positions == "rotary" else None

    def layer(self, index: int) -> Block:
        """Layer `index` as a standalone Block (a view of that slice of the stacked weights)."""
        graphdef, state = nnx.split(self.blocks)
        return nnx.merge(graphdef, jax.tree.map(lambda a: a[index], state))

    def embed(
        self, tokens: jax.Array, mode: str = "off", record: tuple[str, ...] = (), rng: jax.Array | None = None
    ) -> ResidualStream:
        """tokens [batch, seq] -> the initial stream [batch, seq, d_model] ("embed" + "pos_embed")."""
        cfg = self.cfg
        keys = (None, None) if rng is None else tuple(jax.random.split(rng))
        # mode="fill": an out-of-range id gives NaN, never a silently clamped row.
        # The table gathered whole first (as FSDP gathers any weight), then rows taken per sequence.
        table = constrain(self.W_E[...], None, None)
        embed = jnp.take(table, tokens, axis=0, mode="fill", fill_value=jnp.nan)
        embed = constrain(embed, BATCH_AXES, None, None)
        embed = dropout(embed.astype(cfg.compute_dtype), cfg.dropout, keys[0])
        stream = ResidualStream(embed, {}, mode=mode, residual=True, optional=record)
        stream = stream.record("embed", embed)
        if self.W_pos is not None:
            pos = jnp.broadcast_to(self.W_pos[: tokens.shape[1]], embed.shape).astype(cfg.compute_dtype)
            pos = dropout(pos, cfg.dropout, keys[1])
            stream = stream.replace(resid=embed + pos).record("pos_embed", pos)
        return stream.replace(residual=cfg.residual, carry_scale=cfg.residual_scale)

    def unembed(self, resid: jax.Array) -> tuple[jax.Array, jax.Array | None]:
        """Final stream [batch, seq, d_model] -> (logits [batch, seq, vocab] float32, final scale)."""
        scale = None
        if self.ln_final is not None:
            resid, scale = self.ln_final(resid)
        dt = self.cfg.compute_dtype
        logits = dense(resid.astype(dt), self.unembed_matrix.astype(dt), out_dtype=jnp.float32)
        return add_bias(logits, self.b_U), scale

    # ---------------------------------------------------------------------------------- forward
    def __call__(
        self,
        tokens: jax.Array,
        *,
        rng: jax.Array | None = None,
        ablation: Ablation | None = None,
        replacement: Replacement | None = None,
        memory_budget: int | None = None,
    ) -> jax.Array:
        """tokens [batch, seq] -> logits [batch, seq, vocab] (float32). With an `ablation` (and the
        `replacement` values it writes), the ablated model's logits: see `resstream.ablation`."""
        return self.run_with_cache(
            tokens, mode="off", rng=rng, ablation=ablation, replacement=replacement, memory_budget=memory_budget
        )[0]

    def run_with_cache(
        self,
        tokens: jax.Array,
        *,
        mode: str = "full",
        record: tuple[str, ...] = (),
        rng: jax.Array | None = None,
        ablation: Ablation | None = None,
        replacement: Replacement | None = None,
        memory_budget: int | None = None,
    ) -> tuple[jax.Array, Cache]:
        """Forward pass that also returns what the blocks recorded, run only if its compiled peak
        fits `memory_budget` bytes (default: most of the device's memory; see `resstream.memory`).

        mode "full": the cache holds "embed" [batch, seq, d_model], "pos_embed" (learned positions),
        "attn_out" and "mlp_out" [n_layers, batch, seq, d_model], "z" [n_layers, batch, seq, n_heads,
        d_head], "ln1_scale"/"ln2_scale" [n_layers, batch, seq, 1], "resid_final" [batch, seq, d_model]
        (the stream before the final norm) and "ln_final_scale" [batch, seq, 1] (pre-LN).
        `record` adds any of "resid_pre", "resid_mid" [n_layers, batch, seq, d_model],
        "mlp_post" [n_layers, batch, seq, d_mlp], "pattern" [n_layers, batch, n_heads, seq_q, seq_k].
        mode "stats": per-layer scalars [n_layers]: "resid_pre_norm", and for each write
        ("attn_out", "mlp_out") "{write}_norm", "{write}_resid_norm", "{write}_cos" (token means).
        The logits are the same in every mode. With an `ablation`, the cache records what the
        ablated model wrote (a deleted sublayer's record holds what it would have written).
        """
        if mode not in MODES:
            raise ValueError(f"mode={mode!r} is not a recording mode: choose one of {list(MODES)}")
        unknown = sorted(set(record) - set(OPTIONAL_RECORDS))
        if unknown:
            raise ValueError(f"cannot record {unknown}: optional records are {list(OPTIONAL_RECORDS)}")
        if record and mode != "full":
            raise ValueError(f"record={record} needs mode='full', got mode={mode!r}")
        tokens = check_tokens(tokens, self.cfg)  # outside jit, where a bad id can still raise
        if (ablation is None) != (replacement is None):
            raise ValueError("an ablation needs its replacement values and vice versa: pass both or neither")
        with mesh_context((self, tokens)):  # a sharded model pins its activations on its mesh
            return run_within(
                _compiled_forward,
                (self, tokens, rng, (ablation, replacement)),  # the model is a pytree
                {"mode": mode, "record": tuple(record)},
                budget=memory_budget,
                what=f"run_with_cache(mode={mode!r}) on tokens {tuple(tokens.shape)}",
                hint=": run fewer or shorter sequences, or record less (mode='off' or 'stats', fewer `record`s)",
            )

    def forward(
        self,
        tokens: jax.Array,
        *,
        mode: str = "full",
        record: tuple[str, ...] = (),
        rng: jax.Array | None = None,
        ablation: Ablation | None = None,
        replacement: Replacement | None = None,
    ) -> tuple[jax.Array, Cache]:
        """The forward pass as plain traced code, for use inside your own `jit`, `vmap` or `grad`:
        (logits [batch, seq, vocab], cache) as `run_with_cache` returns them, without its checks
        (token ids, recording options) and without a compiled call of its own. `tokens` must
        already be valid int32 ids [batch, seq]."""
        cfg = self.cfg
        embed_rng, block_rng = (None, None) if rng is None else tuple(jax.random.split(rng))
        stream = self.embed(tokens, mode, record, embed_rng)
        rope = self.rope(tokens.shape[1])

        graphdef, block_state = nnx.split(self.blocks)
        if block_rng is None:
            per_layer = (block_state, None, None, ablation, replacement)
        else:
            drop_probs = jnp.linspace(0.0, cfg.stochastic_depth, cfg.n_layers, dtype=jnp.float32)
            per_layer = (block_state, jax.random.split(block_rng, cfg.n_layers), drop_probs, ablation, replacement)

        def body(resid: jax.Array, xs: Any) -> tuple[jax.Array, dict[str, jax.Array]]:
            layer_state, layer_rng, drop_prob, layer_ablation, layer_replacement = xs
            layer_stream = stream.replace(
                resid=resid, records={}, ablation=layer_ablation, replacement=layer_replacement
            )
            layer_stream = nnx.merge(graphdef, layer_state)(layer_stream, rope, layer_rng, drop_prob)
            return constrain(layer_stream.resid, BATCH_AXES, None, None), layer_stream.records

        if cfg.remat != "none":
            body = jax.checkpoint(body, policy=remat_policy(cfg.remat))
        resid, layer_records = jax.lax.scan(body, constrain(stream.resid, BATCH_AXES, None, None), per_layer)
        logits, final_scale = self.unembed(resid)
        logits = constrain(logits, BATCH_AXES, None, None)

        cache: Cache = {}
        if mode == "full":
            cache = {**stream.records, **layer_records, "resid_final": resid}
            if final_scale is not None:
                cache["ln_final_scale"] = final_scale
            # Every record split on its batch axis like the tokens (the rest left to XLA).
            cache = {name: _batch_split(name, x) for name, x in cache.items()}
        elif mode == "stats":
            cache = dict(layer_records)
        return logits, cache


def _batch_split(name: str, record: jax.Array) -> jax.Array:
    """A cache record pinned to its batch axis over data x fsdp (its other axes left to XLA)."""
    lead = (None, BATCH_AXES) if name in LAYER_RECORDS else (BATCH_AXES,)
    return constrain(record, *lead, *[FREE] * (record.ndim - len(lead)))


@functools.partial(jax.jit, static_argnames=("mode", "record"))
def _compiled_forward(
    model: Transformer,
    tokens: jax.Array,
    rng: jax.Array | None,
    intervention: tuple[Ablation | None, Replacement | None],
    *,
    mode: str,
    record: tuple,
) -> tuple[jax.Array, Cache]:
    """The forward pass, compiled once per (model structure, recording mode, shapes): called
    eagerly from a notebook it costs one compiled call, not a trace of the scan each time; inside a
    user's jit or grad it simply inlines."""
    ablation, replacement = intervention
    return model.forward(tokens, mode=mode, record=record, rng=rng, ablation=ablation, replacement=replacement)
