"""The exact decomposition under bfloat16 compute: exact up to the rounding of the model itself."""

import numpy as np
import pytest

from conftest import built
from resstream import analysis

# bfloat16 keeps 8 significant bits: each rounding is off by up to 2**-8 = 3.9e-3 of the value. The
# model rounds every write to bfloat16, adds them into a bfloat16 stream (one rounding per
# addition), rounds the final norm's output and W_U to bfloat16 before the unembedding (whose sum is
# accumulated in float32). The decomposition adds the same recorded bfloat16 writes in float32, so
# what separates the two is the model's own roundings, a few of 2**-8 each: measured at most 5.0e-3
# of the largest value (logits and the stream entering layer 1) over all 14 sampled configurations.
# 1e-2 is twice that, and still below what dropping any one row (4% at least, a post-LN norm bias)
# or a 2% error in the final norm's scale costs.
TOLERANCE = 1e-2


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize(
    "arch", [{}, {"norm_placement": "post", "positions": "rotary", "mlp": "swiglu"}], ids=["pre", "post"]
)
def test_bfloat16_decomposition_sums_to_the_logits_and_the_stream(arch):
    """decompose_logits sums to the model's logits, decompose_resid at layer 1 to the recorded stream,
    within TOLERANCE; leaving out any one row, or a norm scale 2% off, breaks it."""
    model, _, logits, cache = built(dtype="bfloat16", **arch)
    assert cache["attn_out"].dtype == cache["resid_pre"].dtype == np.dtype("bfloat16")
    parts = analysis.decompose_logits(model, cache)
    assert _rel(parts.sum(), logits) < TOLERANCE
    rows = np.asarray(parts.values, np.float64)
    for label, row in zip(parts.labels, rows, strict=True):
        assert _rel(rows.sum(0) - row, logits) > 2 * TOLERANCE, label

    layer = model.cfg.n_layers // 2
    resid = analysis.decompose_resid(model, cache, layer)
    assert _rel(resid.sum(), cache["resid_pre"][layer]) < TOLERANCE
    values = np.asarray(resid.values, np.float64)
    for label, value in zip(resid.labels, values, strict=True):
        assert _rel(values.sum(0) - value, cache["resid_pre"][layer]) > 2 * TOLERANCE, label

    # the scale of the last norm before the unembedding, 2% off
    last = "ln_final_scale" if "ln_final_scale" in cache else "ln2_scale"
    scaled = cache[last] * 1.02 if last == "ln_final_scale" else cache[last].at[-1].multiply(1.02)
    assert _rel(analysis.decompose_logits(model, {**cache, last: scaled}).sum(), logits) > TOLERANCE
