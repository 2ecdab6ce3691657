"""``python -m model_runner.cli``: the model-runner-sink command."""

from model_runner.cli import main

raise SystemExit(main())
