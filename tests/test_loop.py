"""emjax.loop: the checkpoint object with and without a directory, and the metrics log on resume."""

import json

import jax.numpy as jnp
import numpy as np

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
