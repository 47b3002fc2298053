"""Selective state spaces (Mamba) and Mixture-of-Experts, side by side with attention.

Two answers to the Transformer's costs. Mamba replaces attention by a recurrence whose parameters
depend on the input (the "selection" mechanism): it trains in parallel with an associative scan and
generates with a constant-size state instead of a growing KV cache. MoE replaces the dense FFN by many
experts of which each token uses only top_k: parameters grow, compute per token does not.
You will learn: zero-order-hold discretization, a log-depth scan and its backward (the same scan run
backwards in time), the recurrent step of a Mamba block, top-k routing with capacity, the
load-balancing and z losses.

Run it (--help lists every flag):
    python 07_mamba_moe.py                          # selective copying: Mamba vs LTI vs attention
    python 07_mamba_moe.py --mode lm                # tinyshakespeare: dense vs MoE vs Mamba + PNGs
    python 07_mamba_moe.py --mode bench             # sequential vs parallel scan + PNG, state vs KV cache
    python 07_mamba_moe.py --preset gpu --mode lm   # one GPU; eight with DDP:
    torchrun --standalone --nproc_per_node=8 07_mamba_moe.py --preset gpu --mode lm --gradient_accumulation_steps=8

Expected (cpu preset; README: Results): selective copying accuracy Mamba 100%, LTI ablation 30%,
attention 81%; tinyshakespeare val loss dense 1.96, MoE 1.88, Mamba 1.75; expert-load CV 0.05 with the
balancing loss, 0.96 without; at l = 1024 the parallel scan (forward+backward) is ~20x the loop.

Notation (Mamba paper, Gu & Dao 2023, Algorithm 2): b batch, l sequence length, d channels of the
scan (d_inner = expand * d_model), n state size (d_state); u input (b, l, d); Δ step size (b, l, d);
A (d, n) with negative entries; B, C (b, l, n); D (d,) skip; Ā = exp(ΔA), B̄ = ΔB; h state (b, d, n).
Transformer/MoE: B batch, T length, C n_embd, nh heads, hd head dim, V vocab, E experts, k top_k.

References: Mamba arXiv:2312.00752 (§3.2 selection, §3.3 scan, §4.1.1 selective copying); S4 arXiv:2111.00396;
Blelloch 1990 "Prefix sums and their applications"; Martin & Cundy arXiv:1709.04057 (linear recurrences trained by
parallel scan); Switch Transformer arXiv:2101.03961 (§2.1 top-1 gate, §2.2 balancing loss, capacity); Mixtral
arXiv:2401.04088 (§2.1 top-k gates); ST-MoE arXiv:2202.08906 (§3.1 z-loss); Shazeer et al. arXiv:1701.06538 (noisy
top-k); DeepSeekMoE arXiv:2401.06066 (shared experts). The tests check the scan against the loop.
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
import timeit
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP


# --- Config ---------------------------------------------------------------------------------------
SCRIPT_NAME = "07_mamba_moe"  # the file's stem: default out_dir is out/<SCRIPT_NAME>


@dataclasses.dataclass
class Config:
    out_dir: str = f"out/{SCRIPT_NAME}"  # checkpoints, log.jsonl, PNGs, derived data (token ids)
    data_dir: str = os.environ.get("LLM_DATA_DIR", "data")  # raw downloads; read, never modified
    init_from: str = "scratch"  # scratch | resume (each model from out_dir/ckpt_<model>.pt)
    mode: str = "copy"  # copy | lm | bench
    models: str = ""  # comma list of mamba,mamba_lti,attn,dense,moe,moe_nobal ('' = the mode's set)
    n_layer: int = 1  # blocks of the Transformers; Mamba gets 2x (a Mamba block has half the params)
    n_embd: int = 64  # model width d_model (C)
    n_head: int = 4  # attention heads
    dropout: float = 0.0  # dropout in the Transformers
    d_state: int = 8  # n: SSM state size per channel (the paper uses 16)
    d_conv: int = 4  # kernel of the causal depthwise conv
    expand: int = 2  # d_inner = expand * n_embd
    n_experts: int = 8  # E routed experts
    top_k: int = 2  # experts per token; expert width = 4*n_embd/(top_k+n_shared): same active FFN
    n_shared: int = 0  # always-on shared experts (DeepSeekMoE)
    capacity_factor: float = 1.25  # expert capacity = factor * tokens * top_k / E; overflow dropped
    aux_loss_coef: float = 0.1  # balancing-loss alpha (Switch: 0.01; 0.1 balances better here); moe_nobal: 0
    z_loss_coef: float = 0.001  # router z-loss coefficient (ST-MoE)
    router_noise: float = 0.0  # std of Gaussian noise on router logits while training (0 = off)
    block_size: int = 64  # lm: characters of context
    copy_len: int = 32  # copy: length of the noisy region holding the tokens to remember
    copy_tokens: int = 4  # copy: tokens to remember and reproduce in order
    copy_vocab: int = 8  # copy: distinct data tokens
    bench_lengths: str = "128,256,512,1024"  # bench: sequence lengths to time
    batch_size: int = 16  # sequences per micro-batch (per rank)
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step, over all ranks (a multiple of them)
    max_iters: int = 1500  # optimizer steps
    learning_rate: float = 3e-3  # peak learning rate
    min_lr: float = 3e-4  # floor of the cosine schedule
    warmup_iters: int = 100  # linear warmup steps
    lr_decay_iters: int = 1500  # cosine reaches min_lr here (keep = max_iters, except for resume tests)
    weight_decay: float = 0.1  # AdamW, on matrices only
    grad_clip: float = 1.0  # clip the global grad norm (0 = off)
    eval_interval: int = 250  # steps between evaluations (and checkpoints)
    eval_iters: int = 20  # batches per evaluation
    log_interval: int = 50  # steps between progress lines
    always_save_checkpoint: bool = False  # save at every eval, not only on a new best val loss
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16 (autocast; float16 uses a GradScaler)
    compile: bool = False  # torch.compile the model (the scan stays eager: Dynamo stops at its strided out= writes)
    seed: int = 1337  # base seed; rank r uses seed + r


PRESETS = {
    "tiny": dict(n_layer=1, n_embd=32, d_state=4, n_experts=4, batch_size=4, block_size=32,
                 copy_len=16, copy_tokens=4, copy_vocab=4, bench_lengths="32,64", max_iters=20,
                 lr_decay_iters=20, warmup_iters=2, eval_interval=10, eval_iters=2, log_interval=5),
    "cpu": dict(),  # the default: a laptop CPU, minutes
    # gpu: the scan materializes (b, l, d_inner, n) tensors and keeps two per layer (Ā and h) for the
    # backward, which bounds the batch; the paper's fused kernel recomputes them instead.
    "gpu": dict(n_layer=4, n_embd=256, n_head=8, dropout=0.1, batch_size=32, block_size=256,
                copy_len=256, copy_tokens=16, copy_vocab=16, bench_lengths="1024,4096,16384",
                d_state=16, max_iters=5000, lr_decay_iters=5000, learning_rate=1e-3, min_lr=1e-4,
                eval_interval=500, eval_iters=50, log_interval=100),
}
DEFAULT_PRESET = "cpu"
# Fields that define the model's shape: a checkpoint whose values differ cannot be loaded.
MODEL_KEYS = ("n_layer", "n_embd", "n_head", "d_state", "d_conv", "expand", "n_experts", "top_k",
              "n_shared", "block_size", "copy_len", "copy_tokens", "copy_vocab", "mode")
MODE_MODELS = {"copy": "mamba,mamba_lti,attn", "lm": "dense,moe,moe_nobal,mamba", "bench": ""}
ALL_MODELS = ("mamba", "mamba_lti", "attn", "dense", "moe", "moe_nobal")
# Each flag alone: a tuple lists the allowed values, a string bounds the number (checked by parse_args).
RULES = {"mode": tuple(MODE_MODELS), "init_from": ("scratch", "resume"), "dropout": "in [0, 1)",
         "dtype": ("auto", "float32", "bfloat16", "float16"),
         **dict.fromkeys("n_shared aux_loss_coef z_loss_coef router_noise min_lr warmup_iters lr_decay_iters "
                         "weight_decay grad_clip".split(), ">= 0"),
         **dict.fromkeys("n_layer n_embd n_head d_state d_conv expand n_experts top_k capacity_factor block_size "
                         "copy_len copy_tokens copy_vocab batch_size gradient_accumulation_steps max_iters "
                         "learning_rate eval_interval eval_iters log_interval".split(), "> 0")}
DATA_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
DATA_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"


def check_config(cfg):
    """The rules that tie flags together (RULES bounds each flag alone): a ValueError names the flag."""
    if cfg.top_k > cfg.n_experts:
        raise ValueError(f"--top_k={cfg.top_k} must be between 1 and --n_experts={cfg.n_experts}")
    if cfg.n_embd % cfg.n_head:
        raise ValueError(f"--n_embd={cfg.n_embd} must be divisible by --n_head={cfg.n_head}")
    if cfg.copy_tokens > cfg.copy_len:
        raise ValueError(f"--copy_tokens={cfg.copy_tokens} cannot exceed --copy_len={cfg.copy_len}")
    if cfg.min_lr > cfg.learning_rate:
        raise ValueError(f"--min_lr={cfg.min_lr} cannot exceed --learning_rate={cfg.learning_rate}")
    names = model_names(cfg)
    if any(name not in ALL_MODELS for name in names) or (cfg.mode != "bench" and not names):
        raise ValueError(f"--models must be a comma list of {', '.join(ALL_MODELS)}, not {cfg.models!r}")
    if not re.fullmatch(r"[1-9]\d*(,[1-9]\d*)*", cfg.bench_lengths):
        raise ValueError(f"--bench_lengths must be positive integers separated by commas, not {cfg.bench_lengths!r}")


def model_names(cfg):
    return [m for m in (cfg.models or MODE_MODELS[cfg.mode]).split(",") if m]


# --- Milestone: the selective scan (Mamba §3.3) ---------------------------------------------------
def selective_scan_sequential(u, delta, A, B, C, D):
    """The reference: the discretized SSM run as a loop over time (Mamba eq. 2a-2b, Algorithm 2).
    u, delta (b, l, d); A (d, n); B, C (b, l, n); D (d,) -> y (b, l, d).
        h_t = Ā_t h_{t-1} + B̄_t u_t,  Ā_t = exp(Δ_t A) (zero-order hold),  B̄_t = Δ_t B_t (Euler, §3.5)
        y_t = C_t h_t + D u_t"""
    b, l, d = u.shape
    h = u.new_zeros(b, d, A.shape[1])  # (b, d, n)
    ys = []
    # unbind (not u[:, t]) so that backward costs O(l): each indexing op's backward would allocate
    # a full-length zero gradient, making the loop's backward O(l^2).
    for u_t, delta_t, B_t, C_t in zip(u.unbind(1), delta.unbind(1), B.unbind(1), C.unbind(1)):
        dA = torch.exp(delta_t.unsqueeze(-1) * A)  # (b, d, n)
        dBu = (delta_t * u_t).unsqueeze(-1) * B_t.unsqueeze(1)  # (b, d, n)
        h = dA * h + dBu
        ys.append((h * C_t.unsqueeze(1)).sum(-1))  # (b, d)
    return torch.stack(ys, dim=1) + u * D  # (b, l, d)


def _scan(a, x, out, reverse=False):
    """Writes into `out` the inclusive scan h_t = a_t h_{t-1} + x_t along dim 1, h_{-1} = 0, and
    returns it; reverse=True scans backwards in time: h_t = a_t h_{t+1} + x_t, h_l = 0. a, x, out
    (b, l, ...); `out` may be `x` itself (the scan then runs in place). No autograd: `SelectiveScan`
    supplies the gradients.
    Blelloch's work-efficient scan, written recursively. Pair each step with the next one in scan
    order, (0, 1), (2, 3), ... (reverse: (l-1, l-2), (l-3, l-4), ...). Two affine maps compose into
    one, a2 (a1 h + x1) + x2 = (a2 a1) h + (a2 x1 + x2), so scanning the l // 2 composed maps (the
    recursion) gives h at every pair's second step; then each remaining step is one step from its
    neighbour, known by now. O(l) work in 2 log2(l) sequential rounds of elementwise tensor ops.
    Numerically safe for any length: the only operations are products of factors a in (0, 1] and
    sums, never a division or exp of a positive number, so nothing overflows, and a product that
    underflows to 0 is the correct limit (that part of the past is forgotten). Contrast the
    "cumprod then divide" shortcut h_t = P_t Σ x_s / P_s, whose 1/P_s overflows after a few hundred
    steps of decay."""
    l = a.shape[1]
    if l == 1:
        return out.copy_(x)
    m, odd = l // 2, l % 2
    if not reverse:
        first, second = slice(0, 2 * m, 2), slice(1, 2 * m, 2)  # pairs (0, 1), (2, 3), ...
    else:
        first, second = slice(odd + 1, l, 2), slice(odd, l, 2)  # pairs (l-1, l-2), (l-3, l-4), ...
    a2 = a[:, second]
    _scan(a2 * a[:, first], torch.addcmul(x[:, second], a2, x[:, first]), out[:, second], reverse)
    # The rest: every first step of a pair, and the unpaired step when l is odd; the scan's first
    # step has no neighbour (h = x there).
    # (out= writes straight into the strided view of `out`: no temporary, no copy.)
    if not reverse:  # positions 0, 2, 4, ... from their left neighbours 1, 3, ...
        out[:, 0] = x[:, 0]
        torch.addcmul(x[:, 2::2], a[:, 2::2], out[:, 1:l - 1:2], out=out[:, 2::2])
    else:  # positions l-1, l-3, ... from their right neighbours l-2, l-4, ...
        rest, right = slice(1 - odd, l - 1, 2), slice(2 - odd, l, 2)
        out[:, l - 1] = x[:, l - 1]
        torch.addcmul(x[:, rest], a[:, rest], out[:, right], out=out[:, rest])
    return out


class SelectiveScan(torch.autograd.Function):
    """y_t = C_t h_t with h_t = Ā_t h_{t-1} + x_t, Ā_t = exp(Δ_t A), x_t = Δ_t u_t B_t (the SSM of
    `selective_scan_sequential` without the D term), forward and backward both by `_scan`.
    Why a hand-written backward: autograd would record the scan's 2 log2(l) rounds op by op, keep
    their (b, l, d, n) intermediates and turn every even/odd split into a copy in the backward. But
    the adjoint of a linear recurrence is the same recurrence run backwards in time (Martin & Cundy
    2018 train linear RNNs this way), so one reverse scan gives every gradient, and only Ā and h
    are kept. With g_t = ∂L/∂y_t (b, l, d) and λ_t = ∂L/∂h_t through every path (h_t reaches the
    loss through y_t and through h_{t+1}):
        λ_t = C_t g_t + Ā_{t+1} λ_{t+1}     (λ_{l-1} = C_{l-1} g_{l-1})
        ∂L/∂x_t = λ_t,   ∂L/∂Ā_t = λ_t h_{t-1},   ∂L/∂(Δ_t A) = λ_t h_{t-1} Ā_t   (exp' = exp)
    then the chain rule through the broadcasts: sums over n give Δ's and u's gradients, over d
    B's and C's, over b and t A's. Checked against autograd through the loop and by gradcheck."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C):
        # The (b, l, d, n) tensors are laid out (b, l, n, d): every broadcast of a (b, l, d) or
        # (b, l, n) tensor then runs along contiguous rows of d instead of rows of n = 8 numbers,
        # and PyTorch's elementwise kernels are slow when the innermost dimension is that short.
        At = A.t().contiguous()  # (n, d)
        dA = torch.exp_(delta.unsqueeze(2) * At)  # Ā (b, l, n, d); ΔA <= 0 so Ā in (0, 1]
        h = (delta * u).unsqueeze(2) * B.unsqueeze(-1)  # x = B̄u (b, l, n, d): one big product, not two
        _scan(dA, h, out=h)  # in place: x becomes h
        ctx.save_for_backward(u, delta, At, B, C, dA, h)
        return (h * C.unsqueeze(-1)).sum(2)  # y (b, l, d)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        u, delta, At, B, C, dA, h = ctx.saved_tensors
        lam = C.unsqueeze(-1) * g.unsqueeze(2)  # the direct part C_t g_t (b, l, n, d); the scan adds the rest
        if lam.shape[1] > 1:
            # Fold Ā_{l-1} λ_{l-1} into step l-2; the first l-1 steps are then a reverse scan whose
            # coefficient at step t is Ā_{t+1}: Ā shifted by one step, a view, no copy.
            lam[:, -2].addcmul_(dA[:, -1], lam[:, -1])
            _scan(dA[:, 1:], lam[:, :-1], out=lam[:, :-1], reverse=True)
        g_du = (lam * B.unsqueeze(-1)).sum(2)  # ∂L/∂(Δu) (b, l, d)
        g_B = (lam * (delta * u).unsqueeze(2)).sum(-1)  # (b, l, n)
        g_C = (h * g.unsqueeze(2)).sum(-1)  # (b, l, n)
        lam[:, 1:].mul_(h[:, :-1])  # λ_t h_{t-1}, in place (h_{-1} = 0) ...
        lam[:, 0] = 0
        g_z = lam.mul_(dA)  # ... times Ā_t: ∂L/∂(ΔA) (b, l, n, d)
        g_delta = (g_z * At).sum(2) + g_du * u
        g_A = (g_z * delta.unsqueeze(2)).sum((0, 1)).t()  # (d, n)
        return g_du * delta, g_delta, g_A, g_B, g_C


def selective_scan_parallel(u, delta, A, B, C, D):
    """Same signature and result as `selective_scan_sequential`, computed with the log-depth scan
    `_scan` over the (Ā, B̄u) pairs (Mamba §3.3.2: the recurrence is an associative operator), in both
    directions: forward for h, backward for the gradients (`SelectiveScan`). Materializes
    (b, l, d, n) tensors as mamba-minimal does; the paper's CUDA kernel keeps them in SRAM instead
    (§3.3.2, kernel fusion), which is what makes it fast on GPU at scale."""
    return SelectiveScan.apply(u, delta, A, B, C) + u * D  # (b, l, d)


# --- Milestone: the Mamba block -------------------------------------------------------------------
class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * g (Zhang & Sennrich 2019), as in Mamba's residual blocks."""

    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class MambaBlock(nn.Module):
    """One Mamba block (Fig. 3): in_proj -> (x, z); x -> causal depthwise conv -> SiLU -> selective
    SSM (Δ, B, C from x) -> y; out = out_proj(y * SiLU(z)). `selective=False` gives the LTI ablation:
    Δ, B, C are learned constants, as in S4D (Table 1's "S4" row of the paper's ablation)."""

    def __init__(self, d_model, d_state=16, d_conv=4, expand=2, selective=True):
        super().__init__()
        d_inner = expand * d_model
        self.d_inner, self.d_state, self.d_conv, self.selective = d_inner, d_state, d_conv, selective
        self.dt_rank = math.ceil(d_model / 16)  # §3.6: Δ is projected through a rank-d/16 bottleneck
        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=False)
        self.conv1d = nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner, padding=d_conv - 1)
        # Δ's bias starts at softplus^-1(dt), dt log-uniform in [1e-3, 1e-1] (official init): the
        # initial time scales span fast and slow memories.
        dt = torch.exp(torch.rand(d_inner) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
        dt_bias = dt + torch.log(-torch.expm1(-dt))  # softplus^-1
        if selective:
            self.x_proj = nn.Linear(d_inner, self.dt_rank + 2 * d_state, bias=False)  # -> Δ, B, C
            self.dt_proj = nn.Linear(self.dt_rank, d_inner)
            with torch.no_grad():
                self.dt_proj.bias.copy_(dt_bias)
        else:
            self.dt_bias = nn.Parameter(dt_bias)  # (d,)
            self.B = nn.Parameter(torch.randn(d_state) / math.sqrt(d_state))  # (n,)
            self.C = nn.Parameter(torch.randn(d_state) / math.sqrt(d_state))  # (n,)
        # S4D-Real init A_{:, i} = -(i + 1), stored as log so A stays negative (a stable recurrence).
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1).float()).repeat(d_inner, 1))
        self.D = nn.Parameter(torch.ones(d_inner))
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)

    def ssm_params(self, x):
        """The selection mechanism (§3.2, Algorithm 2): Δ, B, C as functions of the input x (b, l, d)."""
        b, l, _ = x.shape
        if not self.selective:
            delta = F.softplus(self.dt_bias).expand(b, l, -1)  # (b, l, d)
            return delta, self.B.expand(b, l, -1), self.C.expand(b, l, -1)
        dt, B, C = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        return F.softplus(self.dt_proj(dt)), B, C  # (b, l, d), (b, l, n), (b, l, n)

    def forward(self, x, scan=selective_scan_parallel):
        b, l, _ = x.shape
        x, z = self.in_proj(x).chunk(2, dim=-1)  # (b, l, d_inner) each
        x = self.conv1d(x.transpose(1, 2))[..., :l].transpose(1, 2)  # left padding only: causal
        x = F.silu(x)
        delta, B, C = self.ssm_params(x)
        A = -torch.exp(self.A_log.float())  # (d, n)
        with torch.autocast(x.device.type, enabled=False):  # the scan runs in float32
            y = scan(x.float(), delta.float(), A, B.float(), C.float(), self.D.float())  # (b, l, d)
        return self.out_proj(y.to(z.dtype) * F.silu(z))

    def step(self, x, state):
        """One token of recurrent inference. x (b, d_model); state = (conv_state (b, d, d_conv),
        h (b, d, n)) or None. Memory is constant in the sequence length: no cache grows."""
        b = x.shape[0]
        if state is None:
            state = (x.new_zeros(b, self.d_inner, self.d_conv), x.new_zeros(b, self.d_inner, self.d_state))
        conv_state, h = state
        x, z = self.in_proj(x).chunk(2, dim=-1)  # (b, d) each
        conv_state = torch.cat([conv_state[:, :, 1:], x.unsqueeze(-1)], dim=-1)  # (b, d, d_conv)
        x = F.silu((conv_state * self.conv1d.weight[:, 0, :]).sum(-1) + self.conv1d.bias)  # (b, d)
        delta, B, C = (t[:, 0] for t in self.ssm_params(x.unsqueeze(1)))  # (b, d), (b, n), (b, n)
        A = -torch.exp(self.A_log)  # (d, n)
        h = torch.exp(delta.unsqueeze(-1) * A) * h + delta.unsqueeze(-1) * B.unsqueeze(1) * x.unsqueeze(-1)
        y = (h * C.unsqueeze(1)).sum(-1) + self.D * x  # (b, d)
        return self.out_proj(y * F.silu(z)), (conv_state, h)


