"""Tests for 05_flash_attn.py: tiled attention == naive attention (values and gradients), online
softmax, block skipping, the Triton kernel under TRITON_INTERPRET=1, the memory measurement (what
autograd saves: linear in N for the tiled version, quadratic for the naive one), the IO formulas,
training with naive vs tiled attention, the CLI, DDP, downloads, checkpoints and bad input."""
import dataclasses
import hashlib
import importlib.util
import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import load_script, run_script, run_torchrun

NAME = "05_flash_attn"


@pytest.fixture(scope="module")
def fa():
    return load_script(NAME)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread, as the subprocesses get (conftest sets OMP_NUM_THREADS=1): these tensors
    are tiny, and a second thread spinning on a shared 2-core machine only burns CPU time."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def make_text(folder, n_words=30000):
    """A small synthetic corpus at <folder>/tinyshakespeare/input.txt (the real one is only read
    when LLM_DATA_DIR is set): random words from a short list, so a tiny model learns fast."""
    rng = random.Random(0)
    words = ["to", "be", "or", "not", "that", "is", "the", "question", "whether", "tis", "nobler"]
    text = "\n".join(" ".join(rng.choice(words) for _ in range(8)) for _ in range(n_words // 8)) + "\n"
    path = folder / "tinyshakespeare" / "input.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return folder


def tiny_cfg(fa, tmp_path, **overrides):
    cfg = fa.Config(**{**fa.PRESETS["tiny"], "out_dir": str(tmp_path / "out"), "data_dir": str(tmp_path / "data")})
    return dataclasses.replace(cfg, **overrides)


def attention_and_grads(fn, q, k, v, do):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    o = fn(q, k, v)
    return (o, *torch.autograd.grad(o, (q, k, v), do))


# --- the reference itself, and the mask semantics ---------------------------------------------------
def test_naive_attention_matches_sdpa_and_mask_semantics(fa):
    torch.manual_seed(0)
    n_q, n_k, d = 20, 33, 16
    q, k, v = torch.randn(2, 3, n_q, d), torch.randn(2, 3, n_k, d), torch.randn(2, 3, n_k, d)
    # bottom-right causal: query i sees keys j <= i + N_k - N_q
    tri = torch.ones(n_q, n_k, dtype=torch.bool).tril(diagonal=n_k - n_q)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=tri)
    assert rel(fa.naive_attention(q, k, v, causal=True), ref) < 1e-6
    assert torch.equal(fa.attention_mask(n_q, n_k, causal=True), tri)
    # the window, written out pair by pair
    off, w = n_k - n_q, 5
    for causal in (True, False):
        want = torch.tensor([[(j <= i + off if causal else j < i + off + w) and j > i + off - w
                              for j in range(n_k)] for i in range(n_q)])
        assert torch.equal(fa.attention_mask(n_q, n_k, causal=causal, window=w), want)
    # a query that sees no key gets 0, not NaN (N_q > N_k, causal)
    out = fa.naive_attention(torch.randn(1, 1, 6, 4), torch.randn(1, 1, 3, 4), torch.randn(1, 1, 3, 4), causal=True)
    assert torch.equal(out[0, 0, :3], torch.zeros(3, 4)) and out.isfinite().all()


def test_attention_mask_is_dense_without_any_constraint(fa):
    """No causal mask, window or layout: still the documented (N_q, N_k) tensor, all True, writable
    (it was (1, N_k): both bounds infinite, so broadcasting left one row); the same for a tile."""
    mask = fa.attention_mask(5, 7)
    assert mask.shape == (5, 7) and mask.dtype == torch.bool and mask.all()
    mask[0, 0] = False
    assert mask.sum() == 34
    assert fa.tile_mask(16, 19, 8, 12, offset=0).shape == (3, 4)
    assert fa.attention_mask(5, 7, layout=torch.tensor([[True, False]]), block_k=4).sum() == 5 * 4


def test_online_softmax(fa):
    torch.manual_seed(0)
    x = torch.randn(4, 7, 100) * 3
    assert torch.allclose(fa.online_softmax(x, chunk=16), torch.softmax(x, -1), atol=1e-7, rtol=1e-6)
    big = torch.tensor([[1e4, -1e4, 0.0, 1e4 - 1.0, -5.0] * 20])
    assert torch.isnan(torch.exp(big) / torch.exp(big).sum(-1, keepdim=True)).any()  # the naive formula fails
    p = fa.online_softmax(big, chunk=3)
    assert p.isfinite().all() and torch.allclose(p, torch.softmax(big, -1), atol=1e-7)
    assert torch.allclose(fa.online_softmax(-big, chunk=8), torch.softmax(-big, -1), atol=1e-7)


# --- tiled == naive -----------------------------------------------------------------------------------
def _layout(n_q, n_k, bq, bk, seed):
    g = torch.Generator().manual_seed(seed)
    layout = torch.rand(-(-n_q // bq), -(-n_k // bk), generator=g) < 0.5
    layout[:, 0] = True  # every query row keeps some key
    return layout


CASES = [  # (N_q, N_k, d, causal, window, layout, block_q, block_k)
    (50, 50, 16, False, None, False, 16, 16),  # N not a multiple of the blocks
    (50, 50, 16, True, None, False, 16, 8),
    (30, 70, 80, True, None, False, 16, 32),  # N_q < N_k (a KV cache), d = 80
    (70, 30, 32, True, None, False, 32, 16),  # N_q > N_k: the first rows see no key
    (45, 61, 80, False, None, False, 8, 16),
    (64, 64, 16, True, 10, False, 16, 16),  # sliding window
    (40, 64, 16, False, 7, False, 16, 16),  # two-sided local window
    (64, 48, 16, False, None, True, 16, 16),  # block-sparse
    (61, 61, 32, True, None, True, 16, 8),  # block-sparse and causal
]


@pytest.mark.parametrize("n_q,n_k,d,causal,window,use_layout,bq,bk", CASES)
def test_flash_equals_naive(fa, n_q, n_k, d, causal, window, use_layout, bq, bk):
    torch.manual_seed(n_q * 100 + n_k)
    q, k, v = torch.randn(2, 2, n_q, d), torch.randn(2, 2, n_k, d), torch.randn(2, 2, n_k, d)
    do = torch.randn(2, 2, n_q, d)
    layout = _layout(n_q, n_k, bq, bk, seed=n_q) if use_layout else None
    mask = fa.attention_mask(n_q, n_k, causal, window, layout, bq, bk)
    ref = attention_and_grads(lambda q, k, v: fa.naive_attention(q, k, v, mask=mask), q, k, v, do)
    got = attention_and_grads(lambda q, k, v: fa.flash_attention(q, k, v, causal, bq, bk, window, layout),
                              q, k, v, do)
    for name, a, b in zip(("O", "dQ", "dK", "dV"), got, ref):
        assert rel(a, b) <= 1e-5, name


def test_flash_gradcheck_float64(fa):
    torch.manual_seed(0)
    q = torch.randn(1, 1, 7, 3, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 1, 9, 3, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 1, 9, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q, k, v: fa.flash_attention(q, k, v, True, 3, 4), (q, k, v))
    layout = torch.tensor([[True, False, True], [True, True, False], [False, True, True]])
    assert torch.autograd.gradcheck(lambda q, k, v: fa.flash_attention(q, k, v, False, 3, 4, 5, layout), (q, k, v),
                                    fast_mode=True)


def test_masked_tiles_are_skipped_not_masked(fa):
    """NaN in the values of a tile no query may see: naive attention (0 * NaN) and any 'compute
    then mask' version turn it into NaN outputs; flash_attention never reads the tile."""
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 64, 16), torch.randn(1, 2, 64, 16), torch.randn(1, 2, 64, 16)
    v_nan = v.clone()
    v_nan[:, :, 48:] = float("nan")  # the last key block, which only the last query block sees
    out = fa.flash_attention(q, k, v_nan, causal=True, block_q=16, block_k=16)
    assert out[:, :, :48].isfinite().all() and out[:, :, 48:].isnan().any()
    assert rel(out[:, :, :48], fa.naive_attention(q, k, v, causal=True)[:, :, :48]) < 1e-6
    assert fa.naive_attention(q, k, v_nan, causal=True)[:, :, :48].isnan().any()
    layout = torch.ones(4, 4, dtype=torch.bool)
    layout[:, 2] = False  # nobody sees keys 32..47
    v_nan = v.clone()
    v_nan[:, :, 32:48] = float("nan")
    out = fa.flash_attention(q, k, v_nan, block_q=16, block_k=16, layout=layout)
    mask = fa.attention_mask(64, 64, layout=layout, block_q=16, block_k=16)
    assert out.isfinite().all() and rel(out, fa.naive_attention(q, k, v, mask=mask)) < 1e-6


def test_flash_bad_inputs(fa):
    q, k = torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 32)
    with pytest.raises(ValueError, match="head dims differ"):
        fa.flash_attention(q, k, k)
    with pytest.raises(ValueError, match="layout must have one entry per tile"):
        fa.flash_attention(q, q, q, block_q=4, block_k=4, layout=torch.ones(3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="block sizes must be positive"):
        fa.flash_attention(q, q, q, block_q=0)


# --- Triton kernel under the interpreter ---------------------------------------------------------------
TRITON_CASES = [  # (N_q, N_k, d, causal, dtype, tolerance); N and d not multiples of the blocks
    (40, 40, 32, True, "float32", 1e-5),
    (20, 37, 80, False, "float32", 1e-5),  # N_q != N_k, d = 80 (padded to 128 inside)
    (37, 20, 16, True, "float32", 1e-5),  # N_q > N_k, causal: rows that see no key
    (33, 33, 16, True, "float16", 3e-3),  # (the interpreter cannot do bfloat16 dot products)
]


def interpreted_errors():
    """Run in a fresh process with TRITON_INTERPRET=1 (the flag must be set before Triton is first
    imported: its own @jit helpers such as tl.max are built at import): relative errors of the
    kernel's O, dQ, dK, dV vs float64 naive attention for each case, printed as JSON."""
    fa = load_script(NAME)
    results = []
    for n_q, n_k, d, causal, dtype, _ in TRITON_CASES:
        torch.manual_seed(n_q + n_k + d)
        q, k, v = (torch.randn(1, 2, n, d, dtype=torch.float64) for n in (n_q, n_k, n_k))
        do = torch.randn(1, 2, n_q, d, dtype=torch.float64)
        ref = attention_and_grads(lambda q, k, v: fa.naive_attention(q, k, v, causal=causal), q, k, v, do)
        dt = getattr(torch, dtype)
        got = attention_and_grads(lambda q, k, v: fa.triton_flash_attention(q, k, v, causal, 16, 16),
                                  q.to(dt), k.to(dt), v.to(dt), do.to(dt))
        results.append([rel(a, b) if a.dtype == dt else float("inf") for a, b in zip(got, ref)])
    try:
        fa.triton_flash_attention(q, k, v, block_q=48)
    except ValueError as e:
        results.append(str(e))
    print(json.dumps(results))


@pytest.fixture(scope="module")
def triton_errors():
    pytest.importorskip("triton", reason="Triton is not installed (pip install triton)")
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import test_05_flash_attn as t; "
            "t.interpreted_errors()")
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", range(len(TRITON_CASES)), ids=[f"{c[0]}x{c[1]}-d{c[2]}-causal{c[3]}-{c[4]}"
                                                                 for c in TRITON_CASES])
