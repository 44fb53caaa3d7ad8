"""Memory plan: what one GRPO step of stage 5 holds on one GPU, for Qwen2.5-VL-3B and -7B, full or LoRA.

The setting of the issue: G = 8 completions for each of 8 prompts per step (N = 64 rows), completions of
up to 1,024 tokens, one 448x448 image per prompt (1,024 patches, 256 visual tokens after the 2x2 merge)
plus ~64 text tokens, so a row is T = 320 + 1,024 = 1,344 tokens; a ModernBERT-large CRM in bf16.
The two configs are written out below as their config.json files; parameters are counted exactly by
building each model on the meta device (no weights, no download).

Precision (01_sft_rm.compute_dtype): on CUDA frozen weights are bf16 (2 B), trained weights fp32 master
weights (4 B) with bf16 matmuls under autocast; gradients fp32 (4 B per trained parameter), AdamW's m and v
fp32 (8 B). Full fine-tuning loads the policy in fp32 (a frozen vision tower is then stored in bf16), and
autocast keeps a bf16 copy of every trained Linear weight it casts until its region ends (2 B); LoRA
keeps a bf16 base and fp32 adapters. The rows of the table:

  policy weights      full: 4 B x trained parameters + 2 B x a frozen vision tower;
                      LoRA: 2 B x base + 4 B x adapters
  gradients, AdamW    4 B and 8 B x trained parameters
  autocast bf16 copy  2 B x trained Linear parameters (autocast's cache holds them through a forward)
  reference           --kl-beta > 0: full FT a bf16 copy of the policy; LoRA none (adapters disabled)
  CRM                 2 B x ModernBERT-large classifier parameters
  layer boundaries    gradient checkpointing keeps each decoder layer's input: b T h R x (layers + 1),
                      R = the residual stream's bytes (fp32 in full FT: the embedding is an fp32 master
                      weight; bf16 with LoRA), plus the final norm's saved tensors and a (b, 1, T, T) mask
  one layer's recompute   b T x S + gradients in flight (b T (2 C i + 2 R h)), C = 2 B (bf16 compute).
                      S, the bytes one decoder layer saves for backward per token, is counted tensor by
                      tensor from the layer's forward in transformers (Qwen2_5_VLDecoderLayer, RMSNorm,
                      SDPA), the method of Korthikanti et al. 2022 (arXiv 2205.05198, section 4: 34 s b h
                      bytes per GPT layer; its 5 a s^2 b attention-score term is gone under flash or
                      memory-efficient attention, which keep a log-sum-exp instead). On CUDA:
                        full FT  S = 30 h + 8 i: the norms' fp32 tensors 12 h; the norm outputs are fp32
                                 (fp32 weight x fp32 residual), so q, k, v and gate, up each keep a bf16
                                 cast 10 h; q and k, v repeated to every head (SDPA with a padding mask) 6 h;
                                 attention output 2 h; MLP gate, SiLU, up, product 8 i
                        LoRA     S = 28 h + 8 i + 14 r (peft casts each adapter's input to fp32, autocast
                                 back to bf16: every adapted Linear keeps its own copy)
                      plus 4 B per head and 8 B per token (log-sum-exp, rsqrt) and SDPA's additive mask
                      (C T per token). layer_saved_bytes() has every term; a test checks it against what
                      autograd saves, in fp32 and under bf16 autocast, full and LoRA.
  logits (one chunk)  completion_logprobs' chunk at its backward: the fp32 logits it saved for the
                      log-sum-exp, exp(z - lse), its product with the gradient and the gather's dense
                      gradient, 16 B x b x chunk x V (or, full FT, the lm_head weight gradient in bf16 and
                      fp32 if larger), plus the recomputed bf16 lm_head weight; 8 B x b x chunk x V forward
  rollout KV cache    2 (k, v) x layers x N x kv_heads x head_dim x (prompt + new tokens) x 2 B; 02's fast
                      sampler (on by default on CUDA) keeps it between steps, one per cache shape (up to its
                      MAX_DECODERS), so it is resident through the update too
  optimizer transient torch's default AdamW on CUDA (foreach) takes sqrt(v) of every parameter at once:
                      4 B x trained parameters during optimizer.step(); stage 5's fused=True needs none
  CUDA context        a fixed 2 GB: the CUDA context and cuBLAS workspaces, and slack for the allocator

The rows are not all alive at once. The peak is the largest of four phases:
  rollout   resident + autocast copy (the simple sampler runs in one autocast region) + the sampler's
            (N, V) logits (+ the KV cache, when not kept); the compiled step's CUDA-graph pool is not counted
  forward   resident + gradients + autocast copy + layer boundaries + a chunk's forward
  backward  resident + gradients + layer boundaries + max(logits chunk, one layer's recompute)
  step      resident + gradients + optimizer transient
with resident = policy weights + AdamW states + reference + CRM + kept KV caches + CUDA context; stage 5
frees the gradients right after optimizer.step(), so the rollout holds none (plan() has options for the
other choices). Not counted: the forwards without gradients (pi_old's recompute, the reference, the CRM's
scoring, the prefill of 8 prompts: nothing saved, small beside these), allocator fragmentation beyond the
fixed allowance.

Check (--check): the same formula at a shape the CPU holds (a 4-layer Qwen2.5-VL with the real 151,936
vocabulary, fp32), against the peak RSS of one micro-step of stage 5's update (its batch_logprobs and
policy_loss, backward, AdamW) in a fresh process, phase by phase; and the log-prob step alone, the
pre-chunking completion_logprobs (full (B, L, V) logits, then log_softmax) against the chunked one.

Run:  python bench/memory_plan.py                  # the table and the recommended flags (~10 s)
      python bench/memory_plan.py --check          # formula vs measured peak RSS on the CPU (1-2 min, < 3 GB)
      python bench/memory_plan.py --shape 3b --out /tmp/qwen25vl-3b   # random weights, real shape (a GPU run)
"""
import argparse
import functools
import importlib
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the stages import each other by file name with importlib.import_module
stage1, stage5 = map(importlib.import_module, ["01_sft_rm", "05_grpo_train"])

