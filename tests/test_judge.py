"""LLM-as-judge against real sockets: scripted faults from a small server of the tests' own, and vLLM's own
OpenAI-compatible server serving the embedded model for the happy path."""

import email.utils
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from judge_fault_server import FaultServer
from mlflow.tracking import MlflowClient

from evaluators.judge import Judge, parse_score, parse_verdict
from evaluators.judge_client import JudgeClient, JudgeRequest, ResponseCache
from harness.core.errors import ConfigError
from harness.paths import REPO_ROOT

PROMPTS = ["What is 2 plus 2?", "法国的首都是哪里？", "Reverse the word \"cat\".", "What is 3 times 3?"]
REFS = ["2 plus 2 is 4.", "法国的首都是巴黎。", "The word \"cat\" reversed is \"tac\".", "3 times 3 is 9."]


@pytest.fixture
def server():
    s = FaultServer()
    yield s
    s.close()


@pytest.fixture
def judge_cache(tmp_path):
    return str(tmp_path / "judge-cache")


def _judge(server, model, cache_dir, **options):
    return Judge(base_url=server.base_url, model=model, cache_dir=cache_dir, **options)


def _request(text="hello"):
    return JudgeRequest([{"role": "user", "content": text}], {"type": "object"}, "score")


def test_strict_parsing():
    assert parse_score('{"score": 7, "reasoning": "ok"}') == (7, "ok")
    for bad in ('{"score": 11}', '{"score": "7"}', '{"score": true}', "Score: 7", '```json\n{"score": 7}\n```',
                "[7]", None):
        assert parse_score(bad) == (None, ""), bad
    assert parse_verdict('{"winner": "tie"}') == "tie" and parse_verdict('{"winner": "C"}') is None


def test_retry_after_is_honoured(server):
    waits = []
    client = JudgeClient(server.base_url, "flaky-429", retries=3, sleep=waits.append)
    reply = client.complete(_request())
    assert json.loads(reply.content)["score"] == 7
    assert waits == [1.0] and client.stats.snapshot() == {"requests": 2, "retries": 1, "failed": 0, "cache_hits": 0}


def test_server_errors_are_retried_with_backoff(server):
    waits = []
    client = JudgeClient(server.base_url, "flaky-500", retries=3, sleep=waits.append)
    assert client.complete(_request()).content is not None
    assert waits == [0.5, 1.0] and client.stats.requests == 3


def test_case5_retry_after_is_parsed_in_both_forms_and_garbage_is_absent():
    from evaluators.judge_client import retry_after_s

    now = 1_700_000_000.0
    assert retry_after_s("120", now) == 120.0 and retry_after_s(" 7 ", now) == 7.0
    assert retry_after_s(email.utils.formatdate(now + 3600, usegmt=True), now) == 3600.0
    assert retry_after_s("Tue, 14 Nov 2023 22:13:20 -0000", now) == 0.0  # a past date (no zone: UTC) is no wait
    for garbage in ("soon", "", "-5", "1e3", "nan", "inf", "Mon, 99 Foo 2024", "Wed, 01 Jan 99999 00:00:00 GMT"):
        assert retry_after_s(garbage, now) is None, garbage
    assert retry_after_s(None) is None


def test_case5_garbage_retry_after_falls_back_to_backoff_and_the_sample_fails(server):
    waits = []
    client = JudgeClient(server.base_url, "retry-after-soon", retries=3, sleep=waits.append)
    reply = client.complete(_request())
    assert (reply.content, reply.error) == (None, "HTTP 429")
    assert waits == [0.5, 1.0, 2.0]  # the backoff, as if there were no header
    assert client.stats.snapshot() == {"requests": 4, "retries": 3, "failed": 1, "cache_hits": 0}


