"""``mulosd sample``: N images of one method for a large FID evaluation (10k-50k images), written as sharded,
resumable ``.npz`` files and merged into the one ``samples.npz`` that the ADM / LlamaGen evaluator reads
(``python evaluator.py ref_batch.npz samples.npz``).

Layout of the output folder::

    OUT/sample.json          the configuration (model set, method and its resolved parameters, sampling, seed,
                             N, shard size, classes, dtype); written first, compared on every rerun
    OUT/shard_00000.npz      images [0, S), shard k images [kS, min((k+1)S, N)), each written atomically:
                               arr_0    uint8 [n, H, W, 3]  (NHWC, RGB: grey images repeat their channel)
                               arr_1    int64 [n]           class labels
                               tokens   the decoded tokens ([n, g, g] codes, or [n, g, g, C] continuous)
                               indices  int64 [n]           image indices = random streams (seed, i)
    OUT/samples.npz          at the end: arr_0 every image in index order, arr_1 their labels

Image i asks for class i mod (number of classes), or ``classes[i mod len(classes)]``, and draws from random stream
(seed, i), so a shard's images do not depend on which process or run decoded it. A rerun with the same options
skips the complete shards (a killed run loses at most the shards it was writing); a folder holding another
configuration is refused, naming the fields that differ. Under torchrun the missing shards are dealt round-robin
to the ranks; rank 0 writes sample.json and, once every rank is done, samples.npz.
"""

from __future__ import annotations

import json
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from mulosd.decoding.methods import get_method
from mulosd.decoding.sampling import SamplingSettings, check_seed
from mulosd.distributed import context as dist_context
from mulosd.distributed import dtype_name, init, pipe_device, pipe_dtype
from mulosd.errors import MulosdError
from mulosd.io import atomic_write, atomic_write_json, check_writable
from mulosd.outputs import to_uint8

CONFIG_FILE = "sample.json"
MERGED_FILE = "samples.npz"
SHARD_KEYS = ("arr_0", "arr_1", "tokens", "indices")


def shard_name(k: int) -> str:
    return f"shard_{k:05d}.npz"


@dataclass
class SampleConfig(SamplingSettings):
    num_images: int = 10000
    shard_size: int = 1000
    batch_size: int = 8
    seed: int = 0
    classes: tuple[int, ...] | None = None  # None: image i asks for class i mod the number of classes

    def validate(self) -> None:
        for name, flag in (("num_images", "--num-images"), ("shard_size", "--shard-size"),
                           ("batch_size", "--batch-size")):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise MulosdError(f"{flag} must be an integer >= 1, got {value!r}")
        check_seed(self.seed)
        self.sampling()
        if self.classes is not None and not self.classes:
            raise MulosdError("--classes is empty; give at least one class id or name, or leave it out (every class)")

    def labels(self, num_classes: int) -> torch.Tensor:
        """The class image i asks for, for every i."""
        i = torch.arange(self.num_images)
        if self.classes is None:
            return i % num_classes
        return torch.tensor(self.classes, dtype=torch.long)[i % len(self.classes)]

    def shards(self) -> list[tuple[int, int]]:
        """Shard k holds images [lo, hi)."""
        return [(lo, min(lo + self.shard_size, self.num_images)) for lo in range(0, self.num_images, self.shard_size)]


def sample_config(pipe, decoder, cfg: SampleConfig, captions=None) -> dict:
    """What sample.json records, and what a rerun must match: everything that decides the images and their files
    (for a text-to-image set, the captions' source: ``bench.BenchCaptions.source``)."""
    return json.loads(json.dumps({
        "model": pipe.name, "method": decoder.name, "params": decoder.params(), "sampling": cfg.sampling().record(),
        "seed": cfg.seed, "num_images": cfg.num_images, "shard_size": cfg.shard_size,
        "classes": list(cfg.classes) if cfg.classes is not None else None, "dtype": dtype_name(pipe_dtype(pipe)),
        **({"captions": captions.source} if captions is not None else {}),
    }))


def _own_temporary(name: str) -> bool:
    """A temporary file an interrupted atomic write of this module left (``.shard_00003.npz.xxxx.tmp``)."""
    return name.startswith(".") and name.endswith(".tmp") and (
        name.startswith(".shard_") or name.startswith(f".{CONFIG_FILE}.") or name.startswith(f".{MERGED_FILE}."))


