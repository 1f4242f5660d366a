"""Loading records from local files, and errors that name the file, line and field."""

import json
import os
import re
import stat

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from harness.core import records as data
from harness.core.errors import ConfigError, DataError
from harness.core.eval_data import eval_set_samples
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
        eval_set_samples(data.read_records(str(path)))
    assert [s.reference for s in eval_set_samples(data.read_records(str(path)), limit=1)] == ["r"]


def test_missing_local_file_is_reported_not_sent_to_the_hub():
    with pytest.raises(DataError, match="nowhere.jsonl: no such file"):
        data.read_records("nowhere.jsonl")


def test_relative_paths_resolve_against_the_repository(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert len(data.read_records("data/eval.jsonl")) == 256


def test_shipped_data_is_what_the_generator_makes(tmp_path):
    paths = {**generate(tmp_path, seed=0), **generate_code_tasks(tmp_path, seed=0)}
    assert len(paths) == 7
    for kind, path in paths.items():
        assert path.read_bytes() == (DATA_DIR / path.name).read_bytes(), kind


def _rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA_DIR / name).read_text(encoding="utf-8").splitlines()]


# Every file some stage or experiment trains on: the base's pretraining text, the SFT stage's chat data, the
# preference pairs and their prompts, the RL prompts, dpo_smollm2's pairs
TRAINING_FILES = ("pretrain.txt", "sft.jsonl", "preference_prompts.jsonl", "preference.jsonl", "rl.jsonl",
                  "smollm2_self_pairs.jsonl")


def test_eval_prompts_and_references_appear_in_no_training_file():
    training = "\n".join(
        (DATA_DIR / name).read_text(encoding="utf-8") if name.endswith(".txt") else
        "\n".join(text for row in _rows(name) for text in _strings(row)) for name in TRAINING_FILES)
    eval_rows = _rows("eval.jsonl")
    leaked = [(r["id"], what) for r in eval_rows for what in ("prompt", "reference") if r[what] in training]
    assert not leaked
    assert len(eval_rows) == 256 and len({r["prompt"] for r in eval_rows}) == 256
    assert sum(r["lang"] == "zh" for r in eval_rows) > 64  # Chinese ROUGE/BLEU measure real Chinese text
    # the facts are in pretraining, as prose: what the eval asks is learnt, the question is not
    pretrain = (DATA_DIR / "pretrain.txt").read_text(encoding="utf-8")
    assert "Paris is the capital of France." in pretrain and "巴黎是法国的首都。" in pretrain


def test_eval_code_functions_appear_in_no_training_file():
    training = (DATA_DIR / "pretrain.txt").read_text(encoding="utf-8") + (DATA_DIR / "code_sft.jsonl").read_text()
    trained = set(re.findall(r"\b([a-z_]+_\d+)\b", training))
    held_out = [r["entry_point"] for r in _rows("code_eval.jsonl")]
    assert len(held_out) == 96 and not set(held_out) & trained
    # every eval number is trained under other names (the held-out part is the function, not its digits)
    assert {name.rsplit("_", 1)[1] for name in held_out} <= {name.rsplit("_", 1)[1] for name in trained}


def _strings(row: dict) -> list[str]:
    return [m["content"] for m in row["messages"]] if "messages" in row else [v for v in row.values()
                                                                               if isinstance(v, str)]


def test_preference_pairs_are_wrong_answers_the_instruct_model_makes(vllm_backend, tiny_model_dir):
    """The shipped pairs' rejected answers are the instruct model's own greedy ones where they are wrong. The embedded
    models are trained at set-up, and training is not the same float for float on every CPU (an AMD EPYC build and
    a Xeon build diverge in training, not in a near-tie here and there): so what is checked on any machine is that
    the model built here makes the same kind of mistake on these prompts (wrong on at least 140 of 160, running on
    into another question on more than 15%), and the shipped pairs have it too. (On the build they came from, 95% or
    more of them come out again; on an AMD EPYC build, none.)"""
    from harness.commands.self_pairs import EMBEDDED_PAIRS, EMBEDDED_PAIRS_TOKENS, own_answer_pairs
    from harness.core.models import load_tokenizer
    from harness.core.prompts import render_prompt

    tokenizer = load_tokenizer(tiny_model_dir)
    for prompts_file, pairs_file in EMBEDDED_PAIRS:
        records = _rows(prompts_file)[:160]
        prompts, right = [r["prompt"] for r in records], [r["reference"] for r in records]
        regenerated, _ = own_answer_pairs(vllm_backend, [render_prompt(tokenizer, p) for p in prompts], prompts,
                                          right, EMBEDDED_PAIRS_TOKENS)
        assert len(regenerated) >= 140, (pairs_file, len(regenerated))
        own_run_on = sum("\n" in r["rejected"] for r in regenerated) / len(regenerated)
        assert own_run_on > 0.15, (pairs_file, own_run_on)
        shipped = {r["prompt"]: r for r in _rows(pairs_file)}
        references = {r["prompt"]: r["reference"] for r in _rows(prompts_file)}
        assert all(r["chosen"] == references[r["prompt"]] != r["rejected"] for r in shipped.values())
        run_on = sum("\n" in r["rejected"] for r in shipped.values()) / len(shipped)
        assert run_on > 0.15, (pairs_file, run_on)


