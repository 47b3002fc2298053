"""FlashAttention from first principles: tiled forward and backward, a Triton kernel, measured.

What you will learn: why standard attention is memory-bound (it writes the N x N score matrix to slow
memory and reads it back); how the online softmax lets a tiled loop compute exact attention while
holding only one block of scores at a time, so memory grows like N, not N^2; how the backward pass
recomputes the scores from the saved logsumexp instead of storing them; how causal, sliding-window
and block-sparse attention skip whole tiles; and how to write the same algorithm as a Triton kernel.

Run it:
    python 05_flash_attn.py                              # CPU: --mode bench (time, memory, accuracy)
    python 05_flash_attn.py --bench_tiles=64x64,128x128  # tile sizes side by side, timed against SDPA
    python 05_flash_attn.py --mode io                    # the paper's IO accounting, printed
    python 05_flash_attn.py --mode train                 # tiny LM: naive vs tiled, same seed
    python 05_flash_attn.py --preset gpu                 # one GPU: adds the Triton kernel to the bench
    torchrun --standalone --nproc_per_node=8 05_flash_attn.py --preset gpu --mode train \
        --gradient_accumulation_steps=8                  # DDP: 8 GPUs, one micro-batch each per step
    python 05_flash_attn.py --help                       # every flag, its default and meaning

Expected result (README table): what autograd keeps for the backward pass at N=8192, d=64, one head,
float32: naive 256 MiB (P, quadratic in N) vs tiled 2.0 MiB (O and L, linear in N); relative errors
vs float64 ~4e-7 in float32, ~5e-4 in float16, ~5e-3 in bfloat16 for every implementation; in
--mode train the naive and tiled loss curves agree to float32 rounding (--preset tiny: ~5e-7).

Notation (the FlashAttention-2 paper's): B batch, H heads, N_q / N_k query / key lengths (N when
equal), d head dim; Q, K, V, O in R^{N x d}; S = Q K^T / sqrt(d) the scores, P = softmax(S) the
probabilities; B_r x B_c the tile (block_q x block_k); i indexes query blocks, j key blocks;
m the running row max, l the running row sum, L = m + log(l) the logsumexp; D = rowsum(dO * O).
The LM in --mode train uses T sequence length, C channels (n_embd), nh heads, hd = C // nh, V vocab.

References: Dao et al., FlashAttention (arXiv 2205.14135) -- the IO analysis (Sec. 3.2, Thm 2);
Dao, FlashAttention-2 (arXiv 2307.08691) -- Algorithms 1 and 2 implemented here; Milakov &
Gimelshein, Online normalizer calculation for softmax (arXiv 1805.02867); Child et al., Sparse
Transformers (arXiv 1904.10509) and Beltagy et al., Longformer (arXiv 2004.05150) for block-sparse
and sliding-window attention; the Triton fused-attention tutorial for the kernel's layout.
Tests compare against a naive float64 implementation, torch.softmax, F.scaled_dot_product_attention
and torch.autograd.gradcheck.
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
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

# --- Config ---------------------------------------------------------------------------------------
SCRIPT_NAME = "05_flash_attn"  # the file's stem: default out_dir is out/<SCRIPT_NAME>


@dataclass
class Config:
    # I/O
    out_dir: str = f"out/{SCRIPT_NAME}"  # checkpoints, log.jsonl, bench table/plot, token ids
    data_dir: str = os.environ.get("LLM_DATA_DIR", "data")  # raw downloads; read, never modified
    init_from: str = "scratch"  # scratch | resume (--mode train)
    mode: str = "bench"  # bench | io | train
    # attention
    block_q: int = 128  # B_r: query rows per tile (CPU: fewer, larger tiles cut per-tile Python overhead)
    block_k: int = 128  # B_c: key columns per tile (128x128 timed best with --bench_tiles, README)
    window: int = 0  # sliding-window size for the LM in --mode train (0 = full causal attention)
    attn_impls: str = "naive,flash"  # --mode train: implementations trained one after the other
    # bench / io
    bench_sizes: str = "256,512,1024,2048"  # sequence lengths N, comma separated
    bench_batch: int = 1  # B
    bench_heads: int = 4  # H
    bench_head_dim: int = 64  # d
    bench_causal: bool = True  # causal attention in the bench
    bench_tiles: str = ""  # e.g. 64x64,256x256: instead, time these B_r x B_c tiles alternated with sdpa
    bench_repeats: int = 3  # timed repetitions per measurement (the median is reported)
    accuracy_n: int = 512  # N for the relative-error table (vs a float64 reference)
    io_sram_kb: int = 192  # on-chip memory M per SM for --mode io (A100/H100: 192/228 KB)
    # model (--mode train)
    n_layer: int = 4  # number of blocks
    n_head: int = 4  # attention heads
    n_embd: int = 128  # channels C
    block_size: int = 128  # context length T
    # training (--mode train)
    batch_size: int = 16  # sequences per micro-batch (per rank)
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step, over all ranks (as nanoGPT)
    max_iters: int = 300  # optimizer steps
    learning_rate: float = 1e-3  # peak learning rate
    min_lr: float = 1e-4  # final learning rate of the cosine schedule
    warmup_iters: int = 30  # linear warmup steps
    lr_decay_iters: int = 300  # step where the cosine reaches min_lr
    weight_decay: float = 0.1  # AdamW weight decay on matrices
    grad_clip: float = 1.0  # clip the global gradient norm (0 = off)
    eval_interval: int = 100  # steps between evaluations (and checkpoints)
    eval_iters: int = 10  # batches per evaluation
    log_interval: int = 25  # steps between progress lines
    always_save_checkpoint: bool = False  # save at every eval, not only on a new best val loss
    # system
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16 (autocast in train; input dtype in bench)
    seed: int = 1337  # base seed; rank r uses seed + r


PRESETS = {
    "tiny": dict(bench_sizes="64,128", bench_heads=2, bench_head_dim=32, bench_repeats=1, accuracy_n=64,
                 n_layer=1, n_head=2, n_embd=32, block_size=32, block_q=16, block_k=16, batch_size=4,
                 max_iters=20, warmup_iters=2, lr_decay_iters=20, eval_interval=10, eval_iters=2,
                 log_interval=5),  # tests
    "cpu": dict(),  # the default: a laptop CPU, minutes
    "cpu/train": dict(block_q=64, block_k=64),  # T=128 spans several tiles, so the LM runs the tiled loop
    "gpu": dict(bench_sizes="1024,2048,4096,8192,16384", bench_batch=4, bench_heads=16, bench_repeats=10,
                accuracy_n=2048, block_q=128, block_k=64, attn_impls="naive,triton", n_layer=6, n_head=6,
                n_embd=384, block_size=256, batch_size=64, max_iters=2000, lr_decay_iters=2000,
                warmup_iters=100, eval_interval=250, eval_iters=50),  # the real run
}
DEFAULT_PRESET = "cpu"
# Fields that define the model's shape: a checkpoint whose values differ cannot be loaded.
MODEL_KEYS = ("n_layer", "n_head", "n_embd", "block_size")
ATTN_IMPLS = ("naive", "flash", "sdpa", "triton")
# One rule per flag that has a range: a tuple lists the allowed values, a string bounds a number.
RULES = {"mode": ("bench", "io", "train"), "init_from": ("scratch", "resume"),
         "dtype": ("auto", "float32", "bfloat16", "float16"), "window": ">= 0",
         **dict.fromkeys(("block_q", "block_k", "bench_batch", "bench_heads", "bench_head_dim", "bench_repeats",
                          "accuracy_n", "io_sram_kb", "n_layer", "n_head", "n_embd", "block_size", "batch_size",
                          "gradient_accumulation_steps", "learning_rate", "eval_interval", "eval_iters",
                          "log_interval"), "> 0"),
         **dict.fromkeys(("max_iters", "min_lr", "warmup_iters", "lr_decay_iters", "weight_decay", "grad_clip"),
                         ">= 0")}


def check_config(cfg):
    """The rules that tie flags together or read a list: ValueError("--flag ...") -> exit 2."""
    if cfg.n_embd % cfg.n_head:
        raise ValueError(f"--n_embd={cfg.n_embd} is not divisible by --n_head={cfg.n_head}: "
                         f"the heads would have different head dims")
    if cfg.min_lr > cfg.learning_rate:
        raise ValueError(f"--min_lr={cfg.min_lr} is above --learning_rate={cfg.learning_rate}")
    if not all(s.strip().isdigit() and int(s) > 0 for s in cfg.bench_sizes.split(",")):
        raise ValueError(f"--bench_sizes must be a comma-separated list of positive integers, "
                         f"not {cfg.bench_sizes!r}")
    if cfg.bench_tiles and not re.fullmatch(r"[1-9]\d*x[1-9]\d*(,[1-9]\d*x[1-9]\d*)*", cfg.bench_tiles):
        raise ValueError(f"--bench_tiles must list B_rxB_c tiles such as 64x64,128x128, not {cfg.bench_tiles!r}")
    impls = cfg.attn_impls.split(",")
    unknown = [name for name in impls if name not in ATTN_IMPLS]
    if unknown:
        raise ValueError(f"--attn_impls: unknown attention implementation {unknown[0]!r} ({', '.join(ATTN_IMPLS)})")
    if cfg.window and set(impls) - {"naive", "flash"}:
        raise ValueError(f"--window works with the naive and flash implementations, not {cfg.attn_impls}")
    if cfg.mode == "train" and "triton" in impls and not triton_blocks_ok(cfg.block_q, cfg.block_k):
        raise ValueError(f"--block_q={cfg.block_q} --block_k={cfg.block_k}: the Triton kernel needs "
                         f"powers of two >= 16 (the PyTorch version takes any size)")


# --- Milestone: attention three ways -- naive, online softmax, tiled (FlashAttention-2) -----------
def naive_attention(q, k, v, causal=False, mask=None):
    """The textbook O = softmax(Q K^T / sqrt(d)) V, materializing the (N_q, N_k) score matrix.
    q (B, H, N_q, d), k and v (B, H, N_k, d). `causal` is bottom-right aligned (query i sees keys
    j <= i + N_k - N_q, FlashAttention-2's convention, which is what decoding with a KV cache needs);
    `mask` is a boolean (N_q, N_k) tensor, True = may attend. A query that may attend to no key gets
    a zero output (as in FlashAttention), not NaN."""
    n_q, n_k = q.shape[-2], k.shape[-2]
    s = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5  # (B, H, N_q, N_k)
    allowed = mask
    if causal:
        tri = attention_mask(n_q, n_k, causal=True, device=q.device)
        allowed = tri if allowed is None else allowed & tri
    if allowed is None:
        return torch.softmax(s, dim=-1) @ v  # (B, H, N_q, d)
    s = s.masked_fill(~allowed, float("-inf"))
    empty = ~allowed.any(-1, keepdim=True)  # (N_q, 1) rows with no visible key
    if empty.any():  # softmax of an all -inf row is NaN: give such rows zero weights instead
        return torch.softmax(s.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0) @ v
    return torch.softmax(s, dim=-1) @ v  # (B, H, N_q, d)


def online_softmax(x, chunk=64):
    """softmax over the last dim of x, reading it `chunk` columns at a time (Milakov & Gimelshein,
    Alg. 3). Keep a running max m and a running sum l of exp(x - m); when a chunk raises the max
    from m to m', rescale the sum: l' = l * exp(m - m') + sum(exp(x_chunk - m')). No exp ever sees
    a positive argument, so logits of 1e4 do not overflow. Second pass: p = exp(x - m) / l.
    FlashAttention fuses this with the P V product so the second pass disappears."""
    m = torch.full(x.shape[:-1], float("-inf"), dtype=x.dtype, device=x.device)  # (...,)
    l = torch.zeros_like(m)  # (...,)
    for c0 in range(0, x.shape[-1], chunk):
        xc = x[..., c0:c0 + chunk]  # (..., chunk)
        m_new = torch.maximum(m, xc.amax(-1))
        l = l * torch.exp(m - m_new) + torch.exp(xc - m_new[..., None]).sum(-1)
        m = m_new
    return torch.exp(x - m[..., None]) / l[..., None]


# Which (query, key) pairs attend. With s = i + N_k - N_q (the query's position among the keys),
# query row i may attend key column j iff lo(i) <= j <= hi(i), where
#   hi(i) = s                    if causal,   s + window - 1 if only windowed,   +inf otherwise
#   lo(i) = s - window + 1       if windowed,                                    -inf otherwise.
# Both bounds grow with i, so a whole tile [r0, r1) x [c0, c1) can be classified from its corners.
SKIP, FULL, PARTIAL = 0, 1, 2


def _bounds(rows, offset, causal, window):
    s = rows + offset
    hi = s if causal else (s + window - 1 if window else math.inf)
    lo = s - window + 1 if window else -math.inf
    return lo, hi


def tile_status(r0, r1, c0, c1, offset, causal=False, window=None):
    """SKIP when no pair of the tile attends (it is never computed), FULL when all do (no mask
    needed), PARTIAL otherwise (computed, then masked elementwise)."""
    lo_first, hi_first = _bounds(r0, offset, causal, window)
    lo_last, hi_last = _bounds(r1 - 1, offset, causal, window)
    if c0 > hi_last or c1 - 1 < lo_first:
        return SKIP
    if c1 - 1 <= hi_first and c0 >= lo_last:
        return FULL
    return PARTIAL


def tile_mask(r0, r1, c0, c1, offset, causal=False, window=None, device=None):
    """The elementwise (r1 - r0, c1 - c0) boolean mask of one tile, True = may attend."""
    rows = torch.arange(r0, r1, device=device)[:, None]  # (B_r, 1)
    cols = torch.arange(c0, c1, device=device)[None, :]  # (1, B_c)
    lo, hi = _bounds(rows, offset, causal, window)
    # With no causal mask and no window both bounds are infinite and broadcasting alone gives (1, B_c).
    return ((cols >= lo) & (cols <= hi)).expand(r1 - r0, c1 - c0).contiguous()  # (B_r, B_c)


def attention_mask(n_q, n_k, causal=False, window=None, layout=None, block_q=64, block_k=64, device=None):
    """The dense boolean (N_q, N_k) mask, True = may attend, that flash_attention applies tile by
    tile: causal and/or windowed, and restricted to the tiles a block-sparse `layout`
    (ceil(N_q / block_q), ceil(N_k / block_k)) keeps. naive_attention(mask=...) gives the reference."""
    mask = tile_mask(0, n_q, 0, n_k, n_k - n_q, causal, window, device)  # (N_q, N_k)
    if layout is not None:
        keep = layout.to(device=device, dtype=torch.bool)
        keep = keep.repeat_interleave(block_q, 0)[:n_q].repeat_interleave(block_k, 1)[:, :n_k]
        mask = mask & keep
    return mask


def _check_qkv(q, k, v, block_q, block_k, window=None, layout=None):
    """Clear ValueErrors for inputs the kernels cannot take (instead of a shape error deep inside)."""
    if not (q.dim() == k.dim() == v.dim() == 4 and q.shape[:2] == k.shape[:2] == v.shape[:2]
            and k.shape[2] == v.shape[2]):
        raise ValueError(f"q, k, v must be (B, H, N_q, d), (B, H, N_k, d), (B, H, N_k, d); got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.shape[-1] == k.shape[-1] == v.shape[-1]):
        raise ValueError(f"head dims differ: q {q.shape[-1]}, k {k.shape[-1]}, v {v.shape[-1]}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if block_q < 1 or block_k < 1:
        raise ValueError(f"block sizes must be positive; got block_q={block_q}, block_k={block_k}")
    if window is not None and window < 1:
        raise ValueError(f"window must be a positive number of keys or None; got {window}")
    want = (math.ceil(q.shape[-2] / block_q), math.ceil(k.shape[-2] / block_k))
    if layout is not None and tuple(layout.shape) != want:
        raise ValueError(f"layout must have one entry per tile, shape {want} for N_q={q.shape[-2]}, "
                         f"N_k={k.shape[-2]}, block_q={block_q}, block_k={block_k}; got {tuple(layout.shape)}")


def _tiles(n, block):
    """(start, end) of each block of `n` rows; the last block may be shorter (no padding needed)."""
    return [(s, min(s + block, n)) for s in range(0, n, block)]


class FlashAttention(torch.autograd.Function):
    """FlashAttention-2 (arXiv 2307.08691) in PyTorch: the loops a GPU kernel runs in parallel,
    written out. Tiles are computed in float32 (float64 for float64 inputs), as the kernels do."""

    @staticmethod
    def forward(ctx, q, k, v, causal, block_q, block_k, window, layout):
        B, H, n_q, d = q.shape
        n_k = k.shape[2]
        acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        scale, offset = d ** -0.5, n_k - n_q
        o = torch.empty_like(q)  # (B, H, N_q, d)
        lse = torch.empty(B, H, n_q, dtype=acc_dtype, device=q.device)  # L, saved for backward
        with torch.autocast(q.device.type, enabled=False):  # we pick the precision per tile ourselves
            # Algorithm 1, outer loop (line 3): one query block Q_i at a time -- on a GPU, one
            # thread block each, in parallel. Nothing of size N_q x N_k ever exists.
            for i, (r0, r1) in enumerate(_tiles(n_q, block_q)):
                q_i = q[:, :, r0:r1].to(acc_dtype)  # (B, H, B_r, d)
                m = torch.full((B, H, r1 - r0), float("-inf"), dtype=acc_dtype, device=q.device)
                l = torch.zeros_like(m)  # (B, H, B_r)
                acc = torch.zeros_like(q_i)  # (B, H, B_r, d): unnormalized O_i
                for j, (c0, c1) in enumerate(_tiles(n_k, block_k)):  # inner loop (line 6)
                    status = tile_status(r0, r1, c0, c1, offset, causal, window)
                    if status == SKIP or (layout is not None and not layout[i][j]):
                        continue  # never loaded, never computed: the speedup of causal/sparse masks
                    k_j = k[:, :, c0:c1].to(acc_dtype)  # (B, H, B_c, d)
                    v_j = v[:, :, c0:c1].to(acc_dtype)  # (B, H, B_c, d)
                    s = (q_i @ k_j.transpose(-2, -1)) * scale  # line 8: S_ij = Q_i K_j^T (B, H, B_r, B_c)
                    if status == PARTIAL:  # only tiles crossing the diagonal / window edge
                        s = s.masked_fill(~tile_mask(r0, r1, c0, c1, offset, causal, window, q.device), float("-inf"))
                    # line 9: m_ij = max(m_i(j-1), rowmax(S_ij)); P~_ij = exp(S_ij - m_ij)
                    m_new = torch.maximum(m, s.amax(-1))  # (B, H, B_r)
                    m_safe = m_new.masked_fill(m_new == float("-inf"), 0.0)  # row sees nothing yet
                    p = torch.exp(s - m_safe[..., None])  # (B, H, B_r, B_c)
                    # line 9: l_ij = exp(m_i(j-1) - m_ij) l_i(j-1) + rowsum(P~_ij);  line 10:
                    #         O_ij = diag(exp(m_i(j-1) - m_ij)) O_i(j-1) + P~_ij V_j  (unnormalized)
                    alpha = torch.exp(m - m_safe)  # (B, H, B_r): rescales what was summed so far
                    l = alpha * l + p.sum(-1)
                    acc = alpha[..., None] * acc + p @ v_j  # (B, H, B_r, d)
                    m = m_new
                # line 12: O_i = diag(l_i)^-1 O_i -- normalized once, at the end, not per tile.
                # A row that saw no key (l = 0) has acc = 0 and keeps output 0.
                o[:, :, r0:r1] = (acc / l.masked_fill(l == 0, 1.0)[..., None]).to(q.dtype)
                lse[:, :, r0:r1] = m + torch.log(l)  # line 13: L_i = m_i + log(l_i); -inf if empty
        ctx.save_for_backward(q, k, v, o, lse)  # O(N d) memory: no P, no S
        ctx.args = (causal, block_q, block_k, window, layout)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        causal, block_q, block_k, window, layout = ctx.args
        n_q, d = q.shape[2], q.shape[3]
        n_k = k.shape[2]
        acc_dtype = lse.dtype
        scale, offset = d ** -0.5, n_k - n_q
        with torch.autocast(q.device.type, enabled=False):
            # Algorithm 2, line 5: D_i = rowsum(dO_i * O_i), which equals rowsum(dP_ij * P_ij) over
            # all j -- the term the softmax Jacobian needs, computed without P.
            delta = (do.to(acc_dtype) * o.to(acc_dtype)).sum(-1)  # (B, H, N_q)
            # A row that saw no key has L = -inf; +inf makes its P = exp(S - L) exactly 0.
            lse = lse.masked_fill(lse == float("-inf"), float("inf"))
            dq = torch.zeros(q.shape, dtype=acc_dtype, device=q.device)  # (B, H, N_q, d)
            dk, dv = torch.empty_like(k), torch.empty_like(v)
            # Outer loop over key blocks (line 6): dK_j and dV_j stay on chip while every query
            # block visits; dQ_i is accumulated in slow memory (atomics on a GPU).
            for j, (c0, c1) in enumerate(_tiles(n_k, block_k)):
                k_j = k[:, :, c0:c1].to(acc_dtype)  # (B, H, B_c, d)
                v_j = v[:, :, c0:c1].to(acc_dtype)  # (B, H, B_c, d)
                dk_j, dv_j = torch.zeros_like(k_j), torch.zeros_like(v_j)
                for i, (r0, r1) in enumerate(_tiles(n_q, block_q)):
                    status = tile_status(r0, r1, c0, c1, offset, causal, window)
                    if status == SKIP or (layout is not None and not layout[i][j]):
                        continue
                    q_i = q[:, :, r0:r1].to(acc_dtype)  # (B, H, B_r, d)
                    do_i = do[:, :, r0:r1].to(acc_dtype)  # (B, H, B_r, d)
                    s = (q_i @ k_j.transpose(-2, -1)) * scale  # recompute S_ij  (B, H, B_r, B_c)
                    if status == PARTIAL:
                        s = s.masked_fill(~tile_mask(r0, r1, c0, c1, offset, causal, window, q.device), float("-inf"))
                    p = torch.exp(s - lse[:, :, r0:r1, None])  # line 12: P_ij = exp(S_ij - L_i)
                    dv_j += p.transpose(-2, -1) @ do_i  # line 13: dV_j += P_ij^T dO_i  (B, H, B_c, d)
                    dp = do_i @ v_j.transpose(-2, -1)  # line 14: dP_ij = dO_i V_j^T  (B, H, B_r, B_c)
                    ds = p * (dp - delta[:, :, r0:r1, None])  # line 15: dS_ij = P_ij * (dP_ij - D_i)
                    dq[:, :, r0:r1] += (ds @ k_j) * scale  # line 16: dQ_i += dS_ij K_j / sqrt(d)
                    dk_j += (ds.transpose(-2, -1) @ q_i) * scale  # line 17: dK_j += dS_ij^T Q_i / sqrt(d)
                dk[:, :, c0:c1] = dk_j.to(k.dtype)
                dv[:, :, c0:c1] = dv_j.to(v.dtype)
        return dq.to(q.dtype), dk, dv, None, None, None, None, None


def flash_attention(q, k, v, causal=False, block_q=64, block_k=64, window=None, layout=None):
    """Exact attention, tiled: q (B, H, N_q, d), k and v (B, H, N_k, d) -> (B, H, N_q, d).
    Memory O(N d) in forward and backward. `causal` is bottom-right aligned (see naive_attention);
    `window=w` lets a query see only the w nearest keys (on its left when causal, both sides
    otherwise); `layout` is a boolean (ceil(N_q/block_q), ceil(N_k/block_k)) block-sparse pattern.
    Tiles that the mask empties are skipped, not masked. Any N, any block size."""
    _check_qkv(q, k, v, block_q, block_k, window, layout)
    keep = None if layout is None else layout.bool().tolist()  # Python bools: no GPU sync per tile
    return FlashAttention.apply(q, k, v, causal, block_q, block_k, window, keep)


# --- Milestone: the same algorithm as a Triton kernel ---------------------------------------------
# A Triton program is written for ONE tile and launched on a grid: program (i, b*H + h) owns query
# block i of head h in batch b, exactly the body of the outer loop above. Triton turns the block
# operations (tl.load of a B_r x d tile, tl.dot, tl.max) into code for the GPU's threads, keeps the
# tile in registers / shared memory (the fast memory of the IO analysis), and reads K_j, V_j from
# HBM once per program. Three differences from the PyTorch version, all standard in real kernels:
#  * exp2 instead of exp (one hardware instruction): scores are kept in base-2 units,
#    S2 = S * log2(e), so exp(S - m) = exp2(S2 - m2) and the saved L is log2-based too;
#  * tiles past the end of the sequence are loaded with a mask (padding rows read 0, padding
#    columns get score -inf), so any N works with power-of-two blocks; d is padded the same way;
#  * the backward runs as two kernels, one per key block (dK_j, dV_j) and one per query block
#    (dQ_i), each recomputing P: no atomics, at the price of computing S twice.
try:  # Triton is optional: everything but the kernel runs without it
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False
LOG2E = 1.4426950408889634

if HAS_TRITON:
    @triton.jit
    def _load_tile(ptr, rows, n_rows, dims, head_dim):
        """A (rows, B_d) tile of a contiguous (n_rows, head_dim) matrix; padding reads as 0."""
        mask = (rows[:, None] < n_rows) & (dims[None, :] < head_dim)
        return tl.load(ptr + rows[:, None] * head_dim + dims[None, :], mask=mask, other=0.0)

    @triton.jit
    def _store_tile(ptr, x, rows, n_rows, dims, head_dim):
        mask = (rows[:, None] < n_rows) & (dims[None, :] < head_dim)
        tl.store(ptr + rows[:, None] * head_dim + dims[None, :], x.to(ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _visible(rows, cols, N_K, offset, CAUSAL: tl.constexpr):
        """(B_r, B_c): True where the key exists and (causal) is not in the query's future."""
        ok = cols[None, :] < N_K
        if CAUSAL:
            ok = ok & (cols[None, :] <= rows[:, None] + offset)
        return ok

    @triton.jit
    def _backward_p(q, k, LSE, rows, cols, N_Q, N_K, qk_scale, CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr):
        """Recompute P_ij = exp(S_ij - L_i) (base 2) from the saved logsumexp; 0 where masked,
        and 0 for rows that saw no key (L = -inf) or lie past the end (L read as +inf)."""
        lse = tl.load(LSE + rows, mask=rows < N_Q, other=float("inf"))
        lse = tl.where(lse == float("-inf"), float("inf"), lse)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # S2_ij (B_r, B_c)
        return tl.where(_visible(rows, cols, N_K, N_K - N_Q, CAUSAL), tl.math.exp2(s - lse[:, None]), 0.0)

    @triton.jit
    def _attn_fwd_kernel(Q, K, V, O, LSE, N_Q, N_K, HEAD_DIM, qk_scale, CAUSAL: tl.constexpr,
                         BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                         DOT_PRECISION: tl.constexpr):
        pid_q, bh = tl.program_id(0), tl.program_id(1).to(tl.int64)  # int64: B*H*N*d may exceed 2^31
        Q, O = Q + bh * N_Q * HEAD_DIM, O + bh * N_Q * HEAD_DIM  # this head's (N_q, d) slice (contiguous)
        K, V = K + bh * N_K * HEAD_DIM, V + bh * N_K * HEAD_DIM
        rows = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)  # (B_r,)
        dims = tl.arange(0, BLOCK_D)  # (B_d,) d padded to a power of two
        q = _load_tile(Q, rows, N_Q, dims, HEAD_DIM)  # (B_r, B_d), stays on chip
        m_i = tl.full([BLOCK_Q], float("-inf"), tl.float32)  # running max (base 2)
        l_i = tl.zeros([BLOCK_Q], tl.float32)  # running sum
        acc = tl.zeros([BLOCK_Q, BLOCK_D], tl.float32)  # unnormalized O_i
        offset = N_K - N_Q  # bottom-right causal alignment
        hi = N_K
        if CAUSAL:  # key blocks right of this block's last row are skipped, not masked
            hi = tl.minimum(N_K, (pid_q + 1) * BLOCK_Q + offset)
        for start_k in range(0, hi, BLOCK_K):
            cols = start_k + tl.arange(0, BLOCK_K)  # (B_c,)
            k = _load_tile(K, cols, N_K, dims, HEAD_DIM)  # (B_c, B_d)
            v = _load_tile(V, cols, N_K, dims, HEAD_DIM)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # S2_ij (B_r, B_c)
            s = tl.where(_visible(rows, cols, N_K, offset, CAUSAL), s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # row sees nothing yet
            p = tl.math.exp2(s - m_safe[:, None])  # P~_ij  (B_r, B_c)
            alpha = tl.math.exp2(m_i - m_safe)  # rescale the old sum and accumulator
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
            m_i = m_new
        l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # a row that saw no key keeps output 0, L = -inf
        _store_tile(O, acc / l_safe[:, None], rows, N_Q, dims, HEAD_DIM)  # normalize once
        lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.math.log2(l_safe))  # L2_i
        tl.store(LSE + bh * N_Q + rows, lse, mask=rows < N_Q)

    @triton.jit
    def _attn_bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, N_Q, N_K, HEAD_DIM, qk_scale, sm_scale,
                              CAUSAL: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
                              BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr):
        pid_k, bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
        Q, DO = Q + bh * N_Q * HEAD_DIM, DO + bh * N_Q * HEAD_DIM
        K, V, DK, DV = (t + bh * N_K * HEAD_DIM for t in (K, V, DK, DV))
        cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)  # (B_c,) this program's key block
        dims = tl.arange(0, BLOCK_D)
        k = _load_tile(K, cols, N_K, dims, HEAD_DIM)  # K_j, V_j stay on chip
        v = _load_tile(V, cols, N_K, dims, HEAD_DIM)
        dk = tl.zeros([BLOCK_K, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_K, BLOCK_D], tl.float32)
        lo = 0
        if CAUSAL:  # query blocks entirely above this key block see none of it: skipped
            lo = tl.maximum(0, pid_k * BLOCK_K - (N_K - N_Q)) // BLOCK_Q * BLOCK_Q
        for start_q in range(lo, N_Q, BLOCK_Q):
            rows = start_q + tl.arange(0, BLOCK_Q)
            q = _load_tile(Q, rows, N_Q, dims, HEAD_DIM)
            do = _load_tile(DO, rows, N_Q, dims, HEAD_DIM)
            delta = tl.load(DELTA + bh * N_Q + rows, mask=rows < N_Q, other=0.0)  # D_i
            p = _backward_p(q, k, LSE + bh * N_Q, rows, cols, N_Q, N_K, qk_scale, CAUSAL, DOT_PRECISION)
            dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PRECISION)  # P^T dO
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)  # dP_ij = dO_i V_j^T
            ds = p * (dp - delta[:, None])  # dS_ij = P_ij * (dP_ij - D_i)
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PRECISION)  # dS^T Q
        _store_tile(DK, dk * sm_scale, cols, N_K, dims, HEAD_DIM)
        _store_tile(DV, dv, cols, N_K, dims, HEAD_DIM)

    @triton.jit
    def _attn_bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, N_Q, N_K, HEAD_DIM, qk_scale, sm_scale,
                            CAUSAL: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
                            BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr):
        pid_q, bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
        Q, DO, DQ = (t + bh * N_Q * HEAD_DIM for t in (Q, DO, DQ))
        K, V = K + bh * N_K * HEAD_DIM, V + bh * N_K * HEAD_DIM
        rows = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)  # this program's query block
        dims = tl.arange(0, BLOCK_D)
        q = _load_tile(Q, rows, N_Q, dims, HEAD_DIM)
        do = _load_tile(DO, rows, N_Q, dims, HEAD_DIM)
        delta = tl.load(DELTA + bh * N_Q + rows, mask=rows < N_Q, other=0.0)
        dq = tl.zeros([BLOCK_Q, BLOCK_D], tl.float32)
        hi = N_K
        if CAUSAL:
            hi = tl.minimum(N_K, (pid_q + 1) * BLOCK_Q + N_K - N_Q)
        for start_k in range(0, hi, BLOCK_K):
            cols = start_k + tl.arange(0, BLOCK_K)
            k = _load_tile(K, cols, N_K, dims, HEAD_DIM)
            v = _load_tile(V, cols, N_K, dims, HEAD_DIM)
            p = _backward_p(q, k, LSE + bh * N_Q, rows, cols, N_Q, N_K, qk_scale, CAUSAL, DOT_PRECISION)
            ds = p * (tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION) - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)  # dQ_i += dS_ij K_j
        _store_tile(DQ, dq * sm_scale, rows, N_Q, dims, HEAD_DIM)


