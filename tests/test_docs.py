"""The manual's links: every relative link in README.md, docs/*.md and the notebooks' text points to a
file that exists and, with `#anchor`, to a heading of it (GitHub's anchor rule); the README stays a
front page (at most 200 lines)."""

import json
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def github_anchor(heading: str) -> str:
  """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
  text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
  return text.replace(" ", "-")


def anchors_of(path: pathlib.Path) -> set[str]:
  seen, out, in_code = {}, set(), False
  for line in path.read_text().splitlines():
    if line.startswith("```"):
      in_code = not in_code
    if in_code or not line.startswith("#"):
      continue
    anchor = github_anchor(line.lstrip("#"))
    n = seen.get(anchor, 0)
    seen[anchor] = n + 1
    out.add(anchor if n == 0 else f"{anchor}-{n}")
  return out


def markdown_sources():
  """`(file, text)` of every Markdown text: README, docs/, the notebooks' markdown cells."""
  yield ROOT / "README.md", (ROOT / "README.md").read_text()
  for path in sorted((ROOT / "docs").glob("*.md")):
    yield path, path.read_text()
  for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
    cells = json.loads(path.read_text())["cells"]
    yield path, "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")


def test_github_anchor_rule():
  assert github_anchor(" SAR images: the SARDet-100K recipe") == "sar-images-the-sardet-100k-recipe"
  assert github_anchor("Anchors (`anchors.py`)") == "anchors-anchorspy"
  assert github_anchor("COCO AP, maxDets and AP per category") == "coco-ap-maxdets-and-ap-per-category"


@pytest.mark.parametrize("source", [p for p, _ in markdown_sources()],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(source):
  text = dict(markdown_sources())[source]
  broken = []
  for target in LINK.findall(text):
    if re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
      continue
    path, _, anchor = target.partition("#")
    file = (source.parent / path).resolve() if path else source
    if not file.exists():
      broken.append(f"{target}: no file {file}")
    elif anchor and file.suffix == ".md" and anchor not in anchors_of(file):
      broken.append(f"{target}: no heading with anchor #{anchor} in {file.relative_to(ROOT)}")
  assert not broken, f"{source.relative_to(ROOT)}:\n" + "\n".join(broken)


def test_readme_is_a_front_page():
  lines = (ROOT / "README.md").read_text().splitlines()
  assert len(lines) <= 200, f"README.md has {len(lines)} lines; the manual belongs in docs/"
  for page in ("training", "datasets", "evaluation", "dense_scenes", "deploy", "failures",
               "configs", "design", "inference"):
    assert f"docs/{page}.md" in "\n".join(lines), page
