"""After an in-memory weight sync, the vLLM engine generates exactly what HF generate does with the same weights."""

import json

import pytest
import torch

from harness.core.generation import GenParams
from harness.core.models import load_model, load_tokenizer
from harness.core.prompts import render_prompt
from harness.engines.hf_engine import HFBackend
from harness.paths import DATA_DIR


def _perturbed(model, seed: int, scale: float = 0.05):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * p.std() * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


@pytest.fixture(scope="module")
def prompt_ids(tokenizer, eval_samples):
    return [render_prompt(tokenizer, s.prompt) for s in eval_samples]


PARAMS = GenParams(max_new_tokens=32)


def _hf(model, tokenizer, prompt_ids, params=PARAMS):
    backend = HFBackend(tokenizer)
    backend.sync_weights(model)
    return backend.generate(prompt_ids, params), backend


def test_greedy_vllm_equals_hf_after_sync(vllm_backend, tiny_model_dir, tokenizer, prompt_ids):
    params = PARAMS
    vllm_backend.sync_weights(load_model(tiny_model_dir))
    before = vllm_backend.generate(prompt_ids, params)
    # large enough to change the embedded instruct model's greedy answers, which sit on few templates
    model = _perturbed(load_model(tiny_model_dir), seed=1, scale=0.2)
    vllm_backend.sync_weights(model)
    after = vllm_backend.generate(prompt_ids, params)
    hf, _ = _hf(model, tokenizer, prompt_ids, params)
    assert [c.texts for c in after] == [c.texts for c in hf]
    assert [c.num_tokens for c in after] == [c.num_tokens for c in hf]
    changed = sum(a.texts != b.texts for a, b in zip(after, before, strict=True))
    assert changed >= 4, "the sync did not reach the engine: outputs are those of the old weights"


def test_vllm_prompt_logprobs_equal_hf_forward(vllm_backend, tiny_model_dir, tokenizer, prompt_ids, eval_samples):
    model = _perturbed(load_model(tiny_model_dir), seed=2)
    vllm_backend.sync_weights(model)
    refs = [tokenizer(s.reference, add_special_tokens=False)["input_ids"] for s in eval_samples]
    _, hf = _hf(model, tokenizer, prompt_ids[:1])
    v, h = vllm_backend.logprobs(prompt_ids, refs), hf.logprobs(prompt_ids, refs)
    assert [len(x) for x in v] == [len(r) for r in refs]
    flat_v, flat_h = torch.tensor(sum(v, [])), torch.tensor(sum(h, []))
    assert torch.allclose(flat_v, flat_h, atol=1e-3), (flat_v - flat_h).abs().max()


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_lora_adapter_is_merged_into_the_engine(vllm_backend, tiny_model_dir, tokenizer, prompt_ids, use_dora):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(3)
    config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False, use_dora=use_dora)
    model = get_peft_model(load_model(tiny_model_dir), config)
    params = PARAMS
    vllm_backend.sync_weights(model)
    hf, _ = _hf(model, tokenizer, prompt_ids, params)  # unmerged adapter, applied on the fly by PEFT
    assert [c.texts for c in vllm_backend.generate(prompt_ids, params)] == [c.texts for c in hf]
    # folding the adapter in for the sync must leave the weights being trained bit for bit as they were
    base = load_model(tiny_model_dir).state_dict()
    trained = model.get_base_model().state_dict()
    assert torch.equal(trained["model.layers.0.self_attn.q_proj.base_layer.weight"],
                       base["model.layers.0.self_attn.q_proj.weight"])


def test_each_sync_reaches_the_engines_packed_weights(vllm_backend, tiny_model_dir, prompt_ids):
    """The sync copies into the engine's own tensors and repacks the CPU matmul handles from them every time: weights
    A, then B, then A again give A's outputs exactly (a handle left holding B, or A's first copy, would not)."""
    from harness.engines.weight_sync import InPlaceSync

    a, b = load_model(tiny_model_dir), _perturbed(load_model(tiny_model_dir), seed=4, scale=0.2)
    outputs = []
    for model in (a, b, a):
        vllm_backend.sync_weights(model)
        outputs.append([c.token_ids for c in vllm_backend.generate(prompt_ids, GenParams(max_new_tokens=16,
                                                                                             sample_logprobs=True))])
    assert isinstance(vllm_backend.in_place, InPlaceSync)  # Qwen2's layout: not through vLLM's loader
    assert outputs[2] == outputs[0] and outputs[1] != outputs[0]


