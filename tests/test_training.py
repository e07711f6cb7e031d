import json
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import needs_fmnist
from mulosd.errors import MulosdError
from mulosd.models.classifier import Classifier, ClassifierConfig
from mulosd.training import TrainConfig, train


class ToyRecipe:
    """Classifier on fixed random images; optionally 'killed' (raises) at a given step."""

    name = "toy"

    def __init__(self, crash_at=None):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(40, 1, 32, 32, generator=g)
        self.y = torch.randint(0, 10, (40,), generator=g)
        self.crash_at = crash_at

    def describe(self):
        return {"n": 40}

    def build_model(self):
        return Classifier(ClassifierConfig(width=4, num_features=8))

    def num_examples(self):
        return 40

    def loss(self, model, index, step, gen):
        if step == self.crash_at:
            raise KeyboardInterrupt("killed")
        noise = 0.1 * torch.randn(len(index), 1, 32, 32, generator=gen)  # drawn on the CPU, then moved
        device = next(model.parameters()).device
        return F.cross_entropy(model((self.x[index] + noise).to(device)), self.y[index].to(device)), {}

    def after_step(self, model, step):
        pass

    def evaluate(self, model):
        return {}


CFG = dict(steps=7, batch_size=8, lr=1e-2, warmup=2, checkpoint_every=3, log_every=1)


def test_killed_run_resumes_to_the_same_model(tmp_path):
    ref = train(ToyRecipe(), tmp_path / "ref", TrainConfig(**CFG), progress=False)
    with pytest.raises(KeyboardInterrupt):
        train(ToyRecipe(crash_at=5), tmp_path / "run", TrainConfig(**CFG), progress=False)
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 3  # the last periodic checkpoint survived the kill
    with pytest.raises(MulosdError, match="--resume"):
        train(ToyRecipe(), tmp_path / "run", TrainConfig(**CFG), progress=False)
    train(ToyRecipe(), tmp_path / "run", TrainConfig(**CFG), resume=True, progress=False)
    a = Classifier.from_pretrained(tmp_path / "ref" / "model").state_dict()
    b = Classifier.from_pretrained(tmp_path / "run" / "model").state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["final"]["step"] == 7
    assert ref["final"]["step"] == 7


class RecordingRecipe(ToyRecipe):
    """ToyRecipe that keeps the initial weights and the weights after every optimiser step."""

    def build_model(self):
        model = super().build_model()
        self.seen = [{k: v.clone() for k, v in model.state_dict().items()}]
        return model

    def after_step(self, model, step):
        self.seen.append({k: v.detach().clone() for k, v in model.state_dict().items()})


def test_ema_exports_the_moving_average_and_a_killed_run_resumes_to_it(tmp_path):
    from mulosd.training.trainer import ema_decay

    rec = RecordingRecipe()
    train(rec, tmp_path / "ref", TrainConfig(**CFG, ema=0.9), progress=False)
    want = {k: v.clone() for k, v in rec.seen[0].items()}
    for step, weights in enumerate(rec.seen[1:]):  # decays 1/10, 2/11, ... capped at 0.9
        d = ema_decay(step, 0.9)
        for k, v in weights.items():
            want[k] = d * want[k] + (1 - d) * v if v.is_floating_point() else v
    assert [ema_decay(s, 0.9) for s in (0, 1, 79, 80, 10**6)] == [0.1, 2 / 11, 80 / 89, 0.9, 0.9]
    got = Classifier.from_pretrained(tmp_path / "ref" / "model").state_dict()
    assert all(torch.allclose(got[k], want[k], atol=1e-6) for k in want)
    raw = torch.load(tmp_path / "ref" / "checkpoint.pt", weights_only=True)["model"]
    assert any(not torch.allclose(raw[k], got[k]) for k in got)  # the checkpoint keeps the raw weights
    with pytest.raises(KeyboardInterrupt):
        train(ToyRecipe(crash_at=5), tmp_path / "run", TrainConfig(**CFG, ema=0.9), progress=False)
    for other in (0.0, 0.5):  # the average cannot be rebuilt for another decay
        with pytest.raises(MulosdError, match=f"--ema 0.9, not {other}"):
            train(ToyRecipe(), tmp_path / "run", TrainConfig(**CFG, ema=other), resume=True, progress=False)
    train(ToyRecipe(), tmp_path / "run", TrainConfig(**CFG, ema=0.9), resume=True, progress=False)
    resumed = Classifier.from_pretrained(tmp_path / "run" / "model").state_dict()
    assert all(torch.allclose(resumed[k], got[k], atol=1e-6) for k in got)
    with pytest.raises(MulosdError, match="--ema must be in"):
        train(ToyRecipe(), tmp_path / "bad", TrainConfig(**CFG, ema=1.0), progress=False)