def test_case5_long_retry_after_waits_are_capped_by_max_wait_s(server):
    from harness.training.overrides import evaluator_option_types

    for model in ("retry-after-date", "retry-after-huge"):  # an hour ahead; 99999999999 s
        waits = []
        client = JudgeClient(server.base_url, model, retries=2, sleep=waits.append)
        assert client.complete(_request()).content is None
        assert waits == [30.0, 30.0], model  # the default max_wait_s
        assert client.stats.snapshot() == {"requests": 3, "retries": 2, "failed": 1, "cache_hits": 0}
        waits.clear()
        client = JudgeClient(server.base_url, model, retries=2, max_wait_s=2.5, sleep=waits.append)
        assert client.complete(_request()).content is None and waits == [2.5, 2.5], model
    waits = []
    JudgeClient(server.base_url, "flaky-500", retries=3, max_wait_s=0.7, sleep=waits.append).complete(_request())
    assert waits == [0.5, 0.7]  # the backoff too
    assert evaluator_option_types("judge")["max_wait_s"] is float  # `judge_max_wait_s=...` on the command line
    with pytest.raises(ConfigError, match="max_wait_s"):
        Judge(base_url=server.base_url, max_wait_s=-1.0)


@pytest.mark.slow
def test_case5_score_judge_against_bad_retry_after_finishes_with_failures_counted(server, tmp_path):
    rows = [{"prompt": p, "reference": r, "prediction": r} for p, r in zip(PROMPTS, REFS, strict=True)]
    (tmp_path / "s.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    code = ("import json, sys, time\n"
            "from harness.commands.score import score_judge_file\n"
            "for model in sys.argv[3:]:\n"
            "    start = time.monotonic()\n"
            "    metrics = score_judge_file(sys.argv[1], sys.argv[2], model, retries=2, max_wait_s=0.2, cache=False)\n"
            "    print(json.dumps({'model': model, 'elapsed_s': time.monotonic() - start, **metrics}), flush=True)\n")
    models = ["retry-after-soon", "retry-after-date", "retry-after-huge"]
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "s.jsonl"), server.base_url, *models],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)  # a hang fails, not blocks
    assert out.returncode == 0, out.stderr[-2000:]
    results = [json.loads(line) for line in out.stdout.strip().splitlines()]
    assert [r["model"] for r in results] == models
    for r in results:
        assert "score" not in r and r["failed"] == 4 and r["requests"] == 12, r  # 4 samples x 3 tries, all failed
        assert r["elapsed_s"] < 10, r  # two waits of at most 0.2 s per sample, concurrently


def test_timeouts_are_retried_then_the_sample_fails(server):
    client = JudgeClient(server.base_url, "slow", retries=1, timeout_s=0.3, sleep=lambda s: None)
    reply = client.complete(_request())
    assert (reply.content, reply.error) == (None, "timed out")
    assert client.stats.snapshot() == {"requests": 2, "retries": 1, "failed": 1, "cache_hits": 0}


def test_pointwise_scores_and_unparseable_answers(server, judge_cache):
    result = _judge(server, "ok-8", judge_cache, pairwise=False).judge(PROMPTS, REFS, REFS)
    assert result.metrics == {"score": 8.0, "requests": 4, "failed": 0, "cache_hits": 0, "parse_failures": 0}
    bad = _judge(server, "malformed", judge_cache, pairwise=False).judge(PROMPTS, REFS, REFS)
    assert "score" not in bad.metrics and bad.metrics["parse_failures"] == 4  # never scored 0 or 10
    assert bad.table["judge_score"] == [None] * 4


def test_win_rate_asks_both_orders_to_cancel_position_bias(server, judge_cache):
    answers = [r + " Indeed." for r in REFS]
    always_a = _judge(server, "ok-5", judge_cache).judge(PROMPTS, REFS, answers, baseline=REFS)
    assert always_a.metrics["win_rate"] == 50.0  # "A" in both orders: one win, one loss per sample
    assert always_a.metrics["requests"] == 4 + 8
    longer = _judge(server, "longer", judge_cache).judge(PROMPTS, REFS, answers, baseline=REFS)
    assert longer.metrics["win_rate"] == 100.0
    same = _judge(server, "longer", judge_cache).judge(PROMPTS, REFS, REFS, baseline=REFS)
    assert same.metrics["win_rate"] == 50.0  # ties count half


