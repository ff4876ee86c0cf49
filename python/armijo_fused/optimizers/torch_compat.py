"""torch.optim's constructor keywords and checkpoints, taken so that swapping the class is the
only change to a training script.

nanoGPT builds ``torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True)``, torchtitan passes
``fused`` and ``foreach`` from its config, and SGD code says ``SGD(params, lr, momentum=0.9,
nesterov=True)``. The optimizers take the same positional order as torch's and these keywords:
``foreach``/``fused`` are accepted and change nothing (every pass is fused; ``backend`` picks the
kernels); options that would change the math and are not implemented are refused by name rather
than ignored. :func:`from_torch_state_dict` turns a torch optimizer's checkpoint into ours, so a
run started with AdamW or SGD continues with the line search.
"""

from __future__ import annotations

import numbers
import warnings

import torch

TORCH_ARGS = r"""        foreach, fused (bool, optional): accepted so that code written for torch.optim runs
            unchanged, and ignored: every pass is already one fused kernel; ``backend`` picks
            which (default: None)
        maximize (bool, optional): only False; the search minimises the loss (default: False)
        capturable, differentiable (bool, optional): only False: a search reads each trial's
            loss on the host, which neither CUDA graphs nor autograd through ``step`` can hold
            (default: False)"""


def check_torch_keywords(owner: str, *, foreach=None, fused=None, maximize=False,
                         capturable=False, differentiable=False) -> None:
    for name, value in (("foreach", foreach), ("fused", fused)):
        if value is not None and not isinstance(value, bool):
            raise TypeError(f"{owner}: {name} must be None or a bool, got {value!r}")
    if maximize:
        raise ValueError(f"{owner} does not support maximize=True: the line search minimises "
                         "the loss; return its negative from the closure instead")
    for name, value in (("capturable", capturable), ("differentiable", differentiable)):
        if value:
            raise ValueError(f"{owner} does not support {name}=True: a search reads each "
                             "trial's loss on the host")


#: torch options a param group may carry that would change the math, none implemented
_UNSUPPORTED_GROUP_OPTIONS = ("maximize", "amsgrad", "centered", "dampening", "capturable",
                              "differentiable")
#: the group keys :func:`check_group_options` reads at every step (when one changed); the
#: options of the whole optimizer below, which no group holds, are seen by the group's length
GROUP_OPTION_KEYS = (*_UNSUPPORTED_GROUP_OPTIONS, "nesterov", "momentum", "decoupled_weight_decay",
                     "blocks_by")
#: constructor options of the whole optimizer: in a param group they would do nothing (torch
#: ignores keys it does not read; these look per-group and are not), so they are refused there
_WHOLE_OPTIMIZER_OPTIONS = (
    "direction", "init_step_size", "c", "backtrack", "growth", "smoothing", "max_trials",
    "max_step", "collapse_ratio", "max_drop", "trend_guard", "cadence", "max_interval",
    "max_grad_norm", "check_finite",
    "backend", "layerwise", "model", "block_search", "merge_below", "exact_revert",
    "process_group", "candidates", "flat", "tile", "momentum_search")


