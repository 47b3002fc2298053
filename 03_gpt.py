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
    python 03_gpt.py --help                            # every flag, its default and meaning

Expected result (README.md has the table): the cpu preset reaches val loss 1.73 on shakespeare_char
after 600 steps (71 s on 2 cores; 1.98 with AdamW instead of Muon); nanogpt_cpu ~1.9 after 2000
steps; the KV cache generates ~7x faster at block 256; int8 shrinks the Linear weights 3.9x for a
+0.01% loss change.

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
import time
from collections import defaultdict
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn import functional as F

SCRIPT_NAME = "03_gpt"  # the file's stem: default out_dir is out/<SCRIPT_NAME>


# --- Config ---------------------------------------------------------------------------------------
@dataclass
class Config:
    # I/O
    out_dir: str = f"out/{SCRIPT_NAME}"  # checkpoints, log.jsonl, derived data (token ids, vocab)
    data_dir: str = os.environ.get("LLM_DATA_DIR", "data")  # raw downloads; read, never modified
    init_from: str = "scratch"  # scratch | resume | gpt2 | gpt2-medium | gpt2-large | gpt2-xl | folder
    mode: str = "train"  # train | sample | eval | bench | extrapolate | landscape
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
    # the default, a laptop CPU. At a fixed budget a narrower model that sees more tokens wins
    # (Hoffmann et al. 2022): 96 wide (0.45M parameters) for 1.2M tokens, ~3.7 TFLOP, beat
    # nanogpt_cpu's 128 wide for 0.8M tokens at ~4.6 TFLOP (val 1.98 vs 2.06 in our runs). Muon for
    # the blocks' matrices then took the same 600 steps from val 1.98 to 1.73 (README, Results).
    "cpu": dict(n_layer=4, n_head=4, n_embd=96, block_size=64, batch_size=32, max_iters=600,
                lr_decay_iters=600, warmup_iters=30, learning_rate=4e-3, min_lr=4e-4, eval_interval=300,
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
MODES = ("train", "sample", "eval", "bench", "extrapolate", "landscape")
GPT2_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")


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
            dtype = "float32"  # CPUs without AMX/AVX512-BF16 run bfloat16 matmuls slower than float32
    if dtype not in ("float32", "bfloat16", "float16"):
        raise UserError(f"--dtype must be auto, float32, bfloat16 or float16, not {dtype!r}")
    device_type = device.split(":")[0]
    ctx = nullcontext() if dtype == "float32" else torch.autocast(device_type, dtype=getattr(torch, dtype))
    scaler = torch.amp.GradScaler(device_type) if dtype == "float16" else None
    return device, ctx, scaler


# --- Data -----------------------------------------------------------------------------------------
SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
# name -> (file under --data_dir, URL, sha256 or None, tokenizer). Module-level so tests can point a
# dataset at a local server.
DATASETS = {
    "shakespeare_char": ("tinyshakespeare/input.txt", SHAKESPEARE_URL,
                         "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed", "char"),
    "shakespeare": ("tinyshakespeare/input.txt", SHAKESPEARE_URL,
                    "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed", "gpt2"),
    "tinystories": ("tinystories/TinyStories-valid.txt",
                    "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/TinyStories-valid.txt",
                    None, "gpt2"),
    "owt10k": ("openwebtext-10k/openwebtext-10k.tar.xz",
               "https://cdn-datasets.huggingface.co/nlp/datasets/openwebtext/openwebtext-10k.tar.xz",
               None, "gpt2"),
}
HF_URL = "https://huggingface.co/openai-community/{name}/resolve/main/{file}"  # GPT-2 weights
GPT2_EOT = 50256  # <|endoftext|>, put between documents


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
    except (requests.RequestException, OSError) as e:  # OSError: a read-only or full data_dir
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

        def encode(text):  # a binary search per character, vectorized: ~1M characters in 0.1 s
            codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
            ids = np.searchsorted(table, codes).clip(max=len(table) - 1)
            missing = set(text[i] for i in np.flatnonzero(table[ids] != codes))
            if missing:
                raise UserError(f"characters {''.join(sorted(missing))!r} are not in this model's vocabulary")
            return ids.tolist()

        return encode, lambda ids: "".join(meta["chars"][i] for i in ids)
    enc = gpt2_encoding()
    return (lambda text: enc.encode(text, allowed_special={"<|endoftext|>"})), enc.decode


def _sha256_file(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def iter_documents(path):
    """Yield the documents of a raw corpus one at a time, so a large corpus is never held twice:
    a .tar.xz of text files (one document each, OpenWebText-10k's layout), a TinyStories-style text
    with stories separated by `<|endoftext|>` lines, or a plain text (one document)."""
    if path.endswith((".tar.xz", ".tar.gz", ".tar")):
        import tarfile

        with tarfile.open(path, "r|*") as tar:  # streaming mode: members in archive order
            for member in tar:
                if member.isfile() and member.name.endswith(".txt"):
                    yield tar.extractfile(member).read().decode("utf-8", errors="replace")
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


def _write_ids(path, ids):
    """uint16 ids to `path` through a temporary file (all vocabularies here have < 65,536 tokens)."""
    np.asarray(ids, dtype=np.uint16).tofile(path + ".tmp")
    os.replace(path + ".tmp", path)


def prepare_data(cfg, verbose=True):
    """Tokenize the dataset once into out_dir/data/<name>-<tokenizer>-<sha>/{train,val}.bin (uint16)
    plus meta.json, and return (folder, meta). The cache key holds the source file's sha256, so an
    edited text is re-tokenized and an unchanged one is reused. Only the source is read from data_dir."""
    if cfg.dataset in DATASETS:
        rel, url, sha, kind = DATASETS[cfg.dataset]
        src = download(url, os.path.join(cfg.data_dir, rel), sha)
        name = cfg.dataset
    elif cfg.dataset.endswith(".txt"):
        src, kind, name = cfg.dataset, cfg.tokenizer, os.path.basename(cfg.dataset)[:-4]
        if not os.path.isfile(src):
            raise UserError(f"--dataset {src}: no such file")
        if kind not in ("char", "gpt2"):
            raise UserError(f"--tokenizer must be char or gpt2, not {kind!r}")
    else:
        raise UserError(f"unknown dataset {cfg.dataset!r} (choose from {', '.join(DATASETS)}, "
                        f"or give a path/to/file.txt)")
    folder = os.path.join(cfg.out_dir, "data", f"{name}-{kind}-{_sha256_file(src)[:12]}")
    if os.path.exists(os.path.join(folder, "meta.json")):
        with open(os.path.join(folder, "meta.json")) as f:
            return folder, json.load(f)
    os.makedirs(folder, exist_ok=True)
    t0 = time.time()
    if cfg.dataset in ("tinystories", "owt10k"):  # many documents, streamed
        meta = _prepare_corpus(src, folder, verbose)
    else:  # one text: the first 90% of its characters train, the last 10% validate (nanoGPT)
        with open(src, encoding="utf-8") as f:
            text = f.read()
        chars = "".join(sorted(set(text)))  # the character vocabulary, in id order
        tokenizer = {"kind": "char", "chars": chars} if kind == "char" else {"kind": "gpt2"}
        encode, _ = make_tokenizer(tokenizer)
        split = int(0.9 * len(text))
        train_ids, val_ids = encode(text[:split]), encode(text[split:])
        _write_ids(os.path.join(folder, "train.bin"), train_ids)
        _write_ids(os.path.join(folder, "val.bin"), val_ids)
        meta = {"tokenizer": tokenizer, "vocab_size": len(chars) if kind == "char" else 50257,
                "train_tokens": len(train_ids), "val_tokens": len(val_ids), "source": src}
    with open(os.path.join(folder, "meta.json.tmp"), "w") as f:
        json.dump(meta, f)
    os.replace(os.path.join(folder, "meta.json.tmp"), os.path.join(folder, "meta.json"))
    if verbose:
        print(f"prepared {name}: {meta['train_tokens']:,} train and {meta['val_tokens']:,} val tokens "
              f"({kind}, vocab {meta['vocab_size']:,}) in {time.time() - t0:.1f}s -> {folder}")
    return folder, meta


def _prepare_corpus(src, folder, verbose):
    """GPT-2 BPE over a many-document corpus, streamed: each document gets <|endoftext|> after it,
    every 10th document goes to val, and ids are flushed to disk in chunks of ~1M tokens."""
    enc = gpt2_encoding()
    files = {s: open(os.path.join(folder, f"{s}.bin.tmp"), "wb") for s in ("train", "val")}
    buffers, counts, n_docs = {"train": [], "val": []}, {"train": 0, "val": 0}, 0
    for n_docs, doc in enumerate(iter_documents(src), start=1):
        split = "val" if n_docs % 10 == 0 else "train"
        ids = enc.encode_ordinary(doc)
        ids.append(GPT2_EOT)
        buffers[split].extend(ids)
        counts[split] += len(ids)
        if len(buffers[split]) > 1 << 20:
            np.asarray(buffers[split], dtype=np.uint16).tofile(files[split])
            buffers[split] = []
        if verbose and n_docs % 1000 == 0:
            total = counts["train"] + counts["val"]
            print(f"\rtokenizing: {n_docs:,} documents, {total:,} tokens", end="", flush=True)
    if verbose and n_docs >= 1000:
        print()
    for s, f in files.items():
        np.asarray(buffers[s], dtype=np.uint16).tofile(f)
        f.close()
        os.replace(os.path.join(folder, f"{s}.bin.tmp"), os.path.join(folder, f"{s}.bin"))
    if counts["val"] == 0:
        raise UserError(f"{src} has {n_docs} document(s): need at least 10 for a validation split")
    return {"tokenizer": {"kind": "gpt2"}, "vocab_size": 50257, "train_tokens": counts["train"],
            "val_tokens": counts["val"], "documents": n_docs, "source": src}


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


# --- Model ----------------------------------------------------------------------------------------
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
        if self.k is None:
            B, nh, _, hd = k.shape
            self.k = k.new_zeros(B, nh, self.max_len, hd)
            self.v = v.new_zeros(B, nh, self.max_len, hd)
        end = start + k.size(2)
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class CausalSelfAttention(nn.Module):
    """softmax(q k^T / sqrt(hd) + bias) v per head (Vaswani et al. §3.2.1), q, k, v from one fused
    Linear(C, 3C) named c_attn as in GPT-2, so OpenAI's weights load unchanged."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be divisible by n_head"
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head, self.dropout, self.attn = config.n_head, config.dropout, config.attn

    def forward(self, x, rope=None, attn_bias=None, cache=None, start=0):
        """x (B, T, C); rope = (cos, sin) or None; attn_bias (nh or 1, T, S) additive, -inf where
        masked, or None for the plain causal mask with T == S; cache: this layer's KVCache."""
        B, T, C = x.shape
        hd = C // self.n_head
        q, k, v = self.c_attn(x).split(C, dim=2)  # (B, T, C) each
        q = q.view(B, T, self.n_head, hd).transpose(1, 2)  # (B, nh, T, hd)
        k = k.view(B, T, self.n_head, hd).transpose(1, 2)  # (B, nh, T, hd)
        v = v.view(B, T, self.n_head, hd).transpose(1, 2)  # (B, nh, T, hd)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(start, k, v)  # (B, nh, S, hd), S = start + T
        p = self.dropout if self.training else 0.0
        if self.attn == "manual":
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hd))  # (B, nh, T, S)
            if attn_bias is None:  # query t sees keys 0..t
                causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
                att = att.masked_fill(~causal, float("-inf"))
            else:
                att = att + attn_bias
            att = F.softmax(att, dim=-1)  # (B, nh, T, S); autocast runs softmax in float32
            y = self.attn_dropout(att) @ v  # (B, nh, T, hd)
        else:  # the same maths in one fused kernel (flash attention on GPUs when attn_bias is None)
            mask = None if attn_bias is None else attn_bias.to(q.dtype)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=mask is None)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): heads side by side again
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """Position-wise feed-forward, C -> 4C -> C with GELU. GPT-2 used GELU's tanh approximation;
    the exact erf form (as in nanoGPT) differs by < 1e-3 and runs ~2.5x faster on CPUs."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
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
        if config.pos not in ("learned", "rope", "alibi"):
            raise ValueError(f"pos must be learned, rope or alibi, not {config.pos!r}")
        if config.attn not in ("sdpa", "manual"):
            raise ValueError(f"attn must be sdpa or manual, not {config.attn!r}")
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
        if non_embedding and "wpe" in self.transformer:
            n -= self.transformer.wpe.weight.numel()
        return n

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
        if kind == "adamw":
            groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                      {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
            fused = device_type in ("cuda", "cpu")  # one kernel for all tensors instead of a Python loop
            return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=fused)
        matrices = {id(p) for n, p in self.transformer.h.named_parameters() if p.dim() == 2}
        groups = [{"params": [p for p in params if p.dim() >= 2 and id(p) not in matrices],
                   "weight_decay": weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
                  {"params": [p for p in params if id(p) in matrices], "weight_decay": 0.0, "muon": True,
                   "lr_scale": muon_lr / learning_rate}]
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
    def from_pretrained(cls, name_or_dir, dropout=0.0, cache_dir="data/hf"):
        """OpenAI's GPT-2 from a Hugging Face folder (config.json + model.safetensors): a name in
        GPT2_NAMES is downloaded to cache_dir/<name>/, anything else is read as a local folder."""
        if name_or_dir in GPT2_NAMES:
            folder = os.path.join(cache_dir, name_or_dir)
            for file in ("config.json", "model.safetensors"):
                download(HF_URL.format(name=name_or_dir, file=file), os.path.join(folder, file))
        elif os.path.isdir(name_or_dir):
            folder = name_or_dir
        else:
            raise UserError(f"--init_from {name_or_dir!r}: not one of {', '.join(GPT2_NAMES)} nor a folder")
        try:
            with open(os.path.join(folder, "config.json")) as f:
                hf = json.load(f)
            tensors = load_safetensors(os.path.join(folder, "model.safetensors"))
        except (OSError, ValueError, KeyError) as e:
            raise UserError(f"{folder} has no readable GPT-2 config.json + model.safetensors ({e})") from None
        config = GPTConfig(block_size=hf.get("n_positions", hf.get("n_ctx", 1024)), vocab_size=hf["vocab_size"],
                           n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"], dropout=dropout,
                           bias=True)
        model = cls(config)
        sd = model.state_dict()
        conv1d = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")
        loaded = set()
        for key, t in tensors.items():
            key = key.removeprefix("transformer.")
            if key.endswith((".attn.bias", ".attn.masked_bias")) or key == "lm_head.weight":
                continue  # the causal-mask buffers, and the head (tied to wte)
            ours = f"transformer.{key}"
            if ours not in sd:
                raise UserError(f"{folder}/model.safetensors has an unexpected tensor {key!r}")
            if key.endswith(conv1d):  # GPT-2's Conv1D stores (in, out); nn.Linear wants (out, in)
                t = t.t()
            if t.shape != sd[ours].shape:
                raise UserError(f"{key}: shape {tuple(t.shape)} in the file, {tuple(sd[ours].shape)} in the model")
            with torch.no_grad():
                sd[ours].copy_(t)
            loaded.add(ours)
        missing = set(sd) - loaded - {"lm_head.weight"}
        if missing:
            raise UserError(f"{folder}/model.safetensors lacks {sorted(missing)[:3]} ...")
        return model


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
    little-endian buffer; offsets count from the buffer's start. -> {name: tensor}."""
    assert sys.byteorder == "little", "this reader maps the little-endian buffer directly"
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        buffer = bytearray(f.read())
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        dtype = SAFETENSORS_DTYPES[info["dtype"]]
        raw = buffer[begin:end]
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


