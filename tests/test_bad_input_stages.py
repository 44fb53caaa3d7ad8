"""Bad input on stages 2, 5 and 6: every numeric flag checked before anything loads; a non-finite loss
stops stage 5 before the optimiser steps; stage 5 never erases or mixes runs; a cut-short last metrics line is
dropped with a warning; stage 6 skips a checkpoint with non-finite weights; stage 2 never replaces good rollouts
with nothing."""
import json
import math
import shutil

import pytest
import torch
from datasets import DatasetDict, load_from_disk
from PIL import Image

from conftest import copy_of_tiny_run, load_stage

stage1, stage2, stage5, stage6 = (load_stage(f) for f in ("01_sft_rm.py", "02_rollout.py", "05_grpo_train.py",
                                                            "06_eval.py"))


@pytest.fixture(scope="module")
def run_copy(tiny_run, tmp_path_factory):
    """A copy of the tiny stage-1 run, so the runs and files made here touch no other test's folder."""
    return copy_of_tiny_run(tiny_run, tmp_path_factory.mktemp("bad_input_runs"))


# ----------------------------------------------------------------------------- flags, before anything is read
# runs_dir does not exist: a check that ran after reading anything would fail with another message
STAGE5_FLAGS = [
    ({"max_new_tokens": 0}, "--max-new-tokens 0: must be at least 1"),
    ({"checkpoint_every": 0}, "--checkpoint-every 0: must be at least 1"),
    ({"save_rollouts_every": -1}, "--save-rollouts-every -1: must be at least 0"),
    ({"updates_per_batch": 0}, "--updates-per-batch 0: must be at least 1"),
    ({"steps": 0}, "--steps 0: must be at least 1"),
    ({"micro_batch_size": 0}, "--micro-batch-size 0: must be at least 1"),
    ({"group_size": 1}, "--group-size 1: must be at least 2 (a group of one has no baseline"),
    ({"top_p": 0.0}, "--top-p 0.0: must be in (0, 1]"),
    ({"top_p": 1.5}, "--top-p 1.5: must be in (0, 1]"),
    ({"temperature": 0.0}, "--temperature 0.0: stage 5 needs T > 0. The update divides the logits by T"),
    ({"temperature": -1.0}, "--temperature -1.0: stage 5 needs T > 0"),
    ({"alpha": math.nan}, "--alpha nan: must be a finite number"),
    ({"beta": math.inf}, "--beta inf: must be a finite number"),
    ({"lambda_cons": math.nan}, "--lambda-cons nan: must be a finite number"),
    ({"eps": math.nan}, "--eps nan: must be a finite number >= 0"),
    ({"cons_eps": -1.0}, "--cons-eps -1.0: must be a finite number >= 0"),
    ({"lr": math.inf}, "--lr inf: must be a finite number"),
    ({"clip_low": 1.0}, "--clip-low 1.0: must be below 1"),
    ({"advantage": "ppo"}, "--advantage ppo: use hras, grpo or sum"),
    ({"parallel": "fsdp", "lora_rank": 4}, "--parallel fsdp with --lora-rank: not supported"),
    ({"parallel": "ddp"}, "--parallel ddp: launch with torchrun"),
    ({"resume": True, "overwrite": True}, "--resume and --overwrite: pass one"),
    ({"dtype": "fp16"}, "--dtype fp16: use auto, bf16 or fp32"),
]


@pytest.mark.parametrize("overrides, message", STAGE5_FLAGS)
def test_stage5_names_a_bad_flag_before_reading_anything(tmp_path, overrides, message):
    with pytest.raises(SystemExit, match=message.replace("(", r"\(").replace(")", r"\)")):
        stage5.main(stage5.Config(runs_dir=str(tmp_path / "absent"), device="cpu", **overrides))


@pytest.mark.parametrize("overrides, message", [
    ({"n_prompts": 0}, "--n-prompts 0: must be at least 1"),
    ({"max_new_tokens": 0}, "--max-new-tokens 0: must be at least 1"),
    ({"prompts_per_batch": 0}, "--prompts-per-batch 0: must be at least 1"),
    ({"top_p": 0.0}, "--top-p 0.0: must be in"),
    ({"top_k": -1}, "--top-k -1: must be at least 0"),
    ({"temperature": math.nan}, "--temperature nan: must be a finite number >= 0"),
    ({"dtype": "fp16"}, "--dtype fp16: use auto, bf16 or fp32"),
])
def test_stage2_names_a_bad_flag_before_reading_anything(tmp_path, overrides, message):
    with pytest.raises(SystemExit, match=message):
        stage2.main(stage2.Config(runs_dir=str(tmp_path / "absent"), device="cpu", **overrides))


