"""Long runs on clusters: a signal or --time-limit stops at a checkpoint, a second Ctrl-C stops at once with a true
message, and a restarted job (torchrun --max-restarts, two launchers as two nodes) continues to the same bits."""
import os
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

from ddpm.checkpoint import ema_states, latest_checkpoint, load_training_state
from ddpm.cli import main
from ddpm.distributed import TIME_LIMIT, StopRequest, parse_duration, stop_code
from ddpm.training import train
from helpers import TINY_TRAIN_ARGS, Child, checkpoint_step, free_port, wait_all

# torchrun's workers, one thread each (bits depend on the thread count: compare runs of the same launch only)
TORCHRUN_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
# the EMA averages from step 3, so a rebuilt or reset EMA shows
RECIPE = ["--ema-warmup", "2", "--ema-decay", "0.8", "--log-every", "1", "--val-every", "0"]


def train_argv(out, steps, *extra):
    return ["train", "mnist", "--conditional", "--out", str(out), "--steps", str(steps), *RECIPE, *TINY_TRAIN_ARGS,
            *extra]


def final_state(run):
    return load_training_state(latest_checkpoint(run))


def assert_same_bits(a, b):
    assert a["step"] == b["step"]
    for name, value in a["model"].items():
        assert torch.equal(value, b["model"][name]), f"weights differ: {name}"
    for ema_a, ema_b in zip(ema_states(a), ema_states(b), strict=True):
        for name, value in ema_a["model"].items():
            assert torch.equal(value, ema_b["model"][name]), f"EMA differs: {name}"
    for key, state in a["optimizer"]["state"].items():
        for field, value in state.items():
            assert torch.equal(value, b["optimizer"]["state"][key][field]), f"optimizer {field} differs"


def assert_same_guide(a, b):
    """The guide snapshots (RUN/guide, autoguidance's weights) of two runs are the same bits."""
    from safetensors.torch import load_file

    first, second = (load_file(str(run / "guide" / "model.safetensors")) for run in (a, b))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def logged_steps(run) -> int:
    """How many train/loss scalars the run has flushed so far (--log-every 1): read without torch while it runs."""
    folder = run / "tensorboard"
    return sum(f.stat().st_size for f in folder.iterdir()) if folder.is_dir() else 0


