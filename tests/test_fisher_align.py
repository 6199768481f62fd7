"""The Fisher pass pads FFN widths for aligned GEMMs: it must give the sums of the unpadded pass
and hand the model back bit for bit (same weights, spec and requires_grad flags)."""

from __future__ import annotations

import pytest
import torch

from ecospa_deploy.prune.fisher import calibration_fisher
from ecospa_deploy.testing import FAMILIES, VOCAB, random_masks, tiny_dense
from ecospa_deploy.prune.surgery import slice_model


def _odd_widths(family: str):
    model = tiny_dense(family, seed=3).double()
    # prune to odd, per-layer FFN widths (and per-layer heads): the misaligned case
    slice_model(model, random_masks(model, seed=5))
    assert any(layer.intermediate_size % 8 for layer in model.config.ecospa_spec.layers)
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_padded_pass_equals_unpadded(family):
    model = _odd_widths(family)
    windows = torch.randint(3, VOCAB, (4, 16), generator=torch.Generator().manual_seed(0))
    model.decoder_layers[0].requires_grad_(False)   # a flag the pass must hand back
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {k: p.requires_grad for k, p in model.named_parameters()}
    spec = model.config.ecospa_spec

    plain = calibration_fisher(model, windows, batch_size=2, align=0)
    padded = calibration_fisher(model, windows, batch_size=2, align=8)

    assert model.config.ecospa_spec == spec
    assert {k: p.requires_grad for k, p in model.named_parameters()} == flags
    after = model.state_dict()
    assert after.keys() == state.keys()
    assert all(torch.equal(after[k], state[k]) for k in state)
    assert padded.count == plain.count == 2
    for i in range(spec.num_layers):
        a, b = plain.mean(i), padded.mean(i)
        assert a.keys() == b.keys()
        for name in a:
            assert a[name].shape == b[name].shape, name
            torch.testing.assert_close(b[name], a[name], rtol=1e-9, atol=1e-14)
    # the scored gradients are real: an all-zero Fisher would pass the comparison above
    assert float(sum(plain.mean(spec.num_layers - 1)[n].sum() for n in a)) > 0
