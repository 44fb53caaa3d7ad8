"""Stage 5: the training loop. GRPO with the consistency reward, combined by HRAS (CORA).

Reading guide: Config (every knob, one line each); the lesson: the loss (policy_loss), the update's forward
(LogProbs, batch_logprobs), the update (update), the numbers of a step (step_metrics, rollout_records, drift);
then main(), the loop below, in order. Appendices A (real sizes: the prompt once per group, LoRA,
checkpointing, pi_old), B (several processes: torchrun), C (the drift monitor's judge and the guard) and
D (the flags, the run folder, the models, checkpoints) hold what a real run needs: a first reading skips them.

Each step, in one visible loop:
  1. sample P prompts from the train split
  2. roll out G completions per prompt (stage 2's sampler)              -> ids, old log-probs
  3. score them (stage 3): r_task = r_acc + r_fmt, r_cons = lambda * P_CRM(consistent); the drift monitor
     compares the CRM's verdicts with a judge's (the rule oracle on the embedded tasks)
  4. advantages (stage 4): --advantage hras | grpo | sum, beta_t from its schedule
  5. update the policy on the clipped surrogate, token-mean over the whole batch:

     ratio_t = exp(log pi(y_t) - log pi_old(y_t))          (both under logits / temperature)
     L = - sum_{i,t} m_it [ min(ratio_t A_i, clip(ratio_t, 1 - eps_low, 1 + eps_high) A_i)
                            - kl_beta * KL3_t ] / sum_{i,t} m_it
     KL3_t = exp(ref_t - new_t) - (ref_t - new_t) - 1      (k3 estimator, >= 0, to a frozen reference)

What the loss reads: on-policy (the first update on a fresh batch, ratio = 1) it is -sum_i A_i |y_i| /
sum_i |y_i|, zero only when the advantages do not correlate with the lengths |y_i|; its gradient,
sum_i A_i sum_t grad log pi(y_it) / sum_i |y_i|, is what trains. Watch the rewards.

The paper's recipe: its CRM is trained on rollouts sampled during GRPO training. This stage saves them
(rollouts.jsonl); `01_sft_rm.py --crm-rollouts` trains that CRM (crm_rl/), which this stage then takes by
default. The drift monitor logs how often the CRM and the judge disagree, every step, and warns past
--drift-warn; --crm-refresh (off by default, one step past the paper) retrains the CRM on the rollouts that
fooled it, before they train the policy.

Reads:  runs/<run>/{data,policy_sft,crm_rl or crm}/ and stage1.json (01_sft_rm.py).
Writes: runs/<run>/<name>/ with metrics.jsonl (one line per step), rollouts.jsonl (every rollout of every
        --save-rollouts-every-th step: its text, where it comes from, its scores), checkpoint/ (every
        --checkpoint-every steps, atomic; --resume continues from it), policy/ (the final weights) and
        summary.json. A folder that holds a run is never replaced unless --overwrite says so.
Run:    python 05_grpo_train.py --advantage hras      # CORA;   --advantage grpo | sum for the baselines
        torchrun --nproc-per-node 8 05_grpo_train.py -- --run default --parallel fsdp ...   # 8 GPUs
        (docs/real_size.md: real sizes on one GPU, several GPUs, and why torchrun needs the "--")
"""

import atexit
import contextlib
import dataclasses
import errno
import functools
import importlib
import json
import math
import os
import random
import shutil
import time
import types
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm


# Earlier stages, by file name: "01_sft_rm" cannot follow `import`, but import_module takes it (the
# stages' folder is on sys.path when one runs as a script). Imports flow forward only.
stage1, stage2, stage3, stage4 = map(importlib.import_module,
                                     ["01_sft_rm", "02_rollout", "03_rewards", "04_hras"])


@dataclass
class Config:
    run: str = "default"  # run folder: runs/<run>/ (stage 1's outputs live there)
    runs_dir: str = "runs"  # parent folder of all runs
    name: str | None = None  # output folder runs/<run>/<name>/; None = "<advantage>_seed<seed>"
    init: str | None = None  # policy to start from; None = runs/<run>/policy_sft
    crm: str | None = None  # consistency reward model; None = runs/<run>/crm_rl if stage 1 made it, else crm
    # rewards and advantages
    advantage: str = "hras"  # hras (CORA) | grpo (task reward only) | sum (sum, then normalise)
    lambda_cons: float = 1.0  # r_cons = lambda_cons * P_CRM; only sum feels it (hras z-scores it away, but 0)
    format_weight: float = 1.0  # r_fmt for a well-formed completion
    alpha: float = 1.0  # weight of the task advantage (hras)
    beta: float = 1.0  # weight of the consistency advantage (hras), before its schedule
    beta_schedule: str = "constant"  # constant | warmup | decay
    beta_warmup_steps: int = 0  # length of the warm-up (beta_schedule warmup)
    eps: float = 1e-6  # added to the group std
    cons_eps: float = 1e-6  # added to r_cons's group std in hras (0.05 damps CRM float noise; 04_hras.py)
    # rollouts
    steps: int = 100  # optimiser steps (one batch of rollouts each)
    prompts_per_step: int = 8  # P: prompts per step
    group_size: int = 8  # G: completions per prompt
    max_new_tokens: int = 64  # completion budget
    temperature: float = 1.0  # sampling temperature (also divides the logits in the update)
    top_k: int = 0  # sampler top-k (0 = off)
    top_p: float = 1.0  # sampler top-p (1 = off)
    fast: str = "auto"  # sampler: on = static KV cache + compiled step, off = simple loop, auto = on for CUDA
    # update
    lr: float = 2e-4  # AdamW learning rate, after a 5-step linear warm-up (tiny model; ~1e-6 for 2B+)
    weight_decay: float = 0.0  # AdamW weight decay
    grad_clip: float = 1.0  # max global gradient norm
    clip_low: float = 0.2  # ratio clipped below at 1 - clip_low
    clip_high: float = 0.2  # ratio clipped above at 1 + clip_high
    kl_beta: float = 0.0  # weight of the k3 KL to the frozen initial policy (0 = no reference model)
    updates_per_batch: int = 1  # optimiser steps per batch of rollouts (>1: off-policy, the clip matters)
    micro_batch_size: int = 64  # completions per forward/backward (gradient accumulation over the batch)
    gradient_checkpointing: bool = False  # keep each decoder layer's input only; backward recomputes the rest
    logprob_chunk: int = 256  # positions per lm_head + log-softmax block (bounds the (b, chunk, V) logits)
    freeze_vision_tower: bool = False  # train the language model only; the vision tower runs once per prompt
    pi_old: str = "auto"  # sampler | recompute | auto: recompute in bf16, where sampler and update differ
    # precision and LoRA
    dtype: str = "auto"  # compute precision: auto = bf16 on CUDA, fp32 on CPU (01_sft_rm.compute_dtype)
    lora_rank: int = 0  # > 0: train LoRA adapters of this rank through peft instead of every weight
    lora_alpha: float = 32.0  # LoRA scale is alpha / rank
    lora_targets: str = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"  # LM linears to adapt
    # several processes (torchrun)
    parallel: str = "auto"  # torchrun: ddp (whole model per rank) | fsdp (FSDP2, 1/N per rank); auto = ddp
    # bookkeeping
    checkpoint_every: int = 25  # steps between checkpoints
    save_rollouts_every: int = 1  # every N steps, the step's rollouts to rollouts.jsonl (CRM data); 0 = none
    # the drift monitor (embedded: the oracle judges every rollout) and the guard against a fooled CRM
    drift_warn: float = 0.1  # warn when the CRM and the judge disagree on more than this share (10-step mean)
    audit_every: int = 0  # every N steps a judge labels --audit-rows of the step's rollouts (real); 0 = off
    audit_rows: int = 16  # rollouts the judge labels per audit
    judge: str | None = None  # the audit's judge: a local instruct model (as 01_sft_rm.py --judge)
    judge_url: str | None = None  # or an OpenAI-compatible endpoint, e.g. http://localhost:8000/v1
    judge_model: str | None = None  # the model name to ask at --judge-url
    judge_api_key_env: str = "OPENAI_API_KEY"  # environment variable holding the endpoint's key
    crm_refresh: bool = False  # guard: when the CRM and the judge disagree past --drift-warn, retrain the CRM
    crm_refresh_steps: int = 20  # the guard's CRM optimiser steps per refresh (batches of 64 judged rollouts)
    crm_refresh_lr: float = 1e-4  # their peak learning rate
    resume: bool = False  # continue from runs/<run>/<name>/checkpoint
    overwrite: bool = False  # replace a run folder that already holds a run (else such a folder is refused)
    seed: int = 0  # seeds prompt order and sampling
    device: str = "cuda" if torch.cuda.is_available() else "cpu"  # where the policy trains

