"""The default model: 4 layers, d_model 128, byte-level vocabulary, context 256."""

from resstream import ModelConfig


def get_config() -> ModelConfig:
    return ModelConfig(vocab_size=256, n_layers=4, d_model=128, n_heads=4, n_ctx=256)
