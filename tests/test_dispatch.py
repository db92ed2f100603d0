"""select_config and family selection, on the CPU (needs the compiled module, not a GPU)."""

import pytest
import torch

import fp8kern
from fp8kern import _backend

pytestmark = pytest.mark.skipif("sm90" not in _backend.compiled_families(), reason="sm90 kernels not compiled")

H100_SMS = 132  # H100 SXM and H200


# N where every config of the table serves some M: sm90's stream-K needs few tiles, sm89's mid tile many.
@pytest.mark.parametrize("family,min_configs,N", [("sm90", 4, 4096), ("sm89", 3, 14336), ("sm90_block", 3, 4096),
                                                  ("sm89_block", 3, 4096)])
def test_table_covers_every_m(family, min_configs, N):
    names = _backend._C.gemm_configs(family)
    assert len(names) >= min_configs and len(set(names)) == len(names)
    picked = [_backend._C.gemm_select_config(family, m, N, 4096, H100_SMS) for m in range(1, 20000, 7)]
    assert all(0 <= i < len(names) for i in picked)
    assert picked == sorted(picked), "configs are ordered by the M range they serve"
    assert set(picked) == set(range(len(names))), "every config serves some M"


@pytest.mark.parametrize("M,N,K,streamk", [(128, 4096, 4096, True), (256, 4096, 1152, True), (128, 8320, 4096, True),
                                           (128, 8448, 4096, False), (256, 6144, 4096, False), (128, 4096, 1024, False),
                                           (1024, 4096, 4096, False), (64, 4096, 4096, False), (16, 4096, 512, False)])
@pytest.mark.parametrize("family", ["sm90", "sm90_block"])
def test_sm90_stream_k_when_tiles_are_few(family, M, N, K, streamk):
    """Stream-K only where 128x128 tiles would leave most of an H100's 132 SMs idle (at most 65 tiles) and K has more
    than 8 tiles of 128 to split, the limits of CUTLASS's own stream-K heuristic. M <= 64 takes the swap configs in
    the per-token family; in the block family M <= 32 takes its swap config, which always has the stream-K scheduler
    (CUTLASS's heuristic then decides per shape), and 32 < M <= 64 stream-K (its unswapped tiles stay 128 rows)."""
    expected = streamk or (family == "sm90_block" and (M <= 32 or (M <= 64 and K > 1024)))
    assert ("streamk" in _backend.config_name(family, M, N, K, H100_SMS)) == expected


@pytest.mark.parametrize("sms,max_tiles", [(132, 65), (114, 56), (78, 38)])
@pytest.mark.parametrize("family", ["sm90", "sm90_block"])
def test_stream_k_tile_limit_follows_sm_count(family, sms, max_tiles):
    """The tile limit is the GPU's: an H100 PCIe (114 SMs) or a partitioned GPU has fewer SMs to fill, so a shape
    that is stream-K on 132 SMs may already fill one wave there. The last stream-K shape has max_tiles tiles."""
    assert "streamk" in _backend.config_name(family, 128, 128 * max_tiles, 4096, sms)
    assert "streamk" not in _backend.config_name(family, 128, 128 * (max_tiles + 1), 4096, sms)


def test_select_config_needs_an_sm_count():
    with pytest.raises(ValueError, match="sm_count=0"):
        _backend._C.gemm_select_config("sm90", 128, 4096, 4096, 0)


@pytest.mark.parametrize("M,expected", [(1, "32x32"), (32, "32x32"), (33, "64x128"), (256, "64x128"),
                                        (257, "128x128"), (16384, "128x128")])
def test_sm89_block_tiles_by_m(M, expected):
    assert expected in _backend.config_name("sm89_block", M, 16384, 2048, H100_SMS)


@pytest.mark.parametrize("M,expected", [(1, "swap_64x32"), (32, "swap_64x32"), (33, "swap_64x64"), (64, "swap_64x64"),
                                        (65, "128x128"), (16384, "128x128")])
def test_sm90_small_m_swaps(M, expected):
    """Small M runs with A and B swapped so M lands on the MMA's N side (tile N 32 or 64)."""
    assert expected in _backend.config_name("sm90", M, 6144, 4096, H100_SMS)


@pytest.mark.parametrize("M,N,K,expected", [(1, 7168, 2048, "swap_128x32"), (32, 4096, 512, "swap_128x32"),
                                             (33, 7168, 2048, "block_streamk_128x128"), (33, 4096, 512, "c1x2"),
                                             (4096, 7168, 2048, "c1x2")])
def test_sm90_block_small_m_swaps(M, N, K, expected):
    """Block-scaled decode (M <= 32) swaps A and B: the weights' 128-row blocks fill the MMA's M side and the tokens
    a 32-wide N tile (the config's stream-K scheduler decides per shape whether to split K)."""
    assert expected in _backend.config_name("sm90_block", M, N, K, H100_SMS)


