"""Stage 1: sequence models. An LSTM whose backward pass you derive by hand, and the encoder-decoder
with attention that the Transformer replaced.

What you will learn: the LSTM gate equations; backpropagation through time written out step by step
(`LSTMFunction`, checked against autograd and `gradcheck`); padding done right (packed encoder,
attention masked over padding, a loss that ignores `<pad>`); Bahdanau and Luong attention; teacher
forcing; greedy and batched beam search; BLEU measured the way papers report it (sacreBLEU's 13a).

Run it:
    python 01_lstm_seq2seq.py                                # CPU quick run: English->French
    python 01_lstm_seq2seq.py --dataset=multi30k --max_iters=2000 --lr_decay_iters=2000   # German->English, as 02
    python 01_lstm_seq2seq.py --preset gpu                   # one GPU
    torchrun --standalone --nproc_per_node=8 01_lstm_seq2seq.py --preset gpu   # several GPUs (DDP)
    python 01_lstm_seq2seq.py --mode translate --text "i am cold ."
    python 01_lstm_seq2seq.py --mode attention --text "she is taller than me ."   # out/.../attention.png
    python 01_lstm_seq2seq.py --mode bench                   # ms/batch: hand-written LSTM vs nn.LSTM
    python 01_lstm_seq2seq.py --help                         # every flag, its default and meaning

Expected result (README.md has the table): the `cpu` preset reaches test BLEU 20.0 (beam 5; 17.3
greedy) on 618 held-out eng-fra pairs whose English never occurs in training; on Multi30k, the same
model trained for 2,000 steps (--dataset=multi30k --max_iters=2000 --lr_decay_iters=2000) reaches
32.95, cased against the raw references, in about 40 minutes on one CPU core.

Notation: B batch, S source length, T target length, E embedding size (n_embd), H hidden size
(n_hidden), L layers, D directions (2 if bidirectional), V vocabulary, K beam size.
LSTM gates as in PyTorch: a = x W_ihᵀ + b_ih + h W_hhᵀ + b_hh split into i, f, g, o (B, H) each.
Attention: query s (decoder state), memory m_1..m_S (encoder outputs), weights α (B, S), context
c = Σ_j α_j m_j. Luong's attentional state h̃ = tanh(W_c [s; c]).

References: Hochreiter & Schmidhuber 1997 (LSTM); Cho et al. 2014 arXiv:1406.1078 (GRU);
Sutskever et al. 2014 arXiv:1409.3215 (seq2seq); Bahdanau et al. 2014 arXiv:1409.0473 (additive
attention); Luong et al. 2015 arXiv:1508.04025 (dot/general attention, input feeding); Wu et al. 2016
arXiv:1609.08144 §7 (beam length penalty); Papineni et al. 2002 and Post 2018 arXiv:1804.08771 (BLEU,
sacreBLEU). Tests compare LSTMCell/GRUCell with nn.LSTM/nn.GRU, LSTMFunction with gradcheck and
autograd, corpus_bleu with sacreBLEU 2.6.0's numbers.
"""
import dataclasses
import gzip
import hashlib
import inspect
import json
import math
import os
import random
import re
import sys
import tempfile
import time
import unicodedata
import zipfile
from collections import Counter
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence


# --- Config ---------------------------------------------------------------------------------------
SCRIPT_NAME = "01_lstm_seq2seq"  # the file's stem: default out_dir is out/<SCRIPT_NAME>


@dataclasses.dataclass
class Config:
    # I/O
    out_dir: str = f"out/{SCRIPT_NAME}"  # checkpoints, log.jsonl, attention.png
    data_dir: str = os.environ.get("LLM_DATA_DIR", "data")  # raw downloads; read, never modified
    init_from: str = "scratch"  # scratch | resume
    mode: str = "train"  # train | translate | attention | bleu | bench
    text: str = ""  # the sentence for --mode translate / attention
    # data
    dataset: str = "eng-fra"  # eng-fra (Tatoeba via manythings.org) | multi30k (de->en)
    reverse: bool = False  # eng-fra only: translate French->English instead
    max_len: int = 10  # eng-fra only: drop pairs with a side longer than this many tokens
    prefix_filter: bool = False  # eng-fra only: keep the tutorial's "i am / he is / ..." sentences
    heldout_frac: float = 0.05  # eng-fra only: fraction of source sentences for val, and again for test
    min_freq: int = 2  # words seen fewer times in train become <unk>
    # model
    cell: str = "lstm"  # lstm | gru (PyTorch's fast kernels) | lstm_manual (hand-derived backward)
    attn: str = "bahdanau"  # bahdanau | luong_dot | luong_general | none
    n_embd: int = 256  # word embedding size E
    n_hidden: int = 256  # recurrent state size H
    n_layer: int = 1  # stacked recurrent layers, encoder and decoder
    bidirectional: bool = True  # bidirectional encoder
    dropout: float = 0.1  # on embeddings, between layers and before the output layer
    # training
    batch_size: int = 64  # sentence pairs per micro-batch (per rank)
    max_iters: int = 3000  # optimizer steps
    learning_rate: float = 2e-3  # peak learning rate (Adam)
    min_lr: float = 1e-4  # cosine decay floor
    warmup_iters: int = 100  # linear warmup steps
    lr_decay_iters: int = 3000  # cosine decay length (usually = max_iters)
    grad_clip: float = 1.0  # clip the global gradient norm (0 = off); RNNs need it
    teacher_forcing: float = 1.0  # probability of feeding the gold previous word (per step) vs the model's own
    eval_interval: int = 500  # steps between evaluations (and checkpoints)
    eval_iters: int = 20  # validation batches per evaluation
    log_interval: int = 50  # steps between progress lines
    always_save_checkpoint: bool = False  # save at every eval, not only on a new best val loss
    # decoding
    beam_size: int = 5  # beam width for BLEU and translate (1 = greedy)
    length_penalty: float = 0.6  # GNMT's alpha: rank finished beams by logp / ((5 + len) / 6)^alpha
    # system
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16 (autocast; float16 uses a GradScaler)
    compile: bool = False  # torch.compile the model
    seed: int = 1337  # base seed; rank r uses seed + r


PRESETS = {
    "tiny": dict(n_embd=32, n_hidden=32, batch_size=16, max_iters=20, lr_decay_iters=20, warmup_iters=2,
                 eval_interval=10, eval_iters=2, log_interval=5, min_freq=1, beam_size=2),  # tests
    "cpu": dict(prefix_filter=True, max_iters=600, lr_decay_iters=600, eval_interval=200),  # the default (a laptop)
    "gpu": dict(n_embd=512, n_hidden=512, n_layer=2, batch_size=128, max_iters=20000,
                lr_decay_iters=20000, learning_rate=1e-3, dropout=0.3, max_len=50, eval_interval=1000),
}
DEFAULT_PRESET = "cpu"
# Fields that define the model's shape: a checkpoint whose values differ cannot be loaded.
MODEL_KEYS = ("dataset", "reverse", "cell", "attn", "n_embd", "n_hidden", "n_layer", "bidirectional")
RULES = {  # checked by parse_args: a tuple lists the allowed values, a string bounds a number
    "mode": ("train", "translate", "attention", "bleu", "bench"), "init_from": ("scratch", "resume"),
    "dataset": ("eng-fra", "multi30k"), "cell": ("lstm", "gru", "lstm_manual"),
    "attn": ("bahdanau", "luong_dot", "luong_general", "none"), "dtype": ("auto", "float32", "bfloat16", "float16"),
    "heldout_frac": "in [0, 1)", "dropout": "in [0, 1)", "teacher_forcing": ">= 0", "length_penalty": ">= 0",
    **dict.fromkeys(("max_len", "min_freq", "n_embd", "n_hidden", "n_layer", "batch_size", "learning_rate",
                     "eval_interval", "eval_iters", "log_interval", "beam_size"), "> 0"),
    **dict.fromkeys(("max_iters", "min_lr", "warmup_iters", "lr_decay_iters", "grad_clip"), ">= 0"),
}


