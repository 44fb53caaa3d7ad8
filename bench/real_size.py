"""Two GRPO steps at real model sizes on one GPU: the memory plan's recommended settings, measured.

For Qwen2.5-VL-3B and -7B shapes (random weights: memory and speed do not depend on the values), with the
flags bench/memory_plan.py recommends for one 80 GB GPU, this runs stage 5's own functions for two steps
(8 prompts x G = 8, one 448x448 image each, 1,024 sampled tokens, a ModernBERT-large-shaped CRM) and prints:
  - the peak GPU memory (torch.cuda.max_memory_allocated) next to the plan's total;
  - seconds per step for the rollout and for the update;
  - the bf16 gap between the sampler's log-probs and the update's forward on the same tokens (what --pi-old
    auto recomputes away): mean |difference|, its 99th percentile, and the share of tokens whose ratio
    exp(update - sampler) falls outside the clip range [0.8, 1.2].

Run:  python bench/real_size.py                          # on a GPU (part of bench/gpu.sh)
      python bench/real_size.py --settings check-full    # a CPU smoke test of this script (small shape)
"""
import argparse
import gc
import importlib
import sys
import time
from pathlib import Path

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))  # the stages import each other by file name
sys.path.insert(0, str(ROOT))
stage1, stage2, stage3, stage4, stage5 = map(
    importlib.import_module, ["01_sft_rm", "02_rollout", "03_rewards", "04_hras", "05_grpo_train"])
memory_plan = importlib.import_module("memory_plan")

GB = 1e9


# The plan's recommendations for one 80 GB GPU (python bench/memory_plan.py), and LoRA on 3B for comparison;
# "check-*" is a small shape with the real vocabulary, to try this script on a CPU.
SETTINGS = {
    "3b-full": dict(shape="3b", lora_rank=0, micro_batch=16, chunk=64, kl_beta=0.0),
    "3b-lora": dict(shape="3b", lora_rank=64, micro_batch=16, chunk=256, kl_beta=0.04),
    "7b-lora": dict(shape="7b", lora_rank=64, micro_batch=16, chunk=256, kl_beta=0.04),
    "check-full": dict(shape="check", lora_rank=0, micro_batch=4, chunk=256, kl_beta=0.04),
    "check-lora": dict(shape="check", lora_rank=8, micro_batch=4, chunk=256, kl_beta=0.04),
}


def settings(names: list[str], new_tokens: int) -> list[dict]:
    """Each named setting with the plan's peak for it (bytes)."""
    out = []
    for name in names:
        s = SETTINGS[name]
        total = memory_plan.plan(s["shape"], s["lora_rank"], s["micro_batch"], chunk=s["chunk"],
                                 reference=s["kl_beta"] > 0, completion_len=new_tokens)["total"]
        out.append({"name": name, **s, "plan": total})
    return out


def prompts(processor, n: int, device: str, side: int = 448) -> dict:
    images = [Image.effect_noise((side, side), 30 + 10 * i).convert("RGB") for i in range(n)]
    questions = [f"How many red shapes are there in picture {i}? Count them one by one." for i in range(n)]
    return stage1.to_device(stage1.encode_prompts(processor, images, questions), device)


def bf16_gap(cfg, model, prompt, ids, mask, sampler_logprobs) -> dict:
    """How far the update's forward is from the sampler's recorded log-probs on the same tokens."""
    with torch.no_grad():
        rows = list(range(ids.shape[0]))
        forward = torch.cat([
            stage5.batch_logprobs(cfg, model, prompt, ids, mask, rows[s:s + cfg.micro_batch_size], None)
            for s in range(0, len(rows), cfg.micro_batch_size)])
    diff = (forward.float() - sampler_logprobs)[mask.bool()]  # (tokens,)
    ratio = diff.exp()
    return {"mean_abs": diff.abs().mean().item(), "p99_abs": diff.abs().quantile(0.99).item(),
            "outside_clip": ((ratio < 0.8) | (ratio > 1.2)).float().mean().item()}


