"""`serve` (vLLM's OpenAI server for a run or model, LoRA adapters as adapters), `chat` (the terminal chat through
the chat template) and `sample` (rejection sampling: scored answers, best as SFT or best vs worst as preference
pairs, resumable after a kill)."""

from __future__ import annotations

import io
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from harness.commands.model_ref import ModelRef
from harness.commands.sample import (
    SampleConfig,
    _check_resumable,
    _output_rows,
    best_and_worst,
    parse_scorer,
    progress_path,
    read_progress,
    run_sample,
    sampler_identity,
    score_summary,
)
from harness.core.errors import ConfigError, DataError
from harness.core.records import Record
from harness.paths import DATA_DIR, REPO_ROOT


def _eval_rows(count: int) -> list[dict]:
    rows = [json.loads(line) for line in (DATA_DIR / "eval.jsonl").read_text(encoding="utf-8").splitlines()]
    return [{k: r[k] for k in ("id", "prompt", "reference", "answer")} for r in rows[:count]]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


# --- pure logic, no model -------------------------------------------------------------------------------------------


def test_parse_scorer():
    assert parse_scorer("rouge_l") == ("rouge_l", "rouge_l")
    assert parse_scorer("answer") == ("answer", "exact")
    assert parse_scorer("answer/contains") == ("answer", "contains")
    assert parse_scorer("rouge") == ("rouge", "rougeL")
    with pytest.raises(ConfigError, match=r"answer has no per-sample metric 'f1'; choose one of exact, numeric"):
        parse_scorer("answer/f1")
    with pytest.raises(ConfigError, match=r"--scorer 'bogus' is not a scorer; choose one of answer_match, rouge_l"):
        parse_scorer("bogus")


def test_best_and_worst_follow_the_scores():
    assert best_and_worst([0.2, 0.9, 0.1, 0.5]) == (1, 2)
    assert best_and_worst([0.5, 0.5, 0.5]) == (0, 0)  # the first of equals
    assert best_and_worst([math.nan, 0.3, 0.7]) == (2, 1)  # unscored samples take no part
    assert best_and_worst([math.nan, math.nan]) is None


def test_output_rows_sft_and_preference_with_ties_and_blanks():
    records = [Record(f"p.jsonl line {i}", {"id": i, "prompt": f"q{i}"}) for i in (1, 2, 3, 4)]
    done = {"1": {"id": "1", "prompt": "q1", "samples": ["a", "b", "c"], "scores": [0.5, 1.0, 0.0], "scorer": "s",
                  "source": "m", "model": "/m"},
            "2": {"id": "2", "prompt": "q2", "samples": ["x", "y"], "scores": [0.3, 0.3], "scorer": "s",
                  "source": "m", "model": "/m"},
            "4": {"id": "4", "prompt": "q4", "samples": ["  ", "z"], "scores": [1.0, 0.0], "scorer": "s",
                  "source": "m", "model": "/m"}}  # id 3 is not sampled yet
    pairs, skipped = _output_rows(SampleConfig("m", "p.jsonl", "o.jsonl", n=3), records, done)
    assert pairs == [{"prompt": "q1", "chosen": "b", "rejected": "c", "chosen_score": 1.0, "rejected_score": 0.0,
                      "id": "1", "scorer": "s", "source": "m", "model": "/m"}]
    assert skipped == 2  # a tie (no preference) and a blank best answer
    sft, skipped = _output_rows(SampleConfig("m", "p.jsonl", "o.jsonl", n=3, format="sft"), records, done)
    assert [(r["prompt"], r["completion"], r["score"]) for r in sft] == [("q1", "b", 1.0), ("q2", "x", 0.3)]
    assert skipped == 1


def test_score_summary():
    summary = score_summary([{"scores": [0.0, 1.0]}, {"scores": [0.5, math.nan]}])
    assert summary["score/mean"] == pytest.approx(0.5)
    assert (summary["score/min"], summary["score/median"], summary["score/max"]) == (0.0, 0.5, 1.0)
    assert summary["score/unscored"] == 1
    assert summary["best/mean"] == pytest.approx(0.75) and summary["worst/mean"] == pytest.approx(0.25)


