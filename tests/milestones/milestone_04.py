"""Milestone check for 04_bert.py: the WordPiece tokenizer, the BERT encoder with its MLM and NSP heads,
the classifier and the distillation loss, built and run from the milestone section alone."""
import torch
import torch.nn.functional as F


def check(ns):
    # WordPiece: greedy longest match with ## continuations, [UNK] for a word with an unmatchable piece
    tok = ns["BertTokenizer"](ns["SPECIALS"] + ["un", "##aff", "##able", "runn", "##ing", ",", "want", "##ed"])
    assert tok.tokenize("Unaffable running, wanted unwanted") == \
        ["un", "##aff", "##able", "runn", "##ing", ",", "want", "##ed", "[UNK]"]
    assert tok.decode(tok.encode("unaffable, wanted")) == "unaffable , wanted"
    vocab = ns["train_wordpiece"](["the low lower lowest", "the lower road"] * 3, 40)
    assert vocab[:5] == ns["SPECIALS"] and "low" in vocab and "the" in vocab

    torch.manual_seed(0)
    V, B, T = 50, 3, 9
    model = ns["BERT"](vocab_size=V, n_layer=2, n_head=2, n_embd=16, block_size=16, dropout=0.0).eval()
    idx = torch.randint(5, V, (B, T))
    seg = torch.tensor([[0] * 5 + [1] * 4] * B)
    lengths = torch.tensor([9, 6, 4])
    attn_mask = torch.arange(T)[None, :] < lengths[:, None]  # (B, T) True = real token
    mlm, nsp, hidden = model(idx, seg, attn_mask)
    assert mlm.shape == (B, T, V) and nsp.shape == (B, 2) and hidden.shape == (B, T, 16)
    # the MLM decoder is tied to the word embeddings
    assert model.mlm_decoder.weight.data_ptr() == model.bert.tok.weight.data_ptr()
    # padding: what stands at the padded positions cannot change the outputs at the real positions
    idx2 = idx.clone()
    idx2[~attn_mask] = torch.randint(5, V, (int((~attn_mask).sum()),))
    mlm2, nsp2, hidden2 = model(idx2, seg, attn_mask)
    assert not torch.equal(idx, idx2)
    torch.testing.assert_close(hidden2[attn_mask], hidden[attn_mask])
    torch.testing.assert_close(nsp2, nsp)  # the pooler reads [CLS], a real position
    # bidirectional: changing the last real token of sequence 0 changes its first position's output
    idx3 = idx.clone()
    idx3[0, 8] = (idx3[0, 8] - 5 + 1) % (V - 5) + 5
    assert not torch.allclose(model(idx3, seg, attn_mask)[2][0, 0], hidden[0, 0])
    # only the selected MLM positions are projected onto the vocabulary, with the same values
    chosen = torch.zeros(B, T, dtype=torch.bool)
    chosen[0, 2] = chosen[1, 4] = True
    torch.testing.assert_close(model(idx, seg, attn_mask, mlm_mask=chosen)[0], mlm[chosen])

    # masking: specials never chosen, labels = originals at chosen positions
    special = idx < 7
    inputs, labels = ns["mask_tokens"](idx, special, 0.5, 4, torch.arange(5, V), torch.Generator().manual_seed(0))
    sel = labels != -100
    assert sel.any() and not sel[special].any() and torch.equal(labels[sel], idx[sel])
    assert torch.equal(inputs[~sel], idx[~sel])

    # classifier, gradients flow to the embeddings; distillation loss = alpha tau^2 KL + (1 - alpha) CE
    clf = ns["BertClassifier"](vocab_size=V, n_layer=1, n_head=2, n_embd=16, block_size=16, dropout=0.0)
    logits = clf(idx, seg, attn_mask)
    assert logits.shape == (B, 2)
    y, t_logits, tau, alpha = torch.tensor([0, 1, 1]), torch.randn(B, 2), 2.0, 0.3
    loss, ce, kd = ns["distillation_loss"](logits, t_logits, y, tau, alpha)
    p_t, log_p_s = F.softmax(t_logits / tau, -1), F.log_softmax(logits / tau, -1)
    kd_ref = (p_t * (p_t.log() - log_p_s)).sum(-1).mean() * tau ** 2
    torch.testing.assert_close(kd, kd_ref)
    torch.testing.assert_close(loss, alpha * kd_ref + (1 - alpha) * F.cross_entropy(logits, y))
    loss.backward()
    assert clf.bert.tok.weight.grad is not None and clf.bert.tok.weight.grad.abs().sum() > 0

    # a size that does not split into heads is a ValueError, not an assert
    try:
        ns["SelfAttention"](10, 3)
    except ValueError as e:
        assert "multiple of n_head" in str(e)
    else:
        raise AssertionError("SelfAttention(10, 3) was accepted")
