"""Stage 1's CRM data under the chain oracle (steps -> conclusion -> answer), the held-out step-conclusion
pairs, the reports that split inconsistency by link, and a CRM build that leaves the shared BPE alone."""
import torch
from PIL import Image

from conftest import load_stage

stage1 = load_stage("01_sft_rm.py")

COUNT_ROW = {  # 3 red shapes, misread as 5
    "question": "How many red shapes are there?", "family": "count", "answer": "3", "wrong_answer": "5",
    "solution": "<think>I count the red shapes: 1, 2, 3. So the answer is 3.</think><answer>3</answer>",
    "wrong_thinking": "I count the red shapes: 1, 2, 3, 4, 5. So the answer is 5."}
BARS_ROW = {  # heights A 4, B 1, C 6, misread as A 6, B 1, C 4 (the tallest swapped with A)
    "question": "Which bar is the tallest: A, B or C?", "family": "bars", "answer": "C", "wrong_answer": "A",
    "solution": "<think>Heights: A 4, B 1, C 6. So the answer is C.</think><answer>C</answer>",
    "wrong_thinking": "Heights: A 6, B 1, C 4. So the answer is A."}


def test_crm_pairs_label_the_steps_link():
    """Eight pairs a task. The blind spot of an oracle that reads the conclusion only (steps and conclusion disagree, the answer copies the
    conclusion) is labelled 0 in both families; the consistent-but-wrong chains are labelled 1."""
    pairs = stage1.embedded_crm_pairs([COUNT_ROW, BARS_ROW], seed=0)
    labels = {(p["thinking"], p["answer"]): p["label"] for p in pairs}
    assert len(pairs) == 16 and sum(labels.values()) == 6  # 3 positives of 8 per task
    # count: the steps list 3 shapes, the conclusion says 5, the answer 5 -> 0
    assert labels[("I count the red shapes: 1, 2, 3. So the answer is 5.", "5")] == 0
    # count: the steps list 5 (a misreading), the conclusion says 3 (the truth), the answer 3 -> 0
    assert labels[("I count the red shapes: 1, 2, 3, 4, 5. So the answer is 3.", "3")] == 0
    # bars: A 4 is not the tallest (C 6 is), concluded A, answered A -> 0
    assert labels[("Heights: A 4, B 1, C 6. So the answer is A.", "A")] == 0
    # bars: misread heights A 6, B 1, C 4 make A the tallest, concluded C (the truth), answered C -> 0
    assert labels[("Heights: A 6, B 1, C 4. So the answer is C.", "C")] == 0
    # consistent but wrong: the misreading and its own answer -> 1
    assert labels[(COUNT_ROW["wrong_thinking"], "5")] == 1 and labels[(BARS_ROW["wrong_thinking"], "A")] == 1
    # the second misreading concludes neither the truth nor the first misreading: count not 3 or 5, bars B
    others = [(t, a) for (t, a), label in labels.items() if label == 1 and a not in ("3", "5", "C", "A")]
    count_other = [a for t, a in others if t.startswith("I count")]
    bars_other = [a for t, a in others if t.startswith("Heights")]
    assert len(count_other) == 1 and count_other[0] in {"1", "2", "4", "6"} and bars_other == ["B"]
    assert all(stage1.oracle_parts(t, a) == {"steps": True, "answer": True} for t, a in others)


def test_step_conclusion_pairs_differ_only_in_their_steps():
    """Two pairs a task, the answer equal to the conclusion in both; the negative alternates between right
    steps + wrong conclusion (even rows) and misread steps + true conclusion (odd rows)."""
    pairs = stage1.step_conclusion_pairs([COUNT_ROW, BARS_ROW])
    assert [(p["thinking"], p["answer"], p["label"], p["family"]) for p in pairs] == [
        ("I count the red shapes: 1, 2, 3. So the answer is 3.", "3", 1, "count"),
        ("I count the red shapes: 1, 2, 3. So the answer is 5.", "5", 0, "count"),  # even: wrong conclusion
        ("Heights: A 4, B 1, C 6. So the answer is C.", "C", 1, "bars"),
        # odd row: misread steps, true conclusion
        ("Heights: A 6, B 1, C 4. So the answer is C.", "C", 0, "bars")]
    assert all(stage1.thinking_conclusion(p["thinking"]) == p["answer"] for p in pairs)


def test_step_pairs_report():
    pairs = stage1.step_conclusion_pairs([COUNT_ROW, BARS_ROW])  # labels 1, 0 (count), 1, 0 (bars)
    probs = [0.9, 0.2, 0.8, 0.7]  # count both right; bars: the negative scored consistent
    train = [{k: pairs[0][k] for k in ("question", "thinking", "answer")}]  # one of the four texts seen
    report = stage1.step_pairs_report(probs, pairs, train)
    # accuracy 3/4; tp 2 (rows 0, 2), fp 1 (row 3), fn 0 -> F1 = 2*2 / (2*2 + 1 + 0) = 0.8
    assert report["accuracy"] == 0.75 and abs(report["f1"] - 0.8) < 1e-12 and report["n"] == 4
    assert report["accuracy_count"] == 1.0 and report["accuracy_bars"] == 0.5
    assert report["seen_in_training"] == 0.25


