"""First use: the names the README and the docs use import from ``stablespike``, and importing it
pulls in none of the optional heavy packages (they load when the user's program uses them)."""
import importlib
import importlib.util
import os
import re
import subprocess
import sys
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _user_texts():
    """``{path: text}`` of what a user reads and copies: README.md, docs/**.md, examples/*.py."""
    paths = [os.path.join(ROOT, "README.md")]
    paths += [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(ROOT, "docs")) for f in fs if f.endswith(".md")]
    paths += [os.path.join(ROOT, "examples", f) for f in os.listdir(os.path.join(ROOT, "examples")) if f.endswith(".py")]
    texts = {}
    for path in paths:
        with open(path, encoding="utf-8") as f:
            texts[os.path.relpath(path, ROOT)] = f.read()
    return texts


def _resolves(dotted: str) -> bool:
    """Whether ``stablespike.a.b`` names something: attributes, else submodules, part by part."""
    obj = importlib.import_module("stablespike")
    for part in dotted.split(".")[1:]:
        if hasattr(obj, part):
            obj = getattr(obj, part)
        elif isinstance(obj, types.ModuleType) and importlib.util.find_spec(f"{obj.__name__}.{part}"):
            obj = importlib.import_module(f"{obj.__name__}.{part}")
        else:
            return False
    return True


def test_every_stablespike_name_the_readme_docs_and_examples_use_exists():
    import stablespike
    used = {}  # dotted name -> the first file that uses it
    for path, text in _user_texts().items():
        names = []
        for module, group in re.findall(r"from (stablespike(?:\.\w+)*) import \(([^)]*)\)", text):
            names += [f"{module}.{n.split(' as ')[0].strip()}" for n in group.split(",") if n.strip()]
        for module, group in re.findall(r"^\s*from (stablespike(?:\.\w+)*) import ([\w, ]+?)\s*(?:#.*)?$", text,
                                        re.MULTILINE):
            names += [f"{module}.{n.split(' as ')[0].strip()}" for n in group.split(",") if n.strip()]
        names += re.findall(r"(?<![\w/.-])stablespike(?:\.[A-Za-z_]\w*)+", text)
        if re.search(r"import stablespike as ss\b", text):
            names += ["stablespike." + n for n in re.findall(r"(?<![\w.])ss\.([A-Za-z_]\w*)", text)]
        for name in names:
            used.setdefault(name.rstrip("."), path)
    assert {"fit", "TrainConfig", "load_dataset", "evaluate", "ThresholdBalancer", "SpikeProfiler"} <= set(stablespike.__all__)
    assert len(used) > 50  # the extraction found the names the docs use (about 70 today)
    missing = sorted(f"{name} ({path})" for name, path in used.items() if not _resolves(name))
    assert not missing, f"named in README/docs/examples but not importable: {missing}"


def test_the_api_reference_outside_integrations_is_importable_from_the_top_level():
    # the page says: everything below is importable from `stablespike` (`import stablespike as ss`)
    import stablespike
    with open(os.path.join(ROOT, "docs", "reference", "api.md"), encoding="utf-8") as f:
        page = f.read()
    entries = re.findall(r"^::: stablespike\.(?!integrations\.)[\w.]*\.(\w+)$", page, re.MULTILINE)
    assert len(entries) > 30
    assert not [n for n in entries if n not in stablespike.__all__]


def test_import_and_a_first_monitor_on_an_snntorch_mlp_load_no_optional_framework():
    # the model of benchmarks/import_time.py, written as snnTorch's tutorials write it
    code = ("import sys, torch, torch.nn as nn, snntorch as snn, stablespike\n"
            "heavy = ('spikingjelly', 'norse', 'lightning', 'tensorboard', 'torch._dynamo', 'matplotlib')\n"
            "print(sorted(m for m in heavy if m in sys.modules))\n"
            "net = nn.Sequential(nn.Linear(784, 100), snn.Leaky(beta=0.9, init_hidden=True),\n"
            "                    nn.Linear(100, 10), snn.Leaky(beta=0.9, init_hidden=True, output=True))\n"
            "with stablespike.FiringRateMonitor(net) as monitor:\n"
            "    net(torch.rand(3, 784))\n"
            "print(len(monitor.table()), sorted(m for m in heavy if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[:2] == ["[]", "2 []"], out.stdout + out.stderr[-2000:]


def test_bench_help_shows_the_default_of_every_option_that_takes_a_value(capsys):
    import pytest

    from stablespike.cli import build_parser
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "depth-scaling", "--help"])
    text = capsys.readouterr().out
    usage, options = text.split("\noptions:\n")
    # the usage line writes [--flag VALUE] for an option that takes a value, [--flag] for a switch
    takes_value = [flag for flag, value in re.findall(r"\[(--[\w-]+)( [^\]]+)?\]", usage) if value]
    assert len(takes_value) > 25
    entries = {m.group(1): " ".join(m.group(2).split())
               for m in re.finditer(r"^  (--[\w-]+)(.*?)(?=^  -|\Z)", options, re.MULTILINE | re.DOTALL)}
    missing = [flag for flag in takes_value if "(default" not in entries[flag]]
    assert not missing, f"--help shows no default for {missing}"


def test_the_training_defaults_estimate_without_the_float32_resolution_warning():
    # the quick preset's widest model (10 x 128 LIF) with TrainConfig's default eps: make demo's case
    import warnings

    import torch

    from stablespike import SpikingMLP, TrainConfig, fit, load_dataset
    data = load_dataset("digits").subset(train=64, test=32)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*resolves at membrane scale")
        fit(SpikingMLP(64, [128] * 10, 10), data, TrainConfig(epochs=1, batch_size=64, lyapunov=True, progress=False))
