"""``flat=False``: the passes run on the parameters where they are (issue 4's opt-out path).

The parameters keep their storage (``p.data_ptr()`` never changes), the optimizer owns only its
state, and every result is the flat store's: same rules, same kernels through a tile table.
"""

from __future__ import annotations

import copy
import gc
import math
import os

import pytest
import torch
from _backends import needs_cpp
from problems import make_closure
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef

from armijo_fused import ArmijoAdam, ArmijoSGD
from armijo_fused.storage.in_place import InPlaceBuffer

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")
BACKENDS = ["torch", pytest.param("cpp", marks=needs_cpp),
            pytest.param("triton", marks=pytest.mark.skipif(
                os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                reason="needs triton (interpreted on CPU or a GPU)"))]
DIRECTIONS = {
    "adam": dict(cls=ArmijoAdam, weight_decay=0.1),
    "nadam": dict(cls=ArmijoAdam, direction="nadam"),
    "rmsprop": dict(cls=ArmijoAdam, direction="rmsprop"),
    "sgd": dict(cls=ArmijoSGD),
    "momentum": dict(cls=ArmijoSGD, momentum=0.9),
    "nesterov": dict(cls=ArmijoSGD, momentum=0.9, nesterov=True),
}


def _run(flat, backend="torch", direction="adam", steps=8, dtype=torch.float32, layerwise=False,
         channels_last=False, **extra):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Tanh(), nn.Flatten(), nn.Linear(64, 5),
                          nn.Tanh(), nn.Linear(5, 1)).to(dtype)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    x, y = torch.randn(16, 3, 6, 6, dtype=dtype), torch.randn(16, 1, dtype=dtype)
    kw = dict(DIRECTIONS[direction])
    cls = kw.pop("cls")
    params = ([{"params": m.parameters()} for m in (model[0], model[3], model[5])]
              if layerwise else model.parameters())
    opt = cls(params, backend=backend, flat=flat, cadence=3, layerwise=layerwise, **kw, **extra)
    ptrs = [p.data_ptr() for p in model.parameters()]
    trace = []
    for _ in range(steps):
        opt.step(make_closure(opt, lambda: nn.functional.mse_loss(model(x), y)))
        trace.append((opt.stats["step_size"], opt.stats["trials"]))
    moved = [p.data_ptr() for p in model.parameters()] != ptrs
    return opt, model, trace, moved


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("direction", list(DIRECTIONS))
def test_in_place_steps_are_the_flat_stores_and_leave_the_storage_alone(backend, direction):
    steps = 4 if backend == "triton" else 8  # the interpreter is slow
    opt, model, trace, moved = _run(False, backend, direction, steps=steps)
    ref_opt, ref_model, ref_trace, ref_moved = _run(True, backend, direction, steps=steps)
    assert isinstance(opt._buffers[0], InPlaceBuffer) and opt._buffers[0].in_place
    assert not moved and ref_moved  # flat=True re-points p.data, flat=False never does
    assert [t[1] for t in trace] == [t[1] for t in ref_trace]
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        for name, v in opt.state[p].items():
            torch.testing.assert_close(v, ref_opt.state[q][name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", ["layerwise", "bf16", "channels_last"])
def test_in_place_layer_wise_half_and_strided_parameters(case):
    kw = {"layerwise": dict(layerwise=True), "bf16": dict(dtype=torch.bfloat16),
          "channels_last": dict(channels_last=True)}[case]
    opt, model, trace, moved = _run(False, **kw)
    ref_opt, ref_model, ref_trace, _ = _run(True, **kw)
    assert not moved
    # a table takes contiguous fp32 tensors; the others are copied in and out around the passes
    assert opt._buffers[0].in_place == (case == "layerwise")
    assert [t[1] for t in trace] == [t[1] for t in ref_trace]
    tol = dict(rtol=1e-2, atol=1e-3) if case == "bf16" else dict(rtol=1e-5, atol=1e-6)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, **tol)


def test_in_place_gradients_stay_the_models_and_are_zeroed_where_they_are():
    opt, model, _, _ = _run(False, steps=3)
    grads = [p.grad for p in model.parameters()]
    opt.zero_grad(set_to_none=False)
    assert [p.grad for p in model.parameters()] == grads  # the same tensors, zeroed
    assert all(int(g.count_nonzero()) == 0 for g in grads)
    buf = opt._buffers[0]
    # no θ or g held by the optimizer: only the rule's state, in flat buffers
    assert not hasattr(buf, "_param") and not hasattr(buf, "_grad")


@pytest.mark.parametrize("backend", BACKENDS[:2])
def test_in_place_zero_grad_frees_the_gradients_as_torch_does(backend):
    # flat=False and zero_grad() (set_to_none=True, torch's default): the gradients are dropped,
    # so through the next forward the optimizer holds only its state, as AdamW does; the next
    # step reads the backward's new tensors. It used to zero them in place and keep them.
    def run(set_to_none):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
        x, y = torch.randn(32, 8), torch.randn(32, 1)
        opt = ArmijoAdam(model.parameters(), flat=False, backend=backend, cadence=2,
                         weight_decay=0.1)
        for _ in range(6):
            opt.zero_grad(set_to_none=set_to_none)
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step(loss_fn=lambda: nn.functional.mse_loss(model(x), y), loss=loss)
        return opt, model

    opt, model = run(True)
    ref_opt, ref_model = run(False)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(p, q)
        assert all(torch.equal(v, ref_opt.state[q][k]) for k, v in opt.state[p].items())
    # (weak references to the storages, not their addresses: a freed address may be reused)
    grads = [StorageWeakRef(p.grad.untyped_storage()) for p in model.parameters()]
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    gc.collect()  # nothing else holds them either (the tile table's g column did)
    assert all(r.expired() for r in grads)


def test_in_place_resume_is_bitwise():
    def run(split):
        opt, model, _, _ = _run(False, steps=split)
        torch.manual_seed(1)
        x, y = torch.randn(16, 3, 6, 6), torch.randn(16, 1)
        saved = (copy.deepcopy(opt.state_dict()),  # state_dict() holds the live tensors
                 {k: v.clone() for k, v in model.state_dict().items()})
        return opt, model, x, y, saved

    opt, model, x, y, (opt_sd, model_sd) = run(4)

    def cont(o, m):
        for _ in range(4):
            o.step(make_closure(o, lambda: nn.functional.mse_loss(m(x), y)))
        return [p.detach().clone() for p in m.parameters()]

    straight = cont(opt, model)
    fresh_opt, fresh_model, _, _ = _run(False, steps=0)
    fresh_model.load_state_dict(model_sd)
    fresh_opt.load_state_dict(opt_sd)
    resumed = cont(fresh_opt, fresh_model)
    assert all(torch.equal(a, b) for a, b in zip(straight, resumed))


@pytest.mark.parametrize("order", ["optimizer_first", "model_first"])
def test_rolling_a_live_bf16_in_place_optimizer_back_keeps_the_checkpoints_master(order):
    # flat=False with bf16 parameters: the fp32 master of a checkpoint loaded into a live
    # optimizer was overwritten by the model's newer bf16 weights (the shards "won" where they
    # differed from the master rounded) when the optimizer was loaded before the model
    opt, model, _, _ = _run(False, steps=4, dtype=torch.bfloat16)
    opt_sd = copy.deepcopy(opt.state_dict())
    model_sd = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(1)
    x, y = torch.randn(16, 3, 6, 6, dtype=torch.bfloat16), torch.randn(16, 1, dtype=torch.bfloat16)

    def cont():
        for _ in range(3):
            opt.step(make_closure(opt, lambda: nn.functional.mse_loss(model(x), y)))
        return [p.detach().clone() for p in model.parameters()]

    first = cont()
    if order == "optimizer_first":
        opt.load_state_dict(copy.deepcopy(opt_sd))
        model.load_state_dict(model_sd)
    else:
        model.load_state_dict(model_sd)
        opt.load_state_dict(copy.deepcopy(opt_sd))
    masters = [opt.state[p]["master"] for p in model.parameters()]
    assert all(torch.equal(m, s["master"]) for m, s in zip(masters, opt_sd["state"].values()))
    again = cont()
    assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_a_non_finite_gradient_in_place_leaves_everything_untouched():
    opt, model, _, _ = _run(False, steps=3)
    theta = [p.detach().clone() for p in model.parameters()]
    state = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters()}
    x = torch.randn(16, 3, 6, 6)

    def loss():
        return model(x).mean()

    def nan_closure():
        opt.zero_grad()
        out = model(x).mean()
        out.backward()
        next(model.parameters()).grad[0].fill_(float("nan"))
        return out

    opt.step(nan_closure, loss_fn=loss)
    assert opt.stats["skipped"]
    assert all(torch.equal(p, t) for p, t in zip(model.parameters(), theta))
    for p in model.parameters():
        assert all(torch.equal(v, state[id(p)][k]) for k, v in opt.state[p].items())


