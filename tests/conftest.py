"""Shared fixtures: one tiny stage-1 run (offline, ~20 s) that the stage 2-6 tests reuse."""
import importlib
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download anything
os.environ.setdefault("TQDM_DISABLE", "1")  # keep test logs short
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the stages import each other by file name with importlib.import_module


def load_stage(filename: str):
    """A stage by file name ("02_rollout.py"): the same module object the stages import from each other."""
    return importlib.import_module(Path(filename).stem)


@pytest.fixture(scope="session")
def stage1():
    return load_stage("01_sft_rm.py")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, stage1):
    """runs/<tmp>/tiny: data, a briefly fine-tuned policy, a briefly trained CRM, stage1.json."""
    runs_dir = tmp_path_factory.mktemp("runs")
    cfg = stage1.Config(run="tiny", runs_dir=str(runs_dir), n_train=300, n_test=40, sft_steps=60,
                        sft_batch_size=16, crm_steps=60, eval_n=20, crm_rollout_prompts=20, max_new_tokens=48, device="cpu")
    summary = stage1.main(cfg)
    return {"cfg": cfg, "dir": runs_dir / "tiny", "summary": summary}


@pytest.fixture(scope="session")
def tiny_policy(tiny_run, stage1):
    model, processor = stage1.load_policy(str(tiny_run["dir"] / "policy_sft"), "cpu")
    return model.eval(), processor


@pytest.fixture(scope="session")
def test_split(tiny_run):
    from datasets import load_from_disk
    return load_from_disk(str(tiny_run["dir"] / "data"))["test"]


def pytest_configure(config):
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_qwen25(tiny_run, tmp_path_factory):
    """A tiny random Qwen2.5-VL with the tiny run's tokenizer, saved like a hub checkpoint."""
    from transformers import (AutoProcessor, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration,
                              Qwen2_5_VLProcessor)

    folder = tmp_path_factory.mktemp("qwen25")
    base = AutoProcessor.from_pretrained(tiny_run["dir"] / "policy_sft")
    tok = base.tokenizer
    ids = tok.convert_tokens_to_ids
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e6},
                         initializer_range=0.1, bos_token_id=None, eos_token_id=ids("<|im_end|>"),
                         pad_token_id=ids("<|endoftext|>")),
        vision_config=dict(depth=2, hidden_size=32, out_hidden_size=64, intermediate_size=64, num_heads=2,
                           fullatt_block_indexes=[1], window_size=56, patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=True)
    torch.manual_seed(0)
    Qwen2_5_VLForConditionalGeneration(config).save_pretrained(folder)
    Qwen2_5_VLProcessor(image_processor=base.image_processor, tokenizer=tok, video_processor=base.video_processor,
                        chat_template=base.chat_template).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=["qwen2-vl", "qwen2.5-vl"])
def policy(request, tiny_policy, tiny_qwen25):
    """Each test that asks for `policy` runs twice: on the tiny Qwen2-VL and on the tiny Qwen2.5-VL."""
    if request.param == "qwen2-vl":
        return tiny_policy
    model, processor = load_stage("01_sft_rm.py").load_policy(str(tiny_qwen25), "cpu")
    return model.eval(), processor


def copy_of_tiny_run(tiny_run, runs_dir: Path) -> Path:
    """A copy of the tiny stage-1 run as runs_dir/tiny, so the runs a test makes touch no other test's folder."""
    for name in ("data", "policy_sft", "crm", "crm_init"):
        shutil.copytree(tiny_run["dir"] / name, runs_dir / "tiny" / name)
    shutil.copy(tiny_run["dir"] / "stage1.json", runs_dir / "tiny" / "stage1.json")
    return runs_dir / "tiny"
