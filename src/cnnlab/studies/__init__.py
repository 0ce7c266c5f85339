"""Studies (variations x grid x seeds) and comparing runs. study (plan, executors, manifest) imports compare
(`cnnlab compare`: any run or study folders, the significance tests, which config keys matter), which
imports report (the comparison's figures and pages); never the reverse. Runs are read through rundir.
May import everything below the CLI."""
