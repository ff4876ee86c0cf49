"""HuggingFace ``Trainer`` integration: :class:`LineSearchTrainer`.

Trainer calls ``optimizer.step()`` bare after the last micro-batch of an accumulation window, so
the optimizer needs a registered loss-only closure (``set_closure``) that re-evaluates the loss of
that window at the trial parameters. ``LineSearchTrainer`` keeps the window's micro-batches and
registers such a closure:

.. math::
    f(\\theta) = \\sum_{j \\in \\text{window}} \\ell_j(\\theta) / n_j

with exactly the normalisation ``training_step`` used for the backward (``n_j`` is
``num_items_in_batch`` when the model normalises by it, else the number of micro-batches), under
``compute_loss_context_manager`` (the same autocast), with the window's RNG state (the same dropout
masks). The loss at θ0 is the sum of the training losses the window already computed, handed to
the optimizer with ``provide_loss``, so a search costs only the trial forwards (and the forward
counters in ``stats`` count only those).

Trainer's external gradient clipping (``args.max_grad_norm``, 1.0 by default) would make the
Armijo test use a gradient that is not ∇f; it is moved into the optimizer's ``max_grad_norm``
(which shapes the direction only) and Trainer's own clipping is skipped. The caller's
``TrainingArguments`` are left as they were (a second trainer built from them, or the saved
``training_args.bin``, still says what to clip to).

Works with ``optimizers=(opt, scheduler)``, ``optimizer_cls_and_kwargs=(ArmijoAdam, kwargs)``,
checkpoint / resume (the line-search state lives in ``param_groups`` and the state dict) and DDP
(the optimizer averages trial losses over the ranks). Optimizers that are not armijo_fused's are
left alone: the class then behaves exactly like ``Trainer``.
"""

from __future__ import annotations

import warnings

import torch
from transformers import Trainer

from ..optimizers.base import ArmijoOptimizer
from ..optimizers.calls import outside_stacklevel
from . import armijo_optimizer


