"""LoRA, a reward model, PPO and DPO: the InstructGPT pipeline end to end, graded by a hidden score.

What you will learn: low-rank adapters (LoRA) and why they make fine-tuning cheap; supervised
fine-tuning (SFT); a Bradley-Terry reward model learned from preference pairs; PPO with a per-token
KL leash, a value head and GAE; DPO, which skips the reward model. The preferences come from a hidden
`true_reward(text)` (here: the fraction of characters that are vowels) that the policy never sees,
so the script can grade every stage by the thing the preferences stood for, and you can watch
over-optimization of the learned reward happen (true reward vs KL plot).

Run it:
    python 06_lora_rlhf.py                                   # CPU: --mode all --preset cpu
    python 06_lora_rlhf.py --mode sft                        # one stage (pretrain|sft|rm|ppo|dpo)
    python 06_lora_rlhf.py --preset gpu                      # one GPU: GPT-2 124M as the base
    python 06_lora_rlhf.py --preset gpu --prefs hh-rlhf      # Anthropic's human preferences
    torchrun --standalone --nproc_per_node=8 06_lora_rlhf.py --preset gpu   # several GPUs (DDP)
    python 06_lora_rlhf.py --base out/03_gpt/ckpt.pt         # start from a 03_gpt.py checkpoint

Pipeline (--mode all): base (pretrain a char GPT on tinyshakespeare, or load one) -> SFT with LoRA on
the corpus windows the hidden score likes (also full fine-tuning at the same budget, for comparison)
-> two SFT samples per prompt, the one with the higher true score "chosen" -> reward model -> PPO
against it -> DPO on the same pairs -> one table: true reward (mean +- s.e. over fixed prompts), KL
to the reference (the SFT model), samples; out_dir/ppo_reward_vs_kl.png and rlhf.png (the curves, the bars).

Expected result (cpu preset, ~4 CPU-minutes on one core): true reward over 512 held-out prompts,
mean +- s.e. (KL to SFT, nats per 32-char response): base 0.280 +- 0.002 (1.7), SFT 0.311 +- 0.002,
PPO 0.400 +- 0.002 (5.3), DPO 0.455 +- 0.002 (10.5; with --dpo_beta=0.5: 0.493 at KL 19.7, samples
like "e oul I ute reel inour ire. I od": the hidden score is hacked); RM held-out pairwise accuracy 1.00;
LoRA trains 2.7% of the weights (a 42 KB adapter): held-out SFT loss 2.156 vs 2.122 for full FT.

Notation: B batch, T sequence length, P prompt length, R response length (T = P + R), C channels
(n_embd), nh heads, hd head dim, V vocab, r LoRA rank, alpha LoRA scale; pi the policy, pi_ref the
reference, r_phi the reward model, beta the KL (PPO) or DPO coefficient, gamma/lambda GAE.

References: LoRA (Hu et al. 2021, arXiv:2106.09685); InstructGPT (Ouyang et al. 2022,
arXiv:2203.02155); Ziegler et al. 2019 (arXiv:1909.08593, adaptive KL); PPO (Schulman et al. 2017,
arXiv:1707.06347); GAE (arXiv:1506.02438); DPO (Rafailov et al. 2023, arXiv:2305.18290);
HH-RLHF (Bai et al. 2022, arXiv:2204.05862). Tests check LoRA against nn.Linear, and the losses, GAE
and KL estimators against hand-computed values.
"""
import copy
import dataclasses
import gzip
import hashlib
import inspect
import json
import math
import os
import re
import struct
import sys
import tempfile
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


# --- Config ---------------------------------------------------------------------------------------
SCRIPT_NAME = "06_lora_rlhf"  # the file's stem: default out_dir is out/<SCRIPT_NAME>


@dataclass
class Config:
    # I/O
    out_dir: str = f"out/{SCRIPT_NAME}"  # stage checkpoints, log.jsonl, pairs, plot
    data_dir: str = os.environ.get("LLM_DATA_DIR", "data")  # raw downloads; read, never modified
    init_from: str = "scratch"  # scratch | resume (continue the stage(s) from out_dir checkpoints)
    mode: str = "all"  # all | pretrain | sft | rm | ppo | dpo
    base: str = "scratch"  # scratch (pretrain a char GPT) | gpt2 | path/to/03_gpt/ckpt.pt
    prefs: str = "synthetic"  # synthetic (pairs graded by true_reward) | hh-rlhf (Anthropic's)
    # model (only for --base scratch; otherwise the checkpoint says)
    n_layer: int = 3  # number of blocks
    n_head: int = 4  # attention heads
    n_embd: int = 96  # channels C
    block_size: int = 64  # context length for pretraining
    dropout: float = 0.0  # dropout in pretraining
    bias: bool = True  # biases in Linear and LayerNorm
    # pretraining (--base scratch) -- also batch size, clipping and logging for every stage
    batch_size: int = 32  # sequences per micro-batch (per rank)
    max_iters: int = 500  # pretraining optimizer steps
    lr_decay_iters: int = 500  # cosine decay length (usually = max_iters)
    learning_rate: float = 2e-3  # peak pretraining learning rate
    min_lr: float = 2e-4  # learning rate at the end of the cosine
    warmup_iters: int = 50  # linear warmup steps
    weight_decay: float = 0.1  # AdamW decoupled weight decay (pretraining, 2-D weights only)
    grad_clip: float = 1.0  # clip the global gradient norm (0 = off)
    eval_interval: int = 100  # steps between evaluations and checkpoints (PPO: iterations x 10)
    eval_iters: int = 20  # batches per validation estimate
    log_interval: int = 50  # steps between progress lines (PPO: iterations x 10)
    # task: fixed-shape prompt/response windows (no padding anywhere)
    prompt_len: int = 32  # P, prompt tokens
    response_len: int = 32  # R, tokens generated per prompt
    # LoRA
    lora_targets: str = "q_proj,v_proj"  # comma-separated projections to adapt (a name ends them)
    lora_r: int = 8  # rank r
    lora_alpha: float = 16.0  # scale alpha; the update is (alpha / r) B A
    lora_dropout: float = 0.0  # dropout on the adapter's input
    # SFT
    sft_iters: int = 200  # SFT steps (LoRA, and the full fine-tuning baseline)
    sft_lr: float = 3e-3  # LoRA learning rate
    sft_full_lr: float = 3e-4  # full fine-tuning learning rate (the baseline)
    sft_compare_full: bool = True  # also fine-tune every weight at the same budget, for the table
    sft_top_frac: float = 0.2  # SFT data: windows whose response is in this top fraction of score
    # preferences and reward model
    n_pairs: int = 2048  # prompts sampled twice for synthetic pairs (ties dropped)
    pref_margin: float = 0.04  # synthetic: pairs whose true scores differ by <= this are ties
    rm_iters: int = 200  # reward-model steps
    rm_lr: float = 1e-3  # reward-model learning rate
    rm_holdout: float = 0.1  # fraction of pairs held out for RM pairwise accuracy
    # PPO
    ppo_iters: int = 40  # rollout + update iterations
    ppo_batch: int = 128  # rollouts per iteration (per rank)
    ppo_epochs: int = 4  # passes over each batch of rollouts
    ppo_minibatch: int = 32  # rollouts per PPO gradient step
    ppo_lr: float = 3e-3  # policy (LoRA) and value-head learning rate
    kl_coef: float = 0.05  # beta: per-token KL penalty, initial value when adaptive
    kl_target: float = 0.0  # > 0: adapt beta toward this KL per response (Ziegler et al. 2.2)
    clip_range: float = 0.2  # epsilon of the clipped ratio
    vf_clip: float = 0.2  # value clip range
    vf_coef: float = 0.5  # value loss weight
    gamma: float = 1.0  # discount
    lam: float = 0.95  # GAE lambda
    # DPO
    dpo_iters: int = 100  # DPO steps
    dpo_lr: float = 3e-3  # LoRA learning rate
    dpo_beta: float = 2.0  # beta: larger keeps pi closer to pi_ref (0.1 is usual for GPT-2)
    # evaluation
    n_eval_prompts: int = 512  # fixed held-out prompts for the true-reward table
    n_samples_shown: int = 2  # samples printed per stage
    # system
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16 (autocast; float16 uses a GradScaler)
    seed: int = 1337  # base seed; rank r uses seed + r