def test_triton_kernel_interpreted(triton_errors, case):
    tol = TRITON_CASES[case][-1]
    for name, err in zip(("O", "dQ", "dK", "dV"), triton_errors[case]):
        assert err <= tol, name


def test_triton_rejects_bad_blocks(triton_errors):
    assert "block_q must be a power of two >= 16" in triton_errors[-1]


# --- measurements ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("causal", [False, True])
def test_saved_bytes_linear_for_tiled_quadratic_for_naive(fa, causal):
    """Exact byte counts: naive attention keeps P (B H N^2 float32, plus the N^2 boolean causal
    mask); the tiled version keeps O and L (B H N (d + 1) float32), whatever the tile size."""
    B, H, d, default = 2, 3, 16, fa.parse_args([])
    for n in (64, 128, 320):
        q, k, v = (torch.randn(B, H, n, d, requires_grad=True) for _ in range(3))
        naive = fa.saved_bytes(lambda q, k, v: fa.naive_attention(q, k, v, causal=causal), q, k, v)
        assert naive == B * H * n * n * 4 + (n * n if causal else 0)
        for bq, bk in ((16, 16), (32, 8), (default.block_q, default.block_k)):
            tiled = fa.saved_bytes(lambda q, k, v: fa.flash_attention(q, k, v, causal, bq, bk), q, k, v)
            assert tiled == B * H * n * (d + 1) * 4
    with torch.no_grad():  # nothing is saved without autograd
        assert fa.saved_bytes(lambda q, k, v: fa.naive_attention(q, k, v), q, k, v) == 0