def check_group_options(owner: str, rule, group: dict) -> None:
    """torch's optimizers read some options per param group (``{"params": ..., "nesterov":
    True}``). The direction rule is the optimizer's, fixed at construction, so a group that asks
    for another one, or for an option not implemented, is refused by name, as the same keyword
    is at construction; values the rule reads per group (momentum, betas, eps) stay per group."""
    whole = [key for key in _WHOLE_OPTIMIZER_OPTIONS if key in group]
    if whole:
        raise ValueError(
            f"{owner}: a param group sets {', '.join(f'{k}={group[k]!r}' for k in whole)}: "
            f"{'an option' if len(whole) == 1 else 'options'} of the whole optimizer, which a "
            f"group cannot change: pass {'it' if len(whole) == 1 else 'them'} to {owner}(...) "
            "(per group: lr, weight_decay and the direction's hyperparameters; layerwise=True "
            "gives each group its own step size)")
    if group.get("blocks_by", "name") not in ("name", "group"):
        raise ValueError(f"{owner}: invalid blocks_by in a param group: {group['blocks_by']!r} "
                         "(choose 'name': cut by module names, or 'group': the group is one "
                         "block)")
    if group.get("decoupled_weight_decay") is False and group.get("weight_decay"):
        raise ValueError(
            f"{owner}: a param group asks for decoupled_weight_decay=False with weight_decay="
            f"{group['weight_decay']!r}: the weight decay here is always decoupled (AdamW style, "
            "d = u + λθ); L2 regularisation folded into the gradient (torch.optim.Adam's "
            "default) is not implemented: add the L2 term to the loss, or take the decoupled form")
    if group.get("nesterov") not in (None, True, False):
        raise TypeError(f"{owner}: invalid nesterov in a param group: {group['nesterov']!r} "
                        "(expected True or False)")
    bad = [f"{key}={group[key]!r}" for key in _UNSUPPORTED_GROUP_OPTIONS if group.get(key)]
    if "nesterov" in group and bool(group["nesterov"]) != (rule.name == "nesterov"):
        bad.append(f"nesterov={group['nesterov']!r} (the optimizer's direction is "
                   f"{rule.name!r})")
    if group.get("momentum") and "momentum" not in rule.hyperparameters:
        bad.append(f"momentum={group['momentum']!r} (direction {rule.name!r} keeps no momentum "
                   "buffer; a scheduler with cycle_momentum=True, OneCycleLR's and CyclicLR's "
                   "default, writes it: pass cycle_momentum=False, or build the optimizer with "
                   "momentum)")
    if bad:
        how = ("ArmijoSGD(..., momentum=0.9, nesterov=True)" if owner == "ArmijoSGD"
               else f"{owner}(..., direction=...)")
        raise ValueError(
            f"{owner}: a param group asks for {', '.join(bad)}, which {owner} does not do per "
            f"group: the direction is chosen at construction ({how}), and "
            f"{', '.join(_UNSUPPORTED_GROUP_OPTIONS)} are not implemented")


def sgd_direction(direction, momentum, dampening, nesterov) -> tuple[str, float | None]:
    """ArmijoSGD's rule and μ from either spelling: torch's ``momentum``/``nesterov`` or
    ``direction``. Returns (direction, momentum), momentum None for plain SGD."""
    if momentum is not None and (not isinstance(momentum, numbers.Real)
                                 or isinstance(momentum, bool)):
        raise TypeError(f"invalid momentum: {momentum!r} (expected a number in [0.0, 1.0))")
    if nesterov is not None and nesterov not in (True, False):
        # (bool("False") is True: a silent Nesterov direction; None is False, as torch's)
        raise TypeError(f"invalid nesterov: {nesterov!r} (expected True or False)")
    if dampening != 0:
        raise ValueError(f"ArmijoSGD does not support dampening (got {dampening!r}); the momentum "
                         "buffer is b = μ b + g, as torch.optim.SGD's with dampening=0")
    if direction is None:
        if nesterov:
            if not momentum:
                raise ValueError("nesterov=True needs momentum > 0 (as in torch.optim.SGD)")
            return "nesterov", float(momentum)
        return ("momentum", float(momentum)) if momentum else ("sgd", None)
    if direction not in ("sgd", "momentum", "nesterov"):
        raise ValueError(
            f"invalid direction for ArmijoSGD: {direction!r} (choose sgd, momentum or "
            "nesterov; adam, nadam and rmsprop are ArmijoAdam's)"
        )
    if nesterov and direction != "nesterov":
        raise ValueError(f"nesterov=True contradicts direction={direction!r}")
    if direction == "sgd":
        if momentum:
            raise ValueError(f"direction='sgd' takes no momentum (got {momentum!r}); use "
                             "direction='momentum', or leave direction out")
        return "sgd", None
    if direction == "nesterov" and momentum is not None and not momentum:
        # (Nesterov's look-ahead at μ = 0 is plain SGD, built in silence; torch refuses
        # nesterov=True at momentum 0 too. The heavy-ball buffer at μ = 0 is well defined)
        raise ValueError(f"direction='nesterov' needs momentum > 0 (got {momentum!r}); "
                         "leave momentum out for 0.9, or use direction='sgd'")
    return direction, 0.9 if momentum is None else float(momentum)


