"""The choice evaluator: record shapes rendered as lm-evaluation-harness renders them, its metrics, its error bars,
and parity with lm-eval itself (run as a subprocess on the embedded model) on the HF backend and the vLLM engine."""

import glob
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from evaluators.base import EvalContext
from evaluators.choice import Choice, centered, encode_pair, read_questions, score_question
from evaluators.uncertainty import error_bars, unit_table
from harness.core.errors import ConfigError, DataError
from harness.paths import DATA_DIR

SHAPES = DATA_DIR / "choice_shapes"
PLAIN_LIMIT = 20  # questions of data/choice_eval.jsonl in the parity run (all of the shape examples)


def _write(path: Path, rows: list) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


# ---- record shapes ----

def test_each_shape_renders_as_lm_evals_task_does():
    mmlu = read_questions(str(SHAPES / "mmlu.jsonl"))
    assert mmlu[2].description == ("The following are multiple choice questions (with answers) about english "
                                   "vocabulary.\n\n")
    assert mmlu[2].text == 'Which word is the opposite of "early"?\nA. soon\nB. fast\nC. late\nD. new\nAnswer:'
    assert (mmlu[2].choices, mmlu[2].gold) == (("A", "B", "C", "D"), 2)
    assert mmlu[3].description == ""  # no subject, no description
    arc = read_questions(str(SHAPES / "arc.jsonl"))
    assert arc[2].text == "Question: What is 9 times 9?\nAnswer:"
    assert (arc[2].choices, arc[2].gold, arc[2].id) == (("72", "81", "99", "18"), 1, "arc-3")  # labels "1".."4"
    swag = read_questions(str(SHAPES / "hellaswag.jsonl"))
    assert swag[1].text == "Travel: A woman buys a ticket at the station. Then, she"  # ctx_b.capitalize()
    assert swag[2].text == "Home and Garden. How to water a plant: Fill a bottle with water.. Pour it slowly."
    assert swag[0].choices[2] == "paints the stove green and sings."  # [step] removed
    plain = read_questions(str(DATA_DIR / "choice_eval.jsonl"))
    first = json.loads((DATA_DIR / "choice_eval.jsonl").read_text(encoding="utf-8").splitlines()[0])
    assert (plain[0].text, list(plain[0].choices), plain[0].gold) == (first["prompt"], first["choices"],
                                                                      first["answer"])
    assert len(plain) == 60 and len({q.id for q in plain}) == 60


@pytest.mark.parametrize(("row", "message"), [
    ({"prompt": "Q?", "choices": ["a", "b"], "answer": 2}, "field 'answer' must be an index in [0, 2) (got 2)"),
    ({"prompt": "Q?", "choices": ["a", "b"]}, "field 'answer' is missing"),
    ({"prompt": "Q?", "choices": ["a"], "answer": 0}, "field 'choices' must be a list of at least 2 strings"),
    ({"prompt": "Q?", "choices": ["a", 3], "answer": 0}, "field 'choices[1]' must be a non-empty string"),
    ({"prompt": " ", "choices": ["a", "b"], "answer": 0}, "field 'prompt' must be a non-empty string"),
    ({"question": "Q?", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "C"},
     "field 'answerKey' = 'C' must be one of choices.label ['A', 'B']"),
    ({"question": "Q?", "choices": {"text": ["a", "b"]}, "answerKey": "A"}, "field 'choices.label' is missing"),
    ({"ctx": "He", "endings": ["a", "b"], "label": "x"}, "field 'label' must be an index in [0, 2) (got 'x')"),
    ({"question": "Q?", "choices": ["a", "b"], "answer": True}, "field 'answer' must be an index in [0, 2) (got True)"),
    ({"text": "hello"}, "not a multiple-choice record: expected prompt/choices/answer"),
])
def test_a_malformed_record_names_file_line_and_field(tmp_path, row, message):
    good = {"prompt": "Fine?", "choices": ["yes", "no"], "answer": 0}
    path = _write(tmp_path / "mc.jsonl", [good, row])
    with pytest.raises(DataError) as err:
        Choice(data=path)
    assert str(err.value).startswith(f"{path} line 2: ")
    assert message in str(err.value)


