"""Stage 6: evaluation, curves, and the end-to-end experiment (SFT vs GRPO vs CORA vs sum).

Reading guide: the file reads top to bottom as the lesson: Config, check_config, then 1. the metrics (what a
completion counts for), 2. evaluate (one checkpoint: sample, score, aggregate), 3. the table (mean ± standard
error over seeds) and 4. main() (the stage in order). Appendix A (the table's header; the examples page, where
one completion of every checkpoint on a few test prompts shows each kind that occurs; the curves), B
(--reproduce) and C (loading the rows and the checkpoints, a benchmark's official model calls) hold what a run
needs but the lesson does not: skip them on a first reading.

For each checkpoint, on the test split, K sampled completions per prompt (temperature T, the training
temperature; --temperature 0 = one greedy completion):

  accuracy          share of completions whose <answer> matches the truth; on a paper benchmark
                    (--benchmark, or a run trained on one) by its official comparison, and for CV-Bench
                    its official score 1/2 x ((ADE20K + COCO) / 2 + Omni3D) (adapters/benchmarks.py)
  format rate       share that is exactly <think>...</think><answer>...</answer>
  IR (CRM)          inconsistency rate by the consistency reward model: P(consistent) < 0.5
                    (nothing to parse counts as inconsistent)
  IR (oracle)       inconsistency rate by the rule oracle (embedded tasks): a link of the chain fails
  IR steps          share whose steps do not imply the thinking's conclusion (oracle; ir_steps)
  IR answer         share whose <answer> is not that conclusion (oracle; ir_answer). A completion may
                    fail both links, so IR (oracle) <= IR steps + IR answer.
  gap               IR (CRM) - IR (oracle) (ir_gap); a checkpoint where they differ by more than 5 points
                    is flagged above the table: there the policy's text fools the CRM (or it is too strict)
  CC CW IC IW       consistent/inconsistent x correct/wrong shares (oracle when there is one, else CRM)
  length            mean completion length in tokens

Why sampled, not greedy, by default: on the embedded tasks the SFT policy's greedy replies are almost always
consistent (the mode of a mixture in which stage 1's --inconsistent-frac of the traces are inconsistent),
while its samples often are not. RL trains on samples, and the sampled IR is what GRPO changes.

--reproduce runs the paper's recipe: stage 1, the GRPO runs (their rollouts saved), the CRM of those rollouts,
then CORA and sum with it (--methods adds the ablations), from one SFT checkpoint with the same seeds and
budget (resumable), then this evaluation: one table. --jobs N: N runs at once, one process each (Appendix B).

One process, also after a torchrun training: the checkpoints are whole Hugging Face folders, and the defaults
sample 800 completions (200 prompts x 4) per checkpoint, as many as 12.5 training steps of 8 prompts x 8.
Split over ranks, each rank would sample with its own random stream and the table would change with the
number of GPUs. A checkpoint that does not load or whose weights are not finite is named and skipped.

--benchmark NAME evaluates on that benchmark (the first --n rows of the split the paper reports, downloaded by
`datasets`) instead of the test split, with no oracle. Its official rule is deterministic; --second-round
(puzzles) and --extractor-url (MathVista) add the official pipelines' model calls (docs/benchmarks.md).

Reads:  runs/<run>/{data,crm_rl or crm,policy_sft}/, runs/<run>/<name>/{policy,metrics.jsonl} (stages 1, 5).
Writes: runs/<run>/eval.json, eval.md, curves.png, examples.md and examples/<row>.png
        (--benchmark NAME: eval_NAME.json, eval_NAME.md, examples_NAME.md, examples_NAME/ instead).
Run:    python 06_eval.py                      # every checkpoint found under runs/default
        python 06_eval.py --benchmark cvbench  # on CV-Bench (or mathvista, mathvision, puzzlevqa, ...)
        python 06_eval.py --reproduce          # the whole experiment (the README says how long it takes)
"""
import dataclasses
import importlib
import math
import os
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from tqdm import tqdm


# Earlier stages, by file name: "01_sft_rm" cannot follow `import`, but import_module takes it (the
# stages' folder is on sys.path when one runs as a script). Imports flow forward only.
stage1, stage2, stage3, stage5 = map(importlib.import_module,
                                     ["01_sft_rm", "02_rollout", "03_rewards", "05_grpo_train"])


@dataclass
class Config:
    run: str = "default"  # run folder: runs/<run>/
    runs_dir: str = "runs"  # parent folder of all runs
    checkpoints: str = ""  # "name=path,name=path"; empty = policy_sft and every runs/<run>/*/policy
    crm: str | None = None  # the CRM behind IR (CRM); None = runs/<run>/crm_rl if stage 1 made it, else crm
    n: int = 200  # test prompts
    samples: int = 4  # completions per prompt (1 when greedy)
    temperature: float = 1.0  # sampling temperature; 0 = greedy
    max_new_tokens: int = 64  # completion budget
    fast: str = "auto"  # sampler: on = static KV cache + compiled step, off = the simple loop; auto = on CUDA
    prompts_per_batch: int = 50  # prompts per generation batch
    seed: int = 1234  # sampling seed, the same for every checkpoint
    benchmark: str | None = None  # a paper benchmark to evaluate on instead of the test split (e.g. cvbench)
    benchmark_split: str | None = None  # the benchmark's split; None = the one the paper reports
    second_round: bool = False  # puzzles: ask the policy again when an answer names no option (official)
    extractor_url: str = ""  # MathVista: OpenAI-compatible endpoint whose model extracts answers (official)
    extractor_model: str = ""  # the model at --extractor-url (the official run used gpt-4-0613)
    examples: int = 6  # test prompts on the examples page (examples.md); 0 = no page
    # --reproduce
    reproduce: bool = False  # run stage 1, stage 5 for every method and seed, then evaluate all
    methods: str = "grpo,hras,sum"  # rows to train (METHODS); add hras-sftcrm, hras-guard for the ablations
    seeds: str = "0,1,2"  # training seeds
    train_steps: int = 80  # stage 5 steps per run
    scale: int = 1  # multiply train_steps and prompts per step (e.g. 4 on a GPU)
    jobs: str = "auto"  # stage-5 runs trained at once, one process each; auto = 2 on a CPU, 1 on CUDA
    device: str = "cuda" if torch.cuda.is_available() else "cpu"  # where models run
    dtype: str = "auto"  # compute precision: auto = bf16 on CUDA, fp32 on CPU (01_sft_rm.compute_dtype)


