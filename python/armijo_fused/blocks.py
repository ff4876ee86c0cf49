"""Blocks: which parameters share one step size in the layer-wise search (and in diagnostics).

Transformers' curvature differs strongly between embeddings, each transformer block and the
final norm / head (block heterogeneity), so the natural blocks follow the model's layers. Names
are read from ``model.named_parameters()``:

=====================  ===================================================================
block name             parameters
=====================  ===================================================================
``embeddings``         token / position embeddings (``wte``, ``wpe``, ``embed_tokens``, ``embed_in``,
                       ``embeddings.*`` in BERT, ``tok_embeddings``; ``shared`` in an encoder-decoder)
``layer.<i>``          everything under a numbered layer container: ``h.<i>`` (GPT-2,
                       nanoGPT), ``layer.<i>`` (BERT), ``layers.<i>`` (Llama, torchtitan),
                       ``blocks.<i>``, ``block.<i>`` (T5), ``resblocks.<i>`` (CLIP)
``final``              the last norm before the head (``ln_f``, ``norm``, ``norm_f``, ``final_layernorm``;
                       not inside a numbered module: a UNet's attention blocks' ``norm``)
``head``               the output head (``lm_head``, ``head``, ``cls``, ``pooler``, ``classifier``,
                       ``output``)
``<path>.<i>``         everything under a numbered ``*_blocks`` / ``*_layers`` container, by its
                       path: ``transformer_blocks.<i>`` (DiT, SD3, Flux; Flux's
                       ``single_transformer_blocks.<i>``), ``down_blocks.<i>`` and
                       ``up_blocks.<i>`` (diffusers' UNets), ``wav2vec2.feature_extractor.
                       conv_layers.<i>``; the outermost numbered container of a name decides,
                       and one inside a numbered module is part of that layer
``<i>``                children of an ``nn.Sequential`` (names start with a number)
``<first name>``       anything else: its top-level module name, or, where that module also holds
                       the layers (``wav2vec2.``, ``vit.``), its module's name below the path
                       it shares with them (``feature_projection``, ``pos_conv_embed``,
                       ``layernorm``)
=====================  ===================================================================

A model whose every parameter lies under one module (``self.net = nn.Sequential(...)``, a wrapper
of a whole HF model) is read from below that module, where the names above would make one block.

A model with several stacks of numbered layers (encoder and decoder; a vision tower and a language
model) prefixes each stack's blocks with the stack's shortest distinct path: ``encoder.layer.0``,
``decoder.layer.0``; CLIP's ``text_model.encoder.layer.0``, ``vision_model.encoder.layer.0`` and
its towers' ``text_model.embeddings``, ``vision_model.embeddings`` (:func:`block_names`).

Names are read past the prefixes wrappers add (``module.`` of DDP, ``_orig_mod.`` of
``torch.compile``, FSDP1's and checkpointing's wrapper modules, ``base_model.model.`` of peft's
``PeftModel``), so a model's blocks, and a
layer-wise checkpoint's, are the same however it is wrapped.

Tied parameters (a head sharing the embedding matrix) appear once, in the block of the first name
``named_parameters`` gives them, as torch does.
"""

from __future__ import annotations

import re
from collections import OrderedDict

from torch import nn

_LAYER = re.compile(r"(?:^|\.)(?:h|layer|layers|blocks|block|resblocks)\.(\d+)\.")
# other numbered containers are named by their path: transformer_blocks.3 and
# single_transformer_blocks.3 (Flux), down_blocks.1 and up_blocks.1 (a UNet) must not meet
_CONTAINER = re.compile(r"(?:^|\.)\w+_(?:blocks|layers)\.(\d+)\.")
_CONTAINER_BLOCK = re.compile(r"(?:.*\.)?\w+_(?:blocks|layers)\.\d+")
_EMBED = re.compile(r"(?:^|\.)(?:wte|wpe|embed_tokens|embed_in|tok_embeddings|embeddings|embed_positions"
                    r"|word_embeddings|position_embeddings|token_type_embeddings)(?:\.|$)")
