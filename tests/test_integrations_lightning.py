"""PyTorch Lightning: ArmijoLightningMixin under automatic optimization, on CPU.

32-true, bf16-mixed and fp16 with a GradScaler (an explicit MixedPrecision plugin: Lightning maps
``precision="16-mixed"`` on CPU to bf16), ``bf16-true`` (bf16 parameters, fp32 masters), gradient
accumulation 2, ``ddp`` on 2 processes.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

L = pytest.importorskip("lightning.pytorch")

from _dist_util import run_ranks  # noqa: E402

from armijo_fused import ArmijoAdam, in_trial  # noqa: E402
from armijo_fused.integrations.lightning import ArmijoLightningMixin  # noqa: E402

pytestmark = [pytest.mark.timeout(240)]


def dataset(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    return torch.utils.data.TensorDataset(x, torch.sin(x.sum(1, keepdim=True)))


class LitRegressor(ArmijoLightningMixin, L.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
        self.backwards = 0
        self.before_step_calls = 0
        self.window_f0 = []  # Σ loss/A over the window at θ0, computed independently
        self.loss_before = []  # what the optimizer used as f0

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x).float(), y.float())
        self.log("train_loss", loss)
        return loss

    def on_after_backward(self):
        self.backwards += 1

    def on_before_optimizer_step(self, optimizer):
        self.before_step_calls += 1
        with torch.no_grad(), self.trainer.precision_plugin.train_step_context():
            self.window_f0.append(sum(
                float(nn.functional.mse_loss(self.net(x).float(), y.float())) for x, y in self._mine)
                / self.trainer.accumulate_grad_batches)
        self._mine = []

    def on_train_batch_start(self, batch, batch_idx):
        super().on_train_batch_start(batch, batch_idx)
        self._mine = getattr(self, "_mine", []) + [batch]

    def on_train_batch_end(self, outputs, batch, batch_idx):
        super().on_train_batch_end(outputs, batch, batch_idx)
        opt = self.trainer.optimizers[0]
        if len(self.loss_before) < opt.param_groups[0]["step"]:
            self.loss_before.append(opt.stats["loss_before"])

    def configure_optimizers(self):
        return ArmijoAdam(self.parameters(), model=self, cadence="every", weight_decay=0.01)


def fit(precision=None, plugins=None, **kw):
    model = LitRegressor()
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=4, accumulate_grad_batches=2, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        precision=precision, plugins=plugins, **kw)
    trainer.fit(model, torch.utils.data.DataLoader(dataset(), batch_size=8))
    return model, trainer


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "bf16-true", "16-mixed-scaler"])
def test_automatic_optimization_with_accumulation(precision):
    plugins = None
    if precision == "16-mixed-scaler":
        from lightning.pytorch.plugins.precision import MixedPrecision

        plugins = [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))]
        precision = None
    model, trainer = fit(precision, plugins)
    opt = trainer.optimizers[0]
    steps = opt.param_groups[0]["step"]
    assert trainer.global_step == 4
    # one backward per micro-batch, none per trial; Lightning's post-closure hooks once per step
    assert model.backwards == 8
    assert model.before_step_calls == 4
    assert opt.param_groups[0]["searches"] >= 1
    if plugins is None:
        assert steps == 4
        # f0 is the window's loss: both micro-batches, divided by accumulate_grad_batches
        assert model.loss_before == pytest.approx(model.window_f0, rel=1e-4)
    else:  # fp16: the scaler may skip a step on overflow (the first, at scale 2**16)
        assert 1 <= steps <= 4
    assert torch.isfinite(torch.tensor(model.loss_before)).all()
    if precision == "bf16-true":  # bf16 parameters: the optimizer keeps fp32 masters and moments
        p = next(model.parameters())
        assert p.dtype == torch.bfloat16
        assert {k: v.dtype for k, v in opt.state[p].items() if torch.is_tensor(v)} == {
            "exp_avg": torch.float32, "exp_avg_sq": torch.float32, "master": torch.float32}


def _rank_ddp(rank, world):
    # Lightning's "ddp" with processes started outside it (tests/_dist_util.py sets RANK,
    # WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT: Lightning's LightningEnvironment, which
    # starts the process group and no processes): run_ranks' timeout and its handling of a rank
    # that ends badly after its result is written cover this test like the other distributed
    # ones. (ddp_spawn, launched by Lightning, failed CI once on gloo aborting at a rank's exit.)
    model = LitRegressor()
    trainer = L.Trainer(
        accelerator="cpu", devices=world, strategy="ddp", max_steps=3, accumulate_grad_batches=2,
        logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False)
    trainer.fit(model, torch.utils.data.DataLoader(dataset(), batch_size=8))
    assert trainer.strategy.cluster_environment.creates_processes_externally
    opt = trainer.optimizers[0]
    return {"params": [p.detach().clone() for p in model.parameters()],
            "log": model.loss_before, "window_f0": model.window_f0,
            "step": opt.param_groups[0]["step"],
            "eta": opt.param_groups[0]["step_size"], "rank": trainer.global_rank,
            "world": torch.distributed.get_world_size()}


def test_ddp_two_processes():
    r0, r1 = run_ranks(_rank_ddp, world=2, timeout=180, init=False)
    assert (r0["rank"], r1["rank"]) == (0, 1) and r0["world"] == 2
    assert r0["step"] == r1["step"] == 3
    # the ranks' own window losses differ (the distributed sampler gives them different data);
    # the optimizer's f0 is their mean, the same on both
    assert all(a != b for a, b in zip(r0["window_f0"], r1["window_f0"]))
    assert r0["log"] == pytest.approx(
        [(a + b) / 2 for a, b in zip(r0["window_f0"], r1["window_f0"])], rel=1e-5)
    assert r0["log"] == r1["log"] and r0["eta"] == r1["eta"]
    for p, q in zip(r0["params"], r1["params"]):
        assert torch.equal(p, q)


class LitManual(L.LightningModule):
    """The documented manual-optimization route: Lightning's closure returns the training loss,
    the trials call ``loss_fn``."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Dropout(0.3), nn.Linear(32, 1))
        self.automatic_optimization = False
        self.backwards = self.hooks = 0
        self.losses = []  # (training loss, the step's f(θ0))
        self.draws = []  # the RNG's first draw at each training forward

    def armijo_loss(self, batch):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        opt.optimizer.capture_rng()
        opt.zero_grad()
        self.draws.append(torch.get_rng_state().clone())
        loss = self.armijo_loss(batch)
        self.manual_backward(loss)
        opt.step(closure=lambda: loss.detach(), loss_fn=lambda: self.armijo_loss(batch))
        self.losses.append((float(loss), float(opt.optimizer.stats["loss_before"])))
        return loss

    def on_after_backward(self):
        self.backwards += 1

    def on_before_optimizer_step(self, optimizer):
        self.hooks += 1

    def configure_optimizers(self):
        return ArmijoAdam(self.parameters(), model=self, cadence="every")


