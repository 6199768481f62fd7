"""The CLI: one dispatcher, every verb's --help, `ecospa inspect` facts and its errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ecospa_deploy.cli import VERBS, main
from ecospa_deploy.testing import tiny_pruned


def test_top_level_help(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for verb in VERBS:
        assert verb in out
    assert main([]) == 2
    assert main(["frobnicate"]) == 2
    assert "unknown verb 'frobnicate'" in capsys.readouterr().err


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_every_verb_has_help(verb, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([verb, "--help"])
    assert exit_.value.code == 0
    assert f"ecospa {verb}" in capsys.readouterr().out
    assert VERBS[verb]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    model = tiny_pruned("llama", 1)
    model.save_pretrained(path)
    return path, model


def test_inspect_json_facts(checkpoint, capsys):
    path, model = checkpoint
    assert main(["inspect", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    spec = model.config.ecospa_spec
    assert [l["intermediate_size"] for l in info["layers"]] == \
        [l.intermediate_size for l in spec.layers]
    assert [l["v_head_dim"] for l in info["layers"]] == [l.v_head_dim for l in spec.layers]
    assert info["totals"]["params"] == sum(p.numel() for p in model.parameters())
    assert info["totals"]["bytes"]["bf16"] == 2 * info["totals"]["params"]
    kv = sum(2 * (l.k_width + l.v_width) for l in spec.layers)  # bf16
    assert info["totals"]["kv_cache_bytes_per_token"]["bf16"] == kv
    assert info["totals"]["dense_kv_cache_bytes_per_token"]["bf16"] == 3 * 2 * 4 * 16 * 2
    for layer in info["layers"]:
        assert 0 < layer["percent_of_dense"] < 100


def test_inspect_table(checkpoint, capsys):
    path, _ = checkpoint
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "q_heads" in out and "% of dense" in out and "KV cache per token" in out


def test_inspect_missing_dir_is_a_clean_error(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nope")]) == 2
    assert "no such file or directory" in capsys.readouterr().err


def test_console_script_entry_point(checkpoint):
    path, _ = checkpoint
    res = subprocess.run([sys.executable, "-m", "ecospa_deploy.cli", "inspect", str(path)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "EcospaLlamaForCausalLM" in res.stdout


def test_convert_native_cli(tmp_path, capsys):
    from ecospa_deploy.testing import write_foreign_checkpoint, write_llm_pruner_pickle

    src, _ = write_foreign_checkpoint(tmp_path / "flap", "llama", 1, biases=True)
    assert main(["convert", "native", str(src), "-o", str(tmp_path / "out")]) == 0
    assert json.loads((tmp_path / "out/config.json").read_text())["model_type"] == "ecospa_llama"
    pickle = tmp_path / "pruner.bin"
    write_llm_pruner_pickle(pickle)
    assert main(["convert", "native", str(pickle), "-o", str(tmp_path / "p")]) == 2
    assert "refusing to unpickle" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()
    assert main(["convert", "native", str(pickle), "-o", str(tmp_path / "p"),
                 "--allow-pickle"]) == 0
    assert (tmp_path / "p/tokenizer.json").exists() and (tmp_path / "p/spec.py").exists()
