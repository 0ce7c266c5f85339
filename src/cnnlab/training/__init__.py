"""Training a run: the run folder's life (experiment), the loop, optimizers and schedules,
checkpoints, logs, and re-evaluation. May import config, registry, dist, data, models, analysis."""