def check_config(cfg):
    """The rules that tie flags together, or that RULES cannot say; a ValueError names the flag."""
    if cfg.teacher_forcing > 1:
        raise ValueError(f"--teacher_forcing is a probability: it must be in [0, 1], not {cfg.teacher_forcing}")
    if cfg.heldout_frac >= 0.5:
        raise ValueError(f"--heldout_frac counts twice (val, test): it must be below 0.5, not {cfg.heldout_frac}")
    if cfg.min_lr > cfg.learning_rate:
        raise ValueError(f"--min_lr={cfg.min_lr} must not exceed --learning_rate={cfg.learning_rate}")
    if cfg.reverse and cfg.dataset != "eng-fra":
        raise ValueError("--reverse applies to --dataset=eng-fra only (multi30k is German->English)")
    if cfg.attn == "luong_dot" and cfg.bidirectional:
        raise ValueError("--attn=luong_dot scores s·m, so the encoder output (2H when bidirectional) must have the "
                         "decoder's width H: add --bidirectional=false or use luong_general")
    if cfg.mode in ("translate", "attention") and not cfg.text.strip():
        raise ValueError(f"--text is empty: --mode {cfg.mode} needs a sentence, --text \"...\"")


# --- Milestone: the LSTM, from its gate equations to a hand-derived backward ----------------------
class LSTMCell(nn.Module):
    """One LSTM step from the gate equations (Hochreiter & Schmidhuber 1997, with the forget gate of
    Gers et al. 2000), parameters laid out exactly as nn.LSTMCell so weights can be copied:
        a = x W_ihᵀ + b_ih + h W_hhᵀ + b_hh,   split into i, f, g, o     (B, 4H) -> 4 x (B, H)
        i, f, o = σ(a_i), σ(a_f), σ(a_o);  g = tanh(a_g)
        c' = f ⊙ c + i ⊙ g          (the cell: additive, so gradients flow through f ⊙ ... unscaled)
        h' = o ⊙ tanh(c')
    autograd differentiates this; LSTMFunction below does the same maths with a hand-written backward."""

    def __init__(self, input_size, hidden_size):
        super().__init__()
        self.weight_ih = nn.Parameter(torch.empty(4 * hidden_size, input_size))
        self.weight_hh = nn.Parameter(torch.empty(4 * hidden_size, hidden_size))
        self.bias_ih = nn.Parameter(torch.empty(4 * hidden_size))
        self.bias_hh = nn.Parameter(torch.empty(4 * hidden_size))
        bound = 1 / math.sqrt(hidden_size)  # PyTorch's init: U(-1/sqrt(H), 1/sqrt(H)) for every tensor
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def forward(self, x, state):  # x (B, I), state (h, c) each (B, H)
        h, c = state
        a = x @ self.weight_ih.T + self.bias_ih + h @ self.weight_hh.T + self.bias_hh  # (B, 4H)
        i, f, g, o = a.chunk(4, dim=-1)  # (B, H) each
        i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
        c = f * c + i * g
        h = o * torch.tanh(c)
        return h, c


class GRUCell(nn.Module):
    """One GRU step (Cho et al. 2014, PyTorch's convention), parameters laid out as nn.GRUCell:
        r = σ(x W_irᵀ + b_ir + h W_hrᵀ + b_hr)          reset gate
        z = σ(x W_izᵀ + b_iz + h W_hzᵀ + b_hz)          update gate
        n = tanh(x W_inᵀ + b_in + r ⊙ (h W_hnᵀ + b_hn))  candidate (r gates the *projected* h)
        h' = (1 - z) ⊙ n + z ⊙ h
    Two gates, no separate cell: 3/4 of an LSTM's parameters. `--cell gru` trains with nn.GRU; this
    class is the readable reference the tests hold nn.GRU to."""

    def __init__(self, input_size, hidden_size):
        super().__init__()
        self.weight_ih = nn.Parameter(torch.empty(3 * hidden_size, input_size))
        self.weight_hh = nn.Parameter(torch.empty(3 * hidden_size, hidden_size))
        self.bias_ih = nn.Parameter(torch.empty(3 * hidden_size))
        self.bias_hh = nn.Parameter(torch.empty(3 * hidden_size))
        bound = 1 / math.sqrt(hidden_size)
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def forward(self, x, h):  # x (B, I), h (B, H)
        xr, xz, xn = (x @ self.weight_ih.T + self.bias_ih).chunk(3, dim=-1)  # (B, H) each
        hr, hz, hn = (h @ self.weight_hh.T + self.bias_hh).chunk(3, dim=-1)  # (B, H) each
        r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
        n = torch.tanh(xn + r * hn)
        return (1 - z) * n + z * h


