"""The machine's resources as mulosd uses them: CPU threads and the memory a batch may take.

``set_threads`` is what every command's ``--threads`` calls (default: the cores this process may run on).
``check_batch_memory`` estimates what a decoding batch will allocate before anything is allocated, so a batch too
large for the machine is refused with the largest one that fits instead of failing inside the allocator.
"""

from __future__ import annotations

import os

import torch

from mulosd.errors import MulosdError

# A batch may plan to use at most this share of the memory available when it starts.
MEMORY_SHARE = 0.8
# Cells past the grid that speculative windows may write into a KV cache (the widest window of any method + 1).
SLACK = 64


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask; the machine's count where that is unknown)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def set_threads(threads: int | None = None) -> int:
    """PyTorch's intra-op threads: ``threads``, or every usable core when None. Returns the number set. On a
    loaded machine fewer threads than cores can be much faster (threads wait on each other's time slices)."""
    n = usable_cores() if threads is None else int(threads)
    if n < 1:
        raise MulosdError(f"--threads {threads} out of range; allowed: an integer >= 1")
    torch.set_num_threads(n)
    return n


def available_memory(device: torch.device | str = "cpu") -> int | None:
    """Bytes that can still be allocated on ``device``: free memory of a CUDA device, MemAvailable of the host
    (Linux) otherwise; None when the platform does not say."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)  # the driver's free memory, plus what PyTorch holds cached but unused
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def bytes_per_image(models, rows_per_image: int) -> int:
    """An upper estimate of what decoding one image allocates with these transformers: for each, a KV cache over
    its sequence plus SLACK speculative cells for ``rows_per_image`` model rows (2 with CFG), the widest
    activations of a forward over that sequence, and float32 logits over it."""
    total = 0
    for m in models:
        c = m.config
        seq = c.max_seq_len + SLACK
        elem = next(m.parameters()).element_size()
        total += rows_per_image * seq * c.n_layer * 2 * c.kv_heads * c.head_dim * elem  # K and V
        total += rows_per_image * seq * 4 * c.dim * 4  # the MLP's hidden activations
        total += rows_per_image * seq * c.vocab_size * 4  # logits / probabilities (0 for continuous tokens)
    return total


def check_batch_memory(models, batch: int, rows_per_image: int, device: torch.device | str = "cpu") -> None:
    """Refuse a batch whose estimated size (``bytes_per_image`` x batch) exceeds MEMORY_SHARE of the memory
    available on ``device``, naming the largest batch that fits."""
    free = available_memory(device)
    if free is None:
        return
    per_image = bytes_per_image(models, rows_per_image)
    if per_image * batch <= MEMORY_SHARE * free:
        return
    fits = max(0, int(MEMORY_SHARE * free // per_image))
    raise MulosdError(f"batch size {batch} would need about {per_image * batch / 2**30:.1f} GiB "
                      f"({per_image / 2**20:.1f} MiB per image) but {device} has {free / 2**30:.1f} GiB available; "
                      f"allowed here: a batch size of at most {fits}")


# ---- devices and precisions ------------------------------------------------------------------------------------
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}


def resolve_device(name: str | torch.device | None = "cpu") -> torch.device:
    """``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (the first CUDA device when there is one, else the CPU) -> a
    torch.device that exists on this machine, or one clear error saying what does."""
    if isinstance(name, torch.device):
        name = str(name)
    text = (name or "cpu").strip().lower()
    if text == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda") or (device.type == "cpu" and device.index not in (None, 0)):
        raise MulosdError(f"device {name!r} unknown; allowed: cpu, cuda, cuda:N, auto")
    if device.type == "cpu":
        return torch.device("cpu")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise MulosdError(f"device {name!r}: this machine has no CUDA device (torch {torch.__version__}, "
                          f"CUDA build {torch.version.cuda or 'none'}); allowed here: cpu, auto")
    index = 0 if device.index is None else device.index
    if index >= count:
        raise MulosdError(f"device {name!r} does not exist: this machine has {count} CUDA device"
                          f"{'s' if count > 1 else ''} ({', '.join(f'cuda:{i}' for i in range(count))})")
    return torch.device("cuda", index)


def resolve_dtype(name: str | torch.dtype | None = "float32", device: torch.device | str = "cpu") -> torch.dtype:
    """``float32`` / ``bfloat16`` / ``float16`` (or fp32 / bf16 / fp16) -> a torch dtype the device supports."""
    if isinstance(name, torch.dtype):
        if name not in DTYPES.values():
            raise MulosdError(f"dtype {name} unsupported; allowed: {', '.join(DTYPES)}")
        dtype = name
    else:
        text = (name or "float32").strip().lower()
        text = DTYPE_ALIASES.get(text, text)
        if text not in DTYPES:
            raise MulosdError(f"dtype {name!r} unknown; allowed: {', '.join(DTYPES)} (or fp32, bf16, fp16)")
        dtype = DTYPES[text]
    device = torch.device(device)
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise MulosdError(f"dtype bfloat16: {torch.cuda.get_device_name(device)} does not support it; "
                          "allowed here: float32, float16")
    return dtype


def device_description(device: torch.device | str) -> str:
    """What a device is, for stats and results: the GPU's name, or the CPU's architecture and thread count."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    import platform

    return f"CPU {platform.machine()}, {torch.get_num_threads()} threads"


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued work (CUDA kernels run asynchronously): call before reading a clock."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
