"""HF `generate` and a forward pass on the live model itself: the baseline the vLLM engine is compared against."""

from __future__ import annotations

import contextlib

import torch

from harness.core.generation import Completion, GenParams, truncate_at_stop


class HFBackend:
    """HF `generate` and a forward pass on the live model itself: the baseline vLLM is compared against."""

    name = "hf"

    def __init__(self, tokenizer, batch_size: int = 32):
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.model: torch.nn.Module | None = None

    def sync_weights(self, model: torch.nn.Module) -> None:
        self.model = model  # it reads the live model; nothing to copy

    @contextlib.contextmanager
    def _eval_mode(self):
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            self.model.train(was_training)

    def _padded(self, rows: list[list[int]], left: bool) -> tuple[torch.Tensor, torch.Tensor]:
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            sl = slice(width - len(r), width) if left else slice(0, len(r))
            ids[i, sl], mask[i, sl] = torch.tensor(r), 1
        return ids.to(self.model.device), mask.to(self.model.device)

    def generate(self, prompt_ids: list[list[int]], params: GenParams) -> list[Completion]:
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        results = []
        with self._eval_mode():
            for start in range(0, len(prompt_ids), self.batch_size):
                batch = prompt_ids[start : start + self.batch_size]
                ids, mask = self._padded(batch, left=True)
                sampling = params.temperature > 0
                if sampling:
                    torch.manual_seed(params.seed)
                out = self.model.generate(
                    input_ids=ids, attention_mask=mask, max_new_tokens=params.max_new_tokens,
                    do_sample=sampling, temperature=params.temperature if sampling else None,
                    top_p=params.top_p if sampling else None, top_k=None, num_return_sequences=params.n,
                    eos_token_id=eos, pad_token_id=self.tokenizer.pad_token_id,
                )
                new = out[:, ids.shape[1] :].tolist()
                for i in range(len(batch)):
                    outs = [_until_eos(t, eos) for t in new[i * params.n : (i + 1) * params.n]]
                    texts = [truncate_at_stop(_decode(self.tokenizer, t, eos), params.stop) for t in outs]
                    results.append(Completion(texts, sum(len(t) for t in outs)))
        return results

    def logprobs(self, prompt_ids: list[list[int]], continuation_ids: list[list[int]]) -> list[list[float]]:
        result = []
        with self._eval_mode():
            for start in range(0, len(prompt_ids), self.batch_size):
                ps = prompt_ids[start : start + self.batch_size]
                cs = continuation_ids[start : start + self.batch_size]
                ids, mask = self._padded([p + c for p, c in zip(ps, cs, strict=True)], left=False)
                logp = torch.log_softmax(self.model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
                for i, (p, c) in enumerate(zip(ps, cs, strict=True)):
                    positions = torch.arange(len(p) - 1, len(p) + len(c) - 1)
                    result.append(logp[i, positions, torch.tensor(c)].tolist())
        return result


def _decode(tokenizer, tokens: list[int], eos: int | list[int]) -> str:
    """The output's text as vLLM returns it: an output cut by the token limit in the middle of a character (a
    multi-byte character split across byte-level tokens, common in Chinese) decodes to a trailing U+FFFD, which
    vLLM's incremental detokenizer holds back and never emits; so it is dropped here too."""
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    stops = set(eos) if isinstance(eos, list) else {eos}
    return text if tokens and tokens[-1] in stops else text.rstrip("\ufffd")


def _until_eos(tokens: list[int], eos: int | list[int]) -> list[int]:
    stops = set(eos) if isinstance(eos, list) else {eos}
    for i, t in enumerate(tokens):
        if t in stops:
            return tokens[: i + 1]  # count the stop token as generated, as vLLM does
    return tokens
