"""GPT pretraining and generation: a GPT-2 trained from scratch on Shakespeare, then sampled.

What you will learn: the decoder-only Transformer (token + position information, pre-LN blocks of
causal self-attention and an MLP, a tied LM head), next-token training with AdamW or Muon (an
optimizer that orthogonalizes each matrix's update), warmup + cosine learning rate, gradient
accumulation and clipping, mixed precision and DDP; then inference: sampling (temperature, top-k,
top-p), a KV cache, int8 weight-only quantization, loading OpenAI's GPT-2 weights from a safetensors
file read by hand, and three kinds of positions (learned, RoPE, ALiBi).

Run it:
    python 03_gpt.py                                   # CPU quick run (the `cpu` preset), then samples
    python 03_gpt.py --preset nanogpt_cpu              # nanoGPT's documented CPU run, for comparison
    python 03_gpt.py --preset gpu                      # one GPU: GPT-2 124M on owt10k
    torchrun --standalone --nproc_per_node=8 03_gpt.py --preset gpu   # several GPUs (DDP)
    python 03_gpt.py --mode sample --prompt "ROMEO:"   # sample from out/03_gpt/ckpt.pt
    python 03_gpt.py --mode sample --init_from gpt2 --prompt "Hello"   # OpenAI's GPT-2 124M
    python 03_gpt.py --mode eval --quantize int8       # val loss in float and in int8
    python 03_gpt.py --mode bench | extrapolate | landscape
    python 03_gpt.py --mode compare --runs=out/03_gpt,out/03_gpt_adamw   # finished runs' losses on one axis
    python 03_gpt.py --help                            # every flag, its default and meaning

Expected result (README.md has the table): the cpu preset reaches val loss 1.73 on shakespeare_char
after 600 steps (1.98 with AdamW instead of Muon); nanogpt_cpu ~1.9 after 2000 steps; the KV cache
generates ~7x faster at block 256; int8 shrinks the Linear weights 3.9x for a +0.01% loss change.
Layout: Config; the milestone (model, sampling, GPT-2 weights, int8, Muon), which runs on its own;
data, training, evaluation, main(); last, the plumbing that is the same in all seven scripts.

Notation: B batch, T sequence length (query positions), S key positions (T plus the KV cache),
C channels (n_embd), nh heads, hd head dim (C // nh), V vocab, L layers, N parameters.

References: Vaswani et al. 2017 (arXiv:1706.03762); GPT-2 (Radford et al. 2019); RoFormer/RoPE
(arXiv:2104.09864); ALiBi (arXiv:2108.12409); AdamW (arXiv:1711.05101); Muon (K. Jordan et al.
2024, kellerjordan.github.io/posts/muon; Liu et al. 2025, arXiv:2502.16982); Li et al. 2018, loss
landscapes (arXiv:1712.09913); Chen et al. 2016, gradient checkpointing (arXiv:1604.06174).
Code follows nanoGPT (model.py, train.py) and gpt-fast (KV cache, int8). Tests compare manual
attention with F.scaled_dot_product_attention, the KV cache with uncached generation, the
safetensors reader with a file written by the test, and RoPE/ALiBi with their closed forms.
"""
import dataclasses
import hashlib
import inspect
import json
import math
import os
import re
import sys
import tempfile
import time
from collections import defaultdict
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


# --- Config ---------------------------------------------------------------------------------------
SCRIPT_NAME = "03_gpt"  # the file's stem: default out_dir is out/<SCRIPT_NAME>


@dataclass
class Config:
    # I/O
    out_dir: str = f"out/{SCRIPT_NAME}"  # checkpoints, log.jsonl, derived data (token ids, vocab)
    data_dir: str = os.environ.get("LLM_DATA_DIR", "data")  # raw downloads; read, never modified
    init_from: str = "scratch"  # scratch | resume | gpt2 | gpt2-medium | gpt2-large | gpt2-xl | folder
    mode: str = "train"  # train | sample | eval | bench | extrapolate | landscape | compare
    runs: str = ""  # --mode compare: the out_dirs of finished runs, comma-separated, drawn on one axis
    dataset: str = "shakespeare_char"  # shakespeare_char | shakespeare | tinystories | owt10k | file.txt
    tokenizer: str = "char"  # char | gpt2: how a --dataset path/to/file.txt is tokenized
    always_save_checkpoint: bool = False  # save at every eval, not only on a new best val loss
    # model
    n_layer: int = 4  # number of Transformer blocks
    n_head: int = 4  # attention heads per block
    n_embd: int = 128  # model width C
    block_size: int = 64  # training context length T
    dropout: float = 0.0  # dropout on attention weights, residual branches and embeddings
    bias: bool = False  # biases in Linear and LayerNorm layers (GPT-2 had them)
    pos: str = "learned"  # learned | rope | alibi: how attention knows token order
    attn: str = "sdpa"  # sdpa (F.scaled_dot_product_attention) | manual (written out)
    grad_ckpt: bool = False  # recompute each block's activations in backward to save memory
    # training
    batch_size: int = 12  # sequences per micro-batch (per rank)
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step, over all ranks
    max_iters: int = 2000  # optimizer steps
    learning_rate: float = 1e-3  # peak learning rate
    min_lr: float = 1e-4  # learning rate at the end of the cosine decay
    warmup_iters: int = 100  # linear warmup steps
    lr_decay_iters: int = 2000  # step where the cosine reaches min_lr
    optimizer: str = "adamw"  # adamw | muon (Muon for the blocks' matrices, AdamW for the rest)
    muon_lr: float = 0.02  # --optimizer muon: peak learning rate of the Muon matrices (same schedule)
    weight_decay: float = 0.1  # AdamW decoupled weight decay (matrices only)
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.99  # AdamW beta2
    grad_clip: float = 1.0  # clip the global gradient norm to this (0 = off)
    eval_interval: int = 250  # steps between evaluations (and checkpoints)
    eval_iters: int = 20  # batches per split in each evaluation
    log_interval: int = 10  # steps between progress lines
    # generation and evaluation
    prompt: str = "\n"  # text to continue, or FILE:path to read it from a file
    num_samples: int = 2  # samples printed after training and in --mode sample
    max_new_tokens: int = 300  # tokens generated per sample
    temperature: float = 0.8  # divide logits by this before sampling; 0 = greedy
    top_k: int = 0  # sample only from the k most likely tokens (0 = off)
    top_p: float = 1.0  # sample only from the smallest set of tokens with this much mass (1 = off)
    quantize: str = "none"  # none | int8: int8 weight-only Linear layers for eval and sample
    # system
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16 (autocast; float16 uses a GradScaler)
    compile: bool = False  # torch.compile the model
    seed: int = 1337  # base seed; rank r uses seed + r


PRESETS = {
    "tiny": dict(n_layer=2, n_head=2, n_embd=32, block_size=32, batch_size=8, max_iters=20,
                 lr_decay_iters=20, warmup_iters=5, eval_interval=10, eval_iters=2, log_interval=5,
                 num_samples=1, max_new_tokens=20),  # tests
    # the default, a laptop CPU: at a fixed compute budget a narrower model that sees more tokens wins
    # (Hoffmann et al. 2022), and Muon gets more out of the same steps than AdamW (README, Results).
    # 7 evaluations draw its loss curve (--mode compare); they use their own batches, not the training RNG
    "cpu": dict(n_layer=4, n_head=4, n_embd=96, block_size=64, batch_size=32, max_iters=600,
                lr_decay_iters=600, warmup_iters=30, learning_rate=4e-3, min_lr=4e-4, eval_interval=100,
                eval_iters=40, optimizer="muon"),
    "nanogpt_cpu": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12, max_iters=2000,
                        lr_decay_iters=2000, dropout=0.0, eval_iters=20),  # nanoGPT's README CPU run
    "gpu": dict(dataset="owt10k", n_layer=12, n_head=12, n_embd=768, block_size=1024, batch_size=16,
                gradient_accumulation_steps=32, max_iters=300, lr_decay_iters=300, warmup_iters=30,
                learning_rate=6e-4, min_lr=6e-5, beta2=0.95, dropout=0.1, eval_interval=50,
                eval_iters=40, compile=True),  # GPT-2 124M, 16*1024*32 = 524,288 tokens per step
}
DEFAULT_PRESET = "cpu"
# Fields that define the model's shape: a checkpoint whose values differ cannot be loaded.
MODEL_KEYS = ("n_layer", "n_head", "n_embd", "block_size", "bias", "pos", "dataset")
MODES = ("train", "sample", "eval", "bench", "extrapolate", "landscape", "compare")
RULES = {"mode": MODES, "pos": ("learned", "rope", "alibi"), "attn": ("sdpa", "manual"),
         "optimizer": ("adamw", "muon"), "quantize": ("none", "int8"), "tokenizer": ("char", "gpt2"),
         "dtype": ("auto", "float32", "bfloat16", "float16"),
         **dict.fromkeys(("n_layer", "n_head", "n_embd", "block_size", "batch_size", "gradient_accumulation_steps",
                          "learning_rate", "muon_lr", "eval_interval", "eval_iters", "log_interval", "num_samples",
                          "max_new_tokens"), "> 0"),
         **dict.fromkeys(("max_iters", "warmup_iters", "lr_decay_iters", "min_lr", "weight_decay", "grad_clip",
                          "temperature", "top_k"), ">= 0"),
         **dict.fromkeys(("dropout", "beta1", "beta2"), "in [0, 1)")}


