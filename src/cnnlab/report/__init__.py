"""The report of one run, drawn from its run folder: plots, HTML and Markdown.
May import analysis, models (to rebuild the model for filters/Grad-CAM), config."""
