"""LlamaGen user sets: `mulosd import llamagen`, t2i caption conditions, T5 prompts, LlamaGen's CFG conventions.

Every file is written here in LlamaGen's layouts ({"model": state_dict, "args": Namespace, ...} torch files) with
tiny random models: a VQ with factor 2 and 32 codes, GPTs of custom size "2,2,32" on a 6x6 grid (12 px), a
"1,2,32" drafter, low-resolution GPTs on a 4x4 grid (8 px: r = 1.5), and t2i twins with 8 caption positions of 16
channels. (The real-size checks against LlamaGen's own code are in docs/MODELS.md.)
"""

from __future__ import annotations

import argparse
import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from mulosd.cli import main
from mulosd.decoding.methods import get_method
from mulosd.decoding.sampling import RandomStreams, SamplingConfig, guidance_scale, process_logits
from mulosd.decoding.window import generate_ar
from mulosd.errors import MulosdError
from mulosd.models.condition import Captions, read_caption_features
from mulosd.models.gpt import GPT
from mulosd.models.llamagen import llamagen_config, load_llamagen_gpt
from mulosd.models.llamagen_vq import LlamaGenVQ, LlamaGenVQConfig
from mulosd.pipeline import Pipeline
from mulosd.zoo.importer import vq_config_from_state

CAP_LEN, CAP_DIM = 8, 16


def _gpt_file(path, size, grid, condition, seed, vocab=32, std=0.2):
    torch.manual_seed(seed)
    cfg = llamagen_config(size, grid_size=grid, vocab_size=vocab, num_classes=5, condition=condition,
                          caption_dim=CAP_DIM, cls_token_num=CAP_LEN if condition == "caption" else None)
    model = GPT(cfg)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=std)
    if condition == "caption":
        torch.nn.init.normal_(model.cls_embedding.uncond_embedding, std=1.0)
    torch.save({"model": model.state_dict(), "optimizer": {}, "steps": 3, "args": argparse.Namespace(gpt_model=size)},
               path)
    return path


def _vq_file(path, seed=0, codes=32):
    torch.manual_seed(seed)
    vq = LlamaGenVQ(LlamaGenVQConfig(channels=8, channel_mult=(1, 2), z_channels=8, codebook_size=codes,
                                     codebook_dim=4, norm_groups=8))  # the group count import infers
    state = {**vq.state_dict(), "quantize.codebook_used": torch.zeros(16)}
    torch.save({"model": state, "args": argparse.Namespace(vq_model="VQ-16")}, path)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("llamagen")
    f = {"vq": _vq_file(d / "vq.pt"), "vq_other": _vq_file(d / "vq_other.pt", seed=1),
         "vq_64": _vq_file(d / "vq_64.pt", codes=64)}
    for name, size, grid, cond, seed in [("c2i", "2,2,32", 6, "class", 0), ("c2i_small", "1,2,32", 6, "class", 1),
                                         ("c2i_lo", "2,2,32", 4, "class", 2), ("t2i", "2,2,32", 6, "caption", 3),
                                         ("t2i_small", "1,2,32", 6, "caption", 4), ("t2i_lo", "2,2,32", 4, "caption", 5)]:
        f[name] = _gpt_file(d / f"{name}.pt", size, grid, cond, seed)
    np.save(d / "cap_a.npy", np.random.default_rng(0).normal(size=(1, 5, CAP_DIM)).astype(np.float32))
    np.save(d / "cap_b.npy", np.random.default_rng(1).normal(size=(3, CAP_DIM)).astype(np.float32))
    f["caps"] = [d / "cap_a.npy", d / "cap_b.npy"]
    return f


def _import(files, out, *extra, target="c2i", drafter="c2i_small", lowres="c2i_lo"):
    args = ["import", "llamagen", "--gpt", str(files[target]), "--size", "2,2,32", "--image-size", "12",
            "--vq", str(files["vq"]), "--out", str(out)]
    if drafter:
        args += ["--drafter", str(files[drafter]), "--drafter-size", "1,2,32"]
    if lowres:
        args += ["--lowres", str(files[lowres]), "--lowres-size", "2,2,32", "--lowres-image-size", "8"]
    return CliRunner().invoke(main, args + list(extra))


