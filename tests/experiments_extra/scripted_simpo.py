"""SimPO whose trials follow a script by trial number, so that sweep tests know which trial must complete, crash
or be pruned. Found through HARNESS_EXPERIMENTS_PATH, as a user's own experiment would be."""

from __future__ import annotations

from dataclasses import dataclass

from experiments.simpo_qwen import SimpoQwen

# (learning_rate, crash) by trial number, repeating: two sound trials, one that raises, one that ruins the model
SCRIPT = [(1e-6, False), (2e-6, False), (1e-6, True), (5e-2, False)]


@dataclass
class ScriptedSimpo(SimpoQwen):
    """SimPO with a scripted search space (tests only)."""

    crash: bool = False
    select_metric: str = "eval/perplexity/perplexity"
    select_mode: str = "min"

    def search_space(self, trial) -> dict:
        learning_rate, crash = SCRIPT[trial.number % len(SCRIPT)]
        # crash is set, not sampled: a search space may fix fields per trial without suggesting them
        return {"learning_rate": trial.suggest_float("learning_rate", learning_rate, learning_rate), "crash": crash}

    def build_trainer(self, model, tokenizer, rows, callbacks, output_dir):
        if self.crash:
            raise RuntimeError("crash requested by the trial script")
        return super().build_trainer(model, tokenizer, rows, callbacks, output_dir)
