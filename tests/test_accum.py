"""The fp8 accumulation modes: what each hands the kernel as ``max_num_imprecise_acc``."""

import pytest

from moetune.accum import FP8_ACCUM_ENV, fp8_accum_mode, fp8_max_imprecise_acc


@pytest.mark.parametrize(
    "mode, block_m, block_k, expected",
    [
        ("precise", 128, 128, 0),  # promote after every instruction
        ("tile", 16, 64, 64),  # once per K tile
        ("tile", 256, 128, 128),
        ("fast", 16, 128, None),  # never (vLLM's kernel)
        ("auto", 16, 128, 128),  # short tiles promote per K tile
        ("auto", 64, 64, 64),
        ("auto", 128, 128, None),  # tall tiles run fast
        ("auto", 256, 64, None),
    ],
)
def test_modes(monkeypatch, mode, block_m, block_k, expected):
    monkeypatch.setenv(FP8_ACCUM_ENV, mode)
    assert fp8_accum_mode() == mode
    assert fp8_max_imprecise_acc(block_m, block_k) == expected


def test_default_is_auto(monkeypatch):
    monkeypatch.delenv(FP8_ACCUM_ENV, raising=False)
    assert fp8_accum_mode() == "auto"
    assert fp8_max_imprecise_acc(64, 128) == 128
    assert fp8_max_imprecise_acc(128, 128) is None


def test_unknown_mode_is_refused(monkeypatch):
    monkeypatch.setenv(FP8_ACCUM_ENV, "Fast")
    with pytest.raises(ValueError, match="MOETUNE_FP8_ACCUM must be one of auto, precise"):
        fp8_max_imprecise_acc(64, 64)
