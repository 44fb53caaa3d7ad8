"""The CRM path on real backbones, with tiny decoder-only classifiers built from a config (Qwen2 and Llama,
random weights) and tokenizers built with the `tokenizers` library: three traps (no pad token; a
config pad id that differs from the tokenizer's; a thinking whose conclusion lies past the length limit), each
scored batched and one at a time; the pre-SFT check of stage 1 and the max length plumbed through stage 3."""
import json
import math

import pytest
import torch
from PIL import Image

from conftest import load_stage

stage1, stage3 = load_stage("01_sft_rm.py"), load_stage("03_rewards.py")

WORDS = ("how many red shapes are there ? i count the : 1 2 3 4 5 6 7 , . so So The answer is final step wait "
         "heights a b c which bar tallest or").split()
CONCLUSION = "So the answer is 7."


def build_decoder_crm(folder, kind: str) -> None:
    """A 2-layer decoder sequence classifier (hidden 32, random weights) and a tokenizer of one of three kinds:
    "eos-no-pad"  byte-level BPE with an eos and no pad token (Llama-3 / Qwen style): the pad becomes the eos;
    "unk-only"    word level with an unk and neither eos nor pad: the pad becomes the unk;
    "pad-differs" byte-level BPE with a pad token, and a config whose pad_token_id is another id (the eos).
    initializer_range 0.5 so that the random head gives scores well away from 0.5 (a wrong position shows)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (LlamaConfig, LlamaForSequenceClassification, PreTrainedTokenizerFast, Qwen2Config,
                              Qwen2ForSequenceClassification)

    if kind == "unk-only":
        vocab = {w: i for i, w in enumerate(["[UNK]"] + WORDS)}
        core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
        core.pre_tokenizer = pre_tokenizers.Whitespace()
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]")
    else:
        core = Tokenizer(models.BPE())
        core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        core.decoder = decoders.ByteLevel()
        specials = ["<|endoftext|>"] + ["<pad>"] * (kind == "pad-differs")
        trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        core.train_from_iterator([" ".join(WORDS), CONCLUSION, "The final answer is 7."] * 20, trainer)
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>",
                                            pad_token="<pad>" if kind == "pad-differs" else None)
    tokenizer.save_pretrained(folder)
    # Llama for the word-level one: AutoTokenizer picks the tokenizer class from the model type, and transformers'
    # Qwen2 tokenizer class would give it Qwen's default eos and pad, "<|endoftext|>", not in this vocabulary.
    config_class, model_class = ((LlamaConfig, LlamaForSequenceClassification) if kind == "unk-only"
                                 else (Qwen2Config, Qwen2ForSequenceClassification))
    config = config_class(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                          initializer_range=0.5, tie_word_embeddings=False, bos_token_id=None,
                          eos_token_id=tokenizer.eos_token_id, num_labels=2,
                          pad_token_id=tokenizer.eos_token_id if kind == "pad-differs" else None)
    torch.manual_seed(0)
    model_class(config).save_pretrained(folder)


@pytest.fixture(scope="module", params=["eos-no-pad", "unk-only", "pad-differs"])
def decoder_crm(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    build_decoder_crm(folder, request.param)
    return folder, request.param


def long_thinking(middle: str = "step", conclusion: str = CONCLUSION) -> str:
    """~200 words: its conclusion lies far past a 64-token premise budget."""
    return "i count the red shapes : " + " ".join([middle] + ["step"] * 200) + " " + conclusion


PAIRS = [{"question": "how many red shapes are there ?", "thinking": "i count : 1 , 2 . so the answer is 2 .",
          "answer": "2"},
         {"question": "which bar is tallest ?", "thinking": "heights : a 3 , b 5 , c 1 . so the answer is b .",
          "answer": "c"},
         {"question": "how many ?", "thinking": "1", "answer": "1"},
         {"question": "how many red shapes are there ?", "thinking": long_thinking(), "answer": "7"}]


def test_the_pad_id_the_crm_uses_is_the_tokenizer_s(decoder_crm):
    """load_crm gives a tokenizer without a pad token one (eos, else unk) and the model the tokenizer's pad id; a
    padded batch then scores each pair as it scores alone. Loaded naively, the trap is there."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder, kind = decoder_crm
    crm, tok = stage1.load_crm(str(folder), "cpu")
    expected_pad = {"eos-no-pad": "<|endoftext|>", "unk-only": "[UNK]", "pad-differs": "<pad>"}[kind]
    assert tok.pad_token == expected_pad and crm.config.pad_token_id == tok.pad_token_id
    assert tok.padding_side == "right"
    batched = stage1.crm_scores(crm, tok, PAIRS, "cpu", batch_size=len(PAIRS), max_length=128)
    alone = [stage1.crm_scores(crm, tok, [p], "cpu", max_length=128)[0] for p in PAIRS]
    assert batched == pytest.approx(alone, abs=1e-5)
    assert max(batched) - min(batched) > 0.01  # the pairs really score differently: the check can see a mix-up

    raw_tok = AutoTokenizer.from_pretrained(folder)
    raw = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    if kind == "pad-differs":  # the trap: the classifier looks for the config's pad id, absent from the input
        assert raw.config.pad_token_id != raw_tok.pad_token_id
        batch = stage1.encode_pairs(raw_tok, [PAIRS[2], PAIRS[0]], "cpu", 128)  # the first one is padded
        assert batch["attention_mask"][0].sum() < batch["attention_mask"][1].sum()
        with torch.no_grad():
            naive = torch.softmax(raw(**batch).logits, -1)[:, 1]  # (2,)
        assert abs(naive[0].item() - alone[2]) > 1e-3  # it scored a pad position
        assert naive[1].item() == pytest.approx(alone[0], abs=1e-5)  # the unpadded one is right
    else:  # the trap: padding a batch needs a pad token
        assert raw_tok.pad_token is None
        with pytest.raises(ValueError, match="padding token"):
            stage1.encode_pairs(raw_tok, PAIRS[:2], "cpu", 128)


