"""PPO (harness/rl/ppo.py, experiments/ppo_qwen.py): its pieces against hand-computed values, the trainer on the
session's vLLM engine, and a short ppo_qwen run logged to MLflow."""

import json
import math

import pytest
import torch

from harness.rl.ppo import explained_variance, gae, policy_loss, token_rewards, value_loss, whiten


def test_gae_on_a_four_token_example():
    # gamma 1, lambda 0.5, the score 1 on the last token: delta = r_t + V_{t+1} - V_t, A_t = delta_t + 0.5 A_{t+1}
    rewards = torch.tensor([[0.0, 0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.4, 0.3, 0.2]])
    mask = torch.ones(1, 4)
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    # t3: 1 - 0.2 = 0.8; t2: 0.2 - 0.3 + 0.4 = 0.3; t1: 0.3 - 0.4 + 0.15 = 0.05; t0: 0.4 - 0.5 + 0.025 = -0.075
    assert advantages.tolist()[0] == pytest.approx([-0.075, 0.05, 0.3, 0.8])
    assert returns.tolist()[0] == pytest.approx([0.425, 0.45, 0.6, 1.0])
    # discounting: gamma 0.5, lambda 1, zero values: A_t = 0.5^(3 - t)
    advantages, _ = gae(rewards, torch.zeros(1, 4), mask, gamma=0.5, lam=1.0)
    assert advantages.tolist()[0] == pytest.approx([0.125, 0.25, 0.5, 1.0])
    # a prompt position before and padding after the completion take no part: same as the two tokens alone
    padded, _ = gae(torch.tensor([[9.0, 0.0, 2.0, 9.0]]), torch.tensor([[9.0, 1.0, 1.0, 9.0]]),
                    torch.tensor([[0.0, 1.0, 1.0, 0.0]]), gamma=1.0, lam=0.5)
    assert padded.tolist()[0] == pytest.approx([0.0, 0.5, 1.0, 0.0])


def test_whitening_uses_the_masked_tokens_only():
    white = whiten(torch.tensor([[1.0, 2.0, 3.0, 4.0]]), torch.ones(1, 4))
    s = math.sqrt(1.25)  # population variance of 1..4
    assert white.tolist()[0] == pytest.approx([-1.5 / s, -0.5 / s, 0.5 / s, 1.5 / s], abs=1e-6)
    white = whiten(torch.tensor([[1.0, 2.0, 3.0, 100.0]]), torch.tensor([[1.0, 1.0, 1.0, 0.0]]))
    assert white.tolist()[0] == pytest.approx([-math.sqrt(1.5), 0.0, math.sqrt(1.5), 0.0], abs=1e-6)
    # a constant has nothing to whiten: all zero, not a division by zero
    assert whiten(torch.full((2, 3), 7.0), torch.ones(2, 3)).abs().max() == 0
    # shift_mean=False keeps the mean (2) and scales the spread (std 2) to 1
    assert whiten(torch.tensor([[0.0, 4.0]]), torch.ones(1, 2), shift_mean=False).tolist()[0] == pytest.approx(
        [1.0, 3.0], abs=1e-6)


def test_clipped_policy_loss_at_ratio_one_and_beyond_the_clip():
    mask = torch.ones(1, 2)
    advantages = torch.tensor([[1.0, -2.0]])
    old = torch.tensor([[-1.0, -2.0]])
    loss, clipfrac, approx_kl = policy_loss(old.clone(), old, advantages, mask, cliprange=0.2)
    assert loss.item() == pytest.approx(-(1.0 - 2.0) / 2) and clipfrac.item() == 0 and approx_kl.item() == 0
    # ratio 1.5 on both tokens: the positive advantage is clipped at 1.2 (-1.2); the negative one is not (+3.0)
    new = (old + math.log(1.5)).requires_grad_()
    loss, clipfrac, approx_kl = policy_loss(new, old, advantages, mask, cliprange=0.2)
    assert loss.item() == pytest.approx((-1.2 + 3.0) / 2)
    assert clipfrac.item() == 0.5 and approx_kl.item() == pytest.approx(0.5 * math.log(1.5) ** 2)
    loss.backward()
    # the clipped token gives no gradient; the other d/dlogp of -A r / 2 = -(-2)(1.5)/2
    assert new.grad.tolist()[0] == pytest.approx([0.0, 1.5])
    # ratio 0.5: now the negative advantage is clipped (at 0.8 x 2), the positive one is not
    loss, clipfrac, _ = policy_loss(old + math.log(0.5), old, advantages, mask, cliprange=0.2)
    assert loss.item() == pytest.approx((-0.5 + 1.6) / 2) and clipfrac.item() == 0.5