def run(setting: dict, device: str, steps: int, new_tokens: int, dtype_flag: str = "auto") -> dict:
    torch.cuda.empty_cache() if device == "cuda" else None
    torch.cuda.reset_peak_memory_stats() if device == "cuda" else None
    cfg = stage5.Config(group_size=8, prompts_per_step=8, max_new_tokens=new_tokens, device=device,
                        micro_batch_size=setting["micro_batch"], logprob_chunk=setting["chunk"],
                        gradient_checkpointing=True, freeze_vision_tower=True,
                        lora_rank=setting["lora_rank"], lora_alpha=2.0 * setting["lora_rank"],
                        kl_beta=setting["kl_beta"], lr=1e-6, pi_old="recompute", dtype=dtype_flag)
    dtype = stage1.compute_dtype(device, cfg.dtype)
    started = time.time()
    lora = setting["lora_rank"] > 0
    model, processor = memory_plan.random_model(setting["shape"], device, dtype if lora else torch.float32)
    model = stage5.add_lora(cfg, model) if lora else model
    # as stage 5 does with --freeze-vision-tower
    stage1.unwrap(model).model.visual.requires_grad_(False).to(dtype)
    stage5.enable_checkpointing(model)
    reference = None
    if cfg.kl_beta > 0 and not lora:
        reference = stage5.LogProbs(  # the frozen copy's update forward
            memory_plan.random_model(setting["shape"], device, dtype)[0].requires_grad_(False))
    crm, crm_tokenizer = memory_plan.random_model("crm", device, dtype)
    optimizer = torch.optim.AdamW(stage5.trainable_parameters(model), lr=cfg.lr, fused=device == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    built = time.time() - started
    stop_ids, forbidden = stage1.stop_token_ids(processor), stage2.forbidden_token_ids(processor)
    result = {"setting": setting["name"], "build_s": built, "rollout_s": [], "update_s": [], "tokens": []}
    generator = torch.Generator(device=device).manual_seed(0)
    for step in range(steps):
        prompt = prompts(processor, cfg.prompts_per_step, device)
        model.eval()
        sync(device)
        t0 = time.time()
        with stage1.autocast(device, dtype):
            ids, mask, old_logprobs, _ = stage2.sampler(cfg.fast, device)(
                stage1.unwrap(model), prompt, cfg.group_size, cfg.max_new_tokens, stop_ids, forbidden,
                processor.tokenizer.pad_token_id, cfg.temperature, generator=generator)
        sync(device)
        result["rollout_s"].append(time.time() - t0)
        result["tokens"].append(int(mask.sum()))
        texts = processor.batch_decode(ids, skip_special_tokens=True)
        questions = ["How many?"] * len(texts)
        consistency = stage3.consistency_rewards(crm, crm_tokenizer, questions, texts, 1.0, device)
        task = torch.rand(len(texts), device=device).round()  # random 0/1 accuracies: any advantages will do
        advantages = stage4.advantages("hras", task, torch.tensor(consistency, device=device) + torch.rand(
            len(texts), device=device), cfg.group_size, 1.0, 1.0)
        if step == 0:
            result["bf16_gap"] = bf16_gap(cfg, model, prompt, ids, mask, old_logprobs)
        t0 = time.time()
        stage5.update(cfg, model, reference, optimizer, scheduler, prompt, ids, mask, old_logprobs,
                      advantages)
        sync(device)
        result["update_s"].append(time.time() - t0)
    result["peak"] = torch.cuda.max_memory_allocated() if device == "cuda" else float("nan")
    result["plan"] = setting["plan"]
    del model, reference, crm, optimizer
    gc.collect()
    return result


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--settings", default="3b-lora,7b-lora,3b-full",
                        help="comma-separated <shape>-<full|lora>, shapes 3b, 7b (check: a small CPU shape)")
    parser.add_argument("--steps", type=int, default=2, help="GRPO steps per setting")
    parser.add_argument("--new-tokens", type=int, default=1024, help="sampled tokens per completion")
    parser.add_argument("--dtype", default="auto",
                        help="compute precision (auto = bf16 on CUDA, fp32 on CPU)")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    for setting in settings(args.settings.split(","), args.new_tokens):
        print(f"\n{setting['name']}: micro-batch {setting['micro_batch']}, "
              f"--logprob-chunk {setting['chunk']}, LoRA rank {setting['lora_rank']}, "
              f"kl_beta {setting['kl_beta']}, plan {setting['plan'] / GB:.1f} GB",
              flush=True)
        try:
            rows.append(run(setting, device, args.steps, args.new_tokens, args.dtype))
            print(rows[-1], flush=True)
        except torch.OutOfMemoryError as error:  # a measured answer too: the setting does not fit this card
            print(f"{setting['name']}: out of memory ({str(error).splitlines()[0]})")
            gc.collect()
            torch.cuda.empty_cache()
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"\n{name}, {args.dtype} compute, {args.steps} steps of 8 prompts x G = 8, "
          f"{args.new_tokens} new tokens, 448x448 images")
    print("| setting | plan GB | measured peak GB | rollout s/step | update s/step | tokens/step | "
          "bf16 gap mean / p99 | outside clip |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        gap = r["bf16_gap"]
        print(f"| {r['setting']} | {r['plan'] / GB:.1f} | {r['peak'] / GB:.1f} | "
              f"{r['rollout_s'][-1]:.1f} | {r['update_s'][-1]:.1f} | {r['tokens'][-1]:,} | "
              f"{gap['mean_abs']:.4f} / {gap['p99_abs']:.4f} | {gap['outside_clip']:.2%} |")


if __name__ == "__main__":
    main()
