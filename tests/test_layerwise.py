"""Layer-wise line search: a step size per block (issue 5)."""

from __future__ import annotations

import copy
import io
import math
import warnings

import pytest
import torch
from problems import make_closure
from torch import nn

from armijo_fused import ArmijoAdam, ArmijoSGD
from armijo_fused.blocks import assign_blocks, block_names, param_groups


def block_quadratic(block_L, *, dim=16, inner=2.0, seed=0):
    """f(θ) = Σ_b ½ θ_bᵀ A_b θ_b; A_b has eigenvalues evenly spread in [L_b / inner, L_b]."""
    g = torch.Generator().manual_seed(seed)
    params, mats = [], []
    for L in block_L:
        Q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
        ev = torch.linspace(L / inner, L, dim, dtype=torch.float64)
        mats.append((Q * ev) @ Q.T)
        params.append(nn.Parameter(torch.randn(dim, generator=g, dtype=torch.float64)))

    def f():
        return sum(0.5 * p @ A @ p for p, A in zip(params, mats))

    return params, f


def iterations_to(tol, params, f, cap, **kw):
    """Steps until f/f(θ0) <= tol (None if not within ``cap``)."""
    opt = ArmijoSGD([{"params": [p]} for p in params], cadence="every", **kw)
    with torch.no_grad():
        f0 = float(f())
    for it in range(1, cap + 1):
        opt.step(make_closure(opt, f))
        with torch.no_grad():
            if float(f()) / f0 <= tol:
                return it
    return None


HETEROGENEOUS = [1.0, 17.0, 290.0, 5000.0]  # condition number 5000 across blocks
HOMOGENEOUS = [1.0, 1.0, 1.0, 1.0]


@pytest.mark.parametrize("mode", ["exact", "round_robin", "grow_all"])
def test_layerwise_beats_global_fivefold_on_heterogeneous_blocks(mode):
    n_layerwise = iterations_to(1e-6, *block_quadratic(HETEROGENEOUS), cap=2000,
                                layerwise=True, block_search=mode)
    assert n_layerwise is not None
    # global SGD has not got there in five times as many iterations
    assert iterations_to(1e-6, *block_quadratic(HETEROGENEOUS), cap=5 * n_layerwise) is None


def test_exact_layerwise_is_no_worse_than_global_on_homogeneous_blocks():
    n_global = iterations_to(1e-6, *block_quadratic(HOMOGENEOUS, inner=50.0), cap=1000)
    n_layerwise = iterations_to(1e-6, *block_quadratic(HOMOGENEOUS, inner=50.0), cap=1000,
                                layerwise=True, block_search="exact")
    assert n_global is not None and n_layerwise is not None
    assert n_layerwise <= 1.2 * n_global


@pytest.mark.parametrize("mode", ["round_robin", "stale", "grow_all"])
def test_layerwise_is_no_worse_than_global_on_homogeneous_blocks_over_five_problems(mode):
    # the iteration counts of a backtracking search are chaotic in the problem, so the bound is
    # on the median over five problems, and a looser one on each: it held on 2 of 5 (median
    # 1.33, up to 1.82) while a held block that overshot made the searched one backtrack alone
    # ten times (the joint restart, controller.armijo_search). In fp32 arithmetic (these
    # float64 problems' steps were computed in fp32 until a float64 user's audit) round-robin
    # gave 0.95-1.13; in float64, 1.24, 1.15, 0.88, 1.05, 0.88 (grow_all 0.82-1.25, median
    # 0.95); the same problems in float32 (the C++ backend) 1.00-1.33, median 1.13
    ratios = []
    for seed in range(5):
        n_global = iterations_to(1e-6, *block_quadratic(HOMOGENEOUS, inner=50.0, seed=seed),
                                 cap=1000)
        n_layerwise = iterations_to(1e-6, *block_quadratic(HOMOGENEOUS, inner=50.0, seed=seed),
                                    cap=1000, layerwise=True, block_search=mode)
        assert n_global is not None and n_layerwise is not None
        ratios.append(n_layerwise / n_global)
    assert sorted(ratios)[2] <= 1.2, ratios
    assert max(ratios) <= 1.3, ratios


def test_a_grow_all_search_first_tries_every_block_grown():
    # round_robin: a block grows only on its own turn (one block per search); on the character
    # LM the blocks stayed near their start while a global η grew 20x
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    x = torch.randn(16, 4)
    opt = ArmijoAdam(model.parameters(), model=model, layerwise=True, cadence="every",
                     init_step_size=1e-3, block_search="grow_all")
    for _ in range(3):  # every trial passes: a loss far below f0
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        opt.step(loss_fn=lambda: loss.detach() - 1e6, loss=loss.detach())
        assert opt.stats["trials"] == 1
    etas = opt.stats["step_size"]
    assert len(etas) == 2 and all(e > 1.2e-3 for e in etas)  # both grew at every search
    g = opt.param_groups[0]
    assert sorted(g["block_searched_at"]) == [2, 3]  # the turns still go round


def test_each_block_finds_its_own_step_size():
    params, f = block_quadratic(HETEROGENEOUS)
    opt = ArmijoSGD([{"params": [p]} for p in params], cadence="every", layerwise=True,
                    block_search="exact")
    for _ in range(6):
        opt.step(make_closure(opt, f))
    etas = opt.stats["step_size"]
    assert isinstance(etas, list) and len(etas) == 4
    for eta, L in zip(etas, HETEROGENEOUS):
        assert 0.1 / L < eta < 2.0 / L  # the Armijo range of an L-smooth quadratic, c = 0.2


def test_round_robin_searches_one_block_per_step_in_turn():
    params, f = block_quadratic(HETEROGENEOUS)
    opt = ArmijoSGD([{"params": [p]} for p in params], cadence="every", layerwise=True)
    seen = []
    for _ in range(8):
        opt.step(make_closure(opt, f))
        seen.append(opt.stats["searched_blocks"])
    assert seen == [[0], [1], [2], [3], [0], [1], [2], [3]]


def test_stale_schedule_searches_the_block_searched_longest_ago():
    params, f = block_quadratic(HETEROGENEOUS)
    opt = ArmijoSGD([{"params": [p]} for p in params], cadence="every", layerwise=True,
                    block_search="stale")
    for _ in range(5):
        opt.step(make_closure(opt, f))
    assert opt.stats["searched_blocks"] == [0]  # all four searched once, block 0 longest ago


class Tiny(nn.Module):
    """nanoGPT-style names: transformer.wte / transformer.h.<i> / transformer.ln_f / lm_head."""

    def __init__(self, vocab=11, d=8, layers=2):
        super().__init__()
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(vocab, d),
            h=nn.ModuleList(nn.Sequential(nn.LayerNorm(d), nn.Linear(d, d)) for _ in range(layers)),
            ln_f=nn.LayerNorm(d),
        ))
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.transformer.wte.weight

    def forward(self, idx):
        x = self.transformer.wte(idx)
        for block in self.transformer.h:
            x = x + block(x)
        return self.lm_head(self.transformer.ln_f(x))


def test_blocks_are_found_from_module_names():
    model = Tiny()
    assert list(assign_blocks(model)) == ["embeddings", "layer.0", "layer.1", "final"]
    groups = param_groups(model, weight_decay=0.1)
    assert [g["block"] for g in groups] == ["embeddings", "layer.0", "layer.1", "final"]
    assert all(g["weight_decay"] == 0.1 for g in groups)