def check_config(cfg):
    """The rules that tie flags together (parse_args: exit 2 naming the flag). A file the flags name is
    checked when it is read, so a command can be written before the file exists."""
    if cfg.n_embd % cfg.n_head or (cfg.n_embd // cfg.n_head) % 2:
        raise ValueError(f"--n_embd {cfg.n_embd} must split into --n_head {cfg.n_head} heads of even size "
                         f"(RoPE rotates pairs of channels)")
    if cfg.min_lr > cfg.learning_rate:
        raise ValueError(f"--min_lr {cfg.min_lr} must not exceed --learning_rate {cfg.learning_rate}")
    if not 0 < cfg.top_p <= 1:
        raise ValueError(f"--top_p must be in (0, 1], not {cfg.top_p!r}")
    if cfg.dataset not in DATASETS and not cfg.dataset.endswith(".txt"):
        raise ValueError(f"--dataset {cfg.dataset!r} is neither one of {', '.join(DATASETS)} nor a file.txt")
    if cfg.mode == "compare" and not cfg.runs:
        raise ValueError("--mode compare needs --runs=DIR,DIR,...: the out_dirs of finished runs")


# --- Milestone: GPT-2, with learned, rotary or ALiBi positions and a KV cache ---------------------
@dataclass
class GPTConfig:
    """The model's shape alone (no training settings): GPT(GPTConfig(...)) works on its own."""
    block_size: int = 1024  # longest context (learned positions cannot go past it)
    vocab_size: int = 50304  # GPT-2's 50,257 padded up to a multiple of 64 for faster matmuls
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True
    pos: str = "learned"  # learned | rope | alibi
    attn: str = "sdpa"  # sdpa | manual
    gelu: str = "exact"  # exact (erf) | tanh: GPT-2's approximation, which from_pretrained sets to compute GPT-2


def alibi_slopes(n_head):
    """ALiBi head slopes (Press et al. 2022, §3): the geometric sequence 2^(-8/n), 2^(-16/n), ... for
    n a power of two; otherwise the n' = 2^floor(log2 n) slopes plus every other slope of 2n'."""
    def powers(n):
        start = 2 ** (-8 / n)
        return [start ** (i + 1) for i in range(n)]

    if math.log2(n_head).is_integer():
        return torch.tensor(powers(n_head))
    closest = 2 ** math.floor(math.log2(n_head))
    return torch.tensor(powers(closest) + powers(2 * closest)[0::2][: n_head - closest])


def rope_angles(positions, head_dim, base=10000.0):
    """RoPE (Su et al. 2021, eq. 34): pair i of a head is rotated by angle pos * base^(-2i/hd).
    positions (T,) -> cos, sin each (T, hd/2)."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.float()[:, None] * inv_freq[None, :]  # (T, hd/2)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate each consecutive pair (x_2i, x_2i+1) of x (B, nh, T, hd) by its angle:
    (x0, x1) -> (x0 cos - x1 sin, x0 sin + x1 cos). Then q_m . k_n depends only on m - n."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))  # rotate in float32 (or float64) at least
    x0, x1 = xf.unflatten(-1, (-1, 2)).unbind(-1)  # (B, nh, T, hd/2) each
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)  # (B, nh, T, hd/2, 2)
    return out.flatten(-2).type_as(x)  # (B, nh, T, hd)


class KVCache:
    """One layer's keys and values for generation (gpt-fast): preallocated (B, nh, max_len, hd), so
    each new token writes one slot instead of re-running attention projections over the prefix."""

    def __init__(self, max_len):
        self.max_len, self.k, self.v = max_len, None, None

    def update(self, start, k, v):
        """Write k, v (B, nh, T, hd) at positions start..start+T-1; return the filled prefix (B, nh, S, hd)."""
        if self.k is None:  # (B, nh, max_len, hd)
            self.k, self.v = (t.new_zeros(*t.shape[:2], self.max_len, t.size(3)) for t in (k, v))
        end = start + k.size(2)
        self.k[:, :, start:end], self.v[:, :, start:end] = k, v
        return self.k[:, :, :end], self.v[:, :, :end]


class CausalSelfAttention(nn.Module):
    """softmax(q k^T / sqrt(hd) + bias) v per head (Vaswani et al. §3.2.1), q, k, v from one fused
    Linear(C, 3C) named c_attn as in GPT-2, so OpenAI's weights load unchanged."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        if config.n_embd % config.n_head:
            raise ValueError(f"n_embd {config.n_embd} is not divisible by n_head {config.n_head}")
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head, self.dropout, self.attn = config.n_head, config.dropout, config.attn

    def forward(self, x, rope=None, attn_bias=None, cache=None, start=0):
        """x (B, T, C); rope = (cos, sin) or None; attn_bias (nh or 1, T, S) additive, -inf where
        masked, or None for the plain causal mask with T == S; cache: this layer's KVCache."""
        (B, T, C), hd = x.shape, x.size(-1) // self.n_head  # q, k, v below: (B, nh, T, hd) each
        q, k, v = (t.view(B, T, self.n_head, hd).transpose(1, 2) for t in self.c_attn(x).split(C, dim=2))
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(start, k, v)  # (B, nh, S, hd), S = start + T
        if self.attn == "manual":
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hd))  # (B, nh, T, S)
            if attn_bias is None:  # query t sees keys 0..t: -inf above the diagonal
                attn_bias = torch.full((T, T), float("-inf"), device=x.device).triu(1)
            att = F.softmax(att + attn_bias, dim=-1)  # (B, nh, T, S); autocast runs softmax in float32
            y = self.attn_dropout(att) @ v  # (B, nh, T, hd)
        else:  # the same maths in one fused kernel (flash attention on GPUs when attn_bias is None)
            mask = None if attn_bias is None else attn_bias.to(q.dtype)
            p = self.dropout if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=mask is None)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): heads side by side again
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """Position-wise feed-forward, C -> 4C -> C with GELU (Hendrycks & Gimpel 2016): the exact x Phi(x) from scratch
    (as nanoGPT: faster on CPUs), or the tanh approximation GPT-2 was trained with, which its weights need."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh" if config.gelu == "tanh" else "none")
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):  # (B, T, C) -> (B, T, C)
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LN residual block (GPT-2 §2.3): x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, rope=None, attn_bias=None, cache=None, start=0):
        x = x + self.attn(self.ln_1(x), rope, attn_bias, cache, start)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """GPT-2 with nanoGPT's parameter names (transformer.wte/wpe/h.i/ln_f, lm_head)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        if (config.pos not in ("learned", "rope", "alibi") or config.attn not in ("sdpa", "manual")
                or config.gelu not in ("exact", "tanh")):
            raise ValueError(f"pos must be learned|rope|alibi, attn sdpa|manual and gelu exact|tanh, not "
                             f"{config.pos}, {config.attn}, {config.gelu}")
        self.config = config
        modules = dict(wte=nn.Embedding(config.vocab_size, config.n_embd))
        if config.pos == "learned":  # RoPE and ALiBi put position into attention instead
            modules["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        modules.update(drop=nn.Dropout(config.dropout),
                       h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
                       ln_f=nn.LayerNorm(config.n_embd, bias=config.bias))
        self.transformer = nn.ModuleDict(modules)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Weight tying (Press & Wolf 2017): the output layer reuses the input embedding.
        self.transformer.wte.weight = self.lm_head.weight
        if config.pos == "alibi":
            self.register_buffer("alibi_slopes", alibi_slopes(config.n_head), persistent=False)
        self.grad_ckpt = False  # set by training (--grad_ckpt); a runtime switch, not a shape
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2 §2.3: scale residual projections by 1/sqrt(2L)
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self, non_embedding=True):
        """Parameters (the tied embedding counted once); position embeddings excluded by default,
        as in nanoGPT, since they cost no FLOPs."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding and "wpe" in self.transformer else n

    def _attn_bias(self, T, start, device):
        """Additive attention bias (nh or 1, T, S) for queries at positions start..start+T-1 over
        keys 0..S-1: -inf above the causal diagonal, and ALiBi's -m_h * (i - j) (Press et al. §3).
        None means the plain causal mask with T == S, which SDPA applies itself (is_causal)."""
        if self.config.pos != "alibi" and start == 0:
            return None
        S = start + T
        qpos = torch.arange(start, S, device=device)[:, None]  # (T, 1)
        kpos = torch.arange(S, device=device)[None, :]  # (1, S)
        bias = torch.zeros(T, S, device=device).masked_fill(kpos > qpos, float("-inf"))  # (T, S)
        if self.config.pos == "alibi":
            bias = bias - self.alibi_slopes[:, None, None] * (qpos - kpos).clamp(min=0)  # (nh, T, S)
        return bias[None] if bias.dim() == 2 else bias

    def forward(self, idx, targets=None, caches=None, start=0):
        """idx (B, T) token ids at positions start..start+T-1 -> (logits, loss). With targets (B, T):
        logits for every position and the mean cross-entropy; without: the last position only."""
        B, T = idx.shape
        if self.config.pos == "learned" and start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens is longer than block_size {self.config.block_size}")
        positions = torch.arange(start, start + T, device=idx.device)  # (T,)
        x = self.transformer.wte(idx)  # (B, T, C)
        if self.config.pos == "learned":
            x = x + self.transformer.wpe(positions)  # (B, T, C) + (T, C)
        x = self.transformer.drop(x)
        rope = rope_angles(positions, self.config.n_embd // self.config.n_head) if self.config.pos == "rope" else None
        attn_bias = self._attn_bias(T, start, idx.device)
        for i, block in enumerate(self.transformer.h):
            if self.grad_ckpt and self.training:  # keep only x; recompute the block in backward
                x = torch.utils.checkpoint.checkpoint(block, x, rope, attn_bias, use_reentrant=False)
            else:
                x = block(x, rope, attn_bias, caches[i] if caches else None, start)
        x = self.transformer.ln_f(x)
        if targets is None:
            return self.lm_head(x[:, [-1], :]), None  # (B, 1, V): only the next token is needed
        logits = self.lm_head(x)  # (B, T, V)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type, kind="adamw", muon_lr=0.02):
        """AdamW with two groups: matrices (Linear weights, embeddings) decay; biases and LayerNorm
        gains do not (decaying them only pulls them toward 0 for no benefit). kind="muon": the
        blocks' Linear weights go to Muon in a third group; the embedding (tied to the head) stays
        with AdamW, as in Muon's recipe. Each group's "lr_scale" times the scheduled lr is its lr."""
        params = [p for p in self.parameters() if p.requires_grad]
        muon = {id(p) for p in self.transformer.h.parameters() if p.dim() == 2} if kind == "muon" else set()
        groups = [{"params": [p for p in params if p.dim() >= 2 and id(p) not in muon], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        if kind == "adamw":  # fused: one kernel for all tensors instead of a Python loop
            return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=device_type in ("cuda", "cpu"))
        groups.append({"params": [p for p in params if id(p) in muon], "weight_decay": 0.0, "muon": True,
                       "lr_scale": muon_lr / learning_rate})
        return Muon(groups, lr=learning_rate, betas=betas)

    def crop_block_size(self, block_size):
        """Shorten the context (e.g. GPT-2's 1024 for a small fine-tune): drop learned positions."""
        assert block_size <= self.config.block_size
        self.config = dataclasses.replace(self.config, block_size=block_size)
        if "wpe" in self.transformer:
            self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size])

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, use_cache=True):
        """Append max_new_tokens sampled tokens to idx (B, T0). The context seen is the last
        block_size tokens. With the cache the prompt is run once (prefill), then each step feeds one
        token; once the window slides (the sequence passes block_size) every position changes and
        the cache is rebuilt from the window, so both paths compute the same distribution."""
        block_size, caches = self.config.block_size, None
        for _ in range(max_new_tokens):
            window = idx[:, -block_size:]  # (B, <=block_size)
            if not use_cache:
                logits, _ = self(window)
            elif caches is None or idx.size(1) > block_size:  # prefill (again, if the window slid)
                caches = [KVCache(block_size) for _ in self.transformer.h]
                logits, _ = self(window, caches=caches)
            else:  # decode: the newest token only, attending over the cached keys and values
                logits, _ = self(idx[:, -1:], caches=caches, start=idx.size(1) - 1)
            idx_next = sample_next(logits[:, -1, :], temperature, top_k, top_p)  # (B, 1)
            idx = torch.cat((idx, idx_next), dim=1)
        return idx

    @classmethod
    def from_pretrained(cls, folder, dropout=0.0):
        """OpenAI's GPT-2 from a Hugging Face folder (config.json + model.safetensors), with its tanh GELU. Its
        Linear layers are Conv1D, stored (in, out); its names lack `transformer.`; its head is tied to wte."""
        with open(os.path.join(folder, "config.json")) as f:
            hf = json.load(f)
        model = cls(GPTConfig(block_size=hf.get("n_positions", hf.get("n_ctx", 1024)), dropout=dropout, gelu="tanh",
                              **{k: hf[k] for k in ("vocab_size", "n_layer", "n_head", "n_embd")}))
        sd, loaded = model.state_dict(), set()
        conv1d = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")
        for key, t in load_safetensors(os.path.join(folder, "model.safetensors")).items():
            key = key.removeprefix("transformer.")
            if key.endswith((".attn.bias", ".attn.masked_bias")) or key == "lm_head.weight":
                continue  # the causal-mask buffers, and the head (tied to wte)
            ours, t = f"transformer.{key}", t.t() if key.endswith(conv1d) else t
            if ours not in sd or t.shape != sd[ours].shape:
                raise ValueError(f"{folder}/model.safetensors: {key} {tuple(t.shape)} has no place in the model")
            with torch.no_grad():
                sd[ours].copy_(t)
            loaded.add(ours)
        missing = sorted(set(sd) - loaded - {"lm_head.weight"})
        if missing:
            raise ValueError(f"{folder}/model.safetensors lacks {missing[:3]}")
        return model


