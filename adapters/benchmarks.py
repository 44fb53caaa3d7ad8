"""The paper's five benchmarks: each hub schema mapped into our prompt columns, each official comparison.

CORA reports MathVista, MathVision, CV-Bench, PuzzleVQA and AlgoPuzzleVQA. Each has its own columns and its
own rule for "is this answer right"; a plain string match scores them wrongly (MathVista's gold is the option
*text*, MathVision's the *letter*, CV-Bench's "(A)"). This module is the only place that knows them:

    row = to_prompt_row("mathvista", raw_row)  # {"image", "question", "answer", "options", "answer_type",
                                               #  "precision", "source"}: our columns, one schema for all five
    verdict("mathvista", "(B)", row)           # "right", "wrong" or "unscorable" (no answer could be read)
    score("mathvista", "(B)", row) -> bool     # verdict == "right": the reward and the evaluation use it
    aggregate("cvbench", rows)                 # rows carry "correct" (and "source", "unscorable"): the number
    load("cvbench")                            # datasets.load_dataset + to_prompt_row over every row

The prompt ("question" column), one format for all five: the question, then the options one per line as
"(A) text", then one line saying what form the answer takes ("The answer is the letter of the correct
option." / "The answer is an integer." / "... a number with 2 decimal places."). Stage 1 appends its
<think>/<answer> instruction after it. The "answer" column keeps each benchmark's gold as the hub gives it.

Each comparator follows its benchmark's official code step by step, in its order (docs/benchmarks.md names
the files and lists every remaining difference):
  mathvista      evaluation/extract_answer.py, then calculate_score.py: the reply itself when it is an option
                 or a number; a letter "(b)" / "B" -> that option, else the nearest option (edit distance);
                 integer int(float(x)), float round(float(x), precision); string equality with the gold.
                 Where the official pipeline asks GPT-4 to extract the answer, the default reads it with
                 rules (a leading letter, the number after the last "="); 06_eval.py --extractor-url asks a
                 model instead.
  mathvision     evaluation/evaluate.py + utils.py: " A." / "(A)\\n" endings, "is <number>", the answer
                 phrases, the last \\boxed{}, the clean-up (= and \\approx, units, \\text, $, \\%, 0.5 ->
                 \\frac{1}{2}); equal to the gold or the gold option's text as lower-case text, as tuples, or
                 as numbers to 2 decimals (latex2sympy2 when installed, else adapters/latex_value.read)
  cvbench        Cambrian's eval/eval/coco/coco_test.py (2D) and omni/omni_test.py (3D): lower case, the text
                 after "answer is" / "answer:", brackets and final period off, the first character = the gold
                 letter; reported score 1/2 x ((ADE20K accuracy + COCO accuracy) / 2 + Omni3D accuracy)
  puzzlevqa,     LLM-PuzzleTest prompting.py get_answer: the last "(A)"-"(D)", else the last capital A-D
  algopuzzlevqa  anywhere, -> that option's text (a letter past the options -> option A); exact match. No
                 letter at all: the official run asks the model again (second_round_prompt; 06_eval.py
                 --second-round)

A reply no rule can read (nothing to read, a number that does not convert, no letter) is "unscorable": wrong,
and counted apart by aggregate(). No reply, however hostile, raises out of verdict().
"""
import ast
import re
from dataclasses import dataclass

from adapters import latex_value

LETTERS = "ABCDEFGHIJ"
RIGHT, WRONG, UNSCORABLE = "right", "wrong", "unscorable"


