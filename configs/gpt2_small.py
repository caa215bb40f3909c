"""GPT-2 small (124M), trained the way Karpathy's reproduction trains it: the recipe of
build-nanogpt's `train_gpt2.py` (github.com/karpathy/build-nanogpt at commit 6104ab1, the code of
"Let's reproduce GPT-2 (124M)"), with a byte-level BPE of 32,768 tokens trained on the run's own
data. For GPU / TPU.

Model (GPT-2 small): 12 layers, d_model 768, 12 heads (d_head 64), d_mlp 3072, context 1024,
pre-LN LayerNorm, learned positions, tanh-GELU MLP, tied input / output embeddings, no dropout.
vocab_size 32,768 (a multiple of 64) with data.tokenizer "bpe:32768": 111.0M parameters (GPT-2's
124M is with its 50,257-token vocabulary). Compute in bfloat16; parameters and Adam state in float32.

Optimisation, as train_gpt2.py: 2**19 = 524,288 tokens per step (micro-batch 64 x grad_accum 8 x
1024 tokens); AdamW, betas (0.9, 0.95), eps 1e-8, weight decay 0.1 on the matrices only; global
gradient-norm clip 1.0; peak learning rate 6e-4, linear warmup over 715 steps, then cosine decay to
10% of the peak (6e-5) at step 19,073 = 10B tokens / 524,288 (one epoch of FineWeb-Edu's 10B-token
sample there). Validation every 250 steps on up to 20 batches, as there; a checkpoint every 1,000
steps (train_gpt2.py writes one every 5,000: more often here, so that a preempted run loses less).
Not reproduced: train_gpt2.py's smaller initial std (0.02 / sqrt(2 x 12)) for the projections that
write into the residual stream (here every weight starts at init_std 0.02).

Memory: the layer body is rematerialised with the "dots" policy (matmul outputs kept, elementwise
work recomputed). The train step at this micro-batch (64 x 1024, accumulated 8 times, telemetry on),
compiled on the CPU from abstract shapes, plans 38.2 GiB of temporaries with "dots", 20.2 GiB with
"full" and 173.5 GiB with "none", plus 1.2 GiB of parameters and Adam state: "dots" is the policy that
fits an 80 GB GPU at this batch. That is XLA's CPU plan, not a GPU measurement (on a GPU, cuDNN's
fused attention, which `attention="auto"` takes here, does not form the 1024 x 1024 score matrices).
If it does not fit, use --config.model.remat=full, or halve train.batch_size and double
train.grad_accum (the same tokens per step).

Throughput to expect (computed, not measured: no accelerator was available to this work). FLOPs per
token as benchmarks/train_throughput.py counts them: 6 x 110,100,480 matmul parameters
(12 x (4 x 768^2 + 2 x 768 x 3072) + 768 x 32,768 for the unembedding) + 12 x 12 layers x 1024 x 768
for attention = 660,602,880 + 113,246,208 = 773,849,088 FLOPs/token. At 40-50% MFU of an H100's
989 TFLOP/s (dense bf16): 989e12 x 0.40 / 773,849,088 = 511,000 tokens/s and x 0.50 = 639,000
tokens/s, i.e. 0.82-1.03 s per 524,288-token step and 4.3-5.4 hours for the 19,073 steps (10.0B
tokens) on one H100. The loop logs tokens/s; on a device, `python benchmarks/scale.py` measures the
tokens/s and MFU of this shape (with a byte vocabulary).

Data: data.source is the default corpus (the standard library's sources, ~30 MB), which runs
anywhere but is far too small for this budget (19,073 steps would see it more than a thousand times).
For the real run point it at a large corpus, e.g. FineWeb-Edu's sample-10BT parquet files:

    python train.py --config configs/gpt2_small.py --config.data.source='/data/fineweb-edu/sample/10BT/*.parquet'

The BPE is trained once on the training split (then kept in data.cache_dir); that has not been timed
on a corpus of this size. On N devices, data parallel (the default mesh) splits each micro-batch:
for 8 GPUs, --config.train.batch_size=512 --config.train.grad_accum=1 keeps 2**19 tokens per step.

configs/gpt2_small.py replaces the earlier configs/gpt_small.py (GPT-2's shape with bytes, batch
32 x 1024, 100k steps), which was neither GPT-2's tokenization nor its training recipe.
"""

from resstream.config import base_config

VOCAB = 32_768


def get_config():
    config = base_config()
    config.run_dir = "runs/gpt2_small"
    config.model.update(
        vocab_size=VOCAB,
        n_layers=12,
        d_model=768,
        n_heads=12,
        n_ctx=1024,
        norm="layernorm",
        norm_placement="pre",
        positions="learned",
        mlp="gelu",
        tied_embeddings=True,
        unembed_bias=False,  # GPT-2 has none: resstream.hf.save exports the run as a GPT-2 checkpoint
        dropout=0.0,
        dtype="bfloat16",
        param_dtype="float32",
        init_std=0.02,
        remat="dots",
        attention="auto",
    )
    config.data.tokenizer = f"bpe:{VOCAB}"
    config.optimizer.update(
        learning_rate=6e-4, warmup_steps=715, min_lr_ratio=0.1, weight_decay=0.1, b1=0.9, b2=0.95, grad_clip=1.0
    )
    config.train.update(
        steps=19_073,
        batch_size=64,
        grad_accum=8,
        log_every=10,
        eval_every=250,
        eval_batches=20,
        checkpoint_every=1000,
        keep_last=3,
    )
    return config
