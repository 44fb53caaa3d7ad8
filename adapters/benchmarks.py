"""The paper's five benchmarks: each hub schema mapped into our prompt columns, each official comparison.

CORA reports MathVista, MathVision, CV-Bench, PuzzleVQA and AlgoPuzzleVQA. Each has its own columns
and its own rule for "is this answer right"; a plain string match scores them wrongly (MathVista's
gold is the option *text*, MathVision's the *letter*, CV-Bench's "(A)"). This module is the only
place that knows them:

    row = to_prompt_row("mathvista", raw_row)  # {"image", "question", "answer", "options", "answer_type",
                                               #  "precision", "source"}: our columns, one schema for all five
    score("mathvista", "(B)", row) -> bool     # the predicted <answer> text, by that benchmark's rule
    aggregate("cvbench", rows)                 # rows carry "correct" (and "source"): the reported number
    load("cvbench")                            # datasets.load_dataset + to_prompt_row over every row

The prompt ("question" column), one format for all five: the question, then the options one per line
as "(A) text", then one line saying what form the answer takes ("The answer is the letter of the
correct option." / "The answer is an integer." / "... a number with 2 decimal places."). Stage 1
appends its <think>/<answer> instruction after it. MathVista ships a ready prompt (`query`); we do not
use it: its hint asks for the answer "at the end" of a free reply, which our <answer> tag replaces, and
its choices are listed like ours anyway. What it says about the answer's type is our last line.
The "answer" column keeps each benchmark's gold as the hub gives it (text, letter or "(A)"): only
score() compares it correctly.

Official comparisons (paraphrased from each benchmark's evaluation code; details per comparator below):
  mathvista      a letter -> that option's text, else the nearest option text (edit distance);
                 integer int(float(x)), float round(float(x), precision); then string equality with the gold
  mathvision     the last \\boxed{} or the text after "the answer is"; equal to the gold letter or to the
                 gold option's text (case-insensitive), or numerically to 2 decimals
  cvbench        the letter named by the answer == the gold "(A)" without brackets;
                 reported score 1/2 x ((ADE20K accuracy + COCO accuracy) / 2 + Omni3D accuracy)
  puzzlevqa,     the last "(A)"-"(D)" -> that option's text (a letter past the options -> option A, as the
  algopuzzlevqa  official code does), else a bare letter; exact match with the gold text
"""
import re
from dataclasses import dataclass

# Deviations from the official evaluations. Every rule here is deterministic; none calls an LLM.
# - MathVista: the official pipeline asks GPT-4 to extract the answer from the model's reply. We read the
#   <answer> text with rules instead: an answer equal to an option is that option; "(B)", "B", "B." or "B) 12"
#   names option B; for integer / float questions the number after the last "=" (else the first number, so
#   "14 cm" -> 14). An empty answer is wrong (the official nearest-option rule would map "" to some option).
# - MathVision: the official is_equal evaluates LaTeX with latex2sympy. We compare plain numbers, a/b and
#   \frac{a}{b} to 2 decimals and everything else as lower-cased strings without spaces, after the official
#   clean-up (last \boxed{}, "the answer is", "(b)" -> "b", trailing "."). An answer that starts with "(B)"
#   counts as the letter B: our prompt lists options as "(A) text"; the official prompt asks for a bare
#   letter.
# - CV-Bench: the official code takes the first letter of a reply that was asked to be just the letter; we
#   take the first "(B)" in the answer, else a capital letter standing alone at its start ("B", "B.",
#   "B) two").
# - PuzzleVQA / AlgoPuzzleVQA: the official fallback after "(A)"-"(D)" takes the last capital A-D anywhere
#   (so "Blue" reads as B); ours needs the letter to stand alone, and before it an answer equal to an option's
#   text (any case) picks that option.

LETTERS = "ABCDEFGHIJ"


@dataclass(frozen=True)
class Benchmark:
    hub_id: str  # the id datasets.load_dataset takes
    split: str  # the split the paper evaluates (MathVista's `test` has no answers; `testmini` does)
    image: str  # image column (MathVista, MathVision: `image` is a path string, `decoded_image` the picture)
    question: str  # column with the question text
    options: str  # column with the options: a list (empty or None for free-form rows)
    answer: str  # column with the gold answer
    extra: tuple[str, ...] = ()  # further columns to_prompt_row reads