PRESETS = {
    "tiny": dict(n_layer=1, n_head=2, n_embd=32, block_size=32, batch_size=8, max_iters=20,
                 lr_decay_iters=20, warmup_iters=2, eval_interval=10, eval_iters=2, log_interval=10,
                 prompt_len=8, response_len=8, sft_iters=10, n_pairs=64, rm_iters=10, ppo_iters=3,
                 ppo_batch=16, ppo_minibatch=8, ppo_epochs=2, dpo_iters=10, n_eval_prompts=16,
                 n_samples_shown=1),  # tests
    "cpu": dict(),  # the default: a laptop CPU, minutes
    "gpu": dict(base="gpt2", batch_size=32, prompt_len=64, response_len=48, lora_r=16, lora_alpha=32.0,
                sft_iters=500, sft_lr=1e-3, sft_full_lr=5e-5, n_pairs=8192, rm_iters=1500, rm_lr=3e-5,
                ppo_iters=200, ppo_batch=256, ppo_minibatch=64, ppo_lr=5e-4, dpo_iters=1000,
                dpo_lr=5e-4, dpo_beta=0.1, n_eval_prompts=1024),  # the real run
}
DEFAULT_PRESET = "cpu"
# Fields that define a stage checkpoint's shape: a checkpoint whose values differ cannot be loaded.
MODEL_KEYS = ("base", "prefs", "n_layer", "n_head", "n_embd", "block_size", "bias", "prompt_len",
              "response_len", "lora_targets", "lora_r")
MODES = ("all", "pretrain", "sft", "rm", "ppo", "dpo")
RULES = {"mode": MODES, "init_from": ("scratch", "resume"), "prefs": ("synthetic", "hh-rlhf"),
         "dtype": ("auto", "float32", "bfloat16", "float16"),
         **dict.fromkeys(("n_layer", "n_head", "n_embd", "block_size", "batch_size", "max_iters", "lr_decay_iters",
                          "learning_rate", "eval_interval", "eval_iters", "log_interval", "prompt_len",
                          "response_len", "lora_r", "lora_alpha", "sft_iters", "sft_lr", "sft_full_lr",
                          "sft_top_frac", "n_pairs", "rm_iters", "rm_lr", "ppo_iters", "ppo_batch", "ppo_epochs",
                          "ppo_minibatch", "ppo_lr", "clip_range", "vf_clip", "dpo_iters", "dpo_lr", "dpo_beta",
                          "n_eval_prompts"), "> 0"),
         **dict.fromkeys(("min_lr", "warmup_iters", "weight_decay", "grad_clip", "pref_margin", "kl_coef",
                          "kl_target", "vf_coef", "gamma", "lam", "n_samples_shown"), ">= 0"),
         **dict.fromkeys(("dropout", "lora_dropout", "rm_holdout"), "in [0, 1)")}


def check_config(cfg):
    """The rules that tie flags together (parse_args has applied RULES): ValueError names the flag."""
    if cfg.n_embd % cfg.n_head:
        raise ValueError(f"--n_embd={cfg.n_embd} must be a multiple of --n_head={cfg.n_head}")
    if cfg.min_lr > cfg.learning_rate:
        raise ValueError(f"--min_lr={cfg.min_lr} must not exceed --learning_rate={cfg.learning_rate}")
    for name in ("sft_top_frac", "gamma", "lam"):
        if getattr(cfg, name) > 1:
            raise ValueError(f"--{name} must be at most 1, not {getattr(cfg, name)}")
    if cfg.base != "scratch" and cfg.mode == "pretrain":
        raise ValueError("--mode pretrain only applies to --base scratch")
    if cfg.base == "scratch" and cfg.prompt_len + cfg.response_len > cfg.block_size:
        raise ValueError(f"--prompt_len + --response_len = {cfg.prompt_len + cfg.response_len} exceeds "
                         f"--block_size {cfg.block_size}")
    try:
        apply_lora(GPT(GPTConfig(block_size=1, vocab_size=1, n_layer=1, n_head=1, n_embd=1)), cfg.lora_targets)
    except ValueError as e:
        raise ValueError(f"--lora_targets: {e}") from None


# --- Milestone: the GPT being adapted (03_gpt.py's model, q/k/v apart) ----------------------------
@dataclass
class GPTConfig:
    block_size: int = 128
    vocab_size: int = 65
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = True
    gelu: str = "exact"  # exact: a Phi(a) | tanh: GPT-2's approximation of it (Hendrycks & Gimpel 2016, sec. 2)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with separate q/k/v projections. 03_gpt.py fuses them into
    one c_attn Linear(C, 3C) for speed; we split that weight when loading (it is just the three
    blocks stacked) so that LoRA can target the query and value projections as the paper does (LoRA
    sec. 7.1) with a plain nn.Linear wrapper, instead of a wrapper that knows about slices."""

    def __init__(self, n_embd, n_head, bias=True, dropout=0.0):
        super().__init__()
        if n_embd % n_head:
            raise ValueError(f"n_embd={n_embd} is not a multiple of n_head={n_head}")
        self.n_head, self.dropout = n_head, dropout
        self.q_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.k_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.v_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)

    def forward(self, x, cache=None):
        """cache: None, or a dict holding this layer's past keys/values (filled in place): the KV
        cache that makes sampling R tokens cost O(R) forward tokens instead of O(R^2)."""
        B, T, C = x.shape
        hd = C // self.n_head
        q = self.q_proj(x).view(B, T, self.n_head, hd).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.n_head, hd).transpose(1, 2)  # (B, nh, T, hd)
        v = self.v_proj(x).view(B, T, self.n_head, hd).transpose(1, 2)  # (B, nh, T, hd)
        past = cache is not None and "k" in cache
        if past:
            if T != 1:
                raise ValueError("with a filled cache, feed one token at a time")
            k, v = torch.cat([cache["k"], k], 2), torch.cat([cache["v"], v], 2)  # (B, nh, T', hd)
        if cache is not None:
            cache["k"], cache["v"] = k, v
        # softmax(q k^T / sqrt(hd) + causal mask) v; a single new token may see every cached one
        y = F.scaled_dot_product_attention(q, k, v, is_causal=not past,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))  # (B, T, C)


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg.n_embd, cfg.n_head, cfg.bias, cfg.dropout)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = nn.Sequential()  # named like nanoGPT's MLP, so its checkpoints load as they are
        self.mlp.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.mlp.gelu = nn.GELU(approximate="tanh" if cfg.gelu == "tanh" else "none")
        self.mlp.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, cache=None):
        x = x + self.drop(self.attn(self.ln_1(x), cache))  # pre-norm residual blocks (GPT-2)
        return x + self.drop(self.mlp(self.ln_2(x)))


class GPT(nn.Module):
    """nanoGPT's GPT-2 with learned positions and a tied lm_head. `body` returns the final hidden
    states, which the reward model and PPO's value head read."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.vocab_size, cfg.n_embd), wpe=nn.Embedding(cfg.block_size, cfg.n_embd),
            drop=nn.Dropout(cfg.dropout), h=nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)]),
            ln_f=nn.LayerNorm(cfg.n_embd, bias=cfg.bias)))
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # weight tying (Press & Wolf 2017)
        for m in self.modules():  # GPT-2's init: weights N(0, 0.02), biases 0
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        for name, p in self.named_parameters():  # and the residual projections scaled by 1/sqrt(2L)
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * cfg.n_layer))

    def body(self, idx, cache=None):
        """idx (B, T) token ids -> (B, T, C) final hidden states. cache: None or a list of n_layer
        dicts (see CausalSelfAttention); positions continue after what the cache holds."""
        B, T = idx.shape
        start = cache[0]["k"].size(2) if cache is not None and "k" in cache[0] else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds block_size {self.config.block_size}")
        pos = torch.arange(start, start + T, device=idx.device)  # (T,)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        for i, block in enumerate(self.transformer.h):
            x = block(x, None if cache is None else cache[i])
        return self.transformer.ln_f(x)

    def forward(self, idx, cache=None):
        return self.lm_head(self.body(idx, cache))  # (B, T, V)