def check_config(cfg: Config) -> dict[str, str]:
    """Refuse flags that would crash or evaluate nothing, before anything loads: --checkpoints, parsed."""
    counts = {"--n": cfg.n, "--samples": cfg.samples, "--max-new-tokens": cfg.max_new_tokens,
              "--prompts-per-batch": cfg.prompts_per_batch, "--train-steps": cfg.train_steps,
              "--scale": cfg.scale}
    for flag, value in counts.items():
        if value < 1:
            raise SystemExit(f"{flag} {value}: must be at least 1.")
    if cfg.examples < 0:
        raise SystemExit(f"--examples {cfg.examples}: must be at least 0 (0 = no examples page).")
    if not (math.isfinite(cfg.temperature) and cfg.temperature >= 0):
        raise SystemExit(f"--temperature {cfg.temperature}: must be a finite number >= 0 (0 = greedy).")
    if cfg.fast not in ("auto", "on", "off"):
        raise SystemExit(f"--fast {cfg.fast}: use auto, on or off.")
    if cfg.jobs != "auto" and not (cfg.jobs.isdigit() and int(cfg.jobs) >= 1):
        raise SystemExit(f"--jobs {cfg.jobs}: use auto or a number of processes >= 1.")
    stage1.compute_dtype(cfg.device, cfg.dtype)  # an unknown --dtype is refused there
    check_benchmark_flags(cfg)  # --benchmark, --extractor-url and --extractor-model (Appendix C)
    check_reproduce_flags(cfg)  # with --reproduce: --methods and --seeds (Appendix B)
    checkpoints = parse_checkpoints(cfg.checkpoints)  # "name=path,..." as {name: path} (Appendix C)
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        raise SystemExit("06_eval.py runs on one process (see its docstring): run it with python, "
                         "not torchrun.")
    stage1.check_device(cfg.device)
    for path in checkpoints.values():  # a folder that is not there fails here, not after the others
        stage1.check_policy("--checkpoints", path)
    return checkpoints


# ------------------------------------- 1. metrics: what a completion counts for
def eval_metrics(records: list[dict]) -> dict:
    """Aggregate per-completion records {accuracy, format, crm_prob, oracle_consistent, length}.

    Example: records (acc, oracle) = (1, True), (1, False), (0, True), (0, True) with crm_prob
    0.9, 0.2, 0.6, 0.4 -> accuracy 0.5, IR oracle 0.25, IR CRM 0.5 (0.2 and 0.4 < 0.5),
    CC 0.25, CW 0.5, IC 0.25, IW 0.
    """
    n = len(records)
    oracle = records[0]["oracle_consistent"] is not None
    consistent = [r["oracle_consistent"] if oracle else r["crm_prob"] >= 0.5 for r in records]
    correct = [r["accuracy"] > 0 for r in records]

    def share(flags) -> float:
        return sum(flags) / n

    both = list(zip(consistent, correct))
    return {
        "accuracy": share(correct), "format_rate": share(r["format"] > 0 for r in records),
        "ir_crm": share(r["crm_prob"] < 0.5 for r in records),
        "ir_oracle": share(not r["oracle_consistent"] for r in records) if oracle else None,
        "CC": share(c and k for c, k in both), "CW": share(c and not k for c, k in both),
        "IC": share(k and not c for c, k in both), "IW": share(not c and not k for c, k in both),
        "length": sum(r["length"] for r in records) / n, "n": n}


def link_failure_rates(records: list[dict]) -> dict:
    """The oracle's two links apart: ir_steps, the share whose steps do not imply the thinking's conclusion,
    and ir_answer, the share whose <answer> is not that conclusion (both None without an oracle).

    Example: (oracle_steps, oracle_answer) = (True, True), (False, True), (True, False), (False, False)
    -> ir_steps 2/4 = 0.5, ir_answer 2/4 = 0.5 (and IR oracle 3/4: the last fails both).
    """
    if records[0]["oracle_steps"] is None:
        return {"ir_steps": None, "ir_answer": None}
    n = len(records)
    return {"ir_steps": sum(not r["oracle_steps"] for r in records) / n,
            "ir_answer": sum(not r["oracle_answer"] for r in records) / n}


def crm_against_oracle(records: list[dict]) -> dict:
    """Where the CRM and the oracle part (both None without an oracle):
      ir_gap                   IR (CRM) - IR (oracle): negative when the CRM calls consistent what the oracle
                               does not (the policy fooling it), positive when it is the stricter one
      crm_agreement            the share of completions on which the two agree
      steps_only               how many completions fail the steps link alone (their answer is their
                               conclusion: the kind only a CRM that reads the steps can catch)
      crm_catches_steps_only   the share of those that the CRM flags, P(consistent) < 0.5 (None when none)

    Example: (oracle_steps, oracle_answer, crm_prob) = (True, True, 0.9), (False, True, 0.8),
             (False, True, 0.3), (True, False, 0.1) -> IR oracle 3/4, IR CRM 2/4 (0.3, 0.1): ir_gap -0.25;
             they agree on all but the 0.8: agreement 3/4; two fail the steps alone, the CRM flags the 0.3:
             crm_catches_steps_only 0.5.
    """
    if records[0]["oracle_steps"] is None:
        return {"ir_gap": None, "crm_agreement": None, "steps_only": None, "crm_catches_steps_only": None}
    n = len(records)
    oracle = [r["oracle_steps"] and r["oracle_answer"] for r in records]
    crm = [r["crm_prob"] >= 0.5 for r in records]
    steps_only = [r["crm_prob"] for r in records if not r["oracle_steps"] and r["oracle_answer"]]
    caught = sum(p < 0.5 for p in steps_only) / len(steps_only) if steps_only else None
    return {"ir_gap": (sum(oracle) - sum(crm)) / n, "crm_agreement": sum(map(bool.__eq__, oracle, crm)) / n,
            "steps_only": len(steps_only), "crm_catches_steps_only": caught}


