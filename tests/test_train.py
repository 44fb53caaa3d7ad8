"""Stage 5 (the loss, resume, a learnable case) and stage 6 (metrics, table, curves)."""
import json
import math
import shutil

import pytest
import torch
from PIL import Image

from conftest import load_stage

stage1, stage5, stage6 = load_stage("01_sft_rm.py"), load_stage("05_grpo_train.py"), load_stage("06_eval.py")


def test_policy_loss_on_a_two_sequence_toy_batch():
    # sequence 1: A = +1, two tokens with ratios 1.5 and 0.9; sequence 2: A = -1, three tokens, ratios 0.5, 1, 2
    ratios = torch.tensor([[1.5, 0.9, 1.0], [0.5, 1.0, 2.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    old = torch.full((2, 3), -1.0)
    new = old + ratios.log()
    ref = old.clone()  # reference = old policy here, so ref - new = -log r and k3 = 1/r + log r - 1
    loss, stats = stage5.policy_loss(new, old, torch.tensor([1.0, -1.0]), mask, 0.2, 0.2, kl_beta=0.1, ref_logprobs=ref)
    # surrogate min(r A, clip(r, 0.8, 1.2) A):
    #   seq 1 (A=+1): r 1.5 -> min(1.5, 1.2) = 1.2 (clipped);  r 0.9 -> 0.9
    #   seq 2 (A=-1): r 0.5 -> min(-0.5, -0.8) = -0.8 (clipped);  r 1 -> -1;  r 2 -> min(-2, -1.2) = -2 (not clipped)
    # k3: r 1.5 -> 0.66667 + 0.40547 - 1 = 0.07213;  r 0.9 -> 1.11111 - 0.10536 - 1 = 0.00575
    #     r 0.5 -> 2 - 0.69315 - 1 = 0.30685;  r 1 -> 0;  r 2 -> 0.5 + 0.69315 - 1 = 0.19315
    # per token -surrogate + 0.1 k3: -1.19279, -0.89943, 0.83069, 1.0, 2.01931 -> sum 1.75778, / 5 tokens
    assert loss.item() == pytest.approx(1.75778 / 5, abs=1e-5)
    assert stats["clipped"] == 2  # tokens 1 and 3
    assert stats["kl"] == pytest.approx(0.07213 + 0.00575 + 0.30685 + 0.19315, abs=1e-4)
    # on-policy (ratio 1, no KL) the loss is -mean_t A_i: here (-1 - 1 + 1 + 1 + 1) / 5 = 0.2
    on_policy, _ = stage5.policy_loss(old, old, torch.tensor([1.0, -1.0]), mask, 0.2, 0.2)
    assert on_policy.item() == pytest.approx(0.2)
    # micro-batches add up to the token mean of the whole batch when n_tokens is the batch's count
    halves = [stage5.policy_loss(new[i:i + 1], old[i:i + 1], torch.tensor([1.0, -1.0])[i:i + 1], mask[i:i + 1], 0.2, 0.2,
                                 0.1, ref[i:i + 1], n_tokens=5)[0] for i in range(2)]
    assert (halves[0] + halves[1]).item() == pytest.approx(loss.item(), abs=1e-6)


def test_prompt_rows_regathers_pixel_patches(tiny_policy):
    _, processor = tiny_policy
    images = [Image.new("RGB", (56, 56), "red"), Image.effect_noise((84, 112), 50).convert("RGB")]
    prompt = stage1.encode_prompts(processor, images, ["a?", "b?"])
    picked = stage5.prompt_rows(prompt, [1, 1, 0])
    direct = stage1.encode_prompts(processor, [images[1], images[1], images[0]], ["b?", "b?", "a?"])
    assert torch.equal(picked["pixel_values"], direct["pixel_values"])
    assert torch.equal(picked["image_grid_thw"], direct["image_grid_thw"])


def small_train_config(tiny_run, **overrides):
    base = dict(run="tiny", runs_dir=str(tiny_run["dir"].parent), steps=4, prompts_per_step=2, group_size=3,
                max_new_tokens=40, checkpoint_every=2, save_rollouts_every=2, lr=1e-3, kl_beta=0.05, device="cpu")
    return stage5.Config(**{**base, **overrides})


def test_resume_gives_the_same_parameters_as_an_uninterrupted_run(tiny_run):
    stage5.main(small_train_config(tiny_run, name="straight"))
    stage5.main(small_train_config(tiny_run, name="killed"), stop_after=3)  # "killed" after step 3; checkpoint at 2
    assert json.loads((tiny_run["dir"] / "killed" / "checkpoint" / "config.json").read_text())
    stage5.main(small_train_config(tiny_run, name="killed", resume=True))
    a = stage1.load_policy(str(tiny_run["dir"] / "straight" / "policy"), "cpu")[0].state_dict()
    b = stage1.load_policy(str(tiny_run["dir"] / "killed" / "policy"), "cpu")[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    init = stage1.load_policy(str(tiny_run["dir"] / "policy_sft"), "cpu")[0].state_dict()
    assert not all(torch.equal(a[k], init[k]) for k in a)  # training did move the weights
    rows = stage1.read_jsonl(tiny_run["dir"] / "killed" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # the step logged after the checkpoint was rewritten once
    straight = stage1.read_jsonl(tiny_run["dir"] / "straight" / "metrics.jsonl")
    assert [r["reward_task"] for r in rows] == [r["reward_task"] for r in straight]
    expected = {"reward_format", "reward_accuracy", "reward_consistency", "accuracy", "format_rate", "crm_consistency",
                "oracle_inconsistency_rate", "oracle_steps_failing", "oracle_answer_failing", "kl", "clipped", "entropy", "completion_length", "truncation_rate",
                "constant_task_groups", "zero_advantage_groups", "loss", "beta_t", "lr"}
    assert expected <= set(rows[0])


def test_lambda_zero_still_logs_the_crm_probability(tiny_run):
    """--lambda-cons 0 zeroes the reward r_cons, not what the CRM says: crm_consistency is P(consistent) itself
    (not r_cons / lambda, which reads 0 at lambda 0)."""
    stage5.main(small_train_config(tiny_run, name="lambda0", steps=1, kl_beta=0.0, lambda_cons=0.0, advantage="sum"))
    row = stage1.read_jsonl(tiny_run["dir"] / "lambda0" / "metrics.jsonl")[0]
    assert row["reward_consistency"] == 0.0  # the reward: lambda * p = 0
    assert row["crm_consistency"] > 0.0  # the SFT policy's rollouts: the CRM calls many of them consistent


def test_grpo_improves_the_reward_on_a_trivially_learnable_case(tiny_run, tmp_path):
    """Every bars question's answer is "A": GRPO only has to learn to say A, whatever the image."""
    from datasets import load_from_disk

    run = tmp_path / "runs" / "always_a"
    run.mkdir(parents=True)
    for folder in ("policy_sft", "crm"):
        shutil.copytree(tiny_run["dir"] / folder, run / folder)
    shutil.copy(tiny_run["dir"] / "stage1.json", run / "stage1.json")
    data = load_from_disk(str(tiny_run["dir"] / "data")).filter(lambda row: row["family"] == "bars")
    data.map(lambda row: {"answer": "A"}).save_to_disk(str(run / "data"))
    cfg = stage5.Config(run="always_a", runs_dir=str(run.parent), advantage="grpo", steps=24, prompts_per_step=4,
                        group_size=6, max_new_tokens=40, lr=1e-3, checkpoint_every=100, save_rollouts_every=100, device="cpu")
    stage5.main(cfg)
    rows = stage1.read_jsonl(run / "grpo_seed0" / "metrics.jsonl")
    first, last = [r["reward_accuracy"] for r in rows[:6]], [r["reward_accuracy"] for r in rows[-6:]]
    assert sum(last) / 6 > sum(first) / 6 + 0.2


def test_eval_metrics_on_hand_made_completions():
    records = [  # (accuracy, oracle consistent, crm prob)
        {"accuracy": 1.0, "format": 1.0, "oracle_consistent": True, "crm_prob": 0.9, "length": 10},
        {"accuracy": 1.0, "format": 1.0, "oracle_consistent": False, "crm_prob": 0.2, "length": 20},
        {"accuracy": 0.0, "format": 0.0, "oracle_consistent": True, "crm_prob": 0.6, "length": 30},
        {"accuracy": 0.0, "format": 1.0, "oracle_consistent": True, "crm_prob": 0.4, "length": 40},
    ]
    m = stage6.eval_metrics(records)
    # correct: 2 of 4; formatted 3 of 4; oracle-inconsistent 1 of 4; CRM < 0.5: 0.2 and 0.4 -> 2 of 4
    # CC = correct & consistent (row 1) = 1/4; IC = correct & inconsistent (row 2) = 1/4;
    # CW = wrong & consistent (rows 3, 4) = 2/4; IW = 0; mean length (10 + 20 + 30 + 40) / 4 = 25
    assert m == {"accuracy": 0.5, "format_rate": 0.75, "ir_crm": 0.5, "ir_oracle": 0.25, "CC": 0.25, "CW": 0.5,
                 "IC": 0.25, "IW": 0.0, "length": 25.0, "n": 4}
    real = stage6.eval_metrics([{**r, "oracle_consistent": None} for r in records])
    # without an oracle the table uses the CRM: consistent = prob >= 0.5 -> rows 1 and 3
    assert real["ir_oracle"] is None and (real["CC"], real["IC"], real["CW"], real["IW"]) == (0.25, 0.25, 0.25, 0.25)


def test_mean_se_and_table():
    # values 0.2, 0.4, 0.6: mean 0.4, sample std 0.2, se 0.2 / sqrt(3) = 0.11547
    m, se = stage6.mean_se([0.2, 0.4, 0.6])
    assert m == pytest.approx(0.4) and se == pytest.approx(0.2 / math.sqrt(3))
    row = {"accuracy": 0.5, "ir_oracle": 0.1, "ir_crm": 0.2, "format_rate": 1.0, "CC": 0.4, "CW": 0.5, "IC": 0.1,
           "IW": 0.0, "length": 25.0}
    table = stage6.markdown_table({"sft": [row], "hras": [row, {**row, "accuracy": 0.7}]})
    assert "| hras | 2 | 60.0 ± 10.0 |" in table and "| sft | 1 | 50.0 |" in table


def test_eval_cli_and_curves(tiny_run):
    stage5.main(small_train_config(tiny_run, name="hras_seed0", steps=2, kl_beta=0.0))
    results = stage6.main(stage6.Config(run="tiny", runs_dir=str(tiny_run["dir"].parent), n=4, samples=2,
                                        max_new_tokens=16, device="cpu"))
    assert {"sft", "hras_seed0"} <= set(results) and results["sft"]["n"] == 8
    assert (tiny_run["dir"] / "eval.md").read_text().count("|") > 10
    assert Image.open(tiny_run["dir"] / "curves.png").size[0] > 400
