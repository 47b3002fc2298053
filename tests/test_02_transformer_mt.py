"""Tests for 02_transformer_mt.py: attention and multi-head attention against PyTorch, masks,
position encodings, incremental decoding, BLEU against sacreBLEU's known answers, BPE, the batcher,
a learning test, and the CLI (train, resume, translate, attention, sweep, DDP) and its bad input (flag
values, foreign / truncated / unsafe checkpoints, a proxy's HTML page instead of a download, offline data)."""
import gzip
import hashlib
import importlib.util
import json
import math
import random
import re
import sys
from collections import Counter

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import load_script, run_script, run_torchrun

NAME = "02_transformer_mt"


@pytest.fixture(scope="module")
def mod():
    return load_script(NAME)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices run fastest on one thread, the CI machine is shared, and the in-process run
    must match the subprocesses (OMP_NUM_THREADS=1) bit for bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_model(mod, pos="sinusoidal", norm="post", vocab=40, d=32, heads=4, layers=2, dropout=0.0):
    torch.manual_seed(0)
    return mod.Transformer(vocab, d, heads, layers, 2 * d, dropout, norm, pos, max_rel_dist=4, block_size=64).eval()


# --- attention ------------------------------------------------------------------------------------
def test_attention_equals_torch_sdpa(mod):
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 8)
    bool_mask = torch.rand(2, 1, 5, 7) > 0.3
    bool_mask[..., 0] = True  # every query keeps at least one key
    float_mask = torch.randn(3, 5, 7)
    for mask in (None, bool_mask, float_mask):
        out, w = mod.scaled_dot_product_attention(q, k, v, mask)
        torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
        torch.testing.assert_close(w.sum(-1), torch.ones(2, 3, 5))
    _, w = mod.scaled_dot_product_attention(q, k, v, bool_mask)
    assert (w[~bool_mask.expand_as(w)] == 0).all()  # masked keys get exactly zero weight
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    assert torch.autograd.gradcheck(lambda a, b, c: mod.scaled_dot_product_attention(a, b, c, bool_mask)[0],
                                    (q64, k64, v64))


@pytest.mark.parametrize("cross", [False, True])
def test_multihead_attention_equals_nn_multiheadattention(mod, cross):
    torch.manual_seed(0)
    C, nh, B, T, S = 16, 4, 2, 5, 6
    ref = nn.MultiheadAttention(C, nh, batch_first=True)
    mine = mod.MultiHeadAttention(C, nh)
    with torch.no_grad():
        for i, lin in enumerate((mine.q_proj, mine.k_proj, mine.v_proj)):
            lin.weight.copy_(ref.in_proj_weight[i * C:(i + 1) * C])
            lin.bias.copy_(ref.in_proj_bias[i * C:(i + 1) * C])
        mine.out_proj.weight.copy_(ref.out_proj.weight)
        mine.out_proj.bias.copy_(ref.out_proj.bias)
    x = torch.randn(B, T, C, requires_grad=True)
    ctx = torch.randn(B, S, C, requires_grad=True) if cross else None
    kv = ctx if cross else x
    pad = torch.zeros(B, kv.size(1), dtype=torch.bool)
    pad[0, -2:] = True  # the last two keys of the first sequence are padding
    ref_out, ref_w = ref(x, kv, kv, key_padding_mask=pad, average_attn_weights=False)
    mine.record_weights = True
    out = mine(x, context=ctx, mask=~pad[:, None, None, :])
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(mine.attn_weights, ref_w)
    g = torch.randn_like(out)
    grads_ref = torch.autograd.grad(ref_out, [x, ref.in_proj_weight, ref.out_proj.weight], g)
    grads = torch.autograd.grad(out, [x, mine.q_proj.weight, mine.out_proj.weight], g)
    torch.testing.assert_close(grads[0], grads_ref[0])
    torch.testing.assert_close(grads[1], grads_ref[1][:C])
    torch.testing.assert_close(grads[2], grads_ref[2])


