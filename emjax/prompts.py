"""How a question becomes prompt tokens, and a model's output an answer: one explicit policy per run.

Formats (recorded with every answer as `prompt_format`):
- "chat": the tokenizer's chat template with a generation prompt. A template
  that refuses the system role (Gemma-2's raises) gets the system prompt folded
  into the first user turn, "{system}\\n\\n{user}".
- "plain": for base models, which never saw a chat template: the system prompt
  (if any) and the user text as paragraphs, then a blank line.
Every rendering starts with exactly one BOS when the model uses one (see `uses_bos`), never more.
gpt-oss's chat template is Harmony; `answer_text` keeps only its final channel.
"""

from __future__ import annotations

from collections.abc import Sequence

FORMATS = ("chat", "plain")
# End-of-turn markers (Gemma, Llama-3, ChatML, Harmony), used as stop ids when present. Harmony's <|end|>
# only closes a message (the analysis channel comes first), so its answers end at <|return|> or <|call|>.
END_OF_TURN = ("<end_of_turn>", "<|eot_id|>", "<|im_end|>", "<|return|>", "<|call|>")
HARMONY_FINAL = "<|channel|>final<|message|>"


def messages_for(question: str, system: str | None = None) -> list[dict[str, str]]:
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]


def _fold_system(messages: Sequence[dict]) -> list[dict]:
    system = [m["content"] for m in messages if m["role"] == "system"]
    rest = [dict(m) for m in messages if m["role"] != "system"]
    if system and rest and rest[0]["role"] == "user":
        rest[0]["content"] = "\n\n".join(system) + "\n\n" + rest[0]["content"]
    return rest


def render_text(tokenizer, messages: Sequence[dict], fmt: str = "chat") -> str:
    """The prompt text (special tokens written out) for `messages`, ending where the answer starts."""
    if fmt == "plain":
        return "\n\n".join(m["content"] for m in _fold_system(messages)) + "\n\n"
    if fmt != "chat":
        raise ValueError(f"prompt format {fmt!r} is not one of {FORMATS}")
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template: use prompt format 'plain' for a base model")
    try:
        return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    except Exception as e:  # jinja raise_exception: e.g. Gemma-2's "System role not supported"
        if not any(m["role"] == "system" for m in messages):
            raise ValueError(f"the chat template cannot render these messages ({e})") from None
        return tokenizer.apply_chat_template(_fold_system(messages), tokenize=False, add_generation_prompt=True)


def uses_bos(tokenizer) -> bool:
    """Whether the model expects a BOS: its tokenizer adds one, or its chat template writes one.

    gpt-oss defines a BOS token but neither adds nor templates it: its prompts start without one.
    """
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    return tokenizer("a")["input_ids"][:1] == [bos] or "bos_token" in (getattr(tokenizer, "chat_template", "") or "")


def bos_marks_turns(tokenizer) -> bool:
    """ChatML models (SmolLM2, Qwen) name their turn opener <|im_start|> as the BOS token: the template
    writes it at every turn, and the rendering is kept as the template wrote it."""
    template = getattr(tokenizer, "chat_template", "") or ""
    return bool(tokenizer.bos_token) and tokenizer.bos_token in template


def render(tokenizer, messages: Sequence[dict], fmt: str = "chat", answer_prefix: str = "") -> list[int]:
    """Prompt token ids, starting with exactly one BOS when the model uses one (and holding no other).

    answer_prefix: text that opens the answer, tokenized together with the prompt as the model would read it.
    """
    text = render_text(tokenizer, messages, fmt) + answer_prefix
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    bos = tokenizer.bos_token_id
    if bos is None or (fmt == "chat" and bos_marks_turns(tokenizer)):
        return ids
    while ids and ids[0] == bos:  # a template that writes BOS, plus a tokenizer that adds one
        ids = ids[1:]
    if bos in ids:
        raise ValueError(f"the rendered prompt holds a BOS token ({bos}) after its start: {ids[:40]}...")
    return [bos] + ids if uses_bos(tokenizer) else ids


def stop_ids(tokenizer, fmt: str = "chat") -> tuple[int, ...]:
    """EOS plus the family's end-of-turn token (chat format): where an answer ends."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    if fmt == "chat":
        vocab = tokenizer.get_vocab()
        ids |= {vocab[t] for t in END_OF_TURN if t in vocab}
    return tuple(sorted(ids))


def answer_text(tokenizer, tokens: Sequence[int]) -> str:
    """The answer as text: special tokens dropped; for Harmony output, only the final channel."""
    raw = tokenizer.decode(list(tokens), skip_special_tokens=False)
    if "<|channel|>" in raw:
        if HARMONY_FINAL not in raw:
            return ""  # the model never reached its final answer (analysis only, or cut off)
        raw = raw.split(HARMONY_FINAL, 1)[1]
        for end in ("<|return|>", "<|end|>", "<|call|>"):
            raw = raw.split(end, 1)[0]
        return raw.strip()
    special = set(tokenizer.all_special_ids)
    return tokenizer.decode([t for t in tokens if t not in special]).strip()
