"""Tests for 04_bert.py: tokenizer, masking, NSP pairs, the model against references, from_pretrained
on a Hugging Face-layout checkpoint written here, learning, the CLI in every mode, resume, DDP, bad input."""
import importlib.util
import io
import json
import math
import os
import random
import re
import struct
import unicodedata
import zipfile

import pytest
import torch
import torch.nn.functional as F
from conftest import load_script, run_script, run_torchrun

NAME = "04_bert"


@pytest.fixture(scope="module")
def m():
    # One intra-op thread, as conftest gives subprocesses: faster for these tiny models on a shared
    # 2-core machine, and bit-for-bit repeatable (the resume test compares losses exactly).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield load_script(NAME)
    torch.set_num_threads(threads)


def save_safetensors(tensors, path):
    """The inverse of the script's load_safetensors: JSON header, then the raw little-endian bytes."""
    names = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64"}
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, t in tensors.items():
        b = t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(b)]}
        blobs.append(b)
        offset += len(b)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head + b"".join(blobs))


# --- tokenizer ------------------------------------------------------------------------------------
def test_basic_tokenizer(m):
    bt = m.basic_tokenize
    assert bt("Héllo Wörld, naïve CAFÉ!") == ["hello", "world", ",", "naive", "cafe", "!"]
    assert bt("Héllo", lower_case=False) == ["Héllo"]
    assert bt("don't pay $5.00 (now)") == ["don", "'", "t", "pay", "$", "5", ".", "00", "(", "now", ")"]
    assert bt("我爱NLP 東京") == ["我", "爱", "nlp", "東", "京"]
    assert bt("a\x00b\x07c\td\u3000e\ufffdf\u200b") == ["abc", "d", "ef"]  # NUL, BEL, U+FFFD, ZWSP dropped
    assert bt("  \n ") == []


def bert_is_control(c):
    return c not in "\t\n\r" and unicodedata.category(c) in ("Cc", "Cf")


def bert_clean_and_split(text):
    """Google's tokenization.py, its whitespace path: _clean_text drops NUL, U+FFFD and controls (Cc, Cf but
    tab, newline, CR) and turns _is_whitespace characters (" \\t\\n\\r", Zs) into spaces; whitespace_tokenize
    is text.strip().split()."""
    text = "".join(" " if c in " \t\n\r" or unicodedata.category(c) == "Zs" else c for c in text
                   if c not in "\x00\ufffd" and not bert_is_control(c))
    return text.strip().split()


def test_whitespace_as_bert_splits(m):
    """Over all of Unicode: every character str.split() splits on splits words here too, except the controls
    BERT's _clean_text drops first (\\x0b \\x0c \\x1c-\\x1f \\x85); every character BERT calls whitespace or
    control is handled as BERT handles it."""
    spaces = [chr(cp) for cp in range(0x110000) if len(f"a{chr(cp)}b".split()) == 2]
    for c in spaces:
        want = ["ab"] if bert_is_control(c) else ["a", "b"]
        assert m.basic_tokenize(f"a{c}b", lower_case=False) == want, hex(ord(c))
    assert "\u2028" in spaces and "\u2029" in spaces and sum(map(bert_is_control, spaces)) == 7
    for c in map(chr, range(0x110000)):
        if unicodedata.category(c) in ("Zs", "Zl", "Zp", "Cc", "Cf"):
            assert m.basic_tokenize(f"a{c}b", lower_case=False) == bert_clean_and_split(f"a{c}b"), hex(ord(c))
    assert m.basic_tokenize("A\u2028B\u2029c") == ["a", "b", "c"]


def test_wordpiece_known_answers(m):
    vocab = m.SPECIALS + ["un", "##aff", "##able", "run", "runn", "##ing", "##n", "want", "##ed", ",", "a", "##a"]
    tok = m.BertTokenizer(vocab)
    assert tok.tokenize("unaffable") == ["un", "##aff", "##able"]  # the example in BERT's tokenization.py
    assert tok.tokenize("running, wanted") == ["runn", "##ing", ",", "want", "##ed"]  # longest match first
    assert tok.tokenize("unwanted") == ["[UNK]"]  # no "##want": the whole word is unknown
    assert tok.tokenize("a" * 100) == ["a"] + ["##a"] * 99
    assert tok.tokenize("a" * 101) == ["[UNK]"]  # over the 100-character limit
    ids = tok.encode("UnAffable running")
    assert tok.decode(ids) == "unaffable running"
    with pytest.raises(ValueError, match=r"\[MASK\]"):
        m.BertTokenizer([s for s in vocab if s != "[MASK]"])


def test_train_wordpiece_roundtrip(m):
    texts = ["The quick brown fox jumps over the lazy dog.", "Crème brûlée at the café, naïvely!",
             "Lower, lowest, lowered: the low road.", "北京 and 東京 are capitals."] * 5
    vocab = m.train_wordpiece(texts, 80)
    assert vocab[:5] == m.SPECIALS and len(vocab) == 80 and len(set(vocab)) == 80
    assert "the" in vocab and "low" in vocab  # the most frequent pairs get merged first
    tok = m.BertTokenizer(vocab)
    for t in texts:
        ids = tok.encode(t)
        assert tok.unk_id not in ids
        assert tok.decode(ids).split() == m.basic_tokenize(t)  # loses only case, accents and spacing


# --- pretraining data -----------------------------------------------------------------------------
def test_masking_statistics(m):
    V, n_special = 50, 5
    gen = torch.Generator().manual_seed(0)
    idx = torch.randint(n_special, V, (64, 100), generator=gen)
    idx[:, 0], idx[:, 50], idx[:, 80:] = 2, 3, 0  # [CLS], [SEP], padding
    special = idx < n_special
    candidates = torch.arange(n_special, V)
    chosen = masked = randomized = kept = 0
    for _ in range(10):
        inputs, labels = m.mask_tokens(idx, special, 0.15, 4, candidates, gen)
        sel = labels != -100
        assert not sel[special].any(), "a special or padding position was chosen"
        assert (labels[sel] == idx[sel]).all() and (inputs[~sel] == idx[~sel]).all()
        assert (inputs[sel & (inputs != 4)] >= n_special).all(), "a random replacement was a special token"
        chosen += sel.sum().item()
        masked += (inputs[sel] == 4).sum().item()
        kept += (inputs[sel] == idx[sel]).sum().item()
        randomized += ((inputs[sel] != 4) & (inputs[sel] != idx[sel])).sum().item()
    assert abs(chosen / (10 * (~special).sum().item()) - 0.15) < 0.005
    # a random token equals the original with probability 1/45, so "kept" is 10% + 10%/45
    assert abs(masked / chosen - 0.8) < 0.01
    assert abs(randomized / chosen - 0.1 * 44 / 45) < 0.01
    assert abs(kept / chosen - 0.1 * 46 / 45) < 0.01