# --- masks and positions --------------------------------------------------------------------------
@pytest.mark.parametrize("pos", ["sinusoidal", "learned", "relative", "rope"])
def test_masks(mod, pos):
    model = small_model(mod, pos)
    src = torch.tensor([[5, 6, 7, mod.EOS, mod.PAD, mod.PAD], [5, 6, 7, 8, 9, mod.EOS]])
    tgt = torch.tensor([[mod.BOS, 10, 11, 12, 13], [mod.BOS, 14, 15, 16, 17]])
    attn = [l.self_attn for l in model.encoder] + [l.cross_attn for l in model.decoder]
    for m in attn:
        m.record_weights = True
    logits = model(src, tgt)
    for m in attn:  # a padded source position gets no attention, from the encoder or the decoder
        assert (m.attn_weights[0, :, :, 4:] == 0).all() and (m.attn_weights[1] > 0).all()
    # padding does not change the other positions: the same sentence without its pads
    short = model(src[:1, :4], tgt[:1])
    torch.testing.assert_close(short, logits[:1])
    # causal: changing target tokens after t leaves the outputs at 0..t unchanged
    changed = tgt.clone()
    changed[:, 3:] = 20
    logits2 = model(src, changed)
    torch.testing.assert_close(logits2[:, :3], logits[:, :3])
    assert not torch.allclose(logits2[:, 3:], logits[:, 3:])


@pytest.mark.parametrize("pos", ["sinusoidal", "learned", "relative", "rope"])
@pytest.mark.parametrize("norm", ["post", "pre"])
def test_cached_decoding_equals_full_decoding(mod, pos, norm):
    model = small_model(mod, pos, norm)
    src = torch.tensor([[5, 6, 7, mod.EOS, mod.PAD], [5, 6, 7, 8, mod.EOS]])
    tgt = torch.tensor([[mod.BOS, 10, 11, 12, 13, 14], [mod.BOS, 14, 15, 16, 17, 18]])
    memory, src_mask = model.encode(src)
    full = model.decode(tgt, memory, src_mask)
    cache = model.new_cache()
    steps = [model.decode(tgt[:, t:t + 1], memory, src_mask, cache, start=t) for t in range(tgt.size(1))]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_sinusoidal_dot_product_depends_only_on_offset(mod):
    pe = mod.sinusoidal_encoding(200, 64).double()
    for k in (0, 1, 7, 30):
        dots = torch.stack([pe[p] @ pe[p + k] for p in range(0, 150, 10)])
        torch.testing.assert_close(dots, dots[:1].expand_as(dots), atol=1e-4, rtol=0)
    assert not torch.allclose(pe[0] @ pe[1], pe[0] @ pe[9])


def test_rope_dot_product_depends_only_on_offset(mod):
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 16, dtype=torch.float64), torch.randn(1, 1, 1, 16, dtype=torch.float64)
    def score(m, n):
        return (mod.rope(q, torch.tensor([m])) * mod.rope(k, torch.tensor([n]))).sum()
    for offset in (0, 3, 11):
        ref = score(offset, 0)
        for m in (5, 17, 40):
            torch.testing.assert_close(score(m + offset, m), ref, atol=1e-5, rtol=1e-5)  # float32 angles
    assert not torch.allclose(score(3, 0), score(4, 0))
    torch.testing.assert_close(mod.rope(q, torch.tensor([7])).norm(), q.norm())  # a rotation


# --- BLEU (known answers from sacreBLEU 2.6.0; the same cases as tests/test_01_*) -----------------
BLEU_CASES = [  # (hypotheses, references, sacreBLEU 2.6.0 score)
    (["The cat sat on the mat."], ["The cat sat on the mat."], 100.0),
    (["a b c d e"], ["f g h i j"], 0.0),  # no match at all
    (["the cat"], ["the cat"], 0.0),  # no 3-grams in the hypothesis: BLEU-4 is 0
    (["Two men are playing guitar.", "A dog runs in the grass."],
     ["Two men play guitars.", "A brown dog is running through the grass."], 17.689636017443917),
    (["It costs 3.50 dollars, or 1,000 yen - cheap!"],
     ["It costs $3.50, or 1,000 yen -- very cheap!"], 29.81247384881109),  # 13a keeps 3.50 and 1,000
    (["Ein Mann fährt Fahrrad.", "Zwei Hunde &amp; eine Katze."],
     ["Ein Mann fährt ein Fahrrad.", "Zwei Hunde und eine Katze."], 33.12307792537459),
]


