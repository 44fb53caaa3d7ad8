"""bench/memory_plan.py: parameter counts of the real configs, a hand-computed plan row, and the per-layer
activation formula against the tensors autograd really saves (fp32 and bf16 autocast, full and LoRA)."""
import importlib
import sys

import pytest
import torch

from conftest import ROOT, load_stage

sys.path.insert(0, str(ROOT / "bench"))
mp = importlib.import_module("memory_plan")
stage5 = load_stage("05_grpo_train.py")


def test_meta_parameter_counts_match_the_published_sizes():
    s3, s7 = mp.shape("3b"), mp.shape("7b")
    # 3B language model: embedding 151,936 x 2,048 = 311,164,928 (tied: it is the lm_head too); a decoder
    # layer: q 2048*2048 + 2048 = 4,196,352; k, v 2048*256 + 256 = 524,544 each; o 2048*2048 = 4,194,304;
    # gate, up, down 3 * 2048*11008 = 67,633,152; two norms 4,096 -> 77,076,992; x 36 = 2,774,771,712;
    # final norm 2,048
    assert s3.language_params == 311_164_928 + 2_774_771_712 + 2_048 == 3_085_938_688
    assert s3.lm_head_params == 0
    # 3B vision: patch conv 3*2*14*14*1280 = 1,505,280; a block: qkv 1280*3840 + 3840 = 4,919,040,
    # proj 1,639,680, gate and up 2 * (1280*3420 + 3420) = 8,762,040, down 3420*1280 + 1280 = 4,378,880,
    # norms 2,560 -> 19,702,200; x 32 = 630,470,400; merger: norm 1,280 + 5120*5120 + 5120 + 5120*2048 + 2048
    # = 36,708,608
    assert s3.vision_params == 1_505_280 + 630_470_400 + 36_708_608 == 668_684_288
    # the published sizes (the hub's model pages): 3.75B and 8.29B parameters; 7B's untied lm_head 152,064 x
    # 3,584
    assert round(s3.total / 1e9, 2) == 3.75 and s3.total == 3_754_622_976
    assert round(s7.total / 1e9, 2) == 8.29 and s7.lm_head_params == 152_064 * 3_584
    # ModernBERT-large: 395M, plus the 2-label head stage 1 gives it
    assert round(mp.crm_params() / 1e6) == 396
    # full fine-tuning, frozen vision tower: fp32 gradients (4 B) and AdamW m, v (8 B) for the language model
    p = mp.plan("3b", 0, 8)
    assert p["gradients"] == 4 * 3_085_938_688 and p["AdamW states"] == 8 * 3_085_938_688


def test_lora_count_equals_peft_on_the_meta_model():
    # per 3B layer, r (in + out) for q (2048 + 2048), k and v (2048 + 256), o (2048 + 2048), gate and up
    # (2048 + 11008), down (11008 + 2048): 64 * 51,968 = 3,325,952; x 36 layers = 119,734,272
    assert mp.lora_params("3b", 64) == 64 * 51_968 * 36 == 119_734_272
    model = stage5.add_lora(stage5.Config(lora_rank=64), mp.meta_model("3b"))  # stage 5's own targets
    assert sum(p.numel() for n, p in model.named_parameters() if "lora_" in n) == 119_734_272
    assert not any("visual" in n for n, _ in model.named_parameters() if "lora_" in n)  # language model only


def test_kv_cache_of_the_7b_rollout_by_hand():
    # 2 (k and v) x 28 layers x 64 rows (8 prompts x G 8) x 4 kv heads x 128 head dim x (320 + 1,024) tokens
    # x 2 B: 2 * 28 = 56; * 64 = 3,584; * 512 = 1,835,008; * 1,344 = 2,466,250,752; * 2 = 4,932,501,504 (4.9 GB)
    assert mp.plan("7b", 64, 8)["rollout KV cache"] == 4_932_501_504