@pytest.fixture(scope="module")
def c2i_set(files, tmp_path_factory):
    out = tmp_path_factory.mktemp("sets") / "c2i-set"
    res = _import(files, out)
    assert res.exit_code == 0, res.output
    return out


@pytest.fixture(scope="module")
def t2i_set(files, tmp_path_factory):
    out = tmp_path_factory.mktemp("sets") / "t2i-set"
    res = _import(files, out, "--link", target="t2i", drafter="t2i_small", lowres="t2i_lo")
    assert res.exit_code == 0, res.output
    return out


# ---- import ------------------------------------------------------------------------------------------------------
def test_import_writes_a_set_whose_models_are_the_files(files, c2i_set):
    spec = json.loads((c2i_set / "manifest.json").read_text())
    assert spec["drafters"] == {"small": "drafter_small", "r1.5": "drafter_r1_5"}
    assert spec["class_names"][:2] == ["class_0", "class_1"] and spec["classifier"] is None
    pipe = Pipeline.from_pretrained(c2i_set)
    ref = load_llamagen_gpt(files["c2i"], "2,2,32", grid_size=6, vocab_size=32, num_classes=5)
    for key, value in ref.state_dict().items():
        assert torch.equal(pipe.target.state_dict()[key], value), key
    assert isinstance(pipe.tokenizer, LlamaGenVQ) and pipe.drafters["r1.5"].config.grid_size == 4
    assert pipe.target.config.num_classes == 5  # read from the file's class table
    assert not list(c2i_set.parent.glob(".c2i-set.*"))  # no staging folder left behind


def test_every_method_the_set_supports_runs_and_the_exact_ones_are_ar_token_for_token(c2i_set):
    pipe = Pipeline.from_pretrained(c2i_set)
    supported = pipe.supported_methods()
    assert {m for m, why in supported.items() if why is None} == {"ar", "sd", "sjd", "mcsjd", "pjd", "lantern", "gsd",
                                                                 "zipar", "mulo"}
    assert "continuous" in supported["cspd"] and "has no EAGLE head" in supported["eagle2"]
    for method in sorted(m for m, why in supported.items() if why is None):
        out = pipe([0, 3], num_per_class=2, method=method, batch_size=3, seed=5)  # ragged: batches of 3 and 1
        assert out.tokens.shape == (4, 6, 6) and out.images.shape == (4, 3, 12, 12), method
        assert "class_accuracy" not in out.stats and out.predictions is None  # no classifier in a user set
    labels = torch.tensor([0, 3, 4])
    sampling = SamplingConfig(cfg_scale=3.0, temperature=0.0, cfg_interval=3)  # LlamaGen's per-token guidance too
    ar = pipe.generate(get_method("ar")(pipe), labels, sampling, batch_size=3).tokens
    for method in ("sd", "sjd", "mcsjd"):
        got = pipe.generate(get_method(method)(pipe), labels, sampling, batch_size=3).tokens
        assert torch.equal(got, ar), method


def test_info_lists_the_methods_and_why_not(c2i_set):
    res = CliRunner().invoke(main, ["info", "--model", str(c2i_set)])
    assert res.exit_code == 0, res.output
    assert "mulo     yes" in res.output and "cspd     no: " in res.output and "r1.5" in res.output


def test_generate_on_an_imported_set_from_the_command_line(c2i_set, tmp_path):
    res = CliRunner().invoke(main, ["generate", "--model", str(c2i_set), "--method", "mulo", "--classes", "1,class_2",
                                    "--num-per-class", "1", "--out", str(tmp_path / "g.png"), "--no-progress",
                                    "--stats-json", str(tmp_path / "s.json")])
    assert res.exit_code == 0, res.output
    params = json.loads((tmp_path / "s.json").read_text())["params"]
    assert (params["r"], params["drafter"], params["upsampler"]) == (1.5, "r1.5", "pixel")  # resolved defaults