@torch.no_grad()
def generate(model, prompts, n_new, temperature=1.0, generator=None):
    """Sample n_new tokens after prompts (B, P) with a KV cache -> (B, P + n_new)."""
    cache = [{} for _ in model.transformer.h]
    logits, out = model(prompts, cache)[:, -1], [prompts]  # (B, V)
    for i in range(n_new):
        out.append(torch.multinomial(F.softmax(logits.float() / temperature, -1), 1, generator=generator))  # (B, 1)
        if i < n_new - 1:
            logits = model(out[-1], cache)[:, -1]
    return torch.cat(out, 1)


# --- Milestone: LoRA ------------------------------------------------------------------------------
class LoRALinear(nn.Module):
    """y = W x + b + (alpha / r) B A dropout(x)  (LoRA eq. 3). W, b frozen; A (r, in) Kaiming
    uniform, B (out, r) zero, so a fresh adapter changes nothing and training starts at the base."""

    def __init__(self, base: nn.Linear, r=8, alpha=16.0, dropout=0.0):
        super().__init__()
        self.base, self.r, self.scaling = base, r, alpha / r
        base.weight.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear (and loralib) do
        self.dropout, self.enabled = nn.Dropout(dropout), True  # enabled=False: the base layer alone

    def forward(self, x):
        y = self.base(x)
        if self.enabled:
            y = y + self.scaling * F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)
        return y

    @torch.no_grad()
    def merged_linear(self):
        """A plain nn.Linear with W + (alpha / r) B A: the adapter folded in, inference at the base
        layer's cost (the adapter cannot be taken out again: keep the LoRALinear for that)."""
        lin = copy.deepcopy(self.base)
        lin.weight += (self.scaling * self.lora_B @ self.lora_A).to(lin.weight.dtype)  # (out, in), rank <= r
        return lin


def apply_lora(model, targets=("q_proj", "v_proj"), r=8, alpha=16.0, dropout=0.0):
    """Replace the named Linear layers of every block by LoRALinear and freeze everything else: only
    lora_A and lora_B train. A target (in a list or a comma-separated string) names a layer by the end
    of its name, as Hugging Face's peft does: "v_proj" is attn.v_proj, "c_proj" attn's and mlp's."""
    in_block = lambda name: re.sub(r"^transformer\.h\.\d+\.", "", name)  # noqa: E731
    layers = {n: m for n, m in model.named_modules() if n.startswith("transformer.h.") and isinstance(m, nn.Linear)}
    valid = sorted({in_block(n) for n in layers})
    targets = [t.strip() for t in (targets.split(",") if isinstance(targets, str) else targets) if t.strip()]
    bad = [t for t in targets if not any(v == t or v.endswith("." + t) for v in valid)]
    if bad or not targets:
        raise ValueError(f"unknown LoRA target {', '.join(bad) or '(none)'}; valid targets: {', '.join(valid)}")
    model.requires_grad_(False)
    for name, module in layers.items():
        if any(in_block(name) == t or in_block(name).endswith("." + t) for t in targets):
            parent, attr = name.rsplit(".", 1)
            setattr(model.get_submodule(parent), attr, LoRALinear(module, r, alpha, dropout))
    return model


def lora_state_dict(model):
    """The adapters alone: what a LoRA fine-tune ships (a few KB to MB, not the whole model). Load it
    into apply_lora(base model, same targets and rank) with model.load_state_dict(sd, strict=False)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}


def merge_lora(model):
    """Fold every adapter into its base weight and drop the LoRALinear wrappers (after SFT, so the
    merged SFT model becomes the frozen reference for PPO and DPO)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            parent, attr = name.rsplit(".", 1)
            setattr(model.get_submodule(parent), attr, module.merged_linear())
    return model


@contextmanager
def disable_adapters(model):
    """Inside this block the model is its base again: pi_ref for PPO and DPO without a second copy."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    for m in layers:
        m.enabled = False
    try:
        yield model
    finally:
        for m in layers:
            m.enabled = True


# --- Milestone: the hidden judge, the reward model, DPO and PPO -----------------------------------
def true_reward(text: str) -> float:
    """The hidden judge: the fraction of characters that are vowels. Dense (every character counts),
    verifiable, and measurable on any tokenizer; the policy only ever sees it through preferences."""
    return sum(c in "aeiouAEIOU" for c in text) / max(1, len(text))


class RewardModel(nn.Module):
    """r_phi(x, y): the GPT backbone and a scalar head on the last token's hidden state
    (InstructGPT sec. 3.5). Causal attention lets that last token summarize the whole text."""

    def __init__(self, gpt: GPT):
        super().__init__()
        self.gpt, self.head = gpt, nn.Linear(gpt.config.n_embd, 1)
        nn.init.zeros_(self.head.weight)

    def forward(self, seq):
        return self.head(self.gpt.body(seq)[:, -1]).squeeze(-1)  # (B,)


def bradley_terry_loss(r_chosen, r_rejected):
    """-log sigma(r_w - r_l): the reward model's pairwise loss (InstructGPT eq. 1)."""
    return -F.logsigmoid(r_chosen - r_rejected).mean()


def response_logprobs(model, seq, P, with_hidden=False):
    """log pi(y_t | x, y_<t) for the response part of seq (B, P + R) -> (B, R) token log-probs,
    (B, R, V) full log-distributions [, (B, R, C) hidden states before each response token]."""
    h = model.body(seq[:, :-1])[:, P - 1:]  # (B, R, C): the state that predicts y_t
    logp_all = F.log_softmax(model.lm_head(h).float(), dim=-1)  # (B, R, V)
    logp = logp_all.gather(-1, seq[:, P:, None]).squeeze(-1)  # (B, R)
    return (logp, logp_all, h) if with_hidden else (logp, logp_all)


def dpo_loss(logp_w, logp_l, ref_logp_w, ref_logp_l, beta):
    """DPO eq. 7: -log sigma(beta [(log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l))]).
    Returns (loss, implicit reward margin beta * [...], accuracy of the implicit reward)."""
    margin = beta * ((logp_w - ref_logp_w) - (logp_l - ref_logp_l))  # (B,)
    return -F.logsigmoid(margin).mean(), margin.mean(), (margin > 0).float().mean()


def kl_k1(logp, ref_logp):
    """Per-token KL estimate log pi(y_t) - log pi_ref(y_t) at the sampled y_t: unbiased (its mean over
    y ~ pi is KL(pi||pi_ref)) but noisy and can be negative. PPO's per-token penalty uses it."""
    return logp - ref_logp


def kl_exact(logp_all, ref_logp_all):
    """Per-position KL(pi(.|s_t) || pi_ref(.|s_t)) = sum_v pi(v) (log pi(v) - log pi_ref(v)) -> (B, R).
    Summed over the response it is an unbiased, lower-variance estimate of the sequence KL."""
    return (logp_all.exp() * (logp_all - ref_logp_all)).sum(-1)


def gae(rewards, values, gamma=1.0, lam=0.95):
    """Generalized advantage estimation (Schulman et al. 2015, eq. 16) over (B, R) tensors, with
    V = 0 after the last token: delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lam A_{t+1}.
    Returns (advantages, returns = advantages + values), both (B, R)."""
    R = rewards.size(1)
    adv, last = torch.zeros_like(rewards), torch.zeros_like(rewards[:, 0])
    for t in reversed(range(R)):
        next_v = values[:, t + 1] if t + 1 < R else torch.zeros_like(last)
        last = rewards[:, t] + gamma * next_v - values[:, t] + gamma * lam * last  # delta_t + gamma lam A_{t+1}
        adv[:, t] = last
    return adv, adv + values


def ppo_policy_loss(logp, old_logp, adv, clip_range=0.2):
    """PPO eq. 7, as a loss: mean over tokens of max(-A ratio, -A clip(ratio, 1-eps, 1+eps)),
    ratio = pi/pi_old. Returns (loss, fraction of tokens where the clip was active)."""
    ratio = torch.exp(logp - old_logp)
    loss = torch.max(-adv * ratio, -adv * ratio.clamp(1 - clip_range, 1 + clip_range)).mean()
    return loss, ((ratio - 1).abs() > clip_range).float().mean()


def ppo_value_loss(values, old_values, returns, vf_clip=0.2):
    """Clipped value loss (as in OpenAI baselines' ppo2): 0.5 max((V - G)^2, (V_clip - G)^2)."""
    v_clip = old_values + (values - old_values).clamp(-vf_clip, vf_clip)
    return 0.5 * torch.max((values - returns) ** 2, (v_clip - returns) ** 2).mean()