def test_a_long_thinking_keeps_its_conclusion(decoder_crm):
    """Past --crm-max-length the premise keeps the question and the end of the thinking: the conclusion is what the
    CRM sees, the cut middle is not (changing it leaves the score as it was; changing the conclusion does not)."""
    folder, _ = decoder_crm
    crm, tok = stage1.load_crm(str(folder), "cpu")
    max_length = 96
    pair = PAIRS[3]
    ids = stage1.encode_pairs(tok, [pair], "cpu", max_length)["input_ids"][0]
    assert len(tok(pair["question"] + " " + pair["thinking"])["input_ids"]) > 2 * max_length  # far past the limit
    assert len(ids) == max_length
    seen = stage1.squashed(tok.decode(ids, skip_special_tokens=True))
    assert seen.startswith(stage1.squashed(pair["question"]))  # the question stays
    assert stage1.squashed(CONCLUSION) in seen and seen.endswith(stage1.squashed("The final answer is 7."))

    middle = {**pair, "thinking": long_thinking(middle="wait")}  # differs only in a word the cut drops
    other = {**pair, "thinking": long_thinking(conclusion="So the answer is 3.")}
    batch = stage1.encode_pairs(tok, [pair, middle, other], "cpu", max_length)["input_ids"]  # (3, 96)
    assert torch.equal(batch[0], batch[1]) and not torch.equal(batch[0], batch[2])  # the cut part is not seen
    score = stage1.crm_scores(crm, tok, [pair, middle, other], "cpu", max_length=max_length)
    alone = [stage1.crm_scores(crm, tok, [p], "cpu", max_length=max_length)[0] for p in (pair, middle, other)]
    assert score == pytest.approx(alone, abs=1e-5)
    logit = [math.log(p) - math.log1p(-p) for p in score]  # the probabilities of a random head can sit near 0 or 1
    assert logit[1] == logit[0] and abs(logit[2] - logit[0]) > 1e-3  # the conclusion is seen