def test_nsp_pairs(m):
    tok = m.BertTokenizer(m.SPECIALS + [f"w{i}" for i in range(200)])
    # sentence j of document d is the tokens [5 + d, 5 + 100 + j] (+ filler): unique, and self-describing
    docs = [[[5 + d, 105 + j] + [6] * ((d + j) % 7) for j in range(5 + d % 4)] for d in range(30)]
    pairs = m.make_nsp_pairs(docs, random.Random(0), tok, max_len=12)
    assert len(pairs) == sum(len(d) - 1 for d in docs)
    labels = [p[2] for p in pairs]
    assert abs(sum(labels) / len(labels) - 0.5) < 0.08
    for (ids, seg, label) in pairs:
        assert len(ids) == len(seg) <= 12 and ids[0] == tok.cls_id and ids[-1] == tok.sep_id
        sep = ids.index(tok.sep_id)
        a, b = ids[1:sep], ids[sep + 1:-1]
        assert a and b, "truncation must keep both segments"
        assert seg == [0] * (sep + 1) + [1] * (len(b) + 1)
        if label == 0:  # IsNext: B is the sentence after A in the same document
            assert b[0] == a[0] and b[1] == a[1] + 1
        else:  # NotNext: B comes from another document, so it is never the true next sentence
            assert b[0] != a[0]


def test_one_sentence_documents_are_mlm_only(m):
    """A one-sentence document (e.g. an SST-2 phrase) gives `[CLS] A [SEP]` with NSP label -100 and is
    never a NotNext B; a batch of only those trains MLM alone (no NaN from an empty NSP mean) and keeps
    the NSP head in the graph; a mixed batch averages NSP over the labelled pairs only."""
    tok = m.BertTokenizer(m.SPECIALS + [f"w{i}" for i in range(40)])
    docs = [[[5 + d, 6 + d, 7]] for d in range(6)] + [[[20 + j, 21] for j in range(3)] for _ in range(4)]
    pairs = m.make_nsp_pairs(docs, random.Random(0), tok, max_len=12)
    singles = [p for p in pairs if p[2] == -100]
    assert len(singles) == 6 and len(pairs) == 6 + 4 * 2
    assert all(p[0] == [tok.cls_id, 5 + d, 6 + d, 7, tok.sep_id] and p[1] == [0] * 5 for d, p in enumerate(singles))
    not_next = [p[0] for p in pairs if p[2] == 1]
    assert not_next and all(ids[ids.index(tok.sep_id) + 1] >= 20 for ids in not_next)  # B from a long document
    torch.manual_seed(0)
    model = m.BERT(len(tok.itos), n_layer=1, n_head=2, n_embd=16, block_size=16, dropout=0.0)
    cfg = m.Config(mlm_prob=0.5)
    loss, stats = m.pretrain_loss(model, m.collate(singles, tok.pad_id), tok, cfg, torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss) and "nsp_loss" not in stats and model.nsp.weight.grad is not None
    batch = m.collate(pairs, tok.pad_id)
    loss, stats = m.pretrain_loss(model, batch, tok, cfg, torch.Generator().manual_seed(0))
    # by hand: the same masked inputs, then -log softmax(NSP logits)[label], averaged over labelled pairs only
    idx, seg, attn_mask, nsp_labels = batch
    special = torch.isin(idx, torch.tensor(tok.special_ids))
    inputs, labels = m.mask_tokens(idx, special, 0.5, tok.mask_id, tok.random_ids, torch.Generator().manual_seed(0))
    with torch.no_grad():
        _, nsp_logits, _ = model(inputs, seg, attn_mask)
    terms, correct = [], 0
    for z, y in zip(nsp_logits.tolist(), nsp_labels.tolist()):
        if y != -100:
            terms.append(math.log(math.exp(z[0]) + math.exp(z[1])) - z[y])
            correct += max(range(2), key=lambda k: z[k]) == y
    assert len(terms) == 8 and stats["nsp_pairs"] == 8
    assert stats["nsp_loss"] == pytest.approx(sum(terms) / 8, rel=1e-5)
    assert stats["nsp_acc"] == pytest.approx(correct / 8)
    assert loss.item() == pytest.approx(stats["mlm_loss"] + stats["nsp_loss"], rel=1e-5)


def test_pack_sentences_keeps_every_token_in_order(m):
    """--nsp false: sentences end to end in sequences of <= max_len, none split, [SEP] after each
    document, every token kept in order; a sentence longer than a sequence is truncated; NSP label -100;
    the same packing every epoch, so a BatchStream runs for many epochs (and resumes anywhere)."""
    tok = m.BertTokenizer(m.SPECIALS + [f"w{i}" for i in range(60)])
    rng = random.Random(0)
    docs = [[[rng.randrange(5, 65) for _ in range(rng.randint(1, 9))] for _ in range(rng.randint(1, 5))]
            for _ in range(30)]
    packed = m.pack_sentences(docs, tok, max_len=12)
    assert all(len(ids) <= 12 and ids[0] == tok.cls_id and ids[-1] == tok.sep_id and segs == [0] * len(ids)
               and y == -100 for ids, segs, y in packed)
    pieces = [s + [tok.sep_id] * (i == len(doc) - 1) for doc in docs for i, s in enumerate(doc)]
    assert [t for ids, _, _ in packed for t in ids[1:-1]] == [t for p in pieces for t in p]
    bounds, at = {0}, 0  # every sequence starts where a sentence starts: none is split
    for p in pieces:
        at += len(p)
        bounds.add(at)
    at = 0
    for ids, _, _ in packed:
        assert at in bounds
        at += len(ids) - 2
    assert len(packed) < len(pieces)  # fewer, fuller sequences than sentences
    long = m.pack_sentences([[list(range(5, 25))], [[7, 8]]], tok, max_len=12)
    assert [ids for ids, _, _ in long] == [[tok.cls_id] + list(range(5, 15)) + [tok.sep_id],
                                           [tok.cls_id, 7, 8, tok.sep_id, tok.sep_id]]
    stream = m.BatchStream(lambda r: packed, 4, seed=0)
    assert all(len(stream.get(i)) == 4 for i in range(5 * stream.n_batches))  # five epochs, no IndexError


