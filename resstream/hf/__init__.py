"""Hugging Face checkpoints in and out: GPT-2, GPT-NeoX (Pythia), Llama (1-3), Mistral and Qwen2.

>>> model, tokenizer = hf.load("path/to/checkpoint")            # or a hub name, when online
>>> model, tokenizer = hf.load("path/to/llama", dtype="bfloat16")
>>> hf.save(model, tokenizer, "exports/mine")                   # loads with AutoModelForCausalLM

A checkpoint is a directory in the Hugging Face layout: config.json, model.safetensors (or shards
with model.safetensors.index.json) and tokenizer.json. Reading needs neither torch nor transformers:
tensors come through `safetensors`, the tokenizer through `tokenizers`. A config.json field that
changes the computation in a way resstream does not reproduce is refused with an `HFError` naming
it (see `resstream.hf.families`), never silently ignored.

The tokenizer is a `BPETokenizer`, which adds no special tokens: a Llama model expects its BOS token
first, which `tokenizer.encode` does not prepend (transformers' tokenizer does, unless called with
add_special_tokens=False).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from safetensors import safe_open
from safetensors.numpy import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from resstream.config import DTYPES, ConfigError, ModelConfig
from resstream.data import ByteTokenizer
from resstream.hf.common import HFError
from resstream.hf.families import Family, export, family_of
from resstream.model import Transformer
from resstream.tokenizer import BPETokenizer, unicode_to_byte

__all__ = ["HFError", "load", "save"]

CONFIG_FILE, WEIGHTS_FILE, INDEX_FILE = "config.json", "model.safetensors", "model.safetensors.index.json"
TOKENIZER_FILE, TOKENIZER_CONFIG_FILE = "tokenizer.json", "tokenizer_config.json"
# What a hub download fetches: nothing but what `load` reads.
HUB_FILES = [CONFIG_FILE, WEIGHTS_FILE, "model-*.safetensors", INDEX_FILE, TOKENIZER_FILE, TOKENIZER_CONFIG_FILE]
# Tensors a checkpoint may hold that compute nothing: old causal-mask and rotary buffers.
IGNORED_TENSORS = re.compile(r"\.(attn|attention)\.(masked_)?bias$|rotary_emb\.inv_freq$")
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


# -------------------------------------------------------------------------------------------- load
def load(
    path_or_name: str | os.PathLike, dtype: str = "float32", *, compute_dtype: str | None = None
) -> tuple[Transformer, BPETokenizer]:
    """(model, tokenizer) of a Hugging Face checkpoint: a local directory, or a hub name such as
    "EleutherAI/pythia-70m" (downloaded with huggingface_hub when it is installed and the network
    allows). Parameters are stored in `dtype` ("float32", "bfloat16", "float16"), cast tensor by
    tensor as they are read, so the model is never held twice; activations are computed in
    `compute_dtype` (default: `dtype`). Raises HFError naming the file, tensor or config field that
    cannot be used."""
    param_dtype = _dtype_name(dtype, "dtype")
    directory = _resolve(path_or_name)
    hf_config = _read_json(directory / CONFIG_FILE)
    family = family_of(hf_config)
    fields = family.config(hf_config) | {
        "unembed_bias": False,  # no family has one
        "param_dtype": param_dtype,
        "dtype": _dtype_name(compute_dtype or param_dtype, "compute_dtype"),
    }
    try:
        cfg = ModelConfig(**fields)
    except (ConfigError, TypeError) as err:
        raise HFError(f"{directory / CONFIG_FILE} describes a model resstream cannot build: {err}") from err
    with _Checkpoint(directory, family.prefix) as checkpoint:
        model = _fill(cfg, family, checkpoint)
        checkpoint.check_all_used(tied=cfg.tied_embeddings)
    return model, _load_tokenizer(directory)


def _dtype_name(dtype: Any, what: str) -> str:
    try:
        name = jnp.dtype(dtype).name
    except TypeError:
        name = None
    if name not in DTYPES:
        raise HFError(f"{what}={dtype!r} is not supported: choose one of {list(DTYPES)}")
    return name


def _resolve(path_or_name: str | os.PathLike) -> Path:
    """The local directory of a checkpoint: `path_or_name` itself, or a hub download of it."""
    path = Path(path_or_name).expanduser()
    if path.is_dir():
        return path
    name = os.fspath(path_or_name)
    if path.exists():
        raise HFError(f"{name} is a file, not a checkpoint directory: name the directory holding {CONFIG_FILE}")
    if not REPO_ID.match(name):
        raise HFError(f"{name} is not a directory (and not a Hugging Face Hub name such as 'EleutherAI/pythia-70m')")
    try:
        import huggingface_hub
    except ImportError as err:
        raise HFError(
            f"{name!r} is not a local directory, and huggingface_hub is not installed to download it from the "
            "Hugging Face Hub: pip install huggingface_hub, or give the path of a downloaded checkpoint"
        ) from err
    try:
        return Path(huggingface_hub.snapshot_download(name, allow_patterns=HUB_FILES))
    except Exception as err:  # offline, unknown repository, gated model, ...: one clear error for all
        raise HFError(
            f"{name!r} is not a local directory and could not be downloaded from the Hugging Face Hub "
            f"({type(err).__name__}: {err}); check the name and the network, or give a local checkpoint directory"
        ) from err


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise HFError(f"{path} is missing: a Hugging Face checkpoint directory holds {path.name}")
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise HFError(f"{path} cannot be read as JSON ({err})") from err
    if not isinstance(value, dict):
        raise HFError(f"{path} holds {type(value).__name__}, not a JSON object")
    return value


class _Checkpoint:
    """The tensors of model.safetensors, or of the shards an index names, read one tensor at a time
    under HF names with or without the base model's prefix."""

    def __init__(self, directory: Path, prefix: str):
        self.directory, self.prefix, self.used = directory, prefix, set()
        self._files = contextlib.ExitStack()
        if (directory / WEIGHTS_FILE).is_file():
            shards = [WEIGHTS_FILE]
        elif (directory / INDEX_FILE).is_file():
            weight_map = _read_json(directory / INDEX_FILE).get("weight_map")
            if not isinstance(weight_map, dict):
                raise HFError(f"{directory / INDEX_FILE} has no 'weight_map'")
            shards = sorted(set(weight_map.values()))
        else:
            other = [p.name for p in directory.glob("*.bin")] + [p.name for p in directory.glob("*.pth")]
            hint = f" ({', '.join(sorted(other))} is not read: convert it to safetensors)" if other else ""
            raise HFError(f"{directory} has neither {WEIGHTS_FILE} nor {INDEX_FILE}{hint}")
        self.where: dict[str, Any] = {}  # tensor name -> the open file holding it
        try:
            self._open(shards)
        except BaseException:
            self._files.close()
            raise

    def _open(self, shards: list[str]) -> None:
        directory = self.directory
        for shard in shards:
            if not (directory / shard).is_file():
                raise HFError(f"{directory / shard} is missing: {INDEX_FILE} names it")
            try:
                handle = self._files.enter_context(safe_open(str(directory / shard), framework="numpy"))
            except Exception as err:  # safetensors raises its own error types for a damaged file
                raise HFError(f"{directory / shard} is not a readable safetensors file ({err})") from err
            self.where |= dict.fromkeys(handle.keys(), handle)

    def __enter__(self) -> _Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self._files.close()

    def read(self, name: str) -> np.ndarray:
        """Tensor `name` (e.g. "h.0.ln_1.weight"), found with or without the prefix, in its stored dtype
        (bfloat16 as ml_dtypes.bfloat16)."""
        for full in (self.prefix + name, name):
            if full in self.where:
                self.used.add(full)
                return self.where[full].get_tensor(full)
        raise HFError(f"tensor {self.prefix + name} (or {name}) is missing from the checkpoint in {self.directory}")

    def check_all_used(self, tied: bool) -> None:
        """HFError naming tensors that resstream's model has no place for (a feature it lacks)."""
        unused = [
            n
            for n in self.where
            if n not in self.used
            and not IGNORED_TENSORS.search(n)
            and not (tied and n in ("lm_head.weight", "embed_out.weight"))  # transformers ties them anyway
        ]
        if unused:
            names = sorted(unused)[:8]
            raise HFError(f"the checkpoint in {self.directory} has tensors resstream does not use: {names}")