# ----------------------------------------------------------------------------- the loss and the update
def policy_loss(new_logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, clip_low: float, clip_high: float, kl_beta: float = 0.0,
                ref_logprobs: torch.Tensor | None = None,
                n_tokens: int | None = None) -> tuple[torch.Tensor, dict]:
    """Clipped surrogate with optional k3 KL, summed over tokens and divided by n_tokens (the token
    count of the whole batch, so micro-batches add up to a token mean).
    logprobs, mask: (B, L); advantages: (B,)."""
    mask = mask.float()
    n_tokens = n_tokens or int(mask.sum())
    ratio = torch.exp(new_logprobs - old_logprobs)  # (B, L)
    adv = advantages.unsqueeze(1)  # (B, 1): a sequence's advantage applies to each of its tokens
    surrogate = torch.minimum(ratio * adv, torch.clamp(ratio, 1 - clip_low, 1 + clip_high) * adv)  # (B, L)
    per_token = -surrogate
    kl = torch.zeros_like(new_logprobs)
    if kl_beta > 0:
        log_ratio_ref = ref_logprobs - new_logprobs  # (B, L)
        kl = torch.exp(log_ratio_ref) - log_ratio_ref - 1  # k3: unbiased, always >= 0
        per_token = per_token + kl_beta * kl
    loss = (per_token * mask).sum() / n_tokens
    # the clip is active
    clipped = ((ratio < 1 - clip_low) & (adv < 0)) | ((ratio > 1 + clip_high) & (adv > 0))
    stats = {"kl": float((kl.detach() * mask).sum()), "clipped": float((clipped.float() * mask).sum())}
    return loss, stats

class LogProbs(torch.nn.Module):
    """The update's forward: log pi(y_t | image, question, y_<t) of every completion token, (N, L), under
    logits / temperature. A module, so that DDP and FSDP2, which work in hooks around a module's forward,
    can wrap it (Appendix B, parallelize); its one submodule is the policy. prompt_of: the prompt each row
    continues (GRPO's G rows continue one), so each prompt runs once (shared_prompt_logprobs, Appendix A);
    None: every row brings its own copy of its prompt (stage1.completion_logprobs)."""

    def __init__(self, policy):
        super().__init__()
        self.policy = policy

    def forward(self, prompt: dict, completion_ids, completion_mask, temperature: float, chunk_size: int,
                visual: list[torch.Tensor] | None, prompt_of: list[int] | None = None) -> torch.Tensor:
        if prompt_of is None:
            return stage1.completion_logprobs(self.policy, prompt, completion_ids, completion_mask,
                                              temperature, chunk_size, visual)
        return shared_prompt_logprobs(self.policy, prompt, completion_ids, completion_mask, prompt_of,
                                      temperature, chunk_size, visual)  # (N, L)

    def settle_root(self) -> None:
        """Nothing: a forward for FSDP2's hooks to run once, so that this module is their root
        (parallelize)."""

def batch_logprobs(cfg: Config, model, prompt: dict, ids, mask, rows: list[int], visual,
                   forward: LogProbs | None = None) -> torch.Tensor:
    """Log-probs of batch rows `rows`, (b, L); row r belongs to prompt r // G, and so do its visual features.
    Each prompt of the micro-batch runs once (SHARE_PROMPTS). forward: the policy's LogProbs (under torchrun
    wrapped by DDP or FSDP2: parallelize); None = LogProbs(model)."""
    prompt_of = [r // cfg.group_size for r in rows]
    forward = forward or LogProbs(model)
    checkpointed = any(getattr(m, "gradient_checkpointing", False) for m in stage1.unwrap(model).modules())
    # shared prompts need the KV cache, which gradient checkpointing drops
    if SHARE_PROMPTS and not (torch.is_grad_enabled() and checkpointed):
        prompts = sorted(set(prompt_of))  # the micro-batch's prompts, each run once
        args = (prompt_rows(prompt, prompts), ids[rows], mask[rows], cfg.temperature, cfg.logprob_chunk,
                [visual[k] for k in prompts] if visual is not None else None,
                [prompts.index(k) for k in prompt_of])
    else:  # every row runs its own copy of its prompt
        args = (prompt_rows(prompt, prompt_of), ids[rows], mask[rows], cfg.temperature, cfg.logprob_chunk,
                [visual[k] for k in prompt_of] if visual is not None else None)
    with stage1.autocast(cfg.device, stage1.compute_dtype(cfg.device, cfg.dtype)):  # bf16 matmuls on CUDA
        return forward(*args)  # (b, L)

def update(cfg: Config, model, reference, optimizer, scheduler, prompt: dict, ids, mask, old_logprobs,
           advantages, step: int | None = None, forward: LogProbs | None = None) -> dict:
    """updates_per_batch optimiser steps over the batch, each accumulated over micro-batches. A non-finite
    loss or gradient stops the run before the optimiser steps (the weights stay finite). Returns the batch's
    loss, kl and clipped share (under torchrun: of the global batch, the same on every rank). reference: the
    frozen reference's LogProbs (None: the LoRA base); forward: the policy's (None = LogProbs(model))."""
    N, world = ids.shape[0], dist.get_world_size() if dist.is_initialized() else 1
    # torchrun: the GLOBAL batch's token count
    n_tokens = int(sum_over_ranks([float(mask.sum())], cfg.device)[0])
    micro_batches = [list(range(s, min(N, s + cfg.micro_batch_size)))
                     for s in range(0, N, cfg.micro_batch_size)]
    totals = {"loss": 0.0, "kl": 0.0, "clipped": 0.0}
    visual = None
    if vision_is_frozen(model):  # each prompt's image through the vision tower once, not once per row
        with torch.no_grad(), stage1.autocast(cfg.device, stage1.compute_dtype(cfg.device, cfg.dtype)):
            visual = stage1.image_features(model, prompt)  # B tensors (n_b, H)
    if pi_old_recomputed(cfg):  # the update's own forward, so that ratio = 1 on the first update
        with torch.no_grad():
            old_logprobs = torch.cat([batch_logprobs(cfg, model, prompt, ids, mask, rows, visual, forward)
                                      for rows in micro_batches]).float()  # (N, L)
    model.train()
    for _ in range(cfg.updates_per_batch):
        optimizer.zero_grad(set_to_none=True)
        batch = {"loss": 0.0, "kl": 0.0, "clipped": 0.0}
        for rows in micro_batches:
            new = batch_logprobs(cfg, model, prompt, ids, mask, rows, visual, forward)  # (b, L)
            ref = None
            if cfg.kl_beta > 0:
                ref = reference_logprobs(cfg, model, reference, prompt, ids, mask, rows, visual, forward)
            loss, stats = policy_loss(new, old_logprobs[rows], advantages[rows], mask[rows], cfg.clip_low,
                                      cfg.clip_high, cfg.kl_beta, ref, n_tokens)
            # torchrun: DDP and FSDP2 average the gradients over ranks; this loss is already this rank's share
            # of the global token mean, so the gradient wanted is their sum: undo the division.
            (loss * world).backward()
            batch["loss"] += loss.item()
            batch["kl"] += stats["kl"] / n_tokens
            batch["clipped"] += stats["clipped"] / n_tokens
        # torchrun: the global batch's loss, kl and clipped share (summed over ranks)
        batch = dict(zip(batch, sum_over_ranks(list(batch.values()), cfg.device)))
        norm = torch.nn.utils.clip_grad_norm_(trainable_parameters(model), cfg.grad_clip)
        norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP2: a DTensor
        # the same global numbers on every rank
        if not (math.isfinite(batch["loss"]) and math.isfinite(norm)):
            raise SystemExit(f"step {step}: the loss is {batch['loss']} and the gradient norm {norm}: "
                             f"not finite, so the optimiser did not step and the weights stay as they were "
                             f"(the last checkpoint is intact). A usual cause: a --lr so large that the last "
                             f"steps blew the logits up; lower it and --resume, or start again with "
                             f"--overwrite.")
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)  # free the gradients now: the next rollout needs the memory
        totals = {k: totals[k] + batch[k] for k in totals}
    model.eval()
    return {k: v / cfg.updates_per_batch for k, v in totals.items()}