@torch.no_grad()
def ppo_rollout(policy, value_head, prompts, response_len, score_fn, kl_coef, gamma=1.0, lam=0.95):
    """Sample responses and turn them into PPO's training batch. Per-token reward (InstructGPT eq. 2,
    Ziegler et al. eq. 2): r_t = -beta (log pi(y_t) - log pi_ref(y_t)), plus the score at the last token."""
    P = prompts.size(1)
    seq = generate(policy, prompts, response_len)  # (B, P + R)
    logp, logp_all, h = response_logprobs(policy, seq, P, with_hidden=True)  # (B, R), (B, R, V), (B, R, C)
    values = value_head(h).squeeze(-1).float()  # (B, R)
    with disable_adapters(policy):
        ref_logp, ref_logp_all = response_logprobs(policy, seq, P)
    score = score_fn(seq).float()  # (B,)
    rewards = -kl_coef * kl_k1(logp, ref_logp)  # (B, R)
    rewards[:, -1] += score
    adv, returns = gae(rewards, values, gamma, lam)
    return dict(seq=seq, logp=logp, values=values, adv=(adv - adv.mean()) / (adv.std() + 1e-8), returns=returns,
                score=score, kl=kl_exact(logp_all, ref_logp_all).sum(1),
                entropy=-(logp_all.exp() * logp_all).sum(-1).mean())


def ppo_update(policy, value_head, batch, optimizer, step_fn, epochs=4, minibatch=32, clip_range=0.2,
               vf_clip=0.2, vf_coef=0.5, ctx=nullcontext()):
    """Several epochs of clipped-objective minibatch steps over one batch of rollouts (advantages
    whitened). step_fn(loss, optimizer) does backward, (DDP all-reduce), clipping and the step."""
    P, n, stats = batch["seq"].size(1) - batch["logp"].size(1), batch["seq"].size(0), []
    for _ in range(epochs):
        for idx in torch.randperm(n, device=batch["seq"].device).split(minibatch):
            with ctx:
                logp, _, h = response_logprobs(policy, batch["seq"][idx], P, with_hidden=True)
                values = value_head(h).squeeze(-1).float()
            pg_loss, clipfrac = ppo_policy_loss(logp, batch["logp"][idx], batch["adv"][idx], clip_range)
            v_loss = ppo_value_loss(values, batch["values"][idx], batch["returns"][idx], vf_clip)
            step_fn(pg_loss + vf_coef * v_loss, optimizer)
            stats.append((pg_loss.item(), v_loss.item(), clipfrac.item()))
    return {k: sum(s[i] for s in stats) / len(stats) for i, k in enumerate(("pg_loss", "value_loss", "clipfrac"))}


# --- Data -----------------------------------------------------------------------------------------
SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
# anthropics/hh-rlhf on GitHub keeps these files in Git LFS; the Hugging Face mirror serves the bytes.
HH_RLHF_PATH = "datasets/Anthropic/hh-rlhf/resolve/main/helpful-base/{split}.jsonl.gz"
HH_RLHF_SHA256 = {"test": "8be3fc1a13b27901631696f2be6f184c799f1baeaf145f53ac5db24960adc37b"}
GPT2_PATH = "gpt2/resolve/main/model.safetensors"


def hf_url(path):
    """A Hub file's URL, on the mirror that HF_ENDPOINT names if set (as huggingface_hub reads it)."""
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/") + "/" + path


def make_tokenizer(spec):
    """03_gpt.py's checkpoint["tokenizer"] -> an object with encode/decode. "char": one id per
    character, in the order of spec["chars"]; "gpt2": GPT-2's BPE, through tiktoken."""
    if spec.get("kind") == "char":
        stoi = {c: i for i, c in enumerate(spec["chars"])}
        return SimpleNamespace(encode=lambda text: [stoi[c] for c in text if c in stoi],
                               decode=lambda ids: "".join(spec["chars"][i] for i in ids))
    if spec.get("kind") == "gpt2":
        import tiktoken

        try:
            enc = tiktoken.get_encoding("gpt2")
        except Exception as e:  # offline without a tiktoken cache
            raise UserError(f"cannot load the GPT-2 BPE ({e.__class__.__name__}); set TIKTOKEN_CACHE_DIR "
                            f"to a folder holding tiktoken's gpt2 files, or go online once") from None
        # text that happens to contain "<|endoftext|>" is encoded as plain text, not refused
        return SimpleNamespace(encode=lambda t: enc.encode(t, disallowed_special=()), decode=enc.decode)
    raise UserError(f"unknown tokenizer {spec!r} in the base checkpoint (expected kind char or gpt2)")


def shakespeare_text(cfg):
    return open(download(SHAKESPEARE_URL, os.path.join(cfg.data_dir, "tinyshakespeare", "input.txt"),
                         SHAKESPEARE_SHA256)).read()


def load_hh_rlhf(path):
    """Anthropic HH-RLHF jsonl.gz -> [(prompt, chosen_response, rejected_response)]. Each line holds
    two full dialogues that share everything up to the last "\\n\\nAssistant:" turn."""
    out, key = [], "\n\nAssistant:"
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for line in f:
                ex = json.loads(line)
                cut_c, cut_r = ex["chosen"].rfind(key) + len(key), ex["rejected"].rfind(key) + len(key)
                if ex["chosen"][:cut_c] == ex["rejected"][:cut_r]:  # a few differ earlier: not a clean pair
                    out.append((ex["chosen"][:cut_c], ex["chosen"][cut_c:], ex["rejected"][cut_r:]))
    except (OSError, EOFError, ValueError, KeyError) as e:  # cut short, or not HH-RLHF's format
        raise UserError(f"{path} is not a readable HH-RLHF file ({e.__class__.__name__}); delete it and run again")
    return out


def hh_rlhf_tensors(cfg, tok, split):
    """Fixed-shape (prompt, chosen, rejected) token tensors from HH-RLHF: the last P tokens of each
    prompt and the first R tokens of each response; shorter ones are dropped. This keeps every
    tensor in the script unpadded, at the price of judging truncated answers."""
    path = os.path.join(cfg.data_dir, "hh-rlhf", "helpful-base", f"{split}.jsonl.gz")
    download(hf_url(HH_RLHF_PATH.format(split=split)), path, HH_RLHF_SHA256.get(split), magic=b"\x1f\x8b")
    P, R, rows = cfg.prompt_len, cfg.response_len, []
    for prompt, chosen, rejected in load_hh_rlhf(path):
        p, c, r = tok.encode(prompt), tok.encode(chosen), tok.encode(rejected)
        if len(p) >= P and len(c) >= R and len(r) >= R and c[:R] != r[:R]:
            rows.append((p[-P:], c[:R], r[:R]))
    if not rows:
        raise UserError(f"no HH-RLHF pair in {path} has >= {P} prompt and {R} response tokens")
    return tuple(torch.tensor(x) for x in zip(*rows))