def _open_folder(out: Path, config: dict) -> None:
    """Check ``out`` (before anything is created): new, empty, or a run of the same configuration (else the
    differing fields are named); then create it, write sample.json if new and delete stale temporary files."""
    from mulosd.evaluation.bench import _config_differences

    if out.exists() and not out.is_dir():
        raise MulosdError(f"--out {out} is a file; give a folder (new, empty, or an earlier `mulosd sample` run's)")
    path = out / CONFIG_FILE
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise MulosdError(f"--out {out}: {path} is unreadable ({exc}); use another --out") from None
        diffs = _config_differences(old, config) if isinstance(old, dict) else ["sample.json is not an object"]
        if diffs:
            raise MulosdError(f"--out {out} holds samples of another configuration ({'; '.join(diffs)}); rerun with "
                              f"that run's options to resume it, or use another --out")
    elif out.is_dir():
        foreign = sorted(p.name for p in out.iterdir() if not _own_temporary(p.name))
        if foreign:
            raise MulosdError(f"--out {out} holds files but no {CONFIG_FILE} ({', '.join(foreign[:3])}"
                              f"{', ...' if len(foreign) > 3 else ''}): not a `mulosd sample` run; give a new or "
                              "empty folder")
    check_writable(path)  # creates the folder
    for p in out.iterdir():
        if _own_temporary(p.name):
            p.unlink()
    if not path.is_file():
        atomic_write_json(path, config)


def _npy_header(f) -> tuple[tuple, np.dtype]:
    """(shape, dtype) of the .npy stream ``f`` without reading its data."""
    major, _ = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
    shape, _, dtype = read(f)
    return shape, dtype


def shard_complete(path: Path, lo: int, hi: int, labels: torch.Tensor) -> bool:
    """Whether ``path`` is a whole shard of images [lo, hi) with the expected labels (headers and the small
    arrays are read, not the images)."""
    try:
        with np.load(path) as z:
            if set(SHARD_KEYS) - set(z.files):
                return False
            if not (np.array_equal(z["indices"], np.arange(lo, hi))
                    and np.array_equal(z["arr_1"], labels[lo:hi].numpy())):
                return False
        with zipfile.ZipFile(path) as zf, zf.open("arr_0.npy") as f:
            shape, dtype = _npy_header(f)
        return dtype == np.uint8 and len(shape) == 4 and shape[0] == hi - lo and shape[3] == 3
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError):
        return False


def _missing_shards(out: Path, cfg: SampleConfig, labels: torch.Tensor) -> list[int]:
    return [k for k, (lo, hi) in enumerate(cfg.shards()) if not shard_complete(out / shard_name(k), lo, hi, labels)]


def rgb_uint8(images: torch.Tensor) -> np.ndarray:
    """images [N, C, H, W] in [0, 1] -> uint8 [N, H, W, 3] (grey images repeat their one channel)."""
    arr = to_uint8(images)
    return np.repeat(arr, 3, axis=-1) if arr.shape[-1] == 1 else arr


def _write_npz(path: Path, arrays: dict) -> Path:
    def write(tmp):
        with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a bare temporary name
            np.savez(f, **arrays)

    return atomic_write(path, write)


def write_shard(path: Path, images: torch.Tensor, labels: torch.Tensor, tokens: torch.Tensor, lo: int) -> Path:
    return _write_npz(path, {"arr_0": rgb_uint8(images), "arr_1": labels.cpu().numpy().astype(np.int64),
                             "tokens": tokens.cpu().numpy(),
                             "indices": np.arange(lo, lo + len(labels), dtype=np.int64)})


