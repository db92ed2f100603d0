"""The compiled core validates every launch again (never trusting the Python layer), before it touches a device,
so these run on the CPU. Pointers are fake addresses: each case fails validation, so nothing is ever launched."""

import pytest

from fp8kern import _backend

pytestmark = pytest.mark.skipif(_backend._C is None, reason="fp8kern._C is not built")

BF16, E4M3 = 2, 3
A, B, D, SA, SB = 0x10000, 0x20000, 0x30000, 0x40000, 0x50000


def gemm(family="sm90", **kw):
    args = dict(family=family, device=0, a=A, b=B, d=D, m=4, n=32, k=256, lda=256, ldb=256, ldd=32, d_dtype=BF16,
                scale_a=SA, scale_a_vector=True, scale_b=SB, scale_b_vector=True, bias=0, fast_accum=False,
                config=-1, workspace=0, workspace_bytes=0, stream=0)
    args.update(kw)
    _backend._C.scaled_mm(**args)


def block(family="sm90", **kw):
    args = dict(family=family, device=0, a=A, b=B, d=D, m=4, n=32, k=256, lda=256, ldb=256, ldd=32, d_dtype=BF16,
                scale_a=SA, scale_b=SB, bias=0, config=-1, workspace=0, workspace_bytes=0, stream=0)
    args.update(kw)
    _backend._C.scaled_mm_block(**args)


@pytest.mark.parametrize("family", ["sm90", "sm89"])
@pytest.mark.parametrize("kw,message", [
    (dict(k=8, lda=16, ldb=16), r"ENTRY: M=4 N=32 K=8, expected M, N >= 1 and K >= 16"),
    (dict(k=40, lda=48, ldb=48), r"ENTRY: K=40 and the A/B row strides must be multiples of 16"),
    (dict(ldd=16), r"ENTRY: leading dimensions \(256, 256, 16\) must be >= \(K, K, N\) = \(256, 256, 32\)"),
    (dict(a=0), r"ENTRY: a, b, d, scale_a and scale_b must be non-null device pointers"),
    (dict(b=B + 8), r"ENTRY: .*16-byte aligned pointers"),
    (dict(d_dtype=E4M3), r"ENTRY: output dtype float8_e4m3fn, expected bfloat16, float16 or float32"),
    (dict(d_dtype=9), r"d: unknown dtype code 9"),
    (dict(m=2**31 - 100), r"ENTRY: M=2147483548 N=32 K=256, expected each below 2\^31 - 256"),
    (dict(config=7), r"ENTRY: config=7, expected -1 \(select by shape\) or 0\.\."),
    (dict(scale_a=SA + 2), r"ENTRY: scale pointers must be 4-byte aligned"),
])
def test_gemm_launch_rejects(family, kw, message):
    with pytest.raises(ValueError, match=message.replace("ENTRY", f"scaled_mm_{family}")):
        gemm(family, **kw)


@pytest.mark.parametrize("family,kw,message", [
    ("sm90", dict(k=64, lda=64, ldb=64), r"blockwise_sm90: .*K >= 128"),
    ("sm89", dict(k=8, lda=16, ldb=16), r"blockwise_sm89: .*K >= 16"),
    ("sm90", dict(config=3), r"blockwise_sm90: config=3, expected -1 \(select by shape\) or 0\.\.2"),
    ("sm89", dict(config=3), r"blockwise_sm89: config=3, expected -1 \(select by shape\) or 0\.\.2"),
    ("sm89", dict(ldd=33), r"blockwise_sm89: output row stride 33 x 2 bytes must be a multiple of 16"),
    ("sm89", dict(bias=D + 1), r"blockwise_sm89: bias pointer is not aligned"),
])
def test_block_launch_rejects(family, kw, message):
    with pytest.raises(ValueError, match=message):
        block(family, **kw)


def test_workspace_query_validates_first():
    args = dict(family="sm90", device=0, a=A, b=B, d=D, m=4, n=32, k=40, lda=48, ldb=48, ldd=32, d_dtype=BF16,
                scale_a=SA, scale_a_vector=True, scale_b=SB, scale_b_vector=True, bias=0, fast_accum=False, config=-1)
    with pytest.raises(ValueError, match="scaled_mm_sm90: K=40 and the A/B row strides must be multiples of 16"):
        _backend._C.gemm_workspace_size(**args)


def test_block_workspace_query_validates_first():
    args = dict(family="sm90", device=0, a=A, b=B, d=D, m=4, n=32, k=64, lda=64, ldb=64, ldd=32, d_dtype=BF16,
                scale_a=SA, scale_b=SB, bias=0, config=-1)
    with pytest.raises(ValueError, match=r"blockwise_sm90: .*K >= 128"):
        _backend._C.block_workspace_size(**args)


def test_unknown_family():
    with pytest.raises(ValueError, match="family='sm100'"):
        gemm("sm100")
    with pytest.raises(ValueError, match="family='sm100'"):
        block("sm100")


OFFS, WS = 0x60000, 0x70000


