"""HuggingFace Trainer: LineSearchTrainer on a tiny randomly initialised GPT-2, on CPU."""

from __future__ import annotations

import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

from _dist_util import run_ranks  # noqa: E402

from armijo_fused import ArmijoAdam  # noqa: E402
from armijo_fused.integrations.hf import LineSearchTrainer, armijo_optimizer  # noqa: E402

pytestmark = [pytest.mark.timeout(240)]


class TokenData(torch.utils.data.Dataset):
    def __init__(self, n=32, length=16, vocab=64, seed=0):
        g = torch.Generator().manual_seed(seed)
        # a learnable pattern: each sequence counts up from a random start
        start = torch.randint(0, vocab, (n, 1), generator=g)
        self.ids = (start + torch.arange(length)) % vocab

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def tiny_gpt2(dropout=0.0):
    cfg = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                                  resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg)


def args(out, **kw):
    base = dict(output_dir=str(out), per_device_train_batch_size=4, gradient_accumulation_steps=2,
                max_steps=4, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                seed=0, data_seed=0, dataloader_num_workers=0, disable_tqdm=True)
    base.update(kw)
    return transformers.TrainingArguments(**base)


class CheckWindowLoss(transformers.TrainerCallback):
    """Before each step: the registered closure, evaluated at θ0 on the kept window, equals the
    sum of the window's training losses (same micro-batches, same normalisation)."""

    def __init__(self):
        self.trainer, self.checked, self.trials = None, 0, []
        self.grad_norms, self.logged_norms, self.true_norms = [], [], []

    def on_pre_optimizer_step(self, args, state, control, **kw):
        t = self.trainer
        provided = armijo_optimizer(t.optimizer)._pending_loss  # what training_step handed over
        with torch.no_grad():
            fresh = float(t._ls_trial_loss())
        assert len(t._ls_window) == 2
        assert provided is not None and fresh == pytest.approx(float(provided), rel=1e-5)
        # Trainer zeroes with model.zero_grad() (None); the window's backward still accumulated
        # into the optimizer's flat gradient buffer, not into new tensors it would copy in
        opt = armijo_optimizer(t.optimizer)
        if opt._buffers is not None:
            (buf,) = opt._buffers
            base = buf.grad.untyped_storage().data_ptr()
            assert all(p.grad.untyped_storage().data_ptr() == base
                       for p in t.model.parameters() if p.requires_grad)
            assert not buf.gathered
        self.true_norms.append(float(torch.cat(
            [p.grad.flatten() for p in t.model.parameters() if p.grad is not None]).norm()))
        self.checked += 1

    def on_optimizer_step(self, args, state, control, **kw):
        stats = armijo_optimizer(self.trainer.optimizer).stats
        self.trials.append(stats["trials"])
        self.grad_norms.append(float(stats["grad_norm"]))

    def on_log(self, args, state, control, logs=None, **kw):
        if logs and "grad_norm" in logs:
            self.logged_norms.append(logs["grad_norm"])


def params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_optimizers_tuple_accumulation_and_the_window_closure(tmp_path):
    model = tiny_gpt2()
    before = params(model)
    opt = ArmijoAdam(model.parameters(), weight_decay=0.01, cadence="every")
    check = CheckWindowLoss()
    training_args = args(tmp_path)
    trainer = LineSearchTrainer(model=model, args=training_args, train_dataset=TokenData(),
                                optimizers=(opt, None), callbacks=[check])
    check.trainer = trainer
    clips = []
    clip = trainer.accelerator.clip_grad_norm_
    trainer.accelerator.clip_grad_norm_ = lambda *a, **k: clips.append(1) or clip(*a, **k)
    out = trainer.train()
    assert check.checked == 4
    # the logged ‖g‖ is the optimizer's (its guard forms it), not a clip_grad_norm_ pass of
    # Trainer's own over every gradient
    assert clips == [] and len(check.logged_norms) == 4
    assert check.logged_norms == pytest.approx(check.grad_norms, rel=1e-6)
    assert check.logged_norms == pytest.approx(check.true_norms, rel=1e-5)  # ‖g‖ before the step
    assert armijo_optimizer(trainer.optimizer) is opt
    assert opt.param_groups[0]["step"] == 4 and opt.param_groups[0]["searches"] == 4
    # clipping moved from Trainer into the optimizer; the caller's arguments are not changed
    # (a second trainer built from them, e.g. to resume, must clip the same)
    assert opt.max_grad_norm == 1.0 and training_args.max_grad_norm == 1.0
    assert opt.stats["trials"] >= 1 and torch.isfinite(torch.tensor(out.training_loss))
    # the loss at θ0 came from the training forwards (provide_loss): the counter holds one
    # training forward per step and the trial forwards, and nothing for f(θ0)
    assert len(check.trials) == 4
    assert opt.param_groups[0]["forwards"] == 4 + sum(check.trials)
    assert any(not torch.equal(before[n], p) for n, p in params(model).items())