def test_rollouts_report_splits_the_links():
    rows = [("I count the red shapes: 1, 2, 3. So the answer is 3.", "3"),  # both links hold
            ("I count the red shapes: 1, 2, 3. So the answer is 5.", "5"),  # steps only fail
            ("Heights: A 4, B 1, C 6. So the answer is A.", "A"),  # steps only fail
            ("Heights: A 4, B 1, C 6. So the answer is C.", "B"),  # answer only fails
            ("I count the red shapes: 1, 2, 3. So the answer is 5.", "3")]  # both fail
    test = stage1.oracle_labelled([{"question": "q", "thinking": t, "answer": a} for t, a in rows])
    assert [r["label"] for r in test] == [1, 0, 0, 0, 0]
    probs = [0.9, 0.1, 0.8, 0.3, 0.2]  # the CRM flags the first steps-only row, misses the second
    report = stage1.rollouts_report(probs, {"train": [{}] * 7, "test": test})
    assert report["n"] == 5 and report["accuracy"] == 0.8 and report["n_train"] == 7  # 4 of 5 right
    assert report["consistent_share"] == 0.2
    assert (report["steps_link_fails"], report["answer_link_fails"], report["both_links_fail"]) == (3, 2, 1)
    assert report["steps_only"] == 2 and report["crm_catches_steps_only"] == 0.5  # 0.1 < 0.5, 0.8 is not
    none = stage1.rollouts_report([0.9], {"train": [], "test": test[:1]})
    assert none["steps_only"] == 0 and none["crm_catches_steps_only"] is None


class FakeTokenizer:
    pad_token_id, eos_token_id, unk_token_id = 0, 1, 2

    def convert_tokens_to_ids(self, token):
        return 1


class FakeProcessor:
    """Just enough of a processor for greedy_check: a prompt of 2 tokens a row; batch_decode returns the
    scripted replies."""
    tokenizer = FakeTokenizer()

    def __init__(self, replies):
        self.replies = replies

    def apply_chat_template(self, messages, **kwargs):
        return "prompt"

    def __call__(self, text, images, **kwargs):
        return {"input_ids": torch.zeros((len(text), 2), dtype=torch.long)}

    def batch_decode(self, ids, **kwargs):
        return self.replies[: len(ids)]


class FakeModel:
    def generate(self, input_ids, **kwargs):
        return torch.zeros((input_ids.shape[0], input_ids.shape[1] + 1), dtype=torch.long)


def test_greedy_check_reports_each_link():
    replies = [  # right; the steps link fails; the answer link fails; nothing to parse
               "<think>I count the red shapes: 1, 2, 3. So the answer is 3.</think><answer>3</answer>",
               "<think>I count the red shapes: 1, 2, 3. So the answer is 5.</think><answer>5</answer>",
               "<think>Heights: A 4, B 1, C 6. So the answer is C.</think><answer>B</answer>",
               "no tags at all"]
    image = Image.new("RGB", (56, 56), "white")
    test = [{"image": image, "question": "q", "answer": truth} for truth in ("3", "3", "C", "3")]
    cfg = stage1.Config(device="cpu")
    check = stage1.greedy_check(cfg, FakeModel(), FakeProcessor(replies), test, 4, embedded=True)
    # format 3/4; only reply 0 is right (5 != 3, B != C); replies 1, 2, 3 are inconsistent: 3/4;
    # of the 3 parsed replies, the steps link fails in 1 (reply 1) and the answer link in 1 (reply 2)
    assert (check["format_rate"], check["accuracy"], check["oracle_inconsistency_rate"]) == (0.75, 0.25, 0.75)
    assert check["oracle_steps_fail_rate"] == check["oracle_answer_fail_rate"] == 1 / 3
    real = stage1.greedy_check(cfg, FakeModel(), FakeProcessor(replies), test, 4, embedded=False)
    assert real["oracle_inconsistency_rate"] is None and real["oracle_steps_fail_rate"] is None
    unparsed = stage1.greedy_check(cfg, FakeModel(), FakeProcessor(["none"] * 4), test, 4, embedded=True)
    assert unparsed["oracle_inconsistency_rate"] == 1.0 and unparsed["oracle_answer_fail_rate"] is None


def test_build_tiny_crm_leaves_the_shared_bpe_alone(tmp_path):
    """The policy's tokenizer and the CRM's are both made from one BPE: building the CRM must not add its
    [CLS]/[SEP]/[PAD]/[MASK] tokens and pair template to that object (it did: 388 -> 392 tokens)."""
    from transformers import AutoTokenizer

    bpe = stage1.train_bpe(0)
    before, size = bpe.to_str(), bpe.get_vocab_size()
    stage1.build_tiny_crm(tmp_path / "crm", 0, bpe)
    assert bpe.to_str() == before and bpe.get_vocab_size() == size and bpe.token_to_id("[CLS]") is None
    crm_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "crm")
    assert len(crm_tokenizer) == size + 4  # the copy got the four special tokens
    ids = crm_tokenizer("premise", "The final answer is 3.")["input_ids"]
    assert ids[0] == crm_tokenizer.cls_token_id and ids.count(crm_tokenizer.sep_token_id) == 2
