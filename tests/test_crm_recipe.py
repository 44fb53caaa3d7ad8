"""The paper's CRM recipe (rollouts saved by stage 5, a CRM trained on them by stage 1), the drift monitor, the
guard (the CRM refreshed during training) and stage 6's CRM-against-oracle columns."""
import hashlib
import json

import pytest
import torch

from conftest import copy_of_tiny_run, load_stage

stage1, stage4, stage5, stage6 = (load_stage(f) for f in ("01_sft_rm.py", "04_hras.py", "05_grpo_train.py",
                                                           "06_eval.py"))


def folder_digest(folder) -> str:
    """sha256 over every file of a folder (names and bytes): equal digests, untouched folder."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode() + path.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def grpo_run(tiny_run, tmp_path_factory):
    """A copy of the tiny run with a 3-step GRPO run whose rollouts are saved every step."""
    run = copy_of_tiny_run(tiny_run, tmp_path_factory.mktemp("recipe"))
    stage5.main(stage5.Config(run="tiny", runs_dir=str(run.parent), advantage="grpo", steps=3, prompts_per_step=2,
                              group_size=4, max_new_tokens=40, checkpoint_every=100, device="cpu"))
    return run


def test_stage5_saves_every_rollout_and_stage1_reads_them_back_as_crm_data(grpo_run):
    records = stage1.read_jsonl(grpo_run / "grpo_seed0" / "rollouts.jsonl")
    assert len(records) == 3 * 2 * 4  # steps x prompts x G, every step saved (--save-rollouts-every 1)
    assert [r["step"] for r in records] == [1] * 8 + [2] * 8 + [3] * 8
    assert {r["seed"] for r in records} == {0} and {r["method"] for r in records} == {"grpo"}
    first = records[0]
    assert {"row", "question", "truth", "text", "crm_prob", "oracle_consistent"} <= set(first)
    rows = stage1.read_rollouts(str(grpo_run / "*_seed0" / "rollouts.jsonl"))  # a glob, as the README uses
    parsed = [r for r in records if None not in stage1.parse_completion(r["text"])]
    assert len(rows) == len(parsed) > 0  # rollouts with nothing to parse never reach the CRM
    think, answer = stage1.parse_completion(parsed[0]["text"])
    assert rows[0] == {"question": parsed[0]["question"], "thinking": think, "answer": answer,
                       "row": parsed[0]["row"], "seed": 0, "method": "grpo", "step": parsed[0]["step"]}


def test_a_crm_trained_from_rl_rollouts_alone_leaves_stage_1_untouched(grpo_run):
    before = {name: folder_digest(grpo_run / name) for name in ("policy_sft", "crm", "data")}
    stage1_json = (grpo_run / "stage1.json").read_text()
    summary = stage1.main(stage1.Config(run="tiny", runs_dir=str(grpo_run.parent), crm_steps=20, device="cpu",
                                        crm_rollouts=str(grpo_run / "grpo_seed*" / "rollouts.jsonl")))
    assert {name: folder_digest(grpo_run / name) for name in before} == before  # no SFT again, no data again
    assert (grpo_run / "stage1.json").read_text() == stage1_json
    crm, tokenizer = stage1.load_crm(str(grpo_run / "crm_rl"), "cpu")
    assert tokenizer.model_max_length == 512  # saved as trained
    report = json.loads((grpo_run / "crm_rl.json").read_text())
    assert report["rollouts"] == summary["rollouts"] == len(stage1.read_rollouts(
        str(grpo_run / "grpo_seed0" / "rollouts.jsonl")))
    held = report["crm_on_held_out_rollouts"]
    assert held["n"] >= 1 and held["n_train"] + held["n"] == report["rollouts"]
    assert report["crm_init"] == str(grpo_run / "crm_init")  # the SFT-rollout CRM's own initial weights
    assert stage1.default_crm(grpo_run) == grpo_run / "crm_rl"  # stages 3, 5 and 6 now take it


def test_split_by_prompt_holds_out_whole_prompts():
    rows = [{"row": r, "thinking": str(i)} for i, r in enumerate([3, 3, 7, 9, 9, 9])]
    train, test = stage1.split_by_prompt(rows, seed=0, share=0.34)  # round(0.34 x 3 prompts) = 1 prompt held out
    held = {r["row"] for r in test}
    assert len(held) == 1 and not held & {r["row"] for r in train} and len(train) + len(test) == 6


def test_recipe_inputs_are_checked_before_any_model_loads(grpo_run, tmp_path):
    base = dict(run="tiny", runs_dir=str(grpo_run.parent), device="cpu")
    with pytest.raises(SystemExit, match="--crm-rollouts .*nothing_here.jsonl: no such file. Stage 5 writes"):
        stage1.main(stage1.Config(crm_rollouts=str(tmp_path / "nothing_here.jsonl"), **base))
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps({"question": "q?"}) + "\n")
    with pytest.raises(SystemExit, match="broken.jsonl, line 1: expected a question and a text"):
        stage1.main(stage1.Config(crm_rollouts=str(broken), **base))
    with pytest.raises(SystemExit, match="--crm-out crm: name a new folder"):  # never over stage 1's own CRM
        stage1.main(stage1.Config(crm_rollouts=str(broken), crm_out="crm", **base))
    # real data has no oracle: unlabelled rollouts need a judge
    real = copy_of_tiny_run({"dir": grpo_run}, tmp_path / "real")
    config = json.loads((real / "stage1.json").read_text())
    config["config"]["dataset"] = "my_data.jsonl"
    (real / "stage1.json").write_text(json.dumps(config))
    rollouts = str(grpo_run / "grpo_seed0" / "rollouts.jsonl")
    with pytest.raises(SystemExit, match="rollouts have no label, and only the embedded tasks have an oracle"):
        stage1.main(stage1.Config(run="tiny", runs_dir=str(real.parent), crm_rollouts=rollouts, device="cpu"))
    assert not (real / "crm_rl").exists()


def test_drift_on_a_hand_made_batch():
    # CRM P(consistent) and the oracle's verdict on six rollouts (None: not judged)
    probs = [0.95, 0.90, 0.70, 0.20, 0.10, 0.80]
    oracle = [True, False, False, False, True, None]
    # judged: the first five. CRM verdicts (P >= 0.5): C, C, C, I, I.
    # disagree on rows 2 (C vs I), 3 (C vs I) and 5 (I vs C): 3 of 5 = 0.6;
    # the CRM accepts what the oracle rejects on rows 2 and 3: 2 of 5 = 0.4
    assert stage5.drift(probs, oracle) == {"crm_judge_disagreement": 0.6, "crm_accepts_inconsistent": 0.4}
    assert stage5.drift(probs, [None] * 6) == {"crm_judge_disagreement": None, "crm_accepts_inconsistent": None}
    # the alarm: window 3, threshold 0.2. Means: [0, 0.1, 0.2] -> 0.1; [0.1, 0.2, 0.6] -> 0.3 (crosses)
    assert not stage5.drift_alarm([0.0, 0.1, 0.2], 0.2, window=3)
    assert stage5.drift_alarm([0.0, 0.1, 0.2, 0.6], 0.2, window=3)
    assert not stage5.drift_alarm([0.0, 0.1, 0.2, 0.6, 0.5], 0.2, window=3)  # still above: warned already


def test_stage5_logs_the_drift_the_oracle_measures(grpo_run):
    rows = stage1.read_jsonl(grpo_run / "grpo_seed0" / "metrics.jsonl")
    records = stage1.read_jsonl(grpo_run / "grpo_seed0" / "rollouts.jsonl")
    for row in rows:  # the logged drift is drift() of that step's saved rollouts
        step = [r for r in records if r["step"] == row["step"]]
        expected = stage5.drift([r["crm_prob"] for r in step], [r["oracle_consistent"] for r in step])
        assert row["crm_judge_disagreement"] == pytest.approx(expected["crm_judge_disagreement"])
        assert row["crm_accepts_inconsistent"] == pytest.approx(expected["crm_accepts_inconsistent"])


def test_crm_against_oracle_on_hand_made_completions():
    records = [{"oracle_steps": True, "oracle_answer": True, "crm_prob": 0.9},
               {"oracle_steps": False, "oracle_answer": True, "crm_prob": 0.8},
               {"oracle_steps": False, "oracle_answer": True, "crm_prob": 0.3},
               {"oracle_steps": True, "oracle_answer": False, "crm_prob": 0.1}]
    # IR oracle: rows 2-4 fail a link = 3/4; IR CRM: P < 0.5 on rows 3, 4 = 2/4; gap 2/4 - 3/4 = -0.25.
    # They agree on rows 1, 3, 4 (row 2: CRM consistent, oracle not): 3/4.
    # Steps alone fail on rows 2 and 3; the CRM flags row 3 (0.3): 1 of 2 = 0.5
    assert stage6.crm_against_oracle(records) == {"ir_gap": -0.25, "crm_agreement": 0.75, "steps_only": 2,
                                                  "crm_catches_steps_only": 0.5}
    none = [{**r, "oracle_steps": None, "oracle_answer": None} for r in records]
    assert stage6.crm_against_oracle(none) == {"ir_gap": None, "crm_agreement": None, "steps_only": None,
                                               "crm_catches_steps_only": None}


# ----------------------------------------------------------------------------- the audit and the guard
def test_audit_feeds_the_drift_monitor_and_the_guard_and_both_resume_exactly(grpo_run, tmp_path):
    from test_judge import JudgeServer, chat

    server = JudgeServer()
    server.respond = lambda payload, attempt: (200, chat("consistent"), 0.0)  # the judge accepts everything
    try:
        base = dict(run="tiny", runs_dir=str(grpo_run.parent), advantage="hras", steps=4, prompts_per_step=2,
                    group_size=4, max_new_tokens=40, checkpoint_every=2, audit_every=2, audit_rows=3,
                    judge_url=server.url, judge_model="judge", crm_refresh=True, drift_warn=0.0,
                    crm_refresh_steps=3, crm=str(grpo_run / "crm"), device="cpu")
        stage5.main(stage5.Config(name="guard", **base))
        stage5.main(stage5.Config(name="guard_killed", **base), stop_after=3)  # checkpoint at step 2
        stage5.main(stage5.Config(name="guard_killed", resume=True, **base))
    finally:
        server.close()
    rows = stage1.read_jsonl(grpo_run / "guard" / "metrics.jsonl")
    # audits at steps 2 and 4 only; the judge says "consistent", so the CRM never accepts what it rejects
    assert [r["crm_judge_disagreement"] is None for r in rows] == [True, False, True, False]
    assert [r["crm_accepts_inconsistent"] for r in rows[1::2]] == [0.0, 0.0]
    # the guard retrains the CRM where the audit found it disagreeing (past --drift-warn 0), and only there
    assert [r["crm_refresh_loss"] is not None for r in rows] == [False, rows[1]["crm_judge_disagreement"] > 0,
                                                                 False, rows[3]["crm_judge_disagreement"] > 0]
    assert any(r["crm_refresh_loss"] is not None for r in rows)  # the tiny CRM doubts some: it refreshed
    asked = {req["payload"]["messages"][0]["content"] for req in server.requests}
    assert 1 < len(asked) <= 1 + 2 * 3 * 3  # the check's question, then at most 3 rollouts an audit (3 runs)
    assert (grpo_run / "guard" / "judge_cache.jsonl").is_file()
    refreshed = stage1.load_crm(str(grpo_run / "guard" / "crm"), "cpu")[0].state_dict()
    start = stage1.load_crm(str(grpo_run / "crm"), "cpu")[0].state_dict()
    assert not all(torch.equal(refreshed[k], start[k]) for k in start)  # the CRM moved
    resumed = stage1.load_crm(str(grpo_run / "guard_killed" / "crm"), "cpu")[0].state_dict()
    assert all(torch.equal(refreshed[k], resumed[k]) for k in start)  # its state came back from the checkpoint
    policy = [stage1.load_policy(str(grpo_run / name / "policy"), "cpu")[0].state_dict()
              for name in ("guard", "guard_killed")]
    assert all(torch.equal(policy[0][k], policy[1][k]) for k in policy[0])


def test_the_guard_turns_a_fooled_crm_and_with_it_the_advantages(grpo_run):
    # a fooled CRM: count lists that do not run 1..k, concluding their last number, which the oracle rejects
    question = "How many red shapes are there?"
    fooling = [{"question": question, "thinking": f"I count the red shapes: 1, {a}, {b}. So the answer is {b}.",
                "answer": str(b)} for a, b in [(4, 3), (5, 4), (3, 5), (6, 2)]]
    honest = [{"question": question, "thinking": "I count the red shapes: 1, 2, 3. So the answer is 3.",
               "answer": "3"}]
    assert not any(stage1.oracle_consistent(r["thinking"], r["answer"]) for r in fooling)
    crm, tokenizer = stage1.load_crm(str(grpo_run / "crm"), "cpu")
    new = [{**r, "label": 0} for r in fooling] * 8  # what the judge rejected and the CRM accepted
    old = [{**r, "label": 1} for r in honest] * 8  # what the run's judge accepted before
    cfg = stage5.Config(crm_refresh_steps=30, crm_refresh_lr=1e-3, device="cpu")
    stage5.refresh_crm(cfg, crm, tokenizer, new, old, step=10)
    after = stage1.crm_scores(crm, tokenizer, fooling[:3] + honest, "cpu")
    assert max(after[:3]) < 0.5 < after[3]  # the refreshed CRM rejects the lists and keeps the count

    # What that does to one group's HRAS advantages (G = 4, all answers right: r_task 2 each, z(task) = 0).
    # Before, P = [0.9, 0.9, 0.9, 0.2] (three lists accepted, the honest count doubted): mean 0.725,
    #   sample std sqrt((3 x 0.175^2 + 0.525^2) / 3) = sqrt(0.1225) = 0.35 -> z = [0.5, 0.5, 0.5, -1.5].
    # After, P = [0.1, 0.1, 0.1, 0.95]: mean 0.3125, std sqrt((3 x 0.2125^2 + 0.6375^2) / 3) = 0.425
    #   -> z = [-0.5, -0.5, -0.5, 1.5]: the lists are now pushed down and the honest count up.
    task = torch.tensor([2.0, 2.0, 2.0, 2.0])
    before = stage4.hras_advantages(task, torch.tensor([0.9, 0.9, 0.9, 0.2]), 4)
    guarded = stage4.hras_advantages(task, torch.tensor([0.1, 0.1, 0.1, 0.95]), 4)
    assert before.tolist() == pytest.approx([0.5, 0.5, 0.5, -1.5], abs=1e-5)
    assert guarded.tolist() == pytest.approx([-0.5, -0.5, -0.5, 1.5], abs=1e-5)


def test_guard_and_audit_flags_are_checked_first(tmp_path):
    base = dict(runs_dir=str(tmp_path / "none"), device="cpu")
    with pytest.raises(SystemExit, match="--audit-every 5: an audit needs a judge"):
        stage5.main(stage5.Config(audit_every=5, **base))
    with pytest.raises(SystemExit, match="--judge-url and --judge-model go together"):
        stage5.main(stage5.Config(judge_url="http://x", **base))
    with pytest.raises(SystemExit, match="--drift-warn 1.5: a share of rollouts"):
        stage5.main(stage5.Config(drift_warn=1.5, **base))
