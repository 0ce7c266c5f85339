"""Using a trained run: `cnnlab.load` (classifier.py), `cnnlab predict` (predict.py, inputs.py, page.py)
and `cnnlab export` (export.py); their parsers in deploy/cli.py. Each reads the run folder only; none
retrains or rewrites it. May import config, errors, process, data, models and training's loop helpers
(evaluation layout and precision); never studies or cli."""
