"""The GPU tier in one command: every GPU path of the seven scripts, checked in minutes.

    python tests/gpu_check.py            # on a CUDA machine: the `gpu` presets, ~8 minutes on one H100/H200
    python tests/gpu_check.py --cpu      # the same checks, tiny presets on the CPU (gloo, no Triton speed rows)
    python tests/gpu_check.py --memory   # what a CPU can tell: each gpu preset's memory against an 80 GB card
    python tests/gpu_check.py --cpu --compile   # the CPU checks with --compile where the gpu preset turns it on

Per script: the `gpu` preset's model and optimizer built on the device (its shape kept; data, step
counts and the gradient-accumulation count cut down by flags), a few training steps under bfloat16
autocast (and --compile where the preset turns it on) with the loss finite and falling, a checkpoint
saved and resumed, and sampling / decoding / evaluation once. 03 also trains under float16 with the
GradScaler, runs under `torchrun --nproc_per_node=<GPUs>` (NCCL; two gloo ranks with --cpu) to identical
weights, and reports tokens/s, MFU and the KV-cache speed-up; 05 checks its Triton kernel against
F.scaled_dot_product_attention and times it at N = 1k..8k; 07 times its parallel scan against the loop.

Nothing is downloaded: the text comes from $LLM_DATA_DIR/tinyshakespeare when it is there, every other
corpus is a small file this check writes (owt10k, wikitext103, multi30k and the eng-fra pairs are not
needed to exercise the code paths). The scripts run in this process (one torch import); 03's DDP check
runs torchrun. Prints one table `script | check | result | seconds`; exit status 1 if any check failed.
"""
import argparse
import contextlib
import dataclasses
import importlib.util
import io
import json
import math
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ("01_lstm_seq2seq", "02_transformer_mt", "03_gpt", "04_bert", "05_flash_attn", "06_lora_rlhf",
           "07_mamba_moe")
GB = 1e9
CARD_BYTES = 80 * GB


class CheckFailed(Exception):
    pass


# --- running a script --------------------------------------------------------------------------------
def load(name):
    """Import a numbered script by path, once (as tests/conftest.py does)."""
    mod_name = "script_" + name
    if mod_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(mod_name, ROOT / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = module
        spec.loader.exec_module(module)
    return sys.modules[mod_name]


class Run:
    """One gpu_check session: the mode's flags, the work folder, the log and the table's rows."""

    def __init__(self, args):
        self.cpu, self.args = args.cpu, args
        self.device = "cpu" if args.cpu else "cuda"
        self.work = Path(args.work or tempfile.mkdtemp(prefix="gpu_check_"))
        self.work.mkdir(parents=True, exist_ok=True)
        self.log = open(self.work / "gpu_check.log", "w")
        self.rows = []
        self.compile = (not args.cpu) or args.compile  # on the CPU, --compile is a separate option
        self.steps = 3  # optimizer steps before the checkpoint, and again after the resume

    def preset(self):
        return ["--preset", "tiny" if self.cpu else "gpu", f"--device={self.device}"]

    def main(self, script, *argv):
        """script.main(argv) in this process -> (its result, its printed output). A non-zero exit or an
        exception raises CheckFailed with the output's last lines."""
        mod, buf = load(script), io.StringIO()
        argv = [str(a) for a in argv]
        self.log.write(f"\n$ python {script}.py {' '.join(argv)}\n")
        error = None
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            try:
                result = mod.main(argv)
            except SystemExit as e:
                error = f"exit status {e.code}"
            except Exception:
                error = traceback.format_exc()
        out = buf.getvalue()
        self.log.write(out)
        self.log.flush()
        if error:
            tail = "\n".join(out.splitlines()[-6:])
            raise CheckFailed(f"{script}.py {' '.join(argv)}: {error.strip().splitlines()[-1]}\n{tail}")
        return result, out

    def check(self, script, name, fn):
        """Run fn() -> result text; time it; a failure is a row too (and the run goes on)."""
        if self.args.only and not any(s in script for s in self.args.only.split(",")):
            return None
        if self.device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        try:
            result, ok = fn(), True
        except Exception as e:  # CheckFailed, or a bug in this file: either way a FAIL row
            msg = str(e) if isinstance(e, CheckFailed) else traceback.format_exc()
            self.log.write(f"\nFAIL {script} {name}:\n{msg}\n")
            result, ok = "FAIL: " + msg.strip().splitlines()[0][:160], False
        seconds = time.perf_counter() - t0
        self.rows.append((script, name, result, seconds, ok))
        print(f"| {script} | {name} | {result} | {seconds:.1f} |", flush=True)
        torch._dynamo.reset()  # each check compiles its own graphs
        return ok


def progress(output, key="loss"):
    """[(step, loss)] from the progress lines a script printed (`step N ... loss X ... lr ...`)."""
    pattern = rf"step\s+(\d+)\b[^\n]*?[|:,]\s*{key}\s+(nan|inf|-?[0-9.]+(?:e[-+]?\d+)?)[^\n]*\blr\b"
    return [(int(n), float(x)) for n, x in re.findall(pattern, output, re.I)]


def losses(output, key="loss"):
    return [x for _, x in progress(output, key)]


def falling(values, what="loss"):
    """The check every training run must pass: finite losses, the last below the first."""
    if len(values) < 2:
        raise CheckFailed(f"only {len(values)} {what} values printed")
    if not all(math.isfinite(v) for v in values):
        raise CheckFailed(f"non-finite {what}: {values}")
    if not values[-1] < values[0]:
        raise CheckFailed(f"{what} did not fall: {values[0]:.3f} -> {values[-1]:.3f}")
    return f"{what} {values[0]:.3f} -> {values[-1]:.3f}"


def read_log(out_dir):
    path = Path(out_dir) / "log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


# --- data: small files, so that nothing downloads -------------------------------------------------------
WORDS = ("the king and queen of england shall speak to my lord , good sir ; what news ? I pray you now . "
         "o heaven fair lady sweet prince love war night").split()


def shakespeare(run):
    """A data_dir holding tinyshakespeare/input.txt: $LLM_DATA_DIR's copy, else a written stand-in."""
    real = os.environ.get("LLM_DATA_DIR")
    if real and (Path(real) / "tinyshakespeare" / "input.txt").exists():
        return Path(real)
    folder = run.work / "data"
    path = folder / "tinyshakespeare" / "input.txt"
    if not path.exists():
        rng = random.Random(0)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(10)) for _ in range(6000)) + "\n")
    return folder


