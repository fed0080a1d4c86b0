"""A sweep that is killed, resumed, raced or fed hand-edited files: never a silently wrong result.

The kills are real (SIGKILL of a child process, at a point chosen by patching the writer there), and the oracle is the same sweep run without interruption: a resumed sweep must
equal it.
"""
import io
import json
import os
import signal
import sys
import time

import pytest
import torch

import stablespike.train as train
from stablespike.bench import SweepConfig, run_sweep
from stablespike.bench.depth_scaling import collect_results
from stablespike.bench.lock import acquire_lock, release_lock
from stablespike.bench.report import write_report
from stablespike.options import OptionError
from stablespike.runfiles import RunFileError, write_json
from stablespike.train import TrainConfig



def small(epochs=3, batch=256):
    return SweepConfig(dataset="digits", depths=[1], seeds=[0], width=16,
                       train=TrainConfig(epochs=epochs, batch_size=batch, T=3, lyap_eps=1e-2, progress=False))


def _without_times(value):
    if isinstance(value, dict):
        return {k: _without_times(v) for k, v in value.items() if k != "time_sec"}
    if isinstance(value, list):
        return [_without_times(v) for v in value]
    return value


def _epochs(path):
    return [json.loads(line)["epoch"] for line in open(path).read().splitlines()]


@pytest.fixture(scope="module")
def children():
    """Processes started by forking a clean server that imported stablespike once and never ran
    autograd (torch refuses to fork after autograd's device threads started, as they do on a
    CUDA machine): real processes that a SIGKILL ends, each started in milliseconds."""
    import multiprocessing
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["stablespike.bench", __name__])
    return ctx


def _start(ctx, target, *args):
    """``target(*args)`` in a child running torch on this process's thread count (the same order
    of float reductions: the comparisons below are exact)."""
    proc = ctx.Process(target=_with_threads, args=(torch.get_num_threads(), target, args))
    proc.start()
    return proc


def _with_threads(threads, target, args):
    torch.set_num_threads(threads)
    target(*args)


def _sigkill_at(calls: list, n: int) -> None:
    calls.append(1)
    if len(calls) == n:
        os.kill(os.getpid(), signal.SIGKILL)


def _killed_during_the_second_checkpoint_write(out):
    real, calls = torch.save, []

    def save(obj, f, *args, **kwargs):  # half the bytes of the 2nd checkpoint, then SIGKILL
        if len(calls) == 1:
            buf = io.BytesIO()
            real(obj, buf)
            f = open(f, "wb") if isinstance(f, (str, os.PathLike)) else f
            f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            f.flush()
        _sigkill_at(calls, 2)
        return real(obj, f, *args, **kwargs)

    torch.save = save
    run_sweep(small(), out, resume=True)


def _killed_after_the_fourth_metrics_line(out):
    calls = []  # vanilla's epochs 2 and 3, then lyapunov's 1 and 2: SIGKILL
    if hasattr(train, "append_line"):
        real = train.append_line
        train.append_line = lambda path, line: (real(path, line), _sigkill_at(calls, 4))
    else:  # the code before: a line appended by open(path, "a") in fit
        import builtins

        class Killing(io.StringIO):
            def __init__(self, f):
                super().__init__()
                self.f = f

            def __exit__(self, *exc):
                self.f.write(self.getvalue())
                self.f.close()
                _sigkill_at(calls, 4)

        def opening(path, mode="r", *args, **kwargs):
            f = builtins.open(path, mode, *args, **kwargs)
            return Killing(f) if str(path).endswith("metrics.jsonl") and mode == "a" else f
        train.open = opening
    run_sweep(small(), out, resume=True)