_FINAL = re.compile(r"(?:^|\.)(?:ln_f|norm|norm_f|final_layernorm|final_layer_norm|final_norm)\.")
_HEAD = re.compile(r"^(?:lm_head|head|cls|pooler|classifier|output|score)\.|\.(?:pooler)\.")


# what wrappers put in front of the model's own names: DDP (module.), torch.compile (_orig_mod.),
# FSDP1 and activation checkpointing wrappers, peft's PeftModel (base_model.model.: its head
# was a block named "base_model"); the blocks must not depend on how a model is run
_WRAPPER = re.compile(r"^(?:(?:module|_orig_mod|_fsdp_wrapped_module|_checkpoint_wrapped_module"
                      r"|base_model\.model)\.)+")


def bare_name(param_name: str) -> str:
    """A parameter's name without the prefixes wrappers add (``module.``, ``_orig_mod.``, ...)."""
    return _WRAPPER.sub("", param_name)


def is_container_block(block: str) -> bool:
    """Is ``block`` a layer of a numbered ``*_blocks`` / ``*_layers`` container
    (``transformer_blocks.3``)? Such layers were one block, the container's, before they were
    blocks of their own; a checkpoint of then carries over (``StoreMixin._rename_blocks``)."""
    return _CONTAINER_BLOCK.fullmatch(block) is not None


def _container(param_name: str):
    """The match of the outermost numbered ``*_blocks`` / ``*_layers`` container of a (bare)
    name, or None. Not one inside a numbered module: there it is a part of that layer (a UNet's
    mid_block.attentions.0.transformer_blocks; ldm's middle_block.1.in_layers, an
    nn.Sequential(norm, act, conv)), which cut it into pieces of a norm or a conv each."""
    c = _CONTAINER.search(param_name)
    if c is None or any(part.isdigit() for part in param_name[: c.start()].split(".")):
        return None
    return c


def block_name(param_name: str) -> str:
    """The block a parameter belongs to, from its qualified name (see the module docstring);
    wrapper prefixes (``module.``, ``_orig_mod.``, ...) are not part of it."""
    param_name = bare_name(param_name)
    m = _LAYER.search(param_name)
    c = _container(param_name)
    if c and (m is None or c.start() < m.start()):
        return param_name[: c.end() - 1]
    if m:
        return f"layer.{int(m.group(1))}"
    if _EMBED.search(param_name):
        return "embeddings"
    m = _FINAL.search(param_name)
    # (the model's own last norm, not a norm inside a numbered module: a UNet's attention
    # blocks' `norm`s, under down_blocks.1.attentions.0, made one "final" across the network.
    # A leading number with more path after it is an nn.Sequential around the whole model)
    path = param_name[: m.start()].split(".") if m else []
    if m and not any(part.isdigit() for part in (path[1:] if len(path) > 1 else path)):
        return "final"
    if _HEAD.search(param_name):
        return "head"
    first = param_name.split(".", 1)[0]
    return first


def _stack(param_name: str) -> str | None:
    """The path in front of a parameter's numbered layer container (``model.encoder`` for
    ``model.encoder.layers.3.fc1.weight``), or None outside one."""
    param_name = bare_name(param_name)
    m = _LAYER.search(param_name)
    c = _container(param_name)
    if m is None or (c is not None and c.start() < m.start()):
        return None  # (in a layer of another container: named by its own path)
    return param_name[: m.start()]


