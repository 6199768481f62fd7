"""Property: the loaders raise nothing but our error types (``USER_ERRORS``) on any input.

Random safetensors headers (random JSON in each field, random bytes) and random values for
the keys of a real config.json (ours and a foreign one) go through the public entry points.
Profiles and counts: tests/fuzz_profiles.py.
"""

from __future__ import annotations

import json
import shutil
import struct
import tempfile
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ecospa_deploy.errors import USER_ERRORS
from ecospa_deploy.loading import load_model, read_safetensors_header
from ecospa_deploy.testing import tiny_pruned, write_foreign_checkpoint
from fuzz_profiles import COUNTS, fuzz_settings

HUGE = st.sampled_from([2 ** 63, 2 ** 64, -1, 10 ** 30, 10 ** 4000])
SCALAR = st.none() | st.booleans() | st.integers(-3, 70) | HUGE | st.floats() | st.text(max_size=8)
JSON = st.recursive(SCALAR, lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=10)
DTYPE = st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "BOOL", "F8_E4M3", "X9"]) | JSON
SHAPE = st.lists(st.integers(0, 8), max_size=3) | st.lists(JSON, max_size=3) | JSON
OFFSETS = st.lists(st.integers(0, 600), min_size=2, max_size=2).map(sorted) | JSON
ENTRY = st.fixed_dictionaries({}, optional={"dtype": DTYPE, "shape": SHAPE,
                                            "data_offsets": OFFSETS}) | JSON
HEADER = st.dictionaries(st.text(max_size=12) | st.just("__metadata__"), ENTRY, max_size=4)


def _json_bytes(value) -> bytes:
    return json.dumps(value).encode()


def _accepts_or_refuses(fn, *args) -> str:
    try:
        fn(*args)
        return "accepted"
    except USER_ERRORS as exc:
        assert "\n" not in str(exc), str(exc)
        return "refused"


@pytest.fixture(scope="module")
def scratch():
    with tempfile.TemporaryDirectory() as d:
        yield Path(d)


@fuzz_settings(200, 8000)
@given(blob=HEADER.map(_json_bytes) | st.binary(max_size=200), data=st.binary(max_size=600),
       declared=st.none() | st.integers(0, 2 ** 64 - 1))
def test_fuzz_safetensors_header(scratch, blob, data, declared):
    n = len(blob) if declared is None else declared
    path = scratch / "model.safetensors"
    path.write_bytes(struct.pack("<Q", n) + blob + data)
    COUNTS["headers"] += 1
    COUNTS[f"headers_{_accepts_or_refuses(read_safetensors_header, path)}"] += 1


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz-ckpt")
    tiny_pruned("llama", 6, "sdpa").save_pretrained(root / "ours")
    foreign, _ = write_foreign_checkpoint(root / "f", "llama", 2)
    return {"ours": root / "ours", "foreign": foreign}


CONFIG_KEYS = ["hidden_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers",
               "intermediate_size", "vocab_size", "head_dim", "max_position_embeddings",
               "model_type", "rope_theta", "rms_norm_eps", "tie_word_embeddings",
               "layer_types", "attention_bias", "sliding_window", "rope_scaling",
               "torch_dtype", "architectures", "auto_map", "ecospa"]
SPEC_KEYS = ["hidden_size", "dense", "layers", "version", "rope", "gated_mlp", "provenance"]
LAYER_KEYS = ["num_attention_heads", "num_key_value_heads", "qk_head_dim", "v_head_dim",
              "intermediate_size", "softmax_scale", "rope_kept", "qkv_bias", "sliding_window"]


@st.composite
def config_edits(draw):
    """(which checkpoint, [(path of keys, new value or DELETE)])."""
    which = draw(st.sampled_from(["ours", "foreign"]))
    edits = []
    for _ in range(draw(st.integers(1, 3))):
        where = draw(st.sampled_from(["top", "spec", "layer"] if which == "ours" else ["top"]))
        if where == "top":
            path = (draw(st.sampled_from(CONFIG_KEYS)),)
        elif where == "spec":
            path = ("ecospa", draw(st.sampled_from(SPEC_KEYS)))
        else:
            path = ("ecospa", "layers", draw(st.integers(0, 3)), draw(st.sampled_from(LAYER_KEYS)))
        edits.append((path, draw(st.just("DELETE") | JSON)))
    return which, edits


def _apply(cfg, path, value) -> None:
    node = cfg
    for key in path[:-1]:
        if isinstance(node, dict) and key in node:
            node = node[key]
        elif isinstance(node, list) and isinstance(key, int) and key < len(node):
            node = node[key]
        else:
            return
    last = path[-1]
    if isinstance(node, dict):
        if value == "DELETE":
            node.pop(last, None)
        else:
            node[last] = value
    elif isinstance(node, list) and isinstance(last, int) and last < len(node):
        node[last] = value


@fuzz_settings(60, 2500)
@given(edit=config_edits())
def test_fuzz_config_values(checkpoints, scratch, edit):
    which, edits = edit
    directory = scratch / "ckpt"
    if directory.exists():
        shutil.rmtree(directory)
    shutil.copytree(checkpoints[which], directory)
    cfg = json.loads((directory / "config.json").read_text())
    for path, value in edits:
        _apply(cfg, path, value)
    (directory / "config.json").write_text(json.dumps(cfg))
    COUNTS["configs"] += 1
    COUNTS[f"configs_{_accepts_or_refuses(load_model, directory)}"] += 1