class MambaLM(nn.Module):
    """Embedding -> n_layer x [x + MambaBlock(RMSNorm(x))] -> RMSNorm -> tied head. No positional
    embedding: the recurrence knows the order."""

    def __init__(self, vocab_size, n_layer, d_model, d_state=16, d_conv=4, expand=2, selective=True):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, d_model)
        self.layers = nn.ModuleList(MambaBlock(d_model, d_state, d_conv, expand, selective) for _ in range(n_layer))
        self.norms = nn.ModuleList(RMSNorm(d_model) for _ in range(n_layer))
        self.norm_f = RMSNorm(d_model)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        self.lm_head.weight = self.embedding.weight  # weight tying
        nn.init.normal_(self.embedding.weight, std=0.02)  # small: the tied head starts near uniform

    def forward(self, idx):
        x = self.embedding(idx)  # (b, l, d_model)
        for norm, layer in zip(self.norms, self.layers):
            x = x + layer(norm(x))
        return self.lm_head(self.norm_f(x)), x.new_zeros(())  # logits (b, l, V), no auxiliary loss

    @torch.no_grad()
    def step(self, idx, states=None):
        """idx (b,) one token per sequence -> logits (b, V), the new per-layer states."""
        x = self.embedding(idx)  # (b, d_model)
        states = states or [None] * len(self.layers)
        new = []
        for norm, layer, s in zip(self.norms, self.layers, states):
            y, s = layer.step(norm(x), s)
            x = x + y
            new.append(s)
        return self.lm_head(self.norm_f(x)), new

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0):
        """Feed the prompt token by token, then sample: the state is all the memory there is."""
        states, logits = None, None
        for t in range(idx.shape[1]):
            logits, states = self.step(idx[:, t], states)
        out = [idx]
        for _ in range(max_new_tokens):
            nxt = torch.multinomial(F.softmax(logits / temperature, dim=-1), 1)  # (b, 1)
            out.append(nxt)
            logits, states = self.step(nxt[:, 0], states)
        return torch.cat(out, dim=1), states