# ----------------------------------------------------------------------------- the numbers of a step
def step_metrics(scores: list[dict], crm_probs: list[float], lengths, truncated, task, advantages,
                 group_size: int, old_logprobs, mask) -> dict:
    """The rollout-side numbers logged every step (see the README for what each one means)."""
    n = len(scores)

    def mean(key: str) -> float:
        return sum(s[key] for s in scores) / n

    def share_failing(key: str) -> float | None:  # the oracle's verdicts: embedded tasks only, else None
        return sum(not s[key] for s in scores) / n if scores[0][key] is not None else None

    return {"reward_format": mean("format"), "reward_accuracy": mean("accuracy"), "reward_task": mean("task"),
            "reward_consistency": mean("consistency"),
            "accuracy": mean("accuracy"), "format_rate": sum(s["format"] > 0 for s in scores) / n,
            "crm_consistency": sum(crm_probs) / n,
            "oracle_inconsistency_rate": share_failing("oracle_consistent"),
            "oracle_steps_failing": share_failing("oracle_steps"),  # steps do not imply the conclusion
            "oracle_answer_failing": share_failing("oracle_answer"),  # the answer is not the conclusion
            # sample estimate of the token entropy
            "entropy": float(-(old_logprobs * mask).sum() / mask.sum()),
            "completion_length": float(lengths.float().mean()),
            "truncation_rate": float(truncated.float().mean()),
            **stage4.zero_variance_stats(task, advantages, group_size)}

def rollout_records(step: int, cfg: Config, rows: list[int], questions: list[str], truths: list[str],
                    texts: list[str], scores: list[dict]) -> list[dict]:
    """One record per rollout of the step, for rollouts.jsonl: what a judge needs to label it (the question,
    the completion), where it comes from (step, seed, method, the prompt's row) and its scores. The paper
    trains its CRM on rollouts sampled during GRPO training: stage 1's --crm-rollouts reads these."""
    return [{"step": step, "seed": cfg.seed, "method": cfg.advantage, "row": rows[i // cfg.group_size],
             "question": questions[i], "truth": truths[i], "text": text, **scores[i]}
            for i, text in enumerate(texts)]

def drift(crm_probs: list[float], judged: list[bool | None]) -> dict:
    """The drift monitor, on the rollouts a judge labelled (True consistent, False inconsistent, None not
    judged; on the embedded tasks the oracle judges every rollout): how often the CRM's verdict
    (P(consistent) >= 0.5) differs from the judge's, and how often it accepts one the judge rejects, the way
    a policy fools its reward. Both None when nothing was judged.

    Example: P = [0.9, 0.8, 0.2, 0.6], judge = [True, False, False, None] -> 3 judged; the CRM differs on
             the 0.8 alone: disagreement 1/3, accepts_inconsistent 1/3.
    """
    pairs = [(p >= 0.5, j) for p, j in zip(crm_probs, judged) if j is not None]
    if not pairs:
        return {"crm_judge_disagreement": None, "crm_accepts_inconsistent": None}
    return {"crm_judge_disagreement": sum(crm != judge for crm, judge in pairs) / len(pairs),
            "crm_accepts_inconsistent": sum(crm and not judge for crm, judge in pairs) / len(pairs)}

# ----------------------------------------------------------------------------- main: the loop, in order
def main(cfg: Config, stop_after: int = 0) -> dict:
    """Stage 5 in order. stop_after > 0 returns after that many steps, as if killed (tests of --resume)."""
    check_config(cfg)  # every flag, before anything is read, loaded or written
    run = open_run(cfg)  # torchrun's rank, the data, the run folder: all checked before any model loads
    cfg, rank, train, columns = run.cfg, run.rank, run.train, run.columns
    m = build_models(cfg, run)  # the policy and its forward, a reference, the CRM, a judge, the optimiser
    s = restore_checkpoint(cfg, run, m)  # the first step, random states, the guard's data: fresh or resumed
    for step in (bar := tqdm(range(s.start_step, cfg.steps), desc=f"{cfg.advantage} seed {cfg.seed}",
                             initial=s.start_step, total=cfg.steps, disable=rank > 0)):
        # 1-2. prompts and rollouts (torchrun: every rank draws the same P prompts and takes its own P / N)
        rows = s.prompt_rng.sample(range(len(train)), cfg.prompts_per_step)[run.my_prompts]
        questions = [train[i][columns["question"]] for i in rows]
        images = [stage1.row_image(train, i, columns["image"]) for i in rows]
        prompt = stage1.to_device(stage1.encode_prompts(m.processor, images, questions), cfg.device)
        with stage1.autocast(cfg.device, m.dtype), gathered(m.forward):  # fsdp: the rollout on whole weights
            ids, mask, old_logprobs, truncated = stage2.sampler(m.fast, cfg.device)(
                stage1.unwrap(m.model), prompt, cfg.group_size, cfg.max_new_tokens, m.stop_ids, m.forbidden,
                m.processor.tokenizer.pad_token_id, cfg.temperature, cfg.top_k, cfg.top_p, s.generator)
        texts = m.processor.batch_decode(ids, skip_special_tokens=True)  # padding and stop tokens skipped
        # 3. rewards (a paper benchmark: its official comparator, as in stage 6)
        group_questions = [q for q in questions for _ in range(cfg.group_size)]
        truths = [str(train[i][columns["answer"]]) for i in rows for _ in range(cfg.group_size)]
        gold = stage3.comparator_rows(train, rows, cfg.group_size) if run.benchmark else None
        score = functools.partial(stage3.score_completions, texts, group_questions, truths, m.crm,
                                  m.crm_tokenizer, m.reward_cfg, run.embedded, run.benchmark, gold)
        scores = score()
        # 3b. the drift monitor: the CRM against a judge (embedded: the rule oracle on every rollout; with an
        # audit: the judge on --audit-rows rollouts every --audit-every steps)
        judged = judge_step(cfg, m.judge, scores, texts, group_questions, step, rank)
        drifted = drift([r["crm_prob"] for r in scores], judged)
        # 3c. the guard (off by default): where the CRM and the judge disagree past --drift-warn, the CRM
        # trains on what fooled it and scores the step again, before its rewards train the policy
        refresh_loss = None
        if cfg.crm_refresh:
            refresh_loss = guard(cfg, m, s, texts, group_questions, judged, scores, step)
            scores = scores if refresh_loss is None else score()
        task = torch.tensor([r["task"] for r in scores], device=cfg.device)  # (N,)
        consistency = torch.tensor([r["consistency"] for r in scores], device=cfg.device)  # (N,)
        # 4. advantages (a group never crosses ranks: nothing to communicate)
        beta_t = stage4.consistency_weight(step, cfg.steps, cfg.beta, cfg.beta_schedule,
                                           cfg.beta_warmup_steps)
        advantages = stage4.advantages(cfg.advantage, task, consistency, cfg.group_size, cfg.alpha, beta_t,
                                       cfg.eps, cfg.cons_eps)  # (N,)
        # 5. update
        lr = m.scheduler.get_last_lr()[0]  # the rate this step's update uses (the scheduler steps after it)
        losses = update(cfg, m.model, m.reference, m.optimizer, m.scheduler, prompt, ids, mask, old_logprobs,
                        advantages, step + 1, m.forward)
        # 6. the step's numbers (torchrun: averaged over ranks), its rollouts (the CRM's data), a checkpoint
        crm_probs = [r["crm_prob"] for r in scores]  # P(consistent) itself, whatever lambda_cons
        row = {"step": step + 1, **step_metrics(scores, crm_probs, mask.sum(1), truncated, task, advantages,
                                                 cfg.group_size, old_logprobs, mask),
               **drifted, **losses, "crm_refresh_loss": refresh_loss, "beta_t": beta_t, "lr": lr,
               "seconds": round(time.time() - s.started, 2)}
        records = rollout_records(step + 1, cfg, rows, group_questions, truths, texts, scores)
        log_step(cfg, run, s, mean_over_ranks(row, cfg.device), records, bar)
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            save_checkpoint(cfg, run, m, s, step + 1)
        if stop_after and step + 1 - s.start_step >= stop_after:
            return {}
    return finish(cfg, run, m)


# ============================================================================================================
# Appendix A: real sizes (skip on a first reading)
# The prompt once per group, a frozen vision tower, pi_old under bf16, LoRA, gradient checkpointing: what
# keeps a 3B or 7B policy within one GPU's memory and its update correct (docs/real_size.md).
# ============================================================================================================

# The update runs each prompt once per micro-batch, its G rows on copies of its keys and values: the same
# log-probs as one prompt per row (a test checks value and gradient), less work. tests/ and
# bench/bench_update.py set this to False to compare the two.
SHARE_PROMPTS = True

def prompt_rows(prompt: dict, index: list[int]) -> dict:
    """Rows `index` of a prompt batch (repeats allowed); pixel_values is a flat list of patches, so it
    is split per image (image_grid_thw.prod) and regathered. One image per prompt."""
    patches = prompt["pixel_values"].split(prompt["image_grid_thw"].prod(-1).tolist())  # B chunks of (n_i, D)
    idx = torch.tensor(index, device=prompt["input_ids"].device)
    picked = {k: prompt[k][idx]
              for k in ("input_ids", "attention_mask", "mm_token_type_ids", "image_grid_thw")}
    return {**picked, "pixel_values": torch.cat([patches[i] for i in index])}

def shared_prompt_logprobs(model, prompt: dict, completion_ids: torch.Tensor, completion_mask: torch.Tensor,
                           prompt_of: list[int], temperature: float = 1.0, chunk_size: int = 256,
                           visual: list[torch.Tensor] | None = None) -> torch.Tensor:
    """stage1.completion_logprobs for rows that share prompts, each prompt run once: row r continues prompt
    prompt_of[r] (GRPO's G rows of a group continue one prompt).

    completion_logprobs runs every row's prompt again, G times the same tokens. Here the prompt batch (B rows,
    not N) runs once and keeps each layer's keys and values (B, H_kv, P, D); those are copied to the N rows,
    and the completions (N, L) run on top of them as the sampler's decode does, attending to the copies. The
    same attention over the same keys, so the same log-probs (a test checks value and gradient); the gradient
    reaching a copy flows back into its prompt's one forward. What it saves grows with the prompt's share of a
    row's tokens (docs/LOG.md measures it). Needs the KV cache in training, which transformers turns off under
    gradient checkpointing: batch_logprobs then uses completion_logprobs.
    visual: as in completion_logprobs, one entry per prompt (not per row).
    """
    from transformers import DynamicCache

    core = stage1.unwrap(model)
    rows = torch.tensor(prompt_of, device=completion_ids.device)  # (N,): the prompt of each row
    P = prompt["input_ids"].shape[1]
    # 1. each prompt once, keeping its keys and values
    out = stage1.backbone(core, prompt["input_ids"], prompt["attention_mask"], prompt["mm_token_type_ids"],
                          prompt["pixel_values"], prompt["image_grid_thw"], visual, use_cache=True)
    cache, prompt_cache = DynamicCache(), out.cache if "cache" in out else out.past_key_values
    for i, layer in enumerate(prompt_cache.layers):  # 2. copy each prompt's keys and values to its rows
        cache.update(layer.keys[rows], layer.values[rows], i)  # (N, H_kv, P, D) each
    attention_mask = torch.cat([prompt["attention_mask"][rows], completion_mask], dim=1)  # (N, P + L)
    positions, _ = core.model.get_rope_index(
        torch.cat([prompt["input_ids"][rows], completion_ids], dim=1),
        mm_token_type_ids=torch.cat([prompt["mm_token_type_ids"][rows], torch.zeros_like(completion_ids)],
                                    dim=1),
        image_grid_thw=prompt["image_grid_thw"][rows], attention_mask=attention_mask)  # (3, N, P + L)
    # 3. the completions on top of the copied keys and values: (N, L, H)
    hidden = core.model(input_ids=completion_ids, attention_mask=attention_mask,
                        position_ids=positions[:, :, P:], use_cache=True,
                        **{stage2.cache_kwarg(core.model): cache}).last_hidden_state
    # the state at t predicts token t + 1: the prompt's last state predicts the first completion token
    hidden = torch.cat([out.last_hidden_state[rows, -1:], hidden[:, :-1]], dim=1)  # (N, L, H)
    return stage1.hidden_logprobs(core.lm_head, hidden, completion_ids, temperature, chunk_size)  # (N, L)

def trainable_parameters(model) -> list:
    return [p for p in model.parameters() if p.requires_grad]

def vision_is_frozen(model) -> bool:
    """True when no vision-tower weight trains (--freeze-vision-tower, or LoRA on the language model)."""
    return not any(p.requires_grad for p in stage1.unwrap(model).model.visual.parameters())

def reference_logprobs(cfg: Config, model, reference, prompt: dict, ids, mask, rows: list[int], visual,
                       forward: LogProbs | None = None):
    """The frozen reference's log-probs: the policy with its LoRA adapters switched off (reference None), or a
    second copy (reference: its LogProbs)."""
    with torch.no_grad():
        if reference is None:  # LoRA: the base weights are the initial policy
            with model.disable_adapter():
                return batch_logprobs(cfg, model, prompt, ids, mask, rows, visual, forward)
        return batch_logprobs(cfg, reference.policy, prompt, ids, mask, rows,
                              visual if vision_is_frozen(model) else None, reference)

def pi_old_recomputed(cfg: Config) -> bool:
    """--pi-old auto: recompute when the compute is not fp32 (then sampler and update round differently)."""
    fp32 = stage1.compute_dtype(cfg.device, cfg.dtype) == torch.float32
    return cfg.pi_old == "recompute" or (cfg.pi_old == "auto" and not fp32)

def lora_target_regex(targets: str) -> str:
    r"""--lora-targets as the regex peft fullmatches against module names (add_lora: why language_model).
    Example: "q_proj,v_proj" -> ".*language_model.*\.(?:q_proj|v_proj)"."""
    names = "|".join(t.strip() for t in targets.split(",") if t.strip())
    return rf".*language_model.*\.(?:{names})"

def add_lora(cfg: Config, model):
    """Wrap the policy with peft LoRA adapters on the language model's linears; everything else is frozen.
    The targets are matched inside `language_model` only: Qwen2.5-VL's vision MLP also has a gate_proj."""
    from peft import LoraConfig, get_peft_model  # imported only when LoRA is used

    lora = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                      target_modules=lora_target_regex(cfg.lora_targets))
    return get_peft_model(model, lora)

