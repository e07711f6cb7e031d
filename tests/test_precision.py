"""Devices and precisions (issue 17): every method in bfloat16, float32 probabilities, device and dtype checks,
and the CUDA checks that run where a GPU is (scripts/gpu_check.sh) and are skipped elsewhere."""

import pytest
import torch
from click.testing import CliRunner

from mulosd.cli import main
from mulosd.decoding.methods import REGISTRY
from mulosd.errors import MulosdError
from mulosd.pipeline import Pipeline
from mulosd.resources import resolve_device, resolve_dtype

needs_cuda = pytest.mark.cuda  # skipped without a CUDA device (conftest.py); scripts/gpu_check.sh runs them
# Keep the expensive methods short: cspd's residual sampler at most a few proposals per token.
FAST = {"cspd": {"max_tries": 3}}


@pytest.fixture(scope="module")
def bf16():
    return Pipeline.from_pretrained("fmnist-32", dtype="bfloat16")


def test_transformers_take_the_dtype_and_the_rest_stays_float32(bf16):
    assert bf16.dtype == torch.bfloat16 and bf16.device == torch.device("cpu")
    for m in bf16.transformers():
        trunk = [p.dtype for name, p in m.named_parameters() if not name.startswith("head.")]
        assert set(trunk) == {torch.bfloat16}
    for m in [bf16.tokenizer, bf16.classifier, *bf16.upsamplers.values(), bf16.continuous.tokenizer,
              bf16.continuous.target.head]:
        assert {p.dtype for p in m.parameters()} == {torch.float32}, type(m).__name__


def test_half_precision_keeps_float32_values_where_it_keeps_float32(bf16):
    """The rotary table and the diffusion heads keep their float32 values, not float32 types over rounded values."""
    fp32 = Pipeline.from_pretrained("fmnist-32")
    assert bf16.target.rope.dtype == torch.float32 and torch.equal(bf16.target.rope, fp32.target.rope)
    for a, b in zip(bf16.continuous.target.head.parameters(), fp32.continuous.target.head.parameters()):
        assert torch.equal(a, b)


def test_logits_and_probabilities_are_float32(bf16):
    from mulosd.decoding.sampling import SamplingConfig, process_logits

    t = bf16.target
    t.setup_cache(2)
    try:
        logits = t.prefill(torch.tensor([3, 10]))
    finally:
        t.clear_cache()
    assert logits.dtype == torch.float32
    probs = process_logits(torch.randn(4, 512, dtype=torch.bfloat16), SamplingConfig(cfg_scale=3.0))
    assert probs.dtype == torch.float32 and torch.allclose(probs.sum(-1), torch.ones(2))


@pytest.mark.parametrize("method", list(REGISTRY))
def test_every_method_runs_in_bfloat16(bf16, method):
    out = bf16([3, 7], num_per_class=1, method=method, seed=0, batch_size=2, **FAST.get(method, {}))
    assert out.images.dtype == torch.float32 and torch.isfinite(out.images).all()
    assert out.images.min() >= 0 and out.images.max() <= 1
    if out.tokens.dtype == torch.long:
        assert out.tokens.min() >= 0 and out.tokens.max() < bf16.tokenizer.config.codebook_size
    assert out.stats["dtype"] == "bfloat16" and out.stats["device"] == "cpu"


def test_same_seed_same_images_in_bfloat16(bf16):
    """A seed reproduces its images on one device, dtype and batch size. (In bfloat16 a different batch size can
    change an image: the batched matmuls round differently and a flat token distribution flips; docs/GPU.md.)"""
    a = bf16([1, 8], num_per_class=2, method="sjd", seed=5, batch_size=4)
    b = bf16([1, 8], num_per_class=2, method="sjd", seed=5, batch_size=4)
    assert torch.equal(a.tokens, b.tokens)


@pytest.mark.parametrize("name, msg", [
    ("tpu", "device 'tpu' unknown; allowed: cpu, cuda, cuda:N, auto"),
    ("cpu:3", "device 'cpu:3' unknown"),
    ("cuda:x", "device 'cuda:x' unknown"),
])
def test_unknown_devices(name, msg):
    with pytest.raises(MulosdError, match=msg):
        resolve_device(name)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_one_message(tmp_path):
    for name in ("cuda", "cuda:7"):
        with pytest.raises(MulosdError, match="this machine has no CUDA device .* allowed here: cpu, auto"):
            resolve_device(name)
    assert resolve_device("auto") == torch.device("cpu")
    r = CliRunner().invoke(main, ["generate", "--device", "cuda", "--classes", "0", "--num-per-class", "1",
                                  "--out", str(tmp_path / "g.png")])
    assert r.exit_code == 1 and "no CUDA device" in r.output and list(tmp_path.iterdir()) == []


