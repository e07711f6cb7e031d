import json
import shutil

import pytest
import torch
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
    assert s["sampling"] == {"cfg_scale": 3.0, "temperature": 1.0, "top_k": 100, "top_p": 0.9,
                             "cfg_convention": "mulosd", "cfg_interval": -1}


def _generate_options():
    import click

    cmd = main.commands["generate"]
    return cmd.get_params(click.Context(cmd))


def test_help_documents_every_option():
    r = run("generate", "--help")
    assert r.exit_code == 0, r.output
    options = _generate_options()
    flags = {opt for p in options for opt in (*p.opts, *p.secondary_opts)}
    for flag in flags:
        assert flag in r.output, flag
    for p in options:
        assert p.help and p.help.strip(), p.opts
    # the flags the docs and tests use, and one per parameter of every method (model: --param model=...)
    for flag in ("--method", "--classes", "--num-per-class", "--batch-size", "--seed", "--cfg-scale", "--temperature",
                 "--top-k", "--top-p", "--out", "--stats-json", "--model", "--param", "--gamma", "--drafter", "--window",
                 "--init", "--coupling", "--k", "--delta", "--lam", "--group", "--prob-tol", "--embed-tol", "--r",
                 "--rows", "--drafting", "--draft-window", "--upsampler", "--downsampler", "--candidates", "--resize",
                 "--acceptance", "--tau", "--rejection", "--radius", "--resampling", "--island-window", "--prefill",
                 "--align", "--no-align", "--relax", "--independent", "--prefix-accept", "--max-tries",
                 "--acceptance-map", "--acceptance-gif", "--progress", "--no-progress"):
        assert flag in flags, flag
    from mulosd.decoding.methods import REGISTRY

    for name, cls in REGISTRY.items():
        for key in cls.param_names():
            assert key == "model" or "--" + key.replace("_", "-") in flags, (name, key)


def test_shared_options_explain_every_method():
    by_name = {p.name: p.help for p in _generate_options()}
    assert by_name["k"].startswith("lantern: ") and "mulo: " in by_name["k"]
    assert "default 20" in by_name["k"] and "default 32" in by_name["k"] and "integer >= 0" in by_name["k"]
    assert by_name["window"].startswith("sjd, mcsjd, pjd, gsd: ") and "zipar: " in by_name["window"]
    assert "default sd 3, lantern 8, cspd 4" in by_name["gamma"]
    assert "default --prefix-accept" in by_name["independent"]


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
    (["--method", "sd", "--k", "3", "--tau", "0.1"], 1, "method 'sd' takes no --k, --tau; its parameters: gamma, drafter"),
    (["--method", "sd", "--independent"], 1, "method 'sd' takes no --independent"),
    (["--method", "sd", "--param", "tau=0.1"], 1, "method 'sd' has no parameters named 'tau'; allowed: gamma, drafter"),
    (["--method", "sd", "--param", "gamma"], 1, "--param 'gamma' must look like KEY=VALUE"),
    (["--method", "sd", "--gamma", "x"], 2, "'x' is not an integer >= 1"),
    (["--method", "mulo", "--radius", "x"], 2, "'x' is not an integer >= 0 or inf"),
    (["--method", "mulo", "--radius", "-1"], 1, "radius must be an integer >= 0 or inf, got -1"),
    (["--method", "mulo", "--tau", "2"], 1, "tau must be a number in (0.0, 1.0], got 2.0"),
    (["--method", "mulo", "--rejection", "global"], 1, "rejection must be one of raster, naive_local, local"),
    (["--method", "mulo", "--param", "tau=0"], 1, "tau must be a number in (0.0, 1.0], got 0"),
    (["--method", "lantern", "--lam", "2", "--delta", "0.3"], 1, "lam replaces delta"),
    (["--method", "lantern", "--k", "-1"], 1, "k must be an integer >= 0, got -1"),
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