class LSTMFunction(torch.autograd.Function):
    """A whole LSTM layer over a sequence, with backpropagation through time derived by hand.

    forward(x (T, B, I), h0 (B, H), c0 (B, H), W_ih (4H, I), W_hh (4H, H), b_ih, b_hh (4H,))
        -> hs (T, B, H), cs (T, B, H): every hidden AND cell state, so a caller can read the final
           state of each padded sequence at its own length (the gradient then enters there).

    The derivation. Forward, step t (σ logistic, ⊙ elementwise, gate order i, f, g, o):
        a_t = x_t W_ihᵀ + b_ih + h_{t-1} W_hhᵀ + b_hh                         (B, 4H)
        i_t = σ(a_t^i)   f_t = σ(a_t^f)   g_t = tanh(a_t^g)   o_t = σ(a_t^o)     (B, H) each
        c_t = f_t ⊙ c_{t-1} + i_t ⊙ g_t
        h_t = o_t ⊙ tanh(c_t)
    The loss ℒ reaches h_t and c_t two ways: directly (autograd hands us dhs[t] = ∂ℒ/∂h_t and dcs[t]
    = ∂ℒ/∂c_t for the outputs) and through the future (h_t feeds a_{t+1}; c_t feeds c_{t+1}). So we
    walk t = T-1 ... 0 carrying the "future" parts dh_next, dc_next (both 0 after the last step):
      1. dh = dhs[t] + dh_next                                              total ∂ℒ/∂h_t
      2. h_t = o_t ⊙ tanh(c_t):   do = dh ⊙ tanh(c_t)
                                  dc = dcs[t] + dc_next + dh ⊙ o_t ⊙ (1 - tanh²(c_t))   total ∂ℒ/∂c_t
      3. c_t = f_t ⊙ c_{t-1} + i_t ⊙ g_t:
                                  di = dc ⊙ g_t,  dg = dc ⊙ i_t,  df = dc ⊙ c_{t-1},  dc_next = dc ⊙ f_t
      4. through the nonlinearities, σ' = σ(1 - σ), tanh' = 1 - tanh²:
            da^i = di ⊙ i(1-i),  da^f = df ⊙ f(1-f),  da^g = dg ⊙ (1-g²),  da^o = do ⊙ o(1-o)
      5. a_t is linear in h_{t-1}:  dh_next = da_t W_hh        (B, 4H) @ (4H, H)
      6. the weights are the same at every step, so their gradients are sums over t (and batch):
            dW_hh = Σ_t da_tᵀ h_{t-1}   dW_ih = Σ_t da_tᵀ x_t   db_ih = db_hh = Σ_t Σ_b da_t
         and dx_t = da_t W_ih. Only step 5 is sequential; step 6 runs once after the loop as big
         matmuls over all T·B rows (the forward precomputes x W_ihᵀ for all t the same way).
      7. after t = 0 the carried values are the initial-state gradients: dh0 = dh_next, dc0 = dc_next.
    Step 3's dc_next = dc ⊙ f_t is the "constant error carousel": with f ≈ 1 the gradient passes back
    through the cell without the repeated W_hh products that make a plain RNN's gradient vanish."""

    @staticmethod
    def forward(ctx, x, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh):
        T, B, _ = x.shape
        H = h0.shape[1]
        x_proj = (x.reshape(T * B, -1) @ weight_ih.T + bias_ih + bias_hh).view(T, B, 4 * H)  # (T, B, 4H)
        gates = x.new_empty(T, B, 4 * H)  # activated i, f, g, o, kept for the backward
        hs, cs = x.new_empty(T, B, H), x.new_empty(T, B, H)
        h, c = h0, c0
        for t in range(T):
            a = x_proj[t] + h @ weight_hh.T  # (B, 4H)
            i, f, o = torch.sigmoid(a[:, :H]), torch.sigmoid(a[:, H:2 * H]), torch.sigmoid(a[:, 3 * H:])
            g = torch.tanh(a[:, 2 * H:3 * H])
            c = f * c + i * g
            h = o * torch.tanh(c)
            gates[t] = torch.cat([i, f, g, o], dim=1)
            hs[t], cs[t] = h, c
        ctx.save_for_backward(x, h0, c0, weight_ih, weight_hh, gates, hs, cs)
        return hs, cs

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dhs, dcs):  # dhs, dcs (T, B, H): ∂ℒ/∂h_t, ∂ℒ/∂c_t from outside
        x, h0, c0, weight_ih, weight_hh, gates, hs, cs = ctx.saved_tensors
        T, B, H = hs.shape
        da_all = gates.new_empty(T, B, 4 * H)  # ∂ℒ/∂a_t for every step
        dh_next, dc_next = torch.zeros_like(h0), torch.zeros_like(c0)
        for t in reversed(range(T)):
            i, f, g, o = gates[t].chunk(4, dim=1)  # (B, H) each
            c_prev = cs[t - 1] if t > 0 else c0
            tanh_c = torch.tanh(cs[t])
            dh = dhs[t] + dh_next  # 1.
            do = dh * tanh_c  # 2.
            dc = dcs[t] + dc_next + dh * o * (1 - tanh_c * tanh_c)
            di, dg, df = dc * g, dc * i, dc * c_prev  # 3.
            dc_next = dc * f
            da = torch.cat([di * i * (1 - i), df * f * (1 - f), dg * (1 - g * g), do * o * (1 - o)], 1)  # 4. (B, 4H)
            dh_next = da @ weight_hh  # 5. (B, H)
            da_all[t] = da
        h_prev = torch.cat([h0[None], hs[:-1]])  # (T, B, H): h_{t-1} for each t
        da_flat = da_all.view(T * B, 4 * H)
        d_weight_hh = da_flat.T @ h_prev.reshape(T * B, H)  # 6. (4H, H)
        d_weight_ih = da_flat.T @ x.reshape(T * B, -1)  # (4H, I)
        d_bias = da_flat.sum(0)  # (4H,)
        dx = (da_flat @ weight_ih).view_as(x)  # (T, B, I)
        return dx, dh_next, dc_next, d_weight_ih, d_weight_hh, d_bias, d_bias.clone()  # 7.


def lstm_function(x, h0, c0, cell):
    """Run LSTMFunction with an LSTMCell's parameters. The hand-written backward works in the
    parameters' dtype (float32), so autocast is off around it; its outputs re-enter autocast after."""
    dtype = cell.weight_ih.dtype
    with torch.autocast(x.device.type, enabled=False):
        return LSTMFunction.apply(x.to(dtype), h0.to(dtype), c0.to(dtype), cell.weight_ih, cell.weight_hh,
                                  cell.bias_ih, cell.bias_hh)


class ManualLSTM(nn.Module):
    """nn.LSTM(batch_first=True)'s job on a right-padded batch, run by LSTMFunction: layers, optional
    backward direction, final states taken at each sequence's own length (not at the padding)."""

    def __init__(self, input_size, hidden_size, num_layers=1, bidirectional=False, dropout=0.0):
        super().__init__()
        self.hidden_size, self.num_layers, self.D = hidden_size, num_layers, 2 if bidirectional else 1
        self.cells = nn.ModuleList(LSTMCell(input_size if layer == 0 else self.D * hidden_size, hidden_size)
                                   for layer in range(num_layers) for _ in range(self.D))
        self.drop = nn.Dropout(dropout)

    def forward(self, x, lengths):  # x (B, S, I), lengths (B,) -> (B, S, D*H), (h_n, c_n) each (L*D, B, H)
        B, S, _ = x.shape
        pos = torch.arange(S, device=x.device)
        valid = pos < lengths[:, None]  # (B, S)
        # The backward direction reads each sequence from its last real word: reverse within the length
        # (padding stays at the end, so it never enters a real state). The index map is its own inverse.
        rev = torch.where(valid, lengths[:, None] - 1 - pos, pos)  # (B, S)
        last = (lengths - 1)[:, None, None].expand(B, 1, self.hidden_size)  # (B, 1, H)
        h_n, c_n = [], []
        for layer in range(self.num_layers):
            outs = []
            for d in range(self.D):
                inp = x if d == 0 else x.gather(1, rev[..., None].expand_as(x))  # (B, S, I)
                zeros = x.new_zeros(B, self.hidden_size)
                hs, cs = lstm_function(inp.transpose(0, 1), zeros, zeros, self.cells[layer * self.D + d])
                hs, cs = hs.transpose(0, 1), cs.transpose(0, 1)  # (B, S, H)
                h_n.append(hs.gather(1, last)[:, 0])
                c_n.append(cs.gather(1, last)[:, 0])
                outs.append(hs if d == 0 else hs.gather(1, rev[..., None].expand_as(hs)))
            x = torch.cat(outs, dim=-1) * valid[..., None]  # (B, S, D*H), zero at padding like nn.LSTM
            if layer < self.num_layers - 1:
                x = self.drop(x)
        return x, (torch.stack(h_n), torch.stack(c_n))


# --- Milestone: the encoder-decoder with attention, greedy and beam search ------------------------
PAD, SOS, EOS, UNK = 0, 1, 2, 3  # four distinct ids: the loss ignores PAD only


