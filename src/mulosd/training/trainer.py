"""One training loop for every model: deterministic batches, warm-up + cosine LR, atomic periodic checkpoints,
exact resume.

A run directory holds ``checkpoint.pt`` (model + optimiser + step, written atomically, read back with
``weights_only=True``), ``log.jsonl`` (one line per logged step), and at the end the exported model
(``model.json`` + ``model.safetensors``) and ``summary.json``. Batch order and every random draw are functions of
(seed, step), so a run killed at step s and resumed gives the same model as an uninterrupted one.
"""

from __future__ import annotations

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

    def validate(self) -> None:
        for name in ("steps", "batch_size", "checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise MulosdError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise MulosdError(f"--lr must be > 0, got {self.lr}")
        if self.warmup < 0:
            raise MulosdError(f"--warmup must be >= 0, got {self.warmup}")


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


def train(recipe: Recipe, out_dir: str | Path, cfg: TrainConfig, resume: bool = False, progress: bool = True) -> dict:
    cfg.validate()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "checkpoint.pt"
    # normalised through JSON, so a resumed run compares like with like (tuples come back as lists)
    settings = json.loads(json.dumps({"recipe": recipe.name, "recipe_args": recipe.describe(), "train": dataclasses.asdict(cfg)}))
    if ckpt_path.exists() and not resume:
        raise MulosdError(f"{ckpt_path} exists: pass --resume to continue that run, or choose another --out")
    if resume and not ckpt_path.exists():
        raise MulosdError(f"--resume given but {ckpt_path} does not exist")

    torch.manual_seed(cfg.seed)
    model = recipe.build_model()
    opt = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95))
    start, elapsed = 0, 0.0
    if resume:
        state = torch_load_checked(ckpt_path)
        saved = json.loads(state["settings"])
        mismatch = {k: (saved["recipe_args"].get(k), v) for k, v in settings["recipe_args"].items() if saved["recipe_args"].get(k) != v}
        if saved["recipe"] != recipe.name or mismatch:
            raise MulosdError(f"cannot resume {ckpt_path}: it was trained with different settings {mismatch or saved['recipe']}")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start, elapsed = int(state["step"]), float(state["elapsed_s"])

    def save_checkpoint(step: int, spent: float) -> None:
        atomic_torch_save(ckpt_path, {
            "model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
            "elapsed_s": spent, "settings": json.dumps(settings),
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
        gen = torch.Generator().manual_seed(step_seed)
        loss, metrics = recipe.loss(model, batch_indices(step, n, cfg.batch_size, cfg.seed), step, gen)
        if not torch.isfinite(loss):
            raise MulosdError(f"loss became {loss.item()} at step {step}; lower --lr (now {cfg.lr})")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        recipe.after_step(model, step)
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
    model.eval()
    evaluation = recipe.evaluate(model)
    model.save_pretrained(out / "model")
    summary = {**settings, "train_time_s": round(spent, 1), "final": last, "eval": evaluation}
    atomic_write_json(out / "summary.json", summary)
    return summary
