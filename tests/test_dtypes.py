"""The one dtype table: both spellings name the same torch dtype, of the size torch gives it."""

from __future__ import annotations

import torch

from ecospa_deploy import dtypes


def test_both_spellings_and_sizes_agree_with_torch():
    assert dtypes.NAMES == ("float32", "bfloat16", "float16")
    for name in dtypes.NAMES:
        t = dtypes.to_torch(name)
        short = dtypes.short_name(name)
        assert dtypes.to_torch(short) is t and dtypes.canonical(short) == name
        assert dtypes.name_of(t) == name and dtypes.short_name(short) == short
        assert dtypes.element_size(short) == torch.empty(0, dtype=t).element_size()
    assert [dtypes.short_name(n) for n in dtypes.NAMES] == ["fp32", "bf16", "fp16"]
    assert dtypes.to_torch("float64") is torch.float64       # other torch names pass through
