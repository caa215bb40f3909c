"""A tiny smoke-test model: 2 layers, d_model 32, context 64."""

from resstream import ModelConfig


def get_config() -> ModelConfig:
    return ModelConfig(vocab_size=256, n_layers=2, d_model=32, n_heads=4, n_ctx=64)
