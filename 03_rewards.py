"""Stage 3: rewards. The task reward (format + accuracy) and the consistency reward (the CRM).

For completion i of a prompt with true answer y:

  r_fmt_i  = format_weight  if the completion is exactly <think>...</think><answer>...</answer>
             (whitespace around them allowed, multi-line thinking allowed, non-empty answer), else 0
  r_acc_i  = 1  if the last <answer> matches y (stage1.answers_match: integers exactly, decimals within
             a relative 1e-6, 1,000 / 1/2 / \\boxed{3} / $3$ read as numbers, option letters, normalised
             strings), else 0. On a paper benchmark (stage 1's --dataset mathvista, cvbench, ...) the
             benchmark's official comparison instead (adapters/benchmarks.py: "(B)" against the gold option
             text, a precision, CV-Bench's "(A)"): stages 5 and 6 pass it (score_completions' benchmark);
             this stage's own command still uses answers_match (rollouts.jsonl does not record its split).
  r_task_i = r_acc_i + r_fmt_i
  r_cons_i = lambda_cons * p_i,   p_i = P_CRM(consistent | premise = question + thinking_i,
                                               hypothesis = "The final answer is {answer_i}.")
             and p_i = 0, without calling the CRM, when there is no <think> or no non-empty <answer>.

lambda_cons only matters for stage 4's `sum` (r_task + r_cons, then one z-score). HRAS z-scores r_cons
within its group, where a scale cancels: z(lambda p) = (p - mean p) / (std p + cons_eps / lambda), so any
lambda > 0 gives the same advantages up to cons_eps (and lambda = 0 makes r_cons constant: z = 0).
GRPO never reads r_cons. Each record keeps p itself as crm_prob, whatever lambda_cons is.

What the CRM reads is cut, by tokens, never characters (stage 1's encode_pairs): a pair longer than
crm_max_length tokens keeps the question and the *end* of the thinking (where the conclusion sits) and
drops the thinking's middle, and the hypothesis, so the answer, keeps its first 64 tokens. A completion
within those bounds reaches the CRM whole.

The rule oracle of stage 1 is recorded next to the CRM's probability for embedded tasks, link by link:
oracle_steps (the thinking's steps imply its conclusion), oracle_answer (the <answer> equals that
conclusion) and oracle_consistent (both). It is ground truth for evaluation and analysis only; it is
never a training reward. Malformed output (missing, nested, repeated or unclosed tags, an empty answer,
garbage) is data: it scores 0 where it should and never raises, and every step runs in time linear in
the completion's length (no regex that backtracks). Every reward is finite or the stage stops with the
completion named: a NaN reward would turn its whole group's advantages into NaN.

Reads:  runs/<run>/rollouts.jsonl (02_rollout.py), runs/<run>/crm/ (01_sft_rm.py).
Writes: runs/<run>/rewards.jsonl, one row per prompt with one reward record per completion. An empty or
        broken rollouts.jsonl stops the stage before anything is written (the old rewards.jsonl stays).
Run:    python 03_rewards.py [--lambda-cons 1.0]
"""
import importlib
import itertools
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch


# Earlier stages, by file name: "01_sft_rm" cannot follow `import`, but import_module takes it (the
# stages' folder is on sys.path when one runs as a script). Imports flow forward only.
stage1 = importlib.import_module("01_sft_rm")


@dataclass
class Config:
    run: str = "default"  # run folder: runs/<run>/
    runs_dir: str = "runs"  # parent folder of all runs
    crm: str | None = None  # consistency reward model; None = runs/<run>/crm_rl if stage 1 made it, else crm
    lambda_cons: float = 1.0  # r_cons = lambda*P; changes only --advantage sum (a z-score drops the scale)
    format_weight: float = 1.0  # reward for a well-formed completion
    crm_batch_size: int = 64  # pairs per CRM forward
    crm_max_length: int | None = None  # CRM tokens a pair (None: as trained); beyond: thinking's middle cut
    device: str = "cuda" if torch.cuda.is_available() else "cpu"  # where the CRM runs
    dtype: str = "auto"  # compute precision: auto = bf16 on CUDA, fp32 on CPU (01_sft_rm.compute_dtype)


def check_config(cfg: Config) -> None:
    """Refuse flags that would make a reward non-finite or a batch empty, before anything is loaded."""
    for flag, value in [("--lambda-cons", cfg.lambda_cons), ("--format-weight", cfg.format_weight)]:
        if not math.isfinite(value):
            raise SystemExit(f"{flag} {value}: must be a finite number (it scales a reward).")
    if cfg.crm_batch_size < 1:
        raise SystemExit(f"--crm-batch-size {cfg.crm_batch_size}: must be at least 1.")
    if cfg.crm_max_length is not None and cfg.crm_max_length <= 64:  # the answer alone may take 64 tokens
        raise SystemExit(f"--crm-max-length {cfg.crm_max_length}: must be above 64, or left unset "
                         f"(the length stage 1 trained the CRM with).")
    stage1.check_device(cfg.device)
    if cfg.crm:
        stage1.check_classifier("--crm", cfg.crm)


