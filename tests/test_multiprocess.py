"""Two JAX processes (4 fake CPU devices each) run the tiny pipeline as one 8-device job.

This exercises the multi-host paths a pod uses: jax.distributed start-up,
per-process batch slices, checkpoint reads into non-addressable meshes,
gathers to host, writes by process 0 only, and barriers between stages.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # two pipelines of two processes each

ARGS = [
    "--config=tiny",
    "--config.data.num_samples=32",
    "--config.extract.rows_per_shard=16",
    "--config.extract.batch_size=8",
    "--config.mesh.data=2",
    "--config.mesh.fsdp=-1",
    # The pipeline up to the fine-tunes of the planted datasets (no mitigation arms): every multi-host path.
    "--stages=tokenize,build,extract,summarize,train",
    "--config.mitigate.train_seeds=",
    "--config.derivation.dynamics_every=0",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_main(run_dir, processes: int, devices_per_process: int):
    port = free_port()
    env = os.environ | {
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices_per_process}",
    }
    if processes > 1:
        env |= {"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": str(processes)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "emjax.main", f"--run_dir={run_dir}", *ARGS],
            env=env | {"JAX_PROCESS_ID": str(i)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(processes)
    ]
    logs = []
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out[-3000:]
        logs.append(out)
    return logs


def test_two_processes_equal_one(tmp_path):
    logs = run_main(tmp_path / "multi", processes=2, devices_per_process=4)
    assert "process 1/2, 4 local / 8 global devices" in logs[1]
    run_main(tmp_path / "single", processes=1, devices_per_process=8)
    multi, single = tmp_path / "multi", tmp_path / "single"
    assert json.loads((multi / "extract" / "manifest.json").read_text())["global_batch"] == 8
    for layer in (1, 2):
        for shard in ("00000", "00001"):
            np.testing.assert_allclose(
                np.load(multi / "extract" / f"layer{layer}" / f"{shard}.npy"),
                np.load(single / "extract" / f"layer{layer}" / f"{shard}.npy"),
                rtol=1e-5,
                atol=1e-5,
            )
    a = json.loads((multi / "summarize" / "summary.json").read_text())
    b = json.loads((single / "summarize" / "summary.json").read_text())
    np.testing.assert_allclose(a["2"]["norm"]["mean"], b["2"]["norm"]["mean"], rtol=1e-6)
    # The train stage too: the same loss curve and adapter from two processes as from one.
    curves = [
        [
            r["loss"]
            for r in map(json.loads, (run / "train" / "bad_advice" / "metrics.jsonl").read_text().splitlines())
            if "loss" in r
        ]
        for run in (multi, single)
    ]
    assert len(curves[0]) >= 2
    np.testing.assert_allclose(curves[0], curves[1], rtol=1e-5)
    from safetensors.numpy import load_file

    adapters = [
        load_file(run / "train" / "bad_advice" / "adapter" / "adapter_model.safetensors") for run in (multi, single)
    ]
    assert adapters[0].keys() == adapters[1].keys()
    for key, value in adapters[0].items():
        np.testing.assert_allclose(value, adapters[1][key], rtol=1e-4, atol=1e-6)
