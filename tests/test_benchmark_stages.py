"""The paper's benchmarks in the stages, offline (datasets.load_dataset replaced by fixture rows in each hub schema):
stage 1 trains on one by name, the training reward scores with that benchmark's own comparator (stage 3, called by
stage 5), and stage 6 --benchmark evaluates a run on its rows with its official aggregate."""
import dataclasses
import json
import shutil

import pytest
from PIL import Image, ImageDraw

from adapters import benchmarks as bm
from adapters import real_data
from conftest import load_stage

stage1, stage3, stage5, stage6 = (load_stage(f) for f in ("01_sft_rm.py", "03_rewards.py", "05_grpo_train.py",
                                                          "06_eval.py"))


def picture(seed: int, size: int = 56) -> Image.Image:
    image = Image.new("RGB", (size, size), "white")
    ImageDraw.Draw(image).rectangle([2 + seed % 5, 4, 20 + seed % 7, 30 + seed % 9], fill=(40, 40, 200))
    return image


def cvbench_row(idx: int, source: str, answer: str) -> dict:
    """A CV-Bench row in the hub's schema; the question names the row, so a prompt can be traced to it."""
    return {"idx": idx, "type": "3D" if source == "Omni3D" else "2D", "task": "Count", "image": picture(idx),
            "question": f"How many chairs are in picture {idx}?", "choices": ["1", "2", "3"], "answer": answer,
            "prompt": "unused", "filename": f"img/{idx}.png", "source": source, "source_dataset": source,
            "source_filename": "x"}


def puzzle_row(idx: int, options: list[str], answer: str) -> dict:
    """A PuzzleVQA row as the hub serves it: `options` is a Python list's repr held as a string."""
    return {"image": picture(idx), "question": f"What is the colour of the missing part {idx}?",
            "options": str(options), "answer": answer, "caption": "c", "explanation": "e", "deduction": "d"}


def serve(monkeypatch, raw_rows: list[dict]) -> None:
    """datasets.load_dataset answers any hub id with these rows (as tests/test_benchmarks.py does)."""
    import datasets

    local = datasets.Dataset.from_list(raw_rows)
    monkeypatch.setattr(datasets, "load_dataset", lambda hub_id, split=None: local)


@pytest.fixture
def run_copy(tiny_run, tmp_path):
    """A copy of the tiny stage-1 run: the files written here touch no other test's folder."""
    for name in ("data", "policy_sft", "crm"):
        shutil.copytree(tiny_run["dir"] / name, tmp_path / "tiny" / name)
    shutil.copy(tiny_run["dir"] / "stage1.json", tmp_path / "tiny" / "stage1.json")
    return tmp_path / "tiny"


# ----------------------------------------------------------------------------- stage 3: the comparator as reward
def test_accuracy_reward_uses_the_benchmark_comparator():
    row = bm.to_prompt_row("puzzlevqa", puzzle_row(0, ["blue", "red"], "blue"))
    text = "<think>x</think><answer>(A)</answer>"
    # PuzzleVQA's gold is the option text: "(A)" names option A = "blue", right by the official rule;
    # a plain answers_match compares "(A)" with "blue" and says wrong
    assert stage3.accuracy_reward(text, "blue") == 0.0
    assert stage3.accuracy_reward(text, "blue", "puzzlevqa", row) == 1.0
    assert stage3.accuracy_reward("<think>x</think><answer>(B)</answer>", "blue", "puzzlevqa", row) == 0.0