@pytest.mark.parametrize("change, expected", [
    ({"--size": "1,2,32"}, "2 transformer layers but the config says n_layer=1"),
    ({"--size": "GPT-Q"}, "unknown LlamaGen size 'GPT-Q'"),
    ({"--image-size": "13"}, "image size 13 is not a positive multiple of 2"),
    ({"--lowres-image-size": "16"}, "must be smaller than the target's"),
    ({"--drafter-image-size": "8"}, "a drafter must work on the target's 6x6"),
    ({"--drafter-vq": "vq_other"}, "differs from the set's"),
    ({"--lowres-vq": "vq_other"}, "differs from the set's"),
    ({"--vq": "vq_64"}, "predicts 32 codes but the tokenizer has 64"),
    ({"--lowres": "t2i_lo"}, "both must be c2i or both t2i"),
])
def test_bad_imports_are_one_message_and_leave_nothing(files, tmp_path, change, expected):
    out = tmp_path / "set"
    args = ["import", "llamagen", "--gpt", str(files["c2i"]), "--size", "2,2,32", "--image-size", "12",
            "--vq", str(files["vq"]), "--drafter", str(files["c2i_small"]), "--drafter-size", "1,2,32",
            "--lowres", str(files["c2i_lo"]), "--lowres-size", "2,2,32", "--lowres-image-size", "8", "--out", str(out)]
    for flag, value in change.items():
        value = str(files[value]) if value in files else value
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 1 and expected in res.output, res.output
    assert res.output.count("Error") == 1 and "Traceback" not in res.output
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_an_existing_set_is_not_overwritten_without_force_and_force_replaces_only_a_set(files, tmp_path):
    out = tmp_path / "set"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    res = _import(files, out, drafter=None, lowres=None)
    assert res.exit_code == 1 and "exists and is not empty" in res.output
    res = _import(files, out, "--force", drafter=None, lowres=None)  # not a model set: --force refuses too
    assert res.exit_code == 1 and "holds no manifest.json" in res.output
    (out / "keep.txt").unlink()
    assert _import(files, out).exit_code == 0
    (out / "keep.txt").write_text("mine")
    assert _import(files, out, "--force", "--link", drafter=None, lowres=None).exit_code == 0
    assert (out / "keep.txt").read_text() == "mine"  # only the earlier set's own files went
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt", "manifest.json", "target.json", "tokenizer.json"]
    assert Pipeline.from_pretrained(out).drafters == {}


def test_checkpoints_inside_out_are_refused(files, tmp_path):
    out = tmp_path / "set"
    out.mkdir()
    inside = out / "vq.pt"
    shutil.copy(files["vq"], inside)
    res = CliRunner().invoke(main, ["import", "llamagen", "--gpt", str(files["c2i"]), "--size", "2,2,32",
                                    "--image-size", "12", "--vq", str(inside), "--out", str(out), "--force"])
    assert res.exit_code == 1 and "lies inside --out" in res.output
    assert inside.exists()


def test_a_failed_import_leaves_no_folders_it_made(files, tmp_path):
    out = tmp_path / "new" / "deeper" / "set"
    res = _import(files, out, "--size", "1,2,32", drafter=None, lowres=None)
    assert res.exit_code == 1 and not (tmp_path / "new").exists()


def test_a_ratio_that_prints_rounded_names_its_grid(files, tmp_path):
    """A 12 px low-res model under a 16 px target: 8x8 over 6x6 tokens, r = 4/3 (role r1.33333)."""
    out = tmp_path / "set"
    res = CliRunner().invoke(main, ["import", "llamagen", "--gpt", str(files["c2i"]), "--size", "2,2,32",
                                    "--image-size", "16", "--vq", str(files["vq"]), "--lowres", str(files["c2i_lo"]),
                                    "--lowres-size", "2,2,32", "--lowres-image-size", "12", "--out", str(out)])
    assert res.exit_code == 0, res.output
    pipe = Pipeline.from_pretrained(out)
    assert list(pipe.drafters) == ["r1.33333"] and pipe.supported_methods()["mulo"] is None
    for r in (None, 1.333, 4 / 3):
        method = get_method("mulo")(pipe, **({} if r is None else {"r": r}))
        assert method.params()["r"] == 8 / 6 and method.drafter_role == "r1.33333"
    assert pipe([1], method="mulo", r=1.333).tokens.shape == (1, 8, 8)


