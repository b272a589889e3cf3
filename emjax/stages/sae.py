"""sae: one SAE per layer (a variant each), loaded from a public release or trained on extract's
activations, with its provenance and its quality on the study's own text.

Writes `<run_dir>/sae/layer{L}/sae/` (SAELens format) and a manifest with provenance (release,
format, architecture, the model it was trained on), width, and quality on held-out
activations of data.source (position 0 and BOS left out): L0, FVU, FVU per token, explained
variance and the dead fraction. An SAE trained here gets its own seed per layer and needs
sae.tokens_per_latent training tokens per latent.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import numpy as np
from flax import nnx

import emjax.sae
from emjax import config as config_lib
from emjax import distributed
from emjax.pipeline import Stage
from emjax.sae import model as sae_model
from emjax.stages.common import (
    layer_of,
    load_stage_sae,  # noqa: F401 - the filter and train stages import it from here until part B
    sae_variant,
)

_log = logging.getLogger(__name__)

HELD_OUT = 0.1  # share of the extracted tokens kept out of SAE training, for its quality


def variants(cfg) -> list[str]:
    return [sae_variant(layer) for layer in sorted(set(cfg.sae.layers))]


def activations(ctx, layer: int) -> np.ndarray:
    extracted = ctx.output("extract") / f"layer{layer}"
    files = sorted(extracted.glob("*.npy"))
    if not files:
        raise config_lib.ConfigError(
            f"sae.layers has {layer}, but extract wrote no activations for it: add it to extract.layers"
        )
    return np.concatenate([np.load(f, allow_pickle=False) for f in files]).astype(np.float32)


def quality(sae, x: np.ndarray, batch: int = 4096) -> dict:
    """L0, FVU (fraction of variance unexplained: total squared error over total variance), FVU per token
    (each token's squared error over its squared distance from the mean, then their mean and median: a
    few high-norm tokens cannot carry it), explained variance and dead fraction on `x`."""
    x = np.asarray(x, np.float32)
    mean = x.astype(np.float64).mean(0)
    sq_err, fired, l0, per_token = 0.0, np.zeros(sae.d_sae, bool), 0.0, []
    for lo in range(0, len(x), batch):
        chunk = x[lo : lo + batch]
        codes = np.asarray(sae.encode(chunk))
        err = ((np.asarray(sae.decode(codes), np.float64) - chunk) ** 2).sum(1)
        spread = ((chunk - mean) ** 2).sum(1)
        sq_err += float(err.sum())
        per_token.append(np.divide(err, spread, out=np.full_like(err, np.nan), where=spread > 0))
        fired |= (codes > 0).any(0)
        l0 += float((codes > 0).sum())
    total = float(((x - mean) ** 2).sum())
    fvu = sq_err / total if total > 0 else None
    per_token = np.concatenate(per_token)
    per_token = per_token[np.isfinite(per_token)]
    return {
        "tokens": len(x),
        "l0": l0 / len(x),
        "fvu": fvu,
        "fvu_per_token_mean": float(per_token.mean()) if len(per_token) else None,
        "fvu_per_token_median": float(np.median(per_token)) if len(per_token) else None,
        "explained_variance": None if fvu is None else 1 - fvu,
        "dead_fraction": float(1 - fired.mean()),
    }


def layer_seed(seed: int, layer: int) -> int:
    """Each layer's SAE its own initialisation and batch order: with one seed, every layer starts from the
    same dictionary and the same feature ids can top every layer's lists."""
    return int(np.random.SeedSequence([seed, layer]).generate_state(1)[0] % (1 << 31))


def check_token_budget(cfg, layer: int, tokens: int) -> None:
    """An SAE trained here needs sae.tokens_per_latent training tokens per latent."""
    s = cfg.sae
    per_latent = tokens / s.width
    if per_latent < s.tokens_per_latent:
        needed = int(np.ceil(s.tokens_per_latent * s.width))
        raise config_lib.ConfigError(
            f"sae layer {layer}: {tokens:,} training tokens for {s.width:,} latents ({per_latent:.1f} per latent) < "
            f"sae.tokens_per_latent={s.tokens_per_latent:g}: about {needed:,} tokens are needed; raise "
            f"data.num_samples (data.source={cfg.data.source}) or data.max_length, or lower sae.width"
        )