def task_data(run):
    """Token windows for the task. synthetic: tinyshakespeare (90% train / 10% held out), each
    window P prompt + R response tokens. hh-rlhf: the dialogues (see hh_rlhf_tensors)."""
    cfg, P = run.cfg, run.cfg.prompt_len
    if cfg.prefs == "hh-rlhf":
        train_p, train_c, train_r = hh_rlhf_tensors(cfg, run.tok, "train")
        test_p, test_c, _ = hh_rlhf_tensors(cfg, run.tok, "test")
        return dict(sft=torch.cat([train_p, train_c], 1), sft_val=torch.cat([test_p, test_c], 1)[:1024],
                    prompts=train_p, eval_prompts=test_p[: cfg.n_eval_prompts], pairs=(train_p, train_c, train_r))
    ids = torch.tensor(run.tok.encode(shakespeare_text(cfg)))
    L, split = P + cfg.response_len, int(0.9 * len(ids))
    windows = ids[: split // L * L].view(-1, L)  # (N, P + R), non-overlapping
    held = ids[split: split + (len(ids) - split) // L * L].view(-1, L)
    held = held[torch.randperm(len(held), generator=torch.Generator().manual_seed(cfg.seed))]
    if len(held) <= cfg.n_eval_prompts:
        raise UserError(f"the held-out text has {len(held)} windows of {L} tokens: lower --n_eval_prompts")

    def target_style(w):  # SFT on "the target style": the windows whose response the hidden judge likes best
        scores = torch.tensor([true_reward(run.tok.decode(x[P:].tolist())) for x in w])
        return w[scores >= torch.quantile(scores, 1 - cfg.sft_top_frac)]

    return dict(sft=target_style(windows), sft_val=target_style(held[cfg.n_eval_prompts:])[:1024],
                prompts=windows[:, :P], eval_prompts=held[: cfg.n_eval_prompts, :P])


# --- Data: base models (03_gpt.py checkpoints, GPT-2 safetensors) ---------------------------------
def load_safetensors(path):
    """A safetensors file -> {name: tensor}. The format: 8 bytes little-endian header length n, n
    bytes of JSON {name: {dtype, shape, data_offsets: [begin, end]}}, then the raw bytes."""
    dtypes = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
              "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8, "BOOL": torch.bool}
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8).ljust(8, b"\0"))
        if n > os.path.getsize(path) - 8:
            raise UserError(f"{path} is not a safetensors file (its header length {n} exceeds the file); delete it")
        try:
            header = json.loads(f.read(n))
        except ValueError:
            raise UserError(f"{path} is not a safetensors file (its header is not JSON); delete it") from None
        data = bytearray(f.read())
    out = {}
    for name, info in header.items():
        if name != "__metadata__":
            begin, end = info["data_offsets"]
            out[name] = torch.frombuffer(data[begin:end], dtype=dtypes[info["dtype"]]).reshape(info["shape"]) \
                if end > begin else torch.empty(info["shape"], dtype=dtypes[info["dtype"]])
    return out


def gpt2_checkpoint(path):
    """Hugging Face GPT-2 safetensors -> a checkpoint dict in 03_gpt.py's format. HF stores the
    projections as Conv1D, i.e. weight (in, out): transpose them into nn.Linear's (out, in). The
    shape comes from the tensors; every GPT-2 size uses 64-dimensional heads."""
    sd = {}
    for name, t in load_safetensors(path).items():
        name = name.removeprefix("transformer.")
        if not name.endswith((".attn.bias", ".attn.masked_bias")):  # causal-mask buffers, not weights
            sd["transformer." + name] = (t.t() if name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight"))
                                         else t).float().contiguous()
    sd["lm_head.weight"] = sd["transformer.wte.weight"]
    (V, C), T = sd["transformer.wte.weight"].shape, sd["transformer.wpe.weight"].shape[0]
    n_layer = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("transformer.h."))
    args = dict(block_size=T, vocab_size=V, n_layer=n_layer, n_head=max(1, C // 64), n_embd=C, dropout=0.0,
                bias=True, pos="learned", gelu="tanh")  # GPT-2's own GELU, so the model computes GPT-2
    return {"model": sd, "model_args": args, "tokenizer": {"kind": "gpt2"}}


def gpt_from_checkpoint(ckpt, path="checkpoint"):
    """03_gpt.py's checkpoint dict -> (GPT, tokenizer spec). 03 (nanoGPT) keeps q, k, v in one
    c_attn Linear; it is split into q_proj, k_proj, v_proj here (see CausalSelfAttention)."""
    if not {"model", "model_args", "tokenizer"} <= set(ckpt):
        raise UserError(f"{path} is not a 03_gpt.py model checkpoint (needs keys model, model_args, tokenizer)")
    args = {"gelu": "exact", **ckpt["model_args"]}  # 03's checkpoints before the gelu key used the exact form
    if args.get("pos", "learned") != "learned" or args["gelu"] not in ("exact", "tanh"):
        raise UserError(f"{path} has pos={args.get('pos')!r}, gelu={args['gelu']!r}; this script's GPT implements "
                        f"learned absolute positions only, with the exact or tanh GELU (03_gpt.py --pos=learned)")
    model, sd = GPT(GPTConfig(**{f.name: args[f.name] for f in dataclasses.fields(GPTConfig)})), {}
    for name, t in ckpt["model"].items():
        if ".attn.c_attn." in name:  # weight (3C, C), bias (3C,): q, k, v stacked
            sd.update(zip([name.replace("c_attn", p) for p in ("q_proj", "k_proj", "v_proj")], t.chunk(3)))
        elif not (name.endswith(".attn.bias") and t.dim() == 4):  # nanoGPT's causal-mask buffer
            sd[name] = t
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise UserError(f"{path}: weights do not match the GPT (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model, ckpt["tokenizer"]


def load_base(run):
    """The base model and tokenizer: pretrained here earlier (out_dir/pretrain.pt), GPT-2 from
    Hugging Face, or a 03_gpt.py checkpoint."""
    cfg = run.cfg
    if cfg.base == "gpt2":  # no fixed checksum or magic bytes; download() still refuses an HTML page
        path = download(hf_url(GPT2_PATH), os.path.join(cfg.data_dir, "gpt2", "model.safetensors"))
        ckpt = gpt2_checkpoint(path)
    elif cfg.base == "scratch":
        path = run.path("pretrain")  # checked on the model's shape only: the later stages' flags may change
        ckpt = load_checkpoint(path, cfg, "pretrain", keys=("n_layer", "n_head", "n_embd", "block_size", "bias"))
        if ckpt["step"] < cfg.max_iters:
            raise UserError(f"{path} stopped at step {ckpt['step']} of {cfg.max_iters}: "
                            f"finish it with --mode pretrain --init_from=resume")
    else:
        ckpt, path = load_checkpoint(cfg.base, None, script="03_gpt"), cfg.base
    model, tok_spec = gpt_from_checkpoint(ckpt, path)
    run.tok = make_tokenizer(tok_spec)
    return model.to(run.device).eval()


# --- Training -------------------------------------------------------------------------------------
class Run:
    """What every stage shares: the config, the ranks, the device, autocast and the tokenizer."""

    def __init__(self, cfg):
        self.cfg, self.tok = cfg, None
        self.rank, local_rank, self.world_size = setup_ddp()
        self.master = self.rank == 0
        self.device, self.ctx, scaler = setup_device(cfg, local_rank)
        self.scaler = scaler or torch.amp.GradScaler(enabled=False)  # off: scale and unscale do nothing

    def path(self, stage):
        return os.path.join(self.cfg.out_dir, f"{stage}.pt")

    def barrier(self):
        if self.world_size > 1:
            dist.barrier()

    def step(self, loss, optimizer):
        """backward; average the gradients over ranks (DDP's all-reduce written out, so one code path
        serves LoRA-only, value-head and reward-model parameters); clip; optimizer step."""
        params = [p for g in optimizer.param_groups for p in g["params"]]
        self.scaler.scale(loss).backward()
        for p in params if self.world_size > 1 else []:
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= self.world_size
        self.scaler.unscale_(optimizer)
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
        self.scaler.step(optimizer)
        self.scaler.update()
        optimizer.zero_grad(set_to_none=True)


def get_lr(cfg, step):
    """Linear warmup then cosine decay to min_lr (nanoGPT's get_lr)."""
    if step < cfg.warmup_iters:
        return cfg.learning_rate * (step + 1) / (cfg.warmup_iters + 1)
    ratio = min(1.0, (step - cfg.warmup_iters) / max(1, cfg.lr_decay_iters - cfg.warmup_iters))
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.learning_rate - cfg.min_lr)


# The flags each stage trains with (its *_iters aside: resuming to train longer is allowed). Reusing a
# stage checkpoint made with other values would label its results with flags it never saw.
STAGE_FLAGS = {"sft": ("lora_", "sft_lr", "sft_top_frac"), "sft_full": ("sft_full_lr", "sft_top_frac"),
               "rm": ("rm_lr", "rm_holdout", "n_pairs", "pref_margin"),
               "ppo": ("ppo_batch", "ppo_epochs", "ppo_minibatch", "ppo_lr", "kl_", "clip_range", "vf_", "gamma",
                       "lam"), "dpo": ("dpo_lr", "dpo_beta")}


def fit(run, stage, model, opt, iters, train_step, validate=None, state=None, required=False, scale=1):
    """The loop every stage shares. Resume from out_dir/<stage>.pt (with --init_from=resume, or when
    a later stage needs this one complete: required), then run train_step(step) -> metrics (it does
    its own run.step) up to `iters`; every eval_interval steps add validate() -> metrics, log and
    checkpoint. `state` (PPO's beta, ...) is saved with the checkpoint and restored in place.
    scale: one step counts as that many for the intervals (a PPO iteration is many steps)."""
    cfg, path, state = run.cfg, run.path(stage), {} if state is None else state
    gpt = next(mod for mod in model.modules() if isinstance(mod, GPT))  # the policy, or the RM's backbone
    step, best_val, metrics = 0, math.inf, {}
    if required or (cfg.init_from == "resume" and os.path.exists(path)):
        ckpt = resume(path, cfg, model, opt, run.rank, run.world_size, stage)
        was = {k: v for k, v in ckpt["config"].items() if k.startswith(STAGE_FLAGS.get(stage, ()))}
        if changed := [k for k, v in was.items() if getattr(cfg, k, v) != v]:
            raise UserError(f"{path} was trained with " + ", ".join(f"--{k} {was[k]}" for k in changed) +
                            f", not {', '.join(str(getattr(cfg, k)) for k in changed)}: delete it to train "
                            f"{stage} again, or give those values")
        step, best_val, metrics = ckpt["step"], ckpt["best_val"], ckpt["metrics"]
        state.update({k: ckpt[k] for k in state})
        gpt.config.gelu = ckpt.get("gelu", "exact")  # keep the GELU it trained with (06 had only erf before)
        for block in gpt.transformer.h:
            block.mlp.gelu.approximate = "tanh" if gpt.config.gelu == "tanh" else "none"
        if required and step < iters:
            raise UserError(f"{path} stopped at step {step} of {iters}: finish it with --mode {stage} "
                            f"--init_from=resume")
        if run.master and not required:
            print(f"{stage}: resuming from step {step}")
    log_every, eval_every = max(1, cfg.log_interval // scale), max(1, cfg.eval_interval // scale)
    while step < iters:
        t0 = time.time()
        rec, step = train_step(step), step + 1
        ms, evaluating = (time.time() - t0) * 1e3, step % eval_every == 0 or step == iters
        if evaluating:  # the line below then shows the validation metrics too
            rec = metrics = {**rec, **(validate() if validate else {})}
            best_val = min(best_val, metrics.get("val_loss", metrics.get("loss", math.inf)))
        if run.master and (evaluating or step % log_every == 0):
            shown = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in rec.items())
            print(f"{stage} step {step}: {shown}, {ms:.0f} ms")
        if evaluating:
            if run.master:
                log_jsonl(cfg, {"stage": stage, "step": step, **metrics})
                save_checkpoint(path, model, opt, cfg, step, best_val, stage, metrics=metrics, gelu=gpt.config.gelu,
                                **state)
            run.barrier()
    print(f"rank {run.rank} {stage} fingerprint {fingerprint(model)}\n", end="", flush=True)  # one write per rank
    return metrics


def pretrain(run):
    """--base scratch: a character-level GPT on tinyshakespeare, 03_gpt.py's char model."""
    cfg = run.cfg
    text = shakespeare_text(cfg)
    chars = "".join(sorted(set(text)))
    run.tok = make_tokenizer(dict(kind="char", chars=chars))
    data = torch.tensor(run.tok.encode(text))
    train_ids, val_ids = data[: int(0.9 * len(data))], data[int(0.9 * len(data)):]
    gcfg = GPTConfig(cfg.block_size, len(chars), cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.dropout, cfg.bias)
    torch.manual_seed(cfg.seed)  # the same init on every rank
    model = GPT(gcfg).to(run.device)
    decay = [p for p in model.parameters() if p.dim() >= 2]  # matrices decay; biases and norms do not
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0}],
                            lr=cfg.learning_rate, betas=(0.9, 0.95))
    torch.manual_seed(cfg.seed + run.rank)

    def lm_loss(ids):  # a random batch of block_size windows, next-character cross-entropy
        ix = torch.randint(len(ids) - cfg.block_size - 1, (cfg.batch_size,))
        x = torch.stack([ids[i:i + cfg.block_size] for i in ix]).to(run.device)  # (B, T)
        y = torch.stack([ids[i + 1:i + 1 + cfg.block_size] for i in ix]).to(run.device)  # (B, T)
        with run.ctx:
            return F.cross_entropy(model(x).float().view(-1, gcfg.vocab_size), y.view(-1))

    def train_step(step):
        for g in opt.param_groups:
            g["lr"] = get_lr(cfg, step)
        loss = lm_loss(train_ids)
        run.step(loss, opt)
        return dict(loss=loss.item(), lr=get_lr(cfg, step))

    @torch.no_grad()
    def validate():
        model.eval()
        val = sum(lm_loss(val_ids).item() for _ in range(cfg.eval_iters)) / cfg.eval_iters
        model.train()
        return dict(val_loss=val)

    state = dict(model_args={**dataclasses.asdict(gcfg), "pos": "learned"}, tokenizer=dict(kind="char", chars=chars))
    fit(run, "pretrain", model, opt, cfg.max_iters, train_step, validate, state)  # 03_gpt.py's model_args, tokenizer
    return model.eval()


