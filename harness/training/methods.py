"""Training methods as TRL trainers. Methods TRL keeps under `trl.experimental` are imported here only,
so that a TRL upgrade that moves them touches this one file."""

from __future__ import annotations

import re

import torch
from datasets import Dataset

from harness.core.errors import ConfigError
from harness.core.models import autocasts_bf16, master_adapter_weights, training_device


def auto_warmup_steps(training_steps: int) -> int:
    """The warm-up of `warmup_steps=-1`: min(5, a tenth of the training steps)."""
    return min(5, training_steps // 10)


def common_args(output_dir: str, max_steps: int, learning_rate: float, batch_size: int, seed: int,
                deepspeed: str | None = None, num_train_epochs: float = 0.0, gradient_accumulation_steps: int = 1,
                gradient_checkpointing: bool = True, lr_scheduler_type: str = "constant_with_warmup",
                warmup_steps: int = -1, warmup_ratio: float = 0.0, weight_decay: float = 0.0,
                max_grad_norm: float = 1.0, save_every: int = 0) -> dict:
    """Trainer arguments every method shares: the trainer saves a resumable checkpoint every `save_every` steps
    (0 = never; the harness keeps the best checkpoint itself and rotates these: harness.training.resume), no
    built-in reporting (the harness logs to MLflow), bf16 autocast over fp32 master weights on a GPU
    (harness.core.models.training_precision), fp32 on CPU; `deepspeed` is a DeepSpeed JSON config
    (the ranks are started by harness.training.distributed). `batch_size` is per process.

    The length is `max_steps`, or with max_steps=0 `num_train_epochs` passes over the data (check_settings makes
    sure exactly one is set). Warm-up: `warmup_ratio` (> 0) as a fraction of the training steps, else
    `warmup_steps`, or with -1 auto_warmup_steps (worked out here for max_steps; for epochs, where the step count
    is known only once the trainer has the data, by make_config)."""
    device = training_device()
    if warmup_ratio > 0:
        warmup = warmup_ratio  # transformers reads a warmup_steps in (0, 1) as a fraction of the training steps
    elif warmup_steps >= 0:
        warmup = warmup_steps
    else:
        warmup = auto_warmup_steps(max_steps) if max_steps > 0 else 0
    length = dict(max_steps=max_steps) if max_steps > 0 else dict(max_steps=-1, num_train_epochs=num_train_epochs)
    return dict(
        output_dir=output_dir, **length, learning_rate=learning_rate,
        per_device_train_batch_size=batch_size, gradient_accumulation_steps=gradient_accumulation_steps,
        gradient_checkpointing=gradient_checkpointing, seed=seed, data_seed=seed, logging_steps=1,
        save_strategy="steps" if save_every > 0 else "no", save_steps=save_every if save_every > 0 else 500,
        save_total_limit=None, report_to="none", disable_tqdm=True, bf16=autocasts_bf16(device),
        use_cpu=device != "cuda",
        lr_scheduler_type=lr_scheduler_type, warmup_steps=warmup, weight_decay=weight_decay,
        max_grad_norm=max_grad_norm, dataloader_num_workers=0, deepspeed=deepspeed,
        # a NaN/inf loss is logged as such (transformers would log the running average in its place, 0.0 at first)
        logging_nan_inf_filter=False,
    )


def make_config(config_cls, method_args: dict, args: dict):
    """The method's TRL config: its own arguments (`method_args`) and the common ones (`args`, see common_args)."""
    config = config_cls(**method_args, **common_args(**args))
    if args.get("max_steps", 1) <= 0 and args.get("warmup_steps", -1) < 0 and args.get("warmup_ratio", 0.0) <= 0:
        # epochs with the automatic warm-up: the trainer asks its arguments for the warm-up once it knows the step
        # count (its scheduler, or DeepSpeed's); this instance answers with the same rule as for max_steps
        config.get_warmup_steps = auto_warmup_steps
    return config


def _build(config_cls, trainer_cls, model, tokenizer, rows: list[dict], callbacks: list, method_args: dict,
           args: dict, **trainer_kwargs):
    config = make_config(config_cls, method_args, args)
    trainer = trainer_cls(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                          callbacks=callbacks, **trainer_kwargs)
    # TRL casts a 4-bit model's adapter to bf16 (the QLoRA paper's choice), where an update near lr 1e-5 rounds
    # away; the optimizer is made at train(), so casting back here gives it fp32 master weights
    master_adapter_weights(trainer.model)
    return trainer


def simpo_trainer(model, tokenizer, rows: list[dict], callbacks: list, *, beta: float, gamma: float,
                  max_length: int, **args):
    """SimPO = CPO's `simpo` loss with the behaviour-cloning term off (cpo_alpha=0); with it on it is CPO-SimPO."""
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    return _build(CPOConfig, CPOTrainer, model, tokenizer, rows, callbacks,
                  dict(loss_type="simpo", cpo_alpha=0.0, beta=beta, simpo_gamma=gamma, max_length=max_length), args)


def cpo_trainer(model, tokenizer, rows: list[dict], callbacks: list, *, beta: float, cpo_alpha: float,
                max_length: int, **args):
    """CPO: a sigmoid preference loss without a reference model plus `cpo_alpha` x NLL on the chosen answers."""
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    return _build(CPOConfig, CPOTrainer, model, tokenizer, rows, callbacks,
                  dict(loss_type="sigmoid", cpo_alpha=cpo_alpha, beta=beta, max_length=max_length), args)


def orpo_trainer(model, tokenizer, rows: list[dict], callbacks: list, *, beta: float, max_length: int, **args):
    """ORPO: NLL on the chosen answers plus `beta` (the paper's lambda) x the odds-ratio preference term."""
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    return _build(ORPOConfig, ORPOTrainer, model, tokenizer, rows, callbacks,
                  dict(beta=beta, max_length=max_length), args)


def dpo_loss_types() -> tuple[str, ...]:
    """The values of DPO's `loss_type`, as the installed TRL's DPOConfig documents them (TRL keeps no list of its
    own: its trainer raises on any other only at the first training step, after the run opened)."""
    from trl import DPOConfig

    return tuple(re.findall(r"`'(\w+)'`", DPOConfig.__dataclass_fields__["loss_type"].metadata["help"]))


def dpo_trainer(model, tokenizer, rows: list[dict], callbacks: list, *, beta: float, loss_type: str,
                max_length: int, **args):
    """DPO against a frozen reference: a copy of the starting model, or the base weights under a LoRA adapter."""
    from trl import DPOConfig, DPOTrainer

    return _build(DPOConfig, DPOTrainer, model, tokenizer, rows, callbacks,
                  dict(beta=beta, loss_type=[loss_type], max_length=max_length), args)


def kto_trainer(model, tokenizer, rows: list[dict], callbacks: list, *, beta: float, desirable_weight: float,
                undesirable_weight: float, max_length: int, **args):
    """KTO on unpaired examples labelled desirable or not, against a frozen reference like DPO."""
    from trl import KTOConfig, KTOTrainer

    return _build(KTOConfig, KTOTrainer, model, tokenizer, rows, callbacks,
                  dict(beta=beta, desirable_weight=desirable_weight, undesirable_weight=undesirable_weight,
                       max_length=max_length), args)


def sft_trainer(model, tokenizer, rows: list[dict], callbacks: list, *, max_length: int, **args):
    """Supervised fine-tuning on prompt/completion rows (plain or conversational), loss on the completion only."""
    from trl import SFTConfig, SFTTrainer

    return _build(SFTConfig, SFTTrainer, model, tokenizer, rows, callbacks,
                  dict(max_length=max_length, completion_only_loss=True), args)


def pretrain_trainer(model, tokenizer, rows: list[dict], callbacks: list, *, max_length: int, **args):
    """Continued pretraining: next-token loss on every token of raw `text` rows."""
    from trl import SFTConfig, SFTTrainer

    return _build(SFTConfig, SFTTrainer, model, tokenizer, rows, callbacks,
                  dict(max_length=max_length, dataset_text_field="text", completion_only_loss=False), args)


def reward_trainer(model, tokenizer, rows: list[dict], callbacks: list, *, max_length: int, **args):
    """A reward model from preference pairs: Bradley-Terry loss on the scores of chosen vs rejected."""
    from trl import RewardConfig, RewardTrainer

    return _build(RewardConfig, RewardTrainer, model, tokenizer, rows, callbacks, dict(max_length=max_length), args)


class _CountedRewards:
    """Mixed into GRPO and RLOO: logs `rewards/count`, the completions rewarded in a step over all ranks (TRL
    gathers every rank's rewards before computing the advantages), so that a multi-process run shows that every
    rank's completions counted, each once."""

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._metrics["train" if self.model.training else "eval"]["rewards/count"].append(rewards.shape[0])
        return rewards


def grpo_trainer(model, tokenizer, rows: list[dict], callbacks: list, *, rollout, reward_funcs: list,
                 reward_weights: list[float], num_generations: int, max_new_tokens: int, temperature: float,
                 beta: float, **args):
    """GRPO: group-relative advantages over `num_generations` samples per prompt, generated by `rollout`."""
    from trl import GRPOConfig, GRPOTrainer

    class CountedGRPOTrainer(_CountedRewards, GRPOTrainer):
        pass

    return _build(GRPOConfig, CountedGRPOTrainer, model, tokenizer, rows, callbacks,
                  dict(num_generations=num_generations, max_completion_length=max_new_tokens, temperature=temperature,
                       beta=beta, reward_weights=reward_weights), args,
                  reward_funcs=reward_funcs, rollout_func=rollout)


def check_teacher_vocabulary(teacher: str, teacher_path: str, student: str, student_path: str,
                             trust_remote_code: bool = False) -> None:
    """Distillation (KD, GKD) compares the teacher's and the student's next-token distributions token by token, so
    both must have the same vocabulary: the same logits width (config vocab_size) and the same tokens at the same
    ids. Otherwise a ConfigError naming both models and their sizes, before the run opens (the KL would fail, or
    silently compare unrelated tokens, mid-run)."""
    from transformers import AutoConfig

    from harness.core.models import load_tokenizer

    def vocab_size(path: str) -> int:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code).get_text_config().vocab_size

    sizes = vocab_size(teacher_path), vocab_size(student_path)
    fix = "choose a teacher that shares the student's tokenizer (the same model family)"
    if sizes[0] != sizes[1]:
        raise ConfigError(f"teacher {teacher} ({teacher_path}) has a vocabulary of {sizes[0]} tokens (vocab_size) and "
                          f"the student {student} ({student_path}) {sizes[1]}: distillation compares their "
                          f"distributions token by token; {fix}")
    vocabs = [load_tokenizer(p, trust_remote_code=trust_remote_code).get_vocab() for p in (teacher_path, student_path)]
    if vocabs[0] != vocabs[1]:
        raise ConfigError(f"teacher {teacher} ({teacher_path}, {len(vocabs[0])} tokens) and the student {student} "
                          f"({student_path}, {len(vocabs[1])} tokens) have {sizes[0]} logits each but different "
                          f"tokenizers: the same id is another token in each; {fix}")