def release_path(s, layer: int) -> str | None:
    """The public SAE configured for `layer`: sae.releases, else the suite named by releases_env."""
    if str(layer) in s.releases:
        return s.releases[str(layer)]
    root = os.environ.get(s.releases_env) if s.releases_env else None
    if root and s.release_pattern:
        return s.release_pattern.format(root=root, layer=layer)
    if not s.train_missing:
        where = f"set ${s.releases_env} (the suite's root) or " if s.releases_env else ""
        raise config_lib.ConfigError(
            f"no SAE for layer {layer}: {where}--config.sae.releases.{layer}=PATH, or --config.sae.train_missing=true "
            "to train one here"
        )
    return None


def external(cfg, variant: str) -> dict:
    release = release_path(cfg.sae, layer_of(variant))
    return {"release": release} if release else {}


def run(ctx, out: Path, variant: str) -> dict:
    cfg = ctx.config
    layer = layer_of(variant)
    d_model = ctx.manifest("extract")["d_model"]
    x = activations(ctx, layer)
    seed = layer_seed(cfg.seed, layer)
    held_out = np.random.default_rng(seed).permutation(len(x))
    cut = max(1, int(len(x) * HELD_OUT))
    test, train = x[held_out[:cut]], x[held_out[cut:]]
    release = release_path(cfg.sae, layer)
    if release:
        sae = emjax.sae.load(release)
        if sae.d_in != d_model:
            raise config_lib.ConfigError(
                f"sae.releases.{layer}={release}: the SAE reads d_in={sae.d_in}, the model's residual is "
                f"d_model={d_model} (wrong base model or hookpoint?)"
            )
        provenance = {"release": str(Path(release).resolve()), "format": emjax.sae.detect(release)}
        provenance["trained_on"] = cfg.sae.release_model
        history = []
    else:
        check_token_budget(cfg, layer, len(train))
        sae, history = train_sae(cfg, train, d_model, out, seed)
        if distributed.is_main_process():
            shutil.rmtree(out / "checkpoints", ignore_errors=True)  # only needed to resume; the SAE is saved
        provenance = {"release": None, "format": "trained here", "trained_on": "this run's model (extract stage)"}
    sae.fold_input_scale()
    emjax.sae.save(sae, out / "sae", metadata={"hook_name": f"blocks.{layer}.hook_resid_post", "layer": layer})
    scores = quality(sae, test)
    if scores["fvu"] is not None and scores["fvu"] > cfg.sae.fvu_warn:
        _log.warning(
            "SAE at layer %d explains only %.0f%% of the variance of this model's activations (FVU %.3f > %.3f): "
            "check the layer, the activation function and the base model it was trained on",
            layer, 100 * scores["explained_variance"], scores["fvu"], cfg.sae.fvu_warn,
        )  # fmt: skip
    return {
        "layer": layer,
        "architecture": sae.architecture,
        "d_in": sae.d_in,
        "width": sae.d_sae,
        "provenance": provenance | {"hookpoint": f"residual stream after block {layer}", "decoder_norms_folded": True},
        "quality": scores,
        "training": (history[-1] | {"tokens": len(train), "tokens_per_latent": len(train) / sae.d_sae, "seed": seed}
                     if history else None),
    }


def train_sae(cfg, x: np.ndarray, d_model: int, out: Path, seed: int):
    s = cfg.sae
    sae = sae_model.create(s.architecture, d_model, s.width, k=s.k, rngs=nnx.Rngs(seed))
    config = emjax.sae.SAETrainConfig(
        steps=s.steps, lr=s.lr, warmup_steps=min(s.warmup_steps, s.steps // 2),
        normalize_inputs=True, checkpoint_every=max(1, s.steps // 4),
        log_every=max(1, s.steps // 20), progress=distributed.is_main_process(),
    )  # fmt: skip
    return emjax.sae.train(sae, batches(x, s.batch_size, seed), config, checkpoint_dir=out / "checkpoints")


def batches(x: np.ndarray, size: int, seed: int):
    """Shuffled batches, epoch after epoch, the same sequence for the same seed (resume replays it)."""
    rng = np.random.default_rng(seed)
    size = min(size, len(x))
    while True:
        order = rng.permutation(len(x))
        for lo in range(0, len(x) - size + 1, size):
            yield x[order[lo : lo + size]]


STAGE = Stage(
    "sae", run, sections=("seed", "sae"), inputs=("extract",), variants=variants, external=external,
)  # fmt: skip
