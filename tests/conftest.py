"""Suite-wide settings: one torch thread per test process (the suite runs 2 processes on 2 cores,
and oversubscribed threads make small CPU training loops many times slower), and a private cache
for decoded data sets so tests never touch ~/.cache."""
import os
import tempfile

os.environ.setdefault("OMP_NUM_THREADS", "1")  # inherited by the CLI subprocesses the tests start
os.environ.setdefault("CNNLAB_CACHE", tempfile.mkdtemp(prefix="cnnlab-test-cache-"))

import torch  # noqa: E402

torch.set_num_threads(1)
