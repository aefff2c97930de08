"""One ``cpu``-preset run in a fresh process, timed per step: prints one JSON line (for ``bench_train.py``).

    python benchmarks/train_run_child.py ROOT STEPS SEED THREADS

``ROOT`` is the folder holding the ``ctpo_lab`` package to time: this checkout, or the tree of an earlier
revision (``bench_train.py --against REV``). The script uses only what every revision since the ``cpu`` preset
has offered (``resolve_train_config``, ``Trainer(...).train().history``, ``Trainer.evaluate``), so an old tree
runs unchanged. Where the package has :mod:`ctpo_lab.allocator`, freed memory is retained as every
``python -m ctpo_lab...`` command does (``CTPO_LAB_RETAIN_FREED_MEMORY=0`` turns it off); an older tree runs
under glibc's default, as its commands did.

The line holds the medians over the steps after the first (a warm-up) of the per-step clock fields, one
evaluation's time, minor page faults per step, the maximum resident memory, a digest of every logged number
but the clock's (equal digests: the same run, bit for bit) and the last step's logged numbers.
"""

from __future__ import annotations

import hashlib
import json
import resource
import statistics
import sys
import tempfile
from pathlib import Path

#: the per-step timings reported (medians over the steps after the warm-up)
STEP_KEYS = ("time/gen", "time/old_log_prob", "time/update", "time/kl", "time/step")
#: logged fields that come from the clock (left out of the digest and of the value comparison)
CLOCK_PREFIXES = ("time/", "perf/", "wall_time")


def run_overrides(threads: int) -> list[str]:
    """The ``cpu`` preset's overrides for a timed run: nothing written but the metrics, no evaluations."""
    return ["dump_every=0", "ckpt_every=0", "tensorboard=false", f"threads={threads}", "eval_every=0"]


def main(argv: list[str]) -> None:
    root, steps, seed, threads = Path(argv[0]).resolve(), int(argv[1]), int(argv[2]), int(argv[3])
    sys.path.insert(0, str(root))
    retaining = False
    # the tree's own file, not find_spec: an editable install would resolve a module the tree lacks elsewhere
    if (root / "ctpo_lab" / "allocator.py").is_file():
        from ctpo_lab.allocator import retain_freed_memory, retaining_freed_memory

        retain_freed_memory()
        retaining = retaining_freed_memory()
    import torch

    from ctpo_lab.train.config import resolve_train_config
    from ctpo_lab.train.loop import Trainer

    torch.set_num_threads(threads)
    cfg = resolve_train_config("cpu", seed=seed, steps=steps, overrides=run_overrides(threads))
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, Path(tmp) / "run", progress=False, log=lambda s: None)
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        hist = trainer.train().history
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
        t_eval = trainer.evaluate(steps)["time/eval"]
    # every ctpo_lab module, the package itself included, must come from the tree being timed
    strays = sorted(name for name, mod in list(sys.modules.items()) if name.split(".")[0] == "ctpo_lab"
                    and getattr(mod, "__file__", None) and not Path(mod.__file__).resolve().is_relative_to(root))
    if strays:
        raise SystemExit(f"error: modules imported from outside {root}: {', '.join(strays)}")
    timed = [h for h in hist if h["step"] >= 2]  # step 1 is the warm-up
    out: dict = {k: statistics.median(float(h[k]) for h in timed) for k in STEP_KEYS}
    values = [{k: v for k, v in h.items() if not k.startswith(CLOCK_PREFIXES)} for h in hist]
    out.update({
        "time/eval": t_eval, "faults/step": faults / len(hist), "retaining": retaining,
        "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "digest": hashlib.sha256(repr(values).encode()).hexdigest()[:16],
        "last": {k: v for k, v in values[-1].items() if isinstance(v, (int, float)) and not isinstance(v, bool)},
    })
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