def test_cpu_default_tiles_give_the_64x64_results(fa):
    """The bench's default tiles on the cpu preset (128x128: fewer Python-level tile steps, timed
    with --bench_tiles) add the same terms in another order: outputs within 1e-6 of the old 64x64
    tiles, gradients within 1e-6 relative. --mode train keeps 64x64: T=128 still spans several tiles."""
    cfg = fa.parse_args([])
    assert (cfg.block_q, cfg.block_k) == (128, 128)
    assert (fa.parse_args(["--mode=train"]).block_q, fa.parse_args(["--preset=gpu"]).block_q) == (64, 128)
    torch.manual_seed(0)
    q, k, v, do = (torch.randn(1, 2, 700, 64) for _ in range(4))
    for causal in (True, False):
        new = attention_and_grads(lambda q, k, v: fa.flash_attention(q, k, v, causal, 128, 128), q, k, v, do)
        old = attention_and_grads(lambda q, k, v: fa.flash_attention(q, k, v, causal, 64, 64), q, k, v, do)
        assert (new[0] - old[0]).abs().max() <= 1e-6, causal  # |O| <= 3 here; |dK|, |dV| up to 6
        assert all(rel(a, b) <= 1e-6 for a, b in zip(new, old)), causal


def test_time_ms_alternates_and_bench_tiles(fa, tmp_path, capsys):
    """time_ms calls its functions round-robin (one warm-up round, then `repeats` timed rounds), so
    a load on a shared machine hits all alike; --bench_tiles times tile sizes that way against sdpa."""
    calls = []
    ms = fa.time_ms([lambda: calls.append("a"), lambda: calls.append("b")], "cpu", 3)
    assert calls == ["a", "b"] * 4 and len(ms) == 2 and min(ms) >= 0
    [row] = fa.main(["--preset=tiny", f"--out_dir={tmp_path}", "--bench_sizes=96", "--bench_heads=1",
                     "--bench_tiles=16x16,32x64", "--bench_repeats=2"])
    assert set(row) == {"N", "16x16", "32x64", "sdpa", "max_diff"} and row["N"] == 96
    assert 0 < row["max_diff"] < 1e-6 and min(row["16x16"], row["32x64"], row["sdpa"]) > 0
    out = capsys.readouterr().out
    assert "median of 2 rounds" in out and "32x64 " in out and "(1.00x)" in out