def test_evaluate_weights_each_statistic_by_what_it_counts(m):
    """MLM statistics are means over masked tokens, NSP over sentence pairs, the rest over examples."""
    per_batch = [  # (loss, stats) of pretraining batches
        (None, {"mlm_loss": 1.0, "mlm_acc": 1.0, "mlm_tokens": 10, "nsp_loss": 0.5, "nsp_acc": 0.0, "nsp_pairs": 1}),
        (None, {"mlm_loss": 3.0, "mlm_acc": 0.0, "mlm_tokens": 30}),  # one-sentence examples: no NSP
        (None, {"mlm_loss": math.nan, "mlm_acc": math.nan, "mlm_tokens": 0}),  # nothing masked: adds nothing
    ]
    metrics = m.evaluate(torch.nn.Linear(1, 1), [[0, 0], [0, 0], [0]], lambda _m, _b, i, _: per_batch[-1 - i],
                         m.Config(mode="pretrain"))
    assert metrics == pytest.approx({"mlm_loss": 2.5, "mlm_acc": 0.25, "nsp_loss": 0.5, "nsp_acc": 0.0,
                                     "val_loss": 3.0})  # 3.0 = MLM loss + NSP loss
    per_batch = [(torch.tensor(0.2), {"acc": 1.0}), (torch.tensor(0.8), {"acc": 0.5})]  # 1 and 3 examples
    metrics = m.evaluate(torch.nn.Linear(1, 1), [[0], [0, 0, 0]], lambda _m, _b, i, _: per_batch[-1 - i],
                         m.Config(mode="finetune"))
    assert metrics == pytest.approx({"acc": 2.5 / 4, "val_loss": 2.6 / 4})


def test_corpus_sst2_and_joined_sources(m, tmp_path):
    """--corpus sst2 reads the training sentences only (never dev); `a+b` concatenates sources."""
    write_sst2(tmp_path / "sst2", n_train=100, n_dev=10)
    corpus = write_corpus(tmp_path / "corpus.txt")
    cfg = m.Config(data_dir=str(tmp_path), corpus="sst2")
    train, val, note = m.load_corpus(cfg)
    assert len(train) == 95 and len(val) == 5 and all(len(d) == 1 for d in train + val) and "sst2" in note
    assert [d[0] for d in train + val] == [t for t, _ in m.read_sst2(cfg.data_dir)["train"]]  # train text, in order
    t2, v2, note2 = m.load_corpus(m.Config(data_dir=str(tmp_path), corpus=f"{corpus}+sst2"))
    t1, v1, _ = m.load_corpus(m.Config(data_dir=str(tmp_path), corpus=str(corpus)))
    assert t2 == t1 + train and v2 == v1 + val and note2.endswith(note)


