"""Layer-deletion study, residual half: 8 layers of d_model 64 on the standard-library corpus
(about 2 minutes on a 2-core CPU). Pair it with configs/deletion_plain.py, the same model without
residual connections, then compare `python -m resstream ablate RUN_DIR --deletion` of the two."""

from resstream.config import base_config


def get_config():
    config = base_config()
    config.run_dir = "runs/deletion_residual"
    config.model.update(vocab_size=256, n_layers=8, d_model=64, n_heads=4, n_ctx=64, residual=True)
    config.optimizer.update(learning_rate=2e-3, warmup_steps=100)
    config.train.update(steps=1500, batch_size=16, eval_every=250, checkpoint_every=500, sample_tokens=64)
    return config