@pytest.mark.parametrize("hyps,refs,expected", BLEU_CASES)
def test_corpus_bleu_matches_sacrebleu(mod, hyps, refs, expected):
    assert mod.corpus_bleu(hyps, refs) == pytest.approx(expected, abs=1e-9)


def test_corpus_bleu_hand_worked(mod):
    # hyp "the cat is on the mat" (6 tokens) vs ref "there is a cat on the mat" (7 tokens)
    # 1-grams: the, cat, is, on, the, mat -> 5 of 6 in the reference ("the" clipped to 1)
    # 2-grams: "on the", "the mat" match -> 2 of 5;  3-grams: "on the mat" -> 1 of 4;  4-grams: 0 of 3
    # exponential smoothing: p4 = 1 / (2 * 3);  brevity penalty exp(1 - 7/6)
    p = [5 / 6, 2 / 5, 1 / 4, 1 / 6]
    expected = 100 * math.exp(1 - 7 / 6) * math.exp(sum(map(math.log, p)) / 4)
    bleu = mod.corpus_bleu(["the cat is on the mat"], ["there is a cat on the mat"])
    assert bleu == pytest.approx(expected, abs=1e-9)
    assert expected == pytest.approx(29.0592540808, abs=1e-8)  # sacreBLEU 2.6.0 agrees


def test_tokenize_13a(mod):
    assert mod.tokenize_13a("It costs $3.50, or 1,000 yen -- very cheap!") == \
        ["It", "costs", "$", "3.50", ",", "or", "1,000", "yen", "--", "very", "cheap", "!"]


# --- BPE and batching -----------------------------------------------------------------------------
CORPUS = ["Ein Mann fährt Fahrrad.", "Zwei Hunde spielen im Schnee.", "Eine Frau trägt eine große Tasche.",
          "A man rides a bike.", "Two dogs play in the snow.", "A woman carries a big bag."] * 5
TRICKY = ["Straße, Größe: über 3.50 €!", "  two  spaces\tand a tab\nnewline ", "emoji 😀 and 中文 and e\u0301",
          "snake_case__x", "", "ß" * 20, "\u00a0non-breaking\u202fspaces"]


def naive_bpe(texts, vocab_size, mod):
    """Reference: recount every pair after every merge; most frequent pair, ties to the smallest."""
    words = Counter(tuple(b + mod.N_SPECIAL for b in c.encode()) for t in texts for c in mod.PRETOKENIZE.findall(t))
    merges = []
    while len(merges) < vocab_size - mod.N_SPECIAL - 256:
        pairs = Counter()
        for w, f in words.items():
            for p in zip(w, w[1:]):
                pairs[p] += f
        if not pairs:
            break
        pair = min(pairs, key=lambda p: (-pairs[p], p))
        if pairs[pair] < 2:
            break
        merges.append(pair)
        new_id = mod.N_SPECIAL + 256 + len(merges) - 1
        words = Counter({tuple(mod._merge(list(w), pair, new_id)): f for w, f in words.items()})
    return merges


def test_bpe_learns_like_the_naive_algorithm_and_round_trips(mod):
    merges = mod.train_bpe(CORPUS, 340)
    assert merges == naive_bpe(CORPUS, 340, mod)
    tok = mod.BPETokenizer(merges)
    for s in CORPUS + TRICKY:
        assert "".join(mod.PRETOKENIZE.findall(s)) == s  # the pre-tokenizer drops nothing
        assert tok.decode(tok.encode(s)) == s
        assert all(mod.N_SPECIAL <= i < mod.N_SPECIAL + 256 + len(merges) for i in tok.encode(s))
    assert len(tok.encode(CORPUS[0])) < len(CORPUS[0].encode()) / 2  # merges compress seen text
    with pytest.raises(ValueError, match="vocab_size must be at least 259"):
        mod.train_bpe(CORPUS, 100)