def triton_unavailable_reason(device):
    """None when the Triton kernel can run on `device`, else why not."""
    if not HAS_TRITON:
        return "Triton is not installed (pip install triton; Linux)"
    if not str(device).startswith("cuda") and os.environ.get("TRITON_INTERPRET") != "1":
        return "the Triton kernel needs a CUDA GPU (or TRITON_INTERPRET=1 on the CPU, small sizes only)"
    return None


def triton_blocks_ok(block_q, block_k):
    """tl.arange and tl.dot need power-of-two tiles of at least 16."""
    return all(b >= 16 and not b & (b - 1) for b in (block_q, block_k))


class TritonFlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, block_q, block_k):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        B, H, n_q, d = q.shape
        o = torch.empty_like(q)  # (B, H, N_q, d)
        lse = torch.empty(B, H, n_q, dtype=torch.float32, device=q.device)  # L2, base-2 logsumexp
        grid = (triton.cdiv(n_q, block_q), B * H)
        _attn_fwd_kernel[grid](q, k, v, o, lse, n_q, k.shape[2], d, d ** -0.5 * LOG2E,
                               **_triton_meta(q, causal, block_q, block_k))
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.args = (causal, block_q, block_k)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        causal, block_q, block_k = ctx.args
        B, H, n_q, d = q.shape
        n_k = k.shape[2]
        do = do.contiguous()
        delta = (do.float() * o.float()).sum(-1)  # D = rowsum(dO * O)  (B, H, N_q)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        meta = _triton_meta(q, causal, block_q, block_k)
        args = (n_q, n_k, d, d ** -0.5 * LOG2E, d ** -0.5)
        _attn_bwd_dkdv_kernel[(triton.cdiv(n_k, block_k), B * H)](q, k, v, do, lse, delta, dk, dv, *args, **meta)
        _attn_bwd_dq_kernel[(triton.cdiv(n_q, block_q), B * H)](q, k, v, do, lse, delta, dq, *args, **meta)
        return dq, dk, dv, None, None, None


