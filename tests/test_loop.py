"""emjax.loop: the checkpoint object with and without a directory, and the metrics log on resume."""

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from emjax import loop


def test_without_a_directory_checkpoints_do_nothing(tmp_path):
    state = {"w": jnp.arange(3.0)}
    checkpoints = loop.Checkpoints(None, keep_every=2)
    checkpoints.save(4, state)
    assert checkpoints.latest_step() == 0 and checkpoints.all_steps() == []
    assert checkpoints.maybe_restore(state) == (0, state)
    checkpoints.close()


def test_keep_every_keeps_those_steps_beside_the_latest(tmp_path):
    checkpoints = loop.Checkpoints(tmp_path / "ckpt", max_to_keep=1, keep_every=3)
    for step in range(1, 8):
        checkpoints.save(step, {"w": jnp.full((2,), float(step)), "n": jnp.asarray(step)})
    checkpoints.save(7, {"w": jnp.zeros(2), "n": jnp.asarray(0)})  # the latest step again: kept as it was
    assert checkpoints.all_steps() == [3, 6, 7]
    checkpoints.close()
    reopened = loop.Checkpoints(tmp_path / "ckpt")
    step, state = reopened.maybe_restore({"w": jnp.zeros(2), "n": jnp.asarray(0)})
    assert step == 7 and int(state["n"]) == 7
    np.testing.assert_array_equal(state["w"], [7.0, 7.0])
    reopened.close()


def test_a_resumed_metrics_log_drops_records_past_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = loop.MetricsLog(path)
    for step in (1, 2, 3):
        log.write({"step": step, "loss": 1.0 / step})
    seen = []
    resumed = loop.MetricsLog(path, resume_step=2, on_write=seen.append)
    resumed.write({"step": 3, "loss": 0.25})
    assert [json.loads(line) for line in path.read_text().splitlines()] == resumed.records
    assert resumed.records == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}, {"step": 3, "loss": 0.25}]
    assert seen == [{"step": 3, "loss": 0.25}]
    assert loop.MetricsLog(None).records == []


# ---------------------------------------------------------------------------- a full disk during a checkpoint


def drift(i, state):
    """One deterministic step: a resumed run replays exactly what an uninterrupted one computes."""
    w = state["w"] * 1.001 + jnp.sin(jnp.arange(state["w"].size, dtype=jnp.float32) + i)
    return {"w": w, "n": state["n"] + 1}, {"loss": jnp.mean(w)}, 1


def train(directory, steps=5, every=1, size=64):
    state = {"w": jnp.zeros(size, jnp.float32), "n": jnp.asarray(0)}
    checkpoints = loop.Checkpoints(directory)
    start, state = checkpoints.maybe_restore(state)
    return loop.run(
        drift, state, start=start, total_steps=steps, checkpoints=checkpoints, metrics=loop.MetricsLog(None),
        model=lambda s: s, checkpoint_every=every, progress=False,
    )  # fmt: skip


def test_a_full_disk_during_a_checkpoint_is_one_error_naming_the_path_and_resume_stays_exact(
    tmp_path, monkeypatch, caplog
):
    import errno
    import logging

    import orbax.checkpoint as ocp
    from absl import logging as absl_logging

    reference = train(tmp_path / "uninterrupted")
    real_save = ocp.CheckpointManager.save

    def save_until_full(self, step, *args, **kwargs):
        if step < 3:
            return real_save(self, step, *args, **kwargs)
        # What orbax does on a full disk: a half-written step folder, its writer threads logging the
        # failure with a traceback, then tensorstore's error raised as a ValueError.
        (self.directory / f"{step}.orbax-checkpoint-tmp-1").mkdir()
        error = ValueError(
            f'RESOURCE_EXHAUSTED: Error writing "w/0.0" in OCDBT database at local file "{self.directory}": '
            "Failed to write 304767 bytes to file 11: No space left on device [os_error_code='28']"
        )
        try:
            raise error
        except ValueError:
            absl_logging.error("_SignalingThread.run() raised an exception: %s", error, exc_info=True)
        raise error

    monkeypatch.setattr(ocp.CheckpointManager, "save", save_until_full)
    with caplog.at_level(logging.INFO), pytest.raises(OSError) as raised:
        train(tmp_path / "ckpt")
    assert raised.value.errno == errno.ENOSPC
    message = str(raised.value)
    assert f"checkpoint step 3 to {tmp_path / 'ckpt'}" in message and "last good checkpoint is step 2" in message
    assert "\n" not in message and raised.value.__cause__ is None and raised.value.__suppress_context__
    assert not [r for r in caplog.records if "No space left" in r.getMessage() or r.exc_info]
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["1", "2"]  # the half-written step removed

    monkeypatch.setattr(ocp.CheckpointManager, "save", real_save)  # space freed: the rerun resumes at step 2
    resumed = train(tmp_path / "ckpt")
    np.testing.assert_array_equal(resumed["w"], reference["w"])
    assert int(resumed["n"]) == int(reference["n"]) == 5


