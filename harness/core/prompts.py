"""Turning an eval prompt into the token ids every backend generates from, so that backends agree exactly."""

from __future__ import annotations


def render_prompt(tokenizer, prompt: str) -> list[int]:
    """The user turn through the tokenizer's own chat template, or the raw text for a model without one."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(prompt)["input_ids"]
