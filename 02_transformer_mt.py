"""Stage 2: the Transformer, built from its equations and trained to translate German to English.

You will learn: scaled dot-product and multi-head attention written out; the encoder-decoder with
cross-attention; padding and causal masks; four ways to tell the model where a token is (sinusoidal,
learned, relative bias, RoPE); post- vs pre-LayerNorm; greedy and beam search with a KV cache; a
byte-level BPE learned from scratch; token-budget batching; label smoothing and the inverse-square-root
warmup; BLEU computed exactly as sacreBLEU does; and what attention heads look at.

Run it:
    python 02_transformer_mt.py                                   # CPU quick run (the `cpu` preset)
    python 02_transformer_mt.py --preset gpu                      # one GPU
    torchrun --standalone --nproc_per_node=8 02_transformer_mt.py --preset gpu --gradient_accumulation_steps=8
    python 02_transformer_mt.py --mode translate --text "Ein Mann fährt Fahrrad."
    python 02_transformer_mt.py --mode attention --text "Ein Hund läuft im Schnee."   # PNG heatmaps
    python 02_transformer_mt.py --mode sweep --max_iters 750     # heads x width grid -> sweep.md
    python 02_transformer_mt.py --help                            # every flag, its default and meaning

Expected result (README.md has the table): the `cpu` preset reaches test BLEU ~33 on Multi30k
test2016 (cased sacreBLEU, beam 4) in under half an hour on a 2-core CPU; out_dir/bleu.png draws
val loss and val BLEU at every evaluation.

Notation (Vaswani et al. 2017): B batch, S source length, T target length, C = d_model, nh heads,
hd = d_k = d_v = C // nh, F = d_ff, V vocabulary, N = n_layer. Masks are boolean, True = may attend.

References: Vaswani et al. 2017, "Attention Is All You Need" (arXiv:1706.03762); Shaw et al. 2018,
relative position representations (arXiv:1803.02155); Raffel et al. 2020, T5 (arXiv:1910.10683);
Su et al. 2021, RoPE (arXiv:2104.09864); Xiong et al. 2020, pre-LN (arXiv:2002.04745); Sennrich et
al. 2016, BPE (arXiv:1508.07909); Wu et al. 2016, GNMT length penalty (arXiv:1609.08144); Post 2018,
sacreBLEU (arXiv:1804.08771); Elliott et al. 2016, Multi30k (arXiv:1605.00459). The tests compare
against F.scaled_dot_product_attention, nn.MultiheadAttention and sacreBLEU's known answers.
"""
import dataclasses
import gzip
import hashlib
import heapq
import inspect
import json
import math
import os
import random
import re
import sys
import tempfile
import time
from collections import Counter, defaultdict
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

# --- Config ---------------------------------------------------------------------------------------
SCRIPT_NAME = "02_transformer_mt"  # the file's stem: default out_dir is out/<SCRIPT_NAME>


@dataclass
class Config:
    # I/O
    out_dir: str = f"out/{SCRIPT_NAME}"  # checkpoints, log.jsonl, BPE cache, PNGs, sweep.md
    data_dir: str = os.environ.get("LLM_DATA_DIR", "data")  # raw downloads; read, never modified
    init_from: str = "scratch"  # scratch | resume
    mode: str = "train"  # train | translate | attention | bleu (test set from a checkpoint) | sweep
    dataset: str = "multi30k"  # multi30k | tsv:PATH (one `source<TAB>target` pair per line)
    src_lang: str = "de"  # Multi30k source language (de, en, fr, cs: the file suffix)
    tgt_lang: str = "en"  # Multi30k target language
    vocab_size: int = 8000  # joint byte-level BPE vocabulary: 3 specials + 256 bytes + merges
    text: str = "Ein Mann fährt Fahrrad."  # the sentence for --mode translate / attention
    # model
    n_layer: int = 3  # encoder layers = decoder layers (N)
    d_model: int = 256  # model width C
    n_head: int = 4  # attention heads nh (d_model must divide by it)
    d_ff: int = 1024  # inner width F of the position-wise feed-forward network
    dropout: float = 0.1  # residual, embedding and attention-weight dropout (paper §5.4)
    norm: str = "post"  # post (paper: LayerNorm(x + Sublayer(x))) | pre (x + Sublayer(LayerNorm(x)))
    pos: str = "sinusoidal"  # sinusoidal | learned | relative | rope
    max_rel_dist: int = 16  # --pos relative: distances beyond +-K share one learned bias
    block_size: int = 256  # longest sentence in tokens (longer training pairs are skipped)
    # training
    max_tokens: int = 2048  # token budget of a micro-batch: sentences x longest side, padding included
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step, over all ranks together
    max_iters: int = 1250  # optimizer steps (~5 epochs of Multi30k at the default budget)
    learning_rate: float = 1e-3  # peak learning rate, reached at step warmup_iters
    warmup_iters: int = 400  # linear warmup, then lr ~ 1/sqrt(step) (paper eq. 3)
    label_smoothing: float = 0.1  # epsilon_ls (paper §5.4)
    grad_clip: float = 1.0  # clip the gradient norm at this value (0 = off)
    eval_interval: int = 250  # steps between evaluations (val loss, val BLEU) and checkpoints
    log_interval: int = 50  # steps between progress lines
    always_save_checkpoint: bool = False  # save at every eval, not only on a new best val loss
    # decoding
    beam_size: int = 4  # beam width (1 = greedy)
    length_penalty: float = 0.6  # GNMT alpha: score / ((5 + len) / 6) ** alpha
    sweep_heads: str = "1,4,8"  # --mode sweep: comma-separated n_head values
    sweep_d_model: str = "128,256"  # --mode sweep: comma-separated d_model values (d_ff = 4 d_model)
    # system
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16 (autocast; float16 uses a GradScaler)
    compile: bool = False  # torch.compile the model
    seed: int = 1337  # base seed; rank r uses seed + r


PRESETS = {
    "tiny": dict(vocab_size=512, n_layer=1, d_model=32, n_head=2, d_ff=64, max_tokens=512, max_iters=20,
                 warmup_iters=5, eval_interval=10, log_interval=5, block_size=128, beam_size=2),  # tests
    "cpu": dict(),  # the default: a 2-core CPU in under half an hour
    "gpu": dict(n_layer=6, d_model=512, n_head=8, d_ff=2048, max_tokens=8192, max_iters=12000, learning_rate=7e-4,
                warmup_iters=4000, eval_interval=1000, log_interval=100, beam_size=5, compile=True),  # paper's base
}
DEFAULT_PRESET = "cpu"
# Fields that define the model's shape: a checkpoint whose values differ cannot be loaded.
MODEL_KEYS = ("vocab_size", "n_layer", "d_model", "n_head", "d_ff", "norm", "pos", "max_rel_dist", "block_size")
LANGS = ("de", "en", "fr", "cs")  # the languages of Multi30k task 1
RULES = {  # parse_args checks these: a tuple lists the allowed values, a string bounds a number
    "mode": ("train", "translate", "attention", "bleu", "sweep"), "init_from": ("scratch", "resume"),
    "src_lang": LANGS, "tgt_lang": LANGS, "dtype": ("auto", "float32", "bfloat16", "float16"),
    "norm": ("post", "pre"), "pos": ("sinusoidal", "learned", "relative", "rope"),
    "dropout": "in [0, 1)", "label_smoothing": "in [0, 1)",
    **dict.fromkeys(("n_layer", "d_model", "n_head", "d_ff", "block_size", "max_tokens", "learning_rate",
                     "warmup_iters", "gradient_accumulation_steps", "eval_interval", "log_interval"), "> 0"),
    "beam_size": "> 0", **dict.fromkeys(("max_rel_dist", "max_iters", "grad_clip", "length_penalty"), ">= 0"),
}


