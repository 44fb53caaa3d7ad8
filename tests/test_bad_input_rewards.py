"""Bad input on the reward/advantage path: garbage scores in linear time and equals the old
definitions on normal text; long answers never break the CRM; NaN never reaches advantages.jsonl; empty
inputs never replace good outputs; numbers match as numbers."""
import json
import math
import random
import re
import time

import pytest
import torch

from conftest import load_stage

stage1, stage3, hras = load_stage("01_sft_rm.py"), load_stage("03_rewards.py"), load_stage("04_hras.py")

# ----------------------------------------------------------------------------- reference definitions
# The plain regex forms: right on normal text, quadratic on unclosed tags. The code must agree with them,
# except for one bug of the plain format regex: its \S is not guarded against tags, so it can eat the "<" of
# a stray </answer> ("<answer>3</answer></answer>" scored as well formed). FORMAT_SPEC_RE is that regex
# with the \S guarded like every other character: the spec the code is tested against.
TAGS = r"(?!</?think>|</?answer>)"
OLD_STRICT_FORMAT_RE = re.compile(
    rf"^\s*<think>(?:{TAGS}.)*</think>\s*<answer>(?:{TAGS}.)*\S(?:{TAGS}.)*</answer>\s*$", re.DOTALL)
FORMAT_SPEC_RE = re.compile(
    rf"^\s*<think>(?:{TAGS}.)*</think>\s*<answer>(?:{TAGS}.)*{TAGS}\S(?:{TAGS}.)*</answer>\s*$", re.DOTALL)
OLD_THINK_RE = re.compile(r"<think>(.*?)</think>", re.DOTALL)
OLD_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def old_format_reward(text: str) -> float:
    return 1.0 if FORMAT_SPEC_RE.match(text) else 0.0


def old_parse_completion(text: str):
    thinks, answers = OLD_THINK_RE.findall(text), OLD_ANSWER_RE.findall(text)
    think = thinks[-1].strip() if thinks else None
    answer = answers[-1].strip() if answers else None
    return think or None, answer or None


NORMAL = [
    "<think>1, 2, 3. So the answer is 3.</think><answer>3</answer>",
    "<think>\nmulti\nline\n</think>\n<answer>\n3\n</answer>\n",
    "  <think>a</think>  <answer>B</answer>  ",
    "<think></think><answer>3</answer>",  # empty thinking is allowed by the format
    "<think>x</think><answer></answer>", "<think>x</think><answer>  </answer>", "<think>x</think><answer>3",
    "<think>x<answer>3</answer>", "<think><think>x</think></think><answer>3</answer>",
    "<think>x</think><answer>2</answer><answer>3</answer>", "<think>x</think><answer>3</answer> trailing words",
    "<think>数えます ✓ 🙂</think><answer>３</answer>", "", "\x00\xff garbage </answer><answer>",
    "<think>a</think>\u00a0<answer>3</answer>\u2003",  # Unicode spaces count as whitespace (\s)
    "<think>a</think>\u200b<answer>3</answer>",  # a zero-width space is not whitespace
    "<think>a</think><answer>\u200b</answer>",  # ... so this answer is not empty
    "<think>a</think><answer>\x1c</answer>",  # \x1c is whitespace to Python: an empty answer
    "x<think>a</think><answer>3</answer>", "<answer>3</answer><think>a</think>",
    "<think>a</think><think>b</think><answer>3</answer>", "<think>a</answer></think><answer>3</answer>",
    "<think>a</think><answer>3</answer>\n", "<think>a</think><answer>3</answer>\n\n",
    "<think>a</think><answer>3</answer>.", "<THINK>a</THINK><ANSWER>3</ANSWER>",
    "<think >a</think><answer>3</answer>", "<think>a</think><answer>3</answer></think>",
]
FUZZ_PIECES = ["<think>", "</think>", "<answer>", "</answer>", "<think", "answer>", "</", "<", ">", " ", "\n",
               "\t", "\u00a0", "\u2003", "\x1c", "\u200b", "3", "B", "(b)", "1,000", "1/2", "−3", "\\boxed{3}", "$",
               "3.0", "So the answer is 3.", "answer is", "the answer is B", "🙂", "数", "\x00", "nan", "inf", "1e309",
               "1e-10", ".", "(", ")", "{", "}", "\\frac{1}{2}", "-", "0"]


