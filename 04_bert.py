"""BERT: WordPiece, masked-LM + next-sentence pretraining, fine-tuning, distillation.

The encoder side of the Transformer. You will learn: BERT's tokenizer (basic tokenization, then greedy
longest-match WordPiece with `##` continuations) and how to train its vocabulary; the two pretraining
objectives, masked language modelling (MLM: 15% of tokens chosen, 80% [MASK] / 10% random / 10% kept)
and next-sentence prediction (NSP); a post-LN bidirectional encoder with token + segment + position
embeddings, a tanh pooler and an MLM head tied to the input embeddings; loading the real
`bert-base-uncased` with your own safetensors reader; fine-tuning on SST-2; what pretraining buys at
500, 2,000 and all labels, measured fairly (--mode budget); and knowledge distillation.

Run it:
    python 04_bert.py --mode pretrain                    # CPU: a BERT-Tiny on SST-2's text, unlabeled
    python 04_bert.py --mode pretrain --corpus wikitext2+sst2 --out_dir out/04_wiki  # with Wikipedia and NSP
    python 04_bert.py --mode budget --init_from out/04_bert/pretrain.pt   # pretrained vs scratch, 500..all labels
    python 04_bert.py --mode finetune --init_from out/04_bert/pretrain.pt     # SST-2 from our checkpoint
    python 04_bert.py --mode finetune --vocab out/04_bert/vocab.txt --out_dir out/04_bert_scratch
    python 04_bert.py --mode distill --teacher out/04_bert/finetune.pt       # a half-depth student
    python 04_bert.py --mode finetune --preset gpu --init_from bert-base-uncased   # one GPU; $HF_ENDPOINT: a mirror
    torchrun --standalone --nproc_per_node=8 04_bert.py --mode pretrain --preset gpu   # DDP
    python 04_bert.py --help                             # every flag, its default and meaning

Expected result (README.md's table for 04): 43 minutes of self-pretraining on one thread reach 44% MLM
accuracy; SST-2 dev accuracy pretrained vs scratch: 62.2 vs 64.6% with 500 labels, 72.8 vs 70.8% with
2,000, 80.7 vs 80.0% with all (3 seeds each): at this scale pretraining helps from a few thousand labels
on, and not below. The half-depth student keeps ~100% of its teacher's accuracy at ~1.9x the speed.
bert-base-uncased on a GPU: aim for >= 92% (the paper: 92.7; not measured here).

Notation: B batch, T sequence length, C channels (n_embd), nh heads, hd head dim (C // nh), V vocab,
N number of positions chosen for MLM in a batch, K classes, tau distillation temperature.
Names follow the paper: segment A / B, [CLS] / [SEP] / [MASK], IsNext / NotNext.

References: Devlin et al. 2018, BERT (arXiv:1810.04805); Vaswani et al. 2017 (arXiv:1706.03762);
Wu et al. 2016, WordPiece in GNMT (arXiv:1609.08144); Hinton et al. 2015, distillation
(arXiv:1503.02531); Sanh et al. 2019, DistilBERT (arXiv:1910.01108); Chen et al. 2016, gradient
checkpointing (arXiv:1604.06174). Tests compare against hand-worked tokenizations, a naive attention
with gradcheck, and a naive BERT forward written from Hugging Face's weight names.
"""
import dataclasses
import hashlib
import heapq
import inspect
import json
import math
import os
import random
import re
import struct
import sys
import tempfile
import time
import unicodedata
import zipfile
from collections import Counter, defaultdict
from contextlib import nullcontext
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


# --- Config ---------------------------------------------------------------------------------------
SCRIPT_NAME = "04_bert"  # the file's stem: default out_dir is out/<SCRIPT_NAME>
MODES = ("pretrain", "finetune", "distill", "budget")
CORPORA = ("wikitext2", "wikitext103", "sst2")


@dataclass
class Config:
    # I/O
    out_dir: str = f"out/{SCRIPT_NAME}"  # checkpoints (<mode>.pt), log.jsonl, vocab.txt
    data_dir: str = os.environ.get("LLM_DATA_DIR", "data")  # raw downloads; read, never modified
    init_from: str = "scratch"  # scratch | resume | our pretrain .pt | HF folder | HF hub name (bert-base-uncased)
    mode: str = "pretrain"  # pretrain (MLM + NSP) | finetune (SST-2) | distill | budget (pretrained vs scratch)
    corpus: str = "wikitext2"  # pretraining text: wikitext2 | wikitext103 | sst2 | a file; a+b joins them
    task: str = "sst2"  # fine-tuning task: sst2 (GLUE SST-2 sentiment)
    vocab: str = ""  # a vocab.txt to use; empty: the checkpoint's, or train one on --corpus
    teacher: str = ""  # distill: the fine-tuned teacher checkpoint (empty: <out_dir>/finetune.pt)
    # tokenizer and data
    vocab_size: int = 8192  # size of the WordPiece vocabulary that train_wordpiece builds
    max_len: int = 64  # tokens per example, [CLS] and [SEP]s included
    mlm_prob: float = 0.15  # fraction of non-special tokens chosen for MLM (BERT 3.1)
    nsp: bool = True  # pretrain: sentence pairs + next-sentence prediction; false: packed text, MLM only
    # model
    n_layer: int = 2  # number of encoder blocks
    n_head: int = 2  # attention heads
    n_embd: int = 128  # model width C (the feed-forward is 4C wide)
    block_size: int = 512  # number of learned position embeddings (longest possible input)
    dropout: float = 0.1  # dropout on embeddings, attention weights and residual branches
    grad_ckpt: bool = False  # activation checkpointing: recompute each block in backward
    # distillation
    student_n_layer: int = 0  # student depth (0: half the teacher's)
    student_n_embd: int = 0  # student width (0: the teacher's; then it starts from every other layer)
    temperature: float = 2.0  # tau: softens both distributions in the distillation loss
    alpha: float = 0.5  # weight of the soft-target loss; (1 - alpha) on the hard labels
    # the label-budget experiment (--mode budget)
    budgets: str = "500,2000,all"  # labeled SST-2 sentences per run; all: every one outside --heldout
    arms: str = "pretrained,scratch"  # from --init_from, and/or the same model from random weights
    lrs: str = "3e-5,1e-4,3e-4,1e-3"  # peak learning rates tried for every budget and arm
    n_seeds: int = 3  # seeds per budget, arm and learning rate
    heldout: int = 1000  # training sentences kept out of every run, to choose each arm's learning rate
    # training
    batch_size: int = 64  # sequences per micro-batch (per rank)
    max_iters: int = 2000  # optimizer steps
    learning_rate: float = 1e-3  # peak learning rate
    min_lr: float = 1e-4  # learning rate at the end of the cosine decay
    warmup_iters: int = 100  # linear warmup steps
    lr_decay_iters: int = 0  # steps of cosine decay (0: max_iters)
    weight_decay: float = 0.01  # AdamW weight decay, not on biases and LayerNorms (BERT A.2)
    grad_clip: float = 1.0  # clip the global gradient norm (0: off)
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step, over all ranks
    eval_interval: int = 250  # steps between evaluations (and checkpoints)
    eval_iters: int = 20  # pretrain: validation batches per evaluation (fine-tuning uses all of dev)
    log_interval: int = 25  # steps between progress lines
    always_save_checkpoint: bool = False  # save at every eval, not only on a new best val loss
    # system
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16 (autocast; float16 uses a GradScaler)
    compile: bool = False  # torch.compile the model
    seed: int = 1337  # base seed; rank r uses seed + r


# "PRESET/MODE" is applied after PRESET when --mode is MODE: fine-tuning and distillation want other
# step counts and learning rates than pretraining (BERT A.3: lr 2e-5..5e-5, 2-4 epochs).
_SST2_CPU = dict(batch_size=32, max_iters=1500, learning_rate=3e-4, min_lr=3e-5, eval_interval=250)
PRESETS = {
    "tiny": dict(vocab_size=300, max_len=32, n_layer=1, n_head=2, n_embd=32, block_size=64, batch_size=8,
                 max_iters=20, warmup_iters=5, eval_interval=10, eval_iters=2, log_interval=5),  # tests
    "cpu": dict(),  # the default: BERT-Tiny (2 x 128), a 2-core CPU
    # Self-pretraining (Krishna et al. 2022): MLM on the SST-2 training sentences, labels thrown away;
    # short one-sentence examples, so many steps fit in ~35 minutes (README: why this corpus and no NSP)
    "cpu/pretrain": dict(corpus="sst2", batch_size=128, max_iters=16000, warmup_iters=500, eval_interval=500,
                         log_interval=250),
    "gpu": dict(corpus="wikitext103", vocab_size=30522, max_len=128, n_layer=4, n_head=8, n_embd=512,
                batch_size=32, gradient_accumulation_steps=8, max_iters=50000, learning_rate=5e-4, min_lr=5e-5,
                warmup_iters=2000, eval_interval=1000, log_interval=100, compile=True),  # BERT-Small, WikiText-103
    "tiny/finetune": dict(max_iters=30, learning_rate=3e-3),
    "tiny/distill": dict(max_iters=30, learning_rate=3e-3),
    "cpu/finetune": _SST2_CPU,
    "cpu/distill": _SST2_CPU,
    "cpu/budget": _SST2_CPU,
    "tiny/budget": dict(max_iters=80, budgets="40,all", lrs="3e-3,1e-2", n_seeds=2, heldout=40, batch_size=8),
    "gpu/finetune": dict(batch_size=32, gradient_accumulation_steps=1, max_iters=6000, learning_rate=2e-5,
                         min_lr=0.0, warmup_iters=600, eval_interval=500, compile=False),
    "gpu/distill": dict(batch_size=32, gradient_accumulation_steps=1, max_iters=6000, learning_rate=5e-5,
                        min_lr=0.0, warmup_iters=600, eval_interval=500, compile=False),
}
DEFAULT_PRESET = "cpu"
# Fields that define the model's shape: a checkpoint whose values differ cannot be resumed.
MODEL_KEYS = ("vocab_size", "n_layer", "n_head", "n_embd", "block_size", "student_n_layer", "student_n_embd")
RULES = {"mode": MODES, "task": ("sst2",), "dtype": ("auto", "float32", "bfloat16", "float16"),
         "vocab_size": "> 0", "max_len": "> 0", "mlm_prob": "> 0", "n_layer": "> 0", "n_head": "> 0",
         "n_embd": "> 0", "block_size": "> 0", "dropout": "in [0, 1)", "student_n_layer": ">= 0",
         "student_n_embd": ">= 0", "temperature": "> 0", "alpha": ">= 0", "batch_size": "> 0", "max_iters": ">= 0",
         "learning_rate": "> 0", "min_lr": ">= 0", "warmup_iters": ">= 0", "lr_decay_iters": ">= 0",
         "weight_decay": ">= 0", "grad_clip": ">= 0", "gradient_accumulation_steps": "> 0", "eval_interval": "> 0",
         "eval_iters": "> 0", "log_interval": "> 0", "n_seeds": "> 0", "heldout": "> 0"}


