"""`python -m harness run|eval|show|list|sweep|compare|score|data|judge-server|services|serve|chat|sample`: the command
line the Makefile wraps."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

from evaluators import EVALUATORS
from evaluators.sandbox import IsolationUnavailable
from harness.commands import services
from harness.core import ranks
from harness.core.errors import ConfigError, DataError, TrackingUnavailable, TrainingDiverged
from harness.core.files import atomic_writer, check_output_file
from harness.core.formats import check, convert
from harness.core.records import read_records, resolve_local
from harness.embedded.code_data import generate_code_tasks
from harness.embedded.fact_data import generate
from harness.paths import DATA_DIR


def _run(args: argparse.Namespace) -> int:
    from harness.training import console

    if args.launch is not None and not ranks.launched():  # the launcher: its ranks route their own output
        return _run_routed(args)
    # library output goes to a file from here on, before the imports below (DeepSpeed logs when it is imported)
    with console.library_log():
        return _run_routed(args)


def _run_routed(args: argparse.Namespace) -> int:
    # Imported here, not at the top: these modules pull in torch, transformers, mlflow or optuna (start-up time).
    from harness.training import distributed

    # the multi-node options first: a refusal comes before the slower imports below
    nodes = None if ranks.launched() else distributed.check_nodes(args.launch, args.nnodes, args.node_rank,
                                                                   args.master_addr, args.master_port)
    from experiments import load_class
    from harness.training.lineage import pinned_overrides
    from harness.training.overrides import apply_overrides, build_experiment
    from harness.training.runner import prepare, run_experiment

    if ranks.launched():  # a rank: the parent checked these settings and passes them resolved
        run_experiment(build_experiment(load_class(args.name), args.overrides))
        return 0
    overrides = args.overrides
    if any(o.partition("=")[0] == "resume" and o.partition("=")[2] for o in overrides):
        from harness.training.resume import resumed_config  # the run's own config; a differing one is refused

        exp, overrides = resumed_config(load_class(args.name), overrides, launch=args.launch)
    else:
        exp = apply_overrides(load_class(args.name), overrides, launch=args.launch)
    if args.launch is None:
        run_experiment(exp)
        return 0
    # checks the data and builds the model once, before the ranks start; on every node, since under torchrun any
    # node may hold rank 0 (distributed.Nodes)
    prepare(exp)
    # model (and reward_model): a run:latest:... reference as prepare pinned it, so every rank uses the same run
    return distributed.launch(args.launch, args.nproc, ["run", args.name, *overrides, f"deepspeed={exp.deepspeed}",
                                                        *pinned_overrides(exp)], nodes)


def _eval(args: argparse.Namespace) -> int:
    from harness.training import console

    with console.library_log():  # before the imports below, as `run`
        from harness.commands.eval_model import eval_experiment, run_eval

        run_eval(eval_experiment(args.ref, args.overrides, args.like))
    return 0


def _show(args: argparse.Namespace) -> int:
    """Every field (type, default, value after the overrides, help), the evaluators' options, then the settings
    check; nothing is loaded or run. A failed check raises its ConfigError after the listing (exit status 2)."""
    from experiments import load_class
    from harness.training.overrides import build_experiment
    from harness.training.settings import check_settings

    cls = load_class(args.name)
    exp = build_experiment(cls, args.overrides)  # an unknown key or a bad value stops here, as in `run`
    try:
        exp, error = check_settings(exp, args.launch), None
    except ConfigError as e:
        error = e
    print(f"{cls.name()}: {cls.description()}\n")
    print(_fields_table(exp))
    print(f"\n{_options_table(exp)}\n")
    if error is not None:
        print("settings check: FAILED", flush=True)
        raise error
    print("settings check: OK")
    return 0


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip()
                     for r in [header, *rows])


def _fields_table(exp) -> str:
    from harness.training.overrides import cli_value, field_settings

    rows = []
    for s in field_settings(type(exp)):
        value = cli_value(getattr(exp, s.key))
        rows.append((s.key, s.type, s.default, value + (" *" if value != s.default else ""), s.help))
    return "fields (* = not the default):\n" + _table(("field", "type", "default", "value", "help"), rows)


def _options_table(exp) -> str:
    """The options of the chosen evaluators (and of any other given on the command line): each one's value is the
    command line's `<evaluator>_<option>`, else the experiment's field of that name, else the evaluator's default."""
    from harness.training.overrides import cli_value, evaluator_option_settings

    names = [e for e in EVALUATORS if e in exp.evaluators or e in exp.evaluator_options]
    rows = []
    for name in names:
        given = exp.evaluator_options.get(name, {})
        for s in evaluator_option_settings(name):
            option = s.key.removeprefix(f"{name}_")
            value = (cli_value(given[option]) if option in given else
                     cli_value(getattr(exp, s.key)) if hasattr(exp, s.key) else s.default)
            rows.append((s.key, s.type, s.default, value + (" *" if value != s.default else "")))
    others = ", ".join(e for e in EVALUATORS if e not in names and evaluator_option_settings(e))
    text = "evaluator options (<evaluator>_<option>=value; * = not the evaluator's default):\n"
    text += _table(("option", "type", "default", "value"), rows) if rows else "  (the chosen evaluators have none)"
    return text + (f"\n  other evaluators: {others} (add one to evaluators= to list its options)" if others else "")