@dataclass(frozen=True)
class Benchmark:
    hub_id: str  # the id datasets.load_dataset takes
    split: str  # the split the paper evaluates (MathVista's `test` has no answers; `testmini` does)
    image: str  # image column (MathVista, MathVision: `image` is a path string, `decoded_image` the picture)
    question: str  # column with the question text
    options: str  # column with the options: a list, a list's repr as a string, or empty / None (free form)
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
    # 2,000 rows (20 puzzles x 100), 3 or 4 options; the gold is the option text. On the hub `options` is
    # a string holding a Python list's repr ("['red', 'blue', 'green', 'yellow']"): the upload went via a CSV
    "puzzlevqa": Benchmark("declare-lab/PuzzleVQA", "train", "image", "question", "options", "answer"),
    # 1,800 rows (18 puzzles x 100), 2-4 options; the gold is the option text. The hub holds an Arrow upload
    # without a card schema: its one split is named `data` and `options` is a list of strings
    "algopuzzlevqa": Benchmark("declare-lab/AlgoPuzzleVQA", "data", "image", "question", "options",
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


def list_options(value, name: str = "options") -> list[str]:
    """A row's options as a list of strings, from either hub form: a list, or a list's repr held as a string.

    Example: list_options(["red", "blue"]) -> ["red", "blue"]; list_options("['red', \\"it's\\"]") -> ["red",
             "it's"]; list_options(None) -> [].
    """
    if value is None or value == "":
        return []
    if isinstance(value, str):
        try:
            value = ast.literal_eval(value.strip())  # a literal only: nothing in the string is run
        except (ValueError, SyntaxError) as error:
            raise ValueError(f"column '{name}' holds {value[:80]!r}: neither a list nor a Python list "
                             f"written as text ({error}). Check the hub's schema against "
                             f"adapters/benchmarks.py.") from error
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"column '{name}' holds a {type(value).__name__}, expected a list of options.")
    return [str(option) for option in value]


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
    options = list_options(row.get(s.options), s.options)
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


# ----------------------------------------------------------------------------- the verdict, the number
def verdict(name: str, predicted: str | None, row: dict, extraction: str | None = None) -> str:
    """RIGHT, WRONG or UNSCORABLE for the predicted answer (the <answer> text; None when missing) on `row` (a
    to_prompt_row output), by that benchmark's official rule. extraction: MathVista's answer as a model
    extracted it (06_eval.py --extractor-url), used in place of the rule-based extraction.

    Example: verdict("cvbench", "Answer: B", {"answer": "(B)", "source": "COCO", ...}) -> "right";
             verdict("mathvista", "nan", {"answer_type": "integer", "answer": "3", ...}) -> "unscorable".
    """
    spec(name)
    try:
        if name == "mathvista":
            return mathvista_verdict(predicted or "", row, extraction)
        return {"mathvision": mathvision_verdict, "cvbench": cvbench_verdict, "puzzlevqa": puzzle_verdict,
                "algopuzzlevqa": puzzle_verdict}[name](predicted or "", row)
    except Exception:  # a last guard, whatever a reply or a row holds: an evaluation never stops on one
        return UNSCORABLE


def score(name: str, predicted: str | None, row: dict) -> bool:
    """Is the predicted answer right for `row`? Example: score("mathvista", "B", {"answer": "4", "options":
    ["3", "4"], "answer_type": "multi_choice", ...}) -> True. Missing or unreadable is never right."""
    return verdict(name, predicted, row) == RIGHT


def aggregate(name: str, rows: list[dict]) -> dict:
    """The number each benchmark reports, from rows with "correct" (bool), optionally "unscorable" (bool: no
    answer could be read; counted wrong, and counted here) and, for CV-Bench, "source".

    Plain mean elsewhere. CV-Bench: 1/2 x ((acc_ADE20K + acc_COCO) / 2 + acc_Omni3D). When a source is absent
    (e.g. the first 200 test rows are all 2D), the mean over the parts present, and "complete": False.
    Example: ADE20K 1/2, COCO 1/1, Omni3D 0/1 -> 1/2 x ((0.5 + 1) / 2 + 0) = 0.375 (plain mean: 2/4 = 0.5).
    """
    spec(name)
    if not rows:
        raise ValueError("aggregate needs at least one row.")
    mean = sum(bool(r["correct"]) for r in rows) / len(rows)
    unscorable = sum(bool(r.get("unscorable")) for r in rows)
    if name != "cvbench":
        return {"accuracy": mean, "n": len(rows), "unscorable": unscorable}
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
            "complete": len(two_d) == 2 and "Omni3D" in by_source, "unscorable": unscorable}


# ----------------------------------------------------------------------------- MathVista
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


