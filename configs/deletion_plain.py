"""Layer-deletion study, plain half: configs/deletion_residual.py without residual connections
(each sublayer's output replaces the stream), trained the same way."""

from configs.deletion_residual import get_config as residual_config


def get_config():
    config = residual_config()
    config.run_dir = "runs/deletion_plain"
    config.model.residual = False
    return config