def check_lora_targets(cfg: Config, init: str) -> None:
    """Every name of --lora-targets names linear layers of the language model, checked before the model loads
    on its skeleton (built from its config on the meta device: no weights, no memory). Else peft fails once
    the model has loaded, or, where one name of several matches, adapts fewer layers than asked, silently."""
    import re

    from transformers import AutoModelForImageTextToText

    if (Path(init) / "adapter_config.json").exists():  # a LoRA policy: its adapters are already chosen
        return
    with torch.device("meta"):
        skeleton = AutoModelForImageTextToText.from_config(stage1.model_config("--init", init))
    linears = {name.rsplit(".", 1)[-1] for name, module in skeleton.named_modules()
               if isinstance(module, torch.nn.Linear) and re.fullmatch(lora_target_regex("[^.]+"), name)}
    names = [t.strip() for t in cfg.lora_targets.split(",") if t.strip()]
    unknown = [t for t in names if t not in linears] or ([] if names else ["(none)"])
    if unknown:
        raise SystemExit(f"--lora-targets {cfg.lora_targets}: {', '.join(unknown)} names no linear layer of "
                         f"{init}'s language model; its linears: {', '.join(sorted(linears))}.")

def enable_checkpointing(model) -> None:
    """Keep only each decoder layer's input in the forward and recompute the rest in backward (non-reentrant
    checkpointing, which works when the input embeddings need no gradient, as with LoRA).
    transformers also hooks the input embeddings to mark their output as requiring a gradient, which only
    reentrant checkpointing needs; the hook calls requires_grad_() inside the forward, which torch.compile
    cannot trace, so the fast sampler's step fell back to eager (docs/LOG.md, real sizes on a GPU). We remove
    the hook."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    stage1.unwrap(model).disable_input_require_grads()


# ============================================================================================================
# Appendix B: several processes (torchrun) (skip on a first reading)
# torchrun starts N copies of this file and gives each its RANK, WORLD_SIZE and LOCAL_RANK. The loop stays
# the same loop; what differs is here, and marked "torchrun:" where the loop and its steps use it. Each step's
# P prompts are split over the ranks, P/N each (whole groups, so rewards and HRAS need no communication); the
# loss divides by the token count of the global batch (one all-reduce), so N ranks compute the update one
# process computes from the same samples (a test checks it, for ddp and fsdp). ddp: every rank holds the
# whole model; fsdp: FSDP2 shards weights, gradients and AdamW states and gathers the whole model for the
# rollout. Rank 0 logs the metrics (averaged over ranks) and writes the checkpoints from a gathered state
# dict, resumed on the same number of ranks. Not supported: LoRA with fsdp, the fast sampler with fsdp, a
# resume on another number of ranks.
# ============================================================================================================

def join_process_group(cfg: Config) -> tuple[int, int, str]:
    """(rank, world size, device). Alone (no WORLD_SIZE in the environment): (0, 1, cfg.device), nothing
    joined. Under torchrun: one GPU per rank (cuda:LOCAL_RANK), NCCL between GPUs, gloo between CPU
    processes."""
    if "WORLD_SIZE" not in os.environ:
        return 0, 1, cfg.device
    device = cfg.device
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():  # a caller may have made the group already (a script that runs main twice)
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        atexit.register(dist.destroy_process_group)
    return dist.get_rank(), dist.get_world_size(), device

def sum_over_ranks(values: list[float], device) -> list[float]:
    """Each value summed over the ranks, in one all-reduce; the values themselves in one process."""
    if not dist.is_initialized():
        return values
    summed = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(summed)
    return summed.tolist()

def gather_records(records: list[dict]) -> list[dict]:
    """Every rank's records, in rank order, on every rank; the records themselves in one process."""
    if not dist.is_initialized():
        return records
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, records)
    return [r for rank_records in everyone for r in rank_records]