def test_a_model_held_by_one_module_is_cut_below_it():
    # self.net = nn.Sequential(...): every name began with "net.", one block for the whole
    # model, and layer-wise was one global step size without a word
    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))

    model = Holder()
    assert list(assign_blocks(model)) == ["0", "2"]
    opt = ArmijoAdam(model.parameters(), layerwise=True, model=model)
    assert opt.param_groups[0]["block_names"] == ["0", "2"]
    wrapped = nn.Module()
    wrapped.inner = Holder()  # (also a wrapper around it)
    assert list(assign_blocks(wrapped)) == ["0", "2"]
    lone = nn.Module()
    lone.lin = nn.Linear(4, 1)  # one module: its weight and bias stay one block
    assert list(assign_blocks(lone)) == ["lin"]
    # names given twice (two sub-models' named_parameters(), each from its own root) keep their
    # blocks (a repeated name was paired with the next one's block)
    names = ["net.0.weight", "net.2.weight", "net.0.weight", "net.2.weight", "net.4.weight"]
    assert list(block_names(names).values()) == ["0", "2", "4"] and \
        [block_names(names)[n] for n in names] == ["0", "2", "0", "2", "4"]
    # a checkpoint from when such a model was one block ("net") carries its η to the blocks,
    # without the warning about another model's blocks (they restarted at init_step_size)
    ck = copy.deepcopy(opt.state_dict())
    g = ck["param_groups"][0]
    for key in ("step_size", "step_size_avg", "step_length", "collapsed", "block_owner",
                "block_searched_at", "block_tested"):
        g[key] = g[key][:1]
    g.update(block_names=["net"], step_size=[0.0123], step_size_avg=[0.0123])
    again = ArmijoAdam(model.parameters(), layerwise=True, model=model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again.load_state_dict(ck)
    assert again.param_groups[0]["block_names"] == ["0", "2"]
    assert again.param_groups[0]["step_size"] == [0.0123, 0.0123]
    # ... but another model's single block ("fc": not the module these tensors lie under)
    # restarts with the warning, as any other model's blocks do
    ck["param_groups"][0]["block_names"] = ["fc"]
    other = ArmijoAdam(model.parameters(), layerwise=True, model=model)
    with pytest.warns(UserWarning, match=r"blocks \['fc'\] are not this model's"):
        other.load_state_dict(ck)


def test_a_checkpoint_carries_across_a_wrapper_inside_a_held_module_both_ways():
    # (a review) a held module with no tensors of its own, wrapped (torch.compile's _orig_mod.)
    # or not, names its containers with or without the wrapper: a checkpoint moved between
    # the two restarted every one of them, or carried them but warned of another model's
    class Stack(nn.Module):
        def __init__(self):
            super().__init__()
            self.foo_blocks = nn.ModuleList(nn.Linear(2, 2) for _ in range(2))

    def holder(wrapped):
        h = nn.Module()
        h.enc = nn.Module() if wrapped else Stack()
        if wrapped:
            h.enc._orig_mod = Stack()
        h.te = nn.Linear(2, 2)
        return h

    for saved, loaded in ((True, False), (False, True)):
        source = holder(saved)
        opt = ArmijoAdam(source.parameters(), layerwise=True, model=source)
        ck = copy.deepcopy(opt.state_dict())
        ck["param_groups"][0]["step_size"] = [1e-2, 3e-3, 5e-4]
        target = holder(loaded)
        again = ArmijoAdam(target.parameters(), layerwise=True, model=target)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            again.load_state_dict(ck)
        assert again.param_groups[0]["step_size"] == [1e-2, 3e-3, 5e-4]
    # not onto a block that is one of this model's under its own name: a module named "module"
    # (an EMA's) beside the stack; the checkpoint lacks the stack's first block
    model = holder(False)
    model.enc.module = Stack()
    opt = ArmijoAdam(model.parameters(), layerwise=True, model=model)
    names = opt.param_groups[0]["block_names"]
    assert "enc.module.foo_blocks.0" in names and "enc.foo_blocks.0" in names
    ck = copy.deepcopy(opt.state_dict())
    g = ck["param_groups"][0]
    keep = [i for i, b in enumerate(names) if b != "enc.foo_blocks.0"]
    for key in ("step_size", "step_size_avg", "step_length", "collapsed", "block_searched_at",
                "block_tested"):
        g[key] = [g[key][i] for i in keep]
    g.update(block_names=[names[i] for i in keep], block_owner=list(range(len(keep))))
    g["step_size"][g["block_names"].index("enc.module.foo_blocks.0")] = 0.0321
    again = ArmijoAdam(model.parameters(), layerwise=True, model=model)
    with pytest.warns(UserWarning, match="are not this model's"):
        again.load_state_dict(ck)
    g = again.param_groups[0]
    eta = dict(zip(g["block_names"], g["step_size"]))
    assert eta["enc.module.foo_blocks.0"] == 0.0321 and eta["enc.foo_blocks.0"] != 0.0321
    assert g["block_owner"] == list(range(len(names)))  # (no merge the search did not make)


def test_encoder_and_decoder_layers_are_blocks_of_their_own():
    # encoder layer i and decoder layer i (BART, T5, Whisper) were one block, "layer.i"
    class Stack(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(nn.Linear(2, 2) for _ in range(2))

    class EncoderDecoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder, self.decoder, self.lm_head = Stack(), Stack(), nn.Linear(2, 2)

    model = EncoderDecoder()
    assert list(assign_blocks(model)) == ["encoder.layer.0", "encoder.layer.1",
                                          "decoder.layer.0", "decoder.layer.1", "head"]
    opt = ArmijoAdam(model.parameters(), layerwise=True, model=model)
    x = torch.randn(3, 2)
    opt.step(make_closure(opt, lambda: model.lm_head(model.decoder.layers[1](
        model.encoder.layers[0](x))).pow(2).mean()))
    assert opt.param_groups[0]["block_names"] == list(assign_blocks(model))


def test_an_encoder_decoder_names_its_shared_embedding_and_each_stacks_own_parameters():
    # BART/Whisper layout: model.shared (the token embedding both stacks use), and inside each
    # stack an embedding, a conv and a final norm beside the layers; these fell into one
    # "model" block, the encoder's and the decoder's together. A module named "shared" in a
    # model with one stack is left alone (a multi-task trunk is no embedding)
    names = block_names([
        "model.shared.weight", "model.encoder.embed_positions.weight",
        "model.encoder.conv1.weight", "model.encoder.layers.0.fc1.weight",
        "model.encoder.layer_norm.weight", "model.decoder.embed_positions.weight",
        "model.decoder.layers.0.fc1.weight", "model.decoder.layer_norm.weight",
        "lm_head.weight"])
    assert names == {
        "model.shared.weight": "embeddings",
        "model.encoder.embed_positions.weight": "encoder.embeddings",
        "model.encoder.conv1.weight": "encoder.conv1",
        "model.encoder.layers.0.fc1.weight": "encoder.layer.0",
        "model.encoder.layer_norm.weight": "encoder.layer_norm",
        "model.decoder.embed_positions.weight": "decoder.embeddings",
        "model.decoder.layers.0.fc1.weight": "decoder.layer.0",
        "model.decoder.layer_norm.weight": "decoder.layer_norm",
        "lm_head.weight": "head"}
    assert block_names(["shared.weight", "encoder.block.0.w", "decoder.block.0.w"])[
        "shared.weight"] == "embeddings"  # T5: at the root
    assert block_names(["shared.0.weight", "layers.0.w", "model.shared.weight"]) == {
        "shared.0.weight": "shared", "layers.0.w": "layer.0", "model.shared.weight": "model"}


def test_towers_with_like_named_stacks_keep_their_blocks_apart():
    # CLIP: text_model.encoder.layers.i and vision_model.encoder.layers.i both ended in
    # "encoder", so each text layer shared its step size with a vision layer, and the two
    # towers' embeddings shared one block
    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(nn.Linear(2, 2) for _ in range(2))

    class Tower(nn.Module):
        def __init__(self):
            super().__init__()
            self.embeddings, self.encoder = nn.Linear(2, 2), Encoder()
            self.final_layer_norm = nn.LayerNorm(2)

    class TwoTowers(nn.Module):
        def __init__(self):
            super().__init__()
            self.text_model, self.vision_model = Tower(), Tower()
            self.logit_scale = nn.Parameter(torch.zeros(()))

    model = TwoTowers()
    assert list(assign_blocks(model)) == [
        "logit_scale", "text_model.embeddings", "text_model.encoder.layer.0", "text_model.encoder.layer.1",
        "text_model.final", "vision_model.embeddings", "vision_model.encoder.layer.0",
        "vision_model.encoder.layer.1", "vision_model.final"]
    # a path that holds both stacks (LLaVA's "model") is no tower: what lies directly in it
    # keeps its plain block, what lies in one stack's tower takes that tower's name
    class Both(nn.Module):
        def __init__(self):
            super().__init__()
            self.vision, self.language = Tower(), Encoder()
            self.projector = nn.Linear(2, 2)

    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = Both()

    names = block_names(n for n, _ in Wrapped().named_parameters())
    assert names["model.vision.encoder.layers.1.weight"] == "encoder.layer.1"
    assert names["model.vision.embeddings.weight"] == "vision.embeddings"
    assert names["model.language.layers.0.bias"] == "language.layer.0"
    assert names["model.projector.weight"] == "model"


def _lm_loss(model, tokens):
    return nn.functional.cross_entropy(model(tokens[:, :-1]).flatten(0, 1),
                                       tokens[:, 1:].flatten())


def test_layerwise_stats_are_lists_before_the_first_step_and_after_a_copy():
    # stats["step_size"] was a NaN scalar before the first step (and after a copy or a
    # pickle), a list afterwards: a loop logging stats["step_size"][0] failed on a fresh one
    torch.manual_seed(0)
    model = Tiny()
    opt = ArmijoAdam(param_groups(model), layerwise=True)
    for key in ("step_size", "applied_step", "next_step_size"):
        assert len(opt.stats[key]) == 4 and all(math.isnan(v) for v in opt.stats[key])
    tokens = torch.randint(0, 11, (4, 9))
    opt.step(make_closure(opt, lambda: _lm_loss(model, tokens)))
    assert len(opt.stats["step_size"]) == 4 and opt.stats["step_size"][0] > 0
    copied = copy.deepcopy(opt)
    assert len(copied.stats["next_step_size"]) == 4 and math.isnan(copied.stats["step_size"][0])
    assert math.isnan(ArmijoAdam(Tiny().parameters()).stats["step_size"])  # global: one value
    # one group cut by module names (model=): its blocks are listed before the first step too
    # (they were cut at the first step, so stats held one NaN for the whole group)
    named = ArmijoAdam(model.parameters(), model=model, layerwise=True)
    assert named.param_groups[0]["block_names"] == [g["block"] for g in opt.param_groups]
    assert len(named.stats["step_size"]) == 4 and math.isnan(named.stats["step_size"][0])
    named.add_param_group({"params": [nn.Parameter(torch.zeros(3))]})  # (one block more)
    assert len(named.stats["step_size"]) == 5 and named.param_groups[1]["block_names"]


def test_single_group_with_model_splits_into_named_blocks():
    torch.manual_seed(0)
    model = Tiny()
    tokens = torch.randint(0, 11, (4, 9))
    opt = ArmijoAdam(model.parameters(), layerwise=True, model=model, cadence="every")
    losses = []
    for _ in range(8):
        losses.append(float(opt.step(make_closure(opt, lambda: _lm_loss(model, tokens)))))
    assert opt.param_groups[0]["block_names"] == ["embeddings", "layer.0", "layer.1", "final"]
    assert len(opt.stats["step_size"]) == 4
    assert losses[-1] < losses[0]


def _weight_decay_groups():
    """Tiny's tensors split as HF Trainer and nanoGPT split them: (model, tokens, decay, rest)."""
    torch.manual_seed(0)
    model = Tiny()
    tokens = torch.randint(0, 11, (4, 9))
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    return model, tokens, decay, rest


def test_weight_decay_groups_with_names_are_cut_into_layers():
    # HF Trainer's and nanoGPT's two groups (decay / no decay) were two blocks for the whole
    # model: every layer shared the step size of its group
    model, tokens, decay, rest = _weight_decay_groups()
    opt = ArmijoAdam([{"params": decay, "weight_decay": 0.1}, {"params": rest}],
                     layerwise=True, model=model, cadence="every")
    whole = ArmijoAdam([{"params": decay, "weight_decay": 0.1, "blocks_by": "group"},
                        {"params": rest, "blocks_by": "group"}], layerwise=True, model=model)
    for _ in range(3):
        opt.step(make_closure(opt, lambda: _lm_loss(model, tokens)))
    names = [g["block_names"] for g in opt.param_groups]
    assert names[0] == ["embeddings", "layer.0", "layer.1"] and "layer.0" in names[1]
    assert len(opt.stats["step_size"]) == len(names[0]) + len(names[1])
    whole.step(make_closure(whole, lambda: _lm_loss(model, tokens)))
    assert [g["block_names"] for g in whole.param_groups] == [["group.0"], ["group.1"]]


def test_name_parameters_cuts_groups_built_without_names_as_model_would():
    # HF Trainer's optimizer_cls_and_kwargs builds the two weight-decay groups itself, without
    # names, and model= cannot go in the kwargs: layerwise=True searched one η per group
    model, tokens, decay, rest = _weight_decay_groups()
    opt = ArmijoAdam([{"params": decay, "weight_decay": 0.1}, {"params": rest}],
                     layerwise=True, cadence="every")
    opt.name_parameters(model)
    # cut at once, as with model= (the blocks and the stats waited for the first step)
    assert opt.param_groups[0]["block_names"] == ["embeddings", "layer.0", "layer.1"]
    assert len(opt.stats["step_size"]) == sum(len(g["block_names"]) for g in opt.param_groups)
    kept = ArmijoAdam([{"params": decay, "blocks_by": "group"}, {"params": rest}],
                      layerwise=True)
    kept.name_parameters(model)  # a group that asked to stay whole stays whole
    opt.step(make_closure(opt, lambda: _lm_loss(model, tokens)))
    kept.step(make_closure(kept, lambda: _lm_loss(model, tokens)))
    assert opt.param_groups[0]["block_names"] == ["embeddings", "layer.0", "layer.1"]
    assert kept.param_groups[0]["block_names"] == ["group.0"]
    assert "layer.0" in kept.param_groups[1]["block_names"]
    with pytest.raises(RuntimeError, match="before the first step"):
        opt.name_parameters(model)


def test_name_parameters_works_on_a_copy_of_an_optimizer_built_without_names():
    # a deepcopy (or pickle) of the optimizer and model before the first step: the groups that
    # were one block for want of names are the copy's too
    import copy

    model = Tiny()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = ArmijoAdam([{"params": decay}, {"params": rest}], layerwise=True)
    model2, opt2 = copy.deepcopy((model, opt))
    opt2.name_parameters(model2)
    assert [g["blocks_by"] for g in opt2.param_groups] == ["name", "name"]


def test_layerwise_needs_blocks():
    with pytest.raises(ValueError, match="layerwise=True needs blocks"):
        ArmijoAdam(nn.Linear(2, 2).parameters(), layerwise=True)
    with pytest.raises(ValueError, match="invalid block_search"):
        ArmijoAdam(nn.Linear(2, 2).parameters(), block_search="random")


def test_collapsed_block_merges_with_its_neighbour_and_state_dict_records_it():
    torch.manual_seed(0)
    model = nn.Module()
    model.a, model.b, model.c = (nn.Parameter(torch.randn(8)) for _ in range(3))
    curvature = (1.0, 1.0, 1e4)  # the stiff block c needs η ~ 1e-4

    def loss():
        return sum(0.5 * s * (p * p).sum() for p, s in zip((model.a, model.b, model.c), curvature))

    opt = ArmijoSGD(model.parameters(), cadence="every", layerwise=True, model=model,
                    block_search="exact", merge_below=1e-3)
    for _ in range(3):
        opt.step(make_closure(opt, loss))
    g = opt.param_groups[0]
    assert g["block_names"] == ["a", "b", "c"]
    assert g["block_owner"] == [0, 1, 1]  # c merged into its neighbour b
    assert g["step_size"][2] == g["step_size"][1]
    assert opt.state_dict()["param_groups"][0]["block_owner"] == [0, 1, 1]
    opt.step(make_closure(opt, loss))
    assert opt.stats["searched_blocks"] == [0, 1, 2]  # exact mode: a alone, then b with c
    assert opt.stats["step_size"][1] == opt.stats["step_size"][2]


def test_layerwise_resume_is_bit_identical():
    def build():
        torch.manual_seed(0)
        model = Tiny()
        return model, ArmijoAdam(model.parameters(), layerwise=True, model=model, cadence=3)

    tokens = torch.randint(0, 11, (4, 9), generator=torch.Generator().manual_seed(1))
    model, opt = build()
    for _ in range(5):
        opt.step(make_closure(opt, lambda: _lm_loss(model, tokens)))
    buf = io.BytesIO()
    torch.save({"m": model.state_dict(), "o": opt.state_dict()}, buf)
    for _ in range(5):
        opt.step(make_closure(opt, lambda: _lm_loss(model, tokens)))
    buf.seek(0)
    ck = torch.load(buf, weights_only=False)
    model2, opt2 = build()
    model2.load_state_dict(ck["m"])
    opt2.load_state_dict(ck["o"])
    for _ in range(5):
        opt2.step(make_closure(opt2, lambda: _lm_loss(model2, tokens)))
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
    assert opt2.param_groups[0]["step_size"] == opt.param_groups[0]["step_size"]


def test_blocks_do_not_depend_on_the_wrapper_the_model_is_run_through():
    # DDP names every parameter module.*, torch.compile _orig_mod.*: a wrapped nn.Sequential
    # became one block (layer-wise quietly global), and a checkpoint resumed under another
    # wrapper restarted every block's step size
    from armijo_fused.blocks import block_name

    # (peft's PeftModel: base_model.model.*; its head was a block named "base_model")
    for prefix in ("", "module.", "_orig_mod.", "_orig_mod.module.", "_fsdp_wrapped_module.",
                   "base_model.model.", "module.base_model.model."):
        assert block_name(prefix + "lm_head.weight") == "head"
        assert block_name(prefix + "transformer.h.3.attn.c_attn.weight") == "layer.3"
        assert block_name(prefix + "0.weight") == "0"
    assert block_name("layers.2._checkpoint_wrapped_module.mlp.w1.weight") == "layer.2"
    assert block_name("base_model.model.classifier.modules_to_save.default.weight") == "head"
    assert block_name("base_model.model.score.original_module.weight") == "head"

    class Wrapper(nn.Module):  # names like DDP's
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, x):
            return self.module(x)

    torch.manual_seed(0)
    x = torch.randn(8, 4)

    def fit(model, opt, steps):
        closure = make_closure(opt, lambda: model(x).pow(2).mean())
        for _ in range(steps):
            opt.step(closure)

    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    wrapped = Wrapper(net)
    opt = ArmijoAdam(wrapped.parameters(), layerwise=True, model=wrapped, backend="torch",
                     cadence="every")
    fit(wrapped, opt, 3)
    assert opt.param_groups[0]["block_names"] == ["0", "2"]
    sd = opt.state_dict()
    net2 = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    net2.load_state_dict(net.state_dict())
    opt2 = ArmijoAdam(net2.parameters(), layerwise=True, model=net2, backend="torch",
                      cadence="every")
    opt2.load_state_dict(sd)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same blocks: nothing restarts, nothing to say
        opt2.step(make_closure(opt2, lambda: net2(x).pow(2).mean()))
    assert opt2.param_groups[0]["block_searched_at"] != [0, 0]


def test_a_checkpoint_with_other_blocks_warns_that_the_step_sizes_restart():
    torch.manual_seed(0)
    x = torch.randn(8, 4)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = ArmijoAdam(net.parameters(), layerwise=True, model=net, backend="torch",
                     cadence="every")
    opt.step(make_closure(opt, lambda: net(x).pow(2).mean()))
    sd = opt.state_dict()
    sd["param_groups"][0]["block_names"] = ["first", "second"]  # saved from another naming
    with pytest.warns(UserWarning, match="the checkpoint's blocks .* are not this model's"):
        opt.load_state_dict(sd)  # (the store is rebuilt at the load, which checks the blocks)
    opt.step(make_closure(opt, lambda: net(x).pow(2).mean()))
    assert opt.param_groups[0]["block_names"] == ["0", "2"]


def _mlp_task_loss(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(64, 8, generator=g), torch.randn(64, 1, generator=g)
    return nn.functional.mse_loss(model(x), y)


def _mlp_task(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(),
                          nn.Linear(16, 1))
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(64, 8, generator=g), torch.randn(64, 1, generator=g)
    return model, lambda: nn.functional.mse_loss(model(x), y)


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_freezing_a_layer_keeps_the_other_blocks_step_sizes(backend):
    # Blocks used to be named from the trainable tensors only: freezing layer 0 renamed the
    # blocks, every block restarted at init_step_size (1 for SGD), and the steps without a
    # search applied that untested η (loss 0.6 -> 6e7 with momentum 0.9).
    model, f = _mlp_task()
    opt = ArmijoSGD(model.parameters(), momentum=0.9, model=model, layerwise=True,
                    backend=backend, weight_decay=0.01)
    for _ in range(30):
        opt.step(make_closure(opt, f))
    g = opt.param_groups[0]
    names, etas = list(g["block_names"]), list(g["step_size"])
    assert len(set(etas)) > 1  # the blocks learned different step sizes
    model[0].requires_grad_(False)
    losses = [float(opt.step(make_closure(opt, f))) for _ in range(10)]
    assert g["block_names"] == names
    assert g["step_size"][0] == etas[0]  # the frozen block keeps its η for later
    assert all(e <= 1.25 * max(etas) for e in g["step_size"])  # nothing restarted at 1
    assert math.isnan(opt.stats["step_size"][0]) and len(opt.stats["step_size"]) == 3
    model[0].requires_grad_(True)
    losses += [float(opt.step(make_closure(opt, f))) for _ in range(10)]
    assert max(losses) < 1.5 * losses[0], losses
    assert not math.isnan(opt.stats["step_size"][0])


def test_a_group_added_later_keeps_the_first_groups_blocks():
    # add_param_group used to re-cut group 0 into one block 'group.0' (its per-layer step
    # sizes gone); the new head is its own block and starts no longer than any block's step.
    model, f = _mlp_task()
    head = nn.Linear(8, 1)
    opt = ArmijoSGD(model.parameters(), momentum=0.9, model=model, layerwise=True)
    for _ in range(20):
        opt.step(make_closure(opt, f))
    g0 = opt.param_groups[0]
    names, etas = list(g0["block_names"]), list(g0["step_size"])
    opt.add_param_group({"params": head.parameters()})
    opt.step(make_closure(opt, f))
    assert g0["block_names"] == names
    assert opt.param_groups[1]["block_names"] == ["group.1"]
    assert opt.param_groups[1]["step_size"][0] <= min(etas) * 1.2 ** 2
    assert len(opt.stats["step_size"]) == len(names) + 1


def _trained_with_layer_2_frozen(steps):
    """ArmijoSGD(momentum 0.9), layer-wise, ``steps`` steps with layer 2 frozen from the start."""
    model, f = _mlp_task()
    model[2].requires_grad_(False)
    opt = ArmijoSGD(model.parameters(), momentum=0.9, model=model, layerwise=True)
    for _ in range(steps):
        opt.step(make_closure(opt, f))
    return model, f, opt


def test_a_layer_frozen_from_the_start_waits_for_a_search_that_tests_it():
    # Frozen from construction, the layer's block kept init_step_size (1 for SGD) and, once
    # unfrozen, the steps without a search applied it untested (loss 0.1 -> 22 in two steps).
    # Now it takes no step until a search has tested it, and the next step searches it first
    # (the round robin would have reached it 20 steps later).
    model, f, opt = _trained_with_layer_2_frozen(30)
    assert opt.param_groups[0]["block_searched_at"][1] == 0
    model[2].requires_grad_(True)
    w = model[2].weight.detach().clone()
    opt.step(make_closure(opt, f))
    if not opt.stats["searched"]:
        assert torch.equal(model[2].weight.detach(), w)  # untested: no step
        opt.step(make_closure(opt, f))
    assert opt.stats["searched"] and opt.stats["searched_blocks"] == [1]
    assert opt.param_groups[0]["block_searched_at"][1] > 0
    losses = [float(opt.step(make_closure(opt, f))) for _ in range(10)]
    assert max(losses) < 2 * losses[0]


def test_a_rebuild_or_a_resume_early_in_a_layerwise_run_changes_nothing():
    # Blocks that train from the start but that the round robin has not searched yet are not
    # untested (they moved inside the first search's combined test): a rebuild or a load must
    # leave the run bitwise as it was.
    def run(rebuild_at=None, resume_at=None, steps=6):
        model, f = _mlp_task()
        opt = ArmijoSGD(model.parameters(), momentum=0.9, model=model, layerwise=True)
        for k in range(1, steps + 1):
            if k == rebuild_at:
                model[2].weight.data = model[2].weight.data.clone()  # storage moved: rebuild
            if k == resume_at:
                sd = copy.deepcopy(opt.state_dict())
                fresh, _ = _mlp_task()
                fresh.load_state_dict(model.state_dict())
                model = fresh
                opt = ArmijoSGD(model.parameters(), momentum=0.9, model=model, layerwise=True)
                opt.load_state_dict(sd)
                f = lambda m=model: _mlp_task_loss(m)  # noqa: E731
            opt.step(make_closure(opt, f))
        return [p.detach().clone() for p in model.parameters()], opt.param_groups[0]["step_size"]

    ref = run()
    for kw in (dict(rebuild_at=2), dict(resume_at=2), dict(resume_at=3)):
        params, etas = run(**kw)
        assert etas == ref[1], kw
        assert all(torch.equal(p, q) for p, q in zip(params, ref[0])), kw


def test_a_group_added_mid_run_waits_for_a_search_that_tests_it():
    # A head added with add_param_group (its own block) was applied at init_step_size (1 for
    # SGD) by the steps without a search: ArmijoSGD with momentum diverged (loss 0.34 -> 1e5).
    model, f = _mlp_task()
    head = nn.Linear(8, 1)
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(1))
    loss = lambda: f() + head(x).pow(2).mean()  # noqa: E731
    opt = ArmijoSGD(model.parameters(), momentum=0.9, model=model, layerwise=True)
    for _ in range(20):
        opt.step(make_closure(opt, loss))
    opt.add_param_group({"params": head.parameters()})
    w = head.weight.detach().clone()
    opt.step(make_closure(opt, loss))
    if not opt.stats["searched"]:
        assert torch.equal(head.weight.detach(), w)  # untested: no step
        opt.step(make_closure(opt, loss))
    assert opt.stats["searched"] and opt.stats["searched_blocks"] == [3]
    losses = [float(opt.step(make_closure(opt, loss)).detach()) for _ in range(10)]
    assert max(losses) < 2 * losses[0]


def test_an_untested_block_stays_untested_through_a_skipped_search():
    model, f, opt = _trained_with_layer_2_frozen(20)
    model[2].requires_grad_(True)
    bad = [True]

    def maybe_nan():
        return f() * (float("nan") if bad[0] else 1.0)

    for _ in range(3):  # skipped (non-finite loss), searched or not: no untested step
        w = model[2].weight.detach().clone()
        opt.step(make_closure(opt, maybe_nan))
        assert torch.equal(model[2].weight.detach(), w)
    assert opt.param_groups[0]["block_tested"][1] == 0
    bad[0] = False
    for _ in range(2):
        opt.step(make_closure(opt, f))
    assert opt.param_groups[0]["block_tested"][1] == 1


def test_a_collapsed_block_does_not_merge_into_a_frozen_one():
    model, f = _mlp_task()
    with pytest.warns(UserWarning, match="merge_below=1 is at or above init_step_size"):
        opt = ArmijoAdam(model.parameters(), model=model, layerwise=True, merge_below=1.0,
                         cadence="every")
    model[0].requires_grad_(False)
    for _ in range(4):
        opt.step(make_closure(opt, f))
    owner = opt.param_groups[0]["block_owner"]
    assert owner[0] == 0 and all(o != 0 for o in owner[1:]), owner


class _NetWithEmptyLayer(nn.Module):
    # l2 (an nn.Linear(0, 0): a rank-0 adapter, a placeholder) is a block of 0 elements
    def __init__(self, empty):
        super().__init__()
        self.l0, self.l1 = nn.Linear(6, 8), nn.Linear(8, 1)
        if empty:
            self.l2 = nn.Linear(0, 0)

    def forward(self, x):
        return self.l1(torch.tanh(self.l0(x)))


@pytest.mark.parametrize("block_search", ["round_robin", "grow_all", "stale"])
@pytest.mark.parametrize("cadence", ["every", "adaptive"])
def test_a_block_without_elements_takes_no_search_turn(block_search, cadence):
    # it took every third turn (the real blocks lost a third of their searches: weights 1.3e-3
    # apart from the run without it) and its η grew as if tested; now it is what a frozen block
    # is: no turn, no growth, NaN in the telemetry, and the run is the one without it, bitwise
    g = torch.Generator().manual_seed(0)
    xs, ys = torch.randn(12, 16, 6, generator=g), torch.randn(12, 16, 1, generator=g)
    runs = []
    for empty in (False, True):
        torch.manual_seed(0)
        model = _NetWithEmptyLayer(empty)
        opt = ArmijoAdam(model.named_parameters(), model=model, layerwise=True,
                         block_search=block_search, cadence=cadence, init_step_size=1e-3)
        turns = []
        for i in range(12):
            opt.step(make_closure(opt, lambda i=i: nn.functional.mse_loss(model(xs[i]), ys[i])))
            turns.append(opt.stats["searched_blocks"])
        runs.append((model, opt, turns))
    (ref, ref_opt, ref_turns), (model, opt, turns) = runs
    assert opt.param_groups[0]["block_names"][2] == "l2"
    assert turns == ref_turns and any(t == [1] for t in turns)
    assert all(torch.equal(p, q) for p, q in zip(ref.parameters(), model.parameters()))
    assert opt.stats["step_size"][:2] == ref_opt.stats["step_size"]
    assert math.isnan(opt.stats["step_size"][2])
    assert opt.param_groups[0]["step_size"][2] == 1e-3  # not grown
    assert opt.stats["next_step_size"][2] == 1e-3  # (as a frozen block's: the η it keeps)
    assert opt.param_groups[0]["forwards"] == ref_opt.param_groups[0]["forwards"]


def test_a_collapsed_block_does_not_merge_into_one_without_elements():
    # the stiff block's first search backtracks below merge_below: it merges into its
    # neighbour, which was the empty block (a step size that nothing had tested)
    torch.manual_seed(0)
    model = nn.Module()
    model.stiff = nn.Parameter(torch.randn(8))
    model.empty = nn.Parameter(torch.zeros(0))
    model.flat = nn.Parameter(torch.randn(8))

    def loss():
        return 0.5 * (1000.0 * model.stiff.pow(2).sum() + model.flat.pow(2).sum())

    opt = ArmijoSGD(model.named_parameters(), model=model, layerwise=True, merge_below=1e-2,
                    init_step_size=0.3, cadence="every", backend="torch")
    assert opt.param_groups[0]["block_names"] == ["stiff", "empty", "flat"]
    opt.step(make_closure(opt, loss))
    assert opt.stats["searched_blocks"] == [0]
    assert opt.param_groups[0]["block_owner"] == [2, 1, 2]


@pytest.mark.parametrize("block_search", ["exact", "round_robin", "grow_all", "stale"])
def test_blocks_merged_into_one_that_loses_its_elements_are_still_searched(block_search):
    # the stiff block s merged into x; x's trained tensor is then frozen and x keeps only a
    # 0-element one: the set was dropped from the search with it (its frozen head), s never
    # searched again
    torch.manual_seed(0)
    model = nn.Module()
    model.x, model.s, model.f = nn.Module(), nn.Module(), nn.Module()
    model.x.p0 = nn.Parameter(torch.zeros(0))
    for m in (model.x, model.s, model.f):
        m.w = nn.Parameter(torch.randn(8))
    stiff = [1000.0]

    def loss():
        return 0.5 * (model.x.w.pow(2).sum() + stiff[0] * model.s.w.pow(2).sum()
                      + model.f.w.pow(2).sum())

    opt = ArmijoSGD(model.named_parameters(), model=model, layerwise=True, merge_below=1e-2,
                    init_step_size=0.3, cadence="every", backend="torch",
                    block_search=block_search)
    for _ in range(10):
        opt.step(make_closure(opt, loss))
    assert opt.param_groups[0]["block_owner"] == [0, 0, 2]
    model.x.w.requires_grad_(False)
    stiff[0] = 3000.0
    searched = []
    for _ in range(4):
        opt.step(make_closure(opt, loss))
        searched += opt.stats["searched_blocks"]
    assert 1 in searched and 0 not in searched
    assert math.isnan(opt.stats["step_size"][0])


def test_a_block_merges_only_where_its_own_search_backtracked_below_the_threshold():
    # Blocks of curvature 1 and 1000 from init_step_size 0.3: the first search, of the flat
    # block, had to shrink the held stiff one too, accepted a tiny η and merged the flat block
    # (the stiff one's doing); and a block whose first, grown trial passed merged wherever it
    # sat below the threshold (merge_below above the blocks' usual η merged every block).
    # Since held untested blocks leave the first rejected trial, the flat block keeps its own
    # step and the stiff one merges at its own search
    torch.manual_seed(0)
    model = nn.Module()
    model.a, model.b = nn.Parameter(torch.randn(8)), nn.Parameter(torch.randn(8))

    def loss():
        return 0.5 * (model.a.pow(2).sum() + 1000.0 * model.b.pow(2).sum())

    opt = ArmijoSGD(model.parameters(), model=model, layerwise=True, merge_below=1e-2,
                    init_step_size=0.3, cadence="every", backend="torch")
    opt.step(make_closure(opt, loss))
    g = opt.param_groups[0]
    assert opt.stats["searched_blocks"] == [0] and opt.stats["trials"] == 2
    assert g["step_size"] == pytest.approx([0.36, 0.3])  # the stiff block waited: untested
    assert g["block_owner"] == [0, 1] and g["block_tested"] == [1, 0]
    # the stiff block's own search backtracks below the threshold: it merges
    opt.step(make_closure(opt, loss))
    assert opt.stats["searched_blocks"] == [1] and opt.stats["trials"] > 2
    assert g["step_size"][1] < 1e-2 and g["block_owner"] == [0, 0]
    # ArmijoAdam's usual η sits below this threshold: a warning, and first trials that pass
    # merge nothing
    model2, f = _mlp_task()
    with pytest.warns(UserWarning, match="at or above init_step_size"):
        opt2 = ArmijoAdam(model2.parameters(), model=model2, layerwise=True, merge_below=2e-3,
                          cadence="every")
    for _ in range(6):
        opt2.step(make_closure(opt2, f))
    assert opt2.param_groups[0]["block_owner"] == list(range(3))


def test_a_checkpoint_taken_while_a_block_is_untested_resumes_bitwise():
    # Whether a block is untested used to live only in the optimizer object: a checkpoint or a
    # copy taken right after a layer was unfrozen resumed with the round robin elsewhere.
    def run(resume_at=None, steps=16):
        model, _ = _mlp_task()
        model[0].requires_grad_(False)
        opt = ArmijoAdam(model.parameters(), model=model, layerwise=True)
        for k in range(1, steps + 1):
            if k == 10:
                model[0].requires_grad_(True)
            if k == resume_at:
                sd = copy.deepcopy(opt.state_dict())
                fresh, _ = _mlp_task()
                fresh.load_state_dict(model.state_dict())
                fresh[0].requires_grad_(model[0].weight.requires_grad)
                model = fresh
                opt = ArmijoAdam(model.parameters(), model=model, layerwise=True)
                opt.load_state_dict(sd)
            opt.step(make_closure(opt, lambda m=model: _mlp_task_loss(m)))
        return [p.detach().clone() for p in model.parameters()]

    ref = run()
    for at in (11, 12):
        assert all(torch.equal(p, q) for p, q in zip(run(resume_at=at), ref)), at


def test_a_run_whose_first_searches_do_not_resolve_still_trains():
    # Every block starts untested; with a bf16 loss the first searches end unresolved (no
    # accepted search), and zeroing the untested blocks between searches froze the model for
    # good. Before any accepted search the blocks apply their step size, as a global run does.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1)).to(torch.bfloat16)
    x, y = torch.randn(64, 8, dtype=torch.bfloat16), torch.randn(64, 1, dtype=torch.bfloat16)
    opt = ArmijoAdam(model.parameters(), model=model, layerwise=True)
    before = [p.detach().clone() for p in model.parameters()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the half-precision-loss warning)
        for _ in range(30):
            opt.step(make_closure(opt, lambda: nn.functional.mse_loss(model(x), y)))
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert opt.param_groups[0]["searches"] < 15  # the cadence spaced the searches out


def test_a_group_at_lr_0_does_not_make_every_other_step_a_search():
    model, f = _mlp_task()
    opt = ArmijoAdam([{"params": model[0].parameters(), "lr": 0.0},
                      {"params": list(model[2].parameters()) + list(model[4].parameters())}],
                     lr=1.0, layerwise=True, model=model)
    for _ in range(40):
        opt.step(make_closure(opt, f))
    assert opt.param_groups[0]["searches"] <= 10, opt.param_groups[0]["searches"]


def test_an_unfrozen_block_under_a_bf16_loss_does_not_wait_for_a_resolved_search():
    # A bf16 loss leaves most searches unresolved; the unfrozen block waited for an accepted
    # one, moving nothing (and the run every other step) for 30+ steps. An unresolved search
    # now ends the wait, as before any accepted search.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(),
                          nn.Linear(16, 1))
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 8, generator=g), torch.randn(64, 1, generator=g)
    f = lambda: nn.functional.mse_loss(model(x).bfloat16(), y.bfloat16())  # noqa: E731
    model[0].requires_grad_(False)
    opt = ArmijoAdam(model.parameters(), model=model, layerwise=True, init_step_size=1e-2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the half-precision-loss warning)
        for _ in range(20):
            opt.step(make_closure(opt, f))
        model[0].requires_grad_(True)
        w = model[0].weight.detach().clone()
        for _ in range(8):
            opt.step(make_closure(opt, f))
    assert opt.param_groups[0]["block_tested"][0] == 1
    assert (model[0].weight.detach() - w).abs().max() > 1e-3