def merge_shards(out: Path, cfg: SampleConfig) -> Path:
    """OUT/samples.npz: arr_0 every shard's images in index order, arr_1 their labels, streamed shard by shard (one
    shard in memory at a time, so 50 000 large images fit), written atomically."""
    paths = [out / shard_name(k) for k in range(len(cfg.shards()))]
    with zipfile.ZipFile(paths[0]) as zf, zf.open("arr_0.npy") as f:
        shape, _ = _npy_header(f)
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
              "shape": (cfg.num_images, *shape[1:])}

    def write(tmp):
        labels = []
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            with zf.open("arr_0.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array_header_1_0(f, header)
                for path in paths:
                    with np.load(path) as z:
                        images = z["arr_0"]
                        if images.shape[1:] != tuple(shape[1:]):
                            raise MulosdError(f"{path} holds images of shape {images.shape[1:]}, the first shard "
                                              f"{tuple(shape[1:])}; delete it and rerun to decode it again")
                        f.write(np.ascontiguousarray(images).tobytes())
                        labels.append(z["arr_1"])
            with zf.open("arr_1.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.concatenate(labels).astype(np.int64))

    return atomic_write(out / MERGED_FILE, write)


def run_sample(pipe, method: str, params: dict, cfg: SampleConfig, out: str | Path, progress: bool = True,
               after_shard: Callable[[int], None] | None = None, captions=None) -> dict | None:
    """Decode ``cfg.num_images`` images with ``method`` (built from ``params``) into ``out`` as shards, skipping
    the shards an earlier run of the same configuration completed, then merge them into samples.npz. Every input
    is checked before the folder is created. ``after_shard(k)`` is called after shard k is written (a test hook).
    A text-to-image set takes ``captions`` (``bench.bench_captions``): image i gets caption i mod P, and the
    shards' labels (arr_1) are caption indices. Under torchrun every rank calls this; rank 0 returns a summary,
    the others None."""
    out = Path(out)
    cfg.validate()
    pipe.check_condition_kind("caption" if captions is not None else "class")
    labels = cfg.labels(len(captions.captions) if captions is not None else len(pipe.class_names))
    if cfg.classes is not None and not all(0 <= c < len(pipe.class_names) for c in cfg.classes):
        raise MulosdError(f"--classes {list(cfg.classes)}: class ids must be in 0..{len(pipe.class_names) - 1}")
    decoder = get_method(method)(pipe, **params)
    sampling = cfg.sampling()
    decoder.check_sampling(sampling)
    config = sample_config(pipe, decoder, cfg, captions)
    shards = cfg.shards()
    dist_context().check_world(len(shards), f"shard{'s' if len(shards) > 1 else ''} ({cfg.num_images} images at "
                               f"--shard-size {cfg.shard_size}); every process writes whole shards",
                               "; a smaller --shard-size gives more shards")
    ctx = init(pipe_device(pipe))

    def prepare():
        _open_folder(out, config)
        return _missing_shards(out, cfg, labels)

    missing = ctx.on_main(prepare)
    mine = ctx.mine(missing)
    bar = tqdm(total=sum(shards[k][1] - shards[k][0] for k in mine), unit="img", desc=f"sample {decoder.name}",
               disable=not (progress and ctx.main))
    t0, decoded = time.perf_counter(), 0
    for k in mine:
        lo, hi = shards[k]
        conditions = labels[lo:hi] if captions is None else captions.captions[labels[lo:hi]]
        result = pipe.generate(decoder, conditions, sampling, seed=cfg.seed, batch_size=cfg.batch_size,
                               first_index=lo, classify=False)
        write_shard(out / shard_name(k), result.images, labels[lo:hi], result.tokens, lo)
        decoded += hi - lo
        bar.update(hi - lo)
        if after_shard is not None:
            after_shard(k)
    bar.close()
    wall = time.perf_counter() - t0
    counts = ctx.gather((decoded, len(mine), wall))
    ctx.barrier()  # every rank's shards are written before rank 0 reads them
    if not ctx.main:
        return None
    left = _missing_shards(out, cfg, labels)
    if left:  # a shard a rank wrote cannot be read back (another process writing into the folder?)
        raise MulosdError(f"--out {out}: shards {', '.join(shard_name(k) for k in left[:5])} are missing or "
                          "incomplete after decoding; rerun the same command to decode them again")
    merged = merge_shards(out, cfg)
    return {"out": str(out), "samples": str(merged), "num_images": cfg.num_images, "shards": len(shards),
            "decoded_images": sum(c[0] for c in counts), "decoded_shards": sum(c[1] for c in counts),
            "skipped_shards": len(shards) - len(missing), "world_size": ctx.world_size,
            "wall_time_s": round(max(c[2] for c in counts), 3), "config": config}
