"""Stage 1: data, a cold-start policy (SFT) and the consistency reward model (CRM).

Reading guide: the file reads top to bottom as the lesson. Config (every knob, one line each), then
  1. parsing and the rule oracle   what "consistent" means: steps -> conclusion -> answer (oracle_parts)
  2. precision and log-probs       one dtype rule; log p(y_t | image, q, y_<t) of a completion
  3. policy SFT                    fit (the supervised loop of both models), sft_policy, greedy_check
  4. CRM data and training         oracle-labelled pairs, the policy's own rollouts, train_crm, crm_scores
  5. main()                        the stage in order, with the numbers it prints
  6. crm_from_rollouts()           the paper's recipe, after stage 5's GRPO runs: a CRM of their rollouts
Appendix A (the embedded toy world: drawing the tasks, the BPE, the tiny models), Appendix B (atomic files,
the command line, real datasets checked row by row, the CRM tried before SFT, the LLM judge's plumbing) and
Appendix C (loading models and encoding inputs, cutting long CRM pairs, the flags' checks, the reports) hold
what a run needs but the lesson does not: skip them on a first reading. Loading real datasets and judged CRM
data is in adapters/real_data.py.

CORA (arXiv 2606.14691) trains a vision-language policy with GRPO and adds a learned
*consistency reward*: a frozen text classifier that reads the question and the policy's
<think> text and says whether the <answer> follows from it. This stage makes the three
things every later stage needs:

  1. data     a train/test split of image + question + verifiable answer. With no --dataset,
              synthetic visual reasoning tasks drawn with Pillow (two families, below), each
              with a templated trace <think>...So the answer is X.</think><answer>Y</answer>.
              The thinking's steps and its conclusion X are machine-readable, so consistency has a
              ground truth: the rule oracle reads the whole chain, "consistent" iff the steps imply X
              (the count they list, the tallest bar they list) and Y == X (oracle_parts).
  2. policy   a Qwen2-VL(-architecture) model, fine-tuned by teacher forcing on the traces
              (loss on completion tokens only):  L_sft = -mean_t log p(y_t | image, q, y_<t).
              A share --inconsistent-frac of the embedded traces is inconsistent on purpose,
              of both kinds the paper counts (right thinking + wrong answer, wrong thinking +
              right answer), so the SFT policy starts with a measurable inconsistency rate.
  3. crm      a text classifier (an encoder, or a decoder reading its last token), NLI style:
              premise = question + thinking (cut to --crm-max-length tokens: the question and the
              thinking's end, where its conclusion is), hypothesis =
              "The final answer is {a}.", labels {inconsistent, consistent}. The reward used
              in RL (stage 3) is r_cons = lambda_cons * P(consistent | q, t, a).
              Paper: ModernBERT-large trained on ~90K judged rollouts. Embedded default: a tiny
              ModernBERT trained on the oracle-labelled traces plus hard negatives (the answer
              swapped for a wrong one; steps that disagree with their conclusion, whatever the answer)
              plus the SFT policy's own sampled rollouts, labelled by the
              oracle (the paper's recipe: judged rollouts). Deviation: the oracle as the judge, not GPT-5.
              Checked on held-out template pairs, on held-out pairs that differ in their steps only,
              and on held-out rollouts of the SFT policy.
              Real data: --crm-data (judged rows), or the SFT policy's rollouts labelled here by an
              LLM judge (--judge MODEL or --judge-url URL --judge-model NAME; adapters/judge.py).
              On the embedded tasks a judge is measured against the oracle (its agreement).

Every input is checked before any model loads (flags, --crm-data, every dataset row and image), and
the CRM (loading, pad token, a long pair, batched = alone) and the judge are tried before any SFT.

Embedded tasks ("count" and "bars", 84x84 px):
  count  "How many red shapes are there?"  1-6 shapes of the colour asked, 0-3 of another.
         trace: "I count the red shapes: 1, 2, 3. So the answer is 3."
  bars   "Which bar is the tallest: A, B or C?"  three bars, distinct heights 1-6.
         trace: "Heights: A 2, B 5, C 3. So the answer is B."

Reads:  nothing (embedded), or --policy / --crm / --dataset / --crm-data / --judge (hub ids or paths).
Writes: runs/<run>/data/ (datasets save_to_disk), runs/<run>/policy_sft/ and runs/<run>/crm/
        (save_pretrained folders), runs/<run>/crm_data.jsonl (with a judge: its labelled rows, in the
        --crm-data format), runs/<run>/stage1.json (the numbers printed at the end). All of them go to
        runs/<run>/stage1.new/ first and replace the previous run only once complete (replace_run);
        a URL judge's replies are cached in runs/<run>/judge_cache.jsonl (a rerun asks only for the rest).

Run:    python 01_sft_rm.py                              # embedded default (its wall time: docs/LOG.md)
        python 01_sft_rm.py --policy Qwen/Qwen2-VL-2B-Instruct --skip-policy-sft \\
            --dataset my_data.jsonl --crm answerdotai/ModernBERT-large --crm-data judged.jsonl
        python 01_sft_rm.py --policy Qwen/Qwen2-VL-2B-Instruct --skip-policy-sft --dataset my_data.jsonl \\
            --crm answerdotai/ModernBERT-large --judge-url http://localhost:8000/v1 --judge-model NAME
"""
import argparse
import contextlib
import dataclasses
import functools
import json
import math
import os
import random
import re
import shutil
import sys
import time
import typing
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import torch
import torch.utils.checkpoint
from PIL import Image, ImageDraw
from tqdm import tqdm

from adapters import real_data


# ------------------------------- Config: every knob of the stage, one line each
@dataclass
class Config:
    run: str = "default"  # run folder name: everything goes to runs/<run>/
    runs_dir: str = "runs"  # parent folder of all runs
    seed: int = 0  # seeds the task generator, model init and batches
    device: str = "cuda" if torch.cuda.is_available() else "cpu"  # where models train
    dtype: str = "auto"  # compute precision: auto = bf16 on CUDA, fp32 on CPU (compute_dtype)
    # data
    dataset: str | None = None  # hub id, save_to_disk folder, JSONL or benchmark name; None = embedded tasks
    image_column: str = "image"  # column with the image (PIL image, or a path for JSONL)
    question_column: str = "question"  # column with the question text
    answer_column: str = "answer"  # column with the verifiable answer
    target_column: str | None = None  # real data: column with SFT completions (<think>..<answer>..)
    train_split: str = "train"  # split used for SFT and RL
    test_split: str = "test"  # split used for evaluation
    n_train: int = 4000  # embedded: number of training tasks
    n_test: int = 200  # embedded: number of test tasks
    image_size: int = 84  # embedded: side of the square images, a multiple of 28
    inconsistent_frac: float = 0.25  # embedded: share of SFT traces made inconsistent on purpose
    max_pixels: int = 448 * 448  # cap on image pixels for the processor (memory on real models)
    # policy SFT
    policy: str | None = None  # hub id or folder of a Qwen2-VL / Qwen2.5-VL; None = build a tiny one
    skip_policy_sft: bool = False  # keep the policy as loaded (e.g. an instruct checkpoint)
    sft_steps: int = 450  # optimiser steps of policy SFT
    sft_batch_size: int = 32  # prompts per SFT step
    sft_lr: float = 2e-3  # peak AdamW learning rate (tiny model; use ~1e-5 for a real one)
    warmup_steps: int = 20  # linear warm-up, then cosine decay to 10 %
    eval_n: int = 200  # test prompts for the greedy check after SFT
    max_new_tokens: int = 64  # generation budget for that check
    # consistency reward model
    crm: str | None = None  # hub id / folder of a classifier backbone; None = tiny ModernBERT (real: -large)
    crm_data: str | None = None  # JSONL of {question, thinking, answer, label} rows (real runs)
    crm_steps: int = 2000  # optimiser steps of CRM SFT
    crm_batch_size: int = 64  # pairs per CRM step
    crm_lr: float = 5e-4  # peak AdamW learning rate (tiny model; use ~2e-5 for ModernBERT-large)
    crm_max_length: int = 512  # tokens per CRM pair; longer: question, thinking's end, answer's first 64 kept
    crm_rollout_prompts: int = 1000  # train prompts whose SFT-policy rollouts are judged into CRM data
    crm_rollout_samples: int = 4  # rollouts per prompt
    crm_rollout_temperature: float = 1.3  # their temperature (above 1: more drifted text)
    # the paper's recipe: a CRM trained on rollouts sampled during GRPO training (stage 5 saves them)
    crm_rollouts: str | None = None  # stage 5's rollouts.jsonl (comma list, globs): train only a CRM on them
    crm_out: str = "crm_rl"  # with --crm-rollouts: its folder runs/<run>/<crm_out>/ (stages 5, 6 prefer it)
    # an LLM judge for the CRM's data (adapters/judge.py): real data without --crm-data needs one
    judge: str | None = None  # hub id / folder of a local instruct model that labels the rollouts
    judge_url: str | None = None  # or an OpenAI-compatible endpoint, e.g. http://localhost:8000/v1
    judge_model: str | None = None  # the model name to ask at --judge-url
    judge_api_key_env: str = "OPENAI_API_KEY"  # environment variable holding the endpoint's key
    judge_batch_size: int = 16  # prompts per generate call of a local judge


# ----------------------------------------------- 1. parsing and the rule oracle
# Every pattern here runs in time linear in the text: a policy's output is untrusted, and a regex such as
# <answer>(.*?)</answer> rescans the rest of the text from every unclosed tag (quadratic on "<answer>"
# x 8,000). CONCLUSION_RE is linear: each try starts at "answer is" and stops at the next space.
CONCLUSION_RE = re.compile(r"answer is\s*([^\s<]+?)\.?(?:\s|$)", re.IGNORECASE)


def last_block(text: str, tag: str) -> str | None:
    """The content of the last <tag>...</tag>, or None. Left to right, each opening tag pairs with the next
    closing one (what the regex <tag>(.*?)</tag> finds), in one str.find pass: linear in len(text).

    Example: last_block("<answer>1</answer><answer>3</answer>", "answer") -> "3";
             last_block("<answer>1</answer><answer>3", "answer") -> "1" (the second one is unclosed).
    """
    opening, closing = f"<{tag}>", f"</{tag}>"
    found, start = None, text.find(opening)
    while start != -1:
        end = text.find(closing, start + len(opening))
        if end == -1:
            break
        found, start = text[start + len(opening): end], text.find(opening, end + len(closing))
    return found


def parse_completion(text: str) -> tuple[str | None, str | None]:
    """The last <think>...</think> and the last <answer>...</answer> (stripped), or None.

    Example: parse_completion("<think>1, 2. So the answer is 2.</think><answer>2</answer>")
             -> ("1, 2. So the answer is 2.", "2");  parse_completion("<answer> </answer>") -> (None, None)
    An empty answer counts as missing, so it can never match anything.
    """
    think, answer = last_block(text, "think"), last_block(text, "answer")
    return (think or "").strip() or None, (answer or "").strip() or None


# the Unicode minus sign and the full-width forms (U+FF01..U+FF5E) as ASCII
ASCII_FORMS = {0x2212: ord("-"), **{c: c - 0xFEE0 for c in range(0xFF01, 0xFF5F)}}
ANSWER_WRAPPERS = [("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"), ("\\boxed{", "}"), ("\\text{", "}")]
# 3, -3.0, .5, 1e309 (an exponent below 10^4)
NUMBER_RE = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:e[+-]?\d{1,4})?")
THOUSANDS_RE = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d*)?")  # 1,000 and 1,234,567.5 (not 1,2)
LATEX_FRACTION_RE = re.compile(r"(-?)\\[dt]?frac\{([^{}]*)\}\{([^{}]*)\}")  # \frac{1}{2}, -\dfrac{3}{4}


def normalize_answer(text: str) -> str:
    """The answer as compared: full-width forms and the Unicode minus as ASCII, up to 4 wrappers removed
    ($3$, \\(3\\), \\[3\\], \\boxed{3}, \\text{B}), no surrounding spaces, periods or parentheses, lower case.

    Example: normalize_answer(" $\\boxed{−3}$. ") -> "-3";
             normalize_answer("(B)") -> "b" (an option letter).
    """
    s = text.translate(ASCII_FORMS)
    for _ in range(4):  # a bounded number of passes: linear in len(text) whatever it holds
        s = s.strip().rstrip(".").rstrip()
        for opening, closing in ANSWER_WRAPPERS:
            if len(s) >= len(opening) + len(closing) and s.startswith(opening) and s.endswith(closing):
                s = s[len(opening): len(s) - len(closing)]
                break
        else:
            break
    return s.strip().strip(".()").strip().lower()