def test_resume_refuses_other_settings_and_missing_checkpoint(tmp_path):
    with pytest.raises(MulosdError, match="does not exist"):
        train(ToyRecipe(), tmp_path / "none", TrainConfig(**CFG), resume=True, progress=False)
    with pytest.raises(KeyboardInterrupt):
        train(ToyRecipe(crash_at=4), tmp_path / "r", TrainConfig(**CFG), progress=False)
    other = ToyRecipe()
    other.describe = lambda: {"n": 41}
    with pytest.raises(MulosdError, match="different settings"):
        train(other, tmp_path / "r", TrainConfig(**CFG), resume=True, progress=False)
    with pytest.raises(MulosdError, match="--steps"):
        train(ToyRecipe(), tmp_path / "z", TrainConfig(**{**CFG, "steps": 0}), progress=False)


@needs_fmnist
def test_cli_trains_every_model_kind_on_real_data(tmp_path):
    """Each `mulosd train` sub-command runs end to end on a small slice of Fashion-MNIST and exports a model."""
    from click.testing import CliRunner

    from mulosd.cli import main

    run = CliRunner().invoke
    common = ["--steps", "3", "--batch-size", "8", "--warmup", "1", "--limit", "64", "--checkpoint-every", "2"]
    r = run(main, ["train", "tokenizer", "--out", str(tmp_path / "tok"), "--channels", "8", "--z-channels", "8",
                   "--codebook-size", "32", *common])
    assert r.exit_code == 0, r.output
    r = run(main, ["train", "ar", "--out", str(tmp_path / "ar"), "--tokenizer", str(tmp_path / "tok" / "model"),
                   "--grid", "8", "--dim", "32", "--layers", "1", "--heads", "2", *common])
    assert r.exit_code == 0, r.output
    r = run(main, ["train", "classifier", "--out", str(tmp_path / "clf"), "--width", "4", "--features", "8", *common])
    assert r.exit_code == 0, r.output
    for d in ("tok", "ar", "clf"):
        assert (tmp_path / d / "model.safetensors").exists() and (tmp_path / d / "summary.json").exists()
    r = run(main, ["train", "ar", "--out", str(tmp_path / "ar2"), "--tokenizer", str(tmp_path / "tok" / "model"),
                   "--dim", "30", "--heads", "4", *common])
    assert r.exit_code == 1 and "divisible" in r.output


# ---- device and precision ---------------------------------------------------------------------------------------
# ToyRecipe's float32 losses (CFG, log every step), recorded before training learnt --device / --dtype: moving
# batches to the model's device and the (disabled) loss scaler must not change a CPU float32 run.
TOY_FLOAT32_LOSSES = [2.3036067485809326, 2.563714027404785, 2.142883777618408, 2.3713276386260986,
                      2.357414722442627, 2.228898763656616, 2.2721567153930664]


def losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "log.jsonl").read_text().splitlines()]


def test_a_float32_cpu_run_keeps_its_loss_curve(tmp_path):
    summary = train(ToyRecipe(), tmp_path / "r", TrainConfig(**CFG), progress=False)
    assert losses(tmp_path / "r") == pytest.approx(TOY_FLOAT32_LOSSES, rel=1e-5)
    assert summary["device"] == "cpu" and summary["dtype"] == "float32"