NUMBER_RE = re.compile(r"-?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
UNICODE_MINUS = {0x2212: ord("-"), 0x2013: ord("-")}  # −11 and –11: minus signs, not dashes to drop


def mathvista_needs_model(response: str, row: dict) -> bool:
    """Would the official extract_answer.py ask its model (GPT-4) for this reply? Not when the reply is empty,
    is one of the options, is an integer (integer questions) or a number (float questions), or says
    'The answer is "..."'. Example: mathvista_needs_model("12", {"answer_type": "integer", ...}) -> False."""
    return mathvista_shortcut(response, row) is None


def mathvista_shortcut(response: str, row: dict) -> str | None:
    """The extraction extract_answer.py makes without a model, or None where it would ask one."""
    if response == "":
        return ""
    if row["answer_type"] == "multi_choice" and response in row["options"]:
        return response
    try:
        if row["answer_type"] == "integer":
            return str(int(response))
        if row["answer_type"] == "float":
            return str(float(response))
    except (ValueError, OverflowError):
        pass
    quoted = re.search(r'The answer is "(.*)"\.', response)
    return quoted.group(1) if quoted else None


def mathvista_rules(response: str, row: dict) -> str:
    """Our deterministic stand-in for the model extraction: what its examples return, read with rules.

    Multi-choice: a lone leading capital ("B", "B.", "B) 12", "B: 12") is that letter; a reply holding "(b)"
    is left whole (the normaliser reads the letter); else the reply (the normaliser picks the nearest option).
    Integer / float: the number after the last "=", else the first number, with a Unicode minus read as "-"
    and thousands separators dropped. Lists and text: the reply.
    Example: mathvista_rules("x = 2 + 3 = 5", integer row) -> "5";
             mathvista_rules("C. 12", choice row) -> "C".
    """
    text = response.translate(UNICODE_MINUS).strip()
    if row["answer_type"] == "multi_choice":
        letter = re.match(r"([A-Z])(?:[.):](?:\s|$)|$)", text)
        return letter.group(1) if letter and not re.search(r"\([A-Za-z]\)", text) else text
    if row["answer_type"] in ("integer", "float"):
        text = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", text)
        found = NUMBER_RE.search(text.rsplit("=", 1)[-1]) or NUMBER_RE.search(text)
        return found.group(0) if found else text
    return text


def mathvista_normalize(extraction: str, row: dict) -> str | None:
    """calculate_score.py's normalize_extracted_answer: the extraction in the gold's form (None: it has none).

    Example: choices ["(a)", "(b)"]: "(b)" -> letter B -> "(b)"; choices ["3", "4"]: "B" -> "4", "b" -> "3"
             (not a capital: the nearest option); integer: "12.7" -> "12", "nan" -> None; float, precision 1:
             "0.66" -> "0.7".
    """
    answer_type = row["answer_type"]
    if answer_type == "multi_choice":
        choices, extraction = row["options"], extraction.strip()
        if not choices or not extraction:  # the official code maps "" to the nearest option; we do not guess
            return None
        letter = re.findall(r"\(([a-zA-Z])\)", extraction)
        extraction = letter[0].upper() if letter else extraction
        if extraction in LETTERS[:len(choices)]:
            return choices[LETTERS.index(extraction)]
        distances = [edit_distance(extraction, choice) for choice in choices]
        return choices[distances.index(min(distances))]  # the first nearest, as official
    try:
        if answer_type == "integer":
            return str(int(float(extraction)))
        if answer_type == "float":
            return str(round(float(extraction), int(row["precision"])))
    except (ValueError, OverflowError, TypeError):  # "nan", "inf", "1e999", no precision: no number
        return None
    return extraction  # list: str(extraction); text (no official rule): as is


def mathvista_verdict(response: str, row: dict, extraction: str | None = None) -> str:
    """Extract (the official shortcuts, then the model's extraction or our rules), normalise, compare."""
    if extraction is None:
        extraction = mathvista_shortcut(response, row)
        extraction = mathvista_rules(response, row) if extraction is None else extraction
    prediction = mathvista_normalize(extraction, row) if extraction else None
    if prediction is None:
        return UNSCORABLE
    return RIGHT if prediction == row["answer"] else WRONG


MATHVISTA_EXTRACTION_PROMPT = """Copy the final answer out of a model's reply to a question. Write only the
answer: for a multiple-choice question the option letter or the option text the reply chose, for a numeric
question the number alone (no units, no words), for a list the list as [a, b, c]. If the reply gives no
answer, write nothing.

Question: {question}

Model's reply: {reply}

Extracted answer:"""


def mathvista_extraction_prompt(question: str, reply: str) -> str:
    """The prompt a model answers with the extraction (06_eval.py --extractor-url). Ours, in our words: the
    official prompt (few-shot examples ahead of the query and the reply) is not copied."""
    return MATHVISTA_EXTRACTION_PROMPT.format(question=question.strip(), reply=reply.strip())


def mathvista_model_extractions(client, questions: list[str], replies: list[str], answers: list[str | None],
                                rows: list[dict]) -> list[str | None]:
    """The official extraction step with a model: for each completion, None where the official shortcuts
    apply to its answer (verdict() then takes them) or the reply is empty, else the model's extraction from
    the whole reply (asked too when the reply has no <answer>; "" when the endpoint returned no chat
    completion: unscorable). client: anything with complete(prompts) -> replies (adapters/judge.py's
    UrlJudge, the judge's client)."""
    ask = [i for i, (answer, reply, row) in enumerate(zip(answers, replies, rows))
           if (mathvista_needs_model(answer, row) if answer is not None else reply.strip())]
    prompts = [mathvista_extraction_prompt(questions[i], replies[i]) for i in ask]
    extracted = client.complete(prompts) if prompts else []
    out: list[str | None] = [None] * len(answers)
    for i, text in zip(ask, extracted):
        out[i] = (text or "").strip()
    return out


# ----------------------------------------------------------------------------- MathVision
ANSWER_PHRASES = ("the final answer is", "the answer is", "the correct answer is", "the answer should be")


def is_number(text: str) -> bool:
    """Python's float() accepts it (so do "nan", "inf" and "1_000", as in the official is_number)."""
    try:
        float(text)
        return True
    except ValueError:
        return False


def mathvision_answer(response: str) -> str:
    """evaluate.py's model_answer: a closing " B." / "(B)." or an opening "B\\n" is B; a number after the last
    "is " is that number; without \\boxed, the text after the last answer phrase (its first line and
    sentence); with several \\boxed, the last; then find_math_answer and (a)->a, {a}->a, no final period or
    leading colon.

    Example: mathvision_answer("So the answer is (B).") -> "b";
             mathvision_answer("x = 4 \\\\text{ km}") -> "4";
             mathvision_answer("\\\\boxed{1} or \\\\boxed{\\\\frac{3}{2}}") -> "\\\\frac{3}{2}".
    """
    text = response.strip()
    for letter in "ABCDE":
        if (text.endswith(f" {letter}.") or text.endswith(f" ({letter}).") or text.startswith(f"{letter}\n")
                or text.startswith(f"({letter})\n") or text.startswith(f"({letter}) {letter}\n")):
            text = letter
    tail = text.split("is ")[-1].rstrip(".")
    text = tail if is_number(tail) else text
    if "oxed{" not in text:
        for phrase in ANSWER_PHRASES:
            for spelling in (phrase, phrase.replace("the", "The")):
                found = spelling in text
                text = text.split(spelling)[-1].strip()
                if found:
                    text = text.split("\n")[0].split(". ")[0]
    elif text.count("oxed{") > 1:
        text = "\\boxed{" + text.split("oxed{")[-1]
    text = find_math_answer(text)
    for letter in "abcde":
        text = text.replace(f"({letter})", letter).replace(f"{{{letter}}}", letter)
    return text.rstrip(".").lstrip(":").strip()


MATH_CLEANUP = [(" ", ""), ("\\,", ""), ("∞", "\\infty"), ("+\\infty", "\\infty"), ("\\\\", "\\"),
                ("\n", ""), ("\\text", ""), ("\\mbox", ""), ("bmatrix", "pmatrix"), ("\\left", ""),
                ("\\right", ""), ("^{\\circ}", ""), ("^\\circ", ""), ("{m}^3", ""), ("m^3", ""),
                ("{units}", ""), ("units", ""), ("{km}", ""), ("km", "")]


def find_math_answer(text: str) -> str:
    """utils.py's find_math_answer: lower case, the content of \\boxed{...} up to the last "}", cut at a stray
    "}", the part after the last "=" and "\\approx", units and LaTeX dressing removed, then strip_string.

    Example: find_math_answer("\\\\boxed{x \\\\approx 2.5 \\\\text{km}}") -> "2.5".
    """
    text = text.lower().replace("{}", "")
    start, end = text.find("oxed{"), text.rfind("}")
    answer = text[start + 5:end] if 0 <= start and start + 5 <= end else text
    close, open_ = answer.find("}"), answer.find("{")
    if close != -1 and (open_ == -1 or close < open_):
        answer = answer.split("}")[0]
    answer = answer.split("=")[-1].split("\\approx")[-1]
    for old, new in MATH_CLEANUP:
        answer = answer.replace(old, new)
    return strip_string(answer)


def strip_string(text: str) -> str:
    """utils.py's _strip_string: more clean-up, then 0.5 -> \\frac{1}{2} and 3/4 -> \\frac{3}{4}.

    Example: strip_string("\\\\dfrac12") -> "\\\\frac{1}{2}"; strip_string(".5") -> "0.5" -> "\\\\frac{1}{2}".
    """
    for old, new in [("\n", ""), ("\\!", ""), ("\\\\", "\\"), ("tfrac", "frac"), ("dfrac", "frac"),
                     ("\\left", ""), ("\\right", ""), ("^{\\circ}", ""), ("^\\circ", ""), ("\\$", ""),
                     ("$", "")]:
        text = text.replace(old, new)
    text = text.split("\\text{ ")[0].replace("\\%", "").replace(" .", " 0.").replace("{.", "{0.")
    if not text:
        return text
    text = "0" + text if text[0] == "." else text
    for mark in ("=", "\\approx"):
        if len(text.split(mark)) == 2:
            text = text.split(mark)[-1]
    if "sqrt" in text:
        text = braced_sqrt(text)
    text = text.replace(" ", "")
    if "sqrt" in text:  # the official code braces fractions only here
        text = braced_fracs(text)
    text = "\\frac{1}{2}" if text == "0.5" else text
    parts = text.split("/")
    try:  # an integer fraction written canonically: 3/4, -3/4 (not 03/4, 3.0/4)
        numerator, denominator = int(parts[0]), int(parts[-1])
        if len(parts) == 2 and text == f"{numerator}/{denominator}":
            text = f"\\frac{{{numerator}}}{{{denominator}}}"
    except ValueError:
        pass
    return text


def braced_sqrt(text: str) -> str:
    """\\sqrt3 -> \\sqrt{3} (one character). Example: braced_sqrt("2\\\\sqrt3") -> "2\\\\sqrt{3}"."""
    head, *parts = text.split("\\sqrt")
    return head + "".join(f"\\sqrt{{{p[0]}}}{p[1:]}" if p and p[0] != "{" else f"\\sqrt{p}" for p in parts)


def braced_fracs(text: str) -> str:
    """\\frac12 -> \\frac{1}{2}, \\frac1{2} -> \\frac{1}{2}; the text unchanged when a \\frac has under two
    characters after it. Example: braced_fracs("\\\\frac1\\\\sqrt{2}") -> "\\\\frac{1}\\\\sqrt{2}"."""
    head, *parts = text.split("\\frac")
    out = head
    for part in parts:
        if part[:1] == "{":
            out += "\\frac" + part
        elif len(part) < 2:
            return text
        elif part[1] != "{":
            out += f"\\frac{{{part[0]}}}{{{part[1]}}}{part[2:]}"
        else:
            out += f"\\frac{{{part[0]}}}{part[1:]}"
    return out


def value_tuple(text: str) -> str:
    """utils.py's eval_tuple: "(a,b)" / "[a,b]" with each part's value rounded to 2 decimals, as text; the
    text unchanged when it is not one or a part has no value.
    Example: value_tuple("(\\\\frac{1}{2},3)") -> "(0.5,3)"."""
    parts = text[1:-1].split(",")
    brackets = text[:1] + text[-1:]
    if brackets not in ("()", "[]") or len(parts) < 2:
        return text
    values = []
    for part in parts:
        if "infty" in part or part in ("a", "-a"):
            values.append(part)
            continue
        number = latex_value.value(part)
        if not isinstance(number, (int, float)):
            return text
        values.append(str(round(number, 2)))
    return brackets[0] + ",".join(values) + brackets[1]


def mathvision_equal(answer: str, gold: str) -> bool:
    """utils.py's is_equal: lower case; empty never matches; equal as text, as value tuples, or as numbers
    rounded to 2 decimals. Example: mathvision_equal("5\\\\sqrt{3}", "$5 \\\\sqrt{3}$") -> True (8.66)."""
    answer, gold = answer.lower(), gold.lower()
    if not answer.replace(" ", "") or not gold.replace(" ", ""):
        return False
    if answer.strip() == gold.strip():
        return True
    answer, gold = value_tuple(answer), value_tuple(gold)
    if answer == gold:
        return True
    a, g = latex_value.value(answer), latex_value.value(gold)
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (a, g))
    return numbers and round(a, 2) == round(g, 2)


