"""Stage 5: the training loop. GRPO with the consistency reward, combined by HRAS (CORA).

Each step, in one visible loop:
  1. sample P prompts from the train split
  2. roll out G completions per prompt (stage 2's sampler)              -> ids, old log-probs
  3. score them (stage 3): r_task = r_acc + r_fmt, r_cons = lambda * P_CRM(consistent)
  4. advantages (stage 4): --advantage hras | grpo | sum, beta_t from its schedule
  5. update the policy on the clipped surrogate, token-mean over the whole batch:

     ratio_t = exp(log pi(y_t) - log pi_old(y_t))          (both under logits / temperature)
     L = - sum_{i,t} m_it [ min(ratio_t A_i, clip(ratio_t, 1 - eps_low, 1 + eps_high) A_i)
                            - kl_beta * KL3_t ] / sum_{i,t} m_it
     KL3_t = exp(ref_t - new_t) - (ref_t - new_t) - 1      (k3 estimator, >= 0, to a frozen reference)

What the loss reads: on-policy (the first update on a fresh batch, ratio = 1) it is
-sum_i A_i |y_i| / sum_i |y_i|, zero only when the advantages do not correlate with the lengths |y_i|;
its gradient, sum_i A_i sum_t grad log pi(y_it) / sum_i |y_i|, is what trains. Watch the rewards.
pi_old: in fp32 the sampler's own log-probs (stage 2 records them) equal a forward pass of the same
weights (a test checks it), so no second pass is needed. Under bf16 the sampler (one token at a time
through a KV cache) and the update (the whole sequence at once) round differently, so ratio != 1 and
the clip fires on a first update; --pi-old auto then recomputes pi_old with the update's own forward.

Real sizes on one GPU: --dtype (bf16 compute on CUDA; trained weights stay fp32), --lora-rank (peft
adapters on the language model; the reference is the same model with its adapters off),
--freeze-vision-tower (visual features once per prompt, reused by its G rows), --gradient-checkpointing,
--logprob-chunk, --micro-batch-size. bench/memory_plan.py gives the memory each one saves.

Reads:  runs/<run>/{data,policy_sft,crm}/ and stage1.json (01_sft_rm.py).
Writes: runs/<run>/<name>/ with metrics.jsonl (one line per step), samples.jsonl (decoded
        completions every --sample-every steps), checkpoint/ (every --checkpoint-every steps,
        atomic; --resume continues from it), policy/ (the final weights), summary.json.
Run:    python 05_grpo_train.py --advantage hras      # CORA;   --advantage grpo | sum for the baselines
"""
import dataclasses
import importlib
import json
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm


# Earlier stages, by file name: "01_sft_rm" cannot follow `import`, but import_module takes it (the
# stages' folder is on sys.path when one runs as a script). Imports flow forward only.
stage1, stage2, stage3, stage4 = map(importlib.import_module, ["01_sft_rm", "02_rollout", "03_rewards", "04_hras"])


