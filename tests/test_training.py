import json

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
        noise = 0.1 * torch.randn(len(index), 1, 32, 32, generator=gen)
        return F.cross_entropy(model(self.x[index] + noise), self.y[index]), {}

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
