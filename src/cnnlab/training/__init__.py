"""Training a run: the run folder's life (experiment), the loop, optimizers and schedules,
checkpoints, logs, and re-evaluation (`cnnlab train`, `cnnlab eval` in training/cli.py).
May import config, errors, registry, dist, process, data, models, analysis; never report, studies or cli
at module level (experiment draws the report through a function-level import)."""
