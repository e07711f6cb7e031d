"""Real-size sanity of the LlamaGen path on this machine: random-weight LlamaGen files at their real sizes, imported
with `mulosd import llamagen`, then every method end to end.

    python scripts/llamagen_sanity.py --work /tmp/llamagen-sanity --out docs/llamagen/sanity.json

Writes LlamaGen-layout checkpoints with random weights ({"model": state_dict, "args": Namespace}, as its training
scripts save them): a VQ-16 tokenizer, GPT-B c2i targets at 256 px (16x16) and 384 px (24x24), a 2-layer GPT-B-wide
c2i drafter at 256 px (and the 256 px file again as a 128 px low-res drafter: a GPT's weights fit any grid), a GPT-B t2i target at 256 px and a GPT-B t2i model at 256 px as the low-resolution drafter of
a GPT-B t2i target at 384 px. Imports three sets (--link: nothing copied) and decodes one image per method at batch
1, CFG 4: every discrete method on the c2i 256 px set, MuLo-SD at 16x16 -> 24x24 (r = 1.5) on the c2i 384 px set,
AR and MuLo-SD on the t2i sets; then `mulosd profile` of the 256 px c2i target (one verify forward of k tokens
against k decode steps). Random weights make every acceptance meaningless (the models' distributions are nearly
uniform): only the times and the forward costs mean something. Resumable: files already written are reused.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from mulosd.decoding.methods import get_method
from mulosd.decoding.sampling import SamplingConfig
from mulosd.io import atomic_write_json, atomic_write_text
from mulosd.models.condition import Captions
from mulosd.models.gpt import GPT
from mulosd.models.llamagen import llamagen_config
from mulosd.models.llamagen_vq import LlamaGenVQ, LlamaGenVQConfig
from mulosd.pipeline import Pipeline
from mulosd.resources import device_description
from mulosd.zoo.importer import GPTFile, import_llamagen

C2I_METHODS = ("ar", "sd", "sjd", "mcsjd", "lantern", "gsd", "zipar", "mulo")


def _save(path: Path, state: dict) -> Path:
    if not path.exists():
        tmp = path.with_suffix(".tmp")
        torch.save({"model": state, "args": argparse.Namespace(note="random weights")}, tmp)
        tmp.rename(path)
    return path


def write_files(work: Path) -> dict[str, Path]:
    """Random-weight LlamaGen-layout files (reused when present)."""
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    files = {"vq": _save(work / "vq_ds16.pt", LlamaGenVQ(LlamaGenVQConfig()).state_dict())}
    for name, size, image, condition in [("c2i_B_256", "GPT-B", 256, "class"), ("c2i_B_384", "GPT-B", 384, "class"),
                                         ("c2i_2L_256", "2,12,768", 256, "class"),
                                         ("t2i_2L_256", "2,12,768", 256, "caption"),
                                         ("t2i_B_256", "GPT-B", 256, "caption"), ("t2i_B_384", "GPT-B", 384, "caption")]:
        path = work / f"{name}.pt"
        if not path.exists():
            _save(path, GPT(llamagen_config(size, grid_size=image // 16, condition=condition)).state_dict())
        files[name] = path
    return files


def import_sets(work: Path, f: dict[str, Path]) -> dict[str, Path]:
    sets = {key: work / f"set_{key}" for key in ("c2i_256", "t2i_256", "c2i_384", "t2i_384")}
    specs = {
        "c2i_256": dict(gpt=GPTFile(f["c2i_B_256"], "GPT-B", 256, "--gpt"),
                        drafter=GPTFile(f["c2i_2L_256"], "2,12,768", 256, "--drafter"),
                        lowres=GPTFile(f["c2i_B_256"], "GPT-B", 128, "--lowres")),  # GPT weights fit any grid
        "t2i_256": dict(gpt=GPTFile(f["t2i_B_256"], "GPT-B", 256, "--gpt"),
                        drafter=GPTFile(f["t2i_2L_256"], "2,12,768", 256, "--drafter"),
                        lowres=GPTFile(f["t2i_B_256"], "GPT-B", 128, "--lowres")),
        "c2i_384": dict(gpt=GPTFile(f["c2i_B_384"], "GPT-B", 384, "--gpt"),
                        lowres=GPTFile(f["c2i_B_256"], "GPT-B", 256, "--lowres")),
        "t2i_384": dict(gpt=GPTFile(f["t2i_B_384"], "GPT-B", 384, "--gpt"),
                        lowres=GPTFile(f["t2i_B_256"], "GPT-B", 256, "--lowres")),
    }
    for key, spec in specs.items():
        if not (sets[key] / "manifest.json").exists():
            import_llamagen(sets[key], vq=f["vq"], link=True, force=True, **spec)
    return sets


def decode_one(pipe: Pipeline, method: str, condition, sampling: SamplingConfig) -> dict:
    """One image at batch 1 (after the method is built); wall time, forwards and what decoding the tokens cost."""
    decoder = get_method(method)(pipe)
    t0 = time.perf_counter()
    out = pipe.generate(decoder, condition, sampling, seed=0, batch_size=1, classify=False)
    wall = time.perf_counter() - t0
    s = out.stats
    return {"method": method, "params": s["params"], "seconds": round(s["wall_time_s"], 2),
            "seconds_with_vq_decode": round(wall, 2), "target_forwards": s["target_forwards"],
            "drafter_forwards": s["drafter_forwards"], "step_compression": s["step_compression"],
            "tokens": s["tokens_per_image"], "image": list(out.images.shape[1:])}


def render(result: dict) -> str:
    """The markdown page for a sanity.json (docs/llamagen/sanity.md)."""
    lines = ["# LlamaGen at real size on this CPU (random weights)", "",
             f"Generated by `scripts/llamagen_sanity.py` from [sanity.json](sanity.json): {result['device']}, "
             f"{result['threads']} threads, one image per method at batch 1, CFG 4 (the model batch is 2 rows). "
             "Random weights: the models' distributions are nearly uniform, so acceptance, forwards per image and "
             "speed-ups below say nothing about real checkpoints; the times per forward and the forward costs do.",
             "", "| set | method | s / image | s with VQ decode | target forwards | drafter forwards |",
             "|---|---|---|---|---|---|"]
    for r in result["runs"]:
        lines.append(f"| {r['set']} | {r['method']} | {r['seconds']:.2f} | {r['seconds_with_vq_decode']:.2f} | "
                     f"{r['target_forwards']} | {r['drafter_forwards']} |")
    lines += ["", "One verify forward of k new tokens against k decode steps (GPT-B c2i at 256 px, 128 image tokens "
              "cached, CFG rows, median of 3):", "", "| k | ms per forward | ms per new token | cost vs one decode step |",
              "|---|---|---|---|"]
    for c in result["forward_cost"]:
        if c["status"] == "ok":
            lines.append(f"| {c['new_tokens']} | {c['median_ms']:.1f} | {c['ms_per_new_token']:.1f} | "
                         f"{c['ratio_vs_k1']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/llamagen-sanity"))
    ap.add_argument("--out", type=Path, default=Path("docs/llamagen/sanity.json"))
    ap.add_argument("--methods", default=",".join(C2I_METHODS))
    ap.add_argument("--render", action="store_true", help="only rewrite the .md beside --out from its JSON")
    args = ap.parse_args()
    if args.render:
        atomic_write_text(args.out.with_suffix(".md"), render(json.loads(args.out.read_text())))
        return
    files = write_files(args.work)
    sets = import_sets(args.work, files)
    sampling = SamplingConfig(cfg_scale=4.0)
    torch.manual_seed(1)
    caption = Captions.from_tokens(torch.randn(17, 2048), 120)  # a 17-token caption, right-aligned in 120 positions
    plan = [("c2i_256", "c2i GPT-B 256 px (16x16), drafter 2 layers, low-res GPT-B 128 px (r = 2)",
             args.methods.split(","), torch.tensor([207])),
            ("t2i_256", "t2i GPT-B 256 px (16x16), drafter 2 layers, low-res t2i GPT-B 128 px (r = 2)",
             args.methods.split(","), caption),
            ("c2i_384", "c2i GPT-B 384 px (24x24), low-res GPT-B 256 px (r = 1.5)", ("ar", "mulo"), torch.tensor([207])),
            ("t2i_384", "t2i GPT-B 384 px (24x24), low-res t2i GPT-B 256 px (r = 1.5)", ("ar", "mulo"), caption)]
    runs = []
    for key, label, methods, condition in plan:
        pipe = Pipeline.from_pretrained(sets[key])
        for method in methods:
            runs.append({"set": label, **decode_one(pipe, method, condition, sampling)})
            print(runs[-1], flush=True)
    from mulosd.evaluation.profile import forward_cost

    target = Pipeline.from_pretrained(sets["c2i_256"]).target
    costs = forward_cost(target, batch_sizes=(1,), new_tokens=(1, 4, 16, 64), cfg=True, repeats=3, cache_len=128)
    result = {"device": device_description(torch.device("cpu")), "threads": torch.get_num_threads(),
              "note": "random weights: acceptance and images are meaningless; times and forward costs are not",
              "runs": runs, "forward_cost": costs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, result)
    atomic_write_text(args.out.with_suffix(".md"), render(result))
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