EVAL_ROW = '{"prompt": "Was ist 2+2?", "reference": "Vier, schön."}\n'


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".txt"])
def test_case4_bad_bytes_name_file_line_and_offset_and_a_bom_is_accepted(tmp_path, suffix):
    good = {".jsonl": EVAL_ROW * 2, ".json": "[\n" + EVAL_ROW + ",\n" + EVAL_ROW + "]", ".txt": "Größe\n" * 2}[suffix]
    path = tmp_path / f"d{suffix}"
    path.write_bytes(b"\xef\xbb\xbf" + good.encode())  # saved on Windows: a UTF-8 byte order mark first
    assert len(data.read_records(str(path))) == 2
    first, second = good.encode().split(b"\n", 1)
    for raw, offset, what in [
        (first + b"\n" + second.replace("ö".encode(), b"\xf6"), len(first) + 1 + second.index("ö".encode()),
         "invalid start byte: byte 0xf6"),  # Latin-1, not UTF-8
        (first + b"\n" + second[:second.index("ö".encode()) + 1], len(first) + 1 + second.index("ö".encode()),
         "unexpected end of data: byte 0xc3"),  # `head -c` through a multi-byte character
    ]:
        path.write_bytes(raw)
        with pytest.raises(DataError) as err:
            data.read_records(str(path))
        assert str(err.value) == (f"{path} line 2: not UTF-8 text ({what} at byte offset {offset}); "
                                  "save the file as UTF-8")


def test_case10_empty_eval_file_names_the_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "x.jsonl").write_text("\n")
    with pytest.raises(DataError, match=r"^data/x\.jsonl: no records$"):
        eval_set_samples(data.read_records("data/x.jsonl"))


def test_case3_atomic_writes_get_ordinary_file_modes(tmp_path):
    from harness.core.files import atomic_writer, write_json_atomic

    old = os.umask(0o022)
    try:
        write_json_atomic(tmp_path / "cache.json", {"a": 1})
        assert stat.S_IMODE((tmp_path / "cache.json").stat().st_mode) == 0o644  # as open() would create it
        (tmp_path / "cache.json").chmod(0o640)
        with atomic_writer(tmp_path / "cache.json") as f:
            f.write("{}")
        assert stat.S_IMODE((tmp_path / "cache.json").stat().st_mode) == 0o640  # the replaced file's mode
        os.umask(0o077)
        write_json_atomic(tmp_path / "private.json", {})
        assert stat.S_IMODE((tmp_path / "private.json").stat().st_mode) == 0o600
    finally:
        os.umask(old)
    (tmp_path / "sub").mkdir()
    with pytest.raises(ConfigError, match="is the same file as the input"):
        with atomic_writer(tmp_path / "cache.json", inputs=[tmp_path / "sub" / ".." / "cache.json"]):
            pass


def test_case10_output_directory_is_refused_and_no_temp_file_is_left(tmp_path, capsys):
    from harness.commands.cli import main
    from harness.core.files import atomic_writer, write_json_atomic

    (tmp_path / "out.jsonl").mkdir()
    with pytest.raises(ConfigError, match=f"^{tmp_path / 'out.jsonl'} is a directory"):
        write_json_atomic(tmp_path / "out.jsonl", {})
    with pytest.raises(ConfigError, match="is a directory"):  # a directory appears while the file is written
        with atomic_writer(tmp_path / "late.jsonl") as f:
            f.write("x")
            (tmp_path / "late.jsonl").mkdir()
            (tmp_path / "late.jsonl" / "keep").write_text("")
    src = tmp_path / "pairs.jsonl"
    src.write_text(json.dumps(PAIR) + "\n")
    assert main(["data", "convert", str(src), f"{tmp_path / 'out.jsonl'}/", "--to", "kto"]) == 2
    assert f"{tmp_path / 'out.jsonl'} is a directory" in capsys.readouterr().err
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_jsonl_strings_may_hold_line_separators_written_raw(tmp_path):
    """json.dumps(ensure_ascii=False), as `data convert` writes, keeps U+2028 and form feeds raw inside strings."""
    path = tmp_path / "raw.jsonl"
    rows = [{"prompt": "a\u2028b", "reference": "c\x0cd"}, {"prompt": "e", "reference": "f"}]
    path.write_text("\r\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    records = data.read_records(str(path))
    assert [r.fields for r in records] == rows
    assert records[1].source == f"{path} line 2"
