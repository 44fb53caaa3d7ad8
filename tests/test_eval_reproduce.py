"""Stage 6 --reproduce --jobs: stage-5 runs in worker processes, the same runs as one after the other."""
import json

import pytest

from conftest import copy_of_tiny_run, load_stage

stage1, stage5, stage6 = (load_stage(f) for f in ("01_sft_rm.py", "05_grpo_train.py", "06_eval.py"))


def test_worker_count(monkeypatch):
    assert stage6.worker_count("auto", "cuda") == 1  # one GPU: runs would share it
    assert stage6.worker_count("auto", "cuda:0") == 1
    monkeypatch.setattr(stage6.os, "cpu_count", lambda: 8)
    assert stage6.worker_count("auto", "cpu") == 2
    monkeypatch.setattr(stage6.os, "cpu_count", lambda: 1)
    assert stage6.worker_count("auto", "cpu") == 1
    assert stage6.worker_count("3", "cpu") == 3
    with pytest.raises(SystemExit, match="--jobs 0: use auto or a number of processes >= 1"):
        stage6.check_config(stage6.Config(jobs="0", device="cpu"))


def test_pending_runs_keep_finished_runs_resume_killed_ones_and_round_trip_as_flags(tmp_path, capsys):
    run = tmp_path / "tiny"
    (run / "grpo_seed0").mkdir(parents=True)
    (run / "grpo_seed0" / "summary.json").write_text("{}")  # finished
    (run / "grpo_seed1" / "checkpoint").mkdir(parents=True)
    (run / "grpo_seed1" / "checkpoint" / "trainer_state.pt").write_bytes(b"")  # killed after a checkpoint
    cfg = stage6.Config(run="tiny", runs_dir=str(tmp_path), reproduce=True, methods="grpo,hras", seeds="0,1",
                        train_steps=3, scale=2, device="cpu")
    todo = stage6.pending_runs(cfg, run)
    assert "grpo_seed0: done already, kept" in capsys.readouterr().out
    assert [(c.name, c.resume, c.overwrite) for c in todo] == [
        ("grpo_seed1", True, False), ("hras_seed0", False, True), ("hras_seed1", False, True)]
    assert (todo[0].steps, todo[0].prompts_per_step) == (6, 16)  # train_steps x scale, 8 x scale
    argv = stage6.config_argv(todo[0])
    assert "--resume" in argv and "--overwrite" not in argv and argv[argv.index("--name") + 1] == "grpo_seed1"
    for config in todo:  # the flags a worker gets parse back into the very config an in-process run gets
        assert stage1.parse_config(stage5.Config, "", stage6.config_argv(config)) == config


def finished(run) -> dict[str, int]:
    """{run name: metrics lines} for every folder under run that holds a summary.json."""
    return {path.parent.name: len(stage1.read_jsonl(path.parent / "metrics.jsonl"))
            for path in sorted(run.glob("*/summary.json"))}


def test_two_jobs_train_the_runs_one_job_trains_and_a_failed_run_is_named_with_its_log(tiny_run, tmp_path):
    one, two = (copy_of_tiny_run(tiny_run, tmp_path / name) for name in ("one", "two"))
    base = dict(run="tiny", reproduce=True, methods="grpo,hras", seeds="0", train_steps=1, device="cpu")
    stage6.reproduce(stage6.Config(runs_dir=str(one.parent), jobs="1", **base))
    assert finished(one) == {"grpo_seed0": 1, "hras_seed0": 1}

    # two: hras_seed0 holds a checkpoint that another method wrote, so its worker's stage 5 refuses to resume
    bad = two / "hras_seed0" / "checkpoint"
    bad.mkdir(parents=True)
    (bad / "trainer_state.pt").write_bytes(b"")
    (bad / "run_config.json").write_text(json.dumps({"advantage": "sum"}))
    with pytest.raises(SystemExit) as stopped:
        stage6.reproduce(stage6.Config(runs_dir=str(two.parent), jobs="2", **base))
    log = two / "hras_seed0" / "stdout.log"
    assert "hras_seed0 (exit 1; log " + str(log) in str(stopped.value) and log.is_file()
    assert "--resume" in log.read_text()  # stage 5's own reason is in the log (and the message's tail)
    assert finished(two) == {"grpo_seed0": 1}  # the run beside it finished: its work is kept

    # without the bad checkpoint, a rerun keeps grpo_seed0 and trains hras_seed0 in a worker
    grpo_log = (two / "grpo_seed0" / "stdout.log").read_text()
    (bad / "trainer_state.pt").unlink()
    stage6.reproduce(stage6.Config(runs_dir=str(two.parent), jobs="2", **base))
    assert (two / "grpo_seed0" / "stdout.log").read_text() == grpo_log  # not run again
    assert "wrote" in (two / "hras_seed0" / "stdout.log").read_text()
    assert finished(two) == finished(one)
    assert json.loads((two / "hras_seed0" / "summary.json").read_text()).keys() == \
        json.loads((one / "hras_seed0" / "summary.json").read_text()).keys()