# --- Training -------------------------------------------------------------------------------------
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
    """Muon, "MomentUm Orthogonalized by Newton-Schulz" (K. Jordan et al. 2024, kellerjordan.github.io
    /posts/muon; the optimizer of the modded-nanogpt speedrun records, scaled up in Moonlight, Liu et
    al. 2025, arXiv:2502.16982). For a weight matrix W (out, in) with Nesterov momentum M, the update
    is the orthogonalized U Vᵀ of M = U Σ Vᵀ: every direction of the update gets the same step size,
    so the rare directions that a raw gradient barely moves learn as fast as the dominant ones.
    The step is scaled by sqrt(max(1, out/in)) so tall and wide matrices move alike.
    Groups without "muon" get plain AdamW (Loshchilov & Hutter 2019), written out: Muon is only for
    hidden matrices; embeddings, the head and 1-D gains keep an elementwise optimizer."""

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


def get_lr(step, cfg):
    """Linear warmup to learning_rate, then cosine decay to min_lr at lr_decay_iters (nanoGPT)."""
    if step < cfg.warmup_iters:
        return cfg.learning_rate * (step + 1) / (cfg.warmup_iters + 1)
    if step > cfg.lr_decay_iters:
        return cfg.min_lr
    ratio = (step - cfg.warmup_iters) / max(1, cfg.lr_decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.learning_rate - cfg.min_lr)


