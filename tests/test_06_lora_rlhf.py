"""Tests for 06_lora_rlhf.py: LoRA, the 03_gpt.py checkpoint and GPT-2 safetensors readers, the RLHF
losses against hand-computed values, small learning tests, the CLI end to end, resume, DDP, bad input."""
import gzip
import importlib.util
import json
import math
import os
import pickle
import re
import shutil
import struct
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import load_script, run_script, run_torchrun

NAME = "06_lora_rlhf"


@pytest.fixture(scope="module")
def m():
    return load_script(NAME)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small models on a shared 2-core machine: one intra-op thread is faster and repeatable."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_gpt(m, seed=0, **kw):
    torch.manual_seed(seed)
    args = dict(block_size=16, vocab_size=11, n_layer=2, n_head=2, n_embd=16, dropout=0.0, bias=True)
    args.update(kw)
    return m.GPT(m.GPTConfig(**args))


def fake_corpus(folder):
    """A small English-like tinyshakespeare stand-in, so CLI tests need no real data."""
    words = ("the king shall come to thee and I will speak of love and war my lord good night sweet "
             "prince what is this now say you so o heaven fair lady").split()
    g = torch.Generator().manual_seed(0)
    lines = [" ".join(words[i] for i in torch.randint(len(words), (9,), generator=g).tolist()) for _ in range(1500)]
    path = folder / "tinyshakespeare" / "input.txt"
    path.parent.mkdir(parents=True)
    path.write_text("\n".join(lines) + "\n")
    return folder


# --- LoRA -------------------------------------------------------------------------------------
def test_lora_linear_fresh_grads_merged(m):
    torch.manual_seed(0)
    base = nn.Linear(8, 6)
    w0, b0 = base.weight.detach().clone(), base.bias.detach().clone()
    lora = m.LoRALinear(base, r=2, alpha=4.0)
    x = torch.randn(5, 8)
    assert torch.equal(lora(x), F.linear(x, w0, b0))  # B = 0: a fresh adapter is the base layer
    assert lora.scaling == 2.0
    opt = torch.optim.SGD([lora.lora_A, lora.lora_B], lr=0.1)
    target = torch.randn(5, 6)
    for _ in range(5):
        opt.zero_grad()
        F.mse_loss(lora(x), target).backward()
        assert base.weight.grad is None and base.bias.grad is None  # only LoRA parameters learn
        assert lora.lora_A.grad is not None and lora.lora_B.grad is not None
        opt.step()
    assert torch.equal(base.weight, w0)
    trained = lora(x)
    expected = F.linear(x, w0 + 2.0 * lora.lora_B @ lora.lora_A, b0)  # W + (alpha / r) B A
    torch.testing.assert_close(trained, expected)
    merged = lora.merged_linear()
    assert isinstance(merged, nn.Linear) and torch.equal(base.weight, w0)  # the LoRALinear is untouched
    torch.testing.assert_close(merged(x), trained)
    lora.enabled = False
    assert torch.equal(lora(x), F.linear(x, w0, b0))