def mean_over_ranks(row: dict, device) -> dict:
    """The step's metrics averaged over ranks (one all-reduce). Every rank has the same number of rows and
    groups, so a mean over rows or groups is the global one; entropy, a mean over tokens, weighs the ranks
    equally."""
    keys = [k for k, v in row.items() if isinstance(v, float)]
    world = dist.get_world_size() if dist.is_initialized() else 1
    return {**row, **{k: v / world for k, v in zip(keys, sum_over_ranks([row[k] for k in keys], device))}}

def parallelize(mode: str, model, device: str, dtype: torch.dtype, trains: bool = True) -> torch.nn.Module:
    """The update's forward for `model`, LogProbs(model), ready for several ranks.

    Why a forward of its own: DDP and FSDP2 work in hooks around a module's forward() (DDP arms its gradient
    all-reduce there; FSDP2 all-gathers a group's weights before it and frees them after, and reduce-scatters
    the gradients in backward). The update never calls model.forward: it runs the backbone (twice when
    prompts are shared: the prompts, then the completions), then lm_head a chunk at a time (the logits'
    memory). So LogProbs, whose forward is all of that, is the module they wrap.
    ddp:  DistributedDataParallel around LogProbs(model). The frozen reference (trains=False) is left whole.
          With several micro-batches DDP all-reduces after each backward, and the sum stays right (what was
          reduced already is the same on every rank); no_sync() would save all but the last all-reduce, at a
          few lines.
    fsdp: fully_shard on each decoder layer, on the vision tower, then on LogProbs(model), the root group: the
          embeddings, the final norm and lm_head (tied or not), gathered around every forward, so every
          parameter is whole when used. Weights are gathered in the compute dtype, gradients reduced in fp32.
    """
    forward = LogProbs(model)
    if mode == "ddp" and trains:
        from torch.nn.parallel import DistributedDataParallel

        gpu = [torch.device(device)] if device.startswith("cuda") else None
        # broadcast_buffers=False: the buffers (rotary tables) are fixed
        return DistributedDataParallel(forward, device_ids=gpu, broadcast_buffers=False)
    if mode == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

        mixed = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        core = stage1.unwrap(model).model
        for layer in core.language_model.layers:
            fully_shard(layer, mp_policy=mixed)
        # its own group: a frozen tower may be stored in another dtype
        fully_shard(core.visual, mp_policy=mixed)
        fully_shard(forward, mp_policy=mixed)
        # FSDP2 takes the first group to run a forward for the root. The sampler calls the policy itself,
        # whose layers and tower would run first; a forward of LogProbs that does nothing settles the root now
        # (then reshard: a root keeps its weights gathered after a forward; the optimiser needs the shards).
        register_fsdp_forward_method(forward, "settle_root")
        forward.settle_root()
        forward.reshard()
        if not trains:
            forward.set_reshard_after_forward(True)  # the reference: free its gathered root after a forward
    return forward

@contextlib.contextmanager
def gathered(forward: torch.nn.Module):
    """FSDP2: run the block (the rollout) on whole weights. Every group is all-gathered once before it and
    kept through its decode steps (by default a layer frees its weights after each forward and gathers them
    again at the next one: once per token), then freed. What that costs: during the rollout each rank holds
    every weight in the compute dtype (2 bytes a parameter in bf16) on top of its 1/N of the fp32 weights,
    gradients and AdamW states and its KV cache; unlike the sharded part, that copy does not shrink with more
    ranks. A no-op without FSDP2."""
    from torch.distributed.fsdp import FSDPModule

    groups = [m for m in forward.modules() if isinstance(m, FSDPModule)]
    inner = [m for m in groups if m is not forward]
    for group in inner:
        group.set_reshard_after_forward(False, recurse=False)
    for group in groups:
        group.unshard()
    try:
        yield
    finally:
        for group in inner:
            group.set_reshard_after_forward(True, recurse=False)
        for group in groups:
            group.reshard()

