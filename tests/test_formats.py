"""Every data format loads from a file into what the trainers read; each kind of malformed record is named."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from harness.core.errors import DataError
from harness.core.formats import check, convert
from harness.core.records import read_records
from harness.paths import REPO_ROOT

Q, A = "What is 2 plus 2?", "2 plus 2 is 4."
CHAT = [{"role": "user", "content": Q}, {"role": "assistant", "content": A}]
RECORDS = {
    "messages": {"messages": [{"role": "system", "content": "Be brief."}, *CHAT,
                              {"role": "user", "content": "And 3 plus 3?"},
                              {"role": "assistant", "content": "6."}]},
    "sharegpt": {"conversations": [{"from": "human", "value": Q}, {"from": "gpt", "value": A}]},
    "alpaca": {"instruction": "Add the numbers.", "input": "2 and 2", "output": "4"},
    "preference": {"prompt": Q, "chosen": A, "rejected": "2 plus 2 is 5."},
    "kto": {"prompt": Q, "completion": A, "label": True},
    "prompt_completion": {"prompt": "def f():\n", "completion": "    return 1\n"},
    "text": {"text": "Paris is the capital of France."},
}
SHAREGPT_PAIR = {"conversations": [{"from": "human", "value": Q}], "chosen": {"from": "gpt", "value": A},
                 "rejected": {"from": "gpt", "value": "5."}}


def _file(tmp_path, rows, name="d.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("fmt", sorted(RECORDS))
def test_each_format_is_detected_from_a_file(tmp_path, fmt):
    assert check(read_records(_file(tmp_path, [RECORDS[fmt]] * 3))) == {fmt: 3}


def test_chat_formats_become_one_row_per_assistant_turn(tmp_path):
    rows = convert(read_records(_file(tmp_path, [RECORDS["messages"]])), "auto", "sft")
    assert rows == [
        {"prompt": RECORDS["messages"]["messages"][:2], "completion": [CHAT[1]]},
        {"prompt": RECORDS["messages"]["messages"][:4], "completion": [{"role": "assistant", "content": "6."}]},
    ]
    assert convert(read_records(_file(tmp_path, [RECORDS["sharegpt"]])), "auto", "messages") == [{"messages": CHAT}]
    (alpaca,) = convert(read_records(_file(tmp_path, [RECORDS["alpaca"]])), "auto", "messages")
    assert alpaca["messages"] == [{"role": "user", "content": "Add the numbers.\n\n2 and 2"},
                                  {"role": "assistant", "content": "4"}]


def test_preference_sources_and_kto_from_pairs(tmp_path):
    expected = {"prompt": [CHAT[0]], "chosen": [CHAT[1]], "rejected": [{"role": "assistant", "content": "5."}]}
    assert convert(read_records(_file(tmp_path, [SHAREGPT_PAIR])), "auto", "preference") == [expected]
    gpt = {"conversations": SHAREGPT_PAIR["conversations"], "chosen_gpt": A, "rejected_gpt": "5."}
    assert convert(read_records(_file(tmp_path, [gpt])), "sharegpt", "preference") == [expected]
    kto = convert(read_records(_file(tmp_path, [RECORDS["preference"]])), "auto", "kto")
    assert [(r["completion"][0]["content"], r["label"]) for r in kto] == [(A, True), ("2 plus 2 is 5.", False)]


def test_text_file_one_record_per_line(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("first line\n\nsecond line\n")
    assert convert(read_records(str(path)), "auto", "text") == [{"text": "first line"}, {"text": "second line"}]
    assert read_records(str(path))[1].source == f"{path} line 3"


GOOD = {"sft": RECORDS["messages"], "messages": RECORDS["sharegpt"], "preference": RECORDS["preference"],
        "kto": RECORDS["kto"]}


@pytest.mark.parametrize(("record", "to", "message"), [
    ({"messages": [{"role": "user", "content": Q}]}, "sft",
     "line 2: field 'messages' must end with an assistant turn (the training target)"),
    ({"messages": [{"role": "robot", "content": Q}, CHAT[1]]}, "sft",
     "line 2: field 'messages[0].role' is 'robot'; expected one of ('system', 'user', 'assistant')"),
    ({"messages": [{"role": "user"}, CHAT[1]]}, "sft",
     "line 2: field 'messages[0]' must be an object with string 'role' and 'content'"),
    ({"conversations": [{"from": "bot", "value": Q}]}, "messages",
     "line 2: field 'conversations[0].from' must be one of ['assistant', 'gpt', 'human', 'system', 'user']"),
    ({"conversations": [{"from": "human", "value": ""}, {"from": "gpt", "value": A}]}, "messages",
     "line 2: field 'conversations[0].value' must be a non-empty string"),
    ({"prompt": Q, "chosen": A, "rejected": 5}, "preference",
     "line 2: field 'rejected' must be a string or a list of {role, content} messages"),
    ({"prompt": Q, "completion": A, "label": "yes"}, "kto", "line 2: field 'label' must be true or false, got 'yes'"),
])
def test_malformed_records_name_file_line_and_field(tmp_path, record, to, message):
    path = _file(tmp_path, [GOOD[to], record])
    with pytest.raises(DataError) as err:
        convert(read_records(path), "auto", to)
    assert str(err.value) == f"{path} {message}"


@pytest.mark.parametrize(("record", "to", "message"), [
    ({"instruction": "Say hi"}, "messages", "field 'output' is missing"),
    ({"conversations": [{"from": "human", "value": Q}], "chosen_gpt": A}, "preference",
     "field 'rejected' (a {from, value} turn) or 'rejected_gpt' is missing: a ShareGPT preference record needs both"),
    ({"question": Q}, "messages", "cannot tell the format from the fields ['question']"),
    ({"text": "some prose"}, "preference", "text records cannot be used here; this method reads preference, sharegpt"),
])
def test_unusable_first_records_are_named(tmp_path, record, to, message):
    path = _file(tmp_path, [record])
    with pytest.raises(DataError) as err:
        convert(read_records(path), "auto", to)
    assert str(err.value).startswith(f"{path} line 1: {message}")


@pytest.mark.slow
def test_data_check_and_convert_commands(tmp_path):
    src = _file(tmp_path, [RECORDS["alpaca"], RECORDS["alpaca"]], "alpaca.jsonl")
    run = [sys.executable, "-m", "harness", "data"]
    out = subprocess.run([*run, "check", src], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert json.loads(out.stdout.splitlines()[-1]) == {"file": src, "records": 2, "formats": {"alpaca": 2}}
    dst = tmp_path / "out" / "chat.jsonl"
    out = subprocess.run([*run, "convert", src, str(dst), "--to", "messages"], cwd=REPO_ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert check(read_records(str(dst))) == {"messages": 2}
    bad = _file(tmp_path, [RECORDS["alpaca"], {"instruction": "x"}], "bad.jsonl")
    out = subprocess.run([*run, "convert", bad, str(tmp_path / "never.jsonl"), "--to", "messages"], cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and f"{bad} line 2: field 'output' is missing" in out.stderr
    assert not (tmp_path / "never.jsonl").exists()  # nothing half-written


def test_case3_convert_refuses_to_overwrite_its_input(tmp_path, monkeypatch, capsys):
    from harness.commands.cli import main

    src = _file(tmp_path, [RECORDS["alpaca"]], "alpaca.jsonl")
    before = (tmp_path / "alpaca.jsonl").read_bytes()
    (tmp_path / "link.jsonl").symlink_to(tmp_path / "alpaca.jsonl")
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    for out in (src, str(tmp_path / "link.jsonl"), "../alpaca.jsonl"):  # itself, a symlink, another relative path
        assert main(["data", "convert", src, out, "--to", "messages"]) == 2
        err = capsys.readouterr().err
        assert f"{Path(out)} is the same file as the input {src}" in err and "refusing to overwrite" in err
        assert (tmp_path / "alpaca.jsonl").read_bytes() == before
    assert main(["data", "convert", "../alpaca.jsonl", str(tmp_path / "chat.jsonl"), "--to", "messages"]) == 0


# UltraFeedback-binarized's layout: the prompt, and each answer as the whole conversation that repeats it
ULTRAFEEDBACK = {"prompt": Q, "prompt_id": "abc", "score_chosen": 8.0, "score_rejected": 3.0,
                 "chosen": [{"role": "user", "content": Q}, {"role": "assistant", "content": A}],
                 "rejected": [{"role": "user", "content": Q}, {"role": "assistant", "content": "5."}],
                 "messages": [{"role": "user", "content": Q}, {"role": "assistant", "content": A}]}
EXTRACTED = {"prompt": [{"role": "user", "content": Q}], "chosen": [{"role": "assistant", "content": A}],
             "rejected": [{"role": "assistant", "content": "5."}]}


def test_case8_conversation_pairs_keep_the_prompt_once(tmp_path, capsys):
    from experiments import load_class
    from harness.commands.cli import main

    no_prompt = {k: ULTRAFEEDBACK[k] for k in ("chosen", "rejected")}
    src = _file(tmp_path, [ULTRAFEEDBACK, no_prompt])
    assert convert(read_records(src), "auto", "preference") == [EXTRACTED, EXTRACTED]
    assert load_class("dpo_qwen")().train_rows(read_records(src)) == [EXTRACTED, EXTRACTED]  # what DPO trains on
    out = tmp_path / "pairs.jsonl"
    assert main(["data", "convert", src, str(out), "--to", "preference"]) == 0
    assert [json.loads(line) for line in out.read_text().splitlines()] == [EXTRACTED, EXTRACTED]
    assert out.read_text().count(Q) == 2  # once per row
    capsys.readouterr()
    # multi-turn: the prompt is every turn up to the last user turn; an HH-RLHF transcript is read the same way
    history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
               {"role": "assistant", "content": "Hello."}, {"role": "user", "content": Q}]
    multi = {"chosen": [*history, {"role": "assistant", "content": A}],
             "rejected": [*history, {"role": "assistant", "content": "5."}]}
    hh = {"chosen": f"\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: {Q}\n\nAssistant: {A}",
          "rejected": f"\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: {Q}\n\nAssistant: 5."}
    rows = convert(read_records(_file(tmp_path, [multi, hh])), "auto", "preference")
    assert rows[0] == {**EXTRACTED, "prompt": history}
    assert rows[1] == {**EXTRACTED, "prompt": history[1:]}
    kto = convert(read_records(_file(tmp_path, [ULTRAFEEDBACK])), "auto", "kto")
    assert [r["prompt"] for r in kto] == [EXTRACTED["prompt"]] * 2 and kto[0]["completion"] == EXTRACTED["chosen"]


@pytest.mark.parametrize(("record", "message"), [
    ({"chosen": ULTRAFEEDBACK["chosen"], "rejected": [{"role": "user", "content": "Other?"}, CHAT[1]]},
     "fields 'chosen' and 'rejected' are whole conversations that differ before the answer"),
    ({"chosen": ULTRAFEEDBACK["chosen"], "rejected": [CHAT[1]]},
     "fields 'chosen' and 'rejected' are whole conversations that differ before the answer"),
    ({**ULTRAFEEDBACK, "prompt": "Another question?"}, "field 'prompt' is not how 'chosen' and 'rejected' begin"),
    ({"chosen": ULTRAFEEDBACK["chosen"], "rejected": [CHAT[0]]}, "field 'rejected' must continue its last user turn"),
    ({"chosen": f"\n\nHuman: {Q}\n\nAssistant: 4", "rejected": "\n\nHuman: Other?\n\nAssistant: 5"},
     "fields 'chosen' and 'rejected' are whole conversations that differ before the answer"),
])
def test_case8_conversation_pairs_with_different_prompts_are_named(tmp_path, record, message):
    path = _file(tmp_path, [ULTRAFEEDBACK, record])
    with pytest.raises(DataError) as err:
        convert(read_records(path), "auto", "preference")
    assert str(err.value).startswith(f"{path} line 2: {message}")
