from types import SimpleNamespace

import pytest

from resstream import ConfigError, ModelConfig
from resstream.devices import attention_implementation


def test_defaults_are_resolved():
    cfg = ModelConfig(d_model=96, n_heads=3)
    assert cfg.d_head == 32 and cfg.d_mlp == 384
    assert ModelConfig(attn_only=True).d_mlp is None


def test_round_trip_through_dict():
    cfg = ModelConfig(n_layers=3, norm="rmsnorm", positions="rotary", mlp="swiglu")
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert hash(cfg) == hash(ModelConfig.from_dict(cfg.to_dict()))


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(d_model=130, n_heads=4), "d_model=130 is not divisible by n_heads=4"),
        (dict(d_model=64, n_heads=4, d_head=15, positions="rotary"), "rotary' needs an even d_head"),
        (dict(d_model=36, n_heads=4, positions="rotary"), "even d_head, got d_head=9"),
        (dict(norm="batchnorm"), "norm='batchnorm' is not supported: choose one of ['layernorm', 'rmsnorm']"),
        (dict(norm_placement="sandwich"), "norm_placement='sandwich'"),
        (dict(positions="alibi"), "positions='alibi'"),
        (dict(mlp="relu"), "mlp='relu'"),
        (dict(dtype="float64"), "dtype='float64'"),
        (dict(n_layers=0), "n_layers must be a positive integer"),
        (dict(vocab_size=2.5), "vocab_size must be a positive integer"),
        (dict(attn_only=True, d_mlp=64), "d_mlp=64 is set but attn_only=True has no MLP"),
        (dict(dropout=1.0), "dropout must be in [0, 1)"),
        (dict(stochastic_depth=0.1, residual=False), "stochastic_depth > 0 needs residual=True"),
        (dict(norm_eps=0.0), "norm_eps must be positive"),
        (dict(attention="flash"), "attention='flash' is not supported: choose one of ['auto', 'xla', 'cudnn']"),
        (dict(attention="cudnn"), "attention='cudnn' needs dtype bfloat16 or float16"),
        (dict(attention="cudnn", dtype="bfloat16", d_model=512, n_heads=1), "d_head=512"),
    ],
)
def test_invalid_configs_name_the_field_and_the_fix(fields, message):
    with pytest.raises(ConfigError) as err:
        ModelConfig(**fields)
    assert message in str(err.value)


def test_unknown_field_in_dict():
    with pytest.raises(ConfigError, match="unknown ModelConfig fields \\['n_layer'\\]"):
        ModelConfig.from_dict({"n_layer": 3})


H100 = SimpleNamespace(platform="gpu", device_kind="NVIDIA H100 80GB HBM3", compute_capability="9.0")
A100 = SimpleNamespace(platform="gpu", device_kind="NVIDIA A100-SXM4-80GB", compute_capability="8.0")


@pytest.mark.parametrize(
    ("fields", "device", "implementation"),
    [
        (dict(dtype="bfloat16"), H100, "cudnn"),
        (dict(dtype="float16", d_model=1024, n_heads=8), H100, "cudnn"),  # d_head 128
        (dict(dtype="float32"), H100, "xla"),  # cuDNN's fused attention takes 16-bit inputs only
        (dict(dtype="bfloat16", d_model=48, n_heads=4), H100, "xla"),  # d_head 12: not a multiple of 8
        (dict(dtype="bfloat16", d_model=256, n_heads=1), H100, "cudnn"),  # d_head 256: Hopper takes it
        (dict(dtype="bfloat16", d_model=256, n_heads=1), A100, "xla"),  # before Hopper, 128 at most
        (dict(dtype="bfloat16", d_model=1024, n_heads=8), A100, "cudnn"),
        (dict(dtype="bfloat16", d_model=512, n_heads=1), H100, "xla"),  # d_head 512: too large anywhere
        (dict(dtype="bfloat16", attention="xla"), H100, "xla"),
        (dict(dtype="bfloat16"), SimpleNamespace(platform="gpu", device_kind="AMD Instinct MI300X"), "xla"),
        (dict(dtype="bfloat16"), SimpleNamespace(platform="cpu", device_kind="cpu"), "xla"),
        (dict(dtype="bfloat16", attention="cudnn"), H100, "cudnn"),
    ],
)
def test_auto_attention_takes_cudnn_only_where_it_applies(fields, device, implementation):
    assert attention_implementation(ModelConfig(**fields), device) == implementation


def test_cudnn_attention_with_heads_too_wide_for_the_gpu_is_refused():
    cfg = ModelConfig(dtype="bfloat16", d_model=256, n_heads=1, attention="cudnn")
    assert attention_implementation(cfg, H100) == "cudnn"
    with pytest.raises(ConfigError, match="d_head=256: cuDNN's fused attention takes d_head up to 128 on 'NVIDIA A100"):
        attention_implementation(cfg, A100)


def test_cudnn_attention_off_an_nvidia_gpu_is_refused():
    cfg = ModelConfig(dtype="bfloat16", attention="cudnn")
    with pytest.raises(ConfigError, match="attention='cudnn' needs an NVIDIA GPU, but the device is 'cpu'"):
        attention_implementation(cfg, SimpleNamespace(platform="cpu", device_kind="cpu"))