def whole_weights(forward: torch.nn.Module, mode: str) -> dict | None:
    """fsdp: the policy's every weight whole (its names as the policy's own state dict has them), gathered to
    rank 0's CPU (a collective: every rank calls it; other ranks get {}). Otherwise None: the model's own
    parameters are whole."""
    if mode != "fsdp":
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    weights = get_model_state_dict(forward, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {name.removeprefix("policy."): value for name, value in weights.items()}  # LogProbs holds .policy

def saveable(model, weights: dict | None):
    """Something with save_pretrained(folder) that writes `model` with `weights` (whole_weights) when
    given."""
    if weights is None:
        return model
    return types.SimpleNamespace(save_pretrained=functools.partial(model.save_pretrained, state_dict=weights))


# ============================================================================================================
# Appendix C: the drift monitor's judge and the guard (skip on a first reading)
# The rule oracle judges every rollout of the embedded tasks; real data needs an audit through an LLM judge.
# The guard, one step past the paper (which keeps its CRM frozen), retrains the CRM where it was fooled.
# ============================================================================================================

def drift_alarm(disagreements: list[float], threshold: float, window: int = 10) -> bool:
    """True at the step where the mean disagreement of the last `window` judged steps rises above threshold
    (at or below it one judged step earlier, or the first full window). One warning a crossing, not a step.

    Example (window 2, threshold 0.1): [0.0, 0.1, 0.3] -> True (means 0.05 then 0.2);
             [0.0, 0.1, 0.3, 0.2] -> False (still above: warned already).
    """
    if len(disagreements) < window:
        return False
    now = sum(disagreements[-window:]) / window
    before = sum(disagreements[-window - 1:-1]) / window if len(disagreements) > window else 0.0
    return now > threshold >= before

def judge_step(cfg: Config, judge, scores: list[dict], texts: list[str], questions: list[str], step: int,
               rank: int) -> list[bool | None]:
    """The judge's verdict on each rollout of the step (True consistent, False inconsistent, None not judged):
    with an audit, the judge's on --audit-rows of them every --audit-every steps (drawn by a seed of the run,
    rank and step, so a resumed run asks the same); without, the rule oracle's on every one (embedded tasks;
    None on real data)."""
    if judge is None:
        return [s["oracle_consistent"] for s in scores]
    if (step + 1) % cfg.audit_every:
        return [None] * len(scores)
    return audit(judge, texts, questions, cfg.audit_rows, random.Random(f"{cfg.seed}-{rank}-{step}"))

def audit(judge, texts: list[str], questions: list[str], n_rows: int,
          rng: random.Random) -> list[bool | None]:
    """The judge's verdicts on n_rows of the step's rollouts drawn at random among those with a thinking and
    an answer (True consistent, False inconsistent, None not asked or no verdict): what the drift monitor
    reads on real data, where there is no oracle. A URL judge's replies are cached in the run folder."""
    from adapters import judge as judges

    parsed = [i for i, text in enumerate(texts) if None not in stage1.parse_completion(text)]
    asked = sorted(rng.sample(parsed, min(n_rows, len(parsed))))
    rows = [dict(zip(("thinking", "answer"), stage1.parse_completion(texts[i])), question=questions[i])
            for i in asked]
    replies = judge.complete([judges.judge_prompt(r) for r in rows])
    verdicts: list[bool | None] = [None] * len(texts)
    for i, reply in zip(asked, replies):
        verdict = judges.parse_verdict(reply)
        verdicts[i] = None if verdict is None else bool(verdict)
    return verdicts

def judged_rows(texts: list[str], questions: list[str], verdicts: list[bool | None],
                crm_probs: list[float]) -> list[dict]:
    """The judged rollouts with a thinking and an answer as CRM training rows {question, thinking, answer,
    label}, each with the CRM's P(consistent) of this step."""
    rows = []
    for text, question, verdict, p in zip(texts, questions, verdicts, crm_probs):
        think, answer = stage1.parse_completion(text)
        if verdict is not None and think is not None and answer is not None:
            rows.append({"question": question, "thinking": think, "answer": answer, "label": int(verdict),
                         "crm_prob": p})
    return rows

def refresh_crm(cfg: Config, crm, tokenizer, new: list[dict], old: list[dict], step: int) -> float:
    """The guard (one step past the paper, which keeps its CRM frozen): --crm-refresh-steps supervised steps
    of the CRM (stage 1's train_crm) on the rollouts judged since its last refresh, `new`, where the policy's
    text fooled it, and on the run's earlier judged rollouts, `old`, about as often in all (new repeated), so
    that it learns the new text without forgetting the text it already read. Returns the mean loss.

    Example: 64 new rows and 640 old ones -> 10 x 64 + 640 = 1,280 rows, half of them new.
    """
    settings = stage1.Config(crm_steps=cfg.crm_refresh_steps, crm_lr=cfg.crm_refresh_lr, crm_batch_size=64,
                             warmup_steps=0, seed=cfg.seed * 100_003 + step, device=cfg.device,
                             dtype=cfg.dtype, crm_max_length=stage1.crm_max_length(tokenizer))
    crm.requires_grad_(True)
    repeats = max(1, round(len(old) / max(1, len(new))))
    losses = stage1.train_crm(settings, crm, tokenizer, new * repeats + old)
    crm.requires_grad_(False).eval()
    return sum(losses) / len(losses)

def guard(cfg: Config, m, s, texts: list[str], questions: list[str], judged: list[bool | None],
          scores: list[dict], step: int) -> float | None:
    """The guard, once the step is judged: the run's judged rollouts grow by the step's (every rank's); where
    the CRM and the judge disagree on more than --drift-warn of them, the CRM is refreshed (refresh_crm) on
    the rollouts judged since its last refresh, against the earlier ones. Returns the refresh's loss, or
    None."""
    step_rows = gather_records(judged_rows(texts, questions, judged, [r["crm_prob"] for r in scores]))
    s.judged_so_far += step_rows
    on_all_ranks = drift([r["crm_prob"] for r in step_rows], [bool(r["label"]) for r in step_rows])
    if (on_all_ranks["crm_judge_disagreement"] or 0.0) <= cfg.drift_warn:
        return None
    new, old = s.judged_so_far[s.new_from:], s.judged_so_far[:s.new_from]
    loss = refresh_crm(cfg, m.crm, m.crm_tokenizer, new, old, step + 1)
    s.new_from = len(s.judged_so_far)
    return loss


# ============================================================================================================
# Appendix D: the flags, the run folder, the models, checkpoints (skip on a first reading)
# main's named steps: every flag checked before anything is read; the run opened (torchrun, data, folder);
# the models built; a checkpoint restored; a step logged; checkpoints written; the run finished.
# ============================================================================================================

def check_config(cfg: Config) -> None:
    """Refuse flags that would crash a step, train on nothing or make weights NaN, before anything is read.
    (--prompts-per-step against the split's size is checked in main, once the data is open.)"""
    at_least = {"--steps": (cfg.steps, 1), "--prompts-per-step": (cfg.prompts_per_step, 1),
                "--group-size": (cfg.group_size, 2), "--max-new-tokens": (cfg.max_new_tokens, 1),
                "--top-k": (cfg.top_k, 0), "--updates-per-batch": (cfg.updates_per_batch, 1),
                "--micro-batch-size": (cfg.micro_batch_size, 1), "--logprob-chunk": (cfg.logprob_chunk, 1),
                "--checkpoint-every": (cfg.checkpoint_every, 1),
                "--save-rollouts-every": (cfg.save_rollouts_every, 0), "--audit-every": (cfg.audit_every, 0),
                "--audit-rows": (cfg.audit_rows, 1), "--crm-refresh-steps": (cfg.crm_refresh_steps, 1),
                "--lora-rank": (cfg.lora_rank, 0),
                "--beta-warmup-steps": (cfg.beta_warmup_steps, 0)}
    for flag, (value, low) in at_least.items():
        if value < low:
            why = (" (a group of one has no baseline: its advantage is always 0)"
                   if flag == "--group-size" else "")
            raise SystemExit(f"{flag} {value}: must be at least {low}{why}.")
    if not (math.isfinite(cfg.temperature) and cfg.temperature > 0):
        raise SystemExit(f"--temperature {cfg.temperature}: stage 5 needs T > 0. The update divides the "
                         f"logits by T (T = 0 makes every weight NaN after the first step) and T < 0 "
                         f"samples the least likely tokens. For greedy numbers, evaluate with 06_eval.py "
                         f"--temperature 0.")
    if not (0 < cfg.top_p <= 1):
        raise SystemExit(f"--top-p {cfg.top_p}: must be in (0, 1] (1 = off).")
    for flag, value, low in [("--lr", cfg.lr, 0.0), ("--weight-decay", cfg.weight_decay, 0.0),
                             ("--grad-clip", cfg.grad_clip, 0.0), ("--clip-low", cfg.clip_low, 0.0),
                             ("--clip-high", cfg.clip_high, 0.0), ("--kl-beta", cfg.kl_beta, 0.0),
                             ("--lora-alpha", cfg.lora_alpha, 0.0)]:
        if not (math.isfinite(value) and value >= low):
            raise SystemExit(f"{flag} {value}: must be a finite number >= {low}.")
    if cfg.lr == 0 or cfg.grad_clip == 0:
        raise SystemExit(f"--lr {cfg.lr}, --grad-clip {cfg.grad_clip}: both must be above 0 "
                         f"(0 trains nothing).")
    if cfg.clip_low >= 1:
        raise SystemExit(f"--clip-low {cfg.clip_low}: must be below 1 "
                         f"(the ratio is clipped below at 1 - clip_low).")
    if cfg.beta_schedule not in ("constant", "warmup", "decay"):
        raise SystemExit(f"--beta-schedule {cfg.beta_schedule}: use constant, warmup or decay.")
    stage3.check_config(stage3.Config(lambda_cons=cfg.lambda_cons, format_weight=cfg.format_weight))
    stage4.check_config(stage4.Config(advantage=cfg.advantage, alpha=cfg.alpha, beta=cfg.beta, eps=cfg.eps,
                                      cons_eps=cfg.cons_eps))
    for flag, value, choices in [("--fast", cfg.fast, ("auto", "on", "off")),
                                 ("--pi-old", cfg.pi_old, ("auto", "sampler", "recompute")),
                                 ("--parallel", cfg.parallel, ("auto", "ddp", "fsdp"))]:
        if value not in choices:
            raise SystemExit(f"{flag} {value}: use {', '.join(choices)}.")
    stage1.compute_dtype(cfg.device, cfg.dtype)  # an unknown --dtype is refused there
    if cfg.parallel == "fsdp" and cfg.lora_rank > 0:
        raise SystemExit("--parallel fsdp with --lora-rank: not supported (the reference is the model "
                         "with its adapters off, which this loop does not shard); use --parallel ddp: with "
                         "LoRA each rank holds a frozen base in the compute dtype and only the adapters' "
                         "gradients are reduced.")
    if cfg.parallel == "fsdp" and cfg.fast == "on":
        raise SystemExit("--parallel fsdp with --fast on: not supported (the compiled decode step cannot "
                         "run through FSDP2's hooks); leave --fast auto, which samples with the simple loop "
                         "under fsdp.")
    if not 0 <= cfg.drift_warn <= 1:
        raise SystemExit(f"--drift-warn {cfg.drift_warn}: a share of rollouts, between 0 and 1.")
    if cfg.audit_every and not (cfg.judge or cfg.judge_url):
        raise SystemExit(f"--audit-every {cfg.audit_every}: an audit needs a judge: pass --judge MODEL, or "
                         f"--judge-url URL --judge-model NAME.")
    stage1.check_judge_flags(cfg)
    if not (math.isfinite(cfg.crm_refresh_lr) and cfg.crm_refresh_lr > 0):
        raise SystemExit(f"--crm-refresh-lr {cfg.crm_refresh_lr}: must be a finite number above 0.")
    if cfg.resume and cfg.overwrite:
        raise SystemExit("--resume and --overwrite: pass one (continue the run, or replace it).")
    stage1.check_device(cfg.device)
    if cfg.init:  # a folder that is not there, or the wrong model, fails here, not after a model has loaded
        stage1.check_policy("--init", cfg.init)
    if cfg.crm:
        stage1.check_classifier("--crm", cfg.crm)

def open_run(cfg: Config) -> types.SimpleNamespace:
    """Everything main checks before any model loads: torchrun's rank, world size and device, stage 1's data
    and run folder, the CRM to use (recorded, so that a resume keeps it), the run folder of this run (a
    checkpoint to resume, or none; a folder that holds another run is refused), the judge of an audit."""
    from datasets import load_from_disk

    # torchrun: this process's rank, and its device (one GPU per rank); alone: rank 0 of 1, cfg.device
    rank, world, device = join_process_group(cfg)
    mode = ("ddp" if cfg.parallel == "auto" else cfg.parallel) if "WORLD_SIZE" in os.environ else "none"
    if mode == "none" and cfg.parallel != "auto":
        raise SystemExit(f"--parallel {cfg.parallel}: launch with torchrun, e.g. "
                         f"`torchrun --nproc-per-node 2 05_grpo_train.py -- --parallel {cfg.parallel} ...`; "
                         f"alone, leave --parallel auto.")
    run_dir = Path(cfg.runs_dir) / cfg.run
    stage1_config = stage1.read_stage1(run_dir)["config"]
    embedded = stage1_config["dataset"] is None
    train = load_from_disk(
        str(stage1.require(run_dir / "data", "python 01_sft_rm.py")))[stage1_config["train_split"]]
    if cfg.prompts_per_step > len(train):
        raise SystemExit(f"--prompts-per-step {cfg.prompts_per_step}: the {stage1_config['train_split']} "
                         f"split of {run_dir / 'data'} has {len(train)} rows; pass at most {len(train)}.")
    if cfg.prompts_per_step % world:  # torchrun: whole groups per rank, the same number on every rank
        raise SystemExit(f"--prompts-per-step {cfg.prompts_per_step}: must be a multiple of the "
                         f"{world} ranks.")
    cfg = dataclasses.replace(cfg, device=device, crm=cfg.crm or str(stage1.default_crm(run_dir)))
    out_dir = run_dir / (cfg.name or f"{cfg.advantage}_seed{cfg.seed}")
    run_config = {**dataclasses.asdict(cfg), "parallel": mode, "world_size": world}
    checkpoint = check_run_folder(cfg, out_dir, run_config)  # refuses to mix or erase runs
    if cfg.crm_refresh and not embedded and not cfg.audit_every:
        raise SystemExit("--crm-refresh: the guard trains the CRM on judged rollouts, and real data has no "
                         "oracle: add an audit (--audit-every N with --judge or --judge-url), whose verdicts "
                         "it trains on.")
    if cfg.audit_every:
        stage1.check_judge(cfg, run_dir)  # the judge answers before any model loads
    if world > 1:
        dist.barrier()  # torchrun: every rank has read the run folder before rank 0 changes it
    per_rank = cfg.prompts_per_step // world
    return types.SimpleNamespace(
        cfg=cfg, rank=rank, world=world, mode=mode, run_dir=run_dir, out_dir=out_dir, train=train,
        embedded=embedded, benchmark=stage3.run_benchmark(stage1_config), run_config=run_config,
        columns=stage2.data_columns(stage1_config), checkpoint=checkpoint,
        my_prompts=slice(rank * per_rank, (rank + 1) * per_rank),
        metrics_path=out_dir / "metrics.jsonl", rollouts_path=out_dir / "rollouts.jsonl")

def build_models(cfg: Config, run) -> types.SimpleNamespace:
    """The policy (from the checkpoint on a resume) and its update forward, an optional frozen reference, the
    CRM, the audit's judge, AdamW and its warm-up. Frozen weights are stored in the compute dtype (bf16 on
    CUDA); trained weights in fp32 (master weights, bf16 matmuls under autocast): 01_sft_rm.compute_dtype."""
    init = cfg.init or str(stage1.require(run.run_dir / "policy_sft", "python 01_sft_rm.py"))
    if cfg.lora_rank > 0 and not run.checkpoint:  # before the model loads (a resumed run keeps its adapters)
        check_lora_targets(cfg, init)
    dtype = stage1.compute_dtype(cfg.device, cfg.dtype)
    # LoRA: a frozen base in the compute dtype + fp32 adapters (peft's default for a bf16 base)
    if cfg.lora_rank > 0 and run.checkpoint:
        model, processor = stage1.load_policy(str(run.checkpoint), cfg.device, dtype=dtype, trainable=True)
    elif cfg.lora_rank > 0:
        model, processor = stage1.load_policy(init, cfg.device, dtype=dtype)
        torch.manual_seed(cfg.seed)  # LoRA's A matrices start random (B at zero): the same seed, same start
        model = add_lora(cfg, model)
    else:
        model, processor = stage1.load_policy(str(run.checkpoint or init), cfg.device, dtype=torch.float32)
    if cfg.freeze_vision_tower:  # frozen, so stored in the compute dtype like every frozen weight
        stage1.unwrap(model).model.visual.requires_grad_(False).to(dtype)
    if cfg.gradient_checkpointing:
        enable_checkpointing(model)
    model.eval()
    reference = None  # LoRA: the reference is the policy with its adapters off (reference_logprobs)
    if cfg.kl_beta > 0 and cfg.lora_rank == 0:
        reference = stage1.load_policy(init, cfg.device, dtype=dtype)[0].eval().requires_grad_(False)
        reference = parallelize(run.mode, reference, cfg.device, dtype, trains=False)
    forward = parallelize(run.mode, model, cfg.device, dtype)  # torchrun: DDP or FSDP2 around LogProbs(model)
    # the guard trains the CRM: fp32 weights, restored from the checkpoint on a resume
    refreshed = run.checkpoint / "crm" if run.checkpoint and cfg.crm_refresh else None
    crm, crm_tokenizer = stage1.load_crm(str(refreshed or cfg.crm), cfg.device,
                                         dtype=torch.float32 if cfg.crm_refresh else dtype)
    crm.eval().requires_grad_(False)
    if run.rank == 0:
        print(f"consistency reward model: {refreshed or cfg.crm}")
    judge = None
    if cfg.audit_every:  # a URL judge's replies cached per rank in the run folder
        cache = "judge_cache.jsonl" if run.world == 1 else f"judge_cache_rank{run.rank}.jsonl"
        run.out_dir.mkdir(parents=True, exist_ok=True)
        judge = stage1.make_judge(cfg, run.out_dir / cache)
    # fused on CUDA: one kernel, no per-tensor temporaries; a 5-step linear warm-up
    optimizer = torch.optim.AdamW(trainable_parameters(model), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  fused=cfg.device.startswith("cuda"))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 5))
    return types.SimpleNamespace(
        model=model, processor=processor, forward=forward, reference=reference, crm=crm,
        crm_tokenizer=crm_tokenizer, judge=judge, optimizer=optimizer, scheduler=scheduler, dtype=dtype,
        reward_cfg=stage3.Config(lambda_cons=cfg.lambda_cons, format_weight=cfg.format_weight,
                                 device=cfg.device),
        stop_ids=stage1.stop_token_ids(processor), forbidden=stage2.forbidden_token_ids(processor),
        fast="off" if run.mode == "fsdp" else cfg.fast)  # fsdp: the simple loop (a compiled step skips hooks)

