"""emjax.sae.train: recovers a planted dictionary, resumes exactly, and shards without changing results."""

import json
import os
import signal

import jax
import numpy as np
import pytest
from flax import nnx

import emjax.loop
import emjax.sae
from emjax.distributed import make_mesh
from emjax.sae import BatchTopKSAE, JumpReLUSAE, ReLUSAE, SAETrainConfig, TopKSAE


def planted(d=32, n=64, seed=0):
    """n unit directions in d dimensions (n > d: superposition)."""
    directions = np.random.default_rng(seed).normal(size=(n, d))
    return directions / np.linalg.norm(directions, axis=1, keepdims=True)


def sparse_batches(directions, k, rows, seed):
    """Each row: k of the planted directions with magnitudes in [0.5, 1.5]."""
    rng = np.random.default_rng(seed)
    n = len(directions)
    while True:
        codes = np.zeros((rows, n))
        index = np.argsort(rng.random((rows, n)), axis=1)[:, :k]
        np.put_along_axis(codes, index, rng.uniform(0.5, 1.5, (rows, k)), axis=1)
        yield (codes @ directions).astype(np.float32)


@pytest.mark.slow
def test_training_recovers_a_planted_dictionary(tmp_path):
    directions = planted()
    sae = TopKSAE(32, 128, rngs=nnx.Rngs(0), k=3)
    config = SAETrainConfig(steps=400, lr=1e-2, warmup_steps=50, dead_after_tokens=512 * 50, progress=False)
    trained, history = emjax.sae.train(sae, sparse_batches(directions, 3, 512, seed=1), config)
    rows = np.asarray(trained.W_dec[...])
    cosine = directions @ (rows / np.linalg.norm(rows, axis=1, keepdims=True)).T
    assert (cosine.max(axis=1) > 0.9).mean() >= 0.9
    assert history[-1]["fvu"] < 0.1 and history[-1]["l0"] == 3

    sae_lens = pytest.importorskip("sae_lens")
    emjax.sae.save(trained, tmp_path)
    torch = pytest.importorskip("torch")
    x = next(sparse_batches(directions, 3, 64, seed=2))
    with torch.no_grad():
        opened = sae_lens.SAE.load_from_disk(tmp_path)(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(opened, trained(x), rtol=1e-4, atol=1e-5)


class Interrupted(Exception):
    pass


def interrupted_after(batches, count):
    for i, batch in enumerate(batches):
        if i == count:
            raise Interrupted
        yield batch


def tiny_config(**kwargs):
    defaults = dict(steps=12, lr=3e-3, warmup_steps=3, dead_after_tokens=64 * 3, log_every=4, progress=False)
    return SAETrainConfig(**(defaults | kwargs))


def params_of(sae):
    return {k: np.asarray(v) for k, v in nnx.to_pure_dict(nnx.state(sae)).items()}


@pytest.mark.parametrize("kind", [TopKSAE, BatchTopKSAE])
def test_resuming_after_a_kill_gives_the_uninterrupted_result(kind, tmp_path):
    directions = planted(d=16, n=40)
    build = lambda: kind(16, 48, rngs=nnx.Rngs(3), k=4)  # noqa: E731
    config = tiny_config(checkpoint_every=4, normalize_inputs=True)
    straight, _ = emjax.sae.train(build(), sparse_batches(directions, 4, 64, seed=5), config)

    with pytest.raises(Interrupted):
        emjax.sae.train(
            build(), interrupted_after(sparse_batches(directions, 4, 64, seed=5), 10), config, checkpoint_dir=tmp_path
        )
    resumed, _ = emjax.sae.train(build(), sparse_batches(directions, 4, 64, seed=5), config, checkpoint_dir=tmp_path)
    assert resumed.input_scale == straight.input_scale != 1.0
    for name, value in params_of(straight).items():
        np.testing.assert_allclose(params_of(resumed)[name], value, rtol=1e-6, atol=1e-7, err_msg=name)


@pytest.mark.parametrize("kind", [TopKSAE, BatchTopKSAE, JumpReLUSAE, ReLUSAE])
def test_feature_sharded_training_on_8_devices_matches_one_device(kind):
    assert jax.device_count() == 8
    directions = planted(d=16, n=40)
    kwargs = {"k": 4} if kind in (TopKSAE, BatchTopKSAE) else {}
    config = tiny_config(l1_coefficient=0.05, l0_coefficient=0.05)
    results = []
    for mesh in (make_mesh(devices=jax.devices()[:1]), make_mesh(data=2, tensor=4)):
        sae = kind(16, 48, rngs=nnx.Rngs(4), **kwargs)
        trained, _ = emjax.sae.train(sae, sparse_batches(directions, 4, 64, seed=6), config, mesh=mesh)
        results.append(params_of(trained))
    assert trained.W_enc[...].sharding.spec == jax.sharding.PartitionSpec(None, "tensor")
    for name, value in results[0].items():
        np.testing.assert_allclose(results[1][name], value, rtol=1e-5, atol=1e-6, err_msg=name)


def checkpoint_steps(directory):
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def test_sigterm_saves_and_the_resumed_run_is_bitwise_the_uninterrupted_one(tmp_path):
    directions = planted(d=16, n=40)
    build = lambda: BatchTopKSAE(16, 48, rngs=nnx.Rngs(3), k=4)  # noqa: E731
    config = tiny_config(normalize_inputs=True)  # no periodic checkpoints: only the signal saves
    straight, straight_history = emjax.sae.train(build(), sparse_batches(directions, 4, 64, seed=5), config)

    def sigterm_at_step_6(step, metrics, sae):
        if step == 6:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(emjax.loop.Interrupted, match="interrupted at step 6"):
        emjax.sae.train(build(), sparse_batches(directions, 4, 64, seed=5), config, checkpoint_dir=tmp_path,
                        callbacks=[sigterm_at_step_6])  # fmt: skip
    assert checkpoint_steps(tmp_path) == [6]
    resumed, history = emjax.sae.train(
        build(), sparse_batches(directions, 4, 64, seed=5), config, checkpoint_dir=tmp_path
    )
    assert resumed.input_scale == straight.input_scale != 1.0
    for name, value in params_of(straight).items():
        np.testing.assert_array_equal(params_of(resumed)[name], value, err_msg=name)
    # metrics.jsonl holds each logged step once, the records before the signal kept from the first run
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [4, 8, 12] and lines == history
    for got, want in zip(lines, straight_history, strict=True):
        assert {k: v for k, v in got.items() if k != "samples_per_s"} == {
            k: v for k, v in want.items() if k != "samples_per_s"
        }


def test_a_callback_sees_each_step_and_stop_training_saves_and_resumes(tmp_path):
    directions = planted(d=16, n=40)
    build = lambda: TopKSAE(16, 48, rngs=nnx.Rngs(3), k=4)  # noqa: E731
    config = tiny_config()
    straight, straight_history = emjax.sae.train(build(), sparse_batches(directions, 4, 64, seed=5), config)
    seen = []

    def stop_at_5(step, metrics, sae):
        seen.append((step, metrics, params_of(sae)))
        if step == 5:
            raise emjax.loop.StopTraining("enough features")

    stopped, history = emjax.sae.train(
        build(), sparse_batches(directions, 4, 64, seed=5), config, checkpoint_dir=tmp_path, callbacks=[stop_at_5]
    )
    assert [s for s, _, _ in seen] == [1, 2, 3, 4, 5]
    assert history[-1] == {"step": 5, "stopped": "enough features"}
    assert seen[3][1] == {k: v for k, v in straight_history[0].items() if k not in ("step", "samples_per_s")}
    for name, value in params_of(stopped).items():
        np.testing.assert_array_equal(seen[-1][2][name], value, err_msg=name)
    assert checkpoint_steps(tmp_path) == [5]
    resumed, _ = emjax.sae.train(build(), sparse_batches(directions, 4, 64, seed=5), config, checkpoint_dir=tmp_path)
    for name, value in params_of(straight).items():
        np.testing.assert_array_equal(params_of(resumed)[name], value, err_msg=name)


def test_keep_checkpoint_every_keeps_those_steps(tmp_path):
    config = tiny_config(checkpoint_every=2, keep_checkpoint_every=4)
    emjax.sae.train(TopKSAE(16, 48, rngs=nnx.Rngs(3), k=4), sparse_batches(planted(d=16, n=40), 4, 64, seed=5),
                    config, checkpoint_dir=tmp_path)  # fmt: skip
    assert checkpoint_steps(tmp_path) == [4, 8, 10, 12]  # every 4th, and the last two


class L2ReLUSAE(ReLUSAE):
    """A new architecture is one class: ReLU activations with an L2 activation penalty."""

    def extra_losses(self, *, f, h, residual, dead, total_variance, config):
        return {"l2_loss": 1e-2 * (f**2).sum(-1).mean()}


@pytest.mark.parametrize("kind, extra", [(L2ReLUSAE, "l2_loss"), (ReLUSAE, "l1_loss"), (JumpReLUSAE, "l0_loss")])
def test_architecture_loss_terms_are_added_and_logged_by_name(kind, extra):
    config = tiny_config(steps=3, log_every=1, l1_coefficient=0.05, l0_coefficient=0.05)
    _, history = emjax.sae.train(kind(16, 48, rngs=nnx.Rngs(4)), sparse_batches(planted(d=16, n=40), 4, 64, seed=6),
                                 config)  # fmt: skip
    others = {"l1_loss", "l0_loss", "l2_loss", "aux_k_loss"} - {extra}
    for record in history:
        assert not others & set(record) and record[extra] > 0
        np.testing.assert_allclose(record["loss"], record["mse"] * 16 + record[extra], rtol=1e-5)


def test_impossible_sizes_are_named():
    with pytest.raises(ValueError, match=r"SAETrainConfig.steps=0 must be at least 1"):
        SAETrainConfig(steps=0)
    with pytest.raises(ValueError, match=r"SAETrainConfig.log_every=0 must be at least 1"):
        SAETrainConfig(steps=3, log_every=0)
    with pytest.raises(ValueError, match=r"SAETrainConfig.keep_checkpoint_every=-1 must be 0 or more"):
        SAETrainConfig(steps=3, keep_checkpoint_every=-1)
