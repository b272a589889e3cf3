"""The toy model of superposition (emjax.toy): planted feature directions, so the spillover
derivation can be checked exactly; runs in seconds on a CPU and needs no language model.

Stage wiring (for the lead; not wired yet): one stage, "toy", that calls
    emjax.toy.run_toy(config.toy, run_dir / "derivation")
which writes derivation/toy.json (features, filter, target, fit, narrow) and the two plots
amplification_vs_cosine.png and predicted_vs_measured.png. It needs an `ExperimentConfig.toy`
field of type `emjax.config.ToyConfig` (defaults as in ToyConfig) hashed into the stage, and
`config.resolve_checkpoint` must accept a config without model.arch / model.checkpoint when
none of its stages loads a model.
"""

from emjax.config import ExperimentConfig


def get_config() -> ExperimentConfig:
    return ExperimentConfig(name="toy", stages=("toy",))