GB = 10**9  # the table's unit: 1 GB = 1e9 bytes
GPU_BYTES = 80 * GB  # the card the plan is for
BUDGET = 0.9 * GPU_BYTES  # a recommended setting leaves 10 % of the card free (fragmentation is not modelled)
CONTEXT_BYTES = 2 * GB  # CUDA context, cuBLAS workspaces, allocator slack: a fixed allowance

# config.json of Qwen/Qwen2.5-VL-3B-Instruct and Qwen/Qwen2.5-VL-7B-Instruct (token ids and bookkeeping kept)
_QWEN25_VL_COMMON = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
    "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151645,
    "vision_start_token_id": 151652, "vision_end_token_id": 151653, "vision_token_id": 151654,
    "image_token_id": 151655, "video_token_id": 151656, "hidden_act": "silu", "initializer_range": 0.02,
    "max_position_embeddings": 128000, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
    "sliding_window": 32768, "use_sliding_window": False, "use_cache": True, "torch_dtype": "bfloat16",
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
}
_QWEN25_VL_VISION = {
    "depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
    "in_chans": 3, "patch_size": 14, "spatial_merge_size": 2, "spatial_patch_size": 14, "window_size": 112,
    "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2, "temporal_patch_size": 2,
}
QWEN25_VL = {
    "3b": {**_QWEN25_VL_COMMON, "hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
           "num_attention_heads": 16, "num_key_value_heads": 2, "max_window_layers": 70, "vocab_size": 151936,
           "tie_word_embeddings": True, "vision_config": {**_QWEN25_VL_VISION, "out_hidden_size": 2048}},
    "7b": {**_QWEN25_VL_COMMON, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
           "num_attention_heads": 28, "num_key_value_heads": 4, "max_window_layers": 28, "vocab_size": 152064,
           "tie_word_embeddings": False, "vision_config": {**_QWEN25_VL_VISION, "out_hidden_size": 3584}},
}
# config.json of answerdotai/ModernBERT-large, with the 2-label head stage 1 gives it (load_crm)
MODERNBERT_LARGE = {
    "model_type": "modernbert", "vocab_size": 50368, "hidden_size": 1024, "intermediate_size": 2624,
    "num_hidden_layers": 28, "num_attention_heads": 16, "max_position_embeddings": 8192,
    "global_attn_every_n_layers": 3, "local_attention": 128, "global_rope_theta": 160000.0,
    "local_rope_theta": 10000.0, "hidden_activation": "gelu", "norm_eps": 1e-05, "norm_bias": False,
    "mlp_bias": False, "attention_bias": False, "classifier_bias": False, "classifier_activation": "gelu",
    "classifier_pooling": "mean", "decoder_bias": True, "tie_word_embeddings": True, "num_labels": 2,
    "pad_token_id": 50283, "bos_token_id": 50281, "eos_token_id": 50282, "cls_token_id": 50281,
    "sep_token_id": 50282,
}
# the --check shape: the real vocabulary (so the logits matter), 4 narrow layers, a small vision tower, fp32
CHECK_CONFIG = {
    **_QWEN25_VL_COMMON, "torch_dtype": "float32", "hidden_size": 256, "intermediate_size": 1024,
    "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 151936,
    "tie_word_embeddings": False, "rope_scaling": {"type": "mrope", "mrope_section": [8, 12, 12]},
    "vision_config": {**_QWEN25_VL_VISION, "depth": 2, "hidden_size": 64, "intermediate_size": 128,
                      "num_heads": 2, "fullatt_block_indexes": [1], "out_hidden_size": 256},
}
CONFIGS = {
    **QWEN25_VL, "check": CHECK_CONFIG,
    # the --check shape with a small vocabulary and its own special ids: activations dominate its memory
    "check-activations": {**CHECK_CONFIG, "vocab_size": 8192, "bos_token_id": 8000, "eos_token_id": 8001,
                          "vision_start_token_id": 8002, "vision_end_token_id": 8003, "vision_token_id": 8004,
                          "image_token_id": 8005, "video_token_id": 8006},
}


# ----------------------------------------------------------------------------- parameter counts (meta device)
@dataclass(frozen=True)
class Shape:
    """What the plan needs of one Qwen2.5-VL: widths, and parameter counts taken from the meta-device
    model."""
    layers: int  # decoder layers
    hidden: int  # h
    heads: int  # attention heads
    kv_heads: int  # key/value heads (grouped-query attention)
    head_dim: int
    intermediate: int  # i, the MLP width
    vocab: int  # V
    vision_depth: int
    vision_hidden: int
    vision_intermediate: int
    vision_params: int  # the vision tower (patch embedding, blocks, merger)
    language_params: int  # the language model (embedding, layers, final norm)
    lm_head_params: int  # 0 when tied to the embedding (3B)
    total: int  # every distinct parameter
    linear_params: int  # Linear weights + biases of the language model, and lm_head: what autocast casts
    vision_linear_params: int  # the same in the vision tower
    layer_linear_params: int  # one decoder layer's Linear parameters (cast again in its recompute)
    largest_layer_linear: int  # the largest weight of a decoder layer (its gradient is one transient)
    largest_param: int  # the largest single tensor of the language model and lm_head
    lora_per_rank: int  # LoRA adapter parameters per unit of rank on the default targets: sum of (in + out)
    lora_modules_per_layer: int  # adapted Linear modules per decoder layer


