"""Bad input, the rest: a checkpoint that does not load is named and skipped by stage 6; torchrun runs stage 5
with the stage's own flags (--run); stages 2, 3, 5 and 6 check paths, models, devices, LoRA targets and
benchmarks before any model loads; a full disk during a checkpoint says so and loses nothing; the fix commands
of stages 3 and 4 name the run; the seconds metric goes on after a resume."""
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import types

import pytest
import torch

from conftest import ROOT, copy_of_tiny_run, load_stage

stage1, stage2, stage3, stage4, stage5, stage6 = (
    load_stage(f) for f in ("01_sft_rm.py", "02_rollout.py", "03_rewards.py", "04_hras.py",
                            "05_grpo_train.py", "06_eval.py"))


@pytest.fixture(scope="module")
def run_copy(tiny_run, tmp_path_factory):
    """A copy of the tiny stage-1 run, so the runs and files made here touch no other test's folder."""
    return copy_of_tiny_run(tiny_run, tmp_path_factory.mktemp("more_bad_input_runs"))


@pytest.fixture
def no_models(monkeypatch):
    """Any model load fails the test: the errors below must come before one."""
    def fail(*args, **kwargs):
        pytest.fail("a model was loaded before the input was checked")

    for name in ("load_policy", "load_crm"):
        monkeypatch.setattr(stage1, name, fail)


def small(run_copy, **overrides):
    base = dict(run="tiny", runs_dir=str(run_copy.parent), steps=2, prompts_per_step=2, group_size=2,
                max_new_tokens=8, checkpoint_every=1, save_rollouts_every=100, device="cpu")
    return stage5.Config(**{**base, **overrides})


