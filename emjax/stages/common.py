"""What several stages share: reading chat sources, finding the built checkpoint and the SAEs the sae stage
chose, building the judge."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import emjax.sae
from emjax import config as config_lib
from emjax import distributed
from emjax.data import chat, synthetic


def read_chats(source: str, limit: int | None, seed: int):
    """Conversations from the synthetic corpus (`limit` of them) or a chat dataset."""
    if source == "synthetic":
        return synthetic.synthetic_chats(limit, seed=seed)
    if source == "study":
        raise config_lib.ConfigError("data.source=study feeds the tokenize stage (the SAEs' text); set train.source")
    return chat.read_chats(source, limit=limit)


def source_path(source: str | None) -> dict[str, str]:
    """The external file behind a data source, for fingerprints (none for synthetic or hub ids)."""
    if not source or source in ("synthetic", "study") or source.startswith(("hf:", "synthetic:")):
        return {}
    return {"source": source}


def checkpoint_input(model) -> dict[str, Path]:
    """The checkpoint a config loads (none when it builds from model.arch)."""
    return {} if model.arch is not None else {"checkpoint": config_lib.checkpoint_path(model)}


def built_checkpoint(ctx) -> Path:
    return ctx.output("build") / ctx.manifest("build")["checkpoint"]


def sae_variant(layer: int) -> str:
    """The sae stage's variant (and output folder) for `layer`."""
    return f"layer{layer}"


def layer_of(variant: str) -> int:
    return int(variant.removeprefix("layer"))


def sae_layers(ctx) -> list[int]:
    """The layers the sae stage gives an SAE."""
    return [layer_of(v) for v in ctx.variants("sae")]


def load_stage_sae(ctx, layer: int):
    """The SAE the sae stage chose for `layer`."""
    return emjax.sae.load(ctx.output("sae", sae_variant(layer)) / "sae")


def judge_checkpoint(ctx) -> Path:
    """A local judge's model: judge.model, else the study's own base model."""
    j = ctx.config.judge
    return Path(j.model).expanduser() if j.model else built_checkpoint(ctx)


def make_judge(ctx):
    """The configured judge (emjax.judge): a local model scoring by exact integer probabilities, an
    OpenAI-compatible server (its answers cached under the run directory, so a rerun sends nothing), or
    a probe fitted on a reference judge's scores (emjax.probe_judge; fitted once per run and cached)."""
    from emjax import judge, models

    j = ctx.config.judge
    config_lib.check_judge(j)
    if j.kind == "probe":
        return probe_judge(ctx)
    if j.kind == "http":
        return judge.HttpJudge(
            j.base_url, j.model, api_key_env=j.api_key_env, concurrency=j.concurrency,
            max_error_rate=j.max_error_rate, cache_dir=ctx.run_dir / "judge_cache", url_field="judge.base_url",
        )  # fmt: skip
    path = judge_checkpoint(ctx)
    # One prompt at a time, the nodes of its answers' trie as the batch: the batch is not split over the mesh
    # (weights still shard by the rules; the data axes compute the same).
    model = models.load(path, dtype=ctx.config.model.dtype, mesh=ctx.mesh, rules=ctx.rules | {"batch": ()})
    tokenizer = models.load_tokenizer(path)
    return judge.LocalJudge(model, tokenizer, name=f"local:{path.name}", answer_prefix=j.answer_prefix)


def probe_judge(ctx):
    """The probe judge of judge.probe_*, fitted on the judge model (default the study's base model) and
    cached in `<run_dir>/judge_cache/probe-<key>` (key: the model, the probe settings, the data's content)."""
    from emjax import artifacts, models
    from emjax import probe_judge as probe_lib

    j = ctx.config.judge
    path = judge_checkpoint(ctx)
    model = models.load(path, dtype=ctx.config.model.dtype, mesh=ctx.mesh, rules=ctx.rules | {"batch": ()})
    tokenizer = models.load_tokenizer(path)
    layer = j.probe_layer if j.probe_layer is not None else model.config.num_layers // 2
    settings = {
        "version": 2,  # 2: scores rescaled to the reference's spread (probes cached before are refitted)
        "model": artifacts.fingerprint(path),
        "layer": layer,
        "samples": j.probe_samples,
        "seed": ctx.config.seed,
        "data": [artifacts.fingerprint(f) for f in j.probe_data],
        "heldout": j.probe_heldout and artifacts.fingerprint(j.probe_heldout),
    }
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    cached = ctx.run_dir / "judge_cache" / f"probe-{key}"
    name = f"probe:{path.name}:{key}"
    if cached.with_suffix(".json").is_file():
        return probe_lib.load(cached, model, tokenizer)
    probe = probe_lib.fit(
        model, tokenizer, j.probe_data, heldout_csv=j.probe_heldout, layer=layer, per_file=j.probe_samples,
        seed=ctx.config.seed, name=name,
    )  # fmt: skip
    if distributed.is_main_process():
        probe_lib.save(probe, cached)
    return probe


def judge_input(cfg) -> dict:
    """The judge's weights and data, for fingerprints (a remote judge is identified by its recorded model name)."""
    j = cfg.judge
    files = {"judge": j.model} if j.kind in ("local", "probe") and j.model else {}
    if j.kind == "probe":
        files |= {f"probe_data{i}": f for i, f in enumerate(j.probe_data)}
        files |= {"probe_heldout": j.probe_heldout} if j.probe_heldout else {}
    return files
