"""`make gpu-check` (`python -m harness gpu-check`): the GPU path end to end in a few minutes, on the embedded
model, through the code a run uses. The CPU suite cannot reach this path: the engine in bf16 with CUDA kernels, the
trainer's bf16 autocast over fp32 master weights, bitsandbytes' 4-bit base.

Checks, each printed PASS or FAIL with its numbers: the vLLM engine builds in bf16 and takes a weight sync; in
float32 its greedy output equals HF generate's token for token; one full fine-tuning run (sft_qwen, 2 steps at
lr 1e-5) trains fp32 weights under bf16 autocast and changes them; one LoRA and one QLoRA run do the same for their
adapters over a frozen bf16 / 4-bit base; a QLoRA model synced into the engine generates as HF does on it; the full
run's in-loop evaluations (step 0 and the last step) give finite scores.
Exit status 0 when all pass, 1 when one fails, NO_GPU without a GPU (nothing checked)."""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from transformers import TrainerCallback

# Exit status of a machine without a CUDA GPU: "skipped" (as automake's test drivers read 77), not a failure
NO_GPU = 77
LEARNING_RATE = 1e-5  # where bf16 weights (no fp32 master copy) lose most updates to rounding
STEPS = 2  # a LoRA B matrix starts at 0, so its A matrix gets its first gradient at the second step


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    detail: str

    def line(self) -> str:
        return f"[gpu-check] {'PASS' if self.passed else 'FAIL'} {self.name}: {self.detail}"


def weight_change(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> tuple[bool, str]:
    """Whether every trainable tensor is MASTER_DTYPE and moved from `before` (names -> CPU copies) to `after`,
    and the numbers: the share of elements moved, and the share that still differ once rounded to bf16 (about what
    bf16 weights without a master copy would have kept of the update)."""
    from harness.core.models import MASTER_DTYPE

    low = sorted({str(t.dtype) for t in after.values() if t.dtype != MASTER_DTYPE})
    unchanged = [n for n, t in after.items() if torch.equal(t, before[n])]
    moved = sum(int((after[n] != before[n]).sum()) for n in after)
    total = sum(t.numel() for t in after.values())
    in_bf16 = sum(int((after[n].bfloat16() != before[n].bfloat16()).sum()) for n in after)
    first = f" (first: {unchanged[0]})" if unchanged else ""
    detail = (f"{len(after)} trainable tensors, dtypes {sorted({str(t.dtype) for t in after.values()})}; "
              f"{moved / max(total, 1):.1%} of {total:,} elements moved, {in_bf16 / max(total, 1):.1%} differ once "
              f"rounded to bf16; {len(unchanged)} tensors unchanged{first}")
    return bool(after) and not low and not unchanged, detail


class _WeightWatch(TrainerCallback):
    """A run monitor (harness.training.runner.RunHooks): copies the trainable weights at the step-0 evaluation,
    before any step, and compares them with the trained ones when training ends; notes the trainer's autocast and
    the frozen weights' dtypes."""

    def __init__(self):
        self.before: dict[str, torch.Tensor] = {}
        self.result: tuple[bool, str] | None = None
        self.autocast_bf16 = False
        self.frozen_dtypes: set[str] = set()

    def __call__(self, report, model) -> None:
        if not self.before:
            self.before = _trainable(model)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.autocast_bf16 = bool(args.bf16)
        self.frozen_dtypes = {str(p.dtype) for p in model.parameters() if not p.requires_grad}
        self.result = weight_change(self.before, _trainable(model))


def _trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}


def _run(peft: str, work_dir: str, watch: _WeightWatch, backend: str):
    """sft_qwen on the embedded model for STEPS steps at LEARNING_RATE, evaluated at step 0 and the end, through
    the runner (and its checks) as `harness run` does it; tracked in `work_dir`'s own MLflow store."""
    from experiments import load_class
    from harness.training.overrides import apply_overrides
    from harness.training.runner import RunHooks, run_experiment

    overrides = [f"peft={peft}", f"backend={backend}", f"max_steps={STEPS}", f"learning_rate={LEARNING_RATE}",
                 "warmup_steps=0", f"eval_every={STEPS}", "eval_limit=16", "max_new_tokens=16", "batch_size=4",
                 f"output_dir={work_dir}"]
    exp = apply_overrides(load_class("sft_qwen"), overrides)
    return run_experiment(exp, RunHooks(run_name=f"gpu-check-{peft}", tags={"gpu_check": "1"}, monitors=[watch]))