TAG_RE = re.compile(r"</?(?:think|answer)>")  # one of the four tags; nothing repeats, so a scan is linear


def format_reward(text: str, weight: float = 1.0) -> float:
    """`weight` for exactly one <think> block then one non-empty <answer> block, nothing else: the tags are
    exactly <think> </think> <answer> </answer> in that order, with only whitespace outside the blocks.

    Example: format_reward("<think>\\n1, 2\\n</think> <answer>2</answer>") -> 1.0;
             format_reward("<think>a</think><answer></answer>") -> 0.0 (empty answer);
             format_reward("<think><think>a</think></think><answer>2</answer>") -> 0.0 (nested).
    """
    tags = list(itertools.islice(TAG_RE.finditer(text), 5))  # a fifth tag is already one too many
    if [tag.group() for tag in tags] != stage1.REASONING_TAGS:
        return 0.0
    think_open, think_close, answer_open, answer_close = tags
    outside = (text[:think_open.start()] + text[think_close.end():answer_open.start()]
               + text[answer_close.end():])
    answer = text[answer_open.end():answer_close.start()]
    return weight if answer.strip() and not outside.strip() else 0.0


def accuracy_reward(text: str, truth: str, benchmark: str | None = None, row: dict | None = None) -> float:
    """1.0 when the last <answer> matches the truth, else 0.0 (no answer never matches). With a benchmark,
    matched by that benchmark's official comparison against its row (answer, options, answer_type, ...).

    Example: accuracy_reward("<answer>(A)</answer>", "blue") -> 0.0 (a letter is not the text "blue");
             with benchmark="puzzlevqa", row={"answer": "blue", "options": ["blue", "red"], ...} -> 1.0.
    """
    _, answer = stage1.parse_completion(text)
    if benchmark is not None:
        from adapters import benchmarks

        return float(benchmarks.score(benchmark, answer, row))
    return float(stage1.answers_match(answer, truth))


# what benchmarks.score reads
COMPARATOR_COLUMNS = ("answer", "options", "answer_type", "precision", "source")


def run_benchmark(stage1_config: dict) -> str | None:
    """The paper benchmark a run trains on (stage 1's --dataset names one), else None."""
    from adapters import benchmarks

    return stage1_config["dataset"] if stage1_config["dataset"] in benchmarks.BENCHMARKS else None


def comparator_rows(data, indices: list[int], repeat: int = 1) -> list[dict]:
    """The comparator's columns of data rows (no image decoded), each `repeat` times (once per completion)."""
    columns = data.select_columns(list(COMPARATOR_COLUMNS))
    return [columns[i] for i in indices for _ in range(repeat)]


def crm_probabilities(crm, tokenizer, questions: list[str], texts: list[str], device, batch_size: int = 64,
                      max_length: int | None = None) -> list[float]:
    """P(consistent) per completion by the CRM; 0 (no CRM call) when think or answer is missing.
    A long thinking or answer is cut by tokens inside stage1.encode_pairs (never by characters here), to
    max_length tokens a pair, keeping the question and the thinking's end (None: what the CRM trained with).
    A non-finite probability (a CRM with NaN weights) is an error that names the completions."""
    parsed = [stage1.parse_completion(t) for t in texts]
    todo = [i for i, (think, answer) in enumerate(parsed) if think is not None and answer is not None]
    pairs = [{"question": questions[i], "thinking": parsed[i][0], "answer": parsed[i][1]} for i in todo]
    probs = [0.0] * len(texts)
    by_length = {} if max_length is None else {"max_length": max_length}  # None: crm_scores' own default
    scored = stage1.crm_scores(crm, tokenizer, pairs, device, batch_size, **by_length) if pairs else []
    for i, p in zip(todo, scored):
        probs[i] = p
    bad = [i for i in todo if not math.isfinite(probs[i])]
    if bad:
        raise ValueError(f"the CRM gave a non-finite P(consistent) for {len(bad)} completions (indices "
                         f"{bad[:10]}): its weights are probably broken; retrain it with 01_sft_rm.py "
                         f"or pass another --crm.")
    return probs


def consistency_rewards(crm, tokenizer, questions: list[str], texts: list[str], lambda_cons: float,
                        device, batch_size: int = 64, max_length: int | None = None) -> list[float]:
    """r_cons = lambda_cons * P(consistent) per completion (crm_probabilities); 0 when think or answer
    is missing.

    Example: lambda_cons 2 and P = [0.25, 0 (no <think>)] -> [0.5, 0.0].
    """
    if not math.isfinite(lambda_cons):
        raise ValueError(f"lambda_cons must be finite, got {lambda_cons}")
    probs = crm_probabilities(crm, tokenizer, questions, texts, device, batch_size, max_length)
    return [lambda_cons * p for p in probs]


