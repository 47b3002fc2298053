"""Milestone check for 07_mamba_moe.py: its milestone section, run on its own (after only the file's
import lines), builds and runs the selective scan, the Mamba block and the MoE layer."""
import math

import torch
import torch.nn.functional as F


def check(ns):
    g = torch.Generator().manual_seed(0)
    b, l, d, n = 2, 19, 6, 4  # an odd length exercises the scan's unpaired step
    u = torch.randn(b, l, d, generator=g, dtype=torch.float64)
    delta = F.softplus(torch.randn(b, l, d, generator=g, dtype=torch.float64))
    A = -torch.exp(torch.randn(d, n, generator=g, dtype=torch.float64))
    B, C = (torch.randn(b, l, n, generator=g, dtype=torch.float64) for _ in range(2))
    D = torch.randn(d, generator=g, dtype=torch.float64)
    args = [t.requires_grad_() for t in (u, delta, A, B, C, D)]

    # 1. The Blelloch scan (forward, and the hand-written SelectiveScan backward) equals the loop.
    w = torch.randn(b, l, d, generator=g, dtype=torch.float64)  # a random cotangent
    y_par = ns["selective_scan_parallel"](*args)
    y_seq = ns["selective_scan_sequential"](*args)
    assert y_par.shape == (b, l, d)
    torch.testing.assert_close(y_par, y_seq, rtol=1e-10, atol=1e-10)
    g_par = torch.autograd.grad((y_par * w).sum(), args)
    g_seq = torch.autograd.grad((y_seq * w).sum(), args)
    for name, a, r in zip("u delta A B C D".split(), g_par, g_seq):
        torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-9, msg=f"SelectiveScan's gradient for {name}")
    # SelectiveScan alone (no D term) against autograd through the loop with D = 0.
    y_fn = ns["SelectiveScan"].apply(*args[:5])
    torch.testing.assert_close(y_fn, ns["selective_scan_sequential"](*args[:5], torch.zeros_like(D)))

    # 2. The Mamba block on random input: shape, causality, gradients reach every parameter, and
    #    its recurrent step() reproduces the parallel forward token by token.
    torch.manual_seed(0)
    block = ns["MambaBlock"](d_model=8, d_state=4, d_conv=3)
    x = torch.randn(2, 10, 8)
    y = block(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    y.pow(2).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in block.parameters())
    x2 = x.clone()
    x2[:, 6:] = torch.randn(2, 4, 8)
    with torch.no_grad():
        torch.testing.assert_close(block(x2)[:, :6], y[:, :6].detach())  # the future does not leak back
        state, steps = None, []
        for t in range(10):
            out, state = block.step(x[:, t], state)
            steps.append(out)
    torch.testing.assert_close(torch.stack(steps, 1), y.detach(), rtol=1e-4, atol=1e-5)

    # 3. MoE forward and its auxiliary loss: with uniform routing (router zeroed, top_k = E) every
    #    gate is 1/E, so the balancing loss is exactly 1 and the z-loss is log(E)^2.
    E, coef_bal, coef_z = 4, 0.1, 0.01
    moe = ns["MoE"](d_model=8, d_ff=12, n_experts=E, top_k=E, capacity_factor=2.0,
                    aux_loss_coef=coef_bal, z_loss_coef=coef_z)
    with torch.no_grad():
        moe.router.weight.zero_()
    x = torch.randn(3, 5, 8)
    y, aux = moe(x)
    assert y.shape == x.shape and aux.ndim == 0 and moe.stats["drop_rate"] == 0
    assert math.isclose(aux.item(), coef_bal * 1.0 + coef_z * math.log(E) ** 2, rel_tol=1e-6), aux.item()
    flat = x.reshape(-1, 8)
    dense = sum(F.gelu(flat @ moe.w1[e] + moe.b1[e, 0]) @ moe.w2[e] + moe.b2[e, 0] for e in range(E)) / E
    torch.testing.assert_close(y.reshape(-1, 8), dense, rtol=1e-5, atol=1e-5)
    # A trained router's balancing loss reacts to imbalance: > 1 once routing prefers one expert.
    moe2 = ns["MoE"](d_model=8, d_ff=12, n_experts=E, top_k=2, aux_loss_coef=1.0, z_loss_coef=0.0)
    with torch.no_grad():
        moe2.router.weight.zero_()
        moe2.router.weight[0, 0] = 5.0
    x = torch.randn(64, 8)
    x[:, 0] = x[:, 0].abs() + 1
    _, aux = moe2(x)
    assert aux.item() > 1.2, aux.item()
    aux.backward()
    assert moe2.router.weight.grad.abs().sum() > 0  # the balancing loss trains the router
    # The attention baseline runs too.
    lm = ns["TransformerLM"](vocab_size=11, block_size=9, n_layer=1, n_embd=8, n_head=2,
                             moe_kwargs=dict(d_ff=8, n_experts=4, top_k=2))
    logits, aux = lm(torch.randint(0, 11, (2, 9)))
    assert logits.shape == (2, 9, 11) and aux.item() > 0
