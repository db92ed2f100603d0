"""select_config and family selection, on the CPU (needs the compiled module, not a GPU)."""

import pytest

import fp8kern
from fp8kern import _backend

pytestmark = pytest.mark.skipif("sm90" not in _backend.compiled_families(), reason="sm90 kernels not compiled")


def test_sm90_table_covers_every_m():
    names = _backend._C.gemm_configs("sm90")
    assert len(names) >= 2 and len(set(names)) == len(names)
    picked = [_backend._C.gemm_select_config("sm90", m, 4096, 4096) for m in range(1, 20000, 7)]
    assert all(0 <= i < len(names) for i in picked)
    assert picked == sorted(picked), "configs are ordered by the M range they serve"


@pytest.mark.parametrize("M,expected", [(1, "swap_64x32"), (32, "swap_64x32"), (33, "swap_64x64"), (64, "swap_64x64"),
                                        (65, "128x128"), (16384, "128x128")])
def test_sm90_small_m_swaps(M, expected):
    """Small M runs with A and B swapped so M lands on the MMA's N side (tile N 32 or 64)."""
    assert expected in _backend.config_name("sm90", M, 6144, 4096)


def test_sm89_has_one_config():
    assert _backend._C.gemm_configs("sm89") == ["sm89_128x64x64_4stage"]
    assert _backend.config_name("sm89", 1, 4096, 4096) == "sm89_128x64x64_4stage"


def test_unknown_family_is_an_error():
    with pytest.raises(ValueError, match="unknown GEMM family 'sm100'"):
        _backend._C.gemm_select_config("sm100", 1, 1, 1)


def test_unverified_family_not_used_by_auto():
    """With backend 'auto', a compiled family runs only once verified on a GPU (VERIFIED_FAMILIES)."""
    assert fp8kern.get_backend() == "auto"
    assert _backend.VERIFIED_FAMILIES <= set(_backend.compiled_families())
