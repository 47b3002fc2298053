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
    python 06_lora_rlhf.py --help                            # every flag, its default and meaning

Pipeline (--mode all): base (pretrain a char GPT on tinyshakespeare, or load one) -> SFT with LoRA on
the corpus windows the hidden score likes (also full fine-tuning at the same budget, for comparison)
-> two SFT samples per prompt, the one with the higher true score "chosen" -> reward model -> PPO
against it -> DPO on the same pairs -> one table: true reward (mean +- s.e. over fixed prompts), KL
to the reference (the SFT model), samples; and out_dir/ppo_reward_vs_kl.png.

Expected result (cpu preset, ~6 CPU-minutes on one core): true reward over 512 held-out prompts,
mean +- s.e. (KL to SFT, nats per 32-char response): base 0.280 +- 0.002 (1.7), SFT 0.311 +- 0.002,
PPO 0.395 +- 0.002 (5.0), DPO 0.440 +- 0.002 (9.3; with --dpo_beta=0.5: 0.517 at KL 21.5, samples
like "e oul I utel fue isoul": the hidden score is hacked); RM held-out pairwise accuracy 1.00;
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
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

SCRIPT_NAME = "06_lora_rlhf"  # the file's stem: default out_dir is out/<SCRIPT_NAME>


# --- Config ---------------------------------------------------------------------------------------
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
    eval_interval: int = 100  # steps between evaluations and checkpoints
    eval_iters: int = 20  # batches per validation estimate
    log_interval: int = 50  # steps between progress lines
    # task: fixed-shape prompt/response windows (no padding anywhere)
    prompt_len: int = 32  # P, prompt tokens
    response_len: int = 32  # R, tokens generated per prompt
    # LoRA
    lora_targets: str = "attn.q_proj,attn.v_proj"  # comma-separated projections to adapt
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
                dpo_lr=5e-4, dpo_beta=0.1, n_eval_prompts=1024, dtype="auto"),  # the real run
}
DEFAULT_PRESET = "cpu"
# Fields that define a stage checkpoint's shape: a checkpoint whose values differ cannot be loaded.
MODEL_KEYS = ("base", "prefs", "n_layer", "n_head", "n_embd", "block_size", "bias", "prompt_len",
              "response_len", "lora_targets", "lora_r")
MODES = ("all", "pretrain", "sft", "rm", "ppo", "dpo")


class UserError(Exception):
    """A problem the user can fix (bad flag, missing data, wrong checkpoint): main() prints the
    message and exits with status 1 instead of showing a traceback."""


def _field_help():
    """Each Config field's trailing `# comment`, read from this file's source, for --help."""
    src = inspect.getsource(Config)
    return dict(re.findall(r"^\s+(\w+):[^#\n]*#\s*(.*)$", src, flags=re.M))


def _parse_value(name, kind, text):
    if kind is bool:
        if text.lower() in ("1", "true", "yes"):
            return True
        if text.lower() in ("0", "false", "no"):
            return False
        raise ValueError
    return kind(text)


def usage():
    helps = _field_help()
    lines = [f"usage: python {SCRIPT_NAME}.py [--preset {'|'.join(PRESETS)}] [--field=value ...]",
             f"  --preset NAME  overrides applied before the flags (default: {DEFAULT_PRESET})"]
    for f in dataclasses.fields(Config):
        lines.append(f"  --{f.name}={f.default!s}".ljust(36) + helps.get(f.name, ""))
    return "\n".join(lines)


def parse_args(argv=None) -> Config:
    """`--preset NAME`, then `--field=value` or `--field value` for every Config field.
    An unknown flag or a badly typed value exits with status 2 and names the flag."""
    argv = list(sys.argv[1:] if argv is None else argv)
    kinds = {f.name: f.type for f in dataclasses.fields(Config)}

    def fail(msg):
        print(f"{SCRIPT_NAME}.py: error: {msg}\n(run with --help to list every flag)", file=sys.stderr)
        sys.exit(2)

    preset, overrides, i = DEFAULT_PRESET, {}, 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            print(usage())
            sys.exit(0)
        if not arg.startswith("--"):
            fail(f"unexpected argument {arg!r}")
        name, eq, value = arg[2:].partition("=")
        if name != "preset" and name not in kinds:
            fail(f"unknown flag --{name}")
        if not eq:  # `--name value`, or a bare boolean flag meaning true
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if kinds.get(name) is bool and (nxt is None or nxt.startswith("--")):
                value = "true"
            elif nxt is None:
                fail(f"--{name} needs a value")
            else:
                value, i = nxt, i + 1
        i += 1
        if name == "preset":
            if value not in PRESETS:
                fail(f"unknown preset {value!r} for --preset (choose from {', '.join(PRESETS)})")
            preset = value
            continue
        try:
            overrides[name] = _parse_value(name, kinds[name], value)
        except ValueError:
            fail(f"--{name} expects {kinds[name].__name__}, got {value!r}")
    return Config(**{**PRESETS[preset], **overrides})


def setup_ddp():
    """DDP when launched by torchrun (RANK set): -> (rank, local_rank, world_size).
    nccl on CUDA, gloo on CPU. Rank 0 alone logs, downloads and saves."""
    if "RANK" not in os.environ:
        return 0, 0, 1
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend=backend)
    local_rank = int(os.environ["LOCAL_RANK"])
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    return dist.get_rank(), local_rank, dist.get_world_size()


def setup_device(cfg, local_rank=0):
    """-> (device, autocast context, GradScaler or None).
    Device: cuda > mps > cpu unless --device says otherwise. dtype `auto` picks bfloat16 where the
    hardware runs it natively, else float16 with a GradScaler (which rescales the loss so small
    float16 gradients do not underflow), else float32."""
    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if device == "cuda":
        device = f"cuda:{local_rank}"
    dtype = cfg.dtype
    if dtype == "auto":
        if device.startswith("cuda"):
            dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        else:
            dtype = "float32"
    if dtype not in ("float32", "bfloat16", "float16"):
        raise UserError(f"--dtype must be auto, float32, bfloat16 or float16, not {dtype!r}")
    device_type = device.split(":")[0]
    ctx = nullcontext() if dtype == "float32" else torch.autocast(device_type, dtype=getattr(torch, dtype))
    scaler = torch.amp.GradScaler(device_type) if dtype == "float16" else None
    return device, ctx, scaler


# --- Data -----------------------------------------------------------------------------------------
SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
# anthropics/hh-rlhf on GitHub keeps these files in Git LFS; the Hugging Face mirror serves the bytes.
HH_RLHF_URL = "https://huggingface.co/datasets/Anthropic/hh-rlhf/resolve/main/helpful-base/{split}.jsonl.gz"
HH_RLHF_SHA256 = {"test": "8be3fc1a13b27901631696f2be6f184c799f1baeaf145f53ac5db24960adc37b"}
GPT2_URL = "https://huggingface.co/gpt2/resolve/main/model.safetensors"


