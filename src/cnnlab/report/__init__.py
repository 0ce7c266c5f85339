"""The report of one run, drawn from its run folder: build (the command, reading via rundir), sections (what
the report shows, declared once), figures + plots + plots_model (matplotlib), html / md (the two writers),
fmt (shared formatting). May import rundir, analysis, models (to rebuild the model for filters/Grad-CAM),
config and training.tblog (TensorBoard replay); never the rest of training, nor studies."""