class LineSearchTrainer(Trainer):
    """``transformers.Trainer`` for armijo_fused optimizers (a drop-in subclass).

    Example:
        >>> opt = ArmijoAdam(model.parameters(), weight_decay=0.01)
        >>> trainer = LineSearchTrainer(model=model, args=args, train_dataset=ds,
        ...                             optimizers=(opt, None))
        >>> trainer.train()

    or ``LineSearchTrainer(..., optimizer_cls_and_kwargs=(ArmijoAdam, {}))`` with
    ``TrainingArguments(weight_decay=0.01)``: Trainer writes ``args.weight_decay`` (0 by default)
    into the groups it builds, over a ``weight_decay`` in the kwargs. The optimizer Trainer builds
    gets the model's parameter names (:meth:`~armijo_fused.ArmijoAdam.name_parameters`), so
    ``{"layerwise": True}`` gives a step size per layer, not one per weight-decay group.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._ls_clip = None
        self._ls_window: list = []  # prepared micro-batches of the current window
        self._ls_losses: list = []  # their training losses, normalised as for the backward
        self._ls_expected = 0  # micro-batches in the current window
        self._ls_num_items = None
        self._ls_model = None
        self._ls_registered = None
        self._ls_grad_norm = None  # the ‖g‖ Trainer logs, filled in by each step

    # -- the optimizer ---------------------------------------------------------------------------
    def create_optimizer(self, *args, **kwargs):
        """Trainer's own, built from two weight-decay groups of unnamed tensors (``model=``
        cannot go in ``optimizer_cls_and_kwargs``): named after the model here, so that
        ``layerwise=True`` cuts them by layer instead of searching one η per group."""
        built = self.optimizer is None
        optimizer = super().create_optimizer(*args, **kwargs)
        opt = armijo_optimizer(optimizer)
        if built and opt is not None:
            model = args[0] if args else kwargs.get("model")
            opt.name_parameters(self.model if model is None else model)
        return optimizer

    # -- the window ------------------------------------------------------------------------------
    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batch_samples, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        self._ls_window, self._ls_losses = [], []
        self._ls_expected, self._ls_num_items = len(batch_samples), num_items
        return batch_samples, num_items

    def training_step(self, model, inputs, num_items_in_batch=None):
        opt = armijo_optimizer(self.optimizer)
        if opt is None:
            return super().training_step(model, inputs, num_items_in_batch)
        self._ls_register(opt)
        if not self._ls_window:
            opt.capture_rng()  # trials replay the window from here: the same dropout masks
            # Trainer zeroes with model.zero_grad() (gradients set to None), after which the
            # backward would allocate new gradients for the optimizer to copy in; its own
            # zero_grad puts back the flat buffer's views, zeroed, to accumulate into
            opt.zero_grad()
        self._ls_window.append(self._prepare_inputs(inputs))
        self._ls_model, self._ls_num_items = model, num_items_in_batch
        loss = super().training_step(model, inputs, num_items_in_batch)
        self._ls_losses.append(loss.detach())
        if len(self._ls_window) >= self._ls_expected:  # the window's loss at θ0, for the search
            opt.provide_loss(torch.stack([v.float().reshape(()) for v in self._ls_losses]).sum())
        return loss

    def _ls_register(self, opt: ArmijoOptimizer) -> None:
        if self._ls_registered is opt:
            return
        # Trainer clips outside the optimizer by default; that would falsify the Armijo test
        if self.args.max_grad_norm is not None and self.args.max_grad_norm > 0:
            self._ls_clip = float(self.args.max_grad_norm)
            if not hasattr(Trainer, "_clip_grad_norm"):
                self._ls_answer_inline_clip()
        if self._ls_clip is not None:
            if opt.max_grad_norm is None:
                opt.max_grad_norm = self._ls_clip
            elif opt.max_grad_norm != self._ls_clip:
                warnings.warn(
                    f"TrainingArguments.max_grad_norm={self._ls_clip} is ignored: the optimizer "
                    f"clips to its own max_grad_norm={opt.max_grad_norm}",
                    stacklevel=outside_stacklevel(also=("transformers", "accelerate")))
        opt.set_closure(self._ls_trial_loss, model=self.model)
        opt.register_step_post_hook(self._ls_after_step)
        self._ls_registered = opt

    def _ls_answer_inline_clip(self) -> None:
        """transformers < 5 clips inline, with ``accelerator.clip_grad_norm_(params,
        args.max_grad_norm)``, and its training loop holds its own reference to the arguments
        (switching ``self.args.max_grad_norm`` off on a copy changed nothing: Trainer clipped
        every step). So that call is answered here while this optimizer is registered: no
        clipping pass, and the norm Trainer logs is the one the step forms, as with
        ``_clip_grad_norm`` / ``_get_grad_norm`` on transformers >= 5."""
        accelerator = self.accelerator
        if getattr(accelerator, "_ls_trainer", None) is self:
            return
        clip = accelerator.clip_grad_norm_

        def clip_grad_norm_(parameters, max_norm, *args, **kwargs):
            opt = armijo_optimizer(self.optimizer)
            if opt is not None and self._ls_registered is opt:
                return self._get_grad_norm(self.model)
            return clip(parameters, max_norm, *args, **kwargs)

        accelerator.clip_grad_norm_ = clip_grad_norm_
        accelerator._ls_trainer = self

    def _clip_grad_norm(self, model):
        """Trainer's clipping (transformers >= 5): the optimizer clips inside, on the direction
        only; ``_get_grad_norm`` then logs the norm the step forms."""
        opt = armijo_optimizer(self.optimizer)
        if opt is not None and self._ls_registered is opt:
            return None
        return super()._clip_grad_norm(model)

    # -- the logged gradient norm ------------------------------------------------------------------
    def _get_grad_norm(self, model, grad_norm=None):
        """Trainer logs ‖g‖ from a ``clip_grad_norm_(inf)`` of its own: a read of every gradient
        for the norm, then a read and a write to scale them by 1. The optimizer's step forms
        ‖g‖ anyway (its non-finite guard), so hand Trainer a device scalar that the step fills
        in (``_ls_after_step``); Trainer reads it only when it logs."""
        opt = armijo_optimizer(self.optimizer)
        if opt is None or grad_norm is not None or self._ls_registered is not opt:
            return super()._get_grad_norm(model, grad_norm)
        if self._ls_grad_norm is None:
            self._ls_grad_norm = torch.empty((), device=self.args.device)
        self._ls_grad_norm.fill_(float("nan"))  # stays NaN if the step does not run (fp16 skip)
        return self._ls_grad_norm

    def _ls_after_step(self, optimizer, args, kwargs) -> None:
        if self._ls_grad_norm is None:
            return
        # (peek: stats["grad_norm"] reads a device value into a float, a host sync per step)
        stats = optimizer.stats
        value = stats.peek("grad_norm") if hasattr(stats, "peek") else stats["grad_norm"]
        with torch.no_grad():
            if isinstance(value, torch.Tensor):
                self._ls_grad_norm.copy_(value.reshape(()))
            else:
                self._ls_grad_norm.fill_(float(value))

    def _ls_scaled_for_ga(self, num_items) -> bool:
        flag = getattr(self, "loss_is_scaled_for_ga", None)
        if flag is not None:
            return bool(flag)
        return bool((self.model_accepts_loss_kwargs and num_items is not None)
                    or self.compute_loss_func is not None)

    def _ls_trial_loss(self):
        """The window's loss at the current parameters, normalised as ``training_step`` does."""
        if not self._ls_window:
            raise RuntimeError(
                "LineSearchTrainer: the optimizer asked for a trial loss but no micro-batch was "
                "recorded (training_step was bypassed?)"
            )
        total = None
        for inputs in self._ls_window:
            with self.compute_loss_context_manager():
                # a copy per trial: compute_loss pops "labels" with label smoothing or a
                # compute_loss_func, and so do the usual overrides; the next trial needs them
                loss = self.compute_loss(self._ls_model, dict(inputs),
                                         num_items_in_batch=self._ls_num_items)
            if self.args.n_gpu > 1:
                loss = loss.mean()
            if not self._ls_scaled_for_ga(self._ls_num_items):
                loss = loss / self.current_gradient_accumulation_steps
            loss = loss.float()
            total = loss if total is None else total + loss
        return total


__all__ = ["LineSearchTrainer", "armijo_optimizer"]
