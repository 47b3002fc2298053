"""Milestone check for 02_transformer_mt.py: its milestone section, run on its own, builds the
Transformer and runs it on random token ids, and its MultiHeadAttention equals nn.MultiheadAttention."""
import torch
import torch.nn as nn


def close(a, b, tol=1e-5):  # (not torch.testing.assert_close: its first call imports sympy, seconds)
    assert a.shape == b.shape and torch.allclose(a, b, atol=tol, rtol=tol), f"max diff {(a - b).abs().max()}"


def check(ns):
    torch.manual_seed(0)
    # MultiHeadAttention == nn.MultiheadAttention with the same weights (self- and cross-attention,
    # with key padding), forward and input gradient
    C, nh, B, T, S = 16, 4, 2, 5, 7
    ref, mine = nn.MultiheadAttention(C, nh, batch_first=True), ns["MultiHeadAttention"](C, nh)
    with torch.no_grad():
        for i, lin in enumerate((mine.q_proj, mine.k_proj, mine.v_proj)):
            lin.weight.copy_(ref.in_proj_weight[i * C:(i + 1) * C])
            lin.bias.copy_(ref.in_proj_bias[i * C:(i + 1) * C])
        mine.out_proj.load_state_dict(ref.out_proj.state_dict())
    x, context = torch.randn(B, T, C, requires_grad=True), torch.randn(B, S, C)
    for kv in (x, context):
        pad = torch.zeros(B, kv.size(1), dtype=torch.bool)
        pad[1, -3:] = True
        blocked = pad[:, None, :].expand(B, T, kv.size(1)).repeat_interleave(nh, 0)  # (B*nh, T, Tk)
        want, _ = ref(x, kv, kv, attn_mask=blocked)  # (key_padding_mask imports sympy)
        got = mine(x, context=None if kv is x else kv, mask=~pad[:, None, None, :])
        close(got, want)
        close(torch.autograd.grad(got.sum(), x)[0], torch.autograd.grad(want.sum(), x)[0])
    try:
        ns["MultiHeadAttention"](10, 3)
        raise AssertionError("MultiHeadAttention(10, 3) did not refuse d_model % n_head != 0")
    except ValueError:
        pass
    # the Transformer on random token ids, for each position scheme: logits of the right shape, a
    # loss gradient reaching the embedding, and KV-cached step-by-step decoding equal to one pass
    PAD, BOS, V = ns["PAD"], ns["BOS"], 50
    for pos in ("sinusoidal", "learned", "relative", "rope"):
        model = ns["Transformer"](V, d_model=32, n_head=4, n_layer=2, d_ff=64, dropout=0.0, norm="pre", pos=pos,
                                  block_size=32).eval()
        src = torch.randint(3, V, (B, 9))
        src[0, -2:] = PAD
        tgt = torch.cat([torch.full((B, 1), BOS), torch.randint(3, V, (B, 6))], 1)
        logits = model(src, tgt)
        assert logits.shape == (B, 7, V) and torch.isfinite(logits).all()
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), torch.randint(3, V, (B * 7,))).backward()
        assert model.embed.weight.grad.abs().sum() > 0
        memory, src_mask = model.encode(src)
        cache = model.new_cache()
        steps = [model.decode(tgt[:, t:t + 1], memory, src_mask, cache, start=t) for t in range(tgt.size(1))]
        close(torch.cat(steps, 1), logits)
        # decoding: beam search with one beam is greedy search
        out = ns["greedy_decode"](model, src, 8)
        assert out.shape[0] == B and out.shape[1] <= 8
        assert torch.equal(ns["beam_search"](model, src, 8, beam_size=1), out)
    # the byte-level BPE round-trips any text
    texts = ["Ein Mann fährt Fahrrad.", "A man rides a bike.", "Zwei Hunde spielen im Schnee."] * 3
    tok = ns["BPETokenizer"](ns["train_bpe"](texts, 300))
    for s in texts + ["emoji 😀, 中文 and e\u0301"]:
        assert tok.decode(tok.encode(s)) == s
    assert len(tok.encode(texts[0])) < len(texts[0].encode())