def restore_checkpoint(cfg: Config, run, m) -> types.SimpleNamespace:
    """The loop's state: the prompt order (the same on every rank, so every rank draws the same prompts),
    the sampling generator (seed * N + rank: distinct over ranks and seeds; one process: the seed), the first
    step, the seconds so far and the guard's data; all fresh, or from the checkpoint with the optimiser's
    state. The run folder's files are then opened: a resumed run redoes (and relogs) the steps after its
    checkpoint."""
    prompt_rng = random.Random(cfg.seed)
    torch.manual_seed(cfg.seed)
    generator = torch.Generator(device=cfg.device).manual_seed(cfg.seed * run.world + run.rank)
    s = types.SimpleNamespace(prompt_rng=prompt_rng, generator=generator, start_step=0, judged_so_far=[],
                              new_from=0, started=time.time(), disagreements=[])
    if run.checkpoint:
        state = torch.load(run.checkpoint / "trainer_state.pt", weights_only=False, map_location="cpu")
        if run.mode == "fsdp":  # the whole AdamW state, cut to this rank's shards
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(m.forward, m.optimizer, state["optimizer"],
                                     options=StateDictOptions(full_state_dict=True))
        else:
            m.optimizer.load_state_dict(state["optimizer"])
        m.scheduler.load_state_dict(state["scheduler"])
        mine = state["ranks"][run.rank] if "ranks" in state else state  # an older checkpoint: at the top
        prompt_rng.setstate(mine["prompt_rng"])
        generator.set_state(mine["generator"])
        torch.set_rng_state(mine["torch_rng"])
        s.start_step, s.started = state["step"], time.time() - mine.get("seconds", 0.0)  # the seconds go on
        s.judged_so_far = state.get("guard", {}).get("judged", [])
        s.new_from = state.get("guard", {}).get("new_from", 0)
        if run.rank == 0:
            print(f"resumed from {run.checkpoint} at step {s.start_step}")
    if run.rank == 0:  # torchrun: one writer
        run.out_dir.mkdir(parents=True, exist_ok=True)
        for name in RUN_OUTPUTS if cfg.overwrite else []:  # --overwrite: the old run goes now, not before
            path = run.out_dir / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        for path in (run.metrics_path, run.rollouts_path):
            kept = ([r for r in read_metrics(path) if r["step"] <= s.start_step]
                    if run.checkpoint and path.exists() else [])
            stage1.write_jsonl_atomic(path, kept)
        stage1.write_json_atomic(run.out_dir / "config.json", run.run_config)
        s.disagreements = [r["crm_judge_disagreement"] for r in read_metrics(run.metrics_path)
                           if r.get("crm_judge_disagreement") is not None]  # the drift monitor's history
    return s

