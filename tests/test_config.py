import pytest

from resstream import ConfigError, ModelConfig


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
    ],
)
def test_invalid_configs_name_the_field_and_the_fix(fields, message):
    with pytest.raises(ConfigError) as err:
        ModelConfig(**fields)
    assert message in str(err.value)


def test_unknown_field_in_dict():
    with pytest.raises(ConfigError, match="unknown ModelConfig fields \\['n_layer'\\]"):
        ModelConfig.from_dict({"n_layer": 3})
