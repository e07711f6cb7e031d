"""Scale-out with torchrun (gloo on the CPU): N processes produce exactly the images of one, rank 0 writes one set
of outputs; `mulosd sample` writes resumable .npz shards and the evaluator's samples.npz."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import needs_fmnist
from mulosd.cli import main
from mulosd.distributed import Context
from mulosd.errors import MulosdError


def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    return {**env, "OMP_NUM_THREADS": "1", "MULOSD_THREADS": "1"}  # 2 ranks must not oversubscribe 2 cores


def _mulosd(*args, nproc=1, cwd=None):
    """`python -m mulosd ARGS`, or `torchrun --standalone --nproc_per_node=N -m mulosd ARGS` (a free port)."""
    launch = [sys.executable, "-m", "mulosd"] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "mulosd"]
    return subprocess.run([*launch, *map(str, args)], capture_output=True, text=True, env=_env(), cwd=cwd, timeout=300)


@pytest.fixture
def one_thread():
    """In-process runs compared with the 1-thread subprocesses use one thread too (the same arithmetic)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_shares_cover_every_image_once_in_rank_order():
    for n in range(1, 12):
        for world in range(1, n + 1):
            shares = [Context(rank=r, world_size=world).share(n) for r in range(world)]
            assert [i for s in shares for i in s] == list(range(n)) and min(map(len, shares)) >= 1
    for n in range(1, 20):  # in whole batches: every share but the last starts and ends at a batch boundary
        for unit in (1, 2, 3, 8):
            for world in range(1, -(-n // unit) + 1):
                shares = [Context(rank=r, world_size=world).share(n, unit) for r in range(world)]
                assert [i for s in shares for i in s] == list(range(n)) and min(map(len, shares)) >= 1
                assert all(s.start % unit == 0 for s in shares)
    assert Context(rank=1, world_size=3).mine(list(range(8))) == [1, 4, 7]
    assert Context().device("cuda") == "cuda" and Context(rank=1, world_size=2, local_rank=1).device("cuda") == "cuda:1"
    with pytest.raises(MulosdError, match="would put every process of this node on one GPU"):
        Context(rank=1, world_size=2, local_rank=1).device("cuda:0")


# ---- bench ---------------------------------------------------------------------------------------------------
def _digests(out):
    state = json.loads((out / "state.json").read_text())
    return {label: [(r["batch"], r["token_digests"]) for r in records] for label, records in state["records"].items()}


@needs_fmnist
def test_torchrun_bench_equals_one_process_image_for_image_and_resumes(tmp_path):
    """3 rounds over 2 ranks (rank 1 idle in the second step): the same tokens per image as one process, one
    results.json with every setting and all images; a 2-rank --resume from one finished round ends the same."""
    from safetensors.torch import load_file, save_file

    args = ["bench", "--methods", "ar,sd", "--num-images", "3", "--batch-size", "1", "--no-warmup", "--no-progress"]
    one = _mulosd(*args, "--out", tmp_path / "one")
    assert one.returncode == 0, one.stderr
    two = _mulosd(*args, "--out", tmp_path / "two", nproc=2)
    assert two.returncode == 0, two.stderr
    assert two.stdout.count("wrote ") == 1  # rank 0 alone reports (and writes)
    assert _digests(tmp_path / "two") == _digests(tmp_path / "one")
    state = json.loads((tmp_path / "two" / "state.json").read_text())
    assert [r["rank"] for r in state["records"]["ar"]] == [0, 1, 0]
    res1, res2 = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two"))
    assert res2["config"]["world_size"] == 2 and res1["config"]["world_size"] == 1
    assert res2["config"]["device"] == "cpu" and res2["config"]["dtype"] == "float32"
    assert res2["config"]["driver_version"] is None and res2["config"]["complete"]
    rows1, rows2 = ({m["label"]: m for m in r["methods"]} for r in (res1, res2))
    assert list(rows2) == ["ar", "sd"]
    for label, row in rows2.items():
        assert row["num_images"] == 3 and row["error"] is None and row["peak_memory_mb"] is None, label
        for key in ("fid_classifier", "class_accuracy", "step_compression", "acceptance_rate"):
            assert row[key] == rows1[label][key], (label, key)
    assert sorted(p.name for p in (tmp_path / "two" / "samples").iterdir()) == ["ar.png", "sd.png"]
    # cut back to one finished round, then resume on 2 ranks: rounds 1 and 2, one on each
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "one", cut)
    state = json.loads((cut / "state.json").read_text())
    state["done_rounds"], state["records"] = 1, {k: v[:1] for k, v in state["records"].items()}
    (cut / "state.json").write_text(json.dumps(state))
    saved = load_file(str(cut / "state.safetensors"))
    save_file({k: v[:1].contiguous() for k, v in saved.items()}, str(cut / "state.safetensors"))
    again = _mulosd(*args, "--out", cut, "--resume", nproc=2)
    assert again.returncode == 0, again.stderr
    assert _digests(cut) == _digests(tmp_path / "one")
    assert [r["rank"] for r in json.loads((cut / "state.json").read_text())["records"]["sd"]] == [0, 0, 1]
    rows = {m["label"]: m for m in json.loads((cut / "results.json").read_text())["methods"]}
    assert [rows[k]["fid_classifier"] for k in rows] == [rows1[k]["fid_classifier"] for k in rows]


def test_bench_merge_keeps_a_failed_settings_batches_before_its_failure(tmp_path, monkeypatch):
    """Rank 0 merges the ranks' items in round order: a setting that failed at batch 1 on one rank keeps batch 0
    only, though another rank decoded its batch 2 in the same step (one process would never have)."""
    from test_bench import _fake_pipe_and_methods

    from mulosd.evaluation.bench import BenchConfig, _BenchRun, parse_settings

    pipe, _ = _fake_pipe_and_methods(monkeypatch)
    settings = parse_settings("fake_ar,fake_sd")
    run = _BenchRun(pipe, settings, BenchConfig(num_images=3, batch_size=1, warmup=False), tmp_path,
                    save_samples=False, plots=False)
    items = [run.measure(s, b) for b in (2, 0, 1) for s in settings]  # as the ranks send them
    items[-1]["error"] = "boom"  # fake_sd, batch 1
    for item in sorted(items, key=lambda i: i["batch"]):
        run.absorb(item)
    assert [r["batch"] for r in run.records["fake_ar"]] == [0, 1, 2]
    assert [r["batch"] for r in run.records["fake_sd"]] == [0] and run.errors == {"fake_sd": "boom"}
    assert len(run.feats["classifier"]["fake_sd"]) == 1


# ---- generate ------------------------------------------------------------------------------------------------
def test_torchrun_generate_equals_one_process(tmp_path):
    args = ["generate", "--method", "sd", "--classes", "0,7,9", "--num-per-class", "1", "--batch-size", "2",
            "--no-progress"]
    files = {}
    for nproc in (1, 2):
        d = tmp_path / f"n{nproc}"
        r = _mulosd(*args, "--out", d / "grid.png", "--save-npz", d / "t.npz", "--stats-json", d / "s.json",
                    nproc=nproc)
        assert r.returncode == 0, r.stderr
        assert r.stdout.count("wrote") == 3, r.stdout  # grid, stats, npz: once, by rank 0
        files[nproc] = np.load(d / "t.npz")
    for key in ("tokens", "images", "labels", "indices", "predictions"):
        assert np.array_equal(files[1][key], files[2][key]), key
    stats = json.loads((tmp_path / "n2" / "s.json").read_text())
    assert stats["world_size"] == 2 and stats["num_images"] == 3 and len(stats["rank_wall_time_s"]) == 2


def test_more_processes_than_images_is_one_clear_refusal(tmp_path):
    r = _mulosd("generate", "--method", "ar", "--classes", "0,1", "--num-per-class", "1", "--batch-size", "1", "--out",
                tmp_path / "g" / "grid.png", "--no-progress", nproc=3)
    assert r.returncode != 0
    msg = "torchrun started 3 processes (WORLD_SIZE=3) for 2 batches of 1 image; allowed: at most 2 processes"
    assert r.stderr.count(msg) == 1, r.stderr  # rank 0 says it; the other ranks refuse quietly
    assert not (tmp_path / "g").exists()


@pytest.mark.parametrize("command,msg", [
    (["bench", "--methods", "ar", "--num-images", "4", "--batch-size", "2"], "for 2 batches (4 images at batch size 2)"),
    (["sample", "--num-images", "3", "--shard-size", "1"], "for 3 shards (3 images at --shard-size 1)"),
    (["generate", "--classes", "1,2", "--num-per-class", "1"], "for 1 batch of 2 images"),
    (["generate", "--classes", "1,2,3", "--num-per-class", "2", "--batch-size", "4"], "for 2 batches of 4 images"),
])
def test_world_size_is_checked_before_anything_is_written(tmp_path, monkeypatch, command, msg):
    """What a rank sees in a 4-process job (only the environment: the check comes before any process group)."""
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "0")
    out = tmp_path / "o"
    r = CliRunner().invoke(main, [*command, "--out", str(out / "x.png" if command[0] == "generate" else out),
                                  "--no-progress"])
    assert r.exit_code == 1 and f"torchrun started 4 processes (WORLD_SIZE=4) {msg}" in r.output, r.output
    assert "allowed: at most" in r.output
    assert not out.exists()


