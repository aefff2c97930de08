"""Regenerate every figure and table of paper_figures/: `python -m ctpo_lab.figures [--quick] [--out DIR]`."""
