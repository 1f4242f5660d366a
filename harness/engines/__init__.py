"""Generation engines implementing harness.core.generation's contract: the in-loop vLLM engine (weights synced in
memory) and HF `generate` on the live model."""
