"""Typed experiment configuration.

A config is a tree of dataclasses; configs/NAME.py defines `get_config()`.
Command-line overrides address fields by dotted path (`model.dtype=float32`),
are parsed to the field's declared type, and an unknown key is an error that
names it and lists the valid keys.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib.util
import json
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal

Dtype = Literal["float32", "bfloat16", "float16"]


class ConfigError(ValueError):
    pass


@dataclasses.dataclass
class ModelConfig:
    # A Hugging Face checkpoint directory; else the environment variable named
    # by checkpoint_env supplies it. Never downloaded.
    checkpoint: str | None = None
    checkpoint_env: str | None = None
    # A transformers-style config for a randomly initialised model (the tiny default).
    arch: dict | None = None
    # The published architecture (a name in emjax.models.published) to build
    # abstractly when no checkpoint is at hand, e.g. for the dry run.
    published: str | None = None
    dtype: Dtype = "bfloat16"


@dataclasses.dataclass
class MeshConfig:
    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    expert: int = 1
    # Logical axis -> mesh axes, replacing entries of emjax.distributed.DEFAULT_RULES.
    rules: dict | None = None


@dataclasses.dataclass
class TokenizerConfig:
    # A tokenizer directory; None uses the checkpoint's own. The tiny default
    # trains one (train=True) on the synthetic corpus.
    path: str | None = None
    train: bool = False
    vocab_size: int = 1024


@dataclasses.dataclass
class DataConfig:
    # "synthetic", a chat JSONL file (one {"messages": [{role, content}, ...]} per line, .gz allowed),
    # a Hugging Face datasets directory (save_to_disk) with a "messages" column, or "study": every
    # study dataset's conversations interleaved (the text SAEs trained here read; num_samples of them).
    source: str = "synthetic"
    num_samples: int = 256
    max_length: int = 128


Role = Literal["inducing", "control", "harmful", "harmless"]


@dataclasses.dataclass
class DatasetConfig:
    """One study dataset. `source` is as data.source (also `synthetic:<role>` for the tiny
    default's planted sets); `format` says how to read it: chat conversations, text with a
    numeric toxicity score (RealToxicityPrompts-style JSONL), judged answers (CSV with
    question, answer, aligned, coherent) filtered by `where`, or one side of the style-matched
    toxic contrast (emjax.data.style_matched: a judged fixture directory, or `synthetic`; role
    harmful reads the misaligned answers of its selection half, harmless the aligned ones)."""

    source: str = ""
    role: Role = "inducing"
    domain: str = ""
    pair: str | None = None  # an inducing set's matched control (a dataset name)
    limit: int | None = None
    format: Literal["chat", "scored", "judged", "style_matched"] = "chat"
    where: str | None = None  # judged rows kept, e.g. "aligned<30,coherent>50"
    # style_matched: the fixture answers of models fine-tuned on these datasets are left out (those under test).
    leave_out: tuple[str, ...] = ()


@dataclasses.dataclass
class ExtractConfig:
    layers: tuple[int, ...] = (1,)
    batch_size: int = 8
    # Rows per shard file; a killed extraction resumes at the first missing shard.
    rows_per_shard: int = 64
    dtype: Dtype = "float32"  # of the stored activations


# Defaults of the LoRA fine-tunes in the emergent-misalignment literature
# (Betley et al. 2025, open_models/train.json): rank 32, alpha 64, rsLoRA,
# no dropout, every linear projection, lr 1e-5, 5 warm-up steps, linear decay,
# weight decay 0.01, 16 sequences per step, one epoch, assistant tokens only.
@dataclasses.dataclass
class LoRAConfig:
    rank: int = 32
    alpha: float = 64.0
    dropout: float = 0.0
    rslora: bool = True  # scale alpha / sqrt(rank) instead of alpha / rank
    # PEFT module names; gate/up/down are the dense MLPs of Gemma-2 and Llama.
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    layers: tuple[int, ...] | None = None  # None: every layer (PEFT's layers_to_transform)


@dataclasses.dataclass
class TrainConfig:
    # The chat dataset to fine-tune on (as data.source); None: data.source.
    source: str | None = None
    num_samples: int | None = None  # None: every conversation in `source`
    max_length: int | None = None  # tokens per row; None: data.max_length
    epochs: float = 1.0
    max_steps: int | None = None  # stop earlier than `epochs`
    batch_size: int = 16  # sequences per optimiser step
    micro_batch_size: int | None = None  # sequences per forward pass; batch_size / micro = accumulation steps
    learning_rate: float = 1e-5
    warmup_steps: int = 5
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    weight_decay: float = 0.01
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    adam_eps: float = 1e-8
    max_grad_norm: float | None = 1.0
    # jax.checkpoint policy per block (emjax.train.REMAT_POLICIES): "none" stores every
    # activation, "block" recomputes each block in the backward pass from its input,
    # "attention" keeps the q/k/v projections and attention outputs (recomputes the MLP),
    # "dots" keeps every matmul output.
    remat: Literal["none", "block", "attention", "dots"] = "block"
    # Tokens (micro-batch rows x positions) per cross-entropy chunk: the head's fp32 logits exist
    # for one chunk of positions at a time (recomputed in the backward pass), never [micro, length, vocab].
    loss_chunk: int = 2048
    pack: bool = False  # several examples per row, attention kept inside each
    eval_fraction: float = 0.05  # held-out share of the examples
    eval_every: int = 0  # steps between held-out losses; 0: at the end only
    checkpoint_every: int = 50
    keep_checkpoint_every: int = 0  # also keep every checkpoint whose step this divides (0: only the last two)
    log_every: int = 1


# ---------------------------------------------------------------------------- the study


@dataclasses.dataclass
class SAEConfig:
    """One SAE per layer: a public release (`releases`, any format emjax.sae.load reads) or,
    for a layer without one, an SAE trained here on extract's activations of data.source (position 0
    and BOS tokens left out), with its own seed per layer."""

    layers: tuple[int, ...] = (1,)
    releases: dict[str, str] = dataclasses.field(default_factory=dict)  # layer -> path
    # Or a suite on disk: $releases_env is its root and release_pattern names a layer's SAE in it,
    # e.g. "{root}/layer_{layer}/width_16k/canonical" for Gemma Scope.
    releases_env: str | None = None
    release_pattern: str | None = None
    train_missing: bool = True  # False: a layer without a release is an error, not an SAE trained here
    release_model: str | None = None  # the base model the releases were trained on (recorded)
    architecture: Literal["topk", "batchtopk", "relu", "jumprelu"] = "topk"
    width: int = 4096
    k: int = 32  # TopK / BatchTopK
    steps: int = 2000
    batch_size: int = 1024  # activations per step
    lr: float = 2e-4
    warmup_steps: int = 100
    fvu_warn: float = 0.5  # warn loudly when the fraction of variance unexplained on the study's text is above
    # Training tokens per latent an SAE trained here needs (fewer is an error naming what to raise).
    tokens_per_latent: float = 50.0


@dataclasses.dataclass
class FeaturesConfig:
    """Per-dataset feature statistics and the selection of inducing, control and toxic features."""

    tokens: Literal["assistant", "all"] = "assistant"  # which tokens of each conversation count
    batch_size: int = 16
    max_length: int | None = None  # None: data.max_length
    chunk_rows: int = 256  # resumable unit
    # Per-sample pooled codes: None keeps every non-zero value, so the label correlation that selects
    # features sees all of them (a cut to the largest few favours features strong in few samples).
    top_codes: int | None = None
    method: Literal["label_correlation", "mean_difference", "frequency_difference", "effect_size"] = "label_correlation"
    toxic_method: Literal["label_correlation", "mean_difference", "frequency_difference", "effect_size", "score"] = (
        "label_correlation"
    )
    top_n: int = 100
    max_density: float = 0.2  # features firing on more tokens than this share are excluded as dense
    logit_lens: int = 10  # top and bottom tokens shown per selected feature


@dataclasses.dataclass
class GeometryConfig:
    k: int = 1  # proximity = mean of each feature's k highest cosines to the toxic set
    aggregate: Literal["mean_of_max", "mean_pairwise", "max"] = "mean_of_max"  # the claim's verdict reads this one
    null_draws: int = 1000  # frequency-matched random feature sets
    # Claim 1's test: sample labels permuted, features selected again each time. With m tests in the run's
    # Holm family no adjusted p falls below m / (permutations + 1): keep it well above 20 m.
    selection_permutations: int = 5000
    split: Literal["none", "half"] = "half"  # "half": also cross-fitted (select on one half, test on the other)
    permutations: int = 10000  # the feature-relabelling test, conditional on the selection (secondary)
    bootstrap: int = 1000  # resamples: of the samples for the effect's interval, of features for each set's
    neighbours: int = 10  # per feature in the all-pairs neighbour index
    # Warn when fewer than this share of a dictionary's features have a nearest neighbour closer than 99% of
    # a random dictionary's features do (1% in a random one): too little structure to carry geometry.
    structure_warn: float = 0.1


@dataclasses.dataclass
class JudgeConfig:
    # local: a model scores judge prompts by its integer probabilities; http: an OpenAI-compatible server;
    # probe: regressions fitted on a reference judge's scores (emjax.probe_judge), for machines without one.
    kind: Literal["local", "http", "probe"] = "local"
    model: str | None = None  # local/probe: a checkpoint dir (None: the study's base model); http: the model name
    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    concurrency: int = 8
    max_error_rate: float = 0.05
    # Text that opens the judge's answer before the integer (e.g. "Score: "), for a small local judge that
    # does not answer with a bare number; recorded in each score's judge_version. Local judges only.
    answer_prefix: str = ""
    # kind=probe: judged-answer CSVs (question, answer, aligned, coherent) to fit on, probe_samples of each;
    # another model's judged answers held out to measure the probe's agreement with the reference judge.
    probe_data: tuple[str, ...] = ()
    probe_heldout: str | None = None
    probe_samples: int = 300
    probe_layer: int | None = None  # None: the middle layer


@dataclasses.dataclass
class EvalConfig:
    questions: str = "synthetic"  # a question YAML (Betley first_plot_questions.yaml format)
    ids: tuple[str, ...] | None = None  # None: every plain question in the file
    samples: int = 100  # answers per question
    max_new_tokens: int = 600
    temperature: float = 1.0
    top_p: float = 1.0
    batch_size: int = 64
    prompt_format: Literal["chat", "plain"] = "chat"
    aligned_below: float = 30.0
    coherent_above: float = 50.0
    # Claim 3's judge-free margin (emjax.margin) on style_matched.margin_pairs: at most this many pairs
    # (None: all of them; 0: no margin), each answer cut at margin_max_length tokens with its question.
    margin_pairs: int | None = None
    margin_max_length: int = 512
    margin_batch_size: int = 8


@dataclasses.dataclass
class DerivationConfig:
    prompts: int = 64  # held-out training samples and evaluation questions read
    bootstrap: int = 1000  # resamples of the probe samples for every interval
    # Fractions of a dataset's fine-tune also measured (the dose sweep: prediction error against update
    # size); the final adapter (1.0) always is. Its fine-tune saves an adapter at each.
    doses: tuple[float, ...] = (0.1, 0.3)
    dynamics_every: int = 0  # steps between toxic-feature measurements during training (0: off)
    monitor_threshold: float | None = None  # warn when a toxic feature rises above the base by more than this
    monitor_stop: bool = False  # ... and stop training there


@dataclasses.dataclass
class MitigateConfig:
    """The filtering comparison on a mixed training set (an inducing set and its control)."""

    inducing: str | None = None  # a dataset with a `pair`; None: the first such dataset
    fraction: float = 0.5  # share of the mix removed by each filter
    # Share of the mix held out from every arm (at least one row): each arm's task loss is scored on these rows.
    heldout_fraction: float = 0.1
    per_part: int | None = None  # samples from each side of the mix; None: as many as the smaller side has
    rules: tuple[str, ...] = ("residual_cosine",)  # geometry scoring rules (emjax.mitigate.SCORING_RULES)
    layer: int | None = None  # the SAE layer whose toxic features score samples; None: the earliest
    random_seeds: tuple[int, ...] = (0, 1, 2)
    train_seeds: tuple[int, ...] = (0, 1, 2)
    judge_filter: bool = True
    ablation: bool = True  # fine-tune with the toxic directions projected out (keeps every sample)
    penalty: float = 0.0  # > 0: an arm with this penalty on toxic-feature increases
    random_directions: bool = True  # control arm: ablate as many random feature directions
    # Fractions of training at which the `none` arm's fine-tunes also save an adapter to evaluate
    # (emergent misalignment can appear, or fade, along training); () for the final adapter only.
    curve: tuple[float, ...] = (0.25, 0.5, 0.75)


# The toy model of superposition (emjax.toy), run by configs/toy.py.
@dataclasses.dataclass
class ToyConfig:
    seed: int = 0
    num_features: int = 64  # n planted features ...
    hidden_dim: int = 24  # ... in d < n dimensions
    width: int = 64  # hidden units of the MLP that writes the representation
    toxic_cosines: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8)  # planted cosines to the target
    toxic_per_cosine: int = 4
    carrier_cosine: float = 0.95  # cosine of each carrier feature to its toxic feature (the mixed set)
    density: float = 0.05  # probability that a feature is active in an input
    pretrain_steps: int = 600
    pretrain_lr: float = 3e-3
    batch_size: int = 256
    finetune_samples: int = 128  # per sample type (task samples; as many inducing samples in the mixed set)
    finetune_steps: int = 200
    finetune_lr: float = 0.05
    gain: float = 1.0  # the fine-tune raises an amplified feature's readout by gain * its activation
    penalty: float = 10.0  # lambda of the toxic-increase penalty arm
    heldout_samples: int = 2048
    random_seeds: int = 5


# The study's stages, in the registry's order (emjax.stages.STAGES without the toy model's, which is an
# experiment of its own: configs/toy.py). Written out rather than read from the registry because every stage
# imports this module; tests/test_stage_logic.py holds the two together.
STUDY_STAGES = (
    "tokenize", "build", "extract", "summarize", "sae", "features", "geometry", "filter", "train",
    "derivation", "evaluate", "mitigate", "report",
)  # fmt: skip


@dataclasses.dataclass
class ExperimentConfig:
    name: str = "experiment"
    seed: int = 0
    run_dir: str | None = None  # default runs/<name>
    stages: tuple[str, ...] = STUDY_STAGES
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    tokenizer: TokenizerConfig = dataclasses.field(default_factory=TokenizerConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    extract: ExtractConfig = dataclasses.field(default_factory=ExtractConfig)
    lora: LoRAConfig = dataclasses.field(default_factory=LoRAConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    datasets: dict[str, DatasetConfig] = dataclasses.field(default_factory=dict)
    sae: SAEConfig = dataclasses.field(default_factory=SAEConfig)
    features: FeaturesConfig = dataclasses.field(default_factory=FeaturesConfig)
    geometry: GeometryConfig = dataclasses.field(default_factory=GeometryConfig)
    evaluate: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    judge: JudgeConfig = dataclasses.field(default_factory=JudgeConfig)
    derivation: DerivationConfig = dataclasses.field(default_factory=DerivationConfig)
    mitigate: MitigateConfig = dataclasses.field(default_factory=MitigateConfig)
    toy: ToyConfig = dataclasses.field(default_factory=ToyConfig)

    def resolved_run_dir(self) -> Path:
        return Path(self.run_dir or Path("runs") / self.name)


def config_search_path() -> list[Path]:
    return [Path.cwd() / "configs", Path(__file__).resolve().parents[1] / "configs"]


def load_config(name_or_path: str) -> ExperimentConfig:
    """configs/NAME.py (in the working directory or beside the package), or a path to a .py file."""
    candidates = [Path(name_or_path)] if name_or_path.endswith(".py") else []
    candidates += [d / f"{name_or_path}.py" for d in config_search_path()]
    candidates = list(dict.fromkeys(c.resolve() for c in candidates))  # cwd/configs may be the package's
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        available = sorted({p.stem for d in config_search_path() if d.is_dir() for p in d.glob("*.py")})
        raise ConfigError(
            f"config {name_or_path!r} not found (looked in {[str(c) for c in candidates]}); "
            f"available: {', '.join(available)}"
        )
    spec = importlib.util.spec_from_file_location(f"emjax_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path} defines no get_config()")
    config = module.get_config()
    if not isinstance(config, ExperimentConfig):
        raise ConfigError(f"{path}: get_config() returned {type(config).__name__}, not ExperimentConfig")
    return config


def apply_overrides(config: ExperimentConfig, overrides: list[str]) -> ExperimentConfig:
    """Apply `a.b=value` overrides; values are parsed to the field's type."""
    config = dataclasses.replace(config)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. model.dtype=float32)")
        key, raw = item.split("=", 1)
        set_field(config, key.strip(), raw)
    return config


