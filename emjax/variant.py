"""The names of a study's fine-tunes (the variants of the train, derivation and evaluate stages), parsed and
written in one place, and which of them a config has.

    bad_advice            a study dataset's fine-tune (its name: the dataset's)
    source                the fine-tune on train.source (or data.source)
    base                  the base model (evaluate's variant; no fine-tune)
    mix-<arm>-s<seed>     a mitigation arm's fine-tune with training seed <seed> (emjax.mitigate's arms)
    <fine-tune>@<percent> its adapter saved at <percent> of training (emjax.train.curve_label)

    v = Variant.parse("mix-geometry-residual_cosine-s1@50")
    v.arm, v.seed, v.along, str(v.trained)   # "geometry-residual_cosine", 1, "50", "mix-geometry-residual_cosine-s1"
"""

from __future__ import annotations

import dataclasses

from emjax import mitigate, train

TRAINED_ROLES = ("inducing", "control")  # the study datasets fine-tuned on their own
MIX = "mix-"


@dataclasses.dataclass(frozen=True)
class Variant:
    """A fine-tune's name: `dataset` (a study dataset, "source" or "base"), or a mitigation arm's `arm` and
    training `seed`; `along`: the percent label of a point along its training (None: its end)."""

    dataset: str | None = None
    arm: str | None = None
    seed: int | None = None
    along: str | None = None

    def __post_init__(self):
        if (self.dataset is None) == (self.arm is None) or (self.arm is None) != (self.seed is None):
            raise ValueError(f"a variant is a dataset or an arm with a seed, not {self!r}")

    @classmethod
    def mix(cls, arm: str, seed: int, along: str | None = None) -> Variant:
        return cls(arm=arm, seed=seed, along=along)

    @classmethod
    def parse(cls, name: str) -> Variant:
        trained, at, along = name.partition("@")
        if at and not along:
            raise ValueError(f"variant {name!r}: nothing after '@' (expected <fine-tune>@<percent>)")
        if not trained.startswith(MIX):
            return cls(dataset=trained, along=along or None)
        arm, sep, seed = trained.removeprefix(MIX).rpartition("-s")
        if not (arm and sep and seed.isdigit()):
            raise ValueError(f"variant {name!r}: a mitigation fine-tune is named mix-<arm>-s<seed>")
        return cls(arm=arm, seed=int(seed), along=along or None)

    def __str__(self) -> str:
        name = self.dataset if self.arm is None else f"{MIX}{self.arm}-s{self.seed}"
        return name if self.along is None else f"{name}@{self.along}"

    @property
    def is_mix(self) -> bool:
        return self.arm is not None

    @property
    def trained(self) -> Variant:
        """The fine-tune itself (at the end of its training)."""
        return self.at(None)

    def at(self, along: str | None) -> Variant:
        """This fine-tune at `along` percent of its training (None: its end)."""
        return dataclasses.replace(self, along=along)


def layer_variant(layer: int) -> str:
    """The sae stage's variant (and output folder) for `layer`."""
    return f"layer{layer}"


def layer_of(variant: str) -> int:
    return int(variant.removeprefix("layer"))


def dataset_variants(cfg) -> list[str]:
    """The study datasets fine-tuned on their own (role inducing or control)."""
    return sorted(name for name, d in cfg.datasets.items() if d.role in TRAINED_ROLES)


def mix_variants(cfg) -> list[str]:
    """One fine-tune per mitigation arm and training seed, when the study has an inducing/control pair."""
    if not any(d.role == "inducing" and d.pair for d in cfg.datasets.values()):
        return []
    arms = mitigate.filter_arms(cfg.mitigate) + mitigate.training_arms(cfg.mitigate)
    return [str(Variant.mix(arm, seed)) for arm in arms for seed in cfg.mitigate.train_seeds]


def train_variants(cfg) -> list[str]:
    """The train stage's fine-tunes: each trained dataset, `source` (when train.source is set or there is no
    such dataset) and each mitigation fine-tune."""
    names = dataset_variants(cfg)
    if cfg.train.source or not names:
        names.append("source")
    return names + mix_variants(cfg)


def curve_variants(cfg) -> list[str]:
    """`mix-none-s<seed>@<percent>`: the `none` arm's adapters saved along training (evaluate's variants)."""
    if not mix_variants(cfg):
        return []
    labels = [train.curve_label(f) for f in cfg.mitigate.curve]
    return [str(Variant.mix("none", seed, label)) for seed in cfg.mitigate.train_seeds for label in labels]


def evaluate_variants(cfg) -> list[str]:
    """The base model, every fine-tune, and the `none` arm's points along training."""
    return ["base"] + train_variants(cfg) + curve_variants(cfg)