def selective_copy_batch(batch_size, copy_len, n_tokens, vocab, gen=None):
    """The selective-copying task (Mamba §4.1.1, Fig. 2): `n_tokens` data tokens (ids 1..vocab) sit at
    random positions among `copy_len` blanks (id 0), then `n_tokens` markers (id vocab+1) ask for them
    in order. Unlike plain copying the gaps vary, so a time-invariant model cannot solve it by a fixed
    delay: it must *select* what to keep. -> x (B, copy_len + n_tokens), y (same; -1 = no loss)."""
    data = torch.randint(1, vocab + 1, (batch_size, n_tokens), generator=gen)  # (B, K)
    pos = torch.rand(batch_size, copy_len, generator=gen).argsort(-1)[:, :n_tokens].sort(-1).values
    x = torch.zeros(batch_size, copy_len + n_tokens, dtype=torch.long)
    x.scatter_(1, pos, data)
    x[:, copy_len:] = vocab + 1
    y = torch.full_like(x, -1)
    y[:, copy_len:] = data  # the answer: the data tokens in their original order
    return x, y


# --- Milestone: attention and Mixture-of-Experts --------------------------------------------------
class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd, n_head, dropout=0.0):
        super().__init__()
        if n_embd % n_head:
            raise ValueError(f"n_embd={n_embd} must be divisible by n_head={n_head}")
        self.n_head, self.dropout = n_head, dropout
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # (B, T, C) each
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hd)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))  # (B, T, C)


