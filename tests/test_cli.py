import json
import shutil

import pytest
from click.testing import CliRunner

from mulosd.cli import main
from mulosd.models.gpt import GPT, GPTConfig
from mulosd.zoo import resolve


def run(*args):
    return CliRunner().invoke(main, list(args))


def test_generate_writes_grid_and_stats(tmp_path):
    out, stats = tmp_path / "g.png", tmp_path / "s.json"
    r = run("generate", "--classes", "0,sneaker", "--num-per-class", "2", "--batch-size", "3", "--seed", "1",
            "--top-k", "100", "--top-p", "0.9", "--out", str(out), "--stats-json", str(stats), "--no-progress")
    assert r.exit_code == 0, r.output
    from PIL import Image

    img = Image.open(out)
    assert img.size[0] > 2 * 96 and img.size[1] > 2 * 96  # two rows of two 96-px tiles plus labels
    s = json.loads(stats.read_text())
    assert s["num_images"] == 4 and s["method"] == "ar" and s["batch_size"] == 3
    assert s["sampling"] == {"cfg_scale": 3.0, "temperature": 1.0, "top_k": 100, "top_p": 0.9}


def test_help_documents_every_option():
    r = run("generate", "--help")
    for opt in ("--method", "--classes", "--num-per-class", "--batch-size", "--seed", "--cfg-scale", "--temperature",
                "--top-k", "--top-p", "--out", "--stats-json", "--model", "--param", "--gamma", "--drafter", "--window",
                "--init", "--coupling", "--k", "--delta", "--lam", "--group", "--prob-tol", "--embed-tol"):
        assert opt in r.output


@pytest.mark.parametrize("args,code,msg", [
    (["--classes", "0,cat"], 1, "unknown class 'cat'"),
    (["--classes", "12"], 1, "class id 12 out of range"),
    (["--num-per-class", "0"], 2, "0 is not in the range"),
    (["--batch-size", "-1"], 2, "not in the range"),
    (["--cfg-scale", "-1"], 1, "cfg scale -1.0 out of range"),
    (["--temperature", "11"], 1, "temperature 11.0 out of range"),
    (["--top-k", "-3"], 1, "top-k -3 out of range"),
    (["--top-p", "0"], 1, "top-p 0.0 out of range"),
    (["--method", "magic"], 1, "unknown method 'magic'"),
    (["--model", "nowhere"], 1, "no model set 'nowhere'"),
    (["--method", "sd", "--gamma", "0"], 1, "gamma must be an integer >= 1, got 0"),
    (["--method", "sjd", "--window", "0"], 1, "window must be an integer >= 1, got 0"),
    (["--method", "zipar", "--window", "0"], 1, "window must be an integer >= 1, got 0"),
    (["--method", "lantern", "--delta", "1.5"], 1, "delta must be a number in [0.0, 1.0], got 1.5"),
    (["--method", "lantern", "--k", "600"], 1, "k must be at most 511"),
    (["--method", "sd", "--drafter", "r2"], 1, "works on a 8x8 grid; this method needs 16x16"),
    (["--method", "mcsjd", "--coupling", "none"], 1, "mcsjd needs a coupling"),
    (["--method", "ar", "--gamma", "3"], 1, "method 'ar' takes no --gamma"),
])
def test_bad_generate_inputs(tmp_path, args, code, msg):
    out = tmp_path / "x.png"
    r = run("generate", "--num-per-class", "1", "--classes", "0", *args, "--out", str(out), "--no-progress")
    assert r.exit_code == code and msg in r.output, r.output
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_unwritable_outputs(tmp_path):
    (tmp_path / "f").write_text("")
    r = run("generate", "--classes", "0", "--num-per-class", "1", "--out", str(tmp_path / "f" / "x.png"))
    assert r.exit_code == 1 and "cannot create the directory" in r.output
    r = run("generate", "--classes", "0", "--num-per-class", "1", "--out", str(tmp_path / "x.jpg"))
    assert r.exit_code == 1 and "must end in .png" in r.output


def _copy_zoo(tmp_path):
    dst = tmp_path / "set"
    shutil.copytree(resolve("fmnist-32"), dst)
    return dst


def test_checkpoint_config_mismatch(tmp_path):
    d = _copy_zoo(tmp_path)
    meta = json.loads((d / "target.json").read_text())
    meta["config"]["dim"] = 96  # a valid config (6 heads of 16) that the stored weights do not fit
    (d / "target.json").write_text(json.dumps(meta))
    r = run("generate", "--model", str(d), "--classes", "0", "--num-per-class", "1", "--out", str(tmp_path / "o.png"))
    assert r.exit_code == 1 and "has shape" in r.output and "config implies" in r.output
    assert not (tmp_path / "o.png").exists()


def test_tokenizer_vocab_mismatch(tmp_path):
    d = _copy_zoo(tmp_path)
    GPT(GPTConfig(vocab_size=300, grid_size=16, dim=32, n_layer=1, n_head=4)).save_pretrained(d / "target")
    r = run("generate", "--model", str(d), "--classes", "0", "--num-per-class", "1", "--out", str(tmp_path / "o.png"))
    assert r.exit_code == 1 and "vocab_size 300 does not match the tokenizer's codebook size 512" in r.output


def test_method_options_reach_the_method(tmp_path):
    stats = tmp_path / "s.json"
    r = run("generate", "--method", "lantern", "--gamma", "4", "--k", "5", "--delta", "0.2", "--classes", "1",
            "--num-per-class", "1", "--out", str(tmp_path / "g.png"), "--stats-json", str(stats), "--no-progress")
    assert r.exit_code == 0, r.output
    s = json.loads(stats.read_text())
    assert s["params"] == {"gamma": 4, "drafter": "small", "k": 5, "delta": 0.2, "lam": None}
    assert s["acceptance_rate"] is not None and s["step_compression"] > 1


def test_info_and_methods():
    r = run("info")
    assert r.exit_code == 0 and "target" in r.output and "r2" in r.output
    r = run("methods")
    assert r.exit_code == 0 and "ar" in r.output