def qwen_config(name_or_dict):
    """A Qwen2_5_VLConfig from a config.json dict (or the name of one in CONFIGS)."""
    from transformers import Qwen2_5_VLConfig

    return Qwen2_5_VLConfig.from_dict(
        CONFIGS[name_or_dict] if isinstance(name_or_dict, str) else name_or_dict)


def meta_model(name: str):
    """The model of a named config on the meta device: every shape, no memory."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    with torch.device("meta"):
        return Qwen2_5_VLForConditionalGeneration(qwen_config(name))


def lora_target_names() -> list[str]:
    """Stage 5's default --lora-targets (q, k, v, o, gate, up, down projections of the language model)."""
    return [t.strip() for t in stage5.Config().lora_targets.split(",") if t.strip()]


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def linears(module) -> list:
    return [m for m in module.modules() if isinstance(m, torch.nn.Linear)]


@functools.lru_cache(maxsize=None)
def shape(name: str) -> Shape:
    model = meta_model(name)
    core, text, vision = model.model, model.config.text_config, model.config.vision_config
    lm, layer = core.language_model, core.language_model.layers[0]
    tied = model.lm_head.weight is lm.embed_tokens.weight
    targets = set(lora_target_names())
    adapted = [m for n, m in lm.named_modules()
               if isinstance(m, torch.nn.Linear) and n.split(".")[-1] in targets]
    return Shape(
        layers=text.num_hidden_layers, hidden=text.hidden_size, heads=text.num_attention_heads,
        kv_heads=text.num_key_value_heads, head_dim=text.hidden_size // text.num_attention_heads,
        intermediate=text.intermediate_size, vocab=text.vocab_size, vision_depth=vision.depth,
        vision_hidden=vision.hidden_size, vision_intermediate=vision.intermediate_size,
        vision_params=count(core.visual), language_params=count(lm),
        lm_head_params=0 if tied else count(model.lm_head), total=count(model),
        linear_params=sum(count(m) for m in linears(lm)) + model.lm_head.weight.numel(),
        vision_linear_params=sum(count(m) for m in linears(core.visual)),
        layer_linear_params=sum(count(m) for m in linears(layer)),
        largest_layer_linear=max(m.weight.numel() for m in linears(layer)),
        largest_param=max(p.numel() for p in [*lm.parameters(), model.lm_head.weight]),
        lora_per_rank=sum(m.in_features + m.out_features for m in adapted),
        lora_modules_per_layer=len(adapted) // text.num_hidden_layers)


@functools.lru_cache(maxsize=None)
def crm_params() -> int:
    """ModernBERT-large with a 2-label head, counted on the meta device."""
    from transformers import ModernBertConfig, ModernBertForSequenceClassification

    with torch.device("meta"):
        return count(ModernBertForSequenceClassification(ModernBertConfig.from_dict(MODERNBERT_LARGE)))


def lora_params(name: str, rank: int) -> int:
    """Adapter parameters at rank r: each adapted Linear (in -> out) gets A (r x in) and B (out x r)."""
    return rank * shape(name).lora_per_rank


# ----------------------------------------------------------------------------- the formula
def layer_saved_bytes(h: int, i: int, heads: int, kv_dim: int, residual: int, compute: int, norm_weight: int,
                      norm_trains: bool, repeat_kv: bool, lora_rank: int = 0, lora_modules: int = 0,
                      adapter: int = 4) -> int:
    """Bytes per token that one Qwen2.5-VL decoder layer saves for its backward (what a recompute rebuilds).

    residual, compute, norm_weight, adapter: bytes per element of the residual stream, of the compute dtype
    (autocast's), of the RMSNorm weights and of the LoRA adapters (fp32, all seven projections adapted).
    RMSNorm(x) = w * (x.float() * rsqrt(mean(x^2) + eps)).to(x.dtype) saves x.float() (a new tensor when x
    is bf16; x itself, the layer input, when x is fp32), rsqrt (4 B) and, when w trains, the normalised x.
    A Linear saves its input when its weight trains. When the norm's output (dtype of w * x) is not in the
    compute dtype, each Linear reading it casts and keeps its own copy (3 for q, k, v; 2 for gate, up);
    peft does the same to every adapter's input when the adapters (fp32) and the activations differ in dtype.
    SDPA with a padding mask repeats k and v to every head (transformers' repeat_kv) and saves q, k, v, the
    output and a log-sum-exp per head; its additive mask is counted in plan().
    """
    norm1 = (4 * h if residual != 4 else 0) + 4 + (residual * h if norm_trains else 0)  # input: a boundary
    norm2 = 4 * h + 4 + (residual * h if norm_trains else 0)  # mid-layer residual in fp32, rsqrt, normalised
    own_copies = adapter != compute if lora_rank else max(norm_weight, residual) != compute
    qkv_in, mlp_in = (3 if own_copies else 1) * compute * h, (2 if own_copies else 1) * compute * h
    o_in = compute * h if lora_rank and own_copies else 0  # o_proj's adapter copy (SDPA keeps its own output)
    k_and_v = 2 * h if repeat_kv else 2 * kv_dim
    attention = compute * (h + k_and_v) + compute * h + 4 * heads  # q, k, v, the output, the log-sum-exp
    mlp = 4 * compute * i  # gate (SiLU's input), SiLU's output, up, their product (down_proj's input)
    lora = lora_modules * lora_rank * compute  # each adapter's A x (B's input)
    return norm1 + norm2 + qkv_in + mlp_in + o_in + attention + mlp + lora


def plan(config_name: str, lora_rank: int = 0, micro_batch: int = 8, *, chunk: int = 256, prompts: int = 8,
         group: int = 8, prompt_len: int = 320, completion_len: int = 1024, image_patches: int = 1024,
         checkpointing: bool = True, freeze_vision: bool = True, reference: bool = True, crm: bool = True,
         optimizer: str | None = None, free_grads_after_step: bool = True, kv_caches_kept: int | None = None,
         device: str = "cuda", context: int = CONTEXT_BYTES) -> dict[str, int]:
    """Bytes of each component of one GRPO step, the four phases' totals and the peak ("total").

    config_name: "3b", "7b" (or a --check shape); lora_rank 0 = full fine-tuning; micro_batch = stage 5's
    --micro-batch-size; chunk = --logprob-chunk; reference = --kl-beta > 0; device "cuda" (bf16 compute) or
    "cpu" (fp32). The defaults follow stage 5: optimizer "fused" on CUDA ("foreach" is torch's own default
    there, "for-loop" its default on the CPU); free_grads_after_step: zero_grad(set_to_none) right after
    optimizer.step(), so the rollout holds no gradients; kv_caches_kept: decode caches that stay allocated
    between steps (02's fast sampler, on by default on CUDA, keeps one per cache shape, up to MAX_DECODERS;
    the simple loop frees its cache: 0), 1 on CUDA and 0 on the CPU by default.
    """
    s = shape(config_name)
    cuda, lora = device == "cuda", lora_rank > 0
    optimizer = optimizer or ("fused" if cuda else "for-loop")
    kv_caches_kept = (1 if cuda else 0) if kv_caches_kept is None else kv_caches_kept
    C = 2 if cuda else 4  # bytes of the compute dtype
    freeze_vision = freeze_vision or lora
    n_lora = lora_rank * s.lora_per_rank
    vision_trained = 0 if freeze_vision else s.vision_params
    trained = n_lora if lora else s.language_params + s.lm_head_params + vision_trained
    R = C if lora else 4  # the residual stream follows the embedding: a bf16 base, or fp32 master weights
    W_norm = C if lora else 4
    h, i, V, kv_dim = s.hidden, s.intermediate, s.vocab, s.kv_heads * s.head_dim
    b, T, c, N = micro_batch, prompt_len + completion_len, min(chunk, completion_len), prompts * group
    out = {}
    frozen_vision = s.vision_params if freeze_vision else 0  # stage 5 stores a frozen vision tower in C bytes
    out["policy weights"] = (C * s.total + 4 * n_lora if lora
                             else 4 * (s.total - frozen_vision) + C * frozen_vision)
    out["gradients"] = 4 * trained
    out["AdamW states"] = 8 * trained
    cast = n_lora if lora else s.linear_params + (0 if freeze_vision else s.vision_linear_params)
    out["autocast bf16 copy"] = 2 * cast if cuda else 0
    out["reference"] = C * s.total if reference and not lora else 0
    out["CRM"] = C * crm_params() if crm else 0

    saved = layer_saved_bytes(h, i, s.heads, kv_dim, R, C, W_norm, not lora, repeat_kv=s.kv_heads < s.heads,
                              lora_rank=lora_rank, lora_modules=s.lora_modules_per_layer)
    saved += C * T  # SDPA's additive mask: the boolean one as (b, 1, T, T) in the compute dtype, per layer
    final_norm = (4 * h if R != 4 else 0) + (R * h if not lora else 0) + max(W_norm, R) * h  # + its output
    shared = 2 * s.head_dim * R + T  # per token: mRoPE cos and sin; the (b, 1, T, T) boolean mask
    in_flight = 2 * C * i + 2 * R * h  # gradients alive in a layer's backward (MLP, residual stream)
    weight_grad = 0 if lora else (C + 4 if cuda else 4) * s.largest_layer_linear  # bf16 grad + fp32 copy
    layer_cast = 2 * s.layer_linear_params if cuda and not lora else 0  # the recompute's autocast casts
    if checkpointing:
        boundaries = b * T * ((s.layers + 1) * R * h + final_norm + shared)
        recompute = b * T * (saved + in_flight) + weight_grad + layer_cast
    else:  # every layer keeps what it saves (its fp32 input too, when the residual is fp32)
        boundaries = b * T * (s.layers * (saved + (R * h if R == 4 else 0)) + R * h + final_norm + shared)
        recompute = b * T * in_flight + weight_grad
    if not freeze_vision:  # the vision tower runs inside each micro-batch (b images), its residual in bf16
        hv, iv = s.vision_hidden, s.vision_intermediate
        v_saved = layer_saved_bytes(hv, iv, 1, hv, C, C, 4, True, False)
        boundaries += b * image_patches * (s.vision_depth + 1) * C * hv
        recompute = max(recompute, b * image_patches * (v_saved + 2 * C * iv + 2 * C * hv))
    out["activations: layer boundaries"] = boundaries
    out["activations: one layer's recompute"] = recompute
    head_grad = 0 if lora else (C + 4 if cuda else 4) * V * h  # lm_head's weight gradient (+ its fp32 copy)
    head_cast = 2 * V * h if cuda and not lora else 0  # the chunk recompute's bf16 lm_head weight
    hidden_grads = 2 * b * T * h * R  # the backbone output's gradient, gathered from the chunks
    out["logits: one chunk"] = max(16 * b * c * V, C * b * c * V + head_grad) + head_cast + hidden_grads
    chunk_forward = 8 * b * c * V
    out["rollout KV cache"] = 2 * s.layers * N * kv_dim * (prompt_len + completion_len) * C
    out["KV caches kept between steps"] = kv_caches_kept * out["rollout KV cache"]
    # stage 2's (N, V) logits, log-softmax, mask, softmax
    out["sampler logits"] = (22 if cuda else 20) * N * V
    largest = 0 if lora else s.largest_param  # (an adapter's tensors are small)
    out["optimizer step transient"] = {"foreach": 4 * trained, "fused": 0, "for-loop": 8 * largest}[optimizer]
    out["CUDA context + allocator"] = context if cuda else 0

    resident = (out["policy weights"] + out["AdamW states"] + out["reference"] + out["CRM"]
                + out["KV caches kept between steps"] + out["CUDA context + allocator"])
    base = resident + out["gradients"]
    kv_now = 0 if kv_caches_kept else out["rollout KV cache"]  # a kept cache is already resident
    out["phase: rollout"] = (resident + (0 if free_grads_after_step else out["gradients"])
                             + out["autocast bf16 copy"] + kv_now + out["sampler logits"])
    out["phase: forward"] = base + out["autocast bf16 copy"] + boundaries + chunk_forward
    out["phase: backward"] = base + boundaries + max(out["logits: one chunk"], recompute)
    out["phase: optimizer step"] = base + out["optimizer step transient"]
    out["total"] = max(v for k, v in out.items() if k.startswith("phase: "))
    return out


COMPONENTS = ["policy weights", "gradients", "AdamW states", "autocast bf16 copy", "reference", "CRM",
              "activations: layer boundaries", "activations: one layer's recompute", "logits: one chunk",
              "rollout KV cache", "KV caches kept between steps", "sampler logits",
              "optimizer step transient", "CUDA context + allocator"]
PHASES = ["phase: rollout", "phase: forward", "phase: backward", "phase: optimizer step"]
MICRO_BATCHES = (16, 8, 4, 2, 1)  # --micro-batch-size candidates (16 rows = 21,504 tokens per forward)


def recommend(config_name: str, lora_rank: int = 64, budget: float = BUDGET, **kwargs) -> dict | None:
    """The first setting whose peak is under `budget`, in this order of preference: full fine-tuning before
    LoRA (rank lora_rank); the larger micro-batch, up to 16 (the matmuls are large already at 21,504 tokens
    per forward; beyond, the plan keeps the headroom); without gradient checkpointing before with (no
    recompute); the larger --logprob-chunk. kwargs go to plan(). None when nothing fits."""
    for rank in (0, lora_rank):
        for micro_batch in MICRO_BATCHES:
            for checkpointing in (False, True):
                for chunk in (256, 128, 64):
                    p = plan(config_name, rank, micro_batch, chunk=chunk, checkpointing=checkpointing,
                             **kwargs)
                    if p["total"] <= budget:
                        return {"lora_rank": rank, "micro_batch": micro_batch, "checkpointing": checkpointing,
                                "chunk": chunk, "plan": p}
    return None


def flags(setting: dict) -> str:
    """Stage 5's flags for a recommend() setting (--freeze-vision-tower: the plan's default)."""
    parts = [f"--lora-rank {setting['lora_rank']}", "--freeze-vision-tower",
             f"--micro-batch-size {setting['micro_batch']}", f"--logprob-chunk {setting['chunk']}"]
    return " ".join(parts + ["--gradient-checkpointing"] * setting["checkpointing"])


def stage2_max_decoders() -> int:
    """How many decode caches 02's fast sampler may keep (its MAX_DECODERS), or 1 without one."""
    return getattr(importlib.import_module("02_rollout"), "MAX_DECODERS", 1)


def gb(x: float) -> str:
    return f"{x / GB:.1f}"


def print_table(micro_batch: int = 8, chunk: int = 256, lora_rank: int = 64) -> None:
    for n in ("3b", "7b"):
        s = shape(n)
        head = f"lm_head {s.lm_head_params:,}" if s.lm_head_params else "lm_head tied to the embedding"
        print(f"Qwen2.5-VL-{n.upper()}: {s.total:,} parameters = vision {s.vision_params:,} + language model "
              f"{s.language_params:,}, {head}; LoRA r{lora_rank} on {', '.join(lora_target_names())}: "
              f"{lora_params(n, lora_rank):,}")
    print(f"CRM (ModernBERT-large, 2 labels): {crm_params():,} parameters\n")
    print(f"GB (1e9 bytes) at micro-batch {micro_batch}, --logprob-chunk {chunk}, --gradient-checkpointing, "
          f"--freeze-vision-tower, --kl-beta > 0; stage 5 as it stands: fused AdamW, gradients freed "
          f"after the step, one KV cache kept by the fast sampler; 8 prompts x G 8, "
          f"T = 320 + 1,024 tokens:\n")
    columns = [(f"{n.upper()} " + (f"LoRA r{rank}" if rank else "full"),
                plan(n, rank, micro_batch, chunk=chunk)) for n in ("3b", "7b") for rank in (0, lora_rank)]
    print("| component | " + " | ".join(name for name, _ in columns) + " |")
    print("|---|" + "---:|" * len(columns))
    for key in COMPONENTS + PHASES:
        print(f"| {key} | " + " | ".join(gb(p[key]) for _, p in columns) + " |")
    cells = [f"**{gb(p['total'])}**" + ("" if p["total"] <= GPU_BYTES else " (does not fit)")
             for _, p in columns]
    print(f"| **peak (of {GPU_BYTES // GB} GB)** | " + " | ".join(cells) + " |")

    worst = stage2_max_decoders()
    print(f"\nRecommended on one {GPU_BYTES // GB} GB GPU (peak <= {gb(BUDGET)} GB, 90 %; the order of "
          f"preference is recommend()'s), 8 prompts x G 8, 1,024-token completions; the last column keeps "
          f"{worst} KV caches (the fast sampler's MAX_DECODERS shapes) instead of one:\n")
    print(f"| model | --kl-beta | stage 5 flags | peak (GB) | at | with {worst} caches (GB) |")
    print("|---|---|---|---:|---|---:|")
    for n in ("3b", "7b"):
        for reference in (False, True):
            setting = recommend(n, lora_rank, reference=reference)
            kl = "> 0 (reference)" if reference else "0 (default)"
            if setting is None:
                print(f"| {n.upper()} | {kl} | nothing fits | | | |")
                continue
            p = setting["plan"]
            phase = max(PHASES, key=p.get)[len("phase: "):]
            kept = plan(n, setting["lora_rank"], setting["micro_batch"], chunk=setting["chunk"],
                        checkpointing=setting["checkpointing"], reference=reference, kv_caches_kept=worst)
            print(f"| {n.upper()} | {kl} | `{flags(setting)}` | {gb(p['total'])} | {phase} "
                  f"| {gb(kept['total'])} |")


# ----------------------------------------------------------------------------- --shape: random, real-shaped
def random_model(name: str, device: str, dtype=torch.bfloat16) -> tuple:
    """A random-weight model of the real shape ("3b", "7b", "check"; or "crm" for ModernBERT-large), in
    memory, with the embedded tokenizer (its few hundred ids; the embedding keeps the real vocabulary) and,
    for the policy, an image processor capped at 448x448: (model, processor) or, for "crm", (model,
    tokenizer)."""
    from transformers import (AutoProcessor, AutoTokenizer, ModernBertConfig,
                              ModernBertForSequenceClassification, Qwen2_5_VLForConditionalGeneration,
                              Qwen2_5_VLProcessor)

    bpe = stage1.train_bpe(0)
    scratch = tempfile.TemporaryDirectory()  # the embedded model's folder, for its tokenizer and processor
    tiny = Path(scratch.name) / "tiny"
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise in the wanted dtype: no fp32 copy of a 7B model on the way
    try:
        if name == "crm":
            stage1.build_tiny_crm(tiny, 0, bpe)
            tokenizer = AutoTokenizer.from_pretrained(tiny)
            names = [("pad", "[PAD]"), ("cls", "[CLS]"), ("sep", "[SEP]"), ("bos", "[CLS]"), ("eos", "[SEP]")]
            ids = {f"{k}_token_id": tokenizer.convert_tokens_to_ids(t) for k, t in names}
            config = ModernBertConfig.from_dict({**MODERNBERT_LARGE, **ids, "id2label": stage1.CRM_LABELS,
                                                 "label2id": {v: k for k, v in stage1.CRM_LABELS.items()}})
            with torch.device(device):
                return ModernBertForSequenceClassification(config).eval(), tokenizer
        stage1.build_tiny_policy(tiny, 0, bpe)
        base = AutoProcessor.from_pretrained(tiny)
        token = base.tokenizer.convert_tokens_to_ids
        ids = {"image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>",
               "vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>",
               "eos_token_id": "<|im_end|>", "pad_token_id": "<|endoftext|>"}
        config = qwen_config({**CONFIGS[name], **{k: token(t) for k, t in ids.items()},
                              "bos_token_id": None, "torch_dtype": str(dtype).split(".")[-1]})
        with torch.device(device):
            model = Qwen2_5_VLForConditionalGeneration(config)
        base.image_processor.size = {"shortest_edge": 56 * 56, "longest_edge": 448 * 448}
        base.tokenizer.padding_side = "left"  # as stage1.load_policy sets it
        processor = Qwen2_5_VLProcessor(image_processor=base.image_processor, tokenizer=base.tokenizer,
                                        video_processor=base.video_processor,
                                        chat_template=base.chat_template)
        return model.eval(), processor
    finally:
        torch.set_default_dtype(default)
        scratch.cleanup()


def build_random(name: str, folder: Path, device: str, dtype=torch.bfloat16) -> None:
    """random_model, saved like a hub checkpoint, so stages 1, 5 and 6 load it."""
    stage1.save_folder_atomic(folder, *random_model(name, device, dtype))


# ----------------------------------------------------------------------------- --check: measured on the CPU
def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024  # kB
    raise RuntimeError(f"no {field} in /proc/self/status")


def rss() -> int:
    return _status_bytes("VmRSS")


def peak_rss() -> int:
    """VmHWM: the process's peak resident set since it started or since reset_peak() (Linux)."""
    return _status_bytes("VmHWM")


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := the current RSS (Linux >= 4.0)


def check_inputs(config_name: str, rows: int, completion_len: int, text_len: int = 20,
                 seed: int = 0) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """A prompt batch like encode_prompts makes (left padded, one 112x112 image = 16 visual tokens per row)
    and right-padded completions (B, L), with the special token ids of CONFIGS[config_name]."""
    cfg = CONFIGS[config_name]
    n_text = min(150000, cfg["vocab_size"] - 200)  # ordinary tokens: below the special ids
    g = torch.Generator().manual_seed(seed)
    image = [cfg["vision_start_token_id"]] + [cfg["image_token_id"]] * 16 + [cfg["vision_end_token_id"]]
    width = 2 * text_len + len(image)
    input_ids = torch.full((rows, width), cfg["bos_token_id"])  # <|endoftext|>: Qwen's padding
    attention = torch.zeros((rows, width), dtype=torch.long)
    mm_types = torch.zeros((rows, width), dtype=torch.long)  # 1 on image tokens
    for r in range(rows):
        pad = r % 3  # rows differ in length, so SDPA gets a padding mask as in a real batch
        text = torch.randint(0, n_text, (2 * text_len - pad,), generator=g).tolist()
        input_ids[r, pad:] = torch.tensor(text[:text_len] + image + text[text_len:])
        attention[r, pad:] = 1
        mm_types[r, pad + text_len + 1: pad + text_len + 17] = 1
    prompt = {"input_ids": input_ids, "attention_mask": attention, "mm_token_type_ids": mm_types,
              "image_grid_thw": torch.tensor([[1, 8, 8]] * rows),  # 64 patches of 14x14 -> 16 tokens
              "pixel_values": torch.randn(rows * 64, 3 * 2 * 14 * 14, generator=g)}
    ids = torch.randint(0, n_text, (rows, completion_len), generator=g)
    mask = torch.ones((rows, completion_len), dtype=torch.long)
    for r in range(rows):
        mask[r, completion_len - 7 * r:] = 0  # right padding after each row's stop token
    return prompt, ids, mask


def naive_completion_logprobs(model, prompt: dict, completion_ids, completion_mask, temperature: float = 1.0):
    """completion_logprobs as it was at commit 258b8d4: the full (B, L, V) logits in fp32, then a
    log_softmax copy. Kept here only to measure what the chunks save."""
    L = completion_ids.shape[1]
    input_ids = torch.cat([prompt["input_ids"], completion_ids], dim=1)  # (B, P + L)
    attention_mask = torch.cat([prompt["attention_mask"], completion_mask], dim=1)  # (B, P + L)
    mm_token_type_ids = torch.cat([prompt["mm_token_type_ids"], torch.zeros_like(completion_ids)], dim=1)
    out = model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=prompt["pixel_values"],
                image_grid_thw=prompt["image_grid_thw"], mm_token_type_ids=mm_token_type_ids,
                logits_to_keep=L + 1)
    logits = out.logits[:, :-1].float() / temperature  # (B, L, V)
    return torch.log_softmax(logits, dim=-1).gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)  # (B, L)