def test_linked_weights_are_read_in_place_and_a_moved_file_is_a_clear_error(files, t2i_set, tmp_path):
    meta = json.loads((t2i_set / "target.json").read_text())
    assert meta["weights"]["format"] == "llamagen-gpt" and not (t2i_set / "target.safetensors").exists()
    moved = tmp_path / "set"
    shutil.copytree(t2i_set, moved)
    meta["weights"]["path"] = str(tmp_path / "gone.pt")
    (moved / "target.json").write_text(json.dumps(meta))
    with pytest.raises(MulosdError, match="gone.pt, which does not exist"):
        Pipeline.from_pretrained(moved)
    meta["weights"]["path"], meta["weights"]["bytes"] = str(files["t2i"]), 5
    (moved / "target.json").write_text(json.dumps(meta))
    with pytest.raises(MulosdError, match="has changed since the set was imported"):
        Pipeline.from_pretrained(moved)
    swapped = tmp_path / "swapped.pt"  # same size, other bytes (another checkpoint of the same architecture)
    data = bytearray(files["t2i"].read_bytes())
    data[-10] ^= 0xFF
    swapped.write_bytes(bytes(data))
    meta["weights"]["path"], meta["weights"]["bytes"] = str(swapped), len(data)
    (moved / "target.json").write_text(json.dumps(meta))
    with pytest.raises(MulosdError, match="has changed since the set was imported"):
        Pipeline.from_pretrained(moved)


def test_vq_architecture_is_read_from_the_tensors(files):
    from mulosd.models.llamagen import read_linked_weights

    cfg = vq_config_from_state(read_linked_weights("llamagen-vq", files["vq"]), "vq.pt")
    assert (cfg.channels, cfg.channel_mult, cfg.z_channels, cfg.num_res_blocks, cfg.codebook_size, cfg.codebook_dim,
            cfg.norm_groups, cfg.downsample) == (8, (1, 2), 8, 2, 32, 4, 8, 2)
    assert vq_config_from_state(LlamaGenVQ(LlamaGenVQConfig()).state_dict(), "vq16") == LlamaGenVQConfig()


# ---- t2i ---------------------------------------------------------------------------------------------------------
def test_t2i_set_generates_from_caption_files_with_every_method(files, t2i_set, tmp_path):
    pipe = Pipeline.from_pretrained(t2i_set)
    assert pipe.condition == "caption" and pipe.class_names == () and pipe.caption_shape == (CAP_LEN, CAP_DIM)
    caps = pipe.captions(features=files["caps"])
    for method in ("ar", "sd", "sjd", "mcsjd", "pjd", "lantern", "gsd", "zipar", "mulo"):
        out = pipe(captions=caps, num_per_class=2, method=method, batch_size=3)
        assert out.tokens.shape == (4, 6, 6) and out.labels.tolist() == [0, 0, 1, 1], method
    for greedy in (SamplingConfig(cfg_scale=4.0, temperature=0.0), SamplingConfig(cfg_scale=4.0, temperature=0.0,
                                                                                  cfg_interval=2)):
        ar = pipe.generate(get_method("ar")(pipe), caps, greedy).tokens
        for method in ("sd", "sjd", "mcsjd", "pjd"):  # exact: AR's tokens, padded captions and per-token guidance too
            assert torch.equal(pipe.generate(get_method(method)(pipe), caps, greedy, batch_size=2).tokens, ar)
    res = CliRunner().invoke(main, ["generate", "--model", str(t2i_set), "--method", "mulo", "--caption-features",
                                    str(files["caps"][0]), "--num-per-class", "2", "--out", str(tmp_path / "t.png"),
                                    "--save-images", str(tmp_path / "imgs"), "--no-progress"])
    assert res.exit_code == 0, res.output
    assert len(list((tmp_path / "imgs").glob("*.png"))) == 2


@pytest.mark.parametrize("args, expected", [
    (["--classes", "1"], "text-to-image (t2i): it takes a caption"),
    ([], "text-to-image (t2i): it takes a caption"),
    (["--prompt", "a cat"], "pass --t5-path DIR"),
])
def test_t2i_set_refuses_classes_and_prompts_without_t5(t2i_set, tmp_path, args, expected):
    res = CliRunner().invoke(main, ["generate", "--model", str(t2i_set), "--out", str(tmp_path / "x.png")] + args)
    assert res.exit_code == 1 and expected in res.output, res.output
    assert not (tmp_path / "x.png").exists()