def test_stage1_checks_the_crm_before_any_sft(decoder_crm, monkeypatch):
    """check_crm passes on every fixed backbone, and stops on what it exists for: a length past the model's
    positions, and (the pad fix undone: the config's pad id kept) a batch that scores otherwise than alone."""
    folder, kind = decoder_crm
    cfg = stage1.Config(device="cpu", crm_max_length=128)
    stage1.check_crm(cfg, str(folder))  # no SystemExit
    with pytest.raises(SystemExit, match=r"--crm-max-length 300: .* at most 256 positions"):
        stage1.check_crm(stage1.Config(device="cpu", crm_max_length=300), str(folder))
    if kind != "pad-differs":
        return
    fixed = stage1.load_crm

    def without_the_pad_fix(path, device, dtype=torch.float32):  # a load_crm that keeps the config's id
        model, tok = fixed(path, device, dtype)
        model.config.pad_token_id = tok.eos_token_id
        return model, tok

    monkeypatch.setattr(stage1, "load_crm", without_the_pad_fix)
    with pytest.raises(SystemExit, match="in a padded batch but"):
        stage1.check_crm(cfg, str(folder))


def test_a_broken_crm_stops_stage1_before_the_policy_loads(tmp_path, monkeypatch):
    """Real data, a --crm folder with no model in it: the error names --crm, and no policy was ever loaded."""
    Image.new("RGB", (56, 56), "white").save(tmp_path / "a.png")
    target = "<think>t</think><answer>1</answer>"
    rows = [{"image": "a.png", "question": f"q{i}?", "answer": str(i), "target": target} for i in range(4)]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    judged = [{"question": "q", "thinking": "t", "answer": "1", "label": label} for label in (0, 1, 1)]
    (tmp_path / "judged.jsonl").write_text("".join(json.dumps(r) + "\n" for r in judged))
    (tmp_path / "empty_crm").mkdir()

    def no_model_please(*args, **kwargs):
        pytest.fail("the policy was loaded before the CRM was checked")

    monkeypatch.setattr(stage1, "load_policy", no_model_please)
    cfg = stage1.Config(runs_dir=str(tmp_path / "runs"), dataset=str(tmp_path / "data.jsonl"),
                        target_column="target", crm=str(tmp_path / "empty_crm"),
                        crm_data=str(tmp_path / "judged.jsonl"), sft_batch_size=2, device="cpu")
    with pytest.raises(SystemExit, match="--crm .*empty_crm: cannot load it"):
        stage1.main(cfg)


def test_the_max_length_reaches_stage3(tmp_path):
    """--crm-max-length through stage 3: unset, the CRM's saved length (its tokenizer's model_max_length, which
    stage 1 sets) is used; set, it is the cut; consistency_rewards and score_completions agree with crm_scores."""
    build_decoder_crm(tmp_path, "eos-no-pad")
    crm, tok = stage1.load_crm(str(tmp_path), "cpu")
    tok.model_max_length = 80  # as stage 1 saves it
    assert stage1.crm_max_length(tok) == 80
    assert len(stage1.encode_pairs(tok, [PAIRS[3]], "cpu")["input_ids"][0]) == 80
    text = f"<think>{PAIRS[3]['thinking']}</think><answer>7</answer>"
    question = PAIRS[3]["question"]
    for max_length, expected_length in [(None, 80), (120, 120)]:
        want = stage1.crm_scores(crm, tok, [PAIRS[3]], "cpu", max_length=expected_length)[0]
        got = stage3.consistency_rewards(crm, tok, [question], [text], 1.0, "cpu", max_length=max_length)[0]
        cfg = stage3.Config(device="cpu", crm_max_length=max_length)
        record = stage3.score_completions([text], [question], ["7"], crm, tok, cfg, False)[0]
        assert got == pytest.approx(want, abs=1e-6) and record["consistency"] == pytest.approx(want, abs=1e-6)
    far = stage1.crm_scores(crm, tok, [PAIRS[3]], "cpu", max_length=80)[0]
    longer = stage1.crm_scores(crm, tok, [PAIRS[3]], "cpu", max_length=120)[0]
    assert abs(far - longer) > 1e-5  # the length matters
    with pytest.raises(SystemExit, match="--crm-max-length 64"):
        stage3.check_config(stage3.Config(crm_max_length=64))
