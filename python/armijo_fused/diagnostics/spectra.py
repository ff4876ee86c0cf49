r"""Hessian spectra of a model: the whole Hessian, and its diagonal blocks.

``hessian_spectrum`` runs SLQ (plus power iteration and Hutchinson) on the full Hessian of a loss
averaged over fixed batches. ``block_spectra`` does the same on every diagonal block
:math:`H_{bb} = \partial^2 f / \partial\theta_b^2`, with blocks chosen by ``granularity``:

- ``"block"``: the blocks the layer-wise optimizer uses (:func:`armijo_fused.blocks.assign_blocks`:
  embeddings, each layer, the final norm, the head);
- ``"tensor"``: every parameter tensor;
- ``"head"``: every parameter tensor, with the query and key projections split per attention
  head (outputs ``h·d : (h+1)·d`` of the weight). Recognised: separate projections named
  ``q_proj / k_proj / wq / wk / query / key / to_q / to_k / q / k`` and fused
  ``[Q; K; V]`` projections (``c_attn``, ``qkv``, ``Wqkv``, ``qkv_proj``, ``in_proj_weight`` of
  ``nn.MultiheadAttention``) whose weight has 3·d_model rows. The number of heads comes from
  ``num_heads`` or from an attribute ``n_head / num_heads / n_heads / nhead /
  num_attention_heads`` of the module holding the weight or of one of its ancestors. A weight
  held by HF's ``Conv1D`` (GPT-2: stored [in, out]) is split by columns; a key projection with
  fewer outputs than the query projection beside it (grouped-query attention) splits into
  proportionally fewer heads.

Or pass ``blocks={name: [tensors or Segments]}`` for any other split. All blocks share one
cached gradient graph per batch, so a block's products cost a second backward only.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any, Callable, Optional

from torch import Tensor, nn

from ..blocks import assign_blocks
from .hvp import HessianOperator, Segment
from .hvp import check_disjoint as _check_disjoint
from .slq import Spectrum, estimate_spectrum

__all__ = ["hessian_spectrum", "block_spectra", "model_blocks"]

_SEPARATE_QK = re.compile(r"(?:^|\.)(q_proj|k_proj|wq|wk|query|key|to_q|to_k|q|k)\.weight$")
_FUSED_QKV = re.compile(r"(?:^|\.)(?:(?:c_attn|qkv|Wqkv|qkv_proj)\.weight|in_proj_weight)$")
_HEAD_ATTRS = ("n_head", "num_heads", "n_heads", "nhead", "num_attention_heads")
_KV_HEAD_ATTRS = ("n_kv_head", "n_kv_heads", "num_kv_heads", "num_key_value_heads",
                  "kv_n_heads", "n_head_kv", "kv_heads")


def _find_heads(model: nn.Module, param_name: str, kv: bool = False) -> Optional[int]:
    """``num_heads`` from the module holding the parameter or from one of its ancestors, or
    their ``config``. ``kv``: the key/value head count, read only where the head count was
    found (a far ancestor's config of a grouped-query decoder kept a vision tower's plain qkv
    whole: a review), or 1 where that place says ``multi_query=True``."""
    parts = param_name.split(".")[:-1]
    for depth in range(len(parts), -1, -1):
        try:
            mod = model.get_submodule(".".join(parts[:depth]))
        except AttributeError:
            continue
        for where in (mod, getattr(mod, "config", None)):
            heads = next((getattr(where, a) for a in _HEAD_ATTRS if isinstance(
                getattr(where, a, None), int) and getattr(where, a) > 0), None)
            if heads is None:
                continue
            if not kv:
                return heads
            for attr in _KV_HEAD_ATTRS:
                v = getattr(where, attr, None)
                if isinstance(v, int) and v > 0:
                    return v
            return 1 if getattr(where, "multi_query", False) is True else None
    return None


_QUERY_OF = {"k_proj": "q_proj", "wk": "wq", "key": "query", "to_k": "to_q", "k": "q"}


def _out_dim(model, name) -> int:
    """The dimension of a weight that indexes its outputs: 0 for ``nn.Linear`` ([out, in]), 1
    for HF's ``Conv1D`` (GPT-2's ``c_attn``, stored [in, out])."""
    try:
        holder = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
    except AttributeError:
        return 0
    return 1 if type(holder).__name__ == "Conv1D" else 0


def _key_heads(model, name, p, which, heads, dim) -> int:
    """The heads a separate key projection splits into: fewer than the queries' under grouped-
    query attention (Llama's k_proj holds num_key_value_heads·d outputs), found from the query
    projection beside it."""
    query = name[: len(name) - len(which) - len(".weight")] + _QUERY_OF[which] + ".weight"
    try:
        q = model.get_parameter(query)
    except AttributeError:
        return heads
    if q.dim() != 2 or q.shape[dim] == p.shape[dim] or (p.shape[dim] * heads) % q.shape[dim]:
        return heads
    return p.shape[dim] * heads // q.shape[dim]


def _head_segments(model, name, p, num_heads) -> Optional[list]:
    """[(label, Segment)] per head for a Q/K weight, or None when ``name`` is not one."""
    fused = _FUSED_QKV.search(name)
    sep = _SEPARATE_QK.search(name)
    if not (fused or sep) or p.dim() != 2:
        return None
    heads = num_heads or _find_heads(model, name)
    if heads is None:
        raise ValueError(
            f"granularity='head' needs the number of attention heads for {name!r}: pass "
            "num_heads= (no n_head / num_heads attribute found on the module or its parents)"
        )
    dim = _out_dim(model, name)
    outputs = p.shape[dim]
    if fused:
        kv = _find_heads(model, name, kv=True)
        if outputs % 3 or (kv is not None and kv != heads):
            # (not a [Q; K; V] projection of three equal parts after all: one block, as any
            # tensor. A grouped-query one, fewer key/value heads than query heads, was split
            # in thirds under confident names, the rows of q, k and v mixed: an audit)
            return None
        width = outputs // 3
        if width % heads:
            raise ValueError(f"{name}: {width} query outputs do not split into {heads} heads")
        d = width // heads
        out = [(f"{name}[q.h{h}]", Segment(p, h * d, (h + 1) * d, dim)) for h in range(heads)]
        out += [(f"{name}[k.h{h}]", Segment(p, width + h * d, width + (h + 1) * d, dim))
                for h in range(heads)]
        out.append((f"{name}[v]", Segment(p, 2 * width, 3 * width, dim)))
        return out
    which = sep.group(1)
    tag = "q" if which in ("q_proj", "wq", "query", "to_q", "q") else "k"
    if tag == "k":
        heads = _key_heads(model, name, p, which, heads, dim)
    if outputs % heads:
        raise ValueError(f"{name}: {outputs} outputs do not split into {heads} heads")
    d = outputs // heads
    return [(f"{name}[{tag}.h{h}]", Segment(p, h * d, (h + 1) * d, dim)) for h in range(heads)]


def model_blocks(model: nn.Module, granularity: str = "block", *,
                 num_heads: Optional[int] = None) -> OrderedDict[str, list]:
    """``{block name: [tensors or Segments]}`` of the trainable parameters (see module doc)."""
    if granularity == "block":
        return OrderedDict((k, list(v)) for k, v in assign_blocks(model).items())
    if granularity not in ("tensor", "head"):
        raise ValueError(f"invalid granularity: {granularity!r} (choose block, tensor or head)")
    out: OrderedDict[str, list] = OrderedDict()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        segs = _head_segments(model, name, p, num_heads) if granularity == "head" else None
        if segs is None:
            out[name] = [p]
        else:
            for label, seg in segs:
                out[label] = [seg]
    return out


#: the options of :func:`hessian_spectrum` that :func:`block_spectra` passes on
_SPECTRUM_KEYS = ("num_probes", "num_steps", "probe", "seed", "power_iters", "power_tol",
                  "trace_samples")


def _spectrum_kwargs(kw):
    return {k: kw[k] for k in _SPECTRUM_KEYS if k in kw}


def hessian_spectrum(
    model: Optional[nn.Module],
    loss_fn: Callable[..., Tensor],
    batches: Optional[Sequence[Any]] = None,
    *,
    params: Optional[Sequence[Tensor]] = None,
    num_probes: int = 4,
    num_steps: int = 30,
    probe: str = "rademacher",
    seed: int = 0,
    power_iters: int = 50,
    trace_samples: int = 0,
    sdpa_math: bool = True,
    cache_graph: bool = True,
    check_deterministic: bool = True,
) -> Spectrum:
    """SLQ spectrum of the full Hessian of ``loss_fn`` averaged over ``batches``.

    Args:
        model (nn.Module | None): held in eval mode during the products (its modes are
            restored); its trainable parameters are the default ``params``.
        loss_fn (callable): ``loss_fn(batch)`` -> scalar loss (``loss_fn()`` if batches is None).
        batches (sequence, optional): fixed batches; the Hessian is their average.
        params (sequence of Tensor, optional): the parameters (default: the model's trainable).
        num_probes (int): SLQ probes P (default: 4). num_steps (int): Lanczos steps m (default: 30).
        probe ("rademacher" | "gaussian"): probe distribution (default: "rademacher").
        seed (int): seeds the probes (default: 0).
        power_iters (int): power-iteration steps for the top eigenvalue, 0 to skip (default: 50).
        trace_samples (int): Hutchinson samples for the trace, 0 to skip (default: 0).
        sdpa_math, cache_graph, check_deterministic: see :class:`~.hvp.HessianOperator`.
    """
    if params is None:
        if model is None:
            raise ValueError("pass model= or params=")
        params = [p for p in model.parameters() if p.requires_grad]
    op = HessianOperator(loss_fn, list(params), batches, model=model, sdpa_math=sdpa_math,
                         cache_graph=cache_graph, check_deterministic=check_deterministic)
    return estimate_spectrum(op, num_probes=num_probes, num_steps=num_steps, probe=probe,
                             seed=seed, power_iters=power_iters, trace_samples=trace_samples,
                             name="full")


def block_spectra(
    model: Optional[nn.Module],
    loss_fn: Callable[..., Tensor],
    batches: Optional[Sequence[Any]] = None,
    *,
    granularity: str = "block",
    blocks: Optional[Mapping[str, Sequence]] = None,
    num_heads: Optional[int] = None,
    sdpa_math: bool = True,
    cache_graph: bool = True,
    check_deterministic: bool = True,
    **spectrum_kwargs,
) -> OrderedDict[str, Spectrum]:
    """``{block: Spectrum}`` of every diagonal Hessian block ``H_bb``.

    ``blocks`` overrides ``granularity`` with an explicit ``{name: [tensors or Segments]}``
    (needed when ``model`` is None). Remaining keyword arguments (``num_probes``, ``num_steps``,
    ``probe``, ``seed``, ``power_iters``, ``trace_samples``) are those of
    :func:`hessian_spectrum`; every block uses the same probe seed.
    """
    unknown = set(spectrum_kwargs) - set(_SPECTRUM_KEYS)
    if unknown:
        raise TypeError(f"block_spectra() got unexpected keyword arguments {sorted(unknown)}")
    if blocks is None:
        if model is None:
            raise ValueError("pass model= (blocks from its parameter names) or blocks=")
        blocks = model_blocks(model, granularity, num_heads=num_heads)
    blocks = OrderedDict((k, [s if isinstance(s, Segment) else Segment(s) for s in v])
                         for k, v in blocks.items() if len(v))
    if not blocks:
        raise ValueError("no trainable parameters to analyse")
    for name, segs in blocks.items():
        _check_disjoint(f"block {name!r}", segs)
    everything = []
    seen = set()
    for segs in blocks.values():
        for s in segs:
            if id(s.param) not in seen:
                seen.add(id(s.param))
                everything.append(s.param)
    base = HessianOperator(loss_fn, everything, batches, model=model, sdpa_math=sdpa_math,
                           cache_graph=cache_graph, check_deterministic=check_deterministic)
    kw = dict(power_iters=50)
    kw.update(_spectrum_kwargs(spectrum_kwargs))
    out: OrderedDict[str, Spectrum] = OrderedDict()
    for name, segs in blocks.items():
        out[name] = estimate_spectrum(base.restrict(segs), name=name, **kw)
    return out

