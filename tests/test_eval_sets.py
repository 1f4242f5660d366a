"""Eval sets (issue 16): the held-out split of the training file (eval_split), several named eval sets in one run
(eval_data=name:path,...), and whole-conversation eval records rendered by the chat template. Fast tests for the
logic on an in-memory tokenizer; one slow run of sft_qwen with three eval sets, read back from MLflow."""

import json

import pytest
from test_experiment_run import store  # noqa: F401  (the tmp MLflow store fixture)

from evaluators import EVALUATORS, EvalContext
from experiments.dpo_qwen import DpoQwen
from experiments.sft_qwen import SftQwen
from harness.core.errors import ConfigError, DataError
from harness.core.eval_data import (
    SPLIT,
    eval_set_samples,
    heldout_samples,
    metric_key,
    parse_eval_data,
    split_records,
)
from harness.core.prompts import read_chat_template, render_sample
from harness.core.records import EvalSample, Record, read_records
from harness.paths import REPO_ROOT
from harness.training.overrides import apply_overrides
from harness.training.runner import fit_eval_prompts

CHAT = [{"role": "system", "content": "Answer in one sentence."},
        {"role": "user", "content": "What is 2 plus 3?"},
        {"role": "assistant", "content": "2 plus 3 is 5."},
        {"role": "user", "content": "What is 4 plus 4?"}]