def _exact_run_with_unused_layer(where, steps=40):
    # A layer the forward never reaches (a branch switched off, an unused head): its gradient is 0
    torch.manual_seed(0)
    layers = {"a": nn.Linear(8, 16), "b": nn.Linear(16, 1)}
    if where is not None:
        unused = {"unused": nn.Linear(8, 8)}
        layers = {**unused, **layers} if where == "first" else {**layers, **unused}
    model = nn.ModuleDict(layers)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 8, generator=g), torch.randn(64, 1, generator=g)

    def f():
        return nn.functional.mse_loss(model["b"](torch.tanh(model["a"](x))), y)

    opt = ArmijoAdam(model.parameters(), model=model, layerwise=True, block_search="exact")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the no-schedule warning)
        for _ in range(steps):
            opt.step(make_closure(opt, f))
    return opt


@pytest.mark.parametrize("where", ["first", "last"])
def test_exact_mode_leaves_a_block_with_zero_gradient_alone(where):
    # Its own test is blind (no decrease to predict); it used to count as a collapse, and the
    # block never as tested, so every step searched (40 searches in 40 steps, five forwards
    # each) against 6 without the unused layer. (Where the block stands in the plan must not
    # matter: the first block's flag was overwritten by the merged result's.)
    base = _exact_run_with_unused_layer(None).param_groups[0]
    g = _exact_run_with_unused_layer(where).param_groups[0]
    assert g["searches"] <= base["searches"] + 2, (g["searches"], base["searches"])
    u = g["block_names"].index("unused")
    assert g["step_size"][u] == g["step_size_avg"][u] == pytest.approx(1e-3)  # init, kept
    assert g["collapsed"][u] == 0
    assert g["block_tested"][u] == ArmijoAdam.BLIND  # not tested: it waits, without hurrying


