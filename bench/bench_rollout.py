"""Rollout speed: stage 2's two samplers against transformers' `generate`, in one run.

Every column decodes a fixed number of tokens (no early stop, so the work is equal) by sampling at T = 1,
as GRPO does, from the same prompts, on the same model:
  ours-simple      sample_completions: the readable loop (dynamic KV cache, one launch per op)
  ours-fast        sample_completions_fast: preallocated KV cache and mask, the decode step compiled
                   (CUDA graphs on a GPU; see --fast-compile), grouped-query decode attention
  fast-repeat      the same with transformers' sdpa in the step, which under torch.compile repeats the
                   key/value heads to every query head (--repeat-batches picks the batches that run it)
  generate         model.generate, dynamic cache
  generate-static  model.generate(cache_implementation="static"), which compiles its forward on a GPU
                   (each new shape compiles again: --static-batches picks the batches that run it)
Two settings per batch size:
  distinct   B different prompts, one completion each
  group      B / G prompts x G completions, as GRPO samples them: ours prefills each prompt once
             and copies its KV cache to the group; generate(num_return_sequences=G) repeats the
             prompt (and the image) G times before its prefill.
On a GPU the table adds each sampler's share of the HBM roofline: tokens/s if every decode step only had to
read the weights and the KV cache once at the device-to-device copy bandwidth measured in the same run.
The model is built from a config with random weights (speed does not depend on the values):
`--shape tiny` is the embedded 1.3M-parameter policy (the CPU default); `--shape 2b` is
Qwen2-VL-2B-shaped (the GPU default, bf16; one 448x448 image = 256 visual tokens per prompt).
The last line is the headline: `batch 64 group: fast 2.31x generate (CPU)`.

Run:  python bench/bench_rollout.py                                  # CPU: tiny shape, batch 8, 32, 64
      python bench/bench_rollout.py --shape 2b --new-tokens 256      # on a GPU
"""
import argparse
import importlib
import sys
import time
from pathlib import Path

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the stages import each other by file name with importlib.import_module
stage1, stage2 = map(importlib.import_module, ["01_sft_rm", "02_rollout"])
COLUMNS = ["simple", "fast", "repeat", "generate", "static"]


def build(shape: str, folder: Path, device: str, dtype):
    """The tiny embedded policy, or a Qwen2-VL-2B-shaped one with the tiny tokenizer (random weights)."""
    bpe = stage1.train_bpe(0)
    stage1.build_tiny_policy(folder, 0, bpe)
    model, processor = stage1.load_policy(str(folder), "cpu")
    if shape == "2b":
        from transformers import Qwen2VLForConditionalGeneration

        config = model.config
        config.text_config.update(dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                                       num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                                       max_position_embeddings=32768, layer_types=["full_attention"] * 28))
        config.text_config.rope_parameters["mrope_section"] = [16, 24, 24]
        config.vision_config.update(dict(depth=32, embed_dim=1280, hidden_size=1536, num_heads=16,
                                         mlp_ratio=4))
        processor.image_processor.size = {"shortest_edge": 56 * 56, "longest_edge": 448 * 448}
        with torch.device(device):
            model = Qwen2VLForConditionalGeneration(config)
    return model.to(device=device, dtype=dtype).eval(), processor