# ---- sample --------------------------------------------------------------------------------------------------
def _shard_indices(out):
    return np.concatenate([np.load(p)["indices"] for p in sorted(out.glob("shard_*.npz"))])


def test_sample_writes_shards_and_the_evaluator_file_and_resumes_after_a_kill(tmp_path, one_thread):
    """A run stopped after 2 of 4 shards, rerun, ends with every image exactly once and the pixels of an
    uninterrupted run; the shards it had written are kept, not decoded again; a 2-rank torchrun writes the same."""
    from mulosd.evaluation.sample import SampleConfig, run_sample
    from mulosd.pipeline import Pipeline

    pipe = Pipeline.from_pretrained("fmnist-32")
    cfg = SampleConfig(num_images=7, shard_size=2, batch_size=2, seed=3)
    whole = run_sample(pipe, "ar", {"model": "r4"}, cfg, tmp_path / "whole", progress=False)
    assert whole["decoded_shards"] == 4 and whole["skipped_shards"] == 0
    ref = np.load(tmp_path / "whole" / "samples.npz")
    assert ref.files == ["arr_0", "arr_1"] and ref["arr_0"].shape == (7, 8, 8, 3) and ref["arr_0"].dtype == np.uint8
    assert (ref["arr_0"][..., 0] == ref["arr_0"][..., 2]).all()  # grey, repeated to RGB
    assert ref["arr_1"].tolist() == [0, 1, 2, 3, 4, 5, 6]
    shard = np.load(tmp_path / "whole" / "shard_00001.npz")
    assert shard["indices"].tolist() == [2, 3] and shard["tokens"].shape == (2, 4, 4)

    def stop_after_two(k):
        if k == 1:
            raise KeyboardInterrupt

    cut = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        run_sample(pipe, "ar", {"model": "r4"}, cfg, cut, progress=False, after_shard=stop_after_two)
    assert sorted(p.name for p in cut.iterdir()) == ["sample.json", "shard_00000.npz", "shard_00001.npz"]
    kept = {p.name: p.stat().st_mtime_ns for p in cut.glob("shard_*.npz")}
    again = run_sample(pipe, "ar", {"model": "r4"}, cfg, cut, progress=False)
    assert again["skipped_shards"] == 2 and again["decoded_images"] == 3
    assert all((cut / name).stat().st_mtime_ns == t for name, t in kept.items())
    assert _shard_indices(cut).tolist() == list(range(7))
    merged = np.load(cut / "samples.npz")
    assert np.array_equal(merged["arr_0"], ref["arr_0"]) and np.array_equal(merged["arr_1"], ref["arr_1"])
    # two ranks, shards dealt round-robin
    r = _mulosd("sample", "--method", "ar", "--param", "model=r4", "--num-images", 7, "--shard-size", 2,
                "--batch-size", 2, "--seed", 3, "--out", tmp_path / "two", "--no-progress", nproc=2)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("wrote") == 1 and "on 2 processes" in r.stdout
    two = np.load(tmp_path / "two" / "samples.npz")
    assert np.array_equal(two["arr_0"], ref["arr_0"]) and np.array_equal(two["arr_1"], ref["arr_1"])
    assert json.loads((tmp_path / "two" / "sample.json").read_text()) == whole["config"]


