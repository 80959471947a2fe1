"""Hostile or broken files give one named error, never a traceback and never a model built
from the wrong bytes: safetensors headers (fuzzed), indexes, config.json of the wrong types
or sizes, symlink loops, binary files, NaN or infinite scales."""

import json
import os
import struct

import hypothesis
import hypothesis.strategies as st
import numpy as np
import pytest
from test_slp import fp8_dir  # noqa: F401 (fixture)

from refmoe import cli
from refmoe.checkpoint import Checkpoint, Shard, save_file
from refmoe.config import ModelConfig


def _write(path, header, data: bytes) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def _valid(tmp_path):
    """A two-tensor shard and its header."""
    p = tmp_path / "model.safetensors"
    save_file(
        {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.arange(4, dtype=np.int16)}, p
    )
    (n,) = struct.unpack("<Q", p.read_bytes()[:8])
    return json.loads(p.read_bytes()[8 : 8 + n]), p.read_bytes()[8 + n :]


@pytest.mark.parametrize(
    "mutate,needle",
    [
        (lambda h: [h], "must be a JSON object"),
        (lambda h: {**h, "a": [1, 2]}, "entry must be an object"),
        (
            lambda h: {**h, "a": {k: v for k, v in h["a"].items() if k != "data_offsets"}},
            "data_offsets",
        ),
        (lambda h: {**h, "a": {**h["a"], "data_offsets": [-8, 16]}}, "data_offsets"),
        (lambda h: {**h, "b": {**h["b"], "data_offsets": [0, 8]}}, "overlap"),  # shares a's bytes
        (lambda h: {**h, "a": {**h["a"], "shape": [2, -3]}}, "shape"),
        (lambda h: {**h, "a": {**h["a"], "shape": "2x3"}}, "shape"),
        (lambda h: {**h, "a": {**h["a"], "dtype": "F4"}}, "dtype"),
        (lambda h: {**h, "a": {**h["a"], "data_offsets": [0, 10**9]}}, "holds"),
        (lambda h: {**h, "__metadata__": [1]}, "__metadata__"),
    ],
)
def test_bad_headers_are_named(tmp_path, mutate, needle):
    header, data = _valid(tmp_path)
    p = tmp_path / "bad.safetensors"
    _write(p, mutate(header), data)
    with pytest.raises(ValueError, match=needle) as e:
        Shard(p)
    assert str(p) in str(e.value)


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=5),
    lambda kids: (
        st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=5), kids, max_size=3)
    ),
    max_leaves=8,
)
_field = st.sampled_from(["dtype", "shape", "data_offsets", "extra"])


@hypothesis.settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[hypothesis.HealthCheck.function_scoped_fixture],
)
@hypothesis.given(
    edits=st.lists(
        st.tuples(
            st.sampled_from(["a", "b", "c"]),
            _field,
            _json | st.lists(st.integers(-40, 80), max_size=3),
        ),
        max_size=4,
    ),
    whole=st.none() | _json,
    trim=st.integers(0, 40),
)
def test_fuzzed_headers_load_or_name_the_error(tmp_path, edits, whole, trim):
    """Any header: either a named ValueError, or tensors that each lie inside the data section,
    hold dtype x shape bytes and share no byte with another."""
    header, data = _valid(tmp_path)
    for name, key, value in edits:
        entry = header.setdefault(name, {})
        if isinstance(entry, dict):
            entry[key] = value
    if whole is not None and isinstance(whole, dict) is False and len(edits) % 2:
        header = whole
    p = tmp_path / "fuzz.safetensors"
    _write(p, header, data[: len(data) - trim])
    try:
        shard = Shard(p)
    except ValueError as e:
        assert str(p) in str(e)
        return
    spans = []
    for name in shard.entries:
        a = shard.array(name)
        begin, end = shard.entries[name]["data_offsets"]
        assert a.nbytes == end - begin and end <= len(data) - trim
        spans.append((begin, end))
    spans = sorted(s for s in spans if s[1] > s[0])
    assert all(b0 >= a1 for (_, a1), (b0, _) in zip(spans, spans[1:]))