def download(url, path, sha256=None):
    """Fetch `url` to `path` unless it is already there: streamed to `path + ".part"` with a progress
    line, checked against `sha256` when known, then renamed into place, so an interrupted or corrupt
    download never leaves a file that looks complete."""
    if os.path.exists(path):
        return path
    import requests  # only needed when something is actually downloaded

    tmp = path + ".part"
    hint = f"download it by hand from {url} and save it as {path}"
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with requests.get(url, stream=True, timeout=30) as r:
            r.raise_for_status()
            total = int(r.headers.get("content-length", 0))
            digest, done = hashlib.sha256(), 0
            with open(tmp, "wb") as f:
                for chunk in r.iter_content(chunk_size=1 << 20):
                    f.write(chunk)
                    digest.update(chunk)
                    done += len(chunk)
                    pct = f" {100 * done / total:5.1f}%" if total else ""
                    print(f"\rdownloading {os.path.basename(path)}: {done / 1e6:.1f} MB{pct}", end="", flush=True)
        print()
    except (requests.RequestException, OSError) as e:  # OSError: a read-only or full --data_dir
        if os.path.exists(tmp):
            os.remove(tmp)
        raise UserError(f"could not download {url} ({e.__class__.__name__}: {e}).\n"
                        f"If this machine is offline, {hint} (or point --data_dir / LLM_DATA_DIR "
                        f"at a folder that has it).") from None
    if sha256 and digest.hexdigest() != sha256:
        os.remove(tmp)
        raise UserError(f"{url} arrived corrupt (sha256 {digest.hexdigest()}, expected {sha256}); "
                        f"run again, or {hint}")
    os.replace(tmp, path)
    return path


VOWELS = set("aeiouAEIOU")


def true_reward(text: str) -> float:
    """The hidden judge: the fraction of characters that are vowels. Dense (every character counts),
    verifiable, and measurable on any tokenizer; the policy only ever sees it through preferences."""
    return sum(c in VOWELS for c in text) / max(1, len(text))


class CharTokenizer:
    """One id per character, in the order of `chars` (03_gpt.py's {"kind": "char"} tokenizer)."""

    def __init__(self, chars):
        self.chars, self.stoi = chars, {c: i for i, c in enumerate(chars)}

    def encode(self, text):
        return [self.stoi[c] for c in text if c in self.stoi]

    def decode(self, ids):
        return "".join(self.chars[i] for i in ids)


def make_tokenizer(spec):
    """03_gpt.py's checkpoint["tokenizer"] -> an object with encode/decode."""
    if spec.get("kind") == "char":
        return CharTokenizer(spec["chars"])
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
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            ex = json.loads(line)
            cut_c, cut_r = ex["chosen"].rfind(key) + len(key), ex["rejected"].rfind(key) + len(key)
            if ex["chosen"][:cut_c] != ex["rejected"][:cut_r]:
                continue  # a few lines differ earlier in the dialogue: not a clean pair
            out.append((ex["chosen"][:cut_c], ex["chosen"][cut_c:], ex["rejected"][cut_r:]))
    return out


def hh_rlhf_tensors(cfg, tok, split):
    """Fixed-shape (prompt, chosen, rejected) token tensors from HH-RLHF: the last P tokens of each
    prompt and the first R tokens of each response; shorter ones are dropped. This keeps every
    tensor in the script unpadded, at the price of judging truncated answers."""
    path = os.path.join(cfg.data_dir, "hh-rlhf", "helpful-base", f"{split}.jsonl.gz")
    download(HH_RLHF_URL.format(split=split), path, HH_RLHF_SHA256.get(split))
    P, R, rows = cfg.prompt_len, cfg.response_len, []
    for prompt, chosen, rejected in load_hh_rlhf(path):
        p, c, r = tok.encode(prompt), tok.encode(chosen), tok.encode(rejected)
        if len(p) >= P and len(c) >= R and len(r) >= R and c[:R] != r[:R]:
            rows.append((p[-P:], c[:R], r[:R]))
    if not rows:
        raise UserError(f"no HH-RLHF pair in {path} has >= {P} prompt and {R} response tokens")
    p, c, r = (torch.tensor(x) for x in zip(*rows))
    return p, c, r


