"""Copy `mulosd bench` result tables into a Markdown page, between its <!-- results:start/end --> markers.

    .venv/bin/python scripts/bench_tables.py [--marker NAME] DOC BENCH_ROOT NAME TITLE [NAME TITLE ...]

Each NAME is a run folder under BENCH_ROOT whose results.json is rendered with the current table format; TITLE
heads its section. The command, machine, date, round count and the real-vs-real FID floors come from the run's
own config. ``--marker NAME`` writes between <!-- NAME:start/end --> instead (a page with several blocks).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from mulosd.evaluation.bench import markdown_table
from mulosd.io import replace_marked_block


def section(root: Path, name: str, title: str, doc: Path) -> list[str]:
    path = root / name / "results.json"
    if not path.exists():
        return []
    result = json.loads(path.read_text())
    c = result["config"]
    floors = f"classifier {c['fid_classifier_real_floor']}"
    if c.get("fid_inception_real_floor") is not None:
        floors += f", Inception {c['fid_inception_real_floor']}"
    rel = os.path.relpath(path, doc.parent)
    # runs from before the class-stratified KID estimator: their KID is biased low (more so at small N); not shown
    stale = ("" if c.get("kid_strata") else
             " KID not shown: this run predates the class-balanced KID estimator, and its stored KID is biased low.")
    plots = root / name / "plots"
    lines = [f"### {title}", "",
             f"{c['num_images']} images per setting at batch {c['batch_size']}, seed {c['seed']}, CFG "
             f"{c['sampling']['cfg_scale']}, temperature {c['sampling']['temperature']}; {c['date']}, {c['machine']}; "
             f"rounds {c['rounds_done']}/{c['rounds_total']}{'' if c['complete'] else ' (incomplete)'}; "
             f"real-vs-real FID floor at this N: {floors}. Raw: [`{path}`]({rel}).{stale}", "",
             markdown_table(result["methods"], show_kid=not stale).rstrip(), ""]
    if (plots / "frontier.png").exists():
        lines += [f"![speed-up vs FID]({os.path.relpath(plots / 'frontier.png', doc.parent)}) "
                  f"![time per phase]({os.path.relpath(plots / 'time_breakdown.png', doc.parent)})", ""]
    return lines


def main(argv: list[str]) -> None:
    marker = "results"
    if argv[:1] == ["--marker"]:
        marker, argv = argv[1], argv[2:]
    doc, root, pairs = Path(argv[0]), Path(argv[1]), argv[2:]
    if len(pairs) % 2:
        raise SystemExit("usage: bench_tables.py DOC BENCH_ROOT NAME TITLE [NAME TITLE ...]")
    lines: list[str] = []
    for name, title in zip(pairs[::2], pairs[1::2], strict=True):
        lines += section(root, name, title, doc)
    replace_marked_block(doc, marker, "\n".join(lines))
    print(f"updated {doc}")


if __name__ == "__main__":
    main(sys.argv[1:])
