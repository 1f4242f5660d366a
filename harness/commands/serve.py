"""`python -m harness serve REF`: vLLM's OpenAI-compatible server on 127.0.0.1 for a run's best checkpoint, a
model directory or a model name (a LoRA adapter is served as an adapter on its base model); and `python -m harness
chat REF`: a terminal chat with it through the model's own chat template, on the in-process engine.

The server is the judge server's (evaluators/judge_server.py), so a served run can be the judge of another run:
`judge_base_url=http://127.0.0.1:PORT/v1 judge_model=NAME`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from harness.commands.model_ref import ModelRef, open_engine, resolve_ref, vllm_lora_rank
from harness.core.generation import GenParams
from harness.core.models import load_tokenizer
from harness.core.prompts import render_conversation

if TYPE_CHECKING:
    from evaluators.judge_server import LocalJudgeServer
    from harness.engines.vllm_engine import VLLMBackend

EXIT = "/exit"


def start_server(ref: str, port: int | None = None, name: str = "",
                 max_model_len: int | None = None) -> tuple[LocalJudgeServer, str]:
    """(the started server, the model name to ask it for): `name`, by default `ref` as given. An adapter is served
    under that name on its base model, which the server also answers to under the base's path. Chats are rendered
    by the checkpoint's own tokenizer and chat template (for an adapter, the one its run saved, also for the base's
    name: vLLM has one tokenizer per server)."""
    from evaluators.judge_server import LocalJudgeServer

    model = resolve_ref(ref)
    name = name or ref
    if model.adapter:
        server = LocalJudgeServer(model.base, port, max_model_len, lora_modules={name: model.adapter},
                                  max_lora_rank=vllm_lora_rank(model.adapter_rank), tokenizer=model.tokenizer_dir)
    else:
        server = LocalJudgeServer(model.base, port, max_model_len, served_name=name)
    return server, name


def context_length(model: ModelRef) -> int:
    """The model's own context, at most 2048 tokens (as the judge server sizes it)."""
    from transformers import AutoConfig

    return min(2048, getattr(AutoConfig.from_pretrained(model.base), "max_position_embeddings", 2048))


def chat(engine: VLLMBackend, tokenizer, lines: Iterable[str], write: Callable[[str], None], max_model_len: int,
         max_new_tokens: int = 128, temperature: float = 0.0, seed: int = 0, system: str = "") -> list[dict]:
    """One conversation: each line of `lines` is a user turn, answered with the whole conversation so far rendered
    by the chat template; `/exit` (or the end of the input) ends it. The oldest turns are dropped when the
    conversation outgrows the context. Returns the messages (without the system message)."""
    messages: list[dict] = []
    for line in lines:
        text = line.strip()
        if text == EXIT:
            break
        if not text:
            continue
        messages.append({"role": "user", "content": text})
        ids = render_conversation(tokenizer, messages, system)
        while len(ids) + max_new_tokens > max_model_len and len(messages) > 1:
            del messages[:2]  # the oldest exchange: a user turn and its reply
            ids = render_conversation(tokenizer, messages, system)
        if len(ids) + max_new_tokens > max_model_len:
            messages.pop()
            write(f"[chat] that message is {len(ids)} tokens: with {max_new_tokens} for the reply it exceeds the "
                  f"context of {max_model_len}; not sent\n")
            continue
        params = GenParams(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
        reply = engine.generate([ids], params)[0].texts[0].strip()
        messages.append({"role": "assistant", "content": reply})
        write(reply + "\n")
    return messages


def run_chat(ref: str, max_new_tokens: int = 128, temperature: float = 0.0, seed: int = 0, system: str = "",
             engine: VLLMBackend | None = None) -> list[dict]:
    """`python -m harness chat REF`: reads stdin line by line (a pipe works too), answers on stdout; returns the
    messages. `engine`: an open engine for REF's model to reuse (left open; its context is taken as the model's)."""
    model = resolve_ref(ref)
    tokenizer = load_tokenizer(model.tokenizer_dir)
    own_engine = engine is None
    if own_engine:
        length = context_length(model)
        engine = open_engine(model, [], max_new_tokens, seed, max_model_len=length)
    else:
        length = engine.llm.llm_engine.model_config.max_model_len
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"chat with {ref} ({model.adapter or model.base}); {EXIT} or Ctrl-D ends it", flush=True)

    def lines() -> Iterable[str]:
        while True:
            if interactive:
                print("> ", end="", flush=True)
            line = sys.stdin.readline()
            if not line:
                return
            yield line

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    try:
        return chat(engine, tokenizer, lines(), write, length, max_new_tokens, temperature, seed, system)
    finally:
        if own_engine:
            engine.close()
