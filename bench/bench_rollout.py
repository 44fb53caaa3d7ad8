"""Rollout speed: stage 2's hand-written sampler against transformers' `generate`, in one run.

Both decode a fixed number of tokens (no early stop, so the work is equal) by sampling at T = 1,
as GRPO does, from the same prompts, on the same model. Two settings per batch size:
  distinct   B different prompts, one completion each (ours vs generate)
  group      B / G prompts x G completions, as GRPO samples them: ours prefills each prompt once
             and copies its KV cache to the group; generate(num_return_sequences=G) repeats the
             prompt (and the image) G times before its prefill.
The model is built from a config with random weights (speed does not depend on the values):
`--shape tiny` is the embedded 1.3M-parameter policy (the CPU default); `--shape 2b` is
Qwen2-VL-2B-shaped (the GPU default; one 448x448 image = 256 visual tokens per prompt).

Run:  python bench/bench_rollout.py                       # CPU: tiny shape, batch 8, 32, 64
      python bench/bench_rollout.py --shape 2b --new-tokens 256   # on a GPU
"""
import argparse
import importlib
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the stages import each other by file name with importlib.import_module
stage1, stage2 = map(importlib.import_module, ["01_sft_rm", "02_rollout"])


def build(shape: str, folder: Path, device: str, dtype):
    """The tiny embedded policy, or a Qwen2-VL-2B-shaped one with the tiny tokenizer (random weights)."""
    bpe = stage1.train_bpe(0)
    stage1.build_tiny_policy(folder, 0, bpe)
    model, processor = stage1.load_policy(str(folder), "cpu")
    if shape == "2b":
        from transformers import Qwen2VLForConditionalGeneration

        config = model.config
        config.text_config.update(dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                       num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768))
        config.text_config.rope_parameters["mrope_section"] = [16, 24, 24]
        config.vision_config.update(dict(depth=32, embed_dim=1280, hidden_size=1536, num_heads=16, mlp_ratio=4))
        processor.image_processor.size = {"shortest_edge": 56 * 56, "longest_edge": 448 * 448}
        with torch.device(device):
            model = Qwen2VLForConditionalGeneration(config).to(dtype)
    return model.to(device).eval(), processor


def timed(fn, device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="2b" if torch.cuda.is_available() else "tiny", help="tiny | 2b")
    parser.add_argument("--batches", default="8,32,64", help="batch sizes (completions per call)")
    parser.add_argument("--group-size", type=int, default=8, help="G for the group setting")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens decoded per completion")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats (best is kept) after one warm-up")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model, processor = build(args.shape, Path("runs/bench") / args.shape, device, dtype)
    side = 448 if args.shape == "2b" else 84
    pad = processor.tokenizer.pad_token_id
    n = args.new_tokens

    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        for setting in ("distinct", "group"):
            G = args.group_size if setting == "group" else 1
            prompts = batch // G
            images = [Image.effect_noise((side, side), 40 + i).convert("RGB") for i in range(prompts)]
            questions = [f"How many red shapes are there? ({i})" for i in range(prompts)]
            prompt = stage1.to_device(stage1.encode_prompts(processor, images, questions), device)
            with torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else nullcontext():
                ours = lambda: stage2.sample_completions(model, prompt, G, n, [], [], pad, temperature=1.0)  # noqa: E731
                theirs = lambda: model.generate(**prompt, max_new_tokens=n, min_new_tokens=n, do_sample=True,  # noqa: E731
                                                temperature=1.0, top_k=0, top_p=1.0, num_return_sequences=G,
                                                pad_token_id=pad)
                results = {}
                for name, fn in (("ours", ours), ("generate", theirs)):
                    fn()  # warm-up
                    results[name] = min(timed(fn, device) for _ in range(args.repeats))
            tokens = batch * n
            rows.append((batch, setting, tokens / results["ours"], tokens / results["generate"],
                         1000 * results["ours"] / n, 1000 * results["generate"] / n))

    print(f"\n{args.shape} shape on {torch.cuda.get_device_name() if device == 'cuda' else 'CPU'} "
          f"({torch.get_num_threads()} threads), {n} new tokens, sampled at T=1, fixed length, best of {args.repeats}")
    print("| batch | setting | ours tok/s | generate tok/s | ours / generate | ours ms/step | generate ms/step |")
    print("|---|---|---|---|---|---|---|")
    for batch, setting, ours, theirs, ms_ours, ms_theirs in rows:
        print(f"| {batch} | {setting} | {ours:,.0f} | {theirs:,.0f} | {ours / theirs:.2f}x | {ms_ours:.1f} | {ms_theirs:.1f} |")


if __name__ == "__main__":
    main()
