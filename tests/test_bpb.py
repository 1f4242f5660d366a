"""Bits per byte of the eval references (the perplexity evaluator's `bpb`): lm-eval's definition, checked against
lm-eval's own aggregation and a direct forward pass of the tiny model, and its error bar and paired test."""

import math
from dataclasses import replace

import pytest
import torch
from lm_eval.api.metrics import bits_per_byte as lm_eval_bits_per_byte
from lm_eval.api.task import ConfigurableTask

from evaluators import EvalContext
from evaluators.perplexity import Perplexity, byte_stats, reference_ids
from evaluators.uncertainty import STATS_SUFFIX, error_bars, paired_tests
from harness.core.models import load_model, load_tokenizer
from harness.core.prompts import render_prompt
from harness.engines.hf_engine import HFBackend


def test_bytes_are_the_scored_reference_text_leading_space_and_multibyte_characters_included():
    stats = byte_stats([[-1.0, -2.0], [-0.5]], [" café", "☕"])
    assert stats == [[3.0, 6.0], [0.5, 3.0]]  # " café": space 1 + c a f 3 + é 2; ☕: 3 bytes
    assert Perplexity.corpus_score("bpb", [3.5, 9.0]) == pytest.approx(3.5 / (math.log(2) * 9))


@pytest.fixture(scope="module")
def scored(tiny_model_dir, eval_samples):
    """The tiny model's perplexity evaluation (HF backend) of the 32 eval samples and two with a leading space and
    multi-byte characters in the reference; and a second evaluation by the same model with perturbed weights."""
    tokenizer = load_tokenizer(tiny_model_dir)
    samples = [*eval_samples, replace(eval_samples[0], id="space", reference=" café au lait ☕"),
               replace(eval_samples[1], id="spaces", reference="  Grüße\n")]
    prompt_ids = [render_prompt(tokenizer, s.prompt) for s in samples]
    model = load_model(tiny_model_dir).eval()
    backend = HFBackend(tokenizer)
    backend.sync_weights(model)
    ctx = EvalContext(samples, backend=backend, prompt_ids=prompt_ids, tokenizer=tokenizer)
    base = Perplexity().evaluate(ctx)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    backend.sync_weights(model)
    new = Perplexity().evaluate(ctx)
    return tokenizer, tiny_model_dir, samples, prompt_ids, base, new


def test_bpb_is_lm_evals_bits_per_byte_aggregation_of_the_same_logliks(scored):
    tokenizer, _, samples, _, base, _ = scored
    items = [(-nll, ConfigurableTask.count_bytes(s.reference))
             for (nll, _), s in zip(base.corpus_stats["bpb"], samples, strict=True)]
    assert base.metrics["bpb"] == pytest.approx(lm_eval_bits_per_byte(items), rel=1e-12)
    # the bytes counted are those of the text scored: the references' tokens decode back to them, spaces and all
    for ids, s in zip(reference_ids(tokenizer, [s.reference for s in samples]), samples, strict=True):
        assert tokenizer.decode(ids) == s.reference
    # the loglik is the perplexity's: the two metrics are one scoring
    tokens = sum(n for _, n in base.corpus_stats["perplexity"])
    nll = sum(x for x, _ in base.corpus_stats["perplexity"])
    assert base.metrics["perplexity"] == pytest.approx(math.exp(nll / tokens))
    assert [x for x, _ in base.corpus_stats["bpb"]] == [x for x, _ in base.corpus_stats["perplexity"]]
    assert 0.5 < base.metrics["bpb"] < 20


def test_bpb_matches_a_direct_forward_pass_within_1e_3(scored):
    tokenizer, model_dir, samples, prompt_ids, base, _ = scored
    model = load_model(model_dir).eval()  # the unperturbed weights
    nll, nbytes, per = 0.0, 0, []
    with torch.no_grad():
        for s, prompt in zip(samples, prompt_ids, strict=True):
            ref = tokenizer(s.reference, add_special_tokens=False)["input_ids"]
            logp = torch.log_softmax(model(torch.tensor([prompt + ref])).logits[0].double(), dim=-1)
            own = -sum(logp[len(prompt) - 1 + i, t].item() for i, t in enumerate(ref))
            nll += own
            nbytes += len(s.reference.encode("utf-8"))
            per.append(own / math.log(2) / len(s.reference.encode("utf-8")))
    assert base.metrics["bpb"] == pytest.approx(nll / nbytes / math.log(2), abs=1e-3)
    assert base.per_sample["bpb"] == pytest.approx(per, abs=1e-3)


def _table(samples, result) -> dict:
    """The eval table as the in-loop evaluation writes it (harness.training.inloop.Evaluation.run)."""
    table = {"id": [s.id for s in samples], "prompt": [s.prompt for s in samples]}
    table.update({f"perplexity/{k}": v for k, v in result.per_sample.items()})
    table.update({f"perplexity/{k}{STATS_SUFFIX}": v for k, v in result.corpus_stats.items()})
    return table


def test_bpb_has_an_error_bar_and_a_paired_test(scored):
    _, _, samples, _, base, new = scored
    base_table, new_table = _table(samples, base), _table(samples, new)
    bars = error_bars(Perplexity, base_table)
    assert bars["bpb_ci_low"] < base.metrics["bpb"] < bars["bpb_ci_high"] and bars["bpb_se"] > 0
    tests = paired_tests({"perplexity": Perplexity}, base_table, new_table)
    bpb = tests["eval/perplexity/bpb"]
    assert (bpb.base, bpb.new, bpb.n) == (pytest.approx(base.metrics["bpb"]), pytest.approx(new.metrics["bpb"]),
                                          len(samples))
    assert bpb.delta == pytest.approx(new.metrics["bpb"] - base.metrics["bpb"])
    assert bpb.low <= bpb.delta <= bpb.high
    assert new.metrics["bpb"] != pytest.approx(base.metrics["bpb"], abs=1e-3)  # the perturbation moved it
