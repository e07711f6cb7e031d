"""A newcomer's run (issue 22): clear messages for bad input, outputs users can use, threads, the comparison the
demo prints, and `mulosd methods` in full."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from mulosd.cli import SEED, main

ROOT = Path(__file__).resolve().parents[1]


def run(*args):
    return CliRunner().invoke(main, list(args))


@pytest.fixture
def keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("args, code, msg", [
    (["--seed", "99999999999999999999"], 2, "0<=x<=4294967295"),
    (["--seed", "-1"], 2, "0<=x<=4294967295"),
    (["--top-k", "100000"], 1, "--top-k 100000 exceeds the vocabulary of model set fmnist-32 (512 codes); allowed: 0 (off) to 512"),
    (["--method", "mulo", "--r", "8"], 1, "no low-resolution drafter for r=8 (no role 'r8' on a 2x2 grid); allowed r: 2, 4"),
    (["--method", "car", "--top-k", "5"], 1, "top-k / top-p filter a vocabulary and do not apply to continuous tokens"),
    (["--num-per-class", "5000", "--batch-size", "100000"], 1, "batch size 50000 would need about"),
    (["--save-npz", "x.npy"], 1, "must end in .npz"),
    (["--threads", "0"], 2, "--threads"),
])
def test_bad_input_one_message_no_file(tmp_path, monkeypatch, keep_threads, args, code, msg):
    monkeypatch.chdir(tmp_path)
    base = ["generate", "--classes", "t-shirt,trouser,pullover,dress,coat,sandal,shirt,sneaker,bag,ankle-boot",
            "--num-per-class", "1", "--out", "out.png", "--no-progress"]
    r = run(*base, *args)
    assert r.exit_code == code, r.output
    assert msg in " ".join(r.output.split()), r.output
    assert "Traceback" not in r.output
    assert list(tmp_path.iterdir()) == []


def test_batch_memory_estimate_names_what_fits(monkeypatch):
    from mulosd import resources
    from mulosd.errors import MulosdError
    from mulosd.pipeline import Pipeline

    pipe = Pipeline.from_pretrained("fmnist-32")
    per = resources.bytes_per_image([pipe.target], 2)
    c = pipe.target.config
    kv = 2 * (c.max_seq_len + resources.SLACK) * c.n_layer * 2 * c.dim * 4
    assert per > kv  # at least the CFG-doubled KV cache with its speculative slack
    monkeypatch.setattr(resources, "available_memory", lambda device="cpu": int(per * 10 / resources.MEMORY_SHARE))
    resources.check_batch_memory([pipe.target], 10, 2)  # exactly at the limit: allowed
    with pytest.raises(MulosdError, match="allowed here: a batch size of at most 10"):
        resources.check_batch_memory([pipe.target], 11, 2)
    monkeypatch.setattr(resources, "available_memory", lambda device="cpu": None)
    resources.check_batch_memory([pipe.target], 10**9, 2)  # the platform does not say: no estimate to refuse on


def test_seed_range_is_one_range():
    from mulosd.decoding.sampling import MAX_SEED, RandomStreams, check_seed
    from mulosd.errors import MulosdError

    assert SEED.max == MAX_SEED and SEED.min == 0
    assert check_seed(np.int64(5)) == 5 and check_seed(MAX_SEED) == MAX_SEED
    for bad in (-1, MAX_SEED + 1, 1.5, True, "3"):
        with pytest.raises(MulosdError, match="seed .* out of range; allowed: an integer from 0 to 4294967295"):
            RandomStreams.from_seed(bad, [0])


def test_stats_record_the_batch_size_used(tmp_path):
    stats = tmp_path / "s.json"
    r = run("generate", "--classes", "3", "--num-per-class", "1", "--batch-size", "8", "--out", str(tmp_path / "g.png"),
            "--stats-json", str(stats), "--no-progress")
    assert r.exit_code == 0, r.output
    assert json.loads(stats.read_text())["batch_size"] == 1


def test_save_images_and_npz_hold_the_grid_pixels(tmp_path):
    grid, npz, folder = tmp_path / "g.png", tmp_path / "o" / "a.npz", tmp_path / "imgs"
    r = run("generate", "--classes", "8,2", "--num-per-class", "2", "--batch-size", "4", "--seed", "3",
            "--out", str(grid), "--save-images", str(folder), "--save-npz", str(npz), "--no-progress")
    assert r.exit_code == 0, r.output
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["00000_8-bag.png", "00001_8-bag.png", "00002_2-pullover.png", "00003_2-pullover.png"]
    data = np.load(npz)
    assert set(data.files) == {"tokens", "images", "labels", "indices", "predictions"}
    assert data["images"].shape == (4, 32, 32, 1) and data["images"].dtype == np.uint8
    assert data["tokens"].shape == (4, 16, 16) and data["labels"].tolist() == [8, 8, 2, 2]
    assert data["indices"].tolist() == [0, 1, 2, 3]
    # every format shows the same pixels: the PNG files, the .npz and the grid's tiles (image_grid's layout: pad 2,
    # label column 84, 3x nearest, one row per class)
    sheet = np.asarray(Image.open(grid).convert("L"))
    pad, label_width, scale = 2, 84, 3
    for i, name in enumerate(names):
        png = np.asarray(Image.open(folder / name))
        assert np.array_equal(png, data["images"][i, ..., 0])
        row, col = divmod(i, 2)
        y, x = pad + row * (32 * scale + pad), label_width + pad + col * (32 * scale + pad)
        tile = sheet[y:y + 32 * scale:scale, x:x + 32 * scale:scale]
        assert np.array_equal(tile, png), name
    # the same tokens decode to the same images
    from mulosd.pipeline import Pipeline

    pipe = Pipeline.from_pretrained("fmnist-32")
    again = pipe.decode_images(torch.from_numpy(data["tokens"]))
    assert np.array_equal(again.clamp(0, 1).mul(255).round().byte().permute(0, 2, 3, 1).numpy(), data["images"])


def test_save_images_refuses_a_folder_of_other_files(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    r = run("generate", "--classes", "0", "--num-per-class", "1", "--out", str(tmp_path / "g.png"),
            "--save-images", str(folder), "--no-progress")
    assert r.exit_code == 1 and "holds other files (notes.txt)" in r.output
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"] and not (tmp_path / "g.png").exists()


def test_save_images_leaves_nothing_partial(tmp_path, monkeypatch):
    from mulosd import outputs

    images, labels = torch.rand(3, 1, 8, 8), torch.tensor([0, 1, 2])
    calls = []

    def failing(self, path, format=None):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(self, path, format=format)

    real = Image.Image.save
    monkeypatch.setattr(Image.Image, "save", failing)
    with pytest.raises(OSError):
        outputs.save_image_files(tmp_path / "imgs", images, labels, ["a", "b", "c"])
    assert list(tmp_path.iterdir()) == []  # neither the folder nor the staging folder remains


def test_threads_option_sets_torch_threads(tmp_path, keep_threads):
    from mulosd.resources import usable_cores

    r = run("info", "--threads", "1")
    assert r.exit_code == 0 and torch.get_num_threads() == 1
    r = run("info")
    assert r.exit_code == 0 and torch.get_num_threads() == usable_cores()
    r = CliRunner().invoke(main, ["info"], env={"MULOSD_THREADS": "1"})
    assert r.exit_code == 0 and torch.get_num_threads() == 1
    for command in (["generate"], ["bench"], ["compare"], ["pack"], ["train", "ar"], ["info"]):
        assert "--threads" in run(*command, "--help").output, command


def test_compare_prints_the_summary_and_writes_grids(tmp_path, keep_threads):
    out = tmp_path / "demo"
    r = run("compare", "--methods", "ar,mulo", "--classes", "7", "--num-per-class", "1", "--no-warmup",
            "--out", str(out), "--no-progress", "--threads", "1")
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines[0].split() == ["method", "exact", "s/image", "speed-up", "class", "accuracy"]
    assert lines[1].split()[:2] == ["ar", "yes"] and lines[1].split()[3] == "1.00x"
    assert lines[2].split()[:2] == ["mulo", "no"]
    # what the 1000-image runs measured, quoted from the shipped measured.json
    assert "mulo: 2.39x at batch 1 (1000 images; class accuracy 0.927 vs ar 0.930, two-sample p 0.001 (a detectable change)" in r.output
    summary = json.loads((out / "summary.json").read_text())
    assert [m["method"] for m in summary["methods"]] == ["ar", "mulo"]
    assert summary["methods"][0]["stats"]["num_images"] == 1
    for name in ("ar.png", "mulo.png", "compare.png"):
        assert (out / name).exists()
    wide = Image.open(out / "compare.png")
    assert wide.width > 2 * Image.open(out / "ar.png").width


@pytest.mark.parametrize("methods, msg", [("", "--methods is empty"), ("ar,ar", "names a method twice"),
                                          ("ar,magic", "unknown method 'magic'")])
def test_compare_bad_methods(tmp_path, methods, msg):
    r = run("compare", "--methods", methods, "--out", str(tmp_path / "d"))
    assert r.exit_code == 1 and msg in r.output and not (tmp_path / "d").exists()


def test_methods_shows_whole_descriptions_and_measured_speedups():
    from mulosd.decoding.methods import REGISTRY

    r = run("methods")
    assert r.exit_code == 0
    text = " ".join(r.output.split())
    for cls in REGISTRY.values():
        assert " ".join(cls.__doc__.split()) in text, cls.name  # whole, not cut at the first sentence
    assert "1.42x at batch 1 (1000 images; class accuracy 0.924 vs ar 0.930, two-sample p 0.939)" in text
    assert "0.79x at batch 8 (400 images" in text
    assert "with acceptance=exact: 1.34x at batch 1 (1000 images" in text
    assert max(len(line) for line in r.output.splitlines()) <= 110


def test_measured_json_is_what_the_runs_say():
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "measured.py"), "--check"], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_truncated_llamagen_safetensors_is_one_message(tmp_path):
    from safetensors.torch import save_file

    from mulosd.errors import MulosdError
    from mulosd.models.llamagen import read_state_dict

    path = tmp_path / "gpt.safetensors"
    save_file({"w": torch.zeros(64, 64)}, str(path))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(MulosdError, match="gpt.safetensors .* is not a readable safetensors file"):
        read_state_dict(path)


def test_bench_cli_refuses_an_old_run_folder_and_a_resume_without_state(tmp_path):
    old = tmp_path / "old"
    (old / "samples").mkdir(parents=True)
    (old / "samples" / "sd.png").write_bytes(b"old")
    r = run("bench", "--methods", "ar", "--num-images", "1", "--out", str(old), "--no-progress")
    assert r.exit_code == 1 and "--resume" in r.output and "--force" in r.output, r.output
    assert (old / "samples" / "sd.png").read_bytes() == b"old"
    r = run("bench", "--methods", "ar", "--num-images", "1", "--out", str(tmp_path / "new"), "--resume", "--no-progress")
    assert r.exit_code == 1 and "no state.json" in r.output and not (tmp_path / "new").exists(), r.output
    r = run("bench", "--methods", "ar", "--num-images", "1", "--out", str(old), "--resume", "--force", "--no-progress")
    assert r.exit_code == 1 and (old / "samples" / "sd.png").exists(), r.output