# ------------------------------------------------------------- 1. stage 6: a checkpoint that does not load
def test_stage6_names_and_skips_a_checkpoint_cut_short_and_evaluates_the_others(run_copy, capsys):
    cut = run_copy / "cut_seed0" / "policy"
    shutil.copytree(run_copy / "policy_sft", cut)
    weights = cut / "model.safetensors"
    with open(weights, "r+b") as f:  # a copy that died half way, or a full disk
        f.truncate(weights.stat().st_size // 2)
    results = stage6.main(stage6.Config(run="tiny", runs_dir=str(run_copy.parent), n=2, samples=2,
                                        max_new_tokens=8, examples=0, device="cpu"))
    assert "cut_seed0" not in results and results["sft"]["n"] == 4  # the good checkpoint is evaluated
    out = capsys.readouterr().out
    assert f"skipping cut_seed0 ({cut}): it does not load: {weights} is cut short or corrupt" in out
    saved = json.loads((run_copy / "eval.json").read_text())
    assert "incomplete metadata" in saved["skipped"]["cut_seed0"] and "sft" in saved["checkpoints"]
    assert f"Skipped cut_seed0: it does not load: {weights}" in (run_copy / "eval.md").read_text()
    shutil.rmtree(run_copy / "cut_seed0")


# ----------------------------------------------------------------------- 3. the README's torchrun command
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_passes_the_stage_its_run_flag(tiny_run, tmp_path):
    """`torchrun --nproc-per-node 2 05_grpo_train.py -- --run NAME ...` as a user types it (the console
    script, 2 CPU ranks, gloo): torchrun alone reads --run as an abbreviation of its own --run-path and exits
    2; after "--" the stage gets every flag."""
    runs_dir = tmp_path / "elsewhere"
    copy_of_tiny_run(tiny_run, runs_dir)
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    launcher = [torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]
    command = launcher + ["--nproc-per-node", "2", "05_grpo_train.py", "--", "--run", "tiny", "--runs-dir",
                          str(runs_dir), "--parallel", "fsdp", "--steps", "1", "--prompts-per-step", "2",
                          "--group-size", "2", "--max-new-tokens", "8", "--device", "cpu"]
    # PET_MASTER_PORT: torchrun's --master-port, a free one (another test may hold the default)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PET_MASTER_PORT": str(free_port())}
    started = time.time()
    out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    print(f"\ntorchrun, 2 ranks, one step: {time.time() - started:.1f} s")
    run = runs_dir / "tiny" / "hras_seed0"
    config = json.loads((run / "config.json").read_text())
    assert (config["run"], config["world_size"], config["parallel"]) == ("tiny", 2, "fsdp")
    assert [r["step"] for r in stage1.read_jsonl(run / "metrics.jsonl")] == [1]
    assert (run / "policy" / "model.safetensors").is_file()


def test_parse_config_drops_the_separator_wherever_torchrun_leaves_it():
    for argv in (["--", "--run", "x", "--steps", "3"], ["--run", "x", "--", "--steps", "3"]):
        cfg = stage1.parse_config(stage5.Config, "", argv)
        assert (cfg.run, cfg.steps) == ("x", 3)


# ----------------------------------------------------------------------- 4. paths, models and devices
@pytest.mark.parametrize("stage, overrides, message", [
    ("2", {"policy": "runs/nowhere/policy_sft"}, "--policy runs/nowhere/policy_sft: no such folder"),
    ("2", {"policy": "{crm}"}, r"--policy .*crm: a modernbert model \(ModernBertForSequenceClassification\), "
                               r"not a vision-language one"),
    ("2", {"policy": "{data}"}, r"--policy .*data: no config.json in it"),
    ("3", {"crm": "{policy}"}, r"--crm .*policy_sft: a qwen2_vl model .*, not a text classifier"),
    ("5", {"init": "runs/nowhere/policy_sft"}, "--init runs/nowhere/policy_sft: no such folder"),
    ("5", {"init": "nobody/no-such-model"}, "--init nobody/no-such-model: no such folder here, and not a"),
    ("5", {"init": "{crm}"}, "--init .*crm: a modernbert model .*not a vision-language one"),
    ("5", {"crm": "{policy}"}, "--crm .*policy_sft: a qwen2_vl model .*, not a text classifier"),
    ("6", {"checkpoints": "hras=runs/nowhere/policy"}, "--checkpoints runs/nowhere/policy: no such folder"),
    ("6", {"checkpoints": "crm={crm}"}, "--checkpoints .*crm: a modernbert model"),
])
def test_stages_check_paths_and_models_before_reading_anything(run_copy, tmp_path, no_models, stage,
                                                               overrides, message):
    folders = {name: str(run_copy / folder) for name, folder in [("crm", "crm"), ("policy", "policy_sft"),
                                                                 ("data", "data")]}
    overrides = {k: v.format(**folders) for k, v in overrides.items()}
    module = {"2": stage2, "3": stage3, "5": stage5, "6": stage6}[stage]
    with pytest.raises(SystemExit, match=message):  # runs_dir does not exist: the check reads nothing else
        module.main(module.Config(runs_dir=str(tmp_path / "absent"), device="cpu", **overrides))


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without a GPU")
@pytest.mark.parametrize("module", [stage2, stage3, stage5, stage6], ids=["2", "3", "5", "6"])
def test_stages_refuse_a_device_this_machine_does_not_have(tmp_path, no_models, module):
    with pytest.raises(SystemExit, match="--device cuda: CUDA is not available here; pass --device cpu"):
        module.main(module.Config(runs_dir=str(tmp_path / "absent"), device="cuda"))
    with pytest.raises(SystemExit, match="--device gpu: not a device torch knows; pass cpu, cuda or cuda:N"):
        module.main(module.Config(runs_dir=str(tmp_path / "absent"), device="gpu"))


def test_stage5_checks_lora_targets_before_the_model_loads(run_copy, no_models):
    with pytest.raises(SystemExit, match=r"--lora-targets q_prj,v_proj: q_prj names no linear layer of "
                                         r".*policy_sft's language model; its linears: down_proj, gate_proj, "
                                         r"k_proj, o_proj, q_proj, up_proj, v_proj"):
        stage5.main(small(run_copy, name="lora_typo", lora_rank=4, lora_targets="q_prj,v_proj"))
    with pytest.raises(SystemExit, match="--lora-targets ,: \\(none\\) names no linear layer"):
        stage5.main(small(run_copy, name="lora_typo", lora_rank=4, lora_targets=","))
    assert not (run_copy / "lora_typo").exists()


def test_stage6_benchmark_offline_is_a_clear_error(run_copy, no_models):
    with pytest.raises(SystemExit, match="--benchmark cvbench: cannot load it .*run once with a network"):
        stage6.main(stage6.Config(run="tiny", runs_dir=str(run_copy.parent), benchmark="cvbench",
                                  device="cpu"))


# ----------------------------------------------------------------------- 5. smaller
def test_a_full_disk_during_a_checkpoint_says_so_and_keeps_the_last_one(run_copy, monkeypatch):
    """torch.save on a full disk raises only "unexpected pos ..." (as on an 8 MB tmpfs); here the disk is
    full from the second checkpoint on."""
    real_save, real_usage, saves = torch.save, shutil.disk_usage, []

    def save(obj, path, *args, **kwargs):
        saves.append(path)
        if len(saves) == 1:
            return real_save(obj, path, *args, **kwargs)
        with open(path, "wb") as f:
            f.write(b"PK\x03\x04 half a checkpoint")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 3025088 vs 3024976")

    monkeypatch.setattr(torch, "save", save)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real_usage(path)._replace(free=0))
    out_dir = run_copy / "full_disk"
    with pytest.raises(SystemExit, match=r"step 2: writing the checkpoint .*checkpoint.tmp failed, no space "
                                         r"left on the disk \(0 MiB free\); .*checkpoint, the last complete "
                                         r"checkpoint, is as it was: free some space, then --resume"):
        stage5.main(small(run_copy, name="full_disk"))
    assert not (out_dir / "checkpoint.tmp").exists()  # the half-written one is gone: its space is free again
    assert torch.load(out_dir / "checkpoint" / "trainer_state.pt", weights_only=False)["step"] == 1
    monkeypatch.undo()
    stage5.main(small(run_copy, name="full_disk", resume=True))  # space freed: it goes on
    assert [r["step"] for r in stage1.read_jsonl(out_dir / "metrics.jsonl")] == [1, 2]
    assert (out_dir / "policy" / "model.safetensors").is_file()


