"""The toy model of superposition (emjax.toy): planted feature directions, so the spillover
derivation can be checked exactly; runs in seconds on a CPU and needs no language model.


    python -m emjax.main --config=toy    # writes runs/toy/toy/toy.json and its plots
"""

from emjax.config import ExperimentConfig


def get_config() -> ExperimentConfig:
    return ExperimentConfig(name="toy", stages=("toy",))