def test_apply_lora_disable_adapters_save_load(m, tmp_path):
    model = tiny_gpt(m)
    idx = torch.randint(11, (3, 10))
    ref = model(idx)
    m.apply_lora(model, ("attn.q_proj", "v_proj"), r=4, alpha=8.0)  # a full name, or its end (as peft)
    wrapped = {n for n, mod in model.named_modules() if isinstance(mod, m.LoRALinear)}
    assert wrapped == {f"transformer.h.{i}.attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    torch.testing.assert_close(model(idx), ref)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, m.LoRALinear):
                layer.lora_B.normal_()
    adapted = model(idx)
    assert not torch.allclose(adapted, ref)
    with m.disable_adapters(model):
        torch.testing.assert_close(model(idx), ref)  # the reference policy without a second copy
    torch.testing.assert_close(model(idx), adapted)
    torch.save(m.lora_state_dict(model), tmp_path / "a.pt")
    assert set(torch.load(tmp_path / "a.pt", weights_only=True)) == {f"{n}.lora_{x}" for n in wrapped for x in "AB"}
    other = m.apply_lora(tiny_gpt(m), ("q_proj", "v_proj"), r=4, alpha=8.0)
    other.load_state_dict(torch.load(tmp_path / "a.pt", weights_only=True), strict=False)
    torch.testing.assert_close(other(idx), adapted)
    torch.testing.assert_close(m.merge_lora(other)(idx), adapted, atol=1e-5, rtol=1e-5)
    assert not any(isinstance(mod, m.LoRALinear) for mod in other.modules())
    both = m.apply_lora(tiny_gpt(m), ("c_proj",))  # the end of two names: attention's and the MLP's
    assert sum(isinstance(mod, m.LoRALinear) for mod in both.modules()) == 4
    with pytest.raises(ValueError, match="valid targets: attn.c_proj, attn.k_proj, attn.q_proj"):
        m.apply_lora(tiny_gpt(m), ("attn.query",))


# --- Model and checkpoint formats --------------------------------------------------------------
def tanh_gelu(a):
    """GELU's tanh approximation, which GPT-2 computes (Hendrycks & Gimpel 2016, sec. 2)."""
    return 0.5 * a * (1 + torch.tanh(math.sqrt(2 / math.pi) * (a + 0.044715 * a ** 3)))


def naive_gpt_logits(sd, idx, n_head, conv1d=False, prefix="transformer.", gelu=F.gelu):
    """A GPT-2 forward written from the fused-qkv weights with an explicit masked softmax."""
    W = (lambda name: sd[name].t()) if conv1d else (lambda name: sd[name])  # Conv1D stores (in, out)
    B, T = idx.shape
    x = sd[prefix + "wte.weight"][idx] + sd[prefix + "wpe.weight"][:T]
    C = x.size(-1)
    n_layer = 1 + max(int(k[len(prefix):].split(".")[1]) for k in sd if k.startswith(prefix + "h."))
    ln = lambda x, p: F.layer_norm(x, (C,), sd[p + ".weight"], sd[p + ".bias"])  # noqa: E731
    for i in range(n_layer):
        h = f"{prefix}h.{i}."
        qkv = ln(x, h + "ln_1") @ W(h + "attn.c_attn.weight").t() + sd[h + "attn.c_attn.bias"]
        q, k, v = (t.view(B, T, n_head, C // n_head).transpose(1, 2) for t in qkv.split(C, -1))
        att = q @ k.transpose(-1, -2) / math.sqrt(C // n_head)
        att = att.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf")).softmax(-1)
        y = (att @ v).transpose(1, 2).reshape(B, T, C)
        x = x + y @ W(h + "attn.c_proj.weight").t() + sd[h + "attn.c_proj.bias"]
        a = ln(x, h + "ln_2") @ W(h + "mlp.c_fc.weight").t() + sd[h + "mlp.c_fc.bias"]
        x = x + gelu(a) @ W(h + "mlp.c_proj.weight").t() + sd[h + "mlp.c_proj.bias"]
    return ln(x, prefix + "ln_f") @ sd[prefix + "wte.weight"].t()


def nanogpt_state_dict(n_layer=2, C=16, V=11, T=16, seed=0):
    """A state dict named exactly as nanoGPT / 03_gpt.py names it (fused c_attn), random values."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: 0.2 * torch.randn(*s, generator=g)  # noqa: E731
    sd = {"transformer.wte.weight": r(V, C), "transformer.wpe.weight": r(T, C),
          "transformer.ln_f.weight": 1 + r(C), "transformer.ln_f.bias": r(C)}
    for i in range(n_layer):
        h = f"transformer.h.{i}."
        sd.update({h + "ln_1.weight": 1 + r(C), h + "ln_1.bias": r(C), h + "ln_2.weight": 1 + r(C),
                   h + "ln_2.bias": r(C), h + "attn.c_attn.weight": r(3 * C, C), h + "attn.c_attn.bias": r(3 * C),
                   h + "attn.c_proj.weight": r(C, C), h + "attn.c_proj.bias": r(C),
                   h + "mlp.c_fc.weight": r(4 * C, C), h + "mlp.c_fc.bias": r(4 * C),
                   h + "mlp.c_proj.weight": r(C, 4 * C), h + "mlp.c_proj.bias": r(C)})
    sd["lm_head.weight"] = sd["transformer.wte.weight"]
    return sd


def test_reads_03_gpt_checkpoint_and_matches_naive_forward(m, tmp_path):
    sd = nanogpt_state_dict()
    ckpt = {"script": "03_gpt", "stage": "train", "model": sd, "optimizer": {}, "config": {}, "step": 5,
            "best_val": 1.0, "rng": {},
            "model_args": dict(block_size=16, vocab_size=11, n_layer=2, n_head=2, n_embd=16, dropout=0.0,
                               bias=True, pos="learned", attn_impl="sdpa"),
            "tokenizer": {"kind": "char", "chars": "abcdefghij "}}
    torch.save(ckpt, tmp_path / "ckpt.pt")
    model, tok = m.gpt_from_checkpoint(torch.load(tmp_path / "ckpt.pt", weights_only=True))
    assert model.config.gelu == "exact"  # no gelu key: 03 saved it before the key existed, with the erf form
    idx = torch.randint(11, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), naive_gpt_logits(sd, idx, 2), atol=1e-5, rtol=1e-5)
        tanh = m.gpt_from_checkpoint({**ckpt, "model_args": {**ckpt["model_args"], "gelu": "tanh"}})[0]
        assert tanh.config.gelu == "tanh"  # 03's model loaded from GPT-2 files
        torch.testing.assert_close(tanh(idx), naive_gpt_logits(sd, idx, 2, gelu=tanh_gelu), atol=1e-5, rtol=1e-5)
        # KV-cache sampling path == full forward: prefill 5 tokens, then one at a time
        cache = [{} for _ in model.transformer.h]
        steps = [model(idx[:, :5], cache)] + [model(idx[:, t:t + 1], cache) for t in range(5, 12)]
        torch.testing.assert_close(torch.cat(steps, 1), model(idx), atol=1e-5, rtol=1e-5)
    assert m.make_tokenizer(tok).decode([0, 10, 1]) == "a b"
    for bad in ({"pos": "rope"}, {"gelu": "erf"}):
        with pytest.raises(m.UserError, match="learned absolute positions only, with the exact or tanh GELU"):
            m.gpt_from_checkpoint({**ckpt, "model_args": {**ckpt["model_args"], **bad}})
    # --base reads it through load_checkpoint(script="03_gpt"): a checkpoint of another script is refused
    run = SimpleNamespace(cfg=m.Config(base=str(tmp_path / "ckpt.pt")), device="cpu", tok=None)
    torch.testing.assert_close(m.load_base(run)(idx), model(idx))
    assert run.tok.decode([0, 10, 1]) == "a b"
    torch.save({**ckpt, "script": m.SCRIPT_NAME, "stage": "pretrain"}, tmp_path / "ours.pt")
    run.cfg.base = str(tmp_path / "ours.pt")
    with pytest.raises(m.UserError, match=r"is not a 03_gpt.py checkpoint \(it is: 06_lora_rlhf pretrain\)"):
        m.load_base(run)


def write_safetensors(path, tensors):
    """The safetensors layout written by hand: u64 header size, JSON header, raw little-endian bytes."""
    names = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, t in tensors.items():
        raw = t.contiguous().view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    head = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head + b"".join(blobs))


def gpt2_hf_tensors():
    """A tiny GPT-2 in Hugging Face's layout: no "transformer." prefix, Conv1D (in, out) weights."""
    conv1d = ("c_attn.weight", "c_proj.weight", "c_fc.weight")
    hf = {k.removeprefix("transformer."): v.t().contiguous() if k.endswith(conv1d) else v
          for k, v in nanogpt_state_dict(n_layer=1, C=64, V=11, T=8).items() if k != "lm_head.weight"}
    return {**hf, "h.0.attn.bias": torch.ones(1, 1, 8, 8)}


def test_safetensors_reader_and_gpt2_conversion(m, tmp_path):
    tensors = {"a": torch.randn(3, 4), "b": torch.randn(5).half(), "c": torch.randn(2, 2).bfloat16()}
    write_safetensors(tmp_path / "x.safetensors", tensors)
    got = m.load_safetensors(tmp_path / "x.safetensors")
    assert set(got) == set(tensors) and all(torch.equal(got[k], tensors[k]) for k in tensors)
    hf = gpt2_hf_tensors()
    write_safetensors(tmp_path / "gpt2.safetensors", hf)
    # a header length past the end of the file (an HTML page, a cut download) is refused, not allocated
    (tmp_path / "bad.safetensors").write_bytes(struct.pack("<Q", 1 << 60) + b"{}")
    with pytest.raises(m.UserError, match="header length 1152921504606846976 exceeds the file"):
        m.load_safetensors(tmp_path / "bad.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(struct.pack("<Q", 4) + b"<htm")
    with pytest.raises(m.UserError, match="header is not JSON"):
        m.load_safetensors(tmp_path / "bad.safetensors")
    model, tok = m.gpt_from_checkpoint(m.gpt2_checkpoint(tmp_path / "gpt2.safetensors"))
    assert tok == {"kind": "gpt2"} and model.config.n_head == 1 and model.config.gelu == "tanh"
    idx = torch.randint(11, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # GPT-2 with GELU's tanh approximation, as trained; the exact erf form is another model
        got = model(idx)[:, -1]
        want = naive_gpt_logits(hf, idx, 1, conv1d=True, prefix="", gelu=tanh_gelu)[:, -1]
        erf = naive_gpt_logits(hf, idx, 1, conv1d=True, prefix="")[:, -1]
    assert (got - want).abs().max() <= 1e-5 < (got - erf).abs().max()


# --- Hand-computed values ----------------------------------------------------------------------
def test_losses_gae_kl_hand_values(m):
    # Bradley-Terry: -log sigma(1 - 0) = log(1 + e^-1)
    assert m.bradley_terry_loss(torch.tensor([1.0, 2.0]), torch.tensor([0.0, 2.0])).item() == \
        pytest.approx((math.log1p(math.exp(-1)) + math.log(2)) / 2, abs=1e-6)
    # DPO: beta [(-1 - -1.5) - (-2 - -1.5)] = 0.5 * 1.0 = 0.5; loss log(1 + e^-0.5)
    loss, margin, acc = m.dpo_loss(torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([-1.5]),
                                   torch.tensor([-1.5]), beta=0.5)
    assert loss.item() == pytest.approx(0.474077, abs=1e-6)
    assert margin.item() == pytest.approx(0.5) and acc.item() == 1.0
    # GAE, gamma 0.9, lambda 0.5, rewards (0, 0, 1), values (0.5, 0.2, 0.4):
    # deltas: d2 = 1 - 0.4 = 0.6; d1 = 0 + 0.9*0.4 - 0.2 = 0.16; d0 = 0 + 0.9*0.2 - 0.5 = -0.32
    # A2 = 0.6; A1 = 0.16 + 0.45*0.6 = 0.43; A0 = -0.32 + 0.45*0.43 = -0.1265
    adv, ret = m.gae(torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[0.5, 0.2, 0.4]]), gamma=0.9, lam=0.5)
    torch.testing.assert_close(adv, torch.tensor([[-0.1265, 0.43, 0.6]]))
    torch.testing.assert_close(ret, torch.tensor([[0.3735, 0.63, 1.0]]))
    # PPO clip, eps 0.2. ratio 1.1, A = 1 -> -1.1 (inside); ratio 1.5, A = 1 -> -1.2 (clipped);
    # ratio 0.5, A = -1 -> max(0.5, 0.8) = 0.8 (clipped); ratio 1.5, A = -1 -> max(1.5, 1.2) = 1.5
    ratios, advs = torch.tensor([1.1, 1.5, 0.5, 1.5]), torch.tensor([1.0, 1.0, -1.0, -1.0])
    for r, a, want in zip(ratios, advs, (-1.1, -1.2, 0.8, 1.5)):
        loss, _ = m.ppo_policy_loss(torch.log(r)[None], torch.zeros(1), a[None], 0.2)
        assert loss.item() == pytest.approx(want, abs=1e-6)
    _, clipfrac = m.ppo_policy_loss(torch.log(ratios), torch.zeros(4), advs, 0.2)
    assert clipfrac.item() == 0.75
    # clipped value loss: old 0, new 1, return 1, clip 0.2 -> 0.5 max(0, (0.2 - 1)^2) = 0.32
    assert m.ppo_value_loss(torch.tensor([1.0]), torch.tensor([0.0]), torch.tensor([1.0]), 0.2).item() == \
        pytest.approx(0.32)
    # KL: pi = (0.5, 0.5), ref = (0.25, 0.75): exact 0.5 ln 2 + 0.5 ln(2/3); k1 at token 0 = ln 2
    pi, ref = torch.tensor([[[0.5, 0.5]]]).log(), torch.tensor([[[0.25, 0.75]]]).log()
    assert m.kl_exact(pi, ref).item() == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(2 / 3), abs=1e-6)
    assert m.kl_k1(pi[..., 0], ref[..., 0]).item() == pytest.approx(math.log(2), abs=1e-6)
    assert m.true_reward("aXe!") == 0.5 and m.true_reward("") == 0.0


# --- Learning ----------------------------------------------------------------------------------
@pytest.mark.learning
def test_reward_model_separates_trivial_pairs(m):
    torch.manual_seed(0)
    rm = m.RewardModel(tiny_gpt(m))
    prompts = torch.randint(3, 11, (64, 4))
    chosen = torch.cat([torch.randint(3, 11, (64, 3)), torch.ones(64, 1, dtype=torch.long)], 1)  # ends in 1
    rejected = torch.cat([torch.randint(3, 11, (64, 3)), torch.full((64, 1), 2)], 1)  # ends in 2
    opt = torch.optim.AdamW(rm.parameters(), lr=3e-3)
    for _ in range(80):  # 40 steps left the worst of 10 seeds at 0.047, against the bar of 0.05
        loss = m.bradley_terry_loss(rm(torch.cat([prompts, chosen], 1)), rm(torch.cat([prompts, rejected], 1)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05
    test_p = torch.randint(3, 11, (32, 4))
    with torch.no_grad():
        acc = (rm(torch.cat([test_p, chosen[:32]], 1)) > rm(torch.cat([test_p, rejected[:32]], 1))).float().mean()
    assert acc == 1.0


@pytest.mark.learning
def test_ppo_raises_reward_for_emitting_tokens(m):
    torch.manual_seed(0)
    model = tiny_gpt(m)
    nn.init.normal_(model.transformer.wte.weight, std=0.3)  # logits as spread as a trained model's
    policy = m.apply_lora(model, ("attn.q_proj", "attn.v_proj", "mlp.c_fc", "mlp.c_proj"), r=4, alpha=8.0)
    value_head = nn.Linear(16, 1)
    params = [p for p in policy.parameters() if p.requires_grad] + list(value_head.parameters())
    opt = torch.optim.Adam(params, lr=3e-2)

    def step(loss, optimizer):
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    score = lambda seq: (seq[:, 4:] < 4).float().mean(1)  # noqa: E731  reward: emit tokens 0-3
    prompts = torch.randint(11, (32, 4))
    rewards = []
    for _ in range(12):
        batch = m.ppo_rollout(policy, value_head, prompts, 6, score, kl_coef=0.01)
        rewards.append(batch["score"].mean().item())
        stats = m.ppo_update(policy, value_head, batch, opt, step, epochs=4, minibatch=16)
    # one rollout's reward is noisy: the bar is on the mean of the last three (seeds 0-9, both kernel
    # paths: untrained worst 0.458, trained worst 0.802)
    assert rewards[0] < 0.55 and sum(rewards[-3:]) / 3 > 0.65, rewards
    assert batch["kl"].mean() > 0.1 and 0 <= stats["clipfrac"] <= 1


@pytest.mark.learning
def test_dpo_raises_margin(m):
    torch.manual_seed(0)
    model = tiny_gpt(m)
    nn.init.normal_(model.transformer.wte.weight, std=0.3)  # logits as spread as a trained model's
    policy = m.apply_lora(model, ("attn.q_proj", "attn.v_proj"), r=4, alpha=8.0)
    p, w, l = torch.randint(11, (16, 4)), torch.randint(11, (16, 6)), torch.randint(11, (16, 6))
    opt = torch.optim.Adam([q for q in policy.parameters() if q.requires_grad], lr=3e-2)
    margins = []
    for _ in range(25):  # 15 left the worst of 10 seeds at 1.08, against the bar of 1.0
        seq = torch.cat([torch.cat([p, w], 1), torch.cat([p, l], 1)])
        with torch.no_grad(), m.disable_adapters(policy):
            ref_w, ref_l = m.response_logprobs(policy, seq, 4)[0].sum(1).chunk(2)
        logp_w, logp_l = m.response_logprobs(policy, seq, 4)[0].sum(1).chunk(2)
        loss, margin, _ = m.dpo_loss(logp_w, logp_l, ref_w, ref_l, beta=0.5)
        margins.append(margin.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert margins[0] == pytest.approx(0.0, abs=1e-6) and margins[-1] > 1.0, margins


# --- CLI, resume, DDP, bad input ---------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One `--mode all --preset tiny` run on the fake corpus: (result, out_dir, data_dir). Tests that
    change its files work on a copy (see `copy_run`)."""
    root = tmp_path_factory.mktemp("tiny_run")
    data, out = fake_corpus(root / "data"), root / "out"
    return run_script(NAME, "--mode", "all", "--preset", "tiny", f"--out_dir={out}", f"--data_dir={data}"), out, data


def copy_run(tiny_run, dest):
    shutil.copytree(tiny_run[1], dest)
    return dest


STAGES = ("pretrain", "sft_full", "sft", "rm", "ppo", "dpo")


def test_cli_all_tiny_then_resume_a_stage(m, tiny_run, tmp_path):
    r, out, data = tiny_run
    assert r.returncode == 0, r
    assert "held-out pairwise accuracy" in r.output and "true reward" in r.output
    for stage in ("base", "sft", "ppo", "dpo"):
        assert re.search(rf"^{stage}\s+0\.\d+ \+- 0\.\d+", r.output, re.M), r
    for f in ("sft_adapter.pt", "ppo_reward_vs_kl.png", "log.jsonl"):
        assert (out / f).exists(), f
    if importlib.util.find_spec("matplotlib"):  # --mode all's figure: PPO curves and every stage's reward
        png = (out / "rlhf.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">I", png[16:20])[0] == 1200
        assert len(png) <= 150_000 and "wrote" in r.output
    cfg = m.parse_args(["--preset", "tiny"])
    for stage in STAGES + ("prefs",):  # every file says which script and stage wrote it
        ckpt = m.load_checkpoint(str(out / f"{stage}.pt"), cfg, stage)
        assert ckpt["script"] == NAME and ckpt["stage"] == stage
    args = m.load_checkpoint(str(out / "pretrain.pt"), cfg, "pretrain")["model_args"]
    assert args["pos"] == "learned" and args["gelu"] == "exact"  # 06's own char GPT keeps the exact GELU
    adapter = torch.load(out / "sft_adapter.pt", weights_only=True)
    assert adapter and all(".lora_" in k for k in adapter)  # only the adapters ship
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in records} == set(STAGES) | {"eval"}
    sft = next(r for r in records if r["stage"] == "sft")
    assert sft["trainable"] == 2 * 2 * 32 * 8 and 0 < sft["trainable_frac"] < 0.1  # q, v: A (r, C) + B (C, r)
    out = copy_run(tiny_run, tmp_path / "out")
    r = run_script(NAME, "--mode", "dpo", "--preset", "tiny", "--init_from=resume", "--dpo_iters=14",
                   f"--out_dir={out}", f"--data_dir={data}")
    assert r.returncode == 0, r
    assert "dpo: resuming from step 10" in r.output and "dpo step 14" in r.output
    assert "sft step" not in r.output and "rm step" not in r.output  # earlier stages are loaded
    assert m.load_checkpoint(str(out / "dpo.pt"), cfg, "dpo")["step"] == 14
    # a finished stage trained with other flags is refused, not reused under the new flags' name
    r = run_script(NAME, "--preset", "tiny", "--init_from=resume", "--dpo_beta=0.5", f"--out_dir={out}",
                   f"--data_dir={data}")
    assert r.returncode == 1 and "Traceback" not in r.output, r
    assert re.search(r"dpo\.pt was trained with --dpo_beta 2\.0, not 0\.5: delete it to train dpo again", r.output), r


def test_interrupted_and_resumed_equals_uninterrupted(m, tmp_path):
    data = fake_corpus(tmp_path / "data")
    common = ["--preset", "tiny", f"--data_dir={data}", "--lr_decay_iters=8", "--eval_interval=4"]

    def run(out, *extra):
        m.train(m.parse_args(common + [f"--out_dir={out}", *extra]))
        return torch.load(os.path.join(out, "pretrain.pt"), weights_only=True)

    for d in "ab":
        (tmp_path / d).mkdir()
    whole = run(tmp_path / "a", "--mode=pretrain", "--max_iters=8")
    run(tmp_path / "b", "--mode=pretrain", "--max_iters=4")
    resumed = run(tmp_path / "b", "--mode=pretrain", "--max_iters=8", "--init_from=resume")
    assert resumed["step"] == 8 and resumed["best_val"] == whole["best_val"]
    assert all(torch.equal(whole["model"][k], resumed["model"][k]) for k in whole["model"])
    # the same for a LoRA stage: SFT 4 + 4 steps == SFT 8 steps
    sft = ["--max_iters=8", "--sft_compare_full=false"]
    run(tmp_path / "a", "--mode=sft", "--sft_iters=8", *sft)
    run(tmp_path / "b", "--mode=sft", "--sft_iters=4", *sft)
    run(tmp_path / "b", "--mode=sft", "--sft_iters=8", "--init_from=resume", *sft)
    a, b = (torch.load(tmp_path / d / "sft.pt", weights_only=True) for d in "ab")
    assert b["step"] == 8 and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert b["metrics"]["val_loss"] == a["metrics"]["val_loss"]


def test_stage_checkpoints_keep_the_gelu_form(m, tmp_path):
    """A stage saves its GELU form and resumes with it, whatever form the model it is rebuilt from has;
    a stage checkpoint without the key was written when 06 had only the exact form."""
    cfg = m.Config(out_dir=str(tmp_path), init_from="resume")
    run = SimpleNamespace(cfg=cfg, path=lambda stage: str(tmp_path / f"{stage}.pt"), rank=0, world_size=1,
                          master=True, barrier=lambda: None)
    model, idx = tiny_gpt(m), torch.randint(11, (2, 8))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    m.fit(run, "sft", model, opt, 1, lambda step: {})  # nothing to resume: one step, then saved
    assert torch.load(run.path("sft"), weights_only=True)["gelu"] == "exact"
    for saved, want in (({"gelu": "tanh"}, "tanh"), ({}, "exact")):
        m.save_checkpoint(run.path("sft"), model, opt, cfg, 1, 1.0, "sft", metrics={}, **saved)
        m.fit(run, "sft", model, opt, 1, None)  # resumed at its last step: nothing to train
        with torch.no_grad():
            assert model.config.gelu == want and torch.equal(model(idx), tiny_gpt(m, gelu=want)(idx))


@pytest.mark.ddp
def test_ddp_two_ranks_identical_weights(tmp_path):
    data = fake_corpus(tmp_path / "data")
    r = run_torchrun(NAME, "--mode", "all", "--preset", "tiny", f"--out_dir={tmp_path / 'out'}",
                     f"--data_dir={data}", "--n_pairs=32", "--n_eval_prompts=8")
    assert r.returncode == 0, r
    by_stage = {}
    for rank, stage, h in re.findall(r"rank (\d) (\w+) fingerprint ([0-9a-f]{16})", r.output):
        by_stage.setdefault(stage, {})[rank] = h
    assert set(by_stage) == set(STAGES), r
    for stage, ranks in by_stage.items():
        assert set(ranks) == {"0", "1"} and ranks["0"] == ranks["1"], (stage, ranks)


def fails(m, capsys, *argv, code=1):
    """main(argv) must exit with `code` and one `error:` line, no traceback -> that line."""
    with pytest.raises(SystemExit) as e:
        m.main(list(argv))
    err = capsys.readouterr().err
    assert e.value.code == code, err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_bad_flags(m, tmp_path, capsys):
    def bad(*argv, code=2):
        return fails(m, capsys, *argv, f"--out_dir={tmp_path / 'o'}", f"--data_dir={tmp_path / 'd'}", code=code)

    assert "unknown flag --lora_rank" in bad("--lora_rank=4")
    assert "--lora_r expects int" in bad("--lora_r=four")
    err = bad("--lora_targets=attn.query")
    assert "--lora_targets: unknown LoRA target attn.query" in err and "attn.q_proj" in err and "mlp.c_fc" in err
    assert "--mode must be one of" in bad("--mode=grpo")
    assert "--n_embd=96 must be a multiple of --n_head=5" in bad("--n_head=5")
    for flag in ("--batch_size=0", "--eval_interval=0", "--learning_rate=-1", "--ppo_minibatch=0", "--lora_r=0",
                 "--dpo_beta=0", "--rm_holdout=1", "--lora_dropout=-0.1", "--n_eval_prompts=0", "--sft_top_frac=2",
                 "--gamma=1.5", "--prefs=hh", "--init_from=ckpt.pt", "--dtype=float8"):
        assert flag.split("=")[0] in bad(flag), flag
    assert "--prompt_len + --response_len = 80 exceeds --block_size 64" in bad("--prompt_len=48")
    assert f"no checkpoint at {tmp_path / 'missing.pt'}" in bad(f"--base={tmp_path / 'missing.pt'}", code=1)
    assert "--mode pretrain only applies to --base scratch" in bad("--base=gpt2", "--mode=pretrain")


def test_help_has_a_space_before_every_comment(m, capsys):
    with pytest.raises(SystemExit):
        m.parse_args(["--help"])
    out = capsys.readouterr().out
    assert "--lora_targets=q_proj,v_proj" in out
    for line in out.splitlines()[1:]:
        assert re.match(r"  --\w+=\S* +\S", line), line


def test_bad_checkpoints_and_resume(m, tiny_run, tmp_path, capsys):
    out = copy_run(tiny_run, tmp_path / "out")
    base = ["--preset=tiny", f"--data_dir={tiny_run[2]}"]

    def bad(out_dir, *argv):
        return fails(m, capsys, *base, f"--out_dir={out_dir}", *argv)

    (tmp_path / "empty").mkdir()
    err = bad(tmp_path / "empty", "--mode=dpo", "--init_from=resume")
    assert "holds no checkpoint of --mode dpo to resume" in err
    assert "holds no checkpoint of --mode all" in bad(tmp_path / "empty", "--init_from=resume")
    assert f"no checkpoint at {tmp_path / 'empty' / 'pretrain.pt'}" in bad(tmp_path / "empty", "--mode=rm")
    # --base must be a 03_gpt.py checkpoint: 06's own pretrain.pt, junk and a pickle are refused
    assert "is not a 03_gpt.py checkpoint (it is: 06_lora_rlhf pretrain)" in \
        bad(tmp_path / "o", f"--base={out / 'pretrain.pt'}", "--mode=sft")
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    assert "is not a checkpoint this script can read" in bad(tmp_path / "o", f"--base={tmp_path / 'junk.pt'}")
    # a truncated, a malicious and a wrong-stage file where a stage or the pairs are read
    sft, prefs = (out / "sft.pt").read_bytes(), (out / "prefs.pt").read_bytes()
    (out / "sft.pt").write_bytes(sft[: len(sft) // 2])
    assert f"{out / 'sft.pt'} is not a checkpoint this script can read" in bad(out, "--mode=rm")
    with open(out / "sft.pt", "wb") as f:
        pickle.dump({"model": Exploit(tmp_path / "pwned")}, f, protocol=2)
    assert "is not a checkpoint this script can read (UnpicklingError)" in bad(out, "--mode=rm")
    assert not (tmp_path / "pwned").exists()
    shutil.copy(out / "rm.pt", out / "sft.pt")
    assert "is not a 06_lora_rlhf.py sft checkpoint (it is: 06_lora_rlhf rm)" in bad(out, "--mode=rm")
    (out / "sft.pt").write_bytes(sft)
    (out / "prefs.pt").write_bytes(prefs[:100])
    err = bad(out, "--mode=rm", "--init_from=resume")
    assert f"{out / 'prefs.pt'} is not a checkpoint this script can read" in err
    (out / "prefs.pt").write_bytes(prefs)
    assert "another model config: lora_r=8 (flags say 4)" in bad(out, "--mode=rm", "--lora_r=4")


class Exploit:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


# --- Data --------------------------------------------------------------------------------------
def test_download_and_offline_message(m, tmp_path, http_server, monkeypatch):
    src = fake_corpus(tmp_path / "served")
    url = http_server(src)
    monkeypatch.setattr(m, "SHAKESPEARE_URL", f"{url}/tinyshakespeare/input.txt")
    monkeypatch.setattr(m, "SHAKESPEARE_SHA256", None)
    cfg = m.Config(data_dir=str(tmp_path / "fresh"))
    assert m.shakespeare_text(cfg) == (src / "tinyshakespeare" / "input.txt").read_text()
    assert not any(p.name.endswith(".part") for p in (tmp_path / "fresh" / "tinyshakespeare").iterdir())
    monkeypatch.setattr(m, "SHAKESPEARE_URL", f"{url}/nothing/here.txt")
    with pytest.raises(m.UserError, match=r"(?s)could not download .*nothing/here.txt.*download it by hand"):
        m.shakespeare_text(m.Config(data_dir=str(tmp_path / "empty")))


HF_HH_TRAIN = "datasets/Anthropic/hh-rlhf/resolve/main/helpful-base/train.jsonl.gz"  # paths on the Hub
HF_GPT2 = "gpt2/resolve/main/model.safetensors"


def hf_mirror(monkeypatch, http_server, folder, files):
    """Serve {path on the Hub: bytes} from `folder` and point HF_ENDPOINT at it (with a trailing slash,
    which is dropped) -> its URL. An attempt to reach huggingface.co itself fails at once (no proxy there)."""
    for rel, data in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    monkeypatch.setenv("HF_ENDPOINT", http_server(folder) + "/")
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")
    return os.environ["HF_ENDPOINT"][:-1]


def test_downloads_honour_hf_endpoint(m, tmp_path, http_server, monkeypatch):
    """A Hugging Face mirror (HF_ENDPOINT, for a filtered connection) serves GPT-2 and HH-RLHF."""
    write_safetensors(tmp_path / "gpt2.safetensors", gpt2_hf_tensors())
    ex = {"chosen": "\n\nHuman: hi\n\nAssistant: ab ab", "rejected": "\n\nHuman: hi\n\nAssistant: ba ba"}
    hf_mirror(monkeypatch, http_server, tmp_path / "mirror", {HF_HH_TRAIN: gzip.compress(json.dumps(ex).encode()),
                                                               HF_GPT2: (tmp_path / "gpt2.safetensors").read_bytes()})
    monkeypatch.setattr(m, "make_tokenizer", lambda spec: spec)  # GPT-2's BPE files are not needed here
    cfg = m.Config(data_dir=str(tmp_path / "d"), base="gpt2", prompt_len=2, response_len=2)
    model = m.load_base(SimpleNamespace(cfg=cfg, device="cpu", tok=None))
    got = tmp_path / "d" / "gpt2" / "model.safetensors"
    assert got.read_bytes() == (tmp_path / "gpt2.safetensors").read_bytes() and model.config.gelu == "tanh"
    p, c, r = m.hh_rlhf_tensors(cfg, SimpleNamespace(encode=lambda text: list(text.encode())), "train")
    assert (p.tolist(), c.tolist(), r.tolist()) == ([list(b"t:")], [list(b" a")], [list(b" b")])


def test_downloads_without_a_checksum_refuse_a_portal_page(m, tmp_path, http_server, monkeypatch):
    """--prefs=hh-rlhf (train split: no pinned sha256) and --base=gpt2 behind a captive portal: the
    HTML page is not kept, and the message names the URL and where to put the file by hand."""
    portal = b"<!DOCTYPE html><html><body>Please log in</body></html>"
    url = hf_mirror(monkeypatch, http_server, tmp_path / "served", {HF_HH_TRAIN: portal, HF_GPT2: portal})
    cfg = m.Config(data_dir=str(tmp_path / "d"), base="gpt2")
    hh, gpt2 = (re.escape(f"{url}/{path} did not send") for path in (HF_HH_TRAIN, HF_GPT2))
    with pytest.raises(m.UserError, match=rf"(?s){hh} .*not start with b'\\x1f\\x8b'.*by hand"):
        m.hh_rlhf_tensors(cfg, m.make_tokenizer(dict(kind="char", chars="ab")), "train")
    with pytest.raises(m.UserError, match=rf"(?s){gpt2} the expected file \(it is an HTML page\)"):
        m.load_base(SimpleNamespace(cfg=cfg, device="cpu", tok=None))
    assert not [p for p in (tmp_path / "d").rglob("*") if p.is_file()]  # nothing left behind
    # a file already there but cut short is refused by its reader with one line, too
    cut = tmp_path / "d" / "hh-rlhf" / "helpful-base" / "train.jsonl.gz"
    cut.parent.mkdir(parents=True, exist_ok=True)
    cut.write_bytes(gzip.compress(b'{"chosen": "a"}\n' * 100)[:40])
    with pytest.raises(m.UserError, match="is not a readable HH-RLHF file"):
        m.hh_rlhf_tensors(cfg, m.make_tokenizer(dict(kind="char", chars="ab")), "train")


def test_hh_rlhf_parses(m, tmp_path, data_dir):
    root = data_dir("hh-rlhf")
    rows = m.load_hh_rlhf(root / "hh-rlhf" / "helpful-base" / "test.jsonl.gz")
    assert 2000 < len(rows) <= 2354
    prompt, chosen, rejected = rows[0]
    assert prompt.startswith("\n\nHuman:") and prompt.endswith("\n\nAssistant:") and chosen != rejected
    tok = m.make_tokenizer(dict(kind="char", chars="".join(chr(i) for i in range(9, 127))))
    cfg = m.Config(data_dir=str(root), prompt_len=64, response_len=32)
    p, c, r = m.hh_rlhf_tensors(cfg, tok, "test")
    assert p.shape[1] == 64 and c.shape == r.shape and c.shape[1] == 32 and len(p) > 500
    assert tok.decode(p[0].tolist()).endswith("\n\nAssistant:")