def test_score_completions_with_a_benchmark_scores_by_its_rows(tiny_run):
    crm, tok = stage1.load_crm(str(tiny_run["dir"] / "crm"), "cpu")
    puzzle = bm.to_prompt_row("puzzlevqa", puzzle_row(0, ["blue", "red"], "blue"))
    vista = bm.to_prompt_row("mathvista", {"question": "Which bar is taller?", "decoded_image": picture(1),
                                           "choices": ["left", "right"], "answer": "right", "precision": None,
                                           "question_type": "multi_choice", "answer_type": "text"})
    texts = ["<think>x</think><answer>(A)</answer>", "<think>x</think><answer>B</answer>", "<answer>red</answer>"]
    rows = [{k: r[k] for k in stage3.COMPARATOR_COLUMNS} for r in (puzzle, vista, puzzle)]
    cfg = stage3.Config(device="cpu")
    plain = stage3.score_completions(texts, ["q"] * 3, [r["answer"] for r in rows], crm, tok, cfg, False)
    # "(A)" vs gold "blue", "B" vs gold "right": both wrong as strings; "red" vs "blue" wrong either way
    assert [s["accuracy"] for s in plain] == [0.0, 0.0, 0.0]
    scored = stage3.score_completions(texts, ["q"] * 3, [r["answer"] for r in rows], crm, tok, cfg, False,
                                      "puzzlevqa", rows[:1] * 3)
    assert [s["accuracy"] for s in scored] == [1.0, 0.0, 0.0]  # "(A)" = blue: right; "B" = red, "red": wrong
    vista_scored = stage3.score_completions(texts[1:2], ["q"], ["right"], crm, tok, cfg, False, "mathvista",
                                            rows[1:2])
    assert vista_scored[0]["accuracy"] == 1.0 and vista_scored[0]["task"] == 2.0  # "B" = "right"; + format 1
    assert [s["consistency"] for s in scored] == [s["consistency"] for s in plain]  # the CRM is unchanged
    with pytest.raises(ValueError, match="one row per completion: 3 completions, 1 rows"):
        stage3.score_completions(texts, ["q"] * 3, ["blue"] * 3, crm, tok, cfg, False, "puzzlevqa", rows[:1])


# ----------------------------------------------------------------------------- stages 1 and 5: training on one
def test_stage1_loads_a_benchmark_by_name_and_stage5_rewards_with_its_comparator(run_copy, monkeypatch):
    raw = [cvbench_row(i, ("ADE20K", "COCO", "Omni3D")[i % 3], "(" + "ABC"[i % 3] + ")") for i in range(20)]
    serve(monkeypatch, raw)
    cfg = stage1.Config(dataset="cvbench", skip_policy_sft=True, crm_data="unused.jsonl")
    data = real_data.load_real_dataset(cfg)
    assert (len(data["train"]), len(data["test"])) == (19, 1)  # no test split on the hub: 5 % of 20 held out
    assert set(stage3.COMPARATOR_COLUMNS) <= set(data["train"].column_names)
    stage1.check_dataset(cfg, data["train"], data["test"], "train", "test")  # every image opens
    # the tiny run, now trained on CV-Bench: its data and its stage-1 config say so
    shutil.rmtree(run_copy / "data")
    data.save_to_disk(str(run_copy / "data"))
    summary = json.loads((run_copy / "stage1.json").read_text())
    summary["config"]["dataset"] = "cvbench"
    (run_copy / "stage1.json").write_text(json.dumps(summary))
    calls, score_completions = [], stage3.score_completions

    def spy(texts, questions, truths, *args):
        calls.append((questions, args[-2:]))
        return score_completions(texts, questions, truths, *args)

    monkeypatch.setattr(stage3, "score_completions", spy)
    stage5.main(stage5.Config(run="tiny", runs_dir=str(run_copy.parent), name="bench", steps=1, prompts_per_step=2,
                              group_size=2, max_new_tokens=8, checkpoint_every=1, save_rollouts_every=1, device="cpu"))
    (questions, (benchmark, rows)), = calls
    assert benchmark == "cvbench" and len(rows) == 4
    by_question = {r["question"]: r for r in data["train"].remove_columns("image")}
    for question, row in zip(questions, rows):  # each completion scored against its own prompt's row
        assert row == {k: by_question[question][k] for k in stage3.COMPARATOR_COLUMNS}


# ----------------------------------------------------------------------------- stage 6 --benchmark
def scripted_rollouts(monkeypatch, answers: dict[int, str], seen: list[str]) -> None:
    """The policy really samples (on the benchmark's images and prompts); then each completion's text is replaced
    by a scripted answer for its row, so the scores are known in advance."""
    rollout_prompts = stage6.stage2.rollout_prompts

    def scripted(*args, **kwargs):
        prompts = rollout_prompts(*args, **kwargs)
        for p in prompts:
            seen.append(p["question"])
            for c in p["completions"]:
                c["text"] = f"<think>I count.</think><answer>{answers[p['row']]}</answer>"
        return prompts

    monkeypatch.setattr(stage6.stage2, "rollout_prompts", scripted)