def test_bad_index_files(tmp_path):
    header, data = _valid(tmp_path)
    idx = tmp_path / "model.safetensors.index.json"
    for doc, needle in (
        ([1, 2], "weight_map"),
        ({"weight_map": [1]}, "weight_map"),
        ({"weight_map": {"a": 3}}, "weight_map"),
        ({"weight_map": {"a": "../model.safetensors"}}, "in the model dir"),
    ):
        idx.write_text(json.dumps(doc))
        with pytest.raises(ValueError, match=needle):
            Checkpoint(tmp_path)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_scales_are_refused_by_name(tmp_path, bad):
    scale = np.ones((2, 2), np.float32)
    scale[1, 0] = bad
    save_file({"w.weight_scale_inv": scale}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"w\.weight_scale_inv.*\(1, 0\).*finite"):
        Checkpoint(tmp_path).get("w.weight_scale_inv")


def _config(fp8_dir):  # noqa: F811
    return json.loads((fp8_dir / "config.json").read_text())


@pytest.mark.parametrize(
    "edit,needle",
    [
        (lambda c: [c], "must be a JSON object"),
        (lambda c: "config", "must be a JSON object"),
        (lambda c: {**c, "hidden_size": 0}, "'hidden_size' must be positive"),
        (lambda c: {**c, "n_routed_experts": -4}, "'n_routed_experts' must be"),
        (lambda c: {**c, "moe_intermediate_size": 0}, "'moe_intermediate_size' must be positive"),
        (lambda c: {**c, "kv_lora_rank": "512"}, "'kv_lora_rank' must be an integer"),
        (lambda c: {**c, "rope_scaling": "yarn"}, "'rope_scaling' must be an object"),
        (lambda c: {**c, "quantization_config": [1]}, "'quantization_config' must be an object"),
        (lambda c: {**c, "architectures": "DeepseekV3ForCausalLM"}, "'architectures' must be a "),
        (lambda c: {**c, "rms_norm_eps": "small"}, "'rms_norm_eps' must be a finite number"),
        (lambda c: {**c, "eos_token_id": "</s>"}, "eos_token_id"),
        (lambda c: {**c, "max_position_embeddings": 0}, "'max_position_embeddings' must be"),
    ],
)
def test_bad_configs_name_the_field(fp8_dir, tmp_path, edit, needle, capsys):  # noqa: F811
    for f in fp8_dir.iterdir():
        (tmp_path / f.name).symlink_to(f)
    (tmp_path / "config.json").unlink()
    (tmp_path / "config.json").write_text(json.dumps(edit(_config(fp8_dir))))
    with pytest.raises(ValueError, match=needle):
        ModelConfig.from_file(tmp_path)
    # the command line: one line naming the file and the field, non-zero, no traceback
    rc = cli.main(
        ["generate", "--model", str(tmp_path), "--prompt-ids", "1,2", "--max-tokens", "2"]
    )
    err = capsys.readouterr().err
    assert rc != 0 and "config.json" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err


def test_unreadable_model_directories(tmp_path, capsys):
    loop = tmp_path / "loop"
    loop.mkdir()
    os.symlink(loop / "config.json", loop / "config.json")
    binary = tmp_path / "blob"
    binary.write_bytes(bytes(range(256)) * 4)
    for model, needle in (
        (loop, "cannot be read"),
        (binary, "not valid JSON"),
        (tmp_path / "absent", "not found"),
    ):
        rc = cli.main(["generate", "--model", str(model), "--prompt-ids", "1", "--max-tokens", "1"])
        err = capsys.readouterr().err
        assert rc != 0 and needle in err and "Traceback" not in err, err


def test_unexpected_errors_are_one_line_unless_debug(fp8_dir, monkeypatch, capsys):  # noqa: F811
    from refmoe import models

    def broken(*a, **k):
        raise KeyError("weight_map")

    monkeypatch.setattr(models, "load", broken)
    args = ["generate", "--model", str(fp8_dir), "--prompt-ids", "1", "--max-tokens", "1"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "KeyError" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    with pytest.raises(KeyError):
        cli.main(args + ["--debug"])