def grouped(block=True, **kw):
    args = dict(device=0, block=block, a=A, b=B, d=D, scale_a=SA, scale_b=SB, offsets=OFFS, groups=4, rows=64, n=256,
                k=256, lda=256, ldd=256, d_dtype=BF16, workspace=WS, workspace_bytes=1 << 20, stream=0)
    args.update(kw)
    _backend._C.grouped_mm(**args)


@pytest.mark.parametrize("block", [True, False])
@pytest.mark.parametrize("kw,message", [
    (dict(groups=0), r"groups=0, expected 1 <= groups < 2\^24"),
    (dict(k=64, lda=64), r"rows=64 N=256 K=64, expected rows >= 0, N >= 1 and K >= 128"),
    (dict(rows=-1), r"rows=-1 N=256 K=256, expected rows >= 0"),
    (dict(n=2**31 - 100, ldd=2**31), r"expected each below 2\^31 - 256"),
    (dict(offsets=0), r"a, b, d, scale_a, scale_b and offsets must be non-null device pointers"),
    (dict(lda=128), r"leading dimensions \(128, 256\) must be >= \(K, N\) = \(256, 256\)"),
    (dict(k=136, lda=136), r"K=136 and A's row stride 136 must be multiples of 16"),
    (dict(b=B + 8), r"16-byte aligned A and B"),
    (dict(d_dtype=E4M3), r"output dtype float8_e4m3fn, expected bfloat16, float16 or float32"),
    (dict(n=100, ldd=104), r"N=100 and the output row stride 104 x 2 bytes must be multiples of 16"),
    (dict(d=D + 4), r"16-byte aligned pointer"),
    (dict(offsets=OFFS + 4), r"offsets 8-byte aligned int64"),
    (dict(scale_b=SB + 2), r"scale pointers must be 4-byte aligned"),
    (dict(workspace=WS + 64), r"workspace must be 128-byte aligned"),
])
def test_grouped_launch_rejects(block, kw, message):
    what = r"grouped_gemm_sm90 \(block scales\)" if block else r"grouped_gemm_sm90 \(row/col scales\)"
    with pytest.raises(ValueError, match=what + ": .*" + message):
        grouped(block, **kw)


def test_grouped_workspace_query_validates_first():
    args = dict(device=0, block=True, a=A, b=B, d=D, scale_a=SA, scale_b=SB, offsets=OFFS, groups=4, rows=64, n=256,
                k=64, lda=64, ldd=256, d_dtype=BF16)
    with pytest.raises(ValueError, match=r"grouped_gemm_sm90 \(block scales\): .*K >= 128"):
        _backend._C.grouped_workspace_size(**args)


def quantize(kind="token", **kw):
    args = dict(kind=kind, device=0, x=A, x_dtype=BF16, rows=4, cols=256, x_row_stride=256, q=B, q_row_stride=256,
                scale=SA, scale_dtype=0, scale_row_stride=1, scale_col_stride=0, group_size=128, scale_ub=0.0,
                workspace=SB, stream=0)
    args.update(kw)
    _backend._C.quantize(**args)


@pytest.mark.parametrize("kind,kw,message", [
    ("row", {}, r"quantize: kind='row', expected 'token', 'group', 'tensor' or 'static'"),
    ("token", dict(x=0), r"quantize_per_token: x, q and scale must be non-null"),
    ("group", dict(cols=0), r"quantize_per_group: cols=0, expected >= 1"),
    ("tensor", dict(x_dtype=E4M3), r"quantize_per_tensor: x has dtype float8_e4m3fn"),
    ("token", dict(q_row_stride=100), r"q row stride 100 is smaller than cols=256"),
    ("static", dict(scale_dtype=4), r"quantize_static: static scales must be float32"),
    ("token", dict(scale_ub=-1.0), r"scale_ub=-1, expected > 0"),
    ("token", dict(x_row_stride=-1), r"quantize_per_token: x row stride -1, expected >= 0"),
    ("group", dict(group_size=0), r"quantize_per_group: group_size=0, expected >= 1"),
    ("static", dict(group_size=0), r"quantize_static: group_size=0, expected >= 1"),
    ("tensor", dict(workspace=0), r"quantize_per_tensor: workspace is null"),
    ("tensor", dict(workspace=SB + 2), r"quantize_per_tensor: workspace must be 4-byte aligned"),
    ("token", dict(scale=SA + 2), r"quantize_per_token: fp32 scale pointer is not 4-byte aligned"),
    ("token", dict(scale_row_stride=0), r"quantize_per_token: scale row stride 0 with rows=4, expected >= 1"),
    ("group", dict(scale_col_stride=0), r"quantize_per_group: scale column stride 0 with 2 groups per row"),
    ("group", dict(scale_row_stride=1, scale_col_stride=1),
     r"quantize_per_group: scale strides \(1, 1\) for 4 rows x 2 groups: expected rows a whole row of scales apart "
     r"\(row-major, e.g. \(2, 1\)\) or groups a whole column apart \(column-major, e.g. \(1, 4\)\)"),
    ("group", dict(scale_row_stride=2, scale_col_stride=3), r"quantize_per_group: scale strides \(2, 3\) for 4 rows"),
])
def test_quantize_launch_rejects(kind, kw, message):
    with pytest.raises(ValueError, match=message):
        quantize(kind, **kw)