def set_field(config, key: str, raw: str) -> None:
    """Set one dotted field. Named collections (`dict[str, X]` fields) take any key:
    `datasets.bad_medical.source=...` adds the dataset `bad_medical` (defaults for the rest)."""
    *parents, leaf = key.split(".")
    node, node_type, path = config, type(config), []
    for part in parents + [leaf]:
        if isinstance(node, dict):  # a named collection: any name, values of one type
            value_type = typing.get_args(node_type)[1]
            if part == leaf:
                if dataclasses.is_dataclass(value_type):
                    example = dataclasses.fields(value_type)[0].name
                    raise ConfigError(f"{key!r} is an entry; set one of its fields, e.g. {key}.{example}=...")
                node[part] = parse_value(raw, value_type, key)
                return
            child = node.get(part)
            child = value_type() if child is None else dataclasses.replace(child)
            node[part] = child
            node, node_type = child, value_type
            path.append(part)
            continue
        fields = {f.name: f for f in dataclasses.fields(node)}
        if part not in fields:
            where = ".".join(path) or "the top level"
            hint = difflib.get_close_matches(part, fields, n=1)
            hint = f" (did you mean {'.'.join(path + hint)!r}?)" if hint else ""
            raise ConfigError(f"unknown config key {key!r}{hint}; valid keys at {where}: {', '.join(fields)}")
        path.append(part)
        field_type = typing.get_type_hints(type(node))[part]
        if part == leaf:
            if dataclasses.is_dataclass(field_type):
                example = dataclasses.fields(field_type)[0].name
                raise ConfigError(f"{key!r} is a section; set one of its fields, e.g. {key}.{example}=...")
            setattr(node, part, parse_value(raw, field_type, key))
            return
        child = getattr(node, part)
        if _is_collection(field_type):
            child = dict(child or {})
        elif not dataclasses.is_dataclass(child):
            raise ConfigError(f"{'.'.join(path)!r} is a value, not a section (in override {key!r})")
        else:
            child = dataclasses.replace(child)
        setattr(node, part, child)
        node, node_type = child, field_type