class MLP(nn.Module):
    """The dense FFN: GELU(x W1 + b1) W2 + b2."""

    def __init__(self, n_embd, d_ff):
        super().__init__()
        self.c_fc, self.c_proj = nn.Linear(n_embd, d_ff), nn.Linear(d_ff, n_embd)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x)))


def load_balancing_loss(probs, expert_idx, n_experts):
    """Switch Transformer eq. 4 generalized to top-k: E * Σ_i f_i P_i (the paper writes N for the
    number of experts), with f_i the fraction of the N*k routing assignments (N tokens) that went to
    expert i (not differentiable) and P_i the mean router probability of expert i (differentiable).
    Equals 1 when routing is uniform, up to E when it collapses onto one expert.
    probs (N, E); expert_idx (N, k)."""
    f = torch.bincount(expert_idx.flatten(), minlength=n_experts).float() / expert_idx.numel()  # (E,)
    P = probs.float().mean(0)  # (E,)
    return n_experts * (f * P).sum()


def router_z_loss(logits):
    """ST-MoE eq. 5: mean over tokens of logsumexp(logits)^2; keeps router logits small, so the
    softmax stays in a range where rounding (bfloat16) does not flip routing decisions."""
    return torch.logsumexp(logits.float(), dim=-1).pow(2).mean()