def _triton_meta(q, causal, block_q, block_k):
    # float32 inputs: exact fp32 products ("ieee"), not the tensor cores' tf32 (10-bit mantissa).
    precision = "ieee" if q.dtype == torch.float32 else "tf32"  # (ignored for 16-bit inputs)
    return dict(CAUSAL=causal, BLOCK_Q=block_q, BLOCK_K=block_k,
                BLOCK_D=max(16, triton.next_power_of_2(q.shape[-1])), DOT_PRECISION=precision)


def triton_flash_attention(q, k, v, causal=False, block_q=64, block_k=64):
    """The Triton kernel: same contract as flash_attention (bottom-right causal), without window or
    layout. float16, bfloat16 or float32 inputs; blocks must be powers of two >= 16 (tl.arange
    and tl.dot require it); any N and any d up to 256 (padded inside)."""
    _check_qkv(q, k, v, block_q, block_k)
    reason = triton_unavailable_reason(q.device)
    if reason:
        raise RuntimeError(reason)
    for name, b in (("block_q", block_q), ("block_k", block_k)):
        if not triton_blocks_ok(b, b):
            raise ValueError(f"{name} must be a power of two >= 16 for the Triton kernel; got {b}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"the Triton kernel takes float16, bfloat16 or float32 inputs, not {q.dtype}")
    if q.shape[-1] > 256:
        raise ValueError(f"the Triton kernel supports head dims up to 256; got {q.shape[-1]}")
    return TritonFlashAttention.apply(q, k, v, causal, block_q, block_k)


# --- Milestone: a small GPT whose attention is pluggable ------------------------------------------
def attention_fn(impl, causal=True, block_q=64, block_k=64, window=None):
    """(q, k, v) -> o for one implementation: naive | flash (tiled PyTorch) | sdpa | triton."""
    if impl not in ("naive", "flash", "sdpa", "triton"):
        raise ValueError(f"unknown attention implementation {impl!r} (naive, flash, sdpa or triton)")
    if window and impl in ("sdpa", "triton"):
        raise ValueError(f"a window works with the naive and flash implementations, not {impl}")
    if impl == "naive" and window:
        return lambda q, k, v: naive_attention(q, k, v, mask=attention_mask(
            q.shape[2], k.shape[2], causal, window, device=q.device))
    if impl == "naive":
        return lambda q, k, v: naive_attention(q, k, v, causal=causal)
    if impl == "flash":
        return lambda q, k, v: flash_attention(q, k, v, causal, block_q, block_k, window)
    if impl == "sdpa":  # PyTorch's fused kernel (its is_causal is top-left aligned: fine for N_q == N_k)
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return lambda q, k, v: triton_flash_attention(q, k, v, causal, block_q, block_k)


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd, n_head, attend):
        super().__init__()
        if n_embd % n_head:
            raise ValueError(f"n_embd={n_embd} is not divisible by n_head={n_head}")
        self.n_head = n_head
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)  # q, k, v projections in one matmul
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.attend = attend  # (q, k, v) -> o, causal, from attention_fn

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # 3 x (B, T, C)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hd)
        y = self.attend(q, k, v)  # (B, nh, T, hd)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))  # (B, T, C)


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, n_embd, n_head, attend):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head, attend)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, vocab_size, n_layer, n_head, n_embd, block_size, attend):
        super().__init__()
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, attend) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying (Press & Wolf, arXiv 1608.05859)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, idx, targets=None):
        B, T = idx.shape
        x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))  # (B, T, C)
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))  # (B, T, V)
        loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return logits, loss