def check_config(cfg):
    """The rules that tie flags together; parse_args turns the ValueError into one line and exit 2."""
    if cfg.vocab_size < N_SPECIAL + 256:
        raise ValueError(f"--vocab_size must be at least {N_SPECIAL + 256} (specials + bytes), not {cfg.vocab_size}")
    if cfg.max_tokens < cfg.block_size:
        raise ValueError(f"--max_tokens={cfg.max_tokens} must be at least --block_size={cfg.block_size}")
    if cfg.dataset != "multi30k" and not cfg.dataset.startswith("tsv:"):
        raise ValueError(f"--dataset must be multi30k or tsv:PATH, not {cfg.dataset!r}")
    heads, width = ("--sweep_heads", "--sweep_d_model") if cfg.mode == "sweep" else ("--n_head", "--d_model")
    for n_head, d_model in sweep_grid(cfg) if cfg.mode == "sweep" else [(cfg.n_head, cfg.d_model)]:
        if d_model % n_head:
            raise ValueError(f"{width}={d_model} is not divisible by {heads}={n_head}")
        if cfg.pos == "rope" and d_model // n_head % 2 or cfg.pos == "sinusoidal" and d_model % 2:
            raise ValueError(f"--pos={cfg.pos} needs an even {'d_model / n_head' if cfg.pos == 'rope' else 'd_model'}"
                             f" ({width}={d_model}, {heads}={n_head})")


def sweep_grid(cfg):
    """--sweep_heads x --sweep_d_model -> [(n_head, d_model), ...]."""
    try:
        grid = [(int(h), int(d)) for d in cfg.sweep_d_model.split(",") for h in cfg.sweep_heads.split(",")]
    except ValueError:
        grid = []
    if not grid or min(min(pair) for pair in grid) <= 0:
        raise ValueError("--sweep_heads and --sweep_d_model must be comma-separated positive integers")
    return grid


# --- Milestone: the Transformer (Vaswani et al. 2017) ---------------------------------------------
PAD, BOS, EOS = 0, 1, 2  # special token ids; the tokenizer's 256 bytes and its merges come after them
N_SPECIAL = 3