class LitManualWithMixin(ArmijoLightningMixin, LitManual):
    armijo_loss = LitManual.armijo_loss  # (this module's own, called by its training_step)


@pytest.mark.parametrize("mixin", [False, True])
def test_manual_optimization_route(mixin):
    # (with the mixin left in, its window kept every batch: nothing under manual optimization
    # ever cleared it)
    model = LitManualWithMixin() if mixin else LitManual()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=3, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(model, torch.utils.data.DataLoader(dataset(), batch_size=8))
    opt = trainer.optimizers[0]
    assert trainer.global_step == 3
    assert opt.param_groups[0]["step"] == 3 and opt.param_groups[0]["searches"] == 3
    assert model.backwards == 3  # none in the trials
    # f(θ0) is the training loss (the trial as the closure evaluated it under the RNG the
    # training forward had consumed: 0.613 against 0.602 in review)
    assert all(a == pytest.approx(b, rel=1e-6) for a, b in model.losses)
    assert model.hooks == 3  # Lightning's closure, with its hook, once per step
    # and the RNG goes on: every training forward draws new dropout masks
    assert not any(torch.equal(a, b) for a, b in zip(model.draws, model.draws[1:]))
    assert not model.__dict__.get("_armijo_window")
    s = opt.stats
    if s["step_size"] > 0:
        assert s["loss_after"] <= s["loss_before"] - opt.c * s["step_size"] * s["gd"] + 1e-6