# --- Data -----------------------------------------------------------------------------------------
# The attention functions need no dataset; --mode train uses characters of tiny Shakespeare.
DATA_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
DATA_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"


def prepare_data(cfg):
    """Character-level tiny Shakespeare -> out_dir/{train,val}.bin (uint16 ids, 90/10 split) and
    out_dir/meta.json (the vocabulary). Returns the vocabulary size."""
    meta_path = os.path.join(cfg.out_dir, "meta.json")
    if not os.path.exists(meta_path):
        os.makedirs(cfg.out_dir, exist_ok=True)
        src = download(DATA_URL, os.path.join(cfg.data_dir, "tinyshakespeare", "input.txt"), DATA_SHA256)
        with open(src, encoding="utf-8") as f:
            text = f.read()
        chars = sorted(set(text))
        stoi = {ch: i for i, ch in enumerate(chars)}
        ids = np.array([stoi[ch] for ch in text], dtype=np.uint16)
        n_train = int(0.9 * len(ids))
        for split, part in (("train", ids[:n_train]), ("val", ids[n_train:])):
            part.tofile(os.path.join(cfg.out_dir, f"{split}.bin.tmp"))
            os.replace(os.path.join(cfg.out_dir, f"{split}.bin.tmp"), os.path.join(cfg.out_dir, f"{split}.bin"))
        with open(meta_path + ".tmp", "w") as f:
            json.dump({"chars": chars}, f)
        os.replace(meta_path + ".tmp", meta_path)
    with open(meta_path) as f:
        return len(json.load(f)["chars"])