def flops_per_token(model, T):
    """Training FLOPs per token (PaLM appendix B, as in nanoGPT): 6N for the matmuls with the
    weights (2 forward, 4 backward) plus 12 L T C for attention's q k^T and att v."""
    c = model.config
    return 6 * model.num_params() + 12 * c.n_layer * T * c.n_embd


PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12, "4090": 165e12}


def measure_peak_flops(device):
    """The MFU denominator: the GPU's stated dense bf16 peak, or on CPU a float32 matmul
    throughput measured here (1024^3 GEMMs), since CPU vendors state no single number."""
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(device)
        return next((v for k, v in PEAK_FLOPS.items() if k in name), None)
    if not device.startswith("cpu"):
        return None
    gen = torch.Generator().manual_seed(0)  # not the training RNG, which a resume restores
    a, b = torch.randn(1024, 1024, generator=gen), torch.randn(1024, 1024, generator=gen)
    a @ b
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * 1024 ** 3 / min(times)


@torch.no_grad()
def estimate_loss(model, folder, cfg, ctx, device, block_size=None, splits=("train", "val")):
    """Mean loss over eval_iters batches per split, in eval mode (no dropout). The batches come
    from their own generator, the same at every evaluation: evaluations compare like with like and
    leave the training RNG untouched (so a resumed run draws the batches it would have drawn)."""
    was_training = model.training
    model.eval()
    out = {}
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


