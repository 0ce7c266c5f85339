"""The report of one run, drawn from its run folder: plots, HTML and Markdown (`cnnlab report`).
May import analysis, models (to rebuild the model for filters/Grad-CAM), config, and training's
tblog (to replay a run into TensorBoard); never studies or cli."""