def kind_of(record: dict) -> str:
    """CC, CW, IC or IW: consistent/inconsistent (the oracle when there is one, else the CRM at 0.5) x
    correct/wrong, as eval_metrics counts them. Example: oracle False, accuracy 1 -> "IC"."""
    oracle = record["oracle_consistent"]
    consistent = oracle if oracle is not None else record["crm_prob"] >= 0.5
    return ("C" if consistent else "I") + ("C" if record["accuracy"] > 0 else "W")


# -------------------------------------------------- 2. evaluate: one checkpoint
@torch.no_grad()
def evaluate(model, processor, test, columns: dict, crm, crm_tokenizer, cfg: Config, embedded: bool,
             benchmark: str | None = None) -> tuple[dict, list[dict]]:
    """Sample, score and aggregate one checkpoint on the first cfg.n test prompts: (metrics, records), one
    record per completion (its test row, sample index, text, scores and kind). benchmark: test holds its rows
    (the comparator's columns too); accuracy is its official score, and "benchmark" its aggregate."""
    samples = cfg.samples if cfg.temperature > 0 else 1
    gen_cfg = stage2.Config(group_size=samples, prompts_per_batch=cfg.prompts_per_batch,
                            max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, device=cfg.device,
                            fast=cfg.fast)
    generator = torch.Generator(device=cfg.device).manual_seed(cfg.seed)
    if samples == 1:  # greedy: a group of one (stage 2 allows it; only the advantages need G >= 2)
        gen_cfg.temperature = 0.0
    rows = list(range(min(cfg.n, len(test))))
    prompts = stage2.rollout_prompts(model, processor, test, rows, columns, gen_cfg, generator)
    texts = [c["text"] for p in prompts for c in p["completions"]]
    questions = [p["question"] for p in prompts for _ in p["completions"]]
    truths = [p["answer"] for p in prompts for _ in p["completions"]]
    reward_cfg = stage3.Config(device=cfg.device)  # crm_prob is P itself, whatever lambda_cons
    indices = [p["row"] for p in prompts for _ in p["completions"]]  # the test row of each completion
    comparator = stage3.comparator_rows(test, indices) if benchmark else None
    scores = stage3.score_completions(texts, questions, truths, crm, crm_tokenizer, reward_cfg, embedded,
                                      benchmark, comparator)
    if benchmark:  # each completion's official verdict, and the number the benchmark reports (Appendix C)
        official = official_verdicts(model, processor, test, columns, prompts, scores, comparator,
                                     benchmark, cfg)
    completions = [(p, j, c) for p in prompts for j, c in enumerate(p["completions"])]
    records = [{**s, "row": p["row"], "question": p["question"], "answer": p["answer"], "sample": j,
                "text": c["text"], "length": c["length"]} for s, (p, j, c) in zip(scores, completions)]
    for r in records:
        r["kind"] = kind_of(r)
    metrics = eval_metrics(records) | link_failure_rates(records) | crm_against_oracle(records)
    if benchmark:  # accuracy is the official score (CV-Bench: not the plain mean over completions)
        metrics |= {"accuracy": official["accuracy"], "benchmark": official}
    return metrics, records


