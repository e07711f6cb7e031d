import json

import pytest
import torch

from mulosd.errors import MulosdError
from mulosd.io import atomic_write, atomic_write_json, check_writable
from mulosd.models.gpt import GPT, GPTConfig
from mulosd.models.vq import VQConfig, VQModel


def test_config_travels_with_weights(tmp_path):
    m = GPT(GPTConfig(grid_size=4, dim=32, n_layer=1, n_head=4, vocab_size=20))
    m.save_pretrained(tmp_path / "g", dtype=torch.float16)
    meta = json.loads((tmp_path / "g.json").read_text())
    assert meta["kind"] == "gpt" and meta["config"]["grid_size"] == 4
    loaded = GPT.from_pretrained(tmp_path / "g")
    assert loaded.output.weight.dtype == torch.float32
    assert torch.allclose(loaded.output.weight, m.output.weight.half().float())


def test_config_weight_mismatch_and_wrong_kind(tmp_path):
    GPT(GPTConfig(grid_size=4, dim=32, n_layer=1, n_head=4, vocab_size=20)).save_pretrained(tmp_path / "g")
    meta = json.loads((tmp_path / "g.json").read_text())
    meta["config"]["dim"] = 64
    (tmp_path / "g.json").write_text(json.dumps(meta))
    with pytest.raises(MulosdError, match="shape"):
        GPT.from_pretrained(tmp_path / "g")
    meta["config"]["colour"] = 1
    (tmp_path / "g.json").write_text(json.dumps(meta))
    with pytest.raises(MulosdError, match="unknown GPTConfig fields"):
        GPT.from_pretrained(tmp_path / "g")
    VQModel(VQConfig(channels=8, z_channels=8, codebook_size=16)).save_pretrained(tmp_path / "v")
    with pytest.raises(MulosdError, match="expected 'gpt'"):
        GPT.from_pretrained(tmp_path / "v")


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    path = tmp_path / "r.json"
    atomic_write_json(path, {"a": 1})

    def boom(tmp):
        open(tmp, "w").write("partial")
        raise RuntimeError("crash mid-write")

    with pytest.raises(RuntimeError):
        atomic_write(path, boom)
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_check_writable(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(MulosdError, match="cannot create"):
        check_writable(tmp_path / "file" / "sub" / "out.png")
    with pytest.raises(MulosdError, match="is a directory"):
        check_writable(tmp_path)


def test_replace_marked_block(tmp_path):
    from mulosd.io import replace_marked_block

    doc = tmp_path / "d.md"
    doc.write_text("head\n<!-- a:start -->\nold\n<!-- a:end -->\ntail\n")
    replace_marked_block(doc, "a", "new 1\nnew 2\n")
    assert doc.read_text() == "head\n<!-- a:start -->\nnew 1\nnew 2\n<!-- a:end -->\ntail\n"
    with pytest.raises(MulosdError, match="no <!-- b:start --> / <!-- b:end --> markers"):
        replace_marked_block(doc, "b", "x")
    assert "new 1" in doc.read_text()
