"""Batched sampling: one jitted program per (batch, prompt-length) bucket, the decode loop a `lax.while_loop`.

tokens = generate(model, [[2, 17, 9], [2, 5]], max_new_tokens=64, temperature=1.0, seed=0, stop_ids=(1, 107))

Prompts are left-padded to a bucketed length and decoded over the model's KV
cache. Every prompt's random stream comes from the seed, a hash of its tokens
and how many identical prompts came before it in `prompts`, never from its
batch slot, so a prompt samples the same answer whatever else is in the batch.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from emjax import distributed, lora

_log = logging.getLogger(__name__)

MIN_PROMPT_BUCKET = 16
MIN_ROWS_BUCKET = 8  # small batches share one program


def bucket(n: int, minimum: int = 1) -> int:
    """The next power of two >= max(n, minimum): few distinct shapes, so few compilations."""
    return 1 << max(0, math.ceil(math.log2(max(n, minimum, 1))))


def prompt_keys(prompts: Sequence[Sequence[int]], seed: int) -> np.ndarray:
    """One uint32 key pair per prompt from (seed, hash of its tokens, occurrence of this prompt so far)."""
    seen: dict[bytes, int] = {}
    keys = np.zeros((len(prompts), 2), np.uint32)
    for i, prompt in enumerate(prompts):
        digest = hashlib.blake2b(np.asarray(prompt, np.int64).tobytes(), digest_size=8).digest()
        occurrence = seen.get(digest, 0)
        seen[digest] = occurrence + 1
        mixed = hashlib.blake2b(digest + np.asarray([seed, occurrence], np.int64).tobytes(), digest_size=8).digest()
        keys[i] = np.frombuffer(mixed, np.uint32)
    return keys


SAMPLING = ("greedy", "sample", "nucleus")
# Decode steps between two tests of the loop's stop condition. On GPUs a data-dependent loop (or
# lax.cond) copies its predicate to the host and waits for it, which idles the device once per test;
# a fixed-length inner loop runs without that. A batch whose rows have all stopped decodes at most
# DECODE_CHUNK - 1 steps in vain.
DECODE_CHUNK = 8


def sampling_kind(temperature: float, top_p: float) -> str:
    """Which branch of sample_logits these settings take: greedy (temperature 0), nucleus (top_p < 1) or sample."""
    return "greedy" if temperature == 0 else "nucleus" if top_p < 1 else "sample"


def sample_logits(logits: jax.Array, keys: jax.Array, temperature, top_p, *, kind: str | None = None) -> jax.Array:
    """One token per row of `logits` [B, V]: nucleus sampling at `temperature`, argmax where it is 0.

    temperature and top_p may be traced. `kind` (sampling_kind of them) picks the branch at trace
    time, so the program holds no conditional; None picks it with `lax.cond` at run time (one
    program for every setting, the vocabulary sort run only when top_p < 1).
    """
    logits = logits.astype(jnp.float32)

    def nucleus(scaled):
        # Keep the smallest set of most likely tokens whose mass reaches top_p (the first always stays).
        order = jnp.argsort(-scaled, axis=-1)
        sorted_logits = jnp.take_along_axis(scaled, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        sorted_logits = jnp.where(mass_before < top_p, sorted_logits, -jnp.inf)
        choice = jax.vmap(jax.random.categorical)(keys, sorted_logits)
        return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)

    def plain(scaled):
        return jax.vmap(jax.random.categorical)(keys, scaled).astype(jnp.int32)

    def greedy(logits):
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    if kind == "greedy":
        return greedy(logits)
    if kind in ("nucleus", "sample"):
        return (nucleus if kind == "nucleus" else plain)(logits / temperature)
    if kind is not None:
        raise ValueError(f"kind must be one of {SAMPLING}, got {kind!r}")

    def sample(logits):
        scaled = logits / temperature
        return jax.lax.cond(top_p < 1, nucleus, plain, scaled)

    return jax.lax.cond(temperature > 0, sample, greedy, logits)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "kind"))
def _decode(graphdef, state, tokens, mask, keys, active, stop_ids, temperature, top_p, *, max_new_tokens, kind):
    """Prefill the left-padded prompts, then decode until every row has stopped or max_new_tokens are out.

    Decodes DECODE_CHUNK steps per test of that condition; the buffers have room for the overshoot.
    Returns (generated [B, max_new_tokens], steps decoded, at most max_new_tokens).
    """
    model = nnx.merge(graphdef, state)
    batch, length = tokens.shape
    room = max_new_tokens + DECODE_CHUNK - 1
    cache = model.init_cache(batch, length + room)
    keys = jax.vmap(jax.random.wrap_key_data)(keys)

    def pick(logits, step):
        step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, step)
        return sample_logits(logits, step_keys, temperature, top_p, kind=kind)

    out = model(tokens, attention_mask=mask, cache=cache)
    # At least one new token (vLLM's min_tokens=1, as the published evaluation samples): no stop id first.
    first = out.logits[:, -1]
    token = pick(jnp.where(jnp.isin(jnp.arange(first.shape[-1]), stop_ids), -jnp.inf, first), 0)
    generated = jnp.zeros((batch, room), jnp.int32).at[:, 0].set(token)
    done = jnp.isin(token, stop_ids) | ~active  # filler rows never hold the loop open

    def cond(carry):
        step, _, _, done, _ = carry
        return (step < max_new_tokens) & ~jnp.all(done)

    def one_step(_, carry):
        step, token, cache, done, generated = carry
        out = model(token[:, None], attention_mask=jnp.ones((batch, 1), jnp.int32), cache=cache)
        token = pick(out.logits[:, -1], step)
        generated = jax.lax.dynamic_update_slice(generated, token[:, None], (0, step))
        # A row that stopped keeps decoding harmlessly; its tokens after the stop are dropped on the host.
        return step + 1, token, out.cache, done | jnp.isin(token, stop_ids), generated

    def chunk(carry):
        return jax.lax.fori_loop(0, DECODE_CHUNK, one_step, carry)

    step, _, _, _, generated = jax.lax.while_loop(cond, chunk, (jnp.int32(1), token, out.cache, done, generated))
    return generated[:, :max_new_tokens], jnp.minimum(step, max_new_tokens)


def _model_mesh(model) -> tuple[Mesh | None, object]:
    shard = getattr(model, "shard", None)
    return getattr(shard, "mesh", None), getattr(shard, "rules", None)


def generate(
    model,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    stop_ids: Sequence[int] = (),
    mesh: Mesh | None = None,
    batch_size: int = 64,
    pad_id: int = 0,
) -> list[list[int]]:
    """New tokens for each prompt (a list of token ids), up to and including its first stop id.

    The first new token is never a stop id (at least one token, vLLM's min_tokens=1): every answer has text.

    temperature 0 is greedy decoding. Prompts are grouped by length into
    batches of at most `batch_size` rows; the batch is split over the mesh's
    batch axes (default: the mesh the model was built on; a model built without
    one is replicated over `mesh`). One process only. Adapters attached
    with emjax.lora are applied as they are (dropout off); merged ones are
    ordinary weights.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got temperature={temperature}, top_p={top_p}")
    if jax.process_count() > 1:
        raise NotImplementedError("generate runs in one process (every process would decode every prompt)")
    prompts = [list(map(int, p)) for p in prompts]
    for i, prompt in enumerate(prompts):
        if not prompt:
            raise ValueError(f"prompts[{i}] is empty: every prompt needs at least one token (e.g. BOS)")
    model_mesh, rules = _model_mesh(model)
    mesh = mesh if mesh is not None else model_mesh
    shards = 1 if mesh is None else distributed.data_parallel_size(mesh, rules)
    batch_size = max(shards, bucket(batch_size) // shards * shards)

    lora.set_dropout_keys(model, None)  # sampling never applies LoRA dropout
    graphdef, state = nnx.split(model)
    if mesh is not None and model_mesh is None:
        state = distributed.onto_mesh(state, mesh)  # a single-device model: replicated, pure data parallel
    keys = prompt_keys(prompts, seed)
    stops = jnp.asarray(sorted(set(map(int, stop_ids))) or [-1], jnp.int32)
    results: list[list[int] | None] = [None] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    started, total_tokens = time.perf_counter(), 0
    for first in range(0, len(order), batch_size):
        rows = order[first : first + batch_size]
        rows_bucket = min(batch_size, max(shards, bucket(len(rows), MIN_ROWS_BUCKET)))
        rows_bucket = -(-rows_bucket // shards) * shards
        length = bucket(max(len(prompts[i]) for i in rows), MIN_PROMPT_BUCKET)
        tokens = np.full((rows_bucket, length), pad_id, np.int32)
        mask = np.zeros((rows_bucket, length), np.int32)
        row_keys = np.zeros((rows_bucket, 2), np.uint32)
        active = np.arange(rows_bucket) < len(rows)
        for slot, i in enumerate(rows):
            tokens[slot, length - len(prompts[i]) :] = prompts[i]
            mask[slot, length - len(prompts[i]) :] = 1
            row_keys[slot] = keys[i]
        mask[len(rows) :, -1] = 1  # filler rows: one real token each, results dropped
        batch = dict(tokens=tokens, mask=mask, keys=row_keys, active=active)
        if mesh is not None:
            batch = distributed.shard_batch(batch, mesh, rules)
        generated, steps = _decode(
            graphdef, state, batch["tokens"], batch["mask"], batch["keys"], batch["active"], stops,
            jnp.float32(temperature), jnp.float32(top_p), max_new_tokens=max_new_tokens,
            kind=sampling_kind(temperature, top_p),
        )  # fmt: skip
        generated = distributed.gather_to_host(generated)[:, : int(steps)]
        stop_set = set(map(int, stop_ids))
        for slot, i in enumerate(rows):
            answer = generated[slot].tolist()
            cut = next((t + 1 for t, tok in enumerate(answer) if tok in stop_set), len(answer))
            results[i] = answer[:cut]
            total_tokens += cut
        elapsed = time.perf_counter() - started
        _log.info(
            "generate: %d/%d answers, %.2f answers/s, %.1f tokens/s",
            first + len(rows), len(prompts), (first + len(rows)) / elapsed, total_tokens / elapsed,
        )  # fmt: skip
    return results  # type: ignore[return-value]
