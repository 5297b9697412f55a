"""Numeric options: one range check shared by the command line (click types) and the Python API (dataclasses and
runtime arguments), so that `--top-p 0` and `Sampling(top_p=0)` are refused with the same one line.

Floats must be finite (nan and inf are refused everywhere); integers must be integers (not bools, not floats).
Pure Python: the device runtime imports it without torch.
"""

from __future__ import annotations

import math
import numbers

import click

from mode_edge.errors import UserError

SEED_MAX = 2**32 - 1
"""Seeds are 0 .. 2**32-1 everywhere (numpy, torch and Python's random all take them)."""


def describe(lo=None, hi=None, lo_open=False, hi_open=False, integer=False) -> str:
    """The valid range in words: 'an integer >= 1', 'a finite number in (0, 1]'."""
    kind = "an integer" if integer else "a finite number"
    if lo is not None and hi is not None:
        return f"{kind} in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{kind} {'>' if lo_open else '>='} {lo}"
    if hi is not None:
        return f"{kind} {'<' if hi_open else '<='} {hi}"
    return kind


def check_number(option: str, value, lo=None, hi=None, lo_open=False, hi_open=False, integer=False):
    """Return `value` if it is a number in the range; otherwise raise a UserError naming `option` and the range."""
    valid = isinstance(value, numbers.Integral if integer else numbers.Real) and not isinstance(value, bool)
    valid = valid and math.isfinite(value)
    if valid and lo is not None:
        valid = value > lo if lo_open else value >= lo
    if valid and hi is not None:
        valid = value < hi if hi_open else value <= hi
    if not valid:
        raise UserError(f"{option} must be {describe(lo, hi, lo_open, hi_open, integer)}, got {value!r}")
    return value


def check_optional(option: str, value, **limits):
    """`check_number` for an argument where None means 'not set'."""
    return None if value is None else check_number(option, value, **limits)


def check_seed(value, option: str = "--seed") -> int:
    """A seed: an integer in 0 .. 2**32-1."""
    return check_number(option, value, lo=0, hi=SEED_MAX, integer=True)


class FiniteFloat(click.FloatRange):
    """click.FloatRange that also refuses nan and inf (which compare False with every bound and slip through)."""

    name = "float"

    def convert(self, value, param, ctx):
        rv = super().convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return rv


class IntInRange(click.IntRange):
    """click.IntRange that calls itself 'integer' in its messages ("'x' is not a valid integer")."""

    name = "integer"


def Int(lo: int | None = None, hi: int | None = None) -> click.IntRange:
    """An integer option in [lo, hi]; `--help` shows the range."""
    return IntInRange(lo, hi)


def Float(lo: float | None = None, hi: float | None = None, lo_open=False, hi_open=False) -> FiniteFloat:
    """A finite float option in the range; `--help` shows the range."""
    return FiniteFloat(lo, hi, min_open=lo_open, max_open=hi_open)


SEED = Int(0, SEED_MAX)
POSITIVE = Int(1)