def test_bfloat16_on_the_cpu_trains_close_to_float32_and_resumes_exactly(tmp_path):
    cfg = TrainConfig(**CFG)
    summary = train(ToyRecipe(), tmp_path / "ref", cfg, progress=False, dtype="bfloat16")
    got = losses(tmp_path / "ref")
    assert summary["dtype"] == "bfloat16" and all(map(math.isfinite, got))
    assert got != TOY_FLOAT32_LOSSES  # autocast was on
    assert got[0] == pytest.approx(TOY_FLOAT32_LOSSES[0], abs=0.01)
    assert got == pytest.approx(TOY_FLOAT32_LOSSES, abs=0.15)
    with pytest.raises(KeyboardInterrupt):
        train(ToyRecipe(crash_at=5), tmp_path / "run", cfg, progress=False, dtype="bfloat16")
    train(ToyRecipe(), tmp_path / "run", cfg, resume=True, progress=False, dtype="bfloat16")
    a = Classifier.from_pretrained(tmp_path / "ref" / "model").state_dict()
    b = Classifier.from_pretrained(tmp_path / "run" / "model").state_dict()
    assert all(v.dtype == torch.float32 for v in a.values() if v.is_floating_point())  # float32 master weights
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_resumes_in_another_precision(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        train(ToyRecipe(crash_at=4), tmp_path / "run", TrainConfig(**CFG), progress=False, dtype="bfloat16")
    summary = train(ToyRecipe(), tmp_path / "run", TrainConfig(**CFG), resume=True, progress=False)
    assert summary["final"]["step"] == 7 and summary["dtype"] == "float32"


def test_float16_and_missing_devices_are_refused_before_anything_is_written(tmp_path):
    with pytest.raises(MulosdError, match="allowed on the CPU: float32, bfloat16"):
        train(ToyRecipe(), tmp_path / "a" / "run", TrainConfig(**CFG), progress=False, dtype="float16")
    with pytest.raises(MulosdError, match="allowed: cpu, cuda, cuda:N, auto"):
        train(ToyRecipe(), tmp_path / "a" / "run", TrainConfig(**CFG), progress=False, device="tpu")
    assert not (tmp_path / "a").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_cli_train_on_cuda_without_cuda_is_one_message_and_no_run_directory(tmp_path):
    from click.testing import CliRunner

    from mulosd.cli import main

    for extra, message in ((["--device", "cuda"], "has no CUDA device"),
                           (["--dtype", "float16"], "allowed on the CPU: float32, bfloat16")):
        r = CliRunner().invoke(main, ["train", "classifier", "--out", str(tmp_path / "x" / "run"), "--steps", "2",
                                      "--limit", "16", *extra])
        assert r.exit_code == 1 and message in r.output and "Traceback" not in r.output, r.output
        assert len([line for line in r.output.splitlines() if line.strip()]) == 1
    assert not (tmp_path / "x").exists()


@pytest.mark.cuda
def test_a_cuda_bfloat16_run_resumes_on_the_cpu(tmp_path):
    cfg = TrainConfig(**CFG)
    with pytest.raises(KeyboardInterrupt):
        train(ToyRecipe(crash_at=5), tmp_path / "run", cfg, progress=False, device="cuda", dtype="bfloat16")
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)  # no map_location: as saved
    tensors = [*ckpt["model"].values(), *[t for s in ckpt["optimizer"]["state"].values() for t in s.values()]]
    assert ckpt["step"] == 3 and tensors and all(t.device.type == "cpu" for t in tensors)
    summary = train(ToyRecipe(), tmp_path / "run", cfg, resume=True, progress=False, device="cpu", dtype="bfloat16")
    assert summary["final"]["step"] == 7 and summary["device"] == "cpu" and math.isfinite(summary["final"]["loss"])
    assert losses(tmp_path / "run")[0] == pytest.approx(TOY_FLOAT32_LOSSES[0], abs=0.01)
    # the other way round, in float16 with its loss scale kept: CPU start, CUDA finish
    with pytest.raises(KeyboardInterrupt):
        train(ToyRecipe(crash_at=5), tmp_path / "back", cfg, progress=False)
    train(ToyRecipe(), tmp_path / "back", cfg, resume=True, progress=False, device="cuda", dtype="float16")
    assert torch.load(tmp_path / "back" / "checkpoint.pt", weights_only=True)["scaler"]["scale"] > 0
    Classifier.from_pretrained(tmp_path / "back" / "model")


@needs_fmnist
def test_recipes_keep_their_float32_losses_and_train_in_bfloat16(tmp_path):
    """Two real recipes (data on the CPU, batches moved to the model's device): float32 losses as recorded before
    --device / --dtype existed, and a bfloat16 tokenizer run (its dead-code restarts copy bfloat16 latents into
    the float32 codebook) close to them."""
    from mulosd.models.vq import VQConfig
    from mulosd.training.recipes import ClassifierRecipe, TokenizerRecipe

    cfg = dict(steps=4, batch_size=8, lr=1e-2, warmup=1, checkpoint_every=2, log_every=1)
    train(ClassifierRecipe(cfg=ClassifierConfig(width=4, num_features=8), limit=64), tmp_path / "clf",
          TrainConfig(**cfg), progress=False)
    assert losses(tmp_path / "clf") == pytest.approx([2.184687, 2.810517, 2.271405, 3.124968], abs=1e-4)

    def tokenizer():
        return TokenizerRecipe(vq=VQConfig(channels=8, z_channels=8, codebook_size=32), limit=64, dead_code_every=2)

    train(tokenizer(), tmp_path / "tok", TrainConfig(**cfg), progress=False)
    float32 = losses(tmp_path / "tok")
    assert float32 == pytest.approx([2.837494, 1.709846, 1.261351, 1.295089], abs=1e-4)
    train(tokenizer(), tmp_path / "tok16", TrainConfig(**cfg), progress=False, dtype="bfloat16")
    assert losses(tmp_path / "tok16") == pytest.approx(float32, abs=0.1)