def eng_fra(run):
    """data_dir/eng-fra/fra.txt: templated English-French pairs, every source twice (Tatoeba's layout)."""
    folder = run.work / "data01"
    path = folder / "eng-fra" / "fra.txt"
    subjects = [("I am", "je suis"), ("he is", "il est"), ("she is", "elle est"), ("we are", "nous sommes"),
                ("you are", "vous êtes"), ("they are", "ils sont"), ("Tom is", "Tom est")]
    adjectives = [("cold", "froid"), ("tired", "fatigué"), ("happy", "heureux"), ("late", "en retard"),
                  ("here", "ici"), ("busy", "occupé"), ("ready", "prêt"), ("sad", "triste"), ("hungry", "affamé"),
                  ("sick", "malade"), ("young", "jeune"), ("rich", "riche"), ("lost", "perdu"), ("alone", "seul")]
    adverbs = [("", ""), ("very ", "très "), ("not ", "pas "), ("so ", "si ")]
    lines = [f"{es} {ea}{en}.\t{fs.capitalize()} {fa}{fn}{end}" for es, fs in subjects for en, fn in adjectives
             for ea, fa in adverbs for end in (".", "\u202f!\tCC-BY 2.0 (France) Attribution")]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def pairs_tsv(run, n=3000):
    """A `source<TAB>target` file for 02's --dataset=tsv:PATH."""
    rng = random.Random(0)
    words = {"Hund": "dog", "Katze": "cat", "Mann": "man", "Frau": "woman", "läuft": "runs", "schläft": "sleeps",
             "spielt": "plays", "isst": "eats"}
    de = list(words)
    lines = []
    for _ in range(n):
        a, b = rng.choice(de[:4]), rng.choice(de[4:])
        lines.append(f"Der {a} {b}.\tThe {words[a]} {words[b]}.")
    path = run.work / "pairs.tsv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def bert_data(run):
    """(corpus file of blank-line separated documents, data_dir with a toy sst2/ in GLUE's layout)."""
    rng = random.Random(0)
    animals, places = ["cat", "dog", "bird", "horse", "fish", "cow"], ["house", "park", "garden", "field", "barn",
                                                                       "river"]
    lines = []
    for d in range(120):
        for j in range(6):
            word = rng.choice(["good", "great", "bad", "awful", "quiet", "small"])
            lines.append(f"the {animals[d % 6]} sat in the {places[(d // 6) % 6]} , it was {word} and step {j} came .")
        lines.append("")
    corpus = run.work / "bert_corpus.txt"
    corpus.write_text("\n".join(lines))
    real = os.environ.get("LLM_DATA_DIR")
    if real and (Path(real) / "sst2" / "train.tsv").exists():
        return corpus, Path(real)
    folder = run.work / "data04"
    (folder / "sst2").mkdir(parents=True, exist_ok=True)
    for split, n in (("train", 600), ("dev", 120)):
        rows = ["sentence\tlabel"]
        for _ in range(n):
            y = rng.randrange(2)
            adj = rng.choice(["good", "great"] if y else ["bad", "awful"])
            rows.append(f"the {rng.choice(animals)} in the {rng.choice(places)} was {adj} . \t{y}")
        (folder / "sst2" / f"{split}.tsv").write_text("\n".join(rows) + "\n")
    return corpus, folder