class LitWithoutMixin(L.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Linear(8, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return ArmijoAdam(self.parameters(), model=self)


def test_automatic_optimization_without_the_mixin_is_refused_by_name():
    # the natural first try: each trial re-ran training_step through Lightning's closure (its
    # self.log kept a trial's loss) and, with accumulation 2, f0 was the last micro-batch's
    # loss / 2 (0.35 for a window whose loss was 0.75), tested against the window's gradient
    model = LitWithoutMixin()
    theta = [p.detach().clone() for p in model.parameters()]
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=2, accumulate_grad_batches=2,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    with pytest.raises(RuntimeError, match="Lightning's training closure.*ArmijoLightningMixin"):
        trainer.fit(model, torch.utils.data.DataLoader(dataset(), batch_size=8))
    assert all(torch.equal(p.detach(), t) for p, t in zip(model.parameters(), theta))
    assert trainer.optimizers[0].param_groups[0]["step"] == 0


class LitClipped(LitRegressor):
    def __init__(self):
        super().__init__()
        self.lightning_clips = 0
        self.grad_norms = []  # ‖g‖ as the optimizer saw it, per step

    def clip_gradients(self, *args, **kwargs):
        self.lightning_clips += 1
        return super().clip_gradients(*args, **kwargs)

    def on_before_optimizer_step(self, optimizer):
        super().on_before_optimizer_step(optimizer)
        self.grad_norms.append(float(torch.cat([p.grad.flatten() for p in self.parameters()])
                                     .norm()))


@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_gradient_clip_val_moves_into_the_optimizer(algorithm):
    """Trainer(gradient_clip_val=...) by norm: the optimizer clips (max_grad_norm) and the Armijo
    test keeps the true gradient, which Lightning no longer clips; by value it stays Lightning's."""
    model = LitClipped()
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=3, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=1e-3,
        gradient_clip_algorithm=algorithm)
    trainer.fit(model, torch.utils.data.DataLoader(dataset(), batch_size=8))
    opt = trainer.optimizers[0]
    if algorithm == "norm":
        assert opt.max_grad_norm == 1e-3 and model.lightning_clips == 0
        # the optimizer saw the true gradient and clips only its direction
        assert min(model.grad_norms) > 1e-2
        assert opt.stats["grad_norm"] == pytest.approx(model.grad_norms[-1], rel=1e-4)
    else:
        assert opt.max_grad_norm is None and model.lightning_clips == 3


def test_a_clip_value_the_optimizer_overrides_is_warned_about_at_the_users_line():
    # (it pointed inside Lightning's call.py)
    class Clips(LitRegressor):
        def configure_optimizers(self):
            return ArmijoAdam(self.parameters(), model=self, cadence="every", max_grad_norm=0.5)

    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=2, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=1.0)
    with pytest.warns(UserWarning, match=r"gradient_clip_val=1.0\) is ignored") as seen:
        trainer.fit(Clips(), torch.utils.data.DataLoader(dataset(), batch_size=8))
    mine = [w for w in seen if "is ignored" in str(w.message)]
    assert mine and mine[0].filename == __file__


