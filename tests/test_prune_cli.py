"""`ecospa prune` end to end on a tiny checkpoint, and its refusals (nothing written on error)."""

from __future__ import annotations

import json

import pytest
import torch

from ecospa_deploy.cli import main
from ecospa_deploy.loading import load_model
from ecospa_deploy.prune.mask import LayerMask
from ecospa_deploy.prune.surgery import zero_out
from ecospa_deploy.prune.tracking import count_params
from ecospa_deploy.testing import tiny_dense, tiny_tokenizer

TEXT = ("To be, or not to be, that is the question: Whether 'tis nobler in the mind to suffer "
        "the slings and arrows of outrageous fortune, or to take arms against a sea of troubles. ")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    model = tiny_dense("llama")
    model.save_pretrained(root / "dense")
    tiny_tokenizer().save_pretrained(root / "dense")
    (root / "calib.txt").write_text(TEXT * 20)
    return root


def _prune(checkpoint, out, *extra):
    return main(["prune", str(checkpoint / "dense"), "-o", str(out), "--calib",
                 str(checkpoint / "calib.txt"), "--samples", "2", "--seq-len", "24",
                 "--device", "cpu", *extra])


@pytest.mark.parametrize("method,extra", [("ecospa", ["--top-k", "0.5", "--theta", "0.7"]),
                                          ("numerical", []), ("uncoupled", []),
                                          ("magnitude", ["--align", "8"])])
def test_prune_cli_writes_a_loadable_checkpoint(checkpoint, tmp_path, capsys, method, extra):
    out = tmp_path / "out"
    assert _prune(checkpoint, out, "--target-size", "0.7", "--method", method, *extra) == 0
    text = capsys.readouterr().out
    assert "params" in text and "layer" in text and str(out) in text
    dense = load_model(checkpoint / "dense")
    pruned = load_model(out)
    target = round(0.7 * count_params(dense))
    assert abs(count_params(pruned) - target) <= 0.02 * target
    prov = pruned.config.ecospa_spec.provenance
    assert prov["method"] == method and len(prov["calibration"]["sha256"]) == 64
    if method in ("ecospa", "magnitude"):     # these never rewrite kept weights
        masks = [LayerMask(**{k: v for k, v in kept.items()}) for kept in prov["kept"]]
        ref = load_model(checkpoint / "dense")
        zero_out(ref, masks)
        x = torch.randint(3, 90, (1, 16))
        torch.testing.assert_close(pruned(x).logits, ref(x).logits, atol=2e-5, rtol=0)
    if method == "magnitude":
        for layer in pruned.config.ecospa_spec.layers:
            assert layer.intermediate_size % 8 == 0 and layer.q_width % 8 == 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_prune_cli_recovery_and_json(checkpoint, tmp_path, capsys):
    out = tmp_path / "rec"
    assert _prune(checkpoint, out, "--target-size", "0.8", "--method", "magnitude",
                  "--recover-steps", "3", "--json") == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["recovery"]["steps"] == 3
    assert load_model(out).config.ecospa_spec.provenance["recovery"]["steps"] == 3


@pytest.mark.parametrize("target", ["1.0", "1.5", "0", "-0.3"])
def test_bad_target_writes_nothing(checkpoint, tmp_path, capsys, target):
    out = tmp_path / "bad"
    assert _prune(checkpoint, out, "--target-size", target) == 2
    assert "--target-size" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.iterdir())


def test_short_calibration_text_writes_nothing(checkpoint, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("To be.")
    out = tmp_path / "bad"
    rc = main(["prune", str(checkpoint / "dense"), "-o", str(out), "--calib", str(short),
               "--samples", "2", "--seq-len", "24", "--device", "cpu"])
    assert rc == 2
    assert "shorter than one window" in capsys.readouterr().err
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["short.txt"]


def test_unsupported_family_writes_nothing(checkpoint, tmp_path, capsys):
    foreign = tmp_path / "bert"
    foreign.mkdir()
    (foreign / "config.json").write_text(json.dumps({"model_type": "bert"}))
    out = tmp_path / "bad"
    rc = main(["prune", str(foreign), "-o", str(out), "--calib", str(checkpoint / "calib.txt")])
    assert rc == 2
    assert "bert" in capsys.readouterr().err
    assert not out.exists()


def test_existing_output_is_refused(checkpoint, tmp_path, capsys):
    out = tmp_path / "exists"
    out.mkdir()
    assert _prune(checkpoint, out, "--method", "magnitude") == 2
    assert "already exists" in capsys.readouterr().err


def test_seq_len_beyond_positions_is_refused(checkpoint, tmp_path, capsys):
    out = tmp_path / "bad"
    rc = main(["prune", str(checkpoint / "dense"), "-o", str(out), "--calib",
               str(checkpoint / "calib.txt"), "--seq-len", "4096", "--device", "cpu"])
    assert rc == 2 and not out.exists()
    assert "positions" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["ecospa", "numerical", "magnitude"])
def test_unreachable_target_writes_nothing(checkpoint, tmp_path, capsys, method):
    out = tmp_path / "bad"
    assert _prune(checkpoint, out, "--target-size", "0.05", "--method", method) == 2
    assert "parameters" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.iterdir())