# ------------------------------- 3. the table: mean ± standard error over seeds
def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (sample std / sqrt(n); 0 for one value)."""
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, 0.0
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1) / len(values))


def markdown_table(results: dict[str, list[dict]]) -> str:
    """One row per method; cells 'mean +- se' over the checkpoints of that method (its seeds)."""
    keys = ["accuracy", "ir_oracle", "ir_steps", "ir_answer", "ir_crm", "ir_gap", "format_rate",
            "CC", "CW", "IC", "IW", "length"]
    keys = [k for k in keys if all(r.get(k) is not None for rs in results.values() for r in rs)]
    lines = ["| checkpoint | runs | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
    for name, rows in results.items():
        cells = []
        for k in keys:
            m, se = mean_se([r[k] for r in rows])
            if k == "length":
                cells.append(f"{m:.1f}")
            else:
                cells.append(f"{100 * m:.1f} ± {100 * se:.1f}" if len(rows) > 1 else f"{100 * m:.1f}")
        lines.append(f"| {name} | {len(rows)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def method_of(run_name: str) -> str:
    """The method a run belongs to: "hras_seed1" -> "hras" (runs of one method differ only by seed)."""
    return run_name.split("_seed")[0]


# -------------------------------------------------- 4. main: the stage in order
def main(cfg: Config) -> dict:
    checkpoints = check_config(cfg)  # every flag, before anything is read or loaded
    started = time.time()
    run_dir = Path(cfg.runs_dir) / cfg.run
    if cfg.reproduce:  # stage 1 and every stage-5 run first (Appendix B)
        reproduce(cfg)
    stage1_config = stage1.read_stage1(run_dir)["config"]
    embedded = stage1_config["dataset"] is None and cfg.benchmark is None  # the rule oracle: embedded only
    benchmark = cfg.benchmark or stage3.run_benchmark(stage1_config)  # None: answers_match, as in training
    test, columns = load_test_rows(cfg, run_dir, stage1_config)  # the test split, or --benchmark's rows
    checkpoints = checkpoints or run_checkpoints(run_dir)  # no --checkpoints: SFT and every stage-5 run
    dtype = stage1.compute_dtype(cfg.device, cfg.dtype)  # nothing trains here: every model is stored in it
    crm_path = cfg.crm or str(stage1.default_crm(run_dir))
    crm, crm_tokenizer = stage1.load_crm(crm_path, cfg.device, dtype)
    crm.eval()

    per_checkpoint, records, skipped = {}, {}, {}
    for name, path in tqdm(checkpoints.items(), desc="evaluating"):
        model, processor = load_checkpoint(name, path, cfg.device, dtype, skipped)  # None when skipped
        if model is None:
            continue
        per_checkpoint[name], records[name] = evaluate(stage1.unwrap(model).eval(), processor, test, columns,
                                                       crm, crm_tokenizer, cfg, embedded, benchmark)
        del model
    if not per_checkpoint:
        raise SystemExit(f"no checkpoint to evaluate: every one was skipped ({skipped}).")
    grouped: dict[str, list[dict]] = {}
    for name, metrics in per_checkpoint.items():
        grouped.setdefault(method_of(name), []).append(metrics)
    table = markdown_table(grouped)
    header = table_header(cfg, len(test), embedded, benchmark, crm_path, per_checkpoint, skipped)
    written = write_tables(cfg, run_dir, header + table, per_checkpoint, skipped)  # eval.json, eval.md
    written += examples_and_curves(cfg, run_dir, test, columns, records, embedded)
    print("\n" + header + table)
    print(f"\nwrote {', '.join(written)} in {run_dir} in {time.time() - started:.0f} s")
    return per_checkpoint


# ============================================================================================================
# Appendix A: the table's header, the examples page and the curves (skip on a first reading)
# ============================================================================================================


# A.1 the table's header and its files
def setting(cfg: Config, embedded: bool) -> tuple[str, str, str]:
    """Where the checkpoints were evaluated, how they sampled, and what judges the kinds (CC/CW/IC/IW)."""
    mode = f"{cfg.samples} samples at T={cfg.temperature}" if cfg.temperature > 0 else "greedy"
    where = "Test split"
    if cfg.benchmark:
        from adapters import benchmarks

        where = f"{cfg.benchmark} (split {cfg.benchmark_split or benchmarks.BENCHMARKS[cfg.benchmark].split})"
    return where, mode, "oracle" if embedded else "CRM"


GAP_FLAG = 0.05  # a checkpoint whose IR (CRM) and IR (oracle) differ by more than this is flagged


def table_header(cfg: Config, n_test: int, embedded: bool, benchmark: str | None, crm_path: str,
                 per_checkpoint: dict[str, dict], skipped: dict[str, str]) -> str:
    """The paragraphs above eval.md's table: what it measured and what its columns mean, the benchmark's
    official score and unscorable replies, the checkpoints skipped, and those whose CRM and oracle IR differ
    by more than GAP_FLAG."""
    where, mode, judge = setting(cfg, embedded)
    header = (f"{where}, first {min(cfg.n, n_test)} prompts, {mode}. Cells: % (mean ± standard error "
              f"over training seeds); IR = inconsistency rate; ir_steps / ir_answer = the oracle's steps -> "
              f"conclusion / conclusion -> answer link fails; CC/CW/IC/IW = consistent/inconsistent x "
              f"correct/wrong ({judge}).\n\n")
    if benchmark == "cvbench":
        complete = all(m["benchmark"]["complete"] for m in per_checkpoint.values())
        missing = "" if complete else "; a source absent from these prompts: the mean of the parts present"
        header += f"accuracy = CV-Bench's official score, 1/2 x ((ADE20K + COCO) / 2 + Omni3D){missing}.\n\n"
    header += f"IR (CRM) by {crm_path}; ir_gap = IR (CRM) - IR (oracle).\n\n" if embedded else ""
    if benchmark:  # replies no official rule could read: wrong, and counted (eval json: benchmark.unscorable)
        counts = [f"{name} {m['benchmark']['unscorable']} of {m['n']}" for name, m in per_checkpoint.items()]
        header += f"Unscorable (counted wrong): {', '.join(counts)}.\n\n"
    header += "".join(f"Skipped {name}: {why}.\n\n" for name, why in skipped.items())
    fooled = {name: m["ir_gap"] for name, m in per_checkpoint.items()
              if m["ir_gap"] is not None and abs(m["ir_gap"]) > GAP_FLAG}
    if fooled:  # the drift monitor's verdict on the finished policies
        header += ("CRM and oracle IR differ by more than 5 points on " + ", ".join(
            f"{name} ({100 * gap:+.1f})" for name, gap in fooled.items()) + ": there the CRM does not read "
            "the policy's text as the oracle does (a negative gap: the policy fools it). "
            "Read examples.md.\n\n")
    return header


def write_tables(cfg: Config, run_dir: Path, markdown: str, per_checkpoint: dict[str, dict],
                 skipped: dict[str, str]) -> list[str]:
    """eval.json (the config, each checkpoint's metrics, the checkpoints skipped) and eval.md (the header and
    the table), atomically: the names written."""
    out = f"eval_{cfg.benchmark}" if cfg.benchmark else "eval"  # a benchmark's table beside the test split's
    stage1.write_json_atomic(run_dir / f"{out}.json", {"config": dataclasses.asdict(cfg),
                                                       "checkpoints": per_checkpoint, "skipped": skipped})
    stage1.write_text_atomic(run_dir / f"{out}.md", markdown + "\n")
    return [f"{out}.json", f"{out}.md"]


def examples_and_curves(cfg: Config, run_dir: Path, test, columns: dict, records: dict[str, list[dict]],
                        embedded: bool) -> list[str]:
    """The examples page (--examples 0: none) and curves.png (when a stage-5 run logged metrics): the names
    written."""
    written = []
    if cfg.examples:
        where, mode, judge = setting(cfg, embedded)
        page = f"examples_{cfg.benchmark}" if cfg.benchmark else "examples"
        write_examples(run_dir, page, test, columns["image"], records, cfg.examples,
                       f"{where}, {mode}; kinds by the {judge}.")
        written += [f"{page}.md", f"{page}/"]
    panels = training_curves(run_dir)
    if any(panels.values()):
        plot_curves(panels, run_dir / "curves.png")
        written.append("curves.png")
    return written


# A.2 the examples page: a few test prompts, each with its image, question and true answer, and one completion
# of every checkpoint marked with its kind (CC/CW/IC/IW), the oracle's verdict link by link and the CRM's; the
# prompts and completions are picked from the ones just sampled so that every kind that occurs appears.
KINDS = {"CC": "consistent, correct", "CW": "consistent, wrong", "IC": "inconsistent, correct",
         "IW": "inconsistent, wrong"}


def pick_examples(records: dict[str, list[dict]], n: int) -> list[dict[str, dict]]:
    """n test prompts, each as {checkpoint: the one completion shown}, chosen so that every kind (CC/CW/IC/IW)
    in records appears on the page when n >= 4.

    Greedy: for each prompt, each checkpoint shows the sample whose kind is rarest on the page so far (the
    first sample on ties); the prompt whose shown completions add the most kinds not yet on the page is taken
    next (the lowest row on ties), so each pick adds an absent kind while one is left anywhere.
    Example: rows 0-9 all CC except row 7 of checkpoint b, sample 1, IW -> row 7 first, b showing sample 1.
    """
    by_row: dict[int, dict[str, list[dict]]] = {}
    for name, recs in records.items():
        for r in recs:
            by_row.setdefault(r["row"], {}).setdefault(name, []).append(r)
    on_page: Counter = Counter()  # kind -> completions of that kind shown so far

    def shown(row: int) -> tuple[dict[str, dict], Counter]:
        """What row would show (one completion per checkpoint) and the page's kind counts after it."""
        counts, choice = on_page.copy(), {}
        for name, samples in by_row[row].items():
            choice[name] = min(samples, key=lambda r: counts[r["kind"]])  # min keeps the first of equals
            counts[choice[name]["kind"]] += 1
        return choice, counts

    def new_kinds(row: int) -> int:
        return sum(1 for kind in shown(row)[1] if kind not in on_page)

    picked, left = [], sorted(by_row)
    while left and len(picked) < n:
        row = max(left, key=new_kinds)  # max keeps the first (lowest row) of equals
        choice, on_page = shown(row)
        picked.append(choice)
        left.remove(row)
    return picked


