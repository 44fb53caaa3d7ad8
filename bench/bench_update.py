"""Update speed: stage 5's forward + backward with each prompt run once per group, against once per row.

GRPO samples G completions per prompt, so a micro-batch of N = B * G rows holds B distinct prompts. The
update can run every row's prompt (stage1.completion_logprobs on repeated prompts: stage5.SHARE_PROMPTS False)
or each prompt once and the G completions on copies of its keys and values
(05_grpo_train.shared_prompt_logprobs, the default). Both give the same log-probs and gradients
(tests/test_shared_prompt.py); this times them on the same batch: B prompts x G completions of a fixed
length (every token real, so the work is equal), one forward and one backward of the token-mean of the
log-probs, best of --repeats after a warm-up. The model is built from a config with random weights (speed
does not depend on the values): `--shape tiny` is the embedded policy (the CPU default: one 84x84 image and
the chat template, ~60 prompt tokens); `--shape 2b` is Qwen2-VL-2B-shaped (the GPU default, bf16 autocast;
one 448x448 image = 256 visual tokens).
The last line is the headline: `B 8 x G 8: shared prompts 2.31x repeated (CPU)`.

Run:  python bench/bench_update.py                              # CPU: tiny shape
      python bench/bench_update.py --shape 2b --new-tokens 512  # on a GPU
"""
import argparse
import importlib
import sys
from pathlib import Path

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the stages import each other by file name
sys.path.insert(0, str(ROOT / "bench"))
stage1, stage5 = map(importlib.import_module, ["01_sft_rm", "05_grpo_train"])
bench_rollout = importlib.import_module("bench_rollout")


def batch(processor, prompts: int, group_size: int, new_tokens: int, side: int, device: str):
    """B noise images with counting questions, and B * G random completions of new_tokens real tokens each."""
    images = [Image.effect_noise((side, side), 30 + 10 * i).convert("RGB") for i in range(prompts)]
    questions = [f"How many red shapes are there in picture {i}?" for i in range(prompts)]
    prompt = stage1.to_device(stage1.encode_prompts(processor, images, questions), device)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(10, len(processor.tokenizer) - 10, (prompts * group_size, new_tokens),
                        generator=generator)
    return prompt, ids.to(device), torch.ones_like(ids, device=device)


def forward_backward(cfg, model, prompt, ids, mask) -> None:
    logprobs = stage5.batch_logprobs(cfg, model, prompt, ids, mask, list(range(ids.shape[0])), None)  # (N, L)
    (-(logprobs * mask).sum() / mask.sum()).backward()
    model.zero_grad(set_to_none=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="2b" if torch.cuda.is_available() else "tiny", help="tiny | 2b")
    parser.add_argument("--prompts", type=int, default=8, help="B: distinct prompts in the micro-batch")
    parser.add_argument("--group-size", type=int, default=8, help="G: completions per prompt")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens per completion")
    parser.add_argument("--repeats", type=int, default=5,
                        help="timed repeats (best is kept) after one warm-up")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, processor = bench_rollout.build(args.shape, ROOT / "runs" / "bench" / args.shape, device,
                                           torch.float32)
    model.train()
    side = 448 if args.shape == "2b" else 84
    prompt, ids, mask = batch(processor, args.prompts, args.group_size, args.new_tokens, side, device)
    P = prompt["input_ids"].shape[1]
    rows = []
    for repeat_prompts in (True, False):
        stage5.SHARE_PROMPTS = not repeat_prompts
        cfg = stage5.Config(group_size=args.group_size, micro_batch_size=ids.shape[0], device=device)
        forward_backward(cfg, model, prompt, ids, mask)  # warm-up
        seconds = min(bench_rollout.timed(lambda: forward_backward(cfg, model, prompt, ids, mask), device)
                      for _ in range(args.repeats))
        rows.append(("repeated" if repeat_prompts else "shared", seconds))
    where = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"\n{args.shape} shape, {where}: B {args.prompts} x G {args.group_size}, prompt {P} tokens, "
          f"completion {args.new_tokens} tokens (prompt share of a row {P / (P + args.new_tokens):.0%}), "
          f"forward + backward, best of {args.repeats}")
    print("| prompts | seconds | tokens/s (rows x (prompt + completion)) |")
    print("|---|---|---|")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.3f} | {ids.shape[0] * (P + args.new_tokens) / seconds:,.0f} |")
    ratio = rows[0][1] / rows[1][1]
    print(f"B {args.prompts} x G {args.group_size}: shared prompts {ratio:.2f}x repeated "
          f"({'GPU' if device == 'cuda' else 'CPU'})")


if __name__ == "__main__":
    main()