def start_and_signal(argv, run, signals, *, group=False, after_bytes=2000):
    """Start `ddpm train` in a child, wait until it has logged some steps, then send `signals` (to its process
    group with `group`, as a terminal's Ctrl-C does, reaching the loader workers too). Returns the finished process
    and its stderr."""
    # the child starts with SIGINT at its default, whatever this shell gave us (a background job ignores SIGINT)
    child = Child([sys.executable, "-m", "ddpm", *argv], run.parent, "train",
                  preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while logged_steps(run) < after_bytes and child.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert child.poll() is None, "the run ended before the signal\n" + child.tail()
    for number in signals:
        os.killpg(child.pid, number) if group else child.proc.send_signal(number)
    child.wait(120)
    return child, child.stderr()


# -- the pure parts -------------------------------------------------------------------------------------------------
def test_durations_parse_as_a_job_scheduler_writes_them():
    assert [parse_duration(t) for t in ("3h50m", "90m", "45s", "3600", "0.5", "1d2h", "1h30m15s", " 2H ")] == [
        13800, 5400, 45, 3600, 0.5, 93600, 5415, 7200]
    for bad in ("", "abc", "-1", "0", "nan", "inf", "3x", "h", "1000000000000", "2000d"):
        with pytest.raises(ValueError):
            parse_duration(bad)


def test_the_stop_code_is_the_signal_or_a_time_limit_that_the_next_step_and_save_would_pass():
    assert stop_code(None, 10.0, None, 1.0, 5.0) == 0
    assert stop_code(signal.SIGTERM, 0.0, None, 1.0, 5.0) == signal.SIGTERM
    assert stop_code(None, 93.9, 100.0, 1.0, 5.0) == 0  # 93.9 + 1 + 5 still fits
    assert stop_code(None, 94.1, 100.0, 1.0, 5.0) == TIME_LIMIT
    clock = iter([0.0, 55.0, 55.0])
    request = StopRequest(time_limit=60.0, clock=lambda: next(clock))
    assert request.code(1.0, None) == TIME_LIMIT  # 55 + 1 + 5 s reserved for a save not yet timed > 60
    assert request.code(1.0, 2.0) == 0  # a save measured at 2 s fits


def test_a_second_sigint_raises_at_once_and_other_signals_only_set_the_flag():
    request = StopRequest()
    request.handle(signal.SIGUSR1)
    request.handle(signal.SIGTERM)  # no raise: the loop stops at its next step anyway
    assert request.signal_number == signal.SIGTERM
    with pytest.raises(KeyboardInterrupt):
        request.handle(signal.SIGINT)
    first = StopRequest()
    first.handle(signal.SIGINT)
    assert first.signal_number == signal.SIGINT


# -- a graceful stop ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_sigterm_mid_run_writes_a_checkpoint_at_the_stop_step_and_resume_gives_the_uninterrupted_bits(tmp_path):
    # The bug it catches: SIGTERM killing the run with no checkpoint (exit -15), as before: with --checkpoint-every
    # past the end of the run, a stop that did not save would leave nothing. Then: a resume from the stop's
    # checkpoint that does not continue the same stream.
    run, steps = tmp_path / "run", 100
    proc, err = start_and_signal(train_argv(run, steps, "--checkpoint-every", "1000", "--quiet", "--num-workers", "0"),
                                 run, [signal.SIGTERM])
    stopped = final_state(run)["step"]
    assert proc.returncode == 75, err
    assert 0 < stopped < steps
    assert err.strip().splitlines() == [f"ddpm train: stopped by SIGTERM at step {stopped}, checkpoint written; "
                                        f"continue with `ddpm train --resume {run}`"]
    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    straight = tmp_path / "straight"
    assert main(train_argv(straight, steps, "--checkpoint-every", "1000", "--quiet")) == 0
    assert_same_bits(final_state(run), final_state(straight))
    assert_same_guide(run, straight)  # taken at step 50, after the stop


@pytest.mark.slow
def test_ctrl_c_to_the_process_group_before_the_first_checkpoint_writes_one_and_says_so(tmp_path):
    # The bugs it catches: "the last checkpoint is kept" printed when none existed (--resume then failed), and loader
    # workers dying of the terminal's SIGINT ("DataLoader worker exited unexpectedly") before the main process
    # could save. Two workers get the same SIGINT as the main process.
    run = tmp_path / "run"
    proc, err = start_and_signal(train_argv(run, 100_000, "--checkpoint-every", "100000", "--num-workers", "2",
                                            "--quiet"), run, [signal.SIGINT], group=True)
    assert proc.returncode == 75, err
    step = final_state(run)["step"]
    assert err.strip().splitlines()[-1] == (f"ddpm train: stopped by SIGINT at step {step}, checkpoint written; "
                                            f"continue with `ddpm train --resume {run}`")
    assert "Traceback" not in err and "exited unexpectedly" not in err
    assert main(["train", "--resume", str(run), "--steps", str(step + 2), "--quiet", "--num-workers", "0"]) == 0


def test_a_second_ctrl_c_stops_at_once_and_says_what_is_kept(tmp_path, monkeypatch, capsys):
    # The bug it catches: a message that claims a checkpoint when there is none, or names no step.
    import ddpm.cli.train as train_command

    def interrupted(config, resume, args, stop):
        raise KeyboardInterrupt  # what StopRequest.handle raises at the second SIGINT

    monkeypatch.setattr(train_command, "_train", interrupted)
    assert main(train_argv(tmp_path / "none", 5, "--quiet")) == 130
    assert capsys.readouterr().err.strip() == (
        f"ddpm train: interrupted twice: stopped at once; no checkpoint was written yet, so nothing of this run is "
        f"kept in {tmp_path / 'none'}")
    monkeypatch.undo()
    assert main(train_argv(tmp_path / "some", 3, "--quiet")) == 0
    monkeypatch.setattr(train_command, "_train", interrupted)
    assert main(["train", "--resume", str(tmp_path / "some"), "--steps", "9"]) == 130
    assert capsys.readouterr().err.strip() == (
        "ddpm train: interrupted twice: stopped at once; nothing since the last checkpoint (step 3) is kept; "
        f"continue with `ddpm train --resume {tmp_path / 'some'}`")


def test_time_limit_stops_at_a_checkpoint_and_the_resumed_run_ends_with_the_same_bits(tmp_path, capsys):
    # The bug it catches: a time limit that stops without saving, after the limit, or at a step the resume does not
    # continue exactly. A fake clock makes the stop step certain: 1 s per reading, a 9.5 s limit, 5 s reserved for
    # the first checkpoint.
    from ddpm.cli import build_parser, train_config_from_args

    config = train_config_from_args(build_parser().parse_args(train_argv(tmp_path / "run", 12, "--time-limit", "9.5",
                                                                         "--checkpoint-every", "100")))
    assert config.runtime.time_limit == 9.5
    ticks = iter(range(1000))
    result = train(config, progress=False, stop=StopRequest(clock=lambda: float(next(ticks))))
    assert result.stopped == TIME_LIMIT and 0 < result.step < 12
    assert final_state(tmp_path / "run")["step"] == result.step
    # the resume on the real clock gets its own limit: the saved 9.5 s would stop a resume slowed by a busy machine
    assert main(["train", "--resume", str(tmp_path / "run"), "--time-limit", "1h", "--quiet"]) == 0
    assert main(train_argv(tmp_path / "straight", 12, "--checkpoint-every", "100", "--quiet")) == 0
    assert_same_bits(final_state(tmp_path / "run"), final_state(tmp_path / "straight"))
    capsys.readouterr()
    # the flag end to end, on the real clock: a limit shorter than one step stops after the first
    assert main(["train", "--resume", str(tmp_path / "straight"), "--steps", "20", "--time-limit", "0.01s",
                 "--quiet"]) == 75
    assert capsys.readouterr().err.strip() == (
        f"ddpm train: stopped by the time limit (--time-limit) at step 13, checkpoint written; continue with "
        f"`ddpm train --resume {tmp_path / 'straight'}`")
    assert final_state(tmp_path / "straight")["step"] == 13


# -- restarts ---------------------------------------------------------------------------------------------------------
def test_resume_if_exists_continues_the_same_run_and_refuses_another(tmp_path, capsys):
    # The bugs it catches: a restarted job refused ("already holds a run"), as torchrun's restarts were; a folder
    # holding another run continued silently under the new flags.
    run = tmp_path / "run"
    argv = train_argv(run, 6, "--checkpoint-every", "3", "--quiet", "--resume-if-exists")
    assert main(argv[:argv.index("--steps") + 1] + ["3"] + argv[argv.index("--steps") + 2:]) == 0
    assert main(argv) == 0 and final_state(run)["step"] == 6  # the same command, longer: continued from step 3
    assert main(train_argv(tmp_path / "straight", 6, "--checkpoint-every", "3", "--quiet")) == 0
    assert_same_bits(final_state(run), final_state(tmp_path / "straight"))
    assert main(argv) == 0 and final_state(run)["step"] == 6  # a finished run: nothing to do, still a success
    capsys.readouterr()
    assert main(argv + ["--lr", "0.01"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"ddpm train: error: {run} holds a run with another configuration (train.lr: 0.0003 in the run, "
                   f"0.01 here); continue it with `ddpm train --resume {run}`, or choose another --out")
    assert main(train_argv(run, 6, "--quiet")) == 2
    assert "--resume-if-exists" in capsys.readouterr().err  # the plain refusal names the opt-in
    assert main(["train", "--resume", str(run), "--resume-if-exists"]) == 2
    assert "--resume-if-exists cannot change it" in capsys.readouterr().err


def children_of(pid: int) -> dict[int, int]:
    """{RANK: pid} of torchrun's worker processes (the children of its agent)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                environ = (entry / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            rank = [item[5:] for item in environ if item.startswith(b"RANK=")]
            if int(fields[1]) == pid and rank:
                found[int(rank[0])] = int(entry.name)
    return found


def torchrun(*options, argv):
    return [sys.executable, "-m", "torch.distributed.run", *options, "-m", "ddpm", *argv]


def wait_for(condition, job, what):
    deadline = time.time() + 120
    while not condition() and job.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert job.poll() is None and condition(), f"the job ended or stalled before {what}\n" + job.tail()


def two_nodes(folder, argv, *launcher_options, name="node"):
    """Two torchrun launchers on 127.0.0.1 as two nodes of one worker each. Node 0 hosts the rendezvous store
    (is_host=1, node 1 is_host=0): left to guess, both launchers match 127.0.0.1 and the first to bind hosts it;
    when node 1 won and exited first, node 0 lost the store it still waited on (the hang of issue 33)."""
    port = free_port()
    return [Child(torchrun("--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(rank), "--rdzv-backend",
                           "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"two-nodes-{port}",
                           "--rdzv-conf", f"is_host={int(rank == 0)}", *launcher_options, argv=argv),
                  folder, f"{name}{rank}", env=TORCHRUN_ENV)
            for rank in (0, 1)]


@pytest.mark.slow
def test_torchrun_restarts_continue_the_run_and_two_nodes_give_the_single_node_bits(tmp_path):
    # The bugs it catches: each restart refused because the folder holds a run (torchrun then gave up with exit 1);
    # a restart that does not continue the same bits; a SIGTERM that reaches one rank only stopping that rank alone
    # (the other then dies in the next collective, without a checkpoint); ranks on two nodes that compute another
    # run than on one.
    steps, every = 30, 10
    base = train_argv(tmp_path / "nodes", steps, "--checkpoint-every", str(every), "--device", "cpu", "--quiet",
                      "--num-workers", "0", "--resume-if-exists", "--log-every", "10")

    # the reference: two launchers as two nodes of one rank each, uninterrupted (the world of the restarted job)
    launchers = two_nodes(tmp_path, base)
    assert wait_all(launchers, 300) == [0, 0], "\n".join(launcher.tail() for launcher in launchers)
    nodes = final_state(tmp_path / "nodes")
    assert nodes["step"] == steps

    # one job, two restarts: SIGTERM to rank 1 only (a node that saw it first): both ranks stop at one step and
    # rank 0 saves; then, once the restarted run has saved again, kill -9 of a worker
    run = tmp_path / "restarted"
    argv = [str(run) if a == str(tmp_path / "nodes") else a for a in base]
    job = Child(torchrun("--standalone", "--nproc-per-node", "2", "--max-restarts", "2", "--monitor-interval", "0.1",
                         argv=argv), tmp_path, "restarted", env=TORCHRUN_ENV)
    wait_for(lambda: checkpoint_step(run) > 0 and len(children_of(job.pid)) == 2, job, "the first checkpoint")
    os.kill(children_of(job.pid)[1], signal.SIGTERM)
    wait_for(lambda: "ddpm train: stopped by SIGTERM at step" in job.stderr(), job, "rank 0's stop line")
    stopped = int(job.stderr().split("stopped by SIGTERM at step ")[1].split(",")[0])
    assert checkpoint_step(run) == stopped < steps  # rank 0 stopped where rank 1 did, and saved there
    wait_for(lambda: checkpoint_step(run) > stopped and len(children_of(job.pid)) == 2, job, "a new checkpoint")
    os.kill(children_of(job.pid)[0], signal.SIGKILL)
    job.wait(300)
    text = job.stderr()
    assert job.returncode == 0, job.tail()
    assert "already holds a run" not in text
    # a single node's restarts continue to the bits of an uninterrupted run on two nodes: so the restarts lose
    # nothing and the two nodes compute what one does (a bug in either would have to be the same bug to pass)
    assert_same_bits(final_state(run), nodes)
    assert_same_guide(run, tmp_path / "nodes")  # taken at step 15, between the two restarts


@pytest.mark.slow
def test_the_slurm_script_stops_requeues_and_its_requeued_run_continues(tmp_path):
    # The bug it catches: a README job script that does not run, or that neither requeues on a stop (75) nor
    # continues the run when requeued. srun and scontrol are stand-ins here: srun runs its command, scontrol
    # records what it was asked.
    shims = tmp_path / "bin"
    shims.mkdir()
    (shims / "srun").write_text('#!/bin/sh\nexec "$@"\n')
    (shims / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "scontrol.txt"}\n')
    for shim in shims.iterdir():
        shim.chmod(0o755)
    script = Path(__file__).parents[1] / "scripts" / "slurm_train.sbatch"
    env = {**os.environ, "PATH": f"{shims}:{Path(sys.executable).parent}:{os.environ['PATH']}", "DATA": "mnist",
           "RUN": str(tmp_path / "run"), "SLURM_JOB_ID": "4242"}
    # the preset's model at the tiny size; a time limit shorter than a step stands in for SLURM's signal
    tiny = [*TINY_TRAIN_ARGS, "--steps", "3", "--checkpoint-every", "100", "--num-workers", "0", "--device", "cpu",
            "--val-every", "0"]
    first = Child(["bash", str(script), *tiny, "--time-limit", "0.001"], tmp_path, "first", env=env)
    assert first.wait(300) == 75, first.tail()
    assert (tmp_path / "scontrol.txt").read_text() == "requeue 4242\n"
    assert final_state(tmp_path / "run")["step"] == 1
    again = Child(["bash", str(script), *tiny], tmp_path, "again", env=env)
    assert again.wait(300) == 0, again.tail()
    assert final_state(tmp_path / "run")["step"] == 3
    assert (tmp_path / "scontrol.txt").read_text() == "requeue 4242\n"  # a finished run is not queued again


def test_the_ranks_of_an_attempt_meet_under_a_fresh_name_whatever_an_earlier_attempt_left():
    # The bugs it catches (issue 33): a restarted two-node job that never met again, its ranks waiting under
    # different keys (TORCHELASTIC_RESTART_COUNT differs between nodes); a rank that takes the name a dead rank 0
    # of an earlier attempt left in the store (it would read that attempt's stale addresses).
    import threading
    from datetime import timedelta

    import torch.distributed as dist

    from ddpm.distributed import session_prefix

    store = dist.HashStore()
    store.set("ddpm/session", "stale")
    found = {}

    def rank(number, delay):
        time.sleep(delay)
        found[number] = session_prefix(store, number, 3, timedelta(seconds=30), ack_wait=0.2)

    threads = [threading.Thread(target=rank, args=args) for args in ((1, 0.0), (2, 0.1), (0, 0.8))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert found[0] == found[1] == found[2] and found[0] != "ddpm/stale", found
    with pytest.raises(RuntimeError, match="did not open a session"):
        session_prefix(dist.HashStore(), 1, 2, timedelta(seconds=0.5), ack_wait=0.1)


@pytest.mark.slow
def test_a_killed_worker_on_one_node_ends_the_other_node_at_once_with_one_line(tmp_path):
    # The bugs it catches (issue 33): a surviving node that waits on its dead peer (a collective that never fails,
    # a store nobody hosts), or that ends with a traceback instead of one line saying what happened and what is
    # kept. Measured in benchmarks/dead_peer.py: about 3 s after kill -9; the bound is --dist-timeout.
    run = tmp_path / "run"
    argv = train_argv(run, 100_000, "--checkpoint-every", "3", "--device", "cpu", "--quiet", "--num-workers", "0",
                      "--resume-if-exists", "--dist-timeout", "20s")
    nodes = two_nodes(tmp_path, argv)
    wait_for(lambda: checkpoint_step(run) > 0 and 1 in children_of(nodes[1].pid), nodes[0], "the first checkpoint")
    os.kill(children_of(nodes[1].pid)[1], signal.SIGKILL)
    killed = time.time()
    assert wait_all(nodes, 60) == [1, 1]
    assert time.time() - killed < 20, "\n".join(node.tail() for node in nodes)
    said = nodes[0].stderr()
    lines = [line for line in said.splitlines() if line.startswith("ddpm train")]
    assert len(lines) == 1 and lines[0].startswith("ddpm train: stopped: rank 0 lost another process of the torchrun "
                                                   "job at step "), said[-3000:]
    assert f"the last checkpoint in {run} is kept" in lines[0] and "[rank0]:" not in said  # no worker traceback
    assert "exitcode  : 5" in said  # torchrun's own report names ddpm's status for a lost peer