def test_candidates_need_the_flat_store():
    with pytest.raises(ValueError, match=r"candidates needs the flat buffers \(flat=True\)"):
        model = nn.Linear(3, 1)
        ArmijoAdam(model.parameters(), model=model, candidates=2, flat=False)


@pytest.mark.parametrize("cast", ["double", "float", "half"])
def test_a_cast_after_construction_rebuilds_in_place_as_the_flat_store_does(cast):
    # flat=False saw a changed shape but not a changed dtype: after bf16 -> fp64 each new
    # gradient was rounded to bf16 before the passes and the fp32 master went on being used
    results = []
    for flat in (True, False):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1)).to(torch.bfloat16)
        x = torch.randn(32, 8)
        opt = ArmijoAdam(model.parameters(), model=model, flat=flat, backend="torch",
                         cadence="every")
        for i in range(6):
            if i == 3:
                getattr(model, cast)()
            dtype = model[0].weight.dtype
            opt.step(make_closure(opt, lambda d=dtype: model(x.to(d)).float().pow(2).mean()))
        results.append(([p.detach().clone() for p in model.parameters()],
                         {k for s in opt.state.values() for k in s}))
    (flat_params, flat_keys), (in_place_params, in_place_keys) = results
    assert in_place_keys == flat_keys  # no master left after a cast to fp32 / fp64
    assert all(torch.equal(a, b) for a, b in zip(flat_params, in_place_params))