def test_progress_drops_a_half_written_line_and_refuses_duplicates(tmp_path):
    path = tmp_path / "o.samples.jsonl"
    path.write_bytes(b'{"id": "a", "scores": [1]}\n{"id": "b", "sco')
    assert [r["id"] for r in read_progress(path)] == ["a"]
    assert path.read_bytes() == b'{"id": "a", "scores": [1]}\n'  # cut off the file, so appends start clean
    path.write_text('{"id": "a"}\n{"id": "a"}\n')
    with pytest.raises(DataError, match=r"o.samples.jsonl line 2: prompt id 'a' is recorded twice"):
        read_progress(path)
    path.write_text('{"id": "a"}\nnot json\n')
    with pytest.raises(DataError, match=r"o.samples.jsonl line 2: invalid JSON"):
        read_progress(path)


def test_a_sampling_resumed_with_another_sampler_is_refused_naming_what_changed(tmp_path):
    """A progress file continued with another model (`run:latest:` now naming a newer run), temperature, top_p,
    max_new_tokens, seed or prompt file would mix two samplers in one output: refused, naming each change."""
    import dataclasses

    prompts = _write_jsonl(tmp_path / "prompts.jsonl", _eval_rows(2))
    cfg = SampleConfig("run:latest:sft_qwen", str(prompts), str(tmp_path / "out.jsonl"), n=2, seed=3)
    sidecar = progress_path(Path(cfg.out))
    model = ModelRef(cfg.ref, "/runs/a/best", tokenizer_dir="/runs/a/best", run_id="a" * 32)
    row = {"id": "1", "prompt": "p", "samples": ["x", "y"], "scores": [1.0, 0.0], "scorer": cfg.scorer,
           **model.describe(), "sampler": sampler_identity(cfg)}
    _check_resumable([row], sidecar, cfg, model)  # the same sampler: resumed

    def refusal(cfg: SampleConfig, model: ModelRef, done: tuple[dict, ...] = (row,)) -> str:
        with pytest.raises(ConfigError) as e:
            _check_resumable(list(done), sidecar, cfg, model)
        assert f"delete {sidecar}" in str(e.value) and "mix two samplers" in str(e.value)
        return str(e.value)

    newer = refusal(cfg, ModelRef(cfg.ref, "/runs/b/best", tokenizer_dir="/runs/b/best", run_id="b" * 32))
    assert f"source_run='{'a' * 32}' then, '{'b' * 32}' now" in newer
    assert "model='/runs/a/best' then, '/runs/b/best' now" in newer
    changed = refusal(dataclasses.replace(cfg, temperature=0.7, top_p=0.9, max_new_tokens=8, seed=4), model)
    for text in ("temperature=1.0 then, 0.7 now", "top_p=1.0 then, 0.9 now", "max_new_tokens=48 then, 8 now",
                 "seed=3 then, 4 now"):
        assert text in changed
    _write_jsonl(prompts, _eval_rows(3))
    assert f"prompts='{row['sampler']['prompts']}' then" in refusal(cfg, model)
    unrecorded = {k: v for k, v in row.items() if k != "sampler"}  # a progress file from before this was recorded
    assert "temperature=None then, 1.0 now" in refusal(cfg, model, (unrecorded,))


