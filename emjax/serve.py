"""An OpenAI-compatible /v1/chat/completions endpoint over an emjax model (log-probabilities included).

    python -m emjax.serve --model=/ckpt/gemma-2-9b-it [--adapter=runs/x/train/adapter] [--host=127.0.0.1] [--port=8000]

Requests arriving together are answered in one batched `generate` call (per
sampling setting). Reported log-probabilities are the model's own (before
temperature and top-p), from one forward pass over prompt and answer.
Fields the server cannot honour are refused with HTTP 400 naming the field.
"""

from __future__ import annotations

import argparse
import hashlib
import http.server
import json
import logging
import math
import os
import queue
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from emjax import generate as generation
from emjax import prompts as prompt_policy

_log = logging.getLogger(__name__)

SUPPORTED = {
    "model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "logprobs",
    "top_logprobs", "n", "stream", "user",
}  # fmt: skip
MAX_TOP_LOGPROBS = 20
MAX_BODY = 16 << 20  # bytes of one request body
DEFAULT_CONTEXT = 8192  # tokens, for a model whose config names none


class RequestError(ValueError):
    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def parse_request(body) -> dict:
    """The sampling settings of a chat-completions body; RequestError names any field it cannot honour."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    unsupported = sorted(set(body) - SUPPORTED)
    if unsupported:
        raise RequestError(f"unsupported field(s): {', '.join(unsupported)}", unsupported[0])
    if body.get("n", 1) != 1:
        raise RequestError("n > 1 is not supported: send one request per sample", "n")
    if body.get("stream"):
        raise RequestError("stream=true is not supported", "stream")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list", "messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant"):
            raise RequestError(f"messages[{i}] needs a role of system, user or assistant", "messages")
        if not isinstance(m.get("content"), str):
            raise RequestError(f"messages[{i}].content must be a string (no content parts)", "messages")
    messages = [
        {"role": "system" if m["role"] == "developer" else m["role"], "content": m["content"]} for m in messages
    ]
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens", 256))
    top = body.get("top_logprobs")
    if top is not None and not (isinstance(top, int) and 0 <= top <= MAX_TOP_LOGPROBS):
        raise RequestError(f"top_logprobs must be an integer in 0..{MAX_TOP_LOGPROBS}", "top_logprobs")
    if top and not body.get("logprobs"):
        raise RequestError("top_logprobs needs logprobs=true", "top_logprobs")
    settings = dict(
        messages=messages,
        max_tokens=max_tokens,
        temperature=body.get("temperature", 1.0),
        top_p=body.get("top_p", 1.0),
        seed=body.get("seed", 0) or 0,
        logprobs=bool(body.get("logprobs")),
        top_logprobs=top or 0,
    )
    if not _is_int(max_tokens) or max_tokens < 1:
        raise RequestError(f"max_tokens must be an integer >= 1, got {max_tokens!r}", "max_tokens")
    temperature, top_p = settings["temperature"], settings["top_p"]
    if not _is_number(temperature) or not math.isfinite(temperature) or temperature < 0:
        raise RequestError(f"temperature must be a finite number >= 0, got {temperature!r}", "temperature")
    if not _is_number(top_p) or not 0 < top_p <= 1:
        raise RequestError(f"top_p must be a number in (0, 1], got {top_p!r}", "top_p")
    if not _is_int(settings["seed"]):
        raise RequestError("seed must be an integer", "seed")
    return settings


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class ChatModel:
    """A model, its tokenizer and the prompt policy, answering parsed requests in batches.

    `context`: the most tokens (prompt and answer) one request may take, the model's
    max_position_embeddings (`context_length`); a request past it is refused before any work.
    """

    def __init__(
        self, model, tokenizer, *, name: str, prompt_format: str = "chat", max_batch: int = 16,
        context: int = DEFAULT_CONTEXT,
    ):  # fmt: skip
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.prompt_format, self.max_batch, self.context = prompt_format, max_batch, context
        self.stop_ids = prompt_policy.stop_ids(tokenizer, prompt_format)
        self.fingerprint = "emjax-" + hashlib.sha256(name.encode()).hexdigest()[:10]
        self._forward = None
        self._render_lock = threading.Lock()  # requests are prepared on the server's threads, one tokenizer

    def _token_logprobs(self, prompt: list[int], answer: list[int], top: int) -> list[dict]:
        """Each answer token's log-probability (and the `top` most likely tokens) from one forward pass."""
        import emjax.models

        if self._forward is None:
            self._forward = emjax.models.jit_forward(self.model)
        ids = prompt + answer
        length = generation.bucket(len(ids), generation.MIN_PROMPT_BUCKET)
        tokens = np.zeros((1, length), np.int32)
        tokens[0, : len(ids)] = ids
        logits = self._forward(jnp.asarray(tokens)).logits[0, len(prompt) - 1 : len(ids) - 1]
        logp = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), np.float64)
        out = []
        for t, token in enumerate(answer):
            best = np.argsort(-logp[t], kind="stable")[:top]
            out.append(
                self._entry(token, logp[t, token]) | {"top_logprobs": [self._entry(b, logp[t, b]) for b in best]}
            )
        return out

    def _entry(self, token: int, logprob: float) -> dict:
        text = self.tokenizer.decode([int(token)])
        return {"token": text, "logprob": float(logprob), "bytes": list(text.encode())}

    def prepare(self, request: dict) -> dict:
        """The request with its prompt's tokens; RequestError (a 400) when prompt and answer do not fit the context."""
        with self._render_lock:
            prompt = prompt_policy.render(self.tokenizer, request["messages"], self.prompt_format)
        if len(prompt) >= self.context:
            raise RequestError(
                f"the prompt is {len(prompt)} tokens; this model's context is {self.context} tokens", "messages"
            )
        if len(prompt) + request["max_tokens"] > self.context:
            raise RequestError(
                f"max_tokens={request['max_tokens']} with a prompt of {len(prompt)} tokens passes this model's "
                f"context of {self.context} tokens: ask for at most {self.context - len(prompt)}", "max_tokens",
            )  # fmt: skip
        return request | {"prompt": prompt}

    def answer(self, requests: Sequence[dict]) -> list[dict]:
        """Chat-completion replies for prepared requests that share max_tokens, temperature, top_p and seed."""
        first = requests[0]
        rendered = [r["prompt"] if "prompt" in r else self.prepare(r)["prompt"] for r in requests]
        outputs = generation.generate(
            self.model, rendered, max_new_tokens=int(first["max_tokens"]), temperature=float(first["temperature"]),
            top_p=float(first["top_p"]), seed=int(first["seed"]), stop_ids=self.stop_ids, batch_size=self.max_batch,
        )  # fmt: skip
        replies = []
        for request, prompt, tokens in zip(requests, rendered, outputs):
            stopped = bool(tokens) and tokens[-1] in self.stop_ids
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": prompt_policy.answer_text(self.tokenizer, tokens)},
                "finish_reason": "stop" if stopped else "length",
                "logprobs": None,
            }
            if request["logprobs"]:
                choice["logprobs"] = {"content": self._token_logprobs(prompt, tokens, request["top_logprobs"])}
            replies.append({
                "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": self.name, "system_fingerprint": self.fingerprint, "choices": [choice],
                "usage": {"prompt_tokens": len(prompt), "completion_tokens": len(tokens),
                          "total_tokens": len(prompt) + len(tokens)},
            })  # fmt: skip
        return replies