def test_c2i_set_refuses_prompts_and_caption_files(c2i_set, files, tmp_path):
    for args in (["--prompt", "a cat"], ["--caption-features", str(files["caps"][0])]):
        res = CliRunner().invoke(main, ["generate", "--model", str(c2i_set), "--out", str(tmp_path / "x.png")] + args)
        assert res.exit_code == 1 and "class-conditional (c2i)" in res.output, res.output
    pipe = Pipeline.from_pretrained(c2i_set)
    with pytest.raises(MulosdError, match="class-conditional"):
        pipe.target.prefill(Captions(torch.zeros(1, 1, 4), torch.ones(1, 1, dtype=torch.bool)))


def test_caption_feature_files_in_llamagen_and_plain_layouts(tmp_path):
    tokens = torch.randn(5, CAP_DIM)
    np.save(tmp_path / "ll.npy", tokens[None].numpy())
    caps = read_caption_features(tmp_path / "ll.npy", CAP_LEN, CAP_DIM)
    assert caps.mask.tolist() == [[False] * 3 + [True] * 5]  # right-aligned: LlamaGen's left padding
    assert torch.equal(caps.features[0, 3:], tokens) and not caps.features[0, :3].any()
    full = torch.cat([torch.zeros(2, CAP_DIM), torch.randn(6, CAP_DIM)])
    from safetensors.torch import save_file

    save_file({"caption": full}, str(tmp_path / "full.safetensors"))
    caps = read_caption_features(tmp_path / "full.safetensors", CAP_LEN, CAP_DIM)
    assert caps.mask.tolist() == [[False, False] + [True] * 6] and torch.equal(caps.features[0], full)
    long = read_caption_features(_save(tmp_path / "long.npy", torch.randn(1, 5, CAP_DIM)), 4, CAP_DIM)
    assert long.mask.all()  # truncated to the first 4 tokens, as LlamaGen's dataset does
    for bad, message in [(torch.randn(5, CAP_DIM + 1), "allowed: \\[1, L, 16\\]"),
                         (torch.randn(2, 5, CAP_DIM), "caption features have shape"),
                         (torch.zeros(CAP_LEN, CAP_DIM), "every caption position is zero"),
                         (torch.cat([torch.randn(3, CAP_DIM), torch.zeros(CAP_LEN - 3, CAP_DIM)]),
                          "must hold its tokens in the last positions"),
                         (torch.full((2, CAP_DIM), float("nan")), "NaN")]:
        with pytest.raises(MulosdError, match=message):
            read_caption_features(_save(tmp_path / "bad.npy", bad), CAP_LEN, CAP_DIM)
    save_file({"a": full, "b": full.clone()}, str(tmp_path / "two.safetensors"))
    with pytest.raises(MulosdError, match="holds 2 tensors"):
        read_caption_features(tmp_path / "two.safetensors", CAP_LEN, CAP_DIM)


def _save(path, tensor):
    np.save(path, tensor.numpy())
    return path


def _t2i_model(seed=0):
    torch.manual_seed(seed)
    cfg = llamagen_config("2,2,32", grid_size=3, vocab_size=16, condition="caption", caption_dim=CAP_DIM,
                          cls_token_num=CAP_LEN)
    model = GPT(cfg).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)
    torch.nn.init.normal_(model.cls_embedding.uncond_embedding)
    return model


def _captions(valid=(3, 8), seed=0):
    g = torch.Generator().manual_seed(seed)
    feats, mask = torch.zeros(len(valid), CAP_LEN, CAP_DIM), torch.zeros(len(valid), CAP_LEN, dtype=torch.bool)
    for b, n in enumerate(valid):
        feats[b, CAP_LEN - n:] = torch.randn(n, CAP_DIM, generator=g)
        mask[b, CAP_LEN - n:] = True
    return Captions(feats, mask)