def test_duplicate_ids_and_the_answer_by_text(tmp_path):
    path = _write(tmp_path / "mc.jsonl", [{"id": "q", "prompt": "A?", "choices": ["x", "y"], "answer": "y"},
                                          {"id": "q", "prompt": "B?", "choices": ["x", "y"], "answer": 0}])
    with pytest.raises(DataError, match=r"line 2: field 'id' = 'q' is also the id of .*mc.jsonl line 1"):
        Choice(data=path)
    assert read_questions(path, limit=1)[0].gold == 1  # an answer may name its choice by text


def test_options_are_checked_with_the_settings():
    from experiments.sft_qwen import SftQwen
    from harness.training.overrides import apply_overrides

    data = f"plain:{DATA_DIR / 'choice_eval.jsonl'},arc:{SHAPES / 'arc.jsonl'}"
    exp = apply_overrides(SftQwen, ["evaluators=choice", f"choice_data={data}",
                                    "select_metric=eval/choice/acc_centered"])
    assert exp.select_metric == "eval/choice/acc_centered"
    assert "eval/choice/arc_acc" in [f"eval/choice/{m}" for m in Choice.metric_names(exp.evaluator_kwargs("choice"))]
    with pytest.raises(ConfigError, match="field 'choice_data' = 'a:x.jsonl,a:y.jsonl' names the set 'a' twice"):
        apply_overrides(SftQwen, ["evaluators=choice", "choice_data=a:x.jsonl,a:y.jsonl"])
    with pytest.raises(ConfigError, match="field 'choice_shape' = 'mcq' must be one of auto, plain"):
        apply_overrides(SftQwen, ["evaluators=choice", "choice_shape=mcq"])


# ---- metrics ----

def test_scores_follow_lm_evals_rules():
    # loglik -6 over 6 characters beats -4 over 2 per character; per byte, the 2-character Chinese choice (6 bytes)
    # wins; the first of equal scores is taken
    row = score_question([-6.0, -4.0, -5.0], ("aaaaaa", "bb", "中文"), gold=2, delimiter=" ")
    assert (row["pred"], row["pred_norm"], row["pred_bytes"]) == (1, 0, 2)
    assert (row["acc"], row["acc_norm"], row["acc_bytes"]) == (0.0, 0.0, 100.0)
    assert row["bpb_stats"] == [5.0, 7.0]  # the scored continuation " 中文" is 7 bytes
    assert row["bpb"] == pytest.approx(5.0 / (7 * math.log(2)))
    assert score_question([-1.0, -1.0], ("a", "b"), gold=1, delimiter=" ")["pred"] == 0
    assert centered(25.0, 0.25) == 0.0 and centered(100.0, 0.25) == 100.0 and centered(50.0, 0.5) == 0.0


def test_tokenization_follows_lm_evals_encode_pair(tiny_model_dir):
    from harness.core.models import load_tokenizer

    tok = load_tokenizer(tiny_model_dir)
    head, tail = encode_pair(tok, "The capital of France is ", "Paris")  # the trailing space joins the answer
    assert head == tok.encode("The capital of France is")
    assert head + tail == tok.encode("The capital of France is Paris")


def test_fewshot_examples_precede_every_question_and_size_the_engine(tiny_model_dir, tmp_path):
    from experiments.sft_qwen import SftQwen
    from harness.core.models import load_tokenizer
    from harness.training.overrides import apply_overrides
    from harness.training.runner import engine_max_model_len

    shot = "What is 2 plus 2? " * 30 + "2 plus 2 is"
    shots = _write(tmp_path / "shots.jsonl", [{"prompt": shot, "choices": ["5.", "4."], "answer": 1}] * 3)
    tokenizer = load_tokenizer(tiny_model_dir)
    evaluator = Choice(fewshot=shots)
    question = evaluator.questions[0]
    assert evaluator.context(question, tokenizer) == f"{shot} 4.\n\n" * 3 + question.text  # lm-eval's first_n
    longest = max(len(c) + len(k) for c, k in zip(*evaluator.requests(tokenizer), strict=True))
    exp = apply_overrides(SftQwen, ["evaluators=choice", f"choice_fewshot={shots}", "select_metric=eval/choice/acc"])
    assert longest + 1 > 256 and engine_max_model_len(exp, tokenizer) == longest + 1  # scored, then 1 token