class Batcher:
    """One worker thread: takes the requests waiting in the queue and answers each sampling setting in one batch."""

    def __init__(self, chat: ChatModel, wait_s: float = 0.01):
        self.chat, self.wait_s = chat, wait_s
        self._queue: queue.Queue = queue.Queue()
        threading.Thread(target=self._run, daemon=True).start()

    def submit(self, request: dict) -> dict:
        done = threading.Event()
        slot: dict = {"request": request, "done": done}
        self._queue.put(slot)
        done.wait()
        if "error" in slot:
            raise slot["error"]
        return slot["reply"]

    def _run(self):
        while True:
            pending = [self._queue.get()]
            time.sleep(self.wait_s)  # let concurrent requests join this batch
            while len(pending) < self.chat.max_batch:
                try:
                    pending.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            groups: dict[tuple, list[dict]] = {}
            for slot in pending:
                r = slot["request"]
                groups.setdefault((r["max_tokens"], r["temperature"], r["top_p"], r["seed"]), []).append(slot)
            for slots in groups.values():
                try:
                    for slot, reply in zip(slots, self.chat.answer([s["request"] for s in slots])):
                        slot["reply"] = reply
                except Exception as e:  # reported to each waiting request, the server keeps running
                    _log.exception("generation failed")
                    for slot in slots:
                        slot["error"] = e
                for slot in slots:
                    slot["done"].set()


