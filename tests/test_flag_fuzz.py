"""benchmarks/flag_fuzz.py in the suite: a bounded subset of its cases, and the harness itself seen catching a hang,
a silently accepted bad value and a serve base that fails on its own."""
import importlib.util
import time
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location("flag_fuzz", Path(__file__).parents[1] / "benchmarks" / "flag_fuzz.py")
flag_fuzz = importlib.util.module_from_spec(spec)
spec.loader.exec_module(flag_fuzz)

# the flags whose holes the review found (serve's base, a hang, a silent accept), two that load a model, and
# distill's --data (an empty one was a traceback)
SUBSET = [("serve", "--host"), ("prepare", "--num-workers"), ("prepare", "--max-bad-fraction"), ("train", "--steps"),
          ("sample", "--guide"), ("eval", "--inception"), ("edit", "--mask"), ("distill", "--data")]


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz")
    return folder, flag_fuzz.fuzz(SUBSET, sorted({c for c, _ in SUBSET}), timeout=60, folder=folder,
                                  report=lambda line: None)


@pytest.mark.slow
def test_every_case_of_the_subset_ends_in_one_line_or_an_allowed_value(fuzzed):
    _, columns = fuzzed
    failures = [case for column, cases in columns.items() if column not in flag_fuzz.HOLDS for case in cases]
    assert not failures, failures
    assert sum(len(cases) for cases in columns.values()) == len(SUBSET) * len(flag_fuzz.BAD_VALUES)
    assert len(columns["accepted"]) == 2  # prepare's 0 workers and 0 bad files tolerated, as their help says


@pytest.mark.slow
def test_the_serve_base_works_so_that_the_fuzzed_flag_is_what_fails(fuzzed):
    # The bug it catches: a base command that fails by itself (it passed --port 0, which serve refuses), so every
    # serve case ended on that one error whatever flag was fuzzed.
    folder, _ = fuzzed
    argv = flag_fuzz.base_argv("serve", folder / "run", folder / "base")
    assert flag_fuzz.run_case(argv, folder, timeout=60) == ("exit 0", "")


@pytest.mark.slow
@pytest.mark.parametrize("flag", ["--strength", "--mask", "--interpolate", "--seeds"])
def test_each_edit_base_works(fuzzed, flag):
    # The bug it catches: an edit base that fails by itself (e.g. --mask beside --strength, which exclude each
    # other), so that every case of that flag ended on the base's error.
    folder, _ = fuzzed
    argv = flag_fuzz.base_argv("edit", folder / "run", folder / f"base{flag}", flag)
    assert flag in argv  # its mode's base, where the fuzzed value replaces a working one
    assert flag_fuzz.run_case(argv, folder, timeout=60) == ("exit 0", "")


def test_a_hang_and_a_silently_accepted_bad_value_are_failures(tmp_path, monkeypatch):
    # The bugs it catches: "running at the time limit" counted as holding (prepare --num-workers -1, planted to hang,
    # was), and exit 0 on -1, 0 or 10^12 of --max-bad-fraction counted as ok once its range check was gone.
    import ddpm.cli.prepare as prepare_command

    # the forked child inherits the plant
    monkeypatch.setattr(prepare_command, "cmd_prepare", lambda args: time.sleep(60))
    argv = ["prepare", "mnist", "--out", str(tmp_path / "p"), "--num-workers=-1"]
    outcome, _ = flag_fuzz.run_case(argv, tmp_path, timeout=2)
    assert outcome == "hang" and flag_fuzz.column(outcome, "prepare", "--num-workers", "negative", "") == "hang"
    monkeypatch.setattr(prepare_command, "cmd_prepare", lambda args: 0)  # a range check that is not there
    outcome, _ = flag_fuzz.run_case(argv, tmp_path, timeout=30)
    help_text = "unreadable image files tolerated ...; 0 = none"
    assert outcome == "exit 0"
    for kind in ("negative", "huge", "NaN"):
        assert flag_fuzz.column(outcome, "prepare", "--max-bad-fraction", kind, help_text) == "accepted a bad value"
    assert flag_fuzz.column(outcome, "prepare", "--max-bad-fraction", "zero", help_text) == "accepted"
    assert flag_fuzz.column(outcome, "prepare", "--max-bad-fraction", "zero", "no words") == "accepted a bad value"
    assert flag_fuzz.column("traceback", "train", "--lr", "huge", "") == "crash"