# --- per script: train, resume, infer ---------------------------------------------------------------------
def train_resume(run, script, common, out, ckpt, key="loss"):
    """The shared pattern: `steps` steps and a checkpoint, then --init_from=resume to twice as many;
    the losses of both runs must be finite and fall. -> (row text, the resumed run's result)."""
    k = run.steps
    _, out1 = run.main(script, *common, f"--out_dir={out}", f"--max_iters={k}")
    if not (Path(out) / ckpt).exists():
        raise CheckFailed(f"no checkpoint {ckpt} after {k} steps")
    result, out2 = run.main(script, *common, f"--out_dir={out}", f"--max_iters={2 * k}", "--init_from=resume")
    resumed = [n for n, _ in progress(out2, key)]
    if not resumed or resumed[0] != k + 1:
        raise CheckFailed(f"the resumed run's first step is {resumed[:1]}, not {k + 1}")
    return falling(losses(out1, key) + losses(out2, key), key) + f", {2 * k} steps, resumed at {k}", result


def schedule(run, script):
    """Flags that fit the learning-rate schedule, evaluation and logging to the check's few steps
    (those of them the script has)."""
    flags = dict(lr_decay_iters=2 * run.steps, warmup_iters=1, eval_interval=run.steps, eval_iters=2, log_interval=1)
    fields = {f.name for f in dataclasses.fields(load(script).Config)}
    return [f"--{k}={v}" for k, v in flags.items() if k in fields]


def dtype_flags(run, script):
    """bfloat16 autocast, and --compile exactly where the script's gpu preset turns it on (on the CPU
    only with --compile: compiling every script there takes minutes)."""
    preset = load(script).PRESETS["gpu"].get("compile", False)
    return ["--dtype=bfloat16", f"--compile={str(bool(run.compile and preset)).lower()}"]


def compiled(run, script):
    return " compiled" if run.compile and load(script).PRESETS["gpu"].get("compile", False) else ""


def check_01(run):
    s, out = "01_lstm_seq2seq", run.work / "01"
    common = [*run.preset(), f"--data_dir={eng_fra(run)}", *dtype_flags(run, s), *schedule(run, s),
              "--always_save_checkpoint", "--beam_size=2", "--heldout_frac=0.1"]
    run.check(s, "train bf16 + resume + test BLEU", lambda: train_resume(run, s, common, out, "ckpt.pt")[0])
    run.check(s, "translate (beam)", lambda: run.main(s, *run.preset(), f"--out_dir={out}", "--mode=translate",
                                                     "--text=I am cold.")[1].strip().splitlines()[-1][:60])


def check_02(run):
    s, out = "02_transformer_mt", run.work / "02"
    common = [*run.preset(), f"--dataset=tsv:{pairs_tsv(run)}", *dtype_flags(run, s), *schedule(run, s),
              "--always_save_checkpoint", "--beam_size=2"]
    if not run.cpu:
        common += ["--max_tokens=4096"]
    run.check(s, f"train bf16{compiled(run, s)} + resume + BLEU",
              lambda: train_resume(run, s, common, out, "ckpt.pt")[0])
    run.check(s, "translate", lambda: run.main(s, *common, f"--out_dir={out}", "--mode=translate",
                                               "--text=Der Hund läuft.")[1].strip().splitlines()[-1][:60])


def gpt_flags(run):
    data = shakespeare(run)
    flags = [*run.preset(), f"--dataset={data / 'tinyshakespeare' / 'input.txt'}", *schedule(run, "03_gpt"),
             "--always_save_checkpoint", "--num_samples=1", "--max_new_tokens=32"]
    return flags + ([] if run.cpu else ["--gradient_accumulation_steps=2", "--eval_iters=2"])


