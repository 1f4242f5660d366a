"""`python -m harness export RUN_ID [--merge] [--to DIR]`: a run's best checkpoint as a standalone Hugging Face model
directory (full weights; or a LoRA adapter naming its base, folded into it with --merge) with its tokenizer, chat
template, selection.json and a model card (README.md) holding the run's params and its in-loop metrics at the
selected step. Written atomically: DIR appears only once complete."""

from __future__ import annotations

import shutil
from pathlib import Path

from harness.core.files import atomic_directory, check_writable_dir
from harness.training.inloop import is_quality_metric
from harness.training.lineage import RunCheckpoint, find_checkpoint, write_merged
from harness.training.tracking.runs import existing_run
from harness.training.tracking.store import shown_tracking_uri


def default_destination(ckpt: RunCheckpoint, merge: bool) -> Path:
    """Beside the run's best/: RUN_DIR/export, or RUN_DIR/export-merged for an adapter folded into its base."""
    return ckpt.path.with_name("export-merged" if merge and ckpt.adapter else "export")


def metrics_at(ckpt: RunCheckpoint) -> dict[str, float]:
    """The run's in-loop eval scores (eval/<evaluator>/<metric>) logged at the checkpoint's step."""
    histories = existing_run(ckpt.run_id).histories("eval/")
    return {k: v for k, points in histories.items() if is_quality_metric(k) for s, v in points if s == ckpt.step}


def _cell(value: object) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def model_card(ckpt: RunCheckpoint, merged: bool, metrics: dict[str, float]) -> str:
    """README.md of the exported directory: what it is, how it was chosen, the run's params and scores."""
    adapter = ckpt.adapter and not merged
    front = ["---", f"library_name: {'peft' if adapter else 'transformers'}"]
    if ckpt.adapter:
        front.append(f"base_model: {ckpt.base_model}")
    front += ["tags:", "- posttrain-harness", f"- {ckpt.experiment}", "---", ""]
    if not ckpt.adapter:
        form = "full weights"
    elif merged:
        form = f"a LoRA adapter folded into its base model `{ckpt.base_model}` (full weights)"
    else:
        form = (f"a LoRA adapter on the base model `{ckpt.base_model}` (the run's `model={ckpt.params.get('model')}`);"
                " transformers loads it with peft installed and the base model at that path or hub name")
    lines = [f"# {ckpt.experiment}: run {ckpt.run_id}, best checkpoint", "",
             f"Exported by `python -m harness export` from MLflow run `{ckpt.run_id}` (experiment "
             f"`{ckpt.experiment}`, store {shown_tracking_uri()}): the checkpoint kept by `{ckpt.metric}` "
             f"({ckpt.mode}), saved at step {ckpt.step} with value {ckpt.value:.6g}. Form: {form}.", "",
             *([f"Trained from {ckpt.tags['model.source']}.", ""] if "model.source" in ckpt.tags else []),
             f"## In-loop evaluation at step {ckpt.step}", "",
             "Scored during training on the generations of the in-loop engine (greedy decoding) at this step.", "",
             "| metric | value |", "| --- | --- |"]
    lines += [f"| `{k}` | {v:.6g} |" for k, v in sorted(metrics.items())] or ["| (none logged) | |"]
    lines += ["", "## Run parameters", "", "| param | value |", "| --- | --- |"]
    lines += [f"| `{k}` | {_cell(v)} |" for k, v in sorted(ckpt.params.items())]
    lines += ["", "## Load", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
              'model = AutoModelForCausalLM.from_pretrained("THIS_DIRECTORY")',
              'tokenizer = AutoTokenizer.from_pretrained("THIS_DIRECTORY")  # with the chat template', "```", ""]
    return "\n".join(front + lines)


def export_run(ref: str, merge: bool = False, to: str | None = None) -> tuple[Path, RunCheckpoint]:
    """Writes the best checkpoint of the run `ref` (RUN_ID, run:RUN_ID, run:latest:EXPERIMENT) to `to` (default:
    see default_destination), atomically; an existing destination is refused. Returns it and the checkpoint."""
    ckpt = find_checkpoint(ref)
    merged = merge and ckpt.adapter
    dest = Path(to).absolute() if to else default_destination(ckpt, merge)
    check_writable_dir(dest.parent, "--to")
    metrics = metrics_at(ckpt)  # before anything is written: an unreachable store fails here
    with atomic_directory(dest) as tmp:
        if merged:
            write_merged(ckpt, tmp)
        else:
            shutil.copytree(ckpt.path, tmp, dirs_exist_ok=True)
        (tmp / "README.md").write_text(model_card(ckpt, merged, metrics), encoding="utf-8")
    return dest, ckpt