class MoE(nn.Module):
    """A Mixture-of-Experts FFN. Each token goes to its top_k experts, weighted by the softmax router's probabilities
    renormalized over the chosen k (Mixtral §2.1's softmax of the top-k logits) or, for k = 1, by the chosen p_i
    itself (Switch §2.1 eq. 2; renormalized it would be 1.0, and the task loss would not train the router), plus
    n_shared always-on experts (DeepSeekMoE §3.2, merged into one dense FFN of width n_shared*d_ff). An expert takes
    at most capacity = ceil(capacity_factor * N * k / E) tokens; overflow assignments are dropped and that token gets
    nothing from that expert (the residual carries it past the layer; Switch §2.2).
    forward(x) -> (y, aux) where aux = aux_loss_coef * balancing + z_loss_coef * z-loss."""

    def __init__(self, d_model, d_ff, n_experts, top_k, capacity_factor=1.25, n_shared=0,
                 aux_loss_coef=0.01, z_loss_coef=0.001, router_noise=0.0):
        super().__init__()
        if not 1 <= top_k <= n_experts:
            raise ValueError(f"top_k={top_k} must be between 1 and n_experts={n_experts}")
        self.n_experts, self.top_k, self.capacity_factor = n_experts, top_k, capacity_factor
        self.aux_loss_coef, self.z_loss_coef, self.router_noise = aux_loss_coef, z_loss_coef, router_noise
        self.router = nn.Linear(d_model, n_experts, bias=False)
        # All experts' weights stacked so that one batched matmul (bmm) runs every expert at once;
        # initialized as nn.Linear is (uniform, ±1/sqrt(fan_in)), like the dense FFN it replaces.
        def init(*shape, fan_in):
            return nn.Parameter(torch.empty(*shape).uniform_(-fan_in ** -0.5, fan_in ** -0.5))
        self.w1 = init(n_experts, d_model, d_ff, fan_in=d_model)  # (E, C, F)
        self.b1 = init(n_experts, 1, d_ff, fan_in=d_model)  # (E, 1, F)
        self.w2 = init(n_experts, d_ff, d_model, fan_in=d_ff)  # (E, F, C)
        self.b2 = init(n_experts, 1, d_model, fan_in=d_ff)  # (E, 1, C)
        self.shared = MLP(d_model, n_shared * d_ff) if n_shared else None
        self.stats = {}  # of the last forward: per-expert load, drop rate (detached, for logging)

    def route(self, x):
        """x (N, C) -> logits (N, E), probs (N, E), chosen experts (N, k), their gates (N, k)."""
        logits = self.router(x).float()  # (N, E)
        if self.training and self.router_noise > 0:  # noisy top-k (Shazeer et al. §2.1), fixed std
            logits = logits + torch.randn_like(logits) * self.router_noise
        probs = F.softmax(logits, dim=-1)  # (N, E)
        top_p, top_i = probs.topk(self.top_k, dim=-1)  # (N, k)
        return logits, probs, top_i, top_p if self.top_k == 1 else top_p / top_p.sum(-1, keepdim=True)

    def forward(self, x):
        shape, E, k = x.shape, self.n_experts, self.top_k
        x = x.reshape(-1, shape[-1])  # (N, C)
        N = x.shape[0]
        logits, probs, top_i, gates = self.route(x)
        capacity = math.ceil(self.capacity_factor * N * k / E)
        # Dispatch by sorting: list the N*k assignments choice-major (every token's first choice
        # before any second choice, so first choices win the capacity), stable-sort them by expert;
        # an assignment's slot is its rank among its expert's assignments.
        expert = top_i.t().reshape(-1)  # (k*N,)
        token = torch.arange(N, device=x.device).repeat(k)  # (k*N,)
        gate = gates.t().reshape(-1)  # (k*N,)
        order = torch.sort(expert, stable=True).indices
        expert, token, gate = expert[order], token[order], gate[order]
        load = torch.bincount(expert, minlength=E)  # (E,) assignments per expert, before dropping
        first = torch.cumsum(load, 0) - load  # (E,) where each expert's run starts
        slot = torch.arange(k * N, device=x.device) - first[expert]
        keep = slot < capacity
        expert, token, gate, slot = expert[keep], token[keep], gate[keep], slot[keep]
        buf = x.new_zeros(E * capacity, shape[-1])  # (E*cap, C); empty slots stay 0
        buf[expert * capacity + slot] = x[token]
        h = F.gelu(torch.bmm(buf.view(E, capacity, -1), self.w1) + self.b1)  # (E, cap, F)
        out_e = (torch.bmm(h, self.w2) + self.b2).view(E * capacity, -1)  # (E*cap, C)
        y = torch.zeros_like(x).index_add_(0, token, (out_e[expert * capacity + slot] * gate[:, None]).to(x.dtype))
        if self.shared is not None:
            y = y + self.shared(x)
        aux = self.aux_loss_coef * load_balancing_loss(probs, top_i, E) + self.z_loss_coef * router_z_loss(logits)
        self.stats = {"load": load.detach(), "drop_rate": 1.0 - keep.float().mean().detach(), "capacity": capacity,
                      "kept_per_expert": torch.bincount(expert, minlength=E).detach()}
        return y.view(shape), aux


class Block(nn.Module):
    def __init__(self, n_embd, n_head, dropout, moe_kwargs=None):
        super().__init__()
        self.ln_1, self.ln_2 = RMSNorm(n_embd), RMSNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout)
        self.ffn = MoE(n_embd, **moe_kwargs) if moe_kwargs else MLP(n_embd, 4 * n_embd)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        x = x + self.drop(self.attn(self.ln_1(x)))
        if isinstance(self.ffn, MoE):
            y, aux = self.ffn(self.ln_2(x))
        else:
            y, aux = self.ffn(self.ln_2(x)), x.new_zeros(())
        return x + self.drop(y), aux


class TransformerLM(nn.Module):
    """A pre-norm GPT (RMSNorm, learned positions, tied head) with dense or MoE FFNs."""

    def __init__(self, vocab_size, block_size, n_layer, n_embd, n_head, dropout=0.0, moe_kwargs=None):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab_size, n_embd), nn.Embedding(block_size, n_embd)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, dropout, moe_kwargs) for _ in range(n_layer))
        self.ln_f = RMSNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight
        for emb in (self.wte, self.wpe):
            nn.init.normal_(emb.weight, std=0.02)  # GPT-2's init: the tied head starts near uniform

    def forward(self, idx):
        T = idx.shape[1]
        x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))  # (B, T, C)
        aux = x.new_zeros(())
        for block in self.blocks:
            x, a = block(x)
            aux = aux + a
        return self.lm_head(self.ln_f(x)), aux  # (B, T, V), scalar



