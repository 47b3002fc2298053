"""Tests for 03_gpt.py: attention, positions, KV cache, safetensors, int8, learning, CLI, DDP, data, bad input."""
import dataclasses
import io
import json
import math
import os
import re
import struct
import tarfile

import pytest
import torch
import torch.nn as nn

from conftest import load_script, run_script, run_torchrun

TINY = dict(block_size=16, vocab_size=37, n_layer=2, n_head=4, n_embd=32, dropout=0.0, bias=True)


@pytest.fixture(scope="module")
def m():
    return load_script("03_gpt")


@pytest.fixture(autouse=True)
def one_thread():
    """Bit-for-bit repeatable CPU maths (and fair sharing of a 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A local text for the CLI tests (they must run without $LLM_DATA_DIR): 60 KB of random words."""
    import random

    rng = random.Random(0)
    words = "the king and queen of england shall speak to my lord, good sir; what news? I pray you now.".split()
    lines = [" ".join(rng.choice(words) for _ in range(12)).capitalize() for _ in range(1000)]
    path = tmp_path_factory.mktemp("corpus") / "words.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def tiny_gpt(m, **kw):
    torch.manual_seed(0)
    return m.GPT(m.GPTConfig(**{**TINY, **kw}))


# --- attention and positions ------------------------------------------------------------------------
@pytest.mark.parametrize("pos", ["learned", "rope", "alibi"])
def test_manual_attention_equals_sdpa(m, pos):
    sdpa = tiny_gpt(m, pos=pos).double()
    manual = m.GPT(m.GPTConfig(**{**TINY, "pos": pos, "attn": "manual"})).double()
    manual.load_state_dict(sdpa.state_dict())
    idx = torch.randint(37, (3, 16))
    out = []
    for model in (sdpa, manual):
        logits, loss = model(idx, idx)
        loss.backward()
        out.append((logits, [p.grad for p in model.parameters()]))
    torch.testing.assert_close(out[0][0], out[1][0], rtol=1e-10, atol=1e-10)
    for g_sdpa, g_manual in zip(out[0][1], out[1][1]):
        torch.testing.assert_close(g_sdpa, g_manual, rtol=1e-9, atol=1e-10)


def test_rope_dot_product_depends_only_on_offset(m):
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 16, dtype=torch.float64), torch.randn(1, 1, 1, 16, dtype=torch.float64)

    def rotated_dot(pq, pk):
        cq, sq = m.rope_angles(torch.tensor([pq]), 16)
        ck, sk = m.rope_angles(torch.tensor([pk]), 16)
        return (m.apply_rope(q, cq.double(), sq.double()) * m.apply_rope(k, ck.double(), sk.double())).sum().item()

    assert rotated_dot(5, 2) == pytest.approx(rotated_dot(105, 102), rel=1e-6)  # float32 angles
    assert rotated_dot(7, 7) == pytest.approx(rotated_dot(0, 0), rel=1e-6)
    assert rotated_dot(0, 0) == pytest.approx((q * k).sum().item(), rel=1e-12)  # angle 0: identity
    assert rotated_dot(5, 2) != pytest.approx(rotated_dot(5, 3), rel=1e-3)  # but it does see the offset
    c, s = m.rope_angles(torch.tensor([3]), 16)
    assert m.apply_rope(q, c.double(), s.double()).norm().item() == pytest.approx(q.norm().item())  # a rotation


def test_alibi_slopes_and_bias(m):
    assert m.alibi_slopes(8).tolist() == [2.0 ** -i for i in range(1, 9)]
    # not a power of two (the paper's rule): 4 slopes of n=4, then every other slope of n=8
    assert m.alibi_slopes(6).tolist() == pytest.approx([2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8, 2 ** -1, 2 ** -3])
    model = m.GPT(m.GPTConfig(**{**TINY, "n_head": 8, "n_embd": 32, "pos": "alibi"}))
    bias = model._attn_bias(3, 0, "cpu")  # (nh, T, S)
    inf = float("-inf")
    assert bias[0].tolist() == [[0, inf, inf], [-0.5, 0, inf], [-1.0, -0.5, 0]]
    assert bias[7, 2, 0].item() == -2 / 256
    assert model._attn_bias(1, 2, "cpu")[0].tolist() == [[-1.0, -0.5, 0]]  # a cached decode step


@pytest.mark.parametrize("pos", ["learned", "rope", "alibi"])
def test_causal_output_ignores_future_tokens(m, pos):
    model = tiny_gpt(m, pos=pos).eval()
    a = torch.randint(37, (2, 16))
    b = a.clone()
    b[:, 9:] = torch.randint(37, (2, 7))
    la, _ = model(a, a)
    lb, _ = model(b, b)
    torch.testing.assert_close(la[:, :9], lb[:, :9])
    assert not torch.allclose(la[:, 9:], lb[:, 9:])


# --- generation -------------------------------------------------------------------------------------
@pytest.mark.parametrize("pos", ["learned", "rope", "alibi"])
def test_kv_cache_generation_is_token_identical(m, pos):
    model = tiny_gpt(m, pos=pos).eval()
    prompt = torch.randint(37, (2, 5))
    # 20 new tokens from 5 pass block_size 16: the cached path must also handle the sliding window
    for kwargs in (dict(temperature=0), dict(temperature=1.0), dict(temperature=0.8, top_k=10, top_p=0.9)):
        outs = []
        for use_cache in (False, True):
            torch.manual_seed(123)
            outs.append(model.generate(prompt, 20, use_cache=use_cache, **kwargs))
        assert torch.equal(outs[0], outs[1]), (pos, kwargs)
        assert outs[0].shape == (2, 25) and torch.equal(outs[0][:, :5], prompt)
    # the decode step's logits equal the last row of a full forward pass
    caches = [m.KVCache(16) for _ in model.transformer.h]
    model(prompt[:, :4], caches=caches)
    step_logits, _ = model(prompt[:, 4:5], caches=caches, start=4)
    full_logits, _ = model(prompt)
    torch.testing.assert_close(step_logits, full_logits, rtol=1e-5, atol=1e-5)


