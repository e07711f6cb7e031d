"""Image folders as training data (mulosd.data.image_folder) and `mulosd train upsampler` on a user model set."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from mulosd.cli import main
from mulosd.data.image_folder import ImageFolder, center_crop_arr, find_images, to_signed
from mulosd.errors import MulosdError


def reference_center_crop_arr(pil_image, image_size):
    """LlamaGen's dataset/augmentation.py (from ADM's guided-diffusion image_datasets.py), verbatim but for the
    resampling constants' spelling: the oracle the implementation must match pixel for pixel."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.Resampling.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.Resampling.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return Image.fromarray(arr[crop_y: crop_y + image_size, crop_x: crop_x + image_size])


def _noise(h, w, channels=3, seed=0):
    shape = (h, w, channels) if channels > 1 else (h, w)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


@pytest.fixture
def folder(tmp_path):
    """Seven images in class sub-folders, in every supported kind (PNG RGB / grayscale / RGBA, JPEG in two
    spellings, a non-square one), plus files that are not images or are hidden."""
    root = tmp_path / "images"
    for sub in ("cats", "dogs/puppies", ".cache"):
        (root / sub).mkdir(parents=True)
    Image.fromarray(_noise(12, 12)).save(root / "cats" / "b.png")
    Image.fromarray(_noise(10, 10, 1)).save(root / "cats" / "a_gray.png")
    Image.fromarray(_noise(9, 9, 4), mode="RGBA").save(root / "dogs" / "rgba.PNG")
    Image.fromarray(_noise(16, 16)).save(root / "dogs" / "c.JPG")
    Image.fromarray(_noise(8, 8)).save(root / "dogs" / "puppies" / "d.jpeg")
    Image.fromarray(_noise(8, 20)).save(root / "wide.png")  # 20 wide, 8 tall
    Image.fromarray(_noise(8, 8)).save(root / "top.jpg")
    (root / "notes.txt").write_text("not an image")
    Image.fromarray(_noise(8, 8)).save(root / ".hidden.png")
    Image.fromarray(_noise(8, 8)).save(root / ".cache" / "x.png")
    return root


def test_images_are_found_recursively_in_sorted_order_as_signed_squares(folder):
    data = ImageFolder(folder, size=8)
    assert data.files == ["cats/a_gray.png", "cats/b.png", "dogs/c.JPG", "dogs/puppies/d.jpeg", "dogs/rgba.PNG",
                          "top.jpg", "wide.png"]
    batch = data.load(range(len(data)))
    assert batch.shape == (7, 3, 8, 8) and batch.dtype == torch.float32
    assert batch.min() >= -1 and batch.max() <= 1 and batch.min() < -0.9 and batch.max() > 0.9
    assert torch.equal(torch.cat(list(data.chunks(3))), batch) and torch.equal(data[2], batch[2])
    gray = batch[0]  # L -> RGB repeats the gray value in every channel
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    with Image.open(folder / "dogs" / "rgba.PNG") as im:  # RGBA -> RGB drops alpha, as torchvision's loader does
        want = np.asarray(center_crop_arr(im.convert("RGB"), 8))
    assert torch.equal(data.read(4), torch.from_numpy(want.copy()).permute(2, 0, 1))
    assert len(ImageFolder(folder, size=8, limit=2)) == 2
    one = ImageFolder(folder, size=4, channels=1)  # a grayscale tokenizer: every image as L
    assert one.load([1, 6]).shape == (2, 1, 4, 4)
    with Image.open(folder / "wide.png") as im:
        assert torch.equal(one.read(6)[0], torch.from_numpy(np.asarray(center_crop_arr(im.convert("L"), 4)).copy()))


def test_pixels_map_to_minus_one_one_as_torchvision_normalises_them():
    pixels = torch.tensor([0, 1, 127, 128, 254, 255], dtype=torch.uint8)
    assert to_signed(pixels).tolist() == ((pixels.float() / 255 - 0.5) / 0.5).tolist()
    assert to_signed(pixels)[0] == -1 and to_signed(pixels)[-1] == 1


@pytest.mark.parametrize("w, h, size", [(20, 8, 4), (7, 4, 4), (4, 7, 4), (33, 17, 8), (50, 20, 6), (5, 3, 8),
                                        (300, 200, 64)])
def test_centre_crop_matches_llamagen_pixel_for_pixel(w, h, size):
    """Box halvings while the short side >= 2 * size, one bicubic resize, centre square with floored offsets."""
    image = Image.fromarray(_noise(h, w, seed=w * h))
    got = center_crop_arr(image, size)
    assert got.size == (size, size)
    assert np.array_equal(np.asarray(got), np.asarray(reference_center_crop_arr(image, size)))