def test_exact_mode_a_block_blind_at_first_waits_for_a_test_before_it_moves():
    # A gate shut at the first search (zero gradient), open from the second step on: the block
    # must not apply its untested init_step_size on a step without a search (SGD, η = 1 on a
    # curvature of 100: loss 200 -> 2e6 when it did).
    torch.manual_seed(0)
    a, b = nn.Parameter(torch.randn(4)), nn.Parameter(torch.ones(4))
    gate = [0.0]
    f = lambda: (a - 1).pow(2).sum() + gate[0] * 50.0 * b.pow(2).sum()  # noqa: E731
    opt = ArmijoSGD([{"params": [a]}, {"params": [b]}], layerwise=True, block_search="exact")
    losses = []
    for k in range(8):
        gate[0] = 0.0 if k == 0 else 1.0
        losses.append(float(opt.step(make_closure(opt, f))))
    assert max(losses[1:]) <= losses[1] + 1e-3, losses
    assert float(f()) < 1e-2 * losses[1]


def test_exact_mode_a_non_descent_block_still_hurries_the_next_search():
    # A block whose own direction is not a descent one (momentum: ⟨g_b, d_b⟩ < 0; exact mode has
    # no fallback) is not blind: it counts as exhausted, and the next step searches. Taken as
    # blind, the searches spread out and the steps between them diverged (loss 0.73 -> 5e5).
    torch.manual_seed(2)
    m = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(),
                      nn.Linear(32, 1))
    g = torch.Generator().manual_seed(2)
    X = torch.randn(512, 10, generator=g)
    Y = torch.sin(X.sum(1, keepdim=True)) + 0.1 * torch.randn(512, 1, generator=g)
    opt = ArmijoSGD([{"params": m[i].parameters()} for i in (0, 2, 4)], layerwise=True,
                    block_search="exact", momentum=0.9)
    losses = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(30):
            idx = torch.randint(0, 512, (32,), generator=g)
            losses.append(float(opt.step(make_closure(
                opt, lambda: nn.functional.mse_loss(m(X[idx]), Y[idx])))))
    assert max(losses) < 10.0, max(losses)