# --- Milestone: inference -- sampling, a safetensors reader, int8 weights -------------------------
def sample_next(logits, temperature=1.0, top_k=None, top_p=None):
    """logits (B, V) -> next ids (B, 1). temperature 0 is greedy. top-k keeps the k largest logits;
    top-p (Holtzman et al. 2020, §3.1) keeps the smallest set whose probabilities sum to >= p."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)  # (B, V)
        probs = F.softmax(sorted_logits, dim=-1)
        drop = probs.cumsum(dim=-1) - probs > top_p  # mass before this token already reaches p
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


def load_safetensors(path):
    """The safetensors format: an 8-byte little-endian header length N, N bytes of JSON
    {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}, then one raw
    little-endian buffer; offsets count from the buffer's start. -> {name: tensor}. A header or a
    tensor that claims more bytes than the file holds (a truncated file, or not safetensors) is a ValueError."""
    assert sys.byteorder == "little", "this reader maps the little-endian buffer directly"
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n > size - 8:
            raise ValueError(f"{path}: header length {n} is larger than the file ({size} bytes): not safetensors")
        header = json.loads(f.read(n))
        buffer = bytearray(f.read())
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        if not 0 <= begin <= end <= len(buffer):
            raise ValueError(f"{path}: tensor {name} lies at bytes {begin}..{end} of a {len(buffer)}-byte buffer")
        dtype, raw = SAFETENSORS_DTYPES[info["dtype"]], buffer[begin:end]
        t = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
        tensors[name] = t.reshape(info["shape"])
    return tensors


class Int8Linear(nn.Module):
    """Weight-only int8 (gpt-fast): W ~ s * Q with one scale per output channel, s_o = max|W_o,:|/127,
    Q = round(W / s) in [-127, 127]. Forward: y = (x Q^T) * s + b, Q cast to x's dtype on the fly,
    so the weights take 1 byte each in memory instead of 4."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()  # (out, in)
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0  # (out,)
        self.register_buffer("weight", torch.round(w / scale[:, None]).to(torch.int8))  # (out, in)
        self.register_buffer("scale", scale.to(linear.weight.dtype))  # (out,)
        self.bias = linear.bias

    def forward(self, x):
        y = F.linear(x, self.weight.to(x.dtype)) * self.scale.to(x.dtype)  # (..., out)
        return y if self.bias is None else y + self.bias


def quantize_int8(model):
    """Replace every nn.Linear inside the blocks by an Int8Linear (the LM head stays tied to the
    float embedding). -> (bytes of those weights before, after, scales included)."""
    before = after = 0
    for block in model.transformer.h:
        for parent in block.modules():
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    q = Int8Linear(child)
                    before += child.weight.numel() * child.weight.element_size()
                    after += q.weight.numel() + q.scale.numel() * q.scale.element_size()
                    setattr(parent, name, q)
    return before, after


