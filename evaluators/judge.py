"""LLM-as-judge over an OpenAI-compatible chat API: a pointwise 1-10 score, and the win rate against the step-0
baseline answers with both orders asked (ties count half).

Answers are requested as JSON (JSON-schema `response_format` unless `structured=false`) and parsed strictly:
anything else is a parse failure, left out of the mean, never scored. A judge that cannot be reached leaves the
step's judge metrics out (with `failed` counting the calls) instead of stopping training.
"""

from __future__ import annotations

import json
from pathlib import Path

from evaluators.base import EvalContext, EvalResult, Evaluator
from evaluators.judge_client import JudgeClient, JudgeRequest
from harness.core.errors import ConfigError
from harness.paths import cache_dir as harness_cache

TEMPLATES = Path(__file__).parent / "judge_templates"


def score_schema(reasoning_chars: int) -> dict:
    return {"type": "object",
            "properties": {"score": {"type": "integer", "minimum": 1, "maximum": 10},
                           "reasoning": {"type": "string", "maxLength": reasoning_chars}},
            "required": ["score", "reasoning"], "additionalProperties": False}


def verdict_schema(reasoning_chars: int) -> dict:
    return {"type": "object",
            "properties": {"winner": {"type": "string", "enum": ["A", "B", "tie"]},
                           "reasoning": {"type": "string", "maxLength": reasoning_chars}},
            "required": ["winner", "reasoning"], "additionalProperties": False}


def parse_score(content: str | None) -> tuple[int | None, str]:
    """(score, reasoning) from a strict JSON answer; score None if it is not an integer 1-10 in a JSON object."""
    try:
        obj = json.loads(content)
    except (TypeError, ValueError):
        return None, ""
    score = obj.get("score") if isinstance(obj, dict) else None
    if isinstance(score, bool) or not isinstance(score, int) or not 1 <= score <= 10:
        return None, ""
    return score, str(obj.get("reasoning", ""))


def parse_verdict(content: str | None) -> str | None:
    """"A", "B" or "tie" from a strict JSON answer, else None."""
    try:
        obj = json.loads(content)
    except (TypeError, ValueError):
        return None
    winner = obj.get("winner") if isinstance(obj, dict) else None
    return winner if winner in ("A", "B", "tie") else None


def _template(path: str, default: str, fields: tuple[str, ...]) -> tuple[str, str]:
    """The template text, checked now: a placeholder it uses that is not one of `fields` is a config error."""
    file = Path(path) if path else TEMPLATES / default
    try:
        text = file.read_text(encoding="utf-8")
        text.format(**dict.fromkeys(fields, ""))
    except FileNotFoundError:
        raise ConfigError(f"judge template {file}: no such file") from None
    except (KeyError, IndexError, ValueError) as e:
        raise ConfigError(f"judge template {file}: bad placeholder {e}; available: {', '.join(fields)} "
                          "(write literal braces as {{ and }})") from None
    return str(file), text


