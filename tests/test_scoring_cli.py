"""`python -m harness score ...`: saved generations scored offline, one JSON object on the last line."""

import json
import math
import subprocess
import sys

import pytest

from harness.commands.cli import main
from harness.paths import REPO_ROOT


def _score(capsys, *args) -> dict:
    """`harness score` through the CLI's entry point in this process (test_missing_prediction_is_named runs it as a
    subprocess): its exit status and the JSON object on its last line."""
    capsys.readouterr()
    code = main(["score", *args])
    out, err = capsys.readouterr()
    assert code == 0, err[-2000:]
    return json.loads(out.strip().splitlines()[-1])


def _write(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.mark.slow  # in this process, but the first rouge loads jieba's dictionary (seconds)
def test_bleu_and_rouge_from_a_samples_file(tmp_path, capsys):
    samples = _write(tmp_path / "s.jsonl", [
        {"prompt": "q", "reference": "北京是中国的首都", "prediction": "北京是首都"},
        {"prompt": "q", "reference": "the cat sat on a mat", "prediction": "the cat sat on a mat"},
    ])
    rouge = _score(capsys, "rouge", "--samples", samples)
    assert rouge["rouge1"] == pytest.approx((75.0 + 100.0) / 2, abs=1e-4)  # see test_metrics for 75
    bleu = _score(capsys, "bleu", "--samples", samples)
    assert set(bleu) == {"bleu", "bleu4"} and 0 < bleu["bleu"] < 100


@pytest.mark.slow
def test_missing_prediction_is_named(tmp_path):
    samples = _write(tmp_path / "s.jsonl", [{"prompt": "q", "reference": "r"}])
    out = subprocess.run([sys.executable, "-m", "harness", "score", "bleu", "--samples", samples], cwd=REPO_ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 2 and f"{samples} line 1: field 'prediction' is missing" in out.stderr


def test_perplexity_prefers_the_right_reference(tmp_path, tiny_model_dir, capsys):
    rows = [json.loads(line) for line in (REPO_ROOT / "data" / "eval.jsonl").read_text().splitlines()[:32]]
    right = _write(tmp_path / "right.jsonl", [{"prompt": r["prompt"], "reference": r["reference"]} for r in rows])
    shuffled = _write(tmp_path / "wrong.jsonl", [{"prompt": r["prompt"], "reference": s["reference"]}
                                                 for r, s in zip(rows, rows[1:] + rows[:1], strict=True)])
    text = _write(tmp_path / "text.jsonl", [{"text": r["prompt"] + " " + r["reference"]} for r in rows])
    ppl_right = _score(capsys, "perplexity", "--samples", right, "--model", "tiny-qwen2")["perplexity"]
    ppl_wrong = _score(capsys, "perplexity", "--samples", shuffled, "--model", tiny_model_dir)["perplexity"]
    ppl_text = _score(capsys, "perplexity", "--samples", text, "--model", "tiny-qwen2")["perplexity"]
    assert 1 < ppl_right < ppl_wrong / 2, (ppl_right, ppl_wrong)
    assert math.isfinite(ppl_text) and ppl_text > 1


def test_case4_samples_file_with_bad_bytes_names_file_and_line(tmp_path, capsys):
    samples = tmp_path / "s.jsonl"
    row = json.dumps({"prompt": "q", "reference": "café", "prediction": "café"}, ensure_ascii=False).encode()
    samples.write_bytes(b"\xef\xbb\xbf" + row + b"\n" + row[:row.index(b"\xc3") + 1])  # BOM; cut in "é"
    assert main(["score", "bleu", "--samples", str(samples)]) == 2
    err = capsys.readouterr().err
    assert f"{samples} line 2: not UTF-8 text (unexpected end of data: byte 0xc3 at byte offset" in err
    samples.write_bytes(b"\xef\xbb\xbf" + row + b"\n")
    assert main(["score", "bleu", "--samples", str(samples)]) == 0


def test_reward_accuracy_needs_a_reward_model_and_scores_the_pairs_with_it(tmp_path, tiny_model_dir, capsys):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from evaluators.reward_accuracy import reward_scores

    rows = [json.loads(line) for line in (REPO_ROOT / "data" / "preference_eval.jsonl").read_text().splitlines()[:8]]
    pairs = _write(tmp_path / "pairs.jsonl", rows)
    # no model, and a language model (no score head): refused by name, before anything is loaded
    assert main(["score", "reward_accuracy", "--samples", pairs]) == 2
    assert "score reward_accuracy scores with a reward model: pass --model" in capsys.readouterr().err
    assert main(["score", "reward_accuracy", "--samples", pairs, "--model", tiny_model_dir]) == 2
    assert "is a Qwen2ForCausalLM, not a reward model" in capsys.readouterr().err
    # a reward model: the embedded trunk with a seeded one-score head (what rm_qwen starts from)
    torch.manual_seed(0)
    reward_dir = tmp_path / "reward_model"
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1).eval()
    model.save_pretrained(reward_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.save_pretrained(reward_dir)
    metrics = _score(capsys, "reward_accuracy", "--samples", pairs, "--model", str(reward_dir))
    with torch.no_grad():  # the same pairs scored here, directly
        chats = [[{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r[side]}]
                 for side in ("chosen", "rejected") for r in rows]
        scores = reward_scores(model, tokenizer, chats)
    margins = [c - r for c, r in zip(scores[:8], scores[8:], strict=True)]
    assert metrics["accuracy"] == pytest.approx(100 * sum(m > 0 for m in margins) / 8)
    assert metrics["margin"] == pytest.approx(sum(margins) / 8, abs=1e-4)
