"""Reward functions for online RL, in TRL's signature (completions plus dataset columns as keyword lists).
They reuse what the evaluators measure, so the reward and the in-loop score agree on what "right" means."""

from __future__ import annotations

from pathlib import Path

import torch

from evaluators.answer import contains_answer
from evaluators.humaneval import extract_completion, score_completions
from evaluators.reward_accuracy import reward_scores
from evaluators.rouge import rouge_scores
from evaluators.sandbox import Limits, Sandbox
from harness.core.records import require_text


def _text(completion) -> str:
    return completion[-1]["content"] if isinstance(completion, list) else completion


def answer_match(completions: list, answer: list[str], **_) -> list[float]:
    """1 when the completion contains the task's short answer (the checkable part of the embedded tasks)."""
    return [float(contains_answer(_text(c), a)) for c, a in zip(completions, answer, strict=True)]


def rouge_l(completions: list, reference: list[str], **_) -> list[float]:
    """ROUGE-L F1 against the reference answer, scaled to 0-1: a dense signal for the answer's form."""
    return [rouge_scores(_text(c), r)["rougeL"] / 100 for c, r in zip(completions, reference, strict=True)]


class CodePass:
    """1 when the completion passes the task's tests in the code sandbox, as HumanEval's evaluator decides it (same
    completion extraction, same check program, same exit-early guard); 0 for failures, errors and timeouts."""

    __name__ = "code_pass"  # TRL names the logged reward after it

    def __init__(self, timeout_s: float = 5.0, allow_weak_isolation: bool = False):
        self.sandbox = Sandbox(Limits(timeout_s=timeout_s), allow_weak_isolation=allow_weak_isolation)

    def __call__(self, completions: list, prompts: list[str], test: list[str], entry_point: list[str],
                 **_) -> list[float]:
        problems = [{"task_id": str(i), "prompt": p, "test": t, "entry_point": e}
                    for i, (p, t, e) in enumerate(zip(prompts, test, entry_point, strict=True))]
        samples = [(pr["task_id"], extract_completion(pr["prompt"], _text(c), pr["entry_point"]))
                   for pr, c in zip(problems, completions, strict=True)]
        _, rows = score_completions(problems, samples, self.sandbox, ks=[])
        return [float(r["passed"]) for r in rows]


class RewardModel:
    """A trained reward model's score (e.g. rm_qwen's best checkpoint) of the prompt and completion as one chat,
    rendered by the chat template the reward model was trained with."""

    __name__ = "reward_model"

    def __init__(self, path: str):
        # lazy: transformers (also behind harness.core.models) only for a run that uses a reward model
        from transformers import AutoModelForSequenceClassification

        from harness.core.models import ADAPTER_CONFIG, load_tokenizer, resolve_model

        path = resolve_model(path)
        self.tokenizer = load_tokenizer(path)
        if (Path(path) / ADAPTER_CONFIG).exists():  # a LoRA reward model's checkpoint holds the adapter only
            from peft import AutoPeftModelForSequenceClassification

            model = AutoPeftModelForSequenceClassification.from_pretrained(path, num_labels=1).merge_and_unload()
        else:
            model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
        self.model = model.eval()
        if torch.cuda.is_available():
            self.model = self.model.to("cuda")

    @torch.no_grad()
    def __call__(self, completions: list, prompts: list[str], **_) -> list[float]:
        chats = [[{"role": "user", "content": _text(p)}, {"role": "assistant", "content": _text(c)}]
                 for p, c in zip(prompts, completions, strict=True)]
        return reward_scores(self.model, self.tokenizer, chats)


# reward name -> the dataset columns it reads besides the completions and the prompts (TRL passes those as `prompts`)
REWARD_COLUMNS = {"answer_match": ("answer",), "rouge_l": ("reference",), "code_pass": ("test", "entry_point"),
                  "reward_model": ()}


def make_rewards(names: list[str], reward_model: str, code_timeout_s: float = 5.0) -> list:
    """The reward callables for `names`; `reward_model` is the reward model's path for the `reward_model` reward."""
    made = {"answer_match": answer_match, "rouge_l": rouge_l}
    if "code_pass" in names:
        made["code_pass"] = CodePass(code_timeout_s)
    if "reward_model" in names:
        made["reward_model"] = RewardModel(reward_model)
    return [made[n] for n in names]


def reward_rules(rewards: list[str], reward_weights: list[float], reward_model: str) -> list[tuple[bool, str, str]]:
    """An RL experiment's rules for its `rewards`, `reward_weights` and `reward_model` fields (see Experiment.rules)."""
    unknown = [r for r in rewards if r not in REWARD_COLUMNS]
    return [
        (not unknown, "", f"rewards: unknown {unknown}; known: {', '.join(REWARD_COLUMNS)}"),
        ("reward_model" not in rewards or bool(reward_model), "", "rewards=reward_model needs "
         "reward_model=PATH (a reward model run, e.g. run:latest:rm_qwen, or a reward model directory)"),
        (len(reward_weights) == len(rewards), "", "reward_weights: one weight per reward"),
    ]


def reward_rows(records: list, rewards: list[str]) -> list[dict]:
    """The training rows of an RL experiment: each record's prompt and the columns its `rewards` read, checked
    to be present (a missing one names the file, line and field)."""
    columns = ("prompt", *dict.fromkeys(c for r in rewards for c in REWARD_COLUMNS[r]))
    why = f"rewards {','.join(rewards)} read {', '.join(columns)}"
    return [{key: require_text(r, key, why=why) for key in columns} for r in records]