def save_checkpoint(path, model, optimizer, cfg, step, best_val, tokenizer, rng_state=None):
    """Write the checkpoint to a temporary file, then rename it: a crash mid-write never destroys
    the previous checkpoint. The RNG state (by default the current one) makes a resumed CPU run
    continue exactly. model_args and tokenizer let other scripts (06_lora_rlhf.py) rebuild the model
    and its vocabulary on their own."""
    raw = getattr(model, "_orig_mod", model)  # torch.compile wraps the model: save the original
    raw = getattr(raw, "module", raw)  # and DDP wraps it too
    raw = getattr(raw, "_orig_mod", raw)  # DDP(compile(model)): unwrap compile last as well
    ckpt = {
        "model": raw.state_dict(),
        "optimizer": optimizer.state_dict(),
        "config": dataclasses.asdict(cfg),
        "step": step,
        "best_val": best_val,
        "rng": {"torch": torch.get_rng_state() if rng_state is None else rng_state,
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
        "model_args": dataclasses.asdict(raw.config),
        "tokenizer": tokenizer,
    }
    tmp = path + ".tmp"
    torch.save(ckpt, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, cfg, check_model=True):
    """Load a checkpoint saved by this script, refusing one whose model shape differs from `cfg`
    (check_model=False for inference modes, which take the shape from the checkpoint)."""
    if not os.path.exists(path):
        raise UserError(f"no checkpoint at {path} (train first, or check --out_dir)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated file, a pickle from elsewhere, another format
        raise UserError(f"{path} is not a checkpoint this script can read ({e.__class__.__name__}: {e})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise UserError(f"{path} is not a {SCRIPT_NAME}.py checkpoint")
    diff = [f"{k}={ckpt['config'].get(k)!r} (flags say {getattr(cfg, k)!r})"
            for k in MODEL_KEYS if check_model and ckpt["config"].get(k) != getattr(cfg, k)]
    if diff:
        raise UserError(f"{path} was trained with another model config: {', '.join(diff)}")
    return ckpt


def log_jsonl(cfg, record):
    """Append one JSON object (an evaluation) to out_dir/log.jsonl."""
    with open(os.path.join(cfg.out_dir, "log.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")


def model_config(cfg, vocab_size):
    """The GPTConfig that the training flags describe (vocab padded to a multiple of 64)."""
    if cfg.pos not in ("learned", "rope", "alibi") or cfg.attn not in ("sdpa", "manual"):
        raise UserError(f"--pos must be learned|rope|alibi and --attn sdpa|manual (got {cfg.pos!r}, {cfg.attn!r})")
    if cfg.optimizer not in ("adamw", "muon"):
        raise UserError(f"--optimizer must be adamw or muon (got {cfg.optimizer!r})")
    if cfg.n_embd % cfg.n_head or (cfg.n_embd // cfg.n_head) % 2:
        raise UserError(f"--n_embd {cfg.n_embd} must split into --n_head {cfg.n_head} heads of even size")
    padded = vocab_size if vocab_size < 1000 else (vocab_size + 63) // 64 * 64
    return GPTConfig(block_size=cfg.block_size, vocab_size=padded, n_layer=cfg.n_layer, n_head=cfg.n_head,
                     n_embd=cfg.n_embd, dropout=cfg.dropout, bias=cfg.bias, pos=cfg.pos, attn=cfg.attn)


def weights_digest(model):
    """sha256 of every parameter's bytes: equal on all DDP ranks iff their weights are identical."""
    digest = hashlib.sha256()
    for p in model.parameters():
        digest.update(p.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def train(cfg) -> dict:
    rank, local_rank, world_size = setup_ddp()
    master = rank == 0
    device, ctx, scaler = setup_device(cfg, local_rank)
    device_type = device.split(":")[0]
    torch.manual_seed(cfg.seed + rank)
    if cfg.gradient_accumulation_steps % world_size:
        raise UserError(f"--gradient_accumulation_steps {cfg.gradient_accumulation_steps} must be a multiple "
                        f"of the number of ranks ({world_size})")
    grad_accum = cfg.gradient_accumulation_steps // world_size  # each rank does its share
    if master:
        os.makedirs(cfg.out_dir, exist_ok=True)
        folder, meta = prepare_data(cfg)
    if world_size > 1:
        dist.barrier()  # rank 0 has downloaded and tokenized; the others read its cache
    if not master:
        folder, meta = prepare_data(cfg, verbose=False)
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")

    # model: from scratch, from our checkpoint, or from OpenAI's GPT-2 weights
    ckpt, start_step, best_val = None, 0, float("inf")
    if cfg.init_from == "resume":
        ckpt = load_checkpoint(ckpt_path, cfg)
        if ckpt.get("tokenizer") != meta["tokenizer"]:
            raise UserError(f"{ckpt_path} was trained with another tokenizer than --dataset {cfg.dataset}")
        model = GPT(GPTConfig(**ckpt["model_args"]))
        model.load_state_dict(ckpt["model"])
        start_step, best_val = ckpt["step"], ckpt["best_val"]
    elif cfg.init_from == "scratch":
        model = GPT(model_config(cfg, meta["vocab_size"]))
    else:
        if meta["tokenizer"]["kind"] != "gpt2":
            raise UserError(f"--init_from {cfg.init_from} needs a GPT-2-tokenized dataset, not {cfg.dataset}")
        model = GPT.from_pretrained(cfg.init_from, cfg.dropout, os.path.join(cfg.data_dir, "hf"))
        if cfg.block_size < model.config.block_size:
            model.crop_block_size(cfg.block_size)
        c = model.config  # the checkpoint records the shape actually trained, for a later resume
        cfg = dataclasses.replace(cfg, n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd,
                                  block_size=c.block_size, bias=c.bias, pos=c.pos)
    model.grad_ckpt = cfg.grad_ckpt
    model.to(device)
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), device_type,
                                           cfg.optimizer, cfg.muon_lr)
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        if world_size == 1:  # the exact continuation: same batches, same dropout masks
            torch.set_rng_state(ckpt["rng"]["torch"])
            if device_type == "cuda" and ckpt["rng"]["cuda"]:
                torch.cuda.set_rng_state(ckpt["rng"]["cuda"][0], device)
        else:  # one saved state cannot serve several ranks: fresh, still rank-distinct streams
            torch.manual_seed(cfg.seed + rank + 7919 * start_step)
        ckpt = None  # free the memory
    raw_model = model
    if cfg.compile:
        model = torch.compile(model)
    if world_size > 1:
        ids = [local_rank] if device_type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)

    tokens_per_step = cfg.gradient_accumulation_steps * cfg.batch_size * cfg.block_size
    flops_per_step = flops_per_token(raw_model, cfg.block_size) * tokens_per_step
    peak = measure_peak_flops(device) if master else None
    if master:
        print(f"{raw_model.num_params() / 1e6:.2f}M parameters, {tokens_per_step:,} tokens per step, "
              f"{world_size} rank(s) on {device}" + (f", peak {peak / 1e9:.0f} GFLOP/s" if peak else ""))
    rng_state = torch.get_rng_state()  # a checkpoint resumes from the state before its next batch
    X, Y = get_batch(folder, "train", cfg.batch_size, cfg.block_size, device)
    step, last, health, step_times = start_step, {}, {}, []
    t_last = time.perf_counter()
    while True:
        lr = get_lr(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        # evaluate (skipped right after a resume: that state was evaluated before it was saved)
        just_resumed = cfg.init_from == "resume" and step == start_step
        if (step % cfg.eval_interval == 0 or step == cfg.max_iters) and not just_resumed:
            losses = estimate_loss(model, folder, cfg, ctx, device)
            last = {"step": step, "train_loss": losses["train"], "val_loss": losses["val"], "lr": lr, **health}
            if master:
                print(f"step {step}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
                log_jsonl(cfg, last)
                if losses["val"] < best_val or cfg.always_save_checkpoint:
                    best_val = min(best_val, losses["val"])
                    if step > 0:
                        save_checkpoint(ckpt_path, model, optimizer, cfg, step, best_val, meta["tokenizer"],
                                        rng_state)
        if step >= cfg.max_iters:
            break
        for micro in range(grad_accum):
            if world_size > 1:  # all-reduce gradients only on the last micro-batch
                model.require_backward_grad_sync = micro == grad_accum - 1
            with ctx:
                _, loss = model(X, Y)
                loss = loss / grad_accum  # the sum over micro-batches is then the mean
            rng_state = torch.get_rng_state()
            X, Y = get_batch(folder, "train", cfg.batch_size, cfg.block_size, device)  # overlaps the GPU
            (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")  # inf: measure only
        grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), max_norm)
        track = (step + 1) % cfg.eval_interval == 0 or step + 1 == cfg.max_iters  # health for the next eval
        before = None
        if track and master:
            before = [[p.detach().clone() for p in g["params"]] for g in optimizer.param_groups]
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if before is not None:  # update-to-weight ratio ||dW|| / ||W|| per group (healthy near 1e-3)
            ratios = {}
            for name, group, old in zip(("decay", "no_decay", "muon"), optimizer.param_groups, before):
                dw = torch.stack([(p.detach() - b).norm() for p, b in zip(group["params"], old)]).norm()
                w = torch.stack([p.detach().norm() for p in group["params"]]).norm()
                ratios[name] = (dw / w).item()
            health = {"grad_norm": grad_norm.item(), "update_to_weight": ratios}
        step += 1
        if step % cfg.log_interval == 0 and master:
            lossf = loss.item() * grad_accum  # .item() waits for the GPU: only on log steps
            now = time.perf_counter()
            dt = (now - t_last) / cfg.log_interval
            t_last = now
            if step - start_step > cfg.log_interval:  # the first interval includes compilation/warmup
                step_times.append(dt)
            mfu = f", MFU {100 * flops_per_step / dt / peak / world_size:.1f}%" if peak else ""
            eta = (cfg.max_iters - step) * dt
            print(f"step {step}: loss {lossf:.4f}, lr {lr:.2e}, {1000 * dt:.1f} ms/step, "
                  f"{tokens_per_step / dt:,.0f} tok/s{mfu}, ETA {eta / 60:.1f} min")
    result = dict(last, best_val=best_val)
    if step_times:
        ms = 1000 * float(np.median(step_times))
        result.update(median_ms_per_step=ms, gflops_per_s=flops_per_step / ms * 1e3 / 1e9 / world_size)
        if peak:
            result["mfu"] = flops_per_step / (ms / 1e3) / peak / world_size
    digests = [weights_digest(raw_model)]
    if world_size > 1:
        digests = [None] * world_size
        dist.all_gather_object(digests, weights_digest(raw_model))
    if master:
        log_jsonl(cfg, {"final": True, **result, "weights_sha256_per_rank": digests})
        if step_times:
            print(f"median {result['median_ms_per_step']:.1f} ms/step, {result['gflops_per_s']:.1f} GFLOP/s"
                  + (f" = {100 * result['mfu']:.0f}% of the measured peak" if peak else ""))
        encode, decode = make_tokenizer(meta["tokenizer"])
        print_samples(raw_model, encode, decode, cfg, device, ctx)
    if world_size > 1:
        dist.barrier()
        dist.destroy_process_group()
    return result


# --- Evaluation / inference -----------------------------------------------------------------------
def read_prompt(cfg):
    if cfg.prompt.startswith("FILE:"):
        try:
            with open(cfg.prompt[5:], encoding="utf-8") as f:
                return f.read()
        except OSError as e:
            raise UserError(f"--prompt {cfg.prompt}: {e.strerror}") from None
    return cfg.prompt


def print_samples(model, encode, decode, cfg, device, ctx):
    ids = encode(read_prompt(cfg)) or [0]
    idx = torch.tensor([ids] * cfg.num_samples, dtype=torch.long, device=device)  # (B, T0)
    model.eval()
    with ctx:
        out = model.generate(idx, cfg.max_new_tokens, cfg.temperature, cfg.top_k or None, cfg.top_p)
    for row in out.tolist():
        print(f"--- sample ---\n{decode(row)}")


def load_model(cfg, device):
    """The model for the inference modes -> (model, tokenizer meta): our checkpoint (init_from
    resume, the shape read from it) or OpenAI's GPT-2 (init_from gpt2* or a folder)."""
    if cfg.init_from == "resume":
        ckpt = load_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt"), cfg, check_model=False)
        model = GPT(GPTConfig(**ckpt["model_args"]))
        model.load_state_dict(ckpt["model"])
        tokenizer = ckpt["tokenizer"]
    elif cfg.init_from == "scratch":
        raise UserError(f"--mode {cfg.mode} needs a trained model: --init_from resume or gpt2*")
    else:
        model, tokenizer = GPT.from_pretrained(cfg.init_from, 0.0, os.path.join(cfg.data_dir, "hf")), {"kind": "gpt2"}
    return model.to(device).eval(), tokenizer


def eval_data(cfg, tokenizer):
    """The prepared dataset for eval modes, checked to use the model's tokenizer."""
    folder, meta = prepare_data(cfg)
    if meta["tokenizer"] != tokenizer:
        raise UserError(f"--dataset {cfg.dataset} is tokenized differently from the model ({tokenizer['kind']})")
    return folder


def val_loss(model, folder, cfg, ctx, device, block_size=None):
    """Val loss on estimate_loss's fixed batches, so two models (or contexts) compare fairly."""
    return estimate_loss(model, folder, cfg, ctx, device, block_size, splits=("val",))["val"]


def run_eval(cfg, device, ctx):
    model, tokenizer = load_model(cfg, device)
    folder = eval_data(cfg, tokenizer)
    loss = val_loss(model, folder, cfg, ctx, device)
    print(f"val loss {loss:.4f} over {cfg.eval_iters} batches of {cfg.batch_size}x{cfg.block_size}")
    result = {"val_loss": loss}
    if cfg.quantize == "int8":
        before, after = quantize_int8(model)
        q_loss = val_loss(model, folder, cfg, ctx, device)
        print(f"int8: Linear weights {before / 1e6:.3f} MB -> {after / 1e6:.3f} MB ({before / after:.2f}x smaller), "
              f"val loss {q_loss:.4f} ({100 * (q_loss - loss) / loss:+.3f}%)")
        result.update(int8_val_loss=q_loss, bytes_before=before, bytes_after=after)
    elif cfg.quantize != "none":
        raise UserError(f"--quantize must be none or int8, not {cfg.quantize!r}")
    return result


def run_sample(cfg, device, ctx):
    model, tokenizer = load_model(cfg, device)
    if cfg.quantize == "int8":
        quantize_int8(model)
    encode, decode = make_tokenizer(tokenizer)
    torch.manual_seed(cfg.seed)
    print_samples(model, encode, decode, cfg, device, ctx)


def run_extrapolate(cfg, device, ctx):
    """Val loss at 1x, 2x and 4x the training context (Press et al. 2022, §4): learned positions
    stop at block_size; RoPE and ALiBi run on. Also the loss per position at 4x, plotted."""
    model, tokenizer = load_model(cfg, device)
    folder = eval_data(cfg, tokenizer)
    T = model.config.block_size
    result = {"pos": model.config.pos, "block_size": T}
    print(f"pos={model.config.pos}, trained at block_size {T}\n  context  val loss")
    for factor in (1, 2, 4):
        if model.config.pos == "learned" and factor > 1:
            result[f"{factor}x"] = None
            print(f"  {factor}x {factor * T:>5}  n/a (no learned position past {T})")
            continue
        result[f"{factor}x"] = val_loss(model, folder, cfg, ctx, device, factor * T)
        print(f"  {factor}x {factor * T:>5}  {result[f'{factor}x']:.4f}")
    with open(os.path.join(cfg.out_dir, "extrapolate.json"), "w") as f:
        json.dump(result, f)
    # loss at each position, averaged over batches, for the longest context the model can take
    T_long = T if model.config.pos == "learned" else 4 * T
    gen, per_pos = torch.Generator().manual_seed(cfg.seed), torch.zeros(T_long)
    with torch.no_grad():
        for _ in range(cfg.eval_iters):
            X, Y = get_batch(folder, "val", cfg.batch_size, T_long, device, gen)
            with ctx:
                logits, _ = model(X, Y)
            per_pos += F.cross_entropy(logits.float().transpose(1, 2), Y, reduction="none").mean(0).cpu()
    per_pos /= cfg.eval_iters
    save_plot(cfg, "extrapolate.png", range(T_long), per_pos.tolist(), "token position",
              f"val loss (pos={model.config.pos})", f"trained at {T} (dashed)", vline=T)
    return result


def run_landscape(cfg, device, ctx):
    """Loss along theta + alpha d for a random direction d, filter-normalized (Li et al. 2018, §4):
    each row of each weight matrix of d is rescaled to the norm of the same row of theta; biases and
    LayerNorm gains get no perturbation. A sharp valley rises fast, a flat one slowly."""
    model, tokenizer = load_model(cfg, device)
    folder = eval_data(cfg, tokenizer)
    torch.manual_seed(cfg.seed)
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    direction = {}
    for n, p in theta.items():
        d = torch.randn_like(p) if p.dim() >= 2 else torch.zeros_like(p)
        if p.dim() >= 2:  # (rows, cols): one "filter" per row
            d *= p.norm(dim=1, keepdim=True) / (d.norm(dim=1, keepdim=True) + 1e-10)
        direction[n] = d
    alphas = [i / 10 for i in range(-10, 11)]
    losses = []
    for alpha in alphas:
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(theta[n] + alpha * direction[n])
        losses.append(val_loss(model, folder, cfg, ctx, device))
        print(f"alpha {alpha:+.1f}: val loss {losses[-1]:.4f}")
    save_plot(cfg, "landscape.png", alphas, losses, "alpha (step along the direction)", "val loss",
              "1-D loss slice, filter-normalized direction")
    return {"alphas": alphas, "losses": losses}


def save_plot(cfg, name, x, y, xlabel, ylabel, title, vline=None):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"(matplotlib is not installed: pip install matplotlib to get {name})")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(list(x), y)
    if vline is not None:
        ax.axvline(vline, linestyle="--", color="gray")
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    fig.tight_layout()
    path = os.path.join(cfg.out_dir, name)
    fig.savefig(path + ".tmp.png")
    plt.close(fig)
    os.replace(path + ".tmp.png", path)
    print(f"wrote {path}")


def run_bench(cfg, device, ctx):
    """Training speed (ms/step, tokens/s, achieved FLOP/s, MFU) on real batches with a fresh model
    of the configured shape, the activation memory kept for backward, and generation tokens/s
    with and without the KV cache (batch 1, max_new_tokens from a one-token prompt)."""
    folder, meta = prepare_data(cfg)
    torch.manual_seed(cfg.seed)
    model = GPT(model_config(cfg, meta["vocab_size"])).to(device)
    model.grad_ckpt = cfg.grad_ckpt
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2),
                                           device.split(":")[0], cfg.optimizer, cfg.muon_lr)
    fwd = torch.compile(model) if cfg.compile else model
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    saved = {}  # storage -> bytes of the activations autograd keeps for backward (any device)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in weights:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    times = []
    for i in range(25):  # 5 warmup steps, then 20 timed
        X, Y = get_batch(folder, "train", cfg.batch_size, cfg.block_size, device)
        sync()
        t0 = time.perf_counter()
        hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t) if i == 0 else nullcontext()
        with hooks, ctx:
            _, loss = fwd(X, Y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        if i >= 5:
            times.append(time.perf_counter() - t0)
    activation_mb = sum(saved.values()) / 1e6
    if cfg.grad_ckpt:  # checkpoints hold each block's float32 input outside autograd's saved tensors
        activation_mb += cfg.n_layer * cfg.batch_size * cfg.block_size * cfg.n_embd * 4 / 1e6
    ms = 1000 * float(np.median(times))
    tokens = cfg.batch_size * cfg.block_size
    achieved = flops_per_token(model, cfg.block_size) * tokens / (ms / 1e3)
    peak = measure_peak_flops(device)
    mfu = f", MFU {100 * achieved / peak:.1f}% of {peak / 1e9:.0f} GFLOP/s" if peak else ""
    print(f"train: {ms:.1f} ms/step (median of 20), {tokens / ms * 1e3:,.0f} tokens/s, "
          f"{achieved / 1e9:.1f} GFLOP/s{mfu}; activations kept for backward {activation_mb:.1f} MB"
          + (f", peak CUDA memory {torch.cuda.max_memory_allocated(device) / 1e6:.0f} MB" if cuda else ""))
    model.eval()
    result = {"ms_per_step": ms, "tokens_per_s": tokens / ms * 1e3, "flops_per_s": achieved,
              "mfu": achieved / peak if peak else None, "activation_mb": activation_mb}
    for use_cache in (False, True):
        torch.manual_seed(cfg.seed)
        idx = torch.zeros(1, 1, dtype=torch.long, device=device)
        sync()
        t0 = time.perf_counter()
        with ctx:
            model.generate(idx, cfg.max_new_tokens, cfg.temperature, use_cache=use_cache)
        sync()
        key = 'gen_tokens_per_s_' + ('cached' if use_cache else 'uncached')
        result[key] = cfg.max_new_tokens / (time.perf_counter() - t0)
    speedup = result["gen_tokens_per_s_cached"] / result["gen_tokens_per_s_uncached"]
    print(f"generate {cfg.max_new_tokens} tokens at block_size {cfg.block_size}: "
          f"{result['gen_tokens_per_s_uncached']:.3g} tok/s uncached, {result['gen_tokens_per_s_cached']:.3g} tok/s "
          f"with the KV cache ({speedup:.1f}x)")
    return result


# --- main -----------------------------------------------------------------------------------------
def main(argv=None):
    cfg = parse_args(argv)
    try:
        if cfg.mode not in MODES:
            raise UserError(f"--mode must be one of {', '.join(MODES)}, not {cfg.mode!r}")
        if cfg.mode == "train":
            return train(cfg)
        os.makedirs(cfg.out_dir, exist_ok=True)
        device, ctx, _ = setup_device(cfg)
        run = {"sample": run_sample, "eval": run_eval, "bench": run_bench,
               "extrapolate": run_extrapolate, "landscape": run_landscape}[cfg.mode]
        return run(cfg, device, ctx)
    except UserError as e:
        print(f"{SCRIPT_NAME}.py: error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