def test_caption_padding_is_hidden_from_attention():
    model, caps = _t2i_model(), _captions()
    tokens = torch.randint(0, 16, (2, 9))
    base = model(caps, tokens)
    noisy = Captions(caps.features + torch.randn_like(caps.features) * ~caps.mask[..., None], caps.mask)
    assert torch.allclose(model(noisy, tokens), base, atol=1e-6)  # padding features change nothing
    moved = Captions(caps.features.clone(), caps.mask)
    moved.features[0, -1] += 1.0  # a caption token does
    assert not torch.allclose(model(moved, tokens)[0], base[0], atol=1e-4)
    # the cached path (prefill + decode) gives the cache-free forward's logits, padding hidden in both
    model.setup_cache(2)
    first = model.prefill(caps)
    later = model.decode(tokens[:, :-1], torch.arange(8).expand(2, -1))
    assert torch.allclose(torch.cat([first[:, None], later], 1), base, atol=1e-5)
    model.clear_cache()


def test_t2i_cfg_mix_matches_a_float64_reference():
    """Guided probabilities of the cached float32 path against uncond + s (cond - uncond) computed in float64 with
    a float64 copy of the model (cache-free path), the null caption being the learned embedding under the caption's
    own mask (LlamaGen's pairing)."""
    model, caps = _t2i_model(), _captions()
    tokens = torch.randint(0, 16, (2, 9))
    cfg = SamplingConfig(cfg_scale=4.0)
    model.setup_cache(4)
    doubled = model.with_null(caps)
    assert torch.equal(doubled.mask, torch.cat([caps.mask, caps.mask]))
    assert torch.equal(doubled.features[2], model.cls_embedding.uncond_embedding)
    got = torch.cat([process_logits(model.prefill(doubled), cfg, predicts=0)[:, None],
                     process_logits(model.decode(torch.cat([tokens[:, :-1]] * 2), torch.arange(8).expand(4, -1)), cfg,
                                    predicts=torch.arange(1, 9).expand(2, -1))], 1)
    ref_model = _t2i_model().double()
    seen = []  # the output layer's float64 logits (the forward itself returns float32, as every mulosd GPT does)
    ref_model.output.register_forward_hook(lambda module, args, out: seen.append(out))
    null = Captions(model.cls_embedding.uncond_embedding.double().expand(2, -1, -1), caps.mask)
    ref_model(Captions(caps.features.double(), caps.mask), tokens)
    ref_model(null, tokens)
    cond, uncond = (out[:, CAP_LEN - 1 :] for out in seen)  # the rows that predict image tokens 0 .. 8
    assert cond.dtype == torch.float64
    want = torch.softmax(uncond + 4.0 * (cond - uncond), -1)
    assert (got.double() - want).abs().max() < 1e-5


