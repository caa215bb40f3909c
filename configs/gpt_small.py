"""A GPU/TPU-sized run: 12 layers, d_model 768, context 1024 (GPT-2 small's shape, byte-level),
bf16 compute with float32 parameters and optimizer state."""

from resstream.config import base_config


def get_config():
    config = base_config()
    config.run_dir = "runs/gpt_small"
    config.model.update(vocab_size=256, n_layers=12, d_model=768, n_heads=12, n_ctx=1024, dtype="bfloat16", dropout=0.0)
    config.optimizer.update(learning_rate=6e-4, warmup_steps=2000, weight_decay=0.1)
    config.train.update(
        steps=100_000,
        batch_size=32,
        grad_accum=1,
        log_every=50,
        eval_every=2000,
        checkpoint_every=2000,
        eval_batches=20,
    )
    return config