def test_bad_sample_input_stops_before_mlflow(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    prompts = _write_jsonl(tmp_path / "p.jsonl", [{"id": "x", "prompt": "q"}, {"id": "y", "prompt": "r"}])
    with pytest.raises(DataError, match=r"p.jsonl line 1: field 'reference' is missing \(the rouge_l scorer reads"):
        run_sample(SampleConfig("tiny-qwen2", str(prompts), str(tmp_path / "o.jsonl"), scorer="rouge_l"))
    with pytest.raises(DataError, match=r"p.jsonl line 1: field 'answer' is missing"):
        run_sample(SampleConfig("tiny-qwen2", str(prompts), str(tmp_path / "o.jsonl"), scorer="answer"))
    twice = _write_jsonl(tmp_path / "t.jsonl", [{"id": 1, "prompt": "q", "reference": "a"}] * 2)
    with pytest.raises(DataError, match=r"t.jsonl line 2: id '1' repeats .*t.jsonl line 1"):
        run_sample(SampleConfig("tiny-qwen2", str(twice), str(tmp_path / "o.jsonl")))
    with pytest.raises(ConfigError, match=r"--n 1: preference pairs need at least 2"):
        run_sample(SampleConfig("tiny-qwen2", str(twice), str(tmp_path / "o.jsonl"), n=1))
    with pytest.raises(ConfigError, match=r"same file as the input"):
        run_sample(SampleConfig("tiny-qwen2", str(prompts), str(prompts), scorer="judge"))
    assert not (tmp_path / "mlflow.db").exists()


# --- with the embedded model ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_serve_answers_chat_completions_with_a_lora_adapter(tiny_model_dir, tmp_path):
    """`serve` on a LoRA checkpoint directory: the adapter answers under its name, the base under its path, chats
    are rendered by the chat template the checkpoint saved (not the base's), and the judge takes the served model
    as its own."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evaluators.judge import Judge
    from harness.commands.serve import start_server

    adapter = tmp_path / "best"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).save_pretrained(adapter)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    # as a run with its own chat_template= saves it: a template the base's tokenizer does not have
    tokenizer.chat_template = ("{% for m in messages %}{{ 'Q: ' + m['content'] + '\\n' }}{% endfor %}"
                               "{% if add_generation_prompt %}{{ 'A:' }}{% endif %}")
    tokenizer.save_pretrained(adapter)
    chat = [{"role": "user", "content": "What is the capital of Italy?"}]
    own = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert own != AutoTokenizer.from_pretrained(tiny_model_dir).apply_chat_template(
        chat, add_generation_prompt=True, tokenize=True, return_dict=False)

    server, name = start_server(str(adapter), max_model_len=256)
    try:
        assert name == str(adapter)
        served = {m["id"]: m for m in httpx.get(f"{server.base_url}/models", timeout=10).json()["data"]}
        assert served[name]["parent"] == tiny_model_dir and tiny_model_dir in served
        rendered = httpx.post(f"{server.base_url.removesuffix('/v1')}/tokenize", timeout=30,
                              json={"model": name, "messages": chat}).json()
        assert rendered["tokens"] == own
        for asked in (name, tiny_model_dir):
            reply = httpx.post(f"{server.base_url}/chat/completions", timeout=60, json={
                "model": asked, "max_tokens": 16, "temperature": 0,
                "messages": [{"role": "user", "content": "What is the capital of Italy?"}]}).json()
            assert reply["model"] == asked
            assert reply["choices"][0]["message"]["content"].strip()
        judge = Judge(base_url=server.base_url, model=name, pairwise=False, cache=False)
        try:
            metrics = judge.judge(["What is the capital of Italy?"], ["Rome."], ["Rome is."]).metrics
        finally:
            judge.close()
        assert (metrics["requests"], metrics["failed"]) == (1, 0)
    finally:
        server.close()
    assert server.process.poll() is not None


def test_chat_keeps_the_conversation(vllm_backend, tiny_model_dir, monkeypatch, capsys):
    """stdin lines are user turns; each reply is generated from the whole conversation through the chat template."""
    from harness.commands.serve import chat, run_chat
    from harness.core.generation import GenParams
    from harness.core.models import load_tokenizer
    from harness.core.prompts import render_conversation

    monkeypatch.setattr(sys, "stdin", io.StringIO('What is the capital of Italy?\n\nWrite "lion" in capital '
                                                  'letters.\n/exit\nnever read\n'))
    messages = run_chat(tiny_model_dir, max_new_tokens=24, engine=vllm_backend)
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert messages[2]["content"] == 'Write "lion" in capital letters.'
    assert capsys.readouterr().out == messages[1]["content"] + "\n" + messages[3]["content"] + "\n"
    tokenizer = load_tokenizer(tiny_model_dir)
    second = render_conversation(tokenizer, messages[:3])
    assert messages[1]["content"] in tokenizer.decode(second)  # the first exchange is in the second prompt
    again = vllm_backend.generate([second], GenParams(max_new_tokens=24))[0].texts[0].strip()
    assert again == messages[3]["content"]

    # a conversation longer than the context loses its oldest exchange, not the new message
    first = len(render_conversation(tokenizer, messages[:1]))
    written = []
    kept = chat(vllm_backend, tokenizer, ["What is the capital of Italy?", "What is the capital of France?"],
                written.append, max_model_len=first + 24 + 4, max_new_tokens=24)
    assert [m["content"] for m in kept if m["role"] == "user"] == ["What is the capital of France?"]
    assert len(written) == 2


def test_sample_writes_best_and_worst_and_resumes_after_kill(tiny_model_dir, vllm_backend, tmp_path, monkeypatch,
                                                             capsys):
    """rouge_l scores 4 sampled answers per prompt; the pairs are the best and the worst by those scores; a run
    killed after its first prompt resumes without repeating one, and the pairs pass the project's format check."""
    from harness.commands.cli import main
    from harness.rl.rewards import rouge_l
    from harness.training.tracking.queries import run_state

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    rows = _eval_rows(8)
    prompts, out = _write_jsonl(tmp_path / "prompts.jsonl", rows), tmp_path / "pairs.jsonl"
    sidecar = progress_path(out)
    args = ["--prompts", str(prompts), "--out", str(out), "--n", "4", "--scorer", "rouge_l", "--batch", "1",
            "--max-new-tokens", "24", "--seed", "3"]
    proc = subprocess.Popen([sys.executable, "-m", "harness", "sample", tiny_model_dir, *args], cwd=REPO_ROOT,
                            env={**os.environ, "MLFLOW_TRACKING_URI": uri}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not (sidecar.exists() and sidecar.read_bytes().count(b"\n") >= 1):
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no prompt finished in 240 s"
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
        proc.stderr.close()
    before = sidecar.read_bytes()
    first = before[: before.rfind(b"\n") + 1]
    assert 1 <= first.count(b"\n") < len(rows), "the kill came too late to test resuming"
    assert not out.exists()  # OUT is written at the end only
    with open(sidecar, "ab") as f:
        f.write(b'{"id": "half-writ')  # as a kill in the middle of a write leaves it

    cfg = SampleConfig(tiny_model_dir, str(prompts), str(out), n=4, scorer="rouge_l", batch=1, max_new_tokens=24,
                       seed=3)
    summary = run_sample(cfg, engine=vllm_backend)
    assert (summary["prompts"], summary["new_prompts"]) == (len(rows), len(rows) - first.count(b"\n"))
    with pytest.raises(ConfigError, match="seed=3 then, 4 now"):  # the killed and the resumed rows record it
        run_sample(SampleConfig(**{**vars(cfg), "seed": 4}), engine=vllm_backend)

    after = sidecar.read_bytes()
    assert after.startswith(first)  # the killed run's finished prompts are kept as they were
    done = [json.loads(line) for line in after.decode().splitlines()]
    assert sorted(r["id"] for r in done) == sorted(r["id"] for r in rows)  # each prompt once, none missing
    by_id = {r["id"]: r for r in rows}
    for row in done:
        assert len(row["samples"]) == 4 and row["scorer"] == "rouge_l" and row["source"] == tiny_model_dir
        # the recorded scores are the reward function's values on the recorded texts
        assert row["scores"] == pytest.approx(rouge_l(row["samples"], [by_id[row["id"]]["reference"]] * 4))
    runs = list(dict.fromkeys(r["sample_run"] for r in done))
    assert runs[1] == summary["mlflow_run"] and len(runs) == 2  # the killed run's and the resumed run's
    assert run_state(runs[0]).status == "KILLED"  # ended by the resumed sampling

    pairs = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(pairs) + summary["skipped"] == len(rows) and pairs
    for pair in pairs:
        row = next(r for r in done if r["id"] == pair["id"])
        assert pair["chosen_score"] == max(row["scores"]) > pair["rejected_score"] == min(row["scores"])
        assert pair["chosen"] == row["samples"][row["scores"].index(max(row["scores"]))]
        assert pair["rejected"] == row["samples"][row["scores"].index(min(row["scores"]))]
        assert pair["prompt"] == by_id[pair["id"]]["prompt"]
    capsys.readouterr()
    assert main(["data", "check", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["formats"] == {"preference": len(pairs)}

    state = run_state(summary["mlflow_run"])
    assert state.experiment == "sample/pairs" and state.status == "FINISHED"
    assert state.params["scorer"] == "rouge_l" and state.params["n"] == "4"
    from mlflow.tracking import MlflowClient

    metrics = MlflowClient(uri).get_run(summary["mlflow_run"]).data.metrics
    all_scores = [s for r in done for s in r["scores"]]
    assert metrics["score/mean"] == pytest.approx(sum(all_scores) / len(all_scores))
    assert metrics["prompts"] == len(rows)
