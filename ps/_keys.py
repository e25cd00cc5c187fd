"""The keys one server holds: each key's state by key, the optimizers that step them, the bytes they take and the
optimizer as rank 0 declared it. INIT and SEED add to it; nothing removes from it."""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from zps.protocol.config import JobConfig
from zps.protocol.messages import ErrorCode, KeyEntry, ProtocolError

from .store import KeyState, Optimizers


class Keys:
    """The key table of one server (``job``: its caps)."""

    def __init__(self, job: JobConfig) -> None:
        self.job = job
        self.states: dict[int, KeyState] = {}
        self.optimizers = Optimizers()
        self.bytes = 0  # float32 bytes of the keys declared here (the cap --max-server-bytes)
        self.optimizer: tuple[str, list[dict[str, Any]]] | None = None  # as rank 0 declared it (or a seed named it)
        self.model: tuple[list[Any], int] | None = None  # the first declared model's signature, and whose it was

    def __len__(self) -> int:
        return len(self.states)

    def __contains__(self, key: object) -> bool:
        return key in self.states

    def __getitem__(self, key: int) -> KeyState:
        return self.states[key]

    def __iter__(self) -> Iterator[int]:
        return iter(self.states)

    def get(self, key: int) -> KeyState | None:
        return self.states.get(key)

    def values(self) -> Iterator[KeyState]:
        return iter(self.states.values())

    def of(self, entry: KeyEntry, initialized: bool = True) -> KeyState:
        """The state of ``entry``'s key: UNKNOWN_KEY when it was never declared, NOT_INITIALIZED when it must have
        values and has none yet."""
        key = entry["key"]
        state = self.states.get(key)
        if state is None:
            raise ProtocolError(ErrorCode.UNKNOWN_KEY, f"key {key} was never declared (INIT it first)")
        if initialized and state.param is None:
            raise ProtocolError(ErrorCode.NOT_INITIALIZED, f"{state.label()} has no values yet: rank 0 must INIT it")
        return state

    def check_room(self, new_keys: int, new_bytes: int, what: str = "") -> None:
        """TOO_LARGE unless ``new_keys`` more keys of ``new_bytes`` fit under --max-keys and --max-server-bytes."""
        job = self.job
        if len(self.states) + new_keys > job.max_keys:
            raise ProtocolError(ErrorCode.TOO_LARGE, f"{what}this server would hold more than {job.max_keys} keys "
                                                     "(the cap: --max-keys)")
        if self.bytes + new_bytes > job.max_server_bytes:
            raise ProtocolError(ErrorCode.TOO_LARGE, f"{what}this server would hold more than "
                                                     f"{job.max_server_bytes} bytes of parameters (the cap: "
                                                     "--max-server-bytes)")

    def check_model(self, signature: list[Any] | None, worker: int) -> None:
        """CONFLICT when ``worker`` declares a model other than the one declared first (its number of tensors and
        digest of names, shapes and groups: zps.protocol.bodies.model_signature)."""
        if signature is None or self.model is None or self.model[0] == signature:
            return
        first, whose = self.model
        raise ProtocolError(ErrorCode.CONFLICT, f"worker {worker} declares a model of {signature[0]} tensors "
                                                f"(digest {signature[1]}), worker {whose} declared one of {first[0]} "
                                                f"(digest {first[1]}): every worker must build the same model, with "
                                                "the same names, shapes and optimizer groups")

    def add(self, state: KeyState) -> KeyState:
        """Hold ``state`` (a key new here)."""
        self.states[state.key] = state
        self.bytes += 4 * state.numel
        return state

    def optimizer_state(self, state: KeyState) -> dict[str, torch.Tensor]:
        """The torch.optim state of ``state``'s values (empty before its first step)."""
        assert state.param is not None
        return self.optimizers.by_group[state.group].state.get(state.param, {})

    def optimizer_bytes(self) -> int:
        """The bytes of every torch.optim state tensor (costly: measured now and then, not counted)."""
        total = 0
        for optimizer in list(self.optimizers.by_group.values()):
            for state in optimizer.state.values():
                total += sum(t.numel() * t.element_size() for t in state.values() if isinstance(t, torch.Tensor))
        return total