@pytest.mark.parametrize("momentum", [None, 0.9])
def test_exact_mode_tests_the_combined_step_it_applies(momentum):
    # each block passed its own test with the others at θ0, and the step applied them all at
    # once: some searched steps raised the loss of the batch they were tested on
    x = torch.randn(512, 8, generator=torch.Generator().manual_seed(3))
    y = torch.sin(x.sum(1, keepdim=True))
    for seed in range(3):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(),
                              nn.Linear(32, 1))
        opt = ArmijoSGD(model.parameters(), layerwise=True, model=model, block_search="exact",
                        momentum=momentum, momentum_search="direction")
        for k in range(30):
            idx = torch.arange(k * 16 % 512, k * 16 % 512 + 16)
            f0 = float(opt.step(make_closure(opt, lambda: nn.functional.mse_loss(
                model(x[idx]), y[idx]))).detach())
            with torch.no_grad():
                f1 = float(nn.functional.mse_loss(model(x[idx]), y[idx]))
            if opt.stats["searched"]:
                assert f1 <= f0, (seed, k)  # (the Armijo test: below f0 - c·η⟨g, d⟩)


def test_exact_mode_moves_only_the_buffers_whose_step_size_changes(monkeypatch):
    # One param group per block gives one buffer per block; every block's trial used to move
    # every buffer (and read every buffer's sums): 2·B² passes per search, 80,000 at B = 200.
    from armijo_fused.backends import torch_backend

    moves = []
    real = torch_backend.move
    monkeypatch.setattr(torch_backend, "move", lambda *a, **k: moves.append(1) or real(*a, **k))
    torch.manual_seed(0)
    blocks = 12
    params = [nn.Parameter(torch.randn(5)) for _ in range(blocks)]
    opt = ArmijoAdam([{"params": [p]} for p in params], layerwise=True, block_search="exact",
                     cadence="every", backend="torch")
    f = lambda: sum((p - 1).pow(2).sum() for p in params)  # noqa: E731
    for _ in range(3):
        moves.clear()
        opt.step(make_closure(opt, f))
        trials = opt.stats["trials"]
        # each trial moves its block there and back, the accepted steps move each block once
        assert len(moves) <= 2 * trials + blocks, (len(moves), trials)  # was 300 at 12 blocks
    assert float(f()) < 12 * 4 * 5  # (and it trains)


