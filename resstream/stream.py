"""The residual stream: a pytree carried through the blocks, recording what each block writes.

A block reads the stream, computes a sublayer, and writes the result back. Writes are recorded
according to the stream's mode, so the one model code path serves training (nothing kept),
telemetry (cheap per-layer statistics) and analysis (every write, kept for exact decomposition).
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from flax import struct

Mode = Literal["off", "stats", "full"]
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
    """

    resid: jax.Array
    records: dict[str, jax.Array]
    mode: str = struct.field(pytree_node=False, default="off")
    residual: bool = struct.field(pytree_node=False, default=True)
    optional: tuple[str, ...] = struct.field(pytree_node=False, default=())

    def read(self) -> jax.Array:
        return self.resid

    def write(self, name: str, value: jax.Array) -> ResidualStream:
        """Add `value` to the stream (or replace the stream, in a plain network) and record it.

        mode "full" keeps the write; mode "stats" keeps the mean token norm of the write, the mean
        token norm of the stream it is written into, and their mean cosine.
        """
        resid = self.resid + value if self.residual else value
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