def measure_step(config_name: str, lora_rank: int, micro_batch: int, completion_len: int, chunk: int,
                 checkpointing: bool) -> dict:
    """Stage 5's update (batch_logprobs, policy_loss, backward) for two micro-batches, then clipping and an
    AdamW step, on a CONFIGS model in fp32 with --freeze-vision-tower: the peak RSS of each phase above the
    RSS before the model was built. AdamW's m and v exist already, as after any earlier step."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    rows = 2 * micro_batch
    prompt, ids, mask = check_inputs(config_name, rows, completion_len)
    cfg = stage5.Config(device="cpu", group_size=1, micro_batch_size=micro_batch, logprob_chunk=chunk,
                        lora_rank=lora_rank, gradient_checkpointing=checkpointing)
    old, advantages = torch.zeros(rows, completion_len), torch.linspace(-1, 1, rows)
    baseline = rss()
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(qwen_config(config_name))
    if lora_rank:
        model = stage5.add_lora(cfg, model)
    stage1.unwrap(model).model.visual.requires_grad_(False)
    if checkpointing:
        stage5.enable_checkpointing(model)
    params = stage5.trainable_parameters(model)
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    result = {"weights": rss() - baseline, "prompt_len": prompt["input_ids"].shape[1]}
    for p in params:  # a step on zero gradients creates m and v
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)  # where update() starts
    with torch.no_grad():
        visual = stage1.image_features(model, prompt)  # once per prompt, as update() does
    model.train()
    for k in range(2):
        batch_rows = list(range(k * micro_batch, (k + 1) * micro_batch))
        reset_peak()
        new = stage5.batch_logprobs(cfg, model, prompt, ids, mask, batch_rows, visual)  # (b, L)
        loss, _ = stage5.policy_loss(new, old[batch_rows], advantages[batch_rows], mask[batch_rows], 0.2, 0.2,
                                     n_tokens=int(mask.sum()))
        result[f"micro-batch {k + 1} forward"] = peak_rss() - baseline
        reset_peak()
        loss.backward()
        result[f"micro-batch {k + 1} backward"] = peak_rss() - baseline
        del new, loss
    reset_peak()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    result["optimizer step"] = peak_rss() - baseline
    return result


def measure_logprobs(chunked: bool, rows: int, completion_len: int, chunk: int) -> dict:
    """Forward + backward of the log-prob step alone (one narrow layer, the real vocabulary, fp32): peak RSS
    above the RSS before it."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    prompt, ids, mask = check_inputs("check", rows, completion_len)
    narrow = {**CHECK_CONFIG, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
              "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
              "vision_config": {**CHECK_CONFIG["vision_config"], "out_hidden_size": 64}}
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(qwen_config(narrow)).train()
    baseline = rss()
    reset_peak()
    if chunked:
        logprobs = stage1.completion_logprobs(model, prompt, ids, mask, 1.0, chunk)  # (B, L)
    else:
        logprobs = naive_completion_logprobs(model, prompt, ids, mask, 1.0)  # (B, L)
    (-(logprobs * mask).sum() / mask.sum()).backward()
    return {"peak": peak_rss() - baseline, "mean": float((logprobs * mask).sum() / mask.sum())}