class Attention(nn.Module):
    """Scores between a decoder query s (B, Hq) and the encoder memory m (B, S, M), softmaxed over the
    real source words only (padding gets -inf, hence weight exactly 0):
        bahdanau:       e_j = vᵀ tanh(W_q s + W_k m_j)       (Bahdanau et al. 2014, §3.1 and A.1.2)
        luong_general:  e_j = sᵀ W m_j                       (Luong et al. 2015, §3.1)
        luong_dot:      e_j = sᵀ m_j                         (needs M = Hq)
        α = softmax(e),  context c = Σ_j α_j m_j"""

    def __init__(self, kind, query_dim, mem_dim):
        super().__init__()
        self.kind = kind
        if kind == "bahdanau":
            self.W_q = nn.Linear(query_dim, query_dim, bias=False)
            self.W_k = nn.Linear(mem_dim, query_dim)
            self.v = nn.Linear(query_dim, 1, bias=False)
        elif kind == "luong_general":
            self.W = nn.Linear(mem_dim, query_dim, bias=False)
        elif kind != "luong_dot" or query_dim != mem_dim:
            raise ValueError(f"attention {kind!r} with query {query_dim} and memory {mem_dim}")

    def keys(self, memory):  # (B, S, M) -> (B, S, Hq): the query-independent part, once per sentence
        return (self.W_k(memory) if self.kind == "bahdanau" else
                self.W(memory) if self.kind == "luong_general" else memory)

    def forward(self, query, keys, memory, mask):  # (B, Hq), (B, S, Hq), (B, S, M), (B, S) bool
        if self.kind == "bahdanau":
            scores = self.v(torch.tanh(self.W_q(query)[:, None] + keys)).squeeze(-1)  # (B, S)
        else:
            scores = torch.bmm(keys, query[:, :, None]).squeeze(-1)  # (B, S)
        weights = scores.float().masked_fill(~mask, float("-inf")).softmax(dim=-1)  # (B, S)
        context = torch.bmm(weights[:, None].to(memory.dtype), memory).squeeze(1)  # (B, M)
        return context, weights


class Seq2Seq(nn.Module):
    """Encoder (embedding -> [bi]LSTM/GRU) and a decoder run one word at a time:
        bahdanau:   c_t = attn(s_{t-1}, m);  s_t = RNN([e(y_{t-1}); c_t], s_{t-1})
        luong_*:    s_t = RNN([e(y_{t-1}); h̃_{t-1}], s_{t-1});  c_t = attn(s_t, m)   (input feeding, §3.3)
        none:       s_t = RNN(e(y_{t-1}), s_{t-1}), no context (Sutskever et al. 2014 + a bridge)
        h̃_t = tanh(W_c [s_t; c_t]);  p(y_t | y_<t, x) = softmax(W_o h̃_t)
    The decoder's initial state is s_0 = tanh(W_b [h_fwd_last; h_bwd_first]) per layer."""

    def __init__(self, src_vocab, tgt_vocab, n_embd=256, n_hidden=256, n_layer=1, cell="lstm",
                 attn="bahdanau", bidirectional=True, dropout=0.1):
        super().__init__()
        if cell not in ("lstm", "gru", "lstm_manual"):
            raise ValueError(f"cell must be lstm, gru or lstm_manual, not {cell!r}")
        self.cell, self.attn_kind, self.n_layer, self.n_hidden = cell, attn, n_layer, n_hidden
        self.D = D = 2 if bidirectional else 1
        self.src_embed = nn.Embedding(src_vocab, n_embd, padding_idx=PAD)
        self.tgt_embed = nn.Embedding(tgt_vocab, n_embd, padding_idx=PAD)
        self.drop = nn.Dropout(dropout)
        rnn_kw = dict(num_layers=n_layer, bidirectional=bidirectional, dropout=dropout if n_layer > 1 else 0.0)
        if cell == "lstm_manual":
            self.encoder = ManualLSTM(n_embd, n_hidden, **rnn_kw)
        else:
            self.encoder = {"lstm": nn.LSTM, "gru": nn.GRU}[cell](n_embd, n_hidden, batch_first=True, **rnn_kw)
        self.bridge = nn.Linear(D * n_hidden, n_hidden)
        feed = 0 if attn == "none" else D * n_hidden if attn == "bahdanau" else n_hidden
        step_cell = {"lstm": nn.LSTMCell, "gru": nn.GRUCell, "lstm_manual": LSTMCell}[cell]
        self.decoder = nn.ModuleList(step_cell(n_embd + feed if layer == 0 else n_hidden, n_hidden)
                                     for layer in range(n_layer))
        self.attn = None if attn == "none" else Attention(attn, n_hidden, D * n_hidden)
        self.combine = nn.Linear(n_hidden + (0 if attn == "none" else D * n_hidden), n_hidden)
        self.out = nn.Linear(n_hidden, tgt_vocab)

    def encode(self, src, src_len):  # (B, S), (B,) -> memory (B, S, D*H), keys, mask (B, S), state
        emb = self.drop(self.src_embed(src))  # (B, S, E)
        if self.cell == "lstm_manual":
            memory, final = self.encoder(emb, src_len)
        else:  # packing skips the padding, so the backward direction starts at each real last word
            packed = pack_padded_sequence(emb, src_len.cpu(), batch_first=True, enforce_sorted=False)
            # oneDNN's CPU LSTM kernel rejects bfloat16 packed input: run it in float32 there
            with torch.autocast("cpu", enabled=False) if src.device.type == "cpu" else nullcontext():
                out, final = self.encoder(packed.float() if src.device.type == "cpu" else packed)
            memory, _ = pad_packed_sequence(out, batch_first=True, total_length=src.size(1))
        h_n = final[0] if isinstance(final, tuple) else final  # (L*D, B, H), PyTorch's layout
        L, B, H = self.n_layer, src.size(0), self.n_hidden
        h_n = h_n.view(L, self.D, B, H).permute(0, 2, 1, 3).reshape(L, B, self.D * H)  # (L, B, D*H)
        h = torch.tanh(self.bridge(h_n))  # (L, B, H)
        mask = torch.arange(src.size(1), device=src.device) < src_len[:, None]  # (B, S) True = real word
        keys = None if self.attn is None else self.attn.keys(memory)
        return memory, keys, mask, (h, torch.zeros_like(h))

    def step(self, y, state, feed, memory, keys, mask, project=True):
        """One decoder step: previous word y (B,) -> logits (B, V) (None if not `project`), new state,
        h̃ (B, H), α (B, S)."""
        h, c = state  # (L, B, H) each; c unused by the GRU
        e = self.drop(self.tgt_embed(y))  # (B, E)
        weights = None
        if self.attn_kind == "bahdanau":
            context, weights = self.attn(h[-1], keys, memory, mask)  # attends with s_{t-1}
            x = torch.cat([e, context], dim=-1)
        else:
            x = e if self.attn is None else torch.cat([e, feed], dim=-1)
        new_h, new_c = [], []
        for layer, cell in enumerate(self.decoder):
            if self.cell == "gru":
                h_l, c_l = cell(x, h[layer]), c[layer]
            elif self.cell == "lstm":
                h_l, c_l = cell(x, (h[layer], c[layer]))
            else:  # lstm_manual: a length-1 sequence through the hand-derived function
                hs, cs = lstm_function(x[None], h[layer], c[layer], cell)
                h_l, c_l = hs[0], cs[0]
            new_h.append(h_l)
            new_c.append(c_l)
            x = self.drop(h_l) if layer < self.n_layer - 1 else h_l
        s = x  # (B, H) top layer
        if self.attn_kind.startswith("luong"):
            context, weights = self.attn(s, keys, memory, mask)  # attends with s_t
        attn_state = torch.tanh(self.combine(s if self.attn is None else torch.cat([s, context], -1)))  # h̃ (B, H)
        logits = self.out(self.drop(attn_state)) if project else None  # (B, V)
        return logits, (torch.stack(new_h), torch.stack(new_c)), attn_state, weights

    def forward(self, src, src_len, tgt_in, teacher_forcing=1.0):
        """-> logits (B, T, V). With probability 1 - teacher_forcing a step is fed the model's own
        previous prediction instead of the gold word (one coin per step for the batch)."""
        memory, keys, mask, state = self.encode(src, src_len)
        feed = memory.new_zeros(src.size(0), self.n_hidden)  # h̃_0
        if teacher_forcing >= 1:  # no step needs the previous step's logits, so the vocabulary
            outs = []  # projection (the step's largest matmul) runs once on all T steps, not T times
            for t in range(tgt_in.size(1)):
                _, state, feed, _ = self.step(tgt_in[:, t], state, feed, memory, keys, mask, project=False)
                outs.append(feed)
            return self.out(self.drop(torch.stack(outs, dim=1)))  # (B, T, V)
        use_gold = torch.rand(tgt_in.size(1)) < teacher_forcing  # (T,)
        logits, y = [], tgt_in[:, 0]
        for t in range(tgt_in.size(1)):
            if t > 0:
                y = tgt_in[:, t] if use_gold[t] else logits[-1].argmax(-1)
            step_logits, state, feed, _ = self.step(y, state, feed, memory, keys, mask)
            logits.append(step_logits)
        return torch.stack(logits, dim=1)  # (B, T, V)


