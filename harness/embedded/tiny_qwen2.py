"""The embedded models: a Qwen2 causal LM the project trains itself, from nothing, in the stages of real
post-training, so that every method has something left to do.

- `tiny-qwen2-base`: a tokenizer and a pretraining run on `data/pretrain.txt` (facts as prose, answered tasks as
  plain-text paragraphs, the training code tasks as one-line Python). Like a base model it has no chat template:
  eval prompts reach it as raw text, and it runs on into the next question.
- `tiny-qwen2` (the instruct checkpoint, every experiment's default start but SFT's and pretraining's): the base
  after a short SFT stage on `data/sft.jsonl` in which, as in scraped instruction data, some replies run on into
  another question and its answer. It answers in the chat format, often wrongly, and often does not stop where its
  answer ends: the characteristic mistakes `data/preference.jsonl` pairs (its own answers, rejected) with the right
  ones, and that preference and RL methods can train away.
- `tiny-qwen2-teacher`: the instruct checkpoint after a longer SFT stage on the clean data, the distillation teacher.

Built together on first use and cached outside git under a key derived from the spec, the data and this file, so a
change to any of them builds new models instead of silently reusing stale ones. Deterministic for a seed on a given
machine.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import random
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from harness.paths import DATA_DIR, cache_dir

TINY_QWEN2 = "tiny-qwen2"
STAGES = ("base", "instruct", "teacher")  # the build's order; each a directory of the built model
PAD, BOS_TURN, EOS_TURN = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@dataclass(frozen=True)
class TinyModelSpec:
    """Architecture and build schedule. head_dim = hidden_size / heads must be >= 32 for vLLM's CPU attention."""

    hidden_size: int = 256
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    intermediate_size: int = 768
    vocab_size: int = 2048
    max_positions: int = 256
    seq_len: int = 64
    batch_size: int = 32
    pretrain_steps: int = 260
    sft_steps: int = 60  # the instruct checkpoint's SFT stage: short, so that post-training has mistakes to fix
    run_on: float = 0.8  # share of the instruct stage's replies that run on, after a newline, into another answered
    # question: well over half, so that greedy decoding runs on too, on every build (at 0.6 one build ran on for 19%
    # of the eval prompts, the next for 5%)
    teacher_sft_steps: int = 160  # the teacher: the instruct checkpoint trained on for this many more steps
    learning_rate: float = 2e-3
    seed: int = 0


def _fingerprint(spec: TinyModelSpec) -> str:
    h = hashlib.sha256(json.dumps(asdict(spec), sort_keys=True).encode())
    for path in (Path(__file__), DATA_DIR / "pretrain.txt", DATA_DIR / "sft.jsonl"):
        h.update(path.read_bytes())
    return h.hexdigest()[:12]


def ensure_tiny_model(spec: TinyModelSpec = TinyModelSpec(), stage: str = "instruct",
                      log: Callable[[str], None] = print) -> Path:
    """Return the directory of one stage's model (base, instruct or teacher), building all three first if this
    spec/data has not been built."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}: one of {', '.join(STAGES)}")
    target = cache_dir() / "models" / f"{TINY_QWEN2}-{_fingerprint(spec)}"
    if (target / stage / "config.json").exists():
        return target / stage
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # concurrent first uses (sweep workers) build it once
        if (target / stage / "config.json").exists():
            return target / stage
        staging = target.with_name(target.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        build_tiny_model(spec, staging, log)
        staging.rename(target)  # atomic: a killed build never leaves a directory that looks complete
    log(f"[model] {TINY_QWEN2} base, instruct and teacher ready in {target}")
    return target / stage


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    # Digits one by one: arithmetic is learnable only when numbers share their digit tokens.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[PAD, BOS_TURN, EOS_TURN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS_TURN, pad_token=PAD, bos_token=None, unk_token=None,
        model_max_length=1024, padding_side="left",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _pretrain_batches(ids: list[int], spec: TinyModelSpec, rng: random.Random) -> Iterator[torch.Tensor]:
    n = len(ids) - spec.seq_len - 1
    while True:
        starts = [rng.randrange(n) for _ in range(spec.batch_size)]
        yield torch.tensor([ids[s : s + spec.seq_len] for s in starts])


def _sft_examples(tokenizer: PreTrainedTokenizerFast, run_on: float = 0.0,
                  rng: random.Random | None = None) -> list[tuple[list[int], list[int]]]:
    """The SFT data as (ids, labels); with `run_on` > 0, that share of the replies go on, on a new line, into another
    example's question and answer, the way replies in scraped instruction data run on."""
    conversations = [json.loads(line)["messages"]
                     for line in (DATA_DIR / "sft.jsonl").read_text(encoding="utf-8").splitlines()]
    examples = []
    for messages in conversations:
        if run_on and rng.random() < run_on:
            other = rng.choice(conversations)
            reply = f"{messages[-1]['content']}\n{other[0]['content']} {other[-1]['content']}"
            messages = [*messages[:-1], {"role": "assistant", "content": reply}]
        prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        f_ids = tokenizer(full, add_special_tokens=False)["input_ids"]
        labels = [-100] * len(p_ids) + f_ids[len(p_ids) :]  # loss on the assistant turn only
        examples.append((f_ids, labels))
    return examples