@pytest.fixture(scope="module")
def chatml_tokenizer():
    """A real fast tokenizer (byte-level BPE trained in memory on a few lines) with the shipped chatml template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([m["content"] for m in CHAT] + ["system user assistant"], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|im_end|>")
    fast.chat_template = read_chat_template("chatml")
    return fast


def _records(rows: list[dict], name: str = "f.jsonl") -> list[Record]:
    return [Record(f"{name} line {i + 1}", row) for i, row in enumerate(rows)]


# ---- the held-out split ----

def test_split_is_seeded_disjoint_and_sized():
    records = read_records("data/sft.jsonl")
    train, held = split_records(records, 0.05, seed=0)
    assert len(held) == 100 and len(train) == 1900
    assert {r.source for r in train}.isdisjoint(r.source for r in held)  # no record is trained on and evaluated
    assert {r.source for r in train} | {r.source for r in held} == {r.source for r in records}
    again_train, again_held = split_records(records, 0.05, seed=0)
    assert [r.source for r in again_held] == [r.source for r in held] and len(again_train) == len(train)
    assert [r.source for r in split_records(records, 0.05, seed=1)[1]] != [r.source for r in held]
    # training keeps the file's order, so the training rows of the remaining records are those of the full file
    assert SftQwen().train_rows(train) == [row for r in train for row in SftQwen().train_rows([r])]
    with pytest.raises(DataError, match=r"eval_split=0.001 of the 10 training records holds out 0"):
        split_records(records[:10], 0.001, seed=0)


def test_heldout_preference_rows_give_chosen_as_reference_and_the_pair():
    records = _records([
        {"prompt": "What is 1 plus 1?", "chosen": "1 plus 1 is 2.", "rejected": "1 plus 1 is 3.", "answer": "2"},
        {"chosen": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"},
                    {"role": "assistant", "content": "Paris."}],
         "rejected": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"},
                      {"role": "assistant", "content": "Rome."}]},
    ], "pairs.jsonl")
    samples, sources = heldout_samples(records)
    assert sources == ["pairs.jsonl line 1", "pairs.jsonl line 2"]
    one, two = samples
    assert (one.id, one.prompt, one.reference, one.rejected, one.answer, one.messages) == (
        "1", "What is 1 plus 1?", "1 plus 1 is 2.", "1 plus 1 is 3.", "2", None)
    assert (two.prompt, two.reference, two.rejected) == ("Capital of France?", "Paris.", "Rome.")
    assert two.messages == ({"role": "system", "content": "Be brief."},
                            {"role": "user", "content": "Capital of France?"})
    # the split of the shipped preference file: every held-out pair keeps both answers
    _train, held = split_records(read_records("data/preference.jsonl"), 0.05, seed=0)
    samples, _ = heldout_samples(held, limit=8)
    assert len(samples) == 8 and all(s.rejected and s.rejected != s.reference for s in samples)


def test_heldout_kto_text_and_required_fields():
    kto = _records([{"prompt": "q1", "completion": "bad", "label": False},
                    {"prompt": "q2", "completion": "good", "label": True}], "kto.jsonl")
    samples, sources = heldout_samples(kto)
    assert [(s.prompt, s.reference) for s in samples] == [("q2", "good")] and sources == ["kto.jsonl line 2"]
    with pytest.raises(DataError, match=r"kto.jsonl line 1: the held-out records \(eval_split\) give no eval sample"):
        heldout_samples(kto[:1])
    with pytest.raises(DataError, match=r"t.txt line 1: eval_split holds out text records, which have no reference"):
        heldout_samples(_records([{"text": "raw"}], "t.txt"))
    with pytest.raises(DataError, match=r"f.jsonl line 1: field 'answer' is missing \(the answer evaluator reads it\)"):
        heldout_samples(_records([{"prompt": "p", "chosen": "c", "rejected": "r"}]),
                        required={"answer": "the answer evaluator reads it"})


# ---- eval_data: several sets, the split, and select_metric ----

def test_eval_data_parsing():
    assert parse_eval_data("data/eval.jsonl") == [("", "data/eval.jsonl")]
    assert parse_eval_data("org/dataset:test") == [("", "org/dataset:test")]  # a hub name:split stays one set
    assert parse_eval_data("") == [("", SPLIT)] and parse_eval_data("split") == [("", SPLIT)]
    assert parse_eval_data("facts:data/eval.jsonl, held:split,hub:org/d:test") == [
        ("facts", "data/eval.jsonl"), ("held", SPLIT), ("hub", "org/d:test")]
    assert metric_key("eval/bleu/bleu", "facts") == "eval/facts/bleu/bleu"
    assert metric_key("eval/time/total_s", "facts") == "eval/time/facts/total_s"
    assert metric_key("eval/bleu/bleu", "") == "eval/bleu/bleu"


BAD_EVAL_DATA = [
    (["eval_data=facts:data/eval.jsonl,data/x.jsonl"],
     "field 'eval_data' = 'facts:data/eval.jsonl,data/x.jsonl' has the item 'data/x.jsonl', which is not name:path"),
    (["eval_data=a:data/eval.jsonl,a:data/rl.jsonl"], "names the set 'a' twice"),
    (["eval_data=a b:data/eval.jsonl,c:data/rl.jsonl"], "has the set name 'a b': a name is letters, digits, _ and -"),
    (["eval_data=bleu:data/eval.jsonl,c:data/rl.jsonl"], "has the set name 'bleu', which metric keys and tables"),
    (["eval_data=time:data/eval.jsonl"], "has the set name 'time'"),
    (["eval_split=0.05"], "field 'eval_split' = 0.05 holds out training records that no eval set reads: set "
                          "eval_data=split"),
    (["eval_data=split"], "field 'eval_data' = 'split' reads the held-out split (split), but eval_split is 0"),
    (["eval_data="], "reads the held-out split (split, an empty eval_data), but eval_split is 0"),
    (["eval_split=1.0", "eval_data=split"], "field 'eval_split' = 1.0 must be in [0, 1)"),
    (["eval_data=a:data/eval.jsonl,b:data/rl.jsonl"],
     "field 'select_metric' = 'eval/rouge/rougeL' is not produced by the chosen evaluators; choose one of: "
     "eval/a/perplexity/perplexity, "),
]


@pytest.mark.parametrize(("overrides", "message"), BAD_EVAL_DATA)
def test_bad_eval_set_settings_name_the_option(overrides, message):
    with pytest.raises(ConfigError) as err:
        apply_overrides(SftQwen, overrides)
    assert message in str(err.value)


def test_named_sets_select_a_prefixed_metric():
    exp = apply_overrides(DpoQwen, ["eval_data=facts:data/eval.jsonl,held:split", "eval_split=0.05",
                                    "select_metric=eval/held/bleu/bleu"])
    assert exp.select_metric == "eval/held/bleu/bleu"
    with pytest.raises(ConfigError, match="eval/held/rouge/rougeL"):
        apply_overrides(DpoQwen, ["eval_data=facts:data/eval.jsonl,held:split", "eval_split=0.05",
                                  "select_metric=eval/other/bleu/bleu"])


# ---- whole-conversation eval records ----

def test_conversation_records_render_through_the_chat_template(chatml_tokenizer):
    records = _records([{"id": "with-ref", "messages": CHAT, "reference": "4 plus 4 is 8."},
                        {"messages": [*CHAT, {"role": "assistant", "content": "4 plus 4 is 8."}], "answer": 8},
                        {"prompt": "What is 1 plus 1?", "reference": "2."}])
    samples = eval_set_samples(records)
    assert [s.id for s in samples] == ["with-ref", "1", "2"]
    assert samples[0] == EvalSample("with-ref", "What is 4 plus 4?", "4 plus 4 is 8.", None, tuple(CHAT))
    assert (samples[1].reference, samples[1].answer, samples[1].messages) == ("4 plus 4 is 8.", "8", tuple(CHAT))
    expected = chatml_tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True)
    expected = expected["input_ids"] if hasattr(expected, "keys") else expected
    assert render_sample(chatml_tokenizer, samples[0]) == list(expected)
    assert render_sample(chatml_tokenizer, samples[0], system="ignored") == list(expected)  # its own system turn wins
    no_system = [m for m in CHAT if m["role"] != "system"]
    with_run_system = chatml_tokenizer.apply_chat_template([{"role": "system", "content": "S"}, *no_system],
                                                           add_generation_prompt=True, tokenize=False)
    sample = eval_set_samples(_records([{"messages": no_system, "reference": "r"}]))[0]
    assert chatml_tokenizer.decode(render_sample(chatml_tokenizer, sample, system="S")) == with_run_system


BAD_CONVERSATIONS = [
    ({"messages": CHAT[:3], "reference": "r"}, "conv.jsonl line 1: field 'messages[2].role' must be 'user'"),
    ({"messages": CHAT[:2]}, "conv.jsonl line 1: field 'reference' is missing (the expected reply)"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "robot", "content": "a"}], "reference": "r"},
     "conv.jsonl line 1: field 'messages[1].role' is 'robot'"),
    ({"messages": [{"role": "user"}], "reference": "r"},
     "conv.jsonl line 1: field 'messages[0]' must be an object with string 'role' and 'content'"),
    ({"messages": [], "reference": "r"}, "conv.jsonl line 1: field 'messages' must be a non-empty list"),
    ({"messages": [{"role": "assistant", "content": "a"}]}, "conv.jsonl line 1: field 'messages' must be 'user'"),
    ({"messages": CHAT, "reference": 3}, "conv.jsonl line 1: field 'reference' must be a non-empty string"),
]


@pytest.mark.parametrize(("row", "message"), BAD_CONVERSATIONS)
def test_malformed_conversations_name_file_line_and_field(row, message):
    with pytest.raises(DataError) as err:
        eval_set_samples(_records([row], "conv.jsonl"))
    assert message in str(err.value)


def test_conversation_prompts_are_fitted_to_the_context(chatml_tokenizer):
    samples = eval_set_samples(_records([{"id": "c", "messages": CHAT, "reference": "4 plus 4 is 8."}], "conv.jsonl"))
    full = render_sample(chatml_tokenizer, samples[0])
    exp = SftQwen(evaluators=["bleu"], max_new_tokens=4)
    assert fit_eval_prompts(exp, chatml_tokenizer, len(full) + 4, samples, ["conv.jsonl line 1"]) == [full]
    with pytest.raises(DataError, match=r"conv.jsonl line 1 \(id c\): the prompt is \d+ tokens with the chat template"):
        fit_eval_prompts(exp, chatml_tokenizer, len(full) + 3, samples, ["conv.jsonl line 1"])
    exp.eval_truncation = "left"
    assert fit_eval_prompts(exp, chatml_tokenizer, len(full), samples, ["conv.jsonl line 1"]) == [full[4:]]
    chatml_tokenizer.chat_template, template = None, chatml_tokenizer.chat_template
    try:
        with pytest.raises(DataError, match=r"conv.jsonl line 1 \(id c\): field 'messages': a whole-conversation eval "
                                            r"record needs a chat template"):
            fit_eval_prompts(exp, chatml_tokenizer, None, samples, ["conv.jsonl line 1"])
    finally:
        chatml_tokenizer.chat_template = template


def test_reward_accuracy_scores_held_out_pairs(chatml_tokenizer):
    """Held-out preference pairs reach reward_accuracy as pairs: it scores them instead of its own file."""
    import torch
    from transformers import Qwen2Config, Qwen2ForSequenceClassification

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(chatml_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, num_labels=1,
                         pad_token_id=chatml_tokenizer.pad_token_id)
    model = Qwen2ForSequenceClassification(config)
    samples, _ = heldout_samples(_records([{"prompt": "What is 2 plus 3?", "chosen": "5.", "rejected": "6."},
                                           {"chosen": [*CHAT, {"role": "assistant", "content": "8."}],
                                            "rejected": [*CHAT, {"role": "assistant", "content": "9."}]}]))
    assert samples[1].messages == tuple(CHAT)
    result = EVALUATORS["reward_accuracy"](limit=1).evaluate(
        EvalContext(samples, tokenizer=chatml_tokenizer, model=model))
    assert result.table["prompt"] == ["What is 2 plus 3?", "What is 4 plus 4?"]
    assert result.table["chosen"] == ["5.", "8."] and result.table["rejected"] == ["6.", "9."]
    margins = [c - r for c, r in zip(result.table["score_chosen"], result.table["score_rejected"], strict=True)]
    assert result.metrics["margin"] == pytest.approx(sum(margins) / 2)


@pytest.mark.slow  # two runs in a fresh MLflow store
def test_compare_pairs_runs_set_by_set(tmp_path, monkeypatch):
    """Two runs with named sets: compare pairs each set's final table with the same set of the first run."""
    from harness.commands.compare import compare
    from harness.training.tracking.runs import mlflow_run

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    ids = []
    for shift in (0.0, 30.0):
        with mlflow_run("sets", {"eval_data": "a:data/eval.jsonl,b:split"}, {}) as tracker:
            for name in ("a", "b"):
                values = [10.0 * i + (shift if name == "a" else 0.0) for i in range(6)]
                table = {"id": [str(i) for i in range(6)], "prompt": [f"q{i}" for i in range(6)],
                         "rouge/rougeL": values}
                tracker.log_metrics({f"eval/{name}/rouge/rougeL": sum(values) / 6}, 1)
                tracker.log_table(table, f"eval_samples/{name}/step_000001.json")
            ids.append(tracker.run_id)
    text, _, _ = compare(ids, out=str(tmp_path / "c.png"))
    lines = text.splitlines()
    assert any(line.strip().endswith("6 samples for eval set a:") for line in lines)
    (a_line,) = [line for line in lines if line.strip().startswith("eval/a/rouge/rougeL ") and "CI" in line]
    (b_line,) = [line for line in lines if line.strip().startswith("eval/b/rouge/rougeL ") and "CI" in line]
    assert "25.000 ->     55.000" in a_line and "25.000 ->     25.000" in b_line