class _Scripted:
    """A generation backend whose answers the test sets before each evaluation, so the judge's inputs are known."""

    name = "scripted"

    def __init__(self):
        self.answers: list[str] = []

    def sync_weights(self, model) -> None:
        pass

    def generate(self, prompt_ids, params):
        from harness.core.generation import Completion

        return [Completion([a], 1) for a in self.answers]


def test_pairwise_judging_keeps_one_baseline_per_eval_set(server, judge_cache):
    """Two named eval sets of different sizes share one judge (one server): each set's win rate is against its own
    step-0 answers, and a judge restored from state_dict (what a checkpoint saves) judges as the original does."""
    from harness.core.generation import GenParams
    from harness.core.records import EvalSample
    from harness.training.inloop import EvalSuite, Evaluation

    def suite(judge):
        return EvalSuite({name: Evaluation([judge], [EvalSample(f"{name}{i}", p, r) for i, (p, r) in
                                                     enumerate(zip(PROMPTS[lo:hi], REFS[lo:hi], strict=True))],
                                           backends[name], None, GenParams(), prompt_ids=[[1]] * (hi - lo),
                                           eval_set=name)
                          for name, (lo, hi) in {"a": (0, 3), "b": (3, 4)}.items()})

    judge = _judge(server, "longer", judge_cache)
    backends = {"a": _Scripted(), "b": _Scripted()}
    backends["a"].answers, backends["b"].answers = ["x", "y", "z"], ["a long answer"]
    step0 = suite(judge).run(None, 0)
    assert "eval/a/judge/win_rate" not in step0.metrics and "eval/b/judge/win_rate" not in step0.metrics
    assert judge.state_dict() == {"baselines": {"a": ["x", "y", "z"], "b": ["a long answer"]}}
    # longer than a's own baseline, shorter than b's: a wins every sample and b none (the "longer" judge)
    backends["a"].answers, backends["b"].answers = ["x+1", "y+1", "z"], ["short"]
    step1 = suite(judge).run(None, 1)
    assert step1.metrics["eval/a/judge/win_rate"] == 100 * (1 + 1 + 0.5) / 3
    assert step1.metrics["eval/b/judge/win_rate"] == 0.0
    assert step1.sets["b"].evaluator_tables["judge"]["baseline"] == ["a long answer"]
    restored = _judge(server, "longer", judge_cache)
    restored.load_state_dict(json.loads(json.dumps(judge.state_dict())))  # through JSON, as the checkpoint keeps it
    again = suite(restored).run(None, 1)
    assert {k: v for k, v in again.metrics.items() if k.endswith("win_rate")} == {
        "eval/a/judge/win_rate": step1.metrics["eval/a/judge/win_rate"], "eval/b/judge/win_rate": 0.0}
    assert _judge(server, "longer", judge_cache, pairwise=False).state_dict() is None  # no state: none saved


def test_responses_are_cached_across_runs_and_partial_writes_are_ignored(server, judge_cache, tmp_path):
    first = _judge(server, "ok-6", judge_cache, pairwise=False).judge(PROMPTS, REFS, REFS)
    again = _judge(server, "ok-6", judge_cache, pairwise=False).judge(PROMPTS, REFS, REFS)
    assert first.metrics["requests"] == 4 and again.metrics["requests"] == 0 and again.metrics["cache_hits"] == 4
    assert again.metrics["score"] == first.metrics["score"] == 6.0
    cache = ResponseCache(tmp_path / "c")
    cache.put("ab" * 32, "x")
    (tmp_path / "c" / "ab" / ".tmp-interrupted").write_text('{"conte')  # what a killed write leaves
    (tmp_path / "c" / "cd").mkdir()
    (tmp_path / "c" / "cd" / f"{'cd' * 32}.json").write_text('{"conte')
    assert cache.get("ab" * 32) == "x" and cache.get("cd" * 32) is None