@pytest.mark.parametrize("overrides, message", [
    ({"n": 0}, "--n 0: must be at least 1"),
    ({"samples": 0}, "--samples 0: must be at least 1"),
    ({"max_new_tokens": 0}, "--max-new-tokens 0: must be at least 1"),
    ({"temperature": -1.0}, "--temperature -1.0: must be a finite number >= 0"),
    ({"checkpoints": "policy_only"}, "'policy_only' is not name=path"),
    ({"reproduce": True, "methods": "grpo,ppo"}, r"--methods grpo,ppo: \['ppo'\] unknown"),
    ({"reproduce": True, "seeds": "0,one"}, "--seeds 0,one: use a comma list of integers"),
])
def test_stage6_names_a_bad_flag_before_reading_anything(tmp_path, overrides, message):
    with pytest.raises(SystemExit, match=message):
        stage6.main(stage6.Config(runs_dir=str(tmp_path / "absent"), device="cpu", **overrides))


def test_stage6_refuses_torchrun_with_the_reason(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit, match="runs on one process .* run it with python, not torchrun"):
        stage6.main(stage6.Config(runs_dir=str(tmp_path), device="cpu"))


def test_stage5_prompts_per_step_above_the_split(run_copy):
    train_rows = len(load_from_disk(str(run_copy / "data"))["train"])
    with pytest.raises(SystemExit, match=f"--prompts-per-step 100000: the train split .* has {train_rows} rows; "
                                         f"pass at most {train_rows}"):
        stage5.main(stage5.Config(run="tiny", runs_dir=str(run_copy.parent), prompts_per_step=100000, device="cpu"))
    assert not (run_copy / "hras_seed0").exists()  # refused before the run folder was made


# ----------------------------------------------------------------------------- stage 2 keeps good rollouts
def test_stage2_empty_input_leaves_the_previous_rollouts(run_copy):
    good = run_copy / "rollouts.jsonl"
    good.write_text('{"row": 0, "completions": []}\n')
    with pytest.raises(SystemExit, match="--n-prompts 0"):
        stage2.main(stage2.Config(run="tiny", runs_dir=str(run_copy.parent), n_prompts=0, device="cpu"))
    data = load_from_disk(str(run_copy / "data"))
    empty = data["test"].filter(lambda row: False)  # (select([]) saves a split that datasets cannot load back)
    DatasetDict({"train": data["train"].select(range(4)), "test": data["test"], "empty": empty}).save_to_disk(
        str(run_copy.parent / "data_with_empty"))
    (run_copy.parent / "empty").mkdir()
    shutil.copy(run_copy / "stage1.json", run_copy.parent / "empty" / "stage1.json")
    shutil.move(str(run_copy.parent / "data_with_empty"), str(run_copy.parent / "empty" / "data"))
    (run_copy.parent / "empty" / "rollouts.jsonl").write_text(good.read_text())
    with pytest.raises(SystemExit, match="--split empty: .* has no rows in it"):
        stage2.main(stage2.Config(run="empty", runs_dir=str(run_copy.parent), split="empty", device="cpu"))
    assert good.read_text() == (run_copy.parent / "empty" / "rollouts.jsonl").read_text() == \
        '{"row": 0, "completions": []}\n'


def test_stage2_loads_the_policy_in_the_compute_dtype(run_copy, monkeypatch):
    dtypes, load = [], stage1.load_policy

    def spy(*args, **kwargs):
        dtypes.append(kwargs.get("dtype"))
        return load(*args, **kwargs)

    monkeypatch.setattr(stage1, "load_policy", spy)
    records = stage2.main(stage2.Config(run="tiny", runs_dir=str(run_copy.parent), n_prompts=1, group_size=2,
                                        max_new_tokens=4, dtype="bf16", device="cpu"))
    assert dtypes == [torch.bfloat16] and len(records) == 1 and len(records[0]["completions"]) == 2


# ----------------------------------------------------------------------------- stage 5: a non-finite loss
def test_a_non_finite_loss_stops_before_the_optimiser_steps(run_copy):
    model, processor = stage1.load_policy(str(run_copy / "policy_sft"), "cpu")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prompt = stage1.encode_prompts(processor, [Image.new("RGB", (56, 56), "red")], ["How many?"])
    ids, mask = stage1.encode_completions(processor, ["<think>1</think><answer>1</answer>"] * 2, "cpu")
    cfg = stage5.Config(group_size=2, kl_beta=0.0, device="cpu")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    old = torch.full(ids.shape, math.nan)  # e.g. what a sampler on blown-up logits records
    with pytest.raises(SystemExit, match="step 7: the loss is nan .* not finite, so the optimiser did not step"):
        stage5.update(cfg, model, None, optimizer, scheduler, prompt, ids, mask, old, torch.tensor([1.0, -1.0]),
                      step=7)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not optimizer.state  # AdamW never stepped