def test_clipped_value_loss():
    mask = torch.ones(1, 2)
    old, returns = torch.tensor([[1.0, 1.0]]), torch.tensor([[2.0, 1.1]])
    # token 0 moves 0.5 towards the return 2: clipped to 1.2, whose error (0.64) is the larger; token 1 stays within
    loss, clipfrac = value_loss(torch.tensor([[1.5, 1.05]]), old, returns, mask, cliprange_value=0.2)
    assert loss.item() == pytest.approx(0.5 * (0.64 + 0.05**2) / 2) and clipfrac.item() == 0.5


def test_kl_penalty_per_token_with_the_score_on_the_last_token():
    logprobs = torch.tensor([[0.0, -1.0, -2.0, 0.0], [0.0, -1.0, 0.0, 0.0]])
    ref = torch.tensor([[0.0, -1.5, -1.0, 0.0], [0.0, -0.5, 0.0, 0.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0, 0.0], [0.0, 1.0, 0.0, 0.0]])  # completions of 2 and 1 tokens
    rewards, kl = token_rewards(torch.tensor([2.0, -1.0]), logprobs, ref, mask, kl_coef=0.1)
    assert kl.flatten().tolist() == pytest.approx([0.0, 0.5, -1.0, 0.0, 0.0, -0.5, 0.0, 0.0])
    assert rewards.flatten().tolist() == pytest.approx([0.0, -0.05, 0.1 + 2.0, 0.0, 0.0, 0.05 - 1.0, 0.0, 0.0])


def test_explained_variance():
    returns, mask = torch.tensor([[1.0, 2.0, 3.0]]), torch.ones(1, 3)
    assert explained_variance(returns, returns, mask) == 1.0
    assert explained_variance(torch.full((1, 3), 2.0), returns, mask) == pytest.approx(0.0)


def test_whitening_across_ranks_equals_whitening_all_ranks_tokens_together():
    mine, theirs = torch.tensor([[1.0, 2.0, 9.0]]), torch.tensor([[4.0, 8.0, 5.0], [0.0, 3.0, 7.0]])
    my_mask, their_mask = torch.tensor([[1.0, 1.0, 0.0]]), torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 1.0]])
    sums_seen = []

    def sum_with_the_other_rank(t: torch.Tensor) -> torch.Tensor:
        # the other rank's share of each all-reduce masked_mean makes: first of x, then of (x - global mean)^2
        x = theirs if not sums_seen else (theirs - sums_seen[0][0] / sums_seen[0][1]) ** 2
        sums_seen.append(t + torch.stack([(x * their_mask).sum(), their_mask.sum()]))
        return sums_seen[-1]

    together = whiten(torch.cat([mine, theirs]), torch.cat([my_mask, their_mask]))
    assert whiten(mine, my_mask, sum_ranks=sum_with_the_other_rank)[0].tolist() == pytest.approx(together[0].tolist())
    assert together[0].tolist() != pytest.approx(whiten(mine, my_mask)[0].tolist())  # local whitening differs