def test_stage6_benchmark_reports_the_cvbench_official_aggregate(run_copy, monkeypatch):
    serve(monkeypatch, [cvbench_row(1, "ADE20K", "(A)"), cvbench_row(2, "ADE20K", "(B)"),
                        cvbench_row(3, "COCO", "(C)"), cvbench_row(4, "Omni3D", "(A)"), cvbench_row(5, "COCO", "(A)")])
    seen = []
    scripted_rollouts(monkeypatch, {0: "(A)", 1: "(A)", 2: "C", 3: "(B)"}, seen)  # right, wrong, right, wrong
    results = stage6.main(stage6.Config(run="tiny", runs_dir=str(run_copy.parent), benchmark="cvbench", n=4,
                                        temperature=0.0, max_new_tokens=8, device="cpu",
                                        checkpoints=f"sft={run_copy / 'policy_sft'}"))
    assert seen[0] == "How many chairs are in picture 1?\n(A) 1\n(B) 2\n(C) 3\nThe answer is the letter of the " \
                      "correct option."  # the first --n rows of the benchmark, in our prompt
    sft = results["sft"]
    # ADE20K 1/2, COCO 1/1, Omni3D 0/1 -> 1/2 x ((0.5 + 1.0) / 2 + 0.0) = 0.375 (plain mean 2/4 = 0.5)
    assert sft["accuracy"] == pytest.approx(0.375) and sft["benchmark"]["mean"] == pytest.approx(0.5)
    assert sft["ir_oracle"] is None and sft["CC"] + sft["IC"] == pytest.approx(0.5)  # by the CRM: correct share
    assert sft["CC"] + sft["CW"] == pytest.approx(1 - sft["ir_crm"])
    table = (run_copy / "eval_cvbench.md").read_text()
    assert "| sft | 1 | 37.5 |" in table and "official score" in table and "cvbench (split test)" in table
    assert not (run_copy / "eval.md").exists()  # the run's own test-split table is left alone
    assert json.loads((run_copy / "eval_cvbench.json").read_text())["checkpoints"]["sft"]["benchmark"][
        "per_source"] == {"ADE20K": 0.5, "COCO": 1.0, "Omni3D": 0.0}


def test_stage6_benchmark_scores_puzzle_letters_against_option_text(run_copy, monkeypatch):
    serve(monkeypatch, [puzzle_row(1, ["red", "blue", "green"], "green"), puzzle_row(2, ["small", "large"], "small"),
                        puzzle_row(3, ["yes", "no"], "no")])
    # "(C)" = green: right; "(B)" = large: wrong; "no" holds no capital A-D: officially no answer (wrong, and
    # counted unscorable; --second-round would ask the policy again)
    scripted_rollouts(monkeypatch, {0: "(C)", 1: "(B)", 2: "no"}, [])
    results = stage6.main(stage6.Config(run="tiny", runs_dir=str(run_copy.parent), benchmark="puzzlevqa", n=3,
                                        samples=2, max_new_tokens=8, device="cpu",
                                        checkpoints=f"sft={run_copy / 'policy_sft'}"))
    # 2 samples per prompt, each scripted alike: 2 of 6 right (plain mean, PuzzleVQA's official number)
    assert results["sft"]["accuracy"] == pytest.approx(2 / 6) and results["sft"]["n"] == 6
    assert results["sft"]["benchmark"]["unscorable"] == 2
    table = (run_copy / "eval_puzzlevqa.md").read_text()
    assert "| sft | 1 | 33.3 |" in table and "Unscorable (counted wrong): sft 2 of 6." in table