def test_the_copy_plan_names_what_it_cannot_map(vllm_backend, tiny_model_dir):
    """An engine parameter no training weight fills, or a training weight the engine lacks, leaves the sync on
    vLLM's loader, with the reason naming the weight; so does an architecture the plan was not checked on."""
    from harness.engines.weight_sync import InPlaceSync

    engine_model = vllm_backend.llm.llm_engine.model_executor.driver_worker.worker.model_runner.get_model()
    weights = load_model(tiny_model_dir).state_dict()
    missing = {k: v for k, v in weights.items() if k != "model.layers.1.self_attn.k_proj.weight"}
    assert InPlaceSync.build(engine_model, missing) == (
        "no training weight for the engine's model.layers.1.self_attn.qkv_proj.weight (looked for "
        "model.layers.1.self_attn.q_proj.weight, model.layers.1.self_attn.k_proj.weight, "
        "model.layers.1.self_attn.v_proj.weight)")
    extra = {**weights, "model.layers.0.mlp.extra.weight": torch.zeros(2, 2)}
    assert InPlaceSync.build(engine_model, extra) == (
        "the engine has no parameter for the training weight model.layers.0.mlp.extra.weight")
    assert "is not among the architectures" in InPlaceSync.build(torch.nn.Linear(2, 2), weights)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_lora_fold_writes_the_merged_weight(dtype):
    """Folding into the engine's tensor (one addmm per adapter) gives base + scale * B @ A, as PEFT merges it,
    in the engine's precision, and leaves the trained tensors as they were."""
    from harness.engines.weight_sync import LoraFold

    torch.manual_seed(0)
    base, b, a = torch.randn(12, 8), torch.randn(12, 2), torch.randn(2, 8)
    kept = base.clone()
    dst = torch.empty(12, 8, dtype=dtype)
    LoraFold(base, [(b, a, 0.5), (b, -a, 0.25)]).write(dst)
    expected = (base + 0.5 * b @ a - 0.25 * b @ a).to(dtype)
    assert torch.allclose(dst.float(), expected.float(), atol=1e-5 if dtype == torch.float32 else 0)
    assert torch.equal(base, kept)


def test_rollout_samples_carry_the_synced_policys_logprobs(vllm_backend, tiny_model_dir, tokenizer, prompt_ids):
    """GRPO's rollouts: sampled tokens with their logprobs, which must be the live policy's (after a sync)."""
    model = _perturbed(load_model(tiny_model_dir), seed=11)
    vllm_backend.sync_weights(model)
    params = GenParams(max_new_tokens=12, temperature=1.0, n=4, seed=5, sample_logprobs=True)
    completions = vllm_backend.generate(prompt_ids[:4], params)
    assert all(len(c.token_ids) == 4 and len(c.logprobs) == 4 for c in completions)
    assert any(len({tuple(t) for t in c.token_ids}) > 1 for c in completions)  # the group's samples differ
    _, hf = _hf(model, tokenizer, prompt_ids[:1])
    for prompt, c in zip(prompt_ids[:4], completions, strict=True):
        expected = hf.logprobs([prompt] * 4, c.token_ids)
        for got, want in zip(c.logprobs, expected, strict=True):
            assert torch.allclose(torch.tensor(got), torch.tensor(want), atol=1e-3)


def test_a_large_seeded_rollout_batch_completes_and_repeats_exactly(vllm_backend, tokenizer):
    """64 prompts x 4 seeded samples: more prompt tokens than one engine step takes, which, prefilled in chunks,
    crashed the CPU engine ("CPU Generator does not use offset"); the same seed gives the same samples again."""
    rows = [json.loads(line) for line in (DATA_DIR / "rl.jsonl").read_text(encoding="utf-8").splitlines()[:64]]
    prompts = [render_prompt(tokenizer, r["prompt"]) for r in rows]
    params = GenParams(max_new_tokens=64, temperature=1.0, n=4, seed=3, sample_logprobs=True)
    first, again = vllm_backend.generate(prompts, params), vllm_backend.generate(prompts, params)
    assert len(first) == 64 and all(len(c.token_ids) == 4 for c in first)
    assert [c.token_ids for c in first] == [c.token_ids for c in again]