def sequence_loss(logits, tgt_out):
    """Mean cross-entropy per real target word; <pad> positions contribute nothing."""
    return F.cross_entropy(logits.flatten(0, 1).float(), tgt_out.flatten(), ignore_index=PAD)


@torch.no_grad()
def greedy_decode(model, src, src_len, max_new_tokens):
    """-> tokens (B, <=max_new_tokens) ending in EOS/PAD, attention (B, steps, S)."""
    memory, keys, mask, state = model.encode(src, src_len)
    B = src.size(0)
    feed = memory.new_zeros(B, model.n_hidden)
    y = torch.full((B,), SOS, dtype=torch.long, device=src.device)
    done = torch.zeros(B, dtype=torch.bool, device=src.device)
    tokens, attns = [], []
    for _ in range(max_new_tokens):
        logits, state, feed, weights = model.step(y, state, feed, memory, keys, mask)
        y = logits.argmax(-1).masked_fill(done, PAD)  # (B,)
        tokens.append(y)
        attns.append(weights if weights is not None else mask.float() * 0)
        done |= y == EOS
        if done.all():
            break
    return torch.stack(tokens, 1), torch.stack(attns, 1)


@torch.no_grad()
def beam_search(model, src, src_len, beam_size, max_new_tokens, length_penalty=0.6):
    """Batched beam search: B sentences x K beams as B*K rows. Each step extends every live beam by
    every word and keeps the K best sums of log-probabilities per sentence; a beam that emitted <eos>
    stays in the running with its score frozen (it can only be extended by <pad>, at log-prob 0).
    At the end the best beam maximizes logp / ((5 + len) / 6)^alpha (Wu et al. 2016, §7), which keeps
    short hypotheses from winning merely by having fewer negative terms. -> tokens (B, steps)."""
    K = beam_size
    memory, keys, mask, (h, c) = model.encode(src, src_len)
    B = src.size(0)
    rows = torch.arange(B, device=src.device).repeat_interleave(K)  # (B*K,) row -> sentence
    memory, mask = memory[rows], mask[rows]
    keys = None if keys is None else keys[rows]
    state = (h[:, rows], c[:, rows])
    feed = memory.new_zeros(B * K, model.n_hidden)
    scores = torch.full((B, K), float("-inf"), device=src.device)
    scores[:, 0] = 0  # all beams start identical: only the first may expand at step 1
    y = torch.full((B * K,), SOS, dtype=torch.long, device=src.device)
    done = torch.zeros(B * K, dtype=torch.bool, device=src.device)
    tokens = torch.empty(B * K, 0, dtype=torch.long, device=src.device)
    for _ in range(max_new_tokens):
        logits, state, feed, _ = model.step(y, state, feed, memory, keys, mask)
        logp = logits.float().log_softmax(-1)  # (B*K, V)
        V = logp.size(-1)
        logp[done] = float("-inf")
        logp[done, PAD] = 0.0
        cand = (scores.view(B * K, 1) + logp).view(B, K * V)  # (B, K*V)
        scores, idx = cand.topk(K, dim=-1)  # (B, K)
        parent = (idx // V + torch.arange(B, device=src.device)[:, None] * K).view(-1)  # (B*K,) source row
        y = (idx % V).view(-1)  # (B*K,)
        state = (state[0][:, parent], state[1][:, parent])
        feed, tokens = feed[parent], torch.cat([tokens[parent], y[:, None]], dim=1)
        done = done[parent] | (y == EOS)
        if done.all():
            break
    lengths = (tokens != PAD).sum(1).float().view(B, K)  # <eos> counts, the padding after it does not
    best = (scores / ((5 + lengths) / 6) ** length_penalty).argmax(-1)  # (B,)
    return tokens.view(B, K, -1)[torch.arange(B), best]


# --- Data -----------------------------------------------------------------------------------------
# Module-level so tests can point them at a local server (or a closed port, to check "offline").
ENG_FRA_URL = "https://www.manythings.org/anki/fra-eng.zip"  # refuses requests' default User-Agent
BROWSER_HEADERS = {"User-Agent": "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko)"}
MULTI30K_URL = "https://raw.githubusercontent.com/multi30k/dataset/master/data/task1/raw/"
MULTI30K_SHA256 = {  # the gzipped files as committed (see the shared data MANIFEST)
    "train.de.gz": "726e39b2fa9eb9ffb6dc763fb35a179f80fae06ffc5d28b6ace5faa883de28a6",
    "train.en.gz": "d79cfa999dd4c51d2cb42499b6796d5a882c3a8a961923c25a898c90f8bbd56f",
    "val.de.gz": "f0cba2f995189cf5770f29a8a9a537a3ad3f51657ad873405082ff6863a5e75a",
    "val.en.gz": "14f7d25ddd868909a9213e361768460edcacdd6ab9d1e77b92560dc10c10dc28",
    "test_2016_flickr.de.gz": "9204244e408ccb38d2a55cfcd344df15005fc42a07a6e55ca6c52b6ababb8cc8",
    "test_2016_flickr.en.gz": "611d361c6334bc7246101d48097c13cf5c4413c5befc793cc629934359d532d9",
}
SPECIALS = ["<pad>", "<sos>", "<eos>", "<unk>"]  # the words of ids PAD, SOS, EOS, UNK

# Text normalization. NFC makes "é" one code point however it was typed (NFD would give e + ◌́, a
# second spelling of the same word in the vocabulary); typographic quotes and the narrow no-break
# space French puts before "! ? : ;" become their ASCII forms. Accents are KEPT: dropping them (as the
# PyTorch tutorial does) would make French output that no reference contains.
_TYPOGRAPHY = str.maketrans({"\u2019": "'", "\u2018": "'", "\u201c": '"', "\u201d": '"', "\u00ab": '"',
                             "\u00bb": '"', "\u202f": " ", "\u00a0": " ", "\u2009": " "})
# Tokens: decimals (3.50), a word with its elision apostrophe (l' homme, j' ai, don' t), a word with
# inner hyphens (t-shirt, est-ce), or one punctuation mark.
_TOKEN_RE = re.compile(r"\d+(?:[.,]\d+)+|\w+'|\w+(?:-\w+)*|[^\w\s]")
_NO_SPACE_BEFORE = set(".,!?;:%)]}")
_NO_SPACE_AFTER = set("([{")


def tokenize(text, lowercase):
    """Unicode-normalize, optionally lower-case, split punctuation off: 'Va !' -> ['va', '!']."""
    text = unicodedata.normalize("NFC", text).translate(_TYPOGRAPHY)
    return _TOKEN_RE.findall(text.lower() if lowercase else text)


def detokenize(tokens):
    """Join tokens back into text for BLEU: no space before . , ! ? etc., none after an elision
    apostrophe (l' + homme -> l'homme). BLEU's 13a tokenizer splits most punctuation again, so what
    matters is what 13a does NOT split: apostrophes and hyphens stay inside words, and we rejoin them.
    What is lost: a possessive "dogs' toys" comes back as "dogs'toys", curly quotes come back straight
    (the round trip's cost on the references is reported as `roundtrip_bleu`)."""
    out = ""
    for tok in tokens:
        after_elision = out.endswith("'") and len(out) > 1 and out[-2].isalnum()
        glue = not out or tok[0] in _NO_SPACE_BEFORE or out[-1] in _NO_SPACE_AFTER or after_elision
        out += tok if glue else " " + tok
    return out


ENG_PREFIXES = ("i am ", "i'm ", "he is ", "he's ", "she is ", "she's ", "you are ", "you're ",
                "we are ", "we're ", "they are ", "they're ")  # the PyTorch tutorial's subset


def read_eng_fra(data_dir):
    """-> (name, text) of manythings' fra.txt: <data_dir>/eng-fra/fra.txt if it is there, else read straight
    out of fra-eng.zip (downloaded beside it when missing). Nothing is extracted, so a read-only folder
    holding only the zip works. No sha256: manythings republishes the zip as Tatoeba grows."""
    path = os.path.join(data_dir, "eng-fra", "fra.txt")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            return path, f.read()
    path = download(ENG_FRA_URL, os.path.join(data_dir, "eng-fra", "fra-eng.zip"), magic=b"PK\x03\x04",
                    headers=BROWSER_HEADERS)
    try:
        with zipfile.ZipFile(path) as z:
            return f"{path}: fra.txt", z.read("fra.txt").decode("utf-8")
    except (zipfile.BadZipFile, KeyError) as e:
        raise UserError(f"{path} is not manythings' fra-eng.zip with a fra.txt inside ({e}); delete it") from None


def load_eng_fra(cfg):
    """Tatoeba English-French, lower-cased, filtered, split into train/val/test BY SOURCE SENTENCE:
    Tatoeba often lists one English sentence with several French translations, and a split by pair
    would put the same source in train and test. -> {split: [(src_tokens, tgt_tokens, reference)]}.
    The reference is the lower-cased, quote-normalized target (detokenized): eng-fra BLEU is therefore
    case-insensitive (like sacrebleu -lc), unlike Multi30k's, which is cased against the raw text."""
    name, text = read_eng_fra(cfg.data_dir)
    examples = []
    for lineno, line in enumerate(text.split("\n"), 1):
        cols = line.split("\t")  # English, French and, in newer releases, an attribution
        if line and (len(cols) < 2 or not cols[0].strip() or not cols[1].strip()):
            raise UserError(f"{name}, line {lineno}: expected 'English<TAB>French', got {line[:80]!r}")
        en_tok, fr_tok = (tokenize(side, True) for side in (cols + [""])[:2])
        if not (0 < len(en_tok) <= cfg.max_len and 0 < len(fr_tok) <= cfg.max_len):
            continue
        if cfg.prefix_filter and not (detokenize(en_tok) + " ").startswith(ENG_PREFIXES):
            continue
        src, tgt = (fr_tok, en_tok) if cfg.reverse else (en_tok, fr_tok)
        examples.append((src, tgt, detokenize(tgt)))
    sources = sorted({" ".join(src) for src, _, _ in examples})
    random.Random(cfg.seed).shuffle(sources)  # a split fixed by the seed, not by the rank
    n = max(1, int(cfg.heldout_frac * len(sources)))
    split_of = {s: "test" for s in sources[:n]} | {s: "val" for s in sources[n:2 * n]}
    splits = {"train": [], "val": [], "test": []}
    for ex in examples:
        splits[split_of.get(" ".join(ex[0]), "train")].append(ex)
    return splits


def load_multi30k(cfg):
    """Multi30k task 1, German->English, the official train/val/test2016 splits. Cased: the reference
    is the raw English line, so BLEU is exactly 02_transformer_mt.py's metric. Nothing is filtered:
    the longest sentences have about 40 words, which an attention model handles. The files are pinned
    by sha256, so their line counts match and no side is empty."""
    splits = {}
    for split, stem in (("train", "train"), ("val", "val"), ("test", "test_2016_flickr")):
        sides = []
        for lang in ("de", "en"):
            name = f"{stem}.{lang}.gz"
            path = download(MULTI30K_URL + name, os.path.join(cfg.data_dir, "multi30k", name), MULTI30K_SHA256[name])
            with gzip.open(path, "rt", encoding="utf-8") as f:
                sides.append(f.read().rstrip("\n").split("\n"))
        splits[split] = [(tokenize(de, False), tokenize(en, False), en.strip()) for de, en in zip(*sides)]
    return splits


def build_vocab(sentences, min_freq):
    """-> itos list: the four specials, then words seen >= min_freq times, most frequent first."""
    counts = Counter(w for s in sentences for w in s)
    return SPECIALS + sorted((w for w, c in counts.items() if c >= min_freq), key=lambda w: (-counts[w], w))


def prepare(cfg, vocab=None):
    """-> ({split: [(src_ids, tgt_ids, src_words, tgt_words, reference)]}, {"src": itos, "tgt": itos}).
    Vocabularies come from the training split only (or from a checkpoint, which carries them)."""
    splits = load_multi30k(cfg) if cfg.dataset == "multi30k" else load_eng_fra(cfg)
    if not splits["train"] or not splits["test"]:
        raise UserError(f"{cfg.dataset}: no training or test pairs left after --max_len={cfg.max_len}"
                        f"{' and --prefix_filter' if cfg.prefix_filter else ''}")
    if vocab is None:
        vocab = {"src": build_vocab((ex[0] for ex in splits["train"]), cfg.min_freq),
                 "tgt": build_vocab((ex[1] for ex in splits["train"]), cfg.min_freq)}
    s2i, t2i = ({w: i for i, w in enumerate(vocab[side])} for side in ("src", "tgt"))
    data = {k: [([s2i.get(w, UNK) for w in src], [t2i.get(w, UNK) for w in tgt], src, tgt, ref)
                for src, tgt, ref in v] for k, v in splits.items()}
    return data, vocab


def make_batch(examples, device):
    """Pad a list of (src_ids, tgt_ids, ...) -> src (B, S), src_len (B,), tgt_in (B, T), tgt_out (B, T).
    tgt_in = <sos> y_1 .. y_n, tgt_out = y_1 .. y_n <eos>: the decoder predicts the next word."""
    B, S, T = len(examples), max(len(ex[0]) for ex in examples), max(len(ex[1]) for ex in examples) + 1
    src, tgt_in, tgt_out = (torch.full((B, n), PAD, dtype=torch.long) for n in (S, T, T))
    for b, (s, t, *_) in enumerate(examples):
        src[b, :len(s)] = torch.tensor(s)
        tgt_in[b, :len(t) + 1] = torch.tensor([SOS] + t)
        tgt_out[b, :len(t) + 1] = torch.tensor(t + [EOS])
    src_len = torch.tensor([max(len(ex[0]), 1) for ex in examples])
    return src.to(device), src_len.to(device), tgt_in.to(device), tgt_out.to(device)


# --- Training -------------------------------------------------------------------------------------
def get_lr(cfg, step):
    """Linear warmup, then cosine decay to min_lr (nanoGPT's schedule)."""
    if step < cfg.warmup_iters:
        return cfg.learning_rate * (step + 1) / (cfg.warmup_iters + 1)
    if step > cfg.lr_decay_iters:
        return cfg.min_lr
    ratio = (step - cfg.warmup_iters) / max(1, cfg.lr_decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * ratio)) * (cfg.learning_rate - cfg.min_lr)


