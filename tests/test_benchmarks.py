"""The five benchmark adapters, offline: fixture rows in each hub schema (images drawn with Pillow), mapped into
our columns and scored by each benchmark's official rule (letter vs option text, precision, "(A)", the CV-Bench
aggregate). load() runs too, with datasets.load_dataset replaced by a local Dataset (no network)."""
import pytest
from PIL import Image, ImageDraw

from adapters import benchmarks as bm


def picture(seed: int, size: int = 32) -> Image.Image:
    image = Image.new("RGB", (size, size), "white")
    ImageDraw.Draw(image).rectangle([2 + seed % 5, 4, 12 + seed % 7, 20 + seed % 9], fill=(200, 40, 40))
    return image


def mathvista_row(pid: str, question: str, answer: str, question_type: str, answer_type: str, choices=None,
                  precision=None) -> dict:
    """A row in the hub's schema: `image` is a path string, the picture is in `decoded_image`."""
    return {"pid": pid, "question": question, "image": f"images/{pid}.jpg", "decoded_image": picture(int(pid)),
            "choices": choices, "unit": None, "precision": precision, "answer": answer,
            "question_type": question_type, "answer_type": answer_type,
            "query": f"Hint: Please answer the question.\nQuestion: {question}"}


MATHVISTA = {
    "choice": mathvista_row("1", "Which bar is taller?", "right", "multi_choice", "text",
                            choices=["left", "right"]),
    "integer": mathvista_row("2", "How many cars are there?", "14", "free_form", "integer"),
    "float1": mathvista_row("3", "What is the ratio?", "0.6", "free_form", "float", precision=1.0),
    "float2": mathvista_row("4", "What is the slope?", "1.25", "free_form", "float", precision=2.0),
    "text": mathvista_row("5", "Is the line straight?", "Yes", "free_form", "text"),
    "list": mathvista_row("6", "Which x are roots?", "[1, 2]", "free_form", "list"),
}


def test_mathvista_prompt_lists_options_and_says_the_answer_type():
    row = bm.to_prompt_row("mathvista", MATHVISTA["choice"])
    assert row["question"] == ("Which bar is taller?\n(A) left\n(B) right\n"
                               "The answer is the letter of the correct option.")
    assert (row["answer"], row["options"], row["answer_type"]) == ("right", ["left", "right"], "multi_choice")
    assert row["image"] is MATHVISTA["choice"]["decoded_image"]  # the picture, not the path string
    float_row = bm.to_prompt_row("mathvista", MATHVISTA["float1"])
    assert float_row["question"] == "What is the ratio?\nThe answer is a number with 1 decimal place."
    assert (float_row["precision"], float_row["options"]) == (1, [])  # the hub stores 1.0; no options
    assert bm.to_prompt_row("mathvista", MATHVISTA["integer"])["question"].endswith("The answer is an integer.")


@pytest.mark.parametrize("kind, predicted, correct", [
    # multi-choice, gold = the option TEXT "right": a letter maps to the option at that index
    ("choice", "right", True), ("choice", "B", True), ("choice", "(B)", True), ("choice", "(b) right", True),
    ("choice", "B.", True), ("choice", "A", False), ("choice", "(A)", False),
    # no letter: the nearest option by edit distance (official). "rigth": 2 edits to "right", 4 to "left"
    ("choice", "rigth", True),
    # "(C)" with two options: the extraction becomes "C", whose nearest option is "left" (4 edits vs 5)
    ("choice", "(C)", False),
    # integer: int(float(x)) == "14"; int() truncates, as official ("14.7" -> "14")
    ("integer", "14", True), ("integer", "14.0", True), ("integer", "14.7", True), ("integer", "14 cars", True),
    ("integer", "13", False), ("integer", "many", False),
    # float, precision 1: str(round(x, 1)) == "0.6": round(0.63, 1) = 0.6, round(0.66, 1) = 0.7
    ("float1", "0.63", True), ("float1", "0.6", True), ("float1", "0.66", False),
    # float, precision 2: round(1.254, 2) = 1.25; "1.2" -> "1.2" != "1.25"
    ("float2", "1.254", True), ("float2", "slope = 1.25", True), ("float2", "1.2", False),
    # text and list: plain string equality (case and spacing matter)
    ("text", "Yes", True), ("text", "yes", False), ("list", "[1, 2]", True), ("list", "[1,2]", False),
])
def test_mathvista_official_comparison(kind, predicted, correct):
    assert bm.score("mathvista", predicted, bm.to_prompt_row("mathvista", MATHVISTA[kind])) is correct