def test_a_sweep_killed_in_a_checkpoint_write_and_after_a_metrics_line_resumes_exactly(tmp_path, children):
    """Two SIGKILLs in a row (one while a checkpoint is half written, one right after a metrics
    line), then a resume: the results equal the uninterrupted sweep's, each metrics.jsonl holds
    every epoch once, and no temporary file is left."""
    out = str(tmp_path / "killed")
    for kill in (_killed_during_the_second_checkpoint_write, _killed_after_the_fourth_metrics_line):
        proc = _start(children, kill, out)
        proc.join(120)
        assert proc.exitcode == -signal.SIGKILL, proc.exitcode
    assert _epochs(os.path.join(out, "runs", "lyapunov_d1_s0", "metrics.jsonl")) == [1, 2]
    resumed = run_sweep(small(), out, resume=True)
    straight = run_sweep(small(), str(tmp_path / "straight"))
    assert _without_times(resumed) == _without_times(straight)
    for run in ("vanilla_d1_s0", "lyapunov_d1_s0"):
        assert _epochs(os.path.join(out, "runs", run, "metrics.jsonl")) == [1, 2, 3]
    leftovers = [p for p in (tmp_path / "killed").rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []


# --- the parent of --jobs 2 killed ------------------------------------------------------------------
def _children(pid):
    """Pids whose parent is ``pid`` (Linux /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry))
    return found


def _running(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has stopped
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_killing_the_parent_of_a_parallel_sweep_stops_its_workers(tmp_path, children):
    """SIGKILL the parent of ``--jobs 2`` (as an out-of-memory kill does) while its workers train:
    within seconds no worker runs and none wrote after the kill. While the parent lived, a
    resume of its directory was refused; once it is gone, its lock is taken over."""
    out, workers = tmp_path / "sweep", []
    proc = _start(children, run_sweep, small(epochs=200, batch=256), str(out), False, 2)
    parent = proc.pid
    try:
        deadline = time.time() + 90
        while not list(out.glob("runs/*/metrics.jsonl")):  # the workers are past their first epoch
            assert proc.is_alive() and time.time() < deadline
            time.sleep(0.05)
        workers = _children(parent)
        assert len(workers) >= 2
        with pytest.raises(OptionError, match=f"in use by process {parent}"):
            run_sweep(small(epochs=200, batch=256), str(out), resume=True)
        killed_at = time.time()
        proc.kill()
        proc.join()
        while any(_running(w) for w in workers) and time.time() < killed_at + 5:
            time.sleep(0.05)
        assert not any(_running(w) for w in workers), "workers outlived their parent"
        time.sleep(0.3)  # anything still writing would show now
        late = [str(p) for p in out.rglob("*") if p.is_file() and p.stat().st_mtime > killed_at + 0.2]
        assert late == []
    finally:  # whatever failed, leave no process behind
        if proc.is_alive():
            proc.kill()
            proc.join()
        for w in workers:
            if _running(w):
                os.kill(w, signal.SIGKILL)
    lock = acquire_lock(str(out))  # the dead parent's lock is stale: taken over
    assert json.loads(open(lock).read())["pid"] == os.getpid()
    release_lock(lock)
    assert not os.path.exists(lock)


def test_a_busy_directory_is_refused_and_a_stale_lock_taken_over(tmp_path):
    (tmp_path / "sweep.lock").write_text(json.dumps({"pid": os.getppid(), "host": os.uname().nodename}))
    with pytest.raises(OptionError, match=f"out_dir: .*in use by process {os.getppid()}"):
        acquire_lock(str(tmp_path))
    # above Linux's largest pid (2**22): a process that cannot be running
    (tmp_path / "sweep.lock").write_text(json.dumps({"pid": 2 ** 22 + 1, "host": os.uname().nodename}))
    release_lock(acquire_lock(str(tmp_path)))


# --- options recorded; files that are the source of truth ------------------------------------------
def test_resume_with_other_options_is_refused_naming_the_option(tmp_path):
    write_json(small().to_dict(), str(tmp_path / "config.json"))
    wider = small()
    wider.width = 32
    with pytest.raises(OptionError, match=r"^width: the sweep in .* was run with 16, now 32"):
        run_sweep(wider, str(tmp_path), resume=True)
    longer = SweepConfig(**{**small().__dict__, "train": TrainConfig(epochs=5, batch_size=256, T=3,
                                                                       lyap_eps=1e-2, progress=False)})
    with pytest.raises(OptionError, match=r"^epochs: .* run with 3, now 5"):
        run_sweep(longer, str(tmp_path), resume=True)
    assert json.loads((tmp_path / "config.json").read_text())["width"] == 16  # not overwritten


def _record(acc, findings=()):
    epoch = dict(epoch=1, train_loss=2.0, train_acc=acc, test_loss=2.1, test_acc=acc, lyapunov=None,
                 grad_norm=0.5, grad_max_sv=None, grad_min_sv=None, grad_condition=None, lr=1e-3,
                 time_sec=0.1)
    return {"status": "OK", "diverged_epoch": None, "history": [epoch], "layer_rates": {"lif": 0.1},
            "verdict": {"health_score": 40.0, "findings": list(findings)}}


@pytest.fixture
def finished(tmp_path):
    """A sweep directory written by hand: config and two run files (no training)."""
    cfg = small()
    os.makedirs(tmp_path / "runs")
    write_json(cfg.to_dict(), str(tmp_path / "config.json"))
    write_json(_record(0.1, ["CRITICAL silent_layer @ <script>alert(1)</script>"]),
               str(tmp_path / "runs" / "vanilla_d1_s0.json"))
    write_json(_record(0.5), str(tmp_path / "runs" / "lyapunov_d1_s0.json"))
    collect_results(cfg, str(tmp_path))
    return tmp_path


def test_the_report_escapes_what_it_quotes(finished):
    write_report(str(finished))
    page = (finished / "report.html").read_text()
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page


@pytest.mark.parametrize("name, edit", [
    ("results.json", lambda r: r["vanilla"]["1"][0].update(test_acc=0.99)),
    ("results_seeds.json", lambda r: r["lyapunov"]["1"]["0"].update(status="DIVERGED")),
    ("results_seeds.json", None),  # corrupt
])
def test_a_hand_edited_summary_is_refused_naming_it(finished, name, edit):
    path = finished / name
    if edit is None:
        path.write_text("{not json")
    else:
        results = json.loads(path.read_text())
        edit(results)
        path.write_text(json.dumps(results))
    with pytest.raises(RunFileError, match=name.replace(".", r"\.")):
        write_report(str(finished))
    path.unlink()  # deleted, it is made again from the run files
    write_report(str(finished))
    assert json.loads(path.read_text())


def test_a_corrupt_run_file_is_named(finished):
    (finished / "runs" / "lyapunov_d1_s0.json").write_text('{"status": "OK"}')
    with pytest.raises(RunFileError, match="lyapunov_d1_s0.json"):
        write_report(str(finished))


def test_run_files_are_never_written_through_a_symlink(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / "results.json").symlink_to(victim)
    write_json({"a": 1}, str(tmp_path / "results.json"))
    assert victim.read_text() == "precious"
    assert not (tmp_path / "results.json").is_symlink()
    assert json.loads((tmp_path / "results.json").read_text()) == {"a": 1}