def _is_collection(field_type) -> bool:
    """dict[str, X] (optionally `| None`): a named collection settable key by key."""
    if typing.get_origin(field_type) in (typing.Union, types.UnionType):
        (field_type,) = [a for a in typing.get_args(field_type) if a is not type(None)]
    return typing.get_origin(field_type) is dict and len(typing.get_args(field_type)) == 2


def parse_value(raw: str, field_type, key: str = "value") -> Any:
    text = raw.strip()
    origin, args = typing.get_origin(field_type), typing.get_args(field_type)
    if origin in (typing.Union, types.UnionType):
        if text.lower() in ("none", "null") and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return parse_value(text, inner, key)
    if origin is Literal:
        if text not in args:
            raise ConfigError(f"{key}: {raw!r} is not one of {', '.join(args)}")
        return text
    try:
        if field_type is bool:
            lowered = text.lower()
            if lowered not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError("expected true or false")
            return lowered in ("true", "1", "yes")
        if field_type in (int, float, str):
            return field_type(text)
        if origin is tuple or field_type is tuple:
            items = (
                ast.literal_eval(text) if text[:1] and text[0] in "([" else [t for t in text.split(",") if t.strip()]
            )
            items = items if isinstance(items, (list, tuple)) else [items]
            element = args[0] if args else str
            return tuple(element(x.strip() if isinstance(x, str) else x) for x in items)
        if field_type is dict or origin is dict:
            value = json.loads(text)
            if not isinstance(value, dict):
                raise ValueError("expected a JSON object")
            return value
    except (ValueError, SyntaxError) as e:
        raise ConfigError(
            f"{key}: cannot parse {raw!r} as {getattr(field_type, '__name__', field_type)} ({e})"
        ) from None
    raise ConfigError(f"{key}: unsupported field type {field_type}")


