"""The residual stream: a pytree carried through the blocks, recording what each block writes.

A block reads the stream, computes a sublayer, and writes the result back. Writes are recorded
according to the stream's mode, so the one model code path serves training (nothing kept),
telemetry (cheap per-layer statistics) and analysis (every write, kept for exact decomposition).

Interventions are data too: an `Ablation` and a `Replacement` (resstream.interventions) ride
along with the stream, one layer's slice at a time, so an ablated forward pass is the ordinary
forward pass and vmaps, jits and shards like it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from flax import struct

if TYPE_CHECKING:
    from resstream.interventions import Ablation, Replacement

MODES: tuple[str, ...] = ("off", "stats", "full")

# Records that are kept only when asked for (`run_with_cache(..., record=...)`); they cost memory
# beyond the writes themselves.
OPTIONAL_RECORDS: tuple[str, ...] = ("resid_pre", "resid_mid", "mlp_post", "pattern")


def token_norm(x: jax.Array) -> jax.Array:
    """L2 norm over d_model of each token: [..., d_model] -> [...], in float32."""
    return jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)), axis=-1))


@struct.dataclass
class ResidualStream:
    """The stream entering the next reader, plus this layer's records.

    resid:   [batch, seq, d_model] the residual stream as the next sublayer reads it.
    records: name -> array, what this layer recorded (becomes the scan's per-layer output).
    ablation, replacement: this layer's slice of an intervention, or None.
    """

    resid: jax.Array
    records: dict[str, jax.Array]
    ablation: Ablation | None = None
    replacement: Replacement | None = None
    mode: str = struct.field(pytree_node=False, default="off")
    residual: bool = struct.field(pytree_node=False, default=True)
    # The factor the carried stream is scaled by at each write of a residual network (DeepNorm's
    # alpha: x -> alpha * x + value); 1.0 (no multiply) for every other model.
    carry_scale: float = struct.field(pytree_node=False, default=1.0)
    optional: tuple[str, ...] = struct.field(pytree_node=False, default=())

    def read(self) -> jax.Array:
        """The stream [batch, seq, d_model] as the next sublayer reads it."""
        return self.resid

    def write(self, name: str, value: jax.Array) -> ResidualStream:
        """Add `value` to the stream (scaled by `carry_scale` first; in a plain network, replace the
        stream) and record it.

        mode "full" keeps the write; mode "stats" keeps the mean token norm of the write, the mean
        token norm of the stream it is written into, and their mean cosine. An ablation replaces
        the value first (`name` is "attn_out" or "mlp_out"), so what is recorded is what was written.
        """
        if self.ablation is not None:
            mask = getattr(self.ablation, f"replace_{name.removesuffix('_out')}")
            value = jnp.where(mask, getattr(self.replacement, name).astype(value.dtype), value)
        if not self.residual:
            resid = value
        elif self.carry_scale == 1.0:
            resid = self.resid + value
        else:
            resid = self.resid * self.carry_scale + value
        records = dict(self.records)
        if self.mode == "full":
            records[name] = value
        elif self.mode == "stats":
            write_norm = token_norm(value)
            stream_norm = token_norm(self.resid)
            dot = jnp.sum(value.astype(jnp.float32) * self.resid.astype(jnp.float32), axis=-1)
            cos = dot / jnp.maximum(write_norm * stream_norm, 1e-12)
            records[f"{name}_norm"] = jnp.mean(write_norm)
            records[f"{name}_resid_norm"] = jnp.mean(stream_norm)
            records[f"{name}_cos"] = jnp.mean(cos)
        return self.replace(resid=resid, records=records)

    def edit_z(self, z: jax.Array) -> jax.Array:
        """Apply the head ablation to z [batch, seq, n_heads, d_head] (before W_O)."""
        if self.ablation is None:
            return z
        return jnp.where(self.ablation.replace_heads[:, None], self.replacement.z.astype(z.dtype), z)

    def skip(self, name: str, resid_before: jax.Array) -> ResidualStream:
        """Undo the sublayer that wrote `name` when the ablation deletes it: the stream is again
        `resid_before`, the stream the sublayer read."""
        if self.ablation is None:
            return self
        mask = getattr(self.ablation, f"skip_{name.removesuffix('_out')}")
        return self.replace(resid=jnp.where(mask, resid_before, self.resid))

    def replace_resid(self, resid: jax.Array) -> ResidualStream:
        """Replace the stream wholesale (post-LN: the norm applied to the stream after a write)."""
        return self.replace(resid=resid)

    def record(self, name: str, value: jax.Array) -> ResidualStream:
        """Keep an intermediate (a head's z, a norm's scale) in mode "full"; optional ones on request."""
        if self.mode != "full" or (name in OPTIONAL_RECORDS and name not in self.optional):
            return self
        return self.replace(records={**self.records, name: value})

    def record_stat(self, name: str, value: jax.Array) -> ResidualStream:
        """Keep a scalar statistic in mode "stats"."""
        if self.mode != "stats":
            return self
        return self.replace(records={**self.records, name: value})

    def wants(self, name: str) -> bool:
        """Whether a record would be kept (so the block can skip computing it otherwise)."""
        if self.mode != "full":
            return False
        return name not in OPTIONAL_RECORDS or name in self.optional
