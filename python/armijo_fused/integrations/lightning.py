"""PyTorch Lightning integration: :class:`ArmijoLightningMixin` for automatic optimization.

Lightning hands the optimizer a closure that runs ``training_step``, ``backward`` and
``zero_grad``. Calling it for every trial would also run the hooks and the logging of a training
step and, were backward not suppressed, a second backward per trial. The mixin instead passes a
*loss-only* function beside Lightning's closure: Lightning's closure runs once (the training
forward and backward, with its hooks), and every trial evaluates

.. math::
    f(\\theta) = \\frac{1}{A} \\sum_{j \\in \\text{window}} \\ell(\\text{batch}_j; \\theta)

over the micro-batches of the accumulation window (A = ``accumulate_grad_batches``, the
normalisation Lightning applies before its backward), under the precision plugin's autocast, from
the RNG state each micro-batch's training forward started from (the same dropout masks, though
the data loading between micro-batches draws from the RNG too), with ``self.log`` silenced. The
loss at θ0 is the sum of the window's training losses, so a search costs only its trials.

Precision: ``32-true`` and ``bf16-mixed`` step through ``optimizer.step(closure, loss_fn=...)``
(Lightning's closure, wrapped with its hooks, runs once; trials call only the loss); fp16 with a
``GradScaler`` (``MixedPrecision("16-mixed", ...)``) steps through
``scaler.step(optimizer, loss_fn=..., loss=...)``, after Lightning has unscaled the gradient; an
overflow skips the step with the state untouched. Lightning turns ``precision="16-mixed"`` on CPU
into ``bf16-mixed``; pass the plugin explicitly for fp16 on CPU.

Usage::

    class LitModel(ArmijoLightningMixin, L.LightningModule):
        def training_step(self, batch, batch_idx): ...
        def armijo_loss(self, batch, batch_idx): ...   # optional: loss only, no logging
        def configure_optimizers(self):
            return ArmijoAdam(self.parameters(), model=self)

The mixin uses the hooks ``on_train_epoch_start``, ``on_train_batch_start`` /
``on_train_batch_end``, ``optimizer_step``
and ``configure_gradient_clipping`` (clipping by norm moves into the optimizer's
``max_grad_norm``, so the Armijo test keeps the true gradient); a subclass that overrides them
must call ``super()``.
Manual optimization: see docs/integrations.md.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import torch

from ..linesearch.trial import get_rng_state, in_trial, set_rng_state
from ..optimizers.calls import outside_stacklevel
from . import armijo_optimizer


class _NoLossInWindow(Exception):
    """Every micro-batch of an accumulation window returned None from training_step (Lightning:
    skip it): no gradient, nothing to step; raised from the closure, before anything moves."""


def _loss_of(out, what: str):
    if isinstance(out, Mapping):
        out = out.get("loss")
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{what} must return a loss tensor (or a dict with 'loss'), got "
                        f"{type(out).__name__}")
    return out


class ArmijoLightningMixin:
    """Mix into a ``LightningModule`` (before it in the bases) to train with armijo_fused
    optimizers under automatic optimization; other optimizers step as usual."""

    # -- what a trial evaluates ----------------------------------------------------------------
    def armijo_loss(self, batch, batch_idx):
        """The loss of one micro-batch at the current parameters, for trial forwards (no
        backward, no autograd graph). Default: ``training_step``'s loss, with ``self.log``
        silenced; override with a loss-only forward when training_step does more work."""
        return _loss_of(self.training_step(batch, batch_idx), "training_step")

    def log(self, *args, **kwargs):
        if in_trial():  # trial forwards must not reach the logged metrics
            return None
        return super().log(*args, **kwargs)

    def log_dict(self, *args, **kwargs):
        if in_trial():
            return None
        return super().log_dict(*args, **kwargs)

    # -- the accumulation window ---------------------------------------------------------------
    def _armijo_state(self):
        if "_armijo_window" not in self.__dict__:
            self.__dict__["_armijo_window"] = []
            self.__dict__["_armijo_losses"] = []
        return self.__dict__["_armijo_window"], self.__dict__["_armijo_losses"]

    def on_train_batch_start(self, batch, batch_idx):
        out = super().on_train_batch_start(batch, batch_idx)
        if not self.automatic_optimization:
            # manual optimization steps itself (docs/integrations.md): no window to keep. (It
            # was kept, with every batch in it, since no optimizer_step hook ever cleared it)
            return out
        opts = [armijo_optimizer(o) for o in
                (self.trainer.optimizers if self._trainer is not None else [])]
        opts = [o for o in opts if o is not None]
        if not opts:  # other optimizers step as usual: nothing to keep (it kept every batch)
            return out
        window, losses = self._armijo_state()
        if not window:
            losses.clear()
            for opt in opts:
                opt.capture_rng()  # trials replay the window's dropout masks
        # ... each micro-batch from its own start: a random transform in the dataset, a
        # collator or the batch Lightning fetches ahead draw from the RNG between them (the
        # trials replayed micro-batches 2.. under other masks: f0 8% off their f(θ0))
        window.append((batch, batch_idx, get_rng_state()))
        return out

    def on_train_epoch_start(self):
        out = super().on_train_epoch_start()
        # Lightning steps at an epoch's last batch, so no window spans two epochs; one left
        # over is an epoch cut short (a subclass's on_train_batch_start returned -1 after
        # super()): its batches' gradients are gone, and the next step's trials evaluated them
        # beside an f0 and a gradient without them (15 trials, exhausted, in review)
        window, losses = self._armijo_state()
        window.clear()
        losses.clear()
        return out

    def on_train_batch_end(self, outputs, batch, batch_idx):
        out = super().on_train_batch_end(outputs, batch, batch_idx)
        window, losses = self._armijo_state()
        if window:  # no step yet: an accumulation micro-batch; keep its (normalised) loss
            if isinstance(outputs, Mapping) and isinstance(outputs.get("loss"), torch.Tensor):
                losses.append(outputs["loss"].detach())
            else:  # training_step returned None (Lightning skips the micro-batch): so do trials
                window.pop()
        return out

    # -- the step ------------------------------------------------------------------------------
    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        raw = armijo_optimizer(optimizer)
        if raw is None:
            return super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        window, losses = self._armijo_state()
        if not window:
            raise RuntimeError(
                "ArmijoLightningMixin recorded no micro-batch for this step: on_train_batch_start "
                "was overridden without calling super().on_train_batch_start(batch, batch_idx)"
            )
        window, earlier = list(window), list(losses)
        self._armijo_state()[0].clear()
        trainer = self.trainer
        accumulate = trainer.accumulate_grad_batches
        plugin = trainer.precision_plugin

        def trial_loss():
            total = None
            with plugin.train_step_context():
                for batch, idx, rng in window:
                    set_rng_state(rng)
                    loss = _loss_of(self.armijo_loss(batch, idx), "armijo_loss").float()
                    total = loss / accumulate if total is None else total + loss / accumulate
            return total

        f0 = torch.zeros((), dtype=torch.float64)

        def training_closure():
            # Lightning's closure: forward + backward of the last micro-batch, hooks included
            loss = optimizer_closure() if optimizer_closure is not None else None
            if loss is None:  # training_step returned None: Lightning skips this micro-batch
                window.pop()  # (the last: trials leave it out too)
                if not earlier:
                    raise _NoLossInWindow()
                value = sum(v.double() for v in earlier)
            else:
                value = loss.detach().double() + sum(v.double() for v in earlier)
            f0.copy_(value)
            return value

        def combined():
            return trial_loss() if in_trial() else training_closure()

        try:
            if getattr(plugin, "scaler", None) is not None:
                # fp16: the plugin runs the closure itself, unscales, then calls
                # scaler.step(opt, **kwargs), which refuses a closure: trials go through loss_fn
                return optimizer.step(closure=combined, loss_fn=trial_loss, loss=f0)
            # 32-true / bf16-mixed: the plugin wraps the closure with its post-closure hooks
            # (on_before_optimizer_step, gradient clipping); step(closure, loss_fn=...) runs that
            # wrapped closure once for the gradient and only trial_loss for the trials
            return optimizer.step(closure=training_closure, loss_fn=trial_loss)
        except _NoLossInWindow:  # the whole window skipped: no gradient, no step (torch's
            return None  # optimizers step over tensors that have none)

    # -- clipping ------------------------------------------------------------------------------
    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None,
                                    gradient_clip_algorithm=None):
        """``Trainer(gradient_clip_val=...)`` clips the gradient before the step, so the Armijo
        test would use a gradient that is not ∇f. Clipping by norm moves into the optimizer's
        ``max_grad_norm`` instead, which shapes the direction only (as LineSearchTrainer does
        with HF's ``max_grad_norm``). Clipping by value has no such form: it stays Lightning's,
        and the test then runs on the clipped gradient."""
        raw = armijo_optimizer(optimizer)
        algorithm = str(getattr(gradient_clip_algorithm, "value", gradient_clip_algorithm)
                        or "norm")
        if raw is None or not gradient_clip_val or algorithm != "norm":
            return super().configure_gradient_clipping(optimizer, gradient_clip_val,
                                                       gradient_clip_algorithm)
        value = float(gradient_clip_val)
        if raw.max_grad_norm is None:
            raw.max_grad_norm = value
        elif raw.max_grad_norm != value and not self.__dict__.get("_armijo_clip_warned"):
            self.__dict__["_armijo_clip_warned"] = True
            warnings.warn(f"Trainer(gradient_clip_val={value}) is ignored: the optimizer clips "
                          f"to its own max_grad_norm={raw.max_grad_norm}",
                          stacklevel=outside_stacklevel(
                              also=("lightning", "pytorch_lightning", "lightning_fabric")))


__all__ = ["ArmijoLightningMixin"]