# --- Milestone: the Muon optimizer ----------------------------------------------------------------
def newton_schulz(G, steps=5):
    """≈ U Vᵀ for G = U Σ Vᵀ: every singular value pushed to about 1, with matmuls only. The iteration
    X <- a X + b (X Xᵀ) X + c (X Xᵀ)² X applies p(σ) = a σ + b σ³ + c σ⁵ to each singular value of X;
    (a, b, c) = (3.4445, -4.7750, 2.0315) make p steep at 0 so five steps bring any σ in (0, 1] into
    roughly [0.7, 1.2] (Jordan et al. 2024: exact orthogonality is not needed, speed is). Scaling by
    the Frobenius norm first guarantees σ <= 1. Runs on the wide orientation so X Xᵀ is the small side."""
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G / (G.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # G (..., m, n): a stack of matrices is fine
    tall = X.size(-2) > X.size(-1)
    if tall:
        X = X.mT
    for _ in range(steps):
        M = X @ X.mT
        X = a * X + (b * M + c * M @ M) @ X
    return X.mT if tall else X


class Muon(torch.optim.Optimizer):
    """Muon, "MomentUm Orthogonalized by Newton-Schulz" (K. Jordan et al. 2024; scaled up in Moonlight,
    Liu et al. 2025). For a weight matrix W (out, in) with Nesterov momentum M, the update is the
    orthogonalized U Vᵀ of M = U Σ Vᵀ: every direction of the update gets the same step size, so the
    rare directions a raw gradient barely moves learn as fast as the dominant ones; the step is scaled
    by sqrt(max(1, out/in)) so tall and wide matrices move alike. Groups without "muon" get AdamW,
    written out: embeddings, the head and 1-D gains keep an elementwise optimizer."""

    def __init__(self, groups, lr, betas=(0.9, 0.99), eps=1e-8, momentum=0.95, ns_steps=5):
        super().__init__(groups, dict(lr=lr, betas=betas, eps=eps, momentum=momentum, ns_steps=ns_steps,
                                      weight_decay=0.0, muon=False, lr_scale=1.0))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            if group["muon"]:
                self._muon_step(group)
                continue
            lr, wd, (beta1, beta2) = group["lr"], group["weight_decay"], group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state, g = self.state[p], p.grad
                if not state:
                    state.update(t=0, m=torch.zeros_like(p), v=torch.zeros_like(p))
                state["t"] = t = state["t"] + 1
                state["m"].lerp_(g, 1 - beta1)  # first and second moments, bias-corrected below
                state["v"].lerp_(g * g, 1 - beta2)
                denom = (state["v"] / (1 - beta2 ** t)).sqrt_().add_(group["eps"])
                p.mul_(1 - lr * wd)  # decoupled weight decay
                p.addcdiv_(state["m"], denom, value=-lr / (1 - beta1 ** t))

    def _muon_step(self, group):
        """Matrices of the same shape (one per layer) are orthogonalized together, as one batched
        Newton-Schulz: a few large matmuls instead of many tiny ones."""
        by_shape = defaultdict(list)
        for p in group["params"]:
            if p.grad is not None:
                by_shape[p.shape].append(p)
        mu = group["momentum"]
        for (rows, cols), params in by_shape.items():
            nesterov = []
            for p in params:
                buf = self.state[p].setdefault("momentum", torch.zeros_like(p))
                buf.lerp_(p.grad, 1 - mu)  # M <- mu M + (1 - mu) G
                nesterov.append(p.grad.lerp(buf, mu))  # the update looks one momentum step ahead
            updates = newton_schulz(torch.stack(nesterov), group["ns_steps"])  # (k, rows, cols)
            for p, u in zip(params, updates):
                p.add_(u.to(p.dtype), alpha=-group["lr"] * max(1.0, rows / cols) ** 0.5)


# --- Data -----------------------------------------------------------------------------------------
SHAKESPEARE = ("tinyshakespeare/input.txt",
               "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
               "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed", None)
# name -> (file under --data_dir, URL, sha256 or None, first bytes or None, tokenizer). A file without a pinned
# sha256 is checked by its format's first bytes (xz) or at least for not being an HTML page (text). {hf} is
# hf_endpoint(); owt10k's file lies on a CDN host outside the Hub's URL layout, which a mirror does not serve.
DATASETS = {
    "shakespeare_char": (*SHAKESPEARE, "char"),
    "shakespeare": (*SHAKESPEARE, "gpt2"),
    "tinystories": ("tinystories/TinyStories-valid.txt",
                    "{hf}/datasets/roneneldan/TinyStories/resolve/main/TinyStories-valid.txt",
                    None, None, "gpt2"),
    "owt10k": ("openwebtext-10k/openwebtext-10k.tar.xz",
               "https://cdn-datasets.huggingface.co/nlp/datasets/openwebtext/openwebtext-10k.tar.xz",
               None, b"\xfd7zXZ\x00", "gpt2"),
}
GPT2_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
HF_URL = "{hf}/openai-community/{name}/resolve/main/{file}"  # GPT-2 weights
GPT2_EOT = 50256  # <|endoftext|>, put between documents


def hf_endpoint():
    """Hugging Face, or the mirror $HF_ENDPOINT names (as for its own tools), read at each download."""
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def gpt2_folder(cfg):
    """--init_from gpt2* -> data_dir/hf/<name>/ holding config.json and model.safetensors (downloaded
    once); --init_from path/to/folder -> that folder."""
    if cfg.init_from not in GPT2_NAMES:
        if not os.path.isdir(cfg.init_from):
            raise UserError(f"--init_from {cfg.init_from!r} is neither scratch, resume, {', '.join(GPT2_NAMES)} "
                            f"nor a folder holding config.json and model.safetensors")
        return cfg.init_from
    folder = os.path.join(cfg.data_dir, "hf", cfg.init_from)
    for file in ("config.json", "model.safetensors"):
        download(HF_URL.format(hf=hf_endpoint(), name=cfg.init_from, file=file), os.path.join(folder, file))
    return folder


def gpt2_encoding():
    """tiktoken's GPT-2 BPE (50,257 tokens). It fetches two vocabulary files once; offline, point
    TIKTOKEN_CACHE_DIR at a folder that holds them."""
    import tiktoken

    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # tiktoken raises requests/urllib errors or its own, depending on version
        raise UserError(f"could not load the GPT-2 tokenizer ({e.__class__.__name__}: {e}); offline, set "
                        f"TIKTOKEN_CACHE_DIR to a folder holding tiktoken's cached gpt2 files") from None


def make_tokenizer(meta):
    """meta = {"kind": "char", "chars": "..."} or {"kind": "gpt2"} -> (encode, decode)."""
    if meta["kind"] == "char":
        table = np.array([ord(ch) for ch in meta["chars"]], dtype=np.uint32)  # code points, sorted

        def encode(text):  # a binary search per character, vectorized
            codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
            ids = np.searchsorted(table, codes).clip(max=len(table) - 1)
            missing = set(text[i] for i in np.flatnonzero(table[ids] != codes))
            if missing:
                raise UserError(f"characters {''.join(sorted(missing))!r} are not in this model's vocabulary")
            return ids.tolist()

        return encode, lambda ids: "".join(meta["chars"][i] for i in ids)
    enc = gpt2_encoding()
    return (lambda text: enc.encode(text, allowed_special={"<|endoftext|>"})), enc.decode


def iter_documents(path):
    """Yield the documents of a raw corpus one at a time, so a large corpus is never held twice:
    a .tar.xz of text files (one document each, OpenWebText-10k's layout), or a text with documents
    separated by `<|endoftext|>` lines (TinyStories)."""
    if path.endswith(".tar.xz"):
        import tarfile

        with tarfile.open(path, "r|*") as tar:  # streaming mode: members in archive order
            yield from (tar.extractfile(m).read().decode("utf-8", errors="replace")
                        for m in tar if m.isfile() and m.name.endswith(".txt"))
        return
    with open(path, encoding="utf-8") as f:
        doc = []
        for line in f:
            if line.strip() == "<|endoftext|>":
                yield "".join(doc)
                doc = []
            else:
                doc.append(line)
        if any(s.strip() for s in doc):
            yield "".join(doc)


def prepare_data(cfg, verbose=True):
    """Tokenize the dataset once into out_dir/data/<name>-<tokenizer>-<sha>/{train,val}.bin (uint16: every
    vocabulary here has < 65,536 tokens) and meta.json -> (folder, meta). The cache key holds the source's
    sha256, so an edited text is re-tokenized and an unchanged one reused. Only the source is read from data_dir."""
    if cfg.dataset in DATASETS:
        rel, url, sha, magic, kind = DATASETS[cfg.dataset]
        src, name = download(url.format(hf=hf_endpoint()), os.path.join(cfg.data_dir, rel), sha, magic), cfg.dataset
    elif not os.path.isfile(cfg.dataset):
        raise UserError(f"--dataset {cfg.dataset}: there is no such file")
    else:
        src, kind, name = cfg.dataset, cfg.tokenizer, os.path.basename(cfg.dataset)[:-4]
    with open(src, "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()  # (hashlib.file_digest needs Python 3.11)
    folder = os.path.join(cfg.out_dir, "data", f"{name}-{kind}-{sha[:12]}")
    if os.path.exists(os.path.join(folder, "meta.json")):
        with open(os.path.join(folder, "meta.json")) as f:
            return folder, json.load(f)
    if cfg.dataset in ("tinystories", "owt10k"):  # documents: each ends with <|endoftext|>, every 10th validates
        enc, parts = gpt2_encoding(), {"train": [], "val": []}
        meta = {"tokenizer": {"kind": "gpt2"}, "vocab_size": 50257}
        for n_docs, doc in enumerate(iter_documents(src), start=1):
            ids = np.array(enc.encode_ordinary(doc) + [GPT2_EOT], dtype=np.uint16)
            parts["val" if n_docs % 10 == 0 else "train"].append(ids)
            if verbose and n_docs % 1000 == 0:
                print(f"tokenizing: {n_docs:,} documents", flush=True)
        if not parts["val"]:
            raise UserError(f"{src} has {len(parts['train'])} document(s): need at least 10 for a validation split")
        meta["documents"] = n_docs
    else:  # one text: the first 90% of its characters train, the last 10% validate (nanoGPT)
        with open(src, encoding="utf-8") as f:
            text = f.read()
        chars = "".join(sorted(set(text)))  # the character vocabulary, in id order
        tokenizer = {"kind": "char", "chars": chars} if kind == "char" else {"kind": "gpt2"}
        encode, split = make_tokenizer(tokenizer)[0], int(0.9 * len(text))
        parts = {"train": [encode(text[:split])], "val": [encode(text[split:])]}
        meta = {"tokenizer": tokenizer, "vocab_size": len(chars) if kind == "char" else 50257}
    os.makedirs(folder, exist_ok=True)
    for split, docs in parts.items():
        ids = np.concatenate([np.asarray(d, dtype=np.uint16) for d in docs])
        ids.tofile(os.path.join(folder, f"{split}.bin.tmp"))
        os.replace(os.path.join(folder, f"{split}.bin.tmp"), os.path.join(folder, f"{split}.bin"))
        meta[f"{split}_tokens"] = len(ids)
    meta["source"] = src
    with open(os.path.join(folder, "meta.json.tmp"), "w") as f:
        json.dump(meta, f)
    os.replace(os.path.join(folder, "meta.json.tmp"), os.path.join(folder, "meta.json"))
    if verbose:
        print(f"prepared {name}: {meta['train_tokens']:,} train and {meta['val_tokens']:,} val tokens "
              f"({kind}, vocab {meta['vocab_size']:,}) -> {folder}")
    return folder, meta


def get_batch(folder, split, batch_size, block_size, device, generator=None):
    """nanoGPT's sampler: B random windows of T+1 tokens from the memmap; y is x shifted by one.
    The memmap is reopened on each call so its pages are not held forever (numpy keeps them)."""
    data = np.memmap(os.path.join(folder, f"{split}.bin"), dtype=np.uint16, mode="r")
    if len(data) <= block_size + 1:
        raise UserError(f"the {split} split has {len(data)} tokens: too few for --block_size {block_size}")
    ix = torch.randint(len(data) - block_size - 1, (batch_size,), generator=generator)
    window = data[ix.numpy()[:, None] + np.arange(block_size + 1)].astype(np.int64)  # (B, T+1)
    x, y = torch.from_numpy(window[:, :-1]), torch.from_numpy(window[:, 1:])  # (B, T) each
    if device.startswith("cuda"):  # pinned memory lets the copy overlap with compute
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


# --- Training -------------------------------------------------------------------------------------
def get_lr(cfg, step):
    """Linear warmup to learning_rate, then cosine decay to min_lr at lr_decay_iters (nanoGPT)."""
    if step < cfg.warmup_iters:
        return cfg.learning_rate * (step + 1) / (cfg.warmup_iters + 1)
    if step > cfg.lr_decay_iters:
        return cfg.min_lr
    ratio = (step - cfg.warmup_iters) / max(1, cfg.lr_decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.learning_rate - cfg.min_lr)


def init_model(cfg, device, meta=None, rank=0, world_size=1):
    """The model every mode starts from -> (model, optimizer, cfg, ckpt with at least its tokenizer).
    --init_from scratch: the flags' shape over the dataset's vocabulary (a large one padded to a multiple of
    64: faster matmuls); resume: out_dir/ckpt.pt's shape and weights; gpt2* or a folder: OpenAI's weights,
    cfg then recording their shape for a later resume. With the dataset's meta (train, bench) it comes with
    an optimizer, and on resume that state and the random stream restored; without, in eval mode."""
    path, training = os.path.join(cfg.out_dir, "ckpt.pt"), meta is not None
    if cfg.init_from == "scratch":
        if not training:
            raise UserError(f"--mode {cfg.mode} needs a trained model: --init_from resume, gpt2* or a folder")
        vocab = meta["vocab_size"] if meta["vocab_size"] < 1000 else (meta["vocab_size"] + 63) // 64 * 64
        model = GPT(GPTConfig(vocab_size=vocab, **{k: getattr(cfg, k) for k in (
            "block_size", "n_layer", "n_head", "n_embd", "dropout", "bias", "pos", "attn")}))
        ckpt = {"tokenizer": meta["tokenizer"]}
    elif cfg.init_from == "resume":  # the shape first; resume() below restores the training state
        ckpt = load_checkpoint(path, cfg if training else None, "train")
        if training and ckpt["tokenizer"] != meta["tokenizer"]:
            raise UserError(f"{path} was trained with another tokenizer than --dataset {cfg.dataset}")
        model = GPT(GPTConfig(**ckpt["model_args"]))
        model.load_state_dict(ckpt["model"])
    else:
        if training and meta["tokenizer"]["kind"] != "gpt2":
            raise UserError(f"--init_from {cfg.init_from} needs a GPT-2-tokenized dataset, not {cfg.dataset}")
        folder = gpt2_folder(cfg)
        try:
            model, ckpt = GPT.from_pretrained(folder, cfg.dropout), {"tokenizer": {"kind": "gpt2"}}
        except (OSError, ValueError, KeyError, RuntimeError) as e:  # RuntimeError: a tensor of the wrong size
            raise UserError(f"{folder} has no readable GPT-2 config.json + model.safetensors ({e})") from None
        if training and cfg.block_size < model.config.block_size:
            model.crop_block_size(cfg.block_size)
        cfg = dataclasses.replace(cfg, **{k: getattr(model.config, k) for k in MODEL_KEYS if k != "dataset"})
    model.to(device)
    if not training:
        return model.eval(), None, cfg, ckpt
    model.grad_ckpt = cfg.grad_ckpt
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2),
                                           device.split(":")[0], cfg.optimizer, cfg.muon_lr)
    if cfg.init_from == "resume":
        ckpt = resume(path, cfg, model, optimizer, rank, world_size, "train", ckpt)
    return model, optimizer, cfg, ckpt


