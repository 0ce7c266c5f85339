"""The report of one run, drawn from its run folder (`cnnlab report`): build (the command, reading via rundir),
sections (what the report shows, declared once), figures + plots + plots_model (matplotlib), html / md (the
two writers), fmt (shared formatting). May import rundir, analysis, models (to rebuild the model for
filters/Grad-CAM), config, and training's tblog (to replay a run into TensorBoard); never studies or cli."""
