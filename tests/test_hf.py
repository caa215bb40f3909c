"""resstream.hf against the reference implementations: randomly initialised (then perturbed)
`transformers` models of every family, saved in the Hugging Face layout, load with the same logits
and tokens; resstream models saved with hf.save load in transformers with the same logits."""

import json
import shutil

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from conftest import max_rel_err, randomize
from resstream import ModelConfig, Transformer, analysis, hf
from resstream.data import ByteTokenizer
from resstream.tokenizer import BPETokenizer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB = 320  # the model's; the tokenizer's is smaller (256 bytes and a few merges)
TEXTS = ["the cat sat on the mat", "Héllo wörld!\n\tdef f(x): return x  # 日本", "   spaces  and the end "]
IDS = np.random.default_rng(0).integers(0, VOCAB, (2, 16))  # [batch, seq]
SMALL = {"vocab_size": VOCAB, "num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4}
LLAMA = SMALL | {"intermediate_size": 96, "max_position_embeddings": 64, "bos_token_id": None, "eos_token_id": None}
NEOX = SMALL | {"intermediate_size": 96, "max_position_embeddings": 64, "bos_token_id": None, "eos_token_id": None}
GPT2 = {"vocab_size": VOCAB, "n_layer": 2, "n_embd": 64, "n_head": 4, "n_positions": 32, "bos_token_id": None}
GPT2 |= {"eos_token_id": None}

# name -> (model class, config arguments); every family, GQA and MQA, tied and untied, partial rotary,
# parallel and sequential GPT-NeoX, rope scaling (linear, llama3), biases, a sliding window
CHECKPOINTS = {
    "gpt2_tied": ("GPT2LMHeadModel", "GPT2Config", GPT2 | {"activation_function": "gelu_new"}),
    "gpt2_untied": (
        "GPT2LMHeadModel",
        "GPT2Config",
        GPT2 | {"activation_function": "gelu_pytorch_tanh", "tie_word_embeddings": False, "n_inner": 80},
    ),
    "neox_parallel": ("GPTNeoXForCausalLM", "GPTNeoXConfig", NEOX | {"rotary_pct": 0.5, "hidden_act": "gelu"}),
    "neox_sequential": (
        "GPTNeoXForCausalLM",
        "GPTNeoXConfig",
        NEOX
        | {
            "use_parallel_residual": False,
            "attention_bias": False,
            "tie_word_embeddings": True,
            "rotary_pct": 1.0,
            "rope_scaling": {"rope_type": "linear", "factor": 2.0},
        },
    ),
    "llama_gqa": (
        "LlamaForCausalLM",
        "LlamaConfig",
        LLAMA
        | {
            "num_key_value_heads": 2,
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 10000.0,
                "factor": 4.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        },
    ),
    # Llama's own head_dim (4 heads x 32 != 64), biases everywhere; its config.json is rewritten to
    # the older spelling (top-level rope_theta, rope_scaling with "type") that hub checkpoints use
    "llama_mqa_old_spelling": (
        "LlamaForCausalLM",
        "LlamaConfig",
        LLAMA
        | {
            "num_key_value_heads": 1,
            "head_dim": 32,
            "tie_word_embeddings": True,
            "attention_bias": True,
            "mlp_bias": True,
            "rope_parameters": {"rope_type": "linear", "rope_theta": 500000.0, "factor": 2.0},
        },
    ),
    "mistral": ("MistralForCausalLM", "MistralConfig", LLAMA | {"num_key_value_heads": 2, "sliding_window": 5}),
    "qwen2_sharded": (
        "Qwen2ForCausalLM",
        "Qwen2Config",
        LLAMA | {"num_key_value_heads": 2, "tie_word_embeddings": True},
    ),
}


def _bpe(bos: bool) -> Tokenizer:
    """A tiny byte-level BPE trained on TEXTS; with `bos`, Llama's habit of prepending <s>."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<s>"] if bos else [],
        show_progress=False,
    )
    tokenizer.train_from_iterator(TEXTS * 5, trainer=trainer)
    if bos:
        tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))]
        )
    return tokenizer


def _perturb(module, seed: int) -> None:
    """Noise on every parameter: random init leaves biases at zero and norm weights at one."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn_like(p))


def _reference_logits(module) -> np.ndarray:
    with torch.no_grad():
        return module(torch.tensor(IDS)).logits.float().numpy()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, tuple]:
    """name -> (directory, transformers' logits on IDS): every checkpoint saved once, in float32,
    with a tokenizer; plus "llama_bf16", llama_gqa's weights saved in bfloat16."""
    built = {}
    for seed, (name, (model_class, config_class, kwargs)) in enumerate(CHECKPOINTS.items()):
        config = getattr(transformers, config_class)(**kwargs)
        module = getattr(transformers, model_class)(config).eval()
        _perturb(module, seed)
        directory = tmp_path_factory.mktemp(name)
        module.save_pretrained(directory, max_shard_size="40KB" if "sharded" in name else "5GB")
        fast = transformers.PreTrainedTokenizerFast(tokenizer_object=_bpe(bos=name.startswith("llama")))
        fast.save_pretrained(directory)
        if "old_spelling" in name:
            config_file = directory / "config.json"
            saved = json.loads(config_file.read_text())
            rope = saved.pop("rope_parameters")
            saved |= {"rope_theta": rope["rope_theta"], "rope_scaling": {"type": "linear", "factor": rope["factor"]}}
            config_file.write_text(json.dumps(saved))
        built[name] = (directory, _reference_logits(module))
        if name == "llama_gqa":
            bf16 = tmp_path_factory.mktemp("llama_bf16")
            module.to(torch.bfloat16).save_pretrained(bf16)
            fast.save_pretrained(bf16)
            # the reference: the rounded weights in float32 (a fresh model: .to() would round the rotary
            # frequencies too, which transformers keeps as a buffer)
            rounded = transformers.AutoModelForCausalLM.from_pretrained(bf16, dtype=torch.float32).eval()
            built["llama_bf16"] = (bf16, _reference_logits(rounded))
    return built