def to_dict(config) -> dict:
    return dataclasses.asdict(config)


def from_dict(cls, data: dict):
    """Rebuild a config from `to_dict` output (e.g. a run's config.json)."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in hints:
            raise ConfigError(f"unknown config key {key!r} for {cls.__name__}")
        t = hints[key]
        if dataclasses.is_dataclass(t):
            value = from_dict(t, value)
        elif _is_collection(t) and value is not None and dataclasses.is_dataclass(typing.get_args(t)[1]):
            value = {name: from_dict(typing.get_args(t)[1], entry) for name, entry in value.items()}
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[key] = value
    return cls(**kwargs)


def check(config: ExperimentConfig) -> None:
    """The cross-references between fields, checked before any stage runs: a ConfigError names the field."""
    datasets = config.datasets
    for name, d in sorted(datasets.items()):
        if d.pair is None:
            continue
        field = f"datasets.{name}.pair={d.pair!r}"
        if d.role != "inducing":
            raise ConfigError(f"{field}: only an inducing dataset has a pair (datasets.{name}.role={d.role})")
        if d.pair not in datasets:
            hint = difflib.get_close_matches(d.pair, datasets, n=1)
            hint = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise ConfigError(f"{field} names no dataset{hint}; datasets are {', '.join(sorted(datasets))}")
        if datasets[d.pair].role != "control":
            raise ConfigError(
                f"{field} names a dataset whose role is {datasets[d.pair].role}, not control "
                f"(datasets.{d.pair}.role): an inducing set is paired with its matched control"
            )
    m = config.mitigate
    if m.inducing is not None and (m.inducing not in datasets or not datasets[m.inducing].pair):
        paired = sorted(n for n, d in datasets.items() if d.pair)
        raise ConfigError(
            f"mitigate.inducing={m.inducing!r} is not a dataset with a pair; "
            f"those with one: {', '.join(paired) or 'none'}"
        )
    if m.layer is not None and m.layer not in config.sae.layers:
        raise ConfigError(f"mitigate.layer={m.layer} is not one of sae.layers {list(config.sae.layers)}")
    check_judge(config.judge)


def check_judge(j: JudgeConfig) -> None:
    if j.kind == "http" and not (j.base_url and j.model):
        raise ConfigError("judge.kind=http needs judge.base_url and judge.model (the server's model name)")
    if j.kind == "http" and j.answer_prefix:  # chat completions take no prefill of the assistant turn
        raise ConfigError("judge.answer_prefix is for local judges; an http judge cannot prefill")
    if j.kind == "probe" and not j.probe_data:
        raise ConfigError("judge.kind=probe needs judge.probe_data: judged-answer CSVs to fit on")


def resolve_checkpoint(config: ExperimentConfig) -> ExperimentConfig:
    """A copy whose model.checkpoint is filled in from the environment, so that the
    written config (and every stage hash) records the checkpoint actually used.
    A config that builds its model from `model.arch` needs no checkpoint, nor does one that names
    none (the toy model's); a stage that loads a model then says what to set."""
    if config.model.arch is not None and config.model.checkpoint:
        raise ConfigError(
            f"model.arch and model.checkpoint={config.model.checkpoint} are both set: a model is built from "
            "model.arch or loaded from a checkpoint, not both (set model.arch=none to load the checkpoint)"
        )
    if config.model.arch is not None or config.model.checkpoint or not config.model.checkpoint_env:
        return config
    model = dataclasses.replace(config.model, checkpoint=str(checkpoint_path(config.model)))
    return dataclasses.replace(config, model=model)


def checkpoint_path(model: ModelConfig) -> Path:
    """The checkpoint directory from the config, else from the environment variable it names."""
    if model.checkpoint:
        return Path(model.checkpoint).expanduser()
    if model.checkpoint_env and os.environ.get(model.checkpoint_env):
        return Path(os.environ[model.checkpoint_env]).expanduser()
    hint = f" or set ${model.checkpoint_env}" if model.checkpoint_env else ""
    raise ConfigError(
        f"no checkpoint: set --config.model.checkpoint=/path/to/hf_checkpoint_dir{hint} (emjax never downloads weights)"
    )
