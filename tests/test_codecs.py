"""Codec library: round trips for every registered codec, per-codec guarantees, error feedback, the registry."""

from __future__ import annotations

import textwrap
import warnings
from typing import Any

import msgpack
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from zps.protocol.codecs import (
    Codec,
    CodecSpecError,
    Encoded,
    ErrorFeedback,
    available_codecs,
    codec_factory,
    make_codec,
    parse_codec_spec,
    register_codec,
    registry,
    sparse,
)
from zps.protocol.codecs.base import saturate_to
from zps.protocol.codecs.lowrank import matrix_shape
from zps.protocol.codecs.sparse import DgcCodec, hashed_indices, sampled_topk_indices, topk_indices

pytestmark = pytest.mark.unit

CODECS = available_codecs()
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SEEDED = {"qsgd", "terngrad", "topk", "randomk", "dgc", "topk_adam", "powersgd"}  # codecs that take a seed
FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def build(name: str, extra: str = "") -> Any:  # the concrete codec (tests read its state)
    """A codec by name, seeded when it takes a seed, with ``extra`` params."""
    params = [p for p in (extra, "seed=1" if name in SEEDED else "") if p]
    return make_codec(name + (":" + ",".join(params) if params else ""))


def round_trip(codec: Codec, x: torch.Tensor, dtype: torch.dtype | None = None) -> tuple[Encoded, torch.Tensor]:
    """Encode with ``codec``; decode with a fresh instance of its spec, as the server does."""
    encoded = codec.encode(x)
    decoder = make_codec(codec.spec())
    return encoded, decoder.decode(encoded, x.numel(), dtype or x.dtype, x.device)


