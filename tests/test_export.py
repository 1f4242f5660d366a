"""After a run: its best checkpoint found from a run reference (training/lineage.py), exported as a standalone model
(`harness export`), logged and registered as an MLflow model (log_model / register_as), and chained into the next
stage (`model=run:RUN_ID`). One tiny full-weights run and one tiny LoRA run, trained once for the module."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from transformers import AutoModelForCausalLM, AutoTokenizer

from experiments import load_class
from harness.commands.cli import main
from harness.commands.compare import format_chains
from harness.commands.export import export_run
from harness.core.errors import ConfigError
from harness.core.files import atomic_directory
from harness.core.generation import GenParams
from harness.core.prompts import render_prompt
from harness.engines.hf_engine import HFBackend
from harness.paths import REPO_ROOT
from harness.training import lineage
from harness.training.overrides import apply_overrides
from harness.training.runner import run_experiment
from harness.training.tracking.queries import RunRecord, load_table

MAX_NEW_TOKENS = 12
# perplexity picks the checkpoint, rouge makes the engine generate
COMMON = ["max_steps=2", "eval_every=1", "eval_limit=4", f"max_new_tokens={MAX_NEW_TOKENS}", "batch_size=4",
          "max_length=64", "evaluators=perplexity,rouge", "select_metric=eval/perplexity/perplexity",
          "select_mode=min"]


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("export")
    # training on the 4 eval records themselves (each step's batch): their perplexity falls from the first step, so
    # the best checkpoint is a trained one
    evals = [json.loads(line) for line in (REPO_ROOT / "data" / "eval.jsonl").read_text("utf-8").splitlines()[:4]]
    rows = [{"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["reference"]}]}
            for r in evals]
    (tmp / "sft.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        yield tmp, MlflowClient(uri)


def _run(tmp: Path, *overrides: str):
    exp = apply_overrides(load_class("sft_qwen"), [*COMMON, f"train_data={tmp / 'sft.jsonl'}",
                                                   f"output_dir={tmp / 'outputs'}", *overrides])
    return run_experiment(exp)


@pytest.fixture(scope="module")
def runs(store):
    tmp, _ = store
    full = _run(tmp, "learning_rate=1e-4", "log_model=true")
    lora = _run(tmp, "peft=lora", "lora_rank=4", "learning_rate=1e-3", "register_as=export-test-lora")
    return full, lora


def _greedy(directory: Path, prompts: list[str]) -> list[str]:
    """Greedy generations of the exported directory loaded with plain transformers (an adapter through its
    peft integration), on the prompts as the in-loop engine got them (chat template)."""
    tokenizer = AutoTokenizer.from_pretrained(directory)
    backend = HFBackend(tokenizer)
    backend.sync_weights(AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32))
    ids = [render_prompt(tokenizer, p) for p in prompts]
    return [c.texts[0] for c in backend.generate(ids, GenParams(max_new_tokens=MAX_NEW_TOKENS))]


def test_export_generates_what_the_in_loop_engine_generated_at_the_best_step(runs, store, capsys):
    tmp, _ = store
    full, lora = runs
    assert full.best_step > 0 and lora.best_step > 0  # trained weights, not the base model's
    assert main(["export", full.run_id]) == 0
    assert f"exported run {full.run_id}'s best checkpoint (step {full.best_step}" in capsys.readouterr().out
    exports = {"full": full.best_checkpoint.with_name("export"),
               "adapter": export_run(f"run:{lora.run_id}", to=str(tmp / "lora-adapter"))[0],
               "merged": export_run(lora.run_id, merge=True, to=str(tmp / "lora-merged"))[0]}
    assert (exports["adapter"] / "adapter_config.json").is_file()
    assert not (exports["adapter"] / "model.safetensors").exists()
    assert (exports["merged"] / "model.safetensors").is_file() and not (exports["merged"] / "adapter_config.json"
                                                                        ).exists()
    for kind, directory in exports.items():
        run = full if kind == "full" else lora
        table = load_table(run.run_id, f"eval_samples/step_{run.best_step:06d}.json")
        baseline = load_table(run.run_id, "eval_samples/step_000000.json")
        assert table["prediction"] != baseline["prediction"], kind  # the comparison can tell the weights apart
        assert _greedy(directory, table["prompt"]) == table["prediction"], kind
        card = (directory / "README.md").read_text()
        assert f"MLflow run `{run.run_id}`" in card and f"saved at step {run.best_step}" in card
        assert f"| `eval/perplexity/perplexity` | {run.best_value:.6g} |" in card
        assert "| `learning_rate` |" in card and (directory / "chat_template.jinja").is_file()
    assert "library_name: peft" in (exports["adapter"] / "README.md").read_text()
    with pytest.raises(ConfigError, match="already exists"):  # never written over
        export_run(lora.run_id, to=str(exports["adapter"]))


def test_best_checkpoint_is_logged_as_an_mlflow_model_and_registered(runs, store, tmp_path):
    import mlflow.transformers

    _, client = store
    full, lora = runs
    run = client.get_run(full.run_id)
    assert run.data.tags["model.logged"] == f"runs:/{full.run_id}/model"
    assert run.data.tags["model.flavor"] == "transformers"
    components = mlflow.transformers.load_model(f"runs:/{full.run_id}/model", return_type="components")
    best = AutoModelForCausalLM.from_pretrained(full.best_checkpoint, dtype=torch.float32)
    loaded = components["model"].state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in best.state_dict().items())

    version = client.get_model_version("export-test-lora", "1")
    assert version.run_id == lora.run_id
    assert version.tags == {"select_metric": "eval/perplexity/perplexity", "select_mode": "min",
                            "select_step": str(lora.best_step), "select_value": repr(lora.best_value),
                            "run_id": lora.run_id}
    assert client.get_run(lora.run_id).data.tags["model.registered"] == "export-test-lora/1"
    adapter = Path(client.download_artifacts(lora.run_id, "model", str(tmp_path)))
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 4
    assert AutoModelForCausalLM.from_pretrained(adapter).peft_config  # transformers loads it on its base


def test_a_stage_chained_on_a_lora_run_starts_from_its_best_checkpoint(runs, store, capsys):
    tmp, client = store
    _, lora = runs
    child = _run(tmp, "model=run:latest:sft_qwen", "max_steps=1", "evaluators=perplexity")  # the LoRA run is newest
    params, tags = client.get_run(child.run_id).data.params, client.get_run(child.run_id).data.tags
    assert params["model"] == f"run:{lora.run_id}" and params["parent_run"] == lora.run_id
    assert tags["parent_run"] == lora.run_id
    assert tags["model.path"] == str(lora.best_checkpoint.with_name(lineage.MERGED))  # the adapter folded in
    step0 = child.reports[0].metrics["eval/perplexity/perplexity"]
    assert step0 == pytest.approx(lora.best_value, rel=1e-4)  # the parent's best weights, not the base model's
    capsys.readouterr()
    assert main(["compare", lora.run_id, child.run_id, "--out", str(tmp / "chain.png")]) == 0
    assert f"sft_qwen ({lora.run_id[:8]}) -> sft_qwen ({child.run_id[:8]})" in capsys.readouterr().out


def test_compare_shows_each_chain_first_stage_first():
    def record(run_id: str, experiment: str, parent: str | None) -> RunRecord:
        return RunRecord(run_id, run_id, experiment, {"parent_run": parent} if parent else {}, {})

    runs = [record("c" * 32, "grpo_qwen", "b" * 32), record("a" * 32, "sft_qwen", None),
            record("b" * 32, "dpo_qwen", "a" * 32), record("d" * 32, "sft_qwen", "e" * 32)]
    assert format_chains(runs) == ["chains (each stage started from the best checkpoint of the one before):",
                                   "  sft_qwen (aaaaaaaa) -> dpo_qwen (bbbbbbbb) -> grpo_qwen (cccccccc)"]
    assert format_chains(runs[1:2]) == []


def test_run_references_that_name_no_checkpoint_are_refused_clearly(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("sft_qwen"))
    run_id = run.info.run_id
    client.log_param(run_id, "output_dir", str(tmp_path / "outputs"))
    with pytest.raises(ConfigError, match=f"run:{run_id}: run {run_id} of experiment 'sft_qwen' .*: it has no best "
                                          f"checkpoint .*looked in {tmp_path / 'outputs' / 'sft_qwen' / run_id}"):
        lineage.best_checkpoint(f"run:{run_id}")
    client.set_tag(run_id, "best_checkpoint", str(tmp_path / "gone" / "best"))
    with pytest.raises(ConfigError, match=f"{tmp_path / 'gone' / 'best'} is missing"):
        lineage.best_checkpoint(run_id)
    with pytest.raises(ConfigError, match="run:nope: no run nope in sqlite:"):
        lineage.best_checkpoint("run:nope")
    with pytest.raises(ConfigError, match="the MLflow experiment 'dpo_qwen' has no run"):
        lineage.best_checkpoint("run:latest:dpo_qwen")
    with pytest.raises(ConfigError, match="name the experiment"):
        lineage.best_checkpoint("run:latest:")
    # a run's selection, saved beside its weights, is all a reference needs
    best = tmp_path / "outputs" / "sft_qwen" / run_id / "best"
    best.mkdir(parents=True)
    (best / "selection.json").write_text('{"metric": "eval/rouge/rougeL", "mode": "max", "step": 4, "value": 70.5}')
    client.set_tag(run_id, "best_checkpoint", str(best))
    with pytest.raises(ConfigError, match=f"{run_id} \\(RUNNING: not FINISHED; name it as run:{run_id}"):
        lineage.find_checkpoint("run:latest:sft_qwen")  # still training: its best can change
    assert lineage.find_checkpoint(f"run:{run_id}").step == 4
    client.set_terminated(run_id)
    found = lineage.find_checkpoint("run:latest:sft_qwen")
    assert (found.path, found.step, found.value, found.adapter) == (best, 4, 70.5, False)


def test_register_as_is_checked_before_the_run():
    with pytest.raises(ConfigError, match="field 'register_as' = 'team/model' an MLflow registered model name"):
        apply_overrides(load_class("sft_qwen"), ["register_as=team/model"])


def test_a_directory_is_written_whole_or_not_at_all(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError), atomic_directory(target) as tmp:
        (tmp / "a").write_text("half")
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
    with atomic_directory(target) as tmp:
        (tmp / "a").write_text("whole")
        assert not target.exists()
    assert (target / "a").read_text() == "whole" and [p.name for p in tmp_path.iterdir()] == ["out"]
    with pytest.raises(ConfigError, match="already exists"):
        atomic_directory(target).__enter__()
