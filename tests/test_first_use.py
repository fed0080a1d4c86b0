"""First use: the names the README and the docs use import from ``stablespike``, and importing it
pulls in none of the optional heavy packages (they load when the user's program uses them)."""
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_name_the_readme_and_docs_import_from_stablespike_exists():
    import stablespike
    texts = [os.path.join(ROOT, "README.md")] + [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(ROOT, "docs"))
                                                  for f in fs if f.endswith(".md")]
    names = set()
    for path in texts:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        groups = re.findall(r"from stablespike import \(([^)]*)\)", text)
        groups += re.findall(r"^\s*from stablespike import ([A-Za-z_, ]+?)\s*(?:#.*)?$", text, re.MULTILINE)
        for group in groups:
            names |= {n.strip() for n in group.replace("\n", " ").split(",") if n.strip()}
        names |= set(re.findall(r"\bstablespike\.([A-Z][A-Za-z]+|fit|calibrate|register_neuron)\b", text))
    assert {"fit", "TrainConfig", "load_dataset", "ThresholdBalancer", "SpikeProfiler"} <= set(stablespike.__all__)
    missing = sorted(n for n in names if not hasattr(stablespike, n))
    assert not missing, f"named in the docs but not importable from stablespike: {missing}"


def test_import_stablespike_loads_no_optional_framework():
    code = ("import sys, stablespike\n"
            "print(sorted(m for m in ('spikingjelly', 'norse', 'lightning', 'tensorboard', 'torch._dynamo',"
            " 'matplotlib') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


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