@torch.no_grad()
def evaluate(model, folder, cfg, ctx, device, block_size=None, splits=("train", "val")):
    """Mean loss over eval_iters batches per split, in eval mode (no dropout). The batches come
    from their own generator, the same at every evaluation: evaluations compare like with like and
    leave the training RNG untouched (so a resumed run draws the batches it would have drawn)."""
    was_training, out = model.training, {}
    model.eval()
    for split in splits:
        gen = torch.Generator().manual_seed(cfg.seed)
        losses = torch.zeros(cfg.eval_iters)
        for k in range(cfg.eval_iters):
            X, Y = get_batch(folder, split, cfg.batch_size, block_size or cfg.block_size, device, gen)
            with ctx:
                _, loss = model(X, Y)
            losses[k] = loss.item()
        out[split] = losses.mean().item()
    model.train(was_training)
    return out


def flops_per_token(model, T):
    """Training FLOPs per token (PaLM appendix B, as in nanoGPT): 6N for the matmuls with the
    weights (2 forward, 4 backward) plus 12 L T C for attention's q k^T and att v."""
    return 6 * model.num_params() + 12 * model.config.n_layer * T * model.config.n_embd


PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12, "4090": 165e12}


def measure_peak_flops(device):
    """The MFU denominator: the GPU's stated dense bf16 peak, or on CPU a float32 matmul
    throughput measured here (1024^3 GEMMs), since CPU vendors state no single number."""
    if device.startswith("cuda"):
        return next((v for k, v in PEAK_FLOPS.items() if k in torch.cuda.get_device_name(device)), None)
    if not device.startswith("cpu"):
        return None
    gen = torch.Generator().manual_seed(0)  # not the training RNG, which a resume restores
    a, b, times = torch.randn(1024, 1024, generator=gen), torch.randn(1024, 1024, generator=gen), []
    for _ in range(6):  # the first one warms up
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * 1024 ** 3 / min(times[1:])


class Progress:
    """Progress lines every log_interval steps (loss, lr, ms/step, tokens/s, MFU, ETA) and the run's
    median speed. MFU = achieved FLOP/s / peak; the first interval (compilation, warmup) is not counted."""

    def __init__(self, cfg, model, device, world_size, start_step):
        self.cfg, self.world_size, self.start, self.times = cfg, world_size, start_step, []
        self.tokens = cfg.gradient_accumulation_steps * cfg.batch_size * cfg.block_size
        self.flops, self.peak = flops_per_token(model, cfg.block_size) * self.tokens, measure_peak_flops(device)
        print(f"{model.num_params() / 1e6:.2f}M parameters, {self.tokens:,} tokens per step, {world_size} rank(s) "
              f"on {device}" + (f", peak {self.peak / 1e9:.0f} GFLOP/s" if self.peak else ""))
        self.t_last = time.perf_counter()

    def log(self, step, loss, lr):
        now = time.perf_counter()
        dt, self.t_last = (now - self.t_last) / self.cfg.log_interval, now
        if step - self.start > self.cfg.log_interval:
            self.times.append(dt)
        mfu = f", MFU {100 * self.flops / dt / self.peak / self.world_size:.1f}%" if self.peak else ""
        print(f"step {step}: loss {loss:.4f}, lr {lr:.2e}, {1000 * dt:.1f} ms/step, {self.tokens / dt:,.0f} tok/s"
              f"{mfu}, ETA {(self.cfg.max_iters - step) * dt / 60:.1f} min")

    def summary(self):
        if not self.times:
            return {}
        ms = 1000 * float(np.median(self.times))
        out = {"median_ms_per_step": ms, "gflops_per_s": self.flops / ms * 1e3 / 1e9 / self.world_size}
        if self.peak:
            out["mfu"] = self.flops / (ms / 1e3) / self.peak / self.world_size
        print(f"median {ms:.1f} ms/step, {out['gflops_per_s']:.1f} GFLOP/s"
              + (f" = {100 * out['mfu']:.0f}% of the measured peak" if self.peak else ""))
        return out


def optimizer_step(optimizer, scaler, measure=False):
    """Step (through the GradScaler under float16) and zero the gradients. measure=True also returns
    the update-to-weight ratio ||dW|| / ||W|| of each group (decay, no_decay, muon): healthy near 1e-3."""
    before = [[p.detach().clone() for p in g["params"]] for g in optimizer.param_groups] if measure else []
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {name: (torch.stack([(p.detach() - b).norm() for p, b in zip(g["params"], old)]).norm()
                   / torch.stack([p.detach().norm() for p in g["params"]]).norm()).item()
            for name, g, old in zip(("decay", "no_decay", "muon"), optimizer.param_groups, before)}


