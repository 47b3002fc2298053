"""Milestone check for 03_gpt.py: its milestone section, executed alone (tests/conftest.py's
milestone_namespace), builds a GPT whose written-out attention equals SDPA, whose KV-cache generation
equals uncached greedy generation, whose int8 copy stays close, and which Muon trains."""
import torch
import torch.nn.functional as F


def check(ns):
    torch.manual_seed(0)
    shape = dict(block_size=16, vocab_size=37, n_layer=2, n_head=4, n_embd=32, dropout=0.0, bias=True)
    idx = torch.randint(37, (3, 16))
    for pos in ("learned", "rope", "alibi"):
        torch.manual_seed(0)
        sdpa = ns["GPT"](ns["GPTConfig"](**shape, pos=pos, attn="sdpa")).double()
        manual = ns["GPT"](ns["GPTConfig"](**shape, pos=pos, attn="manual")).double()
        manual.load_state_dict(sdpa.state_dict())
        (ls, loss_s), (lm, loss_m) = sdpa(idx, idx), manual(idx, idx)
        assert ls.shape == (3, 16, 37)
        torch.testing.assert_close(ls, lm, rtol=1e-10, atol=1e-10)
        loss_s.backward()
        loss_m.backward()
        for a, b in zip(sdpa.parameters(), manual.parameters()):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-10)
        assert 3.0 < loss_s.item() < 4.5  # about ln(37) = 3.6 for a fresh model
        # KV cache: greedy generation token-identical to the uncached loop, also past block_size
        model = sdpa.float().eval()
        prompt = idx[:2, :5]
        cached = model.generate(prompt, 20, temperature=0, use_cache=True)
        plain = model.generate(prompt, 20, temperature=0, use_cache=False)
        assert cached.shape == (2, 25) and torch.equal(cached, plain) and torch.equal(cached[:, :5], prompt)
    # the causal attention module alone equals F.scaled_dot_product_attention with is_causal
    attn = ns["CausalSelfAttention"](ns["GPTConfig"](**shape)).eval()
    x = torch.randn(2, 16, 32)
    q, k, v = (t.view(2, 16, 4, 8).transpose(1, 2) for t in attn.c_attn(x).split(32, dim=2))
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(2, 16, 32)
    torch.testing.assert_close(attn(x), attn.c_proj(ref))
    # int8: 4 Linear layers per block replaced, logits within 2% of their spread
    model = ns["GPT"](ns["GPTConfig"](**shape)).eval()
    ref, _ = model(idx, idx)
    before, after = ns["quantize_int8"](model)
    out, _ = model(idx, idx)
    assert before / after > 3.5 and (out - ref).abs().max() < 0.02 * ref.std()
    # Muon: a few steps on a fixed batch lower the loss
    torch.manual_seed(0)
    model = ns["GPT"](ns["GPTConfig"](**shape))
    opt = model.configure_optimizers(0.1, 3e-3, (0.9, 0.99), "cpu", "muon", 0.02)
    losses = []
    for _ in range(10):
        _, loss = model(idx, idx)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses
