"""Checkpoint directories that trust no one (issue 22, finding 5): a job never writes where another user's link
points, never loads a checkpoint another user could have written, and refuses a damaged or doctored one -- path
traversal, absolute paths, damaged headers, wrong-length tensors, impossible versions -- in the launcher, before
anything starts. The other user's files are made by chown, so these tests need root."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from zps.protocol import checkpoint as ckpt

from .helpers import ROOT, finish, start, tagged_pids

pytestmark = [pytest.mark.cluster,
              pytest.mark.skipif(os.getuid() != 0, reason="another user's files need root to make (chown)")]

SCRIPT = str(ROOT / "tests" / "scripts" / "train_steps.py")
JOB = ["run", "--progress", "off", "--servers", "1", "--workers", "1"]
STRANGER = 54321  # a uid of nobody here: another local user


def chown_tree(path: Path, uid: int) -> None:
    os.lchown(path, uid, uid)
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            os.lchown(os.path.join(root, name), uid, uid)


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """A 1777 checkpoint directory where another user planted ``ckpt-000000005 -> victim`` before a root job that
    checkpoints every 5 steps ran there: (the directory, the victim directory, the job's output)."""
    base = tmp_path_factory.mktemp("trust")
    root, victim = base / "shared", base / "victim"
    root.mkdir()
    victim.mkdir()
    os.chmod(root, 0o1777)
    planted = ckpt.directory(root, 5)
    os.symlink(victim, planted)
    os.lchown(planted, STRANGER, STRANGER)
    tag = f"trust-{os.getpid()}"
    code, text = finish(start(tag, [*JOB, "--checkpoint-dir", str(root), "--checkpoint-every", "5", SCRIPT,
                                    "--steps", "10"]), timeout=180)
    assert code == 0, text
    return root, victim, text


def test_a_job_never_writes_where_another_users_link_points(shared: tuple[Path, Path, str]) -> None:
    root, victim, text = shared
    assert list(victim.iterdir()) == []  # before: the manifest and every part went there
    assert "checkpoint 5" in text and "is a link" in text, text  # the skipped checkpoint is said, loudly
    assert ckpt.resolve(root).checkpoint == 10  # the next one was written as ever


def _copy(shared: tuple[Path, Path, str], tmp_path: Path) -> Path:
    copy = tmp_path / "ckpt"
    copy.mkdir()
    shutil.copytree(ckpt.directory(shared[0], 10), ckpt.directory(copy, 10))
    return ckpt.directory(copy, 10)


def _manifest(path: Path, change: Callable[[dict[str, Any]], None]) -> None:
    body = json.loads((path / ckpt.MANIFEST).read_text())
    change(body)
    (path / ckpt.MANIFEST).write_text(json.dumps(body))


def _rewrite_part(path: Path, change: Callable[[dict[str, Any], dict[str, Any]], None]) -> None:
    """Doctor the server part's header (its JSON and its zps metadata) and record the result in the manifest with
    its new size and a valid hash: only the launcher's checks of what a part says can catch it."""
    part = path / "server-0.safetensors"
    raw = part.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + length])
    meta = json.loads(header["__metadata__"]["zps"])
    change(header, meta)
    header["__metadata__"]["zps"] = json.dumps(meta)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    data = len(head).to_bytes(8, "little") + head + raw[8 + length:]
    part.write_bytes(data)

    def record(body: dict[str, Any]) -> None:
        body["servers"][0].update(size=len(data), sha256=hashlib.sha256(data).hexdigest())

    _manifest(path, record)


def _refused(path: Path, *needles: str) -> str:
    with pytest.raises(ckpt.CheckpointError) as info:
        ckpt.verify(ckpt.resolve(path.parent))
    text = str(info.value)
    assert all(n in text for n in needles), text
    return text


def test_a_checkpoint_another_user_planted_is_refused_before_anything_starts(
        shared: tuple[Path, Path, str], tmp_path: Path, tag: str) -> None:
    path = _copy(shared, tmp_path)
    planted = ckpt.directory(path.parent, 20)
    shutil.copytree(path, planted)
    chown_tree(planted, STRANGER)
    assert ckpt.complete(path.parent) == [path]  # not a checkpoint of this user's
    with pytest.raises(ckpt.CheckpointError, match="belongs to another user"):
        ckpt.resolve(path.parent)
    started = time.monotonic()
    code, text = finish(start(tag, [*JOB, "--checkpoint-dir", str(path.parent), "--resume", "latest", SCRIPT]),
                        timeout=60)
    assert code == 2 and "belongs to another user" in text and "nothing was started" in text, text
    assert "[server" not in text and tagged_pids(tag) == [] and time.monotonic() - started < 30


@pytest.mark.parametrize("file", ["../../../../etc/passwd", "/etc/shadow", "worker-0.safetensors"])
def test_a_manifest_names_its_parts_by_their_plain_names_only(
        shared: tuple[Path, Path, str], tmp_path: Path, file: str) -> None:
    path = _copy(shared, tmp_path)
    _manifest(path, lambda body: body["servers"][0].update(file=file))
    text = _refused(path, "must be the file 'server-0.safetensors'")
    assert "bytes" not in text  # no file-size oracle: /etc/shadow's size was told


def test_a_damaged_part_is_refused_by_its_hash_before_anything_starts(shared: tuple[Path, Path, str],
                                                                       tmp_path: Path, tag: str) -> None:
    path = _copy(shared, tmp_path)
    part = path / "server-0.safetensors"
    raw = bytearray(part.read_bytes())
    raw[20:24] = b"XXXX"  # the header, the same size
    part.write_bytes(bytes(raw))
    _refused(path, "server-0.safetensors", "SHA-256")
    code, text = finish(start(tag, [*JOB, "--resume", str(path), SCRIPT]), timeout=60)
    assert code == 2 and "SHA-256" in text and "nothing was started" in text and "[server" not in text, text


def _first_key(meta: dict[str, Any]) -> dict[str, Any]:
    return meta["keys"][0]


@pytest.mark.parametrize(("change", "needle"), [
    (lambda h, m: _first_key(m).update(version=1 << 62), "'version' in [0, 9007199254740992]"),
    (lambda h, m: _first_key(m).update(version=-1000), "'version' in [0, 9007199254740992]"),
    (lambda h, m: m.update(clocks={"0": -5}), "'clocks'"),
    (lambda h, m: h[f"{_first_key(m)['key']}.param"].update(shape=[3]), "takes"),  # a wrong-length tensor
    (lambda h, m: _first_key(m).update(numel=_first_key(m)["numel"] + 1), "not the"),
    (lambda h, m: _first_key(m).update(state=["nosuch"]), "'nosuch' is not in the part"),
])
def test_a_part_whose_metadata_is_impossible_is_refused_before_anything_starts(
        shared: tuple[Path, Path, str], tmp_path: Path, change: Callable[[dict[str, Any], dict[str, Any]], None],
        needle: str) -> None:
    path = _copy(shared, tmp_path)
    _rewrite_part(path, change)
    _refused(path, "server-0.safetensors", needle)


def test_the_untouched_copy_verifies(shared: tuple[Path, Path, str], tmp_path: Path) -> None:
    path = _copy(shared, tmp_path)
    manifest = ckpt.resolve(path.parent)
    ckpt.verify(manifest)
    assert all("sha256" in e for e in manifest.body["servers"] + manifest.body["workers"])