def score_completions(texts: list[str], questions: list[str], truths: list[str], crm, crm_tokenizer,
                      cfg: Config, embedded: bool, benchmark: str | None = None,
                      rows: list[dict] | None = None) -> list[dict]:
    """Every reward component for every completion (flat lists, one record per completion); all finite:
      format, accuracy, task     the task reward and its parts
      consistency                r_cons = lambda_cons * crm_prob (the reward stage 4 reads)
      crm_prob                   P(consistent) by the CRM itself, whatever lambda_cons (0: nothing to parse)
      oracle_steps               the thinking's steps imply its conclusion (the rule oracle, embedded
                                 tasks only; None elsewhere, as the two below)
      oracle_answer              the <answer> equals that conclusion
      oracle_consistent          both links hold
    benchmark: score accuracy with that benchmark's comparator against rows (one per completion, as
    comparator_rows gives them) instead of answers_match against truths."""
    for name, value in [("lambda_cons", cfg.lambda_cons), ("format_weight", cfg.format_weight)]:
        if not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value}")
    if benchmark is not None and (rows is None or len(rows) != len(texts)):
        raise ValueError(f"benchmark {benchmark!r} needs one row per completion: {len(texts)} completions, "
                         f"{'no' if rows is None else len(rows)} rows.")
    rows = rows if benchmark is not None else [None] * len(texts)
    probs = crm_probabilities(crm, crm_tokenizer, questions, texts, cfg.device, cfg.crm_batch_size,
                              cfg.crm_max_length)
    records = []
    for text, truth, row, p in zip(texts, truths, rows, probs):
        r_fmt, r_acc = format_reward(text, cfg.format_weight), accuracy_reward(text, truth, benchmark, row)
        # ground truth for analysis only (embedded tasks: the traces' template)
        links = stage1.oracle_parts(*stage1.parse_completion(text)) if embedded else None
        records.append({"format": r_fmt, "accuracy": r_acc, "task": r_acc + r_fmt,
                        "consistency": cfg.lambda_cons * p, "crm_prob": p,
                        "oracle_steps": links["steps"] if links else None,
                        "oracle_answer": links["answer"] if links else None,
                        "oracle_consistent": links["steps"] and links["answer"] if links else None})
    return records


def check_rollouts(prompts: list[dict], path: Path) -> None:
    """Stop before anything is written (or a model loaded) when the rollouts cannot be scored."""
    remake = f"Rerun `{stage1.stage_command('02_rollout.py', path.parent)}` to remake {path.name}."
    if not prompts:
        raise SystemExit(f"{path} holds no prompts: nothing to score. {remake}")
    for number, p in enumerate(prompts, start=1):
        fields = isinstance(p, dict) and all(key in p for key in ("row", "question", "answer", "completions"))
        completions = p["completions"] if fields and isinstance(p["completions"], list) else []
        texts_ok = all(isinstance(c, dict) and isinstance(c.get("text"), str) for c in completions)
        if not (completions and texts_ok):
            raise SystemExit(f"{path}, prompt {number}: expected row, question, answer and a non-empty list "
                             f"of completions, each with a text. {remake}")


def main(cfg: Config) -> list[dict]:
    check_config(cfg)
    run_dir = Path(cfg.runs_dir) / cfg.run
    embedded = stage1.read_stage1(run_dir)["config"]["dataset"] is None
    rollouts = stage1.require(run_dir / "rollouts.jsonl", stage1.stage_command("02_rollout.py", run_dir))
    prompts = stage1.read_jsonl(rollouts)
    check_rollouts(prompts, rollouts)
    crm_path = cfg.crm or str(stage1.default_crm(run_dir))
    crm, crm_tokenizer = stage1.load_crm(crm_path, cfg.device, stage1.compute_dtype(cfg.device, cfg.dtype))
    crm.eval()
    texts = [c["text"] for p in prompts for c in p["completions"]]
    questions = [p["question"] for p in prompts for _ in p["completions"]]
    truths = [str(p["answer"]) for p in prompts for _ in p["completions"]]
    scores = score_completions(texts, questions, truths, crm, crm_tokenizer, cfg, embedded)

    rows, start = [], 0
    for p in prompts:
        n = len(p["completions"])
        rows.append({"row": p["row"], "question": p["question"], "answer": p["answer"],
                     "rewards": scores[start: start + n]})
        start += n
    stage1.write_jsonl_atomic(run_dir / "rewards.jsonl", rows)

    n = len(scores)
    print(f"\n{n} completions of {len(rows)} prompts; mean reward components:")
    for key in ("format", "accuracy", "task", "consistency", "crm_prob"):
        print(f"  {key:<12} {sum(s[key] for s in scores) / n:.3f}")
    if embedded:  # the oracle's verdict, and which link of the chain failed (a completion may fail both)
        print(f"  oracle inconsistency rate {sum(not s['oracle_consistent'] for s in scores) / n:.3f}: "
              f"steps -> conclusion fails {sum(not s['oracle_steps'] for s in scores) / n:.3f}, "
              f"conclusion -> answer fails {sum(not s['oracle_answer'] for s in scores) / n:.3f}")
    print(f"wrote {run_dir / 'rewards.jsonl'}")
    return rows


if __name__ == "__main__":
    main(stage1.parse_config(Config, __doc__.split("\n")[0]))
