"""Config loading: inheritance, overrides, and errors that name the key, the file and the fix."""
from __future__ import annotations

import os

import pytest

from conftest import ROOT
from sail_dist.config import ConfigError, load_config


def _write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_base_inheritance_and_overrides(tmp_path):
    base = os.path.join(ROOT, "configs", "model", "tiny_moe.yaml")
    path = _write(tmp_path, "run.yaml", f"base: {base}\ndata: {{demo: true}}\ntrain: {{lr: 3.0e-4}}\n")
    cfg = load_config(path, ["model.llm.num_layers=2", "train.adam_betas=[0.9, 0.99]"])
    assert cfg.model.llm.num_experts == 8 and cfg.model.llm.vocab_size == 1024  # from tiny_moe <- tiny
    assert cfg.train.lr == 3e-4 and cfg.model.llm.num_layers == 2 and cfg.train.adam_betas == [0.9, 0.99]


def test_unknown_key_suggests_and_names_file(tmp_path):
    path = _write(tmp_path, "bad.yaml", "data: {demo: true}\ntrain: {learning_rate: 1.0}\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'train.learning_rate' \(from .*bad.yaml\)"):
        load_config(path)
    path = _write(tmp_path, "bad2.yaml", "data: {demo: true}\nmodel: {llm: {num_layer: 2}}\n")
    with pytest.raises(ConfigError, match=r"did you mean 'model.llm.num_layers'"):
        load_config(path)


def test_wrong_type_and_impossible_values(tmp_path):
    path = _write(tmp_path, "t.yaml", "data: {demo: true}\ntrain: {steps: ten}\n")
    with pytest.raises(ConfigError, match=r"'train.steps' \(from .*t.yaml\): expected an integer, got 'ten'"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"'model.llm.num_kv_heads' .*multiple of num_kv_heads=3"):
        load_config(None, ["data.demo=true", "model.llm.num_kv_heads=3"])
    with pytest.raises(ConfigError, match=r"'parallel.ep' \(from command line\): 8 experts cannot be split over ep=3"):
        load_config(os.path.join(ROOT, "configs", "model", "tiny_moe.yaml"),
                    ["data.demo=true", "backend.name=npu", "parallel.ep=3"])
    with pytest.raises(ConfigError, match=r"'backend.offload_optimizer' .*'gpu' is not one of 'none', 'cpu'"):
        load_config(None, ["data.demo=true", "backend.offload_optimizer=gpu"])
    with pytest.raises(ConfigError, match=r"'backend.offload_chunk' .*multiple of 4096 elements, got 1000"):
        load_config(None, ["data.demo=true", "backend.offload_chunk=1000"])
    with pytest.raises(ConfigError, match=r"'backend.offload_ratio' .*must be in \(0, 1\].*got 1.5"):
        load_config(None, ["data.demo=true", "backend.offload_optimizer=cpu", "backend.offload_ratio=1.5"])
    with pytest.raises(ConfigError, match=r"'backend.offload_ratio' .*chunked host step.*offload_optimizer=none"):
        load_config(None, ["data.demo=true", "backend.offload_ratio=0.5"])
    with pytest.raises(ConfigError, match=r"'backend.offload_ratio' .*torch_adam=True"):
        load_config(None, ["data.demo=true", "backend.offload_optimizer=cpu", "backend.torch_adam=true",
                           "backend.offload_ratio=0.5"])
    with pytest.raises(ConfigError, match=r"'backend.reduce_bucket_size' .*positive number of elements, got 0"):
        load_config(None, ["data.demo=true", "backend.reduce_bucket_size=0"])


def test_no_data_is_an_error():
    with pytest.raises(ConfigError, match=r"'data.sources'.*set data.demo=true"):
        load_config(None, [])


def test_missing_file_and_cycle(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(str(tmp_path / "nope.yaml"))
    a = _write(tmp_path, "a.yaml", "base: b.yaml\n")
    _write(tmp_path, "b.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError, match="inheritance cycle"):
        load_config(a)


def test_npu_backend_refuses_compile_with_the_reason():
    with pytest.raises(ConfigError, match=r"train.compile.*npu backend does not apply torch.compile"):
        load_config(None, ["data.demo=true", "backend.name=npu", "train.compile=true"])