BENCHMARKS = {
    # 1,000 rows; question_type multi_choice / free_form, answer_type text / integer / float / list
    "mathvista": Benchmark("AI4Math/MathVista", "testmini", "decoded_image", "question", "choices", "answer",
                           ("question_type", "answer_type", "precision")),
    # 3,040 rows (`testmini`: 304); options [] or 5; the gold is a letter A-E for multi-choice rows
    "mathvision": Benchmark("MathLLMs/MathVision", "test", "decoded_image", "question", "options", "answer"),
    # 2,638 rows, 2D (ADE20K, COCO) and 3D (Omni3D); the gold is "(A)"-style
    "cvbench": Benchmark("nyu-visionx/CV-Bench", "test", "image", "question", "choices", "answer",
                         ("source",)),
    # 2,000 rows (20 puzzles x 100), 3 or 4 options; the gold is the option text
    "puzzlevqa": Benchmark("declare-lab/PuzzleVQA", "train", "image", "question", "options", "answer"),
    # 1,800 rows (18 puzzles x 100), 2-4 options; the gold is the option text
    "algopuzzlevqa": Benchmark("declare-lab/AlgoPuzzleVQA", "train", "image", "question", "options",
                               "answer"),
}


def spec(name: str) -> Benchmark:
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}: choose one of {', '.join(BENCHMARKS)}.")
    return BENCHMARKS[name]


# ----------------------------------------------------------------------------- the prompt
def option_lines(options: list[str]) -> str:
    """Example: option_lines(["3", "4"]) -> "(A) 3\\n(B) 4"."""
    return "\n".join(f"({LETTERS[i]}) {option}" for i, option in enumerate(options))


def answer_hint(answer_type: str, precision: int | None) -> str:
    """One line on the answer's form (what MathVista's official hint says), or "" for free text."""
    if answer_type == "multi_choice":
        return "The answer is the letter of the correct option."
    if answer_type == "integer":
        return "The answer is an integer."
    if answer_type == "float":
        return f"The answer is a number with {precision} decimal place{'' if precision == 1 else 's'}."
    if answer_type == "list":
        return "The answer is a Python list, e.g. [1, 2, 3]."
    if answer_type == "free_form":
        return "The answer is a number or a short expression."
    return ""


def to_prompt_row(name: str, row: dict) -> dict:
    """One raw row of benchmark `name` -> our columns.

    Example (CV-Bench): {"image": im, "question": "How many cars?", "choices": ["2", "3"], "answer": "(B)",
    "source": "COCO", ...} -> {"image": im, "question": "How many cars?\\n(A) 2\\n(B) 3\\nThe answer is the
    letter of the correct option.", "answer": "(B)", "options": ["2", "3"], "answer_type": "multi_choice",
    "precision": None, "source": "COCO"}
    answer_type: multi_choice, or for free-form rows MathVista's integer / float / text / list, MathVision's
    free_form.
    """
    s = spec(name)
    question, precision = str(row[s.question]).strip(), None
    options = [str(o) for o in row.get(s.options) or []]
    if name == "mathvista":
        answer_type = "multi_choice" if row["question_type"] == "multi_choice" else row["answer_type"]
        options = options if answer_type == "multi_choice" else []
        if answer_type == "float" and row.get("precision") is not None:
            precision = int(row["precision"])  # stored as a float on the hub (1.0, 2.0)
    elif name == "mathvision":
        # "<image1>" marks where an interleaved format would put the image; ours comes once, before the text
        question = re.sub(r"[ \t]{2,}", " ", re.sub(r"<image\d+>", "", question)).strip()
        answer_type = "multi_choice" if options else "free_form"
    else:
        answer_type = "multi_choice"
    parts = [question, option_lines(options), answer_hint(answer_type, precision)]
    return {"image": row[s.image], "question": "\n".join(p for p in parts if p),
            "answer": str(row[s.answer]).strip(), "options": options, "answer_type": answer_type,
            "precision": precision, "source": str(row.get("source") or "")}


# ----------------------------------------------------------------------------- shared reading rules
def option_letter(text: str) -> str | None:
    """The option an answer names: its first "(B)" (any case), else a capital standing alone at its start.

    Example: option_letter("(b) 12") -> "B"; option_letter("C.") -> "C"; option_letter("A cat") -> None.
    """
    found = re.search(r"\(([A-Za-z])\)", text)
    if found:
        return found.group(1).upper()
    found = re.match(r"\s*([A-Z])(?:[.):](?:\s|$)|\s*$)", text)
    return found.group(1) if found else None