def in_subprocess(function: str, **kwargs) -> dict:
    """Run a measure_* function in a fresh interpreter, so the peak RSS is its own. glibc is told to hand
    every freed block above 64 KB back to the system, so RSS follows the live tensors, not the malloc
    heap."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536",
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "2"}
    code = (f"import sys, json; sys.path.insert(0, {str(ROOT / 'bench')!r}); import memory_plan as m; "
            f"print('RESULT', json.dumps(m.{function}(**{kwargs!r})))")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"{function}({kwargs}) failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


CHECK_RUNS = [  # (name, measure_step's arguments): weights, optimizer and logits at the real vocabulary; then
    # a small vocabulary without checkpointing, where every layer's saved activations dominate
    ("full FT", dict(config_name="check", lora_rank=0, micro_batch=2, completion_len=256, chunk=128,
                     checkpointing=True)),
    ("LoRA r8", dict(config_name="check", lora_rank=8, micro_batch=2, completion_len=256, chunk=128,
                     checkpointing=True)),
    ("full FT, V 8,192, no checkpointing", dict(config_name="check-activations", lora_rank=0, micro_batch=4,
                                                completion_len=512, chunk=128, checkpointing=False)),
]
LOGPROB_CHECK = {"rows": 1, "completion_len": 1024, "chunk": 256}  # the log-prob step alone


def check() -> dict:
    """Formula vs measured peak RSS, phase by phase; then the log-prob step's memory factor."""
    report = {}
    cfg = CHECK_CONFIG
    print(f"CPU check: Qwen2.5-VL, text hidden {cfg['hidden_size']}, {cfg['num_hidden_layers']} layers, "
          f"V = {cfg['vocab_size']:,} (untied lm_head), fp32, --freeze-vision-tower; stage 5's update, "
          f"second micro-batch and AdamW step. Peak RSS above the RSS before the model.\n")
    print("| run | micro-batch x tokens | phase | plan (GB) | measured (GB) | measured / plan "
          "| difference (MB) |")
    print("|---|---|---|---:|---:|---:|---:|")
    for name, run in CHECK_RUNS:
        measured = in_subprocess("measure_step", **run)
        p = plan(run["config_name"], run["lora_rank"], run["micro_batch"], chunk=run["chunk"], prompts=1,
                 group=1, prompt_len=measured["prompt_len"], completion_len=run["completion_len"],
                 checkpointing=run["checkpointing"], reference=False, crm=False, optimizer="for-loop",
                 device="cpu", context=0)
        size = f"{run['micro_batch']} x ({measured['prompt_len']} + {run['completion_len']})"
        pairs = [("weights", p["policy weights"], measured["weights"]),
                 ("forward", p["phase: forward"], measured["micro-batch 2 forward"]),
                 ("backward", p["phase: backward"], measured["micro-batch 2 backward"]),
                 ("optimizer step", p["phase: optimizer step"], measured["optimizer step"])]
        for phase, planned, got in pairs:
            print(f"| {name} | {size} | {phase} | {planned / GB:.3f} | {got / GB:.3f} | {got / planned:.2f} "
                  f"| {(got - planned) / 1e6:+.0f} |")
        report[name] = {"plan": p, "measured": measured}
    naive = in_subprocess("measure_logprobs", chunked=False, **LOGPROB_CHECK)
    chunked = in_subprocess("measure_logprobs", chunked=True, **LOGPROB_CHECK)
    factor = naive["peak"] / chunked["peak"]
    run = LOGPROB_CHECK
    print(f"\nlog-prob step alone (forward + backward, B {run['rows']}, L {run['completion_len']}, "
          f"V {cfg['vocab_size']:,}, fp32): full (B, L, V) logits + log_softmax {naive['peak'] / GB:.2f} GB, "
          f"chunks of {run['chunk']} {chunked['peak'] / GB:.2f} GB: {factor:.1f}x less "
          f"(mean log-prob {naive['mean']:.6f} vs {chunked['mean']:.6f})")
    report["logprob"] = {"naive": naive, "chunked": chunked, "factor": factor}
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="formula vs measured peak RSS on the CPU")
    parser.add_argument("--micro-batch", type=int, default=8, help="micro-batch of the table")
    parser.add_argument("--chunk", type=int, default=256, help="--logprob-chunk of the table")
    parser.add_argument("--lora-rank", type=int, default=64, help="LoRA rank of the table")
    parser.add_argument("--shape", choices=["3b", "7b", "crm", "check"], help="a random model of this shape")
    parser.add_argument("--out", help="--shape: the folder to write")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="--shape: where to build it")
    args = parser.parse_args()
    if args.shape:
        if not args.out:
            raise SystemExit("--shape needs --out FOLDER")
        build_random(args.shape, Path(args.out), args.device)
        print(f"wrote {args.out}")
    elif args.check:
        check()
    else:
        print_table(args.micro_batch, args.chunk, args.lora_rank)


if __name__ == "__main__":
    main()