def save_image_atomic(image, path: Path) -> None:
    """A PNG through a temporary file and a rename (stage1.write_text_atomic's way for images)."""
    tmp = path.with_suffix(".tmp.png")
    image.save(tmp)
    os.replace(tmp, path)


def fenced(text: str) -> str:
    """text in a Markdown code block whose fence is longer than any run of backticks inside it."""
    longest, run = 0, 0
    for ch in text:
        run = run + 1 if ch == "`" else 0
        longest = max(longest, run)
    fence = "`" * max(3, longest + 1)
    return f"{fence}text\n{text}\n{fence}"


def verdicts(r: dict) -> str:
    """One line: the kind, the oracle link by link, the CRM."""
    crm_says = "consistent" if r["crm_prob"] >= 0.5 else "inconsistent"
    crm = f"CRM P(consistent) {r['crm_prob']:.2f}: {crm_says}"
    if r["oracle_consistent"] is None:
        oracle = "no oracle (kind by the CRM)"
    else:
        mark = {True: "holds", False: "fails"}
        oracle = (f"oracle {'consistent' if r['oracle_consistent'] else 'inconsistent'} (steps -> conclusion "
                  f"{mark[r['oracle_steps']]}, conclusion -> answer {mark[r['oracle_answer']]})")
    return f"kind **{r['kind']}** ({KINDS[r['kind']]}); {oracle}; {crm}"


def write_examples(run_dir: Path, page: str, test, image_column: str, records: dict[str, list[dict]], n: int,
                   header: str) -> Path:
    """runs/<run>/<page>.md with each picked prompt's image beside it as <page>/<row>.png. Atomic: each image,
    then the page, goes through a temporary file and a rename. Returns the page's path."""
    folder = run_dir / page
    folder.mkdir(parents=True, exist_ok=True)
    kinds = "; ".join(f"{k} = {v}" for k, v in KINDS.items())
    lines = [f"# Examples: {', '.join(records)} on a few test prompts", "", header.strip(), "",
             f"Kinds: {kinds}. Each checkpoint shows one of its completions per prompt, picked so that every "
             f"kind that occurs appears.", ""]
    for i, choice in enumerate(pick_examples(records, n), start=1):
        first = next(iter(choice.values()))
        image = folder / f"{first['row']}.png"
        save_image_atomic(stage1.row_image(test, first["row"], image_column), image)
        lines += [f"## {i}. Test row {first['row']}", "",
                  f"![test row {first['row']}]({page}/{image.name})", "",
                  f"**Question:** {first['question']}  ", f"**True answer:** {first['answer']}", ""]
        for name, r in choice.items():
            lines += [f"- **{name}**, sample {r['sample']}: {verdicts(r)}", "", fenced(r["text"]), ""]
    path = run_dir / f"{page}.md"
    stage1.write_text_atomic(path, "\n".join(lines))
    return path


# A.3 the curves (drawn with Pillow)
COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207)]


def moving_average(values: list[float], window: int = 10) -> list[float]:
    """The mean of each value and the window - 1 before it (fewer at the start).
    Example: [1, 2, 3, 4], window 2 -> [1, 1.5, 2.5, 3.5]."""
    averages = []
    for i in range(len(values)):
        recent = values[max(0, i - window + 1): i + 1]
        averages.append(sum(recent) / len(recent))
    return averages


def plot_curves(panels: dict[str, dict[str, list[tuple[int, float]]]], path: Path) -> None:
    """One panel per metric, one line per run (moving average of 10 steps), one colour per method
    ("hras_seed1" -> "hras"), saved as a PNG."""
    width, height, pad = 420, 300, 40
    image = Image.new("RGB", (width * len(panels), height + 30), "white")
    draw = ImageDraw.Draw(image)
    methods = sorted({method_of(name) for series in panels.values() for name in series})

    def colour(name: str) -> tuple[int, int, int]:  # one colour per method
        return COLOURS[methods.index(method_of(name)) % len(COLOURS)]

    for p, (title, series) in enumerate(panels.items()):
        x0 = p * width
        points = [pt for s in series.values() for pt in s]
        if not points:
            continue
        max_step = max(s for s, _ in points)
        lo, hi = min(v for _, v in points), max(v for _, v in points)
        lo, hi = (lo - 0.05, hi + 0.05) if hi - lo < 1e-9 else (lo, hi)

        def to_xy(step: int, value: float) -> tuple[float, float]:  # data -> pixel in this panel
            x = x0 + pad + (width - 2 * pad) * step / max(1, max_step)
            y = height - pad - (height - 2 * pad) * (value - lo) / (hi - lo)
            return x, y

        draw.rectangle([x0 + pad, pad, x0 + width - pad, height - pad], outline=(0, 0, 0))
        draw.text((x0 + pad, 10), title, fill=(0, 0, 0))
        draw.text((x0 + 2, pad - 5), f"{hi:.2f}", fill=(0, 0, 0))
        draw.text((x0 + 2, height - pad - 5), f"{lo:.2f}", fill=(0, 0, 0))
        draw.text((x0 + width - pad - 30, height - pad + 5), f"step {max_step}", fill=(0, 0, 0))
        for name, pts in series.items():
            smooth = moving_average([v for _, v in pts])
            draw.line([to_xy(s, v) for (s, _), v in zip(pts, smooth)], fill=colour(name), width=2)
    for i, method in enumerate(methods):
        draw.line([(pad + 120 * i, height + 14), (pad + 120 * i + 20, height + 14)],
                  fill=COLOURS[i % len(COLOURS)], width=2)
        draw.text((pad + 120 * i + 25, height + 8), method, fill=(0, 0, 0))
    save_image_atomic(image, path)


