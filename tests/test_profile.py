"""mulosd.evaluation.profile: the forward-cost table on a tiny random GPT (the real sizes are built as configs only)."""

import csv
import json

import pytest
import torch

from mulosd.errors import MulosdError
from mulosd.evaluation import profile as prof
from mulosd.evaluation.profile import (CSV_FIELDS, LLAMAGEN_SIZES, PROFILE_FILES, forward_cost, param_count,
                                       run_profile, size_config)
from mulosd.models.cgpt import ContinuousGPT, ContinuousGPTConfig
from mulosd.models.gpt import GPT, GPTConfig
from mulosd.models.llamagen import llamagen_config

TINY = GPTConfig(vocab_size=64, grid_size=4, dim=32, n_layer=2, n_head=2, multiple_of=32, num_classes=5)
N = TINY.num_tokens  # 16 grid cells


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT(TINY).eval()


def test_every_requested_point_is_measured_or_skipped_with_a_reason(model):
    ks = [1, 2, 4, 8, 16]
    rows = forward_cost(model, [3, 1], ks, cache_len=4, repeats=2, warmup=0)
    assert [(r["batch"], r["new_tokens"]) for r in rows] == [(b, k) for b in (1, 3) for k in ks]
    for r in rows:
        assert r["model_batch"] == 2 * r["batch"] and r["cfg"] is True
        assert r["attended_slots"] == TINY.cls_token_num + 4 + r["new_tokens"]
        if r["new_tokens"] == 16:  # 4 + 16 > 16 cells
            assert r["status"] == "skipped" and r["median_ms"] is None
            assert r["reason"] == "cache_len 4 + k 16 > 16 grid cells"
        else:
            assert r["status"] == "ok" and r["reason"] is None
            assert len(r["times_ms"]) == 2 and r["p10_ms"] <= r["median_ms"] <= r["p90_ms"]
    no_cfg = forward_cost(model, [2], [1], cache_len=0, repeats=1, warmup=0, cfg=False)
    assert no_cfg[0]["model_batch"] == 2 and no_cfg[0]["status"] == "ok"
    assert model.cache_batch == 0 and not model.training  # cache cleared, mode kept


def test_ratio_is_cost_over_the_one_token_forward(model):
    rows = forward_cost(model, [1, 2], [1, 2, 8], cache_len=3, repeats=3, warmup=1)
    for b in (1, 2):
        mine = {r["new_tokens"]: r for r in rows if r["batch"] == b}
        assert mine[1]["ratio_vs_k1"] == 1.0 and mine[1]["decode_ms"] == mine[1]["median_ms"]
        for k, r in mine.items():
            assert r["decode_ms"] == mine[1]["median_ms"]
            assert r["ratio_vs_k1"] == pytest.approx(r["median_ms"] / mine[1]["median_ms"])
            assert r["ideal_speedup"] == pytest.approx(k / r["ratio_vs_k1"])
            assert r["ms_per_new_token"] == pytest.approx(r["median_ms"] / k)
            assert r["tokens_per_s"] == pytest.approx(b * k / (r["median_ms"] / 1e3))
    # k = 1 is measured as the baseline even when it was not asked for, but not reported as a row
    rows = forward_cost(model, [1], [4], cache_len=0, repeats=2, warmup=0)
    assert [r["new_tokens"] for r in rows] == [4]
    assert rows[0]["ratio_vs_k1"] == pytest.approx(rows[0]["median_ms"] / rows[0]["decode_ms"])


def test_timed_forwards_feed_k_tokens_after_the_filled_cache(model, monkeypatch):
    calls, prefills = [], []
    decode, prefill = model.decode, model.prefill
    monkeypatch.setattr(model, "decode", lambda t, c, mask=None: calls.append(c.tolist()) or decode(t, c, mask))
    monkeypatch.setattr(model, "prefill", lambda labels: prefills.append(labels.tolist()) or prefill(labels))
    forward_cost(model, [2], [1, 3], cache_len=5, repeats=2, warmup=1)
    assert len(prefills) == 1 and prefills[0][2:] == [TINY.num_classes] * 2  # [cond ; null class]
    fill, rest = calls[0], calls[1:]
    assert fill == [list(range(5))] * 4  # cells 0..4 for all 2 x 2 rows
    assert rest == [[[5]] * 4] * 3 + [[[5, 6, 7]] * 4] * 3  # (warmup + repeats) per k, at cells 5..5+k-1


