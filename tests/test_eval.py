"""Perplexity protocol (non-overlapping windows) and `ecospa eval`."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from ecospa_deploy.cli import main
from ecospa_deploy.errors import EcospaError
from ecospa_deploy.evaluate import perplexity, windows_of
from ecospa_deploy.testing import tiny_dense, tiny_tokenizer


def test_windows_are_non_overlapping_and_drop_the_remainder():
    ids = torch.arange(23)
    w = windows_of(ids, 5)
    assert w.shape == (4, 5) and w.flatten().tolist() == list(range(20))
    with pytest.raises(EcospaError, match="shorter than one window"):
        windows_of(torch.arange(3), 5)


def test_perplexity_matches_a_direct_computation():
    model = tiny_dense("gpt2")
    ids = torch.randint(3, 90, (50,), generator=torch.Generator().manual_seed(0))
    result = perplexity(model, ids, seq_len=16, progress=False)
    nll, n = 0.0, 0
    with torch.no_grad():
        for s in range(0, 48, 16):
            w = ids[s:s + 16][None]
            logits = model(w).logits[0, :-1]
            nll += float(F.cross_entropy(logits, w[0, 1:], reduction="sum"))
            n += 15
    assert result.windows == 3 and result.tokens == n == 45
    assert math.isclose(result.perplexity, math.exp(nll / n), rel_tol=1e-5)
    batched = perplexity(model, ids, seq_len=16, batch_size=2, progress=False)
    assert math.isclose(batched.perplexity, result.perplexity, rel_tol=1e-5)


def test_seq_len_beyond_positions_is_an_error():
    model = tiny_dense("gpt2")
    with pytest.raises(EcospaError, match="positions"):
        perplexity(model, torch.arange(1000) % 90, seq_len=512, progress=False)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    tiny_dense("llama").save_pretrained(root / "m")
    tiny_tokenizer().save_pretrained(root / "m")
    (root / "heldout.txt").write_text("Whether 'tis nobler in the mind to suffer. " * 40)
    return root


def test_eval_cli_json_and_generate(checkpoint, capsys):
    rc = main(["eval", str(checkpoint / "m"), "--data", str(checkpoint / "heldout.txt"),
               "--seq-len", "32", "--json", "--generate", "To be", "--max-new-tokens", "4",
               "--device", "cpu"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["seq_len"] == 32 and out["windows"] >= 1 and out["perplexity"] > 1
    assert out["tokens"] == out["windows"] * 31
    assert isinstance(out["generation"], str) and len(out["data_sha256"]) == 64


def test_eval_cli_needs_something_to_do(checkpoint, capsys):
    assert main(["eval", str(checkpoint / "m")]) == 2
    assert "nothing to do" in capsys.readouterr().err


def test_eval_cli_short_text(checkpoint, tmp_path, capsys):
    short = tmp_path / "s.txt"
    short.write_text("To be.")
    assert main(["eval", str(checkpoint / "m"), "--data", str(short), "--seq-len", "64",
                 "--device", "cpu"]) == 2
    assert "shorter than one window" in capsys.readouterr().err