# --- model ----------------------------------------------------------------------------------------
def naive_attention(x, attn, mask, n_head):
    B, T, C = x.shape
    q, k, v = (lin(x).view(B, T, n_head, C // n_head).transpose(1, 2) for lin in (attn.query, attn.key, attn.value))
    scores = q @ k.transpose(-1, -2) / (C // n_head) ** 0.5
    scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    return attn.proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, C))


def test_attention_matches_naive_and_gradcheck(m):
    torch.manual_seed(0)
    attn = m.SelfAttention(8, 2).double()
    x = torch.randn(2, 5, 8, dtype=torch.double, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    torch.testing.assert_close(attn(x, mask), naive_attention(x, attn, mask, 2))
    assert torch.autograd.gradcheck(lambda t: attn(t, mask), (x,))
    # padding must not influence the real tokens
    x2 = x.detach().clone()
    x2[1, 3:] = 100.0
    torch.testing.assert_close(attn(x2, mask)[1, :3], attn(x.detach(), mask)[1, :3])


def test_attention_mask_any_dtype(m):
    """The 0/1 mask other tools give (int64, int32, float) or bool: the same outputs, padded positions included,
    and padding masked (each sequence alone, cut to its length, gives its real positions)."""
    torch.manual_seed(0)
    model = m.BERT(vocab_size=30, n_layer=2, n_head=2, n_embd=16, block_size=16, dropout=0.0).eval()
    idx, seg = torch.randint(5, 30, (3, 7)), torch.tensor([[0] * 4 + [1] * 3] * 3)
    mask = torch.arange(7)[None, :] < torch.tensor([7, 5, 2])[:, None]  # (B, T) bool
    ref = model(idx, seg, mask)
    for dtype in (torch.int64, torch.int32, torch.float32):
        for got, want in zip(model(idx, seg, mask.to(dtype)), ref):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    for i, n in enumerate((7, 5, 2)):
        torch.testing.assert_close(model(idx[i:i + 1, :n], seg[i:i + 1, :n])[2][0], ref[2][i, :n])
    clf = m.BertClassifier(vocab_size=30, n_layer=1, n_head=2, n_embd=16, block_size=16, dropout=0.0).eval()
    torch.testing.assert_close(clf(idx, seg, mask.long()), clf(idx, seg, mask), rtol=0, atol=0)
    for additive in (torch.zeros(3, 7).masked_fill(~mask, float("-inf")), torch.zeros(3, 7)):  # as SDPA reads it
        with pytest.raises(ValueError, match="not an additive mask"):  # refused, not misread as padding
            model(idx, seg, additive)


HF_BLOCK = {"attn.query": "attention.self.query", "attn.key": "attention.self.key", "attn.value": "attention.self.value",
            "attn.proj": "attention.output.dense", "ln1": "attention.output.LayerNorm",
            "fc": "intermediate.dense", "proj": "output.dense", "ln2": "output.LayerNorm"}


def to_hf(sd):
    """Our state dict -> Hugging Face BertForPreTraining names, written out by hand (independent of the
    script's table); old-style LayerNorm.gamma/beta for the embeddings, as Google's checkpoints have."""
    out = {}
    for k, v in sd.items():
        if k == "mlm_decoder.weight":
            out["cls.predictions.decoder.weight"] = v
            continue
        mm = re.fullmatch(r"bert\.blocks\.(\d+)\.(.+)\.(weight|bias)", k)
        if mm:
            out[f"bert.encoder.layer.{mm[1]}.{HF_BLOCK[mm[2]]}.{mm[3]}"] = v
            continue
        fixed = {"bert.tok.weight": "bert.embeddings.word_embeddings.weight",
                 "bert.pos.weight": "bert.embeddings.position_embeddings.weight",
                 "bert.seg.weight": "bert.embeddings.token_type_embeddings.weight",
                 "bert.ln.weight": "bert.embeddings.LayerNorm.gamma", "bert.ln.bias": "bert.embeddings.LayerNorm.beta",
                 "bert.pooler.weight": "bert.pooler.dense.weight", "bert.pooler.bias": "bert.pooler.dense.bias",
                 "mlm_dense.weight": "cls.predictions.transform.dense.weight",
                 "mlm_dense.bias": "cls.predictions.transform.dense.bias",
                 "mlm_ln.weight": "cls.predictions.transform.LayerNorm.weight",
                 "mlm_ln.bias": "cls.predictions.transform.LayerNorm.bias", "mlm_bias": "cls.predictions.bias",
                 "nsp.weight": "cls.seq_relationship.weight", "nsp.bias": "cls.seq_relationship.bias"}
        out[fixed[k]] = v
    out["bert.embeddings.position_ids"] = torch.arange(32)[None]
    return out


def naive_bert(w, idx, seg, n_layer, n_head):
    """BERT's forward written directly from the Hugging Face weight names (the reference)."""
    ln = lambda x, p: F.layer_norm(x, x.shape[-1:], w[p + ".weight"], w[p + ".bias"], 1e-12)  # noqa: E731
    lin = lambda x, p: x @ w[p + ".weight"].T + w[p + ".bias"]  # noqa: E731
    e = "bert.embeddings."
    x = w[e + "word_embeddings.weight"][idx] + w[e + "position_embeddings.weight"][:idx.shape[1]] \
        + w[e + "token_type_embeddings.weight"][seg]
    x = F.layer_norm(x, x.shape[-1:], w[e + "LayerNorm.gamma"], w[e + "LayerNorm.beta"], 1e-12)
    B, T, C = x.shape
    for i in range(n_layer):
        p = f"bert.encoder.layer.{i}."
        q, k, v = (lin(x, p + f"attention.self.{n}").view(B, T, n_head, -1).transpose(1, 2)
                   for n in ("query", "key", "value"))
        a = ((q @ k.transpose(-1, -2)) / (C // n_head) ** 0.5).softmax(-1) @ v
        x = ln(x + lin(a.transpose(1, 2).reshape(B, T, C), p + "attention.output.dense"), p + "attention.output.LayerNorm")
        h = F.gelu(lin(x, p + "intermediate.dense"))
        x = ln(x + lin(h, p + "output.dense"), p + "output.LayerNorm")
    pooled = torch.tanh(lin(x[:, 0], "bert.pooler.dense"))
    h = ln(F.gelu(lin(x, "cls.predictions.transform.dense")), "cls.predictions.transform.LayerNorm")
    mlm = h @ w["bert.embeddings.word_embeddings.weight"].T + w["cls.predictions.bias"]
    return mlm, lin(pooled, "cls.seq_relationship"), x


def test_from_pretrained_hf_layout(m, tmp_path, http_server, monkeypatch):
    torch.manual_seed(0)
    ref = m.BERT(vocab_size=40, n_layer=2, n_head=2, n_embd=16, block_size=32, dropout=0.0).eval()
    with torch.no_grad():
        for p in ref.parameters():  # LayerNorms and biases away from 1 / 0, so a mix-up shows
            p.add_(0.1 * torch.randn_like(p))
    hub = tmp_path / "hub" / "tiny-bert" / "resolve" / "main"  # huggingface.co's URL layout
    hub.mkdir(parents=True)
    save_safetensors(to_hf(ref.state_dict()), hub / "model.safetensors")
    (hub / "config.json").write_text(json.dumps(dict(
        vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=32, type_vocab_size=2, hidden_act="gelu", hidden_dropout_prob=0.0)))
    (hub / "vocab.txt").write_text("\n".join(m.SPECIALS + [f"w{i}" for i in range(35)]) + "\n")
    monkeypatch.setenv("HF_ENDPOINT", http_server(tmp_path / "hub") + "/")  # a mirror; the slash is dropped
    model = m.bert_from_pretrained("tiny-bert", cache_dir=str(tmp_path / "cache")).eval()
    assert {p.name for p in (tmp_path / "cache" / "tiny-bert").iterdir()} == \
        {"config.json", "vocab.txt", "model.safetensors"}
    vocab, lower_case, args, state = m.load_pretrained(m.Config(init_from="tiny-bert", data_dir=str(tmp_path / "d")))
    assert len(vocab) == 40 and lower_case and args["n_layer"] == 2 and state.keys() == ref.state_dict().keys()
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=0, atol=0)
    assert model.mlm_decoder.weight.data_ptr() == model.bert.tok.weight.data_ptr()  # tied, one storage
    idx = torch.randint(5, 40, (2, 9))
    seg = torch.tensor([[0] * 5 + [1] * 4] * 2)
    mlm, nsp, hidden = model(idx, seg)
    ref_mlm, ref_nsp, ref_hidden = naive_bert(to_hf(ref.state_dict()), idx, seg, 2, 2)
    torch.testing.assert_close(hidden, ref_hidden, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mlm, ref_mlm, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(nsp, ref_nsp, rtol=1e-5, atol=1e-5)
    # the reader also handles half-precision files, the way most hub checkpoints are stored
    save_safetensors({"a": torch.tensor([1.5, -2.25], dtype=torch.bfloat16), "b": torch.zeros(0)}, tmp_path / "h.st")
    got = m.load_safetensors(tmp_path / "h.st")
    assert got["a"].dtype == torch.bfloat16 and got["a"].tolist() == [1.5, -2.25] and got["b"].shape == (0,)
    # the endpoint is read at each call, without its trailing slash; huggingface.co when HF_ENDPOINT is unset
    urls = []
    monkeypatch.setattr(m, "download", lambda url, path: urls.append(url))
    monkeypatch.setenv("HF_ENDPOINT", "https://hf-mirror.example/")
    with pytest.raises(m.UserError, match="has no config.json"):
        m.fetch_pretrained("bert-base-uncased", str(tmp_path / "c2"))
    monkeypatch.delenv("HF_ENDPOINT")
    with pytest.raises(m.UserError, match="has no config.json"):
        m.fetch_pretrained("bert-base-uncased", str(tmp_path / "c2"))
    assert urls[::3] == ["https://hf-mirror.example/bert-base-uncased/resolve/main/config.json",
                         "https://huggingface.co/bert-base-uncased/resolve/main/config.json"]


def test_grad_ckpt_same_gradients(m):
    torch.manual_seed(0)
    model = m.BERT(vocab_size=30, n_layer=2, n_head=2, n_embd=16, block_size=16, dropout=0.0)
    idx = torch.randint(5, 30, (3, 10))
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        model.bert.grad_ckpt = ckpt
        mlm, nsp, _ = model(idx)
        (mlm.logsumexp(-1).mean() + nsp.sum()).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


# --- end to end -----------------------------------------------------------------------------------
ANIMALS = ["cat", "dog", "horse", "bird", "fish", "cow"]
PLACES = ["garden", "river", "field", "house", "forest", "barn"]


def write_corpus(path, n_docs=40):
    """Documents (blank-line separated) of templated sentences: learnable MLM, and NSP through topics."""
    rng = random.Random(0)
    lines = []
    for d in range(n_docs):
        animal, place = ANIMALS[d % 6], PLACES[(d // 6) % 6]
        for j in range(6):
            word = rng.choice(["good", "great", "bad", "awful", "quiet", "small"])
            lines.append(f"the {animal} sat in the {place} , it was {word} and step {j} came .")
        lines.append("")
    path.write_text("\n".join(lines))
    return path


def write_sst2(folder, n_train=400, n_dev=100):
    """A toy sentiment task in GLUE's layout: the label is which kind of adjective the sentence has."""
    rng = random.Random(1)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("dev", n_dev)):
        rows = ["sentence\tlabel"]
        for _ in range(n):
            y = rng.randrange(2)
            adj = rng.choice(["good", "great"] if y else ["bad", "awful"])
            rows.append(f"the {rng.choice(ANIMALS)} in the {rng.choice(PLACES)} was {adj} . \t{y}")
        (folder / f"{split}.tsv").write_text("\n".join(rows) + "\n")


def records(out_dir):
    return [json.loads(line) for line in open(os.path.join(out_dir, "log.jsonl"))]


@pytest.mark.learning
def test_cli_pretrain_resume_finetune_distill(m, tmp_path, capsys, monkeypatch):
    corpus = write_corpus(tmp_path / "corpus.txt")
    write_sst2(tmp_path / "data" / "sst2")
    common = ["--preset", "tiny", f"--corpus={corpus}", f"--data_dir={tmp_path / 'data'}", "--lr_decay_iters=60",
              "--eval_interval=30", "--always_save_checkpoint", "--learning_rate=5e-3", "--n_layer=2"]
    a, b = tmp_path / "a", tmp_path / "b"
    m.main(common + [f"--out_dir={a}", "--max_iters=60"])  # uninterrupted
    m.main(common + [f"--out_dir={b}", "--max_iters=30"])  # interrupted at step 30 ...
    reads, real_load = [], torch.load
    monkeypatch.setattr(torch, "load", lambda f, *a, **k: reads.append(str(f)) or real_load(f, *a, **k))
    m.main(common + [f"--out_dir={b}", "--max_iters=60", "--init_from=resume"])  # ... and resumed
    monkeypatch.undo()
    assert reads.count(str(b / "pretrain.pt")) == 1, reads  # the checkpoint is read once
    out = capsys.readouterr().out
    assert "fill-mask at step 0:" in out and "fill-mask at step " in out
    ra, rb = records(a), records(b)
    assert [r["step"] for r in ra] == [0, 30, 60] and rb[-1]["step"] == 60
    assert ra[-1]["val_loss"] == pytest.approx(rb[-1]["val_loss"], rel=1e-6)
    assert ra[-1]["mlm_loss"] < 2.5 and ra[0]["mlm_loss"] > 4.5, ra  # learns: from ln V ~ 4.7 to well below
    assert (a / "pretrain.pt").exists() and (a / "vocab.txt").exists()

    # fine-tune from the pretrained checkpoint: the toy sentiment task must be separated
    m.main(common + [f"--out_dir={a}", "--mode=finetune", f"--init_from={a / 'pretrain.pt'}", "--max_iters=100",
                     "--batch_size=16", "--learning_rate=3e-3", "--min_lr=1e-3", "--eval_interval=100"])
    ft = records(a)[-1]
    assert ft["mode"] == "finetune" and ft["acc"] >= 0.95, ft
    # distillation through the real command line: the 2-layer teacher -> a 1-layer student
    r = run_script(NAME, "--preset", "tiny", "--mode=distill", f"--out_dir={a}", f"--data_dir={tmp_path / 'data'}",
                   "--max_iters=40", "--eval_interval=40", "--batch_size=16", "--learning_rate=1e-3")
    assert r.returncode == 0, r
    assert "speed-up" in r.output and "of the teacher's accuracy kept" in r.output, r
    d = records(a)[-1]
    assert d["mode"] == "distill" and d["student_params"] < d["teacher_params"], d
    assert d["teacher_acc"] == pytest.approx(ft["acc"]) and d["student_acc"] >= 0.9, d


def test_label_subsets_are_fixed_balanced_and_disjoint_from_heldout(m):
    examples = [([2, i, 3], [0, 0, 0], int(i % 3 == 0)) for i in range(300)]  # a third positive
    cfg = m.Config(budgets="40,100,all", heldout=50)
    held, subsets = m.label_subsets(examples, cfg)
    assert (held, subsets) == m.label_subsets(examples, cfg)  # the same subsets in every run and arm
    ids = lambda ex: {e[0][1] for e in ex}
    assert len(held) == 50 and ids(subsets["all"]) == set(range(300)) - ids(held)
    for b in (40, 100):
        assert len(subsets[str(b)]) == b and sum(e[2] for e in subsets[str(b)]) == b // 2  # balanced
        assert not ids(subsets[str(b)]) & ids(held)
    cpu = m.Config(batch_size=32, max_iters=1500)  # the cpu/budget preset: 10 epochs within [300, 1,500] steps
    assert [m.budget_steps(cpu, n) for n in (500, 2000, 66349)] == [300, 625, 1500]
    with pytest.raises(m.UserError, match="--budgets 300: only"):
        m.label_subsets(examples, m.Config(budgets="300", heldout=50))


def test_summarize_budget_chooses_lr_on_heldout_never_on_dev(m):
    recs = [{"budget": "500", "n_labels": 500, "arm": "scratch", "lr": lr, "seed": s, "heldout_acc": h + s / 100,
             "dev_acc": d + s / 100} for lr, h, d in ((1e-4, 0.70, 0.90), (3e-4, 0.80, 0.60)) for s in (0, 1, 2)]
    (row,) = m.summarize_budget(recs, m.Config(budgets="500", arms="scratch"))
    assert row["lr"] == 3e-4 and row["seeds"] == 3  # the held-out winner, though dev prefers 1e-4
    assert row["dev_mean"] == pytest.approx(0.61) and row["dev_std"] == pytest.approx(0.01)
    assert (row["dev_min"], row["dev_max"]) == (0.60, 0.62)


@pytest.mark.learning
def test_budget_mode_runs_every_cell_once(m, tmp_path, capsys):
    corpus = write_corpus(tmp_path / "corpus.txt")
    write_sst2(tmp_path / "data" / "sst2")
    common = ["--preset", "tiny", f"--data_dir={tmp_path / 'data'}", f"--out_dir={tmp_path}"]
    m.main(common + [f"--corpus={corpus}", "--max_iters=10", "--eval_interval=10"])
    budget = common + ["--mode=budget", f"--init_from={tmp_path / 'pretrain.pt'}"]
    m.main(budget + ["--arms=scratch"])  # one process per arm, sharing log.jsonl ...
    m.main(budget + ["--arms=pretrained"])
    runs = [r for r in records(tmp_path) if r["mode"] == "budget"]
    assert len(runs) == 2 * 2 * 2 * 2  # budgets 40 and all (360) x arms x lrs 3e-3, 1e-2 x 2 seeds
    assert {(r["budget"], r["n_labels"]) for r in runs} == {("40", 40), ("all", 360)}
    steps = {"40": 50, "all": 80}  # 10 epochs of 40, within [80 // 5, 80]; all: 80
    assert all(r["steps"] == r["curve"][-1]["step"] == steps[r["budget"]] and len(r["curve"]) == 6 for r in runs)
    # the runs learn the toy task (seeds 0-5 and 1337: 4 to 8 of the 8 reach 1.0, native and default kernels)
    assert max(r["dev_acc"] for r in runs if r["budget"] == "all") >= 0.9
    capsys.readouterr()
    rows = m.main(budget)  # ... then the whole table from the log; nothing is run twice
    out = capsys.readouterr().out
    assert len([r for r in records(tmp_path) if r["mode"] == "budget"]) == 16 and "seed 1337:" not in out
    assert {(r["budget"], r["arm"]) for r in rows} == {(b, a) for b in ("40", "all")
                                                      for a in ("pretrained", "scratch")}
    assert "(40 labels)" in out and "held-out % by lr" in out
    ckpt = torch.load(tmp_path / "pretrain.pt", weights_only=True)  # another checkpoint of the same pretraining
    ckpt["model"]["bert.tok.weight"] += 0.01
    torch.save(ckpt, tmp_path / "other.pt")
    m.main(common + ["--mode=budget", f"--init_from={tmp_path / 'other.pt'}", "--budgets=40"])
    out = capsys.readouterr().out
    assert out.count("pretrained, lr") == 4 and "scratch, lr" not in out  # scratch runs depend on vocab and shape
    if importlib.util.find_spec("matplotlib"):
        for name in ("budget.png", "pretrain.png"):
            png = (tmp_path / name).read_bytes()
            assert png[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">I", png[16:20])[0] == 900
            assert len(png) <= 150_000


@pytest.mark.ddp
def test_ddp_two_ranks_identical_weights(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt")
    r = run_torchrun(NAME, "--preset", "tiny", f"--corpus={corpus}", f"--out_dir={tmp_path}", "--max_iters=6",
                     "--eval_interval=6", "--log_interval=3", "--gradient_accumulation_steps=2")
    assert r.returncode == 0, r
    prints = dict(re.findall(r"rank (\d): weights fingerprint ([0-9a-f]{16})\b", r.output))
    assert set(prints) == {"0", "1"} and prints["0"] == prints["1"], r
    assert (tmp_path / "pretrain.pt").exists()


def fails(m, capsys, argv, code, pattern):
    """main(argv) exits with `code` and one `error:` line matching `pattern`, no traceback."""
    with pytest.raises(SystemExit) as e:
        m.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == code and re.search(pattern, err), err
    assert "Traceback" not in err and err.count("error:") == 1, err


@pytest.mark.parametrize("argv,pattern", [
    (["--no_such_flag=1"], "unknown flag --no_such_flag"),
    (["--n_layer=two"], "--n_layer expects int"),
    (["--mode=sing"], "--mode must be one of pretrain, finetune, distill"),
    (["--mode=finetune", "--task=mnli"], "--task must be one of sst2, not 'mnli'"),
    (["--n_head=3"], r"--n_embd \(128\) must be a multiple of --n_head \(3\)"),
    (["--batch_size=0"], "--batch_size must be > 0"),
    (["--max_len=4"], r"--max_len must be between 8 and --block_size \(512\)"),
    (["--max_len=1000"], r"--max_len must be between 8 and --block_size \(512\)"),
    (["--mlm_prob=0"], "--mlm_prob must be > 0"),
    (["--mlm_prob=1.5"], "--mlm_prob must be at most 1"),
    (["--alpha=2"], "--alpha must be at most 1"),
    (["--temperature=0"], "--temperature must be > 0"),
    (["--dropout=1"], r"--dropout must be in \[0, 1\)"),
    (["--min_lr=0.1"], r"--min_lr \(0.1\) must not exceed --learning_rate"),
    (["--gradient_accumulation_steps=0"], "--gradient_accumulation_steps must be > 0"),
    (["--dtype=float8"], "--dtype must be one of"),
    (["--corpus=wikitext2+"], "--corpus must be wikitext2, wikitext103, sst2 or a text file .*'wikitext2\\+'"),
    (["--mode=distill", "--init_from=x.pt"], "--init_from must be scratch or resume with --mode distill"),
    (["--mode=budget"], "--mode budget needs --init_from: our pretrain.pt or a Hugging Face BERT to compare"),
    (["--budgets=500,lots"], "--budgets must be a comma list of numbers >= 2 and 'all', not '500,lots'"),
    (["--budgets=1"], "--budgets must be a comma list"),
    (["--arms=pretrained,random"], "--arms must be pretrained, scratch or both"),
    (["--lrs=1e-3,-1"], "--lrs must be a comma list of positive numbers"),
    (["--lrs=fast"], "--lrs must be a comma list of positive numbers"),
    (["--n_seeds=0"], "--n_seeds must be > 0"),
])
def test_bad_flags_exit_2(m, capsys, tmp_path, argv, pattern):
    fails(m, capsys, argv + [f"--out_dir={tmp_path}"], 2, pattern)
    assert not list(tmp_path.iterdir()), "a refused flag must not start any work"


def test_help_names_presets_and_flags(m, capsys):
    with pytest.raises(SystemExit) as e:
        m.main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "[--preset tiny|cpu|gpu]" in out
    assert re.search(r"--init_from=scratch +scratch \| resume \| our pretrain \.pt", out), out
    assert re.search(r"--gradient_accumulation_steps=1 +micro-batches per optimizer step, over all ranks", out)


def test_bad_input(m, tmp_path, capsys, monkeypatch):
    bad_vocab = tmp_path / "vocab.txt"
    bad_vocab.write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\nthe\n")
    fails(m, capsys, ["--preset=tiny", f"--vocab={bad_vocab}", f"--out_dir={tmp_path}"], 1, r"lacks \[MASK\]")
    fails(m, capsys, ["--preset=tiny", "--corpus=nope.txt", f"--out_dir={tmp_path / 'o0'}"], 1,
          "--corpus nope.txt: neither wikitext2, wikitext103, sst2 nor an existing text file")
    # offline: nothing in data_dir and the download URLs unreachable (a closed local port). The one message
    # names every file the run needs, the archive that holds them and where to save it.
    monkeypatch.setattr(m, "WIKITEXT_URL", "http://127.0.0.1:9/{name}-raw-v1.zip")
    monkeypatch.setattr(m, "SST2_URL", "http://127.0.0.1:9/SST-2.zip")
    empty = tmp_path / "empty"
    folder = empty / "wikitext-2" / "wikitext-2-raw"
    offline = (r"wikitext-2-raw needs wiki\.train\.raw, wiki\.valid\.raw, wiki\.test\.raw: could not download "
               r"http://127\.0\.0\.1:9/wikitext-2-raw-v1\.zip .*offline, download it by hand from "
               r"http://127\.0\.0\.1:9/wikitext-2-raw-v1\.zip and save it as "
               r"\S*empty/wikitext-2/wikitext-2-raw-v1\.zip")
    fails(m, capsys, ["--preset=tiny", f"--data_dir={empty}", f"--out_dir={tmp_path / 'o1'}"], 1, offline)
    folder.mkdir(parents=True)
    (folder / "wiki.train.raw").write_text(" = A = \n a b . c d .\n")  # one file placed: the same message
    fails(m, capsys, ["--preset=tiny", f"--data_dir={empty}", f"--out_dir={tmp_path / 'o1'}"], 1, offline)
    # only valid + test there (an offline copy of the small splits): the announced fallback, which says why
    (folder / "wiki.train.raw").unlink()
    for split in ("valid", "test"):
        (folder / f"wiki.{split}.raw").write_text("".join(f" = T{i} = \n a b . c d .\n" for i in range(10)))
    train, val, note = m.load_corpus(m.Config(data_dir=str(empty)))
    assert len(train) == 18 and len(val) == 2 and note.startswith("FALLBACK, not the standard split"), note
    assert "wikitext-2-raw-v1.zip" in note and "every 10th article (2) held out" in note
    fails(m, capsys, ["--preset=tiny", "--mode=finetune", f"--vocab={tmp_path / 'ok.txt'}", f"--data_dir={empty}",
                      f"--out_dir={tmp_path / 'o2'}"], 1, "no vocabulary file")
    (tmp_path / "ok.txt").write_text("\n".join(m.SPECIALS + list("abcdefghijklmnopqrstuvwxyz")) + "\n")
    fails(m, capsys, ["--preset=tiny", "--mode=finetune", f"--vocab={tmp_path / 'ok.txt'}", f"--data_dir={empty}",
                      f"--out_dir={tmp_path / 'o2'}"], 1,
          r"sst2 needs train\.tsv, dev\.tsv: could not download http://127\.0\.0\.1:9/SST-2\.zip .*save it as "
          r"\S*empty/sst2/SST-2\.zip")
    # checkpoints: another config, another stage, another script, a pickle that would run code
    c = tmp_path / "c"
    corpus = write_corpus(tmp_path / "corpus.txt", n_docs=8)
    m.main(["--preset=tiny", f"--corpus={corpus}", f"--out_dir={c}", "--max_iters=2", "--eval_interval=2"])
    fails(m, capsys, ["--preset=tiny", f"--corpus={corpus}", f"--out_dir={c}", "--init_from=resume", "--n_embd=64"],
          1, "trained with another model config: n_embd=32")
    fails(m, capsys, ["--preset=tiny", "--mode=distill", f"--out_dir={c}"], 1, "no checkpoint at .*finetune.pt")
    fails(m, capsys, ["--preset=tiny", "--mode=distill", f"--out_dir={c}", f"--teacher={c / 'pretrain.pt'}"], 1,
          r"pretrain\.pt is not a 04_bert\.py finetune checkpoint \(it is: 04_bert pretrain\)")
    (c / "finetune.pt").write_bytes((c / "pretrain.pt").read_bytes())
    fails(m, capsys, ["--preset=tiny", "--mode=finetune", f"--out_dir={c}", "--init_from=resume"], 1,
          r"finetune\.pt is not a 04_bert\.py finetune checkpoint \(it is: 04_bert pretrain\)")
    ckpt = torch.load(c / "pretrain.pt", weights_only=True)
    torch.save({**ckpt, "script": "03_gpt", "stage": "train"}, tmp_path / "gpt.pt")
    fails(m, capsys, ["--preset=tiny", "--mode=finetune", f"--out_dir={c}", f"--init_from={tmp_path / 'gpt.pt'}"], 1,
          r"gpt\.pt is not a 04_bert\.py pretrain checkpoint \(it is: 03_gpt train\)")
    torch.save({**ckpt, "stage": "finetune"}, tmp_path / "ft.pt")  # fine-tuning starts from a pretrained model
    fails(m, capsys, ["--preset=tiny", "--mode=finetune", f"--out_dir={c}", f"--init_from={tmp_path / 'ft.pt'}"], 1,
          r"ft\.pt is not a 04_bert\.py pretrain checkpoint \(it is: 04_bert finetune\)")
    flag = tmp_path / "pwned"
    torch.save(Evil(str(flag)), c / "pretrain.pt")
    fails(m, capsys, ["--preset=tiny", f"--corpus={corpus}", f"--out_dir={c}", "--init_from=resume"], 1,
          r"pretrain\.pt is not a checkpoint this script can read \(UnpicklingError\)")
    assert not flag.exists(), "loading a checkpoint ran code"
    # gradient_accumulation_steps counts micro-batches over all ranks: it must split evenly
    monkeypatch.setattr(m, "setup_ddp", lambda: (0, 0, 2))
    fails(m, capsys, ["--preset=tiny", f"--out_dir={c}", "--gradient_accumulation_steps=3"], 1,
          r"--gradient_accumulation_steps 3 must be a multiple of the number of ranks \(2\)")


class Evil:
    """A pickle that would create a file when unpickled (weights_only=True must refuse it)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_downloads_refuse_wrong_content(m, tmp_path, http_server, monkeypatch, capsys):
    """A proxy's HTML page with status 200 in place of a file is refused and deleted, naming the URL."""
    site = tmp_path / "site"
    hub = site / "tiny-bert" / "resolve" / "main"
    hub.mkdir(parents=True)
    page = "<!DOCTYPE html><html><body>Sign in to the network</body></html>"
    for name in ("config.json", "vocab.txt", "model.safetensors", "SST-2.zip", "wikitext-2-raw-v1.zip"):
        (hub / name).write_text(page)
        (site / name).write_text(page)
    base = http_server(site)
    monkeypatch.setenv("HF_ENDPOINT", base)
    monkeypatch.setattr(m, "SST2_URL", base + "/SST-2.zip")
    monkeypatch.setattr(m, "WIKITEXT_URL", base + "/{name}-raw-v1.zip")
    data = tmp_path / "data"
    fails(m, capsys, ["--preset=tiny", "--mode=finetune", "--init_from=tiny-bert", f"--data_dir={data}",
                      f"--out_dir={tmp_path / 'o'}"], 1,
          r"/tiny-bert/resolve/main/config\.json did not send the expected file \(it is an HTML page\)")
    fails(m, capsys, ["--preset=tiny", "--mode=finetune", f"--vocab={tmp_path / 'v.txt'}", f"--data_dir={data}",
                      f"--out_dir={tmp_path / 'o'}"], 1, "no vocabulary file")
    (tmp_path / "v.txt").write_text("\n".join(m.SPECIALS + list("abc")) + "\n")
    fails(m, capsys, ["--preset=tiny", "--mode=finetune", f"--vocab={tmp_path / 'v.txt'}", f"--data_dir={data}",
                      f"--out_dir={tmp_path / 'o'}"], 1, r"SST-2\.zip did not send the expected file \(it does not "
                                                        r"start with b'PK\\x03\\x04'\)")
    fails(m, capsys, ["--preset=tiny", f"--data_dir={data}", f"--out_dir={tmp_path / 'o'}"], 1,
          r"wikitext-2-raw-v1\.zip did not send the expected file")
    assert [p for p in data.rglob("*") if p.is_file()] == [], "a refused download left a file behind"
    # a safetensors header that claims more bytes than the file has: an error, not a huge allocation
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(struct.pack("<Q", 1 << 40) + b'{"a": 1}')
    with pytest.raises(m.UserError, match=r"not a safetensors file \(a header of 1099511627776 bytes in a file of"):
        m.load_safetensors(bad)
    bad.write_bytes(b"\x01")
    with pytest.raises(m.UserError, match="not a safetensors file"):
        m.load_safetensors(bad)


# --- data: downloads (local server) and the real files --------------------------------------------
def test_downloads_from_local_server(m, tmp_path, http_server, monkeypatch):
    site = tmp_path / "site"
    site.mkdir()
    wiki = " = Alpha = \n \n Alpha is a letter . It comes first .\n \n = = Use = = \n Used a lot . \n"
    with zipfile.ZipFile(site / "wikitext-2-raw-v1.zip", "w") as z:
        for s in ("train", "valid", "test"):
            z.writestr(f"wikitext-2-raw/wiki.{s}.raw", wiki * 2 + wiki.replace("Alpha", "Beta"))
    with zipfile.ZipFile(site / "SST-2.zip", "w") as z:
        for s in ("train", "dev"):
            z.writestr(f"SST-2/{s}.tsv", "sentence\tlabel\nit 's good . \t1\nbad \t0\n")
    base = http_server(site)
    monkeypatch.setattr(m, "WIKITEXT_URL", base + "/{name}-raw-v1.zip")
    monkeypatch.setattr(m, "SST2_URL", base + "/SST-2.zip")
    cfg = m.Config(data_dir=str(tmp_path / "data"))
    train, val, note = m.load_corpus(cfg)
    assert "FALLBACK" not in note and len(train) == 3 and len(val) == 3
    assert train[0] == ["Alpha is a letter .", "It comes first .", "Used a lot ."]
    sst = m.read_sst2(cfg.data_dir)
    assert sst["train"] == [("it 's good .", 1), ("bad", 0)]
    assert (tmp_path / "data" / "sst2" / "dev.tsv").exists()
    assert not list((tmp_path / "data").rglob("*.part"))


@pytest.mark.data
def test_real_data_prepare(m, data_dir, monkeypatch):
    root = data_dir("wikitext-2")
    if not (root / "sst2").exists():
        pytest.skip("no sst2 in LLM_DATA_DIR")
    monkeypatch.setattr(m, "WIKITEXT_URL", "http://127.0.0.1:9/{name}.zip")  # never the real network
    cfg = m.Config(data_dir=str(root))
    train, val, note = m.load_corpus(cfg)
    if not (root / "wikitext-2" / "wikitext-2-raw" / "wiki.train.raw").exists():
        assert note.startswith("FALLBACK") and "wiki.valid.raw + wiki.test.raw" in note
    assert len(train) > 50 and len(val) > 5 and all(len(d) >= 1 for d in train)
    assert not any("@-@" in s or s.startswith("=") for d in train for s in d)
    sentences = [s for d in train[:10] for s in d]
    assert len(sentences) > 200 and sum(s.endswith((" .", " ?", " !")) for s in sentences) > 0.9 * len(sentences)
    sst = m.read_sst2(cfg.data_dir)
    assert len(sst["train"]) == 67349 and len(sst["dev"]) == 872
    assert sum(y for _, y in sst["dev"]) == 444 and sst["train"][0] == ("hide new secretions from the parental units", 0)
    tok = m.BertTokenizer(m.train_wordpiece(sentences, 500))
    words = m.basic_tokenize(sst["dev"][0][0])
    assert len(tok.encode(sst["dev"][0][0])) >= len(words) == 10
