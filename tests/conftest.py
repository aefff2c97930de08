"""Fixtures shared by several test modules."""

from __future__ import annotations

import textwrap

import pytest


@pytest.fixture
def sigterm_probe():
    """``probe(flag)``: the source of a grid worker that watches its parent (``watch_parent``), prints ``ready``,
    sleeps, and writes ``flag`` when it receives SIGTERM."""

    def probe(flag) -> str:
        return textwrap.dedent(f"""
            import signal, sys, time
            def on_term(*_):
                open({str(flag)!r}, "w").write("x")
                sys.exit(0)
            signal.signal(signal.SIGTERM, on_term)
            from ctpo_lab.runsafety import watch_parent
            watch_parent()
            print("ready", flush=True)
            time.sleep(60)
        """)

    return probe


@pytest.fixture(scope="session")
def tiny_regime_study(tmp_path_factory):
    """The ``tiny`` regime study (2 cells × grpo, ctpo × seeds 0, 1, plus a cell needing a config field the
    trainer lacks), run once per session: the regime tests read it and the figures' regime family is drawn
    from it.  Returns (study folder, run_study's result)."""
    from ctpo_lab.train import regime
    from ctpo_lab.train.regime import Cell

    missing = Cell(1, extra=("no_such_field=1",), label="needs-missing")
    out = tmp_path_factory.mktemp("regime") / "study"
    result = regime.run_study(out, preset="tiny", cells=["short-u1-k0-same", "short-u4-k0-same", missing],
                              seeds=(0, 1), workers=2, progress=False)
    return out, result