@pytest.mark.parametrize("flat", [True, False], ids=["flat", "in_place"])
def test_a_tensor_resized_through_data_trains_on_after_its_state_is_dropped(flat):
    # HF's resize_token_embeddings writes a larger tensor into .data. The in-place store's
    # table held views of the Parameters made with autograd on, which kept their AccumulateGrad
    # nodes alive with the old shape: the next backward failed inside autograd ("returned an
    # invalid gradient ... expected shape compatible with [50, 16]"), where AdamW trains on
    torch.manual_seed(0)
    model = nn.ModuleDict(dict(emb=nn.Embedding(50, 16), head=nn.Linear(16, 50, bias=False)))
    tokens, labels = torch.randint(0, 50, (32, 4)), torch.randint(0, 50, (32, 4))
    vocab = [50]

    def f():
        logits = model.head(model.emb(tokens))
        return nn.functional.cross_entropy(logits.reshape(-1, vocab[0]), labels.reshape(-1))

    opt = ArmijoAdam(model.parameters(), model=model, flat=flat)
    for _ in range(3):
        opt.step(make_closure(opt, f))
    for module in (model.emb, model.head):
        bigger = 0.02 * torch.randn(60, 16)
        bigger[:50] = module.weight.data
        module.weight.data = bigger
    vocab[0] = 60
    for p in list(opt.state):  # what the store's error about the new shape asks for
        del opt.state[p]
    losses = [float(opt.step(make_closure(opt, f)).detach()) for _ in range(3)]
    assert model.emb.weight.shape == (60, 16)
    assert all(map(math.isfinite, losses)) and losses[-1] < losses[0]
