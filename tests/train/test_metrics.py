"""Training metrics read back: `herd plot` of a folder that is not a run."""

from herd.cli import main


def test_cli_plot_of_a_folder_without_metrics_is_exit_2(tmp_path, capsys):
    assert main(["plot", str(tmp_path)]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