def mathvision_verdict(response: str, row: dict) -> str:
    """Right if the answer equals the gold (a letter, or free form) or the gold option's text."""
    gold, options = row["answer"], row["options"]
    if not gold.strip():
        return UNSCORABLE  # no gold to compare with
    gold_text = ""
    if options:
        index = LETTERS.find(gold) if len(gold) == 1 else -1
        if not 0 <= index < len(options):
            return UNSCORABLE  # a gold that names no option (the official code raises here)
        gold_text = options[index]
    answer = mathvision_answer(response)
    if not answer:
        return UNSCORABLE
    return RIGHT if mathvision_equal(answer, gold) or mathvision_equal(answer, gold_text) else WRONG


# ----------------------------------------------------------------------------- CV-Bench
def cvbench_letter(text: str, source: str) -> str:
    """The official per-question reading: lower case, the text after the last "answer is" / "answer is:" /
    "answer:", stripped, the final period (Omni3D: also ":" and ",") and the brackets off, the first
    character.

    Example: cvbench_letter("The answer is (B).", "COCO") -> "b";
             cvbench_letter("B, two cars", "COCO") -> "b";
             cvbench_letter("I think (B)", "COCO") -> "i".
    """
    text = text.lower().strip()
    for keyword in ("answer is", "answer is:", "answer:"):
        if keyword in text:
            text = text.split(keyword)[-1]
    text = text.strip().rstrip(".:," if source == "Omni3D" else ".").lstrip("(").rstrip(")")
    return text[:1]