# torch options whose saved value changes the math in a way the rules do not implement
_REFUSED_IN_CHECKPOINTS = ("amsgrad", "maximize", "centered", "dampening")
# hyperparameters taken from a torch checkpoint where the live group has them
_TAKEN = ("lr", "initial_lr", "max_lr", "betas", "eps", "alpha", "momentum", "weight_decay")
_SCHEDULE_KEYS = ("initial_lr", "max_lr")  # taken even where the live group lacks them
#: per-parameter tensors of torch's optimizers that are counters, not moments
_BOOKKEEPING = ("step", "mu_product")


def lr_peak(group) -> object:
    """lr_0 of a param group, the lr at which the applied step equals the searched one: the
    schedule's peak when the group records it (``max_lr``: OneCycleLR), else ``initial_lr``
    (torch schedulers' starting lr), else the lr given at construction (``lr_ref``)."""
    for key in ("max_lr", "initial_lr"):
        if group.get(key) is not None:
            return group[key]
    return group["lr_ref"] if "lr_ref" in group else group["lr"]


def _float(x) -> float:
    return float(x.item()) if hasattr(x, "item") else float(x)


def _coupled_decay(saved: dict) -> bool:
    """Was a torch checkpoint group's weight decay L2, added to the gradient, where ours is
    decoupled? Where the group says so: AdamW's carry ``decoupled_weight_decay=True``, Adam's
    and NAdam's ``False``; RMSprop's (``centered``) is always L2, and SGD's (``dampening``)
    too, which without momentum is the same step as ours. (Older torch wrote no flag: an Adam
    there cannot be told from an AdamW.)"""
    if not saved.get("weight_decay"):
        return False
    if "decoupled_weight_decay" in saved:
        return not saved["decoupled_weight_decay"]
    if "centered" in saved:
        return True
    return "dampening" in saved and bool(saved.get("momentum"))


def _torch_family(saved: dict) -> str | None:
    """Which torch optimizer a checkpoint group comes from, by the keys only it writes."""
    if "nesterov" in saved or "dampening" in saved:
        return "SGD"
    if "betas" in saved:
        # RAdam: Adam's moments, a rectified direction; the only one with the decoupled flag
        # and neither amsgrad (Adam, AdamW) nor momentum_decay (NAdam)
        if "decoupled_weight_decay" in saved and "amsgrad" not in saved \
                and "momentum_decay" not in saved:
            return "RAdam"
        return "Adam"
    if "alpha" in saved or "centered" in saved:
        return "RMSprop"
    return None


#: how a warning names each family: the optimizers whose checkpoints it cannot tell apart
_FAMILY_NAMES = {"Adam": "AdamW/Adam/NAdam"}

#: the torch family each direction continues
_FAMILY = {"sgd": "SGD", "momentum": "SGD", "nesterov": "SGD", "adam": "Adam", "nadam": "Adam",
           "rmsprop": "RMSprop"}


