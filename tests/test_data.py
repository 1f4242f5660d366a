"""Loading records from local files, and errors that name the file, line and field."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from harness.core import records as data
from harness.core.errors import DataError
from harness.core.formats import convert
from harness.embedded.code_data import generate_code_tasks
from harness.embedded.fact_data import generate
from harness.paths import DATA_DIR

PAIR = {"prompt": "What is 2 plus 2?", "chosen": "2 plus 2 is 4.", "rejected": "2 plus 2 is 5."}


def test_jsonl_json_and_parquet_give_the_same_rows(tmp_path):
    rows = [PAIR, {**PAIR, "prompt": [{"role": "user", "content": "Hi"}]}]
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "p.json").write_text(json.dumps(rows))
    pq.write_table(pa.Table.from_pylist([PAIR, {**PAIR, "prompt": "Hi"}]), tmp_path / "p.parquet")
    from_jsonl = convert(data.read_records(str(tmp_path / "p.jsonl")), "auto", "preference")
    assert from_jsonl == convert(data.read_records(str(tmp_path / "p.json")), "auto", "preference")
    assert from_jsonl == convert(data.read_records(str(tmp_path / "p.parquet")), "auto", "preference")
    assert from_jsonl[0] == {
        "prompt": [{"role": "user", "content": "What is 2 plus 2?"}],
        "chosen": [{"role": "assistant", "content": "2 plus 2 is 4."}],
        "rejected": [{"role": "assistant", "content": "2 plus 2 is 5."}],
    }


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ([PAIR, {"prompt": "q", "chosen": "a"}], "line 2: field 'rejected' is missing"),
        ([PAIR, PAIR, {**PAIR, "chosen": "  "}], "line 3: field 'chosen' must be a non-empty string"),
        ([{**PAIR, "prompt": 3}], "line 1: field 'prompt' must be a string or a list of {role, content} messages"),
        ([PAIR, "{not json"], "line 2: invalid JSON"),
        ([[1, 2]], "line 1: expected a JSON object, got list"),
    ],
)
def test_malformed_preference_records_name_file_line_and_field(tmp_path, lines, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    with pytest.raises(DataError) as err:
        convert(data.read_records(str(path)), "auto", "preference")
    assert str(err.value).startswith(f"{path} {message}")


def test_eval_records_need_prompt_and_reference(tmp_path):
    path = tmp_path / "eval.json"
    path.write_text(json.dumps([{"prompt": "q", "reference": "r"}, {"prompt": "q2"}]))
    with pytest.raises(DataError, match=r"eval.json record 2: field 'reference' is missing"):
        data.eval_samples(data.read_records(str(path)))
    assert [s.reference for s in data.eval_samples(data.read_records(str(path)), limit=1)] == ["r"]


def test_missing_local_file_is_reported_not_sent_to_the_hub():
    with pytest.raises(DataError, match="nowhere.jsonl: no such file"):
        data.read_records("nowhere.jsonl")


def test_relative_paths_resolve_against_the_repository(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert len(data.read_records("data/eval.jsonl")) == 256


def test_shipped_data_is_what_the_generator_makes(tmp_path):
    paths = {**generate(tmp_path, seed=0), **generate_code_tasks(tmp_path, seed=0)}
    assert len(paths) == 8
    for kind, path in paths.items():
        assert path.read_bytes() == (DATA_DIR / path.name).read_bytes(), kind


def test_eval_prompts_never_appear_in_training_data():
    eval_prompts = {json.loads(line)["prompt"] for line in (DATA_DIR / "eval.jsonl").read_text().splitlines()}
    pref = {json.loads(line)["prompt"] for line in (DATA_DIR / "preference.jsonl").read_text().splitlines()}
    sft = {json.loads(line)["messages"][0]["content"] for line in (DATA_DIR / "sft.jsonl").read_text().splitlines()}
    rl = {json.loads(line)["prompt"] for line in (DATA_DIR / "rl.jsonl").read_text().splitlines()}
    assert not eval_prompts & pref and not eval_prompts & sft and not eval_prompts & rl
    zh = [line for line in (DATA_DIR / "eval.jsonl").read_text().splitlines() if '"lang": "zh"' in line]
    assert len(zh) > 64  # Chinese ROUGE/BLEU measure real Chinese text