def make_input(layout: str, rows: int, cols: int, dtype: torch.dtype, scale: float, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if layout == "contiguous":
        x = torch.randn(rows, cols, generator=gen)
    elif layout == "transposed":
        x = torch.randn(cols, rows, generator=gen).t()
    elif layout == "strided":
        x = torch.randn(rows, 2 * cols, generator=gen)[:, ::2]
    else:  # a 1-D strided view
        x = torch.randn(2 * rows * cols, generator=gen)[::2]
    return (x * scale).to(dtype)


# ---- round trips -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CODECS)
@FAST
@given(
    layout=st.sampled_from(["contiguous", "transposed", "strided", "flat-strided"]),
    rows=st.integers(0, 40),
    cols=st.integers(0, 70),
    dtype=st.sampled_from(DTYPES),
    scale=st.sampled_from([1e-3, 1.0, 300.0]),
    seed=st.integers(0, 2**31),
)
@example(layout="contiguous", rows=0, cols=5, dtype=torch.float32, scale=1.0, seed=0)  # empty
@example(layout="contiguous", rows=1, cols=1, dtype=torch.float16, scale=1.0, seed=0)  # one element
@example(layout="transposed", rows=7, cols=13, dtype=torch.bfloat16, scale=1.0, seed=0)  # odd, non-contiguous
@example(layout="flat-strided", rows=3, cols=37, dtype=torch.float32, scale=1e-3, seed=0)  # odd, strided 1-D
def test_round_trip(name, layout, rows, cols, dtype, scale, seed):
    x = make_input(layout, rows, cols, dtype, scale, seed)
    before = x.clone()
    codec = build(name)
    encoded, y = round_trip(codec, x)
    assert torch.equal(x, before), "encode must not modify its input"
    assert y.shape == (x.numel(),) and y.dtype == dtype and y.device == x.device
    assert torch.isfinite(y).all()
    for buf in encoded.buffers:
        assert buf.dim() == 1 and buf.is_contiguous()
    if codec.exact:
        assert torch.equal(y, x.reshape(-1))
    # decoding into another dtype is the same decode, converted (saturating: float16 never overflows to inf)
    y32 = make_codec(codec.spec()).decode(encoded, x.numel(), torch.float32, "cpu")
    assert torch.equal(y, saturate_to(y32, dtype))
    # the result never aliases the buffers (they may be read-only wire frames)
    saved = [b.clone() for b in encoded.buffers]
    y.add_(1)
    assert all(torch.equal(a, b) for a, b in zip(saved, encoded.buffers, strict=False))


def over_the_wire(encoded: Encoded) -> Encoded:
    """What the receiver rebuilds: meta through msgpack, each buffer from read-only bytes of its dtype."""
    meta = msgpack.unpackb(msgpack.packb(encoded.meta))
    buffers = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch warns that the bytes are not writable
        for b in encoded.buffers:
            raw = bytes(b.view(torch.uint8).numpy()) if b.numel() else b""
            buffers.append(torch.frombuffer(raw, dtype=b.dtype) if raw else torch.empty(0, dtype=b.dtype))
    return Encoded(meta, buffers)


@pytest.mark.parametrize("name", CODECS)
def test_decode_from_wire_frames(name):
    for numel in (0, 1, 4099):
        x = torch.randn(numel)
        codec = build(name)
        encoded = codec.encode(x)
        direct = make_codec(codec.spec()).decode(encoded, numel, torch.float32, "cpu")
        received = over_the_wire(encoded)
        assert received.meta == encoded.meta
        assert torch.equal(make_codec(codec.spec()).decode(received, numel, torch.float32, "cpu"), direct)


# relative L2 error allowed on 1M standard normal values (float32), for codecs that promise one
MAX_REL_ERR = {
    "none": 0.0,
    "fp16": 1e-3,
    "bf16": 5e-3,
    "int8": 0.02,
    "qsgd": 0.1,
    "onebit": 0.65,
    "topk": 1.0,
    "dgc": 1.0,
    "powersgd": 1.0,
}  # (topk_adam sends Adam directions, not the gradient: no error bound on the gradient)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", CODECS)
def test_large(name, dtype):
    torch.manual_seed(0)
    x = torch.randn(1_000_003).to(dtype)
    _, y = round_trip(build(name), x)
    assert y.shape == (x.numel(),) and y.dtype == dtype and torch.isfinite(y).all()
    if name in MAX_REL_ERR:
        rel = (y.float() - x.float()).norm() / x.float().norm()
        assert rel <= MAX_REL_ERR[name] + 1e-6, f"{name}: relative error {rel:.4f}"


# ---- what each codec promises ------------------------------------------------------------------------------


def test_casts_round_to_nearest_and_fp16_saturates():
    x = torch.tensor([1.0, 1 / 3, -2.5e-3, 7e4, -1e6, float("inf")])
    _, y = round_trip(build("fp16"), x)
    assert torch.equal(y[:3], x[:3].half().float())
    assert y[3:].tolist() == [65504.0, -65504.0, 65504.0]
    _, y = round_trip(build("bf16"), x)
    assert torch.equal(y, x.bfloat16().float())


def test_int8_error_is_half_a_step_per_chunk():
    torch.manual_seed(0)
    x = torch.randn(10_000) * torch.linspace(0.01, 100, 10_000)
    encoded, y = round_trip(build("int8", "chunk=1000"), x)
    steps = x.view(10, 1000).abs().amax(1) / 127
    assert encoded.buffers[1].numel() == 10
    assert ((y - x).view(10, 1000).abs() <= steps[:, None] / 2 * 1.0001 + 1e-12).all()


def test_qsgd_levels_are_multiples_of_the_bucket_norm():
    torch.manual_seed(0)
    x = torch.randn(1000)
    for levels, bits in ((4, 4), (100, 8)):
        encoded, y = round_trip(build("qsgd", f"levels={levels},bucket=100"), x)
        assert encoded.meta["bits"] == bits
        step = x.view(10, 100).norm(dim=1)[:, None] / levels
        units = y.view(10, 100) / step
        assert torch.allclose(units, units.round(), atol=1e-3)
        assert ((y - x).view(10, 100).abs() <= step * 1.0001).all()


@pytest.mark.parametrize("spec, flagged", [
    ("qsgd:levels=7,seed=1", True), ("qsgd:levels=7,bucket=32,seed=1", False), ("qsgd:seed=1", False),
    ("randomk:ratio=0.25,seed=1", True), ("randomk:ratio=0.25,scale=false,seed=1", False), ("int8", False),
])
def test_codecs_say_when_error_feedback_would_diverge_and_that_is_when_they_lose_more_than_they_send(spec, flagged):
    torch.manual_seed(0)
    x = torch.rand(64 * 512).add_(0.5) * torch.randn(64 * 512).sign()  # dense, even magnitudes: the worst case
    codec = make_codec(spec)
    lost = float((codec.decode(codec.encode(x), x.numel(), torch.float32, "cpu") - x).norm() / x.norm())
    assert (codec.feedback_problem() is not None) == flagged
    assert (lost > 1) == flagged, lost
    if flagged:  # (the LM diverged with either as its pull codec)
        with pytest.raises(ValueError, match=f"error feedback around codec '{spec.split(':')[0]}.*would not converge"):
            ErrorFeedback(codec)
    else:
        ErrorFeedback(codec)


def test_terngrad_is_ternary_with_the_max_as_scale():
    torch.manual_seed(0)
    x = torch.randn(999)
    _, y = round_trip(build("terngrad"), x)
    s = x.abs().max()
    assert set(torch.unique(y / s).tolist()) <= {-1.0, 0.0, 1.0}
    assert ((y == 0) | (torch.sign(y) == torch.sign(x))).all()


def test_onebit_keeps_signs_and_group_means():
    x = torch.tensor([3.0, -1.0, 1.0, -2.0, 0.0, -3.0, 5.0])
    _, y = round_trip(build("onebit"), x)
    assert y.tolist() == [2.25, -2.0, 2.25, -2.0, 2.25, -2.0, 2.25]


@pytest.mark.parametrize("numel", [1000, 200_000, 1_000_000])
def test_topk_is_exact_top_k(numel):
    torch.manual_seed(1)
    x = torch.randn(numel)
    encoded, y = round_trip(build("topk", "ratio=0.01"), x)
    values, indices = encoded.buffers
    k = numel // 100
    assert indices.dtype == torch.int32 and values.numel() == k
    assert torch.equal(indices.long(), torch.topk(x.abs(), k).indices.sort().values)
    assert torch.equal(y[indices.long()], x[indices.long()]) and torch.count_nonzero(y) == k


@pytest.mark.parametrize("overshoot", [0.5, 1e-6])  # a too-high sampled threshold: retry, then fall back
def test_topk_sampled_threshold_recovers(monkeypatch, overshoot):
    monkeypatch.setattr(sparse, "_OVERSHOOT", overshoot)
    torch.manual_seed(2)
    a = torch.randn(300_000).abs()
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(sampled_topk_indices(a, 3000, gen), torch.topk(a, 3000).indices.sort().values)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64, torch.bfloat16])
def test_topk_indices_on_the_cpu_are_torch_topks(dtype):
    torch.manual_seed(3)
    a = torch.randn(70_000).abs().to(dtype)
    a[:10] = float("nan")  # torch.topk ranks NaN highest; so does numpy's selection
    gen = torch.Generator().manual_seed(0)
    for k in (1, 700, 69_999):  # ties (the NaNs; float16 values) may pick other positions: compare the values
        got = topk_indices(a, k, gen)
        assert got.dtype == torch.int64 and bool((got[1:] > got[:-1]).all())  # ascending, distinct
        want = a[torch.topk(a, k).indices].sort().values
        torch.testing.assert_close(a[got].sort().values, want, atol=0, rtol=0, equal_nan=True)


