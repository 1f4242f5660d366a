"""IFEval: the shipped set covers the checkers' registry, verdicts equal lm-eval's own ifeval scoring on generated
responses, the metrics equal lm-eval's aggregation, bad records are named, and the evaluator runs through a backend."""

import json

import numpy as np
import pytest

from evaluators.ifeval import SHIPPED_PROMPTS, IFEval, checkers, follows, load_prompts, score_responses
from evaluators.uncertainty import error_bars, unit_table
from harness.core.errors import DataError

OTHER_LANGUAGE = {
    "fr": "J'aime beaucoup l'automne parce que les arbres changent de couleur et que l'air devient frais le matin.",
    "de": "Am Samstagmorgen ist der Marktplatz voller Menschen, die frisches Brot und Blumen kaufen wollen.",
}
ENGLISH = "I really like autumn because the trees change colour and the air becomes fresh in the morning."


def _count(relation: str, n: int, passing: bool) -> int:
    """How many of a counted thing pass (or fail) `relation` n: 'at least' n or 'less than' n."""
    at_least = relation == "at least"
    return (n if at_least else n - 1) if passing else (n - 1 if at_least else n)


def _sentences(n: int) -> str:
    return " ".join(f"Plants make room {i} feel calm." for i in range(n))


def build(instruction_id: str, kw: dict, passing: bool) -> str:
    """A response written to follow (or, with passing=False, to break) one instruction with its kwargs."""
    if instruction_id == "keywords:existence":
        return "We talk about " + " and ".join(kw["keywords"]) + " today." if passing else "Nothing relevant here."
    if instruction_id == "keywords:frequency":
        n = _count(kw["relation"], kw["frequency"], passing)
        return "Here " + " ".join([kw["keyword"]] * n) + " ends." if n else "Here it ends."
    if instruction_id == "keywords:forbidden_words":
        return "Gears trade speed for force on a hill." + ("" if passing else f" The {kw['forbidden_words'][0]} helps.")
    if instruction_id == "keywords:letter_frequency":
        return "123. " + " ".join([kw["letter"]] * _count(kw["let_relation"], kw["let_frequency"], passing))
    if instruction_id == "language:response_language":
        return OTHER_LANGUAGE[kw["language"]] if passing else ENGLISH
    if instruction_id == "length_constraints:number_sentences":
        return _sentences(_count(kw["relation"], kw["num_sentences"], passing))
    if instruction_id == "length_constraints:number_paragraphs":
        n = kw["num_paragraphs"] + (0 if passing else 1)
        return "\n***\n".join(f"Paragraph {i} about school." for i in range(n))
    if instruction_id == "length_constraints:number_words":
        return " ".join(["word"] * _count(kw["relation"], kw["num_words"], passing))
    if instruction_id == "length_constraints:nth_paragraph_first_word":
        paragraphs = [f"Part {i} of the story." for i in range(kw["num_paragraphs"])]
        paragraphs[kw["nth_paragraph"] - 1] = f"{kw['first_word'] if passing else 'Snow'} fell on the bus."
        return "\n\n".join(paragraphs)
    if instruction_id == "detectable_content:number_placeholders":
        n = kw["num_placeholders"] - (0 if passing else 1)
        return "Meet at " + " ".join(f"[place {i}]" for i in range(n)) + "."
    if instruction_id == "detectable_content:postscript":
        return "Could we move it?\n\n" + (f"{kw['postscript_marker']} Thanks a lot." if passing else "Thanks a lot.")
    if instruction_id == "detectable_format:number_bullet_lists":
        return "\n".join(f"* item {i}" for i in range(kw["num_bullets"] + (0 if passing else 1)))
    if instruction_id == "detectable_format:constrained_response":
        return "My answer is no." if passing else "Penguins cannot fly."
    if instruction_id == "detectable_format:number_highlighted_sections":
        n = kw["num_highlights"] - (0 if passing else 1)
        return "Feed it daily. " + " ".join(f"*tip {i}*" for i in range(n))
    if instruction_id == "detectable_format:multiple_sections":
        n = kw["num_sections"] - (0 if passing else 1)
        return "\n\n".join(f"{kw['section_spliter']} {i + 1}\nWalk by the water." for i in range(n))
    if instruction_id == "detectable_format:json_format":
        return '```json\n{"owls": ["hunt at night", "turn their heads"]}\n```' if passing else "Owls hunt at night."
    if instruction_id == "detectable_format:title":
        return ("<<Night Train>>\n" if passing else "Night Train\n") + "The carriages hum across the snow."
    if instruction_id == "combination:two_responses":
        return "Rye House\n******\nCrust and Crumb" if passing else "Rye House"
    if instruction_id == "combination:repeat_prompt":
        return (kw["prompt_to_repeat"] + " Ice holds the light." if passing else "Ice holds the light.")
    if instruction_id == "startend:end_checker":
        return ("The fox curled up. " + kw["end_phrase"]) if passing else (kw["end_phrase"] + " The end.")
    if instruction_id == "change_case:capital_word_frequency":
        n = _count(kw["capital_relation"], kw["capital_frequency"], passing)
        return "come to the field " + " ".join(["NOW"] * n) + " and run"
    if instruction_id == "change_case:english_capital":
        text = "RECYCLE TODAY FOR A CLEANER STREET TOMORROW AND EVERY DAY AFTER."
        return text if passing else text.capitalize()
    if instruction_id == "change_case:english_lowercase":
        text = "the rain drums softly on the tin roof all night long and never seems to stop."
        return text if passing else text.capitalize()
    if instruction_id == "punctuation:no_comma":
        return "Boil the water then steep the tea." if passing else "Boil the water, then steep the tea."
    if instruction_id == "startend:quotation":
        text = "Slow and steady wins the race."
        return f'"{text}"' if passing else text
    raise AssertionError(f"no response builder for {instruction_id}")


