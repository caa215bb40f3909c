"""`sampling.generate` against the model's own next-token logits, computed here with plain forward
passes over each step's context (the last n_ctx tokens once the context is full)."""

import jax.numpy as jnp
import numpy as np

from conftest import built
from resstream.sampling import generate

PROMPT_LEN, NEW = 4, 16  # 20 tokens in all: past the context of 16, so the window slides


def _step_logits(model, out: np.ndarray) -> np.ndarray:
    """Logits [batch, NEW, vocab]: at each step, the model's next-token logits given the context
    that step saw. All windows have n_ctx tokens (causal: a prefix's logits are those of its last
    position in any longer window), so one forward pass of one shape serves every step."""
    n_ctx, batch = model.cfg.n_ctx, out.shape[0]
    windows, where = [], []
    for t in range(PROMPT_LEN - 1, PROMPT_LEN - 1 + NEW):  # predicting out[:, t + 1]
        start = max(0, t + 1 - n_ctx)
        windows.append(out[:, start : start + n_ctx])
        where.append(t - start)
    logits = np.asarray(model(jnp.asarray(np.concatenate(windows))))  # [NEW * batch, n_ctx, vocab]
    logits = logits.reshape(NEW, batch, n_ctx, -1)
    return np.stack([logits[i, :, at] for i, at in enumerate(where)], axis=1)


def test_greedy_top_k_and_seeds():
    """Greedy decoding is the argmax of the model's logits at every step, and top_k=1 at any
    temperature is greedy; with temperature > 0 and top_k=3 every token is among the 3 likeliest
    (without top_k, at that temperature, some are not); a seed gives the same tokens every time,
    another seed other tokens."""
    model, tokens, _, _ = built()
    prompt = np.asarray(tokens[:, :PROMPT_LEN])
    greedy = generate(model, prompt, NEW, temperature=0.0)
    assert greedy.shape == (prompt.shape[0], PROMPT_LEN + NEW) and np.array_equal(greedy[:, :PROMPT_LEN], prompt)
    logits = _step_logits(model, greedy)
    chosen = np.take_along_axis(logits, greedy[:, PROMPT_LEN:, None], axis=-1)[..., 0]
    np.testing.assert_allclose(chosen, logits.max(-1), rtol=0, atol=1e-5)  # the argmax, to float32 rounding
    assert np.array_equal(generate(model, prompt, NEW, temperature=1.5, top_k=1, seed=3), greedy)

    sampled = generate(model, prompt, NEW, temperature=3.0, top_k=3, seed=0)
    logits = _step_logits(model, sampled)
    chosen = np.take_along_axis(logits, sampled[:, PROMPT_LEN:, None], axis=-1)[..., 0]
    third = np.sort(logits, axis=-1)[..., -3]
    assert np.all(chosen >= third - 1e-5), (chosen, third)
    assert not np.array_equal(sampled, greedy)
    unrestricted = generate(model, prompt, NEW, temperature=3.0, seed=0)
    logits = _step_logits(model, unrestricted)
    chosen = np.take_along_axis(logits, unrestricted[:, PROMPT_LEN:, None], axis=-1)[..., 0]
    assert np.any(chosen < np.sort(logits, axis=-1)[..., -3])  # so the top-k check above has teeth

    assert np.array_equal(generate(model, prompt, NEW, temperature=3.0, top_k=3, seed=0), sampled)
    assert not np.array_equal(generate(model, prompt, NEW, temperature=3.0, top_k=3, seed=1), sampled)
