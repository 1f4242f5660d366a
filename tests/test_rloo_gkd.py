"""RLOO and GKD (on-policy distillation) with their samples drawn from the in-loop vLLM engine: the samples their
trainers take are the synced policy's (sampling logprobs checked against the policy, as for GRPO in
test_generation_parity). Whole runs, with in-loop evaluation, rewards and GKD's coin, are in test_distributed_rl
(two processes: the same trainers, plus the cross-rank rollout)."""

from pathlib import Path

import pytest
import torch

from experiments import load_class
from harness.core.errors import ConfigError
from harness.core.models import load_model, load_tokenizer
from harness.core.prompts import render_prompt
from harness.core.records import read_records
from harness.engines.hf_engine import HFBackend
from harness.rl.rollouts import VLLMRollout
from harness.training.overrides import apply_overrides


def _perturbed(model, seed: int):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * p.std() * torch.randn_like(p))
    return model


def test_rloo_and_gkd_sample_from_the_synced_policy(tmp_path, vllm_backend, tiny_model_dir):
    """The trainers' generation hooks go through the engine after a sync with the trainer's (changed) model: they
    return the engine's samples, whose sampling logprobs equal the policy's own."""
    tokenizer = load_tokenizer(tiny_model_dir)
    prompt_ids = [render_prompt(tokenizer, p) for p in ("What is the capital of France?", "How many legs?")]
    for name, seed in (("rloo_qwen", 11), ("gkd_qwen", 12)):
        exp = apply_overrides(load_class(name), [f"teacher={tiny_model_dir}"] if name == "gkd_qwen" else [])
        model = _perturbed(load_model(tiny_model_dir), seed=seed)
        rows = exp.train_rows(read_records(exp.train_data))[:8]
        trainer = exp.build_trainer(model, tokenizer, rows, [], str(tmp_path / name), backend=vllm_backend)
        if name == "rloo_qwen":
            group = exp.num_generations
            hooked = trainer._generate_single_turn([ids for ids in prompt_ids for _ in range(group)], None, {})
        else:
            group = 1
            padded = tokenizer.pad({"input_ids": prompt_ids}, padding_side="left", return_tensors="pt")
            batch = trainer._student_samples({"prompts": padded["input_ids"],
                                              "prompt_attention_mask": padded["attention_mask"]})
            width = padded["input_ids"].shape[1]
            assert torch.equal(batch["input_ids"][:, :width], padded["input_ids"])
            assert (batch["labels"][:, :width] == -100).all()
            hooked = [row[width:][mask[width:].bool()].tolist()
                      for row, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True)]
        # the same seed at the same step: the engine draws the hooks' samples again, now with their logprobs
        rollout = VLLMRollout(vllm_backend, tokenizer, exp.max_new_tokens, exp.temperature, exp.seed)
        completions = rollout.sample(prompt_ids, group, trainer)
        assert hooked == [ids for c in completions for ids in c.token_ids] and all(hooked)
        hf = HFBackend(tokenizer)
        hf.sync_weights(model)
        for prompt, c in zip(prompt_ids, completions, strict=True):
            for got, want in zip(c.logprobs, hf.logprobs([prompt] * group, c.token_ids), strict=True):
                assert torch.allclose(torch.tensor(got), torch.tensor(want), atol=1e-3), name


def test_gkd_and_rloo_check_their_fields():
    with pytest.raises(ConfigError, match=r"lmbda.*must be in \[0, 1\]"):
        apply_overrides(load_class("gkd_qwen"), ["lmbda=1.5"])
    with pytest.raises(ConfigError, match="backend='hf': rollouts come from the vLLM engine"):
        apply_overrides(load_class("gkd_qwen"), ["backend=hf"])
    with pytest.raises(ConfigError, match="batch_size must be a multiple of num_generations"):
        apply_overrides(load_class("rloo_qwen"), ["batch_size=6", "num_generations=4"])


@pytest.mark.parametrize("name", ["gkd_qwen", "distill_qwen"])
def test_a_teacher_with_another_vocabulary_is_refused_before_the_run(name, tiny_model_dir, tmp_path, monkeypatch,
                                                                     capsys):
    """The KL compares teacher and student token by token: a teacher with another vocabulary crashed mid-run.
    Refused before any MLflow run, naming both models and their vocabulary sizes (or, same size, their tokenizers)."""
    import json
    import shutil

    from mlflow.tracking import MlflowClient

    from harness.commands.cli import main

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    student_size = json.loads((Path(tiny_model_dir) / "config.json").read_text())["vocab_size"]
    wider = tmp_path / "wider-teacher"
    wider.mkdir()
    config = json.loads((Path(tiny_model_dir) / "config.json").read_text())
    (wider / "config.json").write_text(json.dumps({**config, "vocab_size": student_size + 64}))
    args = ["max_steps=1", f"output_dir={tmp_path / 'outputs'}"]
    assert main(["run", name, f"teacher={wider}", *args]) == 2
    err = capsys.readouterr().err
    assert (f"teacher {wider} ({wider}) has a vocabulary of {student_size + 64} tokens (vocab_size) and the student "
            f"tiny-qwen2 ({tiny_model_dir}) {student_size}") in err

    # the same logits width, but another tokenizer: the same id is another token
    renamed = tmp_path / "renamed-teacher"
    shutil.copytree(tiny_model_dir, renamed, ignore=shutil.ignore_patterns("*.safetensors"))  # no weights needed
    vocab = json.loads((renamed / "tokenizer.json").read_text())
    model = vocab["model"]["vocab"]
    first, second = sorted(model, key=model.get)[100:102]
    model[first], model[second] = model[second], model[first]
    (renamed / "tokenizer.json").write_text(json.dumps(vocab))
    assert main(["run", name, f"teacher={renamed}", *args]) == 2
    assert "have" in (err := capsys.readouterr().err) and "different tokenizers" in err and str(renamed) in err
    assert MlflowClient(uri).get_experiment_by_name(name) is None  # refused before any run opened