def test_exact_mode_a_head_trained_every_other_step_is_tested_when_its_gradient_is_live():
    # Multi-task, tasks alternating step by step: head B's gradient is 0 on odd steps. The
    # cadence's searches (steps 1, 3, 7, 15, ...) all found it blind, so it waited without
    # moving for 200 steps. A step without a scheduled search now tests it when its gradient
    # is not zero.
    torch.manual_seed(0)
    model = nn.ModuleDict({"trunk": nn.Linear(6, 8), "headA": nn.Linear(8, 1),
                           "headB": nn.Linear(8, 1)})
    g = torch.Generator().manual_seed(1)
    X = torch.randn(64, 6, generator=g)
    targets = {"headA": X.sum(1, keepdim=True), "headB": -2 * X[:, :1]}
    opt = ArmijoAdam(model.parameters(), model=model, layerwise=True, block_search="exact")
    b0 = model["headB"].weight.detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for k in range(1, 5):
            head = "headA" if k % 2 else "headB"
            opt.step(make_closure(opt, lambda: nn.functional.mse_loss(
                model[head](torch.tanh(model["trunk"](X))), targets[head])))
    assert float((model["headB"].weight.detach() - b0).abs().max()) > 1e-6


@pytest.mark.parametrize("where", ["first", "last"])
def test_exact_mode_step_length_cap_does_not_depend_on_a_blind_blocks_place(where):
    # The steps without a search are capped by the length of the tested step, taken from the
    # merged result: the plan's first block's own, which a blind block's search left empty
    # (no cap at all: plain steps 9.85x the searched one against 2.71x).
    def run(place):
        torch.manual_seed(0)
        a1, a2 = torch.linspace(0.5, 1.5, 10), torch.linspace(1.0, 2.0, 10)
        t1, t2 = nn.Parameter(torch.zeros(10)), nn.Parameter(torch.zeros(10))
        unused = nn.Parameter(torch.ones(3))
        groups = [{"params": [t1]}, {"params": [t2]}]
        groups = {"first": [{"params": [unused]}] + groups,
                  "last": groups + [{"params": [unused]}], None: groups}[place]
        opt = ArmijoSGD(groups, momentum=0.9, layerwise=True, block_search="exact",
                        cadence=1000)
        f = lambda: (a1 * t1).sum() + (a2 * t2).sum() + 0.0 * unused.sum()  # noqa: E731
        for _ in range(20):
            opt.step(make_closure(opt, f))
        return torch.cat([t1.detach(), t2.detach()])

    assert torch.equal(run(where), run(None))


def test_exact_mode_a_non_descent_block_next_to_a_blind_one_hurries_the_search():
    # A linear loss whose sign flips at a search step, against SGD momentum: the block's own
    # direction is not a descent one there. With its neighbour's test blind, every test was
    # unresolved, the merged result counted as unresolved, and the exhaustion was lost: the
    # next search came 8 steps later (at once with a live neighbour).
    def run(neighbour):
        torch.manual_seed(0)
        a = torch.linspace(0.5, 1.5, 10)
        t, u = nn.Parameter(torch.zeros(10)), nn.Parameter(torch.ones(3))
        sign = [1.0]
        opt = ArmijoSGD([{"params": [u]}, {"params": [t]}], momentum=0.9, layerwise=True,
                        block_search="exact")
        f = lambda: (sign[0] * (a * t).sum()  # noqa: E731
                     + ((0.3 * u).sum() if neighbour == "live" else 0.0 * u.sum()))
        flipped, log = None, []
        for k in range(1, 30):
            if flipped is None and k > 6 and k >= opt.param_groups[0]["next_search"]:
                sign[0], flipped = -1.0, k
            opt.step(make_closure(opt, f))
            log.append(bool(opt.stats["searched"]))
            if flipped is not None and k == flipped + 1:
                return log[-2:]  # the flip's search, and whether the next step searches

    assert run("live") == [True, True]
    assert run("blind") == [True, True]


def test_exact_mode_a_waiting_block_with_an_inf_gradient_is_skipped_not_searched():
    # inf > 0: a waiting block's non-finite gradient turned a step without a search into a
    # search that the guard then skipped (an extra forward, the cadence pushed back)
    torch.manual_seed(0)
    a, u = nn.Parameter(torch.randn(4)), nn.Parameter(torch.ones(3))
    bad = [False]

    def f():
        return (a - 1).pow(2).sum() + (u.sum() * float("inf") if bad[0] else 0.0 * u.sum())

    opt = ArmijoAdam([{"params": [a]}, {"params": [u]}], layerwise=True, block_search="exact")
    for k in range(1, 7):
        scheduled = k >= opt.param_groups[0]["next_search"]
        bad[0] = not scheduled and k > 2
        opt.step(make_closure(opt, f))
        if bad[0]:
            assert opt.stats["skipped"] and not opt.stats["searched"]
    assert opt.param_groups[1]["block_tested"] == [ArmijoAdam.BLIND]


def test_grow_all_with_momentum_searched_along_g_updates_every_grown_block():
    # the momentum check's result replaced the search's and dropped its optimistic flag: a step
    # whose optimistic trial (every block grown) passed updated the searched block's η̄ only
    from armijo_fused.optimizers.search import SearchMixin

    torch.manual_seed(0)
    model = nn.Module()
    model.a, model.b = nn.Parameter(torch.randn(20)), nn.Parameter(torch.randn(20))

    def loss():
        return 0.5 * (((model.a - 1) ** 2).sum() + ((model.b + 1) ** 2).sum())

    opt = ArmijoSGD(model.parameters(), model=model, layerwise=True, momentum=0.9,
                    block_search="grow_all", init_step_size=0.01, backend="torch",
                    cadence="every")
    seen, update = [], SearchMixin._update_step_sizes

    def spy(self, table, etas, plan, result, *args):
        before = list(self.param_groups[0]["step_size_avg"])
        out = update(self, table, etas, plan, result, *args)
        if result.searched is not None and result.searched.optimistic:
            seen.append((before, list(self.param_groups[0]["step_size_avg"])))
        return out

    try:
        SearchMixin._update_step_sizes = spy
        for _ in range(12):
            opt.step(make_closure(opt, loss))
    finally:
        SearchMixin._update_step_sizes = update
    assert seen and all(a != b for before, after in seen for a, b in zip(before, after))


def test_merge_below_with_momentum_and_in_exact_mode():
    # (a) ArmijoSGD(momentum) searches η along g, then tests (1-μ)η along d: the merge rule read
    # that check's history, where no step ever fell below the first trial, and never merged
    def momentum_run(mom):
        torch.manual_seed(0)
        model = nn.Module()
        model.a, model.b = nn.Parameter(torch.randn(8)), nn.Parameter(torch.randn(8))
        opt = ArmijoSGD(model.parameters(), model=model, layerwise=True, merge_below=5e-3,
                        momentum=mom, init_step_size=0.01, cadence="every", backend="torch")
        opt.step(make_closure(opt, lambda: 0.5 * (1000.0 * model.a.pow(2).sum()
                                                  + model.b.pow(2).sum())))
        return opt.param_groups[0]["block_owner"]

    assert momentum_run(0.0) == momentum_run(0.9) == [1, 1]  # the stiff block a collapsed
    # (b) exact mode: each block passes its own first trial, the combined test shrinks both (a
    # coupled loss): neither collapsed on its own, so nothing merges (both merged before)
    model = nn.Module()
    model.a, model.b = nn.Parameter(torch.ones(4)), nn.Parameter(-0.5 * torch.ones(4))

    def coupled():
        return 0.5 * (model.a.pow(2).sum() + model.b.pow(2).sum()) \
            + 25.0 * (model.a + model.b).pow(2).sum()

    opt = ArmijoSGD(model.parameters(), model=model, layerwise=True, block_search="exact",
                    merge_below=0.015, init_step_size=0.02, cadence="every", backend="torch")
    for _ in range(3):
        opt.step(make_closure(opt, coupled))
    assert opt.param_groups[0]["block_owner"] == [0, 1]


