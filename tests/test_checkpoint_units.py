"""The checkpoint format on its own: atomic parts, the manifest last, finding the newest, refusing damage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from zps.protocol import checkpoint as ckpt
from zps.protocol.config import ConfigError, JobConfig, parse_every

pytestmark = pytest.mark.unit


def write_checkpoint(root: Path, step: int, value: float = 1.0) -> Path:
    """A complete two-part checkpoint: one server part, one worker part, the manifest."""
    where = ckpt.directory(root, step)
    size = ckpt.save_part(
        where / "server-0.safetensors", {"0.param": torch.full((4,), value)}, {"checkpoint": step, "keys": []}
    )
    wsize = ckpt.save_part(where / "worker-0.safetensors", {}, {"checkpoint": step, "steps": step})
    body = ckpt.manifest_body(
        step,
        {"mode": "bsp"},
        [{"rank": 0, "file": "server-0.safetensors", "size": size}],
        [{"rank": 0, "file": "worker-0.safetensors", "size": wsize, "step": step}],
    )
    ckpt.write_json(where / ckpt.MANIFEST, body)
    return where


def test_a_part_round_trips_its_tensors_and_meta_and_reads_slices(tmp_path: Path) -> None:
    values = torch.arange(10, dtype=torch.float32)
    size = ckpt.save_part(tmp_path / "p.safetensors", {"a": values, "s": torch.tensor(3.0)}, {"k": [1, "x"]})
    part = ckpt.Part(tmp_path / "p.safetensors", size)
    assert part.meta == {"k": [1, "x"]} and part.names == {"a", "s"}
    assert torch.equal(part.tensor("a"), values) and torch.equal(part.tensor("a", 3, 7), values[3:7])
    assert part.tensor("s").dim() == 0
    assert [p.name for p in tmp_path.iterdir()] == ["p.safetensors"]  # no temporary file left behind


def test_a_part_is_a_file_safetensors_itself_reads_as_it_writes_them(tmp_path: Path) -> None:
    """save_part streams the safetensors format itself; safetensors' own reader must see exactly the tensors, and
    its own writer's file of the same tensors must hold the same ones."""
    from safetensors.torch import load_file, save_file

    g = torch.Generator().manual_seed(0)
    tensors = {"f32": torch.randn(3, 5, generator=g), "scalar": torch.tensor(7.0), "empty": torch.zeros(0),
               "bf16": torch.randn(9, generator=g).to(torch.bfloat16), "f16": torch.randn(4, generator=g).half(),
               "i64": torch.arange(6).reshape(2, 3), "u8": torch.arange(5, dtype=torch.uint8),
               "flags": torch.tensor([True, False, True]), "f64": torch.randn(2, generator=g).double(),
               "strided": torch.randn(4, 6, generator=g)[:, ::2]}
    ckpt.save_part(tmp_path / "mine.safetensors", tensors, {"x": 1})
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / "theirs.safetensors"))
    for name in ("mine", "theirs"):
        loaded = load_file(str(tmp_path / f"{name}.safetensors"))
        assert loaded.keys() == tensors.keys()
        for key, tensor in tensors.items():
            assert loaded[key].dtype == tensor.dtype and loaded[key].shape == tensor.shape, key
            assert torch.equal(loaded[key], tensor), key
    with pytest.raises(ValueError, match="complex64"):
        ckpt.save_part(tmp_path / "bad.safetensors", {"c": torch.zeros(2, dtype=torch.complex64)}, {})


def test_a_streamed_part_is_the_same_file_whatever_order_its_tensors_come_in(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    tensors = {"0.param": torch.randn(7), "0.state.step": torch.tensor(3.0), "1.param": torch.randn(2, 3).half()}
    layout = [(name, t.dtype, tuple(t.shape)) for name, t in tensors.items()]
    writer = ckpt.PartWriter(tmp_path / "s.safetensors", layout, meta_reserve=200)
    for name in reversed(list(tensors)):
        writer.write(name, tensors[name])
    size = writer.finish({"checkpoint": 3, "keys": ["x" * 50]})
    part = ckpt.Part(tmp_path / "s.safetensors", size)
    assert part.meta == {"checkpoint": 3, "keys": ["x" * 50]}
    loaded = load_file(str(tmp_path / "s.safetensors"))
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items()) and loaded.keys() == tensors.keys()
    wrong = ckpt.PartWriter(tmp_path / "t.safetensors", layout, 10)
    with pytest.raises(ValueError, match="layout said"):
        wrong.write("0.param", torch.zeros(8))
    wrong.abort()
    short = ckpt.PartWriter(tmp_path / "u.safetensors", layout, 10)
    for name, tensor in tensors.items():
        short.write(name, tensor)
    with pytest.raises(ValueError, match="outgrew"):
        short.finish({"much": "y" * 500})
    missing = ckpt.PartWriter(tmp_path / "v.safetensors", layout, 100)
    with pytest.raises(ValueError, match="never written"):
        missing.finish({})
    assert [p.name for p in tmp_path.iterdir()] == ["s.safetensors"]  # the failed ones left nothing behind


