"""HuggingFace Trainer with ArmijoAdam: a tiny GPT-2 built from a config (no download).

    python examples/hf_trainer.py [--steps 8] [--out /tmp/af_hf]

``LineSearchTrainer`` keeps the micro-batches of each accumulation window and registers a
loss-only closure on the optimizer, so Trainer's bare ``optimizer.step()`` can run the search;
Trainer's gradient clipping moves into the optimizer (``max_grad_norm``).
"""

from __future__ import annotations

import argparse

import torch
import transformers

from armijo_fused import ArmijoAdam
from armijo_fused.integrations.hf import LineSearchTrainer


class CountingSequences(torch.utils.data.Dataset):
    def __init__(self, n=64, length=16, vocab=64, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.ids = (torch.randint(0, vocab, (n, 1), generator=g) + torch.arange(length)) % vocab

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--out", default="/tmp/af_hf_example")
    args = ap.parse_args(argv)
    cfg = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg)
    opt = ArmijoAdam(model.parameters(), weight_decay=0.01)
    targs = transformers.TrainingArguments(
        output_dir=args.out, per_device_train_batch_size=4, gradient_accumulation_steps=2,
        max_steps=args.steps, logging_steps=max(1, args.steps // 4), save_strategy="no",
        report_to=[], use_cpu=not torch.cuda.is_available(), disable_tqdm=True)
    # or: LineSearchTrainer(..., optimizer_cls_and_kwargs=(ArmijoAdam, {})) with
    # TrainingArguments(weight_decay=0.01): Trainer writes args.weight_decay into the decayed
    # group it builds (biases and norms get 0), over a weight_decay in the kwargs
    data = CountingSequences()
    trainer = LineSearchTrainer(model=model, args=targs, train_dataset=data,
                                optimizers=(opt, None))
    before = mean_loss(model, data)
    out = trainer.train()
    after = mean_loss(model, data)
    print(f"loss on the data {before:.3f} -> {after:.3f} (training loss {out.training_loss:.3f}), "
          f"step size {opt.stats['step_size']:.2e}, clip inside the optimizer: "
          f"{opt.max_grad_norm}")
    return before, after


@torch.no_grad()
def mean_loss(model, data):
    was_training = model.training
    model.eval()
    ids = data.ids.to(model.device)
    loss = float(model(input_ids=ids, labels=ids).loss)
    model.train(was_training)
    return loss


if __name__ == "__main__":
    main()