def test_batcher_budget_coverage_and_ranks(mod):
    rng = random.Random(0)
    src = [rng.randint(1, 60) for _ in range(1000)]
    tgt = [max(1, s + rng.randint(-5, 5)) for s in src]
    batches = mod.make_batches(src, tgt, 300, random.Random(1))
    assert sorted(i for b in batches for i in b) == list(range(1000))  # each example exactly once
    assert all(len(b) * max(max(src[i], tgt[i]) for i in b) <= 300 for b in batches)
    fixed_size = round(1000 / len(batches))
    fixed = [list(range(j, min(j + fixed_size, 1000))) for j in range(0, 1000, fixed_size)]
    assert mod.padding_fraction(batches, src, tgt) < 0.5 * mod.padding_fraction(fixed, src, tgt)
    for world in (2, 3, 7):
        batches = mod.make_batches(src, tgt, 300, random.Random(1), world)
        shares = [batches[r::world] for r in range(world)]
        assert len({len(s) for s in shares}) == 1  # same number of steps on every rank
        seen = [i for s in shares for b in s for i in b]
        assert sorted(seen) == list(range(1000))  # disjoint and complete


# --- learning -------------------------------------------------------------------------------------
@pytest.mark.learning
def test_learns_to_reverse_and_beam1_equals_greedy(mod):
    """Bar from seeds 0-9 on both kernel paths: at a constant rate after warmup the worst seed reached
    0.70; with a cosine decay to 0.1x the worst is 0.995."""
    torch.manual_seed(0)
    model = mod.Transformer(16, 64, 4, 2, 128, 0.0, "pre", "sinusoidal", block_size=16)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, betas=(0.9, 0.98), eps=1e-9)
    warmup = torch.optim.lr_scheduler.LambdaLR(  # linear warmup, then cosine to 0.1x
        opt, lambda s: min(1.0, (s + 1) / 50) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, 250) / 250))))

    def batch(n):
        seqs = torch.randint(3, 16, (n, 6))
        rev = seqs.flip(1)
        eos = torch.full((n, 1), mod.EOS)
        return torch.cat([seqs, eos], 1), torch.cat([torch.full((n, 1), mod.BOS), rev], 1), torch.cat([rev, eos], 1)

    for step in range(250):
        src, tgt_in, tgt_out = batch(64)
        loss = F.cross_entropy(model(src, tgt_in).flatten(0, 1), tgt_out.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        warmup.step()
    model.eval()
    src, _, tgt_out = batch(200)
    greedy = mod.greedy_decode(model, src, 10)
    exact = (greedy[:, :7] == tgt_out).all(1).float().mean().item()
    assert exact >= 0.95, f"reverse task exact match {exact:.2%} after 250 steps"
    assert torch.equal(mod.beam_search(model, src, 10, beam_size=1), greedy)
    beam = mod.beam_search(model, src, 10, beam_size=3)
    assert (beam[:, :7] == tgt_out).all(1).float().mean().item() >= 0.95


def test_learning_rate_schedule(mod):
    cfg = mod.Config(learning_rate=1e-3, warmup_iters=100)
    assert mod.get_lr(cfg, 50) == pytest.approx(5e-4)
    assert mod.get_lr(cfg, 100) == pytest.approx(1e-3)
    assert mod.get_lr(cfg, 400) == pytest.approx(5e-4)  # 1/sqrt(step) decay
    # the paper's formula, d^-0.5 min(step^-0.5, step warmup^-1.5), is the same curve
    paper = lambda s: 512 ** -0.5 * min(s ** -0.5, s * 4000 ** -1.5)
    cfg = mod.Config(learning_rate=paper(4000), warmup_iters=4000)
    for s in (1, 1000, 4000, 20000):
        assert mod.get_lr(cfg, s) == pytest.approx(paper(s))


# --- data -----------------------------------------------------------------------------------------
def write_tsv(path, n=240):
    rng = random.Random(0)
    words = {"Hund": "dog", "Katze": "cat", "Mann": "man", "Frau": "woman", "läuft": "runs", "schläft": "sleeps",
             "groß": "big", "klein": "small"}
    de = list(words)
    lines = []
    for _ in range(n):
        a, b = rng.choice(de[:4]), rng.choice(de[4:6])
        lines.append(f"Der {a} {b}.\tThe {words[a]} {words[b]}.")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_download_multi30k_from_local_server(mod, tmp_path, http_server, monkeypatch):
    served = tmp_path / "served"
    served.mkdir()
    for split, n in (("train", 4), ("val", 2), ("test_2016_flickr", 2)):
        for lang in ("de", "en"):
            with gzip.open(served / f"{split}.{lang}.gz", "wt", encoding="utf-8") as f:
                f.write("".join(f"{split} {lang} satz {i} ü\n" for i in range(n)))
    base = http_server(served)
    monkeypatch.setattr(mod, "MULTI30K_URL", base + "/{name}.gz")
    pinned = hashlib.sha256((served / "val.de.gz").read_bytes()).hexdigest()
    monkeypatch.setattr(mod, "MULTI30K_SHA256", {"val.de": pinned})
    cfg = mod.Config(data_dir=str(tmp_path / "data"))
    corpus = mod.load_multi30k(cfg)
    assert corpus["train"][0][3] == "train de satz 3 ü" and len(corpus["test"][1]) == 2
    assert not list((tmp_path / "data" / "multi30k").glob("*.part"))
    monkeypatch.setattr(mod, "MULTI30K_SHA256", {"train.de": "0" * 64})  # a corrupt download is refused
    (tmp_path / "data" / "multi30k" / "train.de.gz").unlink()
    with pytest.raises(mod.UserError, match="did not send the expected file .sha256"):
        mod.load_multi30k(cfg)
    assert not (tmp_path / "data" / "multi30k" / "train.de.gz").exists()


@pytest.mark.data
def test_real_multi30k_prepares(mod, data_dir, tmp_path):
    cfg = mod.Config(data_dir=str(data_dir("multi30k")), out_dir=str(tmp_path))
    corpus = mod.load_multi30k(cfg)
    assert {k: len(v[0]) for k, v in corpus.items()} == {"train": 29000, "val": 1014, "test": 1000}
    assert corpus["train"][0][0] == "Zwei junge weiße Männer sind im Freien in der Nähe vieler Büsche."
    assert corpus["train"][1][0] == "Two young, White males are outside near many bushes."
    tok = mod.BPETokenizer(mod.train_bpe(corpus["train"][0][:1500] + corpus["train"][1][:1500], 1000))
    for s in corpus["val"][0] + corpus["val"][1]:
        assert tok.decode(tok.encode(s)) == s


# --- CLI ------------------------------------------------------------------------------------------
def read_log(out_dir):
    return [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]


def test_cli_train_resume_translate_attention(mod, tmp_path, capsys, monkeypatch):
    tsv = write_tsv(tmp_path / "pairs.tsv")
    common = ["--preset", "tiny", f"--dataset=tsv:{tsv}", "--always_save_checkpoint", "--eval_interval=10"]
    # an interrupted run: 10 steps in one process, 10 more after --init_from=resume in another
    out = tmp_path / "interrupted"
    r = run_script(NAME, *common, f"--out_dir={out}", "--max_iters=10")
    assert r.returncode == 0, r
    assert (out / "ckpt.pt").exists() and "test BLEU" in r.output
    r = run_script(NAME, *common, f"--out_dir={out}", "--max_iters=20", "--init_from=resume")
    assert r.returncode == 0, r
    assert "resumed from" in r.output
    # the same 20 steps uninterrupted, in this process (one thread, as the subprocesses)
    mod.main([*common, f"--out_dir={tmp_path / 'straight'}", "--max_iters=20"])
    # the learning curve (step 0, then every evaluation) continues exactly where it stopped
    curve = [{k: e[k] for k in ("step", "val_loss", "val_bleu")} for e in read_log(out) if "val_loss" in e]
    straight = [{k: e[k] for k in ("step", "val_loss", "val_bleu")}
                for e in read_log(tmp_path / "straight") if "val_loss" in e]
    assert [e["step"] for e in curve] == [0, 10, 20] and curve == straight
    assert curve[0]["val_loss"] > curve[-1]["val_loss"]
    assert read_log(out)[-1]["test_bleu"] == read_log(tmp_path / "straight")[-1]["test_bleu"]
    if importlib.util.find_spec("matplotlib"):  # bleu.png: drawn from the whole run, 900 px wide (README width)
        for run in (out, tmp_path / "straight"):
            png = (run / "bleu.png").read_bytes()
            assert png[:8] == b"\x89PNG\r\n\x1a\n" and int.from_bytes(png[16:20], "big") == 900
            assert len(png) <= 150_000
    # resuming the finished run evaluates step 20 again: the figure keeps one point per step
    mod.main([*common, f"--out_dir={out}", "--max_iters=20", "--init_from=resume"])
    assert [e["step"] for e in read_log(out) if "val_bleu" in e] == [0, 10, 20, 20]
    capsys.readouterr()
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # not installed: the run still ends, with a hint
    assert [e["step"] for e in mod.plot_bleu(mod.parse_args([*common, f"--out_dir={out}"]))] == [0, 10, 20]
    assert "pip install matplotlib to get bleu.png" in capsys.readouterr().out
    monkeypatch.undo()
    capsys.readouterr()
    # translate and attention from the checkpoint
    mod.main([*common, f"--out_dir={out}", "--mode=translate", "--text=Der Hund läuft."])
    assert capsys.readouterr().out.count("\n") == 1  # one translation line (20 steps: maybe empty)
    mod.main([*common, f"--out_dir={out}", "--mode=bleu"])  # the test split again, from the checkpoint
    bleu = float(re.search(r"test BLEU ([\d.]+)", capsys.readouterr().out).group(1))
    assert bleu == pytest.approx(read_log(out)[-1]["test_bleu"], abs=0.005)
    mod.main([*common, f"--out_dir={out}", "--mode=attention", "--text=Die Katze schläft."])
    assert "wrote" in capsys.readouterr().out
    for kind in ("encoder", "decoder", "cross"):
        assert (out / f"attention_{kind}.png").read_bytes()[:4] == b"\x89PNG"
    # a checkpoint of another config is refused with a message
    with pytest.raises(SystemExit) as e:
        mod.main([*common, f"--out_dir={out}", "--mode=translate", "--d_model=64"])
    assert e.value.code == 1 and "another model config: d_model=32" in capsys.readouterr().err


def test_evaluating_more_often_does_not_change_training(mod, tmp_path):
    # the val BLEU decodes (rank 0 only) and val losses draw no random numbers: the same run evaluated
    # every 4 steps or only at its end ends with the same weights, so the same val loss and test BLEU
    tsv = write_tsv(tmp_path / "pairs.tsv")
    ends = []
    for every in (4, 20):
        m = mod.main(["--preset", "tiny", f"--dataset=tsv:{tsv}", f"--out_dir={tmp_path / str(every)}",
                      "--max_iters=20", f"--eval_interval={every}"])
        ends.append((m["val_loss"], m["test_bleu"]))
        assert [e["step"] for e in read_log(tmp_path / str(every)) if "val_bleu" in e] == list(range(0, 21, every))
    assert ends[0] == ends[1]


def test_sweep_writes_a_table(mod, tmp_path, capsys):
    tsv = write_tsv(tmp_path / "pairs.tsv", 120)
    mod.main(["--preset", "tiny", f"--dataset=tsv:{tsv}", f"--out_dir={tmp_path}", "--mode=sweep",
              "--sweep_heads=1,2", "--sweep_d_model=16", "--max_iters=3", "--beam_size=1"])
    rows = [[c.strip() for c in l.split("|")[1:-1]] for l in (tmp_path / "sweep.md").read_text().splitlines()
            if re.match(r"\| \d", l)]
    assert [r[:2] for r in rows] == [["1", "16"], ["2", "16"]]
    n_params = sum(p.numel() for p in mod.Transformer(512, 16, 1, 1, 64).parameters())  # tiny: V 512, 1 layer
    for n_head, _, params, val_loss, bleu, _ in rows:  # each row is its run's own log
        log = read_log(tmp_path / f"h{n_head}_d16")
        assert params == f"{n_params / 1e6:.2f}M" and val_loss == f"{log[-2]['val_loss']:.3f}"
        assert bleu == f"{log[-1]['test_bleu']:.2f}" and log[-1]["beam_size"] == 1


@pytest.mark.ddp
def test_ddp_two_ranks_end_with_identical_weights(tmp_path):
    tsv = write_tsv(tmp_path / "pairs.tsv")
    # gradient_accumulation_steps counts micro-batches over all ranks: 2 = one per rank and step
    r = run_torchrun(NAME, "--preset", "tiny", f"--dataset=tsv:{tsv}", f"--out_dir={tmp_path}", "--max_iters=6",
                     "--beam_size=1", "--gradient_accumulation_steps=2")
    assert r.returncode == 0, r
    prints = dict(re.findall(r"rank (\d): final weights fingerprint ([0-9a-f]{16})", r.output))  # ranks interleave
    assert set(prints) == {"0", "1"} and prints["0"] == prints["1"], r.output
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 6 and ckpt["script"] == NAME and ckpt["stage"] == "train"


# --- bad input ------------------------------------------------------------------------------------
def error_lines(text):
    return [line for line in text.splitlines() if "error:" in line]


@pytest.mark.parametrize("flags,named", [
    (["--block_size=0"], "--block_size must be > 0"),
    (["--eval_interval=0"], "--eval_interval must be > 0"),
    (["--learning_rate=-1"], "--learning_rate must be > 0"),
    (["--max_tokens=0"], "--max_tokens must be > 0"),
    (["--gradient_accumulation_steps=0"], "--gradient_accumulation_steps must be > 0"),
    (["--warmup_iters=0"], "--warmup_iters must be > 0"),
    (["--beam_size=0"], "--beam_size must be > 0"),
    (["--dropout=1"], "--dropout must be in [0, 1)"),
    (["--label_smoothing=nan"], "--label_smoothing must be in [0, 1)"),
    (["--mode=nope"], "--mode must be one of train, translate"),
    (["--pos=alibi"], "--pos must be one of sinusoidal"),
    (["--src_lang=xx"], "--src_lang must be one of de, en, fr, cs"),
    (["--dtype=float8"], "--dtype must be one of auto"),
    (["--vocab_size=100"], "--vocab_size must be at least 259"),
    (["--max_tokens=64"], "--max_tokens=64 must be at least --block_size=128"),
    (["--d_model=30", "--n_head=4"], "--d_model=30 is not divisible by --n_head=4"),
    (["--pos=rope", "--d_model=6", "--n_head=2"], "--pos=rope needs an even d_model / n_head"),
    (["--d_model=33", "--n_head=1"], "--pos=sinusoidal needs an even d_model"),
    (["--dataset=wmt14"], "--dataset must be multi30k or tsv:PATH"),
    (["--mode=sweep", "--sweep_heads=1,x"], "--sweep_heads and --sweep_d_model must be comma-separated positive"),
    (["--mode=sweep", "--sweep_heads=2,3", "--sweep_d_model=16"], "--sweep_d_model=16 is not divisible by --sweep_"),
])
def test_bad_flag_values_exit_2_naming_the_flag(mod, capsys, flags, named):
    with pytest.raises(SystemExit) as e:
        mod.parse_args(["--preset", "tiny", *flags])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(error_lines(err)) == 1 and named in err, err


def test_sweep_checks_its_own_grid_not_n_head(mod):
    cfg = mod.parse_args(["--preset=tiny", "--mode=sweep", "--n_head=3", "--sweep_heads=1,2", "--sweep_d_model=16"])
    assert mod.sweep_grid(cfg) == [(1, 16), (2, 16)]


def test_help_explains_the_flags(mod, capsys):
    with pytest.raises(SystemExit) as e:
        mod.parse_args(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "--preset=cpu" in out
    assert re.search(r"--beam_size=4 +beam width \(1 = greedy\)", out)
    assert re.search(r"--gradient_accumulation_steps=1 +micro-batches per optimizer step, over all ranks", out)


def test_bad_input(mod, tmp_path, capsys, http_server, monkeypatch):
    with pytest.raises(SystemExit) as e:
        mod.parse_args(["--n_layers=3"])
    assert e.value.code == 2 and "unknown flag --n_layers" in capsys.readouterr().err
    bad = tmp_path / "bad.tsv"
    bad.write_text("Hallo\tHello\nnur eine Spalte\nTschüss\tBye\n", encoding="utf-8")
    with pytest.raises(SystemExit) as e:
        mod.main(["--preset", "tiny", f"--dataset=tsv:{bad}", f"--out_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert e.value.code == 1 and f"{bad}, line 2" in err and "Traceback" not in err
    # no pair fits in the block: one line, not an endless search for a batch
    with pytest.raises(SystemExit) as e:
        mod.main(["--preset", "tiny", f"--dataset=tsv:{write_tsv(tmp_path / 'ok.tsv')}", "--block_size=2",
                  f"--out_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert e.value.code == 1 and error_lines(err) == [f"{NAME}.py: error: no sentence pair of the split fits in "
                                                      "--block_size=2 tokens"]
    # micro-batches that do not divide among the ranks
    monkeypatch.setattr(mod, "setup_ddp", lambda: (0, 0, 2))
    with pytest.raises(SystemExit) as e:
        mod.main(["--preset", "tiny", f"--dataset=tsv:{tmp_path / 'ok.tsv'}", f"--out_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert e.value.code == 1 and "--gradient_accumulation_steps=1 counts micro-batches over all ranks" in err
    monkeypatch.undo()
    # missing data offline: nothing in data_dir and the download server answers 404
    empty = tmp_path / "empty"
    empty.mkdir()
    base = http_server(empty)
    monkeypatch.setattr(mod, "MULTI30K_URL", base + "/{name}.gz")
    with pytest.raises(SystemExit) as e:
        mod.main(["--preset", "tiny", f"--data_dir={tmp_path / 'nodata'}", f"--out_dir={tmp_path}"])
    err = capsys.readouterr().err
    path = tmp_path / "nodata" / "multi30k" / "train.de.gz"
    assert e.value.code == 1 and len(error_lines(err)) == 1 and "could not download" in err
    assert f"download it by hand from {base}/train.de.gz and save it as {path}" in err
    with pytest.raises(SystemExit) as e:
        mod.main(["--preset", "tiny", "--mode=translate", f"--out_dir={tmp_path / 'nothing'}"])
    assert e.value.code == 1 and "no checkpoint" in capsys.readouterr().err


def test_a_proxy_page_instead_of_a_gzip_file_is_refused(mod, tmp_path, capsys, http_server, monkeypatch):
    """--src_lang=fr has no pinned checksum: a captive portal's HTML page, sent with status 200, must
    not be kept as train.fr.gz (it would fail every later run with gzip.BadGzipFile)."""
    served = tmp_path / "served"
    served.mkdir()
    (served / "train.fr.gz").write_text("<!DOCTYPE html><html><body>Please log in</body></html>\n")
    monkeypatch.setattr(mod, "MULTI30K_URL", http_server(served) + "/{name}.gz")
    with pytest.raises(SystemExit) as e:
        mod.main(["--preset", "tiny", "--src_lang=fr", f"--data_dir={tmp_path / 'data'}", f"--out_dir={tmp_path}"])
    err = capsys.readouterr().err
    url = mod.MULTI30K_URL.format(name="train.fr")
    assert e.value.code == 1 and "Traceback" not in err
    assert error_lines(err) == [line for line in err.splitlines() if url in line and "did not send the expected file"
                                in line and "b'\\x1f\\x8b'" in line], err
    assert list((tmp_path / "data" / "multi30k").iterdir()) == []  # neither the page nor a .part is left


def test_foreign_truncated_and_unsafe_checkpoints_are_refused(mod, tmp_path, capsys):
    ckpt = tmp_path / "ckpt.pt"
    translate = ["--preset", "tiny", "--mode=translate", f"--out_dir={tmp_path}"]

    def refused():
        with pytest.raises(SystemExit) as e:
            mod.main(translate)
        err = capsys.readouterr().err
        assert e.value.code == 1 and len(error_lines(err)) == 1 and "Traceback" not in err, err
        return err

    torch.save({"script": "03_gpt", "stage": "train", "model": {}, "config": {}}, ckpt)
    assert f"{ckpt} is not a {NAME}.py train checkpoint (it is: 03_gpt train)" in refused()
    torch.save({"script": NAME, "stage": "sweep", "model": {}, "config": {}}, ckpt)
    assert "(it is: 02_transformer_mt sweep)" in refused()
    ckpt.write_bytes(ckpt.read_bytes()[:200])  # truncated, as by a full disk
    assert "is not a checkpoint this script can read" in refused()

    class Evil:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))
    import pickle
    ckpt.write_bytes(pickle.dumps({"script": NAME, "model": Evil()}, protocol=2))
    assert "is not a checkpoint this script can read" in refused()
    assert not (tmp_path / "pwned").exists()  # weights_only: the pickle ran no code


def test_a_missing_tsv_is_refused_at_run_time(mod, tmp_path, capsys):
    """--dataset names a file the user makes: parse_args accepts the form, the run names the file."""
    with pytest.raises(SystemExit) as e:
        mod.main(["--preset", "tiny", "--dataset=tsv:/no/such/file.tsv", f"--out_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert e.value.code == 1 and len(error_lines(err)) == 1 and "tsv:/no/such/file.tsv: there is no such file" in err