def test_centre_crop_on_a_known_image():
    # 7 x 4 columns 0..6 at the target size: no resize, the surplus of 3 columns splits 1 left, 2 right
    cols = np.tile(np.arange(7, dtype=np.uint8) * 10, (4, 1))
    assert np.asarray(center_crop_arr(Image.fromarray(cols), 4))[0].tolist() == [10, 20, 30, 40]
    # 16 x 8 of constant 2x2 blocks: one box halving gives the blocks' values exactly, then the middle 4 of 8 columns
    blocks = np.kron(np.arange(32, dtype=np.uint8).reshape(4, 8) * 7, np.ones((2, 2), dtype=np.uint8))
    out = np.asarray(center_crop_arr(Image.fromarray(blocks), 4))
    assert out.tolist() == (np.arange(32).reshape(4, 8)[:, 2:6] * 7).tolist()


def test_bad_folders_and_files_are_clear_errors(tmp_path, folder):
    with pytest.raises(MulosdError, match="does not exist"):
        ImageFolder(tmp_path / "nowhere", 8)
    (tmp_path / "file.png").write_bytes(b"")
    with pytest.raises(MulosdError, match="is not a directory"):
        ImageFolder(tmp_path / "file.png", 8)
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "a.gif").write_bytes(b"GIF89a")
    with pytest.raises(MulosdError, match=r"no images in .*empty.*\.png, \.jpg, \.jpeg"):
        find_images(tmp_path / "empty")
    (folder / "cats" / "broken.jpg").write_bytes(b"not a jpeg at all")
    data = ImageFolder(folder, 8)
    with pytest.raises(MulosdError, match=r"cannot read image .*cats/broken\.jpg"):
        data.load(range(len(data)))
    with pytest.raises(MulosdError, match="1 \\(grayscale\\) or 3 \\(RGB\\)"):
        ImageFolder(folder, 8, channels=4)


# ---- train upsampler on a user model set --------------------------------------------------------------------------
@pytest.fixture
def rgb_set(tmp_path):
    """A tiny random model set with an RGB tokenizer (factor 2, 32 codes) and a 4 x 4 target: 8 px images."""
    from mulosd.models.gpt import GPT, GPTConfig
    from mulosd.models.vq import VQConfig, VQModel
    from mulosd.pipeline import Pipeline

    torch.manual_seed(0)
    tok = VQModel(VQConfig(in_channels=3, channels=8, z_channels=8, codebook_size=32, codebook_dim=4))
    gpt = GPT(GPTConfig(vocab_size=32, grid_size=4, dim=16, n_layer=1, n_head=2, num_classes=2))
    Pipeline(tok, gpt, class_names=("a", "b"), name="tiny-rgb").save_pretrained(tmp_path / "set")
    return tmp_path / "set"


def _train(args):
    return CliRunner().invoke(main, ["train", "upsampler", "--threads", "1", "--batch-size", "3", "--warmup", "1",
                                     "--dim", "8", "--blocks", "1", "--checkpoint-every", "2", *args])


def test_train_upsampler_on_a_folder_for_a_user_set_resumes_and_joins_the_set(tmp_path, folder, rgb_set):
    from mulosd.models.upsample import LatentResampler
    from mulosd.pipeline import Pipeline

    common = ["--model", str(rgb_set), "--data", str(folder), "--ce-steps", "2", "--eval-images", "4"]
    r = _train([*common, "--out", str(tmp_path / "run"), "--steps", "2", "--no-add-to-set"])
    assert r.exit_code == 0, r.output
    r = _train([*common, "--out", str(tmp_path / "run"), "--steps", "4", "--resume"])  # stage 2 after the resume
    assert r.exit_code == 0, r.output
    assert "added upsampler_r2 to model set" in r.output
    r = _train([*common, "--out", str(tmp_path / "straight"), "--steps", "4", "--no-add-to-set"])
    assert r.exit_code == 0, r.output
    resumed = LatentResampler.from_pretrained(tmp_path / "run" / "model")
    straight = LatentResampler.from_pretrained(tmp_path / "straight" / "model")
    for a, b in zip(resumed.state_dict().values(), straight.state_dict().values()):
        assert torch.equal(a, b)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert "mse" in summary["final"] and summary["eval"]["test_images"] == 4
    assert summary["eval"]["eval_data"]["held_out"] is False
    pipe = Pipeline.from_pretrained(str(rgb_set))  # the set now loads with its learned r=2 up-sampler
    pipe.upsamplers[2].check(pipe.tokenizer, 2)
    resumed.check(pipe.tokenizer, 2)
    assert json.loads((rgb_set / "manifest.json").read_text())["upsamplers"] == {"2": "upsampler_r2"}
    r = _train([*common, "--out", str(tmp_path / "again"), "--steps", "1", "--ce-steps", "1"])  # replaces r=2
    assert r.exit_code == 0, r.output
    assert json.loads((rgb_set / "manifest.json").read_text())["upsamplers"] == {"2": "upsampler_r2_2"}