# -------------------------------------------------------------------------------------------- load
@pytest.mark.parametrize("name", [*CHECKPOINTS, "llama_bf16"])
def test_load_gives_transformers_logits_tokens_and_an_exact_decomposition(checkpoints, name):
    directory, expected = checkpoints[name]
    if "sharded" in name:
        assert (directory / "model.safetensors.index.json").is_file()
        assert len(list(directory.glob("model-*.safetensors"))) > 1
    model, tokenizer = hf.load(directory)
    logits, cache = model.run_with_cache(IDS)
    assert max_rel_err(logits, expected) <= 1e-4
    parts = analysis.decompose_logits(model, cache)
    assert max_rel_err(parts.sum(), logits) <= 1e-4
    assert isinstance(tokenizer, BPETokenizer)
    reference = transformers.AutoTokenizer.from_pretrained(directory)
    for text in TEXTS:
        ours = tokenizer.encode(text).tolist()
        assert ours == reference(text, add_special_tokens=False)["input_ids"]
        if name.startswith("llama"):  # BPETokenizer never adds special tokens: Llama's BOS is the caller's
            assert reference(text)["input_ids"] == [reference.convert_tokens_to_ids("<s>"), *ours]


def test_load_maps_the_config(checkpoints):
    cfg = hf.load(checkpoints["neox_parallel"][0])[0].cfg
    assert (cfg.positions, cfg.norm, cfg.mlp, cfg.parallel_attn, cfg.rotary_dim) == (
        "rotary",
        "layernorm",
        "gelu_exact",
        True,
        8,
    )
    cfg = hf.load(checkpoints["llama_mqa_old_spelling"][0])[0].cfg
    assert (cfg.n_kv_heads, cfg.d_head, cfg.tied_embeddings, cfg.rotary_base) == (1, 32, True, 500000.0)
    assert (cfg.rope_scaling, cfg.rope_factor, cfg.mlp_bias, cfg.unembed_bias) == ("linear", 2.0, True, False)
    assert hf.load(checkpoints["mistral"][0])[0].cfg.sliding_window == 5