def lora_policy(cfg, model):
    """A copy of `model` with fresh adapters on --lora_targets: the only weights that train."""
    return apply_lora(copy.deepcopy(model), cfg.lora_targets, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout)


def sft(run, base, data, full=False, required=False):
    """Supervised fine-tuning on the target-style windows, loss on the response tokens only: LoRA, or
    (full=True, stage sft_full) every weight at the same budget, the baseline. -> (model, metrics)"""
    cfg, P, stage = run.cfg, run.cfg.prompt_len, "sft_full" if full else "sft"
    torch.manual_seed(cfg.seed)
    model = (copy.deepcopy(base) if full else lora_policy(cfg, base)).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.sft_full_lr if full else cfg.sft_lr, weight_decay=0.0)
    torch.manual_seed(cfg.seed + run.rank)
    t0 = time.time()

    def train_step(step):
        seq = data["sft"][torch.randint(len(data["sft"]), (cfg.batch_size,))].to(run.device)  # (B, P + R)
        with run.ctx:
            loss = -response_logprobs(model, seq, P)[0].mean()  # cross-entropy on the response tokens
        run.step(loss, opt)
        return dict(loss=loss.item())

    @torch.no_grad()
    def validate():  # the response loss on held-out target-style windows
        with run.ctx:
            val = torch.cat([-response_logprobs(model, w.to(run.device), P)[0].mean(1)
                             for w in data["sft_val"].split(256)]).mean().item()
        n = sum(p.numel() for p in params)
        out = dict(val_loss=val, trainable=n, trainable_frac=n / sum(p.numel() for p in base.parameters()),
                   seconds=time.time() - t0)
        if run.master and not full:  # the adapters alone: what a LoRA fine-tune ships
            path = os.path.join(cfg.out_dir, "sft_adapter.pt")
            torch.save(lora_state_dict(model), path + ".tmp")
            os.replace(path + ".tmp", path)
            out["adapter_bytes"] = os.path.getsize(path)
        return out

    metrics = fit(run, stage, model, opt, cfg.sft_iters, train_step, validate, required=required)
    return model.eval(), metrics


