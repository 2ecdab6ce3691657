"""``python -m model_runner.sink``: the model-runner-sink command."""

from model_runner.cli import main

raise SystemExit(main())