def _tiny_t5(directory):
    """A random one-layer T5 encoder (hidden size CAP_DIM) and a word-level tokenizer, saved as a user's would be."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<pad>", "</s>", "<unk>", "a", "red", "cat", "on", "mat"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                                unk_token="<unk>")
    fast.save_pretrained(directory)
    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=len(words), d_model=CAP_DIM, d_kv=4, d_ff=32, num_layers=1, num_heads=2)
    transformers.T5EncoderModel(config).save_pretrained(directory)
    return fast


def test_generate_from_prompts_through_the_command_line(t2i_set, tmp_path):
    _tiny_t5(tmp_path / "t5")
    res = CliRunner().invoke(main, ["generate", "--model", str(t2i_set), "--method", "mulo", "--prompt", "a red cat",
                                    "--prompt", "a cat on a mat", "--t5-path", str(tmp_path / "t5"), "--num-per-class",
                                    "1", "--cfg-convention", "llamagen", "--cfg-interval", "2", "--out",
                                    str(tmp_path / "p.png"), "--stats-json", str(tmp_path / "p.json"), "--no-progress"])
    assert res.exit_code == 0, res.output
    stats = json.loads((tmp_path / "p.json").read_text())
    assert stats["num_images"] == 2 and stats["sampling"]["cfg_interval"] == 2
    res = CliRunner().invoke(main, ["generate", "--model", str(t2i_set), "--caption-features", str(tmp_path / "x.npy"),
                                    "--t5-path", str(tmp_path / "t5"), "--out", str(tmp_path / "q.png")])
    assert res.exit_code == 1 and "--t5-path encodes --prompt" in res.output


def test_t5_prompts_become_llamagen_caption_features(tmp_path):
    fast = _tiny_t5(tmp_path / "t5")
    from mulosd.models.t5 import T5Captioner

    t5 = T5Captioner(tmp_path / "t5")
    caps = t5.encode(["A red cat", "  a cat on a mat"], CAP_LEN, CAP_DIM)
    assert caps.mask.sum(1).tolist() == [3, 5] and caps.mask[:, -1].all()  # lower-cased, right-aligned
    ids = fast(["a red cat"], return_tensors="pt")["input_ids"]
    direct = t5.model(input_ids=ids)["last_hidden_state"][0]
    assert torch.allclose(caps.features[0, -3:], direct, atol=1e-6) and not caps.features[0, :-3].any()
    with pytest.raises(MulosdError, match="hidden size is 16; the model's caption projection takes 2048"):
        t5.encode(["a cat"], 120, 2048)
    with pytest.raises(MulosdError, match="is not a directory"):
        T5Captioner(tmp_path / "nothing")


# ---- LlamaGen's CFG conventions -----------------------------------------------------------------------------------
def test_cfg_convention_and_interval_follow_llamagen():
    assert SamplingConfig(cfg_scale=0.5).uses_cfg and not SamplingConfig(cfg_scale=0.5, cfg_convention="llamagen").uses_cfg
    assert SamplingConfig(cfg_scale=1.5, cfg_convention="llamagen").uses_cfg
    cfg = SamplingConfig(cfg_scale=3.0, cfg_interval=2)  # LlamaGen: guidance for image tokens 0 .. 3
    assert guidance_scale(cfg, torch.arange(6)).flatten().tolist() == [3, 3, 3, 3, 1, 1]
    assert guidance_scale(SamplingConfig(cfg_scale=3.0), None) == 3.0
    with pytest.raises(ValueError, match="needs the token indices"):
        process_logits(torch.zeros(2, 4), cfg)
    for bad, message in [({"cfg_interval": -2}, "cfg interval -2 out of range"),
                         ({"cfg_convention": "hf"}, "cfg convention 'hf' unknown; allowed: mulosd, llamagen")]:
        with pytest.raises(MulosdError, match=message):
            SamplingConfig(**bad)


def test_cfg_interval_switches_guidance_off_after_its_token():
    model, caps = _t2i_model(), _captions()
    streams = lambda: RandomStreams([0, 1])  # noqa: E731
    full = generate_ar(model, caps, SamplingConfig(cfg_scale=4.0, temperature=0.0), streams())[0]
    none = generate_ar(model, caps, SamplingConfig(cfg_scale=1.0, temperature=0.0), streams())[0]
    wide = generate_ar(model, caps, SamplingConfig(cfg_scale=4.0, temperature=0.0, cfg_interval=20), streams())[0]
    assert torch.equal(wide, full)
    cut = generate_ar(model, caps, SamplingConfig(cfg_scale=4.0, temperature=0.0, cfg_interval=0), streams())[0]
    assert torch.equal(cut[:, :2], full[:, :2])  # tokens 0 and 1 guided
    # after token 1 each token is the conditional argmax given the guided start: check it against a manual AR
    model.setup_cache(4)
    logits = model.prefill(model.with_null(caps))
    for cell in range(9):
        if cell <= 1:
            want = process_logits(logits, SamplingConfig(cfg_scale=4.0, temperature=0.0), predicts=cell).argmax(-1)
        else:
            want = logits[:2].argmax(-1)  # the conditional half alone
        assert torch.equal(want, cut[:, cell]), cell
        if cell < 8:
            logits = model.decode(torch.cat([cut[:, cell : cell + 1]] * 2), torch.full((4, 1), cell))[:, 0]
    model.clear_cache()
    assert not torch.equal(cut, full) and not torch.equal(none, full)  # so the interval did change the images


def test_continuous_tokens_refuse_a_cfg_interval():
    from mulosd.decoding.sampling import check_continuous

    with pytest.raises(MulosdError, match="continuous tokens guide every token"):
        check_continuous(SamplingConfig(cfg_scale=2.0, cfg_interval=3))


def test_sample_writes_caption_indexed_shards_for_a_t2i_set(files, t2i_set, tmp_path):
    args = ["sample", "--model", str(t2i_set), "--num-images", "3", "--shard-size", "2", "--batch-size", "2",
            "--caption-features", str(files["caps"][0]), "--caption-features", str(files["caps"][1]),
            "--out", str(tmp_path / "s"), "--no-progress"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    with np.load(tmp_path / "s" / "samples.npz") as z:
        assert z["arr_0"].shape == (3, 12, 12, 3) and z["arr_1"].tolist() == [0, 1, 0]  # caption i mod 2
    config = json.loads((tmp_path / "s" / "sample.json").read_text())
    assert config["captions"]["caption_features"] == ["cap_a.npy", "cap_b.npy"]
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0 and "2 shards kept" in again.output, again.output
    res = CliRunner().invoke(main, args[:9] + ["--out", str(tmp_path / "t"), "--no-progress"])
    assert res.exit_code == 1 and "text-to-image (t2i): it takes a caption" in res.output, res.output
    assert not (tmp_path / "t").exists()


def test_compare_on_imported_sets(files, c2i_set, t2i_set, tmp_path):
    res = CliRunner().invoke(main, ["compare", "--model", str(t2i_set), "--methods", "ar,mulo", "--caption-features",
                                    str(files["caps"][0]), "--num-per-class", "2", "--no-warmup", "--no-progress",
                                    "--out", str(tmp_path / "t")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "t" / "compare.png").exists() and "mulo" in res.output
    res = CliRunner().invoke(main, ["compare", "--model", str(c2i_set), "--methods", "ar,sd", "--no-warmup",
                                    "--no-progress", "--out", str(tmp_path / "c")])  # the first ten classes: 0..4
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "c" / "summary.json").read_text())
    assert summary["methods"][0]["stats"]["num_images"] == 5


@pytest.mark.cuda
def test_imported_sets_decode_on_cuda(files, c2i_set, t2i_set):
    """Captions, padding masks, per-token guidance and the pixel resampler at r = 1.5 on a CUDA device; the exact
    methods give AR's tokens there too."""
    greedy = SamplingConfig(cfg_scale=4.0, temperature=0.0, cfg_interval=2)
    for directory in (c2i_set, t2i_set):
        pipe = Pipeline.from_pretrained(directory, device="cuda")
        cond = pipe.captions(features=files["caps"]) if pipe.condition == "caption" else torch.tensor([0, 3])
        ar = pipe.generate(get_method("ar")(pipe), cond, greedy, batch_size=2)
        assert ar.tokens.device.type == "cpu" and ar.images.shape[-1] == 12
        for method in ("sd", "sjd", "mcsjd"):
            assert torch.equal(pipe.generate(get_method(method)(pipe), cond, greedy, batch_size=2).tokens, ar.tokens)
        assert pipe.generate(get_method("mulo")(pipe), cond, greedy, batch_size=2).tokens.shape == (2, 6, 6)


