"""`python -m ctpo_lab`: the training losses by default, any PRESETS key with --loss."""

from ctpo_lab.__main__ import main
from ctpo_lab.losses import TRAINING_PRESETS


def _rows(out: str) -> list[str]:
    table = out.split("\n\n")[1].splitlines()[1:]
    return [line.split()[0] for line in table]


def test_default_is_the_training_presets(capsys):
    assert main(["--batch", "4", "--length", "32"]) == 0
    assert _rows(capsys.readouterr().out) == list(TRAINING_PRESETS)


def test_loss_takes_any_preset(capsys):
    assert main(["--batch", "4", "--length", "32", "--loss", "tis", "unclipped_cumulative", "sqrt_t_window"]) == 0
    out = capsys.readouterr().out
    assert _rows(out) == ["tis", "unclipped_cumulative", "sqrt_t_window"]
    assert "ctpo_fixed" in out  # the position profile is still shown


def test_unknown_loss_is_one_line_exit_2(capsys):
    assert main(["--loss", "ppo9"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --loss: ")