def block_names(param_names) -> dict[str, str]:
    """``{parameter name: block}`` for a whole model (:func:`_named_blocks`). Where that finds one
    block only because one module holds the whole model (``self.net = nn.Sequential(...)``: every
    name starts with ``net.``, the block of every tensor), or that module's block beside numbered
    containers under it (``self.unet``: ``unet``, ``unet.down_blocks.0``, ...), the blocks are
    those of the names below it, so that layer-wise is not silently one global step size."""
    if isinstance(param_names, nn.Module):  # (a TypeError from deep inside: "not iterable")
        raise TypeError("block_names() takes parameter names ([n for n, _ in "
                        "model.named_parameters()]); for a model's blocks use "
                        "assign_blocks(model) or param_groups(model)")
    param_names = list(param_names)
    out = _named_blocks(param_names)
    bare = [bare_name(n) for n in param_names]
    heads = {n.split(".", 1)[0] for n in bare}
    # (or blocks that are that module and containers under it: a UNet held by a LightningModule,
    # self.unet, was the block "unet" beside "unet.down_blocks.0", ...)
    (head,) = heads if len(heads) == 1 else (None,)
    if len(param_names) > 1 and (len(set(out.values())) == 1 or head is not None and all(
            v == head or v.startswith(head + ".") for v in out.values())):
        below = [n.split(".", 1)[1] for n in bare] if "." in bare[0] else []
        # (not into one module's own tensors: a weight and its bias are one block)
        if len(heads) == 1 and all("." in n for n in bare) and any("." in n for n in below):
            inner = block_names(below)
            if len(set(inner.values())) > 1:  # (by name: a repeated name is one dict entry)
                return {n: inner[b] for n, b in zip(param_names, below)}
    if len(heads) > 1:
        _cut_held_modules(param_names, bare, out)
    return out


def _cut_held_modules(param_names: list, bare: list, out: dict) -> None:
    """In ``out``, a module beside others whose blocks are itself and numbered containers under it
    (``self.unet`` beside ``self.text_encoder``: ``unet``, ``unet.down_blocks.0``, ...) is cut as
    the bare module is, below its name (``unet.conv_in``, ``unet.time_embedding``,
    ``unet.mid_block``, ``unet.conv_out``; they were one block, ``unet``)."""
    by_head: dict[str, list[int]] = {}
    for i, n in enumerate(bare):
        by_head.setdefault(n.split(".", 1)[0], []).append(i)
    for head, idx in by_head.items():
        blocks = {out[param_names[i]] for i in idx}
        # (its layers' containers only, named by their path: a text encoder's blocks below it,
        # text_encoder.layer.0, are a stack's, and it stays as it was; a review)
        if head not in blocks or len(blocks) < 2 or not all(
                b == head or (b.startswith(head + ".") and is_container_block(b))
                for b in blocks) or not all("." in bare[i] for i in idx):
            continue
        below = [bare[i].split(".", 1)[1] for i in idx]
        inner = block_names(below)
        for i, b in zip(idx, below):
            out[param_names[i]] = f"{head}.{inner[b]}"