def test_train_upsampler_on_an_imported_llamagen_set(files, tmp_path):
    """The learned up-sampler trains on an imported set's LlamaGen VQ (both stages: codes, then pixels through its
    decoder) from a folder of images, joins the set, and mulo picks it up (upsampler=auto at r = 2)."""
    from PIL import Image

    out = tmp_path / "set"
    res = _import(files, out, "--lowres", str(files["c2i_lo"]), "--lowres-size", "2,2,32", "--lowres-image-size", "6",
                  drafter=None, lowres=None)  # a 3x3 low-res model under the 6x6 target: r = 2
    assert res.exit_code == 0, res.output
    (tmp_path / "imgs").mkdir()
    for i in range(6):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (15, 13, 3), dtype=np.uint8)).save(
            tmp_path / "imgs" / f"{i}.png")
    res = CliRunner().invoke(main, ["train", "upsampler", "--threads", "1", "--model", str(out), "--data",
                                    str(tmp_path / "imgs"), "--r", "2", "--steps", "4", "--ce-steps", "2",
                                    "--batch-size", "3", "--warmup", "1", "--eval-images", "2",
                                    "--out", str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
    pipe = Pipeline.from_pretrained(out)
    assert list(pipe.upsamplers) == [2]
    pipe.upsamplers[2].check(pipe.tokenizer, 2)
    mulo = get_method("mulo")(pipe)
    assert (mulo.params()["r"], mulo.params()["upsampler"]) == (2, "learned")
    assert pipe([1], method="mulo").tokens.shape == (1, 6, 6)