# --- Model ----------------------------------------------------------------------------------------
@dataclass
class GPTConfig:
    block_size: int = 128
    vocab_size: int = 65
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = True


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with separate q/k/v projections. 03_gpt.py fuses them into
    one c_attn Linear(C, 3C) for speed; we split that weight when loading (it is just the three
    blocks stacked) so that LoRA can target the query and value projections as the paper does (LoRA
    sec. 7.1) with a plain nn.Linear wrapper, instead of a wrapper that knows about slices."""

    def __init__(self, n_embd, n_head, bias=True, dropout=0.0):
        super().__init__()
        assert n_embd % n_head == 0
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
            assert T == 1, "with a filled cache, feed one token at a time"
            k, v = torch.cat([cache["k"], k], 2), torch.cat([cache["v"], v], 2)  # (B, nh, T', hd)
        if cache is not None:
            cache["k"], cache["v"] = k, v
        # softmax(q k^T / sqrt(hd) + causal mask) v; a single new token may see every cached one
        y = F.scaled_dot_product_attention(q, k, v, is_causal=not past,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, n_embd, bias=True):
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd, bias=bias)
        self.c_proj = nn.Linear(4 * n_embd, n_embd, bias=bias)

    def forward(self, x):
        # GPT-2 used GELU's tanh approximation; the exact erf form (as in 03_gpt.py and nanoGPT)
        # differs by < 1e-3 and runs ~2.5x faster on CPUs, so 03's checkpoints match exactly.
        return self.c_proj(F.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg.n_embd, cfg.n_head, cfg.bias, cfg.dropout)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg.n_embd, cfg.bias)
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
            wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
            wpe=nn.Embedding(cfg.block_size, cfg.n_embd),
            drop=nn.Dropout(cfg.dropout),
            h=nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)]),
            ln_f=nn.LayerNorm(cfg.n_embd, bias=cfg.bias)))
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # weight tying (Press & Wolf 2017)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: residual projections scaled by 1/sqrt(2L)
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, 0.0, 0.02)

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


class RewardModel(nn.Module):
    """r_phi(x, y): the GPT backbone and a scalar head on the last token's hidden state
    (InstructGPT sec. 3.5). Causal attention lets that last token summarize the whole text."""

    def __init__(self, gpt: GPT):
        super().__init__()
        self.gpt = gpt
        self.head = nn.Linear(gpt.config.n_embd, 1)
        nn.init.zeros_(self.head.weight)

    def forward(self, seq):
        return self.head(self.gpt.body(seq)[:, -1]).squeeze(-1)  # (B,)


# 03_gpt.py (nanoGPT) keeps q, k, v in one c_attn; we keep them apart (see CausalSelfAttention).
def from_nanogpt_state_dict(sd):
    out = {}
    for name, t in sd.items():
        if name.endswith(".attn.bias") and t.dim() == 4:
            continue  # nanoGPT's causal-mask buffer (only on its non-flash path)
        if ".attn.c_attn." in name:
            for part, chunk in zip(("q_proj", "k_proj", "v_proj"), t.chunk(3, dim=0)):
                out[name.replace("c_attn", part)] = chunk.clone()
        else:
            out[name] = t
    return out


def to_nanogpt_state_dict(sd):
    out = {}
    for name, t in sd.items():
        if ".attn.q_proj." in name:
            parts = [sd[name.replace("q_proj", p)] for p in ("q_proj", "k_proj", "v_proj")]
            out[name.replace("q_proj", "c_attn")] = torch.cat(parts, 0)
        elif ".attn.k_proj." not in name and ".attn.v_proj." not in name:
            out[name] = t
    return out


def load_safetensors(path):
    """A safetensors file -> {name: tensor}. The format: 8 bytes little-endian header length n, n
    bytes of JSON {name: {dtype, shape, data_offsets: [begin, end]}}, then the raw bytes."""
    dtypes = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
              "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8, "BOOL": torch.bool}
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        data = bytearray(f.read())
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        t = torch.frombuffer(data[begin:end], dtype=dtypes[info["dtype"]]) if end > begin else \
            torch.empty(0, dtype=dtypes[info["dtype"]])
        out[name] = t.reshape(info["shape"])
    return out


def gpt2_checkpoint(path):
    """Hugging Face GPT-2 safetensors -> a checkpoint dict in 03_gpt.py's format. HF stores the
    projections as Conv1D, i.e. weight (in, out): transpose them into nn.Linear's (out, in). The
    shape comes from the tensors; every GPT-2 size uses 64-dimensional heads."""
    sd = {}
    for name, t in load_safetensors(path).items():
        name = name.removeprefix("transformer.")
        if name.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # causal-mask buffers, not weights
        if name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
            t = t.t()
        sd["transformer." + name] = t.float().contiguous()
    sd["lm_head.weight"] = sd["transformer.wte.weight"]
    (V, C), T = sd["transformer.wte.weight"].shape, sd["transformer.wpe.weight"].shape[0]
    n_layer = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("transformer.h."))
    args = dict(block_size=T, vocab_size=V, n_layer=n_layer, n_head=max(1, C // 64), n_embd=C, dropout=0.0,
                bias=True, pos="learned")
    return {"model": sd, "model_args": args, "tokenizer": {"kind": "gpt2"}}


def gpt_from_checkpoint(ckpt, path="checkpoint"):
    """03_gpt.py's checkpoint dict -> (GPT, tokenizer spec)."""
    if not isinstance(ckpt, dict) or not {"model", "model_args", "tokenizer"} <= set(ckpt):
        raise UserError(f"{path} is not a 03_gpt.py checkpoint (needs keys model, model_args, tokenizer)")
    args = ckpt["model_args"]
    if args.get("pos", "learned") != "learned":
        raise UserError(f"{path} uses pos={args['pos']!r}; this script's GPT implements learned "
                        f"absolute positions only (train 03_gpt.py with --pos=learned)")
    gcfg = GPTConfig(**{f.name: args[f.name] for f in dataclasses.fields(GPTConfig)})
    model = GPT(gcfg)
    missing, unexpected = model.load_state_dict(from_nanogpt_state_dict(ckpt["model"]), strict=False)
    if missing or unexpected:
        raise UserError(f"{path}: weights do not match the GPT (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model, ckpt["tokenizer"]


# --- Model: LoRA adapters -------------------------------------------------------------------------
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
        self.dropout = nn.Dropout(dropout)
        self.enabled, self.merged_from = True, None  # merged_from: W before merge()

    def delta_weight(self):
        return self.scaling * self.lora_B @ self.lora_A  # (out, in), rank <= r

    def forward(self, x):
        y = self.base(x)
        if self.enabled and self.merged_from is None:
            y = y + self.scaling * F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)
        return y

    @torch.no_grad()
    def merge(self):
        """W <- W + (alpha/r) B A: inference at the base layer's cost. (W + dW) - dW != W in floating
        point, so the original W is kept and unmerge() restores it bit for bit."""
        if self.merged_from is None:
            self.merged_from = self.base.weight.detach().clone()
            self.base.weight += self.delta_weight().to(self.base.weight.dtype)

    @torch.no_grad()
    def unmerge(self):
        if self.merged_from is not None:
            self.base.weight.copy_(self.merged_from)
            self.merged_from = None

    @torch.no_grad()
    def merged_linear(self):
        """A plain nn.Linear equal to this layer (adapter folded in): to drop LoRA for good."""
        self.unmerge()
        lin = copy.deepcopy(self.base)
        lin.weight += self.delta_weight().to(lin.weight.dtype)
        return lin


def lora_target_names(model):
    """The adaptable projections: every Linear inside a block, named without its block prefix."""
    return sorted({re.sub(r"^transformer\.h\.\d+\.", "", n) for n, m in model.named_modules()
                   if n.startswith("transformer.h.") and isinstance(m, nn.Linear)})


def apply_lora(model, targets=("attn.q_proj", "attn.v_proj"), r=8, alpha=16.0, dropout=0.0):
    """Replace the named projections of every block by LoRALinear and freeze everything else:
    only lora_A and lora_B train. Returns the model."""
    valid = lora_target_names(model)
    bad = [t for t in targets if t not in valid]
    if bad or not targets:
        raise UserError(f"unknown LoRA target {', '.join(bad) or '(none)'}; valid targets: {', '.join(valid)}")
    for p in model.parameters():
        p.requires_grad_(False)
    for name, module in list(model.named_modules()):
        short = re.sub(r"^transformer\.h\.\d+\.", "", name)
        if short in targets and isinstance(module, nn.Linear):
            parent_name, attr = name.rsplit(".", 1)
            setattr(model.get_submodule(parent_name), attr, LoRALinear(module, r, alpha, dropout))
    return model


def lora_layers(model):
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def lora_state_dict(model):
    """The adapters alone: what a LoRA fine-tune ships (a few KB to MB, not the whole model)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}


def load_lora_state_dict(model, sd):
    own = lora_state_dict(model)
    if set(own) != set(sd) or any(own[k].shape != sd[k].shape for k in sd):
        raise UserError("adapter checkpoint does not match the model's LoRA layers (targets or rank differ)")
    model.load_state_dict(sd, strict=False)


def merge_lora(model):
    """Fold every adapter into its base weight and drop the LoRALinear wrappers (after SFT, so the
    merged SFT model becomes the frozen reference for PPO and DPO)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            parent_name, attr = name.rsplit(".", 1)
            setattr(model.get_submodule(parent_name), attr, module.merged_linear())
    return model


@contextmanager
def disable_adapters(model):
    """Inside this block the model is its base again: pi_ref for PPO and DPO without a second copy."""
    layers = lora_layers(model)
    if any(m.merged_from is not None for m in layers):
        raise RuntimeError("unmerge() the adapters before disabling them")
    for m in layers:
        m.enabled = False
    try:
        yield model
    finally:
        for m in layers:
            m.enabled = True


# --- Model: the RLHF objectives -------------------------------------------------------------------
@torch.no_grad()
def generate(model, prompts, n_new, temperature=1.0, generator=None):
    """Sample n_new tokens after prompts (B, P) with a KV cache -> (B, P + n_new)."""
    cache = [{} for _ in model.transformer.h]
    logits = model(prompts, cache)[:, -1]  # (B, V)
    out = [prompts]
    for i in range(n_new):
        probs = F.softmax(logits.float() / temperature, dim=-1)  # (B, V)
        nxt = torch.multinomial(probs, 1, generator=generator)  # (B, 1)
        out.append(nxt)
        if i < n_new - 1:
            logits = model(nxt, cache)[:, -1]
    return torch.cat(out, 1)


