"""examples/lm.py: the model's size, the text it reads (the standard library's sources only, deterministically),
and (slow tier) a short `zps run` that learns more than the most common byte."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

from .helpers import ROOT, finish, start, wait_for_no_tagged


def _lm() -> ModuleType:
    spec = importlib.util.spec_from_file_location("lm_example", ROOT / "examples" / "lm.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


lm = _lm()
STDLIB = Path(sysconfig.get_paths()["stdlib"])


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """One intra-op thread: on the shared 2-core machine, torch's default of 2 is many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class _Constant(torch.nn.Module):
    """Predicts the same byte everywhere."""

    def __init__(self, byte: int) -> None:
        super().__init__()
        self.byte = byte

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.one_hot(torch.full_like(x, self.byte), lm.VOCAB).float()


@pytest.mark.unit
def test_the_model_has_at_least_2m_parameters_in_100_tensors_and_every_one_gets_a_gradient() -> None:
    torch.manual_seed(0)
    model = lm.make_model()
    tensors = list(model.parameters())
    assert sum(p.numel() for p in tensors) >= 2_000_000
    assert len(tensors) >= 100
    x, y, loss_fn = lm.example_batch(2)
    logits = model(x)
    assert logits.shape == (2, lm.CONTEXT, lm.VOCAB)
    loss_fn(logits, y).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in tensors)  # every key is pushed


@pytest.mark.unit
def test_the_text_is_the_stdlib_sources_in_sorted_order_and_nothing_else(monkeypatch: pytest.MonkeyPatch) -> None:
    files = lm.stdlib_files()
    relative = [p.relative_to(STDLIB) for p in files]  # raises for a file outside the standard library
    assert relative == sorted(relative, key=lambda p: p.parts)
    assert all(p.suffix == ".py" and not {"site-packages", "test"} & set(p.parts) for p in relative)
    assert Path("os.py") in relative and Path("json", "__init__.py") in relative

    read: list[Path] = []
    read_bytes = pathlib.Path.read_bytes

    def recording(self: Path) -> bytes:
        read.append(self)
        return read_bytes(self)

    monkeypatch.setattr(pathlib.Path, "read_bytes", recording)
    budget = 300_000
    text = lm.load_text(budget)
    assert read == files[: len(read)]  # the first files, in order, and no others
    reference = b"".join(read_bytes(p) for p in files[: len(read)])[:budget]
    assert text.dtype == torch.uint8 and len(text) == budget
    assert bytes(text.numpy()) == reference
    assert torch.equal(lm.load_text(budget), text)  # the same every time


@pytest.mark.unit
def test_windows_pair_each_byte_with_the_next_and_the_held_out_accuracy_is_fixed() -> None:
    text = torch.arange(200, dtype=torch.uint8)
    x, y = lm.windows(text, torch.tensor([0, 7]), 5)
    assert x.tolist() == [[0, 1, 2, 3, 4], [7, 8, 9, 10, 11]]
    assert y.tolist() == [[1, 2, 3, 4, 5], [8, 9, 10, 11, 12]]
    train, held_out = lm.split(lm.load_text(100_000))
    assert len(train) + len(held_out) == 100_000 and len(held_out) == 5_000
    torch.manual_seed(0)
    model = lm.make_model()
    first = lm.accuracy(model, held_out, batches=1, batch=4)
    assert 0.0 <= first <= 1.0 and lm.accuracy(model, held_out, batches=1, batch=4) == first


@pytest.mark.slow
def test_a_short_run_learns_more_than_the_most_common_byte(tag: str, tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    script = ["examples/lm.py", "--steps", "40", "--eval-every", "20", "--out", str(out)]
    code, text = finish(start(tag, ["run", "--servers", "2", "--workers", "2", "--mode", "bsp", *script]), 600)
    assert code == 0, text
    result = json.loads(out.read_text())
    assert (result["steps"], result["workers"], result["servers"]) == (40, 2, 2)
    assert [point[0] for point in result["curve"]] == [20, 40]
    # the always-guess-the-most-common-byte (a space) baseline on the same held-out windows
    train, held_out = lm.split(lm.load_text())
    common = int(torch.bincount(train.long(), minlength=lm.VOCAB).argmax())
    baseline = lm.accuracy(_Constant(common), held_out)
    assert result["accuracy"] >= baseline + 0.05, (result, baseline)
    assert wait_for_no_tagged(tag, within=5) == []