@pytest.mark.parametrize("M,expected", [(1, "32x64x128"), (32, "32x64x128"), (33, "64x128x64"), (128, "64x128x64"),
                                        (129, "128x64x64"), (16384, "128x64x64")])
def test_sm89_tiles_by_m(M, expected):
    assert expected in _backend.config_name("sm89", M, 14336, 4096, H100_SMS)


@pytest.mark.parametrize("family,M,N,sms,expected", [
    ("sm89", 64, 4096, 128, "32x64x128"),      # 64x128 tiles: 32 CTAs for 128 SMs
    ("sm89", 128, 4096, 142, "32x64x128"),     # 64 CTAs < 71
    ("sm89", 128, 4096, 128, "64x128x64"),     # 64 CTAs: exactly half of an RTX 4090 fills
    ("sm89", 200, 4096, 142, "128x64x64"),     # 128 CTAs
    ("sm89_block", 64, 7168, 128, "32x32"),    # 64x128 tiles: 56 CTAs
    ("sm89_block", 100, 7168, 128, "64x128"),  # 112 CTAs
    ("sm89_block", 300, 2048, 142, "64x128"),  # 128x128 tiles: 48 CTAs; 64x128: 80
    ("sm89_block", 300, 1024, 142, "32x32"),   # 40 CTAs of 64x128
])
def test_sm89_steps_down_while_half_the_sms_idle(family, M, N, sms, expected):
    """Mid-size M with small N: a smaller tile than the M row's, so at least half of the SMs get a CTA."""
    assert expected in _backend.config_name(family, M, N, 4096, sms)


def test_unknown_family_is_an_error():
    with pytest.raises(ValueError, match="unknown GEMM family 'sm100'"):
        _backend._C.gemm_select_config("sm100", 1, 1, 1, H100_SMS)


def test_unverified_family_not_used_by_auto(monkeypatch):
    """Backend 'auto' runs a compiled family only once it is in VERIFIED_FAMILIES (until then the call takes another
    path: tests/test_gemm_paths.py); naming it runs it with a warning. The GPU is simulated (an sm_90 device), so this
    checks the selection logic on the CPU."""
    monkeypatch.setattr(_backend, "device_arch", lambda device: 90)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "simulated H100")
    monkeypatch.setattr(_backend, "VERIFIED_FAMILIES", frozenset())
    dev = torch.device("cuda", 0)
    prev = fp8kern.get_backend()
    try:
        fp8kern.set_backend("auto")
        assert _backend.compiled_family(dev) is None
        fp8kern.set_backend("sm90")
        with pytest.warns(RuntimeWarning, match="not been verified"):
            _backend._state["warned"].discard("unverified-sm90")
            assert _backend.compiled_family(dev) == "sm90"
        fp8kern.set_backend("sm89")  # Ada kernels run on Hopper too (arch >= 89)
        _backend._state["warned"].discard("unverified-sm89")
        with pytest.warns(RuntimeWarning, match="sm89 GEMM kernels have not been verified"):
            assert _backend.compiled_family(dev) == "sm89"
        monkeypatch.setattr(_backend, "VERIFIED_FAMILIES", frozenset({"sm90"}))
        fp8kern.set_backend("auto")
        assert _backend.compiled_family(dev) == "sm90"
        fp8kern.set_backend("reference")
        assert _backend.compiled_family(dev) is None
    finally:
        fp8kern.set_backend(prev)


def test_quant_kernels_follow_the_backend(monkeypatch):
    """The quantization kernels, like the GEMM families, run by default only once verified ('quant' in
    VERIFIED_FAMILIES); naming a kernel family runs them; never below sm_89 or with the reference backend."""
    dev = torch.device("cuda", 0)
    monkeypatch.setattr(_backend, "VERIFIED_FAMILIES", frozenset())
    prev = fp8kern.get_backend()
    try:
        for arch, backend, verified, expected in [(90, "auto", (), False), (90, "auto", ("quant",), True),
                                                  (90, "sm90", (), True), (89, "sm89", (), True),
                                                  (89, "reference", ("quant",), False), (80, "sm89", ("quant",), False)]:
            monkeypatch.setattr(_backend, "device_arch", lambda device, arch=arch: arch)
            monkeypatch.setattr(_backend, "VERIFIED_FAMILIES", frozenset(verified))
            fp8kern.set_backend(backend)
            assert _backend.quant_kernels_available(dev) == expected, (arch, backend, verified)
        fp8kern.set_backend("auto")
        monkeypatch.setattr(_backend, "VERIFIED_FAMILIES", frozenset())
        monkeypatch.setattr(_backend, "device_arch", lambda device: 90)
        assert "not been verified" in _backend.quant_fallback_reason(dev)
    finally:
        fp8kern.set_backend(prev)
