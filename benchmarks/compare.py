#!/usr/bin/env python
"""One markdown table from the JSON files of bench_train_step.py and run_official.py (side by side).

python benchmarks/compare.py official.json project.json project_graphs.json
"""

from __future__ import annotations

import argparse
import json

COLUMNS = (
    ("run", lambda r: f"{r['toolkit']}: {r['label']}"),
    ("resolution", lambda r: f"{r['resolution']}²"),
    ("s/sample", lambda r: f"{r['s_per_sample']:.3f}"),
    ("s/optimizer step", lambda r: f"{r['s_per_optimizer_step']:.2f}"),
    ("rollout s", lambda r: f"{r['rollout_s_per_sample']:.3f}"),
    ("targets s", lambda r: f"{r['targets_s_per_sample']:.3f}"),
    ("student + rest s", lambda r: f"{r['student_s_per_sample']:.3f}"),
    ("mean rollout steps", lambda r: f"{r['mean_rollout_steps']:.2f}"),
    ("peak GiB", lambda r: "–" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.2f}"),
    ("limit s/sample", lambda r: f"{r['limit_s_per_sample']:.3f}"),
    ("% of limit", lambda r: f"{r['percent_of_limit']:.1f} %"),
    ("measured steps (routes)", lambda r: f"{r['measured_steps']} ({', '.join(r['measured_routes'])})"),
)


def table(results: list[dict]) -> str:
    rows = ["| " + " | ".join(name for name, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in sorted(results, key=lambda r: (-r["resolution"], r["toolkit"] != "official DanceOPD")):
        rows.append("| " + " | ".join(cell(r) for _, cell in COLUMNS) + " |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", help="--json outputs of bench_train_step.py / run_official.py")
    args = parser.parse_args(argv)
    results = []
    for path in args.files:
        with open(path) as f:
            results += json.load(f)
    print(table(results))


if __name__ == "__main__":
    main()