def get_batch(cfg, split, device, generator=None):
    """A random batch of `batch_size` windows from the uint16 memmap -> (x, y), each (B, T)."""
    data = np.memmap(os.path.join(cfg.out_dir, f"{split}.bin"), dtype=np.uint16, mode="r")
    if len(data) <= cfg.block_size + 1:
        raise UserError(f"--block_size={cfg.block_size} is longer than the {split} split ({len(data)} tokens)")
    ix = torch.randint(len(data) - cfg.block_size - 1, (cfg.batch_size,), generator=generator)
    x = torch.stack([torch.from_numpy(data[i:i + cfg.block_size].astype(np.int64)) for i in ix])
    y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + cfg.block_size].astype(np.int64)) for i in ix])
    return x.to(device), y.to(device)  # (B, T), (B, T)


# --- Training: the same LM, trained with naive and with tiled attention ---------------------------
def get_lr(cfg, step):
    """Linear warmup, then cosine decay from learning_rate to min_lr at lr_decay_iters."""
    if step < cfg.warmup_iters:
        return cfg.learning_rate * (step + 1) / (cfg.warmup_iters + 1)
    if step >= cfg.lr_decay_iters:
        return cfg.min_lr
    ratio = (step - cfg.warmup_iters) / (cfg.lr_decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.learning_rate - cfg.min_lr)