def parse_number(text: str) -> Fraction | None:
    """A normalised answer as an exact number, or None. Reads integers, decimals, exponents (1e309),
    thousands separators (1,000), a/b and \\frac{a}{b}; inf, nan and anything else are not numbers here.

    Example: parse_number("1,000") -> Fraction(1000);  parse_number("0.5") -> Fraction(1, 2) (as "1/2");
             parse_number("-\\frac{1}{2}") -> Fraction(-1, 2);  parse_number("nan") -> None.
    """
    # no answer worth reading as a number is longer; this keeps int() far below its digit limit
    if len(text) > 100:
        return None
    fraction = LATEX_FRACTION_RE.fullmatch(text)
    sign, parts = (-1 if fraction[1] else 1, fraction.groups()[1:]) if fraction else (1, text.split("/"))
    parts = [p.strip() for p in parts]
    parts = [p.replace(",", "") if THOUSANDS_RE.fullmatch(p) else p for p in parts]
    if len(parts) > 2 or not all(NUMBER_RE.fullmatch(p) for p in parts):
        return None
    values = [Fraction(p) for p in parts]
    if len(values) == 2 and values[1] == 0:
        return None
    return sign * (values[0] / values[1] if len(values) == 2 else values[0])


def answers_match(predicted: str | None, truth: str, rel_tol: float = 1e-6) -> bool:
    """Numbers compare as exact fractions: equal when either is an integer ('1000001' != '1000000',
    '3.0' == '3'), within relative tolerance rel_tol when neither is (rounding: '0.3333333' == '1/3');
    '1,000' == '1000', '1/2' == '0.5', '\\boxed{3}' == '$3$' == '3', '−3' == '-3'. Everything else (option
    letters 'B)' == 'b', words, 'inf', 'nan') compares as normalised text. An empty answer never matches.
    """
    if predicted is None:
        return False
    p, t = normalize_answer(predicted), normalize_answer(truth)
    if not p:  # an empty answer never matches, not even an empty truth
        return False
    p_number, t_number = parse_number(p), parse_number(t)
    if p_number is None or t_number is None:
        return p == t
    if p_number.denominator == 1 or t_number.denominator == 1:
        return p_number == t_number
    return abs(p_number - t_number) <= Fraction(rel_tol) * max(abs(p_number), abs(t_number))


def thinking_conclusion(think: str | None) -> str | None:
    """What the thinking concluded: the X of its last 'the answer is X' (the traces' template)."""
    found = CONCLUSION_RE.findall(think or "")
    return found[-1] if found else None


BAR_STEP_RE = re.compile(r"\b([ABC])\s+(\d{1,3})\b")  # "A 4" in "Heights: A 4, B 1, C 6."
COUNT_STEP_RE = re.compile(r"\b\d{1,3}\b")  # "1", "2", "3" in "I count the red shapes: 1, 2, 3."


def steps_imply(think: str | None) -> str | None:
    """What the thinking's steps (the text before its last 'answer is') imply on their own, or None when they
    imply no single answer. The two embedded families:
      bars   "Heights: A 4, B 1, C 6."          -> "C": the tallest listed bar
                                                   (three distinct letters, one maximum)
      count  "I count the red shapes: 1, 2, 3." -> "3": the count listed, which must run 1, 2, ..., k
    Steps with a tie ("A 4, B 1, C 4"), a count that skips or repeats ("1, 2, 4"), or nothing listed imply
    nothing, so no conclusion follows from them."""
    head, found, _ = (think or "").rpartition("answer is")
    if not found:
        return None
    bars = BAR_STEP_RE.findall(head)
    if bars:
        heights = {letter: int(h) for letter, h in bars}
        tallest = max(heights.values())
        winners = [letter for letter, h in heights.items() if h == tallest]
        return winners[0] if len(bars) == 3 and len(heights) == 3 and len(winners) == 1 else None
    listed = [int(n) for n in COUNT_STEP_RE.findall(head)]
    return str(len(listed)) if listed and listed == list(range(1, len(listed) + 1)) else None


def oracle_parts(think: str | None, answer: str | None) -> dict[str, bool]:
    """The rule oracle (embedded tasks) reads the whole chain, in two links:
      steps   the steps imply the conclusion (steps_imply(think) == thinking_conclusion(think));
      answer  the <answer> equals the conclusion.
    Example: "I count the red shapes: 1, 2, 3. So the answer is 5." + <answer>5</answer>
             -> {"steps": False, "answer": True}: the answer follows the conclusion, not the count."""
    conclusion, implied = thinking_conclusion(think), steps_imply(think)
    return {"steps": conclusion is not None and implied is not None and answers_match(conclusion, implied),
            "answer": conclusion is not None and answers_match(answer, conclusion)}


def oracle_consistent(think: str | None, answer: str | None) -> bool:
    """Rule oracle (embedded tasks): consistent iff both links of the chain hold (oracle_parts)."""
    parts = oracle_parts(think, answer)
    return parts["steps"] and parts["answer"]


# ------------------------------------------ 2. precision and log-probs (loading and encoding: Appendix C)
def compute_dtype(device: str, dtype: str = "auto") -> torch.dtype:
    """The one precision rule of every stage: the dtype models compute in.

    auto -> bfloat16 on CUDA (half the memory and the tensor cores' rate; its 8-bit exponent, unlike fp16's,
            needs no loss scaling), float32 on the CPU (CPUs gain little from bf16, and fp32 keeps the
            equivalence tests exact). "bf16" / "fp32" force one.
    Frozen weights (the sampler's in stages 2 and 6, the reference, the CRM, a LoRA base) are stored in it.
    Weights being trained stay fp32 and compute under autocast(dtype) (see `autocast`): a bf16 weight has 8
    significant bits, so an update below ~1/256 of the weight (lr 1e-6 on a weight of 0.01) rounds away.
    """
    if dtype == "auto":
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    if dtype not in ("bf16", "fp32"):
        raise SystemExit(f"--dtype {dtype}: use auto, bf16 or fp32.")
    return torch.bfloat16 if dtype == "bf16" else torch.float32