def test_chat_renders_one_user_turn_and_drops_the_delimiter(tiny_model_dir):
    """As lm_eval --apply_chat_template: the description a system turn, few-shot examples and question one user
    turn, the generation prompt after it, and each choice right after that (no target delimiter)."""
    from harness.core.models import load_tokenizer

    tokenizer = load_tokenizer(tiny_model_dir)
    evaluator = Choice(data=str(SHAPES / "mmlu.jsonl"), chat=True)
    question = evaluator.questions[0]
    context = evaluator.context(question, tokenizer)
    assert context == tokenizer.apply_chat_template(
        [{"role": "system", "content": question.description.strip()}, {"role": "user", "content": question.text}],
        add_generation_prompt=True, tokenize=False)
    contexts, continuations = evaluator.requests(tokenizer)
    assert contexts[0] + continuations[0] == tokenizer.encode(context + "A")


# ---- the harness's evaluator against lm-evaluation-harness ----

def _task_files(directory: Path) -> dict[str, str]:
    """Local lm-eval tasks over the shipped files: the plain shape by field names, the others including lm-eval's own
    mmlu, arc_easy and hellaswag task files (only the data source replaced)."""
    import lm_eval

    tasks = Path(lm_eval.__file__).parent / "tasks"
    metrics = "metric_list: [{metric: acc}, {metric: acc_norm}, {metric: acc_bytes}]\n"
    files = {
        "choice_plain": f"task: choice_plain\ndataset_path: json\ndataset_kwargs: {{data_files: {{test: "
                        f"{DATA_DIR / 'choice_eval.jsonl'}}}}}\ntest_split: test\noutput_type: multiple_choice\n"
                        f"doc_to_text: prompt\ndoc_to_choice: choices\ndoc_to_target: answer\n",
        "choice_mmlu": f"include: {tasks / 'mmlu/default/_default_template_yaml'}\ntask: choice_mmlu\n"
                       f"dataset_path: json\n"
                       f"dataset_kwargs: {{data_files: {{test: {SHAPES / 'mmlu.jsonl'}}}}}\nfewshot_split: test\n"
                       "description: \"{% if subject %}The following are multiple choice questions (with answers) "
                       "about {{subject.split('_')|join(' ')}}.\\n\\n{% endif %}\"\n",
        "choice_arc": f"include: {tasks / 'arc/arc_easy.yaml'}\ntask: choice_arc\ntag: []\ndataset_path: json\n"
                      f"dataset_name: null\ndataset_kwargs: {{data_files: {{test: {SHAPES / 'arc.jsonl'}}}}}\n"
                      f"training_split: null\nvalidation_split: null\n",
        "choice_hellaswag": f"include: {tasks / 'hellaswag/hellaswag.yaml'}\ntask: choice_hellaswag\ntag: []\n"
                            f"dataset_path: json\ndataset_kwargs: {{data_files: {{validation: "
                            f"{SHAPES / 'hellaswag.jsonl'}}}}}\ntraining_split: null\n",
    }
    for name, text in files.items():
        (directory / f"{name}.yaml").write_text(text + metrics, encoding="utf-8")
    return files


def _lm_eval(model_dir: str, root: Path) -> dict[str, list[dict]]:
    """lm-eval's own per-question results (context, continuations, log-likelihoods, acc...) for each task, in one
    offline subprocess on the model in `model_dir`."""
    (root / "tasks").mkdir()
    names = _task_files(root / "tasks")
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(root / "ds")}
    out = subprocess.run(
        [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={model_dir},dtype=float32",
         "--include_path", str(root / "tasks"), "--tasks", ",".join(names), "--device", "cpu", "--batch_size", "16",
         "--limit", str(PLAIN_LIMIT), "--log_samples", "--output_path", str(root / "out")],
        capture_output=True, text=True, env=env, cwd=root, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    samples = {}
    for name in names:
        (path,) = glob.glob(str(root / "out" / "*" / f"samples_{name}_*.jsonl"))
        rows = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]
        samples[name.removeprefix("choice_")] = sorted(rows, key=lambda r: r["doc_id"])
    return samples