def init_model(cfg, impl, device, rank=0, world_size=1):
    """The LM with attention `impl` and its AdamW, fresh or (--init_from=resume) continued from
    out_dir/ckpt_<impl>.pt -> (model, optimizer, step, best_val)."""
    attend = attention_fn(impl, True, cfg.block_q, cfg.block_k, cfg.window or None)
    model = GPT(prepare_data(cfg), cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size, attend).to(device)
    decay = [p for p in model.parameters() if p.dim() >= 2]  # matrices and embeddings
    no_decay = [p for p in model.parameters() if p.dim() < 2]  # biases and LayerNorm gains
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.learning_rate,
                                  betas=(0.9, 0.95))
    if cfg.init_from == "scratch":
        return model, optimizer, 0, float("inf")
    ckpt = resume(os.path.join(cfg.out_dir, f"ckpt_{impl}.pt"), cfg, model, optimizer, rank, world_size)
    return model, optimizer, ckpt["step"], ckpt["best_val"]


@torch.no_grad()
def evaluate(model, cfg, device, ctx):
    """Mean loss over eval_iters batches per split. The batches come from their own generator with a
    fixed seed: every evaluation sees the same batches and the training RNG is left untouched, so a
    resumed run draws exactly the training batches an uninterrupted one would."""
    model.eval()
    gen = torch.Generator().manual_seed(cfg.seed)
    out = {}
    for split in ("train", "val"):
        losses = []
        for _ in range(cfg.eval_iters):
            x, y = get_batch(cfg, split, device, gen)
            with ctx:
                losses.append(model(x, y)[1].item())
        out[split] = sum(losses) / len(losses)
    model.train()
    return out


def train(cfg, impl="flash") -> dict:
    """Train the LM with attention `impl`; -> {"impl", "losses" (train loss per step), "val", "step",
    "weights"}. Runs under DDP when the process group is up (train_compare sets it up once)."""
    ddp = dist.is_available() and dist.is_initialized()
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    master = rank == 0
    device, ctx, scaler = setup_device(cfg, int(os.environ.get("LOCAL_RANK", 0)))
    scaler = scaler or torch.amp.GradScaler(enabled=False)  # float16 scales the loss; else a no-op
    torch.manual_seed(cfg.seed + rank)
    model, optimizer, step, best_val = init_model(cfg, impl, device, rank, world_size)
    raw_model, start_step = model, step
    if ddp:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.startswith("cuda") else None)
    grad_accum = cfg.gradient_accumulation_steps // world_size  # micro-steps on this rank
    tokens_per_step = cfg.batch_size * cfg.block_size * cfg.gradient_accumulation_steps
    losses, metrics, t0 = [], {}, time.time()
    while True:
        resumed_here = 0 < start_step == step < cfg.max_iters  # evaluated just before the checkpoint
        if (step % cfg.eval_interval == 0 or step == cfg.max_iters) and not resumed_here:
            metrics = evaluate(model, cfg, device, ctx)
            if master:
                print(f"[{impl}] step {step}: train loss {metrics['train']:.4f}, val loss {metrics['val']:.4f}")
                log_jsonl(cfg, {"impl": impl, "step": step, "train_loss": metrics["train"],
                                "val_loss": metrics["val"], "lr": get_lr(cfg, step)})
                if metrics["val"] < best_val or cfg.always_save_checkpoint:
                    best_val = min(best_val, metrics["val"])
                    save_checkpoint(os.path.join(cfg.out_dir, f"ckpt_{impl}.pt"), model, optimizer, cfg, step,
                                    best_val)
        if step >= cfg.max_iters:
            break
        lr = get_lr(cfg, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        for micro_step in range(grad_accum):
            x, y = get_batch(cfg, "train", device)
            model.require_backward_grad_sync = micro_step == grad_accum - 1  # DDP: all-reduce once, at the end
            with ctx:
                loss = model(x, y)[1] / grad_accum
            scaler.scale(loss).backward()
        scaler.unscale_(optimizer)  # clip the true gradients
        if cfg.grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item() * grad_accum)
        step += 1
        if master and step % cfg.log_interval == 0:
            dt = (time.time() - t0) / cfg.log_interval
            print(f"[{impl}] step {step}: loss {losses[-1]:.4f}, lr {lr:.2e}, "
                  f"{tokens_per_step / dt:,.0f} tok/s, {1000 * dt:.1f} ms/step")
            t0 = time.time()
    digest = fingerprint(raw_model)
    if ddp:  # every rank must hold the same weights: DDP averaged the same gradients everywhere
        digests = [None] * world_size
        dist.all_gather_object(digests, digest)
        if master:
            print(f"[{impl}] weights sha256 per rank: {' '.join(digests)}")
    return {"impl": impl, "losses": losses, "val": metrics.get("val"), "step": step, "weights": digest}