def cvbench_verdict(response: str, row: dict) -> str:
    """The letter read equals the gold "(A)"'s letter; on Omni3D rows a one-character option text equal to the
    gold option's text counts too (omni_test.py compares both)."""
    gold = row["answer"].lower()
    if len(gold) < 2:
        return UNSCORABLE  # the official code reads the letter at index 1 of "(a)"
    letter = cvbench_letter(response, row["source"])
    if not letter:
        return UNSCORABLE
    index = LETTERS.lower().find(gold[1])
    options = row["options"]
    gold_text = options[index] if row["source"] == "Omni3D" and 0 <= index < len(options) else None
    return RIGHT if letter in (gold[1], gold_text) else WRONG


# ----------------------------------------------------------------------------- PuzzleVQA and AlgoPuzzleVQA
def puzzle_pick(text: str, options: list[str]) -> str | None:
    """prompting.py's get_answer: the last "(A)"-"(D)", else the last capital A-D anywhere, -> that option's
    text (a letter past the options -> option A); None when the text holds neither.

    Example: puzzle_pick("(A) or rather (C)", ["red", "blue", "green"]) -> "green";
             puzzle_pick("Blue", ["red", "blue", "green"]) -> "blue" (the B of "Blue");
             puzzle_pick("D", ["red", "blue", "green"]) -> "red"; puzzle_pick("green", [...]) -> None.
    """
    found = re.findall(r"\(([ABCD])\)", text) or re.findall(r"[ABCD]", text)
    return dict(zip("ABCD", options)).get(found[-1], options[0]) if found else None