def training_curves(run_dir: Path) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """accuracy, oracle IR, CRM consistency and the drift monitor (CRM against oracle) against step, for every
    stage-5 run under run_dir."""
    keys = {"rollout accuracy": "accuracy", "rollout IR (oracle)": "oracle_inconsistency_rate",
            "rollout CRM consistency": "crm_consistency", "CRM-oracle disagreement": "crm_judge_disagreement"}
    panels = {title: {} for title in keys}
    for metrics in sorted(run_dir.glob("*/metrics.jsonl")):
        rows = stage5.read_metrics(metrics)  # a last line cut short (a killed run) is dropped with a warning
        for title, key in keys.items():
            points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]  # None: not measured
            if points:
                panels[title][metrics.parent.name] = points
    return panels


# ============================================================================================================
# Appendix B: --reproduce, the whole experiment in one command (skip on a first reading)
# Stage 1 once, then every (method, seed) stage-5 run from the same SFT checkpoint (finished runs are kept,
# killed ones resume), then main evaluates them all. --jobs N trains N runs at once, each in its own
# `python 05_grpo_train.py` process with cpu_count // N torch threads (its output in
# runs/<run>/<name>/stdout.log): on a CPU, small models use cores badly, so two 1-thread runs side by side
# finish sooner than one 2-thread run after the other. auto = 2 on a CPU with 2 cores or more, 1 on CUDA
# (one GPU, which processes would share).
# ============================================================================================================


# --reproduce's rows: each a stage-5 method and the CRM it trains with (a folder of runs/<run>/). Runs are
# named <method>_seed<seed>. The paper's recipe: GRPO first, its rollouts train crm_rl, the rest use it.
METHODS = {
    "grpo": {"advantage": "grpo", "crm": "crm"},  # the baseline; reads no CRM (logged only)
    "hras": {"advantage": "hras", "crm": "crm_rl"},  # CORA with the CRM of the GRPO runs' rollouts
    "sum": {"advantage": "sum", "crm": "crm_rl"},  # without HRAS: the rewards summed, then normalised
    "hras-sftcrm": {"advantage": "hras", "crm": "crm"},  # ablation: CORA with the CRM of SFT rollouts
    "hras-guard": {"advantage": "hras", "crm": "crm_rl", "crm_refresh": True},  # + the guard (05)
    "hras-ce05": {"advantage": "hras", "crm": "crm_rl", "cons_eps": 0.05},  # CRM float noise damped (04)
}


def check_reproduce_flags(cfg: Config) -> None:
    """check_config's part for --reproduce: every --methods a row of METHODS, --seeds integers."""
    if not cfg.reproduce:
        return
    unknown = [m for m in cfg.methods.split(",") if m not in METHODS]
    if unknown:
        raise SystemExit(f"--methods {cfg.methods}: {unknown} unknown; use a comma list of "
                         f"{', '.join(METHODS)}.")
    if not all(s.strip().lstrip("-").isdigit() for s in cfg.seeds.split(",")):
        raise SystemExit(f"--seeds {cfg.seeds}: use a comma list of integers, e.g. 0,1,2.")


def reproduce(cfg: Config) -> None:
    """The paper's recipe, end to end, every step kept once done: stage 1 (data, the SFT policy, the CRM of
    its rollouts: runs/<run>/crm); the GRPO runs, which save their rollouts; the CRM trained on those
    (stage 1 --crm-rollouts: runs/<run>/crm_rl); then every other (method, seed) run from the same SFT
    checkpoint. Stage-5 runs go one after the other in this process with --jobs 1, else in worker processes
    (run_in_processes)."""
    run_dir = Path(cfg.runs_dir) / cfg.run
    if not (run_dir / "stage1.json").exists():
        stage1.main(stage1.Config(run=cfg.run, runs_dir=cfg.runs_dir, device=cfg.device, dtype=cfg.dtype))
    methods = cfg.methods.split(",")
    train(pending_runs(cfg, run_dir, [m for m in methods if METHODS[m]["crm"] == "crm"]), run_dir, cfg)
    if any(METHODS[m]["crm"] == "crm_rl" for m in methods) and not (run_dir / "crm_rl").is_dir():
        if "grpo" not in methods:
            raise SystemExit(f"--methods {cfg.methods}: the CRM of the paper's recipe "
                             f"(runs/{cfg.run}/crm_rl) trains on the GRPO runs' rollouts: add grpo.")
        # the SFT-rollout CRM's own settings (steps, learning rate, backbone): the two differ in data only
        same = {k: v for k, v in stage1.read_stage1(run_dir)["config"].items()
                if k in ("seed", "crm", "crm_steps", "crm_batch_size", "crm_lr", "crm_max_length",
                         "warmup_steps")}
        rollouts = [str(run_dir / f"grpo_seed{s.strip()}" / "rollouts.jsonl") for s in cfg.seeds.split(",")]
        stage1.main(stage1.Config(run=cfg.run, runs_dir=cfg.runs_dir, crm_rollouts=",".join(rollouts),
                                  device=cfg.device, dtype=cfg.dtype, **same))
    train(pending_runs(cfg, run_dir, [m for m in methods if METHODS[m]["crm"] != "crm"]), run_dir, cfg)


def train(todo: list, run_dir: Path, cfg: Config) -> None:
    """Stage-5 runs: in this process one after the other (--jobs 1), else in worker processes."""
    jobs = worker_count(cfg.jobs, cfg.device)
    if jobs > 1 and todo:
        run_in_processes(todo, run_dir, jobs)
        return
    for config in todo:
        stage5.main(config)


