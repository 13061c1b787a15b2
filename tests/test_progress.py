"""Progress in a log file is plain lines; a terminal gets tqdm's bar."""
import io

from ddpm.cli import main
from ddpm.progress import LineProgress, progress
from helpers import TINY_TRAIN_ARGS


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_line_every_tenth_and_one_at_the_end_with_the_postfix():
    # The bugs it catches: a line per update (the flood), no line for the last update, a postfix lost.
    out = io.StringIO()
    bar = LineProgress(total=95, desc="job", stream=out)
    for n in range(95):
        if n == 40:
            bar.set_postfix({"loss": "0.5"})
        bar.update(1)
    bar.close()
    lines = out.getvalue().splitlines()
    assert [line.split()[1] for line in lines] == [f"{k}/95" for k in (9, 18, 27, 36, 45, 54, 63, 72, 81, 90, 95)]
    assert lines[0].startswith("job: 9/95 (9%)") and "loss=0.5" in lines[4] and "loss" not in lines[3]
    assert "\r" not in out.getvalue()


def test_training_logs_plain_lines_to_a_file_and_a_bar_to_a_terminal(tmp_path, capsys, monkeypatch):
    # The bug it catches (issue 33): a redrawn bar written to a log file (carriage returns, ~1,000 updates).
    argv = ["train", "mnist", "--conditional", "--steps", "40", "--log-every", "4", "--val-every", "0",
            "--num-workers", "0", "--device", "cpu", *[a for a in TINY_TRAIN_ARGS if a != "--quiet"]]
    assert main([*argv, "--out", str(tmp_path / "file")]) == 0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("train: ")]
    assert [line.split()[1] for line in lines] == [f"{k}/40" for k in range(4, 41, 4)], err
    assert "\r" not in err and "loss=" in lines[-1]
    assert progress(range(3), desc="inner", leave=False).disable  # inner loops say nothing in a file

    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    assert main([*argv, "--out", str(tmp_path / "terminal")]) == 0
    assert "\r" in terminal.getvalue() and "train:" in terminal.getvalue()  # tqdm's redrawn bar