def test_cached_answers_are_kept_per_server_and_only_when_greedy(server, judge_cache):
    other = FaultServer()  # another server that serves a model of the same name
    try:
        first = _judge(server, "ok-6", judge_cache, pairwise=False).judge(PROMPTS, REFS, REFS)
        elsewhere = _judge(other, "ok-6", judge_cache, pairwise=False).judge(PROMPTS, REFS, REFS)
        assert first.metrics["requests"] == 4 and elsewhere.metrics["requests"] == 4  # asked, not replayed
        assert elsewhere.metrics["cache_hits"] == 0 and len(other.requests) == 4
        again = _judge(server, "ok-6", judge_cache, pairwise=False).judge(PROMPTS, REFS, REFS)
        assert again.metrics["cache_hits"] == 4 and again.metrics["requests"] == 0  # greedy: each server's own
        # sampled verdicts are draws: never stored, never replayed
        sampled = [_judge(server, "ok-3", judge_cache, pairwise=False, temperature=0.7).judge(PROMPTS, REFS, REFS)
                   for _ in range(2)]
        assert [(r.metrics["requests"], r.metrics["cache_hits"]) for r in sampled] == [(4, 0), (4, 0)]
        assert sum(1 for _ in Path(judge_cache).rglob("*.json")) == 8  # the two servers' greedy answers only
    finally:
        other.close()


def test_budget_caps_requests(server, judge_cache):
    result = _judge(server, "ok-9", judge_cache, pairwise=False, budget=3).judge(PROMPTS, REFS, REFS)
    assert result.metrics["requests"] == 3 and result.metrics["failed"] == 1 and result.metrics["score"] == 9.0


def test_a_judge_that_is_down_fails_the_samples_not_the_caller():
    result = Judge(base_url="http://127.0.0.1:9/v1", model="m", retries=1, timeout_s=1.0, cache=False).judge(
        PROMPTS, REFS, REFS)
    assert "score" not in result.metrics and result.metrics["failed"] == 4 and result.metrics["requests"] == 8
    assert result.table["judge_reasoning"][0].startswith("connection failed")


def test_bad_template_is_a_config_error(tmp_path):
    template = tmp_path / "t.txt"
    template.write_text("Rate {answer} against {gold}")
    with pytest.raises(ConfigError, match=r"t.txt: bad placeholder 'gold'"):
        Judge(base_url="http://127.0.0.1:9/v1", pointwise_template=str(template))


@pytest.mark.slow
def test_offline_scoring_cli(server, tmp_path):
    rows = [{"prompt": p, "reference": r, "prediction": r + " Indeed."} for p, r in zip(PROMPTS, REFS, strict=True)]
    base = [{"prompt": p, "prediction": r} for p, r in zip(PROMPTS, REFS, strict=True)]
    (tmp_path / "s.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    (tmp_path / "b.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in base))
    out = subprocess.run([sys.executable, "-m", "harness", "score", "judge", "--samples", str(tmp_path / "s.jsonl"),
                          "--base-url", server.base_url, "--judge-model", "longer", "--pairwise-with",
                          str(tmp_path / "b.jsonl")], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "HARNESS_CACHE": str(tmp_path / "cache")})  # no model is needed here
    assert out.returncode == 0, out.stderr[-2000:]
    metrics = json.loads(out.stdout.strip().splitlines()[-1])
    assert metrics["score"] == 7.0 and metrics["win_rate"] == 100.0
    assert metrics["parse_failures"] == 0 and metrics["requests"] == 12


