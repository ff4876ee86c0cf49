"""A step without a search never makes the host wait for the GPU (docs/design.md §2: "no host sync").

On a GPU, ``torch.tensor(list, device="cuda")`` synchronises the stream (pageable memcpy), and
``item``/``tolist``/``bool``/``float`` of a device tensor wait for every queued kernel, the
backward included. Such a wait would serialise the step behind the backward.

* CPU (CI): every torch call made during steps without a search is recorded, and none of those
  that would wait on a GPU may appear outside the places that handle them
  (``storage/scalars.py`` copies through pinned memory; the fold count reads its flag, and the
  repeated-batch watch its loss, on a CPU only). This catches a new
  ``torch.tensor(..., device=...)`` in the step path on any machine.
* GPU (``-m gpu``): the same steps under ``torch.cuda.set_sync_debug_mode("error")``.
"""

from __future__ import annotations

import traceback

import pytest
import torch
from _backends import needs_cpp
from torch import nn
from torch.overrides import TorchFunctionMode

from armijo_fused import ArmijoAdam, ArmijoSGD

READS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy"}
MAKERS = {"tensor", "as_tensor"}
# where such calls are intended: device_floats (pinned, non_blocking on CUDA), the fold
# count's flag and the repeated-batch watch's loss, read at once only when not on a GPU
ALLOWED = ("storage/scalars.py", "_advance_unsettled", "_read_now")


class SyncAudit(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.found = []
        self.stacks = []  # (the armijo_fused frames of each call found, innermost last)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in READS or (name in MAKERS and kwargs.get("device") is not None):
            frames = [f for f in traceback.extract_stack()[:-1] if "armijo_fused" in f.filename]
            where = [f"{f.filename.split('armijo_fused/')[-1]}:{f.lineno} {f.name}"
                     for f in frames]
            if where and not any(a in w for w in where for a in ALLOWED):
                self.found.append((name, where[-1]))
                self.stacks.append(where)
        return func(*args, **kwargs)


CASES = {
    "adam": lambda p, **kw: ArmijoAdam(p, weight_decay=0.1, **kw),
    "adam-clip": lambda p, **kw: ArmijoAdam(p, max_grad_norm=0.5, **kw),
    "adam-layerwise": lambda p, **kw: ArmijoAdam(p, layerwise=True, **kw),
    "nesterov": lambda p, **kw: ArmijoSGD(p, momentum=0.9, nesterov=True, **kw),
    "adam-in-place": lambda p, **kw: ArmijoAdam(p, flat=False, **kw),
}


def _model(device="cpu"):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1)).to(device)
    x, y = torch.randn(32, 8, device=device), torch.randn(32, 1, device=device)
    return model, (lambda: nn.functional.mse_loss(model(x), y))


def _plain_steps(case, backend, device, n, audit=None):
    model, loss_fn = _model(device)
    groups = [{"params": m.parameters()} for m in (model[0], model[2])]
    opt = CASES[case](groups, backend=backend, cadence=3)
    plain = 0
    for _ in range(12):  # searches on steps 1, 4, 7, ...: the others are plain
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        search = opt.cadence.should_search(opt.param_groups[0]["step"] + 1,
                                           opt.param_groups[0]["next_search"])
        if search or audit is None:
            opt.step(loss_fn=loss_fn, loss=loss)
        else:
            # the previous plain step's skip flag is read at the start of this one (a wait on
            # its event, which the GPU passed long ago in a training loop: _advance_unsettled)
            opt._settle_skip()
            with audit:
                opt.step(loss_fn=loss_fn, loss=loss)
            plain += 1
    assert plain >= n
    return opt


@needs_cpp
@pytest.mark.parametrize("case", list(CASES))
def test_steps_without_a_search_make_no_call_that_waits_for_a_gpu(case):
    audit = SyncAudit()
    opt = _plain_steps(case, "cpp", "cpu", 6, audit)
    assert audit.found == [], audit.found
    eta = opt.stats["step_size"]  # the telemetry is still there, formed when read
    assert opt.stats["trials"] == 0 and min(eta if isinstance(eta, list) else [eta]) > 0


@needs_cpp
@pytest.mark.parametrize("layerwise", [False, True], ids=["global", "layerwise"])
def test_a_search_reads_the_device_once_per_trial(layerwise):
    # issue 4: "at most one host sync per trial"; the first step (buffers built, the first
    # loss checked for finiteness) is left out
    model, loss_fn = _model()
    groups = [{"params": m.parameters()} for m in (model[0], model[2])]
    opt = ArmijoAdam(groups, backend="cpp", cadence="every", init_step_size=1.0,
                     layerwise=layerwise)
    reads = []
    for step in range(5):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        audit = SyncAudit()
        with audit:
            opt.step(loss_fn=loss_fn, loss=loss)
        if step > 0:
            assert len(audit.found) == opt.stats["trials"], audit.found
            assert all(w.endswith(" read_floats") for _, w in audit.found), audit.found
            reads.append(opt.stats["trials"])
    assert max(reads) > 1  # searches that backtracked were checked too


def test_the_audit_sees_a_synchronising_call():
    audit = SyncAudit()
    from armijo_fused.optimizers import passes

    real = passes.device_floats
    try:  # as the step sizes were made before: torch.tensor(list, device=...)
        passes.device_floats = lambda v, d, dtype=torch.float32: torch.tensor(v, dtype=dtype,
                                                                           device=d)
        _plain_steps("adam", "torch", "cpu", 6, audit)
    finally:
        passes.device_floats = real
    assert any(name == "tensor" for name, _ in audit.found), audit.found