def check_03(run):
    s, out = "03_gpt", run.work / "03"
    common = [*gpt_flags(run), *dtype_flags(run, s)]
    run.check(s, f"train bf16{compiled(run, s)} + resume + sample",
              lambda: train_resume(run, s, common, out, "ckpt.pt")[0])

    def fp16():
        _, text = run.main(s, *gpt_flags(run), "--dtype=float16", "--compile=false", f"--out_dir={run.work / '03h'}",
                           f"--max_iters={2 * run.steps}")
        return falling(losses(text)) + " (float16 autocast, GradScaler)"
    run.check(s, "train fp16 + GradScaler", fp16)
    run.check(s, "sample from checkpoint", lambda: "%d chars" % len(run.main(
        s, *common, f"--out_dir={out}", "--mode=sample", "--init_from=resume")[1].strip()))
    run.check(s, "eval + int8", lambda: "val loss {val_loss:.3f}, int8 {int8_val_loss:.3f}".format(**run.main(
        s, *common, f"--out_dir={out}", "--mode=eval", "--init_from=resume", "--quantize=int8")[0]))
    bench = {}

    def speed():
        flags = [*common, f"--out_dir={run.work / '03b'}", "--mode=bench"]
        bench.update(run.main(s, *flags, *([] if run.cpu else ["--max_new_tokens=256"]))[0])
        mfu = f", MFU {100 * bench['mfu']:.1f}%" if bench.get("mfu") else ", MFU n/a (no peak known)"
        return f"{bench['tokens_per_s']:,.0f} tokens/s{mfu}, {bench['ms_per_step']:.1f} ms/step"
    run.check(s, "gpu preset tokens/s, MFU (bench)", speed)
    run.check(s, "KV-cache speed-up", lambda: "{:.1f}x ({:.0f} vs {:.0f} tokens/s)".format(
        bench["gen_tokens_per_s_cached"] / bench["gen_tokens_per_s_uncached"], bench["gen_tokens_per_s_cached"],
        bench["gen_tokens_per_s_uncached"]))
    n = 2 if run.cpu else torch.cuda.device_count()
    run.check(s, f"torchrun {n} ranks ({'gloo' if run.cpu else 'nccl'}): identical weights", lambda: ddp_03(run, n))


def torchrun(args, nproc, nnodes=1, node_rank=0, port=None, timeout=300):
    """The launcher command a user types: standalone on one machine, or one node of several."""
    where = ["--standalone"] if nnodes == 1 else [f"--nnodes={nnodes}", f"--node_rank={node_rank}",
                                                  "--master_addr=127.0.0.1", f"--master_port={port}"]
    return [sys.executable, "-m", "torch.distributed.run", *where, f"--nproc_per_node={nproc}",
            str(ROOT / "03_gpt.py"), *map(str, args)]


def final_fingerprints(out_dir):
    final = [rec for rec in read_log(out_dir) if rec.get("final")]
    if len(final) != 1:
        raise CheckFailed(f"{len(final)} final records in {out_dir}/log.jsonl (rank 0 alone logs one)")
    return final[0]["fingerprints"]


