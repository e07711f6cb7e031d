"""mulosd's LlamaGen loaders against LlamaGen's own code, random weights, CPU, float32 (docs/MODELS.md's table).

    python scripts/llamagen_parity.py --llamagen path/to/LlamaGen [--work /tmp/llamagen-parity]

Needs a checkout of LlamaGen's repository (its ``tokenizer/tokenizer_image/vq_model.py`` and
``autoregressive/models/{gpt,generate}.py``, which import only torch); it is imported from there, never copied.
Checks: (1) VQ-16 at its real size: codes and pixels of 2 x 256 px and 1 x 384 px images; (2) a GPT-B t2i model
(8x8 grid, two left-padded captions of 7 and 30 of 120 tokens): prefill logits, and greedy generation with LlamaGen's
``generate()`` at CFG 1 and 4, with ``cfg_interval`` and both guidance conventions, plus controls that must differ.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from mulosd.decoding.sampling import RandomStreams, SamplingConfig
from mulosd.decoding.window import generate_ar
from mulosd.models.condition import Captions
from mulosd.models.llamagen import load_llamagen_gpt
from mulosd.models.llamagen_vq import load_llamagen_vq


def check_vq(work: Path) -> None:
    from tokenizer.tokenizer_image.vq_model import VQ_16

    torch.manual_seed(0)
    ref = VQ_16().eval()
    with torch.no_grad():  # defaults are near-trivial (unit norms, zero biases): perturb everything
        for name, p in ref.named_parameters():
            p.copy_((1 if "norm" in name and name.endswith("weight") else 0) + 0.1 * torch.randn_like(p))
    torch.save({"model": ref.state_dict()}, work / "vq.pt")
    mine = load_llamagen_vq(work / "vq.pt")
    for batch, size in [(2, 256), (1, 384)]:
        x = torch.rand(batch, 3, size, size) * 2 - 1
        with torch.no_grad():
            ref_codes = ref.encode(x)[2][2].view(batch, size // 16, size // 16)
            codes = mine.encode(x)
            ref_pixels = ref.decode_code(codes, [batch, 8, size // 16, size // 16])
            pixels = mine.decode(codes)
        print(f"VQ-16 {batch} x {size} px: codes differing {(codes != ref_codes).sum().item()} of {codes.numel()}; "
              f"pixels max |diff| {(pixels - ref_pixels.clamp(-1, 1)).abs().max().item():.3g}")


def check_t2i(work: Path, grid: int = 8) -> None:
    from autoregressive.models.generate import generate
    from autoregressive.models.gpt import GPT_models

    torch.manual_seed(0)
    ref = GPT_models["GPT-B"](block_size=grid * grid, cls_token_num=120, model_type="t2i", vocab_size=16384).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.05)
        ref.cls_embedding.uncond_embedding.normal_(0, 0.3)
    torch.save({"model": ref.state_dict(), "args": argparse.Namespace(gpt_model="GPT-B")}, work / "t2i.pt")
    ours = load_llamagen_gpt(work / "t2i.pt", "GPT-B", grid_size=grid, vocab_size=16384)
    feats, mask = torch.zeros(2, 120, 2048), torch.zeros(2, 120)
    for b, n in enumerate([7, 30]):  # left padding, as LlamaGen's sample_t2i.py lays captions out
        feats[b, 120 - n:], mask[b, 120 - n:] = torch.randn(n, 2048), 1
    captions = Captions(feats, mask.bool())

    def compare(scale, interval_theirs, interval_ours, convention, label):
        with torch.no_grad():
            theirs = generate(ref, feats, grid * grid, mask.clone(), cfg_scale=scale, cfg_interval=interval_theirs,
                              temperature=1.0, top_k=0, top_p=1.0, sample_logits=False)
        sampling = SamplingConfig(cfg_scale=scale, temperature=0.0, cfg_interval=interval_ours,
                                  cfg_convention=convention)
        tokens = generate_ar(ours, captions, sampling, RandomStreams([0, 1]))[0][:, : grid * grid]
        same = (theirs.long() == tokens).float().mean().item()
        print(f"t2i GPT-B greedy, {label}: tokens identical {100 * same:.1f} %")

    compare(1.0, -1, -1, "mulosd", "CFG 1")
    compare(4.0, -1, -1, "mulosd", "CFG 4")
    compare(4.0, 5, 5, "mulosd", "CFG 4, cfg_interval 5")
    compare(4.0, 0, 0, "llamagen", "CFG 4, cfg_interval 0, llamagen convention")
    compare(0.5, -1, -1, "llamagen", "CFG 0.5, llamagen convention")
    compare(4.0, 5, 4, "mulosd", "control (must differ): our interval 4 against their 5")
    compare(0.5, -1, -1, "mulosd", "control (must differ): CFG 0.5 under mulosd's convention")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--llamagen", type=Path, required=True, help="a checkout of LlamaGen's repository")
    ap.add_argument("--work", type=Path, default=Path("/tmp/llamagen-parity"))
    args = ap.parse_args()
    if not (args.llamagen / "autoregressive" / "models" / "gpt.py").is_file():
        sys.exit(f"{args.llamagen} is not a LlamaGen checkout (no autoregressive/models/gpt.py)")
    sys.path.insert(0, str(args.llamagen))
    args.work.mkdir(parents=True, exist_ok=True)
    check_vq(args.work)
    check_t2i(args.work)


if __name__ == "__main__":
    main()
