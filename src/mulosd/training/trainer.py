"""One training loop for every model: deterministic batches, warm-up + cosine LR, atomic periodic checkpoints,
exact resume.

A run directory holds ``checkpoint.pt`` (model + optimiser + step, written atomically, read back with
``weights_only=True``), ``log.jsonl`` (one line per logged step), and at the end the exported model
(``model.json`` + ``model.safetensors``) and ``summary.json``. With ``ema`` > 0 the trainer also keeps an exponential
moving average of the weights (in the checkpoint beside the raw ones, which a resumed run continues from); the
average is what is evaluated and exported. Batch order and every random draw are functions of
(seed, step), so a run killed at step s and resumed gives the same model as an uninterrupted one.

Device and precision: the model trains on ``device`` (cpu, cuda, cuda:N, auto) with float32 master weights; the
recipes keep their data on the CPU and move each batch to the model's device. ``dtype`` bfloat16 or float16 runs the
recipe's loss under ``torch.autocast`` (mixed precision); float16 also scales the loss (``torch.amp.GradScaler``,
its state in the checkpoint). Checkpoints hold CPU tensors and name no device, so a run started on a GPU resumes on
the CPU and the other way round (with any allowed dtype: only the recipe's settings must match).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from tqdm import tqdm

from mulosd.errors import MulosdError
from mulosd.io import atomic_torch_save, atomic_write_json, torch_load_checked
from mulosd.resources import device_description, resolve_device, resolve_dtype


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup: int = 100
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    checkpoint_every: int = 200
    log_every: int = 20
    ema: float = 0.0  # 0: off; else the decay of an exponential moving average of the weights, exported at the end


    def validate(self) -> None:
        for name in ("steps", "batch_size", "checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise MulosdError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise MulosdError(f"--lr must be > 0, got {self.lr}")
        if self.warmup < 0:
            raise MulosdError(f"--warmup must be >= 0, got {self.warmup}")
        if not 0 <= self.ema < 1:
            raise MulosdError(f"--ema must be in [0, 1) (0: off; 0.999 is usual), got {self.ema}")


class Recipe(Protocol):
    """What a model family supplies to the trainer."""

    name: str

    def describe(self) -> dict: ...  # the recipe's own settings (stored and checked on resume)

    def build_model(self) -> torch.nn.Module: ...

    def num_examples(self) -> int: ...

    def loss(self, model: torch.nn.Module, index: torch.Tensor, step: int, gen: torch.Generator) -> tuple[torch.Tensor, dict]: ...

    def after_step(self, model: torch.nn.Module, step: int) -> None: ...

    def evaluate(self, model: torch.nn.Module) -> dict: ...


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def batch_indices(step: int, n: int, batch_size: int, seed: int) -> torch.Tensor:
    """Examples for ``step``: a fresh permutation per epoch, derived from (seed, epoch) alone."""
    per_epoch = max(1, n // batch_size)
    epoch, i = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return perm[i * batch_size : (i + 1) * batch_size]


def _param_groups(model: torch.nn.Module, weight_decay: float):
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def training_precision(device: str | torch.device | None = "cpu",
                       dtype: str | torch.dtype | None = "float32") -> tuple[torch.device, torch.dtype]:
    """``--device`` / ``--dtype`` of a training run checked against this machine: (device, dtype), or one clear
    error. float16 is refused on the CPU: PyTorch runs it there (autocast and the grad scaler work) but without
    fast kernels, several times slower than float32, where bfloat16 is as fast and needs no loss scaling."""
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    if device.type == "cpu" and dtype == torch.float16:
        raise MulosdError("dtype float16: mixed-precision training on the CPU runs in bfloat16 only (float16 has no "
                          "fast CPU kernels: several times slower than float32); allowed on the CPU: float32, bfloat16")
    return device, dtype


def ema_decay(step: int, decay: float) -> float:
    """The EMA's decay after optimiser step ``step`` (0-based): ``decay``, lowered early on as (1 + step) / (10 + step)
    so that the average forgets the initial weights in a short run."""
    return min(decay, (1 + step) / (10 + step))


@torch.no_grad()
def update_ema(ema: dict[str, torch.Tensor], model: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * weights, for every floating-point tensor of the state dict (buffers such as
    integer counters are copied)."""
    for k, v in model.state_dict().items():
        if v.is_floating_point():
            ema[k].mul_(decay).add_(v.detach().float(), alpha=1 - decay)
        else:
            ema[k].copy_(v)


