"""Finite-difference (Benettin two-trajectory) Lyapunov estimate for any model.

What it measures: the average per-step log-growth of a perturbation of *finite* size ``eps``
applied to the continuous state (membranes, synaptic currents) of the chosen layers, renormalized
back to size ``eps`` after every step. For smooth maps and small ``eps`` this converges to the
largest Lyapunov exponent. For spiking networks it is a *finite-size* exponent: spikes that flip
between the twins make it depend on ``eps`` (+0.58 at eps=1e-1, -0.10 at eps=1e-4 on the same
recurrent LIF net), so the result also reports how often spikes flipped.

Two drivers share one core (:mod:`stablespike.twins`): a module with spiking neurons runs
through its own forward with twin rows in its batch (:mod:`stablespike.neuron_twins`); a
stepper (``init_state`` / ``step``) is unrolled (:mod:`stablespike.dynamics`).

Differences from the seeds, on purpose:

* the initial perturbation has norm ``eps`` per sample (the seeds drew ``eps * randn`` per element,
  whose norm is ``eps * sqrt(N)``, biasing the first step by ``ln sqrt(N)``);
* divergence is measured on exactly the tensors that are perturbed, never on spikes;
* renormalization is per sample (never across the batch), and log-growth is averaged over time per
  sample, then over samples (E[log], not log E);
* the twins share dropout masks and batch-norm statistics with their samples.
"""
from __future__ import annotations

import copy
import functools
import math
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional, Sequence

import torch
from torch import nn

from .._checks import (check_bool, check_float_dtype, check_fraction, check_generator, check_int,
                       check_positive, check_tensor, user_stacklevel)
from ..dynamics import layer_indices, run_twins, select_layers, state_spec_of
from ..neuron_runs import ForwardFailed, kept_state, user_held_state
from ..neuron_twins import ModuleTwins
from ..neurons import find_layers
from ..twins import RENORM_MODES, TwinEstimate, choose_rows, drawing_aside
from .drivers import call_model, check_batch_dim, require_stepper, uses_neurons
from .precision import cast_forward, maybe_cast


# Smallest per-element perturbation, in units of the dtype's machine epsilon (at state scale ~1),
# below which the twin difference keeps fewer than ~6 significant bits.
_RESOLUTION_ULPS = 64


@dataclass
class FiniteDifferenceResult:
    """Outcome of :func:`finite_difference_lyapunov`.

    ``exponent``: scalar tensor, mean of ``per_sample``; differentiable (a loss term).
    ``per_sample``: ``(K,)`` time-averaged log-growth per estimated sample, in nats per step.
    ``sample_index``: ``(K,)`` the batch rows that were estimated (all rows unless ``fraction < 1``).
    ``flip_fraction``: fraction of (step, sample) pairs in which any spike differed between
    twins (NaN when no spikes were seen: a stepper whose ``state_spec`` declares none).
    ``outputs``: what the model returns for the samples alone — for a module, ``forward(model, x)``
    restricted to the nominal rows (a tensor or a tuple); for a stepper, ``(T, B, ...)``.
    ``renorm``: the renormalization used (``per_layer`` for multi-step neurons, see
    :mod:`stablespike.neuron_twins`); ``steps``: the measured steps.
    """

    exponent: torch.Tensor
    per_sample: torch.Tensor
    sample_index: torch.Tensor
    flip_fraction: float
    eps: float
    renorm: str
    steps: int
    outputs: Any
    state: Optional[tuple] = field(default=None, repr=False)
    states: Optional[List[tuple]] = field(default=None, repr=False)

    def __float__(self) -> float:
        return float(self.exponent.detach())

    def __str__(self) -> str:
        spread = float(self.per_sample.detach().std()) if self.per_sample.numel() > 1 else 0.0
        flips = "" if math.isnan(self.flip_fraction) else (
            f", spike flips in {self.flip_fraction:.1%} of steps")
        return (
            f"finite-size Lyapunov exponent {float(self):+.4f} /step "
            f"(+- {spread:.4f} over {self.per_sample.numel()} samples, eps={self.eps:g}, "
            f"{self.renorm} renorm, {self.steps} steps{flips})"
        )


