"""ArmijoSGD with momentum on two of bench/sgd_momentum.py's noisy tasks, where the earlier rule
(η searched along the momentum direction) stalled at the initial loss: the default
(``momentum_search="gradient"``) trains. The earlier rule is run too, so that these tasks keep
telling the two rules apart; and the script itself runs and writes its report."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the recorded runs are single-threaded (bit-identical sums)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("task,seed", [("mlp_cls", 0), ("noisy_reg", 2)])
def test_momentum_trains_where_searching_along_the_momentum_direction_stalled(
        one_thread, task, seed):
    import sgd_momentum

    new = sgd_momentum.run_one(task, "ArmijoSGD-m0.9", seed)
    old = sgd_momentum.run_one(task, "ArmijoSGD-m0.9-direction", seed)
    assert not new["stalled"] and not new["nonfinite"]
    assert new["final_train"] < 0.3 * new["initial_train"]
    # the earlier rule, on the same batches: stalled at the initial loss on the Intel machine
    # of the recorded run; on an AMD one mlp_cls crawled instead (0.45 after the run, against
    # 0.002), so what holds on both is that these tasks still tell the two rules apart
    assert new["final_train"] < 0.5 * old["final_train"]


def test_the_script_writes_its_report(one_thread, tmp_path):
    import sgd_momentum

    threads = torch.get_num_threads()
    assert sgd_momentum.main(["--tasks", "noisy_reg", "--seeds", "1", "--only",
                              "ArmijoSGD-m0.9,SGD-m0.9", "--out", str(tmp_path)]) == 0
    torch.set_num_threads(threads)
    result = json.loads(next(tmp_path.glob("sgd_momentum_*.json")).read_text())
    assert [r["optimizer"] for r in result["runs"]] == ["ArmijoSGD-m0.9", "SGD-m0.9"]
    assert result["momentum_search_default"] == "gradient"
    table = next(tmp_path.glob("sgd_momentum_*.md")).read_text()
    assert "| noisy_reg | ArmijoSGD-m0.9 |" in table
