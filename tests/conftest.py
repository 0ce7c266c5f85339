"""Suite-wide settings: one torch thread per test process (the suite runs 2 processes on 2 cores,
and oversubscribed threads make small CPU training loops many times slower), and a private cache
for decoded data sets so tests never touch ~/.cache; one local Ray instance shared by the Ray tests."""
import os
import tempfile

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")  # inherited by the CLI subprocesses the tests start
os.environ.setdefault("CNNLAB_CACHE", tempfile.mkdtemp(prefix="cnnlab-test-cache-"))

import torch  # noqa: E402

torch.set_num_threads(1)

_RAY_DONE: set[str] = set()


@pytest.fixture
def ray_local(request):
    """A local Ray instance for the tests of the Ray executor (2 CPUs; 2 GPUs as Ray resources only, so a task
    that asks for a GPU gets its CUDA_VISIBLE_DEVICES), shared: its start and its workers' imports (~10 s on
    2 cores) are paid once. Those tests are in the xdist group "ray" (one worker); the instance is shut down
    after the last of them has run, so no idle Ray runs beside the rest of the suite."""
    ray = pytest.importorskip("ray", reason="Ray is optional (pip install 'cnnlab[ray]')")
    if not ray.is_initialized():
        ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    _RAY_DONE.add(request.node.nodeid)
    users = {i.nodeid for i in request.session.items if "ray_local" in getattr(i, "fixturenames", ())}
    if users <= _RAY_DONE:
        ray.shutdown()