def scaled_dot_product_attention(q, k, v, mask=None, dropout_p=0.0):
    """Attention(Q, K, V) = softmax(Q K^T / sqrt(d_k)) V   (paper eq. 1).
    q (..., Tq, hd), k and v (..., Tk, hd). `mask` broadcasts to (..., Tq, Tk): boolean (True = may
    attend; False -> -inf before the softmax, so weight exactly 0) or float (added to the logits,
    e.g. a relative-position bias), as in F.scaled_dot_product_attention. The 1/sqrt(d_k) keeps the
    logits' variance at 1 when q and k have unit-variance entries, so the softmax does not saturate.
    -> (output (..., Tq, hd), attention weights (..., Tq, Tk))."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))  # (..., Tq, Tk)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    # the softmax runs in (at least) float32 even under bfloat16/float16 autocast
    weights = torch.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(q.dtype)
    if dropout_p > 0:
        weights = F.dropout(weights, dropout_p)
    return weights @ v, weights  # (..., Tq, hd)


def rope(x, pos, base=10000.0):
    """Rotary position embedding (Su et al. 2021, eq. 34): rotate the pair (x_i, x_{i+hd/2}) by the
    angle pos * base^(-2i/hd). A rotation by angle(m) for q and angle(n) for k makes q.k depend on
    the positions only through m - n. x (B, nh, T, hd), pos (T,)."""
    half = x.size(-1) // 2
    freqs = base ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)  # (hd/2,)
    angles = pos.float()[:, None] * freqs[None, :]  # (T, hd/2)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)  # (B, nh, T, hd)


def sinusoidal_encoding(n_pos, d_model):
    """PE(pos, 2i) = sin(pos / 10000^(2i/C)), PE(pos, 2i+1) = cos(...)   (paper §3.5).
    PE(p) . PE(p + k) = sum_i cos(k w_i) depends only on the offset k. -> (n_pos, C)."""
    pos = torch.arange(n_pos, dtype=torch.float32)[:, None]  # (P, 1)
    inv_freq = 10000.0 ** (-torch.arange(0, d_model, 2, dtype=torch.float32) / d_model)  # (C/2,)
    pe = torch.zeros(n_pos, d_model)
    pe[:, 0::2] = torch.sin(pos * inv_freq)
    pe[:, 1::2] = torch.cos(pos * inv_freq)
    return pe


class RelativePositionBias(nn.Module):
    """A learned scalar b_h(clip(j - i, -K, K)) per head, added to the logit of query i and key j.
    This is Shaw et al. 2018's relative key term (§3.2, a_ij^K clipped at distance K) reduced to one
    scalar per head and distance, which is what T5 (§2.1) does, without T5's log-spaced buckets. One
    table is shared by all layers of a stack, as in T5."""

    def __init__(self, n_head, max_distance):
        super().__init__()
        self.max_distance = max_distance
        self.bias = nn.Embedding(2 * max_distance + 1, n_head)
        nn.init.zeros_(self.bias.weight)

    def forward(self, q_pos, k_pos):
        rel = (k_pos[None, :] - q_pos[:, None]).clamp(-self.max_distance, self.max_distance)  # (Tq, Tk)
        return self.bias(rel + self.max_distance).permute(2, 0, 1)  # (nh, Tq, Tk)


class MultiHeadAttention(nn.Module):
    """MultiHead(Q, K, V) = Concat(head_1..head_h) W^O, head_i = Attention(Q W_i^Q, K W_i^K, V W_i^V)
    (paper §3.2.2). Self-attention when `context` is None, else cross-attention over `context`.
    `cache` (a dict, decoding only) keeps keys/values between steps: self-attention appends this
    step's, cross-attention projects the context once. Set `record_weights = True` to keep the last
    attention map in `.attn_weights` (B, nh, Tq, Tk) for plotting."""

    def __init__(self, d_model, n_head, dropout=0.0):
        super().__init__()
        if d_model % n_head:
            raise ValueError(f"d_model={d_model} is not divisible by n_head={n_head}")
        self.n_head, self.dropout = n_head, dropout
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d_model, d_model) for _ in range(4))
        self.record_weights, self.attn_weights = False, None

    def _heads(self, x):
        B, T, C = x.shape
        return x.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hd)

    def forward(self, x, context=None, mask=None, rope_pos=None, cache=None):
        B, T, C = x.shape
        q = self._heads(self.q_proj(x))  # (B, nh, T, hd)
        if context is None:
            k, v = self._heads(self.k_proj(x)), self._heads(self.v_proj(x))  # (B, nh, T, hd)
            if rope_pos is not None:
                q, k = rope(q, rope_pos), rope(k, rope_pos)
            if cache is not None:
                if "k" in cache:
                    k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)  # (B, nh, t+T, hd)
                cache["k"], cache["v"] = k, v
        elif cache is not None and "k" in cache:
            k, v = cache["k"], cache["v"]
        else:
            k, v = self._heads(self.k_proj(context)), self._heads(self.v_proj(context))  # (B, nh, S, hd)
            if cache is not None:
                cache["k"], cache["v"] = k, v
        y, weights = scaled_dot_product_attention(q, k, v, mask, self.dropout if self.training else 0.0)
        if self.record_weights:
            self.attn_weights = weights.detach()
        y = y.transpose(1, 2).reshape(B, T, C)  # merge heads: (B, T, C)
        return self.out_proj(y)


class FeedForward(nn.Module):
    """FFN(x) = max(0, x W1 + b1) W2 + b2, applied to every position alone (paper eq. 2)."""

    def __init__(self, d_model, d_ff):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d_model, d_ff), nn.Linear(d_ff, d_model)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))  # (B, T, C)


class Residual(nn.Module):
    """One sublayer wrapped in dropout, a residual connection and LayerNorm (paper §3.1, §5.4).
    post: LayerNorm(x + Dropout(f(x))), the paper's; pre: x + Dropout(f(LayerNorm(x))), which keeps
    an identity path from input to output and trains without a careful warmup (Xiong et al. 2020)."""

    def __init__(self, d_model, dropout, norm):
        super().__init__()
        self.ln, self.drop, self.pre = nn.LayerNorm(d_model), nn.Dropout(dropout), norm == "pre"

    def forward(self, x, f):
        return x + self.drop(f(self.ln(x))) if self.pre else self.ln(x + self.drop(f(x)))


class EncoderLayer(nn.Module):
    def __init__(self, d_model, n_head, d_ff, dropout, norm):
        super().__init__()
        self.self_attn = MultiHeadAttention(d_model, n_head, dropout)
        self.ffn = FeedForward(d_model, d_ff)
        self.res1, self.res2 = Residual(d_model, dropout, norm), Residual(d_model, dropout, norm)

    def forward(self, x, mask, rope_pos=None):
        x = self.res1(x, lambda h: self.self_attn(h, mask=mask, rope_pos=rope_pos))
        return self.res2(x, self.ffn)  # (B, S, C)


class DecoderLayer(nn.Module):
    """Masked self-attention, then cross-attention whose queries come from the decoder and whose
    keys and values are the encoder output ("memory"), then the FFN (paper §3.1)."""

    def __init__(self, d_model, n_head, d_ff, dropout, norm):
        super().__init__()
        self.self_attn = MultiHeadAttention(d_model, n_head, dropout)
        self.cross_attn = MultiHeadAttention(d_model, n_head, dropout)
        self.ffn = FeedForward(d_model, d_ff)
        self.res1, self.res2, self.res3 = (Residual(d_model, dropout, norm) for _ in range(3))

    def forward(self, x, memory, self_mask, src_mask, rope_pos=None, cache=None):
        x = self.res1(x, lambda h: self.self_attn(h, mask=self_mask, rope_pos=rope_pos,
                                                  cache=None if cache is None else cache["self"]))
        x = self.res2(x, lambda h: self.cross_attn(h, context=memory, mask=src_mask,
                                                   cache=None if cache is None else cache["cross"]))
        return self.res3(x, self.ffn)  # (B, T, C)


def _with_bias(mask, bias):
    """Fold a boolean mask (B, 1, Tq|1, Tk) into a float relative-position bias (nh, Tq, Tk)."""
    if bias is None:
        return mask
    return bias if mask is None else bias.masked_fill(~mask, float("-inf"))  # (B, nh, Tq, Tk)


class Transformer(nn.Module):
    """The encoder-decoder of Vaswani et al. 2017, with one embedding matrix shared by the source,
    the target and the output projection (§3.4; possible because the BPE vocabulary is joint)."""

    def __init__(self, vocab_size, d_model=256, n_head=4, n_layer=3, d_ff=1024, dropout=0.1, norm="post",
                 pos="sinusoidal", max_rel_dist=16, block_size=256):
        super().__init__()
        if norm not in ("post", "pre") or pos not in ("sinusoidal", "learned", "relative", "rope"):
            raise ValueError(f"norm must be post or pre (got {norm!r}), pos sinusoidal, learned, relative or rope "
                             f"(got {pos!r})")
        self.d_model, self.pos, self.block_size = d_model, pos, block_size
        self.embed = nn.Embedding(vocab_size, d_model)
        nn.init.normal_(self.embed.weight, std=d_model ** -0.5)  # x sqrt(C) below -> unit variance
        if pos == "sinusoidal":
            self.register_buffer("pe", sinusoidal_encoding(block_size, d_model), persistent=False)
        elif pos == "learned":
            self.pe = nn.Parameter(torch.randn(block_size, d_model) * 0.02)
        elif pos == "relative":
            self.enc_rel = RelativePositionBias(n_head, max_rel_dist)
            self.dec_rel = RelativePositionBias(n_head, max_rel_dist)
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.ModuleList(EncoderLayer(d_model, n_head, d_ff, dropout, norm) for _ in range(n_layer))
        self.decoder = nn.ModuleList(DecoderLayer(d_model, n_head, d_ff, dropout, norm) for _ in range(n_layer))
        # pre-LN leaves the residual stream unnormalized: one final LayerNorm per stack
        self.enc_ln = nn.LayerNorm(d_model) if norm == "pre" else nn.Identity()
        self.dec_ln = nn.LayerNorm(d_model) if norm == "pre" else nn.Identity()
        for name, p in self.named_parameters():
            if p.dim() == 2 and "embed" not in name and name != "pe" and "rel" not in name:
                nn.init.xavier_uniform_(p)  # as the reference tensor2tensor code

    def _embed(self, tokens, start=0):
        """Token embedding x sqrt(C) (§3.4) plus, for sinusoidal/learned, the encoding of positions
        start..start+T-1 (relative and rope act inside attention instead)."""
        T = tokens.size(1)
        if start + T > self.block_size:
            raise ValueError(f"a sentence of {start + T} tokens is longer than block_size={self.block_size}")
        x = self.embed(tokens) * math.sqrt(self.d_model)  # (B, T, C)
        if self.pos in ("sinusoidal", "learned"):
            x = x + self.pe[start:start + T]  # (B, T, C)
        return self.drop(x)

    def encode(self, src):
        """src (B, S) -> memory (B, S, C), src_mask (B, 1, 1, S): pad keys get no attention."""
        pos = torch.arange(src.size(1), device=src.device)
        src_mask = (src != PAD)[:, None, None, :]  # (B, 1, 1, S)
        self_mask = _with_bias(src_mask, self.enc_rel(pos, pos) if self.pos == "relative" else None)
        x = self._embed(src)
        for layer in self.encoder:
            x = layer(x, self_mask, pos if self.pos == "rope" else None)
        return self.enc_ln(x), src_mask

    def decode(self, tgt, memory, src_mask, cache=None, start=0):
        """tgt (B, T) at positions start..start+T-1 -> logits (B, T, V). Query i may attend to target
        keys j <= i (causal: the model cannot peek at the word it must predict) that are not padding.
        With `cache` (from new_cache) earlier positions' keys/values are reused, so a decoding step
        costs one position instead of the whole prefix."""
        T = tgt.size(1)
        q_pos = torch.arange(start, start + T, device=tgt.device)
        k_pos = torch.arange(start + T, device=tgt.device)
        self_mask = (k_pos[None, :] <= q_pos[:, None])[None, None]  # (1, 1, T, start+T)
        if cache is None:
            self_mask = self_mask & (tgt != PAD)[:, None, None, :]  # (B, 1, T, T)
        self_mask = _with_bias(self_mask, self.dec_rel(q_pos, k_pos) if self.pos == "relative" else None)
        x = self._embed(tgt, start)
        for i, layer in enumerate(self.decoder):
            x = layer(x, memory, self_mask, src_mask, q_pos if self.pos == "rope" else None,
                      None if cache is None else cache[i])
        return self.dec_ln(x) @ self.embed.weight.t()  # (B, T, V): the output layer is the embedding

    def new_cache(self):
        return [{"self": {}, "cross": {}} for _ in self.decoder]

    def forward(self, src, tgt_in):
        memory, src_mask = self.encode(src)
        return self.decode(tgt_in, memory, src_mask)  # (B, T, V)


# --- Milestone: decoding, greedy and beam search with a KV cache ----------------------------------
@torch.no_grad()
def greedy_decode(model, src, max_len):
    """Pick the most probable next token at every step. src (B, S) -> (B, <= max_len) tokens after
    bos, eos included; rows that finished early are padded."""
    memory, src_mask = model.encode(src)
    cache, B = model.new_cache(), src.size(0)
    tokens = torch.full((B, 1), BOS, dtype=torch.long, device=src.device)
    done = torch.zeros(B, dtype=torch.bool, device=src.device)
    for t in range(max_len):
        logits = model.decode(tokens[:, -1:], memory, src_mask, cache, start=t)[:, -1]  # (B, V)
        nxt = logits.argmax(-1).masked_fill(done, PAD)  # (B,)
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)
        done |= nxt == EOS
        if done.all():
            break
    return tokens[:, 1:]


@torch.no_grad()
def beam_search(model, src, max_len, beam_size=4, alpha=0.6):
    """Keep the `beam_size` best prefixes per sentence, all sentences in one batch of B*K rows.
    Prefixes compete on their summed log-probability; a finished one stays in the beam (it can only
    add eos at no cost) until all have finished; the winner maximizes the GNMT score
    log P / lp(len), lp = ((5 + len) / 6)^alpha (Wu et al. 2016 §7), so longer outputs are not
    unfairly penalized. beam_size=1 is greedy. src (B, S) -> (B, <= max_len) tokens after bos."""
    B, K = src.size(0), beam_size
    memory, src_mask = model.encode(src)
    memory, src_mask = memory.repeat_interleave(K, 0), src_mask.repeat_interleave(K, 0)  # (B*K, S, C)
    cache = model.new_cache()
    tokens = torch.full((B * K, 1), BOS, dtype=torch.long, device=src.device)
    scores = torch.zeros(B, K, device=src.device)
    scores[:, 1:] = float("-inf")  # at the start all K beams are the same: expand only the first
    lengths = torch.zeros(B * K, device=src.device)
    done = torch.zeros(B * K, dtype=torch.bool, device=src.device)
    for t in range(max_len):
        logits = model.decode(tokens[:, -1:], memory, src_mask, cache, start=t)[:, -1]  # (B*K, V)
        logp = torch.log_softmax(logits.float(), dim=-1)  # (B*K, V)
        V = logp.size(-1)
        logp[done] = float("-inf")
        logp[done, PAD] = 0.0  # a finished prefix continues only with padding, at no cost
        cand = (scores.view(B * K, 1) + logp).view(B, K * V)  # (B, K*V)
        scores, flat = cand.topk(K, dim=-1)  # (B, K)
        rows = (torch.arange(B, device=src.device)[:, None] * K + flat // V).view(-1)  # (B*K,) parent rows
        nxt = (flat % V).view(-1)  # (B*K,)
        tokens = torch.cat([tokens[rows], nxt[:, None]], dim=1)
        done, lengths = done[rows], lengths[rows] + (~done[rows]).float()
        done = done | (nxt == EOS)
        for layer_cache in cache:  # the self-attention keys/values follow their prefixes
            layer_cache["self"]["k"] = layer_cache["self"]["k"][rows]
            layer_cache["self"]["v"] = layer_cache["self"]["v"][rows]
        if done.all():
            break
    final = scores.view(-1) / ((5 + lengths) / 6) ** alpha  # (B*K,)
    best = final.view(B, K).argmax(-1) + torch.arange(B, device=src.device) * K  # (B,)
    return tokens[best, 1:]


# --- Milestone: byte-level BPE (Sennrich et al. 2016) ---------------------------------------------
# On UTF-8 bytes, as GPT-2 does: the 256 bytes are the base alphabet, so every string encodes and
# decode(encode(s)) == s exactly. Text is first cut into chunks (a word with its leading space, a
# digit run, a punctuation run, whitespace) that merges never cross. Ids: 0 pad, 1 bos, 2 eos,
# 3..258 the bytes, then one id per learned merge.
PRETOKENIZE = re.compile(r" ?[^\W\d_]+| ?\d+| ?[^\s\w]+| ?_+|\s+(?!\S)|\s+")


def _merge(ids, pair, new_id):
    """Replace every occurrence of `pair` in `ids` by `new_id`, left to right."""
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and ids[i] == pair[0] and ids[i + 1] == pair[1]:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def train_bpe(texts, vocab_size):
    """Learn merges until the vocabulary has `vocab_size` ids (or no pair occurs twice).
    Pair counts are updated incrementally, touching only the chunks that contain the merged pair,
    and a heap with lazy deletion finds the most frequent pair: seconds for Multi30k, not minutes."""
    n_merges = vocab_size - N_SPECIAL - 256
    if n_merges < 0:
        raise ValueError(f"vocab_size must be at least {N_SPECIAL + 256} (specials + bytes), not {vocab_size}")
    chunk_counts = Counter(c for t in texts for c in PRETOKENIZE.findall(t))
    words = [[b + N_SPECIAL for b in c.encode("utf-8")] for c in chunk_counts]
    freqs = list(chunk_counts.values())
    pair_counts, where = Counter(), defaultdict(set)
    for i, w in enumerate(words):
        for p in zip(w, w[1:]):
            pair_counts[p] += freqs[i]
            where[p].add(i)
    heap = [(-c, p) for p, c in pair_counts.items()]
    heapq.heapify(heap)
    merges = []
    while len(merges) < n_merges and heap:
        neg_count, pair = heapq.heappop(heap)
        if pair_counts.get(pair, 0) != -neg_count:
            continue  # a stale heap entry: the pair's count changed since it was pushed
        if -neg_count < 2:
            break
        new_id = N_SPECIAL + 256 + len(merges)
        merges.append(pair)
        touched = set()
        for i in where.pop(pair):
            w, f = words[i], freqs[i]
            for p in zip(w, w[1:]):
                pair_counts[p] -= f
                touched.add(p)
            w = words[i] = _merge(w, pair, new_id)
            for p in zip(w, w[1:]):
                pair_counts[p] += f
                where[p].add(i)
                touched.add(p)
        del pair_counts[pair]
        for p in touched - {pair}:
            if pair_counts[p] > 0:
                heapq.heappush(heap, (-pair_counts[p], p))
    return merges


class BPETokenizer:
    def __init__(self, merges):
        self.merges = [tuple(m) for m in merges]
        self.ranks = {m: r for r, m in enumerate(self.merges)}
        self.vocab = [b""] * N_SPECIAL + [bytes([b]) for b in range(256)]  # id -> bytes
        for a, b in self.merges:
            self.vocab.append(self.vocab[a] + self.vocab[b])
        self.cache = {}

    def _encode_chunk(self, chunk):
        ids = [b + N_SPECIAL for b in chunk.encode("utf-8")]
        while len(ids) >= 2:  # apply the earliest-learned merge first, as in training
            pair = min(zip(ids, ids[1:]), key=lambda p: self.ranks.get(p, math.inf))
            if pair not in self.ranks:
                break
            ids = _merge(ids, pair, N_SPECIAL + 256 + self.ranks[pair])
        return ids

    def encode(self, text):
        ids = []
        for chunk in PRETOKENIZE.findall(text):
            if chunk not in self.cache:
                self.cache[chunk] = self._encode_chunk(chunk)
            ids.extend(self.cache[chunk])
        return ids

    def decode(self, ids):
        """Specials, and ids beyond the merges learned (a corpus too small for --vocab_size), are
        dropped; a byte sequence cut mid-character (possible in model output) decodes with U+FFFD."""
        known = (self.vocab[i] for i in ids if N_SPECIAL <= i < len(self.vocab))
        return b"".join(known).decode("utf-8", errors="replace")


# --- Data -----------------------------------------------------------------------------------------
MULTI30K_URL = "https://raw.githubusercontent.com/multi30k/dataset/master/data/task1/raw/{name}.gz"
MULTI30K_SPLITS = {"train": "train", "val": "val", "test": "test_2016_flickr"}
MULTI30K_SHA256 = {  # of the .gz files (shared/data/MANIFEST.md); other languages are not pinned
    "train.de": "726e39b2fa9eb9ffb6dc763fb35a179f80fae06ffc5d28b6ace5faa883de28a6",
    "train.en": "d79cfa999dd4c51d2cb42499b6796d5a882c3a8a961923c25a898c90f8bbd56f",
    "val.de": "f0cba2f995189cf5770f29a8a9a537a3ad3f51657ad873405082ff6863a5e75a",
    "val.en": "14f7d25ddd868909a9213e361768460edcacdd6ab9d1e77b92560dc10c10dc28",
    "test_2016_flickr.de": "9204244e408ccb38d2a55cfcd344df15005fc42a07a6e55ca6c52b6ababb8cc8",
    "test_2016_flickr.en": "611d361c6334bc7246101d48097c13cf5c4413c5befc793cc629934359d532d9",
}


def load_multi30k(cfg):
    """-> {"train"|"val"|"test": (source sentences, target sentences)}, raw and untokenized."""
    corpus = {}
    for split, name in MULTI30K_SPLITS.items():
        sides = []
        for lang in (cfg.src_lang, cfg.tgt_lang):
            path = os.path.join(cfg.data_dir, "multi30k", f"{name}.{lang}.gz")
            download(MULTI30K_URL.format(name=f"{name}.{lang}"), path, MULTI30K_SHA256.get(f"{name}.{lang}"),
                     magic=b"\x1f\x8b")  # gzip: an unpinned file is checked by its first bytes
            with gzip.open(path, "rt", encoding="utf-8") as f:
                sides.append(f.read().split("\n")[:-1])  # one sentence per line, final newline
        if len(sides[0]) != len(sides[1]):
            raise UserError(f"multi30k {name}: {len(sides[0])} {cfg.src_lang} lines, {len(sides[1])} {cfg.tgt_lang}")
        corpus[split] = tuple(sides)
    return corpus


def load_tsv(path):
    """A `source<TAB>target` file -> train/val/test, holding out min(1000, 5%) pairs each for val and
    test by a fixed shuffle (the same split on every run and every rank)."""
    if not os.path.isfile(path):
        raise UserError(f"--dataset tsv:{path}: there is no such file")
    pairs = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            fields = line.rstrip("\n").split("\t")
            if len(fields) != 2 or not fields[0].strip() or not fields[1].strip():
                raise UserError(f"{path}, line {lineno}: expected `source<TAB>target`, got {line.rstrip()[:60]!r}")
            pairs.append(fields)
    if len(pairs) < 3:
        raise UserError(f"{path} has {len(pairs)} pairs; at least 3 are needed (train, val, test)")
    random.Random(0).shuffle(pairs)
    n_held = max(1, min(1000, len(pairs) // 20))
    parts = {"val": pairs[:n_held], "test": pairs[n_held:2 * n_held], "train": pairs[2 * n_held:]}
    return {k: ([p[0] for p in v], [p[1] for p in v]) for k, v in parts.items()}


def load_corpus(cfg):
    return load_multi30k(cfg) if cfg.dataset == "multi30k" else load_tsv(cfg.dataset[len("tsv:"):])


def prepare_data(cfg, rank=0, world_size=1):
    """Raw corpus -> tokenizer + token ids. The BPE is learned on the joint training text (both
    languages, so source, target and output can share one embedding, paper §3.4), cached in out_dir
    under a key of the data and the settings, and learned by rank 0 alone."""
    corpus = load_corpus(cfg) if rank == 0 or cfg.dataset != "multi30k" else None
    if world_size > 1:
        dist.barrier()  # rank 0 has downloaded what was missing
    corpus = corpus or load_corpus(cfg)
    train_text = corpus["train"][0] + corpus["train"][1]
    key = hashlib.sha256("\n".join(train_text).encode() + f"|bpe-v1|{cfg.vocab_size}".encode()).hexdigest()[:16]
    path = os.path.join(cfg.out_dir, f"bpe_{key}.json")
    if rank == 0 and not os.path.exists(path):
        t0 = time.time()
        merges = train_bpe(train_text, cfg.vocab_size)
        with open(path + ".tmp", "w") as f:
            json.dump(merges, f)
        os.replace(path + ".tmp", path)
        print(f"learned {len(merges)} BPE merges in {time.time() - t0:.1f}s -> {path}")
    if world_size > 1:
        dist.barrier()
    with open(path) as f:
        tok = BPETokenizer(json.load(f))
    ids = {split: tuple([tok.encode(s) for s in side] for side in sides) for split, sides in corpus.items()}
    return dict(tok=tok, raw=corpus, ids=ids)


def make_batches(src_lens, tgt_lens, max_tokens, rng=None, world_size=1):
    """Length-bucketed dynamic batching: sort by length (randomly among equal lengths), then cut the
    sorted list into batches whose padded size, sentences x longest side, stays within `max_tokens`.
    Every example is in exactly one batch. The batch order is shuffled when `rng` is given. With
    several ranks the largest batches are halved until the count divides evenly, so every rank takes
    the same number of steps (batches[rank::world_size]) and still sees a disjoint share."""
    order = list(range(len(src_lens)))
    if rng is not None:
        rng.shuffle(order)
    order.sort(key=lambda i: (src_lens[i], tgt_lens[i]))  # stable: ties stay shuffled
    batches, cur, cur_max = [], [], 0
    for i in order:
        longest = max(cur_max, src_lens[i], tgt_lens[i])
        if cur and longest * (len(cur) + 1) > max_tokens:
            batches.append(cur)
            cur, longest = [], max(src_lens[i], tgt_lens[i])
        cur.append(i)
        cur_max = longest
    if cur:
        batches.append(cur)
    if rng is not None:
        rng.shuffle(batches)
    while len(batches) % world_size:
        j = max(range(len(batches)), key=lambda b: len(batches[b]))
        if len(batches[j]) < 2:
            raise UserError(f"{len(src_lens)} examples cannot be shared among {world_size} ranks")
        half = len(batches[j]) // 2
        batches[j:j + 1] = [batches[j][:half], batches[j][half:]]
    return batches


def padding_fraction(batches, src_lens, tgt_lens):
    """Fraction of the source+target tensor cells that are padding."""
    real = padded = 0
    for b in batches:
        real += sum(src_lens[i] + tgt_lens[i] for i in b)
        padded += len(b) * (max(src_lens[i] for i in b) + max(tgt_lens[i] for i in b))
    return 1 - real / padded


def fit_block(ids, block_size):
    """Keep the pairs whose source + eos and bos + target both fit in block_size tokens."""
    keep = [i for i, (s, t) in enumerate(zip(*ids)) if max(len(s), len(t)) + 1 <= block_size]
    if not keep:
        raise UserError(f"no sentence pair of the split fits in --block_size={block_size} tokens")
    return [ids[0][i] for i in keep], [ids[1][i] for i in keep]


def training_pairs(data, cfg, verbose=True):
    """-> the training pairs that fit and their lengths with eos / bos; prints how many were skipped
    and how much padding the token-budget batches save over random batches of the same count."""
    src_ids, tgt_ids = fit_block(data["ids"]["train"], cfg.block_size)
    lens = [len(s) + 1 for s in src_ids], [len(t) + 1 for t in tgt_ids]  # + eos / + bos
    if verbose:
        if n_long := len(data["ids"]["train"][0]) - len(src_ids):
            print(f"skipping {n_long} training pairs longer than --block_size={cfg.block_size}")
        dyn = make_batches(*lens, cfg.max_tokens, random.Random(cfg.seed))
        fixed_size = max(1, round(len(src_ids) / len(dyn)))  # same number of batches, random order
        order = list(range(len(src_ids)))
        random.Random(cfg.seed).shuffle(order)
        fixed = [order[i:i + fixed_size] for i in range(0, len(order), fixed_size)]
        print(f"{len(src_ids)} training pairs, {len(dyn)} batches/epoch; padding: token-budget batches "
              f"{padding_fraction(dyn, *lens):.1%}, random batches of {fixed_size} "
              f"{padding_fraction(fixed, *lens):.1%}")
    return src_ids, tgt_ids, lens


def collate(src_ids, tgt_ids, idx, device):
    """-> src (B, S) = tokens + eos; tgt_in (B, T) = bos + tokens; tgt_out (B, T) = tokens + eos."""
    def pad(seqs):
        out = torch.full((len(seqs), max(map(len, seqs))), PAD, dtype=torch.long)
        for r, s in enumerate(seqs):
            out[r, :len(s)] = torch.tensor(s)
        return out.to(device)
    src = pad([src_ids[i] + [EOS] for i in idx])
    return src, pad([[BOS] + tgt_ids[i] for i in idx]), pad([tgt_ids[i] + [EOS] for i in idx])


def iterate_batches(lens, cfg, rank, world_size, skip=0):
    """Endless (epoch, batch indices) for this rank; epoch e's batches depend only on seed and e, so
    a resumed run skips the `skip` micro-batches already seen and continues with the same data."""
    epoch = 0
    while True:
        batches = make_batches(*lens, cfg.max_tokens, random.Random(cfg.seed + epoch), world_size)[rank::world_size]
        for b in batches[skip:]:
            yield epoch, b
        skip = max(0, skip - len(batches))
        epoch += 1


# --- Training -------------------------------------------------------------------------------------
def get_lr(cfg, step):
    """lrate = d^-0.5 min(step^-0.5, step warmup^-1.5)   (paper eq. 3), rescaled so that the peak,
    at step = warmup_iters, is --learning_rate (the paper's C=512, warmup 4000 peak at 7e-4)."""
    step = max(step, 1)
    return cfg.learning_rate * min(step / cfg.warmup_iters, math.sqrt(cfg.warmup_iters / step))


def init_model(cfg, device, rank=0, world_size=1):
    """The Transformer of the flags on `device` and its Adam (paper §5.3). --mode train starts from
    scratch or, with --init_from=resume, continues out_dir/ckpt.pt exactly (weights, optimizer,
    random stream); the other modes load the trained weights from it. -> (model, optimizer, ckpt)."""
    model = Transformer(cfg.vocab_size, cfg.d_model, cfg.n_head, cfg.n_layer, cfg.d_ff, cfg.dropout, cfg.norm,
                        cfg.pos, cfg.max_rel_dist, cfg.block_size).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.learning_rate, betas=(0.9, 0.98), eps=1e-9)
    path, ckpt = os.path.join(cfg.out_dir, "ckpt.pt"), None
    if cfg.mode != "train":
        ckpt = load_checkpoint(path, cfg, stage="train")
        model.load_state_dict(ckpt["model"])
        model.eval()
    elif cfg.init_from == "resume":
        ckpt = resume(path, cfg, model, optimizer, rank, world_size, stage="train")
        if rank == 0:
            print(f"resumed from {path} at step {ckpt['step']}")
    return model, optimizer, ckpt