def test_bfloat16_load_gives_bfloat16_parameters(checkpoints):
    directory, expected = checkpoints["gpt2_untied"]
    model, _ = hf.load(directory, dtype="bfloat16")
    params = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert params and all(p.dtype == jax.numpy.bfloat16 for p in params)
    assert model.cfg.dtype == "bfloat16"
    assert max_rel_err(model(IDS), expected) < 0.05  # bf16 compute: close, not equal


# ------------------------------------------------------------------------------------------ errors
def _copy(checkpoints, name, tmp_path, edit: dict | None = None):
    directory = shutil.copytree(checkpoints[name][0], tmp_path / name)
    if edit is not None:
        config = json.loads((directory / "config.json").read_text())
        (directory / "config.json").write_text(json.dumps(config | edit))
    return directory


@pytest.mark.parametrize(
    ("name", "edit", "named"),
    [
        ("gpt2_tied", {"model_type": "bert"}, "model_type='bert'"),
        ("gpt2_tied", {"architectures": ["GPT2ForSequenceClassification"]}, "architectures"),
        ("gpt2_tied", {"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx=True"),
        ("gpt2_tied", {"activation_function": "relu"}, "activation_function='relu'"),
        ("neox_parallel", {"rope_parameters": {"rope_theta": 1e4, "partial_rotary_factor": 0.1}}, "rotary_pct"),
        ("llama_gqa", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "rope_type='yarn'"),
        ("llama_gqa", {"hidden_act": "gelu"}, "hidden_act='gelu'"),
        ("llama_gqa", {"partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5"),
        (
            "qwen2_sharded",
            {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1, "layer_types": None},
            "max_window_layers=1",
        ),
        (
            "qwen2_sharded",
            {"use_sliding_window": True, "sliding_window": 4, "layer_types": ["sliding_attention", "full_attention"]},
            "layer_types=",
        ),
        ("mistral", {"num_attention_heads": 3}, "n_kv_heads"),  # 2 key/value heads cannot serve 3
    ],
)
def test_unsupported_config_fields_are_refused_by_name(checkpoints, tmp_path, name, edit, named):
    with pytest.raises(hf.HFError, match=named.replace("(", r"\(").replace(".", r"\.")):
        hf.load(_copy(checkpoints, name, tmp_path, edit))


@pytest.mark.parametrize(
    ("name", "remove", "named"),
    [
        ("gpt2_tied", "config.json", "config.json"),
        ("gpt2_tied", "model.safetensors", "model.safetensors"),
        ("gpt2_tied", "tokenizer.json", "tokenizer.json"),
        ("qwen2_sharded", "model-00001-of-", "model-00001-of-"),
    ],
)
def test_missing_files_are_named(checkpoints, tmp_path, name, remove, named):
    directory = _copy(checkpoints, name, tmp_path)
    (path,) = [p for p in directory.iterdir() if p.name.startswith(remove)]
    path.unlink()
    with pytest.raises(hf.HFError, match=named):
        hf.load(directory)


def test_missing_and_unexpected_tensors_are_named(checkpoints, tmp_path):
    directory = _copy(checkpoints, "gpt2_untied", tmp_path)
    tensors = load_file(directory / "model.safetensors")
    save_file(
        {k: v for k, v in tensors.items() if k != "transformer.h.1.mlp.c_fc.bias"}, directory / "model.safetensors"
    )
    with pytest.raises(hf.HFError, match=r"transformer\.h\.1\.mlp\.c_fc\.bias \(or h\.1\.mlp\.c_fc\.bias\) is missing"):
        hf.load(directory)
    save_file(
        tensors | {"transformer.h.0.attn.q_attn.weight": tensors["lm_head.weight"]}, directory / "model.safetensors"
    )
    with pytest.raises(hf.HFError, match=r"does not use: \['transformer\.h\.0\.attn\.q_attn\.weight'\]"):
        hf.load(directory)


def test_tensor_names_without_the_base_model_prefix_load_alike(checkpoints, tmp_path):
    """Older hub checkpoints (openai-community/gpt2) name GPT-2's tensors "h.0..." and carry the
    causal-mask buffers "h.0.attn.bias", which compute nothing."""
    expected = checkpoints["gpt2_untied"][1]
    directory = _copy(checkpoints, "gpt2_untied", tmp_path)
    tensors = load_file(directory / "model.safetensors")
    renamed = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    renamed["h.0.attn.bias"] = np.tril(np.ones((1, 1, 32, 32), np.float32))
    save_file(renamed, directory / "model.safetensors", metadata={"format": "pt"})
    model, _ = hf.load(directory)
    assert max_rel_err(model(IDS), expected) <= 1e-4


def test_a_name_that_is_neither_a_directory_nor_downloadable_is_a_clear_error(monkeypatch):
    with pytest.raises(hf.HFError, match="is not a directory"):
        hf.load("./no/such/checkpoint")
    huggingface_hub = pytest.importorskip("huggingface_hub")

    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(hf.HFError, match=r"could not be downloaded from the Hugging Face Hub.*network unreachable"):
        hf.load("someone/some-model")
    with pytest.raises(hf.HFError, match="dtype='int8'"):
        hf.load("someone/some-model", dtype="int8")


# -------------------------------------------------------------------------------------------- save
RESSTREAM = {"vocab_size": VOCAB, "n_layers": 2, "d_model": 64, "n_heads": 4, "d_mlp": 96, "n_ctx": 32}
# name -> (ModelConfig fields, the family it exports as)
EXPORTS = {
    "gpt2": ({"positions": "learned", "norm": "layernorm", "mlp": "gelu", "unembed_bias": False}, "gpt2"),
    "neox": (
        {
            "positions": "rotary",
            "norm": "layernorm",
            "mlp": "gelu_exact",
            "parallel_attn": True,
            "rotary_dim": 8,
            "tied_embeddings": True,
            "unembed_bias": False,
        },
        "gpt_neox",
    ),
    "llama": (
        {
            "positions": "rotary",
            "norm": "rmsnorm",
            "mlp": "swiglu",
            "n_kv_heads": 2,
            "d_head": 8,
            "rotary_base": 5000.0,
            "rope_scaling": "llama3",
            "rope_factor": 4.0,
            "rope_original_n_ctx": 16,
            "unembed_bias": False,
        },
        "llama",
    ),
    "qwen2": (
        {
            "positions": "rotary",
            "norm": "rmsnorm",
            "mlp": "swiglu",
            "n_kv_heads": 1,
            "attn_out_bias": False,
            "mlp_bias": False,
            "tied_embeddings": True,
            "unembed_bias": False,
        },
        "qwen2",
    ),
}


def _model(**fields) -> Transformer:
    return randomize(Transformer(ModelConfig(**RESSTREAM | fields), rngs=nnx.Rngs(0)))


def _params(model) -> dict[str, np.ndarray]:
    state = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(state)}


@pytest.mark.parametrize("name", EXPORTS)
def test_save_loads_in_transformers_with_the_same_logits_and_back(tmp_path, name):
    fields, model_type = EXPORTS[name]
    model = _model(**fields)
    tokenizer = ByteTokenizer() if name == "neox" else BPETokenizer(_bpe(bos=False))
    path = tmp_path / "export"
    hf.save(model, tokenizer, path)
    assert json.loads((path / "config.json").read_text())["model_type"] == model_type
    logits = np.asarray(model(IDS))
    reference = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    assert max_rel_err(logits, _reference_logits(reference)) <= 1e-4
    auto_tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    for text in TEXTS:
        assert auto_tokenizer(text, add_special_tokens=False)["input_ids"] == tokenizer.encode(text).tolist()
    loaded, loaded_tokenizer = hf.load(path)
    assert max_rel_err(loaded(IDS), logits) <= 1e-5
    ours, theirs = _params(model), _params(loaded)
    for key in ours.keys() | theirs.keys():  # a bias one side lacks is all zeros on the other
        np.testing.assert_allclose(ours.get(key, 0.0), theirs.get(key, 0.0), rtol=0, atol=1e-7, err_msg=key)
    assert [loaded_tokenizer.encode(t).tolist() for t in TEXTS] == [tokenizer.encode(t).tolist() for t in TEXTS]


ROTARY_LLAMA = {"positions": "rotary", "norm": "rmsnorm", "mlp": "swiglu", "unembed_bias": False}


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"norm_placement": "post"}, "norm_placement='post'"),
        ({"residual": False}, "residual=False"),
        ({"attn_only": True, "d_mlp": None}, "attn_only=True"),
        ({}, "unembed_bias"),  # randomised, so b_U is nonzero
        ({"unembed_bias": False, "norm": "rmsnorm"}, "norm='rmsnorm'"),
        ({"unembed_bias": False, "n_kv_heads": 2}, "n_kv_heads=2"),
        (ROTARY_LLAMA | {"sliding_window": 4}, "sliding_window=4"),
        (ROTARY_LLAMA | {"mlp": "gelu"}, "mlp='gelu'"),
        (ROTARY_LLAMA | {"rotary_dim": 8}, "rotary_dim=8"),
    ],
)
def test_save_refuses_models_no_family_computes_and_writes_nothing(tmp_path, fields, named):
    model = _model(**fields)
    with pytest.raises(hf.HFError, match=named):
        hf.save(model, ByteTokenizer(), tmp_path / "export")
    assert list(tmp_path.iterdir()) == []


