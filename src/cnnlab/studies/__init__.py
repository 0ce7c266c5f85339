"""Studies (variations x grid x seeds) and comparing runs. May import everything below the CLI."""