def test_in_loop_judge_logs_scores_and_never_the_api_key(server, tmp_path, tiny_model_dir, monkeypatch, capfd):
    from harness.commands.cli import main

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    secret = "sk-test-this-key-must-never-be-logged"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("OPENAI_API_KEY", secret)
    # the CLI's entry point in this process; capfd takes what reaches file descriptors 1 and 2 as well
    code = main(["run", "simpo_qwen", "max_steps=2", "eval_every=2", "eval_limit=4", "evaluators=bleu,judge",
                 f"judge_base_url={server.base_url}", "judge_model=ok-7", f"judge_cache_dir={tmp_path / 'judge-cache'}",
                 "select_metric=eval/judge/score", f"output_dir={tmp_path / 'out'}"])
    stdout, stderr = capfd.readouterr()
    assert code == 0, stderr[-3000:]
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("simpo_qwen").experiment_id])
    history = {k: {m.step: m.value for m in client.get_metric_history(run.info.run_id, f"eval/judge/{k}")}
               for k in ("score", "win_rate", "requests", "cache_hits", "parse_failures")}
    assert history["score"] == {0: 7.0, 2: 7.0} and history["win_rate"] == {2: 50.0}
    assert history["parse_failures"] == {0: 0.0, 2: 0.0}
    # 4 pointwise at step 0; 4 pointwise + 8 pairwise at step 2, of which unchanged answers come from the cache
    assert history["requests"][0] == 4 and history["requests"][2] + history["cache_hits"][2] == 12
    assert run.data.params["judge_model"] == "ok-7" and "judge_api_key_env" not in run.data.params
    assert all(r["authorization"] == f"Bearer {secret}" for r in server.requests)  # it was used...
    stored = [(tmp_path / "mlflow.db").read_bytes()]
    stored += [p.read_bytes() for p in (tmp_path / "mlruns").rglob("*") if p.is_file()]  # beside the store
    stored += [p.read_bytes() for p in Path(tmp_path / "out").rglob("*") if p.is_file()]
    stored += [p.read_bytes() for p in Path(tmp_path / "judge-cache").rglob("*") if p.is_file()]
    assert len(stored) > 5 and not any(secret.encode() in b for b in stored)  # ...and never stored
    assert secret not in stdout + stderr
    templates = {a.path for a in client.list_artifacts(run.info.run_id, "judge")}
    assert templates == {"judge/pointwise_template.txt", "judge/pairwise_template.txt"}


def test_vllm_server_judges_with_structured_outputs_and_stops_with_the_run(tmp_path, tiny_model_dir):
    """The happy path against a real OpenAI-compatible server: vLLM's, started by the harness (judge_base_url=local)
    with the embedded model, JSON-schema constrained answers, stopped when the run ends. Answers of 24 tokens: two of
    48 (runs on, as an AMD EPYC build of the embedded model writes them) fill 225 of the judge's 256 positions,
    leaving too few for its answer."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = subprocess.run([sys.executable, "-m", "harness", "run", "simpo_qwen", "max_steps=2", "eval_every=2",
                          "eval_limit=4", "max_new_tokens=24", "evaluators=judge", "judge_base_url=local",
                          f"judge_cache_dir={tmp_path / 'judge-cache'}", "select_metric=eval/judge/score",
                          f"output_dir={tmp_path / 'out'}"], cwd=REPO_ROOT,
                         env={**os.environ, "MLFLOW_TRACKING_URI": uri}, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("simpo_qwen").experiment_id])
    metric = {k: {m.step: m.value for m in client.get_metric_history(run.info.run_id, f"eval/judge/{k}")}
              for k in ("score", "win_rate", "parse_failures", "failed", "requests", "cache_hits")}
    assert metric["parse_failures"] == {0: 0.0, 2: 0.0} and metric["failed"] == {0: 0.0, 2: 0.0}
    assert set(metric["score"]) == {0, 2} and all(1 <= v <= 10 for v in metric["score"].values())
    assert set(metric["win_rate"]) == {2} and 0 <= metric["win_rate"][2] <= 100
    assert metric["requests"][2] + metric["cache_hits"][2] == 12
    leftover = subprocess.run(["pgrep", "-f", "vllm.entrypoints.openai.api_server"], capture_output=True, text=True)
    assert leftover.stdout.strip() == ""  # the harness stopped the server it started