# --- Data -----------------------------------------------------------------------------------------
class ShakespeareTask:
    """Next-character prediction on tinyshakespeare: the raw text read from data_dir (downloaded there
    when absent); token ids (uint16, first 90% train, last 10% val) and the vocabulary written under
    out_dir by rank 0; `get_batch` draws random windows from a uint16 memmap (nanoGPT)."""

    def __init__(self, cfg, master=True):
        meta_path, self.block_size, self.cfg = os.path.join(cfg.out_dir, "meta.json"), cfg.block_size, cfg
        if master and not os.path.exists(meta_path):
            raw = download(DATA_URL, os.path.join(cfg.data_dir, "tinyshakespeare", "input.txt"), DATA_SHA256)
            with open(raw, encoding="utf-8") as f:
                text = f.read()
            stoi = {ch: i for i, ch in enumerate(sorted(set(text)))}
            ids = np.array([stoi[ch] for ch in text], dtype=np.uint16)
            for split, part in (("train", ids[:int(0.9 * len(ids))]), ("val", ids[int(0.9 * len(ids)):])):
                part.tofile(os.path.join(cfg.out_dir, f"{split}.bin"))
            with open(meta_path + ".tmp", "w") as f:  # last, renamed into place: then the .bin files are whole
                json.dump({"chars": list(stoi)}, f)
            os.replace(meta_path + ".tmp", meta_path)
        if dist.is_initialized():
            dist.barrier()  # other ranks wait until rank 0 has prepared the files
        with open(meta_path) as f:
            self.chars = json.load(f)["chars"]
        self.vocab_size = len(self.chars)

    def get_batch(self, split, device, gen=None):
        data = np.memmap(os.path.join(self.cfg.out_dir, f"{split}.bin"), dtype=np.uint16, mode="r")
        ix = torch.randint(len(data) - self.block_size - 1, (self.cfg.batch_size,), generator=gen).tolist()
        x = torch.stack([torch.from_numpy(data[i:i + self.block_size].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + self.block_size].astype(np.int64)) for i in ix])
        return x.to(device), y.to(device)  # (B, T), (B, T)


class CopyTask:
    """Synthetic batches; evaluate draws its own from fixed generators, so evaluations compare."""

    def __init__(self, cfg):
        self.cfg, self.vocab_size, self.block_size = cfg, cfg.copy_vocab + 2, cfg.copy_len + cfg.copy_tokens

    def get_batch(self, split, device, gen=None):
        c = self.cfg
        x, y = selective_copy_batch(c.batch_size, c.copy_len, c.copy_tokens, c.copy_vocab, gen)
        return x.to(device), y.to(device)


# --- Training -------------------------------------------------------------------------------------
def build_model(cfg, name, vocab_size, block_size):
    """The comparison's models. MoE experts are 4C/(top_k+n_shared) wide, so the FFN parameters a
    token uses equal the dense model's 4C; Mamba gets twice the layers (Mamba §4.2: a Mamba block
    has ~6C^2 parameters, a Transformer block ~12C^2)."""
    if name in ("mamba", "mamba_lti"):
        return MambaLM(vocab_size, 2 * cfg.n_layer, cfg.n_embd, cfg.d_state, cfg.d_conv, cfg.expand,
                       selective=name == "mamba")
    moe = None
    if name in ("moe", "moe_nobal"):
        moe = dict(d_ff=max(1, 4 * cfg.n_embd // (cfg.top_k + cfg.n_shared)), n_experts=cfg.n_experts,
                   top_k=cfg.top_k, capacity_factor=cfg.capacity_factor, n_shared=cfg.n_shared,
                   aux_loss_coef=0.0 if name == "moe_nobal" else cfg.aux_loss_coef,
                   z_loss_coef=cfg.z_loss_coef, router_noise=cfg.router_noise)
    return TransformerLM(vocab_size, block_size, cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.dropout, moe)


def init_model(cfg, name, task, device="cpu", rank=0, world_size=1, load=None):
    """Model `name` for `task` and its AdamW; with --init_from=resume (or load=True) weights, optimizer
    and RNG continue from out_dir/ckpt_<name>.pt. -> (model, optimizer, checkpoint or None)."""
    torch.manual_seed(cfg.seed + rank)
    model = build_model(cfg, name, task.vocab_size, task.block_size).to(device)
    decay = [p for p in model.parameters() if p.dim() >= 2]  # matrices; not norms, biases, A_log, D
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay,
                                   "weight_decay": 0.0}], lr=cfg.learning_rate, betas=(0.9, 0.95))
    if not (cfg.init_from == "resume" if load is None else load):
        return model, optimizer, None
    path = os.path.join(cfg.out_dir, f"ckpt_{name}.pt")
    return model, optimizer, resume(path, cfg, model, optimizer, rank, world_size, stage=name)


def get_lr(cfg, step):
    """Linear warmup, then cosine decay to min_lr at lr_decay_iters (nanoGPT)."""
    if step < cfg.warmup_iters:
        return cfg.learning_rate * (step + 1) / (cfg.warmup_iters + 1)
    if step > cfg.lr_decay_iters:
        return cfg.min_lr
    ratio = (step - cfg.warmup_iters) / max(1, cfg.lr_decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.learning_rate - cfg.min_lr)


def lm_loss(logits, y):
    return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), y.view(-1), ignore_index=-1)


