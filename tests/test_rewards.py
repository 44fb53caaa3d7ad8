"""Stage 3: adversarial completions never crash and score as specified; batched CRM = one at a time."""
import pytest

from conftest import load_stage

stage3 = load_stage("03_rewards.py")

LONG = "<think>" + "1, " * 33_000 + "So the answer is 3.</think><answer>3</answer>"  # ~100,000 characters
# (text, format reward, accuracy reward against truth "3", has something for the CRM)
CASES = [
    ("<think>1, 2, 3. So the answer is 3.</think><answer>3</answer>", 1.0, 1.0, True),
    ("<think>\nmulti\nline\n</think>\n<answer>\n3\n</answer>\n", 1.0, 1.0, True),  # newlines (DOTALL)
    ("<think>1, 2. So the answer is 2.</think><answer>3.0</answer>", 1.0, 1.0, True),  # numbers with tolerance
    ("<think>x</think><answer>4</answer>", 1.0, 0.0, True),  # well formed, wrong
    ("<answer>3</answer>", 0.0, 1.0, False),  # no thinking: right answer, no format, no CRM call
    ("<think>x</think>", 0.0, 0.0, False),  # no answer
    ("<think>x</think><answer></answer>", 0.0, 0.0, False),  # empty answer
    ("<think>x</think><answer>  </answer>", 0.0, 0.0, False),  # blank answer
    ("<think>x</think><answer>3", 0.0, 0.0, False),  # unclosed answer
    ("<think>x<answer>3</answer>", 0.0, 1.0, False),  # unclosed think
    ("<think><think>x</think></think><answer>3</answer>", 0.0, 1.0, True),  # nested think
    ("<think>x</think><answer>2</answer><answer>3</answer>", 0.0, 1.0, True),  # repeated: the last answer counts
    ("<think>x</think><answer>3</answer> trailing words", 0.0, 1.0, True),  # text after the answer
    ("<think>数えます ✓ 🙂</think><answer>３</answer>", 1.0, 1.0, True),  # unicode: float() reads a full-width 3
    ("", 0.0, 0.0, False),
    ("\x00\xff garbage </answer><answer>", 0.0, 0.0, False),
    (LONG, 1.0, 1.0, True),
    ("<think>x</think><answer>" + "🙂" * 130 + "</answer>", 1.0, 0.0, True),  # ~520 CRM tokens: cut, no raise
    ("<think>x</think><answer>" + "数" * 170 + "</answer>", 1.0, 0.0, True),  # (a fast tokenizer's own truncation raised "Truncation error" here)
]


@pytest.mark.parametrize("text, fmt, acc, parseable", CASES)
def test_task_rewards_of_adversarial_completions(text, fmt, acc, parseable):
    assert stage3.format_reward(text) == fmt
    assert stage3.accuracy_reward(text, "3") == acc
    assert stage3.format_reward(text, weight=0.5) == fmt * 0.5


def test_consistency_reward_skips_unparseable_and_never_crashes(tiny_run, monkeypatch):
    stage1 = load_stage("01_sft_rm.py")
    crm, tok = stage1.load_crm(str(tiny_run["dir"] / "crm"), "cpu")
    seen = []
    real_scores = stage1.crm_scores

    def spy(model, tokenizer, pairs, device, batch_size=64):
        seen.extend(pairs)
        return real_scores(model, tokenizer, pairs, device, batch_size)

    monkeypatch.setattr(stage1, "crm_scores", spy)
    texts = [c[0] for c in CASES]
    rewards = stage3.consistency_rewards(crm, tok, ["How many?"] * len(texts), texts, 2.0, "cpu", batch_size=4)
    assert len(seen) == sum(c[3] for c in CASES)  # only parseable completions reach the model
    for (text, _, _, parseable), r in zip(CASES, rewards):
        assert (0.0 < r <= 2.0) if parseable else r == 0.0  # lambda_cons = 2 scales P into [0, 2]


def test_batched_crm_scores_equal_one_at_a_time(tiny_run):
    stage1 = load_stage("01_sft_rm.py")
    crm, tok = stage1.load_crm(str(tiny_run["dir"] / "crm"), "cpu")
    pairs = [{"question": "How many red shapes are there?", "thinking": "I count the red shapes: 1, 2. So the answer is 2.",
              "answer": "2"},
             {"question": "Which bar is the tallest: A, B or C?", "thinking": "Heights: A 1, B 5, C 3. So the answer is B.",
              "answer": "C"},
             {"question": "q", "thinking": "short", "answer": "7"}]
    batched = stage1.crm_scores(crm, tok, pairs, "cpu", batch_size=3)
    alone = [stage1.crm_scores(crm, tok, [p], "cpu")[0] for p in pairs]
    assert batched == pytest.approx(alone, abs=1e-5)