def test_flops_and_io_formulas(fa, tmp_path, capsys):
    assert fa.attention_flops(2, 3, 1024, 64, causal=False) == 4 * 2 * 3 * 1024 ** 2 * 64
    assert fa.attention_flops(2, 3, 1024, 64, causal=True) == 2 * 2 * 3 * 1024 ** 2 * 64
    rows = fa.io_table(tiny_cfg(fa, tmp_path, bench_sizes="1024,4096", bench_head_dim=64, io_sram_kb=192))
    # standard: (4 N d + 4 N^2) * 2 bytes; tiled: B_r = ceil(98304 / 256) = 384 -> 3 query blocks
    assert rows[0]["standard_bytes"] == (4 * 1024 * 64 + 4 * 1024 ** 2) * 2
    assert rows[0]["tiled_bytes"] == (2 * 1024 * 64 + 2 * 1024 * 64 * 3) * 2 == 1048576
    assert rows[1]["standard_bytes"] / rows[1]["tiled_bytes"] > 10
    assert "B_r=384, B_c=64" in capsys.readouterr().out


def test_bench_writes_tables(fa, tmp_path):
    cfg = tiny_cfg(fa, tmp_path, bench_sizes="256", bench_heads=1, block_q=64, block_k=64, accuracy_n=48)
    result = fa.bench(cfg)
    by_impl = {r["impl"]: r for r in result["rows"]}
    assert {"naive", "flash", "sdpa"} <= set(by_impl)
    assert by_impl["naive"]["saved_mib"] * 2**20 == 256 * 256 * 4 + 256 * 256  # P and the causal mask
    assert by_impl["flash"]["saved_mib"] * 2**20 == 256 * (32 + 1) * 4  # O and L
    assert "fwd_bwd_peak_mib" not in by_impl["flash"]  # the CUDA allocator's peak: on a GPU only
    acc = {(a["impl"], a["dtype"]): a for a in result["accuracy"]}
    assert acc[("flash", "float32")]["dQ"] < 1e-5 and acc[("flash", "bfloat16")]["O"] < 2e-2
    text = (tmp_path / "out" / "bench.md").read_text()
    assert "saved for bwd MiB" in text and "| flash | float32 |" in text
    assert json.loads((tmp_path / "out" / "bench.json").read_text())["rows"]
    if importlib.util.find_spec("matplotlib"):  # the README's figure comes from this path
        png = (tmp_path / "out" / "bench.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and int.from_bytes(png[16:20], "big") == 11 * 120  # 11 in at 120 dpi


# --- training -----------------------------------------------------------------------------------------------
def test_interrupted_and_resumed_run_matches(fa, tmp_path):
    make_text(tmp_path / "data")
    common = dict(attn_impls="flash", always_save_checkpoint=True)
    full = fa.train_compare(tiny_cfg(fa, tmp_path / "a", data_dir=str(tmp_path / "data"), **common))["flash"]
    b = tiny_cfg(fa, tmp_path / "b", data_dir=str(tmp_path / "data"), **common)
    fa.train_compare(dataclasses.replace(b, max_iters=10))
    resumed = fa.train_compare(dataclasses.replace(b, init_from="resume"))["flash"]
    assert resumed["losses"] == full["losses"][10:] and resumed["val"] == full["val"]
    assert resumed["weights"] == full["weights"]


@pytest.mark.learning
def test_cli_train_and_resume(fa, tmp_path, capsys):
    make_text(tmp_path / "data")
    out = tmp_path / "out"
    r = run_script(NAME, "--mode=train", "--preset", "tiny", f"--out_dir={out}", f"--data_dir={tmp_path / 'data'}")
    assert r.returncode == 0, r
    assert "naive vs flash: max |train loss difference| over 20 steps" in r.output
    assert (out / "ckpt_naive.pt").exists() and (out / "ckpt_flash.pt").exists()
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    evals = {(rec["impl"], rec["step"]): rec["val_loss"] for rec in log if "impl" in rec}
    # the two curves agree to float32 rounding, and the model learned (val ~ln(16) = 2.8 -> ~2.5)
    assert log[-1]["compare"] == ["naive", "flash"] and log[-1]["max_loss_diff"] <= 1e-4
    assert abs(evals["naive", 20] - evals["flash", 20]) <= 1e-4
    assert evals["flash", 20] < evals["flash", 0] - 0.15  # seeds 0-9, both kernel paths: worst drop 0.256
    fa.main(["--mode=train", "--preset=tiny", f"--out_dir={out}", f"--data_dir={tmp_path / 'data'}",
             "--init_from=resume", "--max_iters=30", "--lr_decay_iters=30"])  # main() is what the CLI runs
    output = capsys.readouterr().out
    assert "[flash] step 30: train loss" in output and "[flash] step 0:" not in output
    assert "over 10 steps" in output


@pytest.mark.ddp
def test_ddp_two_ranks_identical_weights(tmp_path):
    make_text(tmp_path / "data")
    r = run_torchrun(NAME, "--mode=train", "--preset=tiny", f"--out_dir={tmp_path / 'out'}",
                     f"--data_dir={tmp_path / 'data'}", "--max_iters=6", "--eval_interval=3", "--attn_impls=flash",
                     "--gradient_accumulation_steps=2")  # over all ranks: one micro-step each
    assert r.returncode == 0, r
    lines = [line for line in r.output.splitlines() if "weights sha256 per rank:" in line]
    assert len(lines) == 1, r
    for line in lines:
        digests = line.split(":")[-1].split()
        assert len(digests) == 2 and digests[0] == digests[1], line


@pytest.mark.data
def test_real_tinyshakespeare(fa, tmp_path, data_dir):
    root = data_dir("tinyshakespeare")
    cfg = tiny_cfg(fa, tmp_path, data_dir=str(root))
    assert fa.prepare_data(cfg) == 65
    n = 1115394
    assert (tmp_path / "out" / "train.bin").stat().st_size == 2 * int(0.9 * n)
    assert (tmp_path / "out" / "val.bin").stat().st_size == 2 * (n - int(0.9 * n))
    x, y = fa.get_batch(cfg, "val", "cpu")
    assert x.shape == (4, 32) and torch.equal(x[:, 1:], y[:, :-1])


# --- downloads and bad input -------------------------------------------------------------------------
def test_download_from_local_server(fa, tmp_path, http_server, monkeypatch):
    served = make_text(tmp_path / "served") / "tinyshakespeare"
    sha = hashlib.sha256((served / "input.txt").read_bytes()).hexdigest()
    monkeypatch.setattr(fa, "DATA_URL", http_server(served) + "/input.txt")
    monkeypatch.setattr(fa, "DATA_SHA256", "0" * 64)
    cfg = tiny_cfg(fa, tmp_path)
    with pytest.raises(fa.UserError, match="did not send the expected file"):
        fa.prepare_data(cfg)
    target = tmp_path / "data" / "tinyshakespeare" / "input.txt"
    assert not target.exists() and not (target.parent / "input.txt.part").exists()
    monkeypatch.setattr(fa, "DATA_SHA256", sha)
    assert fa.prepare_data(cfg) == len(set((served / "input.txt").read_text()))
    assert target.read_bytes() == (served / "input.txt").read_bytes()


def test_missing_data_offline(fa, tmp_path, monkeypatch, capsys):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(fa, "DATA_URL", f"http://127.0.0.1:{port}/input.txt")
    with pytest.raises(SystemExit) as e:
        fa.main(["--mode=train", "--preset=tiny", f"--out_dir={tmp_path / 'out'}",
                 f"--data_dir={tmp_path / 'empty'}"])
    err = capsys.readouterr().err
    assert e.value.code == 1 and f"could not download http://127.0.0.1:{port}/input.txt" in err
    assert "save it as" in err and "Traceback" not in err


@pytest.mark.parametrize("args,code,message", [
    (["--bogus=1"], 2, "unknown flag --bogus"),
    (["--block_q=x"], 2, "--block_q expects int"),
    (["--mode=nope"], 2, "--mode must be one of bench, io, train"),
    (["--init_from=ckpt.pt"], 2, "--init_from must be one of scratch, resume"),
    (["--block_size=0"], 2, "--block_size must be > 0"),  # was: exit 0 after a run of NaN losses
    (["--batch_size=0"], 2, "--batch_size must be > 0"),  # was: stack expects a non-empty TensorList
    (["--eval_interval=0"], 2, "--eval_interval must be > 0"),  # was: ZeroDivisionError
    (["--learning_rate=-1"], 2, "--learning_rate must be > 0"),
    (["--block_q=0"], 2, "--block_q must be > 0"),
    (["--bench_tiles=64x64,0x8"], 2, "--bench_tiles must list B_rxB_c tiles"),
    (["--window=-1"], 2, "--window must be >= 0"),
    (["--bench_repeats=0"], 2, "--bench_repeats must be > 0"),
    (["--min_lr=0.1"], 2, "--min_lr=0.1 is above --learning_rate=0.001"),
    (["--n_embd=30", "--n_head=4"], 2, "not divisible by --n_head=4"),
    (["--mode=train", "--attn_impls=naive,triton", "--block_q=48"], 2, "powers of two"),
    (["--attn_impls=naive,fast"], 2, "unknown attention implementation 'fast'"),
    (["--attn_impls=naive,sdpa", "--window=8"], 2, "--window works with the naive and flash"),
    (["--mode=io", "--bench_sizes=1,x"], 2, "--bench_sizes must be a comma-separated list"),
    (["--mode=io", "--bench_sizes=64,0"], 2, "--bench_sizes must be a comma-separated list"),
    (["--mode=train", "--init_from=resume"], 1, "no checkpoint at"),
    (["--mode=train", "--block_size=1000000"], 1, "--block_size=1000000 is longer than the"),
])
def test_bad_input(fa, tmp_path, capsys, args, code, message):
    make_text(tmp_path / "data")
    with pytest.raises(SystemExit) as e:
        fa.main(["--preset=tiny", f"--out_dir={tmp_path / 'out'}", f"--data_dir={tmp_path / 'data'}", *args])
    out, err = capsys.readouterr()
    assert e.value.code == code and message in err, err
    assert err.count("error:") == 1 and "Traceback" not in out + err


def test_gradient_accumulation_counts_all_ranks(fa, tmp_path, capsys, monkeypatch):
    """As nanoGPT: each of W ranks does gradient_accumulation_steps / W micro-steps; a count that
    does not divide is refused before any process group or data is set up."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as e:
        fa.main(["--mode=train", "--preset=tiny", "--gradient_accumulation_steps=3", f"--out_dir={tmp_path / 'out'}",
                 f"--data_dir={tmp_path / 'empty'}"])
    err = capsys.readouterr().err
    assert e.value.code == 1 and "--gradient_accumulation_steps=3 counts micro-steps over all ranks" in err


def test_help_names_every_flag_with_its_meaning(fa, capsys):
    with pytest.raises(SystemExit) as e:
        fa.parse_args(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "--preset=cpu" in out
    assert "--attn_impls=naive,flash" in out and "implementations trained one after the other" in out
    assert "over all ranks" in out and "--block_q=128" in out and "B_r: query rows per tile" in out


def test_foreign_truncated_and_unsafe_checkpoints_are_refused(fa, tmp_path, capsys):
    """Each refused with one line, before anything loads: another script's checkpoint (03's, which
    used to fail with Missing key(s) "wte.weight"), a truncated file and a pickle that runs code."""
    make_text(tmp_path / "data")
    out = tmp_path / "out"
    out.mkdir()
    ckpt = out / "ckpt_flash.pt"
    args = ["--mode=train", "--preset=tiny", "--attn_impls=flash", "--init_from=resume", f"--out_dir={out}",
            f"--data_dir={tmp_path / 'data'}"]
    torch.save({"script": "03_gpt", "stage": "train", "model": {"wte.weight": torch.zeros(2, 2)},
                "config": {"n_layer": 1}, "step": 0}, ckpt)
    with pytest.raises(SystemExit) as e:
        fa.main(args)
    err = capsys.readouterr().err
    assert e.value.code == 1 and "is not a 05_flash_attn.py" in err and "it is: 03_gpt train" in err
    assert err.count("error:") == 1 and "Traceback" not in err
    torch.save({"script": "05_flash_attn"}, ckpt)
    ckpt.write_bytes(ckpt.read_bytes()[:40])  # truncated
    with pytest.raises(fa.UserError, match="is not a checkpoint this script can read"):
        fa.load_checkpoint(str(ckpt))

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))
    torch.save({"script": "05_flash_attn", "x": Evil()}, ckpt)
    with pytest.raises(fa.UserError, match="is not a checkpoint this script can read"):
        fa.load_checkpoint(str(ckpt))
    assert not (tmp_path / "pwned").exists()


def test_resume_refuses_another_model(fa, tmp_path, capsys):
    make_text(tmp_path / "data")
    base = ["--mode=train", "--preset=tiny", "--attn_impls=flash", "--max_iters=2", "--eval_interval=2",
            f"--out_dir={tmp_path / 'out'}", f"--data_dir={tmp_path / 'data'}"]
    fa.main(base)
    with pytest.raises(SystemExit) as e:
        fa.main([*base, "--init_from=resume", "--n_embd=64"])
    assert e.value.code == 1 and "was trained with another model config: n_embd=32" in capsys.readouterr().err