def puzzle_verdict(response: str, row: dict) -> str:
    """Exact match of the picked option with the gold text; no letter: unscorable."""
    if not row["options"]:
        return UNSCORABLE
    picked = puzzle_pick(response, row["options"])
    if picked is None:
        return UNSCORABLE
    return RIGHT if picked == row["answer"] else WRONG


SIZE_OPTIONS = {"small", "medium", "large"}


def needs_second_round(name: str, predicted: str | None, row: dict) -> bool:
    """Would the official puzzle run ask the model a second time? When the answer names no option letter.
    Example: needs_second_round("puzzlevqa", "green", row) -> True; (..., "(C)", row) -> False."""
    return name in ("puzzlevqa", "algopuzzlevqa") and bool(row["options"]) and \
        puzzle_pick(predicted or "", row["options"]) is None


def second_round_prompt(question: str, reply: str, options: list[str]) -> str:
    """The official second prompt (main.py's model-based extraction): the first prompt, the model's whole
    reply, a blank line, then "Therefore, among (A) (B) (C) (D), the answer is:" ((D) dropped for small /
    medium / large options only, as official; a Yes / No puzzle keeps all four letters).

    Example: second_round_prompt("Q?\\n(A) 1\\n(B) 2", "I think 2", ["1", "2"])
             -> "Q?\\n(A) 1\\n(B) 2\\nI think 2\\n\\nTherefore, among (A) (B) (C) (D), the answer is:".
    """
    last = "Therefore, among (A) (B) (C) (D), the answer is:"
    if set(options) == SIZE_OPTIONS:
        last = last.replace(" (D)", "")
    return "\n".join([question, reply, "", last])