def train(cfg, data=None) -> dict:
    """Train; at step 0 and every eval_interval log val loss and val BLEU (bleu.png draws them), then
    score the test split once. `data` (from prepare_data) lets --mode sweep tokenize once for every run."""
    rank, local_rank, world_size = setup_ddp()
    master = rank == 0
    if cfg.gradient_accumulation_steps % world_size:
        raise UserError(f"--gradient_accumulation_steps={cfg.gradient_accumulation_steps} counts micro-batches "
                        f"over all ranks: make it a multiple of the {world_size} ranks")
    grad_accum = cfg.gradient_accumulation_steps // world_size  # micro-batches on this rank
    device, ctx, scaler = setup_device(cfg, local_rank)
    scaler = scaler or torch.amp.GradScaler(enabled=False)  # disabled: scale(), step() pass through
    torch.manual_seed(cfg.seed + rank)
    data = data or prepare_data(cfg, rank, world_size)
    src_ids, tgt_ids, lens = training_pairs(data, cfg, verbose=master)
    model, optimizer, ckpt = init_model(cfg, device, rank, world_size)
    step, best_val = (ckpt["step"], ckpt["best_val"]) if ckpt else (0, float("inf"))
    evaluated = step if 0 < step < cfg.max_iters else None  # a checkpoint's step was evaluated and logged
    raw_model, ckpt_path = model, os.path.join(cfg.out_dir, "ckpt.pt")
    if cfg.compile:
        model = torch.compile(model)
    if world_size > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if "cuda" in device else None)
    n_params = sum(p.numel() for p in raw_model.parameters())
    if master:
        print(f"model: {n_params / 1e6:.2f}M parameters, {cfg.n_layer}+{cfg.n_layer} layers, d_model {cfg.d_model}, "
              f"{cfg.n_head} heads, {cfg.norm}-LN, {cfg.pos} positions")
    batches = iterate_batches(lens, cfg, rank, world_size, skip=step * grad_accum)
    t0 = t_start = time.time()
    n_tok, loss_sum, last_log = 0, 0.0, step
    model.train()
    while True:
        # Evaluate before the step: a run from scratch logs step 0 too. Only rank 0 decodes for BLEU (the
        # others wait at the next all-reduce). No random numbers are drawn: training is the same without it.
        if (step % cfg.eval_interval == 0 or step == cfg.max_iters) and step != evaluated:
            t_eval = time.time()
            val = evaluate(raw_model, data, cfg, device, ctx, ("val_loss", "val_bleu") if master else ("val_loss",))
            val_loss = val["val_loss"]
            if master:
                print(f"step {step}: val loss {val_loss:.4f} | val BLEU {val['val_bleu']:.2f}")
                log_jsonl(cfg, dict(step=step, time=time.time() - t_start, **val))
                if step > 0 and (val_loss < best_val or cfg.always_save_checkpoint):
                    best_val = min(best_val, val_loss)
                    save_checkpoint(ckpt_path, raw_model, optimizer, cfg, step, best_val,
                                    bpe_merges=[list(m) for m in data["tok"].merges])
            t0 += time.time() - t_eval  # ms/step counts training only
        if step >= cfg.max_iters:
            break
        lr = get_lr(cfg, step + 1)
        for group in optimizer.param_groups:
            group["lr"] = lr
        for micro_step in range(grad_accum):
            epoch, b = next(batches)
            src, tgt_in, tgt_out = collate(src_ids, tgt_ids, b, device)
            if world_size > 1:  # all-reduce the gradients once, on the last micro-batch
                model.require_backward_grad_sync = micro_step == grad_accum - 1
            with ctx:
                logits = model(src, tgt_in)  # (B, T, V)
                # label smoothing (§5.4): the target distribution puts 1 - eps on the right token
                loss = F.cross_entropy(logits.float().flatten(0, 1), tgt_out.flatten(), ignore_index=PAD,
                                       label_smoothing=cfg.label_smoothing) / grad_accum
            scaler.scale(loss).backward()
            loss_sum, n_tok = loss_sum + loss.item(), n_tok + (tgt_out != PAD).sum().item()
        scaler.unscale_(optimizer)
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if master and (step % cfg.log_interval == 0 or step == cfg.max_iters):
            dt, n_steps = time.time() - t0, step - last_log
            print(f"step {step:5d} | epoch {epoch} | loss {loss_sum / n_steps:.4f} | lr {lr:.2e} | "
                  f"{n_tok * world_size / dt:,.0f} tgt tok/s | {1000 * dt / n_steps:.0f} ms/step")
            t0, n_tok, loss_sum, last_log = time.time(), 0, 0.0, step
    metrics = dict(step=step, val_loss=val_loss, train_time=time.time() - t_start, params=n_params)
    if world_size > 1:
        print(f"rank {rank}: final weights fingerprint {fingerprint(raw_model)}")  # the same on every rank
    if master:
        metrics.update(evaluate(raw_model, data, cfg, device, ctx, metrics=("test_bleu",)))
        print(f"test BLEU {metrics['test_bleu']:.2f} (sacreBLEU-equal: 13a, cased, detokenized; beam "
              f"{cfg.beam_size}, length penalty {cfg.length_penalty}) | train {metrics['train_time']:.0f}s "
              f"(with evaluations), decode {metrics['test_decode_time']:.0f}s")
        log_jsonl(cfg, dict(step=step, test_bleu=metrics["test_bleu"], beam_size=cfg.beam_size,
                            length_penalty=cfg.length_penalty))
        plot_bleu(cfg)
    if world_size > 1:
        dist.barrier()
        dist.destroy_process_group()
    return metrics