def train(cfg) -> dict:
    rank, local_rank, world_size = setup_ddp()
    master, (device, ctx, scaler) = rank == 0, setup_device(cfg, local_rank)
    torch.manual_seed(cfg.seed + rank)
    if cfg.gradient_accumulation_steps % world_size:
        raise UserError(f"--gradient_accumulation_steps {cfg.gradient_accumulation_steps} must be a multiple "
                        f"of the number of ranks ({world_size})")
    grad_accum = cfg.gradient_accumulation_steps // world_size  # each rank does its share
    if not master:
        dist.barrier()  # rank 0 downloads and tokenizes first; the others then read its cache
    folder, meta = prepare_data(cfg, verbose=master)
    if master and world_size > 1:
        dist.barrier()
    model, optimizer, cfg, ckpt = init_model(cfg, device, meta, rank, world_size)
    resumed, ckpt_path = cfg.init_from == "resume", os.path.join(cfg.out_dir, "ckpt.pt")
    start_step, best_val = (ckpt["step"], ckpt["best_val"]) if resumed else (0, float("inf"))
    raw_model, ckpt = model, None  # free the checkpoint's memory
    if cfg.compile:
        model = torch.compile(model)
    if world_size > 1:
        ids = [local_rank] if device.startswith("cuda") else None
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    progress = Progress(cfg, raw_model, device, world_size, start_step) if master else None
    rng_state = torch.get_rng_state()  # a checkpoint resumes from the state before its next batch
    X, Y = get_batch(folder, "train", cfg.batch_size, cfg.block_size, device)
    step, last, health = start_step, {}, {}
    while True:
        lr = get_lr(cfg, step)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        # evaluate (not right after a resume: that state was evaluated before it was saved)
        if (step % cfg.eval_interval == 0 or step == cfg.max_iters) and not (resumed and step == start_step):
            losses = evaluate(model, folder, cfg, ctx, device)
            last = {"step": step, "train_loss": losses["train"], "val_loss": losses["val"], "lr": lr, **health}
            if master:
                print(f"step {step}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
                log_jsonl(cfg, last)
                if losses["val"] < best_val or cfg.always_save_checkpoint:
                    best_val = min(best_val, losses["val"])
                    if step > 0:  # model_args and tokenizer let 06_lora_rlhf.py rebuild the model on its own
                        cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
                        save_checkpoint(ckpt_path, model, optimizer, cfg, step, best_val, tokenizer=meta["tokenizer"],
                                        model_args=dataclasses.asdict(raw_model.config),
                                        rng={"torch": rng_state, "cuda": cuda_rng})
        if step >= cfg.max_iters:
            break
        for micro_step in range(grad_accum):
            if world_size > 1:  # all-reduce gradients only on the last micro-batch
                model.require_backward_grad_sync = micro_step == grad_accum - 1
            with ctx:
                _, loss = model(X, Y)
                loss = loss / grad_accum  # the sum over micro-batches is then the mean
            rng_state = torch.get_rng_state()
            X, Y = get_batch(folder, "train", cfg.batch_size, cfg.block_size, device)  # overlaps the GPU
            (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
        grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip or float("inf"))
        measure = master and ((step + 1) % cfg.eval_interval == 0 or step + 1 == cfg.max_iters)  # for the next eval
        ratios = optimizer_step(optimizer, scaler, measure)
        health = {"grad_norm": grad_norm.item(), "update_to_weight": ratios} if measure else health
        step += 1
        if master and step % cfg.log_interval == 0:
            progress.log(step, loss.item() * grad_accum, lr)  # .item() waits for the GPU: only on log steps
    result = dict(last, best_val=best_val, **(progress.summary() if master else {}))
    prints = [fingerprint(raw_model)] * world_size
    if world_size > 1:
        dist.all_gather_object(prints, fingerprint(raw_model))
    if master:
        log_jsonl(cfg, {"final": True, **result, "fingerprints": prints})
        print_samples(raw_model, meta["tokenizer"], cfg, device, ctx)
    if world_size > 1:
        dist.barrier()
        dist.destroy_process_group()
    return result


# --- Evaluation / inference -----------------------------------------------------------------------
def print_samples(model, tokenizer, cfg, device, ctx):
    """num_samples continuations of --prompt (FILE:path reads it from a file)."""
    prompt = cfg.prompt
    if prompt.startswith("FILE:"):
        try:
            with open(prompt[5:], encoding="utf-8") as f:
                prompt = f.read()
        except OSError as e:
            raise UserError(f"--prompt {cfg.prompt}: {e.strerror}") from None
    encode, decode = make_tokenizer(tokenizer)
    idx = torch.tensor([encode(prompt) or [0]] * cfg.num_samples, dtype=torch.long, device=device)  # (B, T0)
    model.eval()
    with ctx:
        out = model.generate(idx, cfg.max_new_tokens, cfg.temperature, cfg.top_k or None, cfg.top_p)
    for row in out.tolist():
        print(f"--- sample ---\n{decode(row)}")


def trained_model(cfg, data=True):
    """The start of the modes after training -> (model in eval mode, tokenizer meta, device, autocast
    ctx, prepared data folder, checked to be tokenized as the model expects, or None)."""
    device, ctx, _ = setup_device(cfg)
    model, _, _, ckpt = init_model(cfg, device)
    folder, meta = prepare_data(cfg) if data else (None, None)
    if data and meta["tokenizer"] != ckpt["tokenizer"]:
        raise UserError(f"--dataset {cfg.dataset} is not tokenized as the model is ({ckpt['tokenizer']['kind']})")
    return model, ckpt["tokenizer"], device, ctx, folder


def run_sample(cfg):
    model, tokenizer, device, ctx, _ = trained_model(cfg, data=False)
    if cfg.quantize == "int8":
        quantize_int8(model)
    torch.manual_seed(cfg.seed)
    print_samples(model, tokenizer, cfg, device, ctx)


def run_eval(cfg):
    """Val loss on evaluate's fixed batches, and with --quantize int8 the same batches after quantizing."""
    model, _, device, ctx, folder = trained_model(cfg)
    loss = evaluate(model, folder, cfg, ctx, device, splits=("val",))["val"]
    print(f"val loss {loss:.4f} over {cfg.eval_iters} batches of {cfg.batch_size}x{cfg.block_size}")
    if cfg.quantize == "none":
        return {"val_loss": loss}
    before, after = quantize_int8(model)
    q_loss = evaluate(model, folder, cfg, ctx, device, splits=("val",))["val"]
    print(f"int8: Linear weights {before / 1e6:.3f} MB -> {after / 1e6:.3f} MB ({before / after:.2f}x smaller), "
          f"val loss {q_loss:.4f} ({100 * (q_loss - loss) / loss:+.3f}%)")
    return {"val_loss": loss, "int8_val_loss": q_loss, "bytes_before": before, "bytes_after": after}


def run_extrapolate(cfg):
    """Val loss at 1x, 2x and 4x the training context (Press et al. 2022, §4): learned positions
    stop at block_size; RoPE and ALiBi run on. Also the loss per position at 4x, plotted."""
    model, _, device, ctx, folder = trained_model(cfg)
    T, pos = model.config.block_size, model.config.pos
    result = {"pos": pos, "block_size": T}
    print(f"pos={pos}, trained at block_size {T}\n  context  val loss")
    for factor in (1, 2, 4):
        if pos == "learned" and factor > 1:
            result[f"{factor}x"] = None
            print(f"  {factor}x {factor * T:>5}  n/a (no learned position past {T})")
        else:
            result[f"{factor}x"] = evaluate(model, folder, cfg, ctx, device, factor * T, splits=("val",))["val"]
            print(f"  {factor}x {factor * T:>5}  {result[f'{factor}x']:.4f}")
    with open(os.path.join(cfg.out_dir, "extrapolate.json"), "w") as f:
        json.dump(result, f)
    T_long = T if pos == "learned" else 4 * T  # the loss at each position, over the longest context it takes
    gen, per_pos = torch.Generator().manual_seed(cfg.seed), torch.zeros(T_long)
    with torch.no_grad():
        for _ in range(cfg.eval_iters):
            X, Y = get_batch(folder, "val", cfg.batch_size, T_long, device, gen)
            with ctx:
                logits, _ = model(X, Y)
            per_pos += F.cross_entropy(logits.float().transpose(1, 2), Y, reduction="none").mean(0).cpu()
    save_plot(cfg, "extrapolate.png", [(range(T_long), (per_pos / cfg.eval_iters).tolist(), {})], "token position",
              f"val loss (pos={pos})", f"trained at {T} (dashed)", vline=T)
    return result


def run_landscape(cfg):
    """Loss along theta + alpha d for a random direction d, filter-normalized (Li et al. 2018, §4):
    each row of each weight matrix of d is rescaled to the norm of the same row of theta; biases and
    LayerNorm gains get no perturbation. A sharp valley rises fast, a flat one slowly."""
    model, _, device, ctx, folder = trained_model(cfg)
    torch.manual_seed(cfg.seed)
    theta, direction = {n: p.detach().clone() for n, p in model.named_parameters()}, {}
    for n, p in theta.items():
        d = torch.randn_like(p) if p.dim() >= 2 else torch.zeros_like(p)
        if p.dim() >= 2:  # (rows, cols): one "filter" per row
            d *= p.norm(dim=1, keepdim=True) / (d.norm(dim=1, keepdim=True) + 1e-10)
        direction[n] = d
    alphas, losses = [i / 10 for i in range(-10, 11)], []
    for alpha in alphas:
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(theta[n] + alpha * direction[n])
        losses.append(evaluate(model, folder, cfg, ctx, device, splits=("val",))["val"])
        print(f"alpha {alpha:+.1f}: val loss {losses[-1]:.4f}")
    save_plot(cfg, "landscape.png", [(alphas, losses, {})], "alpha (step along the direction)", "val loss",
              "1-D loss slice, filter-normalized direction")
    return {"alphas": alphas, "losses": losses}


def run_compare(cfg):
    """Finished runs (--runs=DIR,DIR,...) on one axis: train and val loss against steps from each log.jsonl
    (compare_loss.png) and, when every run has an extrapolate.json, val loss against context length
    (compare_extrapolate.png). The legend names the flags in which the runs differ, the title the others.
    -> {legend label: the run's evaluations}"""
    dirs, logs = cfg.runs.split(","), []
    base = dataclasses.asdict(Config(**PRESETS[DEFAULT_PRESET]))  # flags equal to these were not given
    # a field newer than a checkpoint has its default
    configs = [{**base, **load_checkpoint(os.path.join(d, "ckpt.pt"), stage="train")["config"]} for d in dirs]
    for d in dirs:
        with open(os.path.join(d, "log.jsonl")) as f:
            evals = [r for r in map(json.loads, f) if "val_loss" in r and not r.get("final")]
        start = max((i for i, r in enumerate(evals) if r["step"] == 0), default=0)  # the last run from scratch
        logs.append(evals[start:])
    keys = [k for k in base if k not in ("out_dir", "data_dir") and any(c[k] != base[k] for c in configs)]
    varying = [k for k in keys if len({str(c[k]) for c in configs}) > 1]
    labels = [" ".join(f"--{k}={c[k]}" for k in varying) or d for c, d in zip(configs, dirs)]
    title = f"python {SCRIPT_NAME}.py" + "".join(f" --{k}={configs[0][k]}" for k in keys if k not in varying)
    lines = []
    for i, (label, evals) in enumerate(zip(labels, logs)):
        steps = [r["step"] for r in evals]
        print(f"{label}: val loss {evals[-1]['val_loss']:.4f} at step {steps[-1]}")
        lines += [(steps, [r["val_loss"] for r in evals], dict(color=f"C{i}", marker=".", label=f"{label}: val")),
                  (steps, [r["train_loss"] for r in evals], dict(color=f"C{i}", ls="--", label=f"{label}: train"))]
    save_plot(cfg, "compare_loss.png", lines, "step (optimizer updates)", "loss (nats per token)",
              f"{title} + the legend's flags")
    paths, curves = [os.path.join(d, "extrapolate.json") for d in dirs], dict(zip(labels, logs))
    if not all(map(os.path.exists, paths)):
        print("(compare_extrapolate.png needs --init_from=resume --mode=extrapolate in every run)")
        return curves
    lines = []
    for label, path in zip(labels, paths):
        with open(path) as f:
            r = json.load(f)
        ks = [k for k in (1, 2, 4) if r[f"{k}x"] is not None]  # learned positions stop at 1x
        stops = " (no position past the training length)" if len(ks) == 1 else ""
        lines.append(([k * r["block_size"] for k in ks], [r[f"{k}x"] for k in ks],
                      dict(marker="o", label=label + stops)))
    save_plot(cfg, "compare_extrapolate.png", lines, "context length (tokens)", "val loss (nats per token)",
              f"{title} + the legend's flags,\nthen --init_from=resume --mode=extrapolate (dashed: training length)",
              vline=r["block_size"], xticks=sorted({x for line in lines for x in line[0]}))
    return curves


def save_plot(cfg, name, lines, xlabel, ylabel, title, vline=None, **axes):
    """Lines [(x, y, matplotlib style)] on one axis to out_dir/name, 900 px wide (skipped, with a note,
    without matplotlib); `axes` go to ax.set (xticks=...)."""
    if (plt := pyplot(name)) is None:
        return
    fig, ax = plt.subplots(figsize=(9, 5))
    for x, y, style in lines:
        ax.plot(list(x), y, **style)
    if vline is not None:
        ax.axvline(vline, linestyle="--", color="gray")
    ax.set(xlabel=xlabel, ylabel=ylabel, **axes)
    ax.set_title(title, fontsize=10)
    if any("label" in style for *_, style in lines):
        ax.legend()
    save_png(fig, os.path.join(cfg.out_dir, name))


def run_bench(cfg):
    """Training speed (ms/step, tokens/s, achieved FLOP/s, MFU) on real batches with a fresh model
    of the configured shape, the activation memory kept for backward, and generation tokens/s
    with and without the KV cache (batch 1, max_new_tokens from a one-token prompt)."""
    device, ctx, _ = setup_device(cfg)
    folder, meta = prepare_data(cfg)
    torch.manual_seed(cfg.seed)
    model, optimizer, _, _ = init_model(dataclasses.replace(cfg, init_from="scratch"), device, meta)
    fwd, cuda = torch.compile(model) if cfg.compile else model, device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    saved, weights = {}, {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t):  # the bytes of each storage autograd keeps for backward, weights excluded
        if t.untyped_storage().data_ptr() not in weights:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    times = []
    for i in range(25):  # 5 warmup steps, then 20 timed
        X, Y = get_batch(folder, "train", cfg.batch_size, cfg.block_size, device)
        sync()
        t0 = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t) if i == 0 else nullcontext(), ctx:
            _, loss = fwd(X, Y)
        loss.backward()
        optimizer_step(optimizer, None)
        sync()
        times.append(time.perf_counter() - t0)
    activation_mb = sum(saved.values()) / 1e6
    if cfg.grad_ckpt:  # checkpoints hold each block's float32 input outside autograd's saved tensors
        activation_mb += cfg.n_layer * cfg.batch_size * cfg.block_size * cfg.n_embd * 4 / 1e6
    ms, tokens = 1000 * float(np.median(times[5:])), cfg.batch_size * cfg.block_size
    achieved, peak = flops_per_token(model, cfg.block_size) * tokens / (ms / 1e3), measure_peak_flops(device)
    mfu = f", MFU {100 * achieved / peak:.1f}% of {peak / 1e9:.0f} GFLOP/s" if peak else ""
    print(f"train: {ms:.1f} ms/step (median of 20), {tokens / ms * 1e3:,.0f} tokens/s, "
          f"{achieved / 1e9:.1f} GFLOP/s{mfu}; activations kept for backward {activation_mb:.1f} MB"
          + (f", peak CUDA memory {torch.cuda.max_memory_allocated(device) / 1e6:.0f} MB" if cuda else ""))
    result = {"ms_per_step": ms, "tokens_per_s": tokens / ms * 1e3, "flops_per_s": achieved,
              "mfu": achieved / peak if peak else None, "activation_mb": activation_mb}
    model.eval()
    for kind in ("uncached", "cached"):
        torch.manual_seed(cfg.seed)
        sync()
        t0 = time.perf_counter()
        with ctx:
            model.generate(torch.zeros(1, 1, dtype=torch.long, device=device), cfg.max_new_tokens, cfg.temperature,
                           use_cache=kind == "cached")
        sync()
        result[f"gen_tokens_per_s_{kind}"] = cfg.max_new_tokens / (time.perf_counter() - t0)
    print(f"generate {cfg.max_new_tokens} tokens at block_size {cfg.block_size}: "
          f"{result['gen_tokens_per_s_uncached']:.3g} tok/s uncached, {result['gen_tokens_per_s_cached']:.3g} tok/s "
          f"with the KV cache ({result['gen_tokens_per_s_cached'] / result['gen_tokens_per_s_uncached']:.1f}x)")
    return result