def test_bfloat16_models_export_in_bfloat16(tmp_path):
    model = _model(**EXPORTS["llama"][0], param_dtype="bfloat16")
    hf.save(model, ByteTokenizer(), tmp_path / "export")
    assert json.loads((tmp_path / "export" / "config.json").read_text())["dtype"] == "bfloat16"
    assert {v.dtype.name for v in load_file(tmp_path / "export" / "model.safetensors").values()} == {"bfloat16"}
    loaded, _ = hf.load(tmp_path / "export", dtype="bfloat16")
    ours, theirs = _params(model), _params(loaded)
    assert ours.keys() == theirs.keys()
    for key in ours:
        np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)


def test_every_partial_rotary_exports_exactly(tmp_path):
    """rotary_dim 30 of d_head 44: 30 / 44 * 44 floors to 29, so rotary_pct must be the next float up."""
    cfg = ModelConfig(**RESSTREAM | EXPORTS["neox"][0] | {"d_model": 88, "n_heads": 2, "rotary_dim": 30})
    hf.save(Transformer(cfg, rngs=nnx.Rngs(0)), ByteTokenizer(), tmp_path / "export")
    theirs = transformers.AutoConfig.from_pretrained(tmp_path / "export")
    assert int(44 * theirs.rope_parameters["partial_rotary_factor"]) == 30  # as GPTNeoXAttention computes it
    assert hf.load(tmp_path / "export")[0].cfg.rotary_dim == 30


