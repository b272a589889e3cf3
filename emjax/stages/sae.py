"""sae: one SAE per layer (a variant each), loaded from a public release or trained on extract's
activations, with its provenance and its quality on the study's own text.

Writes `<run_dir>/sae/layer{L}/sae/` (SAELens format) and a manifest with provenance (release,
format, architecture, the model it was trained on), width, and quality on held-out
activations of data.source (position 0 and BOS left out): L0, FVU, FVU per token, explained
variance and the dead fraction. An SAE trained here gets its own seed per layer and needs
sae.tokens_per_latent training tokens per latent.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

import emjax.sae
from emjax import config as config_lib
from emjax import distributed
from emjax.pipeline import Stage
from emjax.sae import io as sae_io
from emjax.sae import quality as sae_quality
from emjax.sae.train import layer_seed, token_budget_error, train_on
from emjax.variant import layer_of, layer_variant


def run(ctx, out: Path, variant: str) -> dict:
    cfg = ctx.config
    layer = layer_of(variant)
    files = sorted((ctx.output("extract") / f"layer{layer}").glob("*.npy"))
    if not files:
        raise config_lib.ConfigError(
            f"sae.layers has {layer}, but extract wrote no activations for it: add it to extract.layers"
        )
    x = np.concatenate([np.load(f, allow_pickle=False) for f in files]).astype(np.float32)
    seed = layer_seed(cfg.seed, layer)
    test, train = sae_quality.split(x, seed)
    release = sae_io.release_path(cfg.sae, layer)
    if release:
        sae = sae_io.load_release(release, ctx.manifest("extract")["d_model"], layer)
        provenance = {"release": str(Path(release).resolve()), "format": emjax.sae.detect(release),
                      "trained_on": cfg.sae.release_model}  # fmt: skip
        history = []
    else:
        too_few = token_budget_error(len(train), cfg.sae.width, cfg.sae.tokens_per_latent)
        if too_few:
            raise config_lib.ConfigError(f"sae layer {layer}: {too_few}; raise data.num_samples or data.max_length "
                                         "(the extract stage's text), or lower sae.width")  # fmt: skip
        sae, history = train_on(train, cfg.sae, seed=seed, checkpoint_dir=out / "checkpoints",
                                progress=distributed.is_main_process())  # fmt: skip
        if distributed.is_main_process():
            shutil.rmtree(out / "checkpoints", ignore_errors=True)  # only needed to resume; the SAE is saved
        provenance = {"release": None, "format": "trained here", "trained_on": "this run's model (extract stage)"}
    sae.fold_input_scale()
    emjax.sae.save(sae, out / "sae", metadata={"hook_name": f"blocks.{layer}.hook_resid_post", "layer": layer})
    scores = sae_quality.quality(sae, test)
    sae_quality.warn_if_poor(scores, layer, cfg.sae.fvu_warn)
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


def external(cfg, variant: str) -> dict:
    release = sae_io.release_path(cfg.sae, layer_of(variant))
    return {"release": release} if release else {}


STAGE = Stage(
    "sae", run, sections=("seed", "sae"), inputs=("extract",), external=external,
    variants=lambda cfg: [layer_variant(layer) for layer in sorted(set(cfg.sae.layers))],
)  # fmt: skip