class _ThreeLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 1)

    def forward(self, x, use_b):
        h = torch.tanh(self.a(x))
        if use_b:
            h = h + torch.tanh(self.b(h))
        return self.c(h)


@pytest.mark.parametrize("scenario", ["faint", "exhaust"])
def test_exact_search_flags_and_a_blind_blocks_mark(scenario):
    # exact mode where no block accepted: stats said collapsed, not exhausted; a first fix
    # returned no accepted steps at all, which dropped the mark of a block that had no gradient
    # (it then applied its untested η when its gradient came, without a search)
    torch.manual_seed(0)
    model, x, y = _ThreeLinear(), torch.randn(32, 4), torch.randn(32, 1)
    kw = dict(init_step_size=10.0, max_trials=1) if scenario == "exhaust" else {}
    opt = ArmijoAdam(model.parameters(), lr=1e-2, layerwise=True, block_search="exact",
                     model=model, **kw)
    setting = {"offset": 1e9 if scenario == "faint" else 0.0, "use_b": False}
    # (faint: a and c below the loss's resolution; b blind, no gradient)

    def closure():
        opt.zero_grad()
        loss = setting["offset"] + ((model(x, setting["use_b"]) - y) ** 2).mean()
        loss.backward()
        return loss

    opt.step(closure)
    s, g = opt.stats, opt.param_groups[0]
    if scenario == "exhaust":
        assert s["exhausted"] and not s["collapsed"] and s["step_size"] == [0.0] * 3
    else:
        assert s["unresolved"] and not s["exhausted"]
        blind = g["block_tested"][g["block_names"].index("b")]
        assert blind not in (0, 1)  # marked blind: searched as soon as its gradient comes
        setting.update(offset=0.0, use_b=True)
        opt.step(closure)
        assert opt.stats["searched"]


