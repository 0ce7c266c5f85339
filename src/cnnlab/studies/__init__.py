"""Studies (variations x grid x seeds) and comparing runs (`cnnlab compare`). study (plan, executors,
manifest) imports compare (any run or study folders, the significance tests, which config keys matter), which
imports report (the comparison's figures and pages); never the reverse. Runs are read through rundir.
May import everything below the CLI (config, errors, rundir, analysis at module level; training, report
and data inside the functions that run a study); never cli."""