def finite_difference_lyapunov(
    model,
    x: torch.Tensor,
    *,
    forward: Optional[Callable] = None,
    batch_dim: int = 1,
    output_batch_dim: Optional[int] = None,
    eps: float = 1e-4,
    layers: Optional[Sequence[int]] = None,
    renorm: str = "global",
    fraction: float = 1.0,
    twin_dtype: Optional[torch.dtype] = None,
    renorm_every: int = 1,
    discard: int = 0,
    count_flips: bool = True,
    generator: Optional[torch.Generator] = None,
    record_states: bool = False,
) -> FiniteDifferenceResult:
    """Benettin two-trajectory estimate of the largest (finite-size) Lyapunov exponent.

    Args:
        model: an ``nn.Module`` containing spiking neurons (snnTorch, spikingjelly, norse or
            registered types; run through ``forward``), or a stepper (``init_state`` / ``step``,
            unrolled over a time-first ``x``). A module that is also a stepper but has no
            ``forward`` of its own is unrolled.
        x: the model's input. For a module: whatever ``forward`` takes, with the samples along
            ``batch_dim``; for a stepper: ``(T, B, ...)``.
        forward: ``forward(model, x) -> tensor or tuple of tensors``, default ``model(x)``: the
            user's own call (a time loop, ``functional.reset_net`` first, ...).
        batch_dim: the dimension of ``x`` that indexes samples: 1 for time-first ``(T, B, ...)``,
            0 for a static ``(B, ...)`` input that the forward repeats over time.
        output_batch_dim: the dimension of every output that indexes samples; default: the one
            dimension whose size is the extended batch (samples + twins). When several are (a
            ``(T, B + K, C)`` record with ``T == B + K``), an error asks for this argument. The
            forward must keep one output per sample: one that averages the samples away is an
            error, unless another of its dimensions happens to have ``B + K`` entries (then it
            would be cut there: pass this argument to be sure).
        eps: perturbation norm per sample, over the concatenated perturbed state.
        layers: indices of the layers (neurons in module order, or stepper layers) whose
            continuous state is perturbed and measured (negative counts from the last); default all.
        renorm: ``"global"``: one scale per sample over all chosen layers (textbook Benettin);
            ``"per_layer"``: each layer's part rescaled to ``eps / sqrt(L)`` (seed 001's variant;
            the exponent is 0.5 ln of the mean over layers of their squared growth per step).
            Always used for multi-step neurons, which run a whole sequence per call (with a
            warning when ``global`` was asked for several layers).
        fraction: estimate on a random ``ceil(fraction * B)`` samples only; the others run
            without twins, so a regularized training step costs little more than a plain one.
        twin_dtype: e.g. ``torch.float64``: run the model (samples and twins) in that precision;
            gradients still reach the model's own parameters.
        renorm_every: measure and renormalize every this many steps (and at the last step),
            Benettin's interval tau. Identical for linear dynamics with global renormalization
            (per layer it is not: the layers' shares are reset at different rates); fewer
            operations per step.
        discard: leading measured steps left out of the average (transient); with
            ``renorm_every > 1`` rounded up to the start of a renormalization interval.
        count_flips: count spike flips between twins (a diagnostic).
        generator: seeds the perturbation direction and the sub-batch choice. Default: a
            generator seeded from torch's global one, whose stream the model's own draws
            (dropout masks) then use as in a plain call (``.outputs`` equal a plain call's under
            the same seed); the global generator is advanced by one draw afterwards.
        record_states: (steppers) keep the nominal state of every step in ``result.states``.

    Steps: a stepper's initial state is perturbed, and all ``T`` steps are measured. In a module
    the state before the first step is the framework's own, so the state after the first step is
    perturbed and the ``T - 1`` steps after it are measured.
    """
    eps = check_positive(eps, "eps")
    fraction = check_fraction(fraction, "fraction")
    if renorm not in RENORM_MODES:
        raise ValueError(f"renorm: expected one of {RENORM_MODES}, got {renorm!r}")
    renorm_every, discard = check_int(renorm_every, "renorm_every"), check_int(discard, "discard", 0)
    check_float_dtype(twin_dtype, "twin_dtype")
    check_bool(count_flips, "count_flips")
    check_bool(record_states, "record_states")
    check_generator(generator)
    if uses_neurons(model, forward):
        with drawing_aside(generator) as generator:  # the model's own draws (dropout) stay a plain call's
            return _module_estimate(model, x, forward, batch_dim, output_batch_dim, eps, layers, renorm,
                                    fraction, twin_dtype, int(renorm_every), int(discard), count_flips, generator)
    require_stepper(model)
    return _stepper_estimate(model, x, eps, layers, renorm, fraction, twin_dtype,
                             int(renorm_every), int(discard), count_flips, generator, record_states)