def sample_pairs(run, sft_model, data, fresh):
    """Preference pairs (prompt, chosen, rejected). synthetic: two SFT samples per prompt, the one
    with the higher true_reward chosen, near-ties (|difference| <= pref_margin) dropped. Rank 0
    samples them into out_dir/prefs.pt (a checkpoint without a model); every rank reads that file."""
    cfg, path, P = run.cfg, run.path("prefs"), run.cfg.prompt_len
    if cfg.prefs == "hh-rlhf":
        return data["pairs"]
    if run.master and (fresh or not os.path.exists(path)):
        prompts = data["prompts"][torch.randperm(len(data["prompts"]))[: cfg.n_pairs]].to(run.device)
        chosen, rejected, scores = [], [], []
        for pb in prompts.split(256):
            with run.ctx:
                a, b = generate(sft_model, pb, cfg.response_len), generate(sft_model, pb, cfg.response_len)
            ra, rb = (torch.tensor([true_reward(run.tok.decode(s[P:].tolist())) for s in x]) for x in (a, b))
            first = (ra > rb).to(run.device)[:, None]
            chosen.append(torch.where(first, a, b)[:, P:])
            rejected.append(torch.where(first, b, a)[:, P:])
            scores.append(torch.stack([torch.maximum(ra, rb), torch.minimum(ra, rb)], 1))
        chosen, rejected, scores = torch.cat(chosen).cpu(), torch.cat(rejected).cpu(), torch.cat(scores)
        keep = scores[:, 0] - scores[:, 1] > cfg.pref_margin
        if keep.sum() < 2:
            raise UserError(f"only {int(keep.sum())} of {len(keep)} pairs are not ties: raise --n_pairs "
                            f"or lower --pref_margin")
        pairs = dict(prompts=prompts.cpu()[keep], chosen=chosen[keep], rejected=rejected[keep], scores=scores[keep])
        save_checkpoint(path, None, None, cfg, 0, math.inf, "prefs", pairs=pairs)
        print(f"preference pairs: {int(keep.sum())} of {len(keep)} prompts kept (ties dropped), mean "
              f"true reward chosen {scores[keep, 0].mean():.3f} vs rejected {scores[keep, 1].mean():.3f}")
    run.barrier()
    pairs = load_checkpoint(path, cfg, "prefs")["pairs"]
    return pairs["prompts"], pairs["chosen"], pairs["rejected"]


def split_pairs(pairs, holdout):
    n_test = max(1, int(holdout * len(pairs[0])))
    return tuple(t[:-n_test] for t in pairs), tuple(t[-n_test:] for t in pairs)


def train_rm(run, sft_model, pairs, required=False):
    """Reward model: the SFT backbone plus a scalar head, trained on -log sigma(r_w - r_l).
    -> (reward model, metrics: held-out pairwise accuracy, and the mean and std PPO normalizes by)"""
    cfg = run.cfg
    train_pairs, test_pairs = split_pairs(pairs, cfg.rm_holdout)
    torch.manual_seed(cfg.seed)
    rm = RewardModel(copy.deepcopy(sft_model)).to(run.device).train().requires_grad_(True)
    opt = torch.optim.AdamW(rm.parameters(), lr=cfg.rm_lr, weight_decay=0.0)
    torch.manual_seed(cfg.seed + run.rank)

    def scores(p, c, r):  # -> (r_chosen, r_rejected), both (B,)
        seq = torch.cat([torch.cat([p, c], 1), torch.cat([p, r], 1)]).to(run.device)  # (2B, P + R)
        with run.ctx:
            return rm(seq).float().chunk(2)

    def train_step(step):
        idx = torch.randint(len(train_pairs[0]), (cfg.batch_size,))
        loss = bradley_terry_loss(*scores(*(t[idx] for t in train_pairs)))
        run.step(loss, opt)
        return dict(loss=loss.item())

    @torch.no_grad()
    def validate():
        rm.eval()
        (tc, tr), (rc, rr) = (map(torch.cat, zip(*(scores(*b) for b in zip(*(t.split(256) for t in split)))))
                              for split in (test_pairs, train_pairs))
        rm.train()
        # PPO sees the RM's output normalized to mean 0, std 1 on the training responses (Ziegler et
        # al. 2019 sec. 2.2), so that kl_coef means the same for any RM
        train_scores = torch.cat([rc, rr])
        return dict(heldout_acc=(tc > tr).float().mean().item(), n_train=len(train_pairs[0]),
                    n_heldout=len(test_pairs[0]), mean=train_scores.mean().item(), std=train_scores.std().item())

    metrics = fit(run, "rm", rm, opt, cfg.rm_iters, train_step, validate, required=required)
    return rm.eval(), metrics


def train_ppo(run, sft_model, rm, rm_metrics, data):
    """PPO on the LoRA policy against the normalized RM score, with the per-token KL penalty to the
    reference (= the adapters disabled, i.e. the SFT model). -> (policy, per-iteration history)"""
    cfg = run.cfg
    torch.manual_seed(cfg.seed)
    policy = lora_policy(cfg, sft_model)
    value_head = nn.Linear(sft_model.config.n_embd, 1).to(run.device)
    both = nn.ModuleDict(dict(policy=policy, value_head=value_head))
    opt = torch.optim.AdamW([p for p in both.parameters() if p.requires_grad], lr=cfg.ppo_lr, weight_decay=0.0)
    torch.manual_seed(cfg.seed + run.rank)
    state = dict(kl_coef=cfg.kl_coef, history=[])

    def score_fn(seq):
        with run.ctx:
            return (rm(seq).float() - rm_metrics["mean"]) / rm_metrics["std"]

    def train_step(step):
        prompts = data["prompts"][torch.randint(len(data["prompts"]), (cfg.ppo_batch,))].to(run.device)
        with run.ctx:
            batch = ppo_rollout(policy, value_head, prompts, cfg.response_len, score_fn, state["kl_coef"],
                                cfg.gamma, cfg.lam)
        stats = ppo_update(policy, value_head, batch, opt, run.step, cfg.ppo_epochs, cfg.ppo_minibatch,
                           cfg.clip_range, cfg.vf_clip, cfg.vf_coef, run.ctx)
        true = [true_reward(run.tok.decode(s[cfg.prompt_len:].tolist())) for s in batch["seq"]]
        means = torch.tensor([batch["score"].mean().item(), sum(true) / len(true), batch["kl"].mean().item(),
                              batch["entropy"].item()], device=run.device)
        if run.world_size > 1:  # every rank must adapt beta with the same KL
            dist.all_reduce(means)
            means /= run.world_size
        rec = dict(zip(("rm_reward", "true_reward", "kl", "entropy"), means.tolist()), kl_coef=state["kl_coef"],
                   **stats)
        if cfg.kl_target > 0:  # adaptive KL controller: beta *= 1 + K clip(KL / target - 1, -0.2, 0.2), K = 0.1
            state["kl_coef"] *= 1 + 0.1 * max(-0.2, min(0.2, rec["kl"] / cfg.kl_target - 1))
        state["history"].append(rec)
        return rec

    fit(run, "ppo", both, opt, cfg.ppo_iters, train_step, state=state, scale=10)
    return policy.eval(), state["history"]


def train_dpo(run, sft_model, pairs):
    """DPO on the RM's training pairs: LoRA policy, reference = the adapters disabled."""
    cfg, P = run.cfg, run.cfg.prompt_len
    train_pairs, _ = split_pairs(pairs, cfg.rm_holdout)  # the RM's training pairs
    torch.manual_seed(cfg.seed)
    policy = lora_policy(cfg, sft_model)
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=cfg.dpo_lr, weight_decay=0.0)
    torch.manual_seed(cfg.seed + run.rank)

    def logps(p, c, r):  # -> summed response log-probs of chosen and rejected, (B,) each
        seq = torch.cat([torch.cat([p, c], 1), torch.cat([p, r], 1)]).to(run.device)  # (2B, P + R)
        with run.ctx:
            return response_logprobs(policy, seq, P)[0].sum(1).chunk(2)

    def train_step(step):
        idx = torch.randint(len(train_pairs[0]), (cfg.batch_size,))
        batch = [t[idx] for t in train_pairs]
        with torch.no_grad(), disable_adapters(policy):
            ref_w, ref_l = logps(*batch)
        loss, margin, acc = dpo_loss(*logps(*batch), ref_w, ref_l, cfg.dpo_beta)
        run.step(loss, opt)
        return dict(loss=loss.item(), margin=margin.item(), accuracy=acc.item())

    fit(run, "dpo", policy, opt, cfg.dpo_iters, train_step)
    return policy.eval()


