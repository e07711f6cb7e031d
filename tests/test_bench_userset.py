"""mulosd bench on user model sets (as `mulosd import llamagen` writes them): no classifier, RGB images, c2i sets
of any number of classes and t2i sets conditioned on captions. Tiny random models, real ar and sd decoding."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from mulosd.cli import main
from mulosd.errors import MulosdError
from mulosd.evaluation.bench import BenchConfig, bench_captions, parse_settings, run_bench
from mulosd.models.condition import Captions
from mulosd.models.gpt import GPT, GPTConfig
from mulosd.models.vq import VQConfig, VQModel
from mulosd.pipeline import Pipeline

CAPTION_TOKENS, CAPTION_DIM = 6, 8
SPEED = ("latency_s_per_image", "latency_p10_p90_s", "speedup_vs_ar", "target_forwards_per_image",
         "drafter_forwards_per_image", "step_compression", "resampled_per_image", "time_breakdown_s",
         "accepted_length_histogram")
NO_CLASSIFIER = ("class_accuracy", "fid_classifier", "kid_classifier", "kid_vs_reference_classifier",
                 "p_vs_reference_classifier", "fid_inception", "kid_inception")


@pytest.fixture(autouse=True)
def _one_thread():
    """The models are tiny: a second thread costs more in hand-offs than it saves (much more on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _gpt(condition: str, layers: int, classes: int, seed: int) -> GPT:
    torch.manual_seed(seed)
    kind = ({"condition": "caption", "cls_token_num": CAPTION_TOKENS, "caption_dim": CAPTION_DIM}
            if condition == "caption" else {"num_classes": classes})
    return GPT(GPTConfig(vocab_size=16, grid_size=4, dim=16, n_layer=layers, n_head=2, **kind)).eval()


def _tiny_set(condition: str, classes: int = 3) -> Pipeline:
    """A random user set without a classifier: an RGB VQ tokenizer, a 4x4-grid target and a small drafter."""
    torch.manual_seed(0)
    vq = VQModel(VQConfig(in_channels=3, channels=8, channel_mult=(1,), z_channels=8, codebook_size=16,
                          codebook_dim=4)).eval()
    names = tuple(f"class_{i}" for i in range(classes))
    return Pipeline(vq, _gpt(condition, 2, classes, 1), None, drafters={"small": _gpt(condition, 1, classes, 2)},
                    class_names=names, name=f"tiny-{condition}")


def _feature_files(folder, count: int, seed: int = 0) -> list[str]:
    """``count`` caption feature files of [L, CAPTION_DIM] (L caption tokens, as extract_t5_feature.py writes)."""
    g = np.random.default_rng(seed)
    folder.mkdir(exist_ok=True)
    files = []
    for i in range(count):
        path = folder / f"{i}.npy"
        np.save(path, g.standard_normal((1, 2 + i, CAPTION_DIM)).astype(np.float32))
        files.append(str(path))
    return files


def _recording(pipe: Pipeline) -> list:
    """Wrap ``pipe.generate`` to record the conditions of every measured (classified) call."""
    seen, generate = [], pipe.generate

    def record(decoder, conditions, *args, **kwargs):
        if kwargs.get("classify", True):
            seen.append((decoder.name, kwargs["first_index"], conditions))
        return generate(decoder, conditions, *args, **kwargs)

    pipe.generate = record
    return seen


def _run(pipe, out, captions=None, num_images=7, **kw):
    cfg = BenchConfig(num_images=num_images, batch_size=2, warmup=False)
    return run_bench(pipe, parse_settings("ar,sd"), cfg, out, progress=False, save_samples=False, plots=False,
                     captions=captions, **kw)


def _check_speed_without_classifier(result: dict) -> dict:
    rows = {r["label"]: r for r in result["methods"]}
    assert list(rows) == ["ar", "sd"]
    for label, row in rows.items():
        assert row["error"] is None and row["num_images"] == result["config"]["num_images"], label
        assert all(row[key] is not None for key in SPEED), label
        assert all(row[key] is None for key in NO_CLASSIFIER), label
    assert rows["ar"]["speedup_vs_ar"] == 1.0 and rows["ar"]["step_compression"] == 1.0
    assert rows["sd"]["acceptance_rate"] is not None and sum(rows["sd"]["accepted_length_histogram"]) > 0
    assert set(rows["sd"]["time_breakdown_s"]) == {"drafting", "verification"}
    config = result["config"]
    assert config["classifier"] is False
    assert config["fid_classifier_real_floor"] is None and config["fid_inception_real_floor"] is None
    return rows


def test_c2i_set_without_classifier_reports_speed_and_n_a(tmp_path):
    """A 3-class set without a classifier: image i asks for class i mod 3, speed columns are there, classifier
    metrics are None, results.md says n/a and why; the plots without an FID leave the frontier out."""
    pipe = _tiny_set("class", classes=3)
    seen = _recording(pipe)
    out = tmp_path / "b"
    cfg = BenchConfig(num_images=7, batch_size=2, warmup=False)
    result = run_bench(pipe, parse_settings("ar,sd"), cfg, out, progress=False)  # with sample grids and plots
    _check_speed_without_classifier(result)
    assert result["config"]["conditions"] == {"kind": "class", "image_i": "class i mod 3", "class_ids": [0, 1, 2]}
    assert result["config"]["kid_strata"] == "requested class"
    assert "conditions" not in json.loads((out / "state.json").read_text())["config"]  # they follow from the set
    for name in ("ar", "sd"):
        asked = torch.cat([c for n, _, c in sorted(seen, key=lambda x: x[1]) if n == name])
        assert asked.tolist() == [0, 1, 2, 0, 1, 2, 0], name
    md = (out / "results.md").read_text()
    assert "| n/a | n/a | n/a | n/a | n/a / - |" in md  # class acc, FID, KID, FID (Inception), p (classifier)
    assert md.rstrip().splitlines()[-1].startswith("n/a: model set tiny-class has no classifier")
    assert sorted(p.name for p in (out / "plots").iterdir()) == ["accepted_length.png", "time_breakdown.png"]
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["ar.png", "sd.png"]
    state = json.loads((out / "state.json").read_text())
    assert {r["correct"] for records in state["records"].values() for r in records} == {None}


def test_c2i_resume_without_classifier(tmp_path):
    """A run cut after its first round resumes (records without class counts, no features in the state) to the
    same rows as the uninterrupted run, except the timings."""
    pipe = _tiny_set("class", classes=1000)
    out = tmp_path / "b"
    first = _run(pipe, out, num_images=5)
    assert first["config"]["conditions"]["class_ids"] == [0, 1, 2, 3, 4]
    state = json.loads((out / "state.json").read_text())
    digests = {k: [r["token_digests"] for r in v] for k, v in state["records"].items()}
    state["done_rounds"], state["records"] = 1, {k: v[:1] for k, v in state["records"].items()}
    (out / "state.json").write_text(json.dumps(state))
    again = _run(pipe, out, num_images=5, resume=True)
    assert again["config"]["complete"]
    rows = _check_speed_without_classifier(again)
    before = {r["label"]: r for r in first["methods"]}
    for label, row in rows.items():
        for key in ("num_images", "step_compression", "acceptance_rate", "target_forwards_per_image"):
            assert row[key] == before[label][key], (label, key)
    records = json.loads((out / "state.json").read_text())["records"]
    assert {k: [r["token_digests"] for r in v] for k, v in records.items()} == digests  # the same images


def test_t2i_set_with_inception_tests_each_setting_against_ar(tmp_path, monkeypatch):
    """A t2i set benched on 3 caption feature files: image i gets caption i mod 3, the conditions are recorded,
    and with --inception (a stand-in Inception) each setting is tested against ar in Inception space, with no FID
    against Fashion-MNIST."""
    from test_inception import _FakeInception

    fake = tmp_path / "fake_inception.pt"
    torch.jit.script(_FakeInception()).save(str(fake))
    monkeypatch.setenv("MULOSD_INCEPTION", str(fake))
    pipe = _tiny_set("caption")
    files = _feature_files(tmp_path / "captions", 3)
    captions = bench_captions(pipe, features=files)
    seen = _recording(pipe)
    cfg = BenchConfig(num_images=6, batch_size=2, warmup=False, inception=True)
    result = run_bench(pipe, parse_settings("ar,sd"), cfg, tmp_path / "b", progress=False, save_samples=False,
                       plots=False, captions=captions)
    rows = _check_speed_without_classifier(result)
    conditions = result["config"]["conditions"]
    assert conditions["kind"] == "caption" and conditions["image_i"] == "caption i mod 3"
    assert conditions["caption_features"] == ["0.npy", "1.npy", "2.npy"] and len(conditions["features_sha256"]) == 16
    assert result["config"]["kid_strata"] == "requested caption"
    assert rows["ar"]["p_vs_reference_inception"] is None
    assert 0 < rows["sd"]["p_vs_reference_inception"] <= 1 and rows["sd"]["kid_vs_reference_inception"] is not None
    for name, lo, given in seen:
        assert isinstance(given, Captions)
        want = [captions.captions[i % 3] for i in range(lo, lo + len(given))]
        assert torch.equal(given.features, Captions.cat(want).features), (name, lo)
        assert torch.equal(given.mask, Captions.cat(want).mask), (name, lo)
    assert "| n/a | n/a | n/a | n/a | n/a / " in (tmp_path / "b" / "results.md").read_text()


def test_t2i_resume_and_another_caption_list(tmp_path):
    """A t2i run resumes with the same captions; other files, another order, or a file rewritten under its old
    name is another run, refused naming the difference."""
    pipe = _tiny_set("caption")
    files = _feature_files(tmp_path / "captions", 3)
    out = tmp_path / "b"
    first = _run(pipe, out, bench_captions(pipe, features=files), num_images=6)
    state = json.loads((out / "state.json").read_text())
    state["done_rounds"], state["records"] = 1, {k: v[:1] for k, v in state["records"].items()}
    (out / "state.json").write_text(json.dumps(state))
    again = _run(pipe, out, bench_captions(pipe, features=files), num_images=6, resume=True)
    assert again["config"]["complete"] and again["config"]["conditions"] == first["config"]["conditions"]
    for row, before in zip(_check_speed_without_classifier(again).values(), first["methods"], strict=True):
        assert row["step_compression"] == before["step_compression"], row["label"]
    with pytest.raises(MulosdError, match=r"holds a run with other settings \(conditions.caption_features: "):
        _run(pipe, out, bench_captions(pipe, features=files[::-1]), num_images=6, resume=True)
    np.save(files[1], np.ones((1, 4, CAPTION_DIM), dtype=np.float32))  # re-extracted under the same name
    with pytest.raises(MulosdError, match="conditions.features_sha256: "):
        _run(pipe, out, bench_captions(pipe, features=files), num_images=6, resume=True)


def test_prompts_are_recorded_with_their_encoder(tmp_path, monkeypatch):
    """--prompt captions (the T5 encoder stood in for) are recorded by text and encoder folder; other prompts are
    another run."""
    pipe = _tiny_set("caption")
    files = _feature_files(tmp_path / "captions", 2)
    encoded = []

    def encode(prompts=None, features=None, t5_path=None):
        encoded.append((prompts, features, t5_path))
        return Pipeline.captions(pipe, features=files[: len(prompts)])

    monkeypatch.setattr(pipe, "captions", encode)
    t5 = tmp_path / "flan-t5-xl"
    captions = bench_captions(pipe, prompts=("a red bird on a branch", "a cat"), t5_path=t5)
    assert encoded == [(["a red bird on a branch", "a cat"], [], t5)]
    assert captions.names == ["a red bird …", "a cat"]
    out = tmp_path / "b"
    result = _run(pipe, out, captions, num_images=4)
    assert result["config"]["conditions"] == {"kind": "caption", "image_i": "caption i mod 2",
                                              "prompts": ["a red bird on a branch", "a cat"], "t5": "flan-t5-xl"}
    with pytest.raises(MulosdError, match=r"conditions.prompts: \["):
        _run(pipe, out, bench_captions(pipe, prompts=("a dog", "a cat"), t5_path=t5), num_images=4, resume=True)


def test_condition_errors(tmp_path):
    """A t2i set without captions, captions for a c2i set, prompts without a T5 encoder and both kinds at once
    are refused naming what is allowed, before --out is created."""
    t2i, c2i = _tiny_set("caption"), _tiny_set("class")
    files = _feature_files(tmp_path / "captions", 2)
    out = tmp_path / "b"
    with pytest.raises(MulosdError, match=r"text-to-image \(t2i\): it takes a caption \(--prompt with --t5-path, "
                                          r"or --caption-features\)"):
        _run(t2i, out)
    with pytest.raises(MulosdError, match=r"class-conditional \(c2i\): it takes classes, not prompts or caption"):
        bench_captions(c2i, features=files)
    with pytest.raises(MulosdError, match=r"class-conditional \(c2i\)"):
        _run(c2i, out, captions=bench_captions(t2i, features=files))
    with pytest.raises(MulosdError, match="pass --t5-path DIR"):
        bench_captions(t2i, prompts=["a red bird"])
    with pytest.raises(MulosdError, match="one of the two"):
        bench_captions(t2i, prompts=["a red bird"], features=files, t5_path=str(tmp_path))
    with pytest.raises(MulosdError, match="one of the two"):
        bench_captions(t2i, t5_path=str(tmp_path))
    assert bench_captions(c2i) is None
    assert not out.exists()


def test_cli_bench_on_a_saved_t2i_set(tmp_path):
    """`mulosd bench --model DIR --caption-features ...` on a saved t2i set; --prompt with a c2i set, and a t2i
    set without captions, fail with one line."""
    t2i, c2i = tmp_path / "t2i", tmp_path / "c2i"
    _tiny_set("caption").save_pretrained(t2i)
    _tiny_set("class").save_pretrained(c2i)
    files = _feature_files(tmp_path / "captions", 2)
    out = tmp_path / "b"
    base = ["bench", "--methods", "ar,sd", "--num-images", "4", "--batch-size", "2", "--no-warmup", "--no-progress",
            "--threads", "1"]
    r = CliRunner().invoke(main, [*base, "--model", str(t2i), "--out", str(out),
                                  *(x for f in files for x in ("--caption-features", f))])
    assert r.exit_code == 0, r.output
    result = json.loads((out / "results.json").read_text())
    assert result["config"]["conditions"]["caption_features"] == ["0.npy", "1.npy"]
    assert [row["error"] for row in result["methods"]] == [None, None]
    assert "n/a: model set tiny-caption has no classifier" in r.output
    r = CliRunner().invoke(main, [*base, "--model", str(c2i), "--out", str(tmp_path / "c"), "--prompt", "a cat"])
    assert r.exit_code == 1 and "class-conditional (c2i)" in r.output and not (tmp_path / "c").exists()
    r = CliRunner().invoke(main, [*base, "--model", str(t2i), "--out", str(tmp_path / "c")])
    assert r.exit_code == 1 and "--caption-features" in r.output and not (tmp_path / "c").exists()