def test_each_prompt_samples_from_its_own_seed_and_a_rerun_repeats(vllm_backend, tiny_model_dir, prompt_ids):
    """One seed for every request of a batch gave identical prompts identical samples (and correlated all the
    others): each prompt's seed now follows (seed, step, its index), so copies of a prompt sample apart, the same
    seed and step repeat exactly, and a prompt's samples follow its index, not the batch around it."""
    vllm_backend.sync_weights(load_model(tiny_model_dir))  # the same weights whichever test ran before
    params = GenParams(max_new_tokens=24, temperature=1.0, seed=7, sample_logprobs=True)
    batch = [prompt_ids[0]] * 8 + [prompt_ids[1]]
    first = [c.token_ids[0] for c in vllm_backend.generate(batch, params)]
    assert len({tuple(t) for t in first[:8]}) > 1
    assert [c.token_ids[0] for c in vllm_backend.generate(batch, params)] == first
    assert vllm_backend.generate([prompt_ids[0]], params, indices=[2])[0].token_ids[0] == first[2]
    assert [c.token_ids[0] for c in vllm_backend.generate(batch, params, step=1)] != first


def test_closing_a_second_engine_leaves_the_first_one_working(vllm_backend, tiny_model_dir, prompt_ids):
    """Two engines in one process share vLLM's parallel groups, which an engine's shutdown destroys: an in-process
    run closing its engine broke every later use of this shared one ("pipeline model parallel group is not
    initialized")."""
    from harness.engines.vllm_engine import VLLMBackend

    params = GenParams(max_new_tokens=8)
    before = vllm_backend.generate(prompt_ids[:2], params)
    second = VLLMBackend(tiny_model_dir, seed=0, max_model_len=256, dtype="float32")
    assert [c.token_ids for c in second.generate(prompt_ids[:2], params)] == [c.token_ids for c in before]
    second.close()
    assert [c.token_ids for c in vllm_backend.generate(prompt_ids[:2], params)] == [c.token_ids for c in before]


LORA_REQUEST_SCRIPT = """
import json
import torch
from peft import LoraConfig, get_peft_model
from harness.core.generation import GenParams
from harness.engines.vllm_engine import VLLMBackend
from harness.core.models import load_model
if __name__ == "__main__":
    model_dir, prompt_ids = {model_dir!r}, {prompt_ids!r}
    torch.manual_seed(3)
    config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False)
    model = get_peft_model(load_model(model_dir), config)
    engine = VLLMBackend(model_dir, max_model_len=256, dtype="float32", lora_rank=8)
    outputs = []
    for _ in range(2):  # a second sync must switch the engine to the new adapter
        engine.sync_weights(model)
        outputs.append([c.texts for c in engine.generate(prompt_ids, GenParams(max_new_tokens=32))])
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.mul_(-1.0)
    print(json.dumps(outputs))
"""


def test_lora_request_serving_matches_merged_weights(vllm_backend, tiny_model_dir, tokenizer, prompt_ids):
    """lora_serving=request (adapter served by vLLM, no merge) generates what the merged path does."""
    import json
    import subprocess
    import sys

    from peft import LoraConfig, get_peft_model

    from harness.paths import REPO_ROOT

    script = LORA_REQUEST_SCRIPT.format(model_dir=tiny_model_dir, prompt_ids=prompt_ids[:16])
    # its own process: an engine built with LoRA support beside the session's engine
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    served = json.loads(out.stdout.strip().splitlines()[-1])
    torch.manual_seed(3)
    config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False)
    model = get_peft_model(load_model(tiny_model_dir), config)
    merged = []
    for _ in range(2):
        vllm_backend.sync_weights(model)
        merged.append([c.texts for c in vllm_backend.generate(prompt_ids[:16], GenParams(max_new_tokens=32))])
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.mul_(-1.0)
    assert served == merged and merged[0] != merged[1]
