"""`python -m harness run|list|score|data`: the command line the Makefile wraps."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from harness.errors import ConfigError, DataError
from harness.sandbox import IsolationUnavailable


def _run(args: argparse.Namespace) -> int:
    from harness.experiment import load_class
    from harness.overrides import apply_overrides
    from harness.runner import run_experiment

    exp = apply_overrides(load_class(args.name), args.overrides)
    run_experiment(exp)
    return 0


def _list(_: argparse.Namespace) -> int:
    from harness.experiment import discover

    for name, cls in discover().items():
        print(f"{name:<20} {cls.description()}")
    return 0


def _score(args: argparse.Namespace) -> int:
    if args.evaluator == "humaneval":
        from harness.scoring import score_humaneval_file

        metrics, results_path = score_humaneval_file(args.samples, args.problems, args.k, args.allow_weak_isolation)
        print(f"per-sample results: {results_path}", file=sys.stderr)
        print(json.dumps(metrics))
        return 0
    if args.evaluator == "judge":
        from harness.scoring import score_judge_file

        if not args.base_url or not args.judge_model:
            raise ConfigError("score judge needs --base-url and --judge-model")
        print(json.dumps(score_judge_file(args.samples, args.base_url, args.judge_model, args.pairwise_with,
                                          api_key_env=args.api_key_env)))
        return 0
    from harness.scoring import score_file

    print(json.dumps(score_file(args.evaluator, args.samples, args.model).metrics))
    return 0


def _judge_server(args: argparse.Namespace) -> int:
    import time

    from harness.judge_server import LocalJudgeServer

    server = LocalJudgeServer(args.model, args.port)
    print(f"judge server for {args.model} at {server.base_url} (Ctrl-C stops it)", flush=True)
    try:
        while server.process.poll() is None:
            time.sleep(1)
    finally:
        server.close()
    return 0


def _ks(text: str) -> list[int]:
    try:
        ks = [int(k) for k in text.split(",") if k.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--k expects comma-separated integers, got {text!r}") from None
    if not ks or min(ks) < 1:
        raise argparse.ArgumentTypeError(f"--k expects positive integers, got {text!r}")
    return ks


def _data(args: argparse.Namespace) -> int:
    from harness.code_tasks import generate_code_tasks
    from harness.paths import DATA_DIR
    from harness.tasks import generate

    out = Path(args.out) if args.out else DATA_DIR
    for kind, path in {**generate(out, seed=args.seed), **generate_code_tasks(out, seed=args.seed)}.items():
        print(f"{kind}: {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from evaluators import EVALUATORS

    parser = argparse.ArgumentParser(prog="python -m harness", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train an experiment with in-loop evaluation, logged to MLflow")
    run.add_argument("name", help="experiment NAME (a module in experiments/)")
    run.add_argument("overrides", nargs="*", help="field=value overrides, type-checked against the experiment")
    run.set_defaults(func=_run)
    sub.add_parser("list", help="list experiments").set_defaults(func=_list)
    score = sub.add_parser("score", help="score saved generations offline; prints one JSON object last")
    score.add_argument("evaluator", choices=sorted(EVALUATORS))
    score.add_argument("--samples", required=True,
                       help="JSONL: prompt, reference, prediction (humaneval: task_id, completion)")
    score.add_argument("--model", help="perplexity: tiny-qwen2 or a local model directory")
    score.add_argument("--problems", help="humaneval: problems JSONL (default: the 164 shipped HumanEval problems)")
    score.add_argument("--k", type=_ks, default=[1, 10, 100], help="humaneval: pass@k values, e.g. 1,10")
    score.add_argument("--allow-weak-isolation", action="store_true",
                       help="humaneval: run without bubblewrap (resource limits only; the code can reach your files)")
    score.add_argument("--base-url", help="judge: OpenAI-compatible API base URL (e.g. http://127.0.0.1:8000/v1)")
    score.add_argument("--judge-model", help="judge: the judge model's name at that API")
    score.add_argument("--pairwise-with", help="judge: predictions to compare against (same prompts, same order)")
    score.add_argument("--api-key-env", default="OPENAI_API_KEY", help="judge: environment variable with the API key")
    score.set_defaults(func=_score)
    server = sub.add_parser("judge-server", help="serve a local model as an OpenAI-compatible judge on 127.0.0.1")
    server.add_argument("--model", default="tiny-qwen2")
    server.add_argument("--port", type=int, default=8000)
    server.set_defaults(func=_judge_server)
    data = sub.add_parser("data", help="data tools")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    gen = data_sub.add_parser("generate", help="regenerate the embedded task data (deterministic for a seed)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--out", help="directory (default: data/)")
    gen.set_defaults(func=_data)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, DataError, IsolationUnavailable) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