def variants(instruction_id: str, kw: dict) -> list[str]:
    """Responses that pass, fail, and pass only under loose rules (a chatty first line, a trailing line, markdown
    asterisks around the answer), and an empty one."""
    good, bad = build(instruction_id, kw, True), build(instruction_id, kw, False)
    return [good, bad, f"Sure, here it is:\n{good}", f"{good}\nI hope this helps, friend!", f"**{good}**",
            f"Sure, here it is:\n{bad}", ""]


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """One single-instruction IFEval record per instruction of the shipped set (written as a file and read back
    through the evaluator's loader) with every response variant: (docs, prompts, responses)."""
    shipped = [json.loads(line) for line in SHIPPED_PROMPTS.read_text(encoding="utf-8").splitlines()]
    docs = [{"key": f"{r['key']}-{i}", "prompt": r["prompt"], "instruction_id_list": [iid], "kwargs": [kw]}
            for r in shipped for i, (iid, kw) in enumerate(zip(r["instruction_id_list"], r["kwargs"], strict=True))]
    path = tmp_path_factory.mktemp("ifeval") / "single.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    prompts = {p["key"]: p for p in load_prompts(str(path))}
    rows = [(d, prompts[d["key"]], response) for d in docs
            for response in variants(d["instruction_id_list"][0], d["kwargs"][0])]
    # the shipped multi-instruction records too, answered by each of their instructions' passing responses
    for r, p in zip(shipped, load_prompts(), strict=True):
        for iid, kw in zip(r["instruction_id_list"], r["kwargs"], strict=True):
            rows.append((r, p, build(iid, kw, True)))
    return [d for d, _, _ in rows], [p for _, p, _ in rows], [x for _, _, x in rows]


def test_shipped_set_covers_every_instruction_id_of_the_registry():
    registry = set(checkers()[1].INSTRUCTION_DICT)
    assert len(registry) == 25  # Google's IFEval checkers as lm-eval 0.4.13 registers them
    shipped = {iid for p in load_prompts() for iid in p["instruction_id_list"]}
    assert shipped == registry


def test_verdicts_equal_lm_evals_ifeval_task_on_generated_responses(cases):
    docs, prompts, responses = cases
    assert len(responses) >= 100
    utils = checkers()[0]
    seen: dict[str, set] = {}
    loose_only = 0
    for doc, prompt, response in zip(docs, prompts, responses, strict=True):
        reference = utils.process_results(doc, [response])  # the lm-eval ifeval task's own scoring of one doc
        strict, loose = follows(prompt, response)
        assert strict == reference["inst_level_strict_acc"], (doc["key"], response)
        assert loose == reference["inst_level_loose_acc"], (doc["key"], response)
        for iid, s, lo in zip(doc["instruction_id_list"], strict, loose, strict=True):
            seen.setdefault(iid, set()).add((s, lo))
            loose_only += lo and not s
    # every instruction type was both followed and broken, under both rules, and the loose rule mattered
    assert set(seen) == set(checkers()[1].INSTRUCTION_DICT)
    for iid, outcomes in seen.items():
        assert {s for s, _ in outcomes} == {True, False}, iid
        assert {lo for _, lo in outcomes} == {True, False}, iid
    assert loose_only >= 10