# ----------------------------------------------------------------------------- stage 5 never erases or mixes runs
def small(run_copy, **overrides):
    base = dict(run="tiny", runs_dir=str(run_copy.parent), name="guarded", steps=2, prompts_per_step=2, group_size=3,
                max_new_tokens=16, checkpoint_every=1, save_rollouts_every=100, device="cpu")
    return stage5.Config(**{**base, **overrides})


def test_stage5_resume_without_a_checkpoint_is_an_error(run_copy):
    with pytest.raises(SystemExit, match="--resume: .*nothing_here has no checkpoint .* run without --resume"):
        stage5.main(small(run_copy, name="nothing_here", resume=True))
    assert not (run_copy / "nothing_here").exists()


def test_stage5_refuses_to_erase_or_mix_runs_and_drops_a_cut_metrics_line(run_copy, capsys):
    stage5.main(small(run_copy), stop_after=1)  # "killed" after step 1, its checkpoint written
    metrics = run_copy / "guarded" / "metrics.jsonl"
    logged = metrics.read_text()
    with pytest.raises(SystemExit, match=r"guarded already holds a run \(metrics.jsonl, checkpoint\): pass --resume "
                                         r"to continue it, --overwrite to replace it, or --name"):
        stage5.main(small(run_copy))
    for overrides, key in [({"advantage": "grpo"}, "advantage = 'hras', this run has 'grpo'"),
                           ({"group_size": 4}, "group_size = 3, this run has 4"),
                           ({"prompts_per_step": 1}, "prompts_per_step = 2, this run has 1"),
                           ({"lora_rank": 4}, "lora_rank = 0, this run has 4")]:
        with pytest.raises(SystemExit, match=f"--resume: .* was written with {key}"):
            stage5.main(small(run_copy, resume=True, **overrides))
    assert metrics.read_text() == logged  # nothing was touched by the refusals

    metrics.write_text(logged + '{"step": 2, "reward_format": 0.5, "acc')  # a power cut in mid-line
    stage5.main(small(run_copy, resume=True))
    assert "metrics.jsonl, line 2: cut short" in capsys.readouterr().out
    assert [r["step"] for r in stage1.read_jsonl(metrics)] == [1, 2]

    stage5.main(small(run_copy, steps=1, overwrite=True))  # --overwrite: a fresh run of one step
    assert [r["step"] for r in stage1.read_jsonl(metrics)] == [1]
    assert json.loads((run_copy / "guarded" / "checkpoint" / "run_config.json").read_text())["steps"] == 1


def test_read_metrics_drops_only_a_cut_last_line(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "acc')
    assert stage5.read_metrics(path) == [{"step": 1}, {"step": 2}]
    assert "line 3: cut short" in capsys.readouterr().out
    path.write_text('{"step": 1}\n{"step": 2, "acc\n{"step": 3}\n')  # broken in the middle: not a cut append
    with pytest.raises(SystemExit, match="metrics.jsonl, line 2: not valid JSON"):
        stage5.read_metrics(path)


# ----------------------------------------------------------------------------- stage 6
def test_stage6_skips_a_checkpoint_with_non_finite_weights_and_reads_cut_curves(run_copy, capsys):
    model, processor = stage1.load_policy(str(run_copy / "policy_sft"), "cpu")
    with torch.no_grad():
        model.model.language_model.layers[1].mlp.up_proj.weight[0, 0] = math.nan  # what a diverged run leaves
    stage1.save_folder_atomic(run_copy / "diverged_seed0" / "policy", model, processor)
    (run_copy / "diverged_seed0" / "metrics.jsonl").write_text(
        '{"step": 1, "accuracy": 0.5, "oracle_inconsistency_rate": 0.25, "crm_consistency": 0.5}\n{"step": 2, "acc')
    results = stage6.main(stage6.Config(run="tiny", runs_dir=str(run_copy.parent), n=2, samples=2,
                                        max_new_tokens=8, device="cpu"))
    out = capsys.readouterr().out
    assert "diverged_seed0" not in results and results["sft"]["n"] == 4  # the others are evaluated
    assert "skipping diverged_seed0" in out and "model.language_model.layers.1.mlp.up_proj.weight" in out
    saved = json.loads((run_copy / "eval.json").read_text())
    assert "NaN or inf" in saved["skipped"]["diverged_seed0"]
    assert "Skipped diverged_seed0" in (run_copy / "eval.md").read_text()
    assert "metrics.jsonl, line 2: cut short" in out  # the curves dropped the cut line and were drawn
    assert stage6.training_curves(run_copy)["rollout accuracy"]["diverged_seed0"] == [(1, 0.5)]