def _module_estimate(model, x, forward, batch_dim, output_batch_dim, eps, layers, renorm, fraction, twin_dtype,
                     renorm_every, discard, count_flips, generator) -> FiniteDifferenceResult:
    batch_dim = check_batch_dim(x, batch_dim)
    forward = forward or call_model
    neurons = find_layers(model)
    chosen = layer_indices(len(neurons), layers, "layers", "neuron layer")
    if any(n.adapter.multistep(n.module, None) for n in neurons):
        if renorm == "global" and len(chosen) > 1:
            _warn_per_layer(len(chosen))
        renorm = "per_layer"  # layer after layer: the layers cannot be rescaled together
    rows = choose_rows(x.shape[batch_dim], fraction, x.device, generator)
    groups = len(chosen) if renorm == "per_layer" else 1
    dtype = _model_dtype(model, x)

    def attempt(at_neurons: bool):
        estimate = TwinEstimate(rows, eps, renorm, groups, renorm_every=renorm_every, discard=discard,
                                count_flips=count_flips)
        driver = ModuleTwins(model, neurons, chosen, estimate, generator, twin_dtype, at_neurons, dtype)
        x_in = x if at_neurons else rows.extend(x, dim=batch_dim)
        if twin_dtype is None:
            return estimate, driver, driver.run(forward, x_in)
        with cast_forward(model, forward, twin_dtype) as cast:
            return estimate, driver, driver.run(cast, x_in.to(twin_dtype) if x.is_floating_point() else x_in)
    estimate, driver, out = _where_twins_enter(model, neurons, x, forward, generator, attempt)
    state_dtype = next(iter(driver.chosen[0].state.values())).dtype
    _warn_if_unresolved(eps, sum(s[0].numel() for n in driver.chosen for s in n.state.values()),
                        state_dtype)
    per_sample = estimate.per_sample()
    return FiniteDifferenceResult(
        exponent=per_sample.mean().to(dtype), per_sample=per_sample.to(dtype),
        sample_index=rows.index, flip_fraction=estimate.flip_fraction(), eps=eps, renorm=renorm,
        steps=estimate.counted_steps,
        # a run in twin_dtype hands back outputs in the model's precision; otherwise as they came
        outputs=_nominal_outputs(out, rows, output_batch_dim, None if twin_dtype is None else dtype))


def _model_dtype(model: nn.Module, x: torch.Tensor) -> torch.dtype:
    """The precision a plain call computes in: that of the model's floating parameters (a
    forward may cast ``x``: its dtype is not the model's), else ``x``'s (a model without
    parameters computes in its input's; snnTorch's float32 buffers beta and threshold do not
    set it)."""
    for t in model.parameters():
        if t.is_floating_point():
            return t.dtype
    return x.dtype if x.is_floating_point() else torch.get_default_dtype()