def test_metrics_equal_lm_evals_aggregation(cases):
    docs, prompts, responses = cases
    utils = checkers()[0]
    metrics, rows = score_responses(prompts, responses)
    per_doc = [utils.process_results(d, [r]) for d, r in zip(docs, responses, strict=True)]
    expected = {m: 100 * float(np.mean([x[m] for x in per_doc]))
                for m in ("prompt_level_strict_acc", "prompt_level_loose_acc")}
    expected |= {m: 100 * utils.agg_inst_level_acc([x[m] for x in per_doc])
                 for m in ("inst_level_strict_acc", "inst_level_loose_acc")}
    assert metrics == pytest.approx(expected, abs=1e-9)
    assert 0 < metrics["inst_level_strict_acc"] < metrics["inst_level_loose_acc"] < 100
    assert rows["strict"] == [x["inst_level_strict_acc"] for x in per_doc]  # per-instruction verdicts in the table


def test_error_bars_resample_prompts_and_centre_on_the_metrics(cases):
    _, prompts, responses = cases
    metrics, rows = score_responses(prompts, responses)
    rows["key"] = [f"{k}/{i}" for i, k in enumerate(rows["key"])]  # each response its own unit
    units = unit_table(IFEval, rows)
    assert len(units["id"]) == len(responses)
    bars = error_bars(IFEval, units)
    for metric in IFEval.metrics:
        assert bars[f"{metric}_ci_low"] <= metrics[metric] <= bars[f"{metric}_ci_high"]
        assert 0 < bars[f"{metric}_se"] < 10
    # the instruction-level bar is a corpus metric over prompts: its centre is the pooled share, not a mean of shares
    stats = np.asarray(units["ifeval/inst_level_strict_acc_stats"])
    assert 100 * stats[:, 0].sum() / stats[:, 1].sum() == pytest.approx(metrics["inst_level_strict_acc"])