def train_compare(cfg) -> dict:
    """--mode train: the same LM from the same seed, once per implementation in --attn_impls. With
    exact attention the loss curves may differ only by float rounding (the tiled sum adds in
    another order)."""
    impls = cfg.attn_impls.split(",")
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if cfg.gradient_accumulation_steps % world_size:
        raise UserError(f"--gradient_accumulation_steps={cfg.gradient_accumulation_steps} counts micro-steps "
                        f"over all ranks: make it a multiple of the {world_size} ranks")
    reason = triton_unavailable_reason(setup_device(cfg)[0]) if "triton" in impls else None
    if reason:
        raise UserError(f"--attn_impls asks for triton, but {reason}")
    rank, local_rank, world_size = setup_ddp()
    if rank == 0:
        prepare_data(cfg)  # download / tokenize once, before the other ranks read it
    if world_size > 1:
        dist.barrier()
    results = {impl: train(cfg, impl) for impl in impls}
    ref = results[impls[0]]
    for impl in impls[1:]:
        r = results[impl]
        diff = max((abs(a - b) for a, b in zip(ref["losses"], r["losses"])), default=0.0)
        r["max_loss_diff"] = diff
        if rank == 0:
            print(f"{impls[0]} vs {impl}: max |train loss difference| over {len(r['losses'])} steps = "
                  f"{diff:.2e}; final val loss {ref['val']:.6f} vs {r['val']:.6f}")
            log_jsonl(cfg, {"compare": [impls[0], impl], "steps": len(r["losses"]), "max_loss_diff": diff,
                            "val_loss": [ref["val"], r["val"]]})
    if world_size > 1:
        dist.barrier()
        dist.destroy_process_group()
    return results


# --- Evaluation / inference: time, memory, accuracy, IO -------------------------------------------
def attention_flops(batch, heads, n, d, causal):
    """Forward FLOPs: two (N x N x d) matmuls, 2 FLOPs per multiply-add -> 4 B H N^2 d, halved when
    causal (half the tiles are skipped). The backward has five such matmuls: 2.5x the forward."""
    return 4 * batch * heads * n * n * d // (2 if causal else 1)


def time_ms(fns, device, repeats):
    """Median wall time in milliseconds of each fn() in the list `fns`, over `repeats` rounds after a
    warm-up round (kernel compilation, caches). One call of each per round, round-robin: a load that
    comes and goes on a shared machine slows them all alike, so their ratios stay meaningful."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else lambda: None
    times = [[] for _ in fns]
    for _ in range(repeats + 1):
        for fn, t in zip(fns, times):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            t.append(1000 * (time.perf_counter() - t0))
    return [sorted(t[1:])[repeats // 2] for t in times]  # t[0]: the warm-up round


def saved_bytes(fn, *inputs):
    """Bytes autograd keeps for the backward pass of fn(*inputs): every distinct storage a saved
    tensor lives in, counted once, apart from the inputs' own. This is the memory the tiled
    algorithm saves: naive attention keeps P, N_q x N_k per head; the tiled version keeps O and L,
    N_q (d + 1) per head, and recomputes P in the backward pass."""
    seen, total = {t.untyped_storage().data_ptr() for t in inputs}, 0

    def pack(t):
        nonlocal total
        if t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            total += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*inputs)
    return total


def cuda_peak_bytes(fn):
    """Peak bytes the CUDA allocator held while fn() ran (temporaries included), above what it held before."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def _qkv(batch, heads, n, d, dtype, device, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return [torch.randn(batch, heads, n, d, generator=gen).to(device=device, dtype=dtype).requires_grad_()
            for _ in range(3)]


def bench_impls(device, dtype, cfg):
    """The implementations that can run here as {name: fn}, and why Triton is left out (or None)."""
    impls = {name: attention_fn(name, cfg.bench_causal, cfg.block_q, cfg.block_k)
             for name in ("naive", "flash", "sdpa")}
    reason = triton_unavailable_reason(device)
    if reason is None and not triton_blocks_ok(cfg.block_q, cfg.block_k):
        reason = f"its blocks must be powers of two >= 16, not {cfg.block_q}x{cfg.block_k}"
    if reason is None and not device.startswith("cuda") and dtype == torch.bfloat16:
        reason = "the Triton interpreter cannot do bfloat16 dot products"
    if reason is None:
        impls["triton"] = attention_fn("triton", cfg.bench_causal, cfg.block_q, cfg.block_k)
    return impls, reason


def accuracy_table(cfg, device):
    """Relative error ||x - x_ref|| / ||x_ref|| of O, dQ, dK, dV against naive attention in float64
    (on the device; MPS has no float64: there, on the CPU) for every implementation and input
    dtype, at N = accuracy_n."""
    n, d, causal = cfg.accuracy_n, cfg.bench_head_dim, cfg.bench_causal
    ref_device = "cpu" if device.startswith("mps") else device
    q, k, v = _qkv(cfg.bench_batch, cfg.bench_heads, n, d, torch.float64, ref_device, seed=1)
    do = torch.randn(q.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2)).to(ref_device)
    o_ref = naive_attention(q, k, v, causal=causal)
    refs = (o_ref, *torch.autograd.grad(o_ref, (q, k, v), do))
    rows = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for name, fn in bench_impls(device, dtype, cfg)[0].items():
            qd, kd, vd = (t.detach().to(device, dtype).requires_grad_() for t in (q, k, v))
            try:
                o = fn(qd, kd, vd)
                outs = (o, *torch.autograd.grad(o, (qd, kd, vd), do.to(device, dtype)))
            except (RuntimeError, NotImplementedError) as e:  # e.g. a dtype a CPU kernel lacks
                print(f"note: {name} {str(dtype)[6:]}: {str(e).splitlines()[0][:100]}")
                continue
            errs = [((x.to(ref_device, torch.float64) - r).norm() / r.norm()).item() for x, r in zip(outs, refs)]
            rows.append({"impl": name, "dtype": str(dtype)[6:], "O": errs[0], "dQ": errs[1],
                         "dK": errs[2], "dV": errs[3]})
    return rows


BENCH_COLUMNS = [("N", "N", "{}"), ("impl", "impl", "{}"), ("fwd_ms", "fwd ms", "{:.2f}"),
                 ("fwd_bwd_ms", "fwd+bwd ms", "{:.2f}"), ("fwd_gflops", "fwd GFLOP/s", "{:.1f}"),
                 ("fwd_bwd_gflops", "fwd+bwd GFLOP/s", "{:.1f}"), ("saved_mib", "saved for bwd MiB", "{:.2f}"),
                 ("fwd_bwd_peak_mib", "fwd+bwd peak MiB (CUDA)", "{:.1f}")]


def bench_tiles(cfg) -> list:
    """--mode bench --bench_tiles=64x64,256x256: per N, the median forward+backward ms (float32) of
    flash_attention with each B_r x B_c tile and of sdpa, called alternately (time_ms), each one's
    ratio to sdpa, and how far the outputs lie from the first tile's (the same sums in another order)."""
    device, B, H, d = setup_device(cfg)[0], cfg.bench_batch, cfg.bench_heads, cfg.bench_head_dim
    names, rows, causal = cfg.bench_tiles.split(",") + ["sdpa"], [], cfg.bench_causal
    fns = [attention_fn("flash", causal, *map(int, t.split("x"))) for t in names[:-1]]
    fns.append(attention_fn("sdpa", causal))
    print(f"fwd+bwd ms, median of {cfg.bench_repeats} rounds ({device}, {torch.get_num_threads()} threads, B={B}, "
          f"H={H}, d={d}, causal={causal}), (x sdpa's time)")
    for n in [int(s) for s in cfg.bench_sizes.split(",")]:
        q, k, v = _qkv(B, H, n, d, torch.float32, device)
        do = torch.randn_like(q)
        ms = time_ms([lambda fn=fn: fn(q, k, v).backward(do) for fn in fns], device, cfg.bench_repeats)
        with torch.no_grad():
            o = fns[0](q, k, v)
            diff = max([(fn(q, k, v) - o).abs().max().item() for fn in fns[1:-1]], default=0.0)
        rows.append({"N": n, **dict(zip(names, ms)), "max_diff": diff})
        print(f"N={n}: " + ", ".join(f"{name} {t:.1f} ({t / ms[-1]:.2f}x)" for name, t in zip(names, ms)) +
              f"; outputs within {diff:.1e} of {names[0]}'s")
    return rows