def ddp_03(run, n):
    out = run.work / "03ddp"
    args = [*gpt_flags(run), "--dtype=bfloat16", "--compile=false", f"--out_dir={out}", f"--max_iters={run.steps}",
            f"--gradient_accumulation_steps={n}", "--device=cuda" if not run.cpu else "--device=cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(torchrun(args, n), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=600)
    run.log.write(f"\n$ torchrun --nproc_per_node={n} 03_gpt.py {' '.join(args)}\n{proc.stdout}")
    if proc.returncode:
        raise CheckFailed(f"torchrun exit {proc.returncode}: " + proc.stdout.strip().splitlines()[-1][:200])
    prints = final_fingerprints(out)
    if len(prints) != n or len(set(prints)) != 1:
        raise CheckFailed(f"fingerprints differ across ranks: {prints}")
    return f"{n} ranks, fingerprint {prints[0]}, " + falling(losses(proc.stdout))


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def multinode_03(work, nnodes=2, nproc=1, timeout=180):
    """03 as `nnodes` machines on 127.0.0.1: one torchrun launcher per node (gloo on the CPU), started
    together, each with --node_rank; -> (outputs, the ranks' final fingerprints)."""
    work = Path(work)
    data = work / "words.txt"
    rng = random.Random(0)
    data.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(1000)) + "\n")
    args = ["--preset", "tiny", "--device=cpu", f"--dataset={data}", f"--out_dir={work / 'out'}", "--max_iters=4",
            "--eval_interval=4", "--eval_iters=1", f"--gradient_accumulation_steps={nnodes * nproc}",
            "--num_samples=1", "--max_new_tokens=8"]
    port, env = free_port(), {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    procs = [subprocess.Popen(torchrun(args, nproc, nnodes, rank, port), cwd=ROOT, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for rank in range(nnodes)]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=timeout)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    codes = [proc.returncode for proc in procs]
    if any(codes):
        raise CheckFailed(f"launchers exited {codes}:\n" + "\n".join(o[-2000:] for o in outputs))
    return outputs, final_fingerprints(work / "out")


def check_04(run):
    s, out = "04_bert", run.work / "04"
    corpus, data = bert_data(run)
    common = [*run.preset(), f"--corpus={corpus}", f"--data_dir={data}", *dtype_flags(run, s), *schedule(run, s),
              "--always_save_checkpoint"]
    if not run.cpu:
        common += ["--gradient_accumulation_steps=1"]
    run.check(s, f"pretrain bf16{compiled(run, s)} + resume",
              lambda: train_resume(run, s, common, out, "pretrain.pt", "mlm_loss")[0])

    def finetune():
        result, text = run.main(s, *common, f"--out_dir={out}", "--mode=finetune", f"--init_from={out / 'pretrain.pt'}",
                                f"--max_iters={2 * run.steps}", "--compile=false")  # as gpu/finetune says
        acc = [rec for rec in read_log(out) if rec.get("mode") == "finetune"][-1].get("acc")
        ce = losses(text, "ce")  # fine-tuning's small learning rate need not lower it in a few steps
        if not ce or not all(map(math.isfinite, ce)):
            raise CheckFailed(f"fine-tuning losses {ce}")
        return f"ce {ce[0]:.3f} -> {ce[-1]:.3f}, SST-2 dev acc {acc:.3f}"
    run.check(s, "finetune + evaluate", finetune)


def check_05(run):
    s, out = "05_flash_attn", run.work / "05"
    impls = "naive,flash" if run.cpu else "naive,triton"
    common = [*run.preset(), "--mode=train", f"--data_dir={shakespeare(run)}", "--dtype=bfloat16", *schedule(run, s),
              f"--attn_impls={impls}"]

    def train():
        text, k = "", run.steps
        _, t1 = run.main(s, *common, f"--out_dir={out}", f"--max_iters={k}")
        _, t2 = run.main(s, *common, f"--out_dir={out}", f"--max_iters={2 * k}", "--init_from=resume")
        if f"step {2 * k}: train loss" not in t2 or "[naive] step 0:" in t2:
            raise CheckFailed("the resumed run did not continue from the checkpoint")
        impl = impls.split(",")[1]
        per = [float(x) for x in re.findall(rf"\[{impl}\] step \d+: loss ([-0-9.naif]+)", t1 + t2)]
        diff = re.search(r"max \|train loss difference\| over \d+ steps = ([-+.e0-9]+)", t2)
        return falling(per, f"{impl} loss") + (f", vs naive {diff.group(1)}" if diff else "")
    run.check(s, f"train {impls} bf16 + resume", train)
    fa = load(s)
    kernel = "flash" if run.cpu else "triton"
    for dtype, tol in (("float32", 1e-5), ("float16", 3e-3), ("bfloat16", 2e-2)):
        if run.cpu and dtype == "float16":
            continue  # CPU half-precision matmuls are not what is checked here
        run.check(s, f"{kernel} fwd+bwd vs SDPA {dtype}", lambda d=dtype, t=tol: kernel_vs_sdpa(run, fa, kernel, d, t))
    sizes = (64, 128) if run.cpu else (1024, 2048, 4096, 8192)
    for causal in (False, True):
        for n in sizes:
            run.check(s, f"TFLOP/s N={n} d=64 {'causal' if causal else 'full'}",
                      lambda n=n, c=causal: kernel_speed(run, fa, kernel, n, c))


def kernel_vs_sdpa(run, fa, kernel, dtype, tol):
    """O, dQ, dK, dV of the kernel and of SDPA, each against float64 SDPA: the kernel within `tol`
    (test_05's tolerances: fp32 1e-5, fp16 3e-3; bf16, which the interpreter cannot run, 2e-2)."""
    n = 128 if run.cpu else 1024
    errors = {}
    for causal in (False, True):
        q, k, v = fa._qkv(2, 4, n, 64, torch.float64, run.device, seed=1)
        do = torch.randn_like(q)
        ref = attention_grads(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal), q, k, v, do)
        dt = getattr(torch, dtype)
        fn = fa.attention_fn(kernel, causal, 64, 64)
        for name, f in ((kernel, fn), ("sdpa", lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal))):
            got = attention_grads(f, *(t.to(dt) for t in (q, k, v, do)))
            rel = max(((a.double() - b).norm() / b.norm()).item() for a, b in zip(got, ref))
            errors[name] = max(errors.get(name, 0.0), rel)
    if not errors[kernel] <= tol:
        raise CheckFailed(f"{kernel} max rel error {errors[kernel]:.1e} > {tol:.0e} (SDPA {errors['sdpa']:.1e})")
    return f"max rel err O,dQ,dK,dV {errors[kernel]:.1e} <= {tol:.0e} (SDPA {errors['sdpa']:.1e})"