def pending_runs(cfg: Config, run_dir: Path, methods: list[str] | None = None) -> list:
    """The stage-5 configs of every (method, seed) run still to train (methods: None = all of --methods), in
    order; a run with a summary.json is done and kept, one killed after a checkpoint resumes from it
    (--resume), any other starts anew."""
    todo = []
    for method in methods or cfg.methods.split(","):
        flags = {**METHODS[method], "crm": str(run_dir / METHODS[method]["crm"])}
        for seed in (int(s) for s in cfg.seeds.split(",")):
            name = f"{method}_seed{seed}"
            if (run_dir / name / "summary.json").exists():
                print(f"{name}: done already, kept")
                continue
            resume = stage5.latest_checkpoint(run_dir / name) is not None  # killed after a checkpoint
            todo.append(stage5.Config(run=cfg.run, runs_dir=cfg.runs_dir, name=name, seed=seed, **flags,
                                      steps=cfg.train_steps * cfg.scale, prompts_per_step=8 * cfg.scale,
                                      resume=resume, overwrite=not resume, device=cfg.device,
                                      dtype=cfg.dtype))
    return todo


def worker_count(jobs: str, device: str) -> int:
    """--jobs as a number: auto = 1 on CUDA (one GPU that processes would share), else 2 when the CPU has two
    cores or more (a small model keeps one core busy better than two), else 1."""
    if jobs != "auto":
        return int(jobs)
    return 1 if device.startswith("cuda") else min(2, os.cpu_count() or 1)


def run_in_processes(configs: list, run_dir: Path, jobs: int) -> None:
    """Train the stage-5 runs `jobs` at a time, each as `python 05_grpo_train.py <its flags>` limited to
    cpu_count // jobs torch threads, its output appended to runs/<run>/<name>/stdout.log; one bar over the
    runs. A run that fails stops the launching of new ones; those running finish (their work is kept), then
    the failures are named with their logs."""
    jobs = min(jobs, len(configs))
    threads = str(max(1, (os.cpu_count() or 1) // jobs))
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}  # read when torch starts
    script = str(Path(__file__).resolve().with_name("05_grpo_train.py"))
    waiting, running, failed = list(configs), {}, []
    with tqdm(total=len(configs), desc=f"stage 5, {jobs} runs at once, {threads} thread(s) each") as bar:
        while waiting or running:
            while waiting and len(running) < jobs and not failed:
                config = waiting.pop(0)
                log_path = run_dir / config.name / "stdout.log"
                log_path.parent.mkdir(parents=True, exist_ok=True)
                log = open(log_path, "a")
                argv = [sys.executable, script, *config_argv(config)]
                log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(argv)}\n")
                log.flush()
                process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
                running[config.name] = (process, log, log_path)
                bar.set_postfix_str(", ".join(running))
            time.sleep(0.2)
            for name, (process, log, log_path) in list(running.items()):
                if process.poll() is None:
                    continue
                log.close()
                del running[name]
                bar.update()
                if process.returncode:
                    failed.append(f"{name} (exit {process.returncode}; log {log_path}):\n{tail(log_path)}")
                    if running:
                        tqdm.write(f"{name} failed (log {log_path}); starting no more runs, waiting for "
                                   f"{', '.join(running)}")
            bar.set_postfix_str(", ".join(running))
    if failed:
        raise SystemExit(f"--reproduce: stage 5 failed for {len(failed)} run(s), {len(waiting)} not started; "
                         f"finished runs are kept and a rerun resumes the others.\n" + "\n\n".join(failed))


def config_argv(config) -> list[str]:
    """The command-line flags that stage1.parse_config turns back into `config`: every switch that is on (the
    parser reads a missing switch as off), and every other field that differs from its default. Checked by
    parsing them back: a config the flags cannot carry is an error.
    Example: stage5.Config(name="grpo_seed0", resume=True) -> ["--name", "grpo_seed0", "--resume", ...]."""
    argv = []
    for field in dataclasses.fields(config):
        value, flag = getattr(config, field.name), "--" + field.name.replace("_", "-")
        if field.type in (bool, "bool"):
            argv += [flag] if value else []
        elif value != field.default:
            argv += [flag, str(value)]
    try:
        parsed = stage1.parse_config(type(config), "", argv)
    except SystemExit:  # argparse already printed why
        parsed = None
    if parsed != config:
        differ = [f.name for f in dataclasses.fields(config)
                  if parsed is None or getattr(parsed, f.name) != getattr(config, f.name)]
        raise ValueError(f"{type(config).__module__}: the command line cannot carry {differ} "
                         f"(flags {argv}); run with --jobs 1.")
    return argv


def tail(path: Path, lines: int = 8) -> str:
    """The last lines of a log (tqdm's carriage returns read as line ends)."""
    text = path.read_text(errors="replace").replace("\r", "\n")
    return "\n".join([line for line in text.splitlines() if line.strip()][-lines:])


# ============================================================================================================
# Appendix C: flags, rows and checkpoints; a benchmark's official model calls (skip on a first reading)
# What check_config, main and evaluate call but the lesson does not need: the benchmark flags and the
# --checkpoints parser, the rows to evaluate, a run's checkpoints and why one is skipped, and the official
# pipelines' verdicts with their model calls.
# ============================================================================================================


def check_benchmark_flags(cfg: Config) -> None:
    """check_config's part for a benchmark: a --benchmark adapters/benchmarks.py knows, and --extractor-url
    and --extractor-model both or neither."""
    if cfg.benchmark is not None:
        from adapters import benchmarks

        if cfg.benchmark not in benchmarks.BENCHMARKS:
            raise SystemExit(f"--benchmark {cfg.benchmark}: unknown; use one of "
                             f"{', '.join(benchmarks.BENCHMARKS)}.")
    if bool(cfg.extractor_url) != bool(cfg.extractor_model):
        raise SystemExit("--extractor-url and --extractor-model go together "
                         "(e.g. --extractor-url http://localhost:8000/v1 --extractor-model gpt-4o).")


def parse_checkpoints(text: str) -> dict[str, str]:
    """--checkpoints as {name: path}: "sft=a/policy,hras=b/policy" -> {"sft": "a/policy", "hras": "b/policy"};
    "" -> {} (main then evaluates every checkpoint of the run)."""
    checkpoints = {}
    for item in text.split(",") if text else []:
        name, _, path = item.partition("=")
        if not (name and path):
            raise SystemExit(f"--checkpoints {text}: {item!r} is not name=path "
                             f"(e.g. hras=runs/default/hras_seed0/policy).")
        checkpoints[name] = path
    return checkpoints


