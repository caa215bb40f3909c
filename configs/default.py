"""The default run: a 4-layer, d_model 128 byte-level model on the standard-library corpus, sized to
train in about 5 minutes on a 2-core CPU."""

from resstream.config import base_config


def get_config():
    config = base_config()
    config.run_dir = "runs/default"
    # no unembedding bias: GPT-2's architecture exactly, so resstream.hf.save exports the run
    config.model.update(vocab_size=256, n_layers=4, d_model=128, n_heads=4, n_ctx=128, unembed_bias=False)
    config.optimizer.update(learning_rate=2e-3, warmup_steps=100)
    config.train.update(steps=1600, batch_size=16, eval_every=200, checkpoint_every=200)
    return config
