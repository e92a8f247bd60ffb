import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # tests/ helpers: dist_launcher, reference

# Without CUDA, Triton kernels are compiled for its interpreter (numpy on the host), so the kernel tests
# (tests/test_kernels_*.py) run on CPU. It changes nothing else: dist_stab uses Triton on CPU tensors only
# where a test asks for it (DIST_STAB_TRITON_CPU=1, see dist_stab.kernels.use_triton).
try:
    import torch as _torch
    if not _torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:  # pragma: no cover
    pass

# On CI (CI=true) every test but the CUDA-only ones must really run: a skip there (a missing extra, a missing
# corpus) is reported as a failure instead of passing silently.
_STRICT = os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if _STRICT and rep.skipped and item.get_closest_marker("gpu") is None:
        reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
        rep.outcome = "failed"
        rep.longrepr = f"skipped on CI, which must run every non-GPU test: {reason}"