def test_the_seconds_metric_goes_on_after_a_resume(run_copy, monkeypatch):
    now = [0.0]

    def clock() -> float:  # every reading 100 s after the last
        now[0] += 100.0
        return now[0]

    monkeypatch.setattr(stage5, "time", types.SimpleNamespace(time=clock))
    stage5.main(small(run_copy, name="timed"), stop_after=1)  # 100 s at step 1, checkpoint at 200 s
    stage5.main(small(run_copy, name="timed", resume=True))
    seconds = [r["seconds"] for r in stage1.read_jsonl(run_copy / "timed" / "metrics.jsonl")]
    assert seconds == [100.0, 300.0]  # 200 s before the checkpoint, 100 s after the resume


def test_fix_commands_of_stages_3_and_4_name_the_run(tmp_path):
    run_dir, where = tmp_path / "mine", re.escape(str(tmp_path))
    run_dir.mkdir()
    (run_dir / "stage1.json").write_text(json.dumps({"config": {"dataset": None}}))
    with pytest.raises(SystemExit, match=f"run `python 02_rollout.py --run mine --runs-dir {where}` first"):
        stage3.main(stage3.Config(run="mine", runs_dir=str(tmp_path), device="cpu"))
    (run_dir / "rollouts.jsonl").write_text("")
    with pytest.raises(SystemExit, match=f"Rerun `python 02_rollout.py --run mine --runs-dir {where}`"):
        stage3.main(stage3.Config(run="mine", runs_dir=str(tmp_path), device="cpu"))
    with pytest.raises(SystemExit, match=f"run `python 03_rewards.py --run mine --runs-dir {where}` first"):
        stage4.main(stage4.Config(run="mine", runs_dir=str(tmp_path)))
    (run_dir / "rewards.jsonl").write_text("")
    with pytest.raises(SystemExit, match=f"Rerun `python 03_rewards.py --run mine --runs-dir {where}`"):
        stage4.main(stage4.Config(run="mine", runs_dir=str(tmp_path)))
    assert stage1.stage_command("02_rollout.py", stage1.Path("runs") / "x") == "python 02_rollout.py --run x"