def _warn_per_layer(layers: int) -> None:
    warnings.warn(
        f"finite_difference_lyapunov: the model's multi-step neurons run a whole sequence per call, "
        f"layer after layer, so its {layers} layers cannot be renormalized together: each is "
        "renormalized to its share eps / sqrt(L) (renorm='per_layer'). The exponent is then "
        "0.5 ln of the mean over layers of their squared growth per step, the largest exponent "
        "only where the layers grow alike (layers with leaks 0.5 and 0.8 give -0.40, not ln 0.8). "
        "Pass renorm='per_layer' to accept it, layers=[i] to measure one layer, or use "
        "tangent_spectrum for the largest exponent.", RuntimeWarning, stacklevel=user_stacklevel())


# model -> {forward's code -> where its twin rows enter}: "neurons" (appended at the neurons'
# inputs, the layers before the first neuron run once) or "x" (x extended: every layer runs on
# the twins too). The same model may be run by forwards that differ in this.
_TWINS_ENTER: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _forward_key(forward):
    """What identifies a forward across calls: its code (a lambda written inside a training loop
    is a new function object each step, with the same code), else the callable itself."""
    fn = forward.func if isinstance(forward, functools.partial) else forward
    return getattr(getattr(fn, "__func__", fn), "__code__", fn)


def _where_twins_enter(model, neurons, x, forward, generator, attempt):
    """``attempt(at_neurons)`` at the neurons, or, for a model whose forward fails so (it
    reshapes a neuron's output to the batch size it read from ``x``, or mixes it with a tensor
    computed before the first neuron), with ``x`` extended, as that forward expects. The first
    call of a forward on a model tries the neurons with the model's buffers and random state
    saved, restores them on failure (and on any error of that first call, which then passes
    through), and remembers what worked for that model and forward."""
    known = _TWINS_ENTER.setdefault(model, {})
    key = _forward_key(forward)
    where = known.get(key)
    if where != "x":
        saved = None if where == "neurons" else RunState(model, neurons, x, generator)
        try:
            result = attempt(True)
        except ForwardFailed:
            if saved is None:
                raise
            saved.restore()
        except Exception:
            if saved is not None:  # an error leaves the model as it was (e.g. a wrong batch_dim)
                saved.restore()
            raise
        else:
            known[key] = "neurons"
            return result
        try:
            result = attempt(False)
        except Exception:
            saved.restore()
            raise
    else:
        result = attempt(False)
    known[key] = "x"
    return result


class RunState:
    """A model's buffers (batch-norm statistics), the state its neurons kept from an earlier
    call (and the user's modules hold: a streaming forward's ``self.state``), and the random
    states a forward draws from; :meth:`restore` puts them back. ``neurons``: the model's
    neuron layers (:func:`stablespike.neurons.find_layers`)."""

    def __init__(self, model, neurons, x: torch.Tensor, generator: Optional[torch.Generator]):
        self.buffers = [(b, b.detach().clone()) for b in model.buffers()]
        # the frameworks assign a neuron's new state rather than write into it: the tensors
        # themselves are the state before the call
        self.kept = [entry for n in neurons for entry in kept_state(n.module)]
        self.kept += user_held_state(model, neurons)  # a streaming forward's self.state
        # a dict or list the model mutates in place (spikingjelly's memories: a dropout mask)
        # holds the run's tensors by the end: its entries are kept as they are now
        self.entries = [copy.copy(value) if isinstance(value, (dict, list)) else None
                        for _, _, value in self.kept]
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(x.device) if x.is_cuda else None
        self.generator = generator, (generator.get_state() if generator is not None else None)
        self.device = x.device

    def restore(self) -> None:
        with torch.no_grad():
            for b, value in self.buffers:
                b.copy_(value)
        for (container, key, value), entries in zip(self.kept, self.entries):
            container[key] = value
            if isinstance(entries, dict):
                value.clear()
                value.update(entries)
            elif entries is not None:
                value[:] = entries
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)
        generator, state = self.generator
        if generator is not None:
            generator.set_state(state)