def test_sample_next_filters(m):
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.9]])
    assert m.sample_next(logits, temperature=0).item() == 1
    torch.manual_seed(0)
    assert {m.sample_next(logits, 1.0, top_k=1).item() for _ in range(20)} == {1}
    assert {m.sample_next(logits, 1.0, top_p=0.01).item() for _ in range(20)} == {1}
    # top-p 0.6: p = softmax = (.02, .48, .07, .43): tokens 1 and 3 hold 0.91 >= 0.6, token 1 alone 0.48
    assert {m.sample_next(logits, 1.0, top_p=0.6).item() for _ in range(200)} == {1, 3}


# --- safetensors and GPT-2 weights ------------------------------------------------------------------
ST_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
            torch.int8: "I8", torch.bool: "BOOL", torch.float64: "F64"}


def write_safetensors(path, tensors, aliases=()):
    """A minimal safetensors writer (the format's spec, independent of the script's reader).
    `aliases` = [(new_name, existing_name)] share the bytes of an existing tensor (a tied weight)."""
    header, chunks, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, t in tensors.items():
        data = t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": ST_NAMES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    for new, old in aliases:
        header[new] = dict(header[old])
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)  # the spec pads the header to 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob + b"".join(chunks))


def test_safetensors_roundtrip(m, tmp_path):
    torch.manual_seed(0)
    tensors = {"a.f32": torch.randn(3, 4), "b.f16": torch.randn(5).half(), "c.bf16": torch.randn(2, 2, 2).bfloat16(),
               "d.i64": torch.arange(-3, 3), "e.i8": torch.tensor([-128, 0, 127], dtype=torch.int8),
               "f.bool": torch.tensor([True, False, True]), "g.f64": torch.randn(2, dtype=torch.float64),
               "h.empty": torch.zeros(0, 3)}
    write_safetensors(tmp_path / "x.safetensors", tensors, aliases=[("tied.f32", "a.f32")])
    back = m.load_safetensors(str(tmp_path / "x.safetensors"))
    assert set(back) == set(tensors) | {"tied.f32"}
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t), name
    assert torch.equal(back["tied.f32"], tensors["a.f32"])
    # a header length larger than the file (an HTML page, a truncated file) is refused, not allocated
    blob = (tmp_path / "x.safetensors").read_bytes()
    (tmp_path / "huge.safetensors").write_bytes(struct.pack("<Q", 1 << 60) + blob[8:])
    with pytest.raises(ValueError, match="larger than the file"):
        m.load_safetensors(str(tmp_path / "huge.safetensors"))
    (tmp_path / "cut.safetensors").write_bytes(blob[:-5])  # the last tensor's bytes are cut off
    with pytest.raises(ValueError, match="lies at bytes"):
        m.load_safetensors(str(tmp_path / "cut.safetensors"))


def write_gpt2_folder(m, folder, std=0.02, **shape):
    """A random GPT-2 in Hugging Face's layout (no `transformer.` prefix, Conv1D weights stored (in, out), the
    causal-mask buffers) as folder/{config.json, model.safetensors} -> (the GPT it holds, its tensors)."""
    shape = {"block_size": 16, "vocab_size": 37, "n_layer": 2, "n_head": 4, "n_embd": 32, **shape}
    torch.manual_seed(0)
    ref = m.GPT(m.GPTConfig(**shape, bias=True, gelu="tanh")).eval()
    with torch.no_grad():  # non-zero biases and LayerNorm parameters, so every tensor matters
        for p in ref.parameters():
            p.copy_(std * torch.randn_like(p) if p.dim() > 1 else p + 0.1 * torch.randn_like(p))
    conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    hf = {name.removeprefix("transformer."): t.t().contiguous() if name.endswith(conv1d) else t
          for name, t in ref.state_dict().items() if name != "lm_head.weight"}
    T = shape["block_size"]
    hf.update({f"h.{i}.attn.bias": torch.ones(1, 1, T, T).tril() for i in range(shape["n_layer"])})
    folder.mkdir(parents=True, exist_ok=True)
    write_safetensors(folder / "model.safetensors", hf)
    hf_config = {k: shape[k] for k in ("vocab_size", "n_layer", "n_head", "n_embd")}
    (folder / "config.json").write_text(json.dumps({"n_positions": T, "n_ctx": T, **hf_config}))
    return ref, hf


def test_from_pretrained_local_gpt2_layout(m, tmp_path):
    ref, _ = write_gpt2_folder(m, tmp_path)
    loaded = m.GPT.from_pretrained(str(tmp_path)).eval()
    idx = torch.randint(37, (2, 16))
    torch.testing.assert_close(loaded(idx, idx)[0], ref(idx, idx)[0], rtol=0, atol=0)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight


def gpt2_reference_logits(hf, idx, n_head):
    """GPT-2's forward written from its equations (Radford et al. 2019 §2.3; Vaswani et al. 2017 §3) on the
    Hugging Face tensors, in float64: token + position embeddings, pre-LN blocks of causal softmax attention and
    an MLP with GELU's tanh form (Hendrycks & Gimpel 2016 §2), a final LayerNorm, the head tied to wte."""
    w = {k: t.double() for k, t in hf.items()}

    def layer_norm(x, name):  # (x - mean) / sqrt(biased var + 1e-5) * g + b
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + 1e-5) * w[name + ".weight"] + w[name + ".bias"]

    def conv1d(x, name):  # GPT-2's Conv1D: x W + b, W stored (in, out)
        return x @ w[name + ".weight"] + w[name + ".bias"]

    def gelu_tanh(x):
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))

    (B, T), C = idx.shape, w["wte.weight"].size(1)
    hd, causal = C // n_head, torch.ones(T, T, dtype=torch.bool).tril()
    x = w["wte.weight"][idx] + w["wpe.weight"][:T]  # (B, T, C)
    for i in range(sum(k.endswith(".ln_1.weight") for k in w)):
        h = f"h.{i}."
        q, k, v = (t.view(B, T, n_head, hd).transpose(1, 2)  # (B, nh, T, hd)
                   for t in conv1d(layer_norm(x, h + "ln_1"), h + "attn.c_attn").split(C, dim=-1))
        att = (q @ k.transpose(-2, -1) / math.sqrt(hd)).masked_fill(~causal, float("-inf")).softmax(-1)
        x = x + conv1d((att @ v).transpose(1, 2).reshape(B, T, C), h + "attn.c_proj")
        x = x + conv1d(gelu_tanh(conv1d(layer_norm(x, h + "ln_2"), h + "mlp.c_fc")), h + "mlp.c_proj")
    return layer_norm(x, "ln_f") @ w["wte.weight"].T  # (B, T, V)


def test_from_pretrained_computes_gpt2(m, tmp_path):
    """Loaded GPT-2 weights run GPT-2's tanh GELU: the logits match its equations to 1e-5 (measured 2e-6), where
    the exact GELU (the default from scratch) is off by 1e-3, at weights large enough to reach GELU's bend."""
    _, hf = write_gpt2_folder(m, tmp_path, std=0.2, n_layer=3)
    loaded = m.GPT.from_pretrained(str(tmp_path)).eval()
    assert loaded.config.gelu == "tanh"
    idx = torch.randint(37, (4, 16), generator=torch.Generator().manual_seed(1))
    expected = gpt2_reference_logits(hf, idx, n_head=4)[:, -1].float()  # (B, V)
    exact = m.GPT(dataclasses.replace(loaded.config, gelu="exact")).eval()
    exact.load_state_dict(loaded.state_dict())
    with torch.no_grad():
        got, off = loaded(idx)[0][:, -1], exact(idx)[0][:, -1]
    assert (got - expected).abs().max() <= 1e-5
    assert (off - expected).abs().max() > 1e-4
    with pytest.raises(ValueError, match="gelu exact.tanh"):
        m.GPT(dataclasses.replace(loaded.config, gelu="relu"))


def test_checkpoint_keeps_the_gelu_form(m, tmp_path, corpus, monkeypatch):
    """Fine-tuning GPT-2 saves gelu="tanh" in model_args (06_lora_rlhf.py reads it too), resume and sample get
    it back, and a checkpoint from before the key existed means the exact form it was trained with."""
    write_gpt2_folder(m, tmp_path / "gpt2", vocab_size=256)  # byte ids (ByteEncoding) fit
    monkeypatch.setattr(m, "gpt2_encoding", ByteEncoding)
    out = tmp_path / "out"
    m.main(["--preset", "tiny", f"--init_from={tmp_path / 'gpt2'}", f"--dataset={corpus}", "--tokenizer=gpt2",
            f"--out_dir={out}", "--max_iters=2", "--eval_interval=2", "--lr_decay_iters=2", "--warmup_iters=1"])
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["model_args"]["gelu"] == "tanh"
    sample = m.Config(out_dir=str(out), init_from="resume", mode="sample")
    assert m.init_model(sample, "cpu")[0].config.gelu == "tanh"
    del ckpt["model_args"]["gelu"]
    torch.save(ckpt, out / "ckpt.pt")
    assert m.init_model(sample, "cpu")[0].config.gelu == "exact"


# --- int8 ---------------------------------------------------------------------------------------------
def test_int8_quantization(m):
    model = tiny_gpt(m, n_embd=64, block_size=16).eval()
    idx = torch.randint(37, (4, 16))
    ref, _ = model(idx, idx)
    lin = model.transformer.h[0].mlp.c_fc
    q = m.Int8Linear(lin)
    assert q.weight.dtype == torch.int8 and q.weight.abs().max().item() == 127
    x = torch.randn(3, 64)
    dequant = q.weight.float() * q.scale[:, None]  # the closed form W ~ s * Q
    torch.testing.assert_close(q(x), x @ dequant.t() + lin.bias, rtol=1e-5, atol=1e-5)
    assert (dequant - lin.weight).abs().max() <= q.scale.max() / 2 + 1e-7  # rounding error <= s/2
    before, after = m.quantize_int8(model)
    assert before / after >= 3.5
    assert sum(isinstance(mod, m.Int8Linear) for mod in model.modules()) == 8  # 4 per block
    out, _ = model(idx, idx)
    # logits within 2% of their spread
    assert (out - ref).abs().max().item() < 0.02 * ref.std().item()