def distill_trainer(model, tokenizer, rows: list[dict], callbacks: list, *, teacher, alpha: float,
                    temperature: float, max_length: int, **args):
    """Supervised knowledge distillation on prompt/completion rows: on the completion tokens, `alpha` x the
    teacher-to-student KL at `temperature` (scaled by T^2, as in Hinton et al.) + (1 - alpha) x cross-entropy."""
    from trl import SFTConfig, SFTTrainer

    class KDTrainer(SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs["labels"][:, 1:]
            mask = labels != -100
            forward = {k: inputs[k] for k in ("input_ids", "attention_mask") if k in inputs}
            outputs = model(**forward)
            student = outputs.logits[:, :-1][mask].float()
            with torch.no_grad():
                teacher_logits = teacher(**forward).logits[:, :-1][mask].float()
            kl = torch.nn.functional.kl_div(torch.log_softmax(student / temperature, -1),
                                            torch.log_softmax(teacher_logits / temperature, -1),
                                            log_target=True, reduction="batchmean") * temperature**2
            ce = torch.nn.functional.cross_entropy(student, labels[mask])
            self._metrics["train"]["kd/kl"].append(kl.item())
            self._metrics["train"]["kd/ce"].append(ce.item())
            loss = alpha * kl + (1 - alpha) * ce
            return (loss, outputs) if return_outputs else loss

    teacher.eval()
    return _build(SFTConfig, KDTrainer, model, tokenizer, rows, callbacks,
                  dict(max_length=max_length, completion_only_loss=True), args)


def rloo_trainer(model, tokenizer, rows: list[dict], callbacks: list, *, rollout, reward_funcs: list,
                 reward_weights: list[float], num_generations: int, max_new_tokens: int, temperature: float,
                 beta: float, **args):
    """RLOO: each sample's advantage is its reward minus the mean reward of the other `num_generations - 1`
    samples of its prompt. RLOOTrainer takes no `rollout_func`, so its two generation hooks are replaced: prompts
    are rendered as the evaluators render them, and the completions come from `rollout` (harness.rl.rollouts)."""
    from trl import RLOOConfig, RLOOTrainer

    from harness.core.prompts import render_prompt

    class EngineRLOOTrainer(_CountedRewards, RLOOTrainer):
        def _tokenize_prompts(self, prompts):
            return [render_prompt(tokenizer, p) for p in prompts], None, {}

        def _generate_single_turn(self, prompt_ids, images, multimodal_fields):
            completions = rollout.sample_groups(prompt_ids, self.num_generations, self)
            return [ids for c in completions for ids in c.token_ids]

    return _build(RLOOConfig, EngineRLOOTrainer, model, tokenizer, rows, callbacks,
                  dict(num_generations=num_generations, max_completion_length=max_new_tokens, temperature=temperature,
                       beta=beta, reward_weights=reward_weights), args, reward_funcs=reward_funcs)


def gkd_trainer(model, tokenizer, rows: list[dict], callbacks: list, *, rollout, teacher, lmbda: float, beta: float,
                temperature: float, max_new_tokens: int, max_length: int, **args):
    """GKD (on-policy distillation, Agarwal et al. 2024): the generalized Jensen-Shannon divergence (`beta`: 0 is
    the forward KL, 1 the reverse KL) between teacher and student on the completion tokens, which for a fraction
    `lmbda` of the batches are the student's own samples, drawn from `rollout` (the in-loop engine synced with the
    student) instead of the student's `generate`; the other batches use the data's completions."""
    import random

    from trl import SFTTrainer
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    class EngineGKDTrainer(GKDTrainer):
        # one generator seeded alike on every rank, so that all ranks take the on-policy branch together (the
        # rollout is a collective); GKD's own coin is the process-wide `random`
        coin = random.Random(args["seed"])

        def training_step(self, model, inputs, num_items_in_batch=None):
            on_policy = self.coin.random() < self.lmbda
            if on_policy:
                inputs.update(self._student_samples(inputs))
            # the share of batches on the student's samples, logged as train/gkd/on_policy (about lmbda)
            self._metrics["train"]["gkd/on_policy"].append(float(on_policy))
            return SFTTrainer.training_step(self, model, inputs, num_items_in_batch)

        def _student_samples(self, inputs) -> dict:
            """The layout of GKDTrainer.generate_on_policy_outputs: left-padded prompt, then the completion;
            labels only on the completion tokens."""
            prompts, prompt_mask = inputs["prompts"], inputs["prompt_attention_mask"]
            prompt_ids = [row[m.bool()].tolist() for row, m in zip(prompts, prompt_mask, strict=True)]
            completions = [c.token_ids[0] for c in rollout.sample(prompt_ids, 1, self)]
            width = max(1, max(len(c) for c in completions))
            completion = torch.full((len(completions), width), tokenizer.pad_token_id, dtype=prompts.dtype)
            completion_mask = torch.zeros_like(completion)
            for i, c in enumerate(completions):
                completion[i, :len(c)] = torch.tensor(c, dtype=prompts.dtype)
                completion_mask[i, :len(c)] = 1
            input_ids = torch.cat([prompts, completion.to(prompts.device)], dim=1)
            attention_mask = torch.cat([prompt_mask, completion_mask.to(prompt_mask.device)], dim=1)
            labels = input_ids.clone()
            labels[attention_mask == 0] = -100
            labels[:, :prompts.shape[1]] = -100
            return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    teacher.eval()
    return _build(GKDConfig, EngineGKDTrainer, model, tokenizer, rows, callbacks,
                  dict(lmbda=lmbda, beta=beta, temperature=temperature, max_new_tokens=max_new_tokens,
                       max_length=max_length, seq_kd=False), args, teacher_model=teacher)