def autocast(device: str, dtype: torch.dtype):
    """Matmuls in `dtype` while fp32 master weights are trained; a no-op in fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=str(device).split(":")[0], dtype=dtype)


def chunk_logprobs(lm_head, hidden: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """log softmax(lm_head(hidden) / T)[target] for one chunk: hidden (B, C, H), targets (B, C) -> (B, C)."""
    logits = lm_head(hidden).float() / temperature  # (B, C, V)
    return torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (B, C)


def completion_logprobs(model, prompt: dict, completion_ids: torch.Tensor, completion_mask: torch.Tensor,
                        temperature: float = 1.0, chunk_size: int = 256,
                        visual: list[torch.Tensor] | None = None) -> torch.Tensor:
    """log p(y_t | image, prompt, y_<t) of every completion token under logits / temperature.

    prompt: encode_prompts output (left padded, on the model's device), one image per row; completion_ids,
    completion_mask: (B, L). Returns (B, L); positions where completion_mask is 0 hold meaningless values.

    Memory: the backbone runs once; then lm_head and the fp32 log-softmax run over `chunk_size` positions at
    a time, each chunk under activation checkpointing when gradients are on, so a (B, chunk, V) logits block
    exists at a time instead of (B, L, V) (Qwen's V = 151,936: 4.7 GB per fp32 copy at B 8, L 1,024).
    visual: each row's image features (image_features) computed once, without gradients, and reused, so the
    vision tower does not run again for every row of a GRPO group (--freeze-vision-tower); None = run it here.
    """
    L = completion_ids.shape[1]
    input_ids = torch.cat([prompt["input_ids"], completion_ids], dim=1)  # (B, P + L)
    attention_mask = torch.cat([prompt["attention_mask"], completion_mask], dim=1)  # (B, P + L)
    text_types = torch.zeros_like(completion_ids)  # token type 0: text
    mm_token_type_ids = torch.cat([prompt["mm_token_type_ids"], text_types], dim=1)  # (B, P + L)
    core = unwrap(model)
    # no KV cache: nothing is decoded after this forward
    hidden = backbone(core, input_ids, attention_mask, mm_token_type_ids, prompt["pixel_values"],
                      prompt["image_grid_thw"], visual).last_hidden_state  # (B, P + L, H)
    hidden = hidden[:, -L - 1:-1]  # (B, L, H): the state at t predicts token t + 1
    return hidden_logprobs(core.lm_head, hidden, completion_ids, temperature, chunk_size)  # (B, L)


def backbone(core, input_ids, attention_mask, mm_token_type_ids, pixel_values, image_grid_thw,
             visual: list[torch.Tensor] | None, use_cache: bool = False):
    """The decoder's forward over (B, T) tokens with one image per row -> its output: last_hidden_state
    (B, T, H), and the KV cache when use_cache. visual None: the model's own path, the vision tower runs
    inside. visual given (image_features, one tensor per row): the same forward with those visual tokens."""
    if visual is None:
        return core.model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                          image_grid_thw=image_grid_thw, mm_token_type_ids=mm_token_type_ids,
                          use_cache=use_cache)
    # embed the text, then scatter the image features into the image tokens' slots
    embeds = core.get_input_embeddings()(input_ids)  # (B, T, H)
    image_slots = (input_ids == core.config.image_token_id).unsqueeze(-1)  # (B, T, 1)
    embeds = embeds.masked_scatter(image_slots, torch.cat(visual).to(embeds.dtype))
    positions, _ = core.model.get_rope_index(input_ids, mm_token_type_ids=mm_token_type_ids,
                                              image_grid_thw=image_grid_thw,
                                              attention_mask=attention_mask)  # (3, B, T)
    return core.model(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=positions,
                      use_cache=use_cache)


def hidden_logprobs(lm_head, hidden: torch.Tensor, completion_ids: torch.Tensor, temperature: float,
                    chunk_size: int) -> torch.Tensor:
    """completion_logprobs' last step: lm_head + log-softmax over chunk_size positions at a time.
    hidden (B, L, H), the state that predicts each completion token; completion_ids (B, L) -> (B, L)."""
    chunks = []
    for start in range(0, completion_ids.shape[1], chunk_size):
        end = start + chunk_size
        args = (lm_head, hidden[:, start:end], completion_ids[:, start:end], temperature)
        if torch.is_grad_enabled():  # keep only the chunk's input; its logits are recomputed in backward
            chunks.append(torch.utils.checkpoint.checkpoint(chunk_logprobs, *args, use_reentrant=False))
        else:
            chunks.append(chunk_logprobs(*args))
    return torch.cat(chunks, dim=1)  # (B, L)


# -------------------------------------------------- 3. policy SFT and its check
def lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    """Linear warm-up to `peak`, then cosine decay to 10 % of it."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def fit(model, batch_loss, steps: int, peak_lr: float, warmup: int, weight_decay: float,
        desc: str) -> list[float]:
    """The supervised loop of both models: AdamW, warm-up + cosine learning rate, gradients clipped at norm 1.
    batch_loss(step) draws that step's batch and returns its loss."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=peak_lr, weight_decay=weight_decay)
    losses = []
    model.train()
    for step in (bar := tqdm(range(steps), desc=desc)):
        loss = batch_loss(step)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, warmup, peak_lr)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses


def sft_policy(cfg: Config, model, processor, train) -> list[float]:
    """Teacher forcing on the traces; the loss counts completion tokens only."""
    target = cfg.target_column or "sft_target"
    if target not in train.column_names:
        raise SystemExit(f"policy SFT needs completions: no column '{target}' in the train split "
                         f"(columns: {train.column_names}). Pass --target-column, or --skip-policy-sft.")
    rng = random.Random(cfg.seed + 1)

    def batch_loss(step: int) -> torch.Tensor:
        rows = rng.sample(range(len(train)), cfg.sft_batch_size)
        images = [row_image(train, i, cfg.image_column) for i in rows]
        questions = [train[i][cfg.question_column] for i in rows]
        prompt = to_device(encode_prompts(processor, images, questions), cfg.device)
        ids, mask = encode_completions(processor, [train[i][target] for i in rows], cfg.device)
        with autocast(cfg.device, compute_dtype(cfg.device, cfg.dtype)):  # fp32 weights, bf16 matmuls on CUDA
            logprobs = completion_logprobs(model, prompt, ids, mask)  # (B, L)
        return -(logprobs * mask).sum() / mask.sum()  # mean negative log-likelihood per completion token

    return fit(model, batch_loss, cfg.sft_steps, cfg.sft_lr, cfg.warmup_steps, 0.0, "policy SFT")


@torch.no_grad()
def greedy_check(cfg: Config, model, processor, test, n: int, embedded: bool,
                 batch_size: int = 50) -> dict:
    """Greedy replies (transformers' generate) on test prompts: format rate, accuracy, and (embedded tasks
    only: the rule oracle reads our templates) the inconsistency rate over all n replies (one with nothing to
    parse counts as inconsistent), and each link of the oracle's chain (oracle_parts) apart: the share of the
    parsed replies whose steps do not imply their conclusion, and whose answer is not their conclusion."""
    n = min(n, len(test))
    stats = {"format": 0, "correct": 0, "inconsistent": 0, "steps_fail": 0, "answer_fail": 0}
    for start in tqdm(range(0, n, batch_size), desc="greedy check"):
        rows = list(range(start, min(n, start + batch_size)))
        prompt = to_device(encode_prompts(processor, [row_image(test, i, cfg.image_column) for i in rows],
                                          [test[i][cfg.question_column] for i in rows]), cfg.device)
        out = model.generate(**prompt, max_new_tokens=cfg.max_new_tokens, do_sample=False,
                             eos_token_id=stop_token_ids(processor),
                             pad_token_id=processor.tokenizer.pad_token_id)
        texts = processor.batch_decode(out[:, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
        for i, text in zip(rows, texts):
            think, answer = parse_completion(text)
            stats["format"] += think is not None and answer is not None
            stats["correct"] += answers_match(answer, str(test[i][cfg.answer_column]))
            stats["inconsistent"] += not oracle_consistent(think, answer)
            if think is not None and answer is not None:
                links = oracle_parts(think, answer)
                stats["steps_fail"] += not links["steps"]
                stats["answer_fail"] += not links["answer"]
    parsed = stats["format"]
    links_known = embedded and parsed > 0
    return {"format_rate": stats["format"] / n, "accuracy": stats["correct"] / n,
            "oracle_inconsistency_rate": stats["inconsistent"] / n if embedded else None,
            "oracle_steps_fail_rate": stats["steps_fail"] / parsed if links_known else None,
            "oracle_answer_fail_rate": stats["answer_fail"] / parsed if links_known else None,
            "n": n, "example": texts[0]}


# ----------------------------------------------------- 4. CRM data and training
def crm_hypothesis(answer: str) -> str:
    return f"The final answer is {answer}."


def with_conclusion(thinking: str, conclusion: str) -> str:
    """The thinking with its last 'answer is X.' replaced, so its steps and its conclusion disagree.

    Example: with_conclusion("I count: 1, 2. So the answer is 2.", "5")
             -> "I count: 1, 2. So the answer is 5."
    """
    head, found, _ = thinking.rpartition("answer is ")
    return f"{head}{found}{conclusion}." if found else thinking


def embedded_crm_pairs(split, seed: int) -> list[dict]:
    """NLI pairs from the traces, eight per task, labelled by the chain oracle (oracle_consistent):

      consistent (1)   (right thinking, true answer); (misread thinking, its answer) and a second
                       misreading with its answer: consistent but wrong, since the CRM judges agreement,
                       not correctness;
      answer link (0)  (right thinking, wrong answer), (misread thinking, true answer): the answer swapped;
      steps link (0)   a thinking whose steps say one thing and whose conclusion another, with the answer
                       EQUAL to that conclusion: (right steps, wrong conclusion) and (misread steps, true
                       conclusion). an oracle that read the conclusion only would call these consistent;
      both links (0)   (right steps, wrong conclusion, true answer).

    A "mixed" thinking (steps and conclusion disagree) is inconsistent whatever the answer, so the CRM must
    read the steps, not only the conclusion. Three positives to five negatives: with the policy's rollouts
    (mostly consistent) the classes stay near balanced.

    Example (count, 3 red shapes, misread as 5):
      "I count the red shapes: 1, 2, 3. So the answer is 5." + 5 -> 0 (the steps list 3);
      "I count the red shapes: 1, 2, 3, 4, 5. So the answer is 5." + 5 -> 1 (consistent, wrong).
    """
    rng, pairs = random.Random(seed), []
    for row in split:
        right, _ = parse_completion(row["solution"])
        misread, truth, wrong = row["wrong_thinking"], row["answer"], row["wrong_answer"]
        other, other_answer = another_misreading(row, rng)
        right_steps_wrong_conclusion = with_conclusion(right, wrong)
        misread_steps_true_conclusion = with_conclusion(misread, truth)
        for thinking, answer in [(right, truth), (misread, wrong), (other, other_answer),  # 1
                                 (right, wrong), (misread, truth),  # 0: the answer link
                                 (right_steps_wrong_conclusion, wrong),  # 0: the steps link
                                 (misread_steps_true_conclusion, truth),  # 0: the steps link
                                 (right_steps_wrong_conclusion, truth)]:  # 0: both links
            pairs.append({"question": row["question"], "thinking": thinking, "answer": answer,
                          "label": int(oracle_consistent(thinking, answer))})
    rng.shuffle(pairs)
    return pairs


def another_misreading(row: dict, rng: random.Random) -> tuple[str, str]:
    """A consistent thinking (steps and conclusion agree) that concludes neither the true nor the wrong
    answer of an embedded task, and that conclusion: count -> another count 1-6, bars -> heights whose tallest
    is the third bar.

    Example: count, truth 3, wrong 5, k drawn from {1, 2, 4, 6}, say 2
             -> ("I count the red shapes: 1, 2. So the answer is 2.", "2").
    """
    taken = (row["answer"], row["wrong_answer"])
    if row["family"] == "count":
        colour = row["question"].split()[2]  # "How many red shapes are there?"
        k = rng.choice([k for k in range(1, 7) if str(k) not in taken])
        return count_thinking(colour, k), str(k)
    third = next(letter for letter in "ABC" if letter not in taken)
    heights = rng.sample(range(1, 7), 3)
    tallest, wanted = heights.index(max(heights)), "ABC".index(third)
    heights[tallest], heights[wanted] = heights[wanted], heights[tallest]  # the third bar is now the tallest
    return bars_thinking(heights), third


def step_conclusion_pairs(split) -> list[dict]:
    """The held-out test of whether the CRM reads the steps: two pairs per task, both with the answer equal
    to the thinking's conclusion, so only the steps tell them apart:
      (the consistent chain, true answer) -> 1;
      a chain whose steps disagree with its conclusion -> 0: even rows keep the right steps and conclude the
      wrong answer, odd rows keep the misread steps and conclude the true answer (the dangerous kind: the
      right answer after wrong reasoning).

    Example (bars, heights A 4, B 1, C 6; misread as A 6, B 1, C 4):
      "Heights: A 4, B 1, C 6. So the answer is C." + C -> 1;
      even row: "Heights: A 4, B 1, C 6. So the answer is A." + A -> 0;
      odd row:  "Heights: A 6, B 1, C 4. So the answer is C." + C -> 0.
    """
    pairs = []
    for index, row in enumerate(split):
        right, _ = parse_completion(row["solution"])
        if index % 2 == 0:
            negative, conclusion = with_conclusion(right, row["wrong_answer"]), row["wrong_answer"]
        else:
            negative, conclusion = with_conclusion(row["wrong_thinking"], row["answer"]), row["answer"]
        for thinking, answer in [(right, row["answer"]), (negative, conclusion)]:
            pairs.append({"question": row["question"], "thinking": thinking, "answer": answer,
                          "family": row["family"], "label": int(oracle_consistent(thinking, answer))})
    return pairs


@torch.no_grad()
def policy_rollouts(cfg: Config, model, processor, split, n_prompts: int, seed: int) -> list[dict]:
    """The paper's recipe in miniature: the policy's own sampled rollouts on n_prompts prompts of `split`, as
    {question, thinking, answer} rows for a judge (the rule oracle, or an LLM: adapters/judge.py). A CRM that
    has only seen clean templates is easy to fool with drifted text (measured: docs/LOG.md). Rollouts with
    nothing to parse are skipped: they get r_cons = 0 without the CRM."""
    rows = random.Random(seed).sample(range(len(split)), min(n_prompts, len(split)))
    torch.manual_seed(seed)
    pairs = []
    for start in tqdm(range(0, len(rows), 50), desc="CRM data: policy rollouts"):
        chunk = rows[start: start + 50]
        prompt = to_device(encode_prompts(processor, [row_image(split, i, cfg.image_column) for i in chunk],
                                          [split[i][cfg.question_column] for i in chunk]), cfg.device)
        out = model.generate(**prompt, max_new_tokens=cfg.max_new_tokens, do_sample=True, top_k=0, top_p=1.0,
                             temperature=cfg.crm_rollout_temperature,
                             num_return_sequences=cfg.crm_rollout_samples,
                             eos_token_id=stop_token_ids(processor),
                             pad_token_id=processor.tokenizer.pad_token_id)
        texts = processor.batch_decode(out[:, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
        for j, text in enumerate(texts):
            think, answer = parse_completion(text)
            if think is not None and answer is not None:
                pairs.append({"question": split[chunk[j // cfg.crm_rollout_samples]][cfg.question_column],
                              "thinking": think, "answer": answer})
    return pairs


def oracle_labelled(rows: list[dict]) -> list[dict]:
    """Rows with "label" from the rule oracle (embedded tasks only: it reads our templates)."""
    return [{**r, "label": int(oracle_consistent(r["thinking"], r["answer"]))} for r in rows]


def held_out_split(pairs: list[dict], seed: int) -> tuple[list[dict], list[dict]]:
    """(train, test): the pairs shuffled by seed, 5 % (at least one) held out."""
    pairs = list(pairs)
    random.Random(seed).shuffle(pairs)
    n_held = max(1, len(pairs) // 20)
    return pairs[n_held:], pairs[:n_held]


def encode_pairs(tokenizer, pairs: list[dict], device, max_length: int | None = None,
                 max_hypothesis_tokens: int = 64) -> dict:
    """premise = question + thinking, hypothesis = 'The final answer is {a}.', at most max_length tokens a
    pair (None: crm_max_length(tokenizer)), right-padded to the longest pair.

    A pair that fits is encoded exactly as tokenizer(premise, hypothesis) encodes it. A longer one never
    raises (a fast tokenizer's own truncation does when the hypothesis alone is too long, e.g. ~130 emoji):
    the hypothesis, so a long answer, is cut to its first max_hypothesis_tokens tokens, and the premise keeps
    the question and the end of the thinking (kept_positions), where the conclusion the CRM must read sits.
    The cut is by tokens; characters go before tokenizing only where none of their tokens could stay
    (cut_to_fit). Right padding: every row's real tokens sit at positions 0..n-1, as alone, and a decoder
    classifier's last real token is the last one before the pads.
    """
    max_length = crm_max_length(tokenizer) if max_length is None else max_length
    if max_length <= tokenizer.num_special_tokens_to_add(pair=True) + max_hypothesis_tokens:
        raise ValueError(f"max_length={max_length} leaves no room for the premise: it must exceed the "
                         f"special tokens plus max_hypothesis_tokens={max_hypothesis_tokens}.")
    pairs = [cut_to_fit(tokenizer, p, max_length) for p in pairs]
    premises = [f"{p['question']} {p['thinking']}" for p in pairs]
    hypotheses = [crm_hypothesis(p["answer"]) for p in pairs]
    # untruncated and unpadded: one list of ids per pair
    full = tokenizer(premises, hypotheses, verbose=False)
    rows = []
    for i, p in enumerate(pairs):
        row, sequence_ids = {key: values[i] for key, values in full.items()}, full.sequence_ids(i)
        if len(sequence_ids) > max_length or sequence_ids.count(1) > max_hypothesis_tokens:  # rare: cut it
            n_question = len(tokenizer(p["question"], add_special_tokens=False)["input_ids"])
            keep = kept_positions(sequence_ids, n_question, max_length, max_hypothesis_tokens)
            row = {key: [values[j] for j in keep] for key, values in row.items()}
        rows.append(row)
    return to_device(dict(tokenizer.pad(rows, padding_side="right", return_tensors="pt")), device)


def train_crm(cfg: Config, crm, tokenizer, pairs: list[dict]) -> list[float]:
    """Cross-entropy on the two labels."""
    rng = random.Random(cfg.seed + 2)

    def batch_loss(step: int) -> torch.Tensor:
        batch_pairs = rng.sample(pairs, min(cfg.crm_batch_size, len(pairs)))
        labels = torch.tensor([p["label"] for p in batch_pairs], device=cfg.device)  # (B,)
        with autocast(cfg.device, compute_dtype(cfg.device, cfg.dtype)):
            batch = encode_pairs(tokenizer, batch_pairs, cfg.device, cfg.crm_max_length)
            logits = crm(**batch).logits.float()  # (B, 2)
        return torch.nn.functional.cross_entropy(logits, labels)

    return fit(crm, batch_loss, cfg.crm_steps, cfg.crm_lr, cfg.warmup_steps, 0.01, "CRM SFT")


@torch.no_grad()
def crm_scores(crm, tokenizer, pairs: list[dict], device, batch_size: int = 64,
               max_length: int | None = None) -> list[float]:
    """P(consistent | question, thinking, answer) for every pair, in batches; at most max_length tokens a
    pair (None: what the CRM was trained with, crm_max_length)."""
    consistent = crm.config.label2id.get("consistent", 1)
    probs = []
    for start in range(0, len(pairs), batch_size):
        batch = encode_pairs(tokenizer, pairs[start: start + batch_size], device, max_length)
        logits = crm(**batch).logits.float()  # (B, 2)
        probs += torch.softmax(logits, dim=-1)[:, consistent].tolist()
    return probs


def split_by_prompt(rows: list[dict], seed: int, share: float = 0.05) -> tuple[list[dict], list[dict]]:
    """(train, test): every rollout of a `share` of the prompts (dataset rows; at least one) held out, so the
    test asks about prompts the CRM never trained on. Rows without a prompt row count as their own prompt.

    Example: rollouts of prompts 3, 3, 7, 9 with share 0.34 -> one of the 3 prompts held out, e.g. 7:
             test = the rollout of 7, train = the other three.
    """
    prompts = sorted({str(r.get("row", i)) for i, r in enumerate(rows)})
    held = set(random.Random(seed).sample(prompts, max(1, round(share * len(prompts)))))
    test = [r for i, r in enumerate(rows) if str(r.get("row", i)) in held]
    return [r for i, r in enumerate(rows) if str(r.get("row", i)) not in held], test


# -------------------------------------------------- 5. main: the stage in order
def main(cfg: Config) -> dict:
    started = time.time()
    check_config(cfg)  # every flag, before anything is read, loaded or written
    if cfg.crm_rollouts:
        return crm_from_rollouts(cfg, started)  # the paper's recipe: the CRM alone, from RL rollouts
    torch.manual_seed(cfg.seed)
    run_dir = Path(cfg.runs_dir) / cfg.run
    embedded, judged = cfg.dataset is None, bool(cfg.judge or cfg.judge_url)

    # 0. every input read and checked before any model loads; the CRM and the judge tried before any SFT
    crm_rows = real_data.read_crm_jsonl(cfg.crm_data) if cfg.crm_data else None
    if crm_rows is not None:
        real_data.check_crm_rows(crm_rows, f"--crm-data {cfg.crm_data}")
    data = build_embedded_dataset(cfg) if embedded else real_data.load_real_dataset(cfg)
    train_split, test_split = ("train", "test") if embedded else (cfg.train_split, cfg.test_split)
    train, test = data[train_split], data[test_split]
    if not embedded:
        check_dataset(cfg, train, test, train_split, test_split)  # every image opened once
    run_dir.mkdir(parents=True, exist_ok=True)
    new = run_dir / "stage1.new"  # this run's outputs until it is complete; the finished run stays meanwhile
    shutil.rmtree(new, ignore_errors=True)  # what a failed or killed earlier attempt left
    new.mkdir()
    if judged:
        check_judge(cfg, run_dir)
    policy_path, crm_path = cfg.policy, cfg.crm
    if embedded and (policy_path is None or crm_path is None):
        bpe = train_bpe(cfg.seed)
        if policy_path is None:
            build_tiny_policy(new / "policy_init", cfg.seed, bpe)
            policy_path = str(new / "policy_init")
        if crm_path is None:
            build_tiny_crm(new / "crm_init", cfg.seed, bpe)
            crm_path = str(new / "crm_init")
    crm_path = crm_path or "answerdotai/ModernBERT-large"  # the paper's CRM backbone for real runs
    check_crm(cfg, crm_path)

    # 1. data
    save_folder_atomic(new / "data", data)
    print(f"data: {len(train)} train / {len(test)} test")

    # 2. policy: build (embedded) or load, then SFT
    summary = {"config": dataclasses.asdict(cfg)}
    dtype = compute_dtype(cfg.device, cfg.dtype)  # trained weights fp32, the rest in dtype: see compute_dtype
    model, processor = load_policy(policy_path or "Qwen/Qwen2-VL-2B-Instruct", cfg.device, cfg.max_pixels,
                                   dtype=dtype if cfg.skip_policy_sft else torch.float32)
    if not cfg.skip_policy_sft:
        losses = sft_policy(cfg, model, processor, train)
        tenth = max(1, len(losses) // 10)
        first, last = sum(losses[:tenth]) / tenth, sum(losses[-tenth:]) / tenth
        summary["sft_loss"] = {"first_10pct": first, "last_10pct": last}
        print(f"SFT loss: {first:.3f} -> {last:.3f}")
    save_folder_atomic(new / "policy_sft", model, processor)
    with autocast(cfg.device, dtype):
        summary["policy_check"] = greedy_check(cfg, model, processor, test, cfg.eval_n, embedded)

    # 3. the consistency reward model: its data (judged rollouts of the SFT policy), then SFT
    rollouts = {"train": [], "test": []}  # the SFT policy's own rollouts, oracle-labelled (embedded tasks)
    step_pairs = []  # embedded: held-out pairs told apart by their steps only (step_conclusion_pairs)
    if crm_rows is not None:  # real runs: judged rollouts, 5 % held out
        train_pairs, test_pairs = held_out_split(crm_rows, cfg.seed)
    elif embedded:  # templates with hard negatives, plus the SFT policy's rollouts judged by the oracle
        with autocast(cfg.device, dtype):
            for name, split, n in [("train", train, cfg.crm_rollout_prompts), ("test", test, len(test))]:
                rollouts[name] = oracle_labelled(policy_rollouts(cfg, model, processor, split, n, cfg.seed))
        train_pairs = embedded_crm_pairs(train, cfg.seed) + rollouts["train"]
        random.Random(cfg.seed).shuffle(train_pairs)
        test_pairs = embedded_crm_pairs(test, cfg.seed)
        step_pairs = step_conclusion_pairs(test)  # does the CRM read the steps? (answer = conclusion in both)
    else:  # real runs without --crm-data: the rollouts the judge labels below
        with autocast(cfg.device, dtype):
            rollouts["train"] = policy_rollouts(cfg, model, processor, train, cfg.crm_rollout_prompts,
                                                cfg.seed)
    del model  # the judge and the CRM need the memory
    if judged:  # real runs: the CRM's data; embedded: the judge measured against the rule oracle
        from adapters import judge as judges

        labelled, stats = judge_rows(cfg, rollouts["train"], run_dir)
        keys = ("question", "thinking", "answer", "label")  # the --crm-data format: reusable
        write_jsonl_atomic(new / "crm_data.jsonl", [{k: r[k] for k in keys} for r in labelled])
        summary["judge"] = {"judge": cfg.judge or f"{cfg.judge_model} at {cfg.judge_url}", **stats}
        if embedded:
            oracle = [int(oracle_consistent(r["thinking"], r["answer"])) for r in labelled]
            summary["judge"]["agreement"] = judges.agreement([r["label"] for r in labelled], oracle)
        else:
            real_data.check_crm_rows(labelled, f"the judge's labels of {stats['rows']} SFT-policy rollouts")
            train_pairs, test_pairs = held_out_split(labelled, cfg.seed)
    crm, crm_tokenizer = load_crm(crm_path, cfg.device)
    crm_tokenizer.model_max_length = cfg.crm_max_length  # saved with it: later stages cut pairs as it trained
    crm_losses = train_crm(cfg, crm, crm_tokenizer, train_pairs)
    save_folder_atomic(new / "crm", crm, crm_tokenizer)
    with autocast(cfg.device, dtype):
        test_probs = crm_scores(crm, crm_tokenizer, test_pairs, cfg.device, max_length=cfg.crm_max_length)
        rollout_probs = crm_scores(crm, crm_tokenizer, rollouts["test"], cfg.device,
                                   max_length=cfg.crm_max_length)
        step_probs = crm_scores(crm, crm_tokenizer, step_pairs, cfg.device, max_length=cfg.crm_max_length)
    report = classification_report(test_probs, [p["label"] for p in test_pairs])
    summary["crm"] = {**report, "final_loss": crm_losses[-1] if crm_losses else None}
    if embedded and not cfg.crm_data:
        summary["crm_on_step_pairs"] = step_pairs_report(step_probs, step_pairs, train_pairs)
        # the harder test: text the policy really writes
        summary["crm_on_policy_rollouts"] = rollouts_report(rollout_probs, rollouts)
    summary["seconds"] = round(time.time() - started, 1)
    write_json_atomic(new / "stage1.json", summary)
    replace_run(run_dir, new)  # only now does the new run replace the previous finished one

    print_summary(summary, run_dir, embedded)
    return summary


# -------------------------------------------------- 6. the paper's recipe: the CRM of RL rollouts
def crm_from_rollouts(cfg: Config, started: float) -> dict:
    """The paper's recipe, after stage 5 has run GRPO: a CRM trained on the rollouts sampled during that
    training (--crm-rollouts), each judged (the rule oracle on the embedded tasks, --judge / --judge-url on
    real data; a row that already has a label keeps it), plus, on the embedded tasks, the same template pairs
    as the CRM of the SFT policy's rollouts (runs/<run>/crm), from the same initial weights, so the two differ
    only in the rollouts they read. The run's data and SFT policy are read, never retrained. Held out: every
    rollout of 5 % of the prompts. Writes runs/<run>/<crm_out>/ and runs/<run>/<crm_out>.json, only once
    complete."""
    run_dir = Path(cfg.runs_dir) / cfg.run
    stage1_config = read_stage1(run_dir)["config"]
    embedded, judged = stage1_config["dataset"] is None, bool(cfg.judge or cfg.judge_url)
    if cfg.crm_out in STAGE1_OUTPUTS + ["stage1.new"] or not re.fullmatch(r"[\w.-]+", cfg.crm_out):
        raise SystemExit(f"--crm-out {cfg.crm_out}: name a new folder of runs/{cfg.run}/ (letters, digits, "
                         f"_ . -), not one of stage 1's own ({', '.join(STAGE1_OUTPUTS)}).")
    rows = read_rollouts(cfg.crm_rollouts)  # every file read and checked before any model loads
    if not rows:
        raise SystemExit(f"--crm-rollouts {cfg.crm_rollouts}: no rollout with a <think> and an <answer> to "
                         f"judge; the policy that wrote them never finished the format.")
    unlabelled = [r for r in rows if "label" not in r]
    if unlabelled and not embedded and not judged:
        raise SystemExit(f"--crm-rollouts {cfg.crm_rollouts}: {len(unlabelled)} rollouts have no label, and "
                         f"only the embedded tasks have an oracle: pass a judge (--judge MODEL, or "
                         f"--judge-url URL --judge-model NAME) to label them.")
    crm_rows = real_data.read_crm_jsonl(cfg.crm_data) if cfg.crm_data else []
    crm_path = cfg.crm or stage1_config["crm"] or (str(run_dir / "crm_init") if embedded
                                                   else "answerdotai/ModernBERT-large")
    if judged:
        check_judge(cfg, run_dir)
    check_crm(cfg, crm_path)

    summary = {"config": dataclasses.asdict(cfg), "crm_init": crm_path}
    if unlabelled and judged:  # real runs: the judge, its replies cached (a rerun asks only for the rest)
        from adapters import judge as judges

        labelled, stats = judge_rows(cfg, unlabelled, run_dir, "RL rollouts")
        summary["judge"] = stats
        if embedded:  # measured against the oracle
            oracle = [int(oracle_consistent(r["thinking"], r["answer"])) for r in labelled]
            summary["judge"]["agreement"] = judges.agreement([r["label"] for r in labelled], oracle)
        rows = [r for r in rows if "label" in r] + labelled
    else:  # embedded: the rule oracle judges
        rows = [r if "label" in r else {**r, "label": int(oracle_consistent(r["thinking"], r["answer"]))}
                for r in rows]
    train_rows, test_rows = split_by_prompt(rows, cfg.seed)
    train_pairs = train_rows + crm_rows
    if embedded:
        from datasets import load_from_disk

        data = load_from_disk(str(require(run_dir / "data", "python 01_sft_rm.py")))
        train_pairs += embedded_crm_pairs(data["train"], cfg.seed)
    real_data.check_crm_rows(train_pairs, f"--crm-rollouts {cfg.crm_rollouts} (and the pairs beside them)")
    random.Random(cfg.seed).shuffle(train_pairs)
    crm, tokenizer = load_crm(crm_path, cfg.device)
    tokenizer.model_max_length = cfg.crm_max_length  # saved with it: later stages cut pairs as it trained
    losses = train_crm(cfg, crm, tokenizer, train_pairs)
    with autocast(cfg.device, compute_dtype(cfg.device, cfg.dtype)):
        probs = crm_scores(crm, tokenizer, test_rows, cfg.device, max_length=cfg.crm_max_length)
    if not embedded:  # the judge's labels: agreement only (the links need the oracle)
        report = classification_report(probs, [r["label"] for r in test_rows])
        summary["crm_on_held_out_rollouts"] = {**report, "steps_only": 0, "crm_catches_steps_only": None}
    else:
        summary["crm_on_held_out_rollouts"] = rollouts_report(probs, {"train": train_rows, "test": test_rows})
        by_method = {}  # the held-out rollouts of each method's runs apart
        for method in sorted({r.get("method", "") for r in test_rows}):
            mine = [i for i, r in enumerate(test_rows) if r.get("method", "") == method]
            by_method[method] = rollouts_report([probs[i] for i in mine],
                                                {"train": [], "test": [test_rows[i] for i in mine]})
        summary["crm_on_held_out_rollouts"]["by_method"] = by_method
    summary |= {"rollouts": len(rows), "files": cfg.crm_rollouts, "train_pairs": len(train_pairs),
                "final_loss": losses[-1], "seconds": round(time.time() - started, 1)}
    save_folder_atomic(run_dir / cfg.crm_out, crm, tokenizer)
    write_json_atomic(run_dir / f"{cfg.crm_out}.json", summary)
    r = summary["crm_on_held_out_rollouts"]
    caught = "n/a" if r["crm_catches_steps_only"] is None else f"{r['crm_catches_steps_only']:.1%}"
    print(f"\nCRM from {len(rows)} judged RL rollouts (+ {len(train_pairs) - len(train_rows)} other pairs): "
          f"on {r['n']} held-out rollouts (prompts it never trained on) accuracy {r['accuracy']:.1%}, "
          f"F1 {r['f1']:.3f}; it flags {caught} of the {r['steps_only']} whose steps alone fail")
    print(f"wrote {run_dir / cfg.crm_out}/ and {cfg.crm_out}.json in {summary['seconds']:.0f} s")
    return summary


# ============================================================================================================
# Appendix A: the embedded toy world (skip on a first reading)
# Two task families drawn with Pillow, a byte-level BPE trained on their texts, and the tiny random models
# that stand in for Qwen2-VL and ModernBERT-large: the whole stage runs offline, on a CPU.
# ============================================================================================================


# A.1 drawing the tasks
COLOURS = {"red": (220, 40, 40), "blue": (40, 90, 230), "green": (30, 160, 60)}


def draw_count_task(rng: random.Random, size: int) -> tuple[Image.Image, str, int, int]:
    """Shapes on a grid of cells (no overlaps). Returns (image, colour asked, true count, a wrong count)."""
    colour, other = rng.sample(list(COLOURS), 2)
    n_target, n_other = rng.randint(1, 6), rng.randint(0, 3)
    cells_per_side = size // 14
    cells = rng.sample(range(cells_per_side**2), n_target + n_other)
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    for i, cell in enumerate(cells):
        x, y = 14 * (cell % cells_per_side) + 1, 14 * (cell // cells_per_side) + 1
        fill = COLOURS[colour] if i < n_target else COLOURS[other]
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape([x, y, x + 11, y + 11], fill=fill)
    wrong = rng.choice([k for k in range(1, 7) if k != n_target])
    return image, colour, n_target, wrong


def draw_bars_task(rng: random.Random, size: int) -> tuple[Image.Image, list[int], list[int]]:
    """Three bars A, B, C (left to right). Returns (image, true heights, misread heights)."""
    heights = rng.sample(range(1, 7), 3)
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    unit, width = (size - 8) // 6, size // 5
    for i, h in enumerate(heights):
        x = 6 + i * (width + size // 10)
        draw.rectangle([x, size - 4 - h * unit, x + width, size - 4], fill=(60, 60, 60))
    tallest = heights.index(max(heights))
    other = rng.choice([i for i in range(3) if heights[i] != max(heights)])
    misread = list(heights)  # a misreading that changes the winner: the tallest swapped with another bar
    misread[tallest], misread[other] = misread[other], misread[tallest]
    return image, heights, misread


def count_thinking(colour: str, n: int) -> str:
    return f"I count the {colour} shapes: {', '.join(str(i) for i in range(1, n + 1))}. So the answer is {n}."


def bars_thinking(heights: list[int]) -> str:
    listed = ", ".join(f"{'ABC'[i]} {h}" for i, h in enumerate(heights))
    return f"Heights: {listed}. So the answer is {'ABC'[heights.index(max(heights))]}."


def format_completion(thinking: str, answer: str) -> str:
    return f"<think>{thinking}</think><answer>{answer}</answer>"


def make_task(rng: random.Random, size: int, inconsistent_frac: float) -> dict:
    """One embedded example: image, question, true answer, the consistent trace and the SFT trace.

    With probability inconsistent_frac the SFT trace is inconsistent: half of those keep the right
    thinking and state a wrong answer, the other half think wrong and still state the right answer.
    """
    if rng.random() < 0.5:
        image, colour, n, wrong = draw_count_task(rng, size)
        question, truth, wrong_answer = f"How many {colour} shapes are there?", str(n), str(wrong)
        right_thinking, wrong_thinking = count_thinking(colour, n), count_thinking(colour, wrong)
        family = "count"
    else:
        image, heights, misread = draw_bars_task(rng, size)
        question = "Which bar is the tallest: A, B or C?"
        truth, wrong_answer = "ABC"[heights.index(max(heights))], "ABC"[misread.index(max(misread))]
        right_thinking, wrong_thinking, family = bars_thinking(heights), bars_thinking(misread), "bars"
    kind = "consistent"
    thinking, answer = right_thinking, truth
    if rng.random() < inconsistent_frac:
        kind = rng.choice(["right_thinking_wrong_answer", "wrong_thinking_right_answer"])
        if kind == "right_thinking_wrong_answer":
            thinking, answer = right_thinking, wrong_answer
        else:
            thinking, answer = wrong_thinking, truth
    return {
        "image": image, "question": question, "answer": truth, "family": family,
        "solution": format_completion(right_thinking, truth),  # the consistent, correct trace
        "wrong_thinking": wrong_thinking,  # a plausible misreading (hard negatives for the CRM)
        "wrong_answer": wrong_answer,
        "sft_target": format_completion(thinking, answer),  # what SFT imitates
        "sft_kind": kind,
    }


def build_embedded_dataset(cfg: Config):
    """Deterministic by seed: the same cfg gives the same images, questions and traces."""
    from datasets import Dataset, DatasetDict

    rng = random.Random(cfg.seed)
    train = [make_task(rng, cfg.image_size, cfg.inconsistent_frac) for _ in range(cfg.n_train)]
    test = [make_task(rng, cfg.image_size, cfg.inconsistent_frac) for _ in range(cfg.n_test)]
    return DatasetDict({"train": Dataset.from_list(train), "test": Dataset.from_list(test)})


# A.2 a BPE and the tiny models
SYSTEM_PROMPT = "You are a helpful assistant."
VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + VISION_TOKENS  # Qwen's order
REASONING_TAGS = ["<think>", "</think>", "<answer>", "</answer>"]


QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
              r"\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2VL_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tokenizer_corpus(seed: int) -> list[str]:
    rng = random.Random(seed)
    texts = [SYSTEM_PROMPT, INSTRUCTION, "system user assistant", "The final answer is"]
    for _ in range(3000):
        task = make_task(rng, 84, 0.0)
        texts += [task["question"] + INSTRUCTION, task["solution"], task["wrong_thinking"],
                  f"The final answer is {task['answer']}."]
    return texts


def train_bpe(seed: int, vocab_size: int = 400):
    """Byte-level BPE with Qwen2's normaliser and pre-tokeniser, trained on the embedded texts."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(tokenizer_corpus(seed), trainer)
    return bpe


def build_tiny_policy(folder: Path, seed: int, bpe) -> None:
    """A 1.3M-parameter Qwen2-VL (random init) + processor, saved like a hub checkpoint."""
    from transformers import (Qwen2Tokenizer, Qwen2VLConfig, Qwen2VLForConditionalGeneration,
                              Qwen2VLImageProcessorPil, Qwen2VLProcessor, Qwen2VLVideoProcessor)

    model_json = json.loads(bpe.to_str())["model"]
    tokenizer = Qwen2Tokenizer(vocab=model_json["vocab"], merges=[tuple(m) for m in model_json["merges"]],
                               unk_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                               padding_side="left")
    tokenizer.add_tokens(SPECIAL_TOKENS, special_tokens=True)
    tokenizer.add_tokens(REASONING_TAGS)  # atomic, but not special: they survive skip_special_tokens
    image_processor = Qwen2VLImageProcessorPil(size={"shortest_edge": 56 * 56, "longest_edge": 112 * 112},
                                               patch_size=14, temporal_patch_size=2, merge_size=2)
    processor = Qwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                 video_processor=Qwen2VLVideoProcessor(), chat_template=QWEN2VL_CHAT_TEMPLATE)
    ids = tokenizer.convert_tokens_to_ids
    config = Qwen2VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=512,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=1024,
                         rope_parameters={"rope_type": "default", "mrope_section": [4, 6, 6],
                                          "rope_theta": 1e6},
                         initializer_range=0.02, bos_token_id=None, eos_token_id=ids("<|im_end|>"),
                         pad_token_id=ids("<|endoftext|>")),
        vision_config=dict(depth=2, embed_dim=64, hidden_size=128, num_heads=4, mlp_ratio=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=True)
    torch.manual_seed(seed)
    Qwen2VLForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)