def check_config(cfg):
    """The rules that tie flags together (RULES checks each flag alone)."""
    if cfg.n_embd % cfg.n_head:
        raise ValueError(f"--n_embd ({cfg.n_embd}) must be a multiple of --n_head ({cfg.n_head})")
    if not 8 <= cfg.max_len <= cfg.block_size:
        raise ValueError(f"--max_len must be between 8 and --block_size ({cfg.block_size}), not {cfg.max_len}")
    if cfg.min_lr > cfg.learning_rate:
        raise ValueError(f"--min_lr ({cfg.min_lr}) must not exceed --learning_rate ({cfg.learning_rate})")
    for name, value in (("mlm_prob", cfg.mlm_prob), ("alpha", cfg.alpha)):
        if value > 1:
            raise ValueError(f"--{name} must be at most 1, not {value}")
    if "" in cfg.corpus.split("+"):
        raise ValueError(f"--corpus must be {', '.join(CORPORA)} or a text file (or several joined by +), "
                         f"not {cfg.corpus!r}")
    if cfg.mode == "budget" and cfg.init_from in ("scratch", "resume"):
        raise ValueError("--mode budget needs --init_from: our pretrain.pt or a Hugging Face BERT to compare")
    if not all(b == "all" or (b.isdigit() and int(b) >= 2) for b in cfg.budgets.split(",")):
        raise ValueError(f"--budgets must be a comma list of numbers >= 2 and 'all', not {cfg.budgets!r}")
    if not set(cfg.arms.split(",")) <= {"pretrained", "scratch"} or not cfg.arms:
        raise ValueError(f"--arms must be pretrained, scratch or both (comma list), not {cfg.arms!r}")
    if not all(re.fullmatch(r"\d*\.?\d+(e-?\d+)?", lr) and float(lr) > 0 for lr in cfg.lrs.split(",")):
        raise ValueError(f"--lrs must be a comma list of positive numbers, not {cfg.lrs!r}")
    if cfg.mode == "distill" and cfg.init_from not in ("scratch", "resume"):
        raise ValueError("--init_from must be scratch or resume with --mode distill (the student starts from "
                         "the teacher, --teacher)")


# --- Milestone: the WordPiece tokenizer -----------------------------------------------------------
# BERT's tokenizer is two stages (BERT 4.1 and Google's tokenization.py): a basic tokenizer that
# cleans text and splits it on whitespace and punctuation, then WordPiece on each word.
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


@lru_cache(maxsize=None)
def _char_kind(ch):
    """'drop' (NUL, U+FFFD, control), 'space', 'split' (punctuation or CJK: a token of its own) or 'word'."""
    cp, cat = ord(ch), unicodedata.category(ch)
    # Zs (BERT's _is_whitespace) and Zl, Zp (its str.split()); str.split's other characters are controls: dropped
    if ch in "\t\n\r" or cat[0] == "Z":
        return "space"
    if cp == 0 or cp == 0xFFFD or cat.startswith("C"):
        return "drop"
    # Every non-alphanumeric ASCII character counts as punctuation ($, ^, `), as in BERT, and all of P*.
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126 or cat.startswith("P"):
        return "split"
    # CJK ideographs carry no spaces between words: each is a token (the CJK Unified Ideographs blocks).
    if (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF or 0x2A700 <= cp <= 0x2CEAF
            or 0xF900 <= cp <= 0xFAFF or 0x2F800 <= cp <= 0x2FA1F):
        return "split"
    return "word"


def basic_tokenize(text, lower_case=True):
    """Clean, lower-case and strip accents (uncased: NFD, then drop the combining marks, category Mn),
    split on whitespace, punctuation and around CJK characters."""
    if lower_case:
        text = "".join(c for c in unicodedata.normalize("NFD", text.lower()) if unicodedata.category(c) != "Mn")
    tokens, word = [], []
    for ch in text:
        kind = _char_kind(ch)
        if kind == "word":
            word.append(ch)
        elif kind != "drop":  # a dropped character leaves no trace: "a\x00b" is one word
            if word:
                tokens.append("".join(word))
                word = []
            if kind == "split":
                tokens.append(ch)
    return tokens + (["".join(word)] if word else [])


class BertTokenizer:
    """Basic tokenization then greedy longest-match-first WordPiece: a word is cut into the longest
    vocabulary entry from its start, then the longest `##`-continuation from there, and so on; a word
    with an unmatchable piece, or longer than `max_word_chars`, becomes [UNK] as a whole."""

    def __init__(self, vocab, lower_case=True, max_word_chars=100):
        missing = [s for s in SPECIALS if s not in vocab]
        if missing:
            raise ValueError(f"the vocabulary lacks the special token(s) {', '.join(missing)}")
        self.itos = list(vocab)
        self.stoi = {s: i for i, s in enumerate(self.itos)}
        self.lower_case, self.max_word_chars = lower_case, max_word_chars
        self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = (self.stoi[s] for s in SPECIALS)
        # bert-base-uncased also reserves [unused0..993]: never use any bracketed entry as a random token
        self.special_ids = [i for i, s in enumerate(self.itos) if s.startswith("[") and s.endswith("]")]
        self.random_ids = torch.tensor(sorted(set(range(len(self.itos))) - set(self.special_ids)))  # MLM's 10%
        self._cache = {}

    def wordpiece(self, word):
        if word not in self._cache:
            pieces, start = [], 0
            while start < len(word) <= self.max_word_chars:
                end = len(word)
                while end > start and ("##" * (start > 0) + word[start:end]) not in self.stoi:
                    end -= 1  # longest match first
                if end == start:  # nothing matches here: the whole word is unknown
                    break
                pieces.append("##" * (start > 0) + word[start:end])
                start = end
            self._cache[word] = pieces if start == len(word) else ["[UNK]"]
        return self._cache[word]

    def tokenize(self, text):
        return [p for w in basic_tokenize(text, self.lower_case) for p in self.wordpiece(w)]

    def encode(self, text):
        return [self.stoi[p] for p in self.tokenize(text)]

    def decode(self, ids):
        """Word pieces joined back into space-separated words; special tokens left out."""
        words = [self.itos[i] for i in ids if i not in self.special_ids or self.itos[i] == "[UNK]"]
        return " ".join(words).replace(" ##", "")


def train_wordpiece(texts, vocab_size, lower_case=True):
    """Build a WordPiece vocabulary: start from every character (word-initial `c` and continuation
    `##c`), then repeatedly merge the most frequent adjacent pair of pieces inside words until the
    vocabulary has `vocab_size` entries. The original WordPiece (Schuster & Nakajima 2012) ranks a pair
    by the likelihood gain count(ab) / (count(a) count(b)); Google never published its trainer, and
    Hugging Face's, which built many BERT vocabularies, ranks by count (as BPE) -- as here. A heap with
    lazy updates keeps each merge cheap: only the words containing the merged pair are touched."""
    counts = Counter(w for t in texts for w in basic_tokenize(t, lower_case))
    words, freqs = [[w[0]] + ["##" + c for c in w[1:]] for w in counts], list(counts.values())
    vocab = SPECIALS + sorted({p for w in words for p in w})
    pair_count, where = Counter(), defaultdict(set)  # (a, b) -> corpus count, -> ids of words with it
    for i, w in enumerate(words):
        for pair in zip(w, w[1:]):
            pair_count[pair] += freqs[i]
            where[pair].add(i)
    heap = [(-c, pair) for pair, c in pair_count.items()]
    heapq.heapify(heap)
    while len(vocab) < vocab_size and heap:
        neg, (a, b) = heapq.heappop(heap)
        if pair_count.get((a, b), 0) != -neg:  # stale entry: the count fell since it was pushed
            if pair_count.get((a, b), 0) > 0:
                heapq.heappush(heap, (-pair_count[(a, b)], (a, b)))
            continue
        new = a + b[2:]  # "un" + "##aff" -> "unaff"; "##a" + "##b" -> "##ab"
        vocab.append(new)
        changed = set()
        for i in where.pop((a, b)):
            w, f = words[i], freqs[i]
            for pair in zip(w, w[1:]):
                pair_count[pair] -= f
                where[pair].discard(i)
                changed.add(pair)
            merged, j = [], 0
            while j < len(w):
                pair_here = j + 1 < len(w) and w[j] == a and w[j + 1] == b
                merged.append(new if pair_here else w[j])
                j += 2 if pair_here else 1
            words[i] = merged
            for pair in zip(merged, merged[1:]):
                pair_count[pair] += f
                where[pair].add(i)
                changed.add(pair)
        for pair in changed:
            if pair_count[pair] <= 0:
                del pair_count[pair]
                where.pop(pair, None)
            else:
                heapq.heappush(heap, (-pair_count[pair], pair))
    return vocab


