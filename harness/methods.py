"""Training methods as TRL trainers. Methods TRL keeps under `trl.experimental` are imported here only,
so that a TRL upgrade that moves them touches this one file."""

from __future__ import annotations

import torch
from datasets import Dataset


def common_args(output_dir: str, max_steps: int, learning_rate: float, batch_size: int, seed: int) -> dict:
    """Trainer arguments every method shares: no saving by the trainer (the harness keeps the best checkpoint),
    no built-in reporting (the harness logs to MLflow), fp32 on CPU."""
    on_gpu = torch.cuda.is_available()
    return dict(
        output_dir=output_dir, max_steps=max_steps, learning_rate=learning_rate,
        per_device_train_batch_size=batch_size, seed=seed, data_seed=seed, logging_steps=1,
        save_strategy="no", report_to="none", disable_tqdm=True, bf16=on_gpu, use_cpu=not on_gpu,
        lr_scheduler_type="constant_with_warmup", warmup_steps=min(5, max_steps // 10),
        dataloader_num_workers=0,
    )


def simpo_trainer(model, tokenizer, rows: list[dict], callbacks: list, *, beta: float, gamma: float,
                  max_length: int, **args):
    """SimPO = CPO's `simpo` loss with the behaviour-cloning term off (cpo_alpha=0); with it on it is CPO-SimPO."""
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    config = CPOConfig(loss_type="simpo", cpo_alpha=0.0, beta=beta, simpo_gamma=gamma, max_length=max_length,
                       **common_args(**args))
    return CPOTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                      callbacks=callbacks)


def sft_trainer(model, tokenizer, rows: list[dict], callbacks: list, *, max_length: int, **args):
    """Supervised fine-tuning on prompt/completion pairs, loss on the completion tokens only."""
    from trl import SFTConfig, SFTTrainer

    config = SFTConfig(max_length=max_length, completion_only_loss=True, **common_args(**args))
    return SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                      callbacks=callbacks)
