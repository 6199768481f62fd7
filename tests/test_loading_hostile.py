"""Loaders under hostile or broken files: each case is one clear error of our own types
(``CheckpointError``/``SpecError``, one line, naming the file), never a traceback from deeper
down, and never a model that loads with the wrong shapes."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from ecospa_deploy.errors import USER_ERRORS, CheckpointError
from ecospa_deploy.loading import load_model, read_safetensors_header
from ecospa_deploy.testing import tiny_pruned, write_foreign_checkpoint


def _raw_safetensors(path: Path, header: object | bytes, data: bytes = b"") -> Path:
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return path


def _fails_cleanly(fn, *args, match: str, error=CheckpointError) -> str:
    with pytest.raises(error, match=match) as info:
        fn(*args)
    message = str(info.value)
    assert "\n" not in message and len(message) < 600, message
    return message


HOSTILE_HEADERS = [
    ({"w": {"dtype": "F32", "shape": "4", "data_offsets": [0, 16]}}, "shape must be a list"),
    ({"w": {"dtype": "F32", "shape": [4], "data_offsets": "0,16"}}, "data_offsets"),
    ({"w": {"dtype": "F32", "shape": [4], "data_offsets": ["0", "16"]}}, "data_offsets"),
    ({"w": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, "shape must be a list"),
    ({"w": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}}, "shape must be a list"),
    ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [16, 0]}}, "data_offsets"),
    ({"w": {"dtype": 7, "shape": [4], "data_offsets": [0, 16]}}, "dtype"),
    ({"w": [1, 2]}, "expected an object"),
    ({"w": {"dtype": "F32", "shape": [10 ** 30], "data_offsets": [0, 16]}}, "spans 16 bytes"),
    ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 10 ** 30]}}, "spans"),
    ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [10 ** 30, 10 ** 30 + 16]}},
     "truncated"),
    (b'{"w": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", "nested too deeply"),
    (b'{"w": {"dtype": "F32", "shape": [' + b"9" * 5000 + b"], \"data_offsets\": [0, 4]}}",
     "corrupt safetensors header"),
    (b'{"w": NaN}', "expected an object"),
    (b"\xff\xfe{}", "corrupt safetensors header"),
    ({"w": {"dtype": "X99", "shape": [4], "data_offsets": [0, 16]}}, "not a safetensors dtype"),
    ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
      "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, "overlap"),
]


@pytest.mark.parametrize("header,fragment", HOSTILE_HEADERS,
                         ids=[str(i) for i in range(len(HOSTILE_HEADERS))])
def test_hostile_safetensors_header(tmp_path, header, fragment):
    path = _raw_safetensors(tmp_path / "model.safetensors", header, b"\0" * 16)
    message = _fails_cleanly(read_safetensors_header, path, match=fragment)
    assert str(path) in message


@pytest.fixture()
def saved(tmp_path):
    tiny_pruned("llama", 6, "sdpa").save_pretrained(tmp_path / "m")
    return tmp_path / "m"


@pytest.fixture()
def foreign(tmp_path):
    directory, _ = write_foreign_checkpoint(tmp_path, "llama", 2)
    return directory


def _edit_config(directory: Path, fn) -> Path:
    path = directory / "config.json"
    cfg = json.loads(path.read_text())
    cfg = fn(cfg) or cfg
    path.write_text(json.dumps(cfg))
    return path


def test_config_that_is_a_list(saved):
    path = _edit_config(saved, lambda c: [c])
    message = _fails_cleanly(load_model, saved, match="config.json is a JSON list; expected an "
                             "object")
    assert str(path) in message


@pytest.mark.parametrize("key,value", [("num_attention_heads", 0), ("vocab_size", 0),
                                       ("hidden_size", -64), ("head_dim", 0),
                                       ("intermediate_size", 0), ("num_hidden_layers", 0),
                                       ("num_key_value_heads", "2"), ("hidden_size", True),
                                       ("max_position_embeddings", 1.5)])
def test_foreign_config_bad_sizes(foreign, key, value):
    path = _edit_config(foreign, lambda c: c.update({key: value}))
    message = _fails_cleanly(load_model, foreign, match=f"{key}=.* is invalid; expected an "
                             "integer >= 1")
    assert str(path) in message


def test_our_config_bad_sizes(saved):
    _edit_config(saved, lambda c: c.update(vocab_size=0))
    _fails_cleanly(load_model, saved, match="vocab_size=0 is invalid")


def test_foreign_layer_count_mismatch(foreign):
    _edit_config(foreign, lambda c: c.update(num_hidden_layers=c["num_hidden_layers"] + 1))
    _fails_cleanly(load_model, foreign, match="declares 4 layers but the tensors hold 3")


def test_our_layer_count_mismatch(saved):
    """Config and spec both say 4 layers; the tensors hold 3."""
    def add_layer(c):
        c["num_hidden_layers"] = 4
        c["ecospa"]["layers"].append(c["ecospa"]["layers"][-1])
        if c.get("layer_types"):
            c["layer_types"].append(c["layer_types"][-1])
    _edit_config(saved, add_layer)
    _fails_cleanly(load_model, saved, match="declares 4 layers but the tensors hold 3")


def test_our_model_type_without_our_block(saved):
    path = _edit_config(saved, lambda c: c.pop("ecospa") and None)
    message = _fails_cleanly(load_model, saved, match="has no 'ecospa' block")
    assert str(path) in message


def test_spec_errors_name_the_file(saved):
    path = _edit_config(saved, lambda c: c["ecospa"]["layers"][0].update(qk_head_dim=5))
    message = _fails_cleanly(load_model, saved, match="layer 0: qk_head_dim=5", error=USER_ERRORS)
    assert message.startswith(str(path))


def _index(directory: Path, weight_map: dict) -> None:
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.mark.parametrize("shard", ["../outside/model.safetensors", "/etc/passwd",
                                   "sub/../../x.safetensors"])
def test_shard_paths_outside_the_directory_are_refused(saved, tmp_path, shard):
    (tmp_path / "outside").mkdir()
    (saved / "model.safetensors").rename(tmp_path / "outside" / "model.safetensors")
    _index(saved, {"model.norm.weight": shard})
    _fails_cleanly(load_model, saved, match="outside the model directory")


def test_symlinked_weights_leading_out_are_refused(saved, tmp_path):
    (tmp_path / "outside").mkdir()
    real = tmp_path / "outside" / "model.safetensors"
    (saved / "model.safetensors").rename(real)
    (saved / "model.safetensors").symlink_to(real)
    _fails_cleanly(load_model, saved, match="a symlink to .*outside the model directory")
    (saved / "model.safetensors").unlink()
    (saved / "weights").symlink_to(tmp_path / "outside", target_is_directory=True)
    _index(saved, {"model.norm.weight": "weights/model.safetensors"})
    _fails_cleanly(load_model, saved, match="a symlink to .*outside the model directory")


def test_symlink_inside_the_directory_is_fine(saved):
    (saved / "model.safetensors").rename(saved / "real.safetensors")
    (saved / "model.safetensors").symlink_to("real.safetensors")
    assert load_model(saved).config.num_hidden_layers == 3


@pytest.mark.parametrize("index", ['{"weight_map": {"a": 3}}', '{"weight_map": []}', "[1]",
                                   '{"weight_map": {}}', "{" * 50_000])
def test_bad_index_is_refused(saved, index):
    (saved / "model.safetensors.index.json").write_text(index)
    _fails_cleanly(load_model, saved, match="safetensors index")


@pytest.mark.parametrize("key", ["num_key_value_heads", "head_dim", "hidden_size"])
def test_foreign_huge_sizes_are_refused_before_allocating(foreign, key):
    """Found by the long config fuzz run: a huge count sized the spec from the config (a
    MemoryError) before anything compared it with the tensors."""
    _edit_config(foreign, lambda c: c.update({key: 10 ** 30}))
    _fails_cleanly(load_model, foreign, match=f"{key}=1000.* exceeds every tensor dimension")


def test_foreign_huge_layer_count_is_refused(foreign):
    _edit_config(foreign, lambda c: c.update(num_hidden_layers=2 ** 63 - 1))
    _fails_cleanly(load_model, foreign, match="declares 9223372036854775807 layers but the "
                   "tensors hold 3")


def test_transformers_config_validation_is_ours(saved):
    """Our config with a hidden size transformers rejects (not a multiple of the heads)."""
    _edit_config(saved, lambda c: c.update(hidden_size=70))
    _fails_cleanly(load_model, saved, match="cannot build .*StrictDataclass")


@pytest.mark.parametrize("name", ["config.json", "tokenizer_config.json", "chat_template.jinja"])
def test_any_file_symlinked_out_of_the_directory_is_refused(saved, tmp_path, name):
    """Once only weights were checked: a chat template linked to a file outside was read and
    served."""
    from ecospa_deploy.loading import load_tokenizer

    outside = tmp_path / "secret.txt"
    outside.write_text("{}")
    if (saved / name).exists():
        (saved / name).unlink()
    (saved / name).symlink_to(outside)
    _fails_cleanly(load_tokenizer, saved, match="a symlink to .*outside the model directory")
    _fails_cleanly(load_model, saved, match="a symlink to .*outside the model directory")


def test_a_hub_cache_snapshot_links_into_its_blobs(saved, tmp_path):
    snap = tmp_path / "hub" / "models--org--tiny" / "snapshots" / "abc123"
    blobs = tmp_path / "hub" / "models--org--tiny" / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for f in saved.iterdir():
        f.rename(blobs / f.name)
        (snap / f.name).symlink_to(Path("../../blobs") / f.name)
    assert load_model(snap).config.num_hidden_layers == 3


def _rewrite_header(path: Path, edit) -> None:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    edit(header)
    _raw_safetensors(path, header, raw[8 + n:])


def _cli(*argv: str) -> tuple[int, str]:
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "ecospa_deploy.cli", *argv],
                          capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stderr


def _x99(header):
    header[next(k for k in header if k != "__metadata__")]["dtype"] = "X99"


def _overlap(header):
    names = sorted((v["data_offsets"][0], k) for k, v in header.items() if k != "__metadata__")
    first, second = header[names[0][1]], header[names[1][1]]
    size = second["data_offsets"][1] - second["data_offsets"][0]
    second["data_offsets"] = [first["data_offsets"][0], first["data_offsets"][0] + size]


def _config(edit):
    def apply(directory: Path) -> None:
        cfg = json.loads((directory / "config.json").read_text())
        edit(cfg)
        (directory / "config.json").write_text(json.dumps(cfg))
    return apply


@pytest.mark.parametrize("corrupt", [
    lambda d: _rewrite_header(d / "model.safetensors", _x99),
    lambda d: _rewrite_header(d / "model.safetensors", _overlap),
    _config(lambda c: c["ecospa"]["layers"][0].update(intermediate_size=True)),
    _config(lambda c: c["ecospa"]["layers"][0].update(intermediate_size=10 ** 30)),
    _config(lambda c: (c["ecospa"]["layers"].pop(), c.update(num_hidden_layers=2))),
], ids=["dtype-X99", "overlapping-bytes", "ffn-true", "ffn-1e30", "2-layers-of-3"])
def test_every_verb_refuses_a_corrupt_directory_alike(saved, corrupt):
    """Once eval/serve printed tracebacks and inspect exited 0 on these: one validation now."""
    corrupt(saved)
    for verb in (["inspect", str(saved)], ["eval", str(saved), "--generate", "x",
                                           "--max-new-tokens", "1"]):
        code, err = _cli(*verb)
        assert code == 2 and "Traceback" not in err and err.startswith("error: "), (verb, err)