# --- training -----------------------------------------------------------------------------------------
def test_lr_schedule(m):
    cfg = m.Config(learning_rate=1.0, min_lr=0.1, warmup_iters=10, lr_decay_iters=110)
    assert m.get_lr(cfg, 0) == pytest.approx(1 / 11)
    assert m.get_lr(cfg, 10) == pytest.approx(1.0)
    assert m.get_lr(cfg, 60) == pytest.approx(0.55)  # half-way down the cosine
    assert m.get_lr(cfg, 110) == pytest.approx(0.1) and m.get_lr(cfg, 500) == 0.1


def test_newton_schulz_orthogonalizes(m):
    """Five quintic steps bring every singular value of a random wide or tall matrix into about
    [0.7, 1.2] (the coefficients trade exactness for speed), and the singular vectors are kept."""
    torch.manual_seed(0)
    for shape in [(32, 128), (128, 32)]:
        G = torch.randn(*shape, dtype=torch.float64)
        X = m.newton_schulz(G)
        s = torch.linalg.svdvals(X)
        assert 0.6 < s.min() and s.max() < 1.25, s
        U, _, Vh = torch.linalg.svd(G, full_matrices=False)
        assert torch.allclose(U.T @ X @ Vh.T, torch.diag(torch.diag(U.T @ X @ Vh.T)), atol=1e-6)


def test_muon_optimizer(m):
    """The non-Muon groups are exactly torch's AdamW; the Muon group moves each matrix by an
    orthogonalized step of size lr * sqrt(max(1, out/in)) per singular direction."""
    torch.manual_seed(0)
    a, b = nn.Linear(5, 4), nn.Linear(5, 4)
    b.load_state_dict(a.state_dict())
    groups = lambda net: [{"params": [net.weight], "weight_decay": 0.1}, {"params": [net.bias], "weight_decay": 0.0}]
    opt_a = m.Muon(groups(a), lr=1e-2, betas=(0.9, 0.99))
    opt_b = torch.optim.AdamW(groups(b), lr=1e-2, betas=(0.9, 0.99))
    for _ in range(5):
        x = torch.randn(8, 5)
        for net, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            net(x).pow(2).sum().backward()
            opt.step()
    torch.testing.assert_close(a.weight, b.weight)
    torch.testing.assert_close(a.bias, b.bias)
    W = nn.Parameter(torch.randn(64, 16))
    W.grad = torch.randn(64, 16)
    before = W.detach().clone()
    m.Muon([{"params": [W], "muon": True}], lr=0.1).step()
    s = torch.linalg.svdvals(W.detach() - before)
    assert torch.all((s > 0.6 * 0.2) & (s < 1.25 * 0.2)), s  # lr 0.1 * sqrt(64 / 16) = 0.2
    model = m.GPT(m.GPTConfig(block_size=8, vocab_size=16, n_layer=2, n_head=2, n_embd=16))
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), "cpu", "muon", 0.02)
    muon = [g for g in opt.param_groups if g["muon"]][0]
    assert len(muon["params"]) == 2 * 4 and muon["lr_scale"] == pytest.approx(20)  # qkv, proj, fc, proj
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


@pytest.mark.learning
def test_learns_repetitive_text(m, tmp_path, capsys):
    """A tiny model memorizes a repeated 26-letter pattern: from ln(27)=3.3 to below 0.2 (from a
    local file.txt, which also exercises that dataset path)."""
    text = tmp_path / "abc.txt"
    text.write_text("abcdefghijklmnopqrstuvwxyz\n" * 400)
    result = m.main(["--preset", "tiny", f"--dataset={text}", f"--out_dir={tmp_path / 'out'}", "--max_iters=150",
                     "--lr_decay_iters=150", "--learning_rate=1e-2", "--eval_interval=150", "--log_interval=50",
                     "--n_embd=32", "--batch_size=16", "--max_new_tokens=40"])
    assert result["val_loss"] < 0.2, result
    assert "abcdefghijklmnopqrstuvwxyz" in capsys.readouterr().out  # the sample continues the pattern


def read_log(folder):
    return [json.loads(line) for line in open(os.path.join(folder, "log.jsonl"))]


