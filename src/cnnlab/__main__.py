"""`python -m cnnlab ...` (what torchrun runs: `torchrun --nproc_per_node 2 -m cnnlab train CONFIG`)."""
from cnnlab.cli import main

raise SystemExit(main())