def test_dtypes():
    assert resolve_dtype("bf16") == torch.bfloat16 and resolve_dtype("float16") == torch.float16
    with pytest.raises(MulosdError, match="dtype 'float8' unknown; allowed: float32, bfloat16, float16"):
        resolve_dtype("float8")
    r = CliRunner().invoke(main, ["generate", "--dtype", "float8", "--out", "x.png"])
    assert r.exit_code == 2 and "'float8' is not one of" in r.output


def test_from_pretrained_refuses_before_reading(tmp_path):
    with pytest.raises(MulosdError, match="unknown"):
        Pipeline.from_pretrained(str(tmp_path / "nowhere"), device="tpu")  # the device is named, not the folder


# ---- CUDA (run by scripts/gpu_check.sh on the GPU machine; skipped without a GPU) -------------------------------
@needs_cuda
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_every_method(dtype):
    pipe = Pipeline.from_pretrained("fmnist-32", device="cuda", dtype=dtype)
    for method in REGISTRY:
        out = pipe([3, 7], num_per_class=1, method=method, seed=0, batch_size=2, **FAST.get(method, {}))
        assert out.images.device.type == "cpu" and torch.isfinite(out.images).all(), method
        assert out.stats["device"].startswith("cuda"), method


@needs_cuda
def test_cuda_same_seed_same_images_and_greedy_identity():
    pipe = Pipeline.from_pretrained("fmnist-32", device="cuda")
    a = pipe([2, 9], num_per_class=2, method="mcsjd", seed=3, batch_size=4)
    b = pipe([2, 9], num_per_class=2, method="mcsjd", seed=3, batch_size=1)
    assert torch.equal(a.tokens, b.tokens)
    ar = pipe([2, 9], num_per_class=1, method="ar", temperature=0.0, batch_size=2)
    sd = pipe([2, 9], num_per_class=1, method="sd", temperature=0.0, batch_size=2)
    assert torch.equal(ar.tokens, sd.tokens)


@needs_cuda
def test_cuda_device_errors():
    n = torch.cuda.device_count()
    with pytest.raises(MulosdError, match=f"this machine has {n} CUDA device"):
        resolve_device(f"cuda:{n}")


def test_profile_command_writes_table_and_plot(tmp_path):
    import json

    out = tmp_path / "prof"
    r = CliRunner().invoke(main, ["profile", "--model", "fmnist-32", "--batch-sizes", "1,2", "--new-tokens", "1,4",
                                  "--repeats", "1", "--warmup", "0", "--dtype", "bfloat16", "--out", str(out)])
    assert r.exit_code == 0, r.output
    data = json.loads((out / "profile.json").read_text())
    assert data["config"]["dtype"] == "bfloat16" and len(data["rows"]) == 4
    assert {(row["batch"], row["new_tokens"]) for row in data["rows"]} == {(1, 1), (1, 4), (2, 1), (2, 4)}
    assert (out / "profile.png").stat().st_size > 0 and "| new tokens k |" in (out / "profile.md").read_text()


@pytest.mark.parametrize("args, msg", [
    ([], "give exactly one of --model"),
    (["--model", "fmnist-32", "--size", "GPT-B"], "give exactly one of --model"),
    (["--size", "GPT-Q"], "GPT-Q"),
    (["--size", "GPT-B", "--image-size", "250"], "250"),
    (["--model", "fmnist-32", "--new-tokens", "0"], "--new-tokens '0' must be comma-separated integers >= 1"),
    (["--model", "fmnist-32", "--device", "tpu"], "device 'tpu' unknown"),
])
def test_profile_bad_input(tmp_path, args, msg):
    r = CliRunner().invoke(main, ["profile", *args, "--out", str(tmp_path / "p")])
    assert r.exit_code == 1 and msg in r.output, r.output
    assert not (tmp_path / "p").exists()
