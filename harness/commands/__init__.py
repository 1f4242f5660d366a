"""What `python -m harness` runs: the CLI and its commands (offline scoring, compare, the benchmark)."""