def test_run_profile_writes_json_csv_markdown_and_png(model, tmp_path):
    seen = []
    out = tmp_path / "prof"
    result = run_profile(model, out, batch_sizes=[1, 2], new_tokens=[1, 2, 4, 16], cache_len=2, repeats=2,
                         warmup=0, label="tiny", device_info={"requested": "cpu"}, progress=seen.append)
    assert sorted(p.name for p in out.iterdir()) == sorted(PROFILE_FILES)  # no temporary files left behind
    data = json.loads((out / "profile.json").read_text())
    assert data == json.loads(json.dumps(result))
    c = data["config"]
    assert c["label"] == "tiny" and c["model"]["grid_size"] == 4 and c["dtype"] == "float32"
    assert c["device"] == "cpu" and c["threads"] >= 1 and c["torch"] == torch.__version__ and c["date"]
    assert c["params"] == sum(p.numel() for p in model.parameters()) == param_count(TINY)
    assert c["device_info"] == {"requested": "cpu"} and c["cfg"] is True and c["cache_len"] == 2
    assert len(data["rows"]) == 8 and len(seen) == 8
    with open(out / "profile.csv") as f:
        table = list(csv.DictReader(f))
    assert tuple(table[0]) == CSV_FIELDS and len(table) == 8
    assert {r["status"] for r in table if r["new_tokens"] == "16"} == {"skipped"}
    assert float(table[0]["ratio_vs_k1"]) == 1.0
    md = (out / "profile.md").read_text()
    assert "| new tokens k | batch 1 | batch 2 |" in md and "| 16 | skipped | skipped |" in md
    assert "cache_len 2 + k 16 > 16 grid cells" in md
    assert (out / "profile.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_batch_too_large_for_memory_is_skipped(model, monkeypatch):
    monkeypatch.setattr(prof, "available_memory", lambda device: 1000)
    rows = forward_cost(model, [1], [1, 2], repeats=1, warmup=0)
    assert all(r["status"] == "skipped" and "GiB available" in r["reason"] for r in rows)


def test_continuous_tokens_are_profiled_too():
    m = ContinuousGPT(ContinuousGPTConfig(grid_size=4, dim=32, n_layer=1, n_head=2, multiple_of=32, num_classes=3,
                                          token_dim=4, head_width=16, head_depth=1))
    rows = forward_cost(m, [1], [1, 4], cache_len=2, repeats=1, warmup=0)
    assert [r["status"] for r in rows] == ["ok", "ok"]


@pytest.mark.parametrize("name, layers, dim, millions", [
    ("GPT-B", 12, 768, 111), ("GPT-L", 24, 1024, 343), ("GPT-XL", 36, 1280, 775), ("GPT-XXL", 48, 1536, 1400),
    ("GPT-3B", 24, 3200, 3100),
])
def test_llamagen_sizes_have_the_published_parameter_counts(name, layers, dim, millions):
    cfg = size_config(name)  # config only: nothing of this size is allocated
    assert (cfg.n_layer, cfg.dim, cfg.vocab_size, cfg.num_classes, cfg.grid_size) == (layers, dim, 16384, 1000, 16)
    assert cfg == llamagen_config(name, grid_size=16)
    assert param_count(cfg) == pytest.approx(millions * 1e6, rel=0.01)


def test_size_grid_follows_the_image_size_and_count_matches_the_module():
    assert [size_config("GPT-L", s).grid_size for s in (256, 384, 512)] == [16, 24, 32]
    assert {"GPT-B", "GPT-L", "GPT-XL", "GPT-XXL", "GPT-3B"} <= set(LLAMAGEN_SIZES)
    with torch.device("meta"):  # shapes without memory
        gpt_b = GPT(size_config("GPT-B", 384))
    assert sum(p.numel() for p in gpt_b.parameters()) == param_count(gpt_b.config)


@pytest.mark.parametrize("kwargs, message", [
    ({"batch_sizes": [0]}, "batch size 0 out of range; allowed: integers >= 1"),
    ({"batch_sizes": [1, -2]}, "batch size -2 out of range"),
    ({"batch_sizes": []}, "batch size: none given"),
    ({"batch_sizes": [True]}, "batch size True out of range"),
    ({"new_tokens": [0, 1]}, "new tokens 0 out of range; allowed: integers >= 1"),
    ({"new_tokens": [2.5]}, "new tokens 2.5 out of range"),
    ({"cache_len": -1}, "cache_len -1 out of range; allowed: an integer >= 0"),
    ({"cache_len": 16}, r"cache_len 16 \+ new tokens 1 = 17 exceeds the model's 16 grid cells .* cache_len <= 15"),
    ({"cache_len": 10, "new_tokens": [8, 16]}, r"exceeds the model's 16 grid cells .* cache_len <= 8 for k = 8"),
    ({"repeats": 0}, "repeats 0 out of range; allowed: an integer >= 1"),
    ({"warmup": -1}, "warmup -1 out of range; allowed: an integer >= 0"),
])
def test_bad_inputs_are_refused_with_the_value_and_what_is_allowed(model, kwargs, message):
    args = {"batch_sizes": [1], "new_tokens": [1], "cache_len": 0, "repeats": 1, "warmup": 0, **kwargs}
    with pytest.raises(MulosdError, match=message):
        forward_cost(model, **args)


def test_bad_sizes_models_and_folders_are_refused(model, tmp_path):
    with pytest.raises(MulosdError, match="unknown LlamaGen size 'GPT-Q'; allowed: GPT-B, GPT-L, GPT-XL"):
        size_config("GPT-Q")
    for bad in (250, 0, 8, "256"):
        with pytest.raises(MulosdError, match=f"image size {bad!r} is not a positive multiple of the VQ factor 16"):
            size_config("GPT-B", bad)
    with pytest.raises(MulosdError, match="profile measures mulosd GPT models"):
        forward_cost(torch.nn.Linear(2, 2), [1], [1])
    (tmp_path / "file").write_text("")
    with pytest.raises(MulosdError, match="is a file"):
        run_profile(model, tmp_path / "file", [1], [1], repeats=1, warmup=0)
