"""mlx_compact.kernels: the pure-MLX twins, dispatch, and the Metal kernels' exact source run as
sanitized C++ (tests/metal_harness) and compared with the twins.

The quantize kernel follows MLX's Metal quantizer, which differs from MLX's CPU one, so its
source is checked against a numpy model of the Metal quantizer (tests/quantize_model.py), never
against ``mx.quantize`` on the CPU; the model's shared arithmetic is checked against the CPU
``mx.quantize`` through its CPU mode. The dispatched ``quantize_rows`` is compared with
``mx.quantize`` on the current device (on a Mac's GPU: the Metal kernel against MLX's).
"""

import os
import sys

import mlx.core as mx
import numpy as np
import pytest

import mlx_compact  # noqa: F401  (before mlx.core)
from mlx_compact import kernels
from mlx_compact.kernels import rows

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from metal_harness.harness import Harness, HarnessError, check_subset, metal_sources  # noqa: E402
from quantize_model import affine_quantize, round_half_away  # noqa: E402

DTYPES = [mx.float32, mx.float16, mx.bfloat16]
DTYPE_IDS = ["f32", "f16", "bf16"]


@pytest.fixture(scope="session")
def harness(tmp_path_factory):
    return Harness(tmp_path_factory.mktemp("metal_harness"))


@pytest.fixture
def emulated(harness, monkeypatch):
    """Make the Metal code paths run the generated Metal source through the C++ harness."""
    monkeypatch.setattr(rows, "_call", harness.launch)
    return harness


def _rand(shape, dtype, seed=0):
    return mx.random.normal(shape, key=mx.random.key(seed)).astype(dtype)


def _equal(a, b):
    return a.shape == b.shape and a.dtype == b.dtype and mx.array_equal(a, b).item()


def _csr(rng, n, k, max_group=4, empty=True):
    sizes = rng.integers(0 if empty else 1, max_group + 1, size=k)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int32)
    members = rng.integers(0, n, size=int(offsets[-1])).astype(np.int32)
    weights = rng.uniform(0.1, 2.0, size=members.size).astype(np.float32)
    return mx.array(offsets), mx.array(members), mx.array(weights)


def _merge_reference(x, offsets, members, weights):
    x, offsets = np.array(x.astype(mx.float32)), np.array(offsets)
    members, weights = np.array(members), np.array(weights)
    out = np.zeros((offsets.size - 1, x.shape[1]), np.float64)
    for k in range(offsets.size - 1):
        j = slice(offsets[k], offsets[k + 1])
        if weights[j].sum() != 0:
            out[k] = (weights[j, None] * x[members[j]]).sum(0) / weights[j].sum()
    return out