def _warn_other_direction(owner: str, rule, saved_groups: list[dict]) -> None:
    """A checkpoint of another torch direction whose state does not say so (none yet, or
    plain SGD's, which keeps none) loads: say that its lr is another direction's step size,
    rather than let a run continue as if it had been this optimizer's."""
    lead = saved_groups[0] if saved_groups else {}
    family = _torch_family(lead)
    ours = _FAMILY.get(rule.name)
    if family is not None and ours is not None and family != ours:
        what = f"torch.optim.{_FAMILY_NAMES.get(family, family)}'s"
    elif family == "SGD" and rule.name in ("momentum", "nesterov") and bool(
            lead.get("nesterov")) != (rule.name == "nesterov"):
        what = f"torch.optim.SGD(nesterov={bool(lead.get('nesterov'))})'s"
    else:
        return
    warnings.warn(
        f"the state_dict is {what}, a direction other than {owner}(direction={rule.name!r})'s: "
        f"it continues along its own, from the checkpoint's lr ({_float(lr_peak(lead)):g}) as "
        "its step size, which the next searches correct", stacklevel=5)


def from_torch_state_dict(owner: str, rule, live_groups: list[dict], state_dict: dict,
                          layerwise: bool = False) -> dict:
    """A torch.optim checkpoint (AdamW, Adam, NAdam, RMSprop, SGD) as one of ours.

    The moments carry over by name (torch's ``exp_avg``/``exp_avg_sq``, ``square_avg`` and
    ``momentum_buffer`` are the rules' state names); the per-parameter ``step`` becomes the
    group's bias-correction count ``folded``; the step size starts at the learning rate the run
    used, η = lr_0 (:func:`lr_peak`: OneCycleLR's ``max_lr``, else ``initial_lr`` under a
    scheduler, else ``lr``; lr_0 / (1 - μ) for SGD momentum searched along the gradient, whose
    steps apply (1 - μ)·η), so that the first step moves as the torch optimizer would have, and
    the next step searches. Anything the rules cannot continue (amsgrad's maximum, a centred
    RMSprop, a direction whose state is missing) is a ``ValueError`` that names it, raised
    before anything changes. With one global step size
    (``layerwise=False``) every group starts from the η of the first group whose lr is above 0.
    A group saved at lr 0 (no scheduler's ``initial_lr``) keeps the live optimizer's lr_0 and,
    if no group has one, its η.
    """
    saved_groups = state_dict.get("param_groups", [])
    if len(saved_groups) != len(live_groups):
        raise ValueError(f"the state_dict has {len(saved_groups)} param groups, this {owner} "
                         f"{len(live_groups)}")
    saved_state = state_dict.get("state", {})
    # global: one η shared by every group, the lr of the first group that trained (a frozen
    # group at lr 0 first, an embedding for instance, has no step size to give)
    lead_all = next((g for g in saved_groups if _float(lr_peak(g)) > 0.0),
                    saved_groups[0] if saved_groups else {})
    groups, state, uneven = [], {}, []
    for gi, (saved, live) in enumerate(zip(saved_groups, live_groups)):
        for key in _REFUSED_IN_CHECKPOINTS:
            if saved.get(key):
                raise ValueError(f"the state_dict comes from a torch optimizer with {key}="
                                 f"{saved[key]!r}, which {owner} does not implement")
        if saved.get("momentum") and "momentum" not in rule.hyperparameters:
            raise ValueError(f"the state_dict's group {gi} uses momentum={saved['momentum']!r}; "
                             f"{owner}(direction={rule.name!r}) keeps no momentum buffer")
        steps = []
        for pid in saved["params"]:
            per = saved_state.get(pid) or {}
            if not per:
                continue  # never stepped: fresh state, as in torch
            missing = [n for n in rule.state_names if per.get(n) is None]
            # moments this rule would drop (an AdamW checkpoint into plain ArmijoSGD); torch's
            # own counters (step, NAdam's mu_product) are bookkeeping, not moments
            foreign = sorted(n for n, v in per.items() if torch.is_tensor(v)
                             and n not in rule.state_names and n not in _BOOKKEEPING)
            if missing or foreign:
                raise ValueError(
                    f"the state_dict's per-parameter state holds {sorted(per)}; "
                    f"{owner}(direction={rule.name!r}) continues from {list(rule.state_names)}: "
                    f"load the checkpoint of the matching torch optimizer (exp_avg/exp_avg_sq: "
                    f"AdamW, Adam, NAdam; square_avg: RMSprop; momentum_buffer: SGD)")
            state[pid] = {n: per[n] for n in rule.state_names}
            if "step" in per:
                steps.append(int(_float(per["step"])))
        group = {k: v for k, v in live.items() if k != "params"}
        if "loss_trend" in group:
            group["loss_trend"] = None  # (the averages of this optimizer's own run until now)
        group.update({k: saved[k] for k in _TAKEN
                      if k in saved and (k in live or k in _SCHEDULE_KEYS)})
        folded = max(steps, default=0)
        if rule.bias_corrected and steps and min(steps) != folded:
            uneven.append((gi, min(steps), folded))
        lead = saved if layerwise else lead_all
        eta = _float(lr_peak(lead))
        if not eta > 0.0:  # saved at lr 0 (a warmup written by hand, a frozen group): no step
            # size to take; keep the live one (η = 0 never grew: the run never trained)
            live_eta = live["step_size"]
            eta = min(live_eta) if isinstance(live_eta, list) else _float(live_eta)
        elif live.get("step_size_along") == "gradient":  # SGD momentum searched along g: the
            eta /= 1.0 - _float(lead.get("momentum", 0.0))  # step applies (1 - μ)·η along d
        blocks = len(live["step_size"]) if isinstance(live["step_size"], list) else None

        def per_block(value, blocks=blocks):
            return [value] * blocks if blocks is not None else value

        # lr_0, the lr the schedule's factor lr_t / lr_0 is measured against: the checkpoint's;
        # where it holds none above 0 (saved at lr 0, no scheduler's initial_lr), the live
        # optimizer's: lr_0 = 0 made the factor 1 at any lr, so the rest of a warmup written by
        # hand was not applied
        lr_ref = _float(saved["lr"]) if _float(lr_peak(saved)) > 0.0 else live["lr_ref"]
        group.update(params=list(saved["params"]), lr_ref=lr_ref, step=folded,
                     folded=folded, step_size=per_block(eta), step_size_avg=per_block(eta),
                     step_length=per_block(0.0), collapsed=per_block(0),
                     next_search=folded + 1, search_interval=1,
                     searches=0, forwards=0, backwards=0)
        if blocks is not None:  # layer-wise: every block starts unmerged, none searched yet
            group.update(block_owner=list(range(blocks)), block_searched_at=[0] * blocks,
                         block_tested=[1] * blocks)  # (η starts at the lr torch used)
        groups.append(group)
    # (only now that nothing refuses it: a warning that it continues, then a refusal, hid the
    # refusal's reason where warnings are errors)
    _warn_other_direction(owner, rule, saved_groups)
    if uneven:
        # torch counts steps per tensor, and skips a tensor whose gradient is None (an unused
        # head, an expert no token reached); a group here shares one count
        where = "; ".join(f"group {gi}: {lo} to {hi}" for gi, lo, hi in uneven)
        warnings.warn(
            f"{owner}: the torch checkpoint's tensors were stepped different numbers of times "
            f"({where}): here a param group shares one bias-correction count, the largest, so "
            "the tensors that lag get their next directions bias-corrected as if they had "
            "folded as many gradients (their early moments' zero start is under-corrected)",
            stacklevel=4)
    coupled = [gi for gi, g in enumerate(saved_groups) if _coupled_decay(g)]
    if coupled:
        warnings.warn(
            f"the state_dict's param group(s) {coupled} used L2 weight decay (added to the "
            f"gradient, torch's default outside AdamW); {owner} continues with decoupled decay "
            "at the same λ (d = u + λθ), a different regulariser: set the groups' "
            "weight_decay after loading if that is not what you want", stacklevel=4)
    return {"state": state, "param_groups": groups}


def is_torch_state_dict(state_dict: dict) -> bool:
    """A checkpoint of a torch.optim optimizer rather than of ours (no line-search keys)."""
    groups = state_dict.get("param_groups") or [{}]
    return not any("step_size" in g for g in groups)