def response_logprobs(model, seq, P, with_hidden=False):
    """log pi(y_t | x, y_<t) for the response part of seq (B, P + R) -> (B, R) token log-probs,
    (B, R, V) full log-distributions [, (B, R, C) hidden states before each response token]."""
    h = model.body(seq[:, :-1])[:, P - 1:]  # (B, R, C): the state that predicts y_t
    logp_all = F.log_softmax(model.lm_head(h).float(), dim=-1)  # (B, R, V)
    logp = logp_all.gather(-1, seq[:, P:, None]).squeeze(-1)  # (B, R)
    return (logp, logp_all, h) if with_hidden else (logp, logp_all)


def kl_k1(logp, ref_logp):
    """Per-token KL estimate log pi(y_t) - log pi_ref(y_t) at the sampled y_t: unbiased (its mean over
    y ~ pi is KL(pi||pi_ref)) but noisy and can be negative. PPO's per-token penalty uses it."""
    return logp - ref_logp


def kl_exact(logp_all, ref_logp_all):
    """Per-position KL(pi(.|s_t) || pi_ref(.|s_t)) = sum_v pi(v) (log pi(v) - log pi_ref(v)) -> (B, R).
    Summed over the response it is an unbiased, lower-variance estimate of the sequence KL."""
    return (logp_all.exp() * (logp_all - ref_logp_all)).sum(-1)


def bradley_terry_loss(r_chosen, r_rejected):
    """-log sigma(r_w - r_l): the reward model's pairwise loss (InstructGPT eq. 1)."""
    return -F.logsigmoid(r_chosen - r_rejected).mean()


def dpo_loss(logp_w, logp_l, ref_logp_w, ref_logp_l, beta):
    """DPO eq. 7: -log sigma(beta [(log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l))]).
    Returns (loss, implicit reward margin beta * [...], accuracy of the implicit reward)."""
    margin = beta * ((logp_w - ref_logp_w) - (logp_l - ref_logp_l))  # (B,)
    return -F.logsigmoid(margin).mean(), margin.mean(), (margin > 0).float().mean()


def gae(rewards, values, gamma=1.0, lam=0.95):
    """Generalized advantage estimation (Schulman et al. 2015, eq. 16) over (B, R) tensors, with
    V = 0 after the last token: delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lam A_{t+1}.
    Returns (advantages, returns = advantages + values), both (B, R)."""
    R = rewards.size(1)
    adv, last = torch.zeros_like(rewards), torch.zeros_like(rewards[:, 0])
    for t in reversed(range(R)):
        next_v = values[:, t + 1] if t + 1 < R else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_v - values[:, t]
        last = delta + gamma * lam * last
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


def whiten(x, eps=1e-8):
    return (x - x.mean()) / (x.std() + eps)


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
    kl = kl_k1(logp, ref_logp)  # (B, R)
    rewards = -kl_coef * kl
    rewards[:, -1] += score
    adv, returns = gae(rewards, values, gamma, lam)
    entropy = -(logp_all.exp() * logp_all).sum(-1).mean()
    return dict(seq=seq, logp=logp, values=values, adv=whiten(adv), returns=returns, score=score,
                kl=kl_exact(logp_all, ref_logp_all).sum(1), entropy=entropy)


def ppo_update(policy, value_head, batch, optimizer, step_fn, epochs=4, minibatch=32, clip_range=0.2,
               vf_clip=0.2, vf_coef=0.5, ctx=nullcontext()):
    """Several epochs of clipped-objective minibatch steps over one batch of rollouts.
    step_fn(loss) does backward, (DDP all-reduce), clipping and the optimizer step."""
    P = batch["seq"].size(1) - batch["logp"].size(1)
    n, stats = batch["seq"].size(0), []
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