@pytest.fixture(scope="module")
def lm_eval_samples(tiny_model_dir, tmp_path_factory) -> dict[str, list[dict]]:
    return _lm_eval(tiny_model_dir, tmp_path_factory.mktemp("lm_eval"))


def _choice_sets() -> str:
    return (f"plain:{DATA_DIR / 'choice_eval.jsonl'},mmlu:{SHAPES / 'mmlu.jsonl'},arc:{SHAPES / 'arc.jsonl'},"
            f"hellaswag:{SHAPES / 'hellaswag.jsonl'}")


def _compare(result, samples: dict[str, list[dict]], atol: float) -> float:
    """Asserts the evaluator's rows agree with lm-eval's per-question results; returns the largest loglik gap."""
    table, worst = result.table, 0.0
    for set_name, rows in samples.items():
        mine = [i for i, s in enumerate(table["set"]) if s == set_name]
        assert len(mine) == len(rows) > 0
        for i, theirs in zip(mine, rows, strict=True):
            requests = [theirs["arguments"][f"gen_args_{k}"] for k in range(len(table["choices"][i]))]
            assert [r["arg_0"] for r in requests] == [table["context"][i]] * len(requests)
            assert [r["arg_1"] for r in requests] == [" " + c for c in table["choices"][i]]
            lls = [float(r[0]) for r in theirs["filtered_resps"]]
            gaps = np.abs(np.asarray(lls) - np.asarray(table["loglik"][i]))
            assert gaps.max() <= atol, (set_name, table["id"][i], lls, table["loglik"][i])
            worst = max(worst, float(gaps.max()))
            assert table["pred"][i] == int(np.argmax(lls))  # the chosen answer
            for metric in ("acc", "acc_norm", "acc_bytes"):
                assert table[metric][i] == 100.0 * theirs[metric], (set_name, table["id"][i], metric)
        for metric in ("acc", "acc_norm", "acc_bytes"):
            assert result.metrics[f"{set_name}_{metric}"] == pytest.approx(100 * np.mean([r[metric] for r in rows]))
    return worst


def _hf_result(model_dir: str) -> tuple[Choice, object]:
    from harness.core.models import load_model, load_tokenizer
    from harness.engines.hf_engine import HFBackend

    tokenizer = load_tokenizer(model_dir)
    backend = HFBackend(tokenizer)
    backend.sync_weights(load_model(model_dir))
    evaluator = Choice(data=_choice_sets(), limit=PLAIN_LIMIT)
    return evaluator, evaluator.evaluate(EvalContext([], backend=backend, tokenizer=tokenizer))


def test_hf_backend_matches_lm_eval(lm_eval_samples, tiny_model_dir):
    evaluator, result = _hf_result(tiny_model_dir)
    print(f"largest |loglik - lm-eval's| on the HF backend: {_compare(result, lm_eval_samples, 1e-3):.2e}")
    # the headline: the mean over the four sets of each one's centred accuracy, also the mean of its rows
    chance = {s: np.mean([1 / len(c) for c, t in zip(result.table["choices"], result.table["set"], strict=True)
                          if t == s]) for s in lm_eval_samples}
    core = np.mean([centered(result.metrics[f"{s}_acc"], chance[s]) for s in lm_eval_samples])
    assert result.metrics["acc_centered"] == pytest.approx(core)
    assert np.mean(result.table["acc_centered"]) == pytest.approx(core)
    gold = [(-ll[g], len((" " + c[g]).encode())) for ll, g, c in
            zip(result.table["loglik"], result.table["gold"], result.table["choices"], strict=True)]
    assert result.metrics["bpb"] == pytest.approx(sum(n for n, _ in gold) / (math.log(2) * sum(b for _, b in gold)))
    bars = error_bars(evaluator, unit_table(evaluator, result.table))
    assert bars["bpb_ci_low"] < result.metrics["bpb"] < bars["bpb_ci_high"] and bars["acc_centered_se"] > 0