def training_check(peft: str, work_dir: str) -> list[Check]:
    """One sft_qwen run with `peft`: trainable weights MASTER_DTYPE and moved under bf16 autocast, the frozen base
    as harness.core.models.training_precision has it (none, bf16, 4-bit); for the full run, also its in-loop
    evaluations."""
    watch = _WeightWatch()
    # QLoRA's evaluations through HF generate: its weight sync into the engine is a check of its own (engine_checks)
    summary = _run(peft, work_dir, watch, "hf" if peft == "qlora" else "vllm")
    name = {"none": "full fine-tuning step", "lora": "LoRA step", "qlora": "QLoRA step"}[peft]
    frozen_expected = {"none": set(), "lora": {"torch.bfloat16"}, "qlora": {"torch.uint8"}}[peft]
    moved, detail = watch.result or (False, "training ended without the monitor seeing it")
    frozen_ok = frozen_expected <= watch.frozen_dtypes if frozen_expected else not watch.frozen_dtypes
    checks = [Check(name, moved and watch.autocast_bf16 and frozen_ok,
                    f"bf16 autocast {watch.autocast_bf16}, frozen dtypes "
                    f"{sorted(watch.frozen_dtypes) or 'none'}; {detail}")]
    if peft == "none":
        checks.append(_inloop_check(summary))
    return checks


def _inloop_check(summary) -> Check:
    from harness.training.inloop import is_quality_metric

    steps = [r.step for r in summary.reports]
    scores = {k: v for r in summary.reports[-1:] for k, v in r.metrics.items() if is_quality_metric(k)}
    finite = bool(scores) and all(math.isfinite(v) for v in scores.values())
    shown = ", ".join(f"{k}={v:.3f}" for k, v in sorted(scores.items())[:4])
    return Check("in-loop evaluation", steps == [0, STEPS] and finite,
                 f"evaluated at steps {steps} (expected [0, {STEPS}]); last: {shown or 'no scores'}")


def _engine_run(model_dir: str, dtype: str, model, prompt_ids: list[list[int]], params,
                then: Callable | None = None) -> dict:
    """A fresh engine as a run builds it, in `dtype`: its greedy outputs before and after a sync of `model`; and
    `then`'s check (on the same engine, so that it costs no engine build)."""
    from harness.engines.vllm_engine import VLLMBackend

    started = time.time()
    engine = VLLMBackend(model_dir, max_model_len=256, dtype=dtype)
    result = {"build_s": time.time() - started}
    try:
        result["before"] = [c.texts for c in engine.generate(prompt_ids, params)]
        started = time.time()
        engine.sync_weights(model)
        result["sync_s"] = time.time() - started
        result["after"] = [c.texts for c in engine.generate(prompt_ids, params)]
        if then is not None:
            result["then"] = _guarded("QLoRA weight sync", lambda: [then(engine)])
    finally:
        engine.close()
    return result


