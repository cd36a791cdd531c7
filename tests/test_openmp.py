"""Only the interactive lane's pass thread keeps an OpenMP team on the CPU (service/host.py): the bulk lane's
passes run in a thread that ends with them, taking its team's helper threads along."""
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from service.host import run_in_passing_thread

# A server on the default model; the native threads of the process (OpenMP helpers: threads Python did not
# start) after an interactive Grad-CAM, then after an IG request on the bulk lane.
_SERVER = """
import io, os, threading, time, httpx
from PIL import Image
from skimage import data
from service.settings import Settings
from tests.server import running_server
def native_threads():
    time.sleep(1.0)  # a passing thread's helpers leave as it ends
    return len(os.listdir("/proc/self/task")) - threading.active_count()
buf = io.BytesIO(); Image.fromarray(data.chelsea()).save(buf, "PNG"); png = buf.getvalue()
settings = Settings(models=["efficientnet_lite0"], default_model="efficientnet_lite0", bulk_cost=1,
                    cache_bytes=0)
with running_server(settings) as (base, app):
    def post(method, **params):
        r = httpx.post(f"{base}/v1/explain/{method}", data={k: str(v) for k, v in params.items()},
                       files=[("image", ("x.png", png, "image/png"))], timeout=120)
        assert r.status_code == 200, r.text
    post("gradcam")
    interactive = native_threads()
    post("integrated-gradients", n_steps=2)  # 2 passes > bulk_cost: the bulk lane
    print(interactive, native_threads())
"""


@pytest.mark.skipif(torch.get_num_threads() < 2, reason="one torch thread: no OpenMP helper threads to count")
def test_a_bulk_lane_pass_leaves_no_openmp_team_behind():
    # On 2 cores, one lingering team made every later interactive Grad-CAM pass 1.4-1.5x slower (libgomp stops
    # spinning once it manages more threads than CPUs): docs/benchmarks.md, "OpenMP teams".
    out = subprocess.run([sys.executable, "-c", _SERVER], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parent.parent, timeout=300)
    interactive, after_bulk = map(int, out.stdout.split())
    assert interactive >= 1  # the interactive lane's team: the oracle that helpers are counted at all
    assert after_bulk == interactive


def test_run_in_passing_thread_returns_or_raises_from_a_thread_that_is_gone():
    seen = []

    def work(x, *, y):
        seen.append(threading.current_thread())
        return x + y

    assert run_in_passing_thread(work, 1, y=2) == 3
    assert seen[0] is not threading.current_thread() and not seen[0].is_alive()

    def fail():
        raise ValueError("from the passing thread")

    with pytest.raises(ValueError, match="from the passing thread"):
        run_in_passing_thread(fail)