def fuzz_completions(n: int, seed: int = 0, max_pieces: int = 25) -> list[str]:
    """Half random soups of FUZZ_PIECES, half a well-formed completion with 0-2 random edits (near misses)."""
    rng = random.Random(seed)
    filler = [p for p in FUZZ_PIECES if p not in stage1.REASONING_TAGS]

    def body() -> list[str]:
        return [rng.choice(filler) for _ in range(rng.randint(0, max_pieces // 4))]

    texts = []
    for i in range(n):
        if i % 2:
            pieces = [rng.choice(FUZZ_PIECES) for _ in range(rng.randint(0, max_pieces))]
        else:
            pieces = [rng.choice(["", " ", "\n"]), "<think>", *body(), "</think>", rng.choice(["", " ", "\n\t"]),
                      "<answer>", *body(), "</answer>", rng.choice(["", "\n", "x"])]
            for _ in range(rng.randint(0, 2)):  # an edit: drop, insert or repeat a piece
                j, edit = rng.randrange(len(pieces)), rng.choice(["drop", "insert", "repeat"])
                pieces[j: j + 1] = {"drop": [], "insert": [rng.choice(FUZZ_PIECES), pieces[j]],
                                    "repeat": [pieces[j]] * 2}[edit]
        texts.append("".join(pieces))
    return texts


@pytest.mark.parametrize("text", NORMAL)
def test_format_and_parsing_equal_the_old_regexes_on_normal_text(text):
    assert stage3.format_reward(text) == old_format_reward(text)
    assert stage1.parse_completion(text) == old_parse_completion(text)


def test_format_and_parsing_equal_the_old_regexes_on_400_random_tag_soups():
    texts = fuzz_completions(400, seed=1)
    assert sum(old_format_reward(t) for t in texts) > 0  # the soups do contain well-formed completions
    for text in texts:
        assert stage3.format_reward(text) == old_format_reward(text), text
        assert stage1.parse_completion(text) == old_parse_completion(text), text


def test_the_old_format_regex_let_a_stray_tag_through_and_the_new_code_does_not():
    for text in ["<think>a</think><answer>3</answer></answer>", "<think>a</think><answer></answer>3</answer>",
                 "<think>a</think><answer><think>3</answer>"]:
        assert OLD_STRICT_FORMAT_RE.match(text) and not FORMAT_SPEC_RE.match(text)
        assert stage3.format_reward(text) == 0.0  # repeated or nested tags: not well formed
    for text in NORMAL:  # elsewhere the plain regex and the spec agree
        assert bool(OLD_STRICT_FORMAT_RE.match(text)) == bool(FORMAT_SPEC_RE.match(text))


def test_last_block_pairs_each_opening_tag_with_the_next_closing_one():
    assert stage1.last_block("<answer>1</answer><answer>3</answer>", "answer") == "3"
    assert stage1.last_block("<answer>1</answer><answer>3", "answer") == "1"  # the second is unclosed
    assert stage1.last_block("<think><think>x</think></think>", "think") == "<think>x"  # as the regex pairs
    assert stage1.last_block("no tags", "think") is None


# ----------------------------------------------------------------------------- 1. linear time, 64,000 characters
N = 64_000
NASTY = {
    "unclosed answer": "<think>x</think><answer>" + "3 " * (N // 2),  # the plain format regex: minutes
    "unclosed think": "<think>" + "1, " * (N // 3),
    "many opening answers": "<answer>" * (N // 8),  # the plain parse regex: quadratic
    "many opening thinks": "<think>" * (N // 7),
    "open tags alternating": "<think><answer>" * (N // 15),
    "closed then unclosed": "<answer>3</answer>" * (N // 36) + "<answer>" * (N // 16),
    "angle brackets": "<" * N,
    "answer is, then spaces": "<think>So the answer is" + " " * N + "</think><answer>3</answer>",
    "answer is, repeated": "<think>" + "the answer is " * (N // 14) + "</think><answer>3</answer>",
    "answer is, then dots": "<think>So the answer is " + "." * N + "</think><answer>3</answer>",
    "a 64,000-digit answer": "<think>So the answer is 3.</think><answer>" + "9" * N + "</answer>",
    "dollars": "<think>x</think><answer>" + "$" * N + "</answer>",
    "nested boxes": "<think>x</think><answer>" + "\\boxed{" * (N // 8) + "3" + "}" * (N // 8) + "</answer>",
    "fraction soup": "<think>x</think><answer>" + "1/" * (N // 2) + "</answer>",
}


@pytest.mark.parametrize("kind", list(NASTY))
def test_nasty_64000_character_inputs_score_fast(kind):
    text = NASTY[kind]
    assert len(text) >= 60_000
    started = time.perf_counter()
    fmt, acc = stage3.format_reward(text), stage3.accuracy_reward(text, "3")
    think, answer = stage1.parse_completion(text)
    stage1.thinking_conclusion(think), stage1.thinking_conclusion(text)
    stage1.oracle_consistent(think, answer)
    elapsed = time.perf_counter() - started
    assert elapsed < 0.2, f"{kind}: {elapsed:.3f} s"  # the plain format regex took 15 s at 32,000 characters
    assert fmt in (0.0, 1.0) and acc in (0.0, 1.0)
    well_formed = ("a 64,000-digit answer", "dollars", "nested boxes", "fraction soup", "answer is, then spaces",
                   "answer is, repeated", "answer is, then dots")
    assert fmt == (1.0 if kind in well_formed else 0.0)


def test_nasty_results_are_right():
    assert stage3.accuracy_reward(NASTY["unclosed answer"], "3") == 0.0  # no closed answer
    assert stage3.accuracy_reward(NASTY["answer is, then spaces"], "3") == 1.0
    assert stage1.thinking_conclusion(stage1.parse_completion(NASTY["answer is, repeated"])[0]) == "the"
    assert stage3.accuracy_reward(NASTY["nested boxes"], "3") == 0.0  # 4 wrappers come off, not 8,000


# ----------------------------------------------------------------------------- 2. the CRM never raises on length
LONG_THINKING = "I count the shapes: " + "1, 2, 3, " * 7_000 + "So the answer is 7."  # ~63,000 characters


@pytest.fixture(scope="module")
def tiny_crm(tiny_run):
    crm, tok = stage1.load_crm(str(tiny_run["dir"] / "crm"), "cpu")
    return crm.eval(), tok


def long_pairs() -> list[dict]:
    return [{"question": "How many?", "thinking": "So the answer is 3.", "answer": "🙂" * 130},
            {"question": "How many?", "thinking": "So the answer is 3.", "answer": "数" * 170},
            {"question": "How many?", "thinking": "So the answer is 3.", "answer": "3" + "\u200b" * 170},
            {"question": "How many?", "thinking": "So the answer is 3.", "answer": "🙂" * 5_000},
            {"question": "How many red shapes are there?", "thinking": LONG_THINKING, "answer": "7"},
            {"question": "Q" * 3_000, "thinking": LONG_THINKING, "answer": "数" * 500},
            {"question": "How many?", "thinking": "So the answer is 3.", "answer": "3"}]


def test_long_answers_and_thinking_score_without_raising(tiny_crm):
    crm, tok = tiny_crm
    pairs = long_pairs()
    texts = [stage1.format_completion(p["thinking"], p["answer"]) for p in pairs]
    questions = [p["question"] for p in pairs]
    rewards = stage3.consistency_rewards(crm, tok, questions, texts, 2.0, "cpu", batch_size=3)
    assert len(rewards) == len(texts)
    assert all(math.isfinite(r) and 0.0 < r <= 2.0 for r in rewards)  # lambda_cons = 2 scales P into [0, 2]


def test_batched_scores_of_long_pairs_equal_one_at_a_time(tiny_crm):
    crm, tok = tiny_crm
    pairs = long_pairs()
    batched = stage1.crm_scores(crm, tok, pairs, "cpu", batch_size=len(pairs))
    alone = [stage1.crm_scores(crm, tok, [p], "cpu")[0] for p in pairs]
    assert batched == pytest.approx(alone, abs=1e-5)


def test_a_long_premise_keeps_the_question_and_the_end_of_the_thinking(tiny_crm):
    _, tok = tiny_crm
    pair = {"question": "How many red shapes are there?", "thinking": LONG_THINKING, "answer": "数" * 500}
    for max_length in (512, 128):
        ids = stage1.encode_pairs(tok, [pair], "cpu", max_length=max_length)["input_ids"][0]
        assert len(ids) == max_length  # cut to exactly the budget
        sep = (ids == tok.sep_token_id).nonzero().flatten().tolist()
        assert len(sep) == 2 and ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id  # specials all kept
        premise, hypothesis = tok.decode(ids[1:sep[0]]), ids[sep[0] + 1: sep[1]]
        assert premise.startswith("How many red shapes are there?")  # the question stays
        assert premise.endswith("So the answer is 7.")  # ... and the conclusion at the end of the thinking
        assert len(hypothesis) == 64  # the answer is cut by tokens: max_hypothesis_tokens
        assert tok.decode(hypothesis).startswith("The final answer is 数")


def test_pairs_that_fit_encode_exactly_as_the_tokenizer_does(tiny_crm):
    _, tok = tiny_crm
    pairs = [{"question": "How many red shapes?", "thinking": "I count: 1, 2. So the answer is 2.", "answer": "2"},
             {"question": "Which bar is the tallest?", "thinking": "So the answer is B.", "answer": "数🙂"},
             {"question": "q", "thinking": "", "answer": "7"}]
    new = stage1.encode_pairs(tok, pairs, "cpu")
    premises = [f"{p['question']} {p['thinking']}" for p in pairs]  # the plain tokenizer call, without the cut
    hypotheses = [stage1.crm_hypothesis(p["answer"]) for p in pairs]
    old = tok(premises, hypotheses, padding=True, truncation="only_first", max_length=512, return_tensors="pt")
    assert new.keys() == dict(old).keys()
    assert all(torch.equal(new[k], old[k]) for k in new)


def test_kept_positions_by_hand():
    # 3 specials, 6 premise tokens (the question is 2), 2 hypothesis tokens; max_length 8, hypothesis cut to 1
    # room for the premise: 8 - 3 - 1 = 4 -> its first 2 (positions 1, 2) and its last 2 (positions 5, 6)
    seq = [None, 0, 0, 0, 0, 0, 0, None, 1, 1, None]
    assert stage1.kept_positions(seq, 2, 8, 1) == [0, 1, 2, 5, 6, 7, 8, 10]
    # a question longer than half the room keeps room // 2 = 2 of its tokens; 11 positions fit in 11: all kept
    assert stage1.kept_positions(seq, 5, 8, 1) == [0, 1, 2, 5, 6, 7, 8, 10]
    assert stage1.kept_positions(seq, 2, 11, 2) == list(range(11))


def uncut_encoding(tok, pair: dict, max_length: int) -> list[int]:
    """What encode_pairs keeps of a pair, computed from the whole pair tokenized (slow on a huge one)."""
    premise, hypothesis = f"{pair['question']} {pair['thinking']}", stage1.crm_hypothesis(pair["answer"])
    full = tok([premise], [hypothesis], verbose=False)
    n_question = len(tok(pair["question"], add_special_tokens=False)["input_ids"])
    keep = stage1.kept_positions(full.sequence_ids(0), n_question, max_length, 64)
    return [full["input_ids"][0][j] for j in keep]


def test_a_ten_million_character_thinking_is_cut_before_tokenizing(tiny_crm):
    """Its tokenizer took 26 s to encode it, for the 512 tokens kept; what cannot be kept is cut first."""
    _, tok = tiny_crm
    huge = {"question": "How many red shapes are there?", "answer": "7",
            "thinking": "I count the shapes: " + "1, 2, 3, " * 1_111_111 + "So the answer is 7."}
    started = time.time()
    ids = stage1.encode_pairs(tok, [huge], "cpu")["input_ids"][0]
    assert time.time() - started < 5.0
    assert len(ids) == 512
    assert tok.decode(ids, skip_special_tokens=True).endswith("So the answer is 7.The final answer is 7.")
    long = {"thinking": huge["thinking"][-200_000:], "question": "Q " * 9_000, "answer": "数" * 9_000}
    assert stage1.encode_pairs(tok, [long], "cpu")["input_ids"][0].tolist() == uncut_encoding(tok, long, 512)


def test_a_cut_that_would_drop_kept_tokens_is_not_made():
    """A tokenizer that drops spaces: the last 8,192 characters of this thinking are spaces, no token; the
    thinking is then encoded whole and its conclusion kept."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    words = "[CLS] [SEP] [PAD] [UNK] how many so the answer is final 7 . ?".split()
    word_level = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    word_level.normalizer, word_level.pre_tokenizer = normalizers.Lowercase(), pre_tokenizers.Whitespace()
    word_level.post_processor = TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 0), ("[SEP]", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=word_level, cls_token="[CLS]", sep_token="[SEP]",
                                  pad_token="[PAD]", unk_token="[UNK]")
    pair = {"question": "how many ?", "thinking": "the answer is 7 . " * 200 + "so the answer is final 7 ." +
            " " * 100_000, "answer": "7"}
    assert len(pair["thinking"]) > 128 * stage1.longest_token(tok)  # long enough to cut, were spaces tokens
    ids = stage1.encode_pairs(tok, [pair], "cpu", max_length=128)["input_ids"][0].tolist()
    assert ids == uncut_encoding(tok, pair, 128)
    assert "so the answer is final 7 . [SEP] the final answer is 7 . [SEP]" in tok.decode(ids)


def test_a_max_length_with_no_room_for_the_premise_is_refused(tiny_crm):
    _, tok = tiny_crm
    with pytest.raises(ValueError, match="max_length=60 leaves no room"):  # 3 specials + 64 > 60
        stage1.encode_pairs(tok, long_pairs()[:1], "cpu", max_length=60)


# ----------------------------------------------------------------------------- 3. NaN never becomes an advantage
@pytest.mark.parametrize("method", ["grpo", "sum", "hras"])
def test_advantages_refuse_non_finite_task_rewards_naming_them(method):
    task, cons = torch.tensor([1.0, 0, float("nan"), 0, 1, float("inf")]), torch.tensor([0.5] * 6)
    with pytest.raises(ValueError, match=r"task rewards must be finite: 2 are not, at indices \[2, 5\]"):
        hras.advantages(method, task, cons, 3)


def test_advantages_refuse_non_finite_consistency_when_they_use_it():
    task, cons = torch.tensor([1.0, 0, 0, 1]), torch.tensor([0.5, float("-inf"), 0.2, 0.1])
    for method in ("sum", "hras"):
        with pytest.raises(ValueError, match=r"consistency rewards must be finite: 1 are not, at indices \[1\] "):
            hras.advantages(method, task, cons, 2)
    assert torch.isfinite(hras.advantages("grpo", task, cons, 2)).all()  # grpo never reads the consistency
    with pytest.raises(ValueError, match=r"indices \[0\]"):
        hras.group_zscore(torch.tensor([float("nan"), 1.0]), 2)


def write_rewards(path, prompts):
    path.write_text("".join(json.dumps(p) + "\n" for p in prompts))  # json writes NaN and Infinity as such


def rewards_row(row, task, consistency):
    return {"row": row, "question": "q", "answer": "3",
            "rewards": [{"format": 1.0, "accuracy": 0.0, "task": t, "consistency": c}
                        for t, c in zip(task, consistency)]}


def test_stage4_refuses_nan_rewards_naming_the_row_and_writes_nothing(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    write_rewards(run / "rewards.jsonl", [rewards_row(10, [1, 0, 2], [0.1, 0.2, 0.3]),
                                          rewards_row(11, [1, 0, 2], [0.1, 0.2, float("nan")])])
    (run / "advantages.jsonl").write_text("the previous good file\n")
    with pytest.raises(SystemExit, match=r"1 consistency rewards are NaN or inf\w* \(prompt row 11, completion 2\)"):
        hras.main(hras.Config(run="run", runs_dir=str(tmp_path)))
    assert (run / "advantages.jsonl").read_text() == "the previous good file\n"
    write_rewards(run / "rewards.jsonl", [rewards_row(10, [1, float("inf"), 2], [0.1, 0.2, 0.3])])
    with pytest.raises(SystemExit, match=r"task rewards are NaN or infinite \(prompt row 10, completion 1\)"):
        hras.main(hras.Config(run="run", runs_dir=str(tmp_path), advantage="grpo"))
    assert (run / "advantages.jsonl").read_text() == "the previous good file\n"


@pytest.mark.parametrize("flag, value", [("alpha", float("nan")), ("beta", float("inf")), ("eps", -1.0),
                                         ("cons_eps", float("nan")), ("advantage", "ppo")])
def test_stage4_refuses_flags_that_give_nan_before_reading(tmp_path, flag, value):
    with pytest.raises(SystemExit, match=f"--{flag.replace('_', '-')} {value}"):
        hras.main(hras.Config(run="absent", runs_dir=str(tmp_path), **{flag: value}))  # no run folder needed


def test_stage3_never_returns_a_non_finite_reward(monkeypatch, tiny_crm):
    crm, tok = tiny_crm
    texts = ["<think>So the answer is 3.</think><answer>3</answer>", "no tags",
             "<think>a</think><answer>4</answer>"]
    broken = stage3.Config(format_weight=float("nan"), device="cpu")
    monkeypatch.setattr(stage1, "crm_scores", lambda *args, **kwargs: [0.5, float("nan")])  # a broken CRM
    with pytest.raises(ValueError, match=r"non-finite P\(consistent\) for 1 completions \(indices \[2\]\)"):
        stage3.consistency_rewards(crm, tok, ["q"] * 3, texts, 1.0, "cpu")
    monkeypatch.undo()
    with pytest.raises(ValueError, match="lambda_cons must be finite"):
        stage3.consistency_rewards(crm, tok, ["q"] * 3, texts, float("inf"), "cpu")
    with pytest.raises(ValueError, match="format_weight must be finite"):
        stage3.score_completions(texts, ["q"] * 3, ["3"] * 3, crm, tok, broken, True)
    for flag, value in [("lambda_cons", float("nan")), ("format_weight", float("-inf")), ("crm_batch_size", 0)]:
        with pytest.raises(SystemExit, match=f"--{flag.replace('_', '-')} {value}"):
            stage3.main(stage3.Config(run="absent", runs_dir="/nonexistent", device="cpu", **{flag: value}))


# ----------------------------------------------------------------------------- 4. empty input never replaces output
def embedded_run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "stage1.json").write_text(json.dumps({"config": {"dataset": None}}))
    return run


@pytest.mark.parametrize("rollouts, message", [
    ("", "holds no prompts: nothing to score"),
    ("\n\n", "holds no prompts: nothing to score"),
    (json.dumps({"row": 0, "question": "q", "answer": "3", "completions": []}) + "\n", "prompt 1: expected"),
    (json.dumps({"row": 0, "question": "q", "answer": "3", "completions": [{"text": "a"}]}) + "\n[1, 2]\n",
     "prompt 2: expected"),
])
def test_stage3_on_empty_or_broken_rollouts_stops_before_writing(tmp_path, rollouts, message):
    run = embedded_run(tmp_path)
    (run / "rollouts.jsonl").write_text(rollouts)
    (run / "rewards.jsonl").write_text("the previous good file\n")
    with pytest.raises(SystemExit, match=message):
        stage3.main(stage3.Config(run="run", runs_dir=str(tmp_path), device="cpu"))  # before loading a CRM
    assert (run / "rewards.jsonl").read_text() == "the previous good file\n"


@pytest.mark.parametrize("rewards, message", [
    ("", "holds no prompts: nothing to normalise"),
    (json.dumps({"row": 0, "rewards": []}) + "\n", "prompt 1: expected a row and a non-empty list"),
    (json.dumps(rewards_row(0, [1, 0], [0.5, "x"])) + "\n", "prompt 1: expected"),
    (json.dumps(rewards_row(0, [1, 0], [0.5, 0.1])) + "\n" + json.dumps(rewards_row(1, [1], [0.5])) + "\n",
     r"same number of completions, got \[1, 2\]"),
    (json.dumps(rewards_row(0, [1], [0.5])) + "\n", "a group of one completion has no baseline"),
])
def test_stage4_on_empty_or_broken_rewards_stops_before_writing(tmp_path, rewards, message):
    run = tmp_path / "run"
    run.mkdir()
    (run / "rewards.jsonl").write_text(rewards)
    (run / "advantages.jsonl").write_text("the previous good file\n")
    with pytest.raises(SystemExit, match=message):
        hras.main(hras.Config(run="run", runs_dir=str(tmp_path)))
    assert (run / "advantages.jsonl").read_text() == "the previous good file\n"


# ----------------------------------------------------------------------------- 5. numbers match as numbers
@pytest.mark.parametrize("predicted, truth, match", [
    ("1000001", "1000000", False), ("123456789", "123456790", False),  # integers compare exactly
    ("3.0", "3", True), ("3.0000001", "3", False), ("1000000.5", "1000001", False),  # an integer side: exact
    ("0.3333333", "1/3", True), ("0.333", "1/3", False), ("2.5", "2.5000001", True),  # decimals: relative 1e-6
    ("1e309", "inf", False), ("inf", "1e309", False), ("1e309", "1e309", True), ("1e309", "1e308", False),
    ("1e5", "100000", True), ("1e5", "1", False),  # (math-verify 0.9.0 reads "1e5" as 1)
    ("1e-10", "2e-10", False), ("1e-12", "0", False), ("1e-10", "1e-10", True), ("0", "-0.0", True),
    ("nan", "3", False), ("3", "nan", False), ("nan", "inf", False),  # nan is no number: never a numeric match
    ("nan", "nan", True), ("NaN", "nan", True),  # ... it is text, and matches the text nan
    ("1,000", "1000", True), ("1,000,000.5", "1000000.5", True), ("1,2", "12", False),
    ("1/2", "0.5", True), ("0.5", "1/2", True), ("2/4", "1/2", True), ("\\frac{1}{2}", "0.5", True),
    ("-\\dfrac{3}{4}", "-0.75", True), ("1/0", "0", False), ("1/2/3", "1/6", False),
    ("\\boxed{3}", "3", True), ("$3$", "3", True), ("$\\boxed{3}$.", "3", True), ("\\(3\\)", "3", True),
    ("\\boxed{4}", "3", False),
    ("−3", "-3", True), ("−3", "3", False), ("３", "3", True), ("Ｂ", "B", True),  # Unicode minus; full width
    ("B)", "B", True), ("(b)", "B", True), (" b. ", "B", True), ("\\text{B}", "B", True), ("C", "B", False),
    ("3 apples", "3", False), ("", "", False), (None, "3", False), ("7.", "7", True),
])
def test_answers_match_numbers(predicted, truth, match):
    assert stage1.answers_match(predicted, truth) is match


def test_plain_answers_take_the_fast_path():
    # the embedded answers (1-6, A/B/C) are compared 64 times per training step: ~10-20 us each, no sympy
    started = time.perf_counter()
    for _ in range(1000):
        stage1.answers_match("3", "3"), stage1.answers_match("B", "C")
    assert time.perf_counter() - started < 0.5  # 2,000 comparisons; measured ~0.03 s


# ----------------------------------------------------------------------------- 6. malformed output is data
def test_fuzzed_completions_never_raise_and_score_finite(tiny_crm):
    crm, tok = tiny_crm
    texts = fuzz_completions(300, seed=2, max_pieces=40) + list(NORMAL)
    for text in texts:
        think, answer = stage1.parse_completion(text)
        assert think is None or think == think.strip() and think
        assert stage3.format_reward(text, 0.5) in (0.0, 0.5)
        for truth in ("3", "B", "1/2", "1e309", "nan", ""):
            assert stage3.accuracy_reward(text, truth) in (0.0, 1.0)
        assert stage1.oracle_consistent(think, answer) in (True, False)
        conclusion = stage1.thinking_conclusion(think)
        assert conclusion is None or isinstance(conclusion, str)
    rewards = stage3.consistency_rewards(crm, tok, ["How many?"] * len(texts), texts, 1.0, "cpu")
    assert all(math.isfinite(r) and 0.0 <= r <= 1.0 for r in rewards)
    scores = stage3.score_completions(texts, ["q"] * len(texts), ["3"] * len(texts), crm, tok,
                                      stage3.Config(device="cpu"), True)
    assert all(math.isfinite(s[key]) for s in scores for key in ("format", "accuracy", "task", "consistency"))