# --- Evaluation / inference -----------------------------------------------------------------------
@torch.no_grad()
def evaluate(model, data, cfg, device, ctx, metrics=("val_loss",)):
    """-> {"val_loss": mean cross-entropy per target token over the val pairs that fit, without label
    smoothing} and, when asked, {"val_bleu", "val_decode_time"} and {"test_bleu", "test_decode_time"}:
    that split translated with the configured search and scored against its references."""
    was_training, out = model.training, {}
    model.eval()
    if "val_loss" in metrics:
        src_ids, tgt_ids = fit_block(data["ids"]["val"], cfg.block_size)
        total = count = 0
        for b in make_batches([len(s) + 1 for s in src_ids], [len(t) + 1 for t in tgt_ids], cfg.max_tokens):
            src, tgt_in, tgt_out = collate(src_ids, tgt_ids, b, device)
            with ctx:
                logits = model(src, tgt_in)
            total += F.cross_entropy(logits.float().flatten(0, 1), tgt_out.flatten(), ignore_index=PAD,
                                     reduction="sum").item()
            count += (tgt_out != PAD).sum().item()
        out["val_loss"] = total / count
    for split in ("val", "test"):
        if f"{split}_bleu" in metrics:
            t0, (sources, references) = time.time(), data["raw"][split]
            hyps = translate_corpus(model, data["tok"], sources, cfg, device, ctx)
            out.update({f"{split}_bleu": corpus_bleu(hyps, references), f"{split}_decode_time": time.time() - t0})
    model.train(was_training)
    return out