def _nominal_outputs(out, rows, dim: Optional[int], dtype: Optional[torch.dtype]):
    """``out`` (a tensor or a tuple/list of tensors or None) restricted to the samples' rows:
    along ``dim``, else along the one dimension of the extended batch's size. Where several
    dimensions have that size the shape cannot tell which one indexes the samples (x's
    ``batch_dim`` cannot either: a forward may reduce over time, or stack time in front of a
    static input's samples), so that is an error naming ``output_batch_dim``. (A forward that
    averages the samples away, leaving another dimension of that size by chance, cannot be told
    from one that does not: ``output_batch_dim`` says it for sure.)"""
    if isinstance(out, (tuple, list)):
        return type(out)(_nominal_outputs(o, rows, dim, dtype) if o is not None else None
                         for o in out)
    dims = [d for d in range(out.dim()) if out.shape[d] == rows.total]
    what = f"size {rows.total} (the {rows.batch} samples and {rows.twins} twins)"
    if dim is None and len(dims) > 1:
        raise ValueError(
            f"output_batch_dim: an output of forward has shape {tuple(out.shape)}, with several "
            f"dimensions ({', '.join(map(str, dims))}) of {what}, so which one indexes the samples "
            "cannot be told from its shape; pass output_batch_dim (the same for every output)")
    if dim is None and not dims:
        raise ValueError(
            f"batch_dim: an output of forward has shape {tuple(out.shape)}, with no dimension of "
            f"{what}; is batch_dim the dimension of x that indexes samples? (A forward that "
            "reduces over the samples, such as a mean over the batch, cannot be estimated: "
            "return one output per sample.)")
    dim = dims[0] if dim is None else dim
    if not -out.dim() <= dim < out.dim() or out.shape[dim] != rows.total:
        raise ValueError(f"output_batch_dim: expected a dimension of {what} in every output, "
                         f"got {dim} for an output of shape {tuple(out.shape)}")
    nominal = out.narrow(dim, 0, rows.batch)
    return nominal.to(dtype) if dtype is not None and nominal.is_floating_point() else nominal


def _stepper_estimate(stepper, x, eps, layers, renorm, fraction, twin_dtype, renorm_every,
                      discard, count_flips, generator, record_states) -> FiniteDifferenceResult:
    check_tensor(x, "x", ndims=range(2, 8), layout="(T, B, ...) time-first", floating=True)
    T, B = x.shape[0], x.shape[1]
    if discard >= T:
        raise ValueError(f"discard: expected an integer in [0, {T - 1}] (T={T}), got {discard!r}")
    rows = choose_rows(B, fraction, x.device, generator)
    with maybe_cast(stepper, twin_dtype) as run_stepper:
        dtype = twin_dtype or x.dtype
        probe = tuple(run_stepper.init_state(1, x.device, dtype))
        spec = state_spec_of(run_stepper, probe)
        chosen = select_layers(spec, layers)
        _warn_if_unresolved(eps, sum(probe[i][0].numel() for i in chosen), dtype)
        groups = 1 if renorm == "global" else len({spec[i].layer for i in chosen})
        estimate = TwinEstimate(rows, eps, renorm, groups, renorm_every=renorm_every,
                                discard=discard, count_flips=count_flips)
        run = run_twins(run_stepper, x.to(dtype), estimate, chosen, spec, generator, record_states)
    per_sample = estimate.per_sample().to(x.dtype)
    return FiniteDifferenceResult(
        exponent=per_sample.mean(), per_sample=per_sample, sample_index=rows.index,
        flip_fraction=estimate.flip_fraction(), eps=eps, renorm=renorm,
        steps=estimate.counted_steps, outputs=run.outputs.to(x.dtype), state=run.state,
        states=run.states)


def _warn_if_unresolved(eps: float, n_perturbed: int, dtype: torch.dtype) -> None:
    per_element = eps / math.sqrt(max(1, n_perturbed))
    floor = _RESOLUTION_ULPS * torch.finfo(dtype).eps
    if per_element < floor:
        warnings.warn(
            f"eps={eps:g} spread over {n_perturbed} state values is {per_element:.1e} per value, "
            f"below what {dtype} resolves at membrane scale (~{floor:.1e}): the twin difference is "
            "quantized. Use twin_dtype=torch.float64 or a larger eps.",
            RuntimeWarning, stacklevel=user_stacklevel(),
        )