@pytest.mark.parametrize(("record", "message"), [
    ({"key": 1, "prompt": "Hi", "instruction_id_list": ["punctuation:no_semicolon"], "kwargs": [{}]},
     "field 'instruction_id_list[0]' is 'punctuation:no_semicolon', not an instruction id"),
    ({"key": 1, "prompt": "Hi", "instruction_id_list": ["punctuation:no_comma"], "kwargs": []},
     "field 'kwargs' must be a list of 1 objects"),
    ({"key": 1, "prompt": "Hi", "instruction_id_list": [], "kwargs": []},
     "field 'instruction_id_list' must be a non-empty list"),
    ({"key": 1, "prompt": "Hi", "instruction_id_list": ["length_constraints:number_words"],
      "kwargs": [{"num_words": 50}]}, "field 'kwargs[0]' lacks relation for length_constraints:number_words"),
    ({"key": 1, "prompt": "Hi", "instruction_id_list": ["detectable_format:number_highlighted_sections"],
      "kwargs": [{"num_highlights": 0}]}, "field 'kwargs[0]' lacks num_highlights"),
    ({"key": 1, "prompt": "Hi", "instruction_id_list": ["length_constraints:number_words"],
      "kwargs": [{"num_words": 50, "relation": "about"}]},
     "field 'kwargs[0]' is not valid for length_constraints:number_words (ValueError"),
    ({"key": 1, "prompt": "Hi", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{"comma": 1}]},
     "field 'kwargs[0]' is not valid for punctuation:no_comma (TypeError"),
    ({"key": 1, "prompt": "Hi", "instruction_id_list": ["length_constraints:number_words"],
      "kwargs": [{"num_words": "fifty", "relation": "at least"}]}, "field 'kwargs[0]' is not valid"),
    ({"key": 1, "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}, "field 'prompt' is missing"),
])
def test_a_bad_record_is_named_by_file_line_and_field(tmp_path, record, message):
    good = {"key": 0, "prompt": "Say hi.", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(record) + "\n", encoding="utf-8")
    with pytest.raises(DataError) as raised:
        load_prompts(str(path))
    assert f"{path} line 2: {message}" in str(raised.value)


def test_repeated_keys_and_missing_files_are_refused(tmp_path):
    record = {"key": 7, "prompt": "Say hi.", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}
    path = tmp_path / "twice.jsonl"
    path.write_text(json.dumps(record) + "\n" + json.dumps(record) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"{path} line 2: field 'key' 7 repeats {path} line 1"):
        load_prompts(str(path))
    with pytest.raises(DataError, match="nope.jsonl: no such IFEval prompts file"):
        load_prompts("nope.jsonl")


def test_a_limit_keeps_a_seeded_subset_in_file_order():
    every = [p["key"] for p in load_prompts()]
    kept = [p["key"] for p in load_prompts(limit=5, seed=3)]
    assert len(kept) == 5 and kept == [k for k in every if k in kept]
    assert kept == [p["key"] for p in load_prompts(limit=5, seed=3)]
    assert kept != [p["key"] for p in load_prompts(limit=5, seed=4)]


def test_evaluator_generates_greedily_for_its_prompts_and_reports_each_prompt(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evaluators.base import EvalContext
    from harness.engines.hf_engine import HFBackend

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    backend = HFBackend(tokenizer)
    backend.sync_weights(AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    evaluator = IFEval(limit=4, max_new_tokens=12)
    result = evaluator.evaluate(EvalContext(samples=[], backend=backend, tokenizer=tokenizer))
    table = result.table
    assert table["key"] == [p["key"] for p in evaluator.prompts]
    assert all(isinstance(r, str) for r in table["response"])
    expected, _ = score_responses(evaluator.prompts, table["response"])
    assert result.metrics == expected
    assert [json.loads(k) for k in table["kwargs"]] == [p["kwargs"] for p in evaluator.prompts]
    own = IFEval.own_prompts({"limit": 4, "max_new_tokens": 12}, tokenizer)
    assert [(k, n) for k, _, n in own] == [(k, 12) for k in table["key"]]


def test_options_and_metrics_are_checked_before_a_run():
    from experiments.simpo_qwen import SimpoQwen
    from harness.core.errors import ConfigError
    from harness.training.overrides import apply_overrides

    exp = apply_overrides(SimpoQwen, ["evaluators=ifeval", "select_metric=eval/ifeval/inst_level_loose_acc",
                                      "ifeval_limit=3", "ifeval_max_new_tokens=64"])
    assert exp.evaluator_kwargs("ifeval") == {"limit": 3, "max_new_tokens": 64}
    with pytest.raises(ConfigError, match="ifeval_max_new_tokens.*must be >= 1 \\(lm-eval's ifeval task uses 1280\\)"):
        apply_overrides(SimpoQwen, ["evaluators=ifeval", "select_metric=eval/ifeval/inst_level_loose_acc",
                                    "ifeval_max_new_tokens=0"])
    with pytest.raises(ConfigError, match="is not produced by the chosen evaluators"):
        apply_overrides(SimpoQwen, ["evaluators=ifeval", "select_metric=eval/ifeval/acc"])


@pytest.mark.slow
def test_in_loop_run_logs_the_four_metrics_with_error_bars_and_the_prompt_table(tmp_path, monkeypatch, capsys):
    from mlflow import MlflowClient

    from harness.commands.cli import main

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    code = main(["run", "simpo_qwen", "evaluators=ifeval", "select_metric=eval/ifeval/prompt_level_loose_acc",
                 "ifeval_limit=6", "ifeval_max_new_tokens=16", "max_steps=1", "eval_every=1", "eval_limit=2",
                 "backend=hf", f"output_dir={tmp_path / 'outputs'}"])
    _, stderr = capsys.readouterr()
    assert code == 0, stderr[-3000:]
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("simpo_qwen").experiment_id])
    for metric in IFEval.metrics:
        for suffix in ("", "_se", "_ci_low", "_ci_high"):
            key = f"eval/ifeval/{metric}{suffix}"
            assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [0, 1], key
    path = client.download_artifacts(run.info.run_id, "eval_samples/ifeval/step_000001.json", str(tmp_path))
    table = json.loads(open(path, encoding="utf-8").read())
    rows = [dict(zip(table["columns"], row, strict=True)) for row in table["data"]]
    assert len(rows) == 6
    for row in rows:
        assert len(row["strict"]) == len(row["loose"]) == len(row["instruction_id_list"])
        assert row["prompt_level_strict_acc"] == 100.0 * all(row["strict"])
    final = client.get_run(run.info.run_id).data.metrics
    strict = [s for row in rows for s in row["strict"]]
    assert final["eval/ifeval/inst_level_strict_acc"] == pytest.approx(100 * sum(strict) / len(strict))


def test_punkt_is_written_from_the_package_when_nltk_has_none(tmp_path, monkeypatch):
    import nltk
    import punkt

    from evaluators.ifeval import ensure_punkt

    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path))
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path / "empty")])  # NLTK finds no punkt_tab of its own
    with pytest.raises(LookupError):
        nltk.data.find("tokenizers/punkt_tab/english/")
    ensure_punkt()
    assert (tmp_path / "nltk_data" / "tokenizers" / "punkt_tab" / "english" / "abbrev_types.txt").is_file()
    text = "Dr. Smith met Mr. Brown at 5 p.m. on Jan. 3. They talked. The U.S. team won!"
    sentences = nltk.tokenize.PunktTokenizer("english").tokenize(text)  # NLTK's own tokenizer on the written model
    assert sentences == punkt.sent_tokenize(text) and len(sentences) == 3
    ensure_punkt()  # written once: a second call finds it
    assert nltk.data.path.count(str(tmp_path / "nltk_data")) == 1
