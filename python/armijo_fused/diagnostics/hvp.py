r"""Hessian-vector products by double backward, averaged over a fixed set of batches.

For a loss :math:`f(\theta) = \frac1B \sum_{b=1}^{B} f_b(\theta)` over ``B`` fixed batches,

.. math::

    H v = \nabla_\theta \big\langle \nabla_\theta f(\theta),\, v \big\rangle
        = \frac1B \sum_b \nabla_\theta \big\langle \nabla_\theta f_b(\theta),\, v \big\rangle

(Pearlmutter's trick): one backward with ``create_graph=True`` gives the gradient as a
differentiable function of θ, a second backward of ⟨g, v⟩ gives Hv. Nothing of size n×n is ever
formed.

A :class:`HessianOperator` is the linear map ``v -> H_SS v`` restricted to a subset S of the
coordinates (*segments*: whole parameters, or a range of rows of one, e.g. one attention head of a
Q projection). For a block S this is the diagonal block ``H_SS`` of the full Hessian, whose
spectrum is what block-wise diagnostics look at. Vectors are flat float64 tensors (Lanczos runs in
float64); the products themselves run in the parameters' dtype.

Guards:

- The model is put in eval mode for every forward (dropout off, BatchNorm on running statistics)
  and each module's mode is restored afterwards: the Hessian of a random function is meaningless.
- ``check_deterministic``: the loss on the first batch is evaluated twice and must agree, which
  catches dropout called as ``F.dropout(x, training=True)`` that eval mode cannot switch off.
- Fused attention kernels often have no double backward (torch's CPU flash attention, the
  memory-efficient and flash CUDA kernels, flash-attn). With ``sdpa_math=True`` (default) every
  forward runs under ``torch.nn.attention.sdpa_kernel(SDPBackend.MATH)`` so that
  ``F.scaled_dot_product_attention`` takes the differentiable math path; any remaining
  ``RuntimeError`` from the second backward is re-raised naming the likely cause and the fix.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

__all__ = ["HessianOperator", "Segment", "eval_mode", "DoubleBackwardError"]


def check_disjoint(name: str, segs) -> None:
    """A block counts each coordinate once: a tensor given twice (or two overlapping segments
    of one) doubled its dimension and its eigenvalues, without a word."""
    spans: dict = {}
    for s in segs:
        lo, hi = s.span
        for dim, olo, ohi in spans.get(id(s.param), []):
            if dim != s.dim or (lo < ohi and olo < hi):
                raise ValueError(f"{name} holds coordinates of one parameter (shape "
                                 f"{tuple(s.param.shape)}) twice: give each coordinate once")
        spans.setdefault(id(s.param), []).append((s.dim, lo, hi))


class DoubleBackwardError(RuntimeError):
    """The model's graph cannot be differentiated twice (see :class:`HessianOperator`)."""


@contextlib.contextmanager
def eval_mode(model: Optional[nn.Module]):
    """Put ``model`` in eval mode and restore every module's own ``training`` flag afterwards."""
    if model is None:
        yield
        return
    # By the flags alone, in and out, not through model.eval(): a module's own train() may do
    # more (loralib's Linear merges B·A into W in train(False) and unmerges in train(True)),
    # and a model so left merged but 'training' gave its LoRA factors no gradient, their
    # Hessian read 0, and restoring through the overrides ran them on modules meant to stay
    # in eval (audits). The flag is what dropout and BatchNorm read.
    modes = [(m, m.training) for m in model.modules()]
    for m, _ in modes:
        m.training = False
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _sdpa_math_context(enabled: bool):
    if not enabled:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel  # (torch >= 2.3)

    return sdpa_kernel(SDPBackend.MATH)