def _sweep(args: argparse.Namespace) -> int:
    from harness.sweeps.study import SweepConfig, run_sweep

    if args.trials is None and args.timeout is None and args.total_trials is None:
        raise ConfigError("sweep needs --trials, --total-trials or --timeout (otherwise it would never end)")
    cfg = SweepConfig(args.name, args.overrides, trials=args.trials, total_trials=args.total_trials,
                      timeout_s=args.timeout, storage=args.storage, study=args.study, pruner=args.pruner,
                      warmup_steps=args.warmup_steps, startup_trials=args.startup_trials, seed=args.seed,
                      heartbeat_s=args.heartbeat)
    print(json.dumps(run_sweep(cfg)))
    return 0


def _trial(args: argparse.Namespace) -> int:
    from harness.sweeps.trial import run_trial

    return run_trial(args.spec)


def _compare(args: argparse.Namespace) -> int:
    from harness.commands.compare import compare

    if bool(args.run_ids) == bool(args.experiment):
        raise ConfigError("compare needs RUN_ID ... or --experiment NAME (one of the two)")
    table, png, unlogged = compare(args.run_ids, args.experiment, args.out, args.max_runs)
    print(table)
    if not unlogged:
        print(f"eval curves: {png} (also logged to each run under compare/)")
    else:  # read-only access to the runs: the comparison stands, the plot stays on this machine
        print(f"eval curves: {png} (not logged to {len(unlogged)} of the runs: {', '.join(unlogged)}; "
              f"{next(iter(unlogged.values()))})")
    return 0


def _mlflow_send(args: argparse.Namespace) -> int:
    from harness.training.outbox import sent_path
    from harness.training.tracking.runs import send_undelivered
    from harness.training.tracking.store import shown_tracking_uri

    path = Path(args.file)
    if not path.is_file():
        if sent_path(path).is_file():
            raise ConfigError(f"mlflow-send: {path} is not a file: it was sent already and renamed to "
                              f"{sent_path(path)}")
        raise ConfigError(f"mlflow-send: {path} is not a file (a run's outputs/NAME/RUN_ID/mlflow_undelivered.jsonl)")
    sent, moved = send_undelivered(path)
    for run_id, count in sent.items():
        print(f"[mlflow] run {run_id}: {count} write(s) from {path} sent to {shown_tracking_uri()}")
    print(f"[mlflow] all sent: {path} renamed to {moved}, so sending it again resends nothing")
    return 0


def _export(args: argparse.Namespace) -> int:
    from harness.commands.export import export_run

    dest, ckpt = export_run(args.ref, args.merge, args.to)
    form = ("full weights" if not ckpt.adapter else
            f"LoRA adapter {'folded into' if args.merge else 'on'} {ckpt.base_model}")
    print(f"exported run {ckpt.run_id}'s best checkpoint (step {ckpt.step}, {ckpt.metric}={ckpt.value:.4g}; "
          f"{form}) to {dest}")
    return 0


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expects a positive integer, got {text!r}")
    return int(text)


def _list(_: argparse.Namespace) -> int:
    from experiments import discover

    for name, cls in discover().items():
        print(f"{name:<20} {cls.description()}")
    return 0


