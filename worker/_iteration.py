"""Where a training iteration ends.

A worker's part of a checkpoint is the state at the end of an iteration: after the script's own code that follows
``opt.step()`` (a scheduler's step, epoch counters, evaluation). That end is not a call zps sees, so it is taken as
the first of: the next sample drawn from a zps sampler (:mod:`.data`), the next ``opt.step()``,
``opt.synchronize()``, and the worker's shutdown. The samplers and the optimizer meet here.
"""
from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

_samplers: list[weakref.ref[Any]] = []
_handler: Callable[[], None] | None = None


def register(sampler: Any) -> None:
    """A zps sampler, in the order the script creates them (a checkpoint keeps their positions in that order)."""
    _samplers.append(weakref.ref(sampler))
    if _handler is not None:
        _on_register(sampler)


def samplers() -> list[Any]:
    """The script's live zps samplers, oldest first."""
    return [s for s in (ref() for ref in _samplers) if s is not None]


def set_handler(handler: Callable[[], None] | None, on_register: Callable[[Any], None] | None = None) -> None:
    """``handler`` runs at every iteration boundary from now on; ``on_register`` for each sampler created later."""
    global _handler, _on_register
    _handler = handler
    _on_register = on_register or (lambda sampler: None)


def boundary() -> None:
    """An iteration may have ended here (a zps sampler draws its next sample)."""
    if _handler is not None:
        _handler()


_on_register: Callable[[Any], None] = lambda sampler: None  # noqa: E731