# --- Training -------------------------------------------------------------------------------------
def save_checkpoint(path, model, optimizer, cfg, step, best_val, **extra):
    """Write the checkpoint to a temporary file, then rename it: a crash mid-write never destroys
    the previous checkpoint. The RNG state makes a resumed CPU run continue exactly. `model` is a
    state_dict here (a stage saves what it trains: adapters, a reward model, ...); `extra` adds
    stage-specific keys (03_gpt.py's model_args and tokenizer, PPO's beta, ...)."""
    ckpt = {
        "model": model,
        "optimizer": optimizer.state_dict(),
        "config": dataclasses.asdict(cfg),
        "step": step,
        "best_val": best_val,
        "rng": {"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
        **extra,
    }
    tmp = path + ".tmp"
    torch.save(ckpt, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, cfg):
    """Load a checkpoint saved by this script, refusing one whose model shape differs from `cfg`."""
    if not os.path.exists(path):
        raise UserError(f"no checkpoint at {path} (train first, or check --out_dir)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated file, a pickle from elsewhere, another format
        raise UserError(f"{path} is not a checkpoint this script can read ({e.__class__.__name__}: {e})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise UserError(f"{path} is not a {SCRIPT_NAME}.py checkpoint")
    diff = [f"{k}={ckpt['config'].get(k)!r} (flags say {getattr(cfg, k)!r})"
            for k in MODEL_KEYS if ckpt["config"].get(k) != getattr(cfg, k)]
    if diff:
        raise UserError(f"{path} was trained with another model config: {', '.join(diff)}")
    return ckpt


def log_jsonl(cfg, record):
    """Append one JSON object (an evaluation) to out_dir/log.jsonl."""
    with open(os.path.join(cfg.out_dir, "log.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")


class Run:
    """What every stage shares: config, ranks, device, autocast, tokenizer, logging, the step."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.rank, self.local_rank, self.world_size = setup_ddp()
        self.master = self.rank == 0
        self.device, self.ctx, self.scaler = setup_device(cfg, self.local_rank)
        self.tok = None

    def path(self, stage):
        return os.path.join(self.cfg.out_dir, f"{stage}.pt")

    def log(self, stage, step, **metrics):
        if self.master:
            log_jsonl(self.cfg, {"stage": stage, "step": step, **metrics})

    def barrier(self):
        if self.world_size > 1:
            dist.barrier()

    def sync_params(self, *modules):
        """Every rank starts a stage from rank 0's parameters (random inits could differ)."""
        if self.world_size > 1:
            for m in modules:
                for p in m.parameters():
                    dist.broadcast(p.data, 0)

    def step(self, loss, optimizer):
        """backward; average gradients over ranks (a hand-written DDP all-reduce: the same code for
        LoRA-only, value-head and reward-model parameters); clip; optimizer step."""
        params = [p for g in optimizer.param_groups for p in g["params"]]
        (self.scaler.scale(loss) if self.scaler else loss).backward()
        if self.world_size > 1:
            for p in params:
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= self.world_size
        if self.scaler:
            self.scaler.unscale_(optimizer)
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
        if self.scaler:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def resume(self, stage, optimizer, load_fn, total, required=False):
        """-> (start step, checkpoint or None). With --init_from=resume (or when a later stage
        needs this one: required=True), restore the stage's weights, optimizer and RNG from
        out_dir/<stage>.pt; a required stage must be complete."""
        path = self.path(stage)
        if not required and (self.cfg.init_from != "resume" or not os.path.exists(path)):
            return 0, None
        if not os.path.exists(path):
            raise UserError(f"stage {stage} has not run: no {path} (run --mode {stage} first, same flags)")
        ckpt = load_checkpoint(path, self.cfg)
        if required and ckpt["step"] < total:
            raise UserError(f"{path} stopped at step {ckpt['step']} of {total}: "
                            f"finish it with --mode {stage} --init_from=resume")
        load_fn(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if self.world_size == 1:
            torch.set_rng_state(ckpt["rng"]["torch"])
            if ckpt["rng"]["cuda"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
        else:  # rank 0 saved only its own stream
            torch.manual_seed(self.cfg.seed + self.rank + ckpt["step"])
        if self.master and not required:
            print(f"{stage}: resuming from step {ckpt['step']}")
        return ckpt["step"], ckpt

    def param_hash(self, stage, *modules):
        """Each rank prints a digest of its weights (the one exception to "rank 0 alone logs"):
        DDP must leave them identical."""
        h = hashlib.sha256()
        for m in modules:
            for t in m.state_dict().values():
                h.update(t.detach().float().cpu().numpy().tobytes())
        sys.stdout.write(f"rank {self.rank} {stage} params sha256 {h.hexdigest()[:16]}\n")  # one write:
        sys.stdout.flush()  # the ranks' lines cannot interleave


def lr_at(it, cfg):
    """Linear warmup then cosine decay to min_lr (nanoGPT's get_lr)."""
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    ratio = min(1.0, (it - cfg.warmup_iters) / max(1, cfg.lr_decay_iters - cfg.warmup_iters))
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.learning_rate - cfg.min_lr)


def adapter_state(model, value_head=None):
    """A LoRA stage's checkpoint: the adapters (and PPO's value head), never the frozen base."""
    sd = lora_state_dict(model)
    if value_head is not None:
        sd.update({f"value_head.{k}": v for k, v in value_head.state_dict().items()})
    return sd


def load_adapter_state(model, sd, value_head=None):
    load_lora_state_dict(model, {k: v for k, v in sd.items() if not k.startswith("value_head.")})
    if value_head is not None:
        value_head.load_state_dict({k[11:]: v for k, v in sd.items() if k.startswith("value_head.")})


def pretrain(run) -> GPT:
    """--base scratch: a character-level GPT on tinyshakespeare, saved as out_dir/pretrain.pt in
    03_gpt.py's checkpoint format (so `--base out/06_lora_rlhf/pretrain.pt` works as well)."""
    cfg = run.cfg
    text = shakespeare_text(cfg)
    chars = "".join(sorted(set(text)))
    run.tok = CharTokenizer(chars)
    data = torch.tensor(run.tok.encode(text))
    split = int(0.9 * len(data))
    train_ids, val_ids = data[:split], data[split:]
    gcfg = GPTConfig(cfg.block_size, len(chars), cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.dropout, cfg.bias)
    torch.manual_seed(cfg.seed)  # the same init on every rank
    model = GPT(gcfg).to(run.device)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.learning_rate, betas=(0.9, 0.95))
    torch.manual_seed(cfg.seed + run.rank)
    load = lambda sd: model.load_state_dict(from_nanogpt_state_dict(sd))  # noqa: E731
    step, ckpt = run.resume("pretrain", opt, load, cfg.max_iters)
    best_val = ckpt["best_val"] if ckpt else float("inf")

    def batch(ids):
        ix = torch.randint(len(ids) - cfg.block_size - 1, (cfg.batch_size,))
        x = torch.stack([ids[i:i + cfg.block_size] for i in ix])  # (B, T)
        y = torch.stack([ids[i + 1:i + 1 + cfg.block_size] for i in ix])  # (B, T)
        return x.to(run.device), y.to(run.device)

    def lm_loss(x, y):
        with run.ctx:
            return F.cross_entropy(model(x).float().view(-1, gcfg.vocab_size), y.view(-1))

    t0 = time.time()
    while step < cfg.max_iters:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        loss = lm_loss(*batch(train_ids))
        run.step(loss, opt)
        step += 1
        if run.master and step % cfg.log_interval == 0:
            dt = (time.time() - t0) / cfg.log_interval
            print(f"pretrain step {step}: loss {loss.item():.4f}, lr {lr_at(step, cfg):.2e}, "
                  f"{cfg.batch_size * cfg.block_size * run.world_size / dt:.0f} tok/s, {dt * 1000:.0f} ms/step")
            t0 = time.time()
        if step % cfg.eval_interval == 0 or step == cfg.max_iters:
            model.eval()
            with torch.no_grad():
                val = sum(lm_loss(*batch(val_ids)).item() for _ in range(cfg.eval_iters)) / cfg.eval_iters
            model.train()
            best_val = min(best_val, val)
            run.log("pretrain", step, train_loss=loss.item(), val_loss=val)
            if run.master:
                print(f"pretrain step {step}: val loss {val:.4f}")
                save_checkpoint(run.path("pretrain"), to_nanogpt_state_dict(model.state_dict()), opt, cfg,
                                step, best_val, model_args={**dataclasses.asdict(gcfg), "pos": "learned"},
                                tokenizer={"kind": "char", "chars": chars})
            run.barrier()
    run.param_hash("pretrain", model)
    return model.eval()


def load_base(run):
    """The base model and tokenizer: pretrained here earlier, GPT-2 from Hugging Face, or a
    03_gpt.py checkpoint."""
    cfg = run.cfg
    if cfg.base == "gpt2":
        path = download(GPT2_URL, os.path.join(cfg.data_dir, "gpt2", "model.safetensors"))
        ckpt = gpt2_checkpoint(path)
    else:
        path = run.path("pretrain") if cfg.base == "scratch" else cfg.base
        if not os.path.exists(path):
            raise UserError(f"no base checkpoint at {path} (run --mode pretrain first)")
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise UserError(f"{path} is not a checkpoint this script can read ({e.__class__.__name__})") from None
        if cfg.base == "scratch" and ckpt.get("step", 0) < cfg.max_iters:
            raise UserError(f"{path} stopped at step {ckpt.get('step')} of {cfg.max_iters}: "
                            f"finish it with --mode pretrain --init_from=resume")
    model, tok_spec = gpt_from_checkpoint(ckpt, path)
    run.tok = make_tokenizer(tok_spec)
    return model.to(run.device).eval()


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
    # SFT on "the target style": the windows whose response the hidden judge scores highest
    def target_style(w):
        scores = torch.tensor([true_reward(run.tok.decode(x[P:].tolist())) for x in w])
        return w[scores >= torch.quantile(scores, 1 - cfg.sft_top_frac)]

    return dict(sft=target_style(windows), sft_val=target_style(held[cfg.n_eval_prompts:])[:1024],
                prompts=windows[:, :P], eval_prompts=held[: cfg.n_eval_prompts, :P])


def sft(run, base, data, full=False, required=False, full_metrics=None):
    """Supervised fine-tuning on the target-style windows, loss on the response tokens only. LoRA by
    default; full=True fine-tunes every weight at the same budget (the baseline, not checkpointed:
    its metrics, full_metrics, are stored in the LoRA run's checkpoint). Returns (model, metrics)."""
    cfg, P = run.cfg, run.cfg.prompt_len
    stage = "sft_full" if full else "sft"
    torch.manual_seed(cfg.seed)
    model = copy.deepcopy(base).train()
    if not full:
        apply_lora(model, parse_targets(cfg), cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout)
    run.sync_params(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.sft_full_lr if full else cfg.sft_lr, weight_decay=0.0)
    torch.manual_seed(cfg.seed + run.rank)
    step, ckpt = (0, None) if full else run.resume(stage, opt, lambda sd: load_adapter_state(model, sd),
                                                   cfg.sft_iters, required)
    metrics = dict(ckpt["metrics"]) if ckpt and step >= cfg.sft_iters else {}
    windows, t0 = data["sft"], time.time()
    while step < cfg.sft_iters:
        seq = windows[torch.randint(len(windows), (cfg.batch_size,))].to(run.device)  # (B, P + R)
        with run.ctx:
            logp, _ = response_logprobs(model, seq, P)
        loss = -logp.mean()  # cross-entropy on the response tokens
        run.step(loss, opt)
        step += 1
        if run.master and step % cfg.log_interval == 0:
            print(f"{stage} step {step}: loss {loss.item():.4f}")
        if step % cfg.eval_interval == 0 or step == cfg.sft_iters:
            with torch.no_grad(), run.ctx:  # response loss on held-out target-style windows
                val = torch.cat([-response_logprobs(model, w.to(run.device), P)[0].mean(1)
                                 for w in data["sft_val"].split(256)]).mean().item()
            run.log(stage, step, loss=loss.item(), val_loss=val)
            n_train = sum(p.numel() for p in params)
            metrics = dict(loss=loss.item(), val_loss=val, trainable=n_train, seconds=time.time() - t0,
                           trainable_frac=n_train / sum(p.numel() for p in base.parameters()))
            if run.master:
                print(f"{stage} step {step}: held-out response loss {val:.4f}")
            if run.master and not full:
                adapter = os.path.join(cfg.out_dir, "sft_adapter.pt")  # the adapters alone: what you ship
                torch.save(lora_state_dict(model), adapter + ".tmp")
                os.replace(adapter + ".tmp", adapter)
                metrics["adapter_bytes"] = os.path.getsize(adapter)
                save_checkpoint(run.path(stage), adapter_state(model), opt, cfg, step, loss.item(),
                                metrics={**metrics, "full": full_metrics or {}})
            run.barrier()
    run.param_hash(stage, model)
    return model.eval(), metrics


def parse_targets(cfg):
    return tuple(t.strip() for t in cfg.lora_targets.split(",") if t.strip())


def sample_pairs(run, sft_model, data, fresh):
    """Preference pairs (prompt, chosen, rejected). synthetic: two SFT samples per prompt, the one
    with the higher true_reward chosen, near-ties (|difference| <= pref_margin) dropped. Rank 0
    samples and saves them to out_dir/prefs.pt; the other ranks read that file."""
    cfg, path = run.cfg, os.path.join(run.cfg.out_dir, "prefs.pt")
    if cfg.prefs == "hh-rlhf":
        return data["pairs"]
    if run.master and (fresh or not os.path.exists(path)):
        P = cfg.prompt_len
        prompts = data["prompts"][torch.randperm(len(data["prompts"]))[: cfg.n_pairs]].to(run.device)
        chosen, rejected, scores = [], [], []
        for pb in prompts.split(256):
            with run.ctx:
                a, b = generate(sft_model, pb, cfg.response_len), generate(sft_model, pb, cfg.response_len)
            ra = torch.tensor([true_reward(run.tok.decode(s[P:].tolist())) for s in a])
            rb = torch.tensor([true_reward(run.tok.decode(s[P:].tolist())) for s in b])
            first = (ra > rb).to(run.device)[:, None]
            chosen.append(torch.where(first, a, b)[:, P:])
            rejected.append(torch.where(first, b, a)[:, P:])
            scores.append(torch.stack([torch.maximum(ra, rb), torch.minimum(ra, rb)], 1))
        chosen, rejected, scores = torch.cat(chosen).cpu(), torch.cat(rejected).cpu(), torch.cat(scores)
        keep = scores[:, 0] - scores[:, 1] > cfg.pref_margin
        pairs = dict(prompts=prompts.cpu()[keep], chosen=chosen[keep], rejected=rejected[keep], scores=scores[keep])
        torch.save(pairs, path + ".tmp")
        os.replace(path + ".tmp", path)
        print(f"preference pairs: {int(keep.sum())} of {len(keep)} prompts kept (ties dropped), mean "
              f"true reward chosen {scores[keep, 0].mean():.3f} vs rejected {scores[keep, 1].mean():.3f}")
    run.barrier()
    pairs = torch.load(path, weights_only=True)
    return pairs["prompts"], pairs["chosen"], pairs["rejected"]


def split_pairs(pairs, holdout):
    n_test = max(1, int(holdout * len(pairs[0])))
    return tuple(t[:-n_test] for t in pairs), tuple(t[-n_test:] for t in pairs)


def train_rm(run, sft_model, pairs, required=False):
    """Reward model: the SFT backbone plus a scalar head, trained on -log sigma(r_w - r_l).
    Returns (reward model, metrics incl. held-out pairwise accuracy and the normalization)."""
    cfg = run.cfg
    train_pairs, test_pairs = split_pairs(pairs, cfg.rm_holdout)
    torch.manual_seed(cfg.seed)
    rm = RewardModel(copy.deepcopy(sft_model)).to(run.device).train()
    for p in rm.parameters():
        p.requires_grad_(True)
    run.sync_params(rm)
    opt = torch.optim.AdamW(rm.parameters(), lr=cfg.rm_lr, weight_decay=0.0)
    torch.manual_seed(cfg.seed + run.rank)
    step, ckpt = run.resume("rm", opt, rm.load_state_dict, cfg.rm_iters, required)
    metrics = ckpt["metrics"] if ckpt and step >= cfg.rm_iters else {}

    def scores(p, c, r):  # -> (r_chosen, r_rejected), both (B,)
        seq = torch.cat([torch.cat([p, c], 1), torch.cat([p, r], 1)]).to(run.device)  # (2B, P + R)
        with run.ctx:
            return rm(seq).float().chunk(2)

    @torch.no_grad()
    def accuracy(split):
        rm.eval()
        rc, rr = zip(*(scores(*b) for b in zip(*(t.split(256) for t in split))))
        rm.train()
        rc, rr = torch.cat(rc), torch.cat(rr)
        return (rc > rr).float().mean().item(), torch.cat([rc, rr])

    while step < cfg.rm_iters:
        idx = torch.randint(len(train_pairs[0]), (cfg.batch_size,))
        loss = bradley_terry_loss(*scores(*(t[idx] for t in train_pairs)))
        run.step(loss, opt)
        step += 1
        if run.master and (step % cfg.log_interval == 0 or step == cfg.rm_iters):
            print(f"rm step {step}: loss {loss.item():.4f}")
        if step % cfg.eval_interval == 0 or step == cfg.rm_iters:
            acc, _ = accuracy(test_pairs)
            # normalize the RM's output to mean 0, std 1 on the training responses before PPO uses
            # it as a reward (Ziegler et al. 2019 sec. 2.2), so kl_coef means the same for any RM
            _, all_scores = accuracy(train_pairs)
            metrics = dict(loss=loss.item(), heldout_acc=acc, n_train=len(train_pairs[0]),
                           n_heldout=len(test_pairs[0]), mean=all_scores.mean().item(), std=all_scores.std().item())
            run.log("rm", step, **metrics)
            if run.master:
                print(f"rm step {step}: held-out pairwise accuracy {acc:.3f} ({len(test_pairs[0])} pairs)")
                save_checkpoint(run.path("rm"), rm.state_dict(), opt, cfg, step, loss.item(), metrics=metrics)
            run.barrier()
    run.param_hash("rm", rm)
    return rm.eval(), metrics


def train_ppo(run, sft_model, rm, rm_metrics, data):
    """PPO on the LoRA policy against the normalized RM score, with the per-token KL penalty to the
    reference (= the adapters disabled, i.e. the SFT model). Returns (policy, history)."""
    cfg = run.cfg
    torch.manual_seed(cfg.seed)
    policy = apply_lora(copy.deepcopy(sft_model), parse_targets(cfg), cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout)
    value_head = nn.Linear(sft_model.config.n_embd, 1).to(run.device)
    run.sync_params(policy, value_head)
    params = [p for p in policy.parameters() if p.requires_grad] + list(value_head.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.ppo_lr, weight_decay=0.0)
    torch.manual_seed(cfg.seed + run.rank)
    step, ckpt = run.resume("ppo", opt, lambda sd: load_adapter_state(policy, sd, value_head), cfg.ppo_iters)
    kl_coef, history = (ckpt["kl_coef"], ckpt["history"]) if ckpt else (cfg.kl_coef, [])

    def score_fn(seq):
        with run.ctx:
            return (rm(seq).float() - rm_metrics["mean"]) / rm_metrics["std"]

    while step < cfg.ppo_iters:
        t0 = time.time()
        prompts = data["prompts"][torch.randint(len(data["prompts"]), (cfg.ppo_batch,))].to(run.device)
        with run.ctx:
            batch = ppo_rollout(policy, value_head, prompts, cfg.response_len, score_fn, kl_coef, cfg.gamma, cfg.lam)
        stats = ppo_update(policy, value_head, batch, opt, run.step, cfg.ppo_epochs, cfg.ppo_minibatch,
                           cfg.clip_range, cfg.vf_clip, cfg.vf_coef, run.ctx)
        true = [true_reward(run.tok.decode(s[cfg.prompt_len:].tolist())) for s in batch["seq"]]
        means = torch.tensor([batch["score"].mean().item(), sum(true) / len(true), batch["kl"].mean().item(),
                              batch["entropy"].item()], device=run.device)
        if run.world_size > 1:  # every rank must adapt beta with the same KL
            dist.all_reduce(means)
            means /= run.world_size
        rec = dict(rm_reward=means[0].item(), true_reward=means[1].item(), kl=means[2].item(),
                   entropy=means[3].item(), kl_coef=kl_coef, **stats)
        if cfg.kl_target > 0:  # adaptive KL controller: beta *= 1 + K (KL/target - 1), clipped (K = 0.1)
            kl_coef *= 1 + 0.1 * max(-0.2, min(0.2, rec["kl"] / cfg.kl_target - 1))
        step += 1
        history.append(rec)
        run.log("ppo", step, **rec)
        if run.master:
            if step % max(1, cfg.log_interval // 10) == 0 or step == cfg.ppo_iters:
                print(f"ppo iter {step}: rm {rec['rm_reward']:+.3f}, true {rec['true_reward']:.4f}, "
                      f"kl {rec['kl']:.3f}, "
                      f"entropy {rec['entropy']:.3f}, clipfrac {rec['clipfrac']:.3f}, value loss "
                      f"{rec['value_loss']:.4f}, beta {kl_coef:.4f}, {time.time() - t0:.1f} s")
            # adapters + value head are small: checkpoint every iteration
            save_checkpoint(run.path("ppo"), adapter_state(policy, value_head), opt, cfg, step, rec["kl"],
                            kl_coef=kl_coef, history=history)
        run.barrier()
    run.param_hash("ppo", policy, value_head)
    return policy.eval(), history


def train_dpo(run, sft_model, pairs):
    """DPO on the RM's training pairs: LoRA policy, reference = the adapters disabled."""
    cfg, P = run.cfg, run.cfg.prompt_len
    train_pairs, _ = split_pairs(pairs, cfg.rm_holdout)  # the RM's training pairs
    torch.manual_seed(cfg.seed)
    policy = apply_lora(copy.deepcopy(sft_model), parse_targets(cfg), cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout)
    run.sync_params(policy)
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=cfg.dpo_lr, weight_decay=0.0)
    torch.manual_seed(cfg.seed + run.rank)
    step, _ = run.resume("dpo", opt, lambda sd: load_adapter_state(policy, sd), cfg.dpo_iters)

    def logps(p, c, r):  # -> summed response log-probs of chosen and rejected, (B,) each
        seq = torch.cat([torch.cat([p, c], 1), torch.cat([p, r], 1)]).to(run.device)  # (2B, P + R)
        with run.ctx:
            return response_logprobs(policy, seq, P)[0].sum(1).chunk(2)

    while step < cfg.dpo_iters:
        idx = torch.randint(len(train_pairs[0]), (cfg.batch_size,))
        b = [t[idx] for t in train_pairs]
        with torch.no_grad(), disable_adapters(policy):
            ref_w, ref_l = logps(*b)
        logp_w, logp_l = logps(*b)
        loss, margin, acc = dpo_loss(logp_w, logp_l, ref_w, ref_l, cfg.dpo_beta)
        run.step(loss, opt)
        step += 1
        if run.master and (step % cfg.log_interval == 0 or step == cfg.dpo_iters):
            print(f"dpo step {step}: loss {loss.item():.4f}, margin {margin.item():+.3f}, accuracy {acc.item():.3f}")
        if step % cfg.eval_interval == 0 or step == cfg.dpo_iters:
            run.log("dpo", step, loss=loss.item(), margin=margin.item(), accuracy=acc.item())
            if run.master:
                save_checkpoint(run.path("dpo"), adapter_state(policy), opt, cfg, step, loss.item())
            run.barrier()
    run.param_hash("dpo", policy)
    return policy.eval()


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
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install matplotlib): skipping the PPO plot")
        return
    kl = [h["kl"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(kl, [h["true_reward"] for h in history], "o-", ms=3, label="true reward (hidden)")
    ax.set_xlabel("KL(pi || pi_ref) per response (nats)")
    ax.set_ylabel("true reward")
    ax2 = ax.twinx()
    ax2.plot(kl, [h["rm_reward"] for h in history], "s-", ms=2, color="tab:orange", alpha=0.6, label="RM reward")
    ax2.set_ylabel("RM reward (normalized)")
    fig.legend(loc="upper left", bbox_to_anchor=(0.14, 0.88))
    ax.set_title("PPO: true reward vs KL to the SFT reference")
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=120)
    plt.close(fig)
    os.replace(path + ".tmp.png", path)


def print_table(rows, sft_metrics, full_metrics, rm_metrics, prefs):
    print("\n=== LoRA vs full fine-tuning (SFT, same steps) ===")
    print(f"{'':6} {'trainable params':>18} {'fraction':>9} {'adapter bytes':>14} {'val loss':>9} {'seconds':>8}")
    for name, m in (("lora", sft_metrics), ("full", full_metrics)):
        if m:
            print(f"{name:6} {m['trainable']:>18,} {m['trainable_frac']:>9.4f} {m.get('adapter_bytes', '-')!s:>14} "
                  f"{m['val_loss']:>9.4f} {m['seconds']:>8.1f}")
    print(f"\nreward model: held-out pairwise accuracy {rm_metrics['heldout_acc']:.3f} on "
          f"{rm_metrics['n_heldout']} pairs (trained on {rm_metrics['n_train']})")
    print("\n=== true reward (hidden vowel fraction) over the fixed held-out prompts ===")
    if prefs == "hh-rlhf":
        print("(--prefs hh-rlhf: human preferences do not reward vowels; read the RM score column)")
    print(f"{'stage':6} {'true reward':>18} {'RM score':>9} {'KL to SFT (nats/response)':>26}")
    for name, ev in rows.items():
        print(f"{name:6} {ev['true']:>10.4f} +- {ev['true_se']:.4f} {ev['rm']:>9.3f} {ev['kl']:>26.3f}")
    for name, ev in rows.items():
        for prompt, response in ev["samples"]:
            print(f"[{name}] {prompt!r} -> {response!r}")


# --- main -----------------------------------------------------------------------------------------
def check_config(cfg):
    """Refuse bad flag values before any work starts."""
    if cfg.mode not in MODES:
        raise UserError(f"--mode must be one of {', '.join(MODES)}, not {cfg.mode!r}")
    if cfg.init_from not in ("scratch", "resume"):
        raise UserError(f"--init_from must be scratch or resume, not {cfg.init_from!r}")
    if cfg.prefs not in ("synthetic", "hh-rlhf"):
        raise UserError(f"--prefs must be synthetic or hh-rlhf, not {cfg.prefs!r}")
    if cfg.base not in ("scratch", "gpt2") and not os.path.isfile(cfg.base):
        raise UserError(f"--base: no checkpoint at {cfg.base} (use scratch, gpt2 or a 03_gpt.py ckpt.pt)")
    if cfg.base != "scratch" and cfg.mode == "pretrain":
        raise UserError("--mode pretrain only applies to --base scratch")
    if cfg.base == "scratch" and cfg.prompt_len + cfg.response_len > cfg.block_size:
        raise UserError(f"prompt_len + response_len = {cfg.prompt_len + cfg.response_len} exceeds "
                        f"block_size {cfg.block_size}")
    valid = lora_target_names(GPT(GPTConfig(block_size=1, vocab_size=1, n_layer=1, n_head=1, n_embd=1)))
    bad = [t for t in parse_targets(cfg) if t not in valid]
    if bad or not parse_targets(cfg):
        raise UserError(f"unknown LoRA target {', '.join(bad) or '(none)'}; valid targets: {', '.join(valid)}")


def train(cfg) -> dict:
    """Run the stages --mode asks for (each resumable), loading the earlier ones from out_dir."""
    check_config(cfg)
    run = Run(cfg)
    if run.master:
        os.makedirs(cfg.out_dir, exist_ok=True)
    run.barrier()
    out = run_stages(run)
    if run.world_size > 1:
        dist.barrier()
        dist.destroy_process_group()
    return out


def run_stages(run) -> dict:
    cfg, out = run.cfg, {}
    want = MODES[1:] if cfg.mode == "all" else (cfg.mode,)
    base = pretrain(run) if "pretrain" in want and cfg.base == "scratch" else load_base(run)
    if cfg.prompt_len + cfg.response_len > base.config.block_size:
        raise UserError(f"prompt_len + response_len = {cfg.prompt_len + cfg.response_len} exceeds the "
                        f"base model's block_size {base.config.block_size}")
    if want == ("pretrain",):
        return out
    data = task_data(run)
    full_metrics = {}
    sft_done = os.path.exists(run.path("sft")) and cfg.init_from == "resume" and \
        torch.load(run.path("sft"), weights_only=True)["step"] >= cfg.sft_iters
    if "sft" in want and cfg.sft_compare_full and not sft_done:
        full_metrics = sft(run, base, data, full=True)[1]
    sft_model, sft_metrics = sft(run, base, data, required="sft" not in want, full_metrics=full_metrics)
    out["sft_full"] = full_metrics = sft_metrics.pop("full", full_metrics)
    out["sft"] = sft_metrics
    # fold the SFT adapters into the weights: this merged model is pi_ref, and PPO/DPO put fresh
    # adapters on top, so "adapters disabled" means exactly "the SFT model"
    sft_model = merge_lora(sft_model)
    if want == ("sft",):
        return out
    pairs = sample_pairs(run, sft_model, data, fresh="rm" in want and cfg.init_from == "scratch")
    rm, rm_metrics = None, {}
    if "rm" in want or "ppo" in want:
        rm, rm_metrics = train_rm(run, sft_model, pairs, required="rm" not in want)
        out["rm"] = rm_metrics
    if "ppo" in want:
        ppo_policy, out["ppo_history"] = train_ppo(run, sft_model, rm, rm_metrics, data)
        if run.master:
            plot_ppo(out["ppo_history"], os.path.join(cfg.out_dir, "ppo_reward_vs_kl.png"))
    if "dpo" in want:
        dpo_policy = train_dpo(run, sft_model, pairs)
    if cfg.mode == "all" and run.master:
        prompts = data["eval_prompts"]
        rows = dict(base=evaluate(run, base, prompts, sft_model, rm, rm_metrics),
                    sft=evaluate(run, sft_model, prompts, None, rm, rm_metrics),
                    ppo=evaluate(run, ppo_policy, prompts, "adapters", rm, rm_metrics),
                    dpo=evaluate(run, dpo_policy, prompts, "adapters", rm, rm_metrics))
        print_table(rows, sft_metrics, full_metrics, rm_metrics, cfg.prefs)
        out["eval"] = rows
        log_jsonl(cfg, {"stage": "eval", **{k: {m: v for m, v in ev.items() if m != "samples"}
                                            for k, ev in rows.items()}})
    return out


def main(argv=None):
    cfg = parse_args(argv)
    try:
        train(cfg)
    except UserError as e:
        print(f"{SCRIPT_NAME}.py: error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
