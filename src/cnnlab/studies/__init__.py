"""Studies (variations x grid x seeds) and comparing runs (`cnnlab compare`). study (plan, manifest, the
refusal of changed settings) imports executors (inline, processes, Ray) and compare (any run or study
folders, the significance tests, which config keys matter), which imports report (the comparison's figures,
pages and terminal lines); never the reverse. Runs are read through rundir. May import everything below the
CLI (config, errors, rundir, analysis at module level; training, report and data inside the functions that
run a study); never cli."""