def first_number(text: str) -> str | None:
    """The number an answer gives: all of it if it parses, else the first number after its last "=".

    Example: first_number("1,250 cm") -> "1250"; first_number("x = 2 + 3 = 5") -> "5";
             first_number("none") -> None.
    """
    text = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", text.strip())  # thousands separators
    try:
        float(text)
        return text
    except ValueError:
        found = re.search(r"-?(?:\d+\.?\d*|\.\d+)", text.rsplit("=", 1)[-1])
        return found.group(0) if found else None


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions).

    Example: edit_distance("kitten", "sitting") -> 3 (k/s, e/i, +g).
    """
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        current = [i]
        for j, cb in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


# ----------------------------------------------------------------------------- MathVista
def mathvista_choice(text: str, options: list[str]) -> str:
    """The option an answer picks: itself if it is one, its letter's option, else the nearest option text."""
    if text in options:
        return text
    letter = option_letter(text)
    extraction = letter if letter is not None else text
    if letter is not None and 0 <= LETTERS.find(letter) < len(options):
        return options[LETTERS.find(letter)]
    # the first nearest, as official
    return min(options, key=lambda option: edit_distance(extraction, option))


def mathvista_correct(text: str, row: dict) -> bool:
    """Normalise the answer to the gold's type, then string equality with the gold."""
    answer_type, gold = row["answer_type"], row["answer"]
    if answer_type == "multi_choice":
        return mathvista_choice(text, row["options"]) == gold
    if answer_type in ("integer", "float"):
        number = first_number(text)
        if number is None:
            return False
        if answer_type == "integer":
            return str(int(float(number))) == gold
        return str(round(float(number), row["precision"])) == gold
    return text == gold  # text and list answers: exact


# ----------------------------------------------------------------------------- MathVision
def last_boxed(text: str) -> str | None:
    """The content of the last \\boxed{...}, braces matched, or None.

    Example: last_boxed("so \\boxed{\\frac{1}{2}}") -> "\\frac{1}{2}".
    """
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 1, start + len("\\boxed{")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return text[i:]


def mathvision_answer(text: str) -> str:
    """The official clean-up: the last \\boxed{} or the text after "the answer is"; lower case, no spaces.

    Example: mathvision_answer("The answer is (B).") -> "b"; mathvision_answer("\\boxed{3 / 2}") -> "3/2".
    """
    boxed = last_boxed(text)
    if boxed is not None:
        text = boxed
    else:
        at = text.lower().rfind("the answer is")
        text = text[at + len("the answer is"):] if at >= 0 else text
    text = text.strip().lower()
    leading = re.match(r"\(([a-e])\)", text)  # "(b) 12": the option, as our prompt lists them
    if leading:
        return leading.group(1)
    text = text.replace(" ", "").rstrip(".").lstrip(":")
    alone = re.fullmatch(r"([a-e])[.)]?", text)
    return alone.group(1) if alone else text


def mathvision_number(text: str) -> float | None:
    """A plain number, a/b or \\frac{a}{b} (degrees, $ and % dropped), else None.

    Example: mathvision_number("\\frac{3}{4}") -> 0.75; mathvision_number("2\\sqrt{3}") -> None.
    """
    for junk in ("^{\\circ}", "^\\circ", "°", "\\%", "%", "\\$", "$", "\\!"):
        text = text.replace(junk, "")
    number = r"-?(?:\d+\.?\d*|\.\d+)"
    fraction = (re.fullmatch(rf"({number})/({number})", text)
                or re.fullmatch(rf"\\[dt]?frac\{{({number})\}}\{{({number})\}}", text))
    try:
        if fraction:
            return float(fraction.group(1)) / float(fraction.group(2))
        return float(text)
    except (ValueError, ZeroDivisionError):
        return None


def mathvision_equal(gold: str, answer: str) -> bool:
    """Equal as lower-cased strings without spaces, or as numbers rounded to 2 decimals; empty never
    matches."""
    gold, answer = gold.lower().replace(" ", ""), answer.lower().replace(" ", "")
    if not gold or not answer:
        return False
    if gold == answer:
        return True
    g, a = mathvision_number(gold), mathvision_number(answer)
    return g is not None and a is not None and round(g, 2) == round(a, 2)


def mathvision_correct(text: str, row: dict) -> bool:
    """Right if the answer equals the gold letter or the gold option's text (or the free-form gold)."""
    gold, options = row["answer"], row["options"]
    index = LETTERS.find(gold.upper()) if len(gold) == 1 else -1
    gold_text = options[index] if 0 <= index < len(options) else ""
    answer = mathvision_answer(text)
    return mathvision_equal(gold, answer) or mathvision_equal(gold_text, answer)


# ----------------------------------------------------------------------------- CV-Bench and the puzzles
def cvbench_correct(text: str, row: dict) -> bool:
    """The letter the answer names equals the gold "(A)" without its brackets."""
    return option_letter(text) == row["answer"].strip().strip("()").upper()


