"""Scale-out: DDP under torchrun (2 CPU processes, gloo), statistics merged across ranks, and
the ``--jobs`` parallel sweep."""
import glob
import json
import os
import subprocess
import sys

import pytest
import torch

from stablespike import distributed
from stablespike.bench import SweepConfig, run_sweep
from stablespike.bench.depth_scaling import build_model, layer_rates
from stablespike.data import load_dataset
from stablespike.models import SpikingMLP
from stablespike.profiler import SpikeProfiler
from stablespike.train import TrainConfig, fit, model_input

HERE = os.path.dirname(__file__)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """One torchrun launch shared by the checks below (a 2-epoch sweep: the second epoch runs
    after an evaluation whose last batches differ in size between the ranks)."""
    out = tmp_path_factory.mktemp("ddp")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(HERE, "ddp_worker.py"), str(out)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    seen = [json.loads((out / f"rank{r}" / "seen.json").read_text()) for r in range(2)]
    return out, seen


def test_both_ranks_end_with_the_same_weights(two_ranks):
    out, _ = two_ranks
    for run in ("run0.pt", "run1.pt", "run2.pt", "run3.pt"):  # run3: a VGG with batch norm
        w0, w1 = (torch.load(out / f"rank{r}" / run) for r in range(2))
        assert w0.keys() == w1.keys()
        for name in w0:
            assert torch.equal(w0[name], w1[name]), name
        if run == "run3.pt":  # the batch-norm running statistics moved, the same on both ranks
            assert any(k.endswith("running_mean") for k in w0)
            assert all(float(w0[k].abs().sum()) > 0 for k in w0 if k.endswith("running_mean"))
    # and training moved them: rank 0's run differs from the model it started from
    start = SpikingMLP(64, [32, 32], 10).state_dict()
    trained = torch.load(out / "rank0" / "run1.pt")
    assert any(not torch.equal(start[k], trained[k]) for k in start if k in trained)


def test_all_ranks_resume_from_rank_zeros_checkpoint(two_ranks):
    _, seen = two_ranks
    assert [s["resume"]["epochs"] for s in seen] == [[1, 2], [1, 2]]  # epoch 1 from the checkpoint
    assert [s["resume"]["loads"] for s in seen] == [1, 0]  # read once, broadcast to rank 1


def test_the_diagnostics_callback_runs_on_every_rank_and_writes_on_rank_zero(two_ranks):
    _, seen = two_ranks
    rank0, rank1 = (s["diagnostics"] for s in seen)
    assert rank0["history"] == rank1["history"] > 0  # every rank took part in every report
    assert rank0["sunk"] == rank0["history"] and rank1["sunk"] == 0


def test_the_logged_exponent_is_the_mean_over_ranks(two_ranks):
    out, seen = two_ranks
    local = [s["local_lyap"] for s in seen]
    assert len(local[0]) == len(local[1]) > 5  # the same number of steps on both ranks
    assert local[0] != local[1]  # each rank estimates on its own samples
    per_batch = [(a + b) / 2 for a, b in zip(*local)]
    lines = (out / "sweep" / "runs" / "lyapunov_d2_s0" / "metrics.jsonl").read_text().splitlines()
    logged = [json.loads(line)["lyapunov"] for line in lines]  # one mean per epoch
    steps = len(per_batch) // len(logged)
    for epoch, value in enumerate(logged):
        epoch_batches = per_batch[epoch * steps: (epoch + 1) * steps]
        assert value == pytest.approx(sum(epoch_batches) / steps, abs=1e-5)


def test_the_penalty_gradient_is_the_single_process_one(two_ranks):
    # one process on x = 0..7: d/dw (w * mean x)^2 = 2 w (mean x)^2 = 2 * 0.7 * 3.5^2
    _, seen = two_ranks
    for s in seen:
        assert s["penalty_grad"] == pytest.approx(2 * 0.7 * 3.5 ** 2, rel=1e-6)


def test_the_merged_firing_rate_table_equals_one_process_on_the_same_samples(two_ranks):
    out, _ = two_ranks
    record = json.loads((out / "sweep" / "runs" / "lyapunov_d2_s0.json").read_text())
    cfg = SweepConfig(dataset="digits", depths=[2], seeds=[0], width=32,
                      train=TrainConfig(epochs=1, batch_size=64, T=4, progress=False))
    data = load_dataset("digits")
    model = build_model(cfg, 2, data)
    model.load_state_dict(torch.load(out / "rank0" / "run1.pt"))
    alone = layer_rates(model, data, cfg.train)
    assert alone.keys() == record["layer_rates"].keys()
    for name, rate in alone.items():
        assert record["layer_rates"][name] == pytest.approx(rate, abs=1e-9)
    assert 0 < max(alone.values())  # a table of zeros would match trivially
    from stablespike.bench.depth_scaling import verdict
    assert record["verdict"] == verdict(model, data, cfg.train)  # rank 0's, on the whole batch