def test_edit_distance_hand_computed():
    # kitten -> sitten (k/s) -> sittin (e/i) -> sitting (+g): 3; "rigth" -> "right": 2 substitutions (g/h, h/g)
    assert (bm.edit_distance("kitten", "sitting"), bm.edit_distance("rigth", "right")) == (3, 2)
    # "rigth" -> "left": r/l, i/e, g/f, keep t, drop h: 4; "C" -> "left": 1 substitution + 3 insertions: 4
    assert [bm.edit_distance(a, b) for a, b in [("rigth", "left"), ("C", "left"), ("C", "right")]] == [4, 4, 5]


MATHVISION_CHOICE = {"id": "7", "question": "<image1> Which shape has the most sides?",
                     "options": ["triangle", "square", "pentagon", "hexagon", "circle"], "answer": "D",
                     "image": "images/7.jpg", "decoded_image": picture(7), "solution": None, "level": 2,
                     "subject": "counting"}
MATHVISION_FREE = {"id": "8", "question": "What is the length of the red side? <image1>", "options": [],
                   "image": "images/8.jpg", "decoded_image": picture(8), "answer": "1.5", "solution": None,
                   "level": 3, "subject": "metric geometry"}


def test_mathvision_prompt_drops_the_image_placeholder():
    row = bm.to_prompt_row("mathvision", MATHVISION_CHOICE)
    assert row["question"] == ("Which shape has the most sides?\n(A) triangle\n(B) square\n(C) pentagon\n"
                               "(D) hexagon\n(E) circle\nThe answer is the letter of the correct option.")
    free = bm.to_prompt_row("mathvision", MATHVISION_FREE)
    assert free["question"] == ("What is the length of the red side?\n"
                                "The answer is a number or a short expression.")
    assert (free["answer_type"], free["options"]) == ("free_form", [])


@pytest.mark.parametrize("row, predicted, correct", [
    # gold letter "D" = "hexagon": the letter or the option text, case-insensitive
    (MATHVISION_CHOICE, "D", True), (MATHVISION_CHOICE, "d", True), (MATHVISION_CHOICE, "(D)", True),
    (MATHVISION_CHOICE, "hexagon", True), (MATHVISION_CHOICE, "Hexagon", True),
    (MATHVISION_CHOICE, "\\boxed{D}", True), (MATHVISION_CHOICE, "The answer is D.", True),
    (MATHVISION_CHOICE, "(D) hexagon", True), (MATHVISION_CHOICE, "C", False),
    (MATHVISION_CHOICE, "pentagon", False),
    # free form, gold "1.5": equal to 2 decimals; round(1.499, 2) = 1.5, round(1.49, 2) = 1.49
    (MATHVISION_FREE, "1.5", True), (MATHVISION_FREE, "3/2", True), (MATHVISION_FREE, "\\frac{3}{2}", True),
    (MATHVISION_FREE, "1.50", True), (MATHVISION_FREE, "1.499", True), (MATHVISION_FREE, "\\boxed{1.5}", True),
    (MATHVISION_FREE, "1.49", False), (MATHVISION_FREE, "2", False),
])
def test_mathvision_official_comparison(row, predicted, correct):
    assert bm.score("mathvision", predicted, bm.to_prompt_row("mathvision", row)) is correct


def cvbench_row(idx: int, source: str, answer: str) -> dict:
    return {"idx": idx, "type": "3D" if source == "Omni3D" else "2D", "task": "Count", "image": picture(idx),
            "question": "How many chairs are in the image?", "choices": ["1", "2", "3"], "answer": answer,
            "prompt": "How many chairs are in the image? Select from the following choices.\n(A) 1\n(B) 2",
            "filename": f"img/{idx}.png", "source": source, "source_dataset": source, "source_filename": "x"}


@pytest.mark.parametrize("predicted, correct", [
    ("B", True), ("(B)", True), ("(B) 2", True), ("B. 2", True),
    ("2", False),  # the option's text is not its letter: CV-Bench compares letters only
    ("(A)", False), ("A", False), ("Both", False),
])
def test_cvbench_compares_letters_with_the_bracketed_gold(predicted, correct):
    row = bm.to_prompt_row("cvbench", cvbench_row(0, "COCO", "(B)"))
    assert row["question"] == ("How many chairs are in the image?\n(A) 1\n(B) 2\n(C) 3\n"
                               "The answer is the letter of the correct option.")
    assert bm.score("cvbench", predicted, row) is correct