def build_tiny_crm(folder: Path, seed: int, bpe) -> None:
    """A 0.4M-parameter ModernBERT classifier (random init) with a [CLS] a [SEP] b [SEP] tokenizer.

    Its tokenizer is a copy of `bpe` with four special tokens and a pair template added: `bpe` itself, which
    the policy's tokenizer is made from too, is left as it was."""
    from tokenizers import Tokenizer
    from tokenizers.processors import TemplateProcessing
    from transformers import ModernBertConfig, ModernBertForSequenceClassification, PreTrainedTokenizerFast

    bpe = Tokenizer.from_str(bpe.to_str())  # a copy: the special tokens and template below are the CRM's only
    bpe.add_special_tokens(["[CLS]", "[SEP]", "[PAD]", "[MASK]"])
    cls_id, sep_id = bpe.token_to_id("[CLS]"), bpe.token_to_id("[SEP]")
    bpe.post_processor = TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                            special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, cls_token="[CLS]", sep_token="[SEP]",
                                        pad_token="[PAD]", mask_token="[MASK]", padding_side="right",
                                        model_max_length=512)
    config = ModernBertConfig(vocab_size=bpe.get_vocab_size(), hidden_size=128, intermediate_size=256,
                              num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=512,
                              global_attn_every_n_layers=1, pad_token_id=bpe.token_to_id("[PAD]"),
                              cls_token_id=cls_id, sep_token_id=sep_id, bos_token_id=cls_id,
                              eos_token_id=sep_id,
                              classifier_pooling="cls", num_labels=2, id2label=CRM_LABELS,
                              label2id={v: k for k, v in CRM_LABELS.items()})
    torch.manual_seed(seed)
    ModernBertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