def init_model(cfg, device, vocab=None, rank=0, world_size=1):
    """-> (model, optimizer, vocab, step, best_val). Training passes the data's `vocab`: a fresh model,
    or with --init_from=resume the run in out_dir/ckpt.pt continued exactly. The other modes pass none
    and get the trained model, in eval mode, with the vocabularies its checkpoint carries (no data)."""
    path = os.path.join(cfg.out_dir, "ckpt.pt")
    training = vocab is not None
    ckpt = load_checkpoint(path, cfg, stage="train") if not training or cfg.init_from == "resume" else None
    if training and ckpt is not None and ckpt["vocab"] != vocab:
        raise UserError(f"{path} was trained on other data (its vocabulary differs): use the same --max_len/"
                        f"--prefix_filter/--min_freq/--heldout_frac/--seed, or --init_from=scratch")
    vocab = vocab or ckpt["vocab"]
    model = Seq2Seq(len(vocab["src"]), len(vocab["tgt"]), cfg.n_embd, cfg.n_hidden, cfg.n_layer, cfg.cell,
                    cfg.attn, cfg.bidirectional, cfg.dropout).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.learning_rate)
    if ckpt is None:
        return model, optimizer, vocab, 0, float("inf")
    if training:  # weights, Adam's moments and the random stream: the same batches and dropout masks
        ckpt = resume(path, cfg, model, optimizer, rank, world_size, stage="train", ckpt=ckpt)
    else:
        model.load_state_dict(ckpt["model"])
        model.eval()
    return model, optimizer, vocab, ckpt["step"], ckpt["best_val"]


