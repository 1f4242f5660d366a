import sys

from harness.commands.cli import main

if __name__ == "__main__":  # vLLM's engine spawns processes: the guard keeps them from re-running the CLI
    sys.exit(main())
