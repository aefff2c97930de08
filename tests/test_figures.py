"""`python -m ctpo_lab.figures --quick` produces every family, each figure with PNG, PDF and caption."""

from __future__ import annotations

import pytest

from ctpo_lab.figures.__main__ import main


@pytest.fixture(scope="module")
def quick_figures(tmp_path_factory, tiny_regime_study):
    """Every family at CI size; the regime family reads the session's tiny study (the same study
    ``--quick`` would run on its own) instead of training it a second time."""
    out = tmp_path_factory.mktemp("paper_figures")
    assert main(["--quick", "--out", str(out), "--regime", str(tiny_regime_study[0])]) == 0
    return out


def test_every_family_is_produced(quick_figures):
    names = {p.name for p in quick_figures.iterdir()}
    for prefix in ("fig1_llm", "llm_bias_variance", "llm_ratio_profiles", "llm_bias_table", "fig1_trainer",
                   "fig2_", "table2_", "table3_", "markov_bias_variance_vs_T",
                   "markov_bias_variance_vs_mismatch", "markov_variance_ratio", "markov_bias_decomposition",
                   "markov_drift_crossing", "markov_reproductions", "regime_map", "regime_map_detail", "regime_runs"):
        assert any(n.startswith(prefix) for n in names), f"no {prefix}* file"


def test_every_figure_has_pdf_and_caption_with_provenance(quick_figures):
    pngs = sorted(quick_figures.glob("*.png"))
    assert len(pngs) >= 9
    for png in pngs:
        stem = png.with_suffix("")
        assert stem.with_suffix(".pdf").is_file(), png.name
        caption = (quick_figures / f"{png.stem}.caption.txt").read_text()
        for field in ("command: python -m ctpo_lab.figures", "seeds:", "versions:", "torch", "git", "processor"):
            assert field in caption, (png.name, field)
    for md in quick_figures.glob("table*.md"):
        assert "|" in md.read_text()


def test_second_run_reuses_cached_results(quick_figures, capsys):
    assert main(["--quick", "--out", str(quick_figures), "--only", "markov", "llm"]) == 0
    err = capsys.readouterr().err
    assert "reusing cached result" in err


def test_an_llm_run_without_usable_targets_is_refused_saying_why(tmp_path):
    import json

    from ctpo_lab.figures import llm_figs

    run = tmp_path / "llm"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"model": "tiny-random"}))
    (run / "summary.json").write_text(json.dumps({
        "settings": {"bin_width": 16},
        "targets": {"temperature_1.5": {"error": "mask: no position ≥ 1 has 8 or more alive sequences"}}}))
    with pytest.raises(ValueError, match=r"^llm_run: .* has no target with results to plot \(temperature_1\.5: mask"):
        llm_figs.make(tmp_path / "out", quick=True, seed=0, cache=tmp_path / "cache", command="test", llm_run=run)
    assert not (tmp_path / "out").exists()