def _score(args: argparse.Namespace) -> int:
    if args.evaluator == "humaneval":
        from harness.commands.score import score_humaneval_file

        metrics, results_path = score_humaneval_file(args.samples, args.problems, args.k, args.allow_weak_isolation)
        print(f"per-sample results: {results_path}", file=sys.stderr)
        print(json.dumps(metrics))
        return 0
    if args.evaluator == "judge":
        from harness.commands.score import score_judge_file

        if not args.base_url or not args.judge_model:
            raise ConfigError("score judge needs --base-url and --judge-model")
        print(json.dumps(score_judge_file(args.samples, args.base_url, args.judge_model, args.pairwise_with,
                                          api_key_env=args.api_key_env)))
        return 0
    if args.evaluator == "reward_accuracy":
        from harness.commands.score import score_reward_file

        print(json.dumps(score_reward_file(args.samples, args.model).metrics))
        return 0
    from harness.commands.score import score_file

    print(json.dumps(score_file(args.evaluator, args.samples, args.model).metrics))
    return 0


def _gpu_check(args: argparse.Namespace) -> int:
    from harness.commands.gpu_check import main as gpu_check

    return gpu_check([])


def _judge_server(args: argparse.Namespace) -> int:
    from evaluators.judge_server import LocalJudgeServer

    server = LocalJudgeServer(args.model, args.port)
    print(f"judge server for {args.model} at {server.base_url} (Ctrl-C stops it)", flush=True)
    return _serve_until_stopped(server)


def _serve_until_stopped(server) -> int:
    """Wait while the server runs (Ctrl-C or SIGTERM stops it), then stop it with its process group."""

    def stop(signum, frame):  # SIGTERM would otherwise end this process at once and orphan the server
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, stop)
    try:
        while server.process.poll() is None:
            time.sleep(1)
    finally:
        server.close()
    return 0


def _serve(args: argparse.Namespace) -> int:
    from harness.commands.serve import start_server

    server, name = start_server(args.ref, args.port, args.name, args.max_model_len)
    print(f"serving {args.ref} as model {name!r} at {server.base_url} (OpenAI-compatible; Ctrl-C stops it)\n"
          f"  judge it with: judge_base_url={server.base_url} judge_model={name}", flush=True)
    return _serve_until_stopped(server)


def _chat(args: argparse.Namespace) -> int:
    from harness.commands.serve import run_chat

    run_chat(args.ref, args.max_new_tokens, args.temperature, args.seed, args.system)
    return 0


def _sample(args: argparse.Namespace) -> int:
    from harness.commands.sample import SampleConfig, run_sample

    cfg = SampleConfig(args.ref, args.prompts, args.out, args.n, args.scorer, args.format, args.temperature,
                       args.top_p, args.max_new_tokens, args.seed, args.limit, args.batch, args.reward_model,
                       args.judge_url, args.judge_model)
    print(json.dumps(run_sample(cfg)))
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
    out = Path(args.out) if args.out else DATA_DIR
    for kind, path in {**generate(out, seed=args.seed), **generate_code_tasks(out, seed=args.seed)}.items():
        print(f"{kind}: {path}")
    from harness.commands.self_pairs import make_embedded_pairs  # builds the embedded models, loads vLLM

    for kind, path in make_embedded_pairs(out).items():
        print(f"{kind}: {path} (the instruct model's own answers)")
    return 0


def _data_check(args: argparse.Namespace) -> int:
    counts = check(read_records(args.file), args.format)
    print(json.dumps({"file": args.file, "records": sum(counts.values()), "formats": dict(counts)}))
    return 0


def _data_convert(args: argparse.Namespace) -> int:
    inputs = [args.input, resolve_local(args.input)]  # as given, and where read_records finds it
    check_output_file(Path(args.out), inputs)  # a directory, or IN itself (never overwritten), fails first
    if not args.out.endswith(".jsonl"):
        raise ConfigError(f"data convert writes JSONL: OUT must end with .jsonl, got {args.out!r}")
    rows = convert(read_records(args.input), args.format, args.to)  # a bad record stops here, before OUT exists
    with atomic_writer(Path(args.out), inputs) as f:  # all or nothing: OUT appears only once every row is written
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    print(json.dumps({"in": args.input, "out": args.out, "to": args.to, "rows": len(rows)}))
    return 0