def test_randomk_indices_replay_from_the_seed():
    torch.manual_seed(0)
    x = torch.randn(5000)
    encoded, y = round_trip(build("randomk", "ratio=0.1,scale=false"), x)
    idx = hashed_indices(encoded.meta["seed"], 500, 5000, "cpu")
    assert len(encoded.buffers) == 1 and torch.equal(encoded.buffers[0], x[idx])
    expected = torch.zeros(5000).index_add_(0, idx, x[idx])
    assert torch.equal(y, expected)
    assert not torch.equal(idx, hashed_indices(encoded.meta["seed"] + 1, 500, 5000, "cpu"))


def test_hashed_indices_are_uniform():
    counts = torch.bincount(hashed_indices(12345, 200_000, 100, "cpu"), minlength=100).double()
    chi2 = ((counts - 2000) ** 2 / 2000).sum().item()  # 99 degrees of freedom: mean 99, sd 14
    assert chi2 < 99 + 6 * 14


def test_dgc_warmup_and_momentum_masking():
    codec = build("dgc", "ratio=0.01,warmup_steps=4,momentum=0.5")
    densities = [codec.density(s) for s in range(6)]
    assert densities[0] == 0.25 and densities[4:] == [0.01, 0.01]
    assert all(a > b for a, b in zip(densities[:4], densities[1:5], strict=False))
    torch.manual_seed(0)
    g = torch.randn(2000)
    encoded = codec.encode(g)
    assert encoded.buffers[0].numel() == 500 and encoded.meta["density"] == 0.25
    sent = encoded.buffers[1].long()
    assert (codec.u[sent] == 0).all() and (codec.v[sent] == 0).all()
    assert codec.encode(g).meta["step"] == 1
    with pytest.raises(ValueError, match="one instance per key"):
        codec.encode(torch.randn(10))