def make_server(chat: ChatModel, host: str = "127.0.0.1", port: int = 8000) -> http.server.ThreadingHTTPServer:
    """A threading HTTP server for `chat` (port 0: any free port, see server.server_address)."""
    batcher = Batcher(chat)

    class Handler(http.server.BaseHTTPRequestHandler):
        timeout = 60  # seconds a client may take to send its request (a body shorter than its Content-Length)

        def _send(self, status: int, payload: dict):
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, status: int, message: str, param=None, kind="invalid_request_error"):
            self._send(status, {"error": {"message": message, "type": kind, "param": param, "code": None}})

        def do_GET(self):
            if self.path.rstrip("/") in ("/v1/models", "/models"):
                self._send(200, {"object": "list", "data": [{"id": chat.name, "object": "model", "owned_by": "emjax"}]})
            else:
                self._error(404, f"no route {self.path}; POST /v1/chat/completions")

        def do_POST(self):
            if self.path.rstrip("/") not in ("/v1/chat/completions", "/chat/completions"):
                return self._error(404, f"no route {self.path}; POST /v1/chat/completions")
            length = self.headers.get("Content-Length")
            if length is None or not length.strip().isdigit():
                self.close_connection = True  # the body's end is unknown: nothing more can be read on this connection
                status = 411 if length is None else 400
                return self._error(status, f"Content-Length must be a byte count, got {length!r}")
            if int(length) > MAX_BODY:
                self.close_connection = True
                return self._error(413, f"Content-Length {length}: a body of at most {MAX_BODY} bytes is read")
            try:
                body = json.loads(self.rfile.read(int(length)))
                request = chat.prepare(parse_request(body))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                return self._error(400, f"the body is not JSON ({getattr(e, 'msg', e)})")
            except RequestError as e:
                return self._error(400, str(e), e.param)
            except TimeoutError:
                self.close_connection = True
                return self._error(408, f"the body did not arrive within {self.timeout} s")
            try:
                self._send(200, batcher.submit(request))
            except Exception as e:
                self._error(500, f"generation failed: {type(e).__name__}: {e}", kind="server_error")

        def log_message(self, format, *args):
            _log.debug("%s " + format, self.address_string(), *args)

    return http.server.ThreadingHTTPServer((host, port), Handler)


def config_model(name: str, run_dir: str | None = None) -> Path:
    """The model a config studies: the run's built model when the run has one (a config that builds its
    model from `model.arch`, or converted a GGUF), else the checkpoint the config names."""
    from emjax import config as config_lib

    cfg = config_lib.load_config(name)
    built = Path(run_dir or cfg.resolved_run_dir()) / "build" / "model"
    if (built / "config.json").is_file():
        return built
    if cfg.model.arch is not None:
        raise config_lib.ConfigError(f"config {name!r} builds its model in a run: {built} holds none yet (run build)")
    return config_lib.checkpoint_path(cfg.model)


def model_context(path: str | os.PathLike) -> int:
    """A checkpoint's context length in tokens (max_position_embeddings; DEFAULT_CONTEXT when it names none)."""
    from emjax.models import gguf

    if gguf.is_gguf(path):
        config = gguf.GGUFCheckpoint(path).config
    else:
        config_file = Path(path) / "config.json"
        try:
            config = json.loads(config_file.read_text())
        except (OSError, ValueError) as e:
            from emjax.models.checkpoint import CheckpointError

            raise CheckpointError(f"{config_file}: cannot be read ({e})") from None
    return int(config.get("max_position_embeddings") or DEFAULT_CONTEXT)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m emjax.serve", description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="Hugging Face checkpoint directory (with tokenizer files) or .gguf file")
    source.add_argument(
        "--config", help="a config name or .py file: serve its model (the checkpoint it names, or the model its run "
        "built); one of --model and --config is required",
    )  # fmt: skip
    parser.add_argument("--run_dir", help="with --config: the run directory (default: runs/<config name>)")
    parser.add_argument("--adapter", help="PEFT LoRA adapter directory to attach (default: none)")
    parser.add_argument("--tokenizer", help="tokenizer directory (default: the model's)")
    parser.add_argument("--name", help="model name reported in replies (default: the model's directory name)")
    parser.add_argument(
        "--prompt-format", default="chat", choices=prompt_policy.FORMATS,
        help="chat: the tokenizer's chat template; plain: the messages as text, for base models (default: chat)",
    )  # fmt: skip
    parser.add_argument(
        "--dtype", default=None, choices=("float32", "bfloat16", "float16"),
        help="weights dtype (default: float32 on CPU, bfloat16 on accelerators)",
    )  # fmt: skip
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)"
    )
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    parser.add_argument("--debug", action="store_true", help="print tracebacks of start-up errors, not one line")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import emjax.models
    from emjax import lora

    try:
        if args.config:
            args.model = str(config_model(args.config, args.run_dir))
        model = emjax.models.load(args.model, dtype=args.dtype)
        if args.adapter:
            lora.load_peft(model, args.adapter)
        tokenizer = emjax.models.load_tokenizer(args.tokenizer or args.model)
        context = model_context(args.model)
        name = args.name or (args.model.rstrip("/").split("/")[-1] + (f"+{args.adapter}" if args.adapter else ""))
        chat = ChatModel(model, tokenizer, name=name, prompt_format=args.prompt_format, context=context)
        server = make_server(chat, args.host, args.port)
    except (ValueError, OSError) as e:  # a config, checkpoint or adapter that cannot be used (ConfigError, ...)
        if args.debug:
            raise
        sys.exit(f"error: {e}")  # --debug shows the traceback
    host, port = server.server_address[:2]
    _log.info("serving %s (context %d tokens) on http://%s:%d/v1/chat/completions", name, context, host, port)
    server.serve_forever()


if __name__ == "__main__":
    main()