# --- Milestone: the BERT encoder, its MLM and NSP heads, distillation -----------------------------
def mask_tokens(idx, special_mask, mlm_prob, mask_id, candidates, gen):
    """BERT 3.1 Task #1 / A.1: choose each non-special position with probability mlm_prob; of the
    chosen, 80% become [MASK], 10% a random non-special token, 10% stay as they are (so the model cannot
    trust that an unmasked token is right). -> (inputs, labels), labels -100 where not chosen.
    idx, special_mask (B, T); candidates: the ids a random replacement may take (1-D)."""
    chosen = torch.bernoulli(torch.full(idx.shape, mlm_prob), generator=gen).bool() & ~special_mask  # (B, T)
    r = torch.rand(idx.shape, generator=gen)
    random_ids = candidates[torch.randint(len(candidates), idx.shape, generator=gen)]
    inputs = torch.where(chosen & (r < 0.8), mask_id, torch.where(chosen & (r >= 0.8) & (r < 0.9), random_ids, idx))
    return inputs, torch.where(chosen, idx, -100)


class SelfAttention(nn.Module):
    """Multi-head scaled dot-product attention, softmax(Q K^T / sqrt(hd)) V (Vaswani 3.2), with no
    causal mask: every token sees the whole sentence, left and right (BERT's point, 3). Padding keys
    are masked out so they receive no attention."""

    def __init__(self, n_embd, n_head, dropout=0.0):
        super().__init__()
        if n_embd % n_head:
            raise ValueError(f"n_embd ({n_embd}) must be a multiple of n_head ({n_head})")
        self.n_head, self.dropout = n_head, dropout
        self.query, self.key, self.value = (nn.Linear(n_embd, n_embd) for _ in range(3))
        self.proj = nn.Linear(n_embd, n_embd)

    def forward(self, x, attn_mask=None):  # x (B, T, C); attn_mask (B, T) bool, True = real token
        B, T, C = x.shape
        q, k, v = (lin(x).view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hd)
                   for lin in (self.query, self.key, self.value))
        mask = None if attn_mask is None else attn_mask[:, None, None, :]  # (B, 1, 1, T): over keys
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           dropout_p=self.dropout if self.training else 0.0)  # (B, nh, T, hd)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))  # (B, T, C)


class Block(nn.Module):
    """Post-LN Transformer encoder block as in BERT and Vaswani 3.1: x = LN(x + Sublayer(x)).
    (GPT-2 and most LLMs since moved the LayerNorm before the sublayer; BERT predates that.)"""

    def __init__(self, n_embd, n_head, intermediate, dropout=0.0):
        super().__init__()
        self.attn = SelfAttention(n_embd, n_head, dropout)
        self.ln1 = nn.LayerNorm(n_embd, eps=1e-12)
        self.fc = nn.Linear(n_embd, intermediate)
        self.proj = nn.Linear(intermediate, n_embd)
        self.ln2 = nn.LayerNorm(n_embd, eps=1e-12)
        self.drop = nn.Dropout(dropout)

    def forward(self, x, attn_mask=None):  # (B, T, C)
        x = self.ln1(x + self.drop(self.attn(x, attn_mask)))
        return self.ln2(x + self.drop(self.proj(F.gelu(self.fc(x)))))  # exact (erf) GELU, as BERT


class BertEncoder(nn.Module):
    """Embeddings (token + segment + learned position, then LayerNorm; BERT 3, Figure 2), the stack of
    blocks, and the pooler: tanh(W h_[CLS] + b), the sentence vector NSP and classifiers read."""

    def __init__(self, vocab_size, n_layer, n_head, n_embd, block_size=512, n_segments=2, intermediate=None,
                 dropout=0.1, grad_ckpt=False):
        super().__init__()
        self.args = dict(vocab_size=vocab_size, n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size,
                         n_segments=n_segments, intermediate=intermediate or 4 * n_embd, dropout=dropout)
        self.tok = nn.Embedding(vocab_size, n_embd)
        self.pos = nn.Embedding(block_size, n_embd)
        self.seg = nn.Embedding(n_segments, n_embd)
        self.ln = nn.LayerNorm(n_embd, eps=1e-12)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, self.args["intermediate"], dropout) for _ in range(n_layer))
        self.pooler = nn.Linear(n_embd, n_embd)
        self.grad_ckpt = grad_ckpt

    def forward(self, idx, seg=None, attn_mask=None):  # idx, seg (B, T) -> hidden (B, T, C), pooled (B, C)
        B, T = idx.shape
        if T > self.pos.num_embeddings:
            raise ValueError(f"sequence of {T} tokens, but only {self.pos.num_embeddings} position embeddings")
        seg = torch.zeros_like(idx) if seg is None else seg
        if attn_mask is not None and attn_mask.is_floating_point():  # refuse an additive mask (0 / -inf, or all 0)
            if not (((attn_mask == 0) | (attn_mask == 1)).all() and (attn_mask == 1).any(-1).all()):
                raise ValueError("attn_mask holds 1 (or True) for a real token, 0 for padding: not an additive mask")
        attn_mask = None if attn_mask is None else attn_mask != 0  # any dtype (tokenizers give int64): SDPA's bool
        x = self.drop(self.ln(self.tok(idx) + self.pos(torch.arange(T, device=idx.device)) + self.seg(seg)))
        for block in self.blocks:
            if self.grad_ckpt and self.training:
                # Keep only each block's input; recompute its inside during backward (Chen et al. 2016):
                # activation memory per block falls from ~(10 C + 2 nh T) B T numbers to B T C, for
                # about one extra forward pass of compute.
                x = checkpoint(block, x, attn_mask, use_reentrant=False)
            else:
                x = block(x, attn_mask)  # (B, T, C)
        return x, torch.tanh(self.pooler(x[:, 0]))  # (B, T, C), (B, C)


def _init_weights(module):
    """BERT's initialisation: N(0, 0.02) weights, zero biases, LayerNorm (1, 0)."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


class BERT(nn.Module):
    """BERT for pretraining: the encoder, the MLM head (dense + GELU + LayerNorm, then a decoder whose
    weight IS the word-embedding matrix, plus its own bias) and the NSP head on the pooled [CLS]."""

    def __init__(self, vocab_size, n_layer, n_head, n_embd, block_size=512, n_segments=2, intermediate=None,
                 dropout=0.1, grad_ckpt=False):
        super().__init__()
        self.bert = BertEncoder(vocab_size, n_layer, n_head, n_embd, block_size, n_segments, intermediate, dropout,
                                grad_ckpt)
        self.args = self.bert.args  # what rebuilds this model: saved in checkpoints
        self.mlm_dense = nn.Linear(n_embd, n_embd)
        self.mlm_ln = nn.LayerNorm(n_embd, eps=1e-12)
        self.mlm_decoder = nn.Linear(n_embd, vocab_size, bias=False)
        self.mlm_bias = nn.Parameter(torch.zeros(vocab_size))
        self.nsp = nn.Linear(n_embd, 2)
        self.apply(_init_weights)
        self.mlm_decoder.weight = self.bert.tok.weight  # weight tying (Press & Wolf 2017), as BERT

    def forward(self, idx, seg=None, attn_mask=None, mlm_mask=None):
        """-> MLM logits (B, T, V), or (N, V) at the N positions where mlm_mask (B, T) is True (the
        vocabulary projection is the costliest matmul: skip the 85% of positions with no loss), NSP
        logits (B, 2), hidden states (B, T, C)."""
        hidden, pooled = self.bert(idx, seg, attn_mask)
        h = hidden if mlm_mask is None else hidden[mlm_mask]  # (B, T, C) or (N, C)
        h = self.mlm_ln(F.gelu(self.mlm_dense(h)))
        return self.mlm_decoder(h) + self.mlm_bias, self.nsp(pooled), hidden


class BertClassifier(nn.Module):
    """Fine-tuning (BERT 4.1): a linear layer on the pooled [CLS] vector, everything trained."""

    def __init__(self, vocab_size, n_layer, n_head, n_embd, block_size=512, n_segments=2, intermediate=None,
                 dropout=0.1, grad_ckpt=False, n_classes=2):
        super().__init__()
        self.bert = BertEncoder(vocab_size, n_layer, n_head, n_embd, block_size, n_segments, intermediate, dropout,
                                grad_ckpt)
        self.args = {**self.bert.args, "n_classes": n_classes}
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(n_embd, n_classes)
        self.apply(_init_weights)

    def forward(self, idx, seg=None, attn_mask=None):  # -> logits (B, K)
        return self.head(self.drop(self.bert(idx, seg, attn_mask)[1]))


def distillation_loss(logits, teacher_logits, labels, tau, alpha):
    """Hinton et al. 2015 (2): L = alpha tau^2 KL(softmax(z_t / tau) || softmax(z_s / tau))
    + (1 - alpha) CE(y, softmax(z_s)). The tau^2 keeps the soft-target gradients on the same scale as
    tau grows. logits, teacher_logits (B, K); labels (B,). -> (loss, CE, KD term)."""
    ce = F.cross_entropy(logits, labels)
    kd = F.kl_div(F.log_softmax(logits / tau, -1), F.log_softmax(teacher_logits / tau, -1),
                  log_target=True, reduction="batchmean") * tau ** 2
    return alpha * kd + (1 - alpha) * ce, ce, kd


# --- Data -----------------------------------------------------------------------------------------
WIKITEXT_URL = "https://s3.amazonaws.com/research.metamind.io/wikitext/{name}-raw-v1.zip"
SST2_URL = "https://dl.fbaipublicfiles.com/glue/data/SST-2.zip"
HF_URL = "{endpoint}/{name}/resolve/main/{file}"  # endpoint: $HF_ENDPOINT (a mirror), as huggingface_hub reads it
ZIP_MAGIC = b"PK\x03\x04"


def fetch_zip(url, zip_path, members, folder):
    """Download a zip archive (unless it is there) and extract `members` {name in zip: file name} into
    `folder`, each through a temporary file. Offline or failing: one message naming the archive, where
    to put it, and the files it should give."""
    try:
        download(url, zip_path, magic=ZIP_MAGIC)
        os.makedirs(folder, exist_ok=True)
        with zipfile.ZipFile(zip_path) as z:
            for name, target in members.items():
                out = os.path.join(folder, target)
                with z.open(name) as src, open(out + ".part", "wb") as dst:
                    dst.write(src.read())
                os.replace(out + ".part", out)
    except UserError as e:
        raise UserError(f"{folder} needs {', '.join(members.values())}: {e}") from None
    except (OSError, KeyError, zipfile.BadZipFile) as e:
        raise UserError(f"could not extract {', '.join(members)} from {zip_path} into {folder} "
                        f"({e.__class__.__name__}: {e}); delete it and run again") from None


def load_vocab(path):
    if not os.path.exists(path):
        raise UserError(f"no vocabulary file at {path}")
    with open(path, encoding="utf-8") as f:
        vocab = [line.rstrip("\n") for line in f]
    missing = [s for s in SPECIALS if s not in vocab]
    if missing:
        raise UserError(f"{path} is not a BERT vocabulary: it lacks {', '.join(missing)}")
    return vocab


# Pretraining corpus: a list of documents, each a list of sentences (BERT 3.1 "a document-level corpus
# rather than a shuffled sentence-level corpus", so that NSP has true next sentences).
def wikitext_documents(path):
    """WikiText raw: ` = Title = ` opens an article, ` = = Section = = ` lines are dropped, every other
    non-blank line is a paragraph. The ` @-@ `, ` @,@ `, ` @.@ ` escapes are undone; sentences end at a
    spaced ` . ` / ` ! ` / ` ? ` (WikiText is tokenized, so "St. Louis" does not end a sentence)."""
    docs = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if re.fullmatch(r"= [^=].* =", line):
                docs.append([])
            elif line and not line.startswith("= ") and docs:
                line = line.replace(" @-@ ", "-").replace(" @,@ ", ",").replace(" @.@ ", ".")
                docs[-1] += [s for s in re.split(r"(?<= [.!?]) +", line) if s.strip()]
    return [d for d in docs if d]


def text_documents(path):
    """BERT's create_pretraining_data.py format: one sentence per line, a blank line between documents."""
    with open(path, encoding="utf-8") as f:
        blocks = re.split(r"\n\s*\n", f.read())
    return [d for d in ([line.strip() for line in b.splitlines() if line.strip()] for b in blocks) if d]