def test_a_bf16_model_trains_with_fp32_masters(tmp_path):
    """A model loaded in bf16 (torch_dtype=torch.bfloat16): the optimizer keeps fp32 master
    weights and moments; the model's tensors stay bf16 and move."""
    model = tiny_gpt2().to(torch.bfloat16)
    before = params(model)
    opt = ArmijoAdam(model.parameters(), weight_decay=0.01, cadence="every")
    trainer = LineSearchTrainer(model=model, args=args(tmp_path, max_steps=3),
                                train_dataset=TokenData(), optimizers=(opt, None))
    out = trainer.train()
    p = next(model.parameters())
    assert p.dtype == torch.bfloat16 and opt.param_groups[0]["searches"] == 3
    assert {k: v.dtype for k, v in opt.state[p].items() if torch.is_tensor(v)} == {
        "exp_avg": torch.float32, "exp_avg_sq": torch.float32, "master": torch.float32}
    assert torch.equal(p.detach(), opt.state[p]["master"].to(torch.bfloat16))
    assert torch.isfinite(torch.tensor(out.training_loss))
    assert any(not torch.equal(before[n], q) for n, q in params(model).items())


def test_optimizer_cls_and_kwargs(tmp_path):
    model = tiny_gpt2()
    trainer = LineSearchTrainer(
        model=model, args=args(tmp_path, max_steps=2), train_dataset=TokenData(),
        optimizer_cls_and_kwargs=(ArmijoAdam, {"weight_decay": 0.01, "cadence": "every"}))
    trainer.train()
    opt = armijo_optimizer(trainer.optimizer)
    assert isinstance(opt, ArmijoAdam) and len(opt.param_groups) == 2  # decay / no decay
    assert opt.param_groups[0]["searches"] == 2
    assert opt._closure is not None


def test_optimizer_cls_and_kwargs_layerwise_gets_a_step_size_per_layer(tmp_path):
    # Trainer's two weight-decay groups carry no names and model= cannot go in the kwargs: the
    # optimizer searched one η per group; LineSearchTrainer names the parameters after the model
    model = tiny_gpt2()
    trainer = LineSearchTrainer(
        model=model, args=args(tmp_path, max_steps=2, weight_decay=0.01),
        train_dataset=TokenData(),
        optimizer_cls_and_kwargs=(ArmijoAdam, {"layerwise": True, "cadence": "every"}))
    trainer.train()
    opt = armijo_optimizer(trainer.optimizer)
    names = [g["block_names"] for g in opt.param_groups]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.0]
    assert names[0] == ["embeddings", "layer.0", "layer.1"]
    assert "layer.1" in names[1] and len(opt.stats["step_size"]) > 2


def test_checkpoint_and_resume_reproduce_the_uninterrupted_run(tmp_path):
    def run(out, resume=None):
        model = tiny_gpt2(dropout=0.1)  # dropout: the RNG state must be restored and replayed
        opt = ArmijoAdam(model.parameters(), weight_decay=0.01)
        trainer = LineSearchTrainer(
            model=model, args=args(out, save_strategy="steps", save_steps=2),
            train_dataset=TokenData(), optimizers=(opt, None))
        trainer.train(resume_from_checkpoint=resume)
        return params(model), opt

    full, opt_a = run(tmp_path / "a")
    ckpt = tmp_path / "a" / "checkpoint-2"
    assert (ckpt / "optimizer.pt").exists()
    resumed, opt_b = run(tmp_path / "b", resume=str(ckpt))
    keys = ("step", "step_size", "step_size_avg", "next_search", "searches")
    assert [opt_a.param_groups[0][k] for k in keys] == [opt_b.param_groups[0][k] for k in keys]
    for n in full:
        torch.testing.assert_close(resumed[n], full[n], rtol=1e-6, atol=1e-7)


def _rank_trainer(rank, world, out):
    model = tiny_gpt2()
    opt = ArmijoAdam(model.parameters(), weight_decay=0.01, cadence="every")
    trainer = LineSearchTrainer(
        model=model, args=args(os.path.join(out, str(rank)), max_steps=3, ddp_backend="gloo"),
        train_dataset=TokenData(), optimizers=(opt, None))
    trainer.train()
    assert torch.distributed.is_initialized() and torch.distributed.get_world_size() == 2
    return {"params": params(model), "groups": [opt.param_groups[0][k] for k in
                                                ("step", "step_size", "searches", "forwards")]}


