"""Test set-up: the platform the tests run on, and fp32 oracles.

EMJAX_TEST_PLATFORM picks it: "cpu" (the default) runs on 8 fake CPU devices
(sharding tests; Pallas kernels interpreted); "gpu" or "tpu" runs on that
host's accelerators, e.g. the accelerator suite:

    EMJAX_TEST_PLATFORM=gpu python -m pytest -q -m accelerator

The environment must be set before jax is imported anywhere.
"""

import os
import tempfile

import pytest

PLATFORM = os.environ.setdefault("EMJAX_TEST_PLATFORM", "cpu")
if PLATFORM not in ("cpu", "gpu", "tpu"):
    raise pytest.UsageError(f"EMJAX_TEST_PLATFORM must be cpu, gpu or tpu, got {PLATFORM!r}")
if PLATFORM == "cpu":
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    os.environ["JAX_PLATFORMS"] = "cpu"
else:
    # Allocate GPU memory as needed: the oracles (torch) and other processes share the device.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One persistent XLA cache for the session and the pipelines it starts: many tests compile the same
# tiny models' steps again, and a cache hit skips the compile (keys cover the HLO and jax version).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "emjax-test-xla-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")


def pytest_sessionstart(session):
    """An accelerator run must not pass on a CPU fallback (jax silently uses the CPU when CUDA fails)."""
    if PLATFORM == "cpu":
        return
    import jax

    backend = jax.default_backend()
    if backend != PLATFORM:
        pytest.exit(
            f"EMJAX_TEST_PLATFORM={PLATFORM} but jax runs on {backend} ({jax.devices()}): "
            "is the accelerator's jax plugin (jax[cuda13] / jax[tpu]) installed and the device visible?",
            returncode=4,
        )


def pytest_ignore_collect(collection_path, config):
    """With `-m accelerator`, import only the test files that hold accelerator tests: the others would be
    deselected anyway, and may need packages an accelerator image lacks (gguf, datasets, sae-lens)."""
    if config.option.markexpr.strip() != "accelerator":
        return None
    if collection_path.suffix != ".py" or not collection_path.name.startswith("test_"):
        return None
    return "mark.accelerator" not in collection_path.read_text()