def attention_grads(fn, q, k, v, do):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    o = fn(q, k, v)
    return (o, *torch.autograd.grad(o, (q, k, v), do))


def kernel_speed(run, fa, kernel, n, causal):
    """Forward+backward TFLOP/s of the kernel and of SDPA (bfloat16 on CUDA), and their ratio."""
    dtype = torch.float32 if run.cpu else torch.bfloat16
    B, H = (1, 2) if run.cpu else (4, 16)
    q, k, v = fa._qkv(B, H, n, 64, dtype, run.device)
    do = torch.randn_like(q)
    flops = 3.5 * fa.attention_flops(B, H, n, 64, causal)  # fwd + bwd: 2.5x the forward's matmuls
    tflops = []
    for fn in (fa.attention_fn(kernel, causal, 64 if run.cpu else 128, 64),
               lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal)):
        def step():
            q.grad = k.grad = v.grad = None
            fn(q, k, v).backward(do)
        [ms] = fa.time_ms([step], run.device, 3 if run.cpu else 10)
        tflops.append(flops / ms / 1e9)
    return f"{kernel} {tflops[0]:.3g} / SDPA {tflops[1]:.3g} TFLOP/s fwd+bwd = {tflops[0] / tflops[1]:.2f}x"


def check_06(run):
    s, out = "06_lora_rlhf", run.work / "06"
    data = shakespeare(run)
    k = run.steps
    short = [f"--sft_iters={k}", f"--rm_iters={k}", "--ppo_iters=2", f"--dpo_iters={k}", "--n_pairs=64",
             "--n_eval_prompts=16", "--ppo_batch=16", "--ppo_minibatch=8", "--ppo_epochs=1", "--eval_iters=2",
             f"--max_iters={k}", f"--lr_decay_iters={k}", "--warmup_iters=1", "--log_interval=1",
             f"--eval_interval={k}", "--n_samples_shown=1"]
    common = [*run.preset(), f"--data_dir={data}", "--dtype=bfloat16", *short]
    if not run.cpu:  # base=gpt2 needs OpenAI's weights, which nothing here may download: the preset's
        common += ["--base=scratch", "--block_size=128"]  # stages on the scratch char GPT instead

    def all_stages():
        _, text = run.main(s, *common, f"--out_dir={out}", "--mode=all")
        stages = [st for st in ("pretrain", "sft", "rm", "ppo", "dpo") if (out / f"{st}.pt").exists()]
        if len(stages) != 5:
            raise CheckFailed(f"stage checkpoints written: {stages}")
        pre = [float(x) for x in re.findall(r"pretrain step \d+: loss ([-0-9.naif]+)", text)]
        table = re.search(r"^dpo\s+(-?[0-9.]+) \+-", text, re.M)
        return falling(pre, "pretrain loss") + f"; 5 stages; eval: dpo reward {table.group(1) if table else '?'}"
    run.check(s, "all stages bf16 (pretrain, SFT, RM, PPO, DPO) + eval", all_stages)

    def resume_dpo():
        _, text = run.main(s, *common, f"--out_dir={out}", "--mode=dpo", "--init_from=resume", f"--dpo_iters={2 * k}")
        if f"dpo: resuming from step {k}" not in text:
            raise CheckFailed("dpo did not resume from its checkpoint")
        return f"dpo resumed at {k}, to {2 * k}"
    run.check(s, "resume a stage (dpo)", resume_dpo)