@dataclass
class Config:
    run: str = "default"  # run folder: runs/<run>/ (stage 1's outputs live there)
    runs_dir: str = "runs"  # parent folder of all runs
    name: str | None = None  # output folder runs/<run>/<name>/; None = "<advantage>_seed<seed>"
    init: str | None = None  # policy to start from; None = runs/<run>/policy_sft
    crm: str | None = None  # consistency reward model; None = runs/<run>/crm
    # rewards and advantages
    advantage: str = "hras"  # hras (CORA) | grpo (task reward only) | sum (sum, then normalise)
    lambda_cons: float = 1.0  # r_cons = lambda_cons * P(consistent)
    format_weight: float = 1.0  # r_fmt for a well-formed completion
    alpha: float = 1.0  # weight of the task advantage (hras)
    beta: float = 1.0  # weight of the consistency advantage (hras), before its schedule
    beta_schedule: str = "constant"  # constant | warmup | decay
    beta_warmup_steps: int = 0  # length of the warm-up (beta_schedule warmup)
    eps: float = 1e-6  # added to the group std
    cons_eps: float = 1e-6  # added to the group std of r_cons in hras (0.05 damps CRM float noise; 04_hras.py)
    # rollouts
    steps: int = 100  # optimiser steps (one batch of rollouts each)
    prompts_per_step: int = 8  # P: prompts per step
    group_size: int = 8  # G: completions per prompt
    max_new_tokens: int = 64  # completion budget
    temperature: float = 1.0  # sampling temperature (also divides the logits in the update)
    top_k: int = 0  # sampler top-k (0 = off)
    top_p: float = 1.0  # sampler top-p (1 = off)
    fast: str = "auto"  # sampler: on = static KV cache + compiled step, off = the simple loop, auto = on on CUDA
    # update
    lr: float = 2e-4  # AdamW learning rate, after a 5-step linear warm-up (tiny model; ~1e-6 for 2B+)
    weight_decay: float = 0.0  # AdamW weight decay
    grad_clip: float = 1.0  # max global gradient norm
    clip_low: float = 0.2  # ratio clipped below at 1 - clip_low
    clip_high: float = 0.2  # ratio clipped above at 1 + clip_high
    kl_beta: float = 0.0  # weight of the k3 KL to the frozen initial policy (0 = no reference model)
    updates_per_batch: int = 1  # optimiser steps per batch of rollouts (>1: off-policy, the clip matters)
    micro_batch_size: int = 64  # completions per forward/backward (gradient accumulation over the batch)
    gradient_checkpointing: bool = False  # keep only each decoder layer's input, recompute the rest in backward
    logprob_chunk: int = 256  # completion positions per lm_head + log-softmax block (bounds the (b, chunk, V) logits)
    freeze_vision_tower: bool = False  # train the language model only; the vision tower runs once per prompt
    pi_old: str = "auto"  # sampler | recompute | auto: recompute under bf16 (the sampler's and update's forwards round differently)
    # precision and LoRA
    dtype: str = "auto"  # compute precision: auto = bf16 on CUDA, fp32 on CPU (01_sft_rm.compute_dtype)
    lora_rank: int = 0  # > 0: train LoRA adapters of this rank through peft instead of every weight
    lora_alpha: float = 32.0  # LoRA scale is alpha / rank
    lora_targets: str = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"  # language-model linears to adapt
    # bookkeeping
    checkpoint_every: int = 25  # steps between checkpoints
    sample_every: int = 25  # steps between dumps of decoded completions
    resume: bool = False  # continue from runs/<run>/<name>/checkpoint
    stop_after: int = 0  # stop after this many steps in this process, as if killed (tests of --resume)
    seed: int = 0  # seeds prompt order and sampling
    device: str = "cuda" if torch.cuda.is_available() else "cpu"  # where the policy trains


# ----------------------------------------------------------------------------- the update
def prompt_rows(prompt: dict, index: list[int]) -> dict:
    """Rows `index` of a prompt batch (repeats allowed); pixel_values is a flat list of patches, so it
    is split per image (image_grid_thw.prod) and regathered. One image per prompt."""
    patches = prompt["pixel_values"].split(prompt["image_grid_thw"].prod(-1).tolist())  # B chunks of (n_i, D)
    idx = torch.tensor(index, device=prompt["input_ids"].device)
    picked = {k: prompt[k][idx] for k in ("input_ids", "attention_mask", "mm_token_type_ids", "image_grid_thw")}
    return {**picked, "pixel_values": torch.cat([patches[i] for i in index])}


def policy_loss(new_logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, clip_low: float, clip_high: float, kl_beta: float = 0.0,
                ref_logprobs: torch.Tensor | None = None, n_tokens: int | None = None) -> tuple[torch.Tensor, dict]:
    """Clipped surrogate with optional k3 KL, summed over tokens and divided by n_tokens (the token
    count of the whole batch, so micro-batches add up to a token mean). logprobs, mask: (B, L); advantages: (B,)."""
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
    clipped = ((ratio < 1 - clip_low) & (adv < 0)) | ((ratio > 1 + clip_high) & (adv > 0))  # the clip is active
    stats = {"kl": float((kl.detach() * mask).sum()), "clipped": float((clipped.float() * mask).sum())}
    return loss, stats