def bench(cfg) -> dict:
    """--mode bench: for each N, every implementation's forward and forward+backward time, FLOP/s,
    the bytes it saves for the backward pass (and on CUDA the allocator's peak), then the accuracy
    table; printed as markdown and saved to out_dir/bench.{md,json,png}. --bench_tiles: bench_tiles."""
    if cfg.bench_tiles:
        return bench_tiles(cfg)
    device, ctx, _ = setup_device(cfg)
    dtype = ctx.fast_dtype if isinstance(ctx, torch.autocast) else torch.float32
    B, H, d, causal = cfg.bench_batch, cfg.bench_heads, cfg.bench_head_dim, cfg.bench_causal
    os.makedirs(cfg.out_dir, exist_ok=True)
    setup = f"{device}, {str(dtype)[6:]}, B={B}, H={H}, d={d}, causal={causal}, blocks {cfg.block_q}x{cfg.block_k}"
    impls, why_not_triton = bench_impls(device, dtype, cfg)
    if why_not_triton:
        print(f"note: no Triton row: {why_not_triton}")
    lines = [f"Attention benchmark ({setup}, median of {cfg.bench_repeats})", "",
             "| " + " | ".join(t for _, t, _ in BENCH_COLUMNS) + " |", "|" + "---|" * len(BENCH_COLUMNS)]
    print("\n".join(lines))
    rows = []
    for n in [int(s) for s in cfg.bench_sizes.split(",")]:
        q, k, v = _qkv(B, H, n, d, dtype, device)
        do = torch.randn_like(q)
        flops = attention_flops(B, H, n, d, causal)
        for name, fn in impls.items():
            def fwd_bwd():
                q.grad = k.grad = v.grad = None
                fn(q, k, v).backward(do)
            row = {"N": n, "impl": name}
            try:
                with torch.no_grad():
                    [row["fwd_ms"]] = time_ms([lambda: fn(q, k, v)], device, cfg.bench_repeats)
                [row["fwd_bwd_ms"]] = time_ms([fwd_bwd], device, cfg.bench_repeats)
                row["fwd_gflops"] = flops / row["fwd_ms"] / 1e6
                row["fwd_bwd_gflops"] = 3.5 * flops / row["fwd_bwd_ms"] / 1e6
                row["saved_mib"] = saved_bytes(fn, q, k, v) / 2**20
                if device.startswith("cuda"):
                    row["fwd_bwd_peak_mib"] = cuda_peak_bytes(fwd_bwd) / 2**20  # incl. the gradients
            except torch.OutOfMemoryError:
                row["error"] = "out of memory"
            rows.append(row)
            lines.append("| " + " | ".join(fmt.format(row[key]) if key in row else row.get("error", "-")
                                           for key, _, fmt in BENCH_COLUMNS) + " |")
            print(lines[-1])
    acc = accuracy_table(cfg, device)
    lines += ["", "Relative error vs float64 naive attention", "", "| impl | dtype | O | dQ | dK | dV |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {a['impl']} | {a['dtype']} | {a['O']:.1e} | {a['dQ']:.1e} | {a['dK']:.1e} | {a['dV']:.1e} |"
              for a in acc]
    print("\n".join(lines[-len(acc) - 5:]))
    with open(os.path.join(cfg.out_dir, "bench.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(cfg.out_dir, "bench.json"), "w") as f:
        json.dump({"config": dataclasses.asdict(cfg), "rows": rows, "accuracy": acc}, f, indent=1)
    _plot(rows, os.path.join(cfg.out_dir, "bench.png"), f"{setup}, {torch.get_num_threads()} threads")
    return {"rows": rows, "accuracy": acc}


def _plot(rows, path, setup):
    if (plt := pyplot(os.path.basename(path))) is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for i, name in enumerate(dict.fromkeys(r["impl"] for r in rows)):
        ok = [r for r in rows if r["impl"] == name and "error" not in r]
        # every other line dashed: in the memory panel tiled lies exactly on SDPA
        style = dict(marker="os^v"[i % 4], linestyle="-" if i % 2 == 0 else "--", label=name)
        axes[0].plot([r["N"] for r in ok], [r["fwd_bwd_ms"] for r in ok], **style)
        axes[1].plot([r["N"] for r in ok], [r["saved_mib"] for r in ok], **style)
    for ax, label in zip(axes, ("forward + backward time (ms)", "memory saved for the backward pass (MiB)")):
        ax.set(xscale="log", yscale="log", xlabel="sequence length N (tokens)", ylabel=label)
        ax.legend()
    fig.suptitle(f"python 05_flash_attn.py --mode=bench ({setup})", fontsize=10)
    save_png(fig, path, dpi=120)


def io_table(cfg) -> list:
    """--mode io: FlashAttention (arXiv 2205.14135) Sec. 3.2 IO accounting, forward pass, counted in
    elements moved between HBM and on-chip SRAM of M elements, times the element size (fp16: 2 B).
      standard (Alg. 0): read Q, K, write S; read S, write P; read P, V, write O
                         = 4 N d + 4 N^2                                     -> Theta(N d + N^2)
      tiled, FA-2 loop order: the query tile is the one kept on chip while K, V stream past, so it
                         gets Alg. 1's large size, B_r = ceil(M / 4d), and B_c = min(B_r, d) keeps
                         the B_r x B_c score tile within M; each Q_i is read and O_i written once
                         (2 N d) and K, V are read once per query block:
                         2 N d + 2 N d ceil(N / B_r) ~ 8 N^2 d^2 / M         -> Theta(N^2 d^2 / M)
    FLOPs are 4 N^2 d for both, so FLOPs per byte (arithmetic intensity) stay near d/2 for the
    standard version -- far below a GPU's ridge point (~150-300 FLOP/B): memory-bound -- and grow
    with M/d for the tiled one. (Real kernels use B_r = 64-128: registers, not SRAM, are the limit.)"""
    d, elem, sizes = cfg.bench_head_dim, 2, [int(s) for s in cfg.bench_sizes.split(",")]

    def tiled_elems(n, sram_kb):
        b_r = math.ceil(sram_kb * 1024 // elem / (4 * d))
        return 2 * n * d + 2 * n * d * math.ceil(n / b_r), b_r, min(b_r, d)

    _, b_r, b_c = tiled_elems(1, cfg.io_sram_kb)
    print(f"one head, d={d}, fp16, on-chip memory M={cfg.io_sram_kb} KB -> tiles B_r={b_r}, B_c={b_c}")
    print(f"{'N':>7} {'standard MB':>12} {'tiled MB':>10} {'ratio':>7} {'GFLOP':>8} {'FLOP/B std':>11} "
          f"{'FLOP/B tiled':>13}")
    rows = []
    for n in sizes:
        std, tiled = (4 * n * d + 4 * n * n) * elem, tiled_elems(n, cfg.io_sram_kb)[0] * elem
        flops = 4 * n * n * d
        rows.append({"N": n, "standard_bytes": std, "tiled_bytes": tiled, "flops": flops})
        print(f"{n:>7} {std / 1e6:>12.2f} {tiled / 1e6:>10.2f} {std / tiled:>7.2f} {flops / 1e9:>8.2f} "
              f"{flops / std:>11.1f} {flops / tiled:>13.1f}")
    n = sizes[-1]
    print(f"tiled MB at N={n} as the on-chip memory grows: " + ", ".join(
        f"M={kb} KB: {tiled_elems(n, kb)[0] * elem / 1e6:.1f}" for kb in (16, 64, cfg.io_sram_kb, 1024)))
    return rows


# --- main -----------------------------------------------------------------------------------------
def main(argv=None):
    return run_cli({"bench": bench, "io": io_table, "train": train_compare}, argv)


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