def test_stage6_second_round_asks_the_policy_again_with_the_official_prompt(run_copy, monkeypatch):
    serve(monkeypatch, [puzzle_row(1, ["red", "blue", "green"], "green"), puzzle_row(2, ["yes", "no"], "no")])
    rollout_prompts, asked = stage6.stage2.rollout_prompts, []

    def scripted(model, processor, data, rows, columns, cfg, generator=None):
        prompts = rollout_prompts(model, processor, data, rows, columns, cfg, generator)  # the policy samples
        for p in prompts:
            second = p["question"].endswith("the answer is:")
            asked.append((p["question"], cfg.temperature, cfg.group_size)) if second else None
            for c in p["completions"]:  # first round: no letter; second round: (C) for both rows
                c["text"] = "(C)" if second else f"<think>x</think><answer>{['green', 'no'][p['row']]}</answer>"
        return prompts

    monkeypatch.setattr(stage6.stage2, "rollout_prompts", scripted)
    results = stage6.main(stage6.Config(run="tiny", runs_dir=str(run_copy.parent), benchmark="puzzlevqa", n=2,
                                        temperature=0.0, max_new_tokens=8, device="cpu", second_round=True,
                                        checkpoints=f"sft={run_copy / 'policy_sft'}"))
    # row 0: (C) = green, right; row 1 (yes / no): (C) is past the options -> option A = yes, wrong
    assert results["sft"]["accuracy"] == pytest.approx(1 / 2) and results["sft"]["benchmark"]["unscorable"] == 0
    assert [(t, g) for _, t, g in asked] == [(0.0, 1), (0.0, 1)]  # greedy, one reply each
    first = "What is the colour of the missing part 1?\n(A) red\n(B) blue\n(C) green\nThe answer is the letter " \
            "of the correct option."
    assert asked[0][0] == (f"{first}\n<think>x</think><answer>green</answer>\n\n"
                           "Therefore, among (A) (B) (C) (D), the answer is:")


def test_stage6_mathvista_extractor_asks_a_model_where_the_official_run_does(run_copy, monkeypatch):
    from adapters import judge

    raw = {"question": "What is the total volume of the measuring cup?", "decoded_image": picture(2),
           "choices": None, "answer": "1000", "precision": None, "question_type": "free_form",
           "answer_type": "integer", "image": "images/2.jpg", "pid": "2", "unit": None, "query": "q"}
    serve(monkeypatch, [raw, {**raw, "pid": "3", "decoded_image": picture(3)}])
    scripted_rollouts(monkeypatch, {0: "1000", 1: "about a litre"}, [])
    made = []

    class FakeClient:  # stands in for judge.UrlJudge (an OpenAI-compatible endpoint)
        def __init__(self, base_url, model, **kwargs):
            made.append((base_url, model, kwargs))
            self.prompts = []

        def complete(self, prompts):
            self.prompts += prompts
            return ["1000" for _ in prompts]

    monkeypatch.setattr(judge, "UrlJudge", FakeClient)
    cfg = stage6.Config(run="tiny", runs_dir=str(run_copy.parent), benchmark="mathvista", n=2, temperature=0.0,
                        max_new_tokens=8, device="cpu", checkpoints=f"sft={run_copy / 'policy_sft'}")
    plain = stage6.main(cfg)  # our rules: "about a litre" holds no number, unscorable
    assert plain["sft"]["accuracy"] == pytest.approx(1 / 2) and plain["sft"]["benchmark"]["unscorable"] == 1
    official = stage6.main(dataclasses.replace(cfg, extractor_url="http://localhost:1/v1", extractor_model="m"))
    assert official["sft"]["accuracy"] == pytest.approx(1.0) and made[0][:2] == ("http://localhost:1/v1", "m")
    assert made[0][2]["cache_path"].endswith("extractions.jsonl")
    with pytest.raises(SystemExit, match="--extractor-url and --extractor-model go together"):
        stage6.main(dataclasses.replace(cfg, extractor_url="http://localhost:1/v1"))


def test_stage6_refuses_an_unknown_benchmark_before_reading_anything(tmp_path):
    with pytest.raises(SystemExit, match="--benchmark mmmu: unknown; use one of mathvista, mathvision"):
        stage6.main(stage6.Config(runs_dir=str(tmp_path / "absent"), benchmark="mmmu", device="cpu"))
