"""Milestone check for 05_flash_attn.py: the section, executed on its own, computes attention.

flash_attention (the tiled FlashAttention-2 forward and backward) against
F.scaled_dot_product_attention, values and gradients, causal and not (also with N_q != N_k and tiles
that do not divide N); its sliding-window and block-sparse masks against naive attention with the
same dense mask; and the small GPT built on it trains one step with a gradient in every parameter."""
import torch
import torch.nn.functional as F


def _grads(fn, q, k, v, do):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    o = fn(q, k, v)
    return (o, *torch.autograd.grad(o, (q, k, v), do))


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def check(ns):
    torch.manual_seed(0)
    flash, naive, mask_of = ns["flash_attention"], ns["naive_attention"], ns["attention_mask"]
    for n_q, n_k, causal in ((40, 40, False), (40, 40, True), (24, 40, False), (24, 40, True)):
        q, k, v = torch.randn(2, 3, n_q, 16), torch.randn(2, 3, n_k, 16), torch.randn(2, 3, n_k, 16)
        do = torch.randn(2, 3, n_q, 16)
        # SDPA's is_causal is top-left aligned; flash_attention's bottom-right: give SDPA the mask
        tri = torch.ones(n_q, n_k, dtype=torch.bool).tril(n_k - n_q) if causal else None
        ref = _grads(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=tri), q, k, v, do)
        got = _grads(lambda q, k, v: flash(q, k, v, causal, 16, 12), q, k, v, do)
        for name, a, b in zip(("O", "dQ", "dK", "dV"), got, ref):
            assert _rel(a, b) < 1e-5, (n_q, n_k, causal, name, _rel(a, b))
    # sliding window and block-sparse tiles equal naive attention under the same dense mask
    q, k, v, do = (torch.randn(1, 2, 48, 8) for _ in range(4))
    layout = torch.tensor([[1, 0, 0], [1, 1, 0], [0, 1, 1]], dtype=torch.bool)
    for window, lay in ((7, None), (None, layout)):
        mask = mask_of(48, 48, True, window, lay, 16, 16)
        ref = _grads(lambda q, k, v: naive(q, k, v, mask=mask), q, k, v, do)
        got = _grads(lambda q, k, v: flash(q, k, v, True, 16, 16, window, lay), q, k, v, do)
        assert all(_rel(a, b) < 1e-5 for a, b in zip(got, ref)), (window, lay)
    # the pluggable GPT: logits of the right shape, the same loss with naive and tiled attention,
    # and a gradient in every parameter
    idx = torch.randint(0, 11, (2, 20))
    losses = []
    for impl in ("naive", "flash"):
        torch.manual_seed(1)
        gpt = ns["GPT"](11, 2, 2, 16, 32, ns["attention_fn"](impl, True, 8, 8))
        logits, loss = gpt(idx, idx)
        assert logits.shape == (2, 20, 11)
        loss.backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in gpt.parameters())
        losses.append(loss.item())
    assert abs(losses[0] - losses[1]) < 1e-5, losses
    try:
        ns["CausalSelfAttention"](30, 4, None)
        raise AssertionError("n_embd=30, n_head=4 was accepted")
    except ValueError:
        pass
    # the Triton section is importable without a GPU: it says why it cannot run instead of crashing
    reason = ns["triton_unavailable_reason"]("cpu")
    assert reason is None or "Triton" in reason, reason
    assert ns["triton_blocks_ok"](64, 16) and not ns["triton_blocks_ok"](48, 64)