@pytest.mark.learning
def test_cli_end_to_end_and_exact_resume(m, tmp_path, corpus, capsys, monkeypatch):
    """Uninterrupted 20 steps (in-process) == 10 steps + resume to 20 (two CLI runs), with Muon (the
    default preset's optimizer: its momentum and AdamW moments must come back from the checkpoint)."""
    common = ["--preset", "tiny", f"--dataset={corpus}", "--always_save_checkpoint=true", "--lr_decay_iters=20",
              "--dropout=0.1", "--optimizer=muon"]
    full = m.main(common + [f"--out_dir={tmp_path / 'full'}", "--max_iters=20"])
    part = tmp_path / "part"
    r = run_script("03_gpt", *common, f"--out_dir={part}", "--max_iters=10")
    assert r.returncode == 0, r
    assert "--- sample ---" in r.output and "MFU" in r.output
    ckpt = torch.load(part / "ckpt.pt", weights_only=True)
    assert {"model", "optimizer", "config", "step", "best_val", "rng", "model_args", "tokenizer"} <= set(ckpt)
    assert (ckpt["script"], ckpt["stage"], ckpt["step"]) == ("03_gpt", "train", 10)
    assert ckpt["tokenizer"] == {"kind": "char", "chars": "".join(sorted(set(corpus.read_text())))}
    assert not any(k.startswith("_orig_mod") for k in ckpt["model"])
    assert ckpt["model_args"]["n_layer"] == 2 and "transformer.wpe.weight" in ckpt["model"]
    r = run_script("03_gpt", *common, f"--out_dir={part}", "--max_iters=20", "--init_from=resume")
    assert r.returncode == 0, r
    log = read_log(part)
    evals = [rec for rec in log if "final" not in rec]
    assert [rec["step"] for rec in evals] == [0, 10, 20]  # resumed at 10, without evaluating twice
    assert "grad_norm" in evals[-1] and "update_to_weight" in evals[-1]
    assert evals[-1]["val_loss"] == full["val_loss"] and evals[-1]["train_loss"] == full["train_loss"]
    # resuming reads the checkpoint once (at GPT-2 size, with the optimizer's state, it is GBs)
    reads, real_load = [], torch.load
    monkeypatch.setattr(torch, "load", lambda f, *a, **k: reads.append(str(f)) or real_load(f, *a, **k))
    m.main(common + [f"--out_dir={part}", "--max_iters=20", "--init_from=resume"])
    assert reads.count(str(part / "ckpt.pt")) == 1, reads
    monkeypatch.undo()
    # a different shape is refused with a clear message
    with pytest.raises(SystemExit) as e:
        m.main(common + [f"--out_dir={part}", "--init_from=resume", "--n_layer=3"])
    assert e.value.code == 1 and "n_layer=2 (flags say 3)" in capsys.readouterr().err

    # the inference modes on that checkpoint, in-process
    out = dict(preset="tiny", dataset=corpus, out_dir=part, init_from="resume")
    args = [f"--{k}={v}" for k, v in out.items()]
    ev = m.main(args + ["--mode=eval", "--quantize=int8"])
    assert abs(ev["int8_val_loss"] - ev["val_loss"]) < 0.01 * ev["val_loss"]
    assert ev["bytes_before"] > 3.5 * ev["bytes_after"]
    ex = m.main(args + ["--mode=extrapolate"])
    assert ex["1x"] > 0 and ex["2x"] is None  # learned positions stop at block_size
    assert (part / "extrapolate.png").exists()
    ls = m.main(args + ["--mode=landscape", "--eval_iters=1"])
    assert ls["losses"][10] < min(ls["losses"][0], ls["losses"][-1])  # the trained point sits in a valley
    assert (part / "landscape.png").exists()


def test_bench_and_extrapolate_with_alibi(m, tmp_path, corpus):
    args = ["--preset", "tiny", f"--dataset={corpus}", f"--out_dir={tmp_path}", "--pos=alibi", "--max_iters=10",
            "--max_new_tokens=40"]
    plain = m.main(args + ["--mode=bench"])
    b = m.main(args + ["--mode=bench", "--grad_ckpt=true"])
    assert b["ms_per_step"] > 0 and b["gen_tokens_per_s_cached"] > 0
    # checkpointing keeps each block's input instead of every intermediate tensor of the block
    assert 0 < b["activation_mb"] < 0.5 * plain["activation_mb"], (b["activation_mb"], plain["activation_mb"])
    m.main(args)
    ex = m.main(args + ["--init_from=resume", "--mode=extrapolate"])
    assert all(ex[k] is not None and ex[k] < 5 for k in ("1x", "2x", "4x"))


def test_evaluating_more_often_leaves_training_alone(m, tmp_path, corpus):
    """The cpu preset evaluates every 100 steps to draw its loss curve: the same run evaluated every 3 steps
    (and dropout on, Muon) ends with the same weights and val loss as one evaluated only at the end."""
    finals = []
    for every in (20, 3):
        m.main(["--preset", "tiny", f"--dataset={corpus}", f"--out_dir={tmp_path / str(every)}", "--dropout=0.1",
                f"--eval_interval={every}", "--optimizer=muon", "--max_new_tokens=5"])
        finals.append(next(rec for rec in read_log(tmp_path / str(every)) if rec.get("final")))
    assert finals[0]["fingerprints"] == finals[1]["fingerprints"] and finals[0]["val_loss"] == finals[1]["val_loss"]


def png_width(path):
    png = path.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n", path
    return int.from_bytes(png[16:20], "big")


def test_compare_draws_finished_runs_on_one_axis(m, tmp_path, corpus, capsys):
    """The README's two figures come from this path: --mode compare reads each run's log.jsonl (the last run
    from scratch in it) for the loss curves and, once every run has an extrapolate.json, draws val loss
    against context length; the legend holds the flags the runs differ in."""
    pytest.importorskip("matplotlib")
    common = ["--preset", "tiny", f"--dataset={corpus}", "--max_iters=6", "--lr_decay_iters=6", "--eval_interval=3",
              "--max_new_tokens=5"]
    runs = [tmp_path / pos for pos in ("learned", "rope", "alibi")]
    for run in runs:
        m.main(common + [f"--out_dir={run}", f"--pos={run.name}"])
    m.main(common + [f"--out_dir={runs[0]}", "--pos=learned", "--max_iters=3"])  # a rerun appends to its log
    compare = ["--mode=compare", f"--runs={','.join(map(str, runs))}", f"--out_dir={tmp_path / 'fig'}"]
    curves = m.main(compare)
    assert list(curves) == ["--pos=learned --max_iters=3", "--pos=rope --max_iters=6", "--pos=alibi --max_iters=6"]
    assert [[rec["step"] for rec in evals] for evals in curves.values()] == [[0, 3], [0, 3, 6], [0, 3, 6]]
    assert png_width(tmp_path / "fig" / "compare_loss.png") == 900  # 9 in x 100 dpi: README width
    assert not (tmp_path / "fig" / "compare_extrapolate.png").exists()
    for run in runs:
        m.main(common + [f"--out_dir={run}", "--init_from=resume", "--mode=extrapolate"])
    capsys.readouterr()
    m.main(compare)
    assert "--pos=rope --max_iters=6: val loss" in capsys.readouterr().out
    assert png_width(tmp_path / "fig" / "compare_extrapolate.png") == 900
    with pytest.raises(SystemExit) as e:
        m.main(["--mode=compare", f"--runs={runs[1]},{tmp_path / 'nope'}", f"--out_dir={tmp_path / 'fig'}"])
    assert e.value.code == 1 and "no checkpoint at" in capsys.readouterr().err


def test_grad_ckpt_same_gradients(m):
    model = tiny_gpt(m, dropout=0.0).train()
    idx = torch.randint(37, (2, 16))
    grads = []
    for flag in (False, True):
        model.grad_ckpt = flag
        model.zero_grad()
        model(idx, idx)[1].backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


@pytest.mark.ddp
def test_ddp_two_ranks_identical_weights(tmp_path, corpus):
    """Muon, as in the default preset: each rank orthogonalizes the same all-reduced gradients."""
    r = run_torchrun("03_gpt", "--preset", "tiny", f"--dataset={corpus}", f"--out_dir={tmp_path}", "--max_iters=6",
                     "--eval_interval=6", "--gradient_accumulation_steps=2", "--num_samples=1", "--optimizer=muon")
    assert r.returncode == 0, r
    final = [rec for rec in read_log(tmp_path) if rec.get("final")]
    assert len(final) == 1  # rank 0 alone logs
    digests = final[0]["fingerprints"]
    assert len(digests) == 2 and digests[0] == digests[1]
    assert (tmp_path / "ckpt.pt").exists()


# --- data ---------------------------------------------------------------------------------------------
def gpt2_or_skip(data_dir, monkeypatch):
    root = data_dir("tinyshakespeare")
    if not os.environ.get("TIKTOKEN_CACHE_DIR"):
        if not (root / "tiktoken_cache").exists():
            pytest.skip("no offline tiktoken cache")
        monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(root / "tiktoken_cache"))
    return root


@pytest.mark.data
def test_real_shakespeare_char_and_bpe(m, tmp_path, data_dir, monkeypatch):
    root = gpt2_or_skip(data_dir, monkeypatch)
    folder, meta = m.prepare_data(m.Config(data_dir=str(root), out_dir=str(tmp_path)))
    assert (meta["vocab_size"], meta["train_tokens"], meta["val_tokens"]) == (65, 1_003_854, 111_540)
    assert os.path.getsize(os.path.join(folder, "train.bin")) == 2 * 1_003_854
    again, _ = m.prepare_data(m.Config(data_dir=str(root), out_dir=str(tmp_path)))
    assert again == folder  # cached by content
    folder, meta = m.prepare_data(m.Config(data_dir=str(root), out_dir=str(tmp_path), dataset="shakespeare"))
    assert (meta["vocab_size"], meta["train_tokens"], meta["val_tokens"]) == (50257, 301_966, 36_059)  # nanoGPT's
    x, y = m.get_batch(folder, "train", 4, 8, "cpu")
    assert x.shape == (4, 8) and torch.equal(x[:, 1:], y[:, :-1]) and int(x.max()) < 50257


class ByteEncoding:
    """Stands in for tiktoken (one id per UTF-8 byte) so corpus tests run without its vocabulary."""

    def encode_ordinary(self, text):
        return list(text.encode())

    def encode(self, text, allowed_special=()):
        return self.encode_ordinary(text)

    def decode(self, ids):
        return bytes(ids).decode(errors="replace")


def test_download_and_prepare_corpora(m, tmp_path, http_server, monkeypatch, capsys):
    served = tmp_path / "served"
    served.mkdir()
    docs = [f"document {i}: " + "x" * i for i in range(23)]
    with tarfile.open(served / "owt.tar.xz", "w:xz") as tar:
        for i, doc in enumerate(docs):
            data = doc.encode()
            info = tarfile.TarInfo(f"openwebtext-10k/{i:04d}.txt")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    stories = [f"Once upon a time {i}.\n" for i in range(12)]
    (served / "stories.txt").write_text("<|endoftext|>\n".join(stories))
    (served / "input.txt").write_text("hello shakespeare\n" * 50)
    url = http_server(served)
    monkeypatch.setattr(m, "gpt2_encoding", ByteEncoding)
    xz = b"\xfd7zXZ\x00"
    monkeypatch.setitem(m.DATASETS, "owt10k", ("owt/owt.tar.xz", f"{url}/owt.tar.xz", None, xz, "gpt2"))
    monkeypatch.setitem(m.DATASETS, "tinystories", ("ts/stories.txt", f"{url}/stories.txt", None, None, "gpt2"))
    raw = tmp_path / "raw"
    for name, texts in (("owt10k", docs), ("tinystories", stories)):
        folder, meta = m.prepare_data(m.Config(data_dir=str(raw), out_dir=str(tmp_path / "out"), dataset=name))
        val = [t for i, t in enumerate(texts, start=1) if i % 10 == 0]  # every 10th document
        assert meta["documents"] == len(texts)
        assert meta["val_tokens"] == sum(len(t.encode()) + 1 for t in val)  # + <|endoftext|> each
        assert meta["train_tokens"] == sum(len(t.encode()) + 1 for t in texts) - meta["val_tokens"]
        ids = m.np.fromfile(os.path.join(folder, "val.bin"), dtype=m.np.uint16)
        assert ids[-1] == m.GPT2_EOT and bytes(ids[: len(val[0])].tolist()).decode() == val[0]
    assert (raw / "owt" / "owt.tar.xz").exists() and not list(raw.rglob("*.part"))
    # a wrong checksum is refused and leaves nothing behind
    monkeypatch.setitem(m.DATASETS, "shakespeare_char", ("tiny/input.txt", f"{url}/input.txt", "0" * 64, None, "char"))
    with pytest.raises(m.UserError, match="did not send the expected file .sha256"):
        m.prepare_data(m.Config(data_dir=str(raw), out_dir=str(tmp_path / "out")))
    assert not (raw / "tiny").exists() or not list((raw / "tiny").iterdir())
    # offline: nothing answers -> one clear message naming the URL, exit status 1
    closed = "http://127.0.0.1:9/input.txt"  # the discard port: nothing listens there
    monkeypatch.setitem(m.DATASETS, "shakespeare_char", ("none/input.txt", closed, None, None, "char"))
    with pytest.raises(SystemExit) as e:
        m.main(["--preset", "tiny", f"--data_dir={raw}", f"--out_dir={tmp_path / 'out'}"])
    err = capsys.readouterr().err
    assert e.value.code == 1 and "could not download http://127.0.0.1:9/input.txt" in err and "by hand" in err