REAL_DISK_FULL = """
import sys, numpy as np
sys.path[:0] = [{tests!r}]
import test_loop
try:
    w = test_loop.train({directory!r}, steps=4, size=1 << 16)["w"]
except OSError as e:  # as emjax.main reports it
    sys.exit(f"error: {{e}}")
np.save({out!r}, np.asarray(w))
"""


@pytest.mark.slow
def test_a_real_full_disk_under_a_tiny_tmpfs(tmp_path):
    """The same on a real full disk: a 400 KiB tmpfs (in a user and mount namespace, no root) holds the first
    256 KiB checkpoint, not the second; on a larger one the rerun resumes to the uninterrupted result."""
    import shutil
    import subprocess
    import sys

    probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True) if shutil.which("unshare") else None
    if probe is None or probe.returncode:
        pytest.skip("no unprivileged user namespaces here (unshare -rm)")
    disk, kept = tmp_path / "disk", tmp_path / "kept"
    disk.mkdir()
    kept.mkdir()
    script = tmp_path / "fill.py"
    script.write_text(REAL_DISK_FULL.format(tests=str(Path(__file__).parent), directory=str(disk / "ckpt"),
                                            out=str(tmp_path / "resumed.npy")))  # fmt: skip

    def run_on_a_tmpfs(size: str):
        """The script on a fresh tmpfs of `size` holding what the last run left (kept across namespaces)."""
        shell = (
            f"mount -t tmpfs -o size={size} tmpfs {disk} && cp -a {kept}/. {disk}/ && "
            f"{sys.executable} {script}; status=$?; rm -rf {kept} && cp -a {disk} {kept}; exit $status"
        )
        return subprocess.run(["unshare", "-rm", "sh", "-c", shell], capture_output=True, text=True, timeout=300)

    full = run_on_a_tmpfs("400k")
    assert full.returncode == 1
    message = (
        f"error: [Errno 28] No space left on device while writing checkpoint step 2 to {disk / 'ckpt'}: free space "
        f"there and rerun to resume. The last good checkpoint is step 1 in {disk / 'ckpt'}\n"
    )
    # One line about the full disk. On a loaded machine orbax's cancelled writer may also hit its own closed
    # event loop while the manager closes (asyncio's "Event loop is closed", a race inside orbax): tolerated,
    # but nothing else may be printed, and the full disk only once.
    assert full.stderr.endswith(message) and full.stderr.count("No space left") == 1
    noise = full.stderr.removesuffix(message)
    assert not noise or noise.rstrip().endswith("RuntimeError: Event loop is closed"), noise
    assert sorted(p.name for p in (kept / "ckpt").iterdir()) == ["1"]
    done = run_on_a_tmpfs("10m")
    assert done.returncode == 0, done.stderr[-2000:]
    reference = train(tmp_path / "reference", steps=4, size=1 << 16)["w"]
    np.testing.assert_array_equal(np.load(tmp_path / "resumed.npy"), np.asarray(reference))
