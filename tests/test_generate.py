"""Sampling: greedy decoding against transformers' generate, seeded sampling, stops, adapters, sharding."""

import numpy as np
import pytest

import emjax.models
from emjax import distributed, lora
from emjax.config import LoRAConfig
from emjax.generate import DECODE_CHUNK, generate, prompt_keys, sample_logits
from hf_oracle import hf_greedy, random_gemma2, random_gpt_oss, random_llama

FAMILIES = {"gemma2": random_gemma2, "llama": random_llama, "gpt-oss": random_gpt_oss}
# Lengths 3..11 in one batch: the longest is past every sliding window (4), and each row is left-padded.
PROMPTS = [[5, 17, 3], [9, 3, 44, 60, 7, 8, 21], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 22]]


@pytest.fixture(params=list(FAMILIES), scope="module")
def pair(request, tmp_path_factory):
    hf, path = FAMILIES[request.param](tmp_path_factory.mktemp(request.param))
    return hf, emjax.models.load(path, dtype="float32")


def test_greedy_equals_transformers_generate(pair):
    hf, model = pair
    ours = generate(model, PROMPTS, max_new_tokens=8, temperature=0.0)
    assert ours == hf_greedy(hf, PROMPTS, 8, eos=None)
    assert all(len(row) == 8 for row in ours)


def test_stop_ids_end_each_row_at_its_first_stop(pair):
    hf, model = pair
    free = generate(model, PROMPTS, max_new_tokens=8, temperature=0.0)
    stop = free[1][3]  # a token row 1 emits: row 1 must end there, the others at their own first occurrence
    stopped = generate(model, PROMPTS, max_new_tokens=8, temperature=0.0, stop_ids=(stop,))
    at_least_one = hf_greedy(hf, PROMPTS, 8, eos=stop, min_new_tokens=1)
    for full, cut, oracle in zip(free, stopped, at_least_one):
        if full[0] == stop:  # a stop id is never the first new token: the row goes on as transformers' does
            assert cut == oracle and cut[0] != stop
        else:
            end = full.index(stop) + 1 if stop in full else len(full)
            assert cut == full[:end]


def test_the_first_new_token_is_never_a_stop_id(pair):
    """vLLM's min_tokens=1 (the published sampling): transformers' min_new_tokens=1 is the oracle."""
    hf, model = pair
    free = generate(model, PROMPTS, max_new_tokens=6, temperature=0.0)
    stops = sorted({row[0] for row in free})  # every row's greedy first token
    ours = generate(model, PROMPTS, max_new_tokens=6, temperature=0.0, stop_ids=stops)
    assert all(row and row[0] not in stops for row in ours)
    assert ours == hf_greedy(hf, PROMPTS, 6, eos=stops, min_new_tokens=1)
    # Sampled, nearly greedy: without the mask almost every draw would be a stop id and an empty answer.
    sampled = generate(model, PROMPTS * 4, max_new_tokens=2, temperature=0.05, seed=0, stop_ids=stops)
    assert all(row and row[0] not in stops for row in sampled)


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch(pair):
    _, model = pair
    prompts = PROMPTS + [PROMPTS[0]]  # a repeated prompt draws a different sample
    a = generate(model, prompts, max_new_tokens=8, seed=3)
    assert a == generate(model, prompts, max_new_tokens=8, seed=3)
    assert a[0] != a[3]
    # Alone, in a different order (repeats keep their relative order), in batches of one: the same answers.
    assert generate(model, [PROMPTS[2]], max_new_tokens=8, seed=3) == [a[2]]
    shuffled = [2, 0, 1, 3]
    assert generate(model, [prompts[i] for i in shuffled], max_new_tokens=8, seed=3) == [a[i] for i in shuffled]
    assert generate(model, prompts, max_new_tokens=8, seed=4) != a