def second_round_verdict(reply: str | None, row: dict) -> str:
    """The verdict on the second reply, read whole with get_answer's rule (official: the new raw output)."""
    try:
        return puzzle_verdict(reply or "", row)
    except Exception:  # the same guard as verdict()
        return UNSCORABLE


# ----------------------------------------------------------------------------- loading from the hub
def load(name: str, split: str | None = None):
    """datasets.load_dataset(hub id, split) mapped through to_prompt_row: a Dataset with our columns.

    The image column is renamed to "image" without decoding it (the map reads it undecoded and leaves it
    alone); every other raw column is replaced by ours.
    """
    from datasets import Features, Image, List, Value, load_dataset

    s = spec(name)
    try:
        ds = load_dataset(s.hub_id, split=split or s.split)
    except ValueError as error:  # e.g. Unknown split "train". Should be one of ['data'].
        raise SystemExit(f"{s.hub_id}: cannot load split {split or s.split!r} ({error}). Name the split "
                         f"the hub has with 06_eval.py --benchmark-split.") from error
    missing = [c for c in (s.image, s.question, s.options, s.answer) + s.extra if c not in ds.column_names]
    if missing:
        raise SystemExit(f"{s.hub_id} (split {split or s.split}): no column(s) {missing}; "
                         f"columns: {ds.column_names}.")
    ds = ds.cast_column(s.image, Image(decode=False))
    features = Features({s.image: ds.features[s.image], "question": Value("string"),
                         "answer": Value("string"), "options": List(Value("string")),
                         "answer_type": Value("string"), "precision": Value("int32"),
                         "source": Value("string")})

    def our_columns(row: dict, index: int) -> dict:
        try:
            mapped = to_prompt_row(name, row)
        except ValueError as error:
            raise SystemExit(f"{s.hub_id} (split {split or s.split}), row {index}: {error}") from error
        del mapped["image"]  # kept as is, under its own name until the rename below
        return mapped

    ds = ds.map(our_columns, with_indices=True, remove_columns=[c for c in ds.column_names if c != s.image],
                features=features, desc=f"{name}: to our columns")
    ds = ds.cast_column(s.image, Image())
    return ds.rename_column(s.image, "image") if s.image != "image" else ds