def _train_layerwise(block_search, steps, poison_at=None):
    """θ after ``steps`` calls of a layer-wise ArmijoAdam on a small MLP (a NaN in one gradient
    element at call ``poison_at``), and the block cursor after each call that was not skipped."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1))
    x, y = torch.randn(32, 6), torch.randn(32, 1)
    opt = ArmijoAdam(model.parameters(), model=model, layerwise=True, cadence="every",
                     block_search=block_search)
    loss = lambda: nn.functional.mse_loss(model(x), y)  # noqa: E731
    cursors = []
    for i in range(steps):
        opt.zero_grad()
        l0 = loss()
        l0.backward()
        if i == poison_at:
            model[2].weight.grad[0, 0] = float("nan")
        opt.step(loss_fn=loss, loss=l0)
        assert opt.stats["skipped"] == (i == poison_at)
        if i != poison_at:
            cursors.append(opt.param_groups[0].get("block_cursor"))
    return [p.detach().clone() for p in model.parameters()], cursors


@pytest.mark.parametrize("block_search", ["round_robin", "grow_all", "stale"])
def test_a_skipped_step_keeps_the_block_whose_turn_it_was(block_search):
    # A step skipped for a non-finite gradient searches nothing; the block whose turn it was
    # searches at the next step, so the run goes on bitwise as one that never saw the step
    # (round_robin's cursor moved on, and the runs parted by 0.4-5 % in loss: a user audit)
    theta, cursors = _train_layerwise(block_search, 8, poison_at=3)
    twin, twin_cursors = _train_layerwise(block_search, 7)
    assert cursors == twin_cursors
    assert all(torch.equal(a, b) for a, b in zip(theta, twin))


def test_a_norm_inside_a_numbered_module_is_not_the_final_norm():
    # diffusers' UNet: each attention block has a `norm`, under down_blocks.<i>.attentions.<j>;
    # they made one "final" block across the network, searched apart from their layers
    from armijo_fused.blocks import block_name

    assert block_name("down_blocks.0.attentions.0.norm.weight") == "down_blocks.0"
    assert block_name("mid_block.attentions.0.norm.bias") == "mid_block"
    assert block_name("3.norm.weight") == "3"  # (an nn.Sequential's child)
    for name in ("norm.weight", "model.norm.weight", "transformer.ln_f.bias",
                 "encoder.final_layer_norm.weight", "0.transformer.ln_f.weight"):
        assert block_name(name) == "final", name


def test_numbered_containers_of_other_names_are_a_block_per_layer_by_path():
    # (an audit) DiT's, SD3's and Flux's transformer_blocks, a UNet's down_blocks and up_blocks
    # and wav2vec2's conv_layers were one block each: one step size for the whole stack
    from armijo_fused.blocks import block_name

    for name, block in [
            ("transformer_blocks.3.attn.to_q.weight", "transformer_blocks.3"),
            ("single_transformer_blocks.0.proj_mlp.weight", "single_transformer_blocks.0"),
            ("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight", "down_blocks.1"),
            ("up_blocks.0.resnets.1.conv1.weight", "up_blocks.0"),
            ("wav2vec2.feature_extractor.conv_layers.2.conv.weight",
             "wav2vec2.feature_extractor.conv_layers.2"),
            ("module._orig_mod.transformer_blocks.1.ff.weight", "transformer_blocks.1"),
            ("h.0.mlp.sub_layers.1.weight", "layer.0"),  # (the outermost container decides)
            ("encoder_blocks.0.layers.1.weight", "encoder_blocks.0"),
            ("mid_block.resnets.0.conv1.weight", "mid_block")]:
        assert block_name(name) == block, name

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn, self.norm = nn.Linear(2, 2), nn.LayerNorm(2)

    class Flux(nn.Module):
        def __init__(self):
            super().__init__()
            self.x_embedder = nn.Linear(2, 2)
            self.transformer_blocks = nn.ModuleList(Block() for _ in range(2))
            self.single_transformer_blocks = nn.ModuleList(Block() for _ in range(2))
            self.proj_out = nn.Linear(2, 2)

    class Wav2Vec2(nn.Module):  # (a classic stack beside another numbered container)
        def __init__(self):
            super().__init__()
            self.feature_extractor = nn.Module()
            self.feature_extractor.conv_layers = nn.ModuleList(nn.Conv1d(1, 1, 2) for _ in "ab")
            self.encoder = nn.Module()
            self.encoder.layers = nn.ModuleList(Block() for _ in range(2))

    assert list(assign_blocks(Flux())) == [
        "x_embedder", "transformer_blocks.0", "transformer_blocks.1",
        "single_transformer_blocks.0", "single_transformer_blocks.1", "proj_out"]
    holder = nn.Module()
    holder.wav2vec2, holder.lm_head = Wav2Vec2(), nn.Linear(2, 2)
    assert list(assign_blocks(holder)) == [
        "wav2vec2.feature_extractor.conv_layers.0", "wav2vec2.feature_extractor.conv_layers.1",
        "layer.0", "layer.1", "head"]
    # (a review) a model held by one module (a LightningModule's self.unet) has the bare
    # model's blocks: its own tensors were one block "unet" beside "unet.transformer_blocks.0"
    wrapper = nn.Module()
    wrapper.unet = Flux()
    assert list(assign_blocks(wrapper)) == list(assign_blocks(Flux()))
    # beside another module (a text encoder: a UNet's conv_in, time_embedding, mid_block and
    # conv_out were one block "unet"), below its name the same way
    pair = nn.Module()
    pair.transformer, pair.text = Flux(), nn.Linear(2, 2)
    assert list(assign_blocks(pair)) == [
        "transformer." + b for b in assign_blocks(Flux())] + ["text"]
    pair.text = Wav2Vec2()  # (a tower with layers of its own)
    assert list(assign_blocks(pair))[:6] == ["transformer." + b for b in assign_blocks(Flux())]
    # (a review) not a module whose blocks below it are a stack's: SD3's text encoders beside
    # its transformer were cut too, and a checkpoint's projection block overwrote their layers'
    names = ["transformer.x_embedder.weight", "transformer.transformer_blocks.0.ff.weight",
             "text_encoder.text_model.encoder.layers.0.mlp.weight",
             "text_encoder.text_projection.weight",
             "text_encoder_2.text_model.encoder.layers.0.mlp.weight",
             "text_encoder_2.text_projection.weight"]
    assert list(block_names(names).values()) == [
        "transformer.x_embedder", "transformer.transformer_blocks.0",
        "text_encoder.text_model.encoder.layer.0", "text_encoder",
        "text_encoder_2.text_model.encoder.layer.0", "text_encoder_2"]
    # a checkpoint from then ("transformer" beside "transformer.transformer_blocks.0", ...)
    # carries that block's state to its parts, without the warning about another model's
    opt = ArmijoAdam(pair.parameters(), layerwise=True, model=pair)
    names = opt.param_groups[0]["block_names"]
    own = [b for b in names if b in ("transformer.x_embedder", "transformer.proj_out")]
    old = ["transformer"] + [b for b in names if b not in own]
    ck = copy.deepcopy(opt.state_dict())
    g = ck["param_groups"][0]
    for key in ("step_size_avg", "step_length", "collapsed", "block_searched_at",
                "block_tested"):
        g[key] = [g[key][0]] * len(old)
    g.update(block_names=old, block_owner=list(range(len(old))),
             step_size=[0.0123] + [0.5] * (len(old) - 1))
    def resumed(checkpoint):  # {block: η} after loading it, without a warning
        again = ArmijoAdam(pair.parameters(), layerwise=True, model=pair)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            again.load_state_dict(checkpoint)
        return dict(zip(names, again.param_groups[0]["step_size"]))

    eta = resumed(ck)
    assert [eta[b] for b in own] == [0.0123, 0.0123]
    assert all(eta[b] == 0.5 for b in names if b not in own)
    # ... and from before its containers were blocks, when the whole module was one (a review)
    g2 = copy.deepcopy(g)
    keep = [i for i, b in enumerate(old) if not b.startswith("transformer.")]
    for key in ("step_size_avg", "step_length", "collapsed", "block_searched_at",
                "block_tested", "step_size"):
        g2[key] = [g2[key][i] for i in keep]
    g2.update(block_names=[old[i] for i in keep], block_owner=list(range(len(keep))))
    ck2 = copy.deepcopy(ck)
    ck2["param_groups"][0] = g2
    eta = resumed(ck2)
    assert all(eta[b] == 0.0123 for b in names if b.startswith("transformer."))
    assert all(eta[b] == 0.5 for b in names if not b.startswith("transformer."))
    # ... and where a wrapper inside it (torch.compile's _orig_mod.) named its containers, as
    # it did then: "transformer._orig_mod.transformer_blocks.0" is "transformer.transformer_
    # blocks.0" now, with its own state (a review: every block of it restarted, warned)
    g3 = copy.deepcopy(g)
    g3["block_names"] = [b.replace("transformer.", "transformer._orig_mod.") for b in old]
    g3["step_size"] = [0.0123] + [0.001 * (i + 1) for i in range(len(old) - 1)]
    ck3 = copy.deepcopy(ck)
    ck3["param_groups"][0] = g3
    eta = resumed(ck3)
    assert [eta[b] for b in own] == [0.0123, 0.0123]
    assert [eta[b] for b in names if b not in own] == g3["step_size"][1:]
    # (a review) not where a block it had below that module is not one now (another model's,
    # "transformer.inner.transformer_blocks.0"): the whole's state went to each part, that
    # block's part too
    g["block_names"] = [b.replace("transformer.transformer_blocks.0",
                                  "transformer.inner.transformer_blocks.0") for b in old]
    other = ArmijoAdam(pair.parameters(), layerwise=True, model=pair)
    with pytest.warns(UserWarning, match="are not this model's"):
        other.load_state_dict(ck)
    eta = dict(zip(names, other.param_groups[0]["step_size"]))
    assert eta["transformer.transformer_blocks.0"] != 0.0123 and eta[own[0]] != 0.0123
    # a container inside a numbered module is part of that layer: ldm's ResBlock in_layers
    # (an nn.Sequential(norm, act, conv)), a UNet's mid_block.attentions.0.transformer_blocks
    for name, block in [("middle_block.1.in_layers.2.weight", "middle_block"),
                        ("input_blocks.4.0.in_layers.0.weight", "input_blocks.4"),
                        ("mid_block.attentions.0.transformer_blocks.1.ff.weight", "mid_block"),
                        ("0.transformer_blocks.1.ff.weight", "0")]:
        assert block_name(name) == block, name


def test_a_models_own_tensors_beside_its_layers_are_named_below_the_module_they_share():
    # (an audit) wav2vec2's input projection, positional convolution and last norm were one
    # block "wav2vec2" (the module that also holds the layers); a ViT's final norm was "vit",
    # GPT-NeoX's token embedding "gpt_neox", Mamba's final norm "backbone"
    def blocks(names):
        return list(dict.fromkeys(block_names(names).values()))

    assert blocks(["wav2vec2.masked_spec_embed",
                   "wav2vec2.feature_extractor.conv_layers.0.conv.weight",
                   "wav2vec2.feature_projection.projection.weight",
                   "wav2vec2.encoder.pos_conv_embed.conv.weight",
                   "wav2vec2.encoder.layer_norm.weight",
                   "wav2vec2.encoder.layers.0.attention.q_proj.weight",
                   "wav2vec2.encoder.layers.1.attention.q_proj.weight",
                   "lm_head.weight"]) == [
        "masked_spec_embed", "wav2vec2.feature_extractor.conv_layers.0", "feature_projection",
        "pos_conv_embed", "layer_norm", "layer.0", "layer.1", "head"]
    assert blocks(["vit.embeddings.cls_token", "vit.encoder.layer.0.output.dense.weight",
                   "vit.layernorm.weight", "classifier.weight"]) == [
        "embeddings", "layer.0", "layernorm", "head"]
    assert blocks(["gpt_neox.embed_in.weight", "gpt_neox.layers.0.mlp.dense_h_to_4h.weight",
                   "gpt_neox.final_layer_norm.weight", "embed_out.weight"])[:3] == [
        "embeddings", "layer.0", "final"]
    assert blocks(["backbone.embeddings.weight", "backbone.layers.0.mixer.A_log",
                   "backbone.norm_f.weight"]) == ["embeddings", "layer.0", "final"]
    # unchanged where the names said it already (GPT-2 under transformer., Llama under model.)
    assert blocks(["transformer.wte.weight", "transformer.h.0.attn.c_attn.weight",
                   "transformer.ln_f.weight"]) == ["embeddings", "layer.0", "final"]
    assert blocks(["model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight",
                   "model.norm.weight", "lm_head.weight"]) == [
        "embeddings", "layer.0", "final", "head"]
    # (a review) not into another module's block: backbone.proj beside a top-level proj
    # shared its step size with it
    assert block_names(["backbone.layers.0.attn.weight", "backbone.proj.weight",
                        "backbone.scale", "proj.weight", "scale"]) == {
        "backbone.layers.0.attn.weight": "layer.0", "backbone.proj.weight": "backbone",
        "backbone.scale": "backbone", "proj.weight": "proj", "scale": "scale"}
    with pytest.raises(TypeError, match=r"block_names\(\) takes parameter names .* "
                       r"assign_blocks\(model\)"):
        block_names(nn.Linear(2, 2))


def test_a_checkpoint_with_a_container_as_one_block_carries_its_state_to_each_layer():
    # saved when transformer_blocks was one block: each of its layers resumes from that
    # block's step size, search record and test, without the warning about another model
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ff = nn.Linear(3, 3)

        def forward(self, x):
            return x + torch.tanh(self.ff(x))

    class DiT(nn.Module):
        def __init__(self):
            super().__init__()
            self.pos_embed = nn.Linear(3, 3)
            self.transformer_blocks = nn.ModuleList(Block() for _ in range(3))

        def forward(self, x):
            x = self.pos_embed(x)
            for block in self.transformer_blocks:
                x = block(x)
            return x

    torch.manual_seed(0)
    model, x = DiT(), torch.randn(8, 3)
    opt = ArmijoAdam(model.parameters(), layerwise=True, model=model, backend="torch",
                     cadence="every")
    for _ in range(2):
        opt.step(make_closure(opt, lambda: model(x).pow(2).mean()))
    ck = copy.deepcopy(opt.state_dict())
    g = ck["param_groups"][0]
    assert g["block_names"] == ["pos_embed"] + [f"transformer_blocks.{i}" for i in range(3)]
    for key in ("step_size", "step_size_avg", "step_length", "collapsed", "block_searched_at",
                "block_tested"):
        g[key] = g[key][:2]  # (as the old naming's two blocks)
    g.update(block_names=["pos_embed", "transformer_blocks"], block_owner=[0, 1],
             step_size=[0.5, 0.0123], step_size_avg=[0.5, 0.0123])
    again = ArmijoAdam(model.parameters(), layerwise=True, model=model, backend="torch",
                       cadence="every")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again.load_state_dict(ck)
        g = again.param_groups[0]
        assert g["block_names"] == ["pos_embed"] + [f"transformer_blocks.{i}" for i in range(3)]
        assert g["step_size"] == [0.5, 0.0123, 0.0123, 0.0123]
        assert g["block_tested"] == [1, 1, 1, 1] and g["block_owner"] == [0, 1, 2, 3]
        again.step(make_closure(again, lambda: model(x).pow(2).mean()))
    # (a review) only a cut the block rules make carries over in silence: another model's
    # block "transformer" is not the whole of "transformer_blocks.0", nor "layer" of "layer.0"
    # block "transformer" is not the whole of "transformer_blocks.0"; nor is a checkpoint
    # that lacks one of this model's blocks (pos_embed) this model's, cut coarser
    g = ck["param_groups"][0]
    g.update(block_names=["pos_embed", "transformer"])
    other = ArmijoAdam(model.parameters(), layerwise=True, model=model, backend="torch")
    with pytest.warns(UserWarning, match="the checkpoint's blocks .* are not this model's"):
        other.load_state_dict(ck)
    assert other.param_groups[0]["step_size"][1:] == [0.5] * 3  # (the smallest kept)
    for key in ("step_size", "step_size_avg", "step_length", "collapsed", "block_searched_at",
                "block_tested", "block_owner"):
        g[key] = g[key][1:]
    g.update(block_names=["transformer_blocks"], block_owner=[0])
    other = ArmijoAdam(model.parameters(), layerwise=True, model=model, backend="torch")
    with pytest.warns(UserWarning, match="the checkpoint's blocks .* are not this model's"):
        other.load_state_dict(ck)
    assert other.param_groups[0]["step_size"] == [0.0123] * 4


def test_layerwise_setups_that_cannot_do_what_they_ask_are_said():
    # (an audit: both were taken without a word) one block in all is a global search; with one
    # block per param group, merge_below (which merges within a group) can merge nothing
    with pytest.warns(UserWarning, match="found one block"):
        lone = nn.Sequential(nn.Linear(4, 4))
        ArmijoAdam(lone.parameters(), model=lone, layerwise=True)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.warns(UserWarning, match="each group here is one block: nothing can merge"):
        ArmijoAdam(param_groups(model), layerwise=True, merge_below=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ArmijoAdam(model.parameters(), model=model, layerwise=True, merge_below=1e-6)