def test_resume_from_a_lightning_checkpoint_continues_bit_identically(tmp_path):
    """Lightning saves optimizer.state_dict() in its checkpoint and loads it back (moving the
    state to the device); the resumed run equals the uninterrupted one."""

    def trainer(epochs, **kw):
        return L.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, **kw)

    def loader():
        return torch.utils.data.DataLoader(dataset(n=32), batch_size=8)

    full = LitRegressor()
    trainer(2, enable_checkpointing=False).fit(full, loader())
    first = LitRegressor()
    t1 = trainer(1, default_root_dir=tmp_path)
    t1.fit(first, loader())
    resumed = LitRegressor()
    trainer(2, default_root_dir=tmp_path).fit(resumed, loader(),
                                              ckpt_path=t1.checkpoint_callback.last_model_path
                                              or t1.checkpoint_callback.best_model_path)
    assert all(torch.equal(p, q) for p, q in zip(full.parameters(), resumed.parameters()))
    a, b = full.trainer.optimizers[0], resumed.trainer.optimizers[0]
    assert a.param_groups[0]["step"] == b.param_groups[0]["step"] == 8
    assert a.param_groups[0]["step_size"] == b.param_groups[0]["step_size"]


class LitDropout(ArmijoLightningMixin, L.LightningModule):
    """Records the RNG state each training and trial forward of a micro-batch starts from."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Dropout(0.5), nn.Linear(32, 1))
        self.seen = []  # (trial?, batch index, RNG state)

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.seen.append((in_trial(), batch_idx, torch.get_rng_state().clone()))
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return ArmijoAdam(self.parameters(), model=self, cadence="every")


class Jittered(torch.utils.data.Dataset):
    """A random transform in ``__getitem__``: the data loading draws from the global RNG
    between the micro-batches' forwards."""

    def __init__(self):
        self.inner = dataset()

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, i):
        x, y = self.inner[i]
        return x + 0.01 * torch.randn_like(x), y


@pytest.mark.parametrize("data", ["plain", "random-transform"])
def test_each_trial_replays_the_dropout_masks_of_its_own_micro_batch(data):
    # a rewind of the RNG before Lightning's closure (which runs the window's last micro-batch)
    # gave the last micro-batch the first one's masks, and its trials other masks again; with a
    # random transform in the dataset the trials replayed micro-batch 2 from where micro-batch
    # 1 ended, not from where its training forward started (f0 8% off the trials' f(θ0))
    model = LitDropout()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=2, accumulate_grad_batches=2,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    ds = dataset() if data == "plain" else Jittered()
    trainer.fit(model, torch.utils.data.DataLoader(ds, batch_size=8))
    train = {i: s for trial, i, s in model.seen if not trial}
    trials = [(i, s) for trial, i, s in model.seen if trial]
    assert len(train) == 4 and trials
    assert all(torch.equal(s, train[i]) for i, s in trials)
    assert not torch.equal(train[0], train[1]) and not torch.equal(train[2], train[3])


class LitSkipping(ArmijoLightningMixin, L.LightningModule):
    """training_step returns None on some batches: Lightning's "skip to the next batch"."""

    def __init__(self, skip, own_loss):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
        self.skip, self.own_loss, self.steps = set(skip), own_loss, []

    def training_step(self, batch, batch_idx):
        if batch_idx in self.skip and not in_trial():
            return None
        return nn.functional.mse_loss(self.net(batch[0]), batch[1])

    def armijo_loss(self, batch, batch_idx):
        if not self.own_loss:
            return super().armijo_loss(batch, batch_idx)
        return nn.functional.mse_loss(self.net(batch[0]), batch[1])

    def configure_optimizers(self):
        return ArmijoAdam(self.parameters(), model=self, cadence="every")

    def optimizer_step(self, *args, **kwargs):
        out = super().optimizer_step(*args, **kwargs)
        s = self.trainer.optimizers[0].stats
        self.steps.append((s["step"], s["trials"], s["exhausted"], s["loss_before"]))
        return out


