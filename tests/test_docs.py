"""The documentation site (mkdocs.yml, docs/) builds with --strict and no warning, its field reference is the code's
own (generated as the site builds, so it cannot drift from `harness show`), a broken link or anchor fails the build,
and README's links into docs/ point at files that exist."""

from __future__ import annotations

import html
import os
import re
import shutil
import subprocess
import sys

import pytest
import yaml

from evaluators import EVALUATORS
from harness.paths import REPO_ROOT
from harness.training.experiment import Experiment
from harness.training.overrides import evaluator_option_settings, field_settings


def mkdocs_build(config, site) -> subprocess.CompletedProcess:
    """`mkdocs build --strict` as `make docs` runs it, into `site`; stdout and stderr together."""
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # Material's banner about MkDocs 2.0, not about this site
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config), "-d", str(site)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, env=env,
                          stdin=subprocess.DEVNULL)


def text_of(fragment: str) -> str:
    """What a reader sees of an HTML fragment: tags dropped, entities decoded, white space collapsed."""
    return " ".join(html.unescape(re.sub(r"<[^>]+>", "", fragment)).split())


def section(page: str, anchor: str) -> str:
    """The HTML of the page from the heading with id `anchor` to the next heading of the same level."""
    start = re.search(rf'<h2 id="{anchor}"', page)
    assert start, f"the built page has no section #{anchor}"
    end = re.search(r"<h2 id=", page[start.end():])
    return page[start.start():start.end() + end.start() if end else len(page)]


def table_rows(fragment: str) -> dict[str, list[str]]:
    """The body rows of the tables in `fragment`, by their first cell's text."""
    rows = {}
    for row in re.findall(r"<tr>(.*?)</tr>", fragment, re.S):
        cells = [text_of(c) for c in re.findall(r"<td>(.*?)</td>", row, re.S)]
        if cells:
            rows[cells[0]] = cells
    return rows


def plain(markdown_text: str) -> str:
    """A help text as the page shows it: code spans without their backticks, white space collapsed."""
    return " ".join(markdown_text.replace("`", "").split())


@pytest.fixture(scope="module")
def built_site(tmp_path_factory):
    site = tmp_path_factory.mktemp("site")
    result = mkdocs_build(REPO_ROOT / "mkdocs.yml", site)
    return site, result


@pytest.mark.slow  # mkdocs in a subprocess, whose hook imports the harness and every experiment (about 15 s)
def test_site_builds_strict_without_a_warning(built_site):
    _, result = built_site
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "WARNING" not in output, output


@pytest.mark.slow
def test_field_reference_is_generated_from_the_fields(built_site):
    site, result = built_site
    assert result.returncode == 0, result.stdout + result.stderr
    page = (site / "reference" / "fields" / "index.html").read_text(encoding="utf-8")

    base = table_rows(section(page, "fields-every-experiment-has"))
    settings = field_settings(Experiment)
    assert {s.key for s in settings} == {f for f in base}  # every field, evaluator_options (internal) aside
    for s in settings:
        assert s.help, f"{s.key} has no help"
        assert base[s.key] == [s.key, s.type, s.default, plain(s.help)], f"the page's row for {s.key}"

    own = section(page, "each-experiments-own-fields")
    experiments = sorted(p.stem for p in (REPO_ROOT / "experiments").glob("*.py") if p.stem != "__init__")
    for name in experiments:
        assert f'id="{name}"' in own, f"no section for experiment {name}"
    simpo = table_rows(own.split('id="simpo_qwen"', 1)[1].split("<h3", 1)[0])
    assert simpo["gamma"][2] == "1.375" and "SimPO paper" in simpo["gamma"][3]
    assert simpo["learning_rate"][2] == "5e-06"  # a base field whose default the experiment changes

    options = table_rows(section(page, "evaluator-options"))
    for name in EVALUATORS:
        for s in evaluator_option_settings(name):
            assert options[s.key] == [s.key, s.type, s.default], f"the page's row for {s.key}"
    assert "<!-- generated" not in page and "generated when the site is built (`make docs`)" not in page


@pytest.mark.slow  # a build of the whole site, without the hook: about 3 s
@pytest.mark.parametrize("link", ["[a page that is not there](no-such-page.md)",
                                  "[an anchor that is not there](getting-started.md#no-such-anchor)"])
def test_a_broken_link_fails_the_build(tmp_path, link):
    """The real configuration and pages, plus one broken link, without the hook (its tables are tested above)."""
    docs = tmp_path / "docs"
    shutil.copytree(REPO_ROOT / "docs", docs)
    with (docs / "index.md").open("a", encoding="utf-8") as f:
        f.write(f"\n{link}\n")
    config = yaml.safe_load((REPO_ROOT / "mkdocs.yml").read_text(encoding="utf-8"))
    config.pop("hooks")
    config["docs_dir"] = str(docs)
    (tmp_path / "mkdocs.yml").write_text(yaml.safe_dump(config), encoding="utf-8")
    result = mkdocs_build(tmp_path / "mkdocs.yml", tmp_path / "site")
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    target = re.search(r"\((.*)\)", link).group(1)
    assert re.search(rf"WARNING .*{re.escape(target.split('#')[-1])}", output), output


def test_readme_is_a_landing_page_whose_links_resolve():
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 250, "README is the landing page; the rest belongs in docs/"
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", readme)
    assert "docs/images/mlflow-runs.png" in targets and "docs/reference/fields.md" in targets
    missing = [t for t in targets if not t.startswith("http") and not (REPO_ROOT / t).exists()]
    assert not missing, f"README links to files that do not exist: {missing}"
    rules = re.findall(r"^([a-z][a-z-]*):", (REPO_ROOT / "Makefile").read_text(encoding="utf-8"), re.MULTILINE)
    unlisted = [r for r in rules if f"`make {r}" not in readme]
    assert not unlisted, f"README's make targets lack {unlisted}"