def check_07(run):
    s, out = "07_mamba_moe", run.work / "07"
    common = [*run.preset(), "--mode=copy", "--models=mamba,moe", *dtype_flags(run, s), *schedule(run, s),
              "--always_save_checkpoint"]

    def train():
        k = run.steps
        _, t1 = run.main(s, *common, f"--out_dir={out}", f"--max_iters={k}")
        _, t2 = run.main(s, *common, f"--out_dir={out}", f"--max_iters={2 * k}", "--init_from=resume")
        if "from step" not in t2:
            raise CheckFailed("the resumed run did not say `from step`")
        per = {m: [float(x) for x in re.findall(rf"\[{m}\] step \d+: loss ([-0-9.naif]+)", t1 + t2)]
               for m in ("mamba", "moe")}
        return "; ".join(falling(v, f"{m} loss") for m, v in per.items()) + f", resumed at {k}"
    run.check(s, f"copy task mamba+moe bf16{compiled(run, s)} + resume + eval", train)

    def scan():
        lengths = "32,64" if run.cpu else "1024,2048"
        rows = run.main(s, *run.preset(), "--mode=bench", f"--out_dir={run.work / '07b'}",
                        f"--bench_lengths={lengths}")[0]
        worst = max(r["max_abs_diff"] for r in rows)
        if not worst < 1e-3:
            raise CheckFailed(f"parallel scan differs from the loop by {worst:.1e}")
        return ", ".join(f"l={r['l']}: {r['speedup_fwdbwd']:.1f}x" for r in rows) + f" (max |diff| {worst:.1e})"
    run.check(s, "scan speed-up over the loop (fwd+bwd)", scan)


CHECKS = (check_01, check_02, check_03, check_04, check_05, check_06, check_07)


# --- memory: what a CPU can tell about a gpu preset ---------------------------------------------------------
def gpu_models(name, cfg, n_layer):
    """(model, batch of one sequence -> summed output, sequences per micro-batch, trainable fraction, note)
    of a script's gpu preset with `n_layer` layers. Vocabularies a dataset would decide are assumed."""
    m, C = load(name), dataclasses.replace
    if name == "01_lstm_seq2seq":
        V, T = 16000, cfg.max_len  # eng-fra at min_freq: ~15k words a side (assumed)
        model = m.Seq2Seq(V, V, cfg.n_embd, cfg.n_hidden, n_layer, cfg.cell, cfg.attn, cfg.bidirectional, cfg.dropout)
        src = torch.randint(V, (1, T))
        return model, lambda: model(src, torch.tensor([T]), src), cfg.batch_size, 1.0, f"V=16k assumed, T={T}"
    if name == "02_transformer_mt":
        V, T = cfg.vocab_size, 32  # Multi30k sentences: ~32 tokens a side
        model = m.Transformer(V, cfg.d_model, cfg.n_head, n_layer, cfg.d_ff, cfg.dropout, cfg.norm, cfg.pos,
                              cfg.max_rel_dist, cfg.block_size)
        x = torch.randint(V, (1, T))
        return model, lambda: model(x, x), cfg.max_tokens // (2 * T), 1.0, f"{cfg.max_tokens} tokens = {cfg.max_tokens // (2 * T)} pairs of 32+32"
    if name == "03_gpt":
        gc = m.GPTConfig(vocab_size=50304, block_size=cfg.block_size, n_layer=n_layer, n_head=cfg.n_head,
                         n_embd=cfg.n_embd, dropout=cfg.dropout, bias=cfg.bias, pos=cfg.pos, attn=cfg.attn)
        model, x = m.GPT(gc), torch.randint(50304, (1, cfg.block_size))
        return model, lambda: model(x, x)[1], cfg.batch_size, 1.0, f"GPT-2 BPE V=50304, T={cfg.block_size}"
    if name == "04_bert":
        model, x = m.BERT(cfg.vocab_size, n_layer, cfg.n_head, cfg.n_embd, cfg.block_size), torch.randint(100, (1, cfg.max_len))
        return model, lambda: model(x), cfg.batch_size, 1.0, f"T={cfg.max_len}"
    if name == "05_flash_attn":
        model = m.GPT(65, n_layer, cfg.n_head, cfg.n_embd, cfg.block_size, m.attention_fn("sdpa"))
        x = torch.randint(65, (1, cfg.block_size))
        return model, lambda: model(x), cfg.batch_size, 1.0, f"char V=65, T={cfg.block_size}, SDPA for the kernel"
    if name == "06_lora_rlhf":
        model = m.GPT(m.GPTConfig(block_size=1024, vocab_size=50257, n_layer=n_layer, n_head=12, n_embd=768))
        x = torch.randint(50257, (1, cfg.prompt_len + cfg.response_len))
        lora = 2 * 2 * 768 * cfg.lora_r * 12 / 124e6  # q, v adapters: A (r, C) + B (C, r) per layer
        return model, lambda: model(x), cfg.batch_size, lora, f"GPT-2 124M policy, T={cfg.prompt_len + cfg.response_len}, LoRA r={cfg.lora_r}"
    if name == "07_mamba_moe":
        model = m.build_model(C(cfg, n_layer=n_layer), "mamba", cfg.copy_vocab + 4, cfg.copy_len + 2 * cfg.copy_tokens)
        x = torch.randint(cfg.copy_vocab, (1, cfg.copy_len + 2 * cfg.copy_tokens))
        return model, lambda: model(x), cfg.batch_size, 1.0, f"mamba (the largest activations), T={x.shape[1]}"
    raise ValueError(name)