def log_step(cfg: Config, run, s, row: dict, records: list[dict], bar) -> None:
    """One metrics line, the step's rollouts every --save-rollouts-every steps (every rank's, gathered: a
    collective), and the drift monitor's warning when the CRM and the judge disagree past --drift-warn over
    the last 10 judged steps. Rank 0 writes."""
    if cfg.save_rollouts_every and row["step"] % cfg.save_rollouts_every == 0:
        records = gather_records(records)
        if run.rank == 0:
            with open(run.rollouts_path, "a") as f:
                f.writelines(json.dumps(r) + "\n" for r in records)
    if run.rank > 0:
        return
    with open(run.metrics_path, "a") as f:
        f.write(json.dumps(row) + "\n")
    bar.set_postfix(acc=f"{row['accuracy']:.2f}", cons=f"{row['crm_consistency']:.2f}", kl=f"{row['kl']:.3f}")
    if row["crm_judge_disagreement"] is not None:
        s.disagreements.append(row["crm_judge_disagreement"])
        if drift_alarm(s.disagreements, cfg.drift_warn):
            tqdm.write(f"warning: step {row['step']}: the CRM and the judge disagree on "
                       f"{sum(s.disagreements[-10:]) / 10:.0%} of the rollouts of the last 10 judged steps, "
                       f"above --drift-warn {cfg.drift_warn}; the policy may be fooling the CRM (read "
                       f"{run.rollouts_path}; the guard: --crm-refresh).")


# Flags a resumed run must keep: it would mix methods or batch shapes, and each rank's sampler state is saved.
RESUME_MUST_MATCH = ["advantage", "group_size", "prompts_per_step", "lora_rank", "parallel", "world_size",
                     "crm"]
# what --overwrite removes
RUN_OUTPUTS = ["metrics.jsonl", "rollouts.jsonl", "checkpoint", "checkpoint.old", "checkpoint.tmp", "policy",
               "policy.tmp", "crm", "crm.tmp", "summary.json", "judge_cache.jsonl"]

def save_checkpoint(cfg: Config, run, m, s, step: int) -> None:
    """Write checkpoint.tmp/, then swap it in: a kill at any moment leaves one complete checkpoint, a failed
    write (a full disk) stops the run with the last one as it was. It holds the weights, the optimiser's and
    scheduler's states, each rank's random states and seconds of training (the metric goes on from them after
    a resume), the flags a resume must match and, with the guard, the refreshed CRM (checkpoint/crm/) and the
    run's judged rollouts. torchrun: every rank calls it (fsdp gathers the weights and AdamW states; each
    rank's sampler state is gathered); rank 0 writes; the others wait for it, so no rank reads a half-written
    one."""
    out_dir, mode, rank = run.out_dir, run.mode, run.rank
    rng_states = {"prompt_rng": s.prompt_rng.getstate(), "generator": s.generator.get_state(),
                  "torch_rng": torch.get_rng_state(), "seconds": time.time() - s.started}
    weights = whole_weights(m.forward, mode)
    if mode == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        optimizer_state = get_optimizer_state_dict(
            m.forward, m.optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        optimizer_state = m.optimizer.state_dict()  # one process, or ddp: every rank holds the whole state
    per_rank = [rng_states]
    if dist.is_initialized():
        per_rank = [None] * dist.get_world_size()
        dist.all_gather_object(per_rank, rng_states)
    if rank == 0:
        tmp, final, old = out_dir / "checkpoint.tmp", out_dir / "checkpoint", out_dir / "checkpoint.old"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            saveable(m.model, weights).save_pretrained(tmp)
            m.processor.save_pretrained(tmp)
            state = {"step": step, "optimizer": optimizer_state, "scheduler": m.scheduler.state_dict(),
                     "ranks": per_rank}
            if cfg.crm_refresh:  # the guard's CRM and data
                stage1.save_folder_atomic(tmp / "crm", m.crm, m.crm_tokenizer)
                state["guard"] = {"judged": s.judged_so_far, "new_from": s.new_from}
            torch.save(state, tmp / "trainer_state.pt")
            stage1.write_json_atomic(tmp / "run_config.json", run.run_config)  # what a --resume must match
        except (OSError, RuntimeError) as error:  # a full disk: torch.save says only "unexpected pos ..."
            free = shutil.disk_usage(out_dir).free  # before the half-written checkpoint is removed
            shutil.rmtree(tmp, ignore_errors=True)
            full = getattr(error, "errno", None) == errno.ENOSPC or free < 2**26  # under 64 MiB left
            why = f"no space left on the disk ({free / 2**20:.0f} MiB free)" if full else repr(error)
            last = latest_checkpoint(out_dir)
            then = f"{last}, the last complete checkpoint, is as it was: free some space, then --resume"
            if last is None:
                then = "no checkpoint was complete yet: free some space, then rerun with --overwrite"
            raise SystemExit(f"step {step}: writing the checkpoint {tmp} failed, {why}; {then}.") from error
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()

def latest_checkpoint(out_dir: Path) -> Path | None:
    for folder in (out_dir / "checkpoint", out_dir / "checkpoint.old"):  # .old: killed mid-swap
        if (folder / "trainer_state.pt").exists():
            return folder
    return None

def check_run_folder(cfg: Config, out_dir: Path, run_config: dict) -> Path | None:
    """Before any model loads: the checkpoint --resume continues from (an error when there is none, or when
    its flags differ), or None for a new run, refused if the folder already holds one and --overwrite is not
    given."""
    if cfg.resume:
        checkpoint = latest_checkpoint(out_dir)
        if checkpoint is None:
            raise SystemExit(f"--resume: {out_dir} has no checkpoint (checkpoint/trainer_state.pt), so there "
                             f"is nothing to continue; run without --resume (add --overwrite to replace what "
                             f"is there).")
        saved_path = checkpoint / "run_config.json"
        saved = json.loads(saved_path.read_text()) if saved_path.exists() else None
        if saved is None:  # written before checkpoints kept their flags
            print(f"warning: {checkpoint} does not record its flags; resuming without checking them")
        for key in RESUME_MUST_MATCH if saved else []:
            if saved.get(key) != run_config[key]:
                raise SystemExit(
                    f"--resume: {checkpoint} was written with {key} = {saved.get(key)!r}, this run has "
                    f"{run_config[key]!r}. A resumed run keeps {', '.join(RESUME_MUST_MATCH)} (else it mixes "
                    f"methods or batch shapes; each rank's sampler state is in the checkpoint). Resume with "
                    f"the same flags, or give this run another --name.")
        return checkpoint
    held = [name for name in RUN_OUTPUTS  # an empty metrics.jsonl holds no run
            if (out_dir / name).is_dir() or ((out_dir / name).exists() and (out_dir / name).stat().st_size)]
    if held and not cfg.overwrite:
        raise SystemExit(f"{out_dir} already holds a run ({', '.join(held)}): pass --resume to continue it, "
                         f"--overwrite to replace it, or --name for a new folder.")
    return None

def read_metrics(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl (or rollouts.jsonl); a last line cut short by a kill is dropped with a
    warning, and the step it belonged to is redone (--resume) or missing (stage 6's curves)."""
    return stage1.read_jsonl(path, drop_cut_last_line=True)

def finish(cfg: Config, run, m) -> dict:
    """The final weights (fsdp: gathered to rank 0, every rank taking part), the guard's CRM as it ended, and
    summary.json: the mean of the last 10 steps' numbers against the first 10 steps' accuracy."""
    weights = whole_weights(m.forward, run.mode)
    if run.rank > 0:
        dist.barrier()  # torchrun: return once rank 0 has written the policy
        return {}
    stage1.save_folder_atomic(run.out_dir / "policy", saveable(m.model, weights), m.processor)
    if cfg.crm_refresh:
        stage1.save_folder_atomic(run.out_dir / "crm", m.crm, m.crm_tokenizer)
    history = stage1.read_jsonl(run.metrics_path)
    last = history[-10:]
    summary = {k: sum(r[k] for r in last) / len(last)
               for k in ("accuracy", "crm_consistency", "reward_task", "kl")}
    if run.embedded:
        summary["oracle_inconsistency_rate"] = sum(r["oracle_inconsistency_rate"] for r in last) / len(last)
    summary["first_10_steps_accuracy"] = sum(r["accuracy"] for r in history[:10]) / len(history[:10])
    stage1.write_json_atomic(run.out_dir / "summary.json", summary)
    print(f"\n{cfg.advantage}: rollout accuracy {summary['first_10_steps_accuracy']:.3f} (first 10 steps) -> "
          f"{summary['accuracy']:.3f} (last 10); CRM consistency {summary['crm_consistency']:.3f}"
          + (f"; oracle IR {summary['oracle_inconsistency_rate']:.3f}" if run.embedded else ""))
    print(f"wrote {run.out_dir}/{{metrics.jsonl,rollouts.jsonl,policy}}")
    if run.world > 1:
        dist.barrier()
    return summary


if __name__ == "__main__":
    main(stage1.parse_config(Config, __doc__.split("\n")[0]))
