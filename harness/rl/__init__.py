"""Online RL pieces on top of the in-loop engine: rollouts drawn from it and reward functions built on evaluators/."""