def test_topk_adam_sends_what_local_adam_would_and_keeps_the_rest():
    """ratio=1: each call sends exactly torch.optim.Adam's step direction for the same gradients (its update divided
    by -lr); a sparse one sends part of it and keeps the rest for later (mass conserved)."""
    torch.manual_seed(0)
    grads = [torch.randn(1000) for _ in range(5)]
    param = torch.zeros(1000, requires_grad=True)
    adam = torch.optim.Adam([param], lr=1.0, eps=1e-8)
    dense = build("topk_adam", "ratio=1")
    for g in grads:
        before = param.detach().clone()
        param.grad = g.clone()
        adam.step()
        sent = dense.decode(dense.encode(g), 1000, torch.float32, "cpu")
        torch.testing.assert_close(sent, before - param.detach(), atol=1e-6, rtol=1e-5)
    sparse, total = build("topk_adam", "ratio=0.05,beta1=0,beta2=0"), torch.zeros(1000)
    directions = torch.zeros(1000)
    for g in grads:  # beta1 = beta2 = 0: the direction is g / (|g| + eps), about sign(g)
        directions += g / (g.abs() + 1e-8)
        encoded = sparse.encode(g)
        assert len(encoded.buffers[0]) == 50
        total += sparse.decode(encoded, 1000, torch.float32, "cpu")
    assert sparse.v is not None
    torch.testing.assert_close(total + sparse.v, directions, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="beta2 must be in"):
        build("topk_adam", "beta2=1")


def test_dgc_without_momentum_conserves_mass_and_clips():
    torch.manual_seed(0)
    codec = build("dgc", "ratio=0.05,momentum=0")
    total, sent = torch.zeros(3000, dtype=torch.float64), torch.zeros(3000, dtype=torch.float64)
    for _ in range(10):
        g = torch.randn(3000)
        total += g.double()
        sent += round_trip(codec, g)[1].double()
    assert torch.allclose(sent + codec.v.double(), total, atol=1e-4)
    clipped = build("dgc", "ratio=1.0,momentum=0,clip=1.0")
    _, y = round_trip(clipped, torch.full((100,), 10.0))
    assert abs(y.norm().item() - 1.0) < 1e-4


def test_powersgd_recovers_low_rank_and_warm_start_helps():
    torch.manual_seed(0)
    m = torch.randn(64, 1) @ torch.randn(1, 48)  # rank 1 < rank 2: one step is exact
    encoded, y = round_trip(build("powersgd"), m)
    assert encoded.meta["rows"] == 64 and encoded.nbytes == 4 * 2 * (64 + 48)
    assert torch.allclose(y, m.reshape(-1), atol=1e-4)
    # decaying spectrum: repeated pushes of one matrix refine the warm-started subspace
    u, _ = torch.linalg.qr(torch.randn(100, 100))
    v, _ = torch.linalg.qr(torch.randn(80, 80))
    m = (u[:, :80] * torch.logspace(0, -3, 80)) @ v.t()
    codec = build("powersgd")
    errors = [(round_trip(codec, m)[1] - m.reshape(-1)).norm().item() for _ in range(6)]
    best = torch.linalg.svdvals(m)[2:].norm().item()
    assert errors[-1] < errors[0] and errors[-1] < 1.05 * best


def test_powersgd_shapes_and_raw_fallback():
    assert matrix_shape(torch.zeros(25_000_000), 2) == (5000, 5000)
    shape = matrix_shape(torch.zeros(100_003), 2)  # a prime: padded near-square
    assert shape is not None
    rows, cols = shape
    assert rows * cols >= 100_003 and rows * cols - 100_003 < rows and abs(rows - cols) <= 1
    assert matrix_shape(torch.zeros(1, 4096), 2) == (64, 64)
    assert matrix_shape(torch.zeros(10), 2) is None
    encoded, y = round_trip(build("powersgd"), torch.arange(10.0))
    assert encoded.meta == {"raw": True} and torch.equal(y, torch.arange(10.0))


# ---- unbiasedness ------------------------------------------------------------------------------------------


