"""The main job's tables and verdicts over several grids that differ only in their warm start (read-only).

    python scripts/main_job_warm_starts.py GRID_DIR [GRID_DIR ...]

Each grid is the main job's grid (or ``compare`` with the same losses and overrides) run from one warm start,
e.g. with ``warmstart_seed=1 warmstart_steps=2000`` added to the overrides.  For each grid it prints its warm
start (seed, supervised steps, final supervised loss, the held-out accuracy it starts RL from) and the main job's
tables and verdicts on its seeds; then the same tables and verdicts pooled over every grid, where a pair of runs
is (warm start, seed): the paired sign-flip test stays valid when the pairs differ in distribution, so the pooled
verdict asks whether a loss beats GRPO across warm starts, not on one.  The grids must share their losses; a
warm start that appears twice is an error (its pairs would be counted twice).  Nothing is written.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd
import yaml

from ctpo_lab import cli, compare
from ctpo_lab.train import main_job


def warm_start_of(out: Path, spec: dict) -> dict:
    """The warm start of a grid's runs, from the first finished run's ``config.yaml``; every run of the grid
    must share it."""
    found = {}
    for loss in spec["losses"]:
        for seed in spec["seeds"]:
            path = compare.run_dir(out, loss, seed) / "config.yaml"
            if not (compare.run_dir(out, loss, seed) / compare.FINISHED_FILE).is_file() or not path.is_file():
                continue
            cfg = yaml.safe_load(path.read_text())
            policy = cfg.get("policy") or {}
            key = policy.get("warmstart_key")
            if found and key != found["key"]:
                raise ValueError(f"grids: {out} mixes warm starts ({found['key']} and {key})")
            found = {"key": key, "seed": cfg.get("warmstart_seed"), "steps": cfg.get("warmstart_steps"),
                     "loss": policy.get("warmstart_loss"), "accuracy": policy.get("initial_eval_accuracy"),
                     "prompts": policy.get("initial_eval_prompts")}
    if not found:
        raise ValueError(f"grids: {out} has no finished run with a config.yaml")
    return found


def _describe(ws: dict) -> str:
    loss = f"{ws['loss']:.3f}" if isinstance(ws["loss"], float) else "n/a"
    acc = f"{ws['accuracy']:.3f}" if isinstance(ws["accuracy"], float) else "n/a"
    return (f"warm start seed {ws['seed']}, {ws['steps']} supervised steps (key {ws['key']}): final supervised "
            f"loss {loss}, held-out accuracy {acc} on {ws['prompts']} prompts")


def report(outs: list[Path]) -> str:
    """The markdown report: one section per grid, then the pooled section."""
    frames, aucs, lines, keys, losses = [], [], ["# the main job over warm starts", ""], {}, None
    for index, out in enumerate(outs):
        df = compare.load_grid(out, name="grids")
        spec = json.loads((out / "grid.json").read_text())
        if losses is None:
            losses = list(spec["losses"])
        elif list(spec["losses"]) != losses:
            raise ValueError(f"grids: {out} compares {spec['losses']}, the first grid {losses}")
        ws = warm_start_of(out, spec)
        if ws["key"] in keys:
            raise ValueError(f"grids: {out} and {keys[ws['key']]} start from the same warm start {ws['key']}")
        keys[ws["key"]] = out
        auc = main_job.auc_frame(out, compare.GridSpec(losses=tuple(spec["losses"]), seeds=tuple(spec["seeds"])))
        lines += [f"{out}: {_describe(ws)}", ""]
        lines += main_job.subset_markdown(df, auc, losses[0], f"warm start seed {ws['seed']}, {ws['steps']} steps")
        # one pairing key per (warm start, seed): seeds of different grids never pair
        offset = index * 1_000_000
        frames.append(df.assign(seed=df["seed"] + offset))
        aucs.append(auc.assign(seed=auc["seed"] + offset))
    if len(outs) > 1:
        lines += main_job.subset_markdown(pd.concat(frames, ignore_index=True), pd.concat(aucs, ignore_index=True),
                                          losses[0], f"pooled over {len(outs)} warm starts")
    return "\n".join(lines)


def _main(argv: list[str]) -> int:
    ap = cli.ArgumentParser(prog="python scripts/main_job_warm_starts.py", description=__doc__.splitlines()[0])
    ap.add_argument("grids", nargs="+", help="grid folders (grid.json and runs/), one warm start each")
    args = ap.parse_args(argv)
    print(report([Path(g) for g in args.grids]))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(lambda: _main(sys.argv[1:]), flags={"grids": "grids"},
                     prog="python scripts/main_job_warm_starts.py"))
