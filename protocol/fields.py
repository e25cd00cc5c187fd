"""The tests of single fields a peer sent, written once: every reader of a header or body uses these.

msgpack gives back Python values of any type, so a field is tested by its exact type (``True`` is not the integer
1, a float is not an integer) and its range; NaN fails every range test.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # a True makes the value an int (a number) for mypy; callers only raise or skip on a False
    from typing_extensions import TypeIs

MAX_INT = 1 << 62  # no count, step, version or offset of a real job comes near it
UNBOUNDED = 1 << 64  # above every integer msgpack carries


def is_int(value: Any, lo: int = 0, hi: int = MAX_INT) -> TypeIs[int]:
    """``value`` is an integer (not a bool) with ``lo <= value < hi``."""
    return type(value) is int and lo <= value < hi


def is_number(value: Any, lo: float, hi: float) -> TypeIs[int | float]:
    """``value`` is an integer or float (not a bool) with ``lo <= value <= hi`` (NaN fails the comparison)."""
    return type(value) in (int, float) and lo <= value <= hi


def show(value: Any) -> str:
    """A peer's value as an error message quotes it: its repr, cut short (a reply must not echo megabytes)."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