def bias_statistic(spec: str, trials: int = 200, numel: int = 2000) -> float:
    """``||mean of decodes - x||^2 / (MSE of one decode / trials)``: about 1 for an unbiased codec (the error of
    the mean shrinks like 1/sqrt(trials)); about ``trials`` for a deterministic biased one."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(numel, generator=gen) * torch.randn(numel, generator=gen).exp()
    x[::17] = 0.0
    codec, decoder = make_codec(spec), make_codec(spec)
    total = torch.zeros(numel, dtype=torch.float64)
    sq_err = 0.0
    for _ in range(trials):
        y = decoder.decode(codec.encode(x), numel, torch.float32, "cpu").double()
        total += y
        sq_err += ((y - x.double()) ** 2).sum().item()
    mean = total / trials
    return ((mean - x.double()) ** 2).sum().item() / (sq_err / trials / trials)


UNBIASED = [n + ":seed=3" for n in CODECS if build(n).unbiased] + [
    "qsgd:levels=2,bucket=64,seed=4",
    "terngrad:bucket=100,seed=5",
    "randomk:ratio=0.3,seed=6",
]


@pytest.mark.parametrize("spec", UNBIASED)
def test_unbiased_codecs_average_to_the_input(spec):
    assert make_codec(spec).unbiased
    assert bias_statistic(spec) < 1.5  # mean 1, sd ~ sqrt(2 / numel): a generous bound


def test_bias_statistic_detects_bias():
    assert not make_codec("onebit").unbiased and bias_statistic("onebit", trials=50) > 10
    assert not make_codec("randomk:scale=false").unbiased
    assert bias_statistic("randomk:scale=false,seed=1", trials=50) > 10


def test_unbiased_flags():
    assert {n for n in CODECS if build(n).unbiased} == {"qsgd", "terngrad", "randomk"}
    assert {n for n in CODECS if build(n).exact} == {"none", "nonzero"}
    assert {n for n in CODECS if build(n).stateful} == {"dgc", "topk_adam", "powersgd"}


# ---- error feedback ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec",
    [
        "topk:ratio=0.05",
        "onebit",
        "int8:chunk=256",
        "randomk:ratio=0.2,scale=false,seed=1",
        "terngrad:seed=1",
        "qsgd:levels=4,bucket=8,seed=1",
        "powersgd:rank=1,seed=1",
        "fp16",
        "dgc:ratio=0.05",
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_error_feedback_conserves_mass(spec, dtype):
    torch.manual_seed(0)
    ef = ErrorFeedback(make_codec(spec))
    assert isinstance(ef, ErrorFeedback) and ef.spec() == make_codec(spec).spec()
    total = torch.zeros(4000, dtype=torch.float64)
    decoded = torch.zeros(4000, dtype=torch.float64)
    for step in range(12):
        g = (torch.randn(4000) * (1 + step)).to(dtype)
        total += g.double()
        decoded += round_trip(ef, g, torch.float32)[1].double()
    assert ef.residual is not None
    scale = max(total.abs().max(), decoded.abs().max(), ef.residual.abs().max()).item()
    assert torch.allclose(decoded + ef.residual.double(), total, atol=1e-5 * scale)


@pytest.mark.parametrize("spec", ["topk:ratio=0.05", "dgc:ratio=0.05,seed=1", "int8", "powersgd:rank=1,seed=1"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_error_feedback_matches_its_definition_bit_for_bit(spec, dtype):
    """Whatever path error feedback takes (the residual kept in place for codecs whose buffers are copies, or
    decoded and subtracted), every call sends what encoding ``x + residual`` sends and keeps exactly
    ``(x + residual) - decode(...)``; the caller's gradient is never written."""
    gen = torch.Generator().manual_seed(5)
    ef, inner = ErrorFeedback(make_codec(spec)), make_codec(spec)
    residual = torch.zeros(3000)
    for _ in range(5):
        g = torch.randn(60, 50, generator=gen).to(dtype)
        kept = g.clone()
        encoded = ef.encode(g)
        compensated = g.reshape(-1).float() + residual
        want = inner.encode(compensated.to(dtype))
        residual = compensated - inner.decode(want, 3000, torch.float32, "cpu")
        assert torch.equal(g, kept)
        assert encoded.meta == want.meta and len(encoded.buffers) == len(want.buffers)
        assert all(torch.equal(a, b) for a, b in zip(encoded.buffers, want.buffers, strict=True))
        assert ef.residual is not None and torch.equal(ef.residual, residual)


