"""`python -m cnnlab ...` (what torchrun runs: `torchrun --nproc_per_node 2 -m cnnlab train CONFIG`)."""
import os

from cnnlab import threads

threads.prefer_passive_wait()  # before anything imports torch (OpenMP reads it when it loads)
from cnnlab.cli import main  # noqa: E402

if "TORCHELASTIC_ERROR_FILE" in os.environ:  # under torchrun: its failure summary names the failing rank's error
    from torch.distributed.elastic.multiprocessing.errors import record

    main = record(main)

raise SystemExit(main())
