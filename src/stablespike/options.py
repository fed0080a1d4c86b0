"""Options of a training run or a sweep: one error type that names the option, and its checks.

An :class:`OptionError` names the option as the API spells it (a field of ``TrainConfig`` or of the
sweep's config); the command line shows it as the flag the user typed (``--lambda_target``).
"""
from __future__ import annotations

import math

import numpy as np
import torch


class OptionError(ValueError):
    """A bad value of one option. ``option`` is its name as the API spells it (a field of
    :class:`TrainConfig` or of the sweep's config, e.g. ``lambda_target``); the command line
    shows it as the flag the user typed (``--lambda_target``)."""

    def __init__(self, option: str, detail: str):
        super().__init__(f"{option}: {detail}")
        self.option, self.detail = option, detail

    def __reduce__(self):  # pickled whole: a sweep worker hands it to its parent
        return type(self), (self.option, self.detail)


def one_line(err: BaseException, limit: int = 160) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _range_text(low: float, high: float, low_open: bool, high_open: bool) -> str:
    if math.isinf(low) and math.isinf(high):
        return "a finite number"
    if math.isinf(high):
        return f"a finite number {'>' if low_open else '>='} {low:g}"
    return f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"


def check_number(value, option: str, low: float = -math.inf, high: float = math.inf,
                 low_open: bool = False, high_open: bool = False) -> float:
    """``value`` as a float if it is a finite real number in the range, else an OptionError
    naming ``option``, the range and ``value`` (NaN and inf are never in range)."""
    try:
        number = float(value)
        ok = not isinstance(value, (bool, str)) and math.isfinite(number) and (
            (number > low if low_open else number >= low) and (number < high if high_open else number <= high))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise OptionError(option, f"expected {_range_text(low, high, low_open, high_open)}, got {value!r}")
    return number


def check_integer(value, option: str, minimum: int) -> int:
    """``value`` as an int if it is an integer (not a bool) >= ``minimum``, else an OptionError."""
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)) and value >= minimum
    if not ok:
        raise OptionError(option, f"expected an integer >= {minimum}, got {value!r}")
    return int(value)


def check_device(device) -> str:
    """A device this machine has: ``cpu``, ``cuda`` / ``cuda:N`` with CUDA present, ``mps``."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise OptionError("device", f"expected a torch device such as 'cpu', 'cuda' or 'cuda:1', "
                                    f"got {device!r}") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise OptionError("device", f"expected a device this machine has, got {device!r}: CUDA is "
                                        f"not available here (torch.cuda.is_available() is False)")
        if dev.index is not None and dev.index >= count:
            raise OptionError("device", f"expected cuda:0 to cuda:{count - 1} (this machine has "
                                        f"{count} CUDA devices), got {device!r}")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise OptionError("device", f"expected a device this machine has, got {device!r}: MPS is "
                                        f"not available here")
    elif dev.type != "cpu":
        raise OptionError("device", f"expected 'cpu', 'cuda', 'cuda:N' or 'mps', got {device!r}")
    return str(device)