def test_the_newest_complete_checkpoint_is_found_and_an_incomplete_one_never_is(tmp_path: Path) -> None:
    write_checkpoint(tmp_path, 10)
    write_checkpoint(tmp_path, 20)
    partial = ckpt.directory(tmp_path, 30)  # a crash mid-checkpoint: a part, no manifest
    ckpt.save_part(partial / "server-0.safetensors", {"0.param": torch.zeros(4)}, {})
    (partial / ".worker-0.safetensors.abc.tmp").write_bytes(b"half a file")
    assert ckpt.resolve(tmp_path).checkpoint == 20
    with pytest.raises(ckpt.CheckpointError, match="MANIFEST.json does not exist"):
        ckpt.read_manifest(partial)
    ckpt.prune(tmp_path, keep=1, newest=20)
    assert [p.name for p in ckpt.complete(tmp_path)] == ["ckpt-000000020"]
    assert partial.exists()  # newer than the newest complete one: it may still be being written


def test_prune_drops_incomplete_checkpoints_older_than_the_newest(tmp_path: Path) -> None:
    stale = ckpt.directory(tmp_path, 5)
    stale.mkdir(parents=True)
    write_checkpoint(tmp_path, 10)
    ckpt.prune(tmp_path, keep=3, newest=10)
    assert not stale.exists() and ckpt.resolve(tmp_path).checkpoint == 10


@pytest.mark.parametrize(
    "damage, words",
    [
        (lambda p: p.write_bytes(p.read_bytes()[:-3]), "truncated or replaced"),
        (lambda p: p.unlink(), "is missing"),
    ],
)
def test_a_damaged_part_is_refused_naming_the_file(tmp_path: Path, damage, words: str) -> None:
    where = write_checkpoint(tmp_path, 10)
    damage(where / "server-0.safetensors")
    with pytest.raises(ckpt.CheckpointError) as info:
        ckpt.resolve(tmp_path)
    assert "server-0.safetensors" in str(info.value) and words in str(info.value)


def test_a_part_that_is_not_safetensors_is_refused_naming_it(tmp_path: Path) -> None:
    where = write_checkpoint(tmp_path, 10)
    part = where / "server-0.safetensors"
    garbage = b"\xff" * part.stat().st_size  # the right size, the wrong bytes
    part.write_bytes(garbage)
    with pytest.raises(ckpt.CheckpointError, match="not a readable zps checkpoint part"):
        ckpt.resolve(tmp_path).part("server", 0)


def test_a_manifest_of_another_format_is_refused(tmp_path: Path) -> None:
    where = write_checkpoint(tmp_path, 10)
    body = json.loads((where / ckpt.MANIFEST).read_text())
    (where / ckpt.MANIFEST).write_text(json.dumps({**body, "format": 99}))
    with pytest.raises(ckpt.CheckpointError, match="format 99"):
        ckpt.read_manifest(where)


def test_checkpoint_settings_check_themselves() -> None:
    assert parse_every("100") == ("steps", 100) and parse_every("30s") == ("seconds", 30.0)
    assert JobConfig(checkpoint_dir="/c").checkpoint_interval() == ("seconds", 300.0)
    for settings, words in [
        ({"checkpoint_every": "10"}, "needs ZPS_CHECKPOINT_DIR"),
        ({"checkpoint_dir": "/c", "checkpoint_every": "ten"}, "neither a number of steps"),
        ({"resume": "latest"}, "needs ZPS_CHECKPOINT_DIR"),
        ({"on_worker_failure": "restart"}, "needs ZPS_MAX_RESTARTS"),
    ]:
        with pytest.raises(ConfigError, match=words):
            JobConfig(**settings)  # type: ignore[arg-type]
