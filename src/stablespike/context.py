"""Bottom layer: which rows of a batch are nominal while a Lyapunov estimate runs.

A finite-difference estimate runs the model on its batch of ``B`` samples, with ``K`` twin rows
(perturbed copies of some of the samples) appended from its first neurons on. Monitors and profilers hooked into the model
must keep counting the ``B`` real samples only: they ask :func:`nominal_rows`. Nothing else is
shared between the diagnostics and the estimator.
"""
from __future__ import annotations

import contextlib
from contextvars import ContextVar
from typing import Iterator, NamedTuple, Optional

import torch


class RowLayout(NamedTuple):
    """``nominal`` real samples followed by twin rows, ``total`` rows in all."""

    nominal: int
    total: int


# per thread and task; set only while an estimate runs its model
_ACTIVE: ContextVar[Optional[RowLayout]] = ContextVar("stablespike_twin_rows", default=None)


def active_rows() -> Optional[RowLayout]:
    """The row layout of the estimate running now, or None outside one."""
    return _ACTIVE.get()


@contextlib.contextmanager
def twin_rows(nominal: int, total: int) -> Iterator[RowLayout]:
    """Within the block, batches carry ``total - nominal`` twin rows after ``nominal`` samples."""
    token = _ACTIVE.set(RowLayout(int(nominal), int(total)))
    try:
        yield _ACTIVE.get()
    finally:
        _ACTIVE.reset(token)


def nominal_rows(h, layout: Optional[RowLayout] = None, time_first: Optional[bool] = None):
    """``h`` without the twin rows of ``layout`` (default: the estimate running now).

    ``time_first=False``: ``h`` is ``(B + K, ...)`` and keeps its first ``nominal`` rows;
    ``True``: ``h`` is ``(T, B + K, ...)`` and keeps ``[:, :nominal]``; None (layout unknown):
    the first of the two dimensions that has ``total`` rows. Anything else (parameters, other
    shapes, non-tensors) passes unchanged.
    """
    layout = layout or _ACTIVE.get()
    if layout is None or not isinstance(h, torch.Tensor) or h.dim() == 0:
        return h
    if time_first is not True and h.shape[0] == layout.total:
        return h[: layout.nominal]
    if time_first is not False and h.dim() > 1 and h.shape[1] == layout.total:
        return h[:, : layout.nominal]
    return h
