"""Scalable spiking VGG (seed 002): stages of conv-BN-LIF blocks with average pooling, then a readout.

Unlike the seed, every shape follows from the input: no 32x32 or 64-channel assumption. Images of
any size ``(C, H, W)`` with ``H, W >= 1`` work: a stage whose input is already 1 pixel high or
wide skips its pooling (so 8x8 inputs work with 4 stages), and the readout's input size is taken
from the first batch unless ``input_size`` is given (later batches must have the same size).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .._checks import check_int, check_tensor, describe
from ..dynamics import StateSpec
from ..surrogate import fast_sigmoid
from .base import SeedModel, leaky, zeros_state

CHANNEL_CAP = 512


class SpikingVGGBlock(nn.Module):
    """Conv3x3 (no bias) -> BatchNorm -> LIF. ``forward(x, mem) -> (spk, mem)``, ``(B, C, H, W)``."""

    def __init__(self, in_ch: int, out_ch: int, beta: float = 0.9, threshold: float = 1.0,
                 spike_grad=None):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(out_ch)
        self.lif = leaky(beta, threshold, spike_grad)

    def forward(self, x: torch.Tensor, mem: torch.Tensor):
        return self.lif(self.bn(self.conv(x)), mem)


class SpikingVGG(SeedModel):
    """VGG-style spiking network of ``num_stages x blocks_per_stage`` conv-BN-LIF blocks.

    Args (seed 002 names and defaults): in_channels, num_classes, base_channels (doubled each
    stage, capped at 512), num_stages, blocks_per_stage, T (time steps for a static image), beta,
    threshold, dropout (before the readout), stable_init (orthogonal/scaled-down weights);
    plus ``input_size`` (int or (H, W); default: the size of the first batch) and ``spike_grad``.
    Without ``input_size`` the readout is a lazy ``Linear`` until the first batch: wrap the model
    in ``DistributedDataParallel`` only after one forward (or build it with ``for_input``).

    State: per block ``mem_l`` then per block ``spk_l``, each ``(B, C_l, H_l, W_l)``.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10, base_channels: int = 64,
                 num_stages: int = 3, blocks_per_stage: int = 2, T: int = 4, beta: float = 0.9,
                 threshold: float = 1.0, dropout: float = 0.25, stable_init: bool = False,
                 input_size: Optional[Union[int, Tuple[int, int]]] = None, spike_grad=None):
        super().__init__()
        for name, v in (("in_channels", in_channels), ("num_classes", num_classes),
                        ("base_channels", base_channels), ("num_stages", num_stages),
                        ("blocks_per_stage", blocks_per_stage), ("T", T)):
            check_int(v, name)
        self.in_channels, self.T = in_channels, T
        self.num_stages, self.blocks_per_stage = num_stages, blocks_per_stage
        self.total_conv_layers = num_stages * blocks_per_stage
        self.stable_init = stable_init
        spike_grad = spike_grad or fast_sigmoid(25)

        self.stages, self.channels = nn.ModuleList(), []  # channels: per stage
        ch_in, ch_out = in_channels, base_channels
        for _ in range(num_stages):
            self.stages.append(nn.ModuleList(
                SpikingVGGBlock(ch_in if b == 0 else ch_out, ch_out, beta, threshold, spike_grad)
                for b in range(blocks_per_stage)))
            self.channels.append(ch_out)
            ch_in, ch_out = ch_out, min(ch_out * 2, CHANNEL_CAP)
        self.dropout = nn.Dropout(dropout)
        self.input_size: Optional[Tuple[int, int]] = None
        self.pools, self._block_shapes = nn.ModuleList(), []
        if input_size is None:
            self.fc = _LazyReadout(num_classes, stable=stable_init)
        else:
            h, w = self._set_input_size(_pair(input_size))
            self.fc = nn.Linear(self.channels[-1] * h * w, num_classes)
        self._init_weights_stable() if stable_init else self._init_weights()

    def _set_input_size(self, size: Tuple[int, int]) -> Tuple[int, int]:
        """Pools and block shapes for images of ``size`` (H, W); returns the final map's (h, w)."""
        self.input_size, (h, w) = size, size
        self.pools, self._block_shapes = nn.ModuleList(), []
        for ch in self.channels:
            self._block_shapes += [(ch, h, w)] * self.blocks_per_stage
            can_pool = h >= 2 and w >= 2
            self.pools.append(nn.AvgPool2d(2) if can_pool else nn.Identity())
            h, w = (h // 2, w // 2) if can_pool else (h, w)
        return h, w

    @classmethod
    def for_input(cls, shape: Sequence[int], **kwargs) -> "SpikingVGG":
        """Build for images of shape ``(C, H, W)`` (channels and size taken from it)."""
        c, h, w = shape
        return cls(in_channels=c, input_size=(h, w), **kwargs)

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.Linear) and not isinstance(m, _LazyReadout):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def _init_weights_stable(self, scale: float = 0.5) -> None:
        """Seed 002's stability-aware init: Kaiming x 0.5 for convs, orthogonal (gain 0.5) for linears."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                with torch.no_grad():
                    m.weight.mul_(scale)
            elif isinstance(m, nn.Linear) and not isinstance(m, _LazyReadout):
                nn.init.orthogonal_(m.weight, gain=scale)
                nn.init.zeros_(m.bias)

    @property
    def depth(self) -> int:
        return self.total_conv_layers

    # --- stepper protocol -------------------------------------------------------------------
    def init_state(self, batch_size: int, device=None, dtype=None):
        if self.input_size is None:
            raise ValueError("input_size: unknown until the model has seen a batch; call the model "
                             "once or build it with input_size=(H, W) before stepping it directly")
        return zeros_state(self._block_shapes * 2, batch_size, device, dtype)

    def state_spec(self):
        n = self.total_conv_layers
        return tuple(StateSpec(i, "membrane") for i in range(n)) + tuple(
            StateSpec(i, "spike") for i in range(n))

    def step(self, x_t: torch.Tensor, state):
        """One step: image ``x_t (B, C, H, W)`` -> ``(pooled spikes flattened (B, F), state)``."""
        h, k = x_t, 0
        mems, spikes = [], []
        for blocks, pool in zip(self.stages, self.pools):
            for block in blocks:
                spk, mem = block(h, state[k])
                mems.append(mem)
                spikes.append(spk)
                h, k = spk, k + 1
            h = pool(h)
        return h.flatten(1), tuple(mems) + tuple(spikes)

    # --- seed API ---------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, compute_lyapunov: bool = False, lyap_eps: float = 1e-4,
                lyap_layers: Optional[Sequence[int]] = None, record_states: bool = False, *,
                lyap_renorm: str = "global", lyap_fraction: float = 1.0,
                lyap_dtype: Optional[torch.dtype] = None, lyap_renorm_every: int = 1):
        """Classify images.

        Args:
            x: ``(B, C, H, W)`` static images, presented for ``self.T`` steps (seed 002), or a
                time-first sequence ``(T, B, C, H, W)``.
            Other arguments as :meth:`stablespike.models.SpikingMLP.forward`.

        Returns:
            ``(logits (B, num_classes), lyap_est or None, recordings or None)``.
        """
        if isinstance(x, torch.Tensor) and x.dim() in (4, 5) and min(x.shape[-2:]) < 1:
            raise ValueError(f"x: expected images of at least 1x1 pixels, got size (H, W) = "
                             f"{tuple(x.shape[-2:])} in {describe(x)}")
        check_tensor(x, "x", ndims=(4, 5), layout="(B, C, H, W) or (T, B, C, H, W)", floating=True)
        if x.shape[-3] != self.in_channels:
            raise ValueError(f"x: expected images with in_channels={self.in_channels} channels "
                             f"(B, C, H, W), got {describe(x)}")
        if self.input_size is None:  # the first batch sets the size (and the readout's input)
            self._set_input_size(tuple(x.shape[-2:]))
        if tuple(x.shape[-2:]) != self.input_size:
            raise ValueError(
                f"x: expected images of size (H, W) = {self.input_size} (input_size, or the size of "
                f"the first batch), got {describe(x)}; build one model per image size")
        x_tf = x.unsqueeze(0).expand(self.T, *x.shape) if x.dim() == 4 else x
        return self._forward(
            x_tf, 1, compute_lyapunov, lyap_eps, lyap_layers, record_states,
            {"renorm": lyap_renorm, "fraction": lyap_fraction, "twin_dtype": lyap_dtype,
             "renorm_every": lyap_renorm_every})

    def _logits(self, outputs: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(outputs.sum(dim=0)))


class _LazyReadout(nn.LazyLinear):
    """The readout ``Linear``, its input size (channels x pixels of the last feature map) taken
    from the first batch; initialized as the model's other linears (Xavier, or orthogonal with
    gain 0.5 for ``stable_init``) once that size is known."""

    def __init__(self, out_features: int, stable: bool):
        self.stable = stable
        super().__init__(out_features)

    def reset_parameters(self) -> None:
        if self.has_uninitialized_params() or self.in_features == 0:
            return
        if self.stable:
            nn.init.orthogonal_(self.weight, gain=0.5)
        else:
            nn.init.xavier_uniform_(self.weight)
        nn.init.zeros_(self.bias)


def _pair(size) -> Tuple[int, int]:
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    if h < 1 or w < 1:
        raise ValueError(f"input_size: expected a positive int or (H, W), got {size!r}")
    return int(h), int(w)