def trainable_parameters(model) -> list:
    return [p for p in model.parameters() if p.requires_grad]


def vision_is_frozen(model) -> bool:
    """True when no vision-tower weight trains (--freeze-vision-tower, or LoRA on the language model)."""
    return not any(p.requires_grad for p in stage1.unwrap(model).model.visual.parameters())


def batch_logprobs(cfg: Config, model, prompt: dict, ids, mask, rows: list[int], visual) -> torch.Tensor:
    """completion_logprobs of batch rows `rows`; row r belongs to prompt r // G, and so do its visual features."""
    prompt_of = [r // cfg.group_size for r in rows]
    features = [visual[k] for k in prompt_of] if visual is not None else None
    with stage1.autocast(cfg.device, stage1.compute_dtype(cfg.device, cfg.dtype)):  # bf16 matmuls on CUDA
        return stage1.completion_logprobs(model, prompt_rows(prompt, prompt_of), ids[rows], mask[rows],
                                          cfg.temperature, cfg.logprob_chunk, features)  # (b, L)


def reference_logprobs(cfg: Config, model, reference, prompt: dict, ids, mask, rows: list[int], visual):
    """The frozen reference's log-probs: the same model with its LoRA adapters switched off, or a second copy."""
    with torch.no_grad():
        if reference is None:  # LoRA: the base weights are the initial policy
            with model.disable_adapter():
                return batch_logprobs(cfg, model, prompt, ids, mask, rows, visual)
        return batch_logprobs(cfg, reference, prompt, ids, mask, rows, visual if vision_is_frozen(model) else None)


def update(cfg: Config, model, reference, optimizer, scheduler, prompt: dict, ids, mask, old_logprobs,
           advantages) -> dict:
    """updates_per_batch optimiser steps over the batch, each accumulated over micro-batches."""
    N, n_tokens = ids.shape[0], int(mask.sum())
    micro_batches = [list(range(s, min(N, s + cfg.micro_batch_size))) for s in range(0, N, cfg.micro_batch_size)]
    totals = {"loss": 0.0, "kl": 0.0, "clipped": 0.0}
    visual = None
    if vision_is_frozen(model):  # each prompt's image through the vision tower once, not once per row
        with torch.no_grad(), stage1.autocast(cfg.device, stage1.compute_dtype(cfg.device, cfg.dtype)):
            visual = stage1.image_features(model, prompt)  # B tensors (n_b, H)
    if pi_old_recomputed(cfg):  # the update's own forward, so that ratio = 1 on the first update
        with torch.no_grad():
            old_logprobs = torch.cat([batch_logprobs(cfg, model, prompt, ids, mask, rows, visual)
                                      for rows in micro_batches]).float()  # (N, L)
    model.train()
    for _ in range(cfg.updates_per_batch):
        optimizer.zero_grad(set_to_none=True)
        for rows in micro_batches:
            new = batch_logprobs(cfg, model, prompt, ids, mask, rows, visual)  # (b, L)
            ref = None
            if cfg.kl_beta > 0:
                ref = reference_logprobs(cfg, model, reference, prompt, ids, mask, rows, visual)
            loss, stats = policy_loss(new, old_logprobs[rows], advantages[rows], mask[rows], cfg.clip_low,
                                      cfg.clip_high, cfg.kl_beta, ref, n_tokens)
            loss.backward()
            totals["loss"] += loss.item()
            totals["kl"] += stats["kl"] / n_tokens
            totals["clipped"] += stats["clipped"] / n_tokens
        torch.nn.utils.clip_grad_norm_(trainable_parameters(model), cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)  # free the gradients now: the next rollout needs the memory
    model.eval()
    return {k: v / cfg.updates_per_batch for k, v in totals.items()}


def pi_old_recomputed(cfg: Config) -> bool:
    """--pi-old auto: recompute when the compute is not fp32 (then sampler and update round differently)."""
    if cfg.pi_old not in ("auto", "sampler", "recompute"):
        raise SystemExit(f"--pi-old {cfg.pi_old}: use auto, sampler or recompute.")
    fp32 = stage1.compute_dtype(cfg.device, cfg.dtype) == torch.float32
    return cfg.pi_old == "recompute" or (cfg.pi_old == "auto" and not fp32)


def add_lora(cfg: Config, model):
    """Wrap the policy with peft LoRA adapters on the language model's linears; everything else is frozen.
    The targets are matched inside `language_model` only: Qwen2.5-VL's vision MLP also has a gate_proj."""
    from peft import LoraConfig, get_peft_model  # imported only when LoRA is used

    names = "|".join(t.strip() for t in cfg.lora_targets.split(",") if t.strip())
    lora = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                      target_modules=rf".*language_model.*\.(?:{names})")
    return get_peft_model(model, lora)