def load_corpus(cfg, master=True):
    """-> (train documents, validation documents, a note saying what was used). `--corpus a+b` joins
    several sources."""
    parts = [load_one_corpus(c, cfg.data_dir, master) for c in cfg.corpus.split("+")]
    train = [d for p in parts for d in p[0]]
    if sum(len(d) > 1 for d in train) == 1:
        raise UserError(f"--corpus {cfg.corpus}: NSP needs two or more multi-sentence documents (or none)")
    return train, [d for p in parts for d in p[1]], "; ".join(p[2] for p in parts)


def load_one_corpus(corpus, data_dir, master=True):
    if corpus == "sst2":
        # Self-pretraining (Krishna et al. 2022, "Downstream Datasets Make Surprisingly Good Pretraining
        # Corpora", arXiv:2209.14389): the *text* of the fine-tuning task's training split, labels
        # thrown away, as pretraining data. The dev split is never read here. Each phrase is a
        # one-sentence document: MLM examples only, no NSP pair.
        texts = [t for t, _ in read_sst2(data_dir, master)["train"]]
        n_val = len(texts) // 20
        return ([[t] for t in texts[:-n_val]], [[t] for t in texts[-n_val:]],
                f"sst2: the {len(texts)} SST-2 training sentences and phrases, unlabeled, the last {n_val} held out")
    if corpus not in CORPORA:  # a text file
        if not os.path.isfile(corpus):
            raise UserError(f"--corpus {corpus}: neither {', '.join(CORPORA)} nor an existing text file")
        docs = text_documents(corpus)
        if len(docs) < 4:
            raise UserError(f"{corpus} has {len(docs)} documents; NSP needs several (blank line between)")
        n_val = max(2, len(docs) // 20)  # the last 5% of documents (at least 2, for NotNext) held out
        return docs[:-n_val], docs[-n_val:], f"{corpus}: {len(docs)} documents, the last {n_val} held out"
    name = {"wikitext2": "wikitext-2", "wikitext103": "wikitext-103"}[corpus]
    folder = os.path.join(data_dir, name, f"{name}-raw")
    paths = {s: os.path.join(folder, f"wiki.{s}.raw") for s in ("train", "valid", "test")}
    error = f"rank 0 could not fetch {paths['train']}"
    if master and not all(map(os.path.exists, paths.values())):  # other ranks see what rank 0 got
        try:
            fetch_zip(WIKITEXT_URL.format(name=name), os.path.join(data_dir, name, f"{name}-raw-v1.zip"),
                      {f"{name}-raw/wiki.{s}.raw": f"wiki.{s}.raw" for s in paths}, folder)
        except UserError as e:
            error = str(e)
    if all(map(os.path.exists, paths.values())):
        return (wikitext_documents(paths["train"]), wikitext_documents(paths["valid"]),
                f"{name}: train split, validation on the valid split")
    if os.path.exists(paths["train"]) or not (os.path.exists(paths["valid"]) and os.path.exists(paths["test"])):
        raise UserError(error)
    # Honest fallback for an offline copy holding only valid + test (2.4 MB instead of 10.9 MB of
    # training text): pretrain on those two, every 10th article held out for validation, and say so.
    docs = wikitext_documents(paths["valid"]) + wikitext_documents(paths["test"])
    note = (f"FALLBACK, not the standard split ({error}); pretraining on wiki.valid.raw + wiki.test.raw, "
            f"{len(docs) - len(docs[::10])} articles, every 10th article ({len(docs[::10])}) held out for validation")
    return [d for i, d in enumerate(docs) if i % 10], docs[::10], note


def get_tokenizer(cfg, master=True):
    """--vocab, else <out_dir>/vocab.txt, else one trained on the pretraining corpus and saved there
    (so a from-scratch fine-tuning run can tokenize exactly as the pretrained one)."""
    path = cfg.vocab or os.path.join(cfg.out_dir, "vocab.txt")
    if not cfg.vocab and not os.path.exists(path):
        if not master:
            raise UserError(f"{path} was not written by rank 0")
        train_docs, _, note = load_corpus(cfg)
        print(f"training a {cfg.vocab_size}-piece WordPiece vocabulary on {note}")
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            f.write("\n".join(train_wordpiece([s for d in train_docs for s in d], cfg.vocab_size)) + "\n")
        os.replace(path + ".tmp", path)
    return BertTokenizer(load_vocab(path))


def pack_pair(a, b, is_random_next, max_len, cls_id, sep_id):
    """[CLS] A [SEP] B [SEP] with segment ids 0 for [CLS] A [SEP] and 1 for B [SEP]. Too long: drop
    tokens from the end of the longer segment, one at a time, so both keep a part (BERT's
    truncate_seq_pair)."""
    a, b = list(a), list(b)
    while len(a) + len(b) > max_len - 3:
        (a if len(a) > len(b) else b).pop()
    return [cls_id] + a + [sep_id] + b + [sep_id], [0] * (len(a) + 2) + [1] * (len(b) + 1), is_random_next


def make_nsp_pairs(docs, rng, tok, max_len):
    """One pair per sentence that has a successor: half the time B is that true next sentence
    (label 0, IsNext), half the time a random sentence of a *different* document (label 1, NotNext),
    so a NotNext B can never be the true continuation (BERT 3.1 Task #2; labels as in BERT's
    checkpoints). A one-sentence document gives one `[CLS] A [SEP]` example with NSP label -100
    (ignored): MLM only. It is never drawn as a NotNext B either: mixed with a few long documents, a
    corpus of many one-line ones would make nearly every NotNext B come from another source, and NSP
    would be solved by spotting the source. Returns [(ids, segment ids, label)]."""
    pairs = []
    multi = [d for d, doc in enumerate(docs) if len(doc) > 1]  # the documents NSP draws from
    for d, doc in enumerate(docs):
        if len(doc) == 1:
            ids = [tok.cls_id] + doc[0][:max_len - 2] + [tok.sep_id]
            pairs.append((ids, [0] * len(ids), -100))
        for i in range(len(doc) - 1):
            if rng.random() < 0.5:
                pairs.append(pack_pair(doc[i], doc[i + 1], 0, max_len, tok.cls_id, tok.sep_id))
            else:
                o = rng.randrange(len(multi) - 1)
                other = docs[multi[o + (multi[o] >= d)]]  # any multi-sentence document but this one
                pairs.append(pack_pair(doc[i], other[rng.randrange(len(other))], 1, max_len, tok.cls_id, tok.sep_id))
    return pairs


def pack_sentences(docs, tok, max_len):
    """RoBERTa's FULL-SENTENCES input (Liu et al. 2019, 4.2; it drops NSP): the sentences laid end to end
    and cut into `[CLS] ... [SEP]` sequences of at most max_len tokens, a sentence never split (one
    longer than a sequence is truncated), an extra [SEP] where a document ends. No padding inside a
    sequence and no short pairs: several times the tokens per step of make_nsp_pairs at the same batch
    size. Packed once, as RoBERTa's data is: epochs differ in order and in masks. -> [(ids, segs, -100)]"""
    room, out, cur = max_len - 2, [], []
    for doc in docs:
        for i, sent in enumerate(doc):
            piece = sent[:room] + ([tok.sep_id] if i == len(doc) - 1 else [])
            if cur and len(cur) + len(piece) > room:
                out.append([tok.cls_id] + cur[:room] + [tok.sep_id])
                cur = []
            cur += piece
    if cur:
        out.append([tok.cls_id] + cur[:room] + [tok.sep_id])
    return [(ids, [0] * len(ids), -100) for ids in out]


def bucket_batches(lengths, batch_size, rng):
    """Length-bucketed batches: shuffle, sort within windows of 50 batches by length, cut, shuffle the
    batches. Sequences in a batch have similar lengths, so little compute goes into padding."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    batches, window = [], 50 * batch_size
    for s in range(0, len(order), window):
        part = sorted(order[s:s + window], key=lambda i: lengths[i])
        batches += [part[j:j + batch_size] for j in range(0, len(part), batch_size)]
    rng.shuffle(batches)
    return batches


def collate(examples, pad_id):
    """[(ids, segment ids, label)] -> idx, seg (B, T) padded to the longest, attention mask (B, T) bool
    (True for real tokens), labels (B,)."""
    T = max(len(e[0]) for e in examples)
    idx = torch.full((len(examples), T), pad_id, dtype=torch.long)
    seg = torch.zeros((len(examples), T), dtype=torch.long)
    for i, (ids, segs, _) in enumerate(examples):
        idx[i, :len(ids)], seg[i, :len(segs)] = torch.tensor(ids), torch.tensor(segs)
    attn_mask = torch.arange(T)[None, :] < torch.tensor([len(e[0]) for e in examples])[:, None]
    return idx, seg, attn_mask, torch.tensor([e[2] for e in examples])


class BatchStream:
    """Epoch e is built from random.Random(seed + e), so the batch of any step is known without
    replaying the run: a resumed run sees the same data as an uninterrupted one. Rank r of W takes every
    W-th batch. `make_examples(rng)` -> [(ids, segs, label)] (fresh NSP pairs each epoch)."""

    def __init__(self, make_examples, batch_size, seed, rank=0, world_size=1):
        self.make_examples, self.batch_size, self.seed = make_examples, batch_size, seed
        self.rank, self.world_size, self.epoch = rank, world_size, None
        self.n_batches = len(self._build(0)) // world_size
        if self.n_batches == 0:
            raise UserError("fewer training examples than one batch per rank: lower --batch_size")

    def _build(self, epoch):
        rng = random.Random(self.seed + epoch)
        self.examples = self.make_examples(rng)
        self.batches, self.epoch = bucket_batches([len(e[0]) for e in self.examples], self.batch_size, rng), epoch
        return self.batches

    def get(self, i):
        """The i-th micro-batch of this rank."""
        epoch, j = divmod(i, self.n_batches)
        if epoch != self.epoch:
            self._build(epoch)
        return [self.examples[k] for k in self.batches[j * self.world_size + self.rank]]


def read_sst2(data_dir, master=True):
    """GLUE SST-2: <data_dir>/sst2/{train,dev}.tsv, `sentence<TAB>label` with a header (GLUE's layout;
    downloaded from GLUE's SST-2.zip when absent). -> {"train": [(text, label)], "dev": [...]}"""
    folder = os.path.join(data_dir, "sst2")
    paths = {s: os.path.join(folder, f"{s}.tsv") for s in ("train", "dev")}
    if master and not all(map(os.path.exists, paths.values())):
        fetch_zip(SST2_URL, os.path.join(folder, "SST-2.zip"), {f"SST-2/{s}.tsv": f"{s}.tsv" for s in paths}, folder)
    out = {}
    for split, path in paths.items():
        with open(path, encoding="utf-8") as f:
            rows = [line.rstrip("\n").split("\t") for line in f][1:]
        out[split] = [(text.strip(), int(label)) for text, label in rows]
    return out


def encode_sentence(tok, text, label, max_len):
    """[CLS] text [SEP], truncated to max_len, all in segment A."""
    ids = [tok.cls_id] + tok.encode(text)[:max_len - 2] + [tok.sep_id]
    return ids, [0] * len(ids), label


def pretrain_data(cfg, tok, rank, world_size, master):
    """-> (train BatchStream of NSP pairs (drawn afresh each epoch) or of packed text, fixed validation
    batches, a note)."""
    train_docs, val_docs, note = load_corpus(cfg, master)
    train_docs, val_docs = ([[tok.encode(s) for s in d] for d in docs] for docs in (train_docs, val_docs))
    if cfg.nsp:  # fresh pairs each epoch
        stream = BatchStream(lambda rng: make_nsp_pairs(train_docs, rng, tok, cfg.max_len), cfg.batch_size,
                             cfg.seed, rank, world_size)
        val = make_nsp_pairs(val_docs, random.Random(cfg.seed), tok, cfg.max_len)
    else:
        packed = pack_sentences(train_docs, tok, cfg.max_len)
        stream = BatchStream(lambda rng: packed, cfg.batch_size, cfg.seed, rank, world_size)
        val = pack_sentences(val_docs, tok, cfg.max_len)
    batches = bucket_batches([len(p[0]) for p in val], cfg.batch_size, random.Random(cfg.seed))
    return stream, [[val[i] for i in b] for b in batches[:cfg.eval_iters]], note


def sst2_data(cfg, tok, rank, world_size, master):
    """-> (train BatchStream, all of dev in length-sorted batches, a note)."""
    data = read_sst2(cfg.data_dir, master)
    train_ex = [encode_sentence(tok, t, y, cfg.max_len) for t, y in data["train"]]
    dev_ex = sorted((encode_sentence(tok, t, y, cfg.max_len) for t, y in data["dev"]), key=lambda e: len(e[0]))
    stream = BatchStream(lambda rng: train_ex, cfg.batch_size, cfg.seed, rank, world_size)
    dev_batches = [dev_ex[i:i + cfg.batch_size] for i in range(0, len(dev_ex), cfg.batch_size)]
    return stream, dev_batches, f"SST-2, {len(train_ex)} train and {len(dev_ex)} dev sentences"


# --- Data: a Hugging Face BERT, without the transformers library ----------------------------------
# Hugging Face / Google names -> ours, replaced in this order; a name that matches none of ours
# afterwards (position_ids, the decoder's copies of the tied weight and bias) is skipped.
HF_NAMES = {"LayerNorm.gamma": "LayerNorm.weight", "LayerNorm.beta": "LayerNorm.bias",
            "embeddings.word_embeddings": "tok", "embeddings.position_embeddings": "pos",
            "embeddings.token_type_embeddings": "seg", "embeddings.LayerNorm": "ln", "encoder.layer": "blocks",
            "attention.self.": "attn.", "attention.output.dense": "attn.proj", "attention.output.LayerNorm": "ln1",
            "intermediate.dense": "fc", "output.dense": "proj", "output.LayerNorm": "ln2", "pooler.dense": "pooler",
            "cls.predictions.transform.dense": "mlm_dense", "cls.predictions.transform.LayerNorm": "mlm_ln",
            "cls.predictions.bias": "mlm_bias", "cls.seq_relationship": "nsp"}
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


def load_safetensors(path):
    """The safetensors format: an 8-byte little-endian header length n, n bytes of JSON
    {name: {dtype, shape, data_offsets: [begin, end]}} (offsets into what follows), then the raw
    little-endian tensor bytes. No pickle, so no code runs on load. -> {name: tensor}"""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 0 <= n <= size - 8:  # a cut or foreign file: refuse before allocating n bytes
            raise UserError(f"{path} is not a safetensors file (a header of {n} bytes in a file of {size})")
        try:
            header = json.loads(f.read(n))
        except ValueError:
            raise UserError(f"{path} is not a safetensors file (its header is not JSON)") from None
        data = bytearray(f.read())
    tensors = {}
    for name, info in header.items():
        if name != "__metadata__":
            begin, end = info["data_offsets"]
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            flat = torch.frombuffer(data, dtype=dtype, count=(end - begin) // dtype.itemsize, offset=begin) \
                if end > begin else torch.empty(0, dtype=dtype)
            tensors[name] = flat.reshape(info["shape"])
    return tensors


def fetch_pretrained(name_or_dir, cache_dir):
    """A local folder as is; a hub name -> its config.json, model.safetensors, vocab.txt downloaded
    into cache_dir/<name> (once)."""
    files, folder = ("config.json", "vocab.txt", "model.safetensors"), name_or_dir
    if not os.path.isdir(name_or_dir):
        folder = os.path.join(cache_dir, name_or_dir)
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
        for file in files:
            download(HF_URL.format(endpoint=endpoint, name=name_or_dir, file=file), os.path.join(folder, file))
    for file in files:
        if not os.path.exists(os.path.join(folder, file)):
            raise UserError(f"{folder} has no {file} (a BERT folder needs config.json, model.safetensors, vocab.txt)")
    return folder


def bert_from_pretrained(name_or_dir, cache_dir="data/huggingface"):
    """A Hugging Face BERT checkpoint (`bert-base-uncased`, or a folder with config.json,
    model.safetensors, vocab.txt) as our BERT."""
    folder = fetch_pretrained(name_or_dir, cache_dir)
    try:
        with open(os.path.join(folder, "config.json")) as f:
            hf = json.load(f)
    except ValueError:
        raise UserError(f"{folder}/config.json is not a JSON file") from None
    if hf.get("hidden_act", "gelu") != "gelu":
        raise UserError(f"{name_or_dir} uses hidden_act={hf['hidden_act']!r}; this BERT implements 'gelu'")
    model = BERT(hf["vocab_size"], hf["num_hidden_layers"], hf["num_attention_heads"], hf["hidden_size"],
                 hf.get("max_position_embeddings", 512), hf.get("type_vocab_size", 2), hf.get("intermediate_size"),
                 hf.get("hidden_dropout_prob", 0.1))
    own, ours = model.state_dict(), {}
    for k, v in load_safetensors(os.path.join(folder, "model.safetensors")).items():
        for hf_name, name in HF_NAMES.items():
            k = k.replace(hf_name, name)
        if k in own:
            ours[k] = v
    bad = [k for k in ours if ours[k].shape != own[k].shape]
    missing = [k for k in own if k not in ours and k != "mlm_decoder.weight"]  # tied: = bert.tok.weight
    if bad or any(k.startswith("bert.") for k in missing):
        raise UserError(f"{name_or_dir} does not fit a BERT of its own config.json: "
                        f"wrong shape {bad[:3]}, missing {missing[:3]}")
    if missing:
        print(f"note: {name_or_dir} has no {', '.join(missing)}: left randomly initialised")
    model.load_state_dict(ours, strict=False)
    return model


# --- Training -------------------------------------------------------------------------------------
def get_lr(cfg, step):
    """Linear warmup, then cosine decay to min_lr (nanoGPT; BERT itself decays linearly, A.2)."""
    decay_iters = cfg.lr_decay_iters or cfg.max_iters
    if step < cfg.warmup_iters:
        return cfg.learning_rate * (step + 1) / (cfg.warmup_iters + 1)
    if step >= decay_iters:
        return cfg.min_lr
    ratio = (step - cfg.warmup_iters) / max(1, decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * ratio)) * (cfg.learning_rate - cfg.min_lr)


def pretrain_loss(model, batch, tok, cfg, gen):
    """L = CE_MLM over the chosen positions + CE_NSP (BERT A.2: the sum of the two mean losses)."""
    idx, seg, attn_mask, nsp_labels = batch
    special = torch.isin(idx, torch.tensor(tok.special_ids, device=idx.device))  # (B, T) incl. padding
    inputs, labels = mask_tokens(idx.cpu(), special.cpu(), cfg.mlm_prob, tok.mask_id, tok.random_ids, gen)
    inputs, labels = inputs.to(idx.device), labels.to(idx.device)
    chosen = labels != -100  # (B, T)
    mlm_logits, nsp_logits, _ = model(inputs, seg, attn_mask, mlm_mask=chosen)  # (N, V), (B, 2)
    mlm_loss = F.cross_entropy(mlm_logits.float(), labels[chosen])
    mlm_acc = (mlm_logits.argmax(-1) == labels[chosen]).float().mean()
    # The counts let `evaluate` average each statistic over what it counts (see COUNT_OF).
    stats = {"mlm_loss": mlm_loss.item(), "mlm_acc": mlm_acc.item(), "mlm_tokens": int(chosen.sum())}
    has_nsp = nsp_labels != -100  # one-sentence examples carry no NSP label
    if not has_nsp.any():  # 0 * logits keeps the NSP head in the graph (DDP expects every gradient)
        return mlm_loss + 0.0 * nsp_logits.sum(), stats
    nsp_loss = F.cross_entropy(nsp_logits.float()[has_nsp], nsp_labels[has_nsp])
    nsp_acc = (nsp_logits.argmax(-1) == nsp_labels)[has_nsp].float().mean()
    stats.update(nsp_loss=nsp_loss.item(), nsp_acc=nsp_acc.item(), nsp_pairs=int(has_nsp.sum()))
    return mlm_loss + nsp_loss, stats


def classify_loss(model, batch, teacher=None, tau=1.0, alpha=0.0):
    """Cross-entropy on the labels; with a teacher, the distillation loss."""
    idx, seg, attn_mask, y = batch
    logits = model(idx, seg, attn_mask).float()  # (B, K)
    if teacher is None:
        loss = F.cross_entropy(logits, y)
        stats = {"ce": loss.item()}
    else:
        with torch.no_grad():
            t_logits = teacher(idx, seg, attn_mask).float()  # (B, K)
        loss, ce, kd = distillation_loss(logits, t_logits, y, tau, alpha)
        stats = {"ce": ce.item(), "kd": kd.item()}
    return loss, {**stats, "acc": (logits.argmax(-1) == y).float().mean().item()}


def _step_generator(cfg, step, micro, rank):
    """A generator for the MLM masks of one micro-batch, seeded by its position in the run: fresh
    masks every time a sentence comes back (RoBERTa's dynamic masking), yet repeatable on resume."""
    return torch.Generator().manual_seed(((cfg.seed * 1_000_003 + step) * 1009 + micro * 101 + rank) % 2 ** 63)


def init_model(cfg, device="cpu", master=True):
    """The tokenizer and the model of --mode on `device`, started as --init_from says: scratch; resume
    (the shape and vocabulary here; train() hands the checkpoint to resume() for the weights); a
    pretraining checkpoint of ours; a Hugging Face BERT. Distillation also gets its teacher.
    -> (model, tokenizer, teacher or None, the checkpoint resumed or None)"""
    vocab, lower_case, args, state, teacher, ckpt = None, True, None, None, None, None
    if cfg.init_from == "resume":
        ckpt = load_checkpoint(os.path.join(cfg.out_dir, f"{cfg.mode}.pt"), cfg, stage=cfg.mode)
        vocab, lower_case, args = ckpt["vocab"], ckpt["lower_case"], ckpt["model_args"]
    elif cfg.init_from != "scratch":
        vocab, lower_case, args, state = load_pretrained(cfg)
    if cfg.mode == "distill":
        tckpt = load_checkpoint(cfg.teacher or os.path.join(cfg.out_dir, "finetune.pt"), stage="finetune", keys=())
        teacher = BertClassifier(**tckpt["model_args"])
        teacher.load_state_dict(tckpt["model"])
        vocab, lower_case = tckpt["vocab"], tckpt["lower_case"]
    tok = BertTokenizer(vocab, lower_case) if vocab else get_tokenizer(cfg, master)
    args = args or dict(vocab_size=len(tok.itos), n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
                        block_size=cfg.block_size, dropout=cfg.dropout)
    encoder_args = {k: v for k, v in args.items() if k != "n_classes"}
    if cfg.mode == "pretrain":
        model = BERT(**encoder_args, grad_ckpt=cfg.grad_ckpt)
        if state:
            model.load_state_dict(state)  # continue pretraining: the heads too
    elif cfg.mode == "finetune":
        model = BertClassifier(**encoder_args, grad_ckpt=cfg.grad_ckpt, n_classes=args.get("n_classes", 2))
        if state:  # the pretrained encoder, pooler included (NSP trained it); a new classifier head
            model.bert.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("bert.")})
    else:
        model = make_student(cfg, teacher)
        teacher.to(device).eval()
    return model.to(device), tok, teacher, ckpt


