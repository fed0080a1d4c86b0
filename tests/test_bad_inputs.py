"""The bad-input table: every case gets an exception of the stated type whose message names the
argument the user got wrong (DESIGN.md rule 8). Cases across the API; the CLI's options are in
tests/test_cli_options.py."""
import pytest
import torch
from torch import nn

import stablespike as ss
from stablespike.data import encode, latency, load_dataset, rate
from stablespike.lyapunov import depthwise_gain, finite_difference_lyapunov, tangent_spectrum


def _mlp():
    return ss.SpikingMLP(4, [8, 8], 2)


def _x():
    return torch.rand(2, 3, 4)  # (B, T, D), as the seed models take it


def _fd(**kw):
    return finite_difference_lyapunov(_mlp(), _x(), batch_dim=0, **kw)


def _vgg(**kw):
    return ss.SpikingVGG(1, 2, base_channels=4, num_stages=2, blocks_per_stage=1, input_size=8, **kw)


def _bn_net_step():
    import snntorch as snn
    net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), snn.Leaky(beta=0.9, init_hidden=True))

    def forward(m, x):
        from snntorch import utils
        utils.reset(m)
        return torch.stack([m(x) for _ in range(3)])
    return finite_difference_lyapunov(net, torch.rand(1, 4), forward=forward, batch_dim=0)