def test_vllm_engine_matches_lm_eval(lm_eval_samples, vllm_backend, tiny_model_dir):
    from harness.core.models import load_model, load_tokenizer

    vllm_backend.sync_weights(load_model(tiny_model_dir))  # other tests leave their own weights in the shared engine
    tokenizer = load_tokenizer(tiny_model_dir)
    result = Choice(data=_choice_sets(), limit=PLAIN_LIMIT).evaluate(
        EvalContext([], backend=vllm_backend, tokenizer=tokenizer))
    # float32 on both sides: the engine's tolerance against HF's forward pass (tests/test_generation_parity.py)
    print(f"largest |loglik - lm-eval's| on the vLLM engine: {_compare(result, lm_eval_samples, 1e-3):.2e}")


@pytest.mark.slow
def test_smollm2_matches_lm_eval_on_the_hf_backend(tmp_path):
    """The same parity on a real pretrained model (SmolLM2-135M-Instruct, its GPT-2-style tokenizer)."""
    from harness.core.models import resolve_model

    model_dir = resolve_model("smollm2")
    samples = _lm_eval(model_dir, tmp_path)
    _, result = _hf_result(model_dir)
    print(f"largest |loglik - lm-eval's| on SmolLM2 (HF backend): {_compare(result, samples, 1e-3):.2e}")
    print({k: round(v, 2) for k, v in result.metrics.items()})


# ---- in the training loop ----

@pytest.mark.slow
def test_a_run_logs_every_choice_metric_with_its_error_bar_and_selects_on_the_headline(tmp_path, tiny_model_dir,
                                                                                       monkeypatch):
    """Two choice sets in a one-step SFT run (the CLI's entry point, in this process): each evaluation logs the five
    metrics with error bars over questions, each set's own five, and the question table; acc_centered selects."""
    from mlflow.tracking import MlflowClient

    from harness.commands.cli import main

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    data = f"facts:{DATA_DIR / 'choice_eval.jsonl'},arc:{SHAPES / 'arc.jsonl'}"
    code = main(["run", "sft_qwen", "max_steps=1", "eval_every=1", "eval_limit=4", "batch_size=4", "backend=hf",
                 "evaluators=choice", f"choice_data={data}", "choice_limit=12",
                 "select_metric=eval/choice/acc_centered", f"output_dir={tmp_path / 'out'}"])
    assert code == 0
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("sft_qwen").experiment_id])
    logged = run.data.metrics
    for metric in ("acc", "acc_norm", "acc_bytes", "acc_centered", "bpb"):
        assert {f"eval/choice/{metric}{s}" for s in ("", "_se", "_ci_low", "_ci_high")} <= logged.keys()
        assert {f"eval/choice/facts_{metric}", f"eval/choice/arc_{metric}"} <= logged.keys()
        assert [m.step for m in client.get_metric_history(run.info.run_id, f"eval/choice/{metric}")] == [0, 1]
    assert logged["eval/choice/acc_centered"] == pytest.approx(
        (logged["eval/choice/facts_acc_centered"] + logged["eval/choice/arc_acc_centered"]) / 2)
    assert 0 < logged["eval/choice/bpb"] < 50 and logged["eval/choice/bpb_ci_low"] <= logged["eval/choice/bpb"]
    from harness.training.tracking.queries import load_table

    table = load_table(run.info.run_id, "eval_samples/choice/step_000001.json")
    assert len(table["id"]) == 17 and table["id"][-1] == "arc/arc-5" and len(table["loglik"][0]) == 4


def test_paired_tests_cover_every_choice_metric_over_questions():
    """compare and the end-of-run summary test new - base per question (the unit), bpb as a corpus metric."""
    from evaluators.uncertainty import paired_tests

    rng = np.random.default_rng(0)

    def own(p: float) -> dict[str, list]:
        correct = 100.0 * (rng.random(40) < p)
        return {"id": [f"q{i}" for i in range(40)], "acc": list(correct), "acc_norm": list(correct),
                "acc_bytes": list(correct), "acc_centered": list((correct - 25) / 0.75),
                "bpb_stats": [[float(10 - p * 8), 5.0] for _ in range(40)]}

    tests = paired_tests({"choice": Choice}, {}, {}, {"choice": own(0.25)}, {"choice": own(0.9)})
    assert sorted(tests) == [f"eval/choice/{m}" for m in sorted(("acc", "acc_norm", "acc_bytes", "acc_centered",
                                                                 "bpb"))]
    assert tests["eval/choice/acc"].significant and tests["eval/choice/bpb"].delta < 0