def test_rank_fingerprints_tell_identical_weights_from_drifted_ones():
    from harness.rl.ppo import fingerprint, ranks_differing

    torch.manual_seed(0)
    module = torch.nn.Linear(4, 3)
    same = fingerprint(module)
    assert same.dtype == torch.float64 and same.shape == (4,)  # (sum, sum of squares) of weight and bias
    with torch.no_grad():
        module.weight[1, 2] += 1e-6  # one weight, by less than one Adam step at lr 1e-5
    assert ranks_differing(torch.stack([same, same, same])) == []
    assert ranks_differing(torch.stack([same, same, fingerprint(module)])) == [2]


def test_ppo_settings_are_checked_before_a_run():
    from experiments import load_class
    from harness.core.errors import ConfigError
    from harness.training.overrides import apply_overrides
    from harness.training.settings import check_settings

    with pytest.raises(ConfigError, match=r"num_minibatches.*must divide batch_size=8"):
        apply_overrides(load_class("ppo_qwen"), ["num_minibatches=3"])
    with pytest.raises(ConfigError, match=r"value_init=reward_model needs reward_model=PATH"):
        apply_overrides(load_class("ppo_qwen"), ["value_init=reward_model"])
    with pytest.raises(ConfigError, match=r"gradient_accumulation_steps.*must be 1 for PPO"):
        apply_overrides(load_class("ppo_qwen"), ["gradient_accumulation_steps=2"])
    with pytest.raises(ConfigError, match="backend='hf': rollouts come from the vLLM engine"):
        apply_overrides(load_class("ppo_qwen"), ["backend=hf"])
    # multi-process: ZeRO-2 (the deepspeed launcher's default) and DDP (torchrun) are accepted
    assert check_settings(apply_overrides(load_class("ppo_qwen"), []), launch="deepspeed").deepspeed == "zero2"
    check_settings(apply_overrides(load_class("ppo_qwen"), []), launch="torchrun")


def _trainer(tmp_path, model_dir, backend, reward, max_steps: int, **settings):
    from datasets import Dataset
    from transformers import TrainingArguments

    from harness.core.models import load_model, load_tokenizer
    from harness.paths import DATA_DIR
    from harness.rl.ppo import PPOSettings, PPOTrainer, value_model_from
    from harness.training.methods import make_config

    lines = (DATA_DIR / "rl.jsonl").read_text(encoding="utf-8").splitlines()[:8]
    rows = [{"prompt": json.loads(line)["prompt"]} for line in lines]
    args = make_config(TrainingArguments, {}, dict(output_dir=str(tmp_path), max_steps=max_steps, learning_rate=1e-3,
                                                   batch_size=4, seed=0))
    return PPOTrainer(load_model(model_dir), args, Dataset.from_list(rows), load_tokenizer(model_dir), [],
                      backend=backend, value_model=value_model_from(model_dir), reward_funcs=[reward],
                      reward_weights=[1.0], settings=PPOSettings(max_new_tokens=8, num_minibatches=2, ppo_epochs=1,
                                                                 **settings))


def constant(completions, **_):
    return [1.0] * len(completions)


def length(completions, **_):
    return [float(len(c)) for c in completions]


