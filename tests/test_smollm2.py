"""Real chat behaviour on SmolLM2-135M-Instruct (skipped without its GGUF: python -m emjax.models.smollm2 fetch)."""

import pytest

import emjax.models
from emjax import generate, prompts
from emjax.models import smollm2

pytestmark = [pytest.mark.skipif(not smollm2.available(), reason="SmolLM2 GGUF not fetched"), pytest.mark.slow]


@pytest.fixture(scope="module")
def tokenizer():
    return emjax.models.load_tokenizer(smollm2.gguf_path())


def test_chatml_renders_as_the_template_writes_it(tokenizer):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]
    ids = prompts.render(tokenizer, messages)
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids.count(tokenizer.bos_token_id) == 3  # <|im_start|> opens each of the three turns
    assert prompts.stop_ids(tokenizer) == (tokenizer.convert_tokens_to_ids("<|im_end|>"),)


def test_greedy_answers_stop_at_the_end_of_the_turn(tokenizer):
    model = emjax.models.load(smollm2.gguf_path(), dtype="float32")
    questions = ["What is the capital of France?", "Say hello."]
    rendered = [prompts.render(tokenizer, [{"role": "user", "content": q}]) for q in questions]
    stop = prompts.stop_ids(tokenizer)
    answers = generate.generate(model, rendered, max_new_tokens=48, temperature=0.0, stop_ids=stop)
    assert all(a and a[-1] in stop for a in answers), [tokenizer.decode(a) for a in answers]
    assert "Paris" in tokenizer.decode(answers[0])