# --- main -----------------------------------------------------------------------------------------
def main(argv=None):
    return run_cli({"train": train, "sample": run_sample, "eval": run_eval, "bench": run_bench,
                    "extrapolate": run_extrapolate, "landscape": run_landscape, "compare": run_compare}, argv)


# --- Plumbing: the same in every script ----------------------------------------------------------
# Flags, devices, DDP, downloads, checkpoints, logs: byte-identical in all seven scripts (a test
# compares them), so read it once. What differs per script comes from the constants beside Config
# (SCRIPT_NAME, PRESETS, DEFAULT_PRESET, RULES, MODEL_KEYS) and from its check_config(cfg).
class UserError(Exception):
    """A problem the user can fix (missing data, a foreign checkpoint): one `error:` line, exit 1."""


def parse_args(argv=None) -> Config:
    """`--preset NAME` (then PRESETS["NAME/<mode>"] if there is one), then `--field=value` or
    `--field value` for any Config field, then RULES and check_config. A bad flag or value exits
    with status 2 and names the flag; --help lists every field with its default and comment."""
    argv, fields = list(sys.argv[1:] if argv is None else argv), {f.name: f for f in dataclasses.fields(Config)}
    presets, bools = [p for p in PRESETS if "/" not in p], {"1": True, "true": True, "0": False, "false": False}

    def fail(msg):
        if os.environ.get("RANK", "0") == "0":  # torchrun gives every rank the same flags: say it once
            print(f"{SCRIPT_NAME}.py: error: {msg}\n(run with --help to list every flag)", file=sys.stderr)
        sys.exit(2)

    if "-h" in argv or "--help" in argv:
        helps = dict(re.findall(r"^\s+(\w+):[^#\n]*#\s*(.*)$", inspect.getsource(Config), flags=re.M))
        print(f"usage: python {SCRIPT_NAME}.py [--preset {'|'.join(presets)}] [--field=value ...]")
        for name, f in {"preset": dataclasses.field(default=DEFAULT_PRESET), **fields}.items():
            print(f"  --{name}={f.default!s}".ljust(36) + helps.get(name, "overrides applied before the flags"))
        sys.exit(0)
    overrides, i = {}, 0
    while i < len(argv):
        name, eq, value = argv[i][2:].partition("=")
        if not argv[i].startswith("--") or (name not in fields and name != "preset"):
            fail(f"unknown flag {argv[i]}" if argv[i].startswith("--") else f"unexpected argument {argv[i]!r}")
        kind = fields[name].type if name in fields else str
        if not eq:  # `--name value`, or a bare boolean flag meaning true
            bare = kind is bool and (i + 1 == len(argv) or argv[i + 1].startswith("--"))
            if not bare and i + 1 == len(argv):
                fail(f"--{name} needs a value")
            value, i = ("true", i) if bare else (argv[i + 1], i + 1)
        i += 1
        try:
            overrides[name] = bools[value.lower()] if kind is bool else kind(value)
        except (KeyError, ValueError):
            fail(f"--{name} expects {kind.__name__}, got {value!r}")
    preset = overrides.pop("preset", DEFAULT_PRESET)
    if preset not in presets:
        fail(f"unknown preset {preset!r} (choose from {', '.join(presets)})")
    mode = overrides.get("mode", PRESETS[preset].get("mode", Config.mode))
    cfg = Config(**{**PRESETS[preset], **PRESETS.get(f"{preset}/{mode}", {}), **overrides})
    bounds = {"> 0": lambda v: v > 0, ">= 0": lambda v: v >= 0, "in [0, 1)": lambda v: 0 <= v < 1}
    for name, rule in RULES.items():  # a tuple lists the allowed values; a string bounds a number
        value, choices = getattr(cfg, name), isinstance(rule, tuple)
        if not (value in rule if choices else math.isfinite(value) and bounds[rule](value)):
            fail(f"--{name} must be {'one of ' + ', '.join(map(str, rule)) if choices else rule}, not {value!r}")
    try:
        check_config(cfg)  # the rules that tie several flags together
    except ValueError as e:
        fail(str(e))
    return cfg