class GpuSyncError:
    """Any synchronising CUDA call inside raises (torch's sync debug mode)."""

    def __enter__(self):
        torch.cuda.set_sync_debug_mode("error")

    def __exit__(self, *exc):
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(CASES))
def test_steps_without_a_search_do_not_synchronise_the_gpu(case):
    opt = _plain_steps(case, "triton", "cuda", 6, GpuSyncError())
    assert opt.stats["trials"] == 0


@needs_cpp
def test_an_attached_recorder_reads_the_device_once_per_read_every_steps():
    # attach() read each step's device values in the step's post-hook (float(grad_norm)): a
    # host sync per step on a GPU, which undid the optimizer's sync-free steps. It now keeps
    # them as tensors and reads read_every steps' worth in one transfer
    from armijo_fused.diagnostics import TelemetryRecorder

    model, loss_fn = _model()
    opt = ArmijoAdam(model.parameters(), backend="cpp", cadence=3)
    kept, at_call = TelemetryRecorder(read_every=5), TelemetryRecorder(opt)
    kept.attach(opt)
    reads = []
    for _ in range(12):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        searching = opt.cadence.should_search(opt.param_groups[0]["step"] + 1,
                                              opt.param_groups[0]["next_search"])
        opt._settle_skip()
        audit = SyncAudit()
        with audit:
            opt.step(loss_fn=loss_fn, loss=loss)
        at_call.record()  # (outside the audit: it reads at the call)
        by_recorder = [any("recorder" in w for w in stack) for stack in audit.stacks]
        reads.append([name for (name, _), r in zip(audit.found, by_recorder) if r])
        if not searching:
            assert [f for f, r in zip(audit.found, by_recorder) if not r] == [], audit.found
    # one transfer at the 5th and the 10th step, none at the others
    assert [len(r) for r in reads] == [0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0, 0], reads
    assert reads[4] == ["tolist"]
    assert len(kept._unread) == 2
    assert kept.records == at_call.records  # (reads the last two)
    assert kept._unread == [] and all(isinstance(r["grad_norm"], float) for r in kept.records)
    assert kept.summary()["searched_steps"] == 4


def test_an_attached_recorder_keeps_a_torch_optimizers_values_on_the_device_too():
    from armijo_fused.diagnostics import TelemetryRecorder

    model, loss_fn = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=torch.tensor(1e-3))
    kept, at_call = TelemetryRecorder(read_every=100), TelemetryRecorder(opt)
    kept.attach(opt)
    for step in range(3):
        if step == 2:
            opt.param_groups[0]["lr"].fill_(2e-3)  # (as schedulers write a tensor lr)
        opt.zero_grad()
        loss_fn().backward()
        audit = SyncAudit()
        with audit:
            opt.step()
        at_call.record()
        assert not any("recorder" in w for stack in audit.stacks for w in stack), audit.found
    assert isinstance(kept._records[0]["grad_norm"], torch.Tensor)
    assert kept.records == at_call.records
    assert [r["step_size"] for r in kept.records] == [[pytest.approx(1e-3)]] * 2 + [
        [pytest.approx(2e-3)]]


def test_a_recorder_refuses_a_read_every_that_is_not_a_positive_int():
    from armijo_fused.diagnostics import TelemetryRecorder

    for bad in (0, -1, 2.5, True, "8"):
        with pytest.raises(ValueError, match="read_every must be an int >= 1"):
            TelemetryRecorder(read_every=bad)


@pytest.mark.gpu
def test_an_attached_recorder_does_not_synchronise_the_gpu_between_its_reads():
    from armijo_fused.diagnostics import TelemetryRecorder

    rec = TelemetryRecorder(read_every=1000)
    model, loss_fn = _model("cuda")
    opt = ArmijoAdam(model.parameters(), backend="triton", cadence=3)
    rec.attach(opt)
    for _ in range(8):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        search = opt.cadence.should_search(opt.param_groups[0]["step"] + 1,
                                           opt.param_groups[0]["next_search"])
        if search:
            opt.step(loss_fn=loss_fn, loss=loss)
        else:
            opt._settle_skip()
            with GpuSyncError():
                opt.step(loss_fn=loss_fn, loss=loss)
    assert len(rec.records) == 8 and all(r["grad_norm"] > 0 for r in rec.records)


@needs_cpp
def test_the_guard_reads_the_gradient_once_per_buffer_per_step(monkeypatch):
    # the guard's read of g is queued as soon as the buffers hold the gradient (on a GPU it
    # then overlaps the host's preparation of the first pass); the passes reuse it, and so
    # does the blind-block probe: one read per buffer and step, searched or not
    import armijo_fused.backends.cpp_backend as cpp

    reads = []
    real = cpp.grad_sq_norm
    monkeypatch.setattr(cpp, "grad_sq_norm", lambda *a, **k: reads.append(1) or real(*a, **k))
    model, loss_fn = _model()
    groups = [{"params": m.parameters()} for m in (model[0], model[2])]  # two flat buffers
    opt = ArmijoAdam(groups, backend="cpp", cadence=3)
    per_step = []
    for _ in range(7):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        reads.clear()
        opt.step(loss_fn=loss_fn, loss=loss)
        per_step.append((len(reads), opt.stats["searched"]))
    assert len(opt._buffers) == 2
    assert {n for n, _ in per_step} == {2}, per_step
    assert {s for _, s in per_step} == {True, False}
