"""Studies (variations x grid x seeds) and comparing runs (`cnnlab compare`).
May import everything below the CLI (config, errors, analysis at module level; training, report
and data inside the functions that run a study); never cli."""