def train(cfg) -> dict:
    """Run the stages --mode asks for (each resumable), loading the earlier ones from out_dir."""
    run, out = Run(cfg), {}
    want = MODES[1:] if cfg.mode == "all" else (cfg.mode,)
    if cfg.init_from == "resume" and not any(os.path.exists(run.path(s)) for s in want + ("sft_full",)):
        raise UserError(f"--init_from=resume: {cfg.out_dir} holds no checkpoint of --mode {cfg.mode} to resume "
                        f"(start with --init_from=scratch, or check --out_dir)")
    base = pretrain(run) if "pretrain" in want and cfg.base == "scratch" else load_base(run)
    if cfg.prompt_len + cfg.response_len > base.config.block_size:
        raise UserError(f"--prompt_len + --response_len = {cfg.prompt_len + cfg.response_len} exceeds the "
                        f"base model's block_size {base.config.block_size}")
    if want != ("pretrain",):
        data = task_data(run)
        if "sft" in want and cfg.sft_compare_full:
            out["sft_full"] = sft(run, base, data, full=True)[1]
        sft_model, out["sft"] = sft(run, base, data, required="sft" not in want)
        # fold the SFT adapters into the weights: this merged model is pi_ref, and PPO/DPO put fresh
        # adapters on top, so "adapters disabled" means exactly "the SFT model"
        sft_model = merge_lora(sft_model)
    if {"rm", "ppo", "dpo"} & set(want):
        pairs = sample_pairs(run, sft_model, data, fresh="rm" in want and cfg.init_from == "scratch")
    if "rm" in want or "ppo" in want:
        rm, out["rm"] = train_rm(run, sft_model, pairs, required="rm" not in want)
    if "ppo" in want:
        ppo_policy, out["ppo_history"] = train_ppo(run, sft_model, rm, out["rm"], data)
        if run.master:
            plot_ppo(out["ppo_history"], os.path.join(cfg.out_dir, "ppo_reward_vs_kl.png"))
    if "dpo" in want:
        dpo_policy = train_dpo(run, sft_model, pairs)
    if cfg.mode == "all" and run.master:
        prompts, rm_metrics = data["eval_prompts"], out["rm"]
        out["eval"] = dict(base=evaluate(run, base, prompts, sft_model, rm, rm_metrics),
                           sft=evaluate(run, sft_model, prompts, None, rm, rm_metrics),
                           ppo=evaluate(run, ppo_policy, prompts, "adapters", rm, rm_metrics),
                           dpo=evaluate(run, dpo_policy, prompts, "adapters", rm, rm_metrics))
        print_table(out, cfg.prefs)
        plot_rlhf(cfg, out["ppo_history"], out["eval"], os.path.join(cfg.out_dir, "rlhf.png"))
        log_jsonl(cfg, {"stage": "eval", **{k: {m: v for m, v in ev.items() if m != "samples"}
                                            for k, ev in out["eval"].items()}})
    if run.world_size > 1:
        dist.barrier()
        dist.destroy_process_group()
    return out


# --- Evaluation / inference -----------------------------------------------------------------------
@torch.no_grad()
def evaluate(run, policy, prompts, ref=None, rm=None, rm_metrics=None):
    """One sample per fixed prompt, with a fixed sampling seed (the same noise for every stage).
    -> dict(true reward mean and standard error, KL(policy || ref) per response, RM score, samples).
    ref: None (KL 0), "adapters" (the policy with its adapters disabled) or another GPT."""
    cfg, P = run.cfg, run.cfg.prompt_len
    gen = torch.Generator(device=run.device).manual_seed(cfg.seed)
    true, kls, rms, texts = [], [], [], []
    for pb in prompts.to(run.device).split(256):
        with run.ctx:
            seq = generate(policy, pb, cfg.response_len, generator=gen)  # (b, P + R)
            _, logp_all = response_logprobs(policy, seq, P)
            if ref is not None:
                with disable_adapters(policy) if ref == "adapters" else nullcontext():
                    _, ref_all = response_logprobs(policy if ref == "adapters" else ref, seq, P)
                kls.append(kl_exact(logp_all, ref_all).sum(1))
            if rm is not None:
                rms.append((rm(seq).float() - rm_metrics["mean"]) / rm_metrics["std"])
        for s in seq.tolist():
            texts.append((run.tok.decode(s[:P]), run.tok.decode(s[P:])))
            true.append(true_reward(texts[-1][1]))
    true = torch.tensor(true)
    return dict(true=true.mean().item(), true_se=(true.std() / math.sqrt(len(true))).item(),
                kl=torch.cat(kls).mean().item() if kls else 0.0,
                rm=torch.cat(rms).mean().item() if rms else float("nan"), samples=texts[: cfg.n_samples_shown])


def plot_ppo(history, path):
    """True reward and RM reward against KL over PPO iterations: where they part is over-optimization."""
    if (plt := pyplot(os.path.basename(path))) is None:
        return
    kl = [h["kl"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(kl, [h["true_reward"] for h in history], "o-", ms=3, label="true reward (hidden)")
    ax.set(xlabel="KL(pi || pi_ref) per response (nats)", ylabel="true reward",
           title="PPO: true reward vs KL to the SFT reference")
    ax2 = ax.twinx()
    ax2.plot(kl, [h["rm_reward"] for h in history], "s-", ms=2, color="tab:orange", alpha=0.6, label="RM reward")
    ax2.set_ylabel("RM reward (normalized)")
    fig.legend(loc="upper left", bbox_to_anchor=(0.14, 0.88))
    save_png(fig, path, dpi=120)


def plot_rlhf(cfg, history, evals, path):
    """--mode all's two pictures: true reward and KL over the PPO iterations (rollout batches), and every
    stage's true reward on the held-out prompts with its standard error, KL to SFT written on each bar."""
    if (plt := pyplot(os.path.basename(path))) is None:
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5), width_ratios=[3, 2])
    steps = range(1, len(history) + 1)
    a.plot(steps, [h["true_reward"] for h in history], color="C0", label="true reward (hidden), rollout batch")
    a.set(xlabel="PPO iteration", ylabel="true reward (fraction of vowels)", title="PPO")
    k = a.twinx()
    k.plot(steps, [h["kl"] for h in history], color="C1", ls="--", label="KL to the SFT model")
    k.set_ylabel("KL(pi || pi_ref) per response (nats)")
    a.legend(handles=a.lines + k.lines, loc="lower right")
    names = list(evals)
    true = [evals[n]["true"] for n in names]
    b.bar(names, true, yerr=[evals[n]["true_se"] for n in names], capsize=4, color=[f"C{i + 2}" for i in range(4)])
    for i, n in enumerate(names):
        b.annotate(f"KL {evals[n]['kl']:.2f}", (i, true[i]), xytext=(0, 6), textcoords="offset points", ha="center")
    b.set(ylim=(min(true) - 0.05, max(true) + 0.05), ylabel="true reward, held-out prompts (± s.e.)",
          title=f"every stage ({cfg.n_eval_prompts} prompts)")
    fig.suptitle(f"python 06_lora_rlhf.py --mode all: {cfg.ppo_iters} PPO iterations, dpo_beta {cfg.dpo_beta}, "
                 f"torch threads: {torch.get_num_threads()}", fontsize=10)
    save_png(fig, path)


def print_table(out, prefs):
    print(f"\n=== LoRA vs full fine-tuning (SFT, same steps) ===\n{'':6} {'trainable params':>18} {'fraction':>9} "
          f"{'adapter bytes':>14} {'val loss':>9} {'seconds':>8}")
    for name, m in (("lora", out["sft"]), ("full", out.get("sft_full"))):
        if m:
            print(f"{name:6} {m['trainable']:>18,} {m['trainable_frac']:>9.4f} {m.get('adapter_bytes', '-')!s:>14} "
                  f"{m['val_loss']:>9.4f} {m['seconds']:>8.1f}")
    print(f"\nreward model: held-out pairwise accuracy {out['rm']['heldout_acc']:.3f} on {out['rm']['n_heldout']} "
          f"pairs (trained on {out['rm']['n_train']})\n\n=== true reward (hidden vowel fraction) over the fixed "
          f"held-out prompts ===")
    if prefs == "hh-rlhf":
        print("(--prefs hh-rlhf: human preferences do not reward vowels; read the RM score column)")
    print(f"{'stage':6} {'true reward':>18} {'RM score':>9} {'KL to SFT (nats/response)':>26}")
    for name, ev in out["eval"].items():
        print(f"{name:6} {ev['true']:>10.4f} +- {ev['true_se']:.4f} {ev['rm']:>9.3f} {ev['kl']:>26.3f}")
    print("\n".join(f"[{name}] {p!r} -> {r!r}" for name, ev in out["eval"].items() for p, r in ev["samples"]))


# --- main -----------------------------------------------------------------------------------------
def main(argv=None):
    return run_cli(dict.fromkeys(MODES, train), argv)  # every mode runs the stages it names


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
