"""A LoRA parent folded into full weights once (training/lineage.py model_directory), also when two sweep workers
resolve the same `model=run:...` parent at the same moment."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from harness.training.lineage import MERGED, SELECTION, RunCheckpoint, model_directory


def test_two_workers_resolving_one_lora_parent_merge_it_once_and_share_it(tiny_model_dir, tmp_path, capsys):
    best = tmp_path / "run" / "best"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)  # nonzero: merging shows
    get_peft_model(model, lora).save_pretrained(best)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(best)
    (best / SELECTION).write_text(json.dumps({"metric": "eval/x", "mode": "max", "step": 3, "value": 1.0}))
    ckpt = RunCheckpoint("a" * 32, "sft_qwen", best, "eval/x", "max", 3, 1.0, tiny_model_dir, {}, {})

    # each thread opens the lock file itself, so they contend for it as two processes would
    with ThreadPoolExecutor(2) as pool:
        paths = list(pool.map(lambda _: model_directory(ckpt), range(2)))
    merged = best.with_name(MERGED)
    assert paths == [merged, merged]
    assert capsys.readouterr().out.count("[model] folding run") == 1  # the second waited and reused it
    assert (merged / SELECTION).read_text() == (best / SELECTION).read_text()
    assert sorted(p.name for p in merged.parent.iterdir()) == [f".{MERGED}.lock", "best", MERGED]  # no leftovers
    base = load_file(f"{tiny_model_dir}/model.safetensors")
    folded = load_file(merged / "model.safetensors")
    key = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(folded[key], base[key].float())  # the adapter is in the weights

    # a later call reuses it; a changed best/ (a resumed parent) is folded again, in place
    assert model_directory(ckpt) == merged and "folding" not in capsys.readouterr().out
    (best / SELECTION).write_text(json.dumps({"metric": "eval/x", "mode": "max", "step": 5, "value": 2.0}))
    assert model_directory(ckpt) == merged and capsys.readouterr().out.count("[model] folding run") == 1
    assert json.loads((merged / SELECTION).read_text())["step"] == 5
    assert sorted(p.name for p in merged.parent.iterdir()) == [f".{MERGED}.lock", "best", MERGED]