@pytest.mark.parametrize("accumulate, skip", [(1, {1}), (2, {0}), (2, {1}), (2, {2, 3})])
@pytest.mark.parametrize("own_loss", [False, True], ids=["default_loss", "armijo_loss"])
def test_a_training_step_returning_none_skips_its_micro_batch(accumulate, skip, own_loss):
    # it raised "training_step returned None" (last micro-batch), a TypeError in the first
    # trial (an earlier one, default armijo_loss), or left the micro-batch in the trials, whose
    # loss then was not f0's: 15 trials and no step (armijo_loss overridden)
    model = LitSkipping(skip, own_loss)
    trainer = L.Trainer(accelerator="cpu", max_steps=3, accumulate_grad_batches=accumulate,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(model, torch.utils.data.DataLoader(dataset(), batch_size=8))
    assert trainer.global_step == 3
    # a window skipped whole takes no step (its stats are the step's before it)
    taken = {s[0]: s for s in model.steps}
    whole = accumulate == 1 or skip == {2, 3}  # one of the three windows returned no loss
    assert sorted(taken) == list(range(1, 4 - whole))
    assert all(t <= 2 and not exhausted for _, t, exhausted, _ in taken.values())


class LitWindow(ArmijoLightningMixin, L.LightningModule):
    """Records which micro-batches each step's window holds."""

    def __init__(self, kind="armijo", stop_at=None):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
        self.kind, self.stop_at, self.windows = kind, stop_at, []

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def on_train_batch_start(self, batch, batch_idx):
        out = super().on_train_batch_start(batch, batch_idx)
        if self.stop_at is not None and self.current_epoch == 0 and batch_idx == self.stop_at:
            return -1  # Lightning: skip the rest of this epoch
        return out

    def optimizer_step(self, *args, **kwargs):
        self.windows.append([i for _, i, _ in self.__dict__.get("_armijo_window", [])])
        return super().optimizer_step(*args, **kwargs)

    def configure_optimizers(self):
        if self.kind == "armijo":
            return ArmijoAdam(self.parameters(), model=self, cadence="every")
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def _fit_window(model, **kw):
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, **kw)
    trainer.fit(model, torch.utils.data.DataLoader(dataset(), batch_size=8))
    return trainer


def test_the_mixin_keeps_no_window_for_another_optimizer():
    # "other optimizers step as usual": the mixin still kept every batch of the run
    model = LitWindow(kind="adamw")
    _fit_window(model, max_epochs=2)
    assert not model.__dict__.get("_armijo_window") and not model.__dict__.get("_armijo_losses")


def test_a_batch_skipped_by_on_train_batch_start_is_not_in_the_next_window():
    # returned -1 after super(): the batch was recorded, never trained, and the next step's
    # trials evaluated it (and the cut epoch's other micro-batches, whose gradient Lightning
    # zeroes) beside an f0 and a gradient without them (15 trials, exhausted, in review)
    model = LitWindow(stop_at=3)
    trainer = _fit_window(model, max_epochs=2, accumulate_grad_batches=2)
    # (batch 2 trained, but Lightning zeroes the gradient at the next epoch's first batch)
    assert model.windows[:2] == [[0, 1], [0, 1]]
    opt = trainer.optimizers[0]
    assert opt.param_groups[0]["searches"] == opt.param_groups[0]["step"]
    assert opt.param_groups[0]["forwards"] < 3 * opt.param_groups[0]["step"]  # no long searches


def test_settings_written_through_lightnings_optimizer_wrapper_reach_the_optimizer():
    # self.optimizers() returns a LightningOptimizer, which takes the optimizer's class as a
    # base: a write (lopt.c = 0.3, lopt.max_step = 1e-4) stayed on the wrapper, unread by
    # the step
    from lightning.pytorch.core.optimizer import LightningOptimizer

    model = nn.Linear(4, 1)
    opt = ArmijoAdam(model.parameters(), model=model)
    lopt = LightningOptimizer(opt)
    lopt.c, lopt.max_step, lopt.max_interval, lopt.cadence = 0.3, 1e-4, 2, 3
    assert (opt.c, opt.max_step, opt.max_interval, opt.cadence.spec) == (0.3, 1e-4, 2, 3)
    assert (lopt.c, lopt.max_step, lopt.max_interval) == (0.3, 1e-4, 2)
    with pytest.raises(ValueError, match="invalid c"):
        lopt.c = 2.0
    assert opt.c == 0.3
