"""A tiny smoke run: 2 layers, d_model 32, context 64, a few hundred steps."""

from resstream.config import base_config


def get_config():
    config = base_config()
    config.run_dir = "runs/tiny"
    # no unembedding bias: GPT-2's architecture exactly, so resstream.hf.save exports the run
    config.model.update(vocab_size=256, n_layers=2, d_model=32, n_heads=4, n_ctx=64, unembed_bias=False)
    config.optimizer.update(learning_rate=3e-3, warmup_steps=20)
    config.train.update(
        steps=200, batch_size=16, log_every=10, eval_every=100, eval_batches=4, checkpoint_every=100, sample_tokens=64
    )
    return config