def _named_blocks(param_names: list) -> dict[str, str]:
    """``{parameter name: block}`` for a whole model: :func:`block_name`, except in a model with
    several stacks of numbered layers (an encoder and a decoder: BART, T5, Whisper; a text and a
    vision tower: CLIP), where layer i of one stack and layer i of another would share a block.
    There every parameter of a stack is prefixed by the stack's shortest trailing path that no
    other stack shares (``encoder.layer.0``, ``decoder.layer.0``; ``text_model.encoder.layer.0``,
    ``vision_model.encoder.layer.0``), and so is every parameter of a tower that holds one stack
    only (``text_model.embeddings``, ``vision_model.embeddings``): each tower's embeddings and
    norms keep their own step size."""
    stacks = sorted({_stack(n) for n in param_names} - {None})
    if len(stacks) == 1 and stacks[0]:
        old = {n: block_name(n) for n in param_names}
        out = {n: _beside_stack(n, stacks[0], old[n]) for n in param_names}
        # a name below the shared path that another module has already (backbone.proj beside
        # a top-level proj: two modules in one step size, silently; a review) keeps the block
        # it had
        sources: dict[str, set] = {}
        for n in param_names:
            sources.setdefault(out[n], set()).add(old[n])
        return {n: out[n] if len(sources[out[n]]) == 1 else old[n] for n in param_names}
    if len(stacks) < 2:
        return {n: block_name(n) for n in param_names}
    # a tower: the path above a stack, when no other stack lies under it (CLIP's text_model);
    # an encoder and a decoder under one "model" share theirs, so it names neither
    above = {s.rsplit(".", 1)[0] for s in stacks if "." in s}
    holds = {t: sum(s.startswith(t + ".") for s in stacks) for t in sorted(above)}
    towers = [t for t, k in holds.items() if k == 1]
    # the token embedding an encoder and a decoder share (BART, T5: "shared"); only here,
    # where a module of that name is one: elsewhere it may be a multi-task trunk
    shared_outside = [t for t, k in holds.items() if k > 1]
    label = _distinct_suffixes(stacks + towers)
    out = {}
    for n in param_names:
        bare = bare_name(n)
        owner = _stack(n)
        if owner is None:  # outside the layers: in a stack, in a tower, or the model's own
            inside = [p for p in stacks + towers if bare.startswith(p + ".")]
            owner = max(inside, key=len, default=None)
        if owner is None:
            shared = bare == "shared.weight" or any(bare == f"{p}.shared.weight"
                                                    for p in shared_outside)
            out[n] = "embeddings" if shared else block_name(n)
        else:
            inner = bare[len(owner) + 1:] if owner else bare
            out[n] = f"{label[owner] or 'layers'}.{block_name(inner)}"
    return out


def _beside_stack(param_name: str, stack: str, block: str) -> str:
    """:func:`block_name`, except for a tensor that would be a block named after the model's
    first module only because that module also holds the layers (wav2vec2's ``wav2vec2``:
    its input projection, the positional convolution and the last norm in one step size; a
    ViT's final ``layernorm`` named ``vit``): named below the path it shares with the layers'
    stack (``feature_projection``, ``pos_conv_embed``, ``layer_norm``). ``block``: its
    :func:`block_name`."""
    bare = bare_name(param_name)
    first = bare.split(".", 1)[0]
    if block != first or _stack(param_name) is not None:
        return block
    parts, path = bare.split("."), stack.split(".")
    k = 0
    while k < min(len(path), len(parts) - 1) and parts[k] == path[k]:
        k += 1
    return block if k == 0 else block_name(".".join(parts[k:]))


def _distinct_suffixes(paths: list[str]) -> dict[str, str]:
    """Per path, its shortest trailing part (whole components) that no other path ends with
    alike: ``model.encoder`` and ``model.decoder`` become ``encoder`` and ``decoder``,
    ``text_model.encoder`` and ``vision_model.encoder`` stay whole."""
    parts = {p: p.split(".") if p else [""] for p in paths}
    longest = max(len(v) for v in parts.values())
    label = {}
    for p, v in parts.items():
        for k in range(1, longest + 1):
            tail = v[-k:]
            if all(q == p or w[-k:] != tail for q, w in parts.items()):
                break
        label[p] = ".".join(tail)
    return label


def assign_blocks(model: nn.Module, *, trainable_only: bool = True) -> OrderedDict[str, list]:
    """Ordered ``{block name: [parameters]}`` in the order the blocks first appear."""
    named = list(model.named_parameters())  # yields each (tied) parameter once
    of = block_names(n for n, _ in named)
    blocks: OrderedDict[str, list] = OrderedDict()
    for name, p in named:
        if trainable_only and not p.requires_grad:
            continue
        blocks.setdefault(of[name], []).append(p)
    return blocks


def param_groups(model: nn.Module, **group_options) -> list[dict]:
    """One param group per block, named ``block`` (pass to an optimizer with layerwise=True).

    ``group_options`` are copied into every group (e.g. ``weight_decay=0.1``).
    """
    return [
        {"params": params, "block": name, **group_options}
        for name, params in assign_blocks(model).items()
    ]