@pytest.mark.parametrize("spec", ["topk:ratio=0.01", "dgc:ratio=0.01", "randomk:ratio=0.01", "int8"])
def test_add_decoded_adds_what_decode_gives(spec):
    codec = build(spec.split(":")[0], spec.partition(":")[2])
    x, target = torch.randn(20_000), torch.randn(20_000)
    encoded = codec.encode(x)
    decoder = make_codec(codec.spec())
    decoded = decoder.decode(encoded, x.numel(), torch.float32, "cpu")
    for alpha in (1.0, -1.0):
        got = target.clone()
        decoder.add_decoded_(got, encoded, alpha=alpha)
        assert torch.equal(got, target + decoded if alpha == 1 else target - decoded)


def test_error_feedback_rescales_residual_on_lr_change():
    ef = ErrorFeedback(make_codec("topk:ratio=0.1"), lr=0.1)
    ef.encode(torch.arange(10.0))
    assert ef.residual is not None
    before = ef.residual.clone()
    ef.set_lr(0.1)
    assert torch.equal(ef.residual, before)
    ef.set_lr(0.05)  # a / b = 2: the parameter-space correction lr * residual is kept
    assert torch.allclose(ef.residual, before * 2) and ef.lr == 0.05
    with pytest.raises(ValueError, match="learning rate"):
        ef.set_lr(0)
    ef.reset()
    assert ef.residual is None
    with pytest.raises(TypeError):
        ErrorFeedback(ef)


