import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MOEKIT_TUNE", "0")  # no timing inside tests unless a test asks (moekit.core.tune)

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from hypothesis import settings  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))

FULL = os.environ.get("MOEKIT_FULL") == "1"
settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True)
settings.register_profile("full", max_examples=200, deadline=None)
settings.load_profile("full" if FULL else "ci")
torch.set_num_threads(min(2, torch.get_num_threads()))
