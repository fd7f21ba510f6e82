"""Dead-link check for the Markdown documentation, offline.

usage: links_check.py [--front-page README.md --pages docs] FILE...
       links_check.py --self-test

For every link in FILE... (inline `[text](target)`, images, and reference
definitions `[name]: target`; not inside code blocks or code spans):
- a relative target must exist (file or directory, relative to the linking file);
- a `#anchor` (also `#anchor` alone, in the same file) must name a heading of the
  target Markdown file, with GitHub's rule: lowercase, punctuation other than `-`
  and `_` dropped, spaces to `-`, a repeated heading gets `-1`, `-2`, ...; or an
  explicit `<a id="...">` / `<a name="...">`.
Links with a scheme (https:, mailto:) are not fetched: no network here.
With --front-page/--pages, every Markdown file under the pages directory must be
linked from the front page.
--self-test runs the checker on a made-up tree with one broken file link and
one missing anchor, and passes only if it reports exactly those two.
Exit status 1 on any problem.
"""

import pathlib
import re
import sys
import tempfile

FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
INLINE = re.compile(r"!?\[((?:[^\[\]]|\[[^\]]*\])*)\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFDEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$")
CODE_SPAN = re.compile(r"(`+)(.+?)\1")
HTML_ANCHOR = re.compile(r"<a\s+(?:id|name)=\"([^\"]+)\"", re.I)
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def lines_outside_code(text):
    """(line number, line) of every line not inside a fenced code block."""
    fence = None
    for n, line in enumerate(text.splitlines(), 1):
        m = FENCE.match(line)
        if m:
            if fence is None:
                fence = m.group(1)
            elif line.strip().startswith(fence):
                fence = None
            continue
        if fence is None:
            yield n, line


def slug(heading):
    text = CODE_SPAN.sub(lambda m: m.group(2), heading)
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link's text only
    text = re.sub(r"<[^>]+>", "", text)                      # inline HTML
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)                      # \w: letters, digits, _
    return text.replace(" ", "-")


_anchors = {}


def anchors(path):
    if path not in _anchors:
        seen, out = {}, set()
        text = path.read_text()
        for _, line in lines_outside_code(text):
            m = HEADING.match(line)
            if m:
                base = slug(m.group(2))
                n = seen.get(base, 0)
                seen[base] = n + 1
                out.add(base if n == 0 else f"{base}-{n}")
            out.update(HTML_ANCHOR.findall(line))
        _anchors[path] = out
    return _anchors[path]


def links(path):
    """(line number, target) of every link in a Markdown file."""
    for n, line in lines_outside_code(path.read_text()):
        m = REFDEF.match(line)
        if m:
            yield n, m.group(1)
            continue
        line = CODE_SPAN.sub("", line)
        for m in INLINE.finditer(line):
            yield n, m.group(2)


def check(files, front_page=None, pages=None):
    problems, linked, count = [], set(), 0
    for f in files:
        f = pathlib.Path(f)
        for n, target in links(f):
            if SCHEME.match(target):
                continue
            count += 1
            where = f"{f}:{n}: {target}"
            path, _, anchor = target.partition("#")
            dest = (f.parent / path).resolve() if path else f.resolve()
            if not dest.exists():
                problems.append(f"{where}: no such file {dest.relative_to(pathlib.Path.cwd()) if dest.is_relative_to(pathlib.Path.cwd()) else dest}")
                continue
            if f.name == (front_page.name if front_page else None):
                linked.add(dest)
            if anchor:
                if dest.suffix.lower() != ".md":
                    problems.append(f"{where}: an anchor into a file that is not Markdown")
                elif anchor not in anchors(dest):
                    problems.append(f"{where}: no heading or <a id> makes the anchor #{anchor} in {dest.name}")
    if front_page and pages:
        for page in sorted(pathlib.Path(pages).rglob("*.md")):
            if page.resolve() not in linked:
                problems.append(f"{page}: not linked from {front_page}")
    return problems, count


def self_test():
    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(tmp)
        (root / "docs").mkdir()
        (root / "docs" / "b.md").write_text("# Page B\n\n## Second part (v2)\n\n```\n# not a heading\n```\n")
        (root / "README.md").write_text(
            "# Front\n\n## Same\n\n## Same\n\n"
            "[ok](docs/b.md) [ok](docs/b.md#second-part-v2) [ok](#same-1) [ok](docs/)\n"
            "`[in code](nowhere.md)` [ext](https://example.com/x.md)\n"
            "[broken file](docs/missing.md)\n"
            "[missing anchor](docs/b.md#not-a-heading)\n")
        problems, count = check([root / "README.md", root / "docs" / "b.md"], root / "README.md", root / "docs")
        want = ["docs/missing.md", "docs/b.md#not-a-heading"]
        found = [w for w in want if any(f": {w}:" in p for p in problems)]
        ok = found == want and len(problems) == 2 and count == 6
        for p in problems:
            print(f"     reported: {p.replace(tmp, '<tmp>')}")
        print(f"{'ok  ' if ok else 'FAIL'} the checker reports a missing file and a missing anchor, and only those"
              f" ({len(problems)} problems in {count} links)")
        return 0 if ok else 1


def main(argv):
    if argv == ["--self-test"]:
        return self_test()
    front_page = pages = None
    if argv[:1] == ["--front-page"]:
        front_page, pages, argv = pathlib.Path(argv[1]), argv[3], argv[4:]
    problems, count = check(argv, front_page, pages)
    for p in problems:
        print(f"FAIL {p}")
    print(f"{'ok  ' if not problems else 'FAIL'} {count} relative links and anchors in {len(argv)} files"
          + (f"; every page under {pages} linked from {front_page}" if pages else "")
          + (f": {len(problems)} broken" if problems else ""))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