def test_rollouts_come_from_the_synced_policy_and_a_constant_reward_moves_nothing(tmp_path, tiny_model_dir,
                                                                                  vllm_backend):
    from harness.core.models import load_model
    from harness.core.prompts import render_prompt
    from harness.engines.hf_engine import HFBackend

    try:
        # gamma = lambda = 1 and a frozen zero value head (vf_coef 0): a constant score gives every token the same
        # advantage, which whitening makes 0; the KL term is 0 at the reference, so nothing may move at all
        trainer = _trainer(tmp_path / "constant", tiny_model_dir, vllm_backend, constant, 2, gamma=1.0, lam=1.0,
                           vf_coef=0.0, kl_coef=0.1)
        before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        trainer.train()
        logs = [h for h in trainer.state.log_history if "ppo/kl" in h]
        assert [h["step"] for h in logs] == [1, 2] and all(h["ppo/kl"] == 0 and h["ppo/reward"] == 1 for h in logs)
        assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
        # the same settings with a score that differs between samples do move the policy
        trainer = _trainer(tmp_path / "length", tiny_model_dir, vllm_backend, length, 1, gamma=1.0, lam=1.0,
                           vf_coef=0.0, kl_coef=0.1)
        trainer.train()
        assert [k for k, v in trainer.model.state_dict().items() if not torch.equal(before[k], v)]
        # a rollout now: the engine's sampling logprobs are the trained policy's (the sync reached the engine)
        rows = [{"prompt": r["prompt"]} for r in trainer.train_dataset.select(range(4))]
        rollout, _ = trainer._generate(rows)
        hf = HFBackend(trainer.processing_class)
        hf.sync_weights(trainer.model)
        prompt_ids = [render_prompt(trainer.processing_class, r["prompt"]) for r in rows]
        for i, prompt in enumerate(prompt_ids):
            completion = rollout.input_ids[i, len(prompt):len(prompt) + rollout.lengths[i]].tolist()
            (want,) = hf.logprobs([prompt], [completion])
            got = rollout.engine_logprobs[i][rollout.mask[i].bool()]
            assert torch.allclose(got, torch.tensor(want), atol=1e-3), (got, want)
    finally:
        vllm_backend.sync_weights(load_model(tiny_model_dir))  # the session's engine back to the embedded model


@pytest.mark.slow
def test_ppo_qwen_runs_with_in_loop_evaluation_and_logs_ppo_metrics(tmp_path, tiny_model_dir):
    import os
    import subprocess
    import sys

    from mlflow.tracking import MlflowClient
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from harness.paths import REPO_ROOT

    # the rm_qwen -> ppo_qwen chain: a reward model directory (the embedded trunk with a fresh scalar head, what
    # rm_qwen starts from) as a reward and, by value_init=auto, as the value model's start
    reward_model = tmp_path / "rm"
    AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1).save_pretrained(reward_model)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(reward_model)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # its own process: the run builds its own in-process vLLM engine (rollouts and evaluation share it)
    out = subprocess.run([sys.executable, "-m", "harness", "run", "ppo_qwen", "max_steps=2", "eval_every=1",
                          "eval_limit=4", "evaluators=rouge", "max_new_tokens=8", "batch_size=4", "ppo_epochs=1",
                          "rewards=answer_match,reward_model", "reward_weights=1,0.5", f"reward_model={reward_model}",
                          f"output_dir={tmp_path}"],
                         cwd=REPO_ROOT, env={**os.environ, "MLFLOW_TRACKING_URI": uri}, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("ppo_qwen").experiment_id])
    assert run.info.status == "FINISHED"
    history = lambda key: [m.step for m in client.get_metric_history(run.info.run_id, key)]  # noqa: E731
    assert history("eval/rouge/rougeL") == [0, 1, 2]
    for key in ("reward", "kl", "entropy", "policy_loss", "value_loss", "clipfrac", "approx_kl", "explained_variance",
                "response_length", "rollout_logprob_gap", "time/generate_s", "time/sync_s", "time/optimise_s"):
        assert history(f"train/ppo/{key}") == [1, 2], key
    metrics = run.data.metrics
    assert 0 < metrics["train/ppo/response_length"] <= 8 and 0 <= metrics["train/ppo/clipfrac"] <= 1
    assert metrics["train/ppo/rollout_logprob_gap"] < 1e-3  # the engine sampled from the synced policy
    assert metrics["train/grad_norm"] > 0  # the PPO updates' norm, not the Trainer's no-op update
    assert client.get_metric_history(run.info.run_id, "train/ppo/kl")[0].value == 0  # step 1: policy = reference
    assert history("train/ppo/rewards/reward_model") == [1, 2]
    reward = metrics["train/ppo/rewards/answer_match"] + 0.5 * metrics["train/ppo/rewards/reward_model"]
    assert metrics["train/ppo/reward"] == pytest.approx(reward, abs=1e-5)
    # the value model started as the reward model: its first values are the reward model's token scores, not 0
    assert client.get_metric_history(run.info.run_id, "train/ppo/value_mean")[0].value != 0