def test_zero_biases_export_where_the_family_has_none(tmp_path):
    model = Transformer(ModelConfig(**RESSTREAM), rngs=nnx.Rngs(0))  # every bias present, all zeros (b_U too)
    hf.save(model, ByteTokenizer(), tmp_path / "export")
    assert json.loads((tmp_path / "export" / "config.json").read_text())["model_type"] == "gpt2"


def test_a_failed_save_leaves_nothing_and_an_existing_export_is_kept(tmp_path, monkeypatch):
    model = _model(**EXPORTS["gpt2"][0])

    def fail(tensors, filename, metadata=None):
        with open(filename, "wb") as out:
            out.write(b"half a file")
        raise OSError("disk full")

    with monkeypatch.context() as patch:
        patch.setattr(hf, "save_file", fail)
        with pytest.raises(OSError, match="disk full"):
            hf.save(model, ByteTokenizer(), tmp_path / "export")
    assert list(tmp_path.iterdir()) == []
    hf.save(model, ByteTokenizer(), tmp_path / "export")
    before = {p.name: p.read_bytes() for p in (tmp_path / "export").iterdir()}
    with pytest.raises(hf.HFError, match="exists"):
        hf.save(model, ByteTokenizer(), tmp_path / "export")
    with monkeypatch.context() as patch:
        patch.setattr(hf, "save_file", fail)
        with pytest.raises(OSError, match="disk full"):
            hf.save(model, ByteTokenizer(), tmp_path / "export", overwrite=True)
    assert {p.name: p.read_bytes() for p in (tmp_path / "export").iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["export"]
    hf.save(_model(**EXPORTS["gpt2"][0] | {"n_ctx": 24}), ByteTokenizer(), tmp_path / "export", overwrite=True)
    assert json.loads((tmp_path / "export" / "config.json").read_text())["n_positions"] == 24
    assert [p.name for p in tmp_path.iterdir()] == ["export"]


@pytest.mark.slow
def test_a_model_sharded_across_two_hosts_saves_whole_from_process_0(tmp_path):
    """hf.save called on both hosts of a model sharded across them (two processes joined by
    jax.distributed, one CPU device each): the parameters are gathered, process 0 writes, and the
    export equals the one-process model's; saving again over it is refused on both hosts."""
    import socket
    import subprocess
    import sys
    from pathlib import Path

    import two_hosts_hf

    from conftest import xla_env

    root = Path(__file__).resolve().parent.parent

    with socket.socket() as s:  # a free port for the coordinator
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script, out = str(root / "tests" / "two_hosts_hf.py"), tmp_path / "out"
    out.mkdir()
    logs = [(tmp_path / f"host{i}.out", tmp_path / f"host{i}.err") for i in range(2)]
    hosts = []
    try:  # output to files (a full pipe would block a host); no host outlives the test
        for i, (stdout, stderr) in enumerate(logs):
            with stdout.open("w") as o, stderr.open("w") as e:
                command = [sys.executable, script, str(i), str(port), str(out)]
                hosts.append(subprocess.Popen(command, cwd=root, stdout=o, stderr=e, env=xla_env(devices=None)))
        for host in hosts:
            host.wait(timeout=300)
    finally:
        for host in hosts:
            host.kill()
    for host, (_, stderr) in zip(hosts, logs, strict=True):
        assert host.returncode == 0, stderr.read_text()[-3000:]
    reports = [json.loads(stdout.read_text().strip().splitlines()[-1]) for stdout, _ in logs]
    assert all(r["across_hosts"] for r in reports)
    assert "export exists: choose a new directory" in reports[0]["again"]
    assert "process 0 could not write the Hugging Face checkpoint: see its error" in reports[1]["again"]
    assert sorted(p.name for p in out.iterdir()) == ["export"]  # no partial directory left
    loaded, _ = hf.load(out / "export")
    expected, got = (
        {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree.leaves_with_path(nnx.state(m, nnx.Param))}
        for m in (Transformer(two_hosts_hf.CFG, rngs=nnx.Rngs(0)), loaded)
    )
    assert sorted(got) == sorted(expected)
    for name, value in expected.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)