def puzzle_choice(text: str, options: list[str]) -> str | None:
    """The option an answer picks: the last "(A)"-"(D)", else an option's text, else the last lone letter A-D.

    A letter past the options maps to option A, as official: get_answer's mapping.get(letter, options[0]).
    Example: puzzle_choice("(A) or rather (C)", ["red", "blue", "green"]) -> "green";
             puzzle_choice("D", ["red", "blue", "green"]) -> "red".
    """
    mapping = dict(zip("ABCD", options))
    found = re.findall(r"\(([ABCD])\)", text)
    if not found:
        plain = text.strip().rstrip(".").lower()
        for option in options:
            if plain == option.lower():
                return option
        found = re.findall(r"\b([ABCD])\b", text)
    return mapping.get(found[-1], options[0]) if found else None


def puzzle_correct(text: str, row: dict) -> bool:
    return puzzle_choice(text, row["options"]) == row["answer"]


SCORERS = {"mathvista": mathvista_correct, "mathvision": mathvision_correct, "cvbench": cvbench_correct,
           "puzzlevqa": puzzle_correct, "algopuzzlevqa": puzzle_correct}


def score(name: str, predicted: str | None, row: dict) -> bool:
    """Is the predicted answer (the <answer> text; None when missing) right for `row` (a to_prompt_row
    output)?

    Example: score("mathvista", "B", {"answer": "4", "options": ["3", "4"], "answer_type": "multi_choice",
             ...}) -> True; score("cvbench", "(B)", {"answer": "(A)", ...}) -> False.
             Missing or blank is never right.
    """
    spec(name)
    if predicted is None or not predicted.strip():
        return False
    return SCORERS[name](predicted.strip(), row)


def aggregate(name: str, rows: list[dict]) -> dict:
    """The number each benchmark reports, from rows with "correct" (bool) and, for CV-Bench, "source".

    Plain mean elsewhere. CV-Bench: 1/2 x ((acc_ADE20K + acc_COCO) / 2 + acc_Omni3D). When a source is absent
    (e.g. the first 200 test rows are all 2D), the mean over the parts present, and "complete": False.
    Example: ADE20K 1/2, COCO 1/1, Omni3D 0/1 -> 1/2 x ((0.5 + 1) / 2 + 0) = 0.375 (plain mean: 2/4 = 0.5).
    """
    spec(name)
    if not rows:
        raise ValueError("aggregate needs at least one row.")
    mean = sum(bool(r["correct"]) for r in rows) / len(rows)
    if name != "cvbench":
        return {"accuracy": mean, "n": len(rows)}
    per_source: dict[str, list[bool]] = {}
    for r in rows:
        per_source.setdefault(r["source"], []).append(bool(r["correct"]))
    by_source = {source: sum(flags) / len(flags) for source, flags in per_source.items()}
    two_d = [by_source[s] for s in ("ADE20K", "COCO") if s in by_source]
    parts = [sum(two_d) / len(two_d)] if two_d else []
    parts += [by_source["Omni3D"]] if "Omni3D" in by_source else []
    if not parts:
        raise ValueError(f"CV-Bench rows need source ADE20K, COCO or Omni3D; got {sorted(by_source)}.")
    return {"accuracy": sum(parts) / len(parts), "mean": mean, "per_source": by_source, "n": len(rows),
            "complete": len(two_d) == 2 and "Omni3D" in by_source}


# ----------------------------------------------------------------------------- loading from the hub
def load(name: str, split: str | None = None):
    """datasets.load_dataset(hub id, split) mapped through to_prompt_row: a Dataset with our columns.

    The image column is renamed to "image" without decoding it (the map reads it undecoded and leaves it
    alone); every other raw column is replaced by ours.
    """
    from datasets import Features, Image, List, Value, load_dataset

    s = spec(name)
    ds = load_dataset(s.hub_id, split=split or s.split)
    missing = [c for c in (s.image, s.question, s.options, s.answer) + s.extra if c not in ds.column_names]
    if missing:
        raise SystemExit(f"{s.hub_id} (split {split or s.split}): no column(s) {missing}; "
                         f"columns: {ds.column_names}.")
    ds = ds.cast_column(s.image, Image(decode=False))
    features = Features({s.image: ds.features[s.image], "question": Value("string"),
                         "answer": Value("string"), "options": List(Value("string")),
                         "answer_type": Value("string"), "precision": Value("int32"),
                         "source": Value("string")})

    def our_columns(row: dict) -> dict:
        mapped = to_prompt_row(name, row)
        del mapped["image"]  # kept as is, under its own name until the rename below
        return mapped

    ds = ds.map(our_columns, remove_columns=[c for c in ds.column_names if c != s.image], features=features,
                desc=f"{name}: to our columns")
    ds = ds.cast_column(s.image, Image())
    return ds.rename_column(s.image, "image") if s.image != "image" else ds
