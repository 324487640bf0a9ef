"""Suite-wide settings: offline, one shared embedded-model home, repo paths.

Everything runs offline: the hub and datasets libraries are told so, and every model and data set is made
locally (presets / the embedded digits model and data set).
"""
import os
import sys
import tempfile

import pytest

# Offline for real: any accidental hub access fails fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One torch thread per process: the suite's models are tiny, the machine has 2 shared cores, and a fixed
# count keeps runs deterministic and free of the trainer's thread probe.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# One embedded model/data set for the whole session (made once, ~1 minute), unless the caller shares one.
_OWN_HOME = None
if "DIFFUSERS_NPU_HOME" not in os.environ:
    _OWN_HOME = os.environ["DIFFUSERS_NPU_HOME"] = tempfile.mkdtemp(prefix="dnpu-test-home-")

# transformers and diffusers give their loggers a handler bound to sys.stderr when first used. Done inside a
# test that captures output (capsys), that handler would keep the test's stream, closed after it, and every
# later library warning would print a "Logging error" traceback: configure them now, for the whole session.
import diffusers.utils.logging  # noqa: E402
import transformers.utils.logging  # noqa: E402

transformers.utils.logging.get_logger("transformers")
diffusers.utils.logging.get_logger("diffusers")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running (minutes); still run in CI")


def pytest_unconfigure(config):
    """The session's own embedded home (20-40 MB) goes with the session; a home the caller gave is kept."""
    if _OWN_HOME is not None:
        import shutil

        shutil.rmtree(_OWN_HOME, ignore_errors=True)


@pytest.fixture(scope="session")
def repo_root():
    return REPO


@pytest.fixture(scope="session")
def embedded_paths():
    """{'model': folder, 'dataset': folder} of the embedded default, prepared once per session."""
    from diffusers_npu import embedded

    return embedded.prepare(progress=False)
