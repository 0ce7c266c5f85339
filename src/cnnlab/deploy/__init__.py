"""Using a trained run: `cnnlab.load` (classifier.py), `cnnlab predict` (predict.py, inputs.py, page.py)
and `cnnlab export` (export.py). Each reads the run folder only; none retrains or rewrites it."""
