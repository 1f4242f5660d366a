"""Turning an eval prompt into the token ids every backend generates from, so that backends agree exactly; and the
chat templates a run can give a model that has none (the `chat_template` field)."""

from __future__ import annotations

from pathlib import Path

from harness.core.errors import ConfigError
from harness.core.records import EvalSample
from harness.paths import REPO_ROOT

# Named templates shipped with the harness: `chat_template=chatml` is chat_templates/chatml.jinja.
CHAT_TEMPLATE_DIR = Path(__file__).parent / "chat_templates"


def named_chat_templates() -> list[str]:
    return sorted(p.stem for p in CHAT_TEMPLATE_DIR.glob("*.jinja"))


def read_chat_template(value: str) -> str:
    """The Jinja text of `chat_template=value`: a named template (chatml) or a Jinja file (relative paths are
    looked up in the working directory, then under the repository root, like data files). A name that is neither,
    a file that is not UTF-8, or a template that does not parse raises ConfigError naming the field."""
    where = f"field 'chat_template' = {value!r}"
    if value in named_chat_templates():
        path = CHAT_TEMPLATE_DIR / f"{value}.jinja"
    else:
        path = next((p for p in (Path(value), REPO_ROOT / value) if p.is_file()), None)
        if path is None:
            raise ConfigError(f"{where}: expected a named template ({', '.join(named_chat_templates())}) or a Jinja "
                              f"file (looked in {Path.cwd()} and {REPO_ROOT})")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{where}: cannot read {path}: {e}") from None
    import jinja2

    try:  # the syntax transformers compiles chat templates with
        jinja2.Environment(extensions=["jinja2.ext.loopcontrols"]).parse(text)
    except jinja2.TemplateSyntaxError as e:
        raise ConfigError(f"{where}: {path}: line {e.lineno}: {e.message}") from None
    return text


def render_prompt(tokenizer, prompt: str, system: str = "") -> list[int]:
    """The user turn, after a `system` message when one is given, through the tokenizer's own chat template; for a
    model without one, the raw text (with the system message and a blank line before it). A template that refuses a
    system message raises ConfigError naming the `system_prompt` field."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": prompt})
        from jinja2 import TemplateError

        try:
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except TemplateError as e:  # e.g. the template's own raise_exception("System role not supported")
            if not system:
                raise
            raise ConfigError(f"field 'system_prompt': the model's chat template refused a system message ({e}); "
                              f"leave system_prompt empty, or give the model another template (chat_template=)") from e
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(f"{system}\n\n{prompt}" if system else prompt)["input_ids"]


def render_sample(tokenizer, sample: EvalSample, system: str = "") -> list[int]:
    """An eval sample's prompt token ids: its whole conversation when it has one (render_conversation), else its
    prompt alone (render_prompt)."""
    if sample.messages is None:
        return render_prompt(tokenizer, sample.prompt, system)
    return render_conversation(tokenizer, list(sample.messages), system)


def render_conversation(tokenizer, messages: list[dict], system: str = "") -> list[int]:
    """A conversation ending with a user turn, through the tokenizer's chat template with the generation prompt; a
    `system` message first unless the conversation has its own. Raises ConfigError when the model has no chat
    template (a conversation has no raw-text form) or the template refuses the conversation."""
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError("a whole-conversation eval record needs a chat template and the model has none: give it "
                          "one (chat_template=chatml)")
    if system and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system}, *messages]
    from jinja2 import TemplateError

    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except TemplateError as e:  # e.g. a template that refuses a system turn or turns out of order
        raise ConfigError(f"the model's chat template refused the conversation ({e})") from e
    return tokenizer(text, add_special_tokens=False)["input_ids"]