def _data_self_pairs(args: argparse.Namespace) -> int:
    from harness.commands.self_pairs import make_self_pairs  # loads the model and a vLLM engine

    print(json.dumps(make_self_pairs(args.model, args.prompts, args.out, args.limit, args.max_new_tokens, args.seed)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m harness", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train an experiment with in-loop evaluation, logged to MLflow")
    run.add_argument("name", help="experiment NAME (a module in experiments/)")
    run.add_argument("overrides", nargs="*", help="field=value overrides, type-checked against the experiment")
    run.add_argument("--launch", choices=("deepspeed", "torchrun"),
                     help="train data-parallel in --nproc processes started by this launcher (deepspeed: ZeRO-2 "
                          "unless deepspeed=zero3 or a config file is given); rank 0 evaluates and logs")
    run.add_argument("--nproc", type=_positive, default=2, help="processes with --launch (default 2), per node")
    run.add_argument("--nnodes", type=_positive, default=1,
                     help="machines the run spans, with --launch: the same command on each, with its --node-rank "
                          "(default 1)")
    run.add_argument("--node-rank", type=int, default=0,
                     help="this machine's number, 0 to NNODES-1; node 0 hosts the rendezvous at --master-addr")
    run.add_argument("--master-addr", help="several nodes: node 0's address, as every node reaches it")
    run.add_argument("--master-port", type=int,
                     help="several nodes: the rendezvous port on node 0 (default 29500), free there")
    run.set_defaults(func=_run)
    ev = sub.add_parser("eval", help="evaluate a model without training, as a run's step 0 evaluates it: the same "
                                     "evaluators, eval sets, tables and error bars, logged to the MLflow experiment "
                                     "eval")
    ev.add_argument("ref", metavar="MODEL_OR_RUN", help="tiny-qwen2, smollm2, a model directory, a .gguf file, a hub "
                                                        "name, run:RUN_ID or run:latest:EXPERIMENT")
    ev.add_argument("overrides", nargs="*", help="evaluation fields and evaluator options as field=value (eval_data=, "
                                                 "evaluators=, eval_limit=, backend=, choice_data=, ...)")
    ev.add_argument("--like", default="", metavar="EXPERIMENT",
                    help="start from this experiment's evaluation fields (eval_data, eval_limit, max_new_tokens, "
                         "evaluators, ...), so that the numbers compare with its runs' step 0")
    ev.set_defaults(func=_eval)
    show = sub.add_parser("show", help="print every field (type, default, value, help) and the evaluator options, "
                                       "then check the settings without running anything (exit 2 when they fail)")
    show.add_argument("name", help="experiment NAME (a module in experiments/)")
    show.add_argument("overrides", nargs="*", help="field=value overrides, type-checked as by `run`")
    show.add_argument("--launch", choices=("deepspeed", "torchrun"), help="check the settings for this launcher")
    show.set_defaults(func=_show)
    sub.add_parser("list", help="list experiments").set_defaults(func=_list)
    sweep = sub.add_parser("sweep", help="Optuna sweep over the experiment's search space, pruned on in-loop evals; "
                                         "prints one JSON object last")
    sweep.add_argument("name", help="experiment NAME (its search_space method says what is tuned)")
    sweep.add_argument("overrides", nargs="*", help="field=value fixed for every trial")
    sweep.add_argument("--trials", type=_positive, help="trials this process runs")
    sweep.add_argument("--total-trials", type=_positive,
                       help="stop once the study has this many finished trials, counting every worker's")
    sweep.add_argument("--timeout", type=float, help="seconds after which no new trial starts")
    sweep.add_argument("--storage", help="Optuna storage URL (default: OPTUNA_STORAGE or sqlite:///optuna.db); "
                                         "a PostgreSQL URL lets workers on several machines share a study")
    sweep.add_argument("--study", help="study name (default: the experiment's); an existing study is resumed")
    sweep.add_argument("--pruner", choices=("hyperband", "median", "none"), default="hyperband",
                       help="hyperband (default: in `make bench` it spent 56%% fewer steps for the same best value) "
                            "or median")
    sweep.add_argument("--warmup-steps", type=int, default=1,
                       help="median pruner: no pruning before this training step (default 1: after the baseline)")
    sweep.add_argument("--startup-trials", type=int, default=2,
                       help="median pruner: no pruning until this many trials have finished")
    sweep.add_argument("--seed", type=int, help="sampler seed (give each worker its own, or none)")
    sweep.add_argument("--heartbeat", type=_positive, default=30,
                       help="seconds between trial heartbeats; a trial silent for 4 of them is marked FAIL")
    sweep.set_defaults(func=_sweep)
    trial = sub.add_parser("trial", help="run one sweep trial from its spec file (started by `sweep`)")
    trial.add_argument("spec")
    trial.set_defaults(func=_trial)
    comp = sub.add_parser("compare", help="eval metrics of runs side by side (baseline -> final) and their curves")
    comp.add_argument("run_ids", nargs="*", metavar="RUN_ID")
    comp.add_argument("--experiment", help="compare the newest finished runs of this MLflow experiment")
    comp.add_argument("--max-runs", type=_positive, default=10)
    comp.add_argument("--out", help="PNG path (default outputs/compare/eval_curves_<runs>.png)")
    comp.set_defaults(func=_compare)
    exp_cmd = sub.add_parser("export", help="a run's best checkpoint as a standalone Hugging Face model directory "
                                            "(tokenizer, chat template, model card), written atomically")
    exp_cmd.add_argument("ref", metavar="RUN_ID", help="RUN_ID, run:RUN_ID or run:latest:EXPERIMENT")
    exp_cmd.add_argument("--merge", action="store_true",
                         help="fold a LoRA adapter into its base model (default: keep the adapter, naming its base)")
    exp_cmd.add_argument("--to", help="the directory to create (default: export or export-merged beside the run's "
                                      "best/); an existing one is refused")
    exp_cmd.set_defaults(func=_export)
    send = sub.add_parser("mlflow-send", help="send the MLflow writes a run kept in its mlflow_undelivered.jsonl "
                                              "(its tracking server was down at its end) to MLFLOW_TRACKING_URI")
    send.add_argument("file")
    send.set_defaults(func=_mlflow_send)
    score = sub.add_parser("score", help="score saved generations offline; prints one JSON object last")
    score.add_argument("evaluator", choices=sorted(EVALUATORS))
    score.add_argument("--samples", required=True,
                       help="JSONL: prompt, reference, prediction (humaneval: task_id, completion)")
    score.add_argument("--model", help="perplexity: tiny-qwen2, smollm2, a local model directory or a .gguf file; "
                                       "reward_accuracy: a reward model, run:latest:rm_qwen or its directory")
    score.add_argument("--problems", help="humaneval: problems JSONL (default: the 164 shipped HumanEval problems)")
    score.add_argument("--k", type=_ks, default=[1, 10, 100], help="humaneval: pass@k values, e.g. 1,10")
    score.add_argument("--allow-weak-isolation", action="store_true",
                       help="humaneval: run without bubblewrap (resource limits only; the code can reach your files)")
    score.add_argument("--base-url", help="judge: OpenAI-compatible API base URL (e.g. http://127.0.0.1:8000/v1)")
    score.add_argument("--judge-model", help="judge: the judge model's name at that API")
    score.add_argument("--pairwise-with", help="judge: predictions to compare against (same prompts, same order)")
    score.add_argument("--api-key-env", default="OPENAI_API_KEY", help="judge: environment variable with the API key")
    score.set_defaults(func=_score)
    services.add_parser(sub)
    sub.add_parser("gpu-check", help="the GPU path end to end in a few minutes: engine and weight sync, greedy parity "
                                     "with HF, a full, a LoRA and a QLoRA step, in-loop evaluation (PASS/FAIL each; "
                                     "exit 77 without a GPU)").set_defaults(func=_gpu_check)
    server = sub.add_parser("judge-server", help="serve a local model as an OpenAI-compatible judge on 127.0.0.1")
    server.add_argument("--model", default="tiny-qwen2",
                        help="tiny-qwen2, smollm2, a model directory or a .gguf file; also the served model name")
    server.add_argument("--port", type=int, default=8000)
    server.set_defaults(func=_judge_server)
    ref_help = "RUN_ID, run:RUN_ID, run:latest:EXPERIMENT, a checkpoint or model directory, or a model name"
    serve = sub.add_parser("serve", help="serve a run's best checkpoint (or a model) with vLLM's OpenAI-compatible "
                                         "server on 127.0.0.1; a LoRA adapter is served as an adapter")
    serve.add_argument("ref", metavar="RUN_ID|DIR", help=ref_help)
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--name", default="", help="the model name clients ask for (default: RUN_ID|DIR as given)")
    serve.add_argument("--max-model-len", type=_positive, help="context (default: the model's, at most 2048)")
    serve.set_defaults(func=_serve)
    chat_cmd = sub.add_parser("chat", help="chat in the terminal with a run or model through its chat template "
                                           "(stdin lines are user turns; /exit ends)")
    chat_cmd.add_argument("ref", metavar="RUN_ID|DIR", help=ref_help)
    chat_cmd.add_argument("--max-new-tokens", type=_positive, default=128)
    chat_cmd.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    chat_cmd.add_argument("--seed", type=int, default=0)
    chat_cmd.add_argument("--system", default="", help="a system message before the conversation")
    chat_cmd.set_defaults(func=_chat)
    smp = sub.add_parser("sample", help="rejection sampling: n answers per prompt, scored; the best as SFT data or "
                                        "best vs worst as preference pairs (resumable); prints one JSON object last")
    smp.add_argument("ref", metavar="EXPERIMENT_OR_RUN",
                     help="an experiment (its newest run's best checkpoint), " + ref_help)
    smp.add_argument("--prompts", required=True, help="records with `prompt` (and `id`), plus what the scorer reads")
    smp.add_argument("--out", required=True, help="JSONL to write; progress goes to OUT-stem.samples.jsonl beside it")
    smp.add_argument("--n", type=_positive, default=8, help="answers sampled per prompt")
    smp.add_argument("--scorer", default="rouge_l",
                     help="answer_match, rouge_l, code_pass, reward_model, answer[/exact|numeric|contains], "
                          "rouge[/rouge1|rouge2|rougeL], bleu, judge or humaneval (default rouge_l)")
    smp.add_argument("--format", choices=("sft", "preference"), default="preference",
                     help="preference: best vs worst answer (default); sft: the best answer")
    smp.add_argument("--temperature", type=float, default=1.0)
    smp.add_argument("--top-p", type=float, default=1.0)
    smp.add_argument("--max-new-tokens", type=_positive, default=48)
    smp.add_argument("--seed", type=int, default=0)
    smp.add_argument("--limit", type=int, default=0, help="first N prompts (0 = all)")
    smp.add_argument("--batch", type=_positive, default=16, help="prompts per batch; progress is saved after each")
    smp.add_argument("--reward-model", default="", help="reward_model scorer: a run or a reward model directory")
    smp.add_argument("--judge-url", default="local",
                     help="judge scorer: OpenAI-compatible base URL, or local (a judge server for --judge-model)")
    smp.add_argument("--judge-model", default="tiny-qwen2", help="judge scorer: the judge model's name")
    smp.set_defaults(func=_sample)
    data = sub.add_parser("data", help="data tools")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    gen = data_sub.add_parser("generate", help="regenerate the embedded task data (deterministic for a seed)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--out", help="directory (default: data/)")
    gen.set_defaults(func=_data)
    formats = ("auto", "messages", "sharegpt", "alpaca", "preference", "kto", "prompt_completion", "text")
    chk = data_sub.add_parser("check", help="validate every record of a data file; prints counts per format")
    chk.add_argument("file", help="local .jsonl/.json/.parquet/.txt or a hub dataset name[:split]")
    chk.add_argument("--format", choices=formats, default="auto")
    chk.set_defaults(func=_data_check)
    conv = data_sub.add_parser("convert", help="convert a data file to another format (JSONL out)")
    conv.add_argument("input", metavar="IN")
    conv.add_argument("out", metavar="OUT")
    conv.add_argument("--to", required=True, choices=("messages", "preference", "kto", "text"))
    conv.add_argument("--format", choices=formats, default="auto", help="IN's format (default: detected)")
    conv.set_defaults(func=_data_convert)
    pairs = data_sub.add_parser("self-pairs", help="preference pairs against a model's own greedy answers (SPIN): "
                                                   "chosen = the data's answer, rejected = the model's")
    pairs.add_argument("--model", required=True, help="smollm2, tiny-qwen2, a model directory or a .gguf file")
    pairs.add_argument("--prompts", required=True, help="records with prompt and chosen (or reference) strings")
    pairs.add_argument("--out", required=True, help="JSONL to write: prompt, chosen, rejected")
    pairs.add_argument("--limit", type=int, default=512, help="first N records (0 = all)")
    pairs.add_argument("--max-new-tokens", type=_positive, default=48)
    pairs.add_argument("--seed", type=int, default=0)
    pairs.set_defaults(func=_data_self_pairs)
    return parser


def main(argv: list[str] | None = None) -> int:
    # MLflow prints each run it ends with a URL built from MLFLOW_TRACKING_URI, a password in it included; the
    # harness prints its own, without one
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse stops filling the `overrides` list at the first option; key=value after options belong to it too
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args)
    except (ConfigError, DataError, IsolationUnavailable) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (TrainingDiverged, TrackingUnavailable) as e:  # the message names the step, or the file of writes
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        from harness.training.tracking.store import auth_refusal

        if (refusal := auth_refusal(e)) is None:
            raise
        print(f"error: {refusal}", file=sys.stderr)
        return 2
