"""emjax.sae.train: recovers a planted dictionary, resumes exactly, and shards without changing results."""

import jax
import numpy as np
import pytest
from flax import nnx

import emjax.sae
from emjax.distributed import make_mesh
from emjax.sae import BatchTopKSAE, JumpReLUSAE, ReLUSAE, TopKSAE, TrainConfig


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


def test_training_recovers_a_planted_dictionary(tmp_path):
    directions = planted()
    sae = TopKSAE(32, 128, rngs=nnx.Rngs(0), k=3)
    config = TrainConfig(steps=400, lr=1e-2, warmup_steps=50, dead_after_tokens=512 * 50, progress=False)
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
    return TrainConfig(**(defaults | kwargs))


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
