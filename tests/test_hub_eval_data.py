"""Hub datasets by name in eval_data and choice_data (`hf:NAME:CONFIG:SPLIT`): loaded by datasets.load_dataset, read
in the shapes the evaluators know. Offline: each dataset is a local directory laid out as its hub repository (a
README whose YAML names the configs, Parquet files per split), which load_dataset reads through the same code path
as a hub name; without network a hub name is an error naming it and HF_DATASETS_OFFLINE, before any run opens."""

import json

import datasets
import pytest

from evaluators.choice import Choice, read_questions
from harness.commands.cli import main
from harness.core.errors import ConfigError, DataError
from harness.core.eval_data import eval_set_samples, parse_eval_data
from harness.core.records import HubDataset, hub_dataset, read_records

# rows as the hub datasets hold them (openai/gsm8k main, cais/mmlu, allenai/ai2_arc, Rowan/hellaswag)
GSM8K = [{"question": "Tom has 3 apples and buys 4 more. How many apples does he have?",
          "answer": "He has 3 + 4 = <<3+4=7>>7 apples.\n#### 7"},
         {"question": "A box holds 12 eggs. How many eggs are in 2 boxes?",
          "answer": "2 boxes hold 2 * 12 = <<2*12=24>>24 eggs.\n#### 24"}]
MMLU = [{"question": "What is 2 + 2?", "subject": "elementary_mathematics", "choices": ["3", "4", "5", "6"],
         "answer": 1}]
ARC = [{"id": "Mercury_7175875", "question": "Which gas do plants take in?",
        "choices": {"text": ["oxygen", "carbon dioxide", "helium"], "label": ["A", "B", "C"]}, "answerKey": "B"}]
HELLASWAG = [{"ind": 4, "activity_label": "Removing ice from car", "ctx_a": "Then, the man writes over the snow.",
              "ctx_b": "then", "ctx": "Then, the man writes over the snow. then",
              "endings": ["he leaves.", "he sprays [title] it.", "he stops.", "he sits."], "source_id": "x",
              "split": "val", "split_type": "indomain", "label": "3"}]


def hub_layout(root, config: str, split: str, rows: list[dict]):
    """`root` as a hub dataset repository: data/<config>/<split>-00000-of-00001.parquet and a README naming the
    config, as openai/gsm8k and cais/mmlu are published."""
    (root / config).mkdir(parents=True)
    datasets.Dataset.from_list(rows).to_parquet(str(root / config / f"{split}-00000-of-00001.parquet"))
    (root / "README.md").write_text(f"---\nconfigs:\n- config_name: {config}\n  data_files:\n  - split: {split}\n"
                                    f"    path: {config}/{split}-*\n---\n")
    return root


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets-cache")


def test_hub_specs_name_the_dataset_its_config_and_split():
    assert hub_dataset("hf:openai/gsm8k:main:test") == HubDataset("openai/gsm8k", "main", "test")
    assert hub_dataset("hf:allenai/ai2_arc:ARC-Challenge:validation") == HubDataset("allenai/ai2_arc",
                                                                                    "ARC-Challenge", "validation")
    assert hub_dataset("hf:Rowan/hellaswag:validation") == HubDataset("Rowan/hellaswag", None, "validation")
    assert hub_dataset("org/set:test") == HubDataset("org/set", None, "test")  # the older form, no config
    # one set unnamed, or named among several; the colons of the spec are not a set name
    assert parse_eval_data("hf:openai/gsm8k:main:test") == [("", "hf:openai/gsm8k:main:test")]
    assert parse_eval_data("gsm8k:hf:openai/gsm8k:main:test,facts:data/eval.jsonl") == [
        ("gsm8k", "hf:openai/gsm8k:main:test"), ("facts", "data/eval.jsonl")]
    for bad in ("hf:openai/gsm8k", "hf:openai/gsm8k:main:test:extra", "math:hf:openai/gsm8k::test"):
        with pytest.raises(ConfigError, match="a hub dataset is hf:NAME:SPLIT or hf:NAME:CONFIG:SPLIT"):
            parse_eval_data(bad)