def saved_bytes_per_token(regime: str, h: int = 64, i: int = 160, heads: int = 4, kv_heads: int = 2,
                          rows: int = 2, tokens: int = 37) -> tuple[float, float]:
    """Bytes autograd saves inside decoder layer 1 of a tiny Qwen2.5-VL, per token: (linear in T, per T^2).
    tokens = 37, a prime that divides no weight's size, tells activations (numel % T == 0) from weights."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    config = {**mp.CHECK_CONFIG, "vocab_size": 512, "hidden_size": h, "intermediate_size": i,
              "num_hidden_layers": 3, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
              "bos_token_id": 500, "eos_token_id": 501,
              "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
              "vision_config": {**mp.CHECK_CONFIG["vision_config"], "out_hidden_size": h}}
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(mp.qwen_config(config))
    if regime == "lora bf16 base":
        model = model.to(torch.bfloat16)  # the frozen base in bf16; peft's adapters stay fp32
    if regime.startswith("lora"):
        model = stage5.add_lora(stage5.Config(lora_rank=8), model)
    text_model = mp.stage1.unwrap(model).model.language_model
    excluded, saved, inside = set(), {}, [False]

    def enter(module, args, kwargs):  # the layer's input, mRoPE cos/sin and the mask are not the layer's own
        shared = [*args, kwargs.get("hidden_states"), *kwargs.get("position_embeddings", ()),
                  kwargs.get("attention_mask")]
        excluded.update(t.untyped_storage().data_ptr() for t in shared if torch.is_tensor(t))
        inside[0] = True

    def leave(module, args, output):
        inside[0] = False

    def pack(t):
        storage = t.untyped_storage()
        if inside[0] and storage.data_ptr() not in excluded and t.numel() % tokens == 0:
            saved[storage.data_ptr()] = (storage.nbytes(), t.numel() % (tokens * tokens) == 0)
        return t

    def unpack(t):
        return t

    text_model.layers[1].register_forward_pre_hook(enter, with_kwargs=True)
    text_model.layers[1].register_forward_hook(leave)
    ids = torch.randint(0, 400, (rows, tokens))
    attention = torch.ones(rows, tokens, dtype=torch.long)
    attention[0, :3] = 0  # left padding: SDPA gets a mask, as in a real batch
    bf16 = regime in ("full bf16 autocast", "lora bf16 base")
    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            text_model(input_ids=ids, attention_mask=attention)
    linear = sum(n for n, square in saved.values() if not square) / (rows * tokens)
    return linear, sum(n for n, square in saved.values() if square) / (rows * tokens * tokens)


@pytest.mark.parametrize("regime, residual, compute, norm_weight, lora_rank", [
    ("full fp32", 4, 4, 4, 0),  # the CPU (and --check)
    ("lora fp32", 4, 4, 4, 8),
    ("full bf16 autocast", 4, 2, 4, 0),  # CUDA full fine-tuning: fp32 master weights, bf16 matmuls
    ("lora bf16 base", 2, 2, 2, 8),  # CUDA LoRA: bf16 base, fp32 adapters
])
def test_layer_formula_equals_what_autograd_saves(regime, residual, compute, norm_weight, lora_rank):
    linear, square = saved_bytes_per_token(regime)
    expected = mp.layer_saved_bytes(64, 160, 4, 32, residual, compute, norm_weight, norm_trains=lora_rank == 0,
                                    repeat_kv=True, lora_rank=lora_rank, lora_modules=7 if lora_rank else 0)
    assert linear == expected
    assert square == compute  # SDPA's additive mask (b, 1, T, T) in the compute dtype: plan() adds C T per token
    if regime == "full fp32":
        # h 64, i 160, 4 heads. By hand: the first norm's normalised x 4 h; the second norm's fp32 input and
        # normalised x 8 h; two rsqrt 8; the norm outputs (one shared by q, k, v, one by gate, up) 8 h; q and the
        # repeated k, v 12 h; the attention output 4 h; log-sum-exp 4 heads x 4 B; MLP 4 tensors x 4 B x i:
        # 36 h + 16 i + 24 = 2,304 + 2,560 + 24 = 4,888 bytes per token
        assert expected == 36 * 64 + 16 * 160 + 24 == 4_888
