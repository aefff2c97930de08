"""Every notebook executes on a small budget, and its .ipynb matches its jupytext py:percent twin."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
jupytext = pytest.importorskip("jupytext")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.py"))


def test_there_are_notebooks():
    assert NOTEBOOKS, "notebooks/*.py not found"


@pytest.mark.parametrize("source", NOTEBOOKS, ids=lambda p: p.stem)
def test_ipynb_twin_is_in_sync_and_has_no_outputs(source):
    twin = source.with_suffix(".ipynb")
    assert twin.exists(), f"{twin.name} missing: run `jupytext --to ipynb {source}`"
    nb = nbformat.read(twin, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), f"{twin.name} has outputs"
    from_py = jupytext.read(source)
    assert [c.source for c in nb.cells] == [c.source for c in from_py.cells], f"{twin.name} differs from {source.name}"


@pytest.mark.parametrize("source", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes(source, tmp_path, monkeypatch):
    monkeypatch.setenv("CTPO_LAB_SMALL", "1")
    monkeypatch.setenv("CTPO_LAB_NOTEBOOK_OUT", str(tmp_path))
    nb = jupytext.read(source)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute(env=dict(os.environ))