def test_gsm8k_records_become_eval_samples_through_load_dataset(tmp_path):
    root = hub_layout(tmp_path / "gsm8k", "main", "test", GSM8K)
    spec = f"hf:{root}:main:test"
    records = read_records(spec)
    assert [r.source for r in records] == [f"{spec} record 1", f"{spec} record 2"]
    samples = eval_set_samples(records, limit=0, required={"answer": "the answer evaluator reads it"})
    assert [(s.prompt, s.reference, s.answer) for s in samples] == [
        (GSM8K[0]["question"], GSM8K[0]["answer"], "7"), (GSM8K[1]["question"], GSM8K[1]["answer"], "24")]
    with pytest.raises(DataError, match=r"split 'train' could not be loaded"):
        read_records(f"hf:{root}:main:train")  # a split the dataset does not have names it


@pytest.mark.parametrize(("config", "rows", "text", "choices", "gold"), [
    ("all", MMLU, "What is 2 + 2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer:", ("A", "B", "C", "D"), 1),
    ("ARC-Challenge", ARC, "Question: Which gas do plants take in?\nAnswer:", ("oxygen", "carbon dioxide", "helium"),
     1),
    ("default", HELLASWAG, "Removing ice from car: Then, the man writes over the snow. Then",
     ("he leaves.", "he sprays. it.", "he stops.", "he sits."), 3),
])
def test_multiple_choice_hub_rows_are_read_in_the_choice_evaluators_shapes(tmp_path, config, rows, text, choices,
                                                                           gold):
    root = hub_layout(tmp_path / config, config, "test", rows)
    (question,) = read_questions(f"hf:{root}:{config}:test")
    assert (question.text, question.choices, question.gold) == (text, choices, gold)


def test_offline_a_hub_name_fails_naming_it_and_hf_datasets_offline_before_a_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # what HF_DATASETS_OFFLINE=1 sets at import
    with pytest.raises(DataError, match=r"hub dataset 'no-such-org/no-such-set' config 'main' split 'test' could "
                                        r"not be loaded .*HF_DATASETS_OFFLINE is set"):
        read_records("hf:no-such-org/no-such-set:main:test")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    code = main(["eval", "tiny-qwen2", "eval_data=gsm8k:hf:no-such-org/gsm8k:main:test", "evaluators=answer,choice",
                 "choice_data=hf:no-such-org/mmlu:all:test", f"output_dir={tmp_path / 'out'}"])
    stderr = capsys.readouterr().err
    assert code == 2
    assert "'no-such-org/gsm8k' config 'main' split 'test' could not be loaded" in stderr
    assert "HF_DATASETS_OFFLINE" in stderr
    assert not (tmp_path / "mlflow.db").exists()  # no run, not even a store
    with pytest.raises(DataError, match="'no-such-org/mmlu' config 'all' split 'test' could not be loaded"):
        Choice(data="hf:no-such-org/mmlu:all:test")  # built with the evaluators, before the run opens
    code = main(["eval", "tiny-qwen2", "eval_data=hf:openai/gsm8k", f"output_dir={tmp_path / 'out'}"])
    assert code == 2
    assert "field 'eval_data' = 'hf:openai/gsm8k'" in capsys.readouterr().err
    assert not (tmp_path / "mlflow.db").exists()  # no run, not even a store


def test_choice_data_names_a_hub_set_among_several(tmp_path):
    """choice_data reads hub sets as eval_data does (one reader): a named hub set keeps its name in question ids."""
    root = hub_layout(tmp_path / "arc", "ARC-Easy", "test", ARC)
    local = tmp_path / "plain.jsonl"
    local.write_text(json.dumps({"prompt": "1 + 1 =", "choices": ["2", "3"], "answer": 0}) + "\n")
    evaluator = Choice(data=f"arc:hf:{root}:ARC-Easy:test,plain:{local}")
    assert [q.id for q in evaluator.questions] == ["arc/Mercury_7175875", "plain/0"]