def engine_checks() -> list[Check]:
    """The in-loop engine as a run builds it on a GPU (bf16): its build and a sync of changed weights, with how
    often its greedy output equals HF generate's on the same bf16 weights (bf16 kernels of two stacks may break a
    near-tie differently, so that share is shown, not judged); then parity proper in float32, where greedy output
    must equal HF's token for token, as the CPU suite requires."""
    import json

    from harness.core.generation import GenParams
    from harness.core.models import load_model, load_tokenizer, resolve_model
    from harness.core.prompts import render_prompt
    from harness.engines.hf_engine import HFBackend
    from harness.engines.vllm_engine import resolve_dtype
    from harness.paths import DATA_DIR

    model_dir = resolve_model("tiny-qwen2")
    tokenizer = load_tokenizer(model_dir)
    lines = (DATA_DIR / "eval.jsonl").read_text(encoding="utf-8").splitlines()[:32]
    prompt_ids = [render_prompt(tokenizer, json.loads(line)["prompt"]) for line in lines]
    params = GenParams(max_new_tokens=32)
    model = load_model(model_dir).eval()
    torch.manual_seed(1)
    with torch.no_grad():  # changed weights, so that a sync that does not arrive shows
        for p in model.parameters():
            p.add_(0.05 * p.std() * torch.randn_like(p))
    hf = HFBackend(tokenizer)
    hf.sync_weights(model)
    expected = {"float32": [c.texts for c in hf.generate(prompt_ids, params)]}
    default = resolve_dtype("auto")
    if default != "float32":  # the sync casts the fp32 weights to the engine's dtype; HF gets the same cast copy
        hf.sync_weights(copy.deepcopy(model).to(getattr(torch, default)))
        expected[default] = [c.texts for c in hf.generate(prompt_ids, params)]
    dtypes = dict.fromkeys((default, "float32"))  # one engine on CPU, where the default is float32
    qlora = partial(_qlora_sync, model_dir=model_dir, tokenizer=tokenizer, prompt_ids=prompt_ids, params=params)
    runs = {dtype: _engine_run(model_dir, dtype, model, prompt_ids, params, qlora if dtype == "bfloat16" else None)
            for dtype in dtypes}
    n = len(prompt_ids)
    run = runs[default]
    changed = sum(a != b for a, b in zip(run["after"], run["before"], strict=True))
    agree = sum(a == e for a, e in zip(run["after"], expected[default], strict=True))
    exact = sum(a == e for a, e in zip(runs["float32"]["after"], expected["float32"], strict=True))
    return [Check("engine build and weight sync", changed > 0,
                  f"{default} engine (the in-loop default) built in {run['build_s']:.1f}s, synced in "
                  f"{run['sync_s']:.2f}s; {changed}/{n} greedy outputs changed by the sync; {agree}/{n} equal HF "
                  f"generate's on the same {default} weights"),
            Check("greedy parity with HF", exact == n,
                  f"float32 engine: {exact}/{n} prompts give HF generate's greedy text exactly (all needed), "
                  f"{params.max_new_tokens} new tokens"), *run.get("then", [])]


def _qlora_sync(engine, model_dir: str, tokenizer, prompt_ids: list[list[int]], params) -> Check:
    """A QLoRA model (4-bit NF4 base, adapter) synced into the bf16 engine as the in-loop evaluation of a
    peft=qlora run does it: the engine's greedy outputs against HF generate's on the QLoRA model itself. The two
    compute differently (weights dequantized once vs on the fly), so the bar is half the prompts: a sync that loaded
    wrong weights agrees on almost none."""
    from harness.core.models import load_model
    from harness.engines.hf_engine import HFBackend

    model = load_model(model_dir, peft="qlora").eval()
    engine.sync_weights(model)
    got = [c.texts for c in engine.generate(prompt_ids, params)]
    hf = HFBackend(tokenizer)
    hf.sync_weights(model)
    agree = sum(a == e for a, e in zip(got, [c.texts for c in hf.generate(prompt_ids, params)], strict=True))
    return Check("QLoRA weight sync", agree >= len(prompt_ids) / 2,
                 f"{agree}/{len(prompt_ids)} greedy outputs of the bf16 engine equal HF generate's on the QLoRA "
                 f"model (at least half needed)")


def _guarded(name: str, check: Callable[[], list[Check]]) -> list[Check]:
    """A check that raises is a FAIL with the error; the other checks still run."""
    try:
        return check()
    except Exception as e:  # noqa: BLE001 - any error of the checked path is its result
        traceback.print_exc()
        return [Check(name, False, f"{type(e).__name__}: {str(e)[:300]}")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness gpu-check", description=__doc__.splitlines()[0])
    parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(f"[gpu-check] no CUDA GPU visible to torch {torch.__version__} (torch.cuda.is_available() is "
              f"False): nothing checked; run it on a machine with a GPU after `make setup` installs the gpu extra "
              f"(exit status {NO_GPU})", flush=True)
        return NO_GPU
    print(f"[gpu-check] {torch.cuda.get_device_name(0)}, torch {torch.__version__}", flush=True)
    started = time.time()
    checks: list[Check] = []
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as work_dir:
        # a scratch MLflow store: the check's runs stay out of the user's
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work_dir}/mlflow.db"
        for name, check in (("engine build and weight sync", engine_checks),
                            ("full fine-tuning step", lambda: training_check("none", work_dir)),
                            ("LoRA step", lambda: training_check("lora", work_dir)),
                            ("QLoRA step", lambda: training_check("qlora", work_dir))):
            results = _guarded(name, check)
            for result in results:
                print(result.line(), flush=True)
            checks += results
    failed = [c.name for c in checks if not c.passed]
    print(f"[gpu-check] {len(checks) - len(failed)} passed, {len(failed)} failed in {time.time() - started:.0f}s"
          + (f": {', '.join(failed)}" if failed else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