class Judge(Evaluator):
    name = "judge"
    metrics = ("score", "win_rate", "parse_failures", "requests", "failed", "cache_hits")
    diagnostic_metrics = ("parse_failures", "requests", "failed", "cache_hits")  # about the judge, not the model

    @classmethod
    def metric_names(cls, options: dict | None = None) -> tuple[str, ...]:
        """win_rate only with pairwise judging (and from the second evaluation on: step 0 is the baseline)."""
        pairwise = cls.resolved_options(options)["pairwise"]
        return tuple(m for m in cls.metrics if pairwise or m != "win_rate")

    @classmethod
    def option_rules(cls, options: dict | None = None) -> list[tuple[bool, str, str]]:
        o = cls.resolved_options(options)
        return [
            (o["max_concurrency"] >= 1, "max_concurrency", "must be >= 1"),
            (o["retries"] >= 0, "retries", "must be >= 0"),
            (o["budget"] >= 0, "budget", "must be >= 0 requests"),
            (o["max_tokens"] >= 1, "max_tokens", "must be >= 1"),
            (o["reasoning_chars"] >= 0, "reasoning_chars", "must be >= 0"),
            (o["temperature"] >= 0, "temperature", "must be >= 0"),
            (o["timeout_s"] > 0, "timeout_s", "must be > 0 seconds"),
        ]

    def __init__(self, base_url: str = "local", model: str = "tiny-qwen2", api_key_env: str = "OPENAI_API_KEY",
                 pointwise_template: str = "", pairwise_template: str = "", pairwise: bool = True,
                 temperature: float = 0.0, max_tokens: int = 64, reasoning_chars: int = 12,
                 max_concurrency: int = 8, timeout_s: float = 60.0,
                 retries: int = 4, budget: int = 10_000, structured: bool = True, cache: bool = True,
                 cache_dir: str = "", max_wait_s: float = 30.0):
        if not max_wait_s >= 0:
            raise ConfigError(f"judge max_wait_s must be a number of seconds >= 0, got {max_wait_s}")
        self.server = None
        self.pointwise_path, self.pointwise_template = _template(pointwise_template, "pointwise.txt",
                                                                 ("prompt", "reference", "answer"))
        self.pairwise_path, self.pairwise_template = _template(pairwise_template, "pairwise.txt",
                                                               ("prompt", "reference", "answer_a", "answer_b"))
        if base_url == "local":  # vLLM's server on loopback, for as long as this evaluator lives
            # lazy: judge_server loads transformers (via harness.core.models), which `import evaluators` does not
            from evaluators.judge_server import LocalJudgeServer

            self.server = LocalJudgeServer(model)
            base_url = self.server.base_url
        self.pairwise = pairwise
        # Short defaults so that the embedded judge (256 positions) fits prompt and answer; raise both for a real one.
        self.score_schema, self.verdict_schema = score_schema(reasoning_chars), verdict_schema(reasoning_chars)
        self.client = JudgeClient(base_url, model, api_key_env, temperature, max_tokens, max_concurrency, timeout_s,
                                  retries, budget, structured,
                                  (Path(cache_dir) if cache_dir else harness_cache() / "judge") if cache else None,
                                  max_wait_s=max_wait_s, server_identity="local" if self.server else "")
        # eval set name -> its step-0 answers, what that set's later answers are judged against
        self.baselines: dict[str, list[str]] = {}

    @property
    def artifacts(self) -> dict[str, str]:
        return {"judge/pointwise_template.txt": self.pointwise_template,
                "judge/pairwise_template.txt": self.pairwise_template}

    def _ask(self, template: str, schema: dict, name: str, **fields: str) -> JudgeRequest:
        return JudgeRequest([{"role": "user", "content": template.format(**fields)}], schema, name)

    def judge(self, prompts: list[str], references: list[str], answers: list[str],
              baseline: list[str] | None = None) -> EvalResult:
        """Pointwise scores for `answers`; with `baseline`, also the win rate of `answers` over it."""
        before = self.client.stats.snapshot()
        refs = [r or "(none)" for r in references]
        pointwise = [self._ask(self.pointwise_template, self.score_schema, "score", prompt=p, reference=r, answer=a)
                     for p, r, a in zip(prompts, refs, answers, strict=True)]
        pairs = []
        if baseline is not None:
            for p, r, a, b in zip(prompts, refs, answers, baseline, strict=True):
                pairs += [self._ask(self.pairwise_template, self.verdict_schema, "verdict", prompt=p, reference=r,
                                    answer_a=a, answer_b=b),
                          self._ask(self.pairwise_template, self.verdict_schema, "verdict", prompt=p, reference=r,
                                    answer_a=b, answer_b=a)]
        replies = self.client.complete_many(pointwise + pairs)
        score_replies, verdict_replies = replies[: len(pointwise)], replies[len(pointwise) :]

        parse_failures = 0
        scores, reasonings = [], []
        for reply in score_replies:
            score, reasoning = parse_score(reply.content)
            parse_failures += reply.content is not None and score is None
            scores.append(score)
            reasonings.append(reasoning or reply.error)
        table = {"prompt": prompts, "answer": answers, "judge_score": scores, "judge_reasoning": reasonings}
        valid = [s for s in scores if s is not None]
        metrics = {"score": sum(valid) / len(valid)} if valid else {}

        if baseline is not None:
            outcomes, verdicts = [], []
            for first, second in zip(verdict_replies[0::2], verdict_replies[1::2], strict=True):
                v1, v2 = parse_verdict(first.content), parse_verdict(second.content)
                parse_failures += sum(r.content is not None and v is None for r, v in ((first, v1), (second, v2)))
                # order 1 shows the current answer as A, order 2 as B; a tie is half a win
                points = [{"A": 1.0, "tie": 0.5, "B": 0.0}[v1]] if v1 else []
                points += [{"B": 1.0, "tie": 0.5, "A": 0.0}[v2]] if v2 else []
                outcomes.append(sum(points) / len(points) if points else None)
                verdicts.append(f"{v1 or first.error or 'unparsed'} / {v2 or second.error or 'unparsed'}")
            decided = [o for o in outcomes if o is not None]
            if decided:
                metrics["win_rate"] = 100 * sum(decided) / len(decided)
            table.update({"baseline": baseline, "win": outcomes, "verdicts_current_first/baseline_first": verdicts})
        after = self.client.stats.snapshot()
        metrics.update({k: after[k] - before[k] for k in ("requests", "failed", "cache_hits")})
        metrics["parse_failures"] = parse_failures
        return EvalResult(metrics, table=table)

    def evaluate(self, ctx: EvalContext) -> EvalResult:
        baseline = self.baselines.get(ctx.eval_set)
        result = self.judge([s.prompt for s in ctx.samples], [s.reference for s in ctx.samples], ctx.predictions,
                            baseline)
        if self.pairwise and baseline is None:
            self.baselines[ctx.eval_set] = list(ctx.predictions)  # the set's first evaluation: step 0
        return result

    def state_dict(self) -> dict | None:
        return {"baselines": self.baselines} if self.pairwise else None

    def load_state_dict(self, state: dict) -> None:
        self.baselines = {name: list(answers) for name, answers in state["baselines"].items()}

    def close(self) -> None:
        self.client.close()
        if self.server is not None:
            self.server.close()