def _sft_batches(examples: list, spec: TinyModelSpec, pad_id: int, rng: random.Random) -> Iterator[tuple]:
    while True:
        batch = rng.sample(examples, spec.batch_size)
        width = max(len(ids) for ids, _ in batch)
        ids = torch.full((len(batch), width), pad_id)
        labels = torch.full((len(batch), width), -100)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, (x, y) in enumerate(batch):
            ids[i, : len(x)], labels[i, : len(y)], mask[i, : len(x)] = torch.tensor(x), torch.tensor(y), 1
        yield ids, labels, mask


def _train(model, batches: Iterator, steps: int, spec: TinyModelSpec, phase: str, log) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=spec.learning_rate, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=spec.learning_rate, total_steps=steps, pct_start=0.1)
    model.train()
    start, loss = time.time(), float("nan")
    for step in range(1, steps + 1):
        batch = next(batches)
        if isinstance(batch, tuple):
            ids, labels, mask = batch
            out = model(input_ids=ids, attention_mask=mask, labels=labels)
        else:
            out = model(input_ids=batch, labels=batch)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        loss = out.loss.item()
        if step % 25 == 0 or step == steps:
            log(f"[model] {phase} step {step}/{steps} loss {loss:.3f} ({time.time() - start:.0f}s)")
    return loss


def _save(model, tokenizer, spec: TinyModelSpec, out_dir: Path, stage: str) -> None:
    model.eval()
    out_dir.mkdir(parents=True)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    template = tokenizer.chat_template
    if stage == "base":  # the SFT stage brings the chat format
        tokenizer.chat_template = None
    tokenizer.save_pretrained(out_dir)
    tokenizer.chat_template = template
    (out_dir / "build.json").write_text(json.dumps({"stage": stage, "spec": asdict(spec)}, indent=2))
    model.train()


def build_tiny_model(spec: TinyModelSpec, out_dir: Path, log: Callable[[str], None] = print) -> None:
    """Write the base, instruct and teacher models into `out_dir`/base, /instruct and /teacher."""
    log(f"[model] building {TINY_QWEN2} base, instruct and teacher (one-time, about 3 minutes on 2 CPU cores) -> "
        f"{out_dir}")
    random.seed(spec.seed)
    torch.manual_seed(spec.seed)
    rng = random.Random(spec.seed)
    text = (DATA_DIR / "pretrain.txt").read_text(encoding="utf-8")
    lines = text.splitlines()
    tokenizer = train_tokenizer(lines, spec.vocab_size)
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=spec.hidden_size, num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads,
        intermediate_size=spec.intermediate_size, max_position_embeddings=spec.max_positions,
        tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None, rope_theta=10000.0, torch_dtype="float32",
    )
    model = Qwen2ForCausalLM(config)
    log(f"[model] {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, vocab {len(tokenizer)}")
    doc_sep = tokenizer.pad_token_id
    ids = []
    for line in lines:
        ids += tokenizer(line, add_special_tokens=False)["input_ids"] + [doc_sep]
    _train(model, _pretrain_batches(ids, spec, rng), spec.pretrain_steps, spec, "pretrain", log)
    _save(model, tokenizer, spec, out_dir / "base", "base")
    noisy = _sft_batches(_sft_examples(tokenizer, spec.run_on, rng), spec, tokenizer.pad_token_id, rng)
    _train(model, noisy, spec.sft_steps, spec, "sft (instruct)", log)
    _save(model, tokenizer, spec, out_dir / "instruct", "instruct")
    clean = _sft_batches(_sft_examples(tokenizer), spec, tokenizer.pad_token_id, rng)
    _train(model, clean, spec.teacher_sft_steps, spec, "sft (teacher)", log)
    _save(model, tokenizer, spec, out_dir / "teacher", "teacher")