@torch.no_grad()
def evaluate(model, examples, cfg, device, ctx):
    """Teacher-forced loss on the first eval_iters batches of `examples`, in order: the same batches
    at every evaluation, and no draw from the training RNG (so resumed runs stay exact)."""
    model.eval()
    total, count = 0.0, 0
    for k in range(0, min(len(examples), cfg.eval_iters * cfg.batch_size), cfg.batch_size):
        src, src_len, tgt_in, tgt_out = make_batch(examples[k:k + cfg.batch_size], device)
        with ctx:
            logits = model(src, src_len, tgt_in)
        n = (tgt_out != PAD).sum().item()
        total, count = total + sequence_loss(logits, tgt_out).item() * n, count + n
    model.train()
    return {"val_loss": total / max(count, 1)}


def train(cfg) -> dict:
    rank, local_rank, world_size = setup_ddp()
    master = rank == 0
    device, ctx, scaler = setup_device(cfg, local_rank)
    scaler = scaler or torch.amp.GradScaler(enabled=False)  # float16 needs one; disabled, it passes calls through
    torch.manual_seed(cfg.seed + rank)
    if not master:
        dist.barrier()  # rank 0 downloads first
    data, vocab = prepare(cfg)
    if master and world_size > 1:
        dist.barrier()
    model, optimizer, vocab, step, best_val = init_model(cfg, device, vocab, rank, world_size)
    raw_model = model
    if cfg.compile:
        model = torch.compile(model)
    if world_size > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if "cuda" in device else None)
    if master:
        n_params = sum(p.numel() for p in raw_model.parameters())
        print(f"{cfg.dataset}: {len(data['train'])} train / {len(data['val'])} val / {len(data['test'])} test pairs, "
              f"vocab {len(vocab['src'])} -> {len(vocab['tgt'])}; {n_params / 1e6:.2f}M parameters; "
              f"cell {cfg.cell}, attention {cfg.attn}")
    train_set, t0, t_start, tokens, loss, last_log = data["train"], time.time(), time.time(), 0, None, step
    while step < cfg.max_iters:
        lr = get_lr(cfg, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = [train_set[i] for i in torch.randint(len(train_set), (cfg.batch_size,)).tolist()]
        src, src_len, tgt_in, tgt_out = make_batch(batch, device)
        with ctx:
            logits = model(src, src_len, tgt_in, cfg.teacher_forcing)  # (B, T, V)
        loss = sequence_loss(logits, tgt_out)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)  # so that grad_clip sees the true gradient norm
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens += (tgt_out != PAD).sum().item()
        if master and (step % cfg.log_interval == 0 or step == 1):
            dt = time.time() - t0
            print(f"step {step:5d} | loss {loss.item():.4f} | lr {lr:.2e} | "
                  f"{tokens * world_size / dt:,.0f} tgt tok/s | {1000 * dt / (step - last_log):.0f} ms/step")
            t0, tokens, last_log = time.time(), 0, step
        if step % cfg.eval_interval == 0 or step == cfg.max_iters:
            val_loss = evaluate(raw_model, data["val"], cfg, device, ctx)["val_loss"]
            if master:
                print(f"step {step}: val loss {val_loss:.4f} (ppl {math.exp(min(val_loss, 50)):.1f})")
                log_jsonl(cfg, {"step": step, "train_loss": loss.item(), "val_loss": val_loss, "lr": lr,
                                "elapsed_s": round(time.time() - t_start, 1)})
                if val_loss < best_val or cfg.always_save_checkpoint:
                    best_val = min(best_val, val_loss)
                    save_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt"), model, optimizer, cfg, step, best_val,
                                    vocab=vocab)
    metrics = {"step": step, "train_loss": None if loss is None else loss.item(),
               "fingerprint": fingerprint(raw_model), "train_time_s": round(time.time() - t_start, 1)}
    if world_size > 1:
        metrics["fingerprints"] = [None] * world_size
        dist.all_gather_object(metrics["fingerprints"], metrics["fingerprint"])
    if master:
        t_bleu = time.time()
        metrics.update(evaluate_bleu(raw_model, data["test"], vocab, cfg, device, ctx))
        metrics["decode_time_s"] = round(time.time() - t_bleu, 1)
        print(f"test BLEU {metrics['bleu']:.2f} ({len(data['test'])} sentences, beam {cfg.beam_size}); "
              f"trained {metrics['train_time_s']}s, decoded {metrics['decode_time_s']}s")
        log_jsonl(cfg, metrics)
    if world_size > 1:
        dist.barrier()
        dist.destroy_process_group()
    return metrics


