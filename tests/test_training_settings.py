"""Training settings as fields: what the TRL config receives, the rules that keep them consistent, trust_remote_code,
chat_template and system_prompt on the way into the tokenizer and the eval prompts, and early stopping."""

import inspect

import pytest
from transformers import TrainerControl, TrainerState

from experiments.sft_qwen import SftQwen
from harness.core.errors import ConfigError
from harness.core.prompts import named_chat_templates, read_chat_template, render_prompt
from harness.core.records import EvalSample
from harness.training.early_stop import EarlyStop
from harness.training.experiment import Experiment
from harness.training.inloop import EvalReport
from harness.training.methods import common_args, make_config
from harness.training.overrides import apply_overrides
from harness.training.settings import lr_schedulers

SYSTEM_TEMPLATE_REFUSED = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not "
                           "supported') }}{% endif %}{{ m['content'] }}{% endfor %}")


def byte_tokenizer(chat_template: str | None = None):
    """A tokenizer built here (no model, no download): one token per byte, so ids decode to exactly the text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")
    fast.chat_template = chat_template
    return fast


def sft_config(exp: Experiment, tmp_path):
    from trl import SFTConfig

    args = exp.trainer_args(str(tmp_path))
    return make_config(SFTConfig, {"max_length": args.pop("max_length")}, args)  # as methods.sft_trainer does


# --- what the trainer receives


def test_defaults_give_the_trainer_what_it_got_before_these_were_fields(tmp_path):
    config = sft_config(SftQwen(), tmp_path)
    assert (config.max_steps, config.lr_scheduler_type, config.warmup_steps) == (60, "constant_with_warmup", 5)
    assert (config.gradient_accumulation_steps, config.gradient_checkpointing) == (1, True)  # TRL's default: on
    assert (config.weight_decay, config.max_grad_norm, config.learning_rate) == (0.0, 1.0, 1e-4)
    short = sft_config(apply_overrides(SftQwen, ["max_steps=4"]), tmp_path)
    assert short.warmup_steps == 0  # min(5, max_steps // 10), as before


def test_every_setting_reaches_the_config(tmp_path):
    exp = apply_overrides(SftQwen, ["num_train_epochs=1.5", "max_steps=0", "gradient_accumulation_steps=4",
                                    "gradient_checkpointing=false", "lr_scheduler_type=cosine", "warmup_ratio=0.1",
                                    "weight_decay=0.01", "max_grad_norm=0.5"])
    config = sft_config(exp, tmp_path)
    assert (config.max_steps, config.num_train_epochs) == (-1, 1.5)  # -1: transformers trains for the epochs
    assert (config.gradient_accumulation_steps, config.gradient_checkpointing) == (4, False)
    assert config.lr_scheduler_type == "cosine" and config.get_warmup_steps(200) == 20  # a ratio of the steps
    assert (config.weight_decay, config.max_grad_norm) == (0.01, 0.5)
    fixed = sft_config(apply_overrides(SftQwen, ["warmup_steps=7", "max_steps=100"]), tmp_path)
    assert fixed.get_warmup_steps(100) == 7


def test_epochs_with_the_automatic_warmup_follow_the_same_rule_once_the_steps_are_known(tmp_path):
    config = sft_config(apply_overrides(SftQwen, ["num_train_epochs=2", "max_steps=0"]), tmp_path)
    assert [config.get_warmup_steps(n) for n in (8, 30, 400)] == [0, 3, 5]


@pytest.mark.filterwarnings("ignore:You are importing from 'trl.experimental'")
def test_every_method_takes_the_common_settings():
    """Each method passes what trainer_args returns (less its own max_length) to common_args."""
    from trl import DPOConfig, GRPOConfig, KTOConfig, RewardConfig
    from trl.experimental.cpo import CPOConfig
    from trl.experimental.orpo import ORPOConfig

    args = Experiment().trainer_args("out")
    args.pop("max_length")
    assert set(args) <= set(inspect.signature(common_args).parameters)
    args.update(gradient_accumulation_steps=2, lr_scheduler_type="linear", weight_decay=0.1)
    for config_cls, own in [(DPOConfig, {}), (KTOConfig, {}), (RewardConfig, {}), (CPOConfig, {}),
                            (ORPOConfig, {}), (GRPOConfig, {"num_generations": 4})]:
        config = make_config(config_cls, own, args)
        assert (config.gradient_accumulation_steps, config.lr_scheduler_type, config.weight_decay,
                config.warmup_steps) == (2, "linear", 0.1, 5), config_cls.__name__


def test_every_accepted_scheduler_builds():
    import torch
    from transformers import get_scheduler

    assert {"constant_with_warmup", "linear", "cosine", "constant"} <= set(lr_schedulers())
    for name in lr_schedulers():
        optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
        get_scheduler(name, optimizer, num_warmup_steps=2, num_training_steps=10)


# --- the rules


@pytest.mark.parametrize(("args", "message"), [
    (["num_train_epochs=2"], "field 'num_train_epochs' = 2.0 and max_steps = 60 both set the length of the run: set "
                             "max_steps=0 to train for epochs"),
    (["max_steps=0"], "field 'max_steps' = 0 trains for num_train_epochs, which is 0"),
    (["max_steps=-1"], "field 'max_steps' = -1 must be >= 1, or 0 to train for num_train_epochs"),
    (["num_train_epochs=-1", "max_steps=0"], "field 'num_train_epochs' = -1.0 must be >= 0"),
    (["warmup_steps=10", "warmup_ratio=0.1"], "field 'warmup_ratio' = 0.1 and warmup_steps = 10 both set the warm-up"),
    (["warmup_ratio=1"], "field 'warmup_ratio' = 1.0 must be in [0, 1)"),
    (["warmup_steps=-2"], "field 'warmup_steps' = -2 must be >= 0, or -1"),
    (["lr_scheduler_type=cosine_annealing"], "field 'lr_scheduler_type' = 'cosine_annealing' must be one of linear, "
                                             "cosine,"),
    (["lr_scheduler_type=reduce_lr_on_plateau"], "follows the trainer's own evaluation loss"),
    (["lr_scheduler_type=cosine_with_min_lr"], "needs lr_scheduler_kwargs (min_lr)"),
    (["lr_scheduler_type=constant", "warmup_steps=3"], "'constant' has no warm-up"),
    (["gradient_accumulation_steps=0"], "field 'gradient_accumulation_steps' = 0 must be >= 1"),
    (["weight_decay=-0.1"], "field 'weight_decay' = -0.1 must be >= 0"),
    (["max_grad_norm=-1"], "field 'max_grad_norm' = -1.0 must be >= 0"),
    (["early_stop_patience=-1"], "field 'early_stop_patience' = -1 must be >= 0"),
    (["chat_template=nope"], "field 'chat_template' = 'nope': expected a named template (chatml) or a Jinja file"),
])
def test_settings_that_do_not_go_together_are_refused(args, message):
    with pytest.raises(ConfigError) as err:
        apply_overrides(SftQwen, args)
    assert message in str(err.value)


@pytest.mark.parametrize("args", [["num_train_epochs=0.5", "max_steps=0"], ["warmup_ratio=0.05"], ["warmup_steps=0"],
                                  ["lr_scheduler_type=constant", "warmup_steps=0"], ["lr_scheduler_type=cosine"],
                                  ["chat_template=chatml"], ["early_stop_patience=3"]])
def test_settings_that_go_together_pass(args):
    apply_overrides(SftQwen, args)


def test_early_stopping_is_refused_in_a_sweep_and_under_a_launcher():
    with pytest.raises(ConfigError, match="a sweep stops unpromising trials with its pruner"):
        apply_overrides(SftQwen, ["early_stop_patience=2"], sweep=True)
    with pytest.raises(ConfigError, match="the decision is made on rank 0's evaluations"):
        apply_overrides(SftQwen, ["early_stop_patience=2"], launch="torchrun")


def test_a_sweep_over_epochs_gets_a_pruner():
    """Hyperband's resource is the training step: from the first evaluation (or the warm-up, if later) up to
    max_steps, or, training for epochs (max_steps=0), up to what Optuna learns from the first trials ("auto")."""
    import optuna

    from harness.sweeps.study import make_pruner

    epochs = make_pruner("hyperband", warmup_steps=0, startup_trials=1, eval_every=2, max_steps=0)
    assert type(epochs) is optuna.pruners.HyperbandPruner
    assert (epochs._min_resource, epochs._max_resource) == (2, "auto")
    steps = make_pruner("hyperband", warmup_steps=6, startup_trials=1, eval_every=2, max_steps=40)
    assert (steps._min_resource, steps._max_resource) == (6, 40)
    median = make_pruner("median", warmup_steps=3, startup_trials=2, eval_every=2, max_steps=0)
    assert type(median) is optuna.pruners.MedianPruner
    assert (median._n_startup_trials, median._n_warmup_steps) == (2, 3)
    assert type(make_pruner("none", warmup_steps=0, startup_trials=1, eval_every=2, max_steps=0)) is \
        optuna.pruners.NopPruner


def test_an_unknown_dpo_loss_type_is_refused_listing_trls_losses():
    from experiments.dpo_qwen import DpoQwen

    with pytest.raises(ConfigError) as e:
        apply_overrides(DpoQwen, ["loss_type=sigmod"])
    # the list is the installed TRL's (DPOConfig documents it), not a copy kept here
    assert "dpo_qwen: field 'loss_type' = 'sigmod' is not one of TRL's DPO losses: sigmoid, hinge, ipo" in str(e.value)
    assert str(e.value).endswith(", discopop, sft, sigmoid_norm")
    assert apply_overrides(DpoQwen, ["loss_type=ipo"]).loss_type == "ipo"


# --- trust_remote_code, chat_template, system_prompt


def test_trust_remote_code_reaches_every_load_and_the_run_warns(monkeypatch, capsys):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from harness.core import models
    from harness.training import runner

    seen = {}

    def fake(kind, result):
        def from_pretrained(path, **kwargs):
            seen[kind] = kwargs.get("trust_remote_code")
            return result
        return from_pretrained

    class Config:
        def get_text_config(self):
            return self

    class Engine:
        def __init__(self, *args, **kwargs):
            seen["vllm"] = kwargs.get("trust_remote_code")

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", fake("tokenizer", byte_tokenizer()))
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", fake("model", object()))
    monkeypatch.setattr(AutoConfig, "from_pretrained", fake("config", Config()))
    monkeypatch.setattr(runner, "VLLMBackend", Engine)
    monkeypatch.setattr(models.torch.cuda, "is_available", lambda: False)
    for trust in (False, True):
        exp = apply_overrides(SftQwen, [f"trust_remote_code={trust}"])
        runner.load_tokenizer_and_model(exp, "some/model")
        runner.model_context(exp, "some/model", None)
        runner.make_backend(exp, "some/model", None)
        assert seen == dict.fromkeys(("tokenizer", "model", "config", "vllm"), trust)
    warning = models.remote_code_warning("org/model")
    assert warning.startswith("[warn] trust_remote_code=true: loading org/model may run Python code")


def test_system_prompt_goes_through_the_chat_template():
    chatml = read_chat_template("chatml")
    tok = byte_tokenizer(chatml)
    with_system = tok.decode(render_prompt(tok, "Hi", "Be brief."))
    assert with_system == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                           "<|im_start|>assistant\n")
    assert tok.decode(render_prompt(tok, "Hi")) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    plain = byte_tokenizer()
    assert plain.decode(render_prompt(plain, "Hi", "Be brief.")) == "Be brief.\n\nHi"
    with pytest.raises(ConfigError, match="field 'system_prompt': the model's chat template refused a system message"):
        render_prompt(byte_tokenizer(SYSTEM_TEMPLATE_REFUSED), "Hi", "Be brief.")


def test_the_eval_prompts_carry_the_system_prompt():
    from harness.core.generation import GenParams
    from harness.training.inloop import Evaluation
    from harness.training.runner import fit_eval_prompts

    tok = byte_tokenizer(read_chat_template("chatml"))
    samples = [EvalSample("a", "Hi", "Hello")]
    evaluation = Evaluation([], samples, None, tok, GenParams(), system_prompt="Be brief.")
    assert "<|im_start|>system\nBe brief.<|im_end|>" in tok.decode(evaluation.prompt_ids[0])
    exp = apply_overrides(SftQwen, ["system_prompt=Be brief."])
    assert fit_eval_prompts(exp, tok, None, samples, ["eval.jsonl:1"]) == evaluation.prompt_ids


def test_chat_template_from_a_file_or_by_name(tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    from harness.core.models import load_tokenizer

    assert "chatml" in named_chat_templates()
    template = tmp_path / "plain.jinja"
    template.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                        "{% if add_generation_prompt %}[assistant] {% endif %}")
    apply_overrides(SftQwen, [f"chat_template={template}"])  # found and parses
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", lambda path, **kw: byte_tokenizer())  # a base model
    tok = load_tokenizer("base/model", chat_template=str(template))
    assert tok.decode(render_prompt(tok, "Hi", "Be brief.")) == "[system] Be brief.\n[user] Hi\n[assistant] "
    assert load_tokenizer("base/model", chat_template="chatml").chat_template == read_chat_template("chatml")
    assert load_tokenizer("base/model").chat_template is None
    template.write_text("{% for m in messages %}{{ m['content'] }")
    with pytest.raises(ConfigError, match=r"field 'chat_template' = .*plain.jinja: line 1: "):
        apply_overrides(SftQwen, [f"chat_template={template}"])


# --- early stopping


class Tags:
    def __init__(self):
        self.tags = {}

    def set_tags(self, tags):
        self.tags.update(tags)


def _report(step: int, value: float | None) -> EvalReport:
    return EvalReport(step, {} if value is None else {"eval/rouge/rougeL": value}, {}, {})


def _run(stop: EarlyStop, values: list[float | None], max_steps: int = 10) -> int:
    """Feed one evaluation per step (step 0 = the baseline); the step training stops at."""
    state, control = TrainerState(max_steps=max_steps), TrainerControl()
    stop(_report(0, values[0]), None)
    for step, value in enumerate(values[1:], start=1):
        state.global_step = step
        stop(_report(step, value), None)
        stop.on_step_end(None, state, control)
        if control.should_training_stop:
            return step
    return state.global_step


def test_early_stop_counts_evaluations_without_improvement(capsys):
    tags = Tags()
    stop = EarlyStop("eval/rouge/rougeL", "max", 2, tags)
    assert _run(stop, [0.1, 0.2, 0.2, None, 0.15, 0.3]) == 4  # 0.2 then no better twice (None does not count)
    assert stop.stopped_at == 4 and tags.tags == {"early_stopped_at": "4"}
    assert "[early stop] step 4: eval/rouge/rougeL has not improved on 0.2000 (step 1) for 2 evaluation(s)" in \
        capsys.readouterr().out
    lower = EarlyStop("eval/rouge/rougeL", "min", 1)
    assert _run(lower, [5.0, 4.0, 3.0, 3.5, 1.0]) == 3 and lower.stopped_at == 3
    improving = EarlyStop("eval/rouge/rougeL", "max", 1)
    assert _run(improving, [0.1, 0.2, 0.3], max_steps=2) == 2 and improving.stopped_at is None


def test_patience_reached_at_the_last_step_is_not_an_early_stop():
    stop = EarlyStop("eval/rouge/rougeL", "max", 1, Tags())
    assert _run(stop, [0.5, 0.5], max_steps=1) == 1
    assert stop.stopped_at is None and stop.tracker.tags == {}


@pytest.mark.slow
def test_a_run_that_stops_improving_stops_early_and_ends_finished(tmp_path, monkeypatch, capsys, tiny_model_dir):
    from mlflow.tracking import MlflowClient
    from transformers import AutoTokenizer

    from harness.training.runner import run_experiment

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    # lr 1e-12 leaves the fp32 weights as they are, so ROUGE-L never beats the baseline: patience 1 stops at step 1
    exp = apply_overrides(SftQwen, ["max_steps=4", "eval_every=1", "early_stop_patience=1", "learning_rate=1e-12",
                                    "eval_limit=4", "max_new_tokens=4", "backend=hf", "evaluators=rouge",
                                    "trust_remote_code=true", "chat_template=chatml", "system_prompt=Be brief.",
                                    f"output_dir={tmp_path}"])
    summary = run_experiment(exp)
    out = capsys.readouterr().out
    assert summary.steps_trained == 1 < exp.max_steps and summary.early_stopped_at == 1
    assert [r.step for r in summary.reports] == [0, 1]  # the report of the stopping step is the final evaluation
    assert "[early stop] step 1: eval/rouge/rougeL has not improved" in out and "stopped early at step 1" in out
    assert "[warn] trust_remote_code=true: loading tiny-qwen2" in out
    run = MlflowClient(uri).get_run(summary.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["early_stopped_at"] == "1"
    best = AutoTokenizer.from_pretrained(summary.best_checkpoint)
    assert best.chat_template == read_chat_template("chatml")  # the checkpoint keeps the run's template