def test_cvbench_official_aggregate():
    raw = [cvbench_row(1, "ADE20K", "(A)"), cvbench_row(2, "ADE20K", "(B)"), cvbench_row(3, "COCO", "(C)"),
           cvbench_row(4, "Omni3D", "(A)")]
    predictions = ["(A)", "(A)", "C", "(B)"]  # right, wrong, right, wrong
    rows = [bm.to_prompt_row("cvbench", r) for r in raw]
    scored = [{"source": r["source"], "correct": bm.score("cvbench", p, r)} for r, p in zip(rows, predictions)]
    result = bm.aggregate("cvbench", scored)
    # ADE20K 1/2 = 0.5, COCO 1/1 = 1.0, Omni3D 0/1 = 0.0 -> 1/2 x ((0.5 + 1.0) / 2 + 0.0) = 0.375
    # (the plain mean over questions would be 2/4 = 0.5)
    assert result["accuracy"] == pytest.approx(0.375)
    assert result["mean"] == pytest.approx(0.5) and result["complete"]
    assert result["per_source"] == {"ADE20K": 0.5, "COCO": 1.0, "Omni3D": 0.0}
    # only 2D rows (the first test rows are all 2D): the 2D part alone, flagged incomplete
    two_d = bm.aggregate("cvbench", scored[:3])
    assert two_d["accuracy"] == pytest.approx((0.5 + 1.0) / 2) and not two_d["complete"]
    # elsewhere the plain mean: 1 of 3
    plain = bm.aggregate("puzzlevqa", [{"correct": c} for c in (True, False, False)])
    assert plain == {"accuracy": pytest.approx(1 / 3), "n": 3}


PUZZLE = {"image": picture(9), "question": "What is the colour of the missing part?",
          "options": ["red", "blue", "green", "yellow"], "answer": "green", "caption": "c", "explanation": "e"}
PUZZLE_SIZE = {"image": picture(10), "question": "What is the size of the missing circle?",
               "options": ["small", "medium", "large"], "answer": "small", "caption": "c", "explanation": "e"}
ALGO = {"image": picture(11), "question": "Can the queens be placed?", "options": ["Yes", "No"], "answer": "No",
        "solution": "s"}


@pytest.mark.parametrize("name, raw, predicted, correct", [
    # the last "(A)"-"(D)" picks the option; gold is the option text "green" = (C)
    ("puzzlevqa", PUZZLE, "(C)", True), ("puzzlevqa", PUZZLE, "(A) no, (C)", True),
    ("puzzlevqa", PUZZLE, "(C) or (B)", False), ("puzzlevqa", PUZZLE, "C", True),
    ("puzzlevqa", PUZZLE, "green", True), ("puzzlevqa", PUZZLE, "Green", True),
    ("puzzlevqa", PUZZLE, "(B)", False),
    ("puzzlevqa", PUZZLE, "purple", False),
    # three options: a letter past them maps to option A, as the official get_answer does
    ("puzzlevqa", PUZZLE_SIZE, "(D)", True), ("puzzlevqa", PUZZLE_SIZE, "(B)", False),
    ("algopuzzlevqa", ALGO, "(B)", True), ("algopuzzlevqa", ALGO, "No", True),
    ("algopuzzlevqa", ALGO, "(A)", False),
    ("algopuzzlevqa", ALGO, None, False), ("algopuzzlevqa", ALGO, "  ", False),
])
def test_puzzles_map_the_last_letter_to_the_option_text(name, raw, predicted, correct):
    assert bm.score(name, predicted, bm.to_prompt_row(name, raw)) is correct


def test_puzzle_prompt_and_unknown_benchmark():
    assert bm.to_prompt_row("puzzlevqa", PUZZLE_SIZE)["question"] == (
        "What is the size of the missing circle?\n(A) small\n(B) medium\n(C) large\n"
        "The answer is the letter of the correct option.")
    with pytest.raises(ValueError, match="mathvista"):
        bm.score("mmmu", "A", {})


@pytest.mark.parametrize("name, raw_rows", [("mathvista", list(MATHVISTA.values())),
                                            ("cvbench", [cvbench_row(i, "COCO", "(A)") for i in range(3)])])
def test_load_maps_a_hub_split_into_our_columns(monkeypatch, name, raw_rows):
    """load() on a local Dataset standing in for the hub: our columns only, the image under "image"."""
    import datasets

    local = datasets.Dataset.from_list(raw_rows)
    asked = []

    def fake_load_dataset(hub_id, split=None):
        asked.append((hub_id, split))
        return local

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    ds = bm.load(name)
    assert asked == [(bm.BENCHMARKS[name].hub_id, bm.BENCHMARKS[name].split)]
    assert sorted(ds.column_names) == ["answer", "answer_type", "image", "options", "precision", "question",
                                       "source"]
    for raw, got in zip(raw_rows, ds):
        want = bm.to_prompt_row(name, raw)
        image = want.pop("image")
        assert {k: got[k] for k in want} == want
        assert got["image"].convert("RGB").tobytes() == image.tobytes()  # the same picture, decoded again
