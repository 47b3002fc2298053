"""Milestone check for 01_lstm_seq2seq.py: the section copied on its own builds and runs.

LSTMFunction's hand-derived forward and backward equal nn.LSTM's (outputs, final state, and the
gradients of the input, the initial states and all four weight tensors); ManualLSTM equals a
packed bidirectional nn.LSTM on a padded batch; the Seq2Seq model with each attention runs on random
token ids (logits shape, gradients reach the embeddings, attention is 0 on padding) and its beam
search of width 1 reproduces greedy decoding.
"""
import torch
import torch.nn as nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence


def check(ns):
    torch.manual_seed(0)
    T, B, I, H = 5, 3, 4, 6
    ref = nn.LSTM(I, H).double()
    cell = ns["LSTMCell"](I, H).double()
    with torch.no_grad():
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(cell, name).copy_(getattr(ref, name + "_l0"))
    x = torch.randn(T, B, I, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(B, H, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(B, H, dtype=torch.float64, requires_grad=True)
    hs, cs = ns["LSTMFunction"].apply(x, h0, c0, cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh)
    out, (h_n, c_n) = ref(x, (h0[None], c0[None]))
    torch.testing.assert_close(hs, out)
    torch.testing.assert_close(cs[-1], c_n[0])
    dout = torch.randn_like(hs)
    mine = (hs * dout).sum() + cs[-1].sum()
    theirs = (out * dout).sum() + c_n.sum()
    ours = torch.autograd.grad(mine, (x, h0, c0, cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh))
    refs = torch.autograd.grad(theirs, (x, h0, c0, ref.weight_ih_l0, ref.weight_hh_l0, ref.bias_ih_l0, ref.bias_hh_l0))
    for g, r in zip(ours, refs):
        torch.testing.assert_close(g, r)

    # GRUCell from its equations equals nn.GRUCell with the same weights
    gru, ref_gru = ns["GRUCell"](I, H), nn.GRUCell(I, H)
    with torch.no_grad():
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(gru, name).copy_(getattr(ref_gru, name))
    xg, hg = torch.randn(B, I), torch.randn(B, H)
    torch.testing.assert_close(gru(xg, hg), ref_gru(xg, hg))

    # ManualLSTM (LSTMFunction per layer and direction) equals a packed bidirectional nn.LSTM
    manual = ns["ManualLSTM"](I, H, num_layers=2, bidirectional=True).double()
    packed_ref = nn.LSTM(I, H, num_layers=2, bidirectional=True, batch_first=True).double()
    for layer in range(2):
        for d, suffix in enumerate(("", "_reverse")):
            with torch.no_grad():
                for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                    getattr(manual.cells[2 * layer + d], name).copy_(getattr(packed_ref, f"{name}_l{layer}{suffix}"))
    xs, lengths = torch.randn(B, 7, I, dtype=torch.float64), torch.tensor([7, 2, 5])
    y, (hm, cm) = manual(xs, lengths)
    packed, (hr, cr) = packed_ref(pack_padded_sequence(xs, lengths, batch_first=True, enforce_sorted=False))
    torch.testing.assert_close(y, pad_packed_sequence(packed, batch_first=True, total_length=7)[0])
    torch.testing.assert_close((hm, cm), (hr, cr))

    # the encoder-decoder on random token ids, with every cell and attention
    PAD = ns["PAD"]
    src = torch.randint(4, 20, (B, 6))
    src_len = torch.tensor([6, 3, 4])
    src[1, 3:], src[2, 4:] = PAD, PAD
    tgt_in = torch.randint(4, 17, (B, 5))
    for cell_kind, attn in (("lstm", "bahdanau"), ("gru", "luong_general"), ("lstm_manual", "none")):
        model = ns["Seq2Seq"](20, 17, n_embd=8, n_hidden=12, n_layer=2, cell=cell_kind, attn=attn, dropout=0.0)
        logits = model(src, src_len, tgt_in)
        assert logits.shape == (B, 5, 17) and torch.isfinite(logits).all()
        loss = ns["sequence_loss"](logits, torch.randint(4, 17, (B, 5)))
        loss.backward()
        assert model.src_embed.weight.grad.abs().sum() > 0 and model.tgt_embed.weight.grad.abs().sum() > 0
        model.eval()
        greedy, attn_weights = ns["greedy_decode"](model, src, src_len, 7)
        assert torch.equal(ns["beam_search"](model, src, src_len, 1, 7), greedy)
        if attn != "none":
            mask = torch.arange(6) < src_len[:, None]
            assert attn_weights.masked_select(~mask[:, None]).eq(0).all()  # (B, steps, S): none on padding
            torch.testing.assert_close(attn_weights.sum(-1), torch.ones(attn_weights.shape[:2]))
        assert ns["beam_search"](model, src, src_len, 3, 7).shape[0] == B