def _quant_chunk(dtype, bits=4):
    """[B, H, L, D] K/V chunk: random rows and, in its first groups of 32, edge cases."""
    x = np.array(mx.random.normal((2, 3, 4, 128), key=mx.random.key(7))) * 3.0
    g = x.reshape(-1, 32)  # [96, 32] view of x
    n_bins, s = (1 << bits) - 1, 2.0**-4
    ties = np.arange(30) % min(n_bins, 30) + 0.5
    g[0] = 0.0  # all zeros
    g[1] = 2.5  # constant positive group
    g[2] = np.arange(32) * 0.25  # exact ties in the rint of CPU MLX
    g[3] = -np.arange(32) * 0.25  # negative edge dominates
    g[4] = np.linspace(-1e-9, 2e-9, 32)  # q0 == 0 branch
    g[5] = np.linspace(-60000.0, 60000.0, 32)  # near the float16 range
    g[6, ::2], g[6, 1::2] = 1.0, -1.0
    g[7] = np.linspace(-1.0, 1.0, 32) ** 3
    g[8] = np.concatenate([[0.0, n_bins], ties]) * s  # codes n_bins - k - 0.5: value ties
    g[9] = np.linspace(-(n_bins // 2 + 3) - 0.5, n_bins // 2 - 2.5, 32) * s  # edge / scale ties
    g[10] = np.abs(g[10]) + 0.5  # all positive
    g[11] = -np.abs(g[11]) - 0.5  # all negative: Metal's w_max is 0
    g[12] = -1.75  # constant negative group
    g[13] = -np.abs(g[13])
    g[13, 0] = -0.0  # all non-positive, maximum -0
    g[14] = np.linspace(1e-9, 3e-9, 32)  # tiny positive: q0 == 0 with scale 1e-7
    return mx.array(x.astype(np.float32)).astype(dtype)


def _codes(quantized, group_size, bits):
    """[G, group_size] integer codes unpacked from a (wq, scales, biases) triple."""
    words = np.array(quantized[0]).reshape(-1, 1)  # [W, 1]
    shifts = np.arange(32 // bits, dtype=np.uint32) * np.uint32(bits)
    return ((words >> shifts) & np.uint32((1 << bits) - 1)).reshape(-1, group_size)


def _group_equal(a, b, group_size, bits):
    """[G] bool: whether two (wq, scales, biases) triples agree on each quantization group."""
    words = group_size * bits // 32
    wq = np.array(a[0] == b[0]).reshape(-1, words).all(axis=1)
    return wq & np.array(a[1] == b[1]).reshape(-1) & np.array(a[2] == b[2]).reshape(-1)


# ------------------------------------------------------------------ twins and dispatch


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_gather_twin(dtype):
    x = _rand((9, 2, 5), dtype)
    index = mx.array([8, 0, 3, 3], mx.int32)
    out = kernels.gather_rows(x, index)
    assert _equal(out, mx.array(np.array(x.astype(mx.float32))[np.array(index)]).astype(dtype))
    a, b = kernels.gather_rows([x, x[:, 0]], index)
    assert _equal(a, out) and _equal(b, out[:, 0])
    assert kernels.gather_rows(x, mx.zeros((0,), mx.int32)).shape == (0, 2, 5)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_merge_twin(dtype):
    rng = np.random.default_rng(1)
    x = _rand((20, 7), dtype)
    offsets, members, weights = _csr(rng, 20, 9)
    out = kernels.merge_rows(x, offsets, members, weights)
    ref = _merge_reference(x, offsets, members, weights)
    tol = 1e-6 if dtype == mx.float32 else 1e-2
    assert out.dtype == dtype and np.allclose(np.array(out.astype(mx.float32)), ref, atol=tol, rtol=tol)
    ids = mx.arange(21, dtype=mx.int32)
    identity = kernels.merge_rows(x, ids, ids[:20], mx.ones(20))
    assert _equal(identity, x)
    assert kernels.merge_rows(x, mx.zeros((1,), mx.int32), members[:0], weights[:0]).shape == (0, 7)


@pytest.mark.parametrize("mode", ["auto", "mlx"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_quantize_twin(dtype, mode, monkeypatch):
    """quantize_rows is mx.quantize of the current device (auto on a Mac's GPU: the kernel)."""
    monkeypatch.setenv(kernels.ENV, mode)
    for bits in (4, 8):
        x = _quant_chunk(dtype, bits)
        for group_size in (32, 64, 128):
            got = kernels.quantize_rows(x, group_size, bits)
            want = mx.quantize(x, group_size=group_size, bits=bits)
            for name, a, b in zip(("wq", "scales", "biases"), got, want):
                assert _equal(a, b), f"{name} differs (group_size={group_size}, bits={bits})"
    with pytest.raises(ValueError):
        kernels.quantize_rows(_rand((1, 2, 3, 96), dtype), 64, 4)
    with pytest.raises(ValueError):
        kernels.quantize_rows(x, 64, 3)


def test_dispatch_switch(monkeypatch):
    monkeypatch.setenv(kernels.ENV, "mlx")
    assert kernels.backend() == "mlx"
    monkeypatch.setenv(kernels.ENV, "auto")
    assert kernels.backend() == ("metal" if mx.metal.is_available() else "mlx")
    monkeypatch.setenv(kernels.ENV, "cuda")
    with pytest.raises(ValueError, match=kernels.ENV):
        kernels.backend()
    if not mx.metal.is_available():
        monkeypatch.setenv(kernels.ENV, "metal")
        with pytest.raises(RuntimeError, match=kernels.ENV):
            kernels.gather_rows(mx.zeros((3, 2)), mx.array([0], mx.int32))


def test_mlx_switch_skips_kernels(monkeypatch):
    monkeypatch.setenv(kernels.ENV, "mlx")
    monkeypatch.setattr(rows, "_call", lambda *a, **k: pytest.fail("kernel launched"))
    x = _rand((4, 64), mx.float32)
    kernels.gather_rows(x, mx.array([1], mx.int32))
    kernels.merge_rows(x, mx.array([0, 1], mx.int32), mx.array([2], mx.int32), mx.ones(1))
    kernels.quantize_rows(x, 64, 4)


# ------------------------------------------------------------ numpy models of mx.quantize


def test_round_half_away():
    x = np.array([0.5, -0.5, 1.5, 2.5, -2.5, 0.49999997, -0.3, 7.0, 2.0**23 + 1], np.float32)
    want = np.array([1, -1, 2, 3, -3, 0, 0, 7, 2.0**23 + 1], np.float32)
    assert np.array_equal(round_half_away(x), want) and round_half_away(x).dtype == np.float32
    assert np.signbit(round_half_away(np.float32([-0.3])))[0]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_quantize_model_cpu_mode_is_cpu_mx_quantize(dtype, bits):
    """The model's CPU mode is MLX's CPU quantizer: this checks the arithmetic both modes share."""
    xs = [_quant_chunk(dtype, bits), _rand((8, 4, 256), dtype, seed=bits) * 3]
    for x in xs:
        for group_size in (32, 64, 128):
            got = affine_quantize(x, group_size, bits, metal=False)
            want = mx.quantize(x, group_size=group_size, bits=bits, stream=mx.cpu)
            for name, a, b in zip(("wq", "scales", "biases"), got, want):
                assert _equal(a, b), f"{name} differs (group_size={group_size}, bits={bits})"


@pytest.mark.skipif(not mx.metal.is_available(), reason="needs Metal")
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_quantize_model_metal_mode_is_gpu_mx_quantize(dtype, bits):
    """On a Mac: the model's Metal mode is MLX's Metal quantizer."""
    xs = [_quant_chunk(dtype, bits), _rand((8, 4, 256), dtype, seed=bits) * 3]
    for x in xs:
        for group_size in (32, 64, 128):
            got = affine_quantize(x, group_size, bits, metal=True)
            want = mx.quantize(x, group_size=group_size, bits=bits, stream=mx.gpu)
            for name, a, b in zip(("wq", "scales", "biases"), got, want):
                assert _equal(a, b), f"{name} differs (group_size={group_size}, bits={bits})"


@pytest.mark.parametrize("bits", [4, 8])
def test_quantize_models_differ_where_mlx_backends_differ(bits):
    """Metal (maximum from 0, round half away) against CPU (true maximum, half to even)."""
    x = _quant_chunk(mx.float32, bits)
    metal = affine_quantize(x, 32, bits, metal=True)
    cpu = affine_quantize(x, 32, bits, metal=False)
    same = _group_equal(metal, cpu, 32, bits)
    assert same[[0, 1, 4, 10, 13, 14]].all()  # zeros, constant, tiny, all positive, max -0
    assert not same[[8, 9, 11, 12]].any()  # ties, all negative
    n_bins, k = (1 << bits) - 1, np.arange(30) % min((1 << bits) - 1, 30)
    ties = n_bins - k - 0.5  # group 8's exact quotients
    assert _codes(metal, 32, bits)[8].tolist() == [n_bins, 0, *(ties + 0.5).tolist()]
    assert _codes(cpu, 32, bits)[8].tolist() == [n_bins, 0, *np.rint(ties).tolist()]
    y = _rand((16, 16, 256), mx.bfloat16, seed=5) * 3  # random bfloat16 groups
    same = _group_equal(affine_quantize(y, 64, bits), affine_quantize(y, 64, bits, metal=False), 64, bits)
    assert 0.02 < 1 - same.mean() < 0.4


# ------------------------------------------------------- Metal source through the harness


def test_source_capture_shows_address_spaces():
    x, small, big = mx.zeros((3, 2)), mx.zeros((2,), mx.int32), mx.zeros((8,), mx.int32)
    call = dict(
        template=[("T", mx.float32)],
        grid=(4, 1, 1),
        threadgroup=(4, 1, 1),
        output_shapes=[(2, 2)],
        output_dtypes=[mx.float32],
    )
    (src,) = metal_sources(rows._gather_kernel, inputs=[x, small], **call)
    assert "[[kernel]]" in src and "out[e] = x[size_t(index[k]) * D + d];" in src
    assert "const constant float* x" in src and "const constant int32_t* index" in src
    (src,) = metal_sources(rows._gather_kernel, inputs=[mx.zeros((4, 2)), big], **call)
    assert "const device float* x" in src and "const device int32_t* index" in src
    (src,) = metal_sources(
        rows._quantize_kernel,
        inputs=[mx.zeros((1, 32)), 32, 4],
        template=[("T", mx.float32)],
        grid=(4, 1, 1),
        threadgroup=(4, 1, 1),
        output_shapes=[(1, 4), (1, 1), (1, 1)],
        output_dtypes=[mx.uint32, mx.float32, mx.float32],
    )
    assert "const constant int32_t& bits" in src
    check_subset(src)


GATHER_CASES = {
    "random": (37, 19, [5, 36, 0, 36, 12, 7, 30, 1, 2, 3, 11]),
    "k0": (6, 5, []),
    "k_eq_n": (9, 4, [8, 7, 6, 5, 4, 3, 2, 1, 0]),
    "last_row_small_index": (12, 3, [11, 0, 11]),
    "tiny_x_in_constant": (2, 3, [1, 0, 1]),
    "odd_d_1": (8, 1, [7, 2, 2, 5, 0, 1, 3, 6, 4]),
}


@pytest.mark.parametrize("case", list(GATHER_CASES))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_gather_kernel(emulated, dtype, case):
    n, d, index = GATHER_CASES[case]
    x = _rand((n, d), dtype, seed=n)
    index = mx.array(np.array(index, np.int32))
    assert _equal(rows._gather_metal(x, index), rows._gather_mlx(x, index))


def test_gather_kernel_list_and_empty_grid(emulated):
    index = mx.array([4, 1, 4, 0], mx.int32)
    xs = [_rand((5, 6), mx.float32), _rand((5, 2, 3), mx.float32, seed=1)]
    for got, want in zip(rows._gather_metal(xs[0], index), kernels.gather_rows(xs[0], index)):
        assert _equal(got, want)
    assert _equal(rows._gather_metal(xs[1], index), mx.take(xs[1], index, axis=0))
    (out,) = emulated.launch(
        rows._gather_kernel,
        inputs=[xs[0], index[:0]],
        template=[("T", mx.float32)],
        grid=(0, 1, 1),
        threadgroup=(1, 1, 1),
        output_shapes=[(0, 6)],
        output_dtypes=[mx.float32],
    )
    assert out.shape == (0, 6)


MERGE_CASES = {
    "random_with_empty_groups": (40, 13, 17, 5, True),
    "k_eq_n_singletons": (10, 10, 3, 1, False),
    "few_members_constant": (6, 3, 5, 1, False),
    "odd_d": (25, 8, 9, 6, True),
}


@pytest.mark.parametrize("case", list(MERGE_CASES))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_merge_kernel(emulated, dtype, case):
    n, k, d, max_group, empty = MERGE_CASES[case]
    rng = np.random.default_rng(k)
    x = _rand((n, d), dtype, seed=k)
    offsets, members, weights = _csr(rng, n, k, max_group, empty)
    members = mx.where(mx.arange(members.size) == members.size - 1, n - 1, members)
    got = rows._merge_metal(x, offsets, members, weights)
    want = rows._merge_mlx(x, offsets, members, weights)
    assert got.dtype == dtype and got.shape == (k, d)
    diff = mx.abs(got.astype(mx.float32) - want.astype(mx.float32))
    tol = {mx.float32: 1e-6, mx.float16: 1e-3, mx.bfloat16: 8e-3}[dtype]
    ok = diff <= tol * (mx.abs(want.astype(mx.float32)) + 1.0)
    assert ok.all().item(), f"max abs diff {diff.max().item()}"


def test_merge_kernel_edges(emulated):
    x = _rand((5, 4), mx.float32)
    none = mx.zeros((0,), mx.int32)
    assert rows._merge_metal(x, mx.zeros((1,), mx.int32), none, mx.zeros((0,))).shape == (0, 4)
    offsets = mx.array([0, 0, 2, 2], mx.int32)
    members, weights = mx.array([4, 0], mx.int32), mx.array([0.0, 0.0])
    out = rows._merge_metal(x, offsets, members, weights)
    assert _equal(out, mx.zeros((3, 4)))
    members, weights = mx.array([4, 0], mx.int32), mx.array([1.0, 3.0])
    want = rows._merge_mlx(x, offsets, members, weights)
    assert _equal(rows._merge_metal(x, offsets, members, weights), want)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_quantize_kernel_bit_exact(emulated, dtype, bits):
    """The kernel's source is MLX's Metal quantizer (as modelled) on edge-case groups."""
    x = _quant_chunk(dtype, bits)
    for group_size in (32, 64, 128):
        got = rows._quantize_metal(x, group_size, bits)
        want = affine_quantize(x, group_size, bits, metal=True)
        for name, a, b in zip(("wq", "scales", "biases"), got, want):
            assert _equal(a, b), f"{name} differs (group_size={group_size}, bits={bits})"


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_quantize_kernel_random_groups(emulated, dtype):
    x = _rand((4, 8, 256), dtype, seed=11) * 2  # 8192 values: 64-256 groups
    for bits, group_size in ((4, 64), (8, 128), (4, 32)):
        got = rows._quantize_metal(x, group_size, bits)
        want = affine_quantize(x, group_size, bits, metal=True)
        for name, a, b in zip(("wq", "scales", "biases"), got, want):
            assert _equal(a, b), f"{name} differs (group_size={group_size}, bits={bits})"


def test_quantize_kernel_single_row_and_slice(emulated):
    ring = _rand((1, 2, 16, 64), mx.bfloat16, seed=3)
    chunk = ring[:, :, -1:, :]  # [1, 2, 1, 64], not contiguous
    got, want = rows._quantize_metal(chunk, 32, 4), affine_quantize(chunk, 32, 4, metal=True)
    for a, b in zip(got, want):
        assert _equal(a, b)
    empty = mx.zeros((1, 2, 0, 64), mx.float16)
    shapes = [a.shape for a in rows._quantize_metal(empty, 64, 8)]
    assert shapes == [(1, 2, 0, 16), (1, 2, 0, 1), (1, 2, 0, 1)]


# ----------------------------------------------------------- the harness catches bugs


def _broken_call(harness, source, header="", n=6, d=3, k=4, grid=None):
    kernel = mx.fast.metal_kernel(
        name="broken", input_names=["x", "index"], output_names=["out"], source=source, header=header
    )
    x = _rand((n, d), mx.float32)
    index = mx.array(np.arange(n - k, n, dtype=np.int32)[::-1].copy())
    (out,) = harness.launch(
        kernel,
        inputs=[x, index],
        template=[("T", mx.float32)],
        grid=grid or (k * d, 1, 1),
        threadgroup=(1, 1, 1),
        output_shapes=[(k, d)],
        output_dtypes=[mx.float32],
    )
    return out, mx.take(x, index, axis=0)


def test_harness_passes_correct_fixture(harness):
    out, want = _broken_call(harness, rows._GATHER_SOURCE)
    assert _equal(out, want)


def test_harness_catches_off_by_one(harness):
    off_by_one = rows._GATHER_SOURCE.replace("index[k]) * D + d]", "index[k] + 1) * D + d]")
    assert off_by_one != rows._GATHER_SOURCE
    with pytest.raises(HarnessError, match="heap-buffer-overflow"):
        _broken_call(harness, off_by_one)


def test_harness_catches_unwritten_output(harness):
    with pytest.raises(HarnessError, match="differs between"):
        _broken_call(harness, rows._GATHER_SOURCE, grid=(6, 1, 1))


def test_harness_catches_order_dependence(harness):
    source = """
    uint e = thread_position_in_grid.x;
    out[e] = e == 0 ? x[index[0]] : out[e - 1] + 1.0f;
    """
    with pytest.raises(HarnessError, match="differs between"):
        _broken_call(harness, source)


def test_harness_rejects_device_pointer_helper(harness):
    header = "float first(const device float* p) { return p[0]; }\n"
    source = "out[thread_position_in_grid.x] = first(x);"
    with pytest.raises(HarnessError, match="template parameter"):
        _broken_call(harness, source, header=header, n=2, d=3, k=1)
    good = "template <typename P> float first(P p) { return p[0]; }\n"
    out, _ = _broken_call(harness, source, header=good, n=2, d=3, k=1)
    assert out.shape == (1, 3)


def test_harness_rejects_threadgroup_memory(harness):
    source = """
    threadgroup float tmp[32];
    tmp[0] = x[0];
    out[thread_position_in_grid.x] = tmp[0];
    """
    with pytest.raises(HarnessError, match="threadgroup"):
        _broken_call(harness, source)