def test_trainer_under_two_process_ddp(tmp_path):
    r0, r1 = run_ranks(_rank_trainer, world=2, timeout=180, init=False, args=(str(tmp_path),))
    assert r0["groups"] == r1["groups"] and r0["groups"][0] == 3
    for n in r0["params"]:
        assert torch.equal(r0["params"][n], r1["params"][n])


def test_a_run_started_with_adamw_resumes_with_the_line_search(tmp_path):
    # HF's plain Trainer with its AdamW saves optimizer.pt; LineSearchTrainer with ArmijoAdam
    # built the same way (optimizer_cls_and_kwargs: HF's decay / no-decay groups) resumes from it
    model = tiny_gpt2()
    transformers.Trainer(model=model, args=args(tmp_path / "adamw", save_strategy="steps",
                                                 save_steps=2, learning_rate=3e-3),
                         train_dataset=TokenData()).train()
    ckpt = tmp_path / "adamw" / "checkpoint-2"
    saved = torch.load(ckpt / "optimizer.pt", weights_only=True)
    assert "step_size" not in saved["param_groups"][0]  # torch's AdamW, not ours

    model = tiny_gpt2()
    trainer = LineSearchTrainer(
        model=model, args=args(tmp_path / "armijo", learning_rate=3e-3),
        train_dataset=TokenData(),
        optimizer_cls_and_kwargs=(ArmijoAdam, {"weight_decay": 0.01, "cadence": "every"}))
    trainer.train(resume_from_checkpoint=str(ckpt))
    opt = armijo_optimizer(trainer.optimizer)
    g = opt.param_groups[0]
    assert trainer.state.global_step == 4
    assert g["folded"] == 4 and g["searches"] == 2  # AdamW's 2 steps, then 2 searched steps
    assert g["initial_lr"] == 3e-3  # the schedule continued from where AdamW's left it
    assert all(torch.isfinite(v).all() for s in opt.state.values() for v in s.values())


@pytest.mark.parametrize("how", ["label_smoothing", "compute_loss_pops_labels"])
def test_trials_that_backtrack_keep_the_labels(tmp_path, how):
    """compute_loss pops "labels" with label smoothing (and user overrides do the same): the
    first trial stripped them from the kept micro-batches, and the second raised ('The model did
    not return a loss' / KeyError: 'labels')."""

    class PoppingTrainer(LineSearchTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs.pop("labels")
            logits = model(**inputs).logits[:, :-1]
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1),
                                                     labels[:, 1:].flatten())
            return (loss, logits) if return_outputs else loss

    model = tiny_gpt2()
    # a start far above the Armijo limit: every search backtracks
    opt = ArmijoAdam(model.parameters(), cadence="every", init_step_size=1.0)
    kw = dict(label_smoothing_factor=0.1) if how == "label_smoothing" else {}
    cls = LineSearchTrainer if how == "label_smoothing" else PoppingTrainer
    trials = []

    class Trials(transformers.TrainerCallback):
        def on_optimizer_step(self, args, state, control, **kw):
            trials.append(opt.stats["trials"])

    trainer = cls(model=model, args=args(tmp_path, max_steps=3, **kw), train_dataset=TokenData(),
                  optimizers=(opt, None), callbacks=[Trials()])
    trainer.train()
    assert opt.param_groups[0]["searches"] == 3
    assert max(trials) >= 2  # the searches did backtrack


def test_the_logged_gradient_norm_is_copied_on_the_device_without_a_read():
    # _ls_after_step took stats["grad_norm"], which reads a device value into a float: on a GPU
    # a host sync after every step without a search, to fill a scalar Trainer reads only when
    # it logs
    from test_host_sync import SyncAudit

    from armijo_fused.telemetry import StepStats

    trainer = LineSearchTrainer.__new__(LineSearchTrainer)
    trainer._ls_grad_norm = torch.full((), float("nan"))

    class Opt:
        stats = StepStats(grad_norm=lambda: torch.tensor(3.0).sqrt())

    audit = SyncAudit()
    with audit:
        trainer._ls_after_step(Opt(), (), {})
    assert audit.found == [], audit.found
    assert trainer._ls_grad_norm.item() == pytest.approx(3.0 ** 0.5)
    Opt.stats = StepStats(grad_norm=2.5)  # a search step's host float
    trainer._ls_after_step(Opt(), (), {})
    assert trainer._ls_grad_norm.item() == 2.5