def test_the_merged_profiler_report_equals_one_process_on_the_same_samples(two_ranks):
    out, seen = two_ranks
    cfg = SweepConfig(dataset="digits", depths=[2], seeds=[0], width=32,
                      train=TrainConfig(epochs=1, batch_size=64, T=4, progress=False))
    data = load_dataset("digits")
    model = build_model(cfg, 2, data).eval()
    model.load_state_dict(torch.load(out / "rank0" / "run1.pt"))
    with SpikeProfiler().attach(model) as profiler, torch.no_grad():
        model(model_input(model, data.x_test[:256], cfg.train))
    alone = profiler.report()
    for s in seen:  # every rank holds the merged report
        assert s["profile"]["pathologies"] == alone.to_dict()["pathologies"]
        for name, stats in alone.layer_stats.items():
            merged = s["profile"]["layers"][name]
            assert merged["steps"] == stats.steps and merged["dead_neuron_count"] == stats.dead_neuron_count
            # membrane moments are summed over the batch in float32: equal up to its rounding
            assert merged["voltage_mean"] == pytest.approx(stats.voltage_mean, rel=1e-6)
            assert merged["voltage_std"] == pytest.approx(stats.voltage_std, rel=1e-6)
            assert s["profile_rates"][name] == pytest.approx(stats.firing_rates.tolist(), abs=1e-12)


def test_only_rank_zero_writes(two_ranks):
    out, seen = two_ranks
    assert seen[1]["written"] == []
    assert any(p.endswith("results.json") for p in seen[0]["written"])
    assert glob.glob(str(out / "**" / "results.json"), recursive=True) == [str(out / "sweep" / "results.json")]
    for run in ("vanilla_d2_s0", "lyapunov_d2_s0"):  # one line per epoch, not one per rank
        assert len((out / "sweep" / "runs" / run / "metrics.jsonl").read_text().splitlines()) == 2


def test_a_batch_the_world_size_does_not_divide_is_refused(two_ranks):
    _, seen = two_ranks
    for s in seen:
        assert "batch_size" in s["bad_batch"] and "WORLD_SIZE=2" in s["bad_batch"] and "63" in s["bad_batch"]


def test_a_missing_rendezvous_variable_is_named(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(ValueError, match="MASTER_ADDR"):
        distributed.setup()
    with pytest.raises(ValueError, match="MASTER_ADDR"):
        fit(SpikingMLP(64, [8], 10), load_dataset("digits"), TrainConfig(epochs=1, progress=False))
    monkeypatch.setenv("MASTER_ADDR", "localhost")
    monkeypatch.setenv("RANK", "two")
    with pytest.raises(ValueError, match="RANK.*'two'"):
        distributed.setup()


def test_one_process_needs_no_process_group():
    ranks = distributed.setup()
    assert (ranks.rank, ranks.world_size, ranks.is_main) == (0, 1, True)
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    assert distributed.mean_across_ranks(x) is x
    assert distributed.any_rank(False) is False and distributed.sum_across_ranks([1, 2]) == [1, 2]
    with pytest.raises(ValueError, match="batch_size.*WORLD_SIZE=3.*64"):
        distributed.check_batch_size(64, distributed.Ranks(world_size=3))


def _without_times(results):
    if isinstance(results, dict):
        return {k: _without_times(v) for k, v in results.items() if k != "time_sec"}
    if isinstance(results, list):
        return [_without_times(v) for v in results]
    return results


def _close(a, b, path=""):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _close(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{path}[{i}]")
    elif isinstance(a, float):
        # --jobs N gives each process cores/N threads, and the thread count changes the order of
        # float reductions: after an epoch of training the two runs differ by ~1e-4
        assert a == pytest.approx(b, rel=1e-3, abs=1e-6), path
    else:
        assert a == b, path


def test_a_parallel_sweep_gives_the_results_of_a_sequential_one(tmp_path):
    cfg = SweepConfig(dataset="digits", depths=[2], seeds=[0, 1], width=32,
                      train=TrainConfig(epochs=1, batch_size=128, T=4, progress=False))
    run_sweep(cfg, str(tmp_path / "one"), jobs=1)
    run_sweep(cfg, str(tmp_path / "two"), jobs=2)
    for name in ("results.json", "results_seeds.json"):
        one = json.loads((tmp_path / "one" / name).read_text())
        two = json.loads((tmp_path / "two" / name).read_text())
        _close(_without_times(one), _without_times(two), name)
    assert len(os.listdir(tmp_path / "two" / "runs")) == len(os.listdir(tmp_path / "one" / "runs"))


def test_jobs_must_be_a_positive_integer(tmp_path):
    with pytest.raises(ValueError, match="jobs"):
        run_sweep(SweepConfig(dataset="digits", depths=[1]), str(tmp_path), jobs=0)