def _fill(cfg: ModelConfig, family: Family, checkpoint: _Checkpoint) -> Transformer:
    """The model with every parameter read from the checkpoint: built abstractly (shapes only), each
    leaf then filled by one array in cfg's param dtype, a stacked [n_layers, ...] block parameter one
    layer at a time."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    getters = family.getters(cfg)

    def fill(path: tuple, leaf: jax.ShapeDtypeStruct) -> jax.Array:
        name = ".".join(str(k.key) for k in path)
        get = getters[name]
        if name.startswith("blocks."):
            value = np.empty(leaf.shape, leaf.dtype)  # [n_layers, ...]
            for layer in range(cfg.n_layers):
                value[layer] = _checked(get(checkpoint.read, layer), leaf.shape[1:], f"{name} of layer {layer}")
        else:
            value = _checked(get(checkpoint.read, 0), leaf.shape, name).astype(leaf.dtype)
        return jnp.asarray(value)

    pure = jax.tree_util.tree_map_with_path(fill, nnx.to_pure_dict(state))
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)


def _checked(value: np.ndarray, shape: tuple[int, ...], what: str) -> np.ndarray:
    if tuple(value.shape) != tuple(shape):
        raise HFError(f"the checkpoint gives {what} the shape {tuple(value.shape)}, but config.json implies {shape}")
    return value


def _load_tokenizer(directory: Path) -> BPETokenizer:
    path = directory / TOKENIZER_FILE
    if not path.is_file():
        raise HFError(f"{path} is missing: resstream reads the tokenizer from a {TOKENIZER_FILE}")
    try:
        return BPETokenizer(Tokenizer.from_file(str(path)))
    except Exception as err:  # tokenizers raises a bare Exception for a file it cannot parse
        raise HFError(f"{path} is not a tokenizer.json that HuggingFace tokenizers can load ({err})") from err


# -------------------------------------------------------------------------------------------- save
def save(
    model: Transformer, tokenizer: ByteTokenizer | BPETokenizer, path: str | os.PathLike, *, overwrite: bool = False
) -> None:
    """Write `model` and `tokenizer` as a Hugging Face checkpoint in directory `path`: config.json of
    the family that computes the model exactly (GPT-2, GPT-NeoX, Llama or Qwen2), model.safetensors
    (in the parameters' dtype), tokenizer.json and tokenizer_config.json, so that
    `transformers.AutoModelForCausalLM.from_pretrained(path)` and `AutoTokenizer` load it. Raises
    HFError naming the field when no family computes this model. Written into a temporary directory
    beside `path`, then renamed: a failure leaves `path` as it was. An existing non-empty `path` is
    replaced only with `overwrite=True`.

    On many hosts (`jax.distributed`), call it on every host with the same arguments: parameters
    sharded across hosts are gathered (a collective) and process 0 writes. Every host returns once
    the checkpoint is written, and raises if process 0 could not write it (process 0's error says
    why; the others' HFError points to it)."""
    path = Path(path).expanduser()
    cfg = model.cfg
    _on_process_0(lambda: _check_target(path, overwrite))  # before the gathers: no host waits in one
    params = {
        ".".join(str(k.key) for k in p): _on_this_host(v)
        for p, v in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    }

    def write() -> None:
        hf_config, tensors = export(cfg, params.get)
        tokenizer_json = _tokenizer_json(tokenizer, cfg)
        tokenizer_config = {
            "tokenizer_class": "PreTrainedTokenizerFast",  # AutoTokenizer then takes tokenizer.json as it is
            "model_max_length": cfg.n_ctx,
            "clean_up_tokenization_spaces": False,
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_directory(path, lambda out: _write(out, hf_config, tensors, tokenizer_json, tokenizer_config))

    _on_process_0(write)


def _check_target(path: Path, overwrite: bool) -> None:
    """HFError if `save` may not write to `path`."""
    if path.exists() and not (overwrite and path.is_dir()) and not (path.is_dir() and not any(path.iterdir())):
        raise HFError(f"{path} exists: choose a new directory, or pass overwrite=True to replace it")


def _on_process_0(work: Callable[[], None]) -> None:
    """Run `work` on process 0 alone. On many hosts every host then learns whether it raised (a
    broadcast, which also holds the others until it is done) and raises too if it did."""
    if jax.process_count() == 1:
        return work()
    error = None
    if jax.process_index() == 0:
        try:
            work()
        except Exception as err:  # any failure must reach the broadcast, or the other hosts wait forever
            error = err
    failed = int(multihost_utils.broadcast_one_to_all(np.int32(error is not None)))
    if error is not None:
        raise error
    if failed:
        raise HFError("process 0 could not write the Hugging Face checkpoint: see its error")


def _on_this_host(x: jax.Array) -> np.ndarray:
    """`x` whole as a numpy array; gathered from every host (a collective) when sharded across them."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def _write(out: Path, hf_config: dict, tensors: dict, tokenizer_json: str, tokenizer_config: dict) -> None:
    (out / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2) + "\n")
    # transformers refuses a safetensors file without format metadata
    arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    save_file(arrays, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    (out / TOKENIZER_FILE).write_text(tokenizer_json)
    (out / TOKENIZER_CONFIG_FILE).write_text(json.dumps(tokenizer_config, indent=2) + "\n")


def _write_directory(path: Path, write: Callable[[Path], None]) -> None:
    """Run `write` into a fresh directory beside `path`, then move it to `path` (replacing what was
    there only once the new one is complete)."""
    partial = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.partial-"))
    old = None
    try:
        write(partial)
        if path.exists():
            old = path.with_name(f"{partial.name}.old")
            path.rename(old)
        partial.rename(path)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        if old is not None and not path.exists():
            old.rename(path)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _tokenizer_json(tokenizer: ByteTokenizer | BPETokenizer, cfg: ModelConfig) -> str:
    """tokenizer.json text: a BPETokenizer's own, or for bytes a byte-level BPE without merges whose
    256 tokens are the bytes, id = byte value (so it encodes exactly as ByteTokenizer)."""
    if isinstance(tokenizer, BPETokenizer):
        text = tokenizer.tokenizer.to_str(pretty=True)
    elif isinstance(tokenizer, ByteTokenizer):
        byte_char = {b: c for c, b in unicode_to_byte().items()}
        bytes_tokenizer = Tokenizer(models.BPE(vocab={byte_char[b]: b for b in range(256)}, merges=[]))
        bytes_tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        bytes_tokenizer.decoder = decoders.ByteLevel()
        text = bytes_tokenizer.to_str(pretty=True)
    else:
        raise HFError(f"cannot export a {type(tokenizer).__name__}: save takes a ByteTokenizer or a BPETokenizer")
    if tokenizer.vocab_size > cfg.vocab_size:
        raise HFError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is {cfg.vocab_size}: "
            "they do not belong together"
        )
    return text