def test_sample_refuses_another_configuration_and_foreign_folders(tmp_path, one_thread):
    out = tmp_path / "s"
    base = ["sample", "--method", "ar", "--param", "model=r4", "--num-images", "2", "--shard-size", "1",
            "--batch-size", "2", "--threads", "1", "--out", str(out), "--no-progress"]
    r = CliRunner().invoke(main, base)
    assert r.exit_code == 0, r.output
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    r = CliRunner().invoke(main, [*base, "--seed", "1", "--classes", "sneaker", "--temperature", "0.5"])
    assert r.exit_code == 1
    for part in ("holds samples of another configuration", "sampling.temperature: 1.0 -> 0.5", "seed: 0 -> 1",
                 "classes: null -> [7]"):
        assert part in r.output, (part, r.output)
    assert "num_images" not in r.output and {p.name: p.read_bytes() for p in out.iterdir()} == before
    r = CliRunner().invoke(main, base)  # the same options again: nothing left to decode, samples.npz rewritten
    assert r.exit_code == 0 and "decoded 0 now" in r.output and "2 shards kept" in r.output
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    r = CliRunner().invoke(main, [*base[:-3], "--out", str(tmp_path / "other"), "--no-progress"])
    assert r.exit_code == 1 and "holds files but no sample.json (notes.txt)" in r.output
    assert [p.name for p in (tmp_path / "other").iterdir()] == ["notes.txt"]
    with pytest.raises(MulosdError, match="--shard-size must be an integer >= 1, got 0"):
        from mulosd.evaluation.sample import SampleConfig

        SampleConfig(num_images=2, shard_size=0).validate()