@pytest.mark.parametrize("args, message", [
    (["--tokenizer", "{set}/tokenizer", "--data", "{folder}"], "--data needs --model SET"),
    (["--model", "{set}", "--data", "{folder}", "--r", "3"],
     "r=3 does not divide the 4 x 4 code grid; allowed r: 2, 4"),
    (["--model", "{set}", "--data", "{folder}", "--r", "1"], "r must be an integer >= 2"),
    (["--model", "{set}"], "Fashion-MNIST is grayscale and the tokenizer takes 3 channels"),
    (["--model", "{set}", "--data", "{tmp}/nowhere"], "does not exist"),
    (["--model", "{set}", "--tokenizer", "{set}/tokenizer", "--data", "{folder}"], "exactly one"),
    (["--model", "fmnist-32", "--add-to-set"], "is shipped with mulosd and is not written"),
    (["--tokenizer", "{set}/tokenizer", "--add-to-set"], "--add-to-set needs --model SET"),
])
def test_bad_train_upsampler_input_is_one_line_and_no_run(tmp_path, folder, rgb_set, args, message):
    args = [a.format(folder=folder, set=rgb_set, tmp=tmp_path) for a in args]
    r = _train([*args, "--out", str(tmp_path / "run"), "--steps", "1"])
    assert r.exit_code == 1 and message in r.output, r.output
    assert r.output.startswith("Error: ") and len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


# ---- the perceptual objective -------------------------------------------------------------------------------------
@pytest.fixture
def rgb_classifier(tmp_path):
    """A random 3-channel classifier at 8 px, saved as a stem (BatchNorm statistics made non-trivial)."""
    from mulosd.models.classifier import Classifier, ClassifierConfig

    torch.manual_seed(1)
    net = Classifier(ClassifierConfig(in_channels=3, width=4, num_features=8, image_size=8))
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 2.0)
    net.save_pretrained(tmp_path / "clf")
    return tmp_path / "clf"


def test_perceptual_distance_is_zero_on_equal_images_per_image_and_differentiable(rgb_classifier):
    from mulosd.models.classifier import Classifier

    net = Classifier.from_pretrained(rgb_classifier).eval()
    x, y = torch.rand(2, 4, 3, 8, 8) * 2 - 1
    assert torch.allclose(net.perceptual_distance(x, x), torch.zeros(4), atol=1e-6)
    d = net.perceptual_distance(x, y)
    assert (d > 0).all() and torch.allclose(d, net.perceptual_distance(y, x), atol=1e-6)
    alone = torch.stack([net.perceptual_distance(x[i : i + 1], y[i : i + 1])[0] for i in range(4)])
    assert torch.allclose(d, alone, atol=1e-6)  # eval mode: one image's distance does not depend on the batch
    z = x.clone().requires_grad_(True)
    net.perceptual_distance(z, y).sum().backward()
    assert z.grad.abs().sum() > 0
    maps = net.feature_maps(x)  # three blocks at H/2, H/4, H/8
    assert [m.shape[-1] for m in maps] == [4, 2, 1]


def test_perceptual_weight_adds_exactly_its_term_to_the_stage_two_loss(folder, rgb_set, rgb_classifier):
    from mulosd.training.recipes import UpsamplerRecipe

    kw = dict(model=str(rgb_set), data=str(folder), ce_steps=0, dim=8, n_blocks=1)
    plain = UpsamplerRecipe(**kw)
    with_features = UpsamplerRecipe(**kw, perceptual_weight=2.5, features=str(rgb_classifier))
    assert plain.feature_net is None and "features" in with_features.describe()
    torch.manual_seed(0)
    model = plain.build_model()
    index = torch.arange(4)
    base, m0 = plain.loss(model, index, step=0, gen=None)
    total, m1 = with_features.loss(model, index, step=0, gen=None)
    assert "perceptual" not in m0 and m1["perceptual"] > 0
    assert torch.isclose(total - base, torch.tensor(2.5 * m1["perceptual"]), rtol=1e-4)
    out = with_features.evaluate(model)  # evaluation reports the distance for the learned and pixel paths
    assert out["learned"]["up_perceptual"] > 0 and out["tokenizer_perceptual"] >= 0


@pytest.mark.parametrize("args, message", [
    (["--perceptual-weight", "1"], "has no classifier for the perceptual loss"),
    (["--perceptual-weight", "1", "--features", "{mono}"], "takes 1-channel 32 px images; the up-sampler's images "
                                                           "are 3-channel 8 px"),
])
def test_bad_perceptual_input_is_one_line_and_no_run(tmp_path, folder, rgb_set, args, message):
    from mulosd.zoo import resolve

    mono = resolve("fmnist-32") / "classifier"
    args = ["--model", str(rgb_set), "--data", str(folder), *[a.format(mono=mono) for a in args]]
    r = _train([*args, "--out", str(tmp_path / "run"), "--steps", "1"])
    assert r.exit_code == 1 and message in r.output, r.output
    assert r.output.startswith("Error: ") and len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()