def test_lengths_across_decode_chunks_are_prefixes_of_each_other(pair):
    """The loop decodes DECODE_CHUNK steps per stop test: a run of any length is the same samples, cut."""
    _, model = pair
    longest = generate(model, PROMPTS, max_new_tokens=2 * DECODE_CHUNK + 3, seed=5)
    for length in (1, DECODE_CHUNK - 3, DECODE_CHUNK + 1):
        assert generate(model, PROMPTS, max_new_tokens=length, seed=5) == [row[:length] for row in longest]


def test_sample_logits_matches_the_nucleus_distribution():
    import jax

    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]], np.float32))
    keys = jax.random.split(jax.random.key(0), 4000)
    batch = np.repeat(logits, 4000, axis=0)
    draws = np.asarray(sample_logits(batch, keys, 1.0, 0.7))
    # top_p 0.7 keeps {0.5, 0.3} (0.5 < 0.7 before the second), renormalised to 0.625 / 0.375.
    freq = np.bincount(draws, minlength=4) / len(draws)
    np.testing.assert_allclose(freq, [0.625, 0.375, 0, 0], atol=0.03)
    draws = np.asarray(sample_logits(batch, keys, 2.0, 1.0))
    tempered = np.array([0.5, 0.3, 0.15, 0.05]) ** 0.5
    np.testing.assert_allclose(np.bincount(draws, minlength=4) / len(draws), tempered / tempered.sum(), atol=0.03)
    # The branch chosen at trace time (generate's programs hold no lax.cond) draws the same tokens.
    for temperature, top_p, kind in ((1.0, 0.7, "nucleus"), (2.0, 1.0, "sample"), (0.0, 1.0, "greedy")):
        np.testing.assert_array_equal(
            np.asarray(sample_logits(batch, keys, temperature, top_p, kind=kind)),
            np.asarray(sample_logits(batch, keys, temperature, top_p)),
        )


def test_prompt_keys_depend_on_content_and_occurrence_only():
    keys = prompt_keys([[1, 2], [3], [1, 2]], seed=0)
    assert (keys[0] != keys[2]).any()
    np.testing.assert_array_equal(prompt_keys([[3], [1, 2], [1, 2]], seed=0), keys[[1, 0, 2]])
    assert (prompt_keys([[3]], seed=1)[0] != keys[1]).any()


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    return random_gemma2(tmp_path_factory.mktemp("g"))


def test_adapters_attached_or_merged_generate_the_same(gemma):
    _, path = gemma
    model = emjax.models.load(path, dtype="float32")
    base = generate(model, PROMPTS, max_new_tokens=8, temperature=0.0)
    lora.attach(model, LoRAConfig(rank=4, alpha=8, dropout=0.1))
    for i, (_, adapter) in enumerate(lora.adapters(model)):
        adapter.b.set_value(np.random.RandomState(i).normal(0, 0.3, adapter.b.shape).astype(np.float32))
    attached = generate(model, PROMPTS, max_new_tokens=8, temperature=0.0)
    assert attached != base  # the adapter changes the answers
    assert generate(lora.merge(model), PROMPTS, max_new_tokens=8, temperature=0.0) == attached


def test_eight_devices_equal_one(gemma):
    _, path = gemma
    single = emjax.models.load(path, dtype="float32")
    mesh = distributed.make_mesh(data=4, fsdp=2)
    sharded = emjax.models.load(path, dtype="float32", mesh=mesh)
    prompts = PROMPTS * 2 + [[7, 7], [3]]  # 8 rows: one per device
    for kwargs in (dict(temperature=0.0), dict(seed=1)):
        assert generate(sharded, prompts, max_new_tokens=8, **kwargs) == generate(
            single, prompts, max_new_tokens=8, **kwargs
        )
    # A single-device model given a mesh: weights replicated, batch split.
    greedy = generate(single, prompts, max_new_tokens=8, temperature=0.0)
    assert generate(single, prompts, max_new_tokens=8, temperature=0.0, mesh=mesh) == greedy


def test_bad_input_is_named(gemma):
    _, path = gemma
    model = emjax.models.load(path, dtype="float32")
    with pytest.raises(ValueError, match=r"prompts\[1\] is empty"):
        generate(model, [[1], []], max_new_tokens=2)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, [[1]], max_new_tokens=2, top_p=0)
