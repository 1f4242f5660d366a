"""MkDocs hook (mkdocs.yml `hooks:`): completes the field reference at build time from the code itself.

`docs/reference/fields.md` holds markers that are replaced, as the page is built, by tables made with the functions
`harness show` prints its own from (`field_settings` and `evaluator_option_settings` in
harness/training/overrides.py): every field of the Experiment base class with its type, default and help, the
fields each experiment adds or whose default it changes, and every evaluator's options. The tables are never
committed, so the page cannot drift from the code. The line that holds a marker (a note for whoever reads the
unbuilt page, on GitHub say) is replaced whole; a marker missing from the page fails the build.
"""

from __future__ import annotations

import html
import pkgutil
import re
import sys
from pathlib import Path

from mkdocs.exceptions import PluginError

REPO_ROOT = Path(__file__).resolve().parent.parent
FIELDS_PAGE = "reference/fields.md"
# the page of the docs that explains an evaluator at length, relative to the fields page
EVALUATOR_PAGES = {
    "perplexity": "evaluators.md",
    "bleu": "evaluators.md",
    "rouge": "evaluators.md",
    "answer": "evaluators.md#answer",
    "humaneval": "../evaluators/humaneval.md",
    "judge": "../evaluators/judge.md",
    "reward_accuracy": "../guides/methods.md",
    "choice": "../evaluators/choice.md",
    "ifeval": "../evaluators/ifeval.md",
    "mtbench": "../evaluators/mtbench.md",
}


def _harness():
    """The harness's modules, imported on first use (they import torch: about 2 s, the experiments 10 s more)."""
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    import evaluators
    import experiments
    from harness.training import overrides
    from harness.training.experiment import Experiment

    return evaluators, experiments, overrides, Experiment


def cell(text: str) -> str:
    """`text` as one Markdown table cell: code spans kept (a `|` inside one does not split the cell), everything else
    HTML-escaped (`<evaluator>` is text, not a tag) with Markdown's emphasis, link and cell characters escaped."""
    parts = re.split(r"(`[^`]*`)", text)
    return "".join(part if i % 2 else re.sub(r"([\\*_\[\]|])", r"\\\1", html.escape(part, quote=False))
                   for i, part in enumerate(parts))


def code(value: str) -> str:
    """A value as a code span (one that holds a backtick gets a longer fence)."""
    return f"`` {value} ``" if "`" in value else f"`{value}`"


def settings_table(settings, with_help: bool = True) -> str:
    header = "| field | type | default | help |\n| --- | --- | --- | --- |" if with_help else \
             "| option | type | default |\n| --- | --- | --- |"
    rows = [f"| {code(s.key)} | {code(s.type)} | {code(s.default)} |" + (f" {cell(s.help)} |" if with_help else "")
            for s in settings]
    return "\n".join([header, *rows])


def base_fields() -> str:
    _, _, overrides, experiment = _harness()
    return settings_table(overrides.field_settings(experiment))


def experiment_fields() -> str:
    """Per experiment of the repository (not HARNESS_EXPERIMENTS_PATH's): the fields it adds, and the base fields
    whose default or help it changes."""
    _, experiments, overrides, experiment = _harness()
    base = {s.key: s for s in overrides.field_settings(experiment)}
    names = sorted(m.name for m in pkgutil.iter_modules([str(REPO_ROOT / "experiments")]))
    blocks = []
    for name in names:
        cls = experiments.load_class(name)
        own = [s for s in overrides.field_settings(cls) if base.get(s.key) != s]
        text = f"### `{name}`\n\n{cell(cls.description())}\n\n"
        text += settings_table(own) if own else "Only the base fields, at their defaults."
        blocks.append(text)
    return "\n\n".join(blocks)


def evaluator_options() -> str:
    evaluators, _, overrides, _ = _harness()
    blocks = []
    for name, cls in evaluators.EVALUATORS.items():
        diagnostics = tuple(getattr(cls, "diagnostic_metrics", ()))
        metrics = ", ".join(code(m) for m in cls.metrics if m not in diagnostics)
        diagnostic = ", ".join(code(m) for m in diagnostics)
        text = f"### `{name}`\n\nMetrics `eval/{name}/<metric>`: {metrics}"
        text += f"; diagnostics (never a `select_metric`): {diagnostic}" if diagnostic else ""
        text += f". [More about it]({EVALUATOR_PAGES[name]}).\n\n" if name in EVALUATOR_PAGES else ".\n\n"
        settings = overrides.evaluator_option_settings(name)
        text += settings_table(settings, with_help=False) if settings else "No options."
        blocks.append(text)
    return "\n\n".join(blocks)


MARKERS = {
    "<!-- generated: base fields -->": base_fields,
    "<!-- generated: experiment fields -->": experiment_fields,
    "<!-- generated: evaluator options -->": evaluator_options,
}


def on_page_markdown(markdown: str, page, config, files) -> str:
    """The fields page with each marker's line (a note for readers of the unbuilt page) replaced by its table."""
    if page.file.src_uri != FIELDS_PAGE:
        return markdown
    for marker, make in MARKERS.items():
        line = re.compile(rf"^.*{re.escape(marker)}.*$", re.MULTILINE)
        if len(line.findall(markdown)) != 1:
            raise PluginError(f"docs/hooks.py: {FIELDS_PAGE} must hold the marker {marker} exactly once")
        start, end = line.search(markdown).span()
        markdown = markdown[:start] + make() + markdown[end:]
    return markdown