def timed(fn, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def repeated_heads(fn):
    """fn run with the fast step's attention left to transformers' sdpa (stage2.GROUPED_DECODE off), which
    under torch.compile repeats the key/value heads: the fast-repeat column."""
    stage2.GROUPED_DECODE = False
    try:
        return fn()
    finally:
        stage2.GROUPED_DECODE = True


def copy_bandwidth(device: str, gib: float = 1.0) -> float:
    """Bytes/s of a device-to-device copy (each byte read once and written once): the HBM rate decode can
    use."""
    src = torch.empty(int(gib * 2**30), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    seconds = min(timed(lambda: dst.copy_(src), device) for _ in range(10))
    return 2 * src.numel() / seconds


def bytes_per_step(model, rows: int, context: float) -> float:
    """What one decode step must read: the decoder layers' and final norm's weights, the output matrix (the
    embedding lookup reads only N rows), and the KV cache over `context` positions of each of the N rows."""
    text = model.model.language_model
    weights = [*text.layers.parameters(), *text.norm.parameters(), model.lm_head.weight]
    config = model.config.text_config
    head_dim = config.hidden_size // config.num_attention_heads
    # keys + values
    kv = 2 * config.num_hidden_layers * rows * config.num_key_value_heads * head_dim * context
    return sum(p.numel() * p.element_size() for p in weights) + kv * model.lm_head.weight.element_size()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="2b" if torch.cuda.is_available() else "tiny", help="tiny | 2b")
    parser.add_argument("--batches", default="8,32,64", help="batch sizes (completions per call)")
    parser.add_argument("--settings", default="distinct,group", help="distinct and/or group")
    parser.add_argument("--group-size", type=int, default=8, help="G for the group setting")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens decoded per completion")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed repeats (best is kept) after one warm-up")
    parser.add_argument("--quick", action="store_true", help="one timed run after the warm-up (--repeats 1)")
    parser.add_argument("--static-batches", default="all",
                        help="batches that also time generate(cache_implementation='static'): "
                             "all, none or 8,64")
    parser.add_argument("--repeat-batches", default="all",
                        help="batches that also time ours-fast with transformers' sdpa (heads repeated): "
                             "all, none or 64")
    parser.add_argument("--columns", default=",".join(COLUMNS),
                        help=f"samplers to time, of {','.join(COLUMNS)} (generate is the ratios' peer)")
    parser.add_argument("--fast-compile", default="auto",
                        help="ours-fast's torch.compile mode: auto (reduce-overhead on CUDA, none on CPU), "
                             "none, default, reduce-overhead, max-autotune-no-cudagraphs")
    parser.add_argument("--profile", action="store_true",
                        help="print a torch.profiler table of one ours-fast call "
                             "(largest batch, last setting)")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # the one difference besides the compile mode
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    batches = [int(b) for b in args.batches.split(",")]
    named = {"all": batches, "none": []}
    static_batches, repeat_batches = (
        named[chosen] if chosen in named else [int(b) for b in chosen.split(",")]
        for chosen in (args.static_batches, args.repeat_batches))
    columns = args.columns.split(",")
    if "generate" not in columns or "fast" not in columns or not set(columns) <= set(COLUMNS):
        parser.error(f"--columns {args.columns}: name some of {','.join(COLUMNS)}, "
                     f"generate and fast included")
    compile_mode = None if args.fast_compile == "none" else args.fast_compile
    repeats = 1 if args.quick else args.repeats
    model, processor = build(args.shape, ROOT / "runs" / "bench" / args.shape, device, dtype)
    side = 448 if args.shape == "2b" else 84
    pad = processor.tokenizer.pad_token_id
    n = args.new_tokens
    bandwidth = copy_bandwidth(device) if device == "cuda" else None
    started = time.perf_counter()

    rows, setups, profile_call = [], {}, None
    for batch in batches:
        for setting in args.settings.split(","):
            G = args.group_size if setting == "group" else 1
            prompts = batch // G
            images = [Image.effect_noise((side, side), 40 + i).convert("RGB") for i in range(prompts)]
            questions = [f"How many red shapes are there? ({i})" for i in range(prompts)]
            prompt = stage1.to_device(stage1.encode_prompts(processor, images, questions), device)
            sample = dict(temperature=1.0, generator=torch.Generator(device).manual_seed(0))
            generate = dict(max_new_tokens=n, min_new_tokens=n, do_sample=True, temperature=1.0, top_k=0,
                            top_p=1.0, num_return_sequences=G, pad_token_id=pad)
            calls = {
                "simple": lambda: stage2.sample_completions(model, prompt, G, n, [], [], pad, **sample),
                "fast": lambda: stage2.sample_completions_fast(model, prompt, G, n, [], [], pad, **sample,
                                                               compile_mode=compile_mode),
                "repeat": lambda: repeated_heads(calls["fast"]),
                "generate": lambda: model.generate(**prompt, **generate),
                "static": lambda: model.generate(**prompt, **generate, cache_implementation="static"),
            }
            seconds = {}
            for name, fn in calls.items():
                skipped = (name not in columns or name == "static" and batch not in static_batches
                           or name == "repeat" and batch not in repeat_batches)
                if skipped:
                    continue
                # warm-up: compiles, captures CUDA graphs, fills the allocator's cache
                first = timed(fn, device)
                seconds[name] = min(timed(fn, device) for _ in range(repeats))
                if name in ("fast", "repeat"):
                    decoder = list(stage2.DECODERS.values())[-1]
                    setups[(name, decoder.cache.keys[0].shape[0], decoder.cache.keys[0].shape[2])] = decoder
                if name == "static":
                    setups[("generate-static", batch, setting)] = first - seconds[name]
            context = prompt["input_ids"].shape[1] + n / 2  # mean positions each step attends to
            roofline = bandwidth / bytes_per_step(model, batch, context) * batch if bandwidth else None
            rows.append((batch, setting, {k: batch * n / s for k, s in seconds.items()}, roofline))
            profile_call = calls["fast"]
            print(f"  batch {batch} {setting}: "
                  + ", ".join(f"{k} {batch * n / s:,.0f} tok/s" for k, s in seconds.items())
                  + f"  ({time.perf_counter() - started:.0f} s)", flush=True)

    where = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"\n{args.shape} shape, {dtype}, on {where} ({torch.get_num_threads()} threads), {n} new tokens, "
          f"sampled at T=1, fixed length, best of {repeats}; torch {torch.__version__}, transformers "
          f"{importlib.import_module('transformers').__version__}")
    if bandwidth:
        print(f"device-to-device copy: {bandwidth / 1e12:.2f} TB/s (read + write); roofline = that / "
              f"bytes read per decode step (weights + KV cache at the mean context) x batch")
    header = ["batch", "setting"] + [
        f"{c} tok/s" for c in ["ours-simple", "ours-fast", "fast-repeat", "generate", "generate-static"]]
    header += ["fast / generate", "simple / generate", "repeat / generate", "static / generate",
               "fast ms/step"]
    if bandwidth:
        header += ["roofline tok/s", "fast % roofline", "repeat % roofline", "generate % roofline"]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    # --batches may list them in any order
    for batch, setting, rate, roofline in sorted(rows, key=lambda r: r[:2]):
        cells = [str(batch), setting] + [f"{rate[c]:,.0f}" if c in rate else "" for c in COLUMNS]
        cells += [f"{rate[c] / rate['generate']:.2f}x" if c in rate else ""
                  for c in ("fast", "simple", "repeat", "static")]
        cells += [f"{1000 * batch / rate['fast']:.1f}"]
        if roofline:
            cells += [f"{roofline:,.0f}"] + [f"{100 * rate[c] / roofline:.1f} %" if c in rate else ""
                                             for c in ("fast", "repeat", "generate")]
        print("| " + " | ".join(cells) + " |")
    print()
    for key, setup in setups.items():
        if key[0] == "generate-static":
            print(f"generate-static compile (first call minus a timed one), batch {key[1]} {key[2]}: "
                  f"{setup:.1f} s")
        else:
            print(f"ours-{key[0]} compile + capture, {key[1]} rows x {key[2]} cache slots: "
                  f"{setup.setup_seconds:.1f} s (mode {setup.compile_mode})")
    if args.profile and profile_call is not None:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
        with profile(activities=activities) as prof:
            timed(profile_call, device)
        sort = "cuda_time_total" if device == "cuda" else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=sort, row_limit=25))
    headline = [r for r in rows if r[1] == "group"] or rows
    batch, setting, rate, _ = max(headline, key=lambda r: r[0])
    print(f"batch {batch} {setting}: fast {rate['fast'] / rate['generate']:.2f}x generate ({where})")


if __name__ == "__main__":
    main()