def saved_bytes(fn, model):
    """Bytes autograd keeps for backward during fn() (each storage once, parameters excluded)."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in weights:
            seen[ptr] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        out = fn()
    del out
    return sum(seen.values())


def memory_report():
    """Per gpu preset: parameters (counted on the meta device), weights + gradients + AdamW moments
    (16 bytes per trainable parameter, fp32), and the activations autograd keeps per micro-batch,
    measured with saved-tensor hooks under CPU bfloat16 autocast on 1- and 2-layer copies with one
    sequence, then scaled to the preset's layers and micro-batch."""
    torch.set_num_threads(1)
    print("| script | params | weights+grads+AdamW | activations / micro-batch | total | of 80 GB | assumptions |")
    print("|---|---|---|---|---|---|---|")
    worst = 0.0
    for name in SCRIPTS:
        cfg = load(name).parse_args(["--preset", "gpu"])
        layers = 12 if name == "06_lora_rlhf" else cfg.n_layer  # 06's gpu preset adapts GPT-2 124M
        with torch.device("meta"):
            full = gpu_models(name, cfg, layers)[0]
        n_params = sum(p.numel() for p in full.parameters())
        acts = []
        for n in (1, 2):
            torch.manual_seed(0)
            model, fn, batch, trainable, note = gpu_models(name, cfg, n)
            acts.append(saved_bytes(fn, model))
        per_layer = acts[1] - acts[0]
        activations = batch * (acts[0] - per_layer + layers * per_layer)
        states = n_params * 4 + n_params * trainable * 12
        total = states + activations
        worst = max(worst, total / CARD_BYTES)
        print(f"| {name} | {n_params / 1e6:.1f}M | {states / GB:.2f} GB | {activations / GB:.2f} GB (x{batch}) | "
              f"{total / GB:.2f} GB | {100 * total / CARD_BYTES:.0f}% | {note} |", flush=True)
    return 0 if worst < 1 else 1


# --- main ------------------------------------------------------------------------------------------------
def print_table(rows, title):
    print(f"\n{title}\n\n| script | check | result | seconds |\n|---|---|---|---|")
    for script, name, result, seconds, _ in rows:
        print(f"| {script} | {name} | {result} | {seconds:.1f} |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="tiny presets on the CPU (gloo, no Triton speed rows)")
    parser.add_argument("--compile", action="store_true", help="with --cpu: compile where the gpu preset does")
    parser.add_argument("--memory", action="store_true", help="only the memory table of each gpu preset")
    parser.add_argument("--only", default="", help="comma list of script numbers or names to check (default all)")
    parser.add_argument("--work", default="", help="folder for data, checkpoints and gpu_check.log (default: temp)")
    args = parser.parse_args(argv)
    if args.memory:
        return memory_report()
    if not args.cpu and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; run with --cpu for the CPU version of the checks", file=sys.stderr)
        return 2
    run = Run(args)
    where = "CPU, tiny presets" if args.cpu else f"{torch.cuda.get_device_name()} x {torch.cuda.device_count()}"
    print(f"gpu_check on {where}, torch {torch.__version__}; scripts' output in {run.work / 'gpu_check.log'}\n")
    print("| script | check | result | seconds |\n|---|---|---|---|", flush=True)
    t0 = time.perf_counter()
    for check in CHECKS:
        check(run)
    total = time.perf_counter() - t0
    failed = [r for r in run.rows if not r[4]]
    print_table(run.rows, f"gpu_check ({where}): {len(run.rows) - len(failed)} of {len(run.rows)} checks passed "
                          f"in {total:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