def _to_cpu(obj):
    """A state dict (nested dicts, lists, tuples of tensors and plain values) with every tensor on the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def train(recipe: Recipe, out_dir: str | Path, cfg: TrainConfig, resume: bool = False, progress: bool = True,
          device: str | torch.device | None = "cpu", dtype: str | torch.dtype | None = "float32") -> dict:
    cfg.validate()
    device, dtype = training_precision(device, dtype)
    dtype_name = str(dtype).removeprefix("torch.")
    mixed = dtype != torch.float32
    out = Path(out_dir)
    ckpt_path = out / "checkpoint.pt"
    # normalised through JSON, so a resumed run compares like with like (tuples come back as lists)
    settings = json.loads(json.dumps({"recipe": recipe.name, "recipe_args": recipe.describe(), "train": dataclasses.asdict(cfg)}))
    if ckpt_path.exists() and not resume:
        raise MulosdError(f"{ckpt_path} exists: pass --resume to continue that run, or choose another --out")
    if resume and not ckpt_path.exists():
        raise MulosdError(f"--resume given but {ckpt_path} does not exist")
    out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(cfg.seed)
    model = recipe.build_model().to(device)  # initialised on the CPU (the same weights on every device), float32
    opt = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95))
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    start, elapsed = 0, 0.0
    ema = {k: v.detach().clone().float() if v.is_floating_point() else v.detach().clone()
           for k, v in model.state_dict().items()} if cfg.ema > 0 else None
    if resume:
        state = torch_load_checked(ckpt_path)
        saved = json.loads(state["settings"])
        mismatch = {k: (saved["recipe_args"].get(k), v) for k, v in settings["recipe_args"].items() if saved["recipe_args"].get(k) != v}
        if saved["recipe"] != recipe.name or mismatch:
            raise MulosdError(f"cannot resume {ckpt_path}: it was trained with different settings {mismatch or saved['recipe']}")
        model.load_state_dict(state["model"])  # CPU tensors, copied onto the model's device
        opt.load_state_dict(state["optimizer"])  # moves the moments to the parameters' device
        if scaler.is_enabled() and state.get("scaler"):  # a float16 run continued in float16 keeps its loss scale
            scaler.load_state_dict(state["scaler"])
        start, elapsed = int(state["step"]), float(state["elapsed_s"])
        was = saved["train"].get("ema", 0.0)
        if was != cfg.ema or (ema is not None) != (state.get("ema") is not None):
            raise MulosdError(f"cannot resume {ckpt_path}: it was trained with --ema {was}, not {cfg.ema} (the average "
                              f"cannot be rebuilt); give the same --ema as that run")
        if ema is not None:
            ema = {k: v.to(device) for k, v in state["ema"].items()}

    def save_checkpoint(step: int, spent: float) -> None:
        atomic_torch_save(ckpt_path, {
            "model": _to_cpu(model.state_dict()), "optimizer": _to_cpu(opt.state_dict()), "step": step,
            "elapsed_s": spent, "settings": json.dumps(settings), "dtype": dtype_name, "scaler": scaler.state_dict(),
            "ema": _to_cpu(ema) if ema is not None else None,
        })

    n = recipe.num_examples()
    model.train()
    t0 = time.perf_counter() - elapsed
    log_path = out / "log.jsonl"
    lines = log_path.read_text().splitlines() if log_path.exists() else []
    last = json.loads(lines[-1]) if lines else {}  # a resumed run that was already finished reports its last step
    log = open(log_path, "a")
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc=f"train {recipe.name}", disable=not progress)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        step_seed = cfg.seed * 1_000_003 + step
        torch.manual_seed(step_seed)  # dropout and any other global-RNG use: a function of the step, as on resume
        gen = torch.Generator().manual_seed(step_seed)  # a CPU generator on every device: the same draws
        with torch.autocast(device.type, dtype=dtype) if mixed else contextlib.nullcontext():
            loss, metrics = recipe.loss(model, batch_indices(step, n, cfg.batch_size, cfg.seed), step, gen)
        if not torch.isfinite(loss):
            raise MulosdError(f"loss became {loss.item()} at step {step}; lower --lr (now {cfg.lr})")
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()  # without float16 the scaler passes everything through unchanged
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        scaler.step(opt)  # float16: skipped when a gradient overflowed (the scale then shrinks)
        scaler.update()
        recipe.after_step(model, step)
        if ema is not None:
            update_ema(ema, model, ema_decay(step, cfg.ema))
        last = {"step": step + 1, "loss": loss.item(), **metrics, "lr": lr_at(step, cfg), "elapsed_s": time.perf_counter() - t0}
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            log.write(json.dumps(last) + "\n")
            log.flush()
            bar.set_postfix(loss=f"{last['loss']:.4f}")
        if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
            save_checkpoint(step + 1, time.perf_counter() - t0)
    log.close()
    spent = time.perf_counter() - t0
    save_checkpoint(cfg.steps, spent)
    if ema is not None:  # the checkpoint keeps the raw weights (a resumed run needs them); the average is the model
        model.load_state_dict({k: v.to(model.state_dict()[k].dtype) for k, v in ema.items()})
    model.eval()
    evaluation = recipe.evaluate(model)
    model.save_pretrained(out / "model")  # written from CPU float32 copies of the weights
    summary = {**settings, "device": str(device), "hardware": device_description(device), "dtype": dtype_name,
               "train_time_s": round(spent, 1), "final": last, "eval": evaluation}
    atomic_write_json(out / "summary.json", summary)
    return summary