# --- Evaluation: BLEU as sacreBLEU computes it (the same code is in 01 and 02) --------------------
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


# --- Evaluation / inference -----------------------------------------------------------------------
def translate(model, src_ids, vocab, cfg, device, ctx):
    """Translate lists of source ids in batches (beam search, or greedy with --beam_size=1) -> strings."""
    model.eval()
    outputs = []
    for k in range(0, len(src_ids), cfg.batch_size):
        src, src_len, _, _ = make_batch([(s or [UNK], []) for s in src_ids[k:k + cfg.batch_size]], device)
        max_new = 2 * src.size(1) + 10
        with ctx:
            if cfg.beam_size > 1:
                tokens = beam_search(model, src, src_len, cfg.beam_size, max_new, cfg.length_penalty)
            else:
                tokens = greedy_decode(model, src, src_len, max_new)[0]
        for row in tokens.tolist():  # each cut at its <eos> (or <pad>)
            stop = next((k for k, i in enumerate(row) if i in (EOS, PAD)), len(row))
            outputs.append(detokenize([vocab["tgt"][i] for i in row[:stop]]))
    return outputs


def evaluate_bleu(model, examples, vocab, cfg, device, ctx):
    """Corpus BLEU of the test set, plus the round-trip ceiling: the BLEU of the detokenized
    *reference tokens* against the references, i.e. what our tokenize/detokenize costs by itself."""
    hyps = translate(model, [ex[0] for ex in examples], vocab, cfg, device, ctx)
    refs = [ex[4] for ex in examples]
    roundtrip = [detokenize(ex[3]) for ex in examples]
    return {"bleu": corpus_bleu(hyps, refs), "roundtrip_bleu": corpus_bleu(roundtrip, refs),
            "example": {"src": detokenize(examples[0][2]), "ref": refs[0], "hyp": hyps[0]}}


def report_bleu(cfg):
    """--mode bleu: the checkpoint's test BLEU, decoded with the current --beam_size/--length_penalty."""
    device, ctx, _ = setup_device(cfg)
    model, _, vocab, _, _ = init_model(cfg, device)
    result = evaluate_bleu(model, prepare(cfg, vocab)[0]["test"], vocab, cfg, device, ctx)
    print(f"test BLEU {result['bleu']:.2f} (beam {cfg.beam_size}; round-trip ceiling {result['roundtrip_bleu']:.2f})")
    return result


def translate_text(cfg):
    """--mode translate: --text through the trained model; --mode attention: the same, drawn."""
    device, ctx, _ = setup_device(cfg)
    model, _, vocab, _, _ = init_model(cfg, device)
    words = tokenize(cfg.text, lowercase=cfg.dataset == "eng-fra")
    ids = [vocab["src"].index(w) if w in vocab["src"] else UNK for w in words]
    if cfg.mode == "attention":
        return plot_attention(cfg, model, vocab, device, ctx, words, ids)
    print(f"{detokenize(words)} -> {translate(model, [ids], vocab, cfg, device, ctx)[0]}")


def plot_attention(cfg, model, vocab, device, ctx, words, ids):
    """Greedy-translate the source `ids` and draw the attention weights α (output words x source words)."""
    if (plt := pyplot("attention.png")) is None:
        raise UserError("--mode attention draws a PNG with matplotlib: pip install matplotlib")
    if model.attn is None:
        raise UserError("this model was trained with --attn=none: there are no attention weights to plot")
    src, src_len, _, _ = make_batch([(ids or [UNK], [])], device)
    with ctx:
        tokens, attn = greedy_decode(model, src, src_len, 2 * len(ids) + 10)
    out = []
    for i in tokens[0].tolist():
        out.append(vocab["tgt"][i])
        if i in (EOS, PAD):
            break
    weights = attn[0, :len(out), :len(words)].float().cpu().numpy()  # (T_out, S)
    fig, ax = plt.subplots(figsize=(1 + 0.6 * len(words), 1 + 0.5 * len(out)))
    ax.imshow(weights, cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(len(words)), [vocab["src"][i] if i == UNK else w for w, i in zip(words, ids)], rotation=60)
    ax.set_yticks(range(len(out)), out)
    ax.set(xlabel="source", ylabel="output", title=f"{cfg.attn} attention")
    print(detokenize(out[:-1] if out[-1] in SPECIALS else out))
    path = os.path.join(cfg.out_dir, "attention.png")
    save_png(fig, path, dpi=120)
    return path


def benchmark(cfg, steps=10, vocab_size=8000):  # 8000: about eng-fra's French vocabulary at min_freq 2
    """ms per training batch (forward + backward + Adam) for lstm vs lstm_manual vs gru on random
    sentence pairs of length max_len, and for the bare encoder layer alone: the price of a
    hand-written LSTM (a Python loop over time, one small matmul per step) vs PyTorch's fused kernels."""
    device, ctx, _ = setup_device(cfg)
    B, S, E, H, V = cfg.batch_size, cfg.max_len, cfg.n_embd, cfg.n_hidden, vocab_size
    sync = torch.cuda.synchronize if device.startswith("cuda") else lambda: None

    def timed(fn):
        fn()  # warmup
        sync()
        t = time.perf_counter()
        for _ in range(steps):
            fn()
        sync()
        return 1000 * (time.perf_counter() - t) / steps

    def train_step(model, opt):
        with ctx:
            loss = sequence_loss(model(src, src_len, tgt[:, :-1]), tgt[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    gen = torch.Generator().manual_seed(cfg.seed)
    src = torch.randint(4, V, (B, S), generator=gen).to(device)
    tgt = torch.randint(4, V, (B, S + 1), generator=gen).to(device)
    src_len, results = torch.full((B,), S, device=device), {}
    for cell in ("lstm", "lstm_manual", "gru"):
        torch.manual_seed(cfg.seed)
        model = Seq2Seq(V, V, E, H, cfg.n_layer, cell, cfg.attn, cfg.bidirectional, cfg.dropout).to(device)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        results[f"{cell}_ms_per_batch"] = timed(lambda: train_step(model, opt))
    x = torch.randn(B, S, E, device=device, requires_grad=True)
    layers = {"lstm": (nn.LSTM(E, H, batch_first=True).to(device), (x,)),
              "lstm_manual": (ManualLSTM(E, H).to(device), (x, src_len))}
    for name, (layer, args) in layers.items():
        results[f"{name}_layer_ms"] = timed(lambda: layer(*args)[0].sum().backward())
    print(f"ms per batch, B={B}, S=T={S}, E={E}, H={H}, V={V}, device {device}, {torch.get_num_threads()} threads:")
    for name, ms in results.items():
        print(f"  {name:28s} {ms:8.1f}")
    print(f"  lstm_manual / lstm: {results['lstm_manual_ms_per_batch'] / results['lstm_ms_per_batch']:.2f}x per "
          f"batch, {results['lstm_manual_layer_ms'] / results['lstm_layer_ms']:.2f}x for the layer alone")
    log_jsonl(cfg, {"bench": results, "batch_size": B, "max_len": S, "device": device})
    return results


# --- main -----------------------------------------------------------------------------------------
def main(argv=None):
    return run_cli({"train": train, "translate": translate_text, "attention": translate_text, "bleu": report_bleu,
                    "bench": benchmark}, argv)


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