def test_method_flags_and_string_forms_reach_the_method(tmp_path):
    stats = tmp_path / "s.json"
    r = run("generate", "--method", "ar", "--param", "model=r4", "--classes", "2", "--num-per-class", "1",
            "--out", str(tmp_path / "g.png"), "--stats-json", str(stats), "--no-progress")
    assert r.exit_code == 0, r.output
    s = json.loads(stats.read_text())
    assert s["params"] == {"model": "r4"} and s["tokens_per_image"] == 16
    r = run("generate", "--method", "mulo", "--radius", "inf", "--r", "4", "--param", "rows=2", "--classes", "2",
            "--num-per-class", "1", "--out", str(tmp_path / "g.png"), "--stats-json", str(stats), "--no-progress")
    assert r.exit_code == 0, r.output
    p = json.loads(stats.read_text())["params"]  # resolved: the drafter role and the down-sampler kind
    assert (p["radius"], p["r"], p["rows"], p["drafter"], p["downsampler"]) == (float("inf"), 4, 2, "r4", "learned")
    import click

    options = {o.name: o for o in _generate_options()}
    ctx = click.Context(main.commands["generate"])
    read = lambda name, text: options[name].type.convert(text, options[name], ctx)  # noqa: E731
    assert read("tau", "inf") == float("inf") and read("radius", "inf") == float("inf") and read("rows", "none") is None
    assert read("k", "7") == 7 and read("delta", "0.25") == 0.25 and read("drafter", "none") == "none"


def test_info_and_methods():
    r = run("info")
    assert r.exit_code == 0 and "target" in r.output and "r2" in r.output
    r = run("methods")
    assert r.exit_code == 0
    from mulosd.decoding.methods import REGISTRY

    lines = r.output.splitlines()
    heads = [line.split()[0] for line in lines if line.strip() and not line.startswith(" ")]
    assert heads == list(REGISTRY)  # every method, in registry order
    for name, cls in REGISTRY.items():
        block = "\n".join(lines[lines.index(next(x for x in lines if x.startswith(name + "  "))):])
        head = block.splitlines()[0]
        assert ("[exact" if cls.exact else "[lossy") in head
        for key, spec in cls.Params.specs().items():
            flag = "--param model=..." if key == "model" else "--" + key.replace("_", "-")
            assert f"    {flag}" in block and " ".join(spec.help.split()) in " ".join(block.split()), (name, key)
            assert spec.type_name() in block
    assert "mulo  [lossy (exact with acceptance=exact)]" in r.output
    assert "--tau  (float|inf, default 0.1; number in (0.0, 1.0] or inf)" in r.output


def test_bench_presets_cover_the_registry():
    from mulosd.decoding.methods import REGISTRY
    from mulosd.evaluation.presets import BENCH_PRESETS, bench_options

    every = ",".join(REGISTRY)
    assert set(BENCH_PRESETS) == {"quick", "full"}
    assert bench_options("quick") == {"methods": every, "num_images": 20, "batch_size": 1, "inception": False}
    assert bench_options("full") == {"methods": every, "num_images": 1000, "batch_size": 1, "inception": True}
    assert bench_options(None, num_images=5) == {"methods": every, "num_images": 5, "batch_size": 1, "inception": False}
    assert bench_options("full", methods="ar,sd", inception=False)["methods"] == "ar,sd"
    assert bench_options("full", methods="ar,sd", inception=False)["inception"] is False


def test_pack_writes_a_loadable_set(tmp_path):
    from mulosd import Pipeline

    out = tmp_path / "set"
    r = run("pack", "--from", "fmnist-32", "--out", str(out), "--name", "copy", "--dtype", "fp32")
    assert r.exit_code == 0, r.output
    a, b = Pipeline.from_pretrained("fmnist-32"), Pipeline.from_pretrained(str(out))
    assert b.name == "copy" and b.class_names == a.class_names
    assert set(b.drafters) == set(a.drafters) and set(b.upsamplers) == set(a.upsamplers)
    assert (b.continuous is None) == (a.continuous is None)
    for x, y in ((a.target, b.target), (a.drafters["r2"], b.drafters["r2"])):
        assert all(torch.equal(p.float(), q) for p, q in zip(x.state_dict().values(), y.state_dict().values()))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["name"] == "copy" and manifest["drafters"]["r2"] == "drafter_r2"
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    r = run("pack", "--out", str(tmp_path / "none"))
    assert r.exit_code == 1 and "--tokenizer and --target are required" in r.output
    r = run("pack", "--from", "fmnist-32", "--out", str(tmp_path / "bad"), "--drafter", "r2")
    assert r.exit_code == 1 and "must look like ROLE=STEM" in r.output