def test_hf_endpoint_points_downloads_at_a_mirror(m, tmp_path, http_server, monkeypatch):
    """$HF_ENDPOINT (read when downloading, a trailing slash allowed) replaces https://huggingface.co for
    GPT-2's weights and TinyStories: a mirror laid out as the Hub is fetched from, and the model loads."""
    mirror, raw = tmp_path / "mirror", tmp_path / "raw"
    gpt2 = mirror / "openai-community/gpt2/resolve/main"
    ref, _ = write_gpt2_folder(m, gpt2)
    stories = mirror / "datasets/roneneldan/TinyStories/resolve/main/TinyStories-valid.txt"
    stories.parent.mkdir(parents=True)
    stories.write_text("<|endoftext|>\n".join(f"Once upon a time {i}.\n" for i in range(12)))
    monkeypatch.setenv("HF_ENDPOINT", http_server(mirror) + "/")
    cfg = m.Config(data_dir=str(raw), out_dir=str(tmp_path / "out"), init_from="gpt2", mode="sample")
    model = m.init_model(cfg, "cpu")[0]
    for file in ("config.json", "model.safetensors"):
        assert (raw / "hf/gpt2" / file).read_bytes() == (gpt2 / file).read_bytes()
    idx = torch.randint(37, (2, 16))
    torch.testing.assert_close(model(idx, idx)[0], ref(idx, idx)[0], rtol=0, atol=0)
    monkeypatch.setattr(m, "gpt2_encoding", ByteEncoding)
    _, meta = m.prepare_data(m.Config(data_dir=str(raw), out_dir=str(tmp_path / "out"), dataset="tinystories"))
    assert meta["documents"] == 12
    assert (raw / "tinystories/TinyStories-valid.txt").read_bytes() == stories.read_bytes()


def test_download_of_a_proxy_page_is_refused(m, tmp_path, http_server, monkeypatch):
    """A captive portal answers every URL with an HTML page and status 200: the files without a pinned
    checksum (owt10k's .tar.xz, TinyStories' text, GPT-2's weights) are refused, one line, nothing kept."""
    served = tmp_path / "served"
    for name in ("owt.tar.xz", "stories.txt", "gpt2/config.json", "gpt2/model.safetensors"):
        (served / name).parent.mkdir(parents=True, exist_ok=True)
        (served / name).write_text("<!DOCTYPE html><html><body>Please log in to the Wi-Fi</body></html>")
    url = http_server(served)
    monkeypatch.setitem(m.DATASETS, "owt10k", ("owt/owt.tar.xz", f"{url}/owt.tar.xz", None, b"\xfd7zXZ\x00", "gpt2"))
    monkeypatch.setitem(m.DATASETS, "tinystories", ("ts/stories.txt", f"{url}/stories.txt", None, None, "gpt2"))
    monkeypatch.setattr(m, "HF_URL", url + "/{name}/{file}")
    raw, out = tmp_path / "raw", tmp_path / "out"
    for dataset, file, why in (("owt10k", "owt.tar.xz", r"it does not start with b'\xfd7zXZ\x00'"),
                               ("tinystories", "stories.txt", "it is an HTML page")):
        with pytest.raises(m.UserError, match=re.escape(f"{url}/{file} did not send the expected file ({why})")):
            m.prepare_data(m.Config(data_dir=str(raw), out_dir=str(out), dataset=dataset))
    with pytest.raises(m.UserError, match=re.escape("gpt2/config.json did not send the expected file (it is an HTML")):
        m.init_model(m.Config(data_dir=str(raw), out_dir=str(out), init_from="gpt2", mode="sample"), "cpu")
    assert not [p for p in raw.rglob("*") if p.is_file()]  # nothing kept, so a rerun downloads again