def test_score_completions_records_every_component(tiny_run):
    stage1 = load_stage("01_sft_rm.py")
    crm, tok = stage1.load_crm(str(tiny_run["dir"] / "crm"), "cpu")
    texts = ["<think>1, 2. So the answer is 2.</think><answer>3</answer>", "<answer>3</answer>"]
    scores = stage3.score_completions(texts, ["q", "q"], ["3", "3"], crm, tok, stage3.Config(device="cpu"), True)
    assert scores[0]["task"] == 2.0 and scores[0]["oracle_consistent"] is False  # right answer, thinking said 2
    # steps "1, 2" list a count of 2 = the conclusion 2 (steps link holds); the answer 3 != 2 (answer link fails)
    assert (scores[0]["oracle_steps"], scores[0]["oracle_answer"]) == (True, False)
    # no <think>: no conclusion, so neither link holds; nothing for the CRM, so P = 0 and r_cons = 0
    assert scores[1] == {"format": 0.0, "accuracy": 1.0, "task": 1.0, "consistency": 0.0, "crm_prob": 0.0,
                         "oracle_steps": False, "oracle_answer": False, "oracle_consistent": False}
    real = stage3.score_completions(texts, ["q", "q"], ["3", "3"], crm, tok, stage3.Config(device="cpu"), False)
    assert real[0]["oracle_consistent"] is None  # no oracle for real data
    assert real[0]["oracle_steps"] is None and real[0]["oracle_answer"] is None


def test_score_completions_splits_the_oracle_and_keeps_the_crm_probability_at_every_lambda(tiny_run):
    stage1 = load_stage("01_sft_rm.py")
    crm, tok = stage1.load_crm(str(tiny_run["dir"] / "crm"), "cpu")
    texts = ["<think>I count the red shapes: 1, 2, 3. So the answer is 5.</think><answer>5</answer>",
             "<think>Heights: A 4, B 1, C 6. So the answer is C.</think><answer>B</answer>",
             "<think>Heights: A 4, B 1, C 6. So the answer is C.</think><answer>C</answer>"]
    questions = ["How many red shapes are there?"] + ["Which bar is the tallest: A, B or C?"] * 2
    at = {lam: stage3.score_completions(texts, questions, ["3", "C", "C"], crm, tok,
                                        stage3.Config(device="cpu", lambda_cons=lam), True) for lam in (0.0, 1.0, 2.0)}
    # 1: steps count 3, conclusion 5 -> steps link fails; answer 5 = conclusion -> answer link holds
    # 2: tallest of A 4, B 1, C 6 is C = conclusion -> steps link holds; answer B != C -> answer link fails
    # 3: both hold
    links = [(s["oracle_steps"], s["oracle_answer"], s["oracle_consistent"]) for s in at[1.0]]
    assert links == [(False, True, False), (True, False, False), (True, True, True)]
    probs = [s["crm_prob"] for s in at[1.0]]
    assert all(0.0 < p < 1.0 for p in probs)  # the CRM was called on each (all three parse)
    for lam, scores in at.items():
        assert [s["crm_prob"] for s in scores] == pytest.approx(probs, abs=1e-6)  # P does not depend on lambda
        # r_cons = lambda * P: at lambda 0 every r_cons is 0 while crm_prob still reads the CRM
        assert [s["consistency"] for s in scores] == pytest.approx([lam * p for p in probs], abs=1e-6)


def test_cli_reads_rollouts_and_writes_rewards(tiny_run):
    stage1, stage2 = load_stage("01_sft_rm.py"), load_stage("02_rollout.py")
    runs = str(tiny_run["dir"].parent)
    stage2.main(stage2.Config(run="tiny", runs_dir=runs, n_prompts=2, group_size=3, max_new_tokens=16, device="cpu"))
    rows = stage3.main(stage3.Config(run="tiny", runs_dir=runs, device="cpu"))
    assert stage1.read_jsonl(tiny_run["dir"] / "rewards.jsonl") == rows
    assert [len(r["rewards"]) for r in rows] == [3, 3]
    hras = load_stage("04_hras.py")
    advantages = hras.main(hras.Config(run="tiny", runs_dir=runs))
    assert [len(r["advantages"]) for r in advantages] == [3, 3]