# ----------------------------------------------------------------------------- checkpoints
def save_checkpoint(out_dir: Path, model, processor, optimizer, scheduler, step: int, rng_states: dict) -> None:
    """Write checkpoint.tmp/, then swap it in: a kill at any moment leaves one complete checkpoint."""
    tmp, final, old = out_dir / "checkpoint.tmp", out_dir / "checkpoint", out_dir / "checkpoint.old"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    torch.save({"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                **rng_states}, tmp / "trainer_state.pt")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(out_dir: Path) -> Path | None:
    for folder in (out_dir / "checkpoint", out_dir / "checkpoint.old"):  # .old: killed mid-swap
        if (folder / "trainer_state.pt").exists():
            return folder
    return None


def step_metrics(scores: list[dict], crm_probs: list[float], lengths, truncated, advantages, group_size: int,
                 old_logprobs, mask) -> dict:
    """The rollout-side numbers logged every step (see the README for what each one means)."""
    n = len(scores)
    mean = lambda key: sum(s[key] for s in scores) / n  # noqa: E731
    zero_groups = (advantages.view(-1, group_size) == 0).all(dim=1).float().mean().item()
    return {"reward_format": mean("format"), "reward_accuracy": mean("accuracy"), "reward_task": mean("task"),
            "reward_consistency": mean("consistency"),
            "accuracy": mean("accuracy"), "format_rate": sum(s["format"] > 0 for s in scores) / n,
            "crm_consistency": sum(crm_probs) / n,
            "oracle_inconsistency_rate": (sum(not s["oracle_consistent"] for s in scores) / n
                                          if scores[0]["oracle_consistent"] is not None else None),
            "entropy": float(-(old_logprobs * mask).sum() / mask.sum()),  # sample estimate of the token entropy
            "completion_length": float(lengths.float().mean()), "truncation_rate": float(truncated.float().mean()),
            "zero_variance_groups": zero_groups}


# ----------------------------------------------------------------------------- main
def main(cfg: Config) -> dict:
    from datasets import load_from_disk

    run_dir = Path(cfg.runs_dir) / cfg.run
    stage1_config = stage1.read_stage1(run_dir)["config"]
    embedded = stage1_config["dataset"] is None
    columns = stage2.data_columns(stage1_config)
    train = load_from_disk(str(stage1.require(run_dir / "data", "python 01_sft_rm.py")))[stage1_config["train_split"]]
    out_dir = run_dir / (cfg.name or f"{cfg.advantage}_seed{cfg.seed}")
    out_dir.mkdir(parents=True, exist_ok=True)
    init = cfg.init or str(stage1.require(run_dir / "policy_sft", "python 01_sft_rm.py"))

    # models: the policy, an optional frozen reference, the frozen CRM. Frozen weights are stored in the compute
    # dtype (bf16 on CUDA); trained weights in fp32 (master weights, bf16 matmuls under autocast): 01_sft_rm.compute_dtype
    dtype = stage1.compute_dtype(cfg.device, cfg.dtype)
    checkpoint = latest_checkpoint(out_dir) if cfg.resume else None
    if cfg.lora_rank > 0:  # a frozen base in the compute dtype + fp32 adapters (peft's default for a bf16 base)
        if checkpoint:
            model, processor = stage1.load_policy(str(checkpoint), cfg.device, dtype=dtype, trainable=True)
        else:
            model, processor = stage1.load_policy(init, cfg.device, dtype=dtype)
            torch.manual_seed(cfg.seed)  # LoRA's A matrices start random (B at zero): the same seed, the same start
            model = add_lora(cfg, model)
    else:
        model, processor = stage1.load_policy(str(checkpoint or init), cfg.device, dtype=torch.float32)
    if cfg.freeze_vision_tower:  # frozen, so stored in the compute dtype like every frozen weight
        stage1.unwrap(model).model.visual.requires_grad_(False).to(dtype)
    if cfg.gradient_checkpointing:  # non-reentrant: works when the input embeddings need no gradient (LoRA)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.eval()
    reference = None  # LoRA: the reference is the policy with its adapters off (reference_logprobs)
    if cfg.kl_beta > 0 and cfg.lora_rank == 0:
        reference = stage1.load_policy(init, cfg.device, dtype=dtype)[0].eval().requires_grad_(False)
    crm_path = cfg.crm or str(stage1.require(run_dir / "crm", "python 01_sft_rm.py"))
    crm, crm_tokenizer = stage1.load_crm(crm_path, cfg.device, dtype=dtype)
    crm.eval().requires_grad_(False)
    reward_cfg = stage3.Config(lambda_cons=cfg.lambda_cons, format_weight=cfg.format_weight, device=cfg.device)
    stop_ids, forbidden = stage1.stop_token_ids(processor), stage2.forbidden_token_ids(processor)

    optimizer = torch.optim.AdamW(trainable_parameters(model), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  fused=cfg.device.startswith("cuda"))  # one kernel, no per-tensor temporaries
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 5))  # 5-step warm-up
    prompt_rng = random.Random(cfg.seed)
    torch.manual_seed(cfg.seed)
    generator = torch.Generator(device=cfg.device).manual_seed(cfg.seed)
    start_step = 0
    if checkpoint:
        state = torch.load(checkpoint / "trainer_state.pt", weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        prompt_rng.setstate(state["prompt_rng"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        start_step = state["step"]
        print(f"resumed from {checkpoint} at step {start_step}")
    metrics_path, samples_path = out_dir / "metrics.jsonl", out_dir / "samples.jsonl"
    for path in (metrics_path, samples_path):  # a resumed run redoes (and relogs) the steps after its checkpoint
        kept = [r for r in stage1.read_jsonl(path) if r["step"] <= start_step] if path.exists() else []
        stage1.write_jsonl_atomic(path, kept)
    stage1.write_json_atomic(out_dir / "config.json", dataclasses.asdict(cfg))

    started, steps_this_run = time.time(), 0
    for step in (bar := tqdm(range(start_step, cfg.steps), desc=f"{cfg.advantage} seed {cfg.seed}", initial=start_step,
                             total=cfg.steps)):
        # 1-2. prompts and rollouts
        rows = prompt_rng.sample(range(len(train)), cfg.prompts_per_step)
        images = [stage1.row_image(train, i, columns["image"]) for i in rows]
        questions = [train[i][columns["question"]] for i in rows]
        prompt = stage1.to_device(stage1.encode_prompts(processor, images, questions), cfg.device)
        with stage1.autocast(cfg.device, dtype):
            ids, mask, old_logprobs, truncated = stage2.sampler(cfg.fast, cfg.device)(  # LoRA layers sit inside unwrap()
                stage1.unwrap(model), prompt, cfg.group_size, cfg.max_new_tokens, stop_ids, forbidden,
                processor.tokenizer.pad_token_id, cfg.temperature, cfg.top_k, cfg.top_p, generator)
        texts = processor.batch_decode(ids, skip_special_tokens=True)  # padding and stop tokens are special: skipped
        # 3. rewards
        group_questions = [q for q in questions for _ in range(cfg.group_size)]
        truths = [str(train[i][columns["answer"]]) for i in rows for _ in range(cfg.group_size)]
        scores = stage3.score_completions(texts, group_questions, truths, crm, crm_tokenizer, reward_cfg, embedded)
        task = torch.tensor([s["task"] for s in scores], device=cfg.device)  # (N,)
        consistency = torch.tensor([s["consistency"] for s in scores], device=cfg.device)  # (N,)
        # 4. advantages
        beta_t = stage4.consistency_weight(step, cfg.steps, cfg.beta, cfg.beta_schedule, cfg.beta_warmup_steps)
        advantages = stage4.advantages(cfg.advantage, task, consistency, cfg.group_size, cfg.alpha, beta_t, cfg.eps,
                                       cfg.cons_eps)
        # 5. update
        lr = scheduler.get_last_lr()[0]  # the rate this step's update uses (the scheduler steps after it)
        losses = update(cfg, model, reference, optimizer, scheduler, prompt, ids, mask, old_logprobs, advantages)

        crm_probs = [s["consistency"] / cfg.lambda_cons if cfg.lambda_cons else 0.0 for s in scores]
        row = {"step": step + 1, **step_metrics(scores, crm_probs, mask.sum(1), truncated, advantages,
                                                 cfg.group_size, old_logprobs, mask),
               **losses, "beta_t": beta_t, "lr": lr, "seconds": round(time.time() - started, 2)}
        with open(metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        bar.set_postfix(acc=f"{row['accuracy']:.2f}", cons=f"{row['crm_consistency']:.2f}", kl=f"{row['kl']:.3f}")
        if (step + 1) % cfg.sample_every == 0:
            with open(samples_path, "a") as f:
                for i in range(0, len(texts), cfg.group_size * 2):
                    f.write(json.dumps({"step": step + 1, "question": group_questions[i], "answer": truths[i],
                                        "completion": texts[i], **scores[i]}) + "\n")
        steps_this_run += 1
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            save_checkpoint(out_dir, model, processor, optimizer, scheduler, step + 1,
                            {"prompt_rng": prompt_rng.getstate(), "generator": generator.get_state(),
                             "torch_rng": torch.get_rng_state()})
        if cfg.stop_after and steps_this_run >= cfg.stop_after:
            print(f"stopping after {steps_this_run} steps (--stop-after)")
            return {}

    stage1.save_folder_atomic(out_dir / "policy", model, processor)
    history = stage1.read_jsonl(metrics_path)
    last = history[-10:]
    summary = {k: sum(r[k] for r in last) / len(last) for k in ("accuracy", "crm_consistency", "reward_task", "kl")}
    if embedded:
        summary["oracle_inconsistency_rate"] = sum(r["oracle_inconsistency_rate"] for r in last) / len(last)
    summary["first_10_steps_accuracy"] = sum(r["accuracy"] for r in history[:10]) / len(history[:10])
    stage1.write_json_atomic(out_dir / "summary.json", summary)
    print(f"\n{cfg.advantage}: rollout accuracy {summary['first_10_steps_accuracy']:.3f} (first 10 steps) -> "
          f"{summary['accuracy']:.3f} (last 10); CRM consistency {summary['crm_consistency']:.3f}"
          + (f"; oracle IR {summary['oracle_inconsistency_rate']:.3f}" if embedded else ""))
    print(f"wrote {out_dir}/{{metrics.jsonl,samples.jsonl,policy}}")
    return summary


if __name__ == "__main__":
    main(stage1.parse_config(Config, __doc__.split("\n")[0]))