def run_cli(modes, argv=None):
    """Parse the flags, check --device and --out_dir before any work, run modes[cfg.mode](cfg).
    A UserError ends the run with its message on one line and exit status 1, not a traceback."""
    cfg = parse_args(argv)
    try:
        cuda = ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
        have = ["cpu"] + cuda + ["mps"] * torch.backends.mps.is_available()
        if cfg.device != "auto" and cfg.device not in have:
            raise UserError(f"--device {cfg.device} is not available here; this machine has: auto, {', '.join(have)}")
        try:
            os.makedirs(cfg.out_dir, exist_ok=True)
            tempfile.TemporaryFile(dir=cfg.out_dir).close()
        except OSError as e:
            raise UserError(f"--out_dir {cfg.out_dir} is not a folder this user can write ({e.strerror})") from None
        return modes[cfg.mode](cfg)
    except UserError as e:
        print(f"{SCRIPT_NAME}.py: error: {e}", file=sys.stderr)
        sys.exit(1)


def setup_ddp():
    """DDP when launched by torchrun (RANK set): -> (rank, local_rank, world_size). nccl on CUDA,
    gloo on CPU. Rank 0 alone logs, downloads and saves."""
    if "RANK" not in os.environ:
        return 0, 0, 1
    dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    return dist.get_rank(), int(os.environ["LOCAL_RANK"]), dist.get_world_size()


def setup_device(cfg, local_rank=0):
    """-> (device, autocast context, GradScaler or None). cuda > mps > cpu unless --device says
    otherwise. dtype `auto` picks bfloat16 where the GPU runs it natively, else float16 with a
    GradScaler (it scales the loss up so small float16 gradients do not underflow), else float32."""
    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    device, dtype = f"cuda:{local_rank}" if device == "cuda" else device, cfg.dtype
    device_type = device.split(":")[0]
    if dtype == "auto":  # CPUs without AMX run bfloat16 matmuls slower than float32
        dtype = "float32" if device_type != "cuda" else "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    ctx = nullcontext() if dtype == "float32" else torch.autocast(device_type, dtype=getattr(torch, dtype))
    return device, ctx, torch.amp.GradScaler(device_type) if dtype == "float16" else None


def download(url, path, sha256=None, magic=None, headers=None):
    """Fetch `url` to `path` unless it is there, through `path + ".part"` and a rename after a check
    (the sha256 if pinned, else the first bytes: `magic`, and never a proxy's HTML page), so a cut,
    corrupt or wrong download never leaves a file that looks complete."""
    if os.path.exists(path):
        return path
    import requests  # only needed when something is actually downloaded

    tmp, hint, head = path + ".part", f"download it by hand from {url} and save it as {path}", b""
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with requests.get(url, stream=True, timeout=30, headers=headers) as r, open(tmp, "wb") as f:
            r.raise_for_status()
            total, digest = int(r.headers.get("content-length", 0)), hashlib.sha256()
            for chunk in r.iter_content(chunk_size=1 << 20):
                f.write(chunk)
                digest.update(chunk)
                head = head or chunk[:64]
                pct = f" {100 * f.tell() / total:5.1f}%" if total else ""
                print(f"\rdownloading {os.path.basename(path)}: {f.tell() / 1e6:.1f} MB{pct}", end="", flush=True)
        print()
    except (requests.RequestException, OSError) as e:  # OSError: a read-only or full data_dir
        if os.path.exists(tmp):
            os.remove(tmp)
        raise UserError(f"could not download {url} ({e.__class__.__name__}: {e}). If this machine is "
                        f"offline, {hint} (or point --data_dir / LLM_DATA_DIR at a folder that has it).") from None
    wrong = (f"sha256 {digest.hexdigest()}, expected {sha256}" if sha256 and digest.hexdigest() != sha256 else
             f"it does not start with {magic!r}" if magic and not head.startswith(magic) else
             "it is an HTML page" if head.lstrip().lower().startswith((b"<!doctype html", b"<html")) else None)
    if wrong:
        os.remove(tmp)
        raise UserError(f"{url} did not send the expected file ({wrong}); run again, or {hint}")
    os.replace(tmp, path)
    return path


def unwrap(model):
    """The plain nn.Module inside DDP(...) and torch.compile(...) wrappers, in any order."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = model.module if hasattr(model, "module") else model._orig_mod
    return model


def save_checkpoint(path, model, optimizer, cfg, step, best_val, stage=None, **extra):
    """Write {script, stage, model, optimizer, config, step, best_val, rng, **extra} (model and
    optimizer may be None; extra may replace rng) to a temporary file, then rename it: a crash never
    destroys the last checkpoint."""
    weights = None if model is None else unwrap(model).state_dict()
    rng = {"torch": torch.get_rng_state(),
           "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    torch.save({"script": SCRIPT_NAME, "stage": stage or cfg.mode, "model": weights,
                "optimizer": None if optimizer is None else optimizer.state_dict(), "config": dataclasses.asdict(cfg),
                "step": step, "best_val": best_val, "rng": rng, **extra}, path + ".tmp")
    os.replace(path + ".tmp", path)


def load_checkpoint(path, cfg=None, stage=None, script=SCRIPT_NAME, keys=MODEL_KEYS):
    """torch.load with weights_only=True (a pickle cannot run code), refusing a checkpoint that is
    missing, truncated, from another script or stage, or of another shape than `cfg` on `keys`."""
    if not os.path.exists(path):
        raise UserError(f"no checkpoint at {path} (train first, or check --out_dir)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, a pickle with code in it, another format
        raise UserError(f"{path} is not a checkpoint this script can read ({e.__class__.__name__})") from None
    if not isinstance(ckpt, dict) or ckpt.get("script") != script or (stage and ckpt.get("stage") != stage):
        got = f"{ckpt.get('script')} {ckpt.get('stage')}" if isinstance(ckpt, dict) else type(ckpt).__name__
        raise UserError(f"{path} is not a {script}.py {stage + ' ' if stage else ''}checkpoint (it is: {got})")
    diff = [f"{k}={ckpt['config'].get(k)!r} (flags say {getattr(cfg, k)!r})"
            for k in keys if cfg is not None and ckpt["config"].get(k) != getattr(cfg, k)]
    if diff:
        raise UserError(f"{path} was trained with another model config: {', '.join(diff)}")
    return ckpt


def resume(path, cfg, model, optimizer, rank=0, world_size=1, stage=None, ckpt=None):
    """Continue a run from its checkpoint: weights, optimizer state and the random stream, exactly
    with one rank (same batches, same dropout masks); several ranks cannot share one saved stream,
    so they get fresh ones that still differ by rank. `ckpt`: the checkpoint when the caller has
    already read (and checked) it, so a large file is not read twice. -> the checkpoint."""
    ckpt = ckpt or load_checkpoint(path, cfg, stage)
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if world_size > 1:
        torch.manual_seed(cfg.seed + rank + 7919 * ckpt["step"])
    else:
        torch.set_rng_state(ckpt["rng"]["torch"])
        if ckpt["rng"]["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
    return ckpt


def fingerprint(model):
    """16 hex digits of sha256 over every parameter: equal on DDP ranks iff their weights are."""
    digest = hashlib.sha256()
    for p in model.parameters():
        digest.update(p.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def log_jsonl(cfg, record):
    """Append one JSON object (an evaluation) to out_dir/log.jsonl."""
    with open(os.path.join(cfg.out_dir, "log.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")


def pyplot(what):
    """matplotlib.pyplot, drawing to files only (Agg), or None after a one-line hint saying what is
    not drawn: matplotlib stays optional, imported only where a figure is made."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"(matplotlib is not installed: pip install matplotlib to get {what})")
        return None
    return plt


def save_png(fig, path, dpi=100):
    """Lay out, write and close a figure; written to a temporary name first, then renamed, so a
    crash never leaves half a picture."""
    import matplotlib.pyplot as plt  # already imported by pyplot()
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=dpi)
    plt.close(fig)
    os.replace(path + ".tmp.png", path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