# ---- one run: two eval files (one of conversations) and the held-out split ----

@pytest.mark.slow
def test_sft_run_with_three_eval_sets_logs_each_under_its_prefix(store, tmp_path, monkeypatch, capsys):  # noqa: F811
    from harness.commands.cli import main

    env, client, tmp = store
    conversations = tmp_path / "conversations.jsonl"
    rows = [{"id": f"c{i}", "messages": [{"role": "system", "content": "Answer in one sentence."},
                                          {"role": "user", "content": f"What is {i} plus {i}?"},
                                          {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."},
                                          {"role": "user", "content": f"What is {i} plus {i + 1}?"}],
             "reference": f"{i} plus {i + 1} is {2 * i + 1}."} for i in range(1, 6)]
    conversations.write_text("".join(json.dumps(r) + "\n" for r in rows))
    # the CLI's entry point in this process, from the repository root as `make experiment` runs it
    monkeypatch.setenv("MLFLOW_TRACKING_URI", env["MLFLOW_TRACKING_URI"])
    monkeypatch.chdir(REPO_ROOT)
    code = main(["run", "sft_qwen", "max_steps=2", "eval_every=1", "eval_limit=4", "batch_size=4",
                 "max_new_tokens=16", "eval_split=0.05", f"eval_data=facts:data/eval.jsonl,chat:{conversations},"
                 "heldout:split", "select_metric=eval/facts/rouge/rougeL", f"output_dir={tmp / 'outputs'}"])
    stdout, stderr = capsys.readouterr()
    assert code == 0, stderr[-3000:]
    assert "[data] eval_split=0.05: 100 of 2000 training records held out for evaluation (seed 0)" in stdout
    assert "4 from data/eval.jsonl (facts), 4 from " in stdout
    assert "4 from the held-out split (heldout)" in stdout

    exp = client.get_experiment_by_name("sft_qwen")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"
    run_id = run.info.run_id
    for name in ("facts", "chat", "heldout"):
        for metric in ("perplexity/perplexity", "bleu/bleu", "rouge/rougeL", "rouge/rougeL_se"):
            assert [m.step for m in client.get_metric_history(run_id, f"eval/{name}/{metric}")] == [0, 1, 2], (name,
                                                                                                                metric)
        assert [m.step for m in client.get_metric_history(run_id, f"eval/time/{name}/generate_s")] == [0, 1, 2]
        assert f"eval set {name} (4 samples):" in stdout
        assert f"eval/{name}/rouge/rougeL" in stdout.split("baseline (step 0) vs final (step 2)")[1]
    assert not client.get_metric_history(run_id, "eval/rouge/rougeL")  # no unprefixed scores beside the sets
    assert [m.step for m in client.get_metric_history(run_id, "eval/time/total_s")] == [0, 1, 2]
    assert run.data.tags["data.eval.heldout.fingerprint"].startswith("split 0.05 seed 0 of ")
    assert len(run.data.tags["data.eval.facts.fingerprint"]) == 16

    names = ("facts", "chat", "heldout")
    artifacts = {a.path for name in names for a in client.list_artifacts(run_id, f"eval_samples/{name}")}
    assert artifacts == {f"eval_samples/{n}/step_00000{s}.json" for n in names for s in (0, 1, 2)}
    table = json.loads(open(client.download_artifacts(run_id, "eval_samples/chat/step_000002.json", str(tmp))).read())
    chat_rows = [dict(zip(table["columns"], r, strict=True)) for r in table["data"]]
    assert [r["id"] for r in chat_rows] == ["c1", "c2", "c3", "c4"]
    assert chat_rows[0]["prompt"] == "What is 1 plus 2?" and chat_rows[0]["reference"] == "1 plus 2 is 3."
    final = client.get_metric_history(run_id, "eval/chat/rouge/rougeL")[-1].value
    assert sum(r["rouge/rougeL"] for r in chat_rows) / 4 == pytest.approx(final)

    selection = json.loads((tmp / "outputs" / "sft_qwen" / run_id / "best" / "selection.json").read_text())
    by_step = {m.step: m.value for m in client.get_metric_history(run_id, "eval/facts/rouge/rougeL")}
    assert selection["metric"] == "eval/facts/rouge/rougeL" and selection["value"] == max(by_step.values())