def train(cfg, name, task, rank=0, world_size=1, local_rank=0) -> dict:
    """Train one model of the comparison on `task`; -> the last evaluation (plus wall time, params)."""
    if cfg.gradient_accumulation_steps % world_size:
        raise UserError(f"--gradient_accumulation_steps={cfg.gradient_accumulation_steps} must be a multiple of "
                        f"the number of ranks ({world_size})")
    grad_accum, master = cfg.gradient_accumulation_steps // world_size, rank == 0  # each rank does its share
    device, ctx, scaler = setup_device(cfg, local_rank)
    scaler = scaler or torch.amp.GradScaler(enabled=False)  # disabled, it passes everything through (nanoGPT)
    raw_model, optimizer, ckpt = init_model(cfg, name, task, device, rank, world_size)
    step, best_val, elapsed = (ckpt["step"], ckpt["best_val"], ckpt["elapsed"]) if ckpt else (0, float("inf"), 0.0)
    model = torch.compile(raw_model) if cfg.compile else raw_model
    if world_size > 1:
        model = DDP(model, device_ids=[local_rank] if device.startswith("cuda") else None)
    n_params = sum(p.numel() for p in raw_model.parameters())
    if master:
        print(f"[{name}] {n_params / 1e6:.3f}M parameters, from step {step}")
    tokens_per_step = cfg.batch_size * task.block_size * cfg.gradient_accumulation_steps
    metrics, t0 = {}, time.time()
    while step < cfg.max_iters:
        lr = get_lr(cfg, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        for micro_step in range(grad_accum):
            x, y = task.get_batch("train", device)
            if world_size > 1:  # all-reduce the gradients only after the last micro-batch
                model.require_backward_grad_sync = micro_step == grad_accum - 1
            with ctx:
                logits, aux = model(x)
                loss = (lm_loss(logits, y) + aux) / grad_accum
            scaler.scale(loss).backward()
        if cfg.grad_clip > 0:
            scaler.unscale_(optimizer)  # clip the true gradients
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        scaler.step(optimizer)  # skipped when float16 gradients overflowed
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        dt, t0 = time.time() - t0, time.time()
        elapsed += dt
        if master and step % cfg.log_interval == 0:
            print(f"[{name}] step {step}: loss {loss.item() * grad_accum:.4f}, lr {lr:.2e}, "
                  f"{tokens_per_step / dt:,.0f} tok/s, {dt * 1000:.1f} ms/step")
        if step % cfg.eval_interval == 0 or step == cfg.max_iters:
            metrics = evaluate(raw_model, task, cfg, device, ctx)
            metrics.update(model=name, step=step, lr=lr, time_s=elapsed, params=n_params)
            if master:
                extra = f", val acc {metrics['val_acc']:.4f}" if cfg.mode == "copy" else ""
                if "load_cv" in metrics:
                    extra += f", load CV {metrics['load_cv']:.3f}, dropped {metrics['drop_rate']:.3f}"
                print(f"[{name}] step {step}: train {metrics['train_loss']:.4f}, "
                      f"val {metrics['val_loss']:.4f}{extra}")
                log_jsonl(cfg, metrics)
                if metrics["val_loss"] < best_val or cfg.always_save_checkpoint:
                    best_val = min(best_val, metrics["val_loss"])
                    save_checkpoint(os.path.join(cfg.out_dir, f"ckpt_{name}.pt"), model, optimizer, cfg, step,
                                    best_val, stage=name, elapsed=elapsed)
            t0 = time.time()  # evaluation time is not training time
    if not metrics:  # resumed a run that had already finished: report its final state
        metrics = evaluate(raw_model, task, cfg, device, ctx)
        metrics.update(model=name, step=step, lr=get_lr(cfg, step), time_s=elapsed, params=n_params)
    if world_size > 1:
        print(f"[rank {rank}] [{name}] fingerprint {fingerprint(raw_model)}")
    return metrics


# --- Evaluation / inference -----------------------------------------------------------------------
@torch.no_grad()
def evaluate(model, task, cfg, device, ctx):
    """Mean loss per split over eval_iters batches from fixed generators (every eval and every model
    sees the same batches; the global RNG is untouched, so resumed runs stay exact). Also: copy
    accuracy on the answer positions, MoE expert load and drop rate."""
    model.eval()
    out, moes, load, drops, correct, total = {}, [m for m in model.modules() if isinstance(m, MoE)], 0, [], 0, 0
    for split in ("train", "val"):
        gen = torch.Generator().manual_seed(cfg.seed + (1_000_003 if split == "val" else 2_000_003))
        losses = []
        for _ in range(cfg.eval_iters):
            x, y = task.get_batch(split, device, gen)
            with ctx:
                logits, _ = model(x)
            losses.append(lm_loss(logits, y).item())
            if split == "val":
                mask = y >= 0
                correct += (logits.argmax(-1)[mask] == y[mask]).sum().item()
                total += mask.sum().item()
                if moes:
                    load = load + torch.stack([m.stats["load"].float().cpu() for m in moes])  # (layers, E)
                    drops += [float(m.stats["drop_rate"]) for m in moes]
        out[f"{split}_loss"] = sum(losses) / len(losses)
    out["val_acc"] = correct / max(1, total)
    if moes:  # coefficient of variation of per-expert load, per layer, averaged over layers
        out["load_cv"] = (load.std(1, unbiased=False) / load.mean(1)).mean().item()
        out["load_frac"] = (load.sum(0) / load.sum()).tolist()
        out["drop_rate"] = sum(drops) / len(drops)
    model.train()
    return out


def bench(cfg):
    """Sequential loop vs parallel scan (forward, forward+backward, max difference) as l grows; then
    the memory of Mamba's recurrent state vs a Transformer's KV cache as generation proceeds."""
    device, _, _ = setup_device(cfg)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def ms(fn):  # the best of 5 wall times after a warm-up call, waiting for the GPU each time
        return 1000 * min(timeit.repeat(lambda: (fn(), sync()), setup=sync, number=1, repeat=6)[1:])

    torch.manual_seed(cfg.seed)
    b, d, n, lengths = 1, cfg.expand * cfg.n_embd, cfg.d_state, [int(s) for s in cfg.bench_lengths.split(",")]
    setup = f"b={b}, d={d}, n={n}, float32, {torch.get_num_threads()} threads"
    print(f"scan benchmark on {device} ({setup})\n"
          f"{'l':>6} {'seq fwd ms':>11} {'par fwd ms':>11} {'seq f+b ms':>11} {'par f+b ms':>11} "
          f"{'speed-up f+b':>13} {'max |diff|':>11}")
    rows = []
    for l in lengths:
        shapes = [(b, l, d), (b, l, d), (d, n), (b, l, n), (b, l, n), (d,)]
        u, delta, A, B, C, D = (torch.randn(shape, device=device) for shape in shapes)
        args = [t.requires_grad_() for t in (u, F.softplus(delta), -torch.exp(A), B, C, D)]
        row = {"l": l}
        for kind, scan in [("seq", selective_scan_sequential), ("par", selective_scan_parallel)]:
            with torch.no_grad():
                row[f"{kind}_fwd_ms"] = ms(lambda: scan(*args))
            row[f"{kind}_fwdbwd_ms"] = ms(lambda: scan(*args).sum().backward())
        with torch.no_grad():
            diff = selective_scan_parallel(*args) - selective_scan_sequential(*args)
        row.update(max_abs_diff=diff.abs().max().item(), speedup_fwdbwd=row["seq_fwdbwd_ms"] / row["par_fwdbwd_ms"])
        print(f"{l:>6} {row['seq_fwd_ms']:>11.1f} {row['par_fwd_ms']:>11.1f} {row['seq_fwdbwd_ms']:>11.1f} "
              f"{row['par_fwdbwd_ms']:>11.1f} {row['speedup_fwdbwd']:>12.1f}x {row['max_abs_diff']:>11.2e}")
        log_jsonl(cfg, {"bench": "scan", **row})
        rows.append(row)
    # Generation memory: Mamba's state is measured from the tensors step() carries; a Transformer of
    # the same width and depth caches K and V (2 * n_layer * T * C numbers) for every past token.
    mamba = MambaLM(64, 2 * cfg.n_layer, cfg.n_embd, cfg.d_state, cfg.d_conv, cfg.expand).to(device)
    print(f"\ngeneration memory per sequence, float32 (Mamba {2 * cfg.n_layer} layers, Transformer "
          f"{cfg.n_layer} layers, C={cfg.n_embd})\n{'tokens':>7} {'Mamba state KB':>15} {'KV cache KB':>12}")
    for T in lengths:
        _, states = mamba.generate(torch.zeros(1, 1, dtype=torch.long, device=device), T - 1)
        state_bytes = sum(t.numel() * t.element_size() for s in states for t in s)
        kv_bytes = 2 * cfg.n_layer * T * cfg.n_embd * 4
        print(f"{T:>7} {state_bytes / 1024:>15.1f} {kv_bytes / 1024:>12.1f}")
        log_jsonl(cfg, {"bench": "memory", "tokens": T, "mamba_state_bytes": state_bytes,
                        "kv_cache_bytes": kv_bytes})
    plot_scan_bench(cfg, rows, f"{device}, {setup}")
    return rows


def plot_scan_bench(cfg, rows, setup):
    """The scan bench's printed times against l, log-log, to bench_scan.png; each parallel
    forward+backward point is labelled with its printed speed-up over the loop."""
    if (plt := pyplot("bench_scan.png")) is None:
        return
    fig, ax = plt.subplots(figsize=(9, 5))
    lengths = [r["l"] for r in rows]
    for color, kind, name, marker in (("C0", "par", "parallel scan", "o"), ("C3", "seq", "sequential loop", "s")):
        for part, label, style in (("fwdbwd", "forward + backward", "-"), ("fwd", "forward", "--")):
            ax.plot(lengths, [r[f"{kind}_{part}_ms"] for r in rows], color=color, marker=marker, ls=style,
                    label=f"{name}, {label}")
    for r in rows:
        ax.annotate(f"{r['speedup_fwdbwd']:.1f}x", (r["l"], r["par_fwdbwd_ms"]), textcoords="offset points",
                    xytext=(0, -14), ha="center", fontsize=8)
    ax.set(xscale="log", yscale="log", xlabel="sequence length l (tokens)", ylabel="wall time, best of 5 calls (ms)")
    ax.set_xticks(lengths, [str(l) for l in lengths])
    ax.set_xticks([], minor=True)
    ax.legend(title="numbers: speed-up, loop / parallel scan, forward + backward", title_fontsize=8)
    ax.set_title(f"python 07_mamba_moe.py --mode=bench --bench_lengths={cfg.bench_lengths}\n({setup})", fontsize=10)
    save_png(fig, os.path.join(cfg.out_dir, "bench_scan.png"))


def plot_curves(cfg, results, histories):
    """Val accuracy (copy) or val loss (lm) against step and wall time, to <mode>_curves.png; in lm
    mode also the expert-load histogram with and without balancing, to expert_load.png."""
    if (plt := pyplot(f"{cfg.mode}_curves.png")) is None:
        return
    copy = cfg.mode == "copy"
    metric, ylabel = ("val_acc", "val accuracy (tokens recalled)") if copy else ("val_loss", "val loss (nats/char)")
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, xlabel in zip(axes, ("step", "time_s"), ("step", "training wall time (s)")):
        for name, hist in histories.items():
            ax.plot([h[key] for h in hist], [h[metric] for h in hist], marker=".", label=name)
        ax.set(xlabel=xlabel, ylabel=ylabel)
        ax.legend()
    run = f"python 07_mamba_moe.py --mode={cfg.mode}: {cfg.max_iters} steps, {torch.get_num_threads()} threads"
    task = (f"Selective copying, length {cfg.copy_len}, {cfg.copy_tokens} tokens to recall" if copy
            else "Character-level tinyshakespeare")
    fig.suptitle(f"{task} ({run})", fontsize=10)
    save_png(fig, os.path.join(cfg.out_dir, f"{cfg.mode}_curves.png"))
    moes = {n: r for n, r in results.items() if "load_frac" in r}
    if moes:
        fig, ax = plt.subplots(figsize=(6, 4))
        width = 0.8 / len(moes)
        for j, (name, r) in enumerate(moes.items()):
            xs = [i + j * width for i in range(len(r["load_frac"]))]
            ax.bar(xs, r["load_frac"], width, label=f"{name} (CV {r['load_cv']:.2f})")
        ax.axhline(1 / cfg.n_experts, color="k", ls="--", lw=1, label="uniform")
        ax.set(xlabel="expert", ylabel="fraction of routed tokens (val)",
               title=f"Expert load, top-{cfg.top_k} of {cfg.n_experts} experts\n({run})")
        ax.title.set_fontsize(9)
        ax.legend()
        save_png(fig, os.path.join(cfg.out_dir, "expert_load.png"))


def run_comparison(cfg):
    """Modes copy and lm: train each model in turn; print (and return) the results, with each model's
    val loss at the training time of the fastest (interpolated between evaluations); lm mode also
    plots them and samples the Mamba LM through its recurrent step()."""
    rank, local_rank, world_size = setup_ddp()
    try:
        task = CopyTask(cfg) if cfg.mode == "copy" else ShakespeareTask(cfg, rank == 0)
        results = {name: train(cfg, name, task, rank, world_size, local_rank) for name in model_names(cfg)}
    finally:
        if world_size > 1:
            dist.barrier()
            dist.destroy_process_group()
    if rank != 0:
        return results
    histories = {}
    with open(os.path.join(cfg.out_dir, "log.jsonl")) as f:
        for rec in map(json.loads, f):
            if rec.get("model") in results:  # a resumed run appends: its records replace those from its step on
                hist = histories.setdefault(rec["model"], [])
                hist[:] = [h for h in hist if h["step"] < rec["step"]] + [rec]
    t_equal = min(h[-1]["time_s"] for h in histories.values())
    print(f"\n{'model':<10} {'params':>9} {'steps':>6} {'val loss':>9} {'val acc':>8} {'wall s':>8} "
          f"{'val@' + format(t_equal, '.0f') + 's':>9} {'load CV':>8} {'dropped':>8}")
    for name, r in results.items():
        times, losses = zip(*[(h["time_s"], h["val_loss"]) for h in histories[name]])
        r["val_loss_equal_time"] = float(np.interp(t_equal, times, losses))
        moe = f"{r['load_cv']:>8.3f} {r['drop_rate']:>8.3f}" if "load_cv" in r else f"{'-':>8} {'-':>8}"
        print(f"{name:<10} {r['params']:>9,} {r['step']:>6} {r['val_loss']:>9.4f} {r['val_acc']:>8.4f} "
              f"{r['time_s']:>8.1f} {r['val_loss_equal_time']:>9.4f} {moe}")
    plot_curves(cfg, results, histories)
    if cfg.mode == "lm" and "mamba" in results:  # the trained weights, back from the checkpoint through init_model
        model, _, _ = init_model(cfg, "mamba", task, load=True)
        torch.manual_seed(cfg.seed)
        out, _ = model.generate(torch.zeros(1, 1, dtype=torch.long), 200)
        text = "".join(task.chars[i] for i in out[0].tolist())
        print(f"\nMamba sample (recurrent step(), constant memory):\n{text}")
    return results


# --- main -----------------------------------------------------------------------------------------
def main(argv=None):
    return run_cli({"copy": run_comparison, "lm": run_comparison, "bench": bench}, argv)


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
