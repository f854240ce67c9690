"""Every relative link in the README and docs/ points at a file that exists and, for a Markdown file, at a
heading it has (GitHub's anchors): a moved section or renamed file breaks this test, not a reader's click."""

import functools
import re

from helpers import REPO

FENCED = re.compile(r"^```.*?^```", flags=re.S | re.M)


def github_anchor(heading: str) -> str:
  """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
  text = re.sub(r"[`*]", "", heading.strip().lower())
  return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


@functools.cache  # a file is linked many times
def anchors(path) -> frozenset[str]:
  """The anchors of a Markdown file's headings; a repeated heading gets -1, -2, ... as on GitHub."""
  out, seen = set(), {}
  for heading in re.findall(r"^#{1,6} +(.+?) *#*$", FENCED.sub("", path.read_text()), flags=re.M):
    a = github_anchor(heading)
    out.add(f"{a}-{seen[a]}" if a in seen else a)
    seen[a] = seen.get(a, 0) + 1
  return frozenset(out)


def broken_links(markdown_files) -> list[tuple[str, str, str]]:
  """(file, link, what is wrong) for every relative link outside code blocks that does not resolve."""
  bad = []
  for md in markdown_files:
    for target in re.findall(r"\]\(([^)\s]+)\)", FENCED.sub("", md.read_text())):
      if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, ...
        continue
      path, _, anchor = target.partition("#")
      linked = md.parent / path if path else md
      if not linked.exists():
        bad.append((md.name, target, "no such file"))
      elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
        bad.append((md.name, target, f"no heading with this anchor in {linked.name}"))
  return bad


def test_github_anchors():
  assert github_anchor("DiT-MoE-S/2 shapes against the matmul rate") == "dit-moe-s2-shapes-against-the-matmul-rate"
  assert github_anchor("The `tiny` recipe: 4350 steps (issue 30)") == "the-tiny-recipe-4350-steps-issue-30"
  assert github_anchor("Try it first on a CPU, in minutes") == "try-it-first-on-a-cpu-in-minutes"


def test_broken_links_are_found(tmp_path):
  (tmp_path / "a.md").write_text("# Top\n## Same\n## Same\n```\n# not a heading\n```\n")
  (tmp_path / "b.md").write_text("[ok](a.md#same-1) [ok](a.md#top) [x](a.md#same-2) [x](a.md#not-a-heading) "
                                 "[x](missing.md) [ok](https://example.com/x#y) [ok](#own)\n# Own\n")
  assert broken_links([tmp_path / "b.md"]) == [
      ("b.md", "a.md#same-2", "no heading with this anchor in a.md"),
      ("b.md", "a.md#not-a-heading", "no heading with this anchor in a.md"),
      ("b.md", "missing.md", "no such file")]


def test_readme_and_docs_links_resolve():
  files = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
  assert len(files) > 5
  assert broken_links(files) == []
