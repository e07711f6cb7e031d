"""Scale-out with torch.distributed: ``torchrun --nproc_per_node=N -m mulosd bench|generate|sample ...``.

Each process (rank) reads its place from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK), decodes its share
of the images and sends what it measured to rank 0, which alone writes files. An image's random stream is (seed,
image index) whatever process decodes it, so N ranks produce exactly the images one process would. Backends: gloo
on the CPU, NCCL on CUDA devices (rank r on ``cuda:LOCAL_RANK``). Without WORLD_SIZE (a plain ``mulosd ...``), or
with WORLD_SIZE=1, every helper here is a no-op on one process and no process group is created.

    ctx = distributed.context()                    # from the environment; nothing initialised yet
    device = ctx.device("cuda")                    # cuda:LOCAL_RANK under torchrun
    ctx = distributed.init(device)                 # the process group (gloo / nccl), destroyed at exit
    share = ctx.share(num_images)                  # this rank's contiguous range of image indices
    parts = ctx.gather(obj)                        # rank 0: [obj of rank 0, obj of rank 1, ...]; others: None
    value = ctx.broadcast(value)                   # rank 0's value on every rank
    value = ctx.on_main(fn)                        # fn() on rank 0; its MulosdError raised on every rank

Only torch.distributed is used: no process pool, no socket protocol of our own.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable

import torch

from mulosd.errors import MulosdError
from mulosd.models.condition import Captions

# How long a collective waits for the slowest rank. Ranks wait for each other at the end of a bench round step
# and of a sample run (a rank with one shard more than another), so the default is generous; torchrun stops every
# rank as soon as one fails, so a crash does not hang the others for this long. $MULOSD_DIST_TIMEOUT_S overrides.
DEFAULT_TIMEOUT_S = 6 * 3600


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or not value.strip():
        return default
    try:
        return int(value)
    except ValueError:
        raise MulosdError(f"environment variable {name}={value!r} must be an integer (torchrun sets it)") from None


@dataclass(frozen=True)
class Context:
    """This process's place in a torchrun job (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        """More than one process: collectives talk to the others."""
        return self.world_size > 1

    @property
    def main(self) -> bool:
        """Rank 0: the process that reads and writes the run's files."""
        return self.rank == 0

    def device(self, requested: str | torch.device | None) -> str | torch.device | None:
        """The device this rank decodes on: a bare ``cuda`` (or ``auto`` on a CUDA machine) becomes
        ``cuda:LOCAL_RANK`` under torchrun, so each process of a node takes its own GPU; anything else is kept."""
        if not self.distributed or requested is None:
            return requested
        text = str(requested).strip().lower()
        if text == "cuda" or (text == "auto" and torch.cuda.is_available()):
            return f"cuda:{self.local_rank}"
        if text.startswith("cuda:"):
            raise MulosdError(f"--device {requested} under torchrun would put every process of this node on one GPU "
                              "(NCCL refuses that); allowed: cuda or auto (process r takes cuda:LOCAL_RANK), or cpu")
        return requested

    def check_world(self, units: int, what: str, allowed_hint: str = "") -> None:
        """Refuse a job with more processes than ``units`` (images, batches, shards): a rank would have nothing
        to do. ``what`` names the units ("images", "batches of 2 images"), ``allowed_hint`` the way out."""
        if self.world_size > units:
            message = (f"torchrun started {self.world_size} processes (WORLD_SIZE={self.world_size}) for {units} "
                       f"{what}; allowed: at most {units} process{'es' if units != 1 else ''}{allowed_hint}")
            raise MulosdError(message) if self.main else echoed(message)  # every rank refuses alike

    def share(self, n: int, unit: int = 1) -> range:
        """This rank's contiguous share of n items in whole units of ``unit`` (a batch): the k = ceil(n / unit)
        units are split as [r k / W, (r + 1) k / W), so the shares in rank order are 0 .. n - 1, their unit counts
        differ by at most one, and every batch is one a single process would decode too."""
        k = -(-n // unit)
        lo, hi = self.rank * k // self.world_size, (self.rank + 1) * k // self.world_size
        return range(min(n, lo * unit), min(n, hi * unit))

    def mine(self, items: list) -> list:
        """Round-robin: the items at positions rank, rank + W, rank + 2W, ..."""
        return items[self.rank :: self.world_size]

    # ---- collectives (no-ops on one process) ------------------------------------------------------------------
    def gather(self, obj: Any) -> list | None:
        """Every rank's ``obj`` (picklable: tensors, dicts, lists) on rank 0, in rank order; None elsewhere."""
        if not self.distributed:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world_size if self.main else None
        dist.gather_object(obj, out, dst=0)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (what the others pass is ignored)."""
        if not self.distributed:
            return obj
        import torch.distributed as dist

        box = [obj if self.main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            if dist.get_backend() == "nccl":  # NCCL wants to know the device it synchronises
                dist.barrier(device_ids=[torch.cuda.current_device()])
            else:
                dist.barrier()

    def on_main(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` on rank 0 and its result on every rank. A MulosdError it raises is raised on every rank (so no
        rank waits for a collective the others never reach); on ranks > 0 it is marked ``echoed`` (rank 0 prints
        it, the command line keeps the others quiet)."""
        if not self.distributed:
            return fn()
        outcome = None
        if self.main:
            try:
                outcome = ("ok", fn())
            except MulosdError as exc:
                outcome = ("error", str(exc))
        kind, value = self.broadcast(outcome)
        if kind == "error":
            raise echoed(value) if not self.main else MulosdError(value)
        return value


def echoed(message: str) -> MulosdError:
    """A MulosdError that rank 0 also raises and prints: the command line exits non-zero without printing it again
    (after ``let_main_report``)."""
    exc = MulosdError(message)
    exc.echoed = True
    return exc


# How long a rank > 0 that refuses alongside rank 0 waits before exiting: torchrun stops every process as soon as one
# fails, so a rank that exited first could cut rank 0 off before it printed the message. Rank 0 exits within
# moments of the others (the checks are the same), and torchrun then ends the waiting ranks at once.
ECHO_WAIT_S = 30.0


def let_main_report() -> None:
    """Wait (at most ECHO_WAIT_S) so that rank 0, refusing the same input, fails first and prints why."""
    import time

    time.sleep(ECHO_WAIT_S)


def context() -> Context:
    """This process's rank, world size and local rank from torchrun's environment (0, 1, 0 without it)."""
    world = _env_int("WORLD_SIZE", 1)
    rank, local = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    if world < 1 or not 0 <= rank < world:
        raise MulosdError(f"RANK={rank} and WORLD_SIZE={world} from the environment are inconsistent; allowed: "
                          "WORLD_SIZE >= 1 and 0 <= RANK < WORLD_SIZE (start the processes with torchrun)")
    return Context(rank=rank, world_size=world, local_rank=local)


def backend_for(device: str | torch.device | None) -> str:
    """gloo for the CPU, nccl for CUDA devices."""
    return "nccl" if device is not None and torch.device(device).type == "cuda" else "gloo"


def init(device: str | torch.device | None = None) -> Context:
    """The process group of a torchrun job, created once (gloo on the CPU; nccl with a CUDA ``device``, whose
    index becomes this process's current device) and destroyed at exit. A single process creates nothing."""
    ctx = context()
    if not ctx.distributed:
        return ctx
    import torch.distributed as dist

    if not dist.is_available():
        raise MulosdError(f"WORLD_SIZE={ctx.world_size} asks for {ctx.world_size} processes, but this PyTorch "
                          f"({torch.__version__}) was built without torch.distributed; allowed: one process")
    if dist.is_initialized():
        return ctx
    backend = backend_for(device)
    if backend == "nccl":
        index = torch.device(device).index
        torch.cuda.set_device(ctx.local_rank if index is None else index)
    timeout = timedelta(seconds=_env_int("MULOSD_DIST_TIMEOUT_S", DEFAULT_TIMEOUT_S))
    dist.init_process_group(backend=backend, timeout=timeout)
    atexit.register(destroy)
    return ctx


def check_batches(ctx: "Context", images: int, batch_size: int) -> None:
    """generate splits whole batches over the ranks: refuse more processes than batches."""
    batch = max(1, min(batch_size, images))
    n = -(-images // batch)
    ctx.check_world(n, f"batch{'es' if n != 1 else ''} of {batch} image{'s' if batch != 1 else ''}",
                    "; ask for more images, a smaller --batch-size, or start fewer processes")


def destroy() -> None:
    """Tear the process group down (idempotent; a no-op when none exists)."""
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - builds without distributed
        return
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ---- where a pipeline lives --------------------------------------------------------------------------------------
def pipe_device(pipe) -> torch.device:
    """The device a pipeline decodes on (``pipe.device``; else its target's parameters'; else the CPU)."""
    device = getattr(pipe, "device", None)
    if device is not None:
        return torch.device(device)
    try:
        return next(pipe.target.parameters()).device
    except (AttributeError, StopIteration, TypeError):
        return torch.device("cpu")


def pipe_dtype(pipe) -> torch.dtype:
    """The transformers' dtype (``pipe.dtype``; else the target's parameters'; else float32)."""
    dtype = getattr(pipe, "dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return next(pipe.target.parameters()).dtype
    except (AttributeError, StopIteration, TypeError):
        return torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---- generate over the ranks -------------------------------------------------------------------------------------
def generate(ctx: Context, pipe, decoder, labels: torch.Tensor, sampling, seed: int = 0, batch_size: int = 8,
             progress: bool = False, trace: bool = False):
    """``Pipeline.generate`` with the images split over the ranks: rank r decodes its contiguous share (its first
    image's index is ``first_index``, so every image keeps its stream (seed, i)) and rank 0 receives the whole
    run's output, in image order; other ranks get None. Stats: counts add up, ``wall_time_s`` is the slowest
    rank's (the job's elapsed decoding time), so ``latency_s_per_image`` is elapsed time per image of the whole
    job; ``world_size`` and ``rank_wall_time_s`` say how it was split. One process: ``pipe.generate`` itself."""
    if not isinstance(labels, Captions):
        labels = torch.as_tensor(labels, dtype=torch.long).flatten()
    check_batches(ctx, len(labels), batch_size)
    if not ctx.distributed:
        return pipe.generate(decoder, labels, sampling, seed=seed, batch_size=batch_size, progress=progress,
                             trace=trace)
    share = ctx.share(len(labels), min(batch_size, len(labels)))  # whole batches: the shapes one process decodes
    out = pipe.generate(decoder, labels[share.start : share.stop], sampling, seed=seed, batch_size=batch_size,
                        first_index=share.start, progress=progress and ctx.main, trace=trace, classify=False)
    parts = ctx.gather(out)
    if not ctx.main:
        return None
    return merge_outputs(parts, decoder, sampling, seed)


def call(pipe, classes, num_per_class: int = 1, method: str = "ar", seed: int = 0, batch_size: int = 8,
         cfg_scale: float = 3.0, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, progress: bool = False,
         trace: bool = False, captions=None, cfg_convention: str = "mulosd", cfg_interval: int = -1, **method_params):
    """``pipe(classes, ...)`` (``Pipeline.__call__``) over the ranks of a torchrun job: the process group is
    created here (gloo / nccl from the pipeline's device), rank 0 gets the whole output, other ranks None."""
    from mulosd.decoding.methods import get_method
    from mulosd.decoding.sampling import SamplingConfig

    if not context().distributed:
        return pipe(classes, num_per_class=num_per_class, method=method, seed=seed, batch_size=batch_size,
                    cfg_scale=cfg_scale, temperature=temperature, top_k=top_k, top_p=top_p, progress=progress,
                    trace=trace, captions=captions, cfg_convention=cfg_convention, cfg_interval=cfg_interval,
                    **method_params)
    if num_per_class < 1:
        raise MulosdError(f"num_per_class must be >= 1, got {num_per_class}")
    sampling = SamplingConfig(cfg_scale=cfg_scale, temperature=temperature, top_k=top_k, top_p=top_p,
                              cfg_convention=cfg_convention, cfg_interval=cfg_interval)
    if captions is not None:
        labels = captions.repeat(num_per_class)
    else:
        labels = torch.tensor([c for c in pipe.class_ids(classes) for _ in range(num_per_class)])
    check_batches(context(), len(labels), batch_size)
    decoder = get_method(method)(pipe, **method_params)
    ctx = init(pipe_device(pipe))
    out = generate(ctx, pipe, decoder, labels, sampling, seed=seed, batch_size=batch_size, progress=progress,
                   trace=trace)
    if out is not None and captions is not None:  # images are labelled with their caption's index, as pipe() does
        out.labels = torch.arange(len(captions)).repeat_interleave(num_per_class)
    return out


def merge_outputs(parts: list, decoder, sampling, seed: int):
    """The GenerationOutputs of the ranks (contiguous shares, in rank order) as one."""
    from mulosd.decoding.state import add_counts
    from mulosd.pipeline import GenerationOutput, _generation_stats

    stats = [p.stats for p in parts]
    totals: dict = {"target_forwards": sum(s["target_forwards"] for s in stats),
                    "drafter_forwards": sum(s["drafter_forwards"] for s in stats), "time_s": {}, "accept_hist": []}
    for s in stats:
        for key, value in s["counts"].items():
            totals[key] = totals.get(key, 0) + value
        for phase, t in s["time_breakdown_s"].items():
            totals["time_s"][phase] = totals["time_s"].get(phase, 0.0) + t
        totals["accept_hist"] = add_counts(totals["accept_hist"], s["accepted_length_histogram"])
    n = sum(s["num_images"] for s in stats)
    walls = [s["wall_time_s"] for s in stats]
    merged = {**stats[0], **_generation_stats(decoder, n, decoder.output_grid, sampling, seed,
                                              max(s["batch_size"] for s in stats), totals, max(walls))}
    merged.update(world_size=len(parts), rank_wall_time_s=walls)
    labels = torch.cat([p.labels for p in parts])
    tokens = torch.cat([p.tokens for p in parts])
    # Decode and classify every image in one call, as one process does: a convolution over a batch of another size
    # may round differently, and the images must be those of one process, not just their tokens.
    pipe = decoder.pipe
    images = decoder.decode_images(tokens.to(decoder.device))
    predictions = pipe.classify(images).cpu() if pipe.classifier is not None else None
    if predictions is not None:
        merged["class_accuracy"] = round((predictions == labels).float().mean().item(), 4)
    else:
        merged.pop("class_accuracy", None)
    traces = [t for p in parts for t in p.traces] if all(p.traces is not None for p in parts) else None
    return GenerationOutput(images=images.cpu(), tokens=tokens, labels=labels, stats=merged, traces=traces,
                            predictions=predictions)


def threads_per_process(cores: int) -> int | None:
    """The CPU threads a process of a torchrun job should default to: its node's ``cores`` shared between the
    LOCAL_WORLD_SIZE processes there (None outside torchrun, or with one process per node)."""
    local = _env_int("LOCAL_WORLD_SIZE", 1)
    return max(1, cores // local) if local > 1 else None