def test_foreign_truncated_and_unsafe_checkpoints(m, tmp_path, corpus):
    """Each refused with one `error:` line and exit 1: another script's, another stage's, a truncated
    file, a pickle that would run code; and a GPT-2 folder whose safetensors is not one."""
    base = ["--preset", "tiny", f"--dataset={corpus}", f"--out_dir={tmp_path}", "--init_from=resume"]
    path = tmp_path / "ckpt.pt"
    cases = {"04_bert": "is not a 03_gpt.py train checkpoint (it is: 04_bert pretrain)",
             "stage": "is not a 03_gpt.py train checkpoint (it is: 03_gpt finetune)",
             "cut": "is not a checkpoint this script can read", "pickle": "is not a checkpoint this script can read"}
    for case, text in cases.items():
        if case == "pickle":
            import pickle
            path.write_bytes(pickle.dumps(os.system))  # loading it with weights_only=False would call code
        else:
            torch.save({"script": "04_bert" if case == "04_bert" else "03_gpt",
                        "stage": "pretrain" if case == "04_bert" else "finetune", "model": {}, "config": {}}, path)
            if case == "cut":
                path.write_bytes(path.read_bytes()[:40])
        for mode in ("train", "sample"):
            r = run_script("03_gpt", *base, f"--mode={mode}")
            assert r.returncode == 1 and text in r.output and "Traceback" not in r.output, (case, mode, r)
            assert len([line for line in r.output.splitlines() if "error:" in line]) == 1
    gpt2 = tmp_path / "hf"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"vocab_size": 37, "n_layer": 1, "n_head": 2, "n_embd": 8}))
    (gpt2 / "model.safetensors").write_bytes(b"<!DOCTYPE html><html>not weights</html>")
    r = run_script("03_gpt", "--preset", "tiny", f"--out_dir={tmp_path}", f"--init_from={gpt2}", "--mode=sample")
    assert r.returncode == 1 and "larger than the file" in r.output and "Traceback" not in r.output, r


@pytest.mark.parametrize("flag,text", [
    ("--batch_size=0", "--batch_size must be > 0, not 0"),
    ("--block_size=0", "--block_size must be > 0, not 0"),
    ("--num_samples=0", "--num_samples must be > 0, not 0"),
    ("--temperature=-1", "--temperature must be >= 0, not -1.0"),
    ("--eval_interval=0", "--eval_interval must be > 0, not 0"),
    ("--learning_rate=-1", "--learning_rate must be > 0, not -1.0"),
    ("--learning_rate=nan", "--learning_rate must be > 0, not nan"),
    ("--max_new_tokens=0", "--max_new_tokens must be > 0, not 0"),
    ("--dropout=1", "--dropout must be in [0, 1), not 1.0"),
    ("--top_k=-1", "--top_k must be >= 0, not -1"),
    ("--top_p=0", "--top_p must be in (0, 1], not 0.0"),
    ("--n_head=5", "--n_embd 96 must split into --n_head 5 heads of even size"),
    ("--min_lr=1", "--min_lr 1.0 must not exceed --learning_rate 0.004"),
    ("--pos=sinusoid", "--pos must be one of learned, rope, alibi, not 'sinusoid'"),
    ("--mode=dance", "--mode must be one of train, sample, eval, bench, extrapolate, landscape, compare, not 'd"),
    ("--mode=compare", "--mode compare needs --runs=DIR,DIR,...: the out_dirs of finished runs"),
    ("--quantize=int4", "--quantize must be one of none, int8, not 'int4'"),
    ("--dtype=float8", "--dtype must be one of auto, float32, bfloat16, float16, not 'float8'"),
    ("--dataset=wikipedia", "--dataset 'wikipedia' is neither one of shakespeare_char"),
    ("--nope=1", "unknown flag --nope"),
    ("--n_layer=two", "--n_layer expects int, got 'two'"),
])
def test_bad_flag_values_exit_2_naming_the_flag(m, flag, text, capsys):
    """Refused before any work (the #16 cases: --batch_size=0 trained NaNs and exited 0, --num_samples=0
    was an IndexError, --temperature=-1 sampled silently)."""
    with pytest.raises(SystemExit) as e:
        m.parse_args([flag])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"error: {text}" in err, err


def test_bad_input_at_run_time(m, tmp_path, capsys):
    out = f"--out_dir={tmp_path}"
    for argv, code, text in ((["--preset", "huge"], 2, "unknown preset 'huge'"),
                             (["--mode=sample", out, "--init_from=resume"], 1, "no checkpoint at"),
                             (["--mode=sample", out], 1, "--mode sample needs a trained model"),
                             (["--device=nope", out], 1, "--device nope is not available here"),
                             (["--dataset=missing.txt", out], 1, "--dataset missing.txt: there is no such file"),
                             (["--mode=sample", "--init_from=gpt3", out], 1,
                              "--init_from 'gpt3' is neither scratch, resume, gpt2")):
        with pytest.raises(SystemExit) as e:
            m.main(argv)
        assert e.value.code == code, argv
        assert text in capsys.readouterr().err, argv


def test_help_describes_every_flag(m, capsys):
    with pytest.raises(SystemExit) as e:
        m.parse_args(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "--preset tiny|cpu|nanogpt_cpu|gpu" in out
    assert "--pos=learned" in out and "learned | rope | alibi: how attention knows token order" in out
    assert "--temperature=0.8" in out and "0 = greedy" in out


def test_config_presets_are_valid(m):
    for name in m.PRESETS:
        cfg = m.parse_args(["--preset", name])  # RULES and check_config accept every preset
        assert cfg.n_embd % cfg.n_head == 0 and cfg.min_lr <= cfg.learning_rate, name
    nano = m.Config(**m.PRESETS["nanogpt_cpu"])
    assert (nano.n_layer, nano.n_head, nano.n_embd, nano.block_size, nano.batch_size, nano.max_iters,
            nano.lr_decay_iters, nano.dropout, nano.eval_iters) == (4, 4, 128, 64, 12, 2000, 2000, 0.0, 20)
    gpu = m.Config(**m.PRESETS["gpu"])
    assert gpu.batch_size * gpu.block_size * gpu.gradient_accumulation_steps == 524_288
