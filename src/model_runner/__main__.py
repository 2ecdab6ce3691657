"""``python -m model_runner``: the model-runner-sink command."""

from model_runner.cli import main

raise SystemExit(main())
