"""Milestone check for 06_lora_rlhf.py: its milestone section, run on its own, builds LoRALinear, the
GPT, the reward model, and computes dpo_loss, GAE and the PPO objective to hand-computed values."""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def check(ns):
    torch.manual_seed(0)
    # LoRALinear on a random nn.Linear: zero-init B means the output equals the base layer's
    base = nn.Linear(12, 7)
    w0, b0 = base.weight.detach().clone(), base.bias.detach().clone()
    lora = ns["LoRALinear"](base, r=4, alpha=8.0)
    x = torch.randn(3, 5, 12)
    assert torch.equal(lora(x), F.linear(x, w0, b0))
    # gradients reach only A and B (A's is zero while B is zero: dL/dA = (alpha/r) B^T ...)
    lora(x).square().sum().backward()
    assert base.weight.grad is None and base.bias.grad is None
    assert lora.lora_A.grad is not None and torch.count_nonzero(lora.lora_A.grad) == 0
    assert lora.lora_B.grad is not None and lora.lora_B.grad.abs().sum() > 0
    with torch.no_grad():
        lora.lora_B.normal_()
    torch.testing.assert_close(lora(x), F.linear(x, w0 + 2.0 * lora.lora_B @ lora.lora_A, b0))
    torch.testing.assert_close(lora.merged_linear()(x), lora(x))

    # the GPT with adapters: a fresh adapter changes nothing, disable_adapters gives the base back,
    # and the KV-cache path equals the full forward
    gpt = ns["GPT"](ns["GPTConfig"](block_size=16, vocab_size=11, n_layer=2, n_head=2, n_embd=16))
    idx = torch.randint(11, (2, 10))
    with torch.no_grad():
        ref = gpt(idx)
        ns["apply_lora"](gpt, ("q_proj", "v_proj"), r=2, alpha=4.0)
        torch.testing.assert_close(gpt(idx), ref)
        for m in gpt.modules():
            if isinstance(m, ns["LoRALinear"]):
                m.lora_B.normal_()
        assert not torch.allclose(gpt(idx), ref)
        with ns["disable_adapters"](gpt):
            torch.testing.assert_close(gpt(idx), ref)
        cache = [{} for _ in gpt.transformer.h]
        steps = [gpt(idx[:, :4], cache)] + [gpt(idx[:, t:t + 1], cache) for t in range(4, 10)]
        torch.testing.assert_close(torch.cat(steps, 1), gpt(idx), atol=1e-5, rtol=1e-5)
        assert ns["generate"](gpt, idx[:, :4], 6).shape == (2, 10)
    assert {n for n, p in gpt.named_parameters() if p.requires_grad} == \
        {f"transformer.h.{i}.attn.{p}.lora_{x}" for i in range(2) for p in ("q_proj", "v_proj") for x in "AB"}
    rm = ns["RewardModel"](ns["merge_lora"](gpt))
    with torch.no_grad():
        assert rm(idx).shape == (2,) and torch.equal(rm(idx), rm.head.bias.expand(2))  # the head starts at zero

    # dpo_loss (DPO eq. 7): beta [(-1 - -1.5) - (-2 - -1.25)] = 0.5 (0.5 + 0.75) = 0.625 and -0.5 * (0 - 1)
    loss, margin, acc = ns["dpo_loss"](torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -2.0]),
                                       torch.tensor([-1.5, -3.0]), torch.tensor([-1.25, -3.0]), beta=0.5)
    want = (math.log1p(math.exp(-0.625)) + math.log1p(math.exp(0.5))) / 2  # -log sigma(m) = log(1 + e^-m)
    assert abs(loss.item() - want) < 1e-6 and abs(margin.item() - 0.0625) < 1e-6 and acc.item() == 0.5
    # GAE by hand, gamma 0.9, lambda 0.5: A2 = 0.6, A1 = 0.16 + 0.45 * 0.6, A0 = -0.32 + 0.45 * 0.43
    adv, ret = ns["gae"](torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[0.5, 0.2, 0.4]]), gamma=0.9, lam=0.5)
    torch.testing.assert_close(adv, torch.tensor([[-0.1265, 0.43, 0.6]]))
    # the PPO clipped objective: ratio 1.5, A = 1 is clipped at 1.2; ratio 1.5, A = -1 is not
    ratio, adv = torch.tensor([1.5, 1.5]), torch.tensor([1.0, -1.0])
    pg, clipfrac = ns["ppo_policy_loss"](torch.log(ratio), torch.zeros(2), adv)
    assert abs(pg.item() - (-1.2 + 1.5) / 2) < 1e-6 and clipfrac.item() == 1.0
