"""Every bad model-set file gives one clear MulosdError naming the file, and `mulosd info` one line, exit 1."""

import json
import shutil

import pytest
import torch
from click.testing import CliRunner

from mulosd import zoo
from mulosd.cli import main
from mulosd.errors import MulosdError
from mulosd.io import torch_load_checked
from mulosd.pipeline import Pipeline


@pytest.fixture
def model_set(tmp_path):
    """A private copy of the shipped model set, to corrupt one file of."""
    return shutil.copytree(zoo.resolve("fmnist-32"), tmp_path / "set")


def _edit_json(path, edit):
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _core_only(manifest):
    """Keep the tokenizer, target and up-samplers of a manifest: a set that loads in a fraction of the time."""
    for key in ("drafters", "classifier", "continuous"):
        manifest.pop(key)


def _fails(directory, file_name, *phrases):
    """The Python API and the CLI both reject ``directory`` with a message naming ``file_name`` and ``phrases``."""
    with pytest.raises(MulosdError) as err:
        Pipeline.from_pretrained(str(directory))
    message = str(err.value)
    for part in (file_name, *phrases):
        assert part in message, f"{part!r} not in {message!r}"
    r = CliRunner().invoke(main, ["info", str(directory)])
    lines = r.output.strip().splitlines()
    assert r.exit_code == 1, r.output
    assert len(lines) == 1 and lines[0].startswith("Error: ") and file_name in lines[0], r.output
    assert "Traceback" not in r.output and isinstance(r.exception, SystemExit)
    return message


def test_truncated_safetensors(model_set):
    path = model_set / "target.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _fails(model_set, "target.safetensors", "not a readable safetensors file", "truncated or corrupt")


def test_empty_safetensors(model_set):
    (model_set / "tokenizer.safetensors").write_bytes(b"")
    _fails(model_set, "tokenizer.safetensors", "(0 bytes) is not a readable safetensors file")


def test_missing_weights_file(model_set):
    (model_set / "drafter_small.safetensors").unlink()
    _fails(model_set, "manifest.json", "drafters.small", "drafter_small.safetensors does not exist")


def test_manifest_not_json(model_set):
    (model_set / "manifest.json").write_text('{"tokenizer": "tokenizer",\n "target": }')
    _fails(model_set, "manifest.json", "not valid JSON", "line 2 column")


def test_manifest_json_list(model_set):
    (model_set / "manifest.json").write_text('["tokenizer", "target"]')
    _fails(model_set, "manifest.json", "must hold a JSON object", "array")


def test_manifest_missing_target(model_set):
    _edit_json(model_set / "manifest.json", lambda m: m.pop("target"))
    _fails(model_set, "manifest.json", "missing required key 'target'", "allowed: tokenizer, target (required)",
           "class_names")


def test_manifest_unknown_key_and_wrong_types(model_set):
    path = model_set / "manifest.json"
    _edit_json(path, _core_only)
    original = path.read_text()
    _edit_json(path, lambda m: m.update(drafter={"r2": "drafter_r2"}))
    _fails(model_set, "manifest.json", "unknown key 'drafter'", "allowed:")
    for key, value, phrase in [("drafters", ["drafter_r2"], "drafters must be an object"),
                               ("upsamplers", {"x": "upsampler_r2"}, "upsamplers key 'x'"),
                               ("upsamplers", {"4": "upsampler_r2"}, "a learned up-sampler for r=2"),
                               ("target", 3, "target must be a component stem"),
                               ("class_names", "sneaker", "class_names must be a list"),
                               ("continuous", {"target": "continuous_target"}, "missing required key 'continuous.tokenizer'")]:
        path.write_text(original)
        _edit_json(path, lambda m: m.update({key: value}))
        _fails(model_set, "manifest.json", phrase)


def test_config_dim_not_divisible_by_n_head(model_set):
    _edit_json(model_set / "target.json", lambda m: m["config"].update(dim=256, n_head=6))
    _fails(model_set, "target.json", "dim 256 must be divisible by n_head 6")


def test_config_not_json_or_wrong_type(model_set):
    path = model_set / "target.json"
    original = path.read_text()
    _edit_json(path, lambda m: m["config"].update(n_layer="8"))
    _fails(model_set, "target.json", "GPTConfig.n_layer must be an integer, got '8'")
    path.write_text(original[:20])
    _fails(model_set, "target.json", "not valid JSON")
    path.write_text("[]")
    _fails(model_set, "target.json", "must hold a JSON object")


def test_components_that_do_not_fit_name_the_set(model_set):
    _edit_json(model_set / "manifest.json", lambda m: (_core_only(m), m.update(upsamplers={}, class_names=["a", "b"])))
    _fails(model_set, str(model_set), "target model has 10 classes; the model set names 2")


def test_corrupt_torch_checkpoint(tmp_path):
    path = tmp_path / "checkpoint.pt"
    torch.save({"w": torch.zeros(256)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(MulosdError, match=r"checkpoint\.pt is not a readable torch checkpoint \(truncated"):
        torch_load_checked(path)
    path.write_bytes(b"")
    with pytest.raises(MulosdError, match="not a readable torch checkpoint"):
        torch_load_checked(path)
