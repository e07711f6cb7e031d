"""Fill docs/MULOSD.md from the runs of scripts/mulo_report.sh: the `mulosd bench` tables between the results
markers (scripts/bench_tables.py) and the learned up-samplers' test-split evaluation (docs/bench/upsamplers.json,
written by scripts/eval_upsamplers.py) between the upsampler markers.

    .venv/bin/python scripts/mulo_tables.py docs/bench
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_tables import main as tables  # noqa: E402

from mulosd.io import replace_marked_block  # noqa: E402

root = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/bench")
doc = Path("docs/MULOSD.md")
tables([str(doc), str(root),
        "main_b1", "Batch 1: MuLo-SD against AR and the peers",
        "sweep_tau_k", "Sweep of tau and k (r = 2, l = 1, whole-image drafting, parallel islands)",
        "operating_point", "Candidate operating points at N = 200",
        "explore_a", "Quality probes at N = 200 (no AR row; the rows=1 row re-synchronised with the pixel down-sampler, unpadded)",
        "explore_b", "Quality probes at N = 200 (no AR row)",
        "sweep_radius", "Sweep of the neighbourhood radius l (r = 2; l = 0 is naive local, inf is raster rejection)",
        "ablations", "Ablations (r = 2 unless named; every other parameter at its default)",
        "downsampler_padded", "Down-sampler of the row-by-row loop, the partial image padded before pixel down-sampling",
        "main_b8", "Batch 8"])

ups = []
summary = root / "upsamplers.json"
for r, e in sorted(json.loads(summary.read_text()).items() if summary.exists() else []):
    ups.append(f"| {r} | {e['learned']['up_token_acc']:.3f} | {e['learned']['up_top5_acc']:.3f} | "
               f"{e['learned']['up_psnr_db']:.2f} | {e['pixel']['up_token_acc']:.3f} | {e['pixel']['up_psnr_db']:.2f} | "
               f"{e['learned']['down_token_acc']:.3f} | {e['pixel']['down_token_acc']:.3f} | {e['tokenizer_psnr_db']:.2f} |")
if ups:
    table = ["On the first 2000 test images (`UpsamplerRecipe.evaluate`, shipped fp16 weights run in fp32, "
             "`scripts/eval_upsamplers.py`): share of cells where the up-sampled code equals the code of the real "
             "32 px image, share where it is among the learned model's 5 most likely, PSNR of the decoded up-sampled "
             "codes against the real image, and the same for the down-samplers against the codes of the real "
             "16 / 8 px image.", "",
             "| r | learned up: exact code | learned up: top-5 | learned up: PSNR dB | pixel up: exact code | "
             "pixel up: PSNR dB | learned down: exact code | pixel down: exact code | tokenizer PSNR dB |",
             "|---|---|---|---|---|---|---|---|---|", *ups]
    replace_marked_block(doc, "upsampler", "\n".join(table) + "\n")
    print(f"updated {doc} (up-samplers)")