@dataclass(frozen=True)
class Segment:
    """Coordinates of one parameter: all of it, or indices ``start:stop`` along ``dim`` (rows
    by default; columns, ``dim=1``, for a weight stored [in, out] such as HF's ``Conv1D``)."""

    param: Tensor
    start: Optional[int] = None
    stop: Optional[int] = None
    dim: int = 0

    def __post_init__(self):
        if self.start is None and self.stop is None:
            return
        size = self._size()
        if self.start is None or self.stop is None or not 0 <= self.start < self.stop <= size:
            raise ValueError(
                f"Segment(start={self.start}, stop={self.stop}, dim={self.dim}) of a parameter "
                f"of shape {tuple(self.param.shape)}: expected 0 <= start < stop <= {size}")

    def _size(self) -> int:  # the parameter's length along ``dim``
        return self.param.shape[self.dim] if self.param.dim() > 0 else 1

    @property
    def span(self) -> tuple:
        """(start, stop) along ``dim``: the whole length for a whole parameter."""
        return (0, self._size()) if self.start is None else (self.start, self.stop)

    @property
    def numel(self) -> int:
        if self.start is None:
            return self.param.numel()
        return (self.stop - self.start) * (self.param.numel() // self._size())

    def take(self, full: Tensor) -> Tensor:
        """This segment's part of a tensor shaped like the parameter."""
        if self.start is None:
            return full
        return full.narrow(self.dim, self.start, self.stop - self.start)

    def embed(self, flat: Tensor) -> Tensor:
        """A tensor shaped like the parameter, ``flat`` on this segment and zero elsewhere."""
        p = self.param
        if self.start is None:
            return flat.view_as(p)
        out = torch.zeros_like(p)
        part = out.narrow(self.dim, self.start, self.stop - self.start)
        part.copy_(flat.view(part.shape))  # (take's reshape(-1) order: row-major over part)
        return out


_DOUBLE_BACKWARD_HINT = (
    "the Hessian-vector product needs a double backward (the gradient of the gradient), and a "
    "kernel in this model has none. The usual cause is a fused attention kernel (PyTorch's "
    "flash / memory-efficient scaled_dot_product_attention, flash-attn, xformers, a custom "
    "Triton kernel) or a custom autograd.Function marked once_differentiable. Fix: run the "
    "diagnostics with the math attention backend, e.g. "
    "`with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH): ...` "
    "(the diagnostics do this when sdpa_math=True), or switch the model to its eager/'math' "
    "attention implementation (HuggingFace: attn_implementation='eager')"
)


class HessianOperator:
    r"""The linear map :math:`v \mapsto H_{SS} v` of a loss averaged over fixed batches.

    Args:
        loss_fn (callable): ``loss_fn(batch)`` returns the scalar loss on one batch at the
            current parameters (``loss_fn()`` when ``batches`` is None).
        params (sequence of Tensor | Segment): the coordinates S. Tensors mean whole
            parameters; :class:`Segment` selects rows of one.
        batches (sequence, optional): the fixed batches; H is their average (default: None, one
            call of ``loss_fn()``)
        model (nn.Module, optional): put in eval mode around every forward (default: None)
        graph_params (sequence of Tensor, optional): the parameters the gradient graph is built
            for; share one :class:`HessianOperator` cache across blocks with :meth:`restrict`
            (default: the parameters of ``params``)
        cache_graph (bool, optional): keep the gradient graph of every batch between products
            (one forward + backward per batch in all, at the memory of B retained graphs);
            False recomputes it for every product (default: True)
        sdpa_math (bool, optional): run the forwards under the math SDPA backend so attention
            has a double backward (default: True)
        check_deterministic (bool, optional): evaluate the first batch twice and raise if the
            losses differ (active dropout) (default: True)
    """

    def __init__(
        self,
        loss_fn: Callable[..., Tensor],
        params: Sequence,
        batches: Optional[Sequence[Any]] = None,
        *,
        model: Optional[nn.Module] = None,
        graph_params: Optional[Sequence[Tensor]] = None,
        cache_graph: bool = True,
        sdpa_math: bool = True,
        check_deterministic: bool = True,
    ):
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        self.segments = [s if isinstance(s, Segment) else Segment(s) for s in params]
        if not self.segments:
            raise ValueError("HessianOperator needs at least one parameter")
        # (a tied tensor passed twice doubled the dimension and every eigenvalue: an audit)
        check_disjoint("the operator's parameter list", self.segments)
        for s in self.segments:
            if not s.param.requires_grad:
                raise ValueError(
                    f"a parameter of shape {tuple(s.param.shape)} does not require grad: the "
                    "Hessian with respect to it is not defined by autograd"
                )
        if batches is not None and not hasattr(batches, "__len__"):  # (a generator: one pass)
            raise TypeError(f"batches must be a sequence (a list of batches, used on every "
                            f"product), got {type(batches).__name__}: pass list(...) of it")
        if batches is not None and len(batches) == 0:
            raise ValueError("batches is empty: pass at least one batch (or None)")
        self._shared = _GradCache(
            loss_fn, batches, model, graph_params or _unique([s.param for s in self.segments]),
            cache_graph, sdpa_math, check_deterministic,
        )
        self._index = self._shared.index_of(self.segments)
        self.dim = sum(s.numel for s in self.segments)
        first = self.segments[0].param
        self.device = first.device
        self.matvecs = 0

    def restrict(self, segments: Sequence) -> HessianOperator:
        """The operator of a sub-block ``H_TT``, sharing this one's batches and cached graphs.

        Every parameter of ``segments`` must be among this operator's ``graph_params``."""
        op = object.__new__(HessianOperator)
        op.segments = [s if isinstance(s, Segment) else Segment(s) for s in segments]
        if not op.segments:
            raise ValueError("restrict() needs at least one segment")
        op._shared = self._shared
        op._index = self._shared.index_of(op.segments)
        op.dim = sum(s.numel for s in op.segments)
        op.device = op.segments[0].param.device
        op.matvecs = 0
        return op

    def __call__(self, v: Tensor) -> Tensor:
        return self.matvec(v)

    def matvec(self, v: Tensor) -> Tensor:
        """``H_SS v`` for a flat vector ``v`` of length ``dim`` (returned in float64)."""
        if v.dim() != 1 or v.numel() != self.dim:
            raise ValueError(f"expected a flat vector of {self.dim} elements, got {tuple(v.shape)}")
        pieces, offset = [], 0
        for s in self.segments:
            pieces.append(s.embed(v[offset:offset + s.numel].to(s.param.dtype)))
            offset += s.numel
        full = self._shared.hvp(self._index, pieces)
        self.matvecs += 1
        out = [s.take(h).reshape(-1).to(torch.float64) for s, h in zip(self.segments, full)]
        return torch.cat(out)


def _unique(params):
    seen, out = set(), []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def _has_error_node(grads) -> bool:
    """Whether a gradient's graph holds the node a once_differentiable backward leaves (torch's
    ``Error`` node: differentiating through it should raise, but it has no edges to the
    parameters, so ``autograd.grad(..., allow_unused=True)`` returns None, read as zeros). One
    walk over the graph per set of gradients, each node once."""
    seen, stack = set(), [g.grad_fn for g in grads if g is not None and g.grad_fn is not None]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if type(fn).__name__ in ("Error", "DelayedError"):
            return True
        stack.extend(f for f, _ in fn.next_functions)
    return False


def _is_once_differentiable(fn) -> bool:
    """Whether a graph node is a custom ``autograd.Function`` whose backward is marked
    ``once_differentiable`` (which wraps it in a function named "wrapper", defined in
    torch/autograd/function.py)."""
    backward = getattr(getattr(fn, "_forward_cls", None), "backward", None)
    code = getattr(backward, "__code__", None)
    return code is not None and code.co_name == "wrapper" and \
        code.co_filename.replace("\\", "/").endswith("torch/autograd/function.py")


def _once_differentiable_node(loss: Tensor, params) -> bool:
    """Whether the loss's graph holds a ``once_differentiable`` function between the loss and
    ``params``. In the middle of a network torch leaves an ``Error`` node in the gradient's
    graph for it (see :func:`_has_error_node`); as the loss's last op (a fused cross-entropy
    kernel) it leaves nothing: the gradient just does not depend on the parameters through
    it, and its curvature is silently dropped (λ_max 0 for a true 10). One that no path from
    the loss to ``params`` crosses (a fused activation below the block asked for) drops
    nothing of theirs. One walk, each node once (iterative: graphs can be deep)."""
    wanted = {id(p) for p in params}
    reaches: dict = {}  # node -> whether a path from it ends at one of params
    stack = [(loss.grad_fn, False)]
    while stack:
        fn, children_done = stack.pop()
        if fn is None or (fn in reaches and not children_done):
            continue
        nexts = [f for f, _ in fn.next_functions if f is not None]
        if not children_done:
            reaches[fn] = False  # (on the way down: a node is visited once)
            stack.append((fn, True))
            stack.extend((f, False) for f in nexts if f not in reaches)
            continue
        reaches[fn] = id(getattr(fn, "variable", None)) in wanted or \
            any(reaches.get(f, False) for f in nexts)
        if reaches[fn] and _is_once_differentiable(fn):
            return True
    return False


class _GradCache:
    """Per-batch gradient graphs shared by every block operator of one model."""

    def __init__(self, loss_fn, batches, model, graph_params, cache_graph, sdpa_math,
                 check_deterministic):
        self.loss_fn = loss_fn
        self.batches = list(batches) if batches is not None else None
        self.model = model
        self.params = list(graph_params)
        self.cache_graph = cache_graph
        self.sdpa_math = sdpa_math
        self.check_deterministic = check_deterministic
        self._graphs: Optional[list] = None
        self._checked = False

    def index_of(self, segments):
        ids = {id(p): i for i, p in enumerate(self.params)}
        try:
            return [ids[id(s.param)] for s in segments]
        except KeyError:
            raise ValueError(
                "a block parameter is not among the parameters the gradient graph is built for "
                "(graph_params)"
            ) from None

    def _loss(self, batch) -> Tensor:
        out = self.loss_fn() if self.batches is None else self.loss_fn(batch)
        if not isinstance(out, Tensor) or out.numel() != 1:
            raise TypeError(f"loss_fn must return a scalar tensor, got {out!r:.80}")
        return out.reshape(())

    def _batches(self):
        return [None] if self.batches is None else self.batches

    def _gradients(self, batch):
        with torch.enable_grad(), eval_mode(self.model), _sdpa_math_context(self.sdpa_math):
            loss = self._loss(batch)
            if not loss.requires_grad:
                raise ValueError("the loss does not depend on the parameters (no grad_fn)")
            if not bool(torch.isfinite(loss)):  # (an inf loss can have a finite Hessian, which
                # then read as the spectrum of a loss that is not there)
                raise ValueError(f"the loss is not finite ({float(loss)}) on a batch: the "
                                 "Hessian of the loss is not defined there; check the batches "
                                 "and the loss (a mask of -inf on a target class, say)")
            try:
                grads = torch.autograd.grad(loss, self.params, create_graph=True,
                                            allow_unused=True)
            except RuntimeError as e:
                raise DoubleBackwardError(f"{_DOUBLE_BACKWARD_HINT}. Original error: {e}") from e
        if _has_error_node(grads) or _once_differentiable_node(loss, self.params):
            raise DoubleBackwardError(
                f"{_DOUBLE_BACKWARD_HINT}. Here an autograd.Function marked once_differentiable "
                "(a fused kernel's backward) is in the gradient's graph: its second derivative "
                "is not an error but a missing path, which would read as a Hessian of 0")
        return grads

    def _check(self):
        if self._checked or not self.check_deterministic:
            return
        self._checked = True
        first = self._batches()[0]
        # (with autograd on: a loss that differentiates inside itself, a gradient penalty,
        # raised "does not require grad" under no_grad)
        with torch.enable_grad(), eval_mode(self.model), _sdpa_math_context(self.sdpa_math):
            a, b = float(self._loss(first).detach()), float(self._loss(first).detach())
        if a != b and abs(a - b) > 1e-6 * max(1.0, abs(a)):
            raise RuntimeError(
                f"the loss is not deterministic (two evaluations on the same batch gave {a} and "
                f"{b}): dropout or another random layer is active even in eval mode (e.g. "
                "F.dropout(x, training=True)). The Hessian of a random function is not defined; "
                "disable it for the diagnostics (or pass check_deterministic=False)"
            )

    def _fingerprint(self) -> Tensor:
        """A sum per parameter and floating buffer (float64): an optimizer step moves it. The flat store's
        kernels write θ without bumping a version counter, so a cached graph, whose products
        are those of the parameters it was built at, read as the current Hessian after steps
        (5e-2 off after 5 ArmijoAdam steps, silently: a diagnostics audit)."""
        with torch.no_grad():  # (summed in float64 without a copy; one transfer)
            sums = [p.detach().sum(dtype=torch.float64) for p in self.params]
            sums += [b.detach().sum(dtype=torch.float64) for b in self._buffers()]
            dev = sums[0].device
            return torch.stack([x.to(dev) for x in sums]).cpu()

    def _buffers(self) -> list:
        """The model's floating buffers (BatchNorm's statistics, recalibrated between products,
        change the function the cached graph was built for)."""
        if self.model is None:
            return []
        return [b for b in self.model.buffers() if b.is_floating_point()]

    def hvp(self, index, pieces):
        self._check()
        n = len(self._batches())
        total = [None] * len(index)
        if self.cache_graph and self._graphs is not None and \
                not torch.equal(self._fingerprint().view(torch.int64),
                                self._graphs_at.view(torch.int64)):  # (bits: NaN == NaN)
            self._graphs = None  # the parameters moved since the graph was built: build again
        if self.cache_graph and self._graphs is None:
            self._graphs = [self._gradients(b) for b in self._batches()]
            self._graphs_at = self._fingerprint()
        for bi, batch in enumerate(self._batches()):
            grads = self._graphs[bi] if self.cache_graph else self._gradients(batch)
            outs, ins, vs, where = [], [], [], []
            for j, (i, v) in enumerate(zip(index, pieces)):
                g = grads[i]
                if g is not None and g.requires_grad:  # else the gradient is constant: H row = 0
                    outs.append(g)
                    vs.append(v)
                ins.append(self.params[i])
                where.append(j)
            if outs:
                try:
                    with _sdpa_math_context(self.sdpa_math):
                        hv = torch.autograd.grad(outs, ins, grad_outputs=vs,
                                                 retain_graph=self.cache_graph, allow_unused=True)
                except RuntimeError as e:
                    if "modified by an inplace operation" in str(e):
                        raise RuntimeError(
                            "the parameters were changed in place since this operator built "
                            "its graph (an optimizer step in between?): build a new "
                            f"HessianOperator, or pass cache_graph=False. Original error: {e}"
                        ) from e
                    raise DoubleBackwardError(f"{_DOUBLE_BACKWARD_HINT}. Original error: {e}") \
                        from e
            else:
                hv = [None] * len(ins)
            for j, h in zip(where, hv):
                h = torch.zeros_like(ins[j]) if h is None else h.detach()
                total[j] = h if total[j] is None else total[j] + h
        return [t / n for t in total]