def load_pretrained(cfg):
    """--init_from, a pretraining checkpoint of ours or a Hugging Face BERT -> (vocab, lower_case,
    model_args, the BERT state dict). The model's shape comes from there, not from the flags."""
    if cfg.init_from.endswith(".pt"):
        ckpt = load_checkpoint(cfg.init_from, stage="pretrain", keys=())
        return ckpt["vocab"], ckpt["lower_case"], ckpt["model_args"], ckpt["model"]
    folder = fetch_pretrained(cfg.init_from, os.path.join(cfg.data_dir, "huggingface"))
    pre = bert_from_pretrained(folder)
    lower_case = "uncased" in cfg.init_from or "cased" not in cfg.init_from
    return load_vocab(os.path.join(folder, "vocab.txt")), lower_case, pre.args, pre.state_dict()


def make_student(cfg, teacher):
    """DistilBERT 3: the student keeps the teacher's width and every other layer, starting from the
    teacher's weights (embeddings, those layers, pooler, head); a narrower student starts at random."""
    t = teacher.args
    n_layer, n_embd = cfg.student_n_layer or max(1, t["n_layer"] // 2), cfg.student_n_embd or t["n_embd"]
    hd = t["n_embd"] // t["n_head"]
    if n_embd % max(1, n_embd // hd):
        raise UserError(f"--student_n_embd {n_embd} does not split into heads of the teacher's size ({hd})")
    student = BertClassifier(t["vocab_size"], n_layer, max(1, n_embd // hd), n_embd, t["block_size"], t["n_segments"],
                             4 * n_embd, cfg.dropout, cfg.grad_ckpt, t["n_classes"])
    if n_embd == t["n_embd"]:
        # layers spread evenly over the teacher's depth: 12 -> 6 keeps 0 2 4 7 9 11, as DistilBERT
        keep = [round(i * (t["n_layer"] - 1) / (n_layer - 1)) for i in range(n_layer)] if n_layer > 1 else [0]
        t_sd = teacher.state_dict()
        sd = {k: v for k, v in t_sd.items() if not k.startswith("bert.blocks.")}
        for i, j in enumerate(keep):
            sd.update({f"bert.blocks.{i}." + k[len(f"bert.blocks.{j}."):]: v
                       for k, v in t_sd.items() if k.startswith(f"bert.blocks.{j}.")})
        student.load_state_dict(sd)
    return student


def configure_optimizer(model, cfg):
    """AdamW as BERT (A.2: beta2 0.999, eps 1e-6), with no weight decay on biases and LayerNorms."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay}],
                             lr=cfg.learning_rate, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0)


def train(cfg) -> dict:
    """Pretrain, fine-tune or distill, as --mode says. -> the last evaluation's metrics."""
    rank, local_rank, world_size = setup_ddp()
    master = rank == 0
    if cfg.gradient_accumulation_steps % world_size:
        raise UserError(f"--gradient_accumulation_steps {cfg.gradient_accumulation_steps} must be a multiple "
                        f"of the number of ranks ({world_size})")
    grad_accum = cfg.gradient_accumulation_steps // world_size  # each rank does its share
    device, ctx, scaler = setup_device(cfg, local_rank)
    torch.manual_seed(cfg.seed + rank)
    if world_size > 1 and not master:
        dist.barrier()  # rank 0 downloads and trains the vocabulary first
    model, tok, teacher, ckpt = init_model(cfg, device, master)
    make_data = pretrain_data if cfg.mode == "pretrain" else sst2_data
    stream, eval_batches, note = make_data(cfg, tok, rank, world_size, master)
    if world_size > 1 and master:
        dist.barrier()
    if master:
        print(f"{cfg.mode}: {note}\nmodel: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
              f"vocabulary {len(tok.itos)}")
    optimizer = configure_optimizer(model, cfg)
    step, best_val, ckpt_path = 0, float("inf"), os.path.join(cfg.out_dir, f"{cfg.mode}.pt")
    if cfg.init_from == "resume":
        ckpt = resume(ckpt_path, cfg, model, optimizer, rank, world_size, stage=cfg.mode, ckpt=ckpt)
        step, best_val = ckpt["step"], ckpt["best_val"]
    raw_model = model
    if cfg.compile:
        model = torch.compile(model)
    if world_size > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if "cuda" in device else None)

    def run_loss(m, batch, s, micro):
        batch = [t.to(device) for t in collate(batch, tok.pad_id)]
        with ctx:
            if cfg.mode == "pretrain":
                return pretrain_loss(m, batch, tok, cfg, _step_generator(cfg, s, micro, rank))
            return classify_loss(m, batch, teacher, cfg.temperature, cfg.alpha)

    metrics, t0, tokens = {}, time.time(), 0
    while True:
        if master and (step % cfg.eval_interval == 0 or step == cfg.max_iters):
            metrics = evaluate(raw_model, eval_batches, run_loss, cfg)
            print(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
            log_jsonl(cfg, {"mode": cfg.mode, "step": step, **metrics})
            if step > 0 and (metrics["val_loss"] < best_val or cfg.always_save_checkpoint):
                best_val = min(best_val, metrics["val_loss"])
                save_checkpoint(ckpt_path, raw_model, optimizer, cfg, step, best_val, model_args=raw_model.args,
                                vocab=tok.itos, lower_case=tok.lower_case)
            if cfg.mode == "pretrain" and step in (0, cfg.max_iters):
                show_pretraining(cfg, raw_model, tok, step)
        if step >= cfg.max_iters:
            break
        lr = get_lr(cfg, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        model.train()
        train_stats = Counter()
        for micro in range(grad_accum):
            batch = stream.get(step * grad_accum + micro)
            tokens += sum(len(e[0]) for e in batch)
            if world_size > 1:  # all-reduce the gradients only after the last micro-batch
                model.require_backward_grad_sync = micro == grad_accum - 1
            loss, stats = run_loss(model, batch, step, micro)
            (scaler.scale(loss / grad_accum) if scaler else loss / grad_accum).backward()
            train_stats.update({k: v / grad_accum for k, v in stats.items()})
        if scaler:
            scaler.unscale_(optimizer)
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        (scaler.step(optimizer), scaler.update()) if scaler else optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if master and step % cfg.log_interval == 0:
            dt = time.time() - t0
            print(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in train_stats.items() if k not in COUNTS) +
                  f", lr {lr:.2e}, {tokens * world_size / dt:.0f} tok/s, {1000 * dt / cfg.log_interval:.0f} ms/step, "
                  f"peak mem {peak_memory_mb(device):.0f} MB")
            t0, tokens = time.time(), 0
    if master and cfg.mode == "distill":
        metrics.update(compare_teacher_student(teacher, raw_model, eval_batches, tok, device))
        log_jsonl(cfg, {"mode": cfg.mode, "step": step, **metrics})
    # One write per rank, flushed: the two ranks' lines share stdout and must not interleave.
    sys.stdout.write(f"rank {rank}: weights fingerprint {fingerprint(raw_model)}\n")
    sys.stdout.flush()
    if world_size > 1:
        dist.barrier()
        dist.destroy_process_group()
    return metrics


# --- Evaluation / inference -----------------------------------------------------------------------
# Each pretraining statistic is a mean over something other than sentences: MLM over the masked
# tokens (a batch of long sentences holds many more), NSP over the sentence pairs (one-sentence
# examples have no NSP label). Everything else is a mean over the batch's examples.
COUNT_OF = {"mlm_loss": "mlm_tokens", "mlm_acc": "mlm_tokens", "nsp_loss": "nsp_pairs", "nsp_acc": "nsp_pairs"}
COUNTS = set(COUNT_OF.values())


@torch.no_grad()
def evaluate(model, eval_batches, run_loss, cfg):
    """Losses and accuracies over the validation batches, each batch's mean weighted by what it counts
    (COUNT_OF), so every statistic is exact over the whole set: dev accuracy is correct / total, MLM
    accuracy correct / masked tokens. Pretraining's val_loss is then MLM loss + NSP loss, the training
    objective. Pretraining uses fixed masks, comparable from one evaluation to the next."""
    model.eval()
    totals, n = Counter(), Counter()
    for i, batch in enumerate(eval_batches):
        loss, stats = run_loss(model, batch, -1 - i, 0)
        if cfg.mode != "pretrain":
            stats = {**stats, "val_loss": loss.item()}
        for k, v in stats.items():
            w = stats[COUNT_OF[k]] if k in COUNT_OF else len(batch)
            if k not in COUNTS and w > 0:  # a batch with nothing to count adds nothing
                totals[k] += v * w
                n[k] += w
    metrics = {k: v / n[k] for k, v in totals.items()}
    if cfg.mode == "pretrain":
        metrics["val_loss"] = metrics["mlm_loss"] + metrics.get("nsp_loss", 0.0)
    return metrics


def peak_memory_mb(device):
    """Peak memory so far: allocated tensors on CUDA; on CPU the process's peak resident set (Linux
    reports ru_maxrss in kB), which includes the ~300 MB of the Python + torch runtime."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2 ** 20
    import resource  # Unix only

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@torch.no_grad()
def compare_teacher_student(teacher, student, dev_batches, tok, device, repeats=3):
    """Parameters, dev accuracy and inference throughput (sentences/s, best of `repeats` passes over
    dev) of teacher and student, and the fraction of the teacher's accuracy the student keeps."""
    out, n = {}, sum(len(b) for b in dev_batches)
    batches = [[t.to(device) for t in collate(b, tok.pad_id)] for b in dev_batches]
    for name, m in (("teacher", teacher), ("student", student)):
        m.eval()
        best, correct = float("inf"), 0
        for _ in range(repeats):
            t0, correct = time.time(), 0
            for idx, seg, mask, y in batches:
                correct += (m(idx, seg, mask).argmax(-1) == y).sum().item()
            best = min(best, time.time() - t0)
        out.update({f"{name}_params": sum(p.numel() for p in m.parameters()), f"{name}_acc": correct / n,
                    f"{name}_sent_per_s": n / best})
    out["speedup"] = out["student_sent_per_s"] / out["teacher_sent_per_s"]
    out["acc_kept"] = out["student_acc"] / max(out["teacher_acc"], 1e-9)
    print(" | ".join(f"{k} {out[k + '_params'] / 1e6:.2f}M params, dev acc {out[k + '_acc']:.4f}, "
                     f"{out[k + '_sent_per_s']:.0f} sent/s" for k in ("teacher", "student")) +
          f" | speed-up {out['speedup']:.2f}x, {100 * out['acc_kept']:.1f}% of the teacher's accuracy kept")
    return out


FILL_MASK_EXAMPLES = ("the capital of france is [MASK] .", "he played [MASK] for the national team .",
                      "the film is [MASK] and boring .", "a [MASK] , funny and moving film .")


def show_pretraining(cfg, model, tok, step):
    """At the first and the last step of pretraining: what the MLM head predicts for FILL_MASK_EXAMPLES
    (before and after), and at the last the curve from log.jsonl (pretrain.png)."""
    if step == cfg.max_iters:
        plot_pretrain(cfg)
    print("\n".join(f"fill-mask at step {step}: {t} -> {fill_mask(model, tok, t)}" for t in FILL_MASK_EXAMPLES))


@torch.no_grad()
def fill_mask(model, tok, text, k=5):
    """The top-k predictions for each [MASK] in `text` (the MLM head at work)."""
    model.eval()
    ids = [tok.cls_id]
    for i, part in enumerate(text.split("[MASK]")):
        ids += ([tok.mask_id] if i else []) + tok.encode(part)
    ids.append(tok.sep_id)
    logits = model(torch.tensor([ids], device=next(model.parameters()).device))[0][0]  # (T, V)
    return [[tok.itos[j] for j in logits[i].topk(k).indices.tolist()] for i, t in enumerate(ids) if t == tok.mask_id]


# --- Evaluation: what pretraining buys, at each number of labels ----------------------------------
# Pretraining pays where labels are scarce (Howard & Ruder 2018, ULMFiT 5; Turc et al. 2019, "Well-Read
# Students Learn Better", arXiv:1908.08962). --mode budget fine-tunes our pretrained encoder and the same
# model from random weights on 500, 2,000 and all SST-2 labels. A fair comparison needs three things:
# the same labeled subset for both arms; each arm's own learning rate (what suits a pretrained start need
# not suit a random one), chosen on training sentences held out from every run, never on dev; and
# several seeds, since a 500-sentence run moves by points from seed to seed.
def label_subsets(examples, cfg):
    """-> (held-out examples, {budget: training examples}). The held-out slice is the same for every run;
    budget n is n/2 positive and n/2 negative sentences of the rest, drawn with a seed of its own and
    shared by both arms and all seeds; `all` is the whole rest, with SST-2's own label balance."""
    order = list(range(len(examples)))
    random.Random(cfg.seed).shuffle(order)
    held, pool = [examples[i] for i in order[:cfg.heldout]], [examples[i] for i in order[cfg.heldout:]]
    subsets, by_label = {}, [[e for e in pool if e[2] == y] for y in (0, 1)]
    for b in cfg.budgets.split(","):
        if b != "all" and int(b) // 2 > min(map(len, by_label)):
            raise UserError(f"--budgets {b}: only {min(map(len, by_label))} sentences of the rarer label are left")
        subsets[b] = pool if b == "all" else [e for g in by_label for e in random.Random(cfg.seed + int(b)).sample(
            g, int(b) // 2)]
    return held, subsets


def budget_steps(cfg, n):
    """Steps for n labeled sentences: 10 epochs (a small set needs many passes), at least a fifth of
    --max_iters and at most --max_iters (cpu: 1,500 steps, 0.7 epoch of all 66k; BERT A.3: 2-4 epochs)."""
    return min(cfg.max_iters, max(cfg.max_iters // 5, math.ceil(10 * n / cfg.batch_size)))


@torch.no_grad()
def accuracy(model, batches):
    model.eval()
    correct = sum((model(idx, seg, mask).argmax(-1) == y).sum().item() for idx, seg, mask, y in batches)
    return correct / sum(len(b[3]) for b in batches)


def finetune_run(cfg, args, encoder_state, train_ex, eval_sets, lr, seed, steps, pad_id, device):
    """One fine-tuning run as --mode finetune makes it (AdamW, warmup then cosine to lr/10, clipping),
    evaluated at six evenly spaced steps. -> [{"step", and an accuracy per eval set}]"""
    run = dataclasses.replace(cfg, learning_rate=lr, min_lr=lr / 10, max_iters=steps, warmup_iters=steps // 10,
                              lr_decay_iters=0)
    torch.manual_seed(seed)
    model = BertClassifier(**args, n_classes=2).to(device)
    if encoder_state is not None:
        model.bert.load_state_dict(encoder_state)
    optimizer = configure_optimizer(model, run)
    stream, curve = BatchStream(lambda rng: train_ex, cfg.batch_size, seed), []
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = get_lr(run, step)
        model.train()
        loss, _ = classify_loss(model, [t.to(device) for t in collate(stream.get(step), pad_id)])
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) * 6 // steps > step * 6 // steps:  # steps/6, 2 steps/6, ..., steps
            curve.append({"step": step + 1, **{k: accuracy(model, b) for k, b in eval_sets.items()}})
    return curve


def run_budget(cfg):
    """--mode budget: every budget x arm x learning rate x seed, each run's result appended to log.jsonl
    as it ends (a rerun skips the runs already there, so an interrupted experiment continues, and one
    process per arm can share the file); then the table and budget.png from all of them."""
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        raise UserError("--mode budget runs in one process (its runs are small); start one per --arms instead")
    device = setup_device(cfg)[0]
    vocab, lower_case, args, state = load_pretrained(cfg)
    tok, args = BertTokenizer(vocab, lower_case), {k: v for k, v in args.items() if k != "n_classes"}
    encoder = {k[5:]: v for k, v in state.items() if k.startswith("bert.")}
    # what each arm's runs depend on: the pretrained weights, or only the vocabulary and the shape (so
    # scratch runs are reused when another checkpoint of the same pretraining is compared)
    weights = b"".join(v.float().numpy().tobytes() for v in encoder.values())
    init = {"pretrained": hashlib.sha256(weights).hexdigest()[:16],
            "scratch": hashlib.sha256(json.dumps([vocab, args]).encode()).hexdigest()[:16]}
    data = read_sst2(cfg.data_dir)
    held, subsets = label_subsets([encode_sentence(tok, t, y, cfg.max_len) for t, y in data["train"]], cfg)
    dev = sorted((encode_sentence(tok, t, y, cfg.max_len) for t, y in data["dev"]), key=lambda e: len(e[0]))
    eval_sets = {k: [[t.to(device) for t in collate(ex[i:i + 256], tok.pad_id)] for i in range(0, len(ex), 256)]
                 for k, ex in (("heldout", sorted(held, key=lambda e: len(e[0]))), ("dev", dev))}
    path = os.path.join(cfg.out_dir, "log.jsonl")
    records = []
    if os.path.exists(path):
        with open(path) as f:
            records = [r for r in map(json.loads, f) if r.get("mode") == "budget" and r["init"] == init[r["arm"]]]
    done = {(r["budget"], r["arm"], r["lr"], r["seed"]) for r in records}
    print(f"budget: {len(held)} held-out training sentences, {len(dev)} dev; {cfg.init_from}: {init}")
    for b, train_ex in subsets.items():
        steps = budget_steps(cfg, len(train_ex))
        for arm, lr, seed in ((a, float(lr), s) for a in cfg.arms.split(",") for lr in cfg.lrs.split(",")
                              for s in range(cfg.seed, cfg.seed + cfg.n_seeds)):
            if (b, arm, lr, seed) in done:
                continue
            t0 = time.time()
            curve = finetune_run(cfg, args, encoder if arm == "pretrained" else None, train_ex, eval_sets, lr,
                                 seed, steps, tok.pad_id, device)
            best = max(curve, key=lambda c: c["heldout"])  # early stopping on held-out, never on dev
            record = {"mode": "budget", "init": init[arm], "budget": b, "n_labels": len(train_ex), "arm": arm,
                      "lr": lr, "seed": seed, "steps": steps, "best_step": best["step"],
                      "heldout_acc": best["heldout"], "dev_acc": best["dev"], "seconds": round(time.time() - t0, 1),
                      "curve": curve}
            print(f"{b:>5} labels, {arm:>10}, lr {lr:.0e}, seed {seed}: held-out {best['heldout']:.4f}, "
                  f"dev {best['dev']:.4f} at step {best['step']}/{steps} ({record['seconds']:.0f} s)")
            log_jsonl(cfg, record)
            records.append(record)
    rows = summarize_budget(records, cfg)
    plot_budget(cfg, rows)
    return rows


def summarize_budget(records, cfg):
    """For each budget and arm: the learning rate with the best mean held-out accuracy over its seeds,
    and the dev accuracy of those seeds (mean, standard deviation, min, max). Prints the table."""
    rows, mean = [], (lambda xs: sum(xs) / len(xs))
    for b in cfg.budgets.split(","):
        for arm in cfg.arms.split(","):
            by_lr = defaultdict(list)
            for r in records:
                if r["budget"] == b and r["arm"] == arm:
                    by_lr[r["lr"]].append(r)
            if not by_lr:
                continue
            lr = max(by_lr, key=lambda x: mean([r["heldout_acc"] for r in by_lr[x]]))
            dev = [r["dev_acc"] for r in by_lr[lr]]
            std = (sum((d - mean(dev)) ** 2 for d in dev) / max(1, len(dev) - 1)) ** 0.5
            heldout = {f"{x:.0e}": round(100 * mean([r["heldout_acc"] for r in v]), 1)
                       for x, v in sorted(by_lr.items())}
            rows.append({"budget": b, "n_labels": by_lr[lr][0]["n_labels"], "arm": arm, "lr": lr, "seeds": len(dev),
                         "dev_mean": mean(dev), "dev_std": std, "dev_min": min(dev), "dev_max": max(dev)})
            print(f"{b:>5} ({rows[-1]['n_labels']} labels) {arm:>10}: lr {lr:.0e} -> dev {100 * mean(dev):.1f} "
                  f"+- {100 * std:.1f} % (min {100 * min(dev):.1f}, max {100 * max(dev):.1f}, {len(dev)} seeds); "
                  f"held-out % by lr {heldout}")
    return rows


def plot_pretrain(cfg):
    """The pretraining curve from this run's log.jsonl (its last record of each step) to pretrain.png:
    validation MLM loss on the left axis, MLM (and NSP) accuracy on the right."""
    if (plt := pyplot("pretrain.png")) is None:
        return
    with open(os.path.join(cfg.out_dir, "log.jsonl")) as f:
        log = {r["step"]: r for r in map(json.loads, f) if r.get("mode") == "pretrain"}
    steps = sorted(log)
    fig, ax = plt.subplots(figsize=(9, 4.5))
    ax.plot(steps, [log[s]["mlm_loss"] for s in steps], "C0", label="MLM loss (left)")
    ax.set(xlabel="optimizer step", ylabel="validation MLM loss (nats per masked token)")
    acc = ax.twinx()
    for key, style, name in (("mlm_acc", "C1", "MLM accuracy"), ("nsp_acc", "C2--", "NSP accuracy")):
        if key in log[steps[-1]]:
            acc.plot(steps, [100 * log[s].get(key, float("nan")) for s in steps], style, label=f"{name} (right)")
    acc.set_ylabel("validation accuracy (%)")
    fig.legend(loc="center right", bbox_to_anchor=(0.88, 0.55))  # the empty middle right
    ax.set_title(f"python 04_bert.py --mode pretrain --corpus {cfg.corpus} --nsp {cfg.nsp}: {cfg.max_iters} steps "
                 f"of {cfg.batch_size} x <= {cfg.max_len} tokens, torch threads: {torch.get_num_threads()}", fontsize=9)
    save_png(fig, os.path.join(cfg.out_dir, "pretrain.png"))


def plot_budget(cfg, rows):
    """Dev accuracy against the number of labels, pretrained vs scratch (mean and standard deviation over
    seeds, each arm at its chosen learning rate), to budget.png; Turc et al.'s BERT-Tiny for scale."""
    if not rows or (plt := pyplot("budget.png")) is None:
        return
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for arm in ("pretrained", "scratch"):
        r = [row for row in rows if row["arm"] == arm]
        if r:
            ax.errorbar([x["n_labels"] for x in r], [100 * x["dev_mean"] for x in r], [100 * x["dev_std"] for x in r],
                        marker="o", capsize=4, label=f"{arm} (mean ± std over seeds)")
    ax.axhline(83.2, color="gray", ls=":", label="Google's BERT-Tiny, all labels, GLUE test (Turc et al.)")
    ticks = sorted({row["n_labels"] for row in rows})
    ax.set(xscale="log", xlabel="labeled SST-2 training sentences (log scale)", ylabel="SST-2 dev accuracy (%)")
    ax.set_xticks(ticks, [f"{t:,}" for t in ticks])
    ax.set_xticks([], minor=True)
    ax.legend()
    ax.set_title(f"python 04_bert.py --mode budget --init_from {cfg.init_from} ({cfg.n_seeds} seeds, lrs {cfg.lrs}),"
                 f" torch threads: {torch.get_num_threads()}", fontsize=9)
    save_png(fig, os.path.join(cfg.out_dir, "budget.png"))


# --- main -----------------------------------------------------------------------------------------
def main(argv=None):
    # one training loop for three objectives; the budget experiment runs many small fine-tunes of its own
    return run_cli({"pretrain": train, "finetune": train, "distill": train, "budget": run_budget}, argv)


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