# ============================================================================================================
# Appendix B: small shared helpers (skip on a first reading)
# Atomic files and the run folder, the command line, real datasets checked row by row, the CRM tried before
# any SFT, and the LLM judge's plumbing: what keeps a real run safe, not what the stage teaches.
# ============================================================================================================


# B.1 files and runs
def write_text_atomic(path: Path, text: str) -> None:
    """Write through a temporary file and a rename, so a killed run never leaves half a file."""
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json_atomic(path: Path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2))


def write_jsonl_atomic(path: Path, rows: list[dict]) -> None:
    tmp = Path(str(path) + ".tmp")
    with open(tmp, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    os.replace(tmp, path)


def save_folder_atomic(folder: Path, *objects) -> None:
    """save_pretrained (or a datasets save_to_disk) of each object into folder.tmp, then one rename, so
    a killed run never leaves a half-written model, processor or dataset under the final name."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for obj in objects:
        obj.save_pretrained(tmp) if hasattr(obj, "save_pretrained") else obj.save_to_disk(str(tmp))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


# Stage 1's outputs under runs/<run>/. A run writes them all into runs/<run>/stage1.new/ and moves them in
# only when it is complete (replace_run), so a rerun that fails, early or after an hour, leaves the earlier
# finished run as it was. stage1.json, the marker of a finished stage 1, leaves first and arrives last.
STAGE1_OUTPUTS = ["data", "policy_init", "crm_init", "policy_sft", "crm", "crm_data.jsonl"]


def replace_run(run_dir: Path, new: Path) -> None:
    """Move a complete stage 1 from `new` into run_dir: drop the old marker, swap every output (one absent
    from `new` is removed, so nothing stale stays), then move the new stage1.json in. A kill in between leaves
    no marker (later stages then ask for stage 1 again), never a marker beside another run's folders."""
    (run_dir / "stage1.json").unlink(missing_ok=True)
    for name in STAGE1_OUTPUTS:
        old = run_dir / name
        shutil.rmtree(old) if old.is_dir() else old.unlink(missing_ok=True)
        if (new / name).exists():
            (new / name).rename(old)
    os.replace(new / "stage1.json", run_dir / "stage1.json")
    shutil.rmtree(new)


def read_jsonl(path: Path, drop_cut_last_line: bool = False) -> list[dict]:
    """Rows of a JSONL file; a broken line is an error that names the file and the line.

    drop_cut_last_line: a file this project appends to (metrics.jsonl) may end in a line cut short by a kill
    or a full disk in mid-write: that last line is dropped with a warning instead (an append breaks no other).
    """
    lines = Path(path).read_text().splitlines()
    while drop_cut_last_line and lines and not lines[-1].strip():
        lines.pop()
    if drop_cut_last_line and lines:
        try:
            json.loads(lines[-1])
        except json.JSONDecodeError:
            print(f"warning: {path}, line {len(lines)}: cut short ({lines[-1][:60]!r}...), dropped")
            lines.pop()
    rows = []
    for number, line in enumerate(lines, start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise SystemExit(f"{path}, line {number}: not valid JSON ({error}); fix or delete that line.")
    return rows


def read_stage1(run_dir: Path) -> dict:
    """Stage 1's summary; its "config" names the data columns every later stage reads."""
    path = require(run_dir / "stage1.json", f"python 01_sft_rm.py --run {run_dir.name}")
    return json.loads(path.read_text())


def require(path: Path, made_by: str) -> Path:
    """Fail with the command that creates `path` when an earlier stage has not been run."""
    if not path.exists():
        raise SystemExit(f"{path} does not exist: run `{made_by}` first.")
    return path


def default_crm(run_dir: Path) -> Path:
    """The CRM a later stage uses when no --crm is given: runs/<run>/crm_rl, the paper's recipe (trained on
    rollouts sampled during GRPO training: crm_from_rollouts), once it exists; until then runs/<run>/crm
    (trained on the SFT policy's rollouts)."""
    recipe = run_dir / Config.crm_out
    return recipe if recipe.is_dir() else require(run_dir / "crm", stage_command("01_sft_rm.py", run_dir))


def stage_command(script: str, run_dir: Path) -> str:
    """The command that runs `script` on the run in run_dir, for the fix a message prints.

    Example: stage_command("02_rollout.py", Path("runs/x")) -> "python 02_rollout.py --run x";
             stage_command("02_rollout.py", Path("/data/x"))
             -> "python 02_rollout.py --run x --runs-dir /data".
    """
    runs_dir = "" if run_dir.parent == Path("runs") else f" --runs-dir {run_dir.parent}"
    return f"python {script} --run {run_dir.name}{runs_dir}"


# Paths, models and devices of the later stages, checked before any model loads: a missing folder is otherwise
# taken for a hub id, a wrong model fails inside transformers, a missing GPU is a driver traceback.
def check_device(device: str) -> None:
    """--device names a device this machine has."""
    try:
        kind = torch.device(device)
    except (RuntimeError, ValueError):
        raise SystemExit(f"--device {device}: not a device torch knows; pass cpu, cuda or cuda:N.") from None
    if kind.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {device}: CUDA is not available here; pass --device cpu.")
    if kind.type == "cuda" and kind.index is not None and kind.index >= torch.cuda.device_count():
        raise SystemExit(f"--device {device}: this machine has {torch.cuda.device_count()} GPU(s); "
                         f"pass cuda:0 to cuda:{torch.cuda.device_count() - 1}.")


HUB_ID_RE = re.compile(r"\w[\w.-]*(?:/\w[\w.-]*)?")  # "Qwen/Qwen2-VL-2B-Instruct"; runs/x/policy is a path


def model_config(flag: str, name_or_path: str):
    """A model's transformers config, read before the model loads: a folder here must hold its config.json;
    anything else must be a hub id, read from the cache (or the hub, when online)."""
    from transformers import AutoConfig

    folder = Path(name_or_path)
    if folder.exists() and not (folder / "config.json").is_file():
        raise SystemExit(f"{flag} {name_or_path}: no config.json in it, so not a saved model folder "
                         f"(save_pretrained writes one).")
    if not folder.exists() and not HUB_ID_RE.fullmatch(name_or_path):
        raise SystemExit(f"{flag} {name_or_path}: no such folder.")
    try:
        return AutoConfig.from_pretrained(name_or_path)
    except Exception as error:  # not in the cache offline, no such repo, no network, a broken config.json
        if folder.exists():
            raise SystemExit(f"{flag} {name_or_path}: cannot read its config.json ({error}).")
        raise SystemExit(f"{flag} {name_or_path}: no such folder here, and not a hub model that loads "
                         f"({error}). Pass a model folder, or a hub id (offline: one already in the cache).")


def check_policy(flag: str, name_or_path: str) -> None:
    """A policy (--policy, --init, --checkpoints) is a vision-language model with its processor. A LoRA folder
    of stage 5 (adapter_config.json) is checked through its base model."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    adapter = Path(name_or_path) / "adapter_config.json"
    if adapter.is_file():
        base = json.loads(adapter.read_text()).get("base_model_name_or_path")
        return check_policy(f"{flag} {name_or_path}: its base_model_name_or_path", str(base))
    config = model_config(flag, name_or_path)
    vision_language = hasattr(config, "vision_config")
    if config.model_type not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES or not vision_language:
        raise SystemExit(f"{flag} {name_or_path}: a {config.model_type} model "
                         f"({', '.join(config.architectures or [])}), not a vision-language one: the policy "
                         f"is a Qwen2-VL / Qwen2.5-VL folder or hub id (e.g. runs/<run>/policy_sft).")
    folder = Path(name_or_path)
    processor_files = ("processor_config.json", "preprocessor_config.json")
    if folder.is_dir() and not any((folder / name).is_file() for name in processor_files):
        raise SystemExit(f"{flag} {name_or_path}: no processor in it (processor_config.json or "
                         f"preprocessor_config.json): save the model's processor into the folder too.")


def check_classifier(flag: str, name_or_path: str) -> None:
    """A CRM (--crm) is a text model that transformers gives a sequence-classification head: the policy passed
    by mistake fails here, not after the policy has loaded."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

    config = model_config(flag, name_or_path)
    text_classifier = config.model_type in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES
    if not text_classifier or hasattr(config, "vision_config"):
        raise SystemExit(f"{flag} {name_or_path}: a {config.model_type} model "
                         f"({', '.join(config.architectures or [])}), not a text classifier: the CRM is the "
                         f"sequence classifier stage 1 trains (runs/<run>/crm).")


# B.2 the command line: a flag per Config field, its comment as --help
def field_comments(config_class) -> dict[str, str]:
    """Each field's one-line comment in the class's own source, read with the tokenize module (so a "#"
    inside a default string is not taken for a comment).

    Example: {"sft_steps": "optimiser steps of policy SFT", ...}
    """
    import inspect
    import io
    import tokenize

    try:
        source = inspect.getsource(config_class)
    except (OSError, TypeError):  # a class with no source file (built at run time): no comments
        return {}
    comments, first_name = {}, {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        line = token.start[0]
        if token.type == tokenize.NAME and line not in first_name:
            first_name[line] = token.string
        elif token.type == tokenize.COMMENT and line in first_name:
            comments[first_name[line]] = token.string.lstrip("#").strip()
    return comments


def parse_config(config_class, description: str, argv=None):
    """A flag per dataclass field (--sft-steps for sft_steps); booleans are switches. Used by every stage.
    --help shows each field's one-line comment from the Config's source, and its default."""
    comments = field_comments(config_class)
    parser = argparse.ArgumentParser(description=description)
    for field in dataclasses.fields(config_class):
        flag = "--" + field.name.replace("_", "-")
        text = comments.get(field.name, "").replace("%", "%%")  # argparse formats help with %
        if field.type is bool:
            parser.add_argument(flag, action="store_true", help=text)
        else:
            # int | None -> int
            kinds = [t for t in typing.get_args(field.type) if t is not type(None)] or [field.type]
            parser.add_argument(flag, type={int: int, float: float}.get(kinds[0], str), default=field.default,
                                help=f"{text} (default: %(default)s)")
    # torchrun takes a flag after the script that abbreviates one of its own (--run: --run-path) and exits, so
    # its users write `torchrun ... 05_grpo_train.py -- --run x`; a "--" that reaches the stage is dropped
    argv = [arg for arg in (sys.argv[1:] if argv is None else argv) if arg != "--"]
    return config_class(**vars(parser.parse_args(argv)))


# B.3 real data: checked row by row before any model loads (loading it: adapters/real_data.py)
def check_dataset(cfg: Config, train, test, train_split: str, test_split: str) -> None:
    """Every row of a real dataset read once, before any model loads: each image opens, each question, answer
    (and SFT target) holds text; the train split has a batch for SFT. An error names split, row and column."""
    if len(train) == 0 or len(test) == 0:
        empty = train_split if len(train) == 0 else test_split
        raise SystemExit(f"--dataset {cfg.dataset}: split '{empty}' is empty.")
    if not cfg.skip_policy_sft and len(train) < cfg.sft_batch_size:
        raise SystemExit(f"--sft-batch-size {cfg.sft_batch_size}: the train split has only "
                         f"{len(train)} rows; pass at most {len(train)}.")
    for split, ds in [(train_split, train), (test_split, test)]:
        for column in real_data.dataset_columns(cfg)[1:]:
            for index, value in enumerate(ds[column]):
                if value is None or not str(value).strip():
                    raise SystemExit(f"--dataset {cfg.dataset}, split '{split}', row {index}: column "
                                     f"'{column}' is empty.")
        for index in tqdm(range(len(ds)), desc=f"opening the {split} images"):
            try:
                row_image(ds, index, cfg.image_column, split)
            except SystemExit as error:  # a JSONL file: name its line too (the split's rows are shuffled)
                lines = real_data.jsonl_lines(cfg, ds[index][cfg.image_column])
                if not lines:
                    raise
                where = f"--dataset {cfg.dataset}, line {', '.join(map(str, lines))}"
                raise SystemExit(f"{where}: {error}") from None


def row_image(ds, index: int, column: str, split: str | None = None) -> Image.Image:
    """The image of one row as RGB, or an error that names the split (when given), the row and the column."""
    value = ds[index][column]
    try:
        if isinstance(value, dict):  # Image(decode=False): {"path", "bytes"}
            import io
            value = Image.open(io.BytesIO(value["bytes"]) if value.get("bytes") else value["path"])
        return value.convert("RGB")
    except Exception as error:
        where = f"split '{split}', " if split else ""
        raise SystemExit(f"dataset {where}row {index}: cannot read the image in column '{column}' ({error}).")


# B.4 the CRM tried before any SFT; the LLM judge
def squashed(text: str) -> str:
    """Lower case without whitespace: how a decoded text is compared with the one encoded (tokenizers may
    lower-case or re-space it)."""
    return re.sub(r"\s+", "", text.lower())


def check_crm(cfg: Config, crm_path: str) -> None:
    """Everything the CRM needs, tried at the start of stage 1 (an hour of SFT must not end in a CRM error):
    the classifier and its tokenizer load (load_crm: the pad token), --crm-max-length fits its positions, a
    pair longer than that keeps its conclusion (the end of the thinking), and a padded batch of a short and a
    long pair scores as each pair alone. The CRM loads again for training after SFT (the GPU is free then).
    """
    try:
        crm, tokenizer = load_crm(crm_path, cfg.device)
    except Exception as error:  # a wrong id, a folder without a tokenizer, an architecture with no classifier
        raise SystemExit(f"--crm {crm_path}: cannot load it as a sequence classifier with its tokenizer "
                         f"({error!r}).")
    positions = getattr(crm.config.get_text_config(), "max_position_embeddings", None)
    if positions and cfg.crm_max_length > positions:
        raise SystemExit(f"--crm-max-length {cfg.crm_max_length}: {crm_path} reads at most {positions} "
                         f"positions; pass at most {positions}.")
    if not tokenizer.is_fast:
        raise SystemExit(f"--crm {crm_path}: its tokenizer is not a fast (tokenizers) one; "
                         f"encode_pairs needs the pair's sequence ids to cut a long thinking.")
    conclusion = "So the answer is 7."
    question = "How many red shapes are there?"
    pairs = [{"question": question, "thinking": "1, 2. So the answer is 2.", "answer": "2"},
             {"question": question,  # at least one token a word: past the limit
              "thinking": " ".join(["step"] * cfg.crm_max_length) + " " + conclusion, "answer": "7"}]
    try:
        long_ids = encode_pairs(tokenizer, pairs[1:], "cpu", cfg.crm_max_length)["input_ids"][0]
        together = crm_scores(crm, tokenizer, pairs, cfg.device, max_length=cfg.crm_max_length)
        alone = [crm_scores(crm, tokenizer, [p], cfg.device, max_length=cfg.crm_max_length)[0] for p in pairs]
    except ValueError as error:  # encode_pairs: a max length with no room for the premise
        raise SystemExit(f"--crm-max-length {cfg.crm_max_length}: {error}")
    if squashed(conclusion) not in squashed(tokenizer.decode(long_ids, skip_special_tokens=True)):
        raise SystemExit(f"--crm {crm_path}: a thinking longer than --crm-max-length {cfg.crm_max_length} "
                         f"loses its conclusion when cut: its tokenizer's pair encoding is not what "
                         f"encode_pairs expects.")
    if not all(math.isfinite(p) for p in together + alone) or max(
            abs(a - b) for a, b in zip(together, alone)) > 1e-3:
        raise SystemExit(f"--crm {crm_path}: P(consistent) {together} in a padded batch but {alone} one at a "
                         f"time (pad id {tokenizer.pad_token_id}): the classifier does not read its pairs' "
                         f"last real tokens, or its weights are not finite.")
    del crm


def check_judge_flags(cfg) -> None:
    """--judge, --judge-url and --judge-model name one judge, whole. cfg: any stage's Config with those
    fields."""
    if cfg.judge and cfg.judge_url:
        raise SystemExit("--judge and --judge-url both name a judge: pass one of them.")
    if bool(cfg.judge_url) != bool(cfg.judge_model):
        raise SystemExit("--judge-url and --judge-model go together: "
                         "the endpoint and the model to ask there.")


def make_judge(cfg, cache_path: Path):
    """The LLM judge of --judge (a local model on cfg.device) or --judge-url (an endpoint, its replies
    cached in cache_path, so a killed run asks only for the rest). cfg: any stage's Config with the judge's
    fields."""
    from adapters import judge as judges

    if cfg.judge_url:
        return judges.UrlJudge(cfg.judge_url, cfg.judge_model, api_key_env=cfg.judge_api_key_env,
                               cache_path=str(cache_path))
    return judges.LocalJudge(cfg.judge, device=cfg.device, dtype=compute_dtype(cfg.device, cfg.dtype),
                             batch_size=getattr(cfg, "judge_batch_size", 16))


def judge_rows(cfg: Config, rows: list[dict], run_dir: Path,
               what: str = "SFT-policy rollouts") -> tuple[list[dict], dict]:
    """Rows labelled by the LLM judge (make_judge; a URL judge's replies cached in
    runs/<run>/judge_cache.jsonl). Unparseable verdicts are counted in the stats and dropped
    (adapters/judge.py); `what` the rows are, for the error when none gets a verdict."""
    from adapters import judge as judges

    if not rows:  # the judge was never asked: the policy's rollouts held nothing to parse
        raise SystemExit(f"none of the SFT policy's rollouts (--crm-rollout-prompts {cfg.crm_rollout_prompts}"
                         f" x --crm-rollout-samples {cfg.crm_rollout_samples}) has a <think>...</think>"
                         f"<answer>...</answer> to judge within --max-new-tokens {cfg.max_new_tokens}. Raise "
                         f"--max-new-tokens, or fine-tune the policy to that format first (--target-column, "
                         f"without --skip-policy-sft).")
    labelled, stats = judges.label_rows(make_judge(cfg, run_dir / "judge_cache.jsonl"), rows)
    if not labelled:  # else an embedded run reports an agreement on 0 rows, a real one a CRM with no data
        raise SystemExit(f"the judge ({cfg.judge or cfg.judge_model}) gave no verdict for any of the "
                         f"{len(rows)} {what}: no reply held consistent or inconsistent "
                         f"(adapters/judge.py, parse_verdict). Check what it replies to judge_prompt.")
    return labelled, stats


def check_judge(cfg: Config, run_dir: Path) -> None:
    """The judge tried before any SFT: a local judge's config and tokenizer load (the model itself loads after
    SFT, when the GPU is free); an endpoint answers one request with a verdict, so a wrong URL, model name or
    key, or an endpoint that answers anything but a verdict (an HTML page), fails here."""
    if cfg.judge:
        from transformers import AutoConfig, AutoTokenizer
        try:
            AutoConfig.from_pretrained(cfg.judge)
            AutoTokenizer.from_pretrained(cfg.judge)
        except Exception as error:
            raise SystemExit(f"--judge {cfg.judge}: cannot load its config and tokenizer ({error!r}).")
    elif cfg.judge_url:
        from adapters import judge as judges
        try:
            judge = judges.UrlJudge(cfg.judge_url, cfg.judge_model, api_key_env=cfg.judge_api_key_env,
                                    max_retries=2, cache_path=str(run_dir / "judge_cache.jsonl"))
            row = {"question": "How many red shapes are there?",
                   "thinking": "I count the red shapes: 1, 2. So the answer is 2.", "answer": "2"}
            prompt = judges.judge_prompt(row)
            if judges.parse_verdict(judge.cache.get(judge.key(prompt))) is None:
                judge.cache.pop(judge.key(prompt), None)  # a cached reply without a verdict is asked again
            reply = judge.complete([prompt])[0]
        except Exception as error:
            raise SystemExit(f"--judge-url {cfg.judge_url} --judge-model {cfg.judge_model}: no usable reply "
                             f"({error}). Check the URL, the model name and ${cfg.judge_api_key_env}.")
        if judges.parse_verdict(reply) is None:  # HTTP 200 is not enough: each row would be dropped, later
            got = (f"{reply[:200]!r}, with no verdict (consistent or inconsistent) in it" if reply is not None
                   else "a body that is not a chat completion (no choices[0].message.content: HTML?)")
            raise SystemExit(f"--judge-url {cfg.judge_url} --judge-model {cfg.judge_model}: asked to judge "
                             f"one row, it answered {got}. Check that the URL is the API's base (it ends in "
                             f"/v1) and the model name, and that the model replies in words (a reasoning "
                             f"model needs room to close its <think>).")


# ============================================================================================================
# Appendix C: loading, encoding, cutting, the flags and the reports (skip on a first reading)
# What every stage calls to load a model and encode its inputs; what this stage checks first and prints last.
# ============================================================================================================


# C.1 loading and encoding: the policy and the CRM through the Auto classes, prompts and completions as ids
def load_policy(name_or_path: str, device: str, max_pixels: int | None = None, dtype=torch.float32,
                trainable: bool = False):
    """(model, processor) through the Auto classes, exactly as a hub checkpoint loads.

    A folder with adapter_config.json is a LoRA policy saved by stage 5 (base + adapter): its base is
    loaded first, then the adapter through peft (trainable or frozen).
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(name_or_path)
    image_processor = processor.image_processor
    if max_pixels:  # cap the visual tokens: a 448x448 image is 256 of them after the 2x2 merge
        size = image_processor.size
        image_processor.size = {"shortest_edge": size.shortest_edge,
                                "longest_edge": min(size.longest_edge, max_pixels)}
    for old_name in ("min_pixels", "max_pixels"):  # legacy copies of `size` that transformers 5 warns about
        if getattr(image_processor, old_name, None) is not None:
            setattr(image_processor, old_name, None)
    processor.tokenizer.padding_side = "left"  # prompts are left-padded so completions start together
    adapter_config = Path(name_or_path) / "adapter_config.json"
    if adapter_config.exists():
        from peft import PeftModel

        base = json.loads(adapter_config.read_text())["base_model_name_or_path"]
        model = AutoModelForImageTextToText.from_pretrained(base, dtype=dtype).to(device)
        model = PeftModel.from_pretrained(model, name_or_path, is_trainable=trainable)
    else:
        model = AutoModelForImageTextToText.from_pretrained(name_or_path, dtype=dtype).to(device)
    return model, processor


CRM_LABELS = {0: "inconsistent", 1: "consistent"}


def load_crm(name_or_path: str, device: str, dtype=torch.float32):
    """(classifier, tokenizer). A bare backbone gets a fresh 2-way head (consistent / inconsistent).

    The tokenizer's pad id is the one the model uses: a decoder classifier (Llama, Qwen, Mistral) reads the
    last token that is not the config's pad_token_id, so a config pad id other than the tokenizer's makes it
    read a pad position in a padded batch (a pair scores one thing batched, another alone). A tokenizer
    without a pad token (Llama-3, Mistral) gets its eos, else its unk, else the token of id 0. With right
    padding (encode_pairs) that choice changes no score: real tokens never attend to the pads after them, and
    the token read is the last one before the pads (before a trailing eos equal to the pad, batched or alone).
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token or tokenizer.convert_ids_to_tokens(0)
    tokenizer.padding_side = "right"
    model = AutoModelForSequenceClassification.from_pretrained(
        name_or_path, num_labels=2, id2label=CRM_LABELS, label2id={v: k for k, v in CRM_LABELS.items()},
        dtype=dtype)
    model.config.pad_token_id = model.config.get_text_config().pad_token_id = tokenizer.pad_token_id
    return model.to(device), tokenizer


def stop_token_ids(processor) -> list[int]:
    """Every id that ends a reply (Qwen has several: <|im_end|> and <|endoftext|>)."""
    tok = processor.tokenizer
    ids = {tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")} | {tok.eos_token_id}
    return sorted(i for i in ids if i is not None and i != tok.unk_token_id)


INSTRUCTION = (" Think step by step inside <think></think>, "
               "then give the final answer inside <answer></answer>.")


def encode_prompts(processor, images: list, questions: list[str]) -> dict:
    """Chat-formatted, left-padded prompts with their images: the policy's input for one batch."""
    messages = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q + INSTRUCTION}]}]
                for q in questions]
    texts = [processor.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in messages]
    batch = processor(text=texts, images=images, padding=True, return_tensors="pt")
    return dict(batch)


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def encode_completions(processor, texts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Completion texts (+ <|im_end|>) as right-padded ids (B, L) and their mask (B, L)."""
    tok = processor.tokenizer
    end = tok.convert_tokens_to_ids("<|im_end|>")
    rows = [tok(t, add_special_tokens=False)["input_ids"] + [end] for t in texts]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), 1
    return ids.to(device), mask.to(device)


def unwrap(model):
    """The transformers model inside a peft wrapper (LoRA layers sit inside it, so its forward runs them)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def image_features(model, prompt: dict) -> list[torch.Tensor]:
    """The vision tower's output for each prompt's image: B tensors (n_b, H), n_b its visual tokens."""
    out = unwrap(model).model.get_image_features(prompt["pixel_values"], prompt["image_grid_thw"])
    # transformers < 5.20 returns the list itself
    return list(out.pooler_output if hasattr(out, "pooler_output") else out)

# C.2 a pair longer than the CRM reads: cut by tokens, keeping the question and the thinking's end
def kept_positions(sequence_ids: list[int | None], n_question: int, max_length: int,
                   max_hypothesis_tokens: int) -> list[int]:
    """The positions of one encoded pair to keep, at most max_length of them; every special token stays.

    sequence_ids: per position None (special token), 0 (premise) or 1 (hypothesis). The hypothesis keeps
    its first max_hypothesis_tokens. A premise too long for the room left keeps its first
    min(n_question, room // 2) tokens (the question) and fills the rest from its end (the end of the
    thinking, where the conclusion sits).

    Example: [None, 0, 0, 0, 0, 0, 0, None, 1, 1, None], n_question 2, max_length 8, max_hypothesis_tokens 1:
             hypothesis [8]; room 8 - 3 specials - 1 = 4 for 6 premise tokens: the first 2 and the last 2
             -> [0, 1, 2, 5, 6, 7, 8, 10].
    """
    special = [j for j, s in enumerate(sequence_ids) if s is None]
    premise = [j for j, s in enumerate(sequence_ids) if s == 0]
    hypothesis = [j for j, s in enumerate(sequence_ids) if s == 1][:max_hypothesis_tokens]
    room = max_length - len(special) - len(hypothesis)
    if len(premise) > room:
        head = min(n_question, room // 2)
        premise = premise[:head] + premise[len(premise) - (room - head):]
    return sorted(special + premise + hypothesis)


def crm_max_length(tokenizer) -> int:
    """The CRM's tokens per pair when no --crm-max-length is given: its tokenizer's model_max_length, which
    stage 1 sets to --crm-max-length when it saves the CRM (so stages 3, 5 and 6 read what it trained with);
    512 when the tokenizer states no limit (transformers' placeholder is ~1e30)."""
    limit = tokenizer.model_max_length
    return int(limit) if limit and limit < 1_000_000 else 512


@functools.lru_cache(maxsize=8)
def longest_token(tokenizer) -> int:
    """The most characters a token of the vocabulary spells: no token covers more of a text."""
    return max(map(len, tokenizer.get_vocab()))


def cut_to_fit(tokenizer, pair: dict, max_length: int) -> dict:
    """The pair with each text cut, before tokenizing, where none of its tokens could be kept: the question
    and the answer keep their start, the thinking its end (what encode_pairs keeps). A text of more than
    max_length x longest_token characters has more than max_length tokens; a cut that leaves fewer (a
    normalizer that drops characters, e.g. one that collapses runs of spaces) is not made.
    Why: a tokenizer takes seconds to encode a 10-million-character thinking, of which 512 tokens are kept.

    Example: longest token 16 characters, max_length 512: a thinking of 10**7 characters keeps its last 8,192.
    """
    cut, limit = dict(pair), max_length * longest_token(tokenizer)
    for key, keep_end in [("question", False), ("thinking", True), ("answer", False)]:
        text = str(pair[key])
        if len(text) > limit:
            short = text[-limit:] if keep_end else text[:limit]
            if len(tokenizer(short, add_special_tokens=False, verbose=False)["input_ids"]) >= max_length:
                cut[key] = short
    return cut

# C.3 the flags, and what the stage reports
def check_config(cfg: Config) -> None:
    """Refuse flags that cannot work, each error naming the flag and the fix, before anything is read."""
    compute_dtype(cfg.device, cfg.dtype)  # --dtype: auto, bf16 or fp32
    if str(cfg.device).startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {cfg.device}: CUDA is not available here; pass --device cpu.")
    embedded, judged = cfg.dataset is None, bool(cfg.judge or cfg.judge_url)
    minimum = [("--sft-batch-size", cfg.sft_batch_size, 1), ("--warmup-steps", cfg.warmup_steps, 0),
               ("--eval-n", cfg.eval_n, 1), ("--max-new-tokens", cfg.max_new_tokens, 1),
               ("--crm-steps", cfg.crm_steps, 1), ("--crm-batch-size", cfg.crm_batch_size, 1),
               ("--crm-max-length", cfg.crm_max_length, 65),  # the answer alone may take 64 (encode_pairs)
               ("--crm-rollout-prompts", cfg.crm_rollout_prompts, 1 if judged else 0),  # a judge needs rows
               ("--crm-rollout-samples", cfg.crm_rollout_samples, 1),
               ("--judge-batch-size", cfg.judge_batch_size, 1),
               ("--max-pixels", cfg.max_pixels, 56 * 56)]  # the processor's smallest image: 56 x 56
    minimum += [("--sft-steps", cfg.sft_steps, 1)] * (not cfg.skip_policy_sft)
    minimum += [("--n-train", cfg.n_train, 1), ("--n-test", cfg.n_test, 1)] * embedded
    for flag, value, least in minimum:
        if value < least:
            fix = " (or pass --skip-policy-sft)" if flag == "--sft-steps" else ""
            raise SystemExit(f"{flag} {value}: must be at least {least}{fix}.")
    for flag, value in [("--sft-lr", cfg.sft_lr), ("--crm-lr", cfg.crm_lr),
                        ("--crm-rollout-temperature", cfg.crm_rollout_temperature)]:
        if not (math.isfinite(value) and value > 0):
            raise SystemExit(f"{flag} {value}: must be a finite number above 0.")
    if embedded and not cfg.skip_policy_sft and cfg.sft_batch_size > cfg.n_train:
        raise SystemExit(f"--sft-batch-size {cfg.sft_batch_size}: more than the {cfg.n_train} training tasks "
                         f"(--n-train); pass at most {cfg.n_train}.")
    if not 0 <= cfg.inconsistent_frac <= 1:
        raise SystemExit(f"--inconsistent-frac {cfg.inconsistent_frac}: must be a share between 0 and 1.")
    if embedded and (cfg.image_size % 28 or cfg.image_size < 56):
        raise SystemExit(f"--image-size {cfg.image_size}: must be a multiple of 28, "
                         f"at least 56 (default 84).")
    check_judge_flags(cfg)
    if judged and cfg.crm_data:
        raise SystemExit("--crm-data is already labelled: "
                         "pass it or a judge (--judge, --judge-url), not both")
    if not embedded and not cfg.crm_data and not judged:  # say so now, not after an hour of policy SFT
        raise SystemExit("--dataset is real data, so the CRM needs --crm-data (a JSONL of question, "
                         "thinking, answer, label rows, e.g. judged rollouts) or a judge to label the "
                         "policy's rollouts (--judge MODEL, or --judge-url URL --judge-model NAME).")
    if not embedded and not cfg.skip_policy_sft and not cfg.target_column:
        raise SystemExit("policy SFT on real data needs completions: pass --target-column (a column of "
                         "<think>...</think><answer>...</answer> texts), or --skip-policy-sft.")


def classification_report(probs: list[float], labels: list[int]) -> dict:
    """Accuracy and F1 of the 'consistent' class at threshold 0.5."""
    predicted = [p >= 0.5 for p in probs]
    tp = sum(p and y for p, y in zip(predicted, labels))
    fp = sum(p and not y for p, y in zip(predicted, labels))
    fn = sum((not p) and y for p, y in zip(predicted, labels))
    accuracy = sum(p == bool(y) for p, y in zip(predicted, labels)) / max(1, len(labels))
    return {"accuracy": accuracy, "f1": 2 * tp / max(1, 2 * tp + fp + fn), "n": len(labels)}


def step_pairs_report(probs: list[float], pairs: list[dict], train_pairs: list[dict]) -> dict:
    """The CRM on the held-out step-conclusion pairs (step_conclusion_pairs): accuracy and F1, the accuracy on
    each task family, and the share of these (question, thinking, answer) texts that also occur among the
    training pairs (the embedded templates are few, so a held-out task's text often repeats a training
    one)."""
    report = classification_report(probs, [p["label"] for p in pairs])
    for family in ("count", "bars"):
        in_family = [i for i, p in enumerate(pairs) if p["family"] == family]
        family_report = classification_report([probs[i] for i in in_family],
                                              [pairs[i]["label"] for i in in_family])
        report[f"accuracy_{family}"] = family_report["accuracy"] if in_family else None
    seen = {(p["question"], p["thinking"], p["answer"]) for p in train_pairs}
    in_training = sum((p["question"], p["thinking"], p["answer"]) in seen for p in pairs)
    return {**report, "seen_in_training": in_training / max(1, len(pairs))}


def rollouts_report(probs: list[float], rollouts: dict) -> dict:
    """The CRM on the held-out SFT-policy rollouts (oracle labels), and why the inconsistent ones are so: how
    many fail the steps link, the answer link, both (oracle_parts), and the share of those that fail the steps
    link alone (the answer equals the conclusion) that the CRM flags (P(consistent) < 0.5); None when none."""
    test = rollouts["test"]
    report = classification_report(probs, [p["label"] for p in test])
    links = [oracle_parts(p["thinking"], p["answer"]) for p in test]
    steps_only = [prob for prob, link in zip(probs, links) if not link["steps"] and link["answer"]]
    return {**report, "n_train": len(rollouts["train"]),
            "consistent_share": sum(p["label"] for p in test) / max(1, len(test)),
            "steps_link_fails": sum(not link["steps"] for link in links),
            "answer_link_fails": sum(not link["answer"] for link in links),
            "both_links_fail": sum(not link["steps"] and not link["answer"] for link in links),
            "steps_only": len(steps_only),
            "crm_catches_steps_only": (sum(p < 0.5 for p in steps_only) / len(steps_only)
                                       if steps_only else None)}


def read_rollouts(patterns: str) -> list[dict]:
    """The rows of stage 5's rollouts.jsonl files (--crm-rollouts: a comma list, each may hold * globs) as
    {question, thinking, answer, row, seed, method, step} (+ label when a file has one), the rollouts with
    nothing to parse left out (they get r_cons = 0 without the CRM). Rows in the --crm-data form (thinking
    and answer instead of text) are read too. Every pattern must match a file, every row have its fields."""
    import glob

    rows = []
    for pattern in (p.strip() for p in patterns.split(",") if p.strip()):
        paths = sorted(glob.glob(pattern))
        if not paths:
            raise SystemExit(f"--crm-rollouts {pattern}: no such file. Stage 5 writes "
                             f"runs/<run>/<name>/rollouts.jsonl (e.g. python 05_grpo_train.py "
                             f"--advantage grpo).")
        for path in paths:
            for number, row in enumerate(read_jsonl(Path(path), drop_cut_last_line=True), start=1):
                if not (isinstance(row, dict) and "question" in row and ("text" in row or "thinking" in row)):
                    raise SystemExit(f"--crm-rollouts {path}, line {number}: expected a question and a text "
                                     f"(stage 5's rollouts.jsonl) or a thinking and an answer.")
                think, answer = (parse_completion(str(row["text"])) if "text" in row
                                 else (row["thinking"], row.get("answer")))
                if think is None or answer is None:
                    continue
                rows.append({"question": str(row["question"]), "thinking": str(think), "answer": str(answer),
                             **{k: row[k] for k in ("row", "seed", "method", "step", "label") if k in row}})
    return rows


def print_summary(summary: dict, run_dir: Path, embedded: bool) -> None:
    """The numbers stage 1 prints at its end (all of them are in stage1.json too)."""
    check = summary["policy_check"]
    print(f"\npolicy after SFT (greedy, {check['n']} test prompts): format {check['format_rate']:.1%}, "
          f"accuracy {check['accuracy']:.1%}")
    if embedded:
        links = "n/a (nothing parsed)"
        if check["oracle_steps_fail_rate"] is not None:
            links = (f"steps {check['oracle_steps_fail_rate']:.1%}, "
                     f"answer {check['oracle_answer_fail_rate']:.1%} of the parsed replies")
        print(f"  oracle inconsistency rate {check['oracle_inconsistency_rate']:.1%}; "
              f"links that fail: {links}")
    print(f"  e.g. {check['example']!r}")
    if "judge" in summary:
        j = summary["judge"]
        print(f"judge {j['judge']}: {j['labelled']} of {j['rows']} SFT-policy rollouts labelled "
              f"({j['consistent']} consistent), {j['unparseable']} unparseable verdicts dropped "
              f"-> {run_dir / 'crm_data.jsonl'}")
        if "agreement" in j:
            a = j["agreement"]
            print(f"  agreement with the rule oracle: accuracy {a['accuracy']:.1%} on {a['n']} "
                  f"(tp {a['tp']}, fp {a['fp']}, fn {a['fn']}, tn {a['tn']}; positive = consistent)")
    report = summary["crm"]
    print(f"CRM on {report['n']} held-out pairs: accuracy {report['accuracy']:.1%}, F1 {report['f1']:.3f}")
    if "crm_on_step_pairs" in summary:
        s = summary["crm_on_step_pairs"]
        print(f"CRM on {s['n']} held-out step-conclusion pairs (answer = conclusion; half of them with "
              f"steps that disagree): accuracy {s['accuracy']:.1%}, F1 {s['f1']:.3f}")
        print(f"  count {s['accuracy_count']:.1%}, bars {s['accuracy_bars']:.1%}; "
              f"{s['seen_in_training']:.0%} of these texts also occur among the training pairs")
    if "crm_on_policy_rollouts" in summary:
        r = summary["crm_on_policy_rollouts"]
        caught = "n/a" if r["crm_catches_steps_only"] is None else f"{r['crm_catches_steps_only']:.1%}"
        print(f"CRM on {r['n']} held-out SFT-policy rollouts (oracle labels, {r['consistent_share']:.0%} "
              f"consistent): accuracy {r['accuracy']:.1%}, F1 {r['f1']:.3f}")
        print(f"  inconsistent by the oracle's links: steps {r['steps_link_fails']}, answer "
              f"{r['answer_link_fails']} (both {r['both_links_fail']}); the CRM flags {caught} of the "
              f"{r['steps_only']} whose steps alone fail")
    print(f"wrote {run_dir}/{{data,policy_sft,crm,stage1.json}} in {summary['seconds']:.0f} s")


# The entry point stays last: every name above exists by the time main() runs.
if __name__ == "__main__":
    main(parse_config(Config, __doc__.split("\n")[0]))