def translate_corpus(model, tok, sentences, cfg, device, ctx):
    """Raw source sentences -> detokenized translations, decoded in length-sorted batches."""
    src_ids = [tok.encode(s)[:cfg.block_size - 1] for s in sentences]
    lens = [len(s) + 1 for s in src_ids]
    out = [None] * len(src_ids)
    for idx in make_batches(lens, lens, max(cfg.block_size, cfg.max_tokens // cfg.beam_size)):
        src, _, _ = collate(src_ids, src_ids, idx, device)
        max_len = min(cfg.block_size, int(1.5 * src.size(1)) + 10)
        with ctx:
            hyp = beam_search(model, src, max_len, cfg.beam_size, cfg.length_penalty) if cfg.beam_size > 1 else \
                greedy_decode(model, src, max_len)
        for i, row in zip(idx, hyp.tolist()):
            out[i] = tok.decode(row[:row.index(EOS)] if EOS in row else row)
    return out


def load_trained(cfg):
    """-> (model, tokenizer, device, ctx) from out_dir/ckpt.pt, for the modes after training."""
    device, ctx, _ = setup_device(cfg)
    model, _, ckpt = init_model(cfg, device)
    return model, BPETokenizer(ckpt["bpe_merges"]), device, ctx


def translate_text(cfg):
    """--mode translate: print the translation of --text."""
    model, tok, device, ctx = load_trained(cfg)
    print(translate_corpus(model, tok, [cfg.text], cfg, device, ctx)[0])


def score_bleu(cfg):
    """--mode bleu: translate the test split with the checkpoint and score it."""
    model, tok, device, ctx = load_trained(cfg)
    bleu = evaluate(model, dict(tok=tok, raw=load_corpus(cfg)), cfg, device, ctx, metrics=("test_bleu",))["test_bleu"]
    print(f"test BLEU {bleu:.2f} (beam {cfg.beam_size}, length penalty {cfg.length_penalty})")


def plot_bleu(cfg):
    """out_dir/bleu.png, from log.jsonl: this run's val loss and val BLEU at each evaluation and its
    test BLEU (a star at the last step), the picture of the numbers the training prints. Skipped, with
    a hint, without matplotlib; `--init_from=resume` on a finished run draws it again. -> the evaluations
    drawn (one per step)."""
    with open(os.path.join(cfg.out_dir, "log.jsonl")) as f:
        records = [json.loads(line) for line in f]
    evals = [r for r in records if "val_bleu" in r]
    evals = evals[max((i for i, r in enumerate(evals) if r["step"] == 0), default=0):]  # the last run from scratch
    evals = sorted({r["step"]: r for r in evals}.values(), key=lambda r: r["step"])  # a resumed step: its last record
    test = [r for r in records if "test_bleu" in r][-1]
    if (plt := pyplot("bleu.png")) is None:
        return evals
    steps, bleus = [r["step"] for r in evals], [r["val_bleu"] for r in evals]
    fig, ax = plt.subplots(figsize=(9, 5))
    ax.plot(steps, [r["val_loss"] for r in evals], "o-", color="C0", label="val loss (left axis)")
    ax.set(xlabel="step (optimizer updates)", ylabel="val loss (nats per target token, no smoothing)")
    bleu_ax = ax.twinx()
    bleu_ax.plot(steps, bleus, "s-", color="C1", label="val BLEU (right axis)")
    for x, y in zip(steps, bleus):
        bleu_ax.annotate(f"{y:.1f}", (x, y), textcoords="offset points", xytext=(-5, 5), ha="right", fontsize=8)
    bleu_ax.plot([test["step"]], [test["test_bleu"]], "*", ms=14, color="C3",
                 label=f"test BLEU {test['test_bleu']:.2f} (right axis)")
    bleu_ax.set(ylabel=f"BLEU (sacreBLEU's default, beam {cfg.beam_size})", ylim=(0, 1.15 * max(bleus + [1.0])))
    ax.legend(handles=ax.get_lines() + bleu_ax.get_lines(), loc="center right")
    data = f"Multi30k {cfg.src_lang}→{cfg.tgt_lang}" if cfg.dataset == "multi30k" else os.path.basename(cfg.dataset)
    ax.set_title(f"python {SCRIPT_NAME}.py on {data}: {test['step']:,} steps of ≤ {cfg.max_tokens:,} tokens\n"
                 f"d_model {cfg.d_model}, {cfg.n_head} heads, {cfg.n_layer}+{cfg.n_layer} layers, {cfg.norm}-LN, "
                 f"{cfg.pos} positions", fontsize=10)
    save_png(fig, os.path.join(cfg.out_dir, "bleu.png"))
    return evals


def plot_attention(cfg):
    """--mode attention: translate --text greedily, run the pair once more with every attention layer
    recording, and save three PNGs (encoder self-, decoder self-, cross-attention), layer x head grids."""
    if (plt := pyplot("the attention maps")) is None:
        raise UserError("--mode attention draws PNGs with matplotlib: pip install matplotlib")
    model, tok, device, ctx = load_trained(cfg)
    hyp = translate_corpus(model, tok, [cfg.text], dataclasses.replace(cfg, beam_size=1), device, ctx)[0]
    src, tgt_in, _ = collate([tok.encode(cfg.text)[:cfg.block_size - 1]], [tok.encode(hyp)[:cfg.block_size - 1]],
                             [0], device)
    attns = {"encoder": [l.self_attn for l in model.encoder], "decoder": [l.self_attn for l in model.decoder],
             "cross": [l.cross_attn for l in model.decoder]}
    for m in sum(attns.values(), []):
        m.record_weights = True
    with torch.no_grad(), ctx:
        model(src, tgt_in)
    src_lab, tgt_lab = ([tok.decode([i]).replace(" ", "▁") if i >= N_SPECIAL else ["<pad>", "<bos>", "<eos>"][i]
                         for i in t[0].tolist()] for t in (src, tgt_in))
    for kind, mods in attns.items():
        rows, cols = (src_lab, src_lab) if kind == "encoder" else (tgt_lab, src_lab if kind == "cross" else tgt_lab)
        fig, axes = plt.subplots(len(mods), cfg.n_head, figsize=(2.6 * cfg.n_head + 1, 2.6 * len(mods) + 1),
                                 squeeze=False)
        for li, m in enumerate(mods):
            for h, ax in enumerate(axes[li]):
                ax.imshow(m.attn_weights[0, h].float().cpu().numpy(), cmap="viridis", vmin=0, vmax=1)
                ax.set_xticks(range(len(cols)), cols, rotation=90, fontsize=6)
                ax.set_yticks(range(len(rows)), rows, fontsize=6)
                ax.set_title(f"layer {li} head {h}", fontsize=8)
        fig.suptitle(f"{kind} attention: {cfg.text!r} -> {hyp!r}", fontsize=9)
        save_png(fig, os.path.join(cfg.out_dir, f"attention_{kind}.png"), dpi=120)
    print(f"{cfg.text} -> {hyp}")


def sweep(cfg):
    """--mode sweep, the learner's Table 3 (paper §6.2): train every (n_head, d_model) pair for the
    same number of steps and tabulate parameters, val loss, test BLEU and time in out_dir/sweep.md."""
    data = prepare_data(cfg)
    lines = [f"Multi30k-style sweep: {cfg.max_iters} steps of <= {cfg.max_tokens} tokens, {cfg.n_layer}+{cfg.n_layer}"
             f" layers, d_ff = 4 d_model, beam {cfg.beam_size}, dataset {cfg.dataset}", "",
             "| n_head | d_model | params | val loss | test BLEU | train s |", "|---:|---:|---:|---:|---:|---:|"]
    for n_head, d_model in sweep_grid(cfg):
        run = dataclasses.replace(cfg, n_head=n_head, d_model=d_model, d_ff=4 * d_model, mode="train",
                                  init_from="scratch", out_dir=os.path.join(cfg.out_dir, f"h{n_head}_d{d_model}"))
        os.makedirs(run.out_dir, exist_ok=True)
        print(f"--- sweep: n_head={n_head} d_model={d_model} ---")
        m = train(run, data)
        lines.append(f"| {n_head} | {d_model} | {m['params'] / 1e6:.2f}M | {m['val_loss']:.3f} | "
                     f"{m['test_bleu']:.2f} | {m['train_time']:.0f} |")
    path = os.path.join(cfg.out_dir, "sweep.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines[2:]) + f"\n-> {path}")
    return path


# --- Evaluation: BLEU as sacreBLEU computes it (the same code is in 01_lstm_seq2seq.py) -----------
_BLEU_13A_RULES = [
    (re.compile(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])"), r" \1 "),  # split off ASCII punctuation and symbols
    (re.compile(r"([^0-9])([\.,])"), r"\1 \2 "),  # a period or comma not preceded by a digit...
    (re.compile(r"([\.,])([^0-9])"), r" \1 \2"),  # ...or not followed by one (keeps 3.14, 1,000)
    (re.compile(r"([0-9])(-)"), r"\1 \2 "),  # a dash after a digit
]


def tokenize_13a(line):
    """mteval-v13a's tokenizer, sacreBLEU's default: BLEU is only comparable across papers when
    everyone tokenizes the *detokenized* output the same way (Post 2018, "A Call for Clarity")."""
    line = line.replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    if "&" in line:
        line = line.replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">")
    line = f" {line} "
    for pattern, repl in _BLEU_13A_RULES:
        line = pattern.sub(repl, line)
    return line.split()


def _ngram_counts(tokens, n):
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def corpus_bleu(hypotheses, references, max_n=4):
    """Corpus BLEU (Papineni et al. 2002) exactly as sacreBLEU's default computes it: 13a tokenization,
    case-sensitive, one reference per sentence, exponential smoothing. Returns 0..100.

    Clipped n-gram matches and hypothesis n-gram totals are summed over the whole corpus *before*
    dividing (corpus-level, not an average of sentence scores):
        p_n = sum_s min(count_hyp(g), count_ref(g)) / sum_s count_hyp(g)      over n-grams g
        BP  = 1 if c >= r else exp(1 - r / c)      c, r: total hypothesis / reference lengths
        BLEU = BP * exp(mean_n log p_n) * 100
    Exponential smoothing: the k-th order whose matches are 0 gets p_n = 1 / (2^k * total_n), so one
    empty order does not zero the score. A corpus with no match at all, or with no hypothesis n-grams
    of some order (every sentence shorter than n), scores 0."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    correct, total = [0] * max_n, [0] * max_n
    hyp_len = ref_len = 0
    for hyp, ref in zip(hypotheses, references):
        h, r = tokenize_13a(hyp), tokenize_13a(ref)
        hyp_len, ref_len = hyp_len + len(h), ref_len + len(r)
        for n in range(1, max_n + 1):
            h_counts, r_counts = _ngram_counts(h, n), _ngram_counts(r, n)
            correct[n - 1] += sum(min(c, r_counts[g]) for g, c in h_counts.items())
            total[n - 1] += max(len(h) - n + 1, 0)
    if hyp_len == 0 or not any(correct):  # nothing matches at all: 0, not a smoothed epsilon
        return 0.0
    log_precisions, smooth = [], 1.0
    for n in range(max_n):
        if total[n] == 0:
            return 0.0
        if correct[n] == 0:
            smooth *= 2
            log_precisions.append(math.log(1.0 / (smooth * total[n])))
        else:
            log_precisions.append(math.log(correct[n] / total[n]))
    brevity_penalty = 1.0 if hyp_len >= ref_len else math.exp(1 - ref_len / hyp_len)
    return 100.0 * brevity_penalty * math.exp(sum(log_precisions) / max_n)


# --- main -----------------------------------------------------------------------------------------
def main(argv=None):
    return run_cli({"train": train, "translate": translate_text, "attention": plot_attention, "bleu": score_bleu,
                    "sweep": sweep}, argv)


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