# ---- packed sizes ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("numel", [1, 7, 8, 1001, 100_000])
def test_packed_sizes(numel):
    x = torch.randn(numel)
    chunks = -(-numel // 4096)
    assert build("onebit").encode(x).nbytes == -(-numel // 8) + 8
    assert build("terngrad").encode(x).nbytes == -(-numel // 4) + 4
    assert build("int8").encode(x).nbytes == numel + 4 * chunks
    assert build("qsgd", "levels=7").encode(x).nbytes == -(-numel // 2) + 4 * -(-numel // 512)
    assert build("fp16").encode(x).nbytes == build("bf16").encode(x).nbytes == 2 * numel
    k = max(1, numel // 100)
    assert build("topk").encode(x).nbytes == k * (4 + 4)
    assert build("randomk").encode(x).nbytes == k * 4


def test_none_does_not_copy_contiguous_input():
    x = torch.randn(100)
    assert make_codec("none").encode(x).buffers[0].data_ptr() == x.data_ptr()


# ---- decoders reject what does not fit ---------------------------------------------------------------------


@pytest.mark.parametrize("name", CODECS)
def test_decode_rejects_wrong_numel(name):
    codec = build(name)
    encoded = codec.encode(torch.randn(5000))
    with pytest.raises(ValueError):
        make_codec(codec.spec()).decode(encoded, 20_000, torch.float32, "cpu")


@pytest.mark.parametrize("density", [0.0, 0.01, 0.1, 0.5, 1.0])
def test_nonzero_sends_exactly_the_nonzero_elements_or_the_whole_tensor_when_smaller(density):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(10_000, generator=gen) * (torch.rand(10_000, generator=gen) < density)
    codec = make_codec("nonzero")
    encoded = codec.encode(x)
    nnz = int((x != 0).sum())
    if nnz * 8 < x.numel() * 4:
        assert encoded.meta == {"form": "sparse"} and encoded.nbytes == nnz * 8
    else:
        assert encoded.meta == {"form": "raw"} and encoded.nbytes == x.numel() * 4
    wire = over_the_wire(encoded)
    assert torch.equal(make_codec("nonzero").decode(wire, x.numel(), torch.float32, "cpu"), x)
    target = torch.randn(10_000, generator=gen)
    expected = target + x
    make_codec("nonzero").add_decoded_(target, wire)
    assert torch.equal(target, expected)
    for bad in ({"form": "dense"}, {}):
        with pytest.raises(ValueError, match="meta 'form'"):
            codec.decode(Encoded(bad, wire.buffers), x.numel(), torch.float32, "cpu")
    if nnz:  # more values than the tensor has elements
        with pytest.raises(ValueError, match="codec 'nonzero'"):
            codec.decode(wire, x.numel() - 1 if encoded.meta["form"] == "raw" else nnz - 1, torch.float32, "cpu")


def test_nonzero_warms_up_with_int8_then_sends_exact_changes_and_stays_sparse_under_error_feedback():
    """As a server's pull uses it: the change since the last pull, the view advanced by what the worker decodes.
    After the int8 warm-up, the first exact change carries int8's residual (dense, once); from then on a sparse
    change goes sparse and the worker holds the server's values exactly."""
    gen = torch.Generator().manual_seed(5)
    server = torch.randn(50_000, generator=gen)
    view = server.clone()
    worker = server.clone()
    codec, receiver = make_codec("nonzero:warmup=2"), make_codec("nonzero:warmup=2")
    assert codec.stateful and not codec.exact
    forms = []
    for step in range(6):
        moved = torch.rand(50_000, generator=gen) < (0.5 if step < 2 else 0.01)
        server -= 0.1 * torch.randn(50_000, generator=gen) * moved
        encoded = over_the_wire(codec.encode(server - view))
        codec.add_decoded_(view, encoded)
        receiver.add_decoded_(worker, encoded)
        forms.append(encoded.meta["form"])
        assert torch.equal(worker, view)
    assert forms == ["int8", "int8", "raw", "sparse", "sparse", "sparse"]
    torch.testing.assert_close(worker, server, atol=1e-6, rtol=0)  # (a + (b - a) may round: the next change has it)


def test_sparse_decode_rejects_bad_indices():
    bad = Encoded({}, [torch.ones(2), torch.tensor([0, 10], dtype=torch.int32)])
    with pytest.raises(ValueError, match="out of range"):
        make_codec("topk:ratio=0.2").decode(bad, 10, torch.float32, "cpu")
    target = torch.zeros(10)
    with pytest.raises(ValueError, match="out of range"):
        make_codec("topk:ratio=0.2").add_decoded_(target, bad)
    assert not target.any()


# ---- registry ----------------------------------------------------------------------------------------------


def test_expected_codecs_are_registered():
    assert set(CODECS) == {
        "none",
        "fp16",
        "bf16",
        "int8",
        "qsgd",
        "terngrad",
        "onebit",
        "topk",
        "randomk",
        "dgc",
        "topk_adam",
        "powersgd",
        "nonzero",
    }


def test_duplicate_registration_is_loud(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))

    class Again(Codec):
        name = "topk"

        def encode(self, tensor):
            raise NotImplementedError

        def decode(self, encoded, numel, dtype, device):
            raise NotImplementedError

    with pytest.raises(ValueError, match="'topk' is already registered"):
        register_codec(Again)
    Again.name = "again"
    assert register_codec(Again) is Again and register_codec(Again) is Again  # the same class again is fine
    assert "again" in available_codecs()
    with pytest.raises(TypeError):
        register_codec(int)  # type: ignore[arg-type]  # the point of the test


def test_unknown_codec_lists_the_available_ones():
    with pytest.raises(CodecSpecError, match="unknown codec 'zip'.*topk"):
        make_codec("zip")


@pytest.mark.parametrize(
    "spec, match",
    [
        ("topk:ratio=2", "ratio must be in"),
        ("topk:rate=0.1", "no parameter rate"),
        ("topk:ratio=abc", "must be float"),
        ("topk:ratio", "not key=value"),
        ("topk:ratio=0.1,ratio=0.2", "given twice"),
        ("int8:chunk=1.5", "must be int"),
        ("randomk:scale=1", "must be bool"),
        ("none:x=1", "no parameter x"),
        ("", "non-empty"),
    ],
)
def test_bad_specs(spec, match):
    with pytest.raises(CodecSpecError, match=match):
        make_codec(spec)
    with pytest.raises(CodecSpecError):
        codec_factory(spec)


def test_parse_codec_spec_types():
    assert parse_codec_spec("topk:ratio=0.01,foo=2,on=True,off=false,name=abc,none=None") == (
        "topk",
        {"ratio": 0.01, "foo": 2, "on": True, "off": False, "name": "abc", "none": None},
    )
    assert parse_codec_spec(" fp16 ") == ("fp16", {})
    assert parse_codec_spec("pkg.mod:Cls:k=1") == ("pkg.mod:Cls", {"k": 1})
    assert parse_codec_spec("pkg.mod:Cls") == ("pkg.mod:Cls", {})


_WORDS = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=8).filter(
    lambda s: s not in {"true", "false", "none", "null", "inf", "nan", "infinity"}
)


@settings(max_examples=100, deadline=None)
@given(
    name=_WORDS,
    params=st.dictionaries(
        _WORDS,
        st.one_of(
            st.integers(-(10**12), 10**12), st.floats(allow_nan=False, allow_infinity=False), st.booleans(), _WORDS
        ),
    ),
)
def test_parse_codec_spec_round_trips(name, params):
    spec = name + (":" + ",".join(f"{k}={v}" for k, v in params.items()) if params else "")
    assert parse_codec_spec(spec) == (name, params)


@pytest.mark.parametrize(
    "spec",
    [
        "none",
        "fp16",
        "bf16",
        "int8:chunk=128",
        "qsgd:bucket=64,levels=5,seed=9",
        "terngrad:bucket=32,seed=2",
        "onebit",
        "topk:ratio=0.05,seed=3",
        "randomk:ratio=0.25,scale=False,seed=4",
        "dgc:clip=2.5,momentum=0.8,ratio=0.01,seed=5,warmup_steps=10",
        "topk_adam:beta1=0.8,beta2=0.99,eps=1e-06,ratio=0.01,seed=7,warmup_steps=5",
        "powersgd:rank=4,seed=6",
    ],
)
def test_spec_round_trips(spec):
    codec = make_codec(spec)
    assert codec.spec() == spec
    assert make_codec(codec.spec()).spec() == spec
    assert parse_codec_spec(codec.spec()) == parse_codec_spec(spec)


def test_codec_factory_builds_fresh_instances():
    factory = codec_factory("dgc:ratio=0.1")
    a, b = factory(), factory()
    assert isinstance(b, DgcCodec)
    assert a is not b and a.spec() == b.spec() == "dgc:momentum=0.9,ratio=0.1,warmup_steps=0"
    a.encode(torch.randn(100))
    assert b.step == 0
    assert isinstance(codec_factory("topk", error_feedback=True)(), ErrorFeedback)


USER_CODEC = textwrap.dedent('''
    import torch
    from zps.protocol.codecs import Codec, Encoded

    class Doubler(Codec):
        """Sends 2x; decodes /2 (exact for floats)."""
        name = "doubler"
        exact = True

        def __init__(self, factor=2):
            self.params = {"factor": factor}

        def encode(self, tensor):
            return Encoded({"factor": self.params["factor"]}, [tensor.reshape(-1) * self.params["factor"]])

        def decode(self, encoded, numel, dtype, device):
            return (encoded.buffers[0] / encoded.meta["factor"]).to(dtype=dtype, device=device)

    NOT_A_CODEC = object
''')


@pytest.fixture(scope="module")
def user_module(tmp_path_factory):
    root = tmp_path_factory.mktemp("usercodec")
    (root / "zps_test_usercodec").mkdir()
    (root / "zps_test_usercodec" / "__init__.py").write_text("")
    (root / "zps_test_usercodec" / "mine.py").write_text(USER_CODEC)
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(root))
        yield "zps_test_usercodec.mine"


def test_user_codec_by_import_path(user_module):
    codec = make_codec(f"{user_module}:Doubler:factor=4")
    x = torch.randn(33)
    encoded, y = round_trip(codec, x)
    assert codec.spec() == f"{user_module}:Doubler:factor=4" and torch.equal(y, x)
    assert make_codec(f"{user_module}:Doubler").spec() == f"{user_module}:Doubler:factor=2"
    assert isinstance(make_codec(f"{user_module}:Doubler", error_feedback=True), ErrorFeedback)
    with pytest.raises(CodecSpecError, match="not a Codec subclass"):
        make_codec(f"{user_module}:NOT_A_CODEC")
    with pytest.raises(CodecSpecError, match="no attribute"):
        make_codec(f"{user_module}:Missing")
    with pytest.raises(CodecSpecError, match="bad parameters"):
        make_codec(f"{user_module}:Doubler:speed=1")
    with pytest.raises(CodecSpecError, match="cannot import module"):
        make_codec("zps_no_such_package.codecs:Thing")
    with pytest.raises(CodecSpecError, match="import paths are not allowed"):
        make_codec(f"{user_module}:Doubler", allow_import=False)
    with pytest.raises(CodecSpecError, match="needs a class"):
        make_codec(f"{user_module}")


def test_seeded_codecs_are_deterministic():
    x = torch.randn(3000)
    for name in sorted(SEEDED):
        a, b = build(name), build(name)
        for _ in range(2):
            ea, eb = a.encode(x), b.encode(x)
            assert ea.meta == eb.meta and all(
                torch.equal(p, q) for p, q in zip(ea.buffers, eb.buffers, strict=False)
            ), name