def load_test_rows(cfg: Config, run_dir: Path, stage1_config: dict) -> tuple:
    """(rows, columns): the run's test split (stage 1's data), or with --benchmark that benchmark's rows in
    our columns (image, question, answer + the comparator's), downloaded by `datasets`."""
    if cfg.benchmark:
        from adapters import benchmarks

        try:
            test = benchmarks.load(cfg.benchmark, cfg.benchmark_split)
        except SystemExit:
            raise
        except Exception as error:  # no network and not in the cache, a split it does not have
            raise SystemExit(f"--benchmark {cfg.benchmark}: cannot load it ({error!r}). `datasets` downloads "
                             f"it from the hub: run once with a network (then it is cached), or check "
                             f"--benchmark-split.")
        return test, {"image": "image", "question": "question", "answer": "answer"}
    from datasets import load_from_disk

    data = load_from_disk(str(stage1.require(run_dir / "data", "python 01_sft_rm.py")))
    return data[stage1_config["test_split"]], stage2.data_columns(stage1_config)


def run_checkpoints(run_dir: Path) -> dict[str, str]:
    """A run's checkpoints by name: policy_sft (stage 1) and every runs/<run>/<name>/policy (stage 5)."""
    checkpoints = {"sft": str(stage1.require(run_dir / "policy_sft", "python 01_sft_rm.py"))}
    return checkpoints | {p.parent.name: str(p) for p in sorted(run_dir.glob("*/policy"))}


def load_checkpoint(name: str, path: str, device: str, dtype, skipped: dict[str, str]) -> tuple:
    """(model, processor), or (None, None) for a checkpoint that does not load or whose weights are not
    finite, with why in skipped[name], printed: one broken run must not stop the evaluation of the others."""
    try:
        model, processor = stage1.load_policy(path, device, dtype=dtype)  # a LoRA policy: base + adapter
    except Exception as error:  # a weights file cut short (a full disk, a copy that died): skipped too
        skipped[name] = f"it does not load: {load_error(path, error)}"
    else:
        bad = non_finite(model)
        if not bad:
            return model, processor
        skipped[name] = f"{len(bad)} weight tensors hold NaN or inf, e.g. {bad[0]}"  # a diverged run
    print(f"\nskipping {name} ({path}): {skipped[name]}")
    return None, None


def non_finite(model) -> list[str]:
    """Names of the parameters that hold a NaN or an infinity (a checkpoint a diverged run left)."""
    return [name for name, p in model.named_parameters() if not torch.isfinite(p).all()]


def load_error(folder: str, error: Exception) -> str:
    """Why a checkpoint does not load, naming its weight files that do not read (safetensors checks that a
    file's header covers the whole file, so one cut short fails here, before any weight is read)."""
    from safetensors import safe_open

    broken = []
    for path in sorted(Path(folder).glob("*.safetensors")):
        try:
            with safe_open(str(path), "pt"):
                pass
        except Exception as file_error:
            broken.append(f"{path} is cut short or corrupt ({file_error})")
    if not broken:
        return f"{type(error).__name__}: {error}"
    return "; ".join(broken) + " (copy it again, or rerun the stage-5 run that wrote it)"


def official_verdicts(model, processor, test, columns: dict, prompts: list[dict], scores: list[dict],
                      rows: list[dict], benchmark: str, cfg: Config) -> dict:
    """Each completion's official verdict into its score record (accuracy, task, unscorable), with the
    official pipelines' model calls where asked (adapters/benchmarks.py holds their rules and prompts):
    --second-round  puzzles: an answer naming no option gets the official second prompt, answered greedily
                    by the same policy (after our format instruction, as every prompt); that reply is read
    --extractor-url MathVista: where the official shortcuts do not apply, a model extracts the answer from
                    the whole reply (the judge's client, adapters/judge.py; cached in extractions.jsonl)
    Returns the number the benchmark reports over them all (benchmarks.aggregate; CV-Bench's is not the plain
    mean over completions)."""
    from adapters import benchmarks

    completions = [(p, c) for p in prompts for c in p["completions"]]
    answers = [stage1.parse_completion(c["text"])[1] for _, c in completions]
    extractions = [None] * len(completions)
    if benchmark == "mathvista" and cfg.extractor_url:
        from adapters.judge import UrlJudge

        client = UrlJudge(cfg.extractor_url, cfg.extractor_model, max_tokens=64,
                          cache_path=str(Path(cfg.runs_dir) / cfg.run / "extractions.jsonl"))
        questions, texts = [p["question"] for p, _ in completions], [c["text"] for _, c in completions]
        extractions = benchmarks.mathvista_model_extractions(client, questions, texts, answers, rows)
    verdicts = [benchmarks.verdict(benchmark, a, r, e) for a, r, e in zip(answers, rows, extractions)]
    again = [i for i, (a, r) in enumerate(zip(answers, rows))
             if cfg.second_round and benchmarks.needs_second_round(benchmark, a, r)]
    if again:
        asked = [{"image": stage1.row_image(test, completions[i][0]["row"], columns["image"]), "answer": "",
                  "question": benchmarks.second_round_prompt(completions[i][0]["question"],
                                                             completions[i][1]["text"], rows[i]["options"])}
                 for i in again]
        greedy = stage2.Config(group_size=1, prompts_per_batch=cfg.prompts_per_batch, temperature=0.0,
                               max_new_tokens=cfg.max_new_tokens, device=cfg.device, fast=cfg.fast)
        replies = stage2.rollout_prompts(model, processor, asked, list(range(len(asked))),
                                         dict(image="image", question="question", answer="answer"), greedy)
        for i, reply in zip(again, replies):
            verdicts[i] = benchmarks.second_round_verdict(reply["completions"][0]["text"], rows[i])
    for s, v in zip(scores, verdicts):
        s["accuracy"], s["unscorable"] = float(v == benchmarks.RIGHT), v == benchmarks.UNSCORABLE
        s["task"] = s["accuracy"] + s["format"]
    return benchmarks.aggregate(benchmark, [{"correct": s["accuracy"] > 0, "source": r["source"],
                                             "unscorable": s["unscorable"]} for s, r in zip(scores, rows)])


if __name__ == "__main__":
    main(stage1.parse_config(Config, __doc__.split("\n")[0]))
