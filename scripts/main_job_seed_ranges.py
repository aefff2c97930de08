"""Tables and verdicts of a finished main-job grid, restricted to ranges of its seeds (read-only).

    python scripts/main_job_seed_ranges.py GRID_DIR 0-19 20-39 0-39

For each range A-B (inclusive) it prints, as markdown, the mean [95% bootstrap CI] of each loss's initial and
final held-out accuracy and of its accuracy averaged over training, then the main job's verdict rule applied to
those seeds only (:func:`ctpo_lab.train.main_job.grid_verdict`: every loss against GRPO and CTPO against
CTPO-fixed, Holm over the range's own comparisons), on final accuracy and on the average over training, and on
how many seeds each loss ends above GRPO.  A range of a 40-seed grid gives the numbers the main job run on just
those seeds would give on the same machine (every run depends only on its loss, its seed and the machine).
Nothing is written.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ctpo_lab import cli, compare
from ctpo_lab.train import main_job


def _range(text: str) -> tuple[int, int]:
    head, sep, tail = text.partition("-")
    if not (sep and head.isdigit() and tail.isdigit() and int(head) <= int(tail)):
        raise ValueError(f"ranges: expected A-B with 0 <= A <= B (e.g. 0-19), got {text!r}")
    return int(head), int(tail)


def report(out: Path, ranges: list[tuple[int, int]]) -> str:
    """The markdown report of the grid in ``out`` for each (first, last) seed range."""
    df = compare.load_grid(out, name="grid")
    spec = json.loads((out / "grid.json").read_text())
    auc = main_job.auc_frame(out, compare.GridSpec(losses=tuple(spec["losses"]), seeds=tuple(spec["seeds"])))
    lines = [f"# {out}: seed ranges", ""]
    for first, last in ranges:
        sub = df[(df["seed"] >= first) & (df["seed"] <= last)]
        n = sub["seed"].nunique()
        if n < 2:
            raise ValueError(f"ranges: {first}-{last} holds {n} finished seed(s) of {out}; expected at least 2")
        sub_auc = auc[(auc["seed"] >= first) & (auc["seed"] <= last)]
        lines += main_job.subset_markdown(sub, sub_auc, spec["losses"][0], f"seeds {first}–{last}")
    return "\n".join(lines)


def _main(argv: list[str]) -> int:
    ap = cli.ArgumentParser(prog="python scripts/main_job_seed_ranges.py", description=__doc__.splitlines()[0])
    ap.add_argument("grid", help="a main-job grid folder (its grid.json and runs/)")
    ap.add_argument("ranges", nargs="+", help="seed ranges A-B, inclusive")
    args = ap.parse_args(argv)
    ranges = [_range(r) for r in args.ranges]
    print(report(Path(args.grid), ranges))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(lambda: _main(sys.argv[1:]), flags={"grid": "grid", "ranges": "ranges"},
                     prog="python scripts/main_job_seed_ranges.py"))