CASES = [
    # models: construction
    ("SpikingMLP beta > 1", lambda: ss.SpikingMLP(4, [8], 2, beta=1.5), ValueError, "beta"),
    ("SpikingMLP beta < 0", lambda: ss.SpikingMLP(4, [8], 2, beta=-0.1), ValueError, "beta"),
    ("SpikingMLP beta NaN", lambda: ss.SpikingMLP(4, [8], 2, beta=float("nan")), ValueError, "beta"),
    ("SpikingMLP threshold 0", lambda: ss.SpikingMLP(4, [8], 2, threshold=0), ValueError, "threshold"),
    ("SpikingMLP input_dim str", lambda: ss.SpikingMLP("4", [8], 2), ValueError, "input_dim"),
    ("SpikingMLP num_classes 0", lambda: ss.SpikingMLP(4, [8], 0), ValueError, "num_classes"),
    ("SpikingMLP hidden_dims []", lambda: ss.SpikingMLP(4, [], 2), ValueError, "hidden_dims"),
    ("SpikingMLP dropout 1", lambda: ss.SpikingMLP(4, [8], 2, dropout=1.0), ValueError, "dropout"),
    ("Recurrent alpha > 1", lambda: ss.RecurrentSpikingMLP(4, [8], 2, alpha=2.0), ValueError, "alpha"),
    ("Recurrent beta > 1", lambda: ss.RecurrentSpikingMLP(4, [8], 2, beta=2.0), ValueError, "beta"),
    ("SpikingVGG T 0", lambda: _vgg(T=0), ValueError, "T"),
    ("SpikingVGG T bool", lambda: _vgg(T=True), ValueError, "T"),
    ("SpikingVGG beta > 1", lambda: _vgg(beta=3.0), ValueError, "beta"),
    # models: inputs
    ("SpikingMLP int x", lambda: _mlp()(torch.ones(2, 3, 4, dtype=torch.long)), TypeError, "x"),
    ("SpikingMLP bool x", lambda: _mlp()(torch.ones(2, 3, 4, dtype=torch.bool)), TypeError, "x"),
    ("SpikingMLP x wrong width", lambda: _mlp()(torch.rand(2, 3, 5)), ValueError, "input_dim"),
    ("SpikingMLP x NaN", lambda: _mlp()(torch.full((2, 3, 4), float("nan"))), ValueError, "x"),
    ("SpikingVGG uint8 x", lambda: _vgg()(torch.ones(2, 1, 8, 8, dtype=torch.uint8)), TypeError, "x"),
    # estimators
    ("eps bool", lambda: _fd(eps=True), ValueError, "eps"),
    ("eps 0", lambda: _fd(eps=0), ValueError, "eps"),
    ("eps NaN", lambda: _fd(eps=float("nan")), ValueError, "eps"),
    ("fraction bool", lambda: _fd(fraction=True), ValueError, "fraction"),
    ("fraction 1.5", lambda: _fd(fraction=1.5), ValueError, "fraction"),
    ("twin_dtype int32", lambda: _fd(twin_dtype=torch.int32), TypeError, "twin_dtype"),
    ("twin_dtype str", lambda: _fd(twin_dtype="float64"), TypeError, "twin_dtype"),
    ("renorm unknown", lambda: _fd(renorm="layer"), ValueError, "renorm"),
    ("renorm_every 1.5", lambda: _fd(renorm_every=1.5), ValueError, "renorm_every"),
    ("discard -1", lambda: _fd(discard=-1), ValueError, "discard"),
    ("count_flips str", lambda: _fd(count_flips="no"), TypeError, "count_flips"),
    ("generator int", lambda: _fd(generator=3), TypeError, "generator"),
    ("layers out of range", lambda: _fd(layers=[5]), ValueError, "layers"),
    ("batch_dim out of range", lambda: finite_difference_lyapunov(_mlp(), _x(), batch_dim=5),
     ValueError, "batch_dim"),
    ("x a list", lambda: finite_difference_lyapunov(_mlp(), [[1.0]], batch_dim=0), TypeError, "x"),
    ("model without neurons", lambda: finite_difference_lyapunov(nn.Linear(4, 2), _x(), batch_dim=0),
     ValueError, "model"),
    ("estimate int x", lambda: finite_difference_lyapunov(_mlp(), torch.ones(2, 3, 4, dtype=torch.long),
                                                          batch_dim=0), TypeError, "x"),
    ("batch norm, one sample", _bn_net_step, ValueError, "batch"),
    ("tangent k 0", lambda: tangent_spectrum(_mlp(), _x(), batch_dim=0, k=0), ValueError, "k"),
    ("tangent k bool", lambda: tangent_spectrum(_mlp(), _x(), batch_dim=0, k=True), ValueError, "k"),
    ("tangent t_ons 0", lambda: tangent_spectrum(_mlp(), _x(), batch_dim=0, t_ons=0), ValueError, "t_ons"),
    # diagnostics
    ("SpikeProfiler dead_rate -1", lambda: ss.SpikeProfiler(dead_rate=-1), ValueError, "dead_rate"),
    ("SpikeProfiler saturated_rate 1.5", lambda: ss.SpikeProfiler(saturated_rate=1.5), ValueError,
     "saturated_rate"),
    ("monitor instance str", lambda: ss.FiringRateMonitor(_mlp(), instance="Leaky"), TypeError, "instance"),
    ("monitor function str", lambda: ss.OutputMonitor(_mlp(), function_on_output="mean"), TypeError,
     "function_on_output"),
    ("FiringRate list", lambda: ss.FiringRate().update([0, 1, 1]), TypeError, "spikes"),
    ("GradNorm window 0", lambda: ss.GradNorm(window=0), ValueError, "window"),
    ("StabilityMonitor dead_threshold", lambda: ss.StabilityMonitor(dead_threshold=-0.1), ValueError,
     "dead_threshold"),
    ("Thresholds str", lambda: ss.Thresholds(dead_critical="0.5"), ValueError, "dead_critical"),
    # calibration
    ("calibrate target_rate 0", lambda: ss.calibrate(_mlp(), _x(), target_rate=0.0), ValueError, "target_rate"),
    ("calibrate target_rate bool", lambda: ss.calibrate(_mlp(), _x(), target_rate=True), ValueError,
     "target_rate"),
    ("calibrate mode", lambda: ss.calibrate(_mlp(), _x(), mode="bias"), ValueError, "mode"),
    ("calibrate int x", lambda: ss.calibrate(_mlp(), torch.ones(2, 3, 4, dtype=torch.long)), TypeError, "x"),
    ("calibrate no neurons", lambda: ss.calibrate(nn.Linear(4, 4), _x()), ValueError, "model"),
    ("calibrate forward str", lambda: ss.calibrate(_mlp(), _x(), forward="model(x)"), TypeError, "forward"),
    # data and encoders
    ("load_dataset data_dir int", lambda: load_dataset("mnist", data_dir=3), TypeError, "data_dir"),
    ("load_dataset seed -1", lambda: load_dataset("digits", seed=-1), ValueError, "seed"),
    ("load_dataset unknown", lambda: load_dataset("imagenet"), ValueError, "imagenet"),
    ("encoder T 0", lambda: rate(torch.rand(2, 4), 0), ValueError, "T"),
    ("encoder T 2.5", lambda: latency(torch.rand(2, 4), 2.5), ValueError, "T"),
    ("encoder T bool", lambda: encode(torch.rand(2, 4), "direct", True), ValueError, "T"),
    ("encoder int x", lambda: rate(torch.ones(2, 4, dtype=torch.long), 3), TypeError, "x"),
    ("encoder unknown", lambda: encode(torch.rand(2, 4), "poisson", 3), ValueError, "encoder"),
    ("depth generator str", lambda: depthwise_gain(_mlp(), _x(), batch_dim=0, generator="0"),
     TypeError, "generator"),
]


@pytest.mark.parametrize("call, error, word", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_names_the_argument(call, error, word):
    with pytest.raises(error) as info:
        call()
    assert word in str(info.value), str(info.value)
