"""Rewrite the benchmark reports with this machine's paths relative to the repository root.

    python benchmarks/scrub_paths.py [DIR ...] [--repo PATH]

Every text file (.json .md .csv .txt .yaml) under each DIR (default benchmarks/results) goes through
_common.scrub in place: the shared folder (SHARED) as ../shared, the repository's paths relative to it.
Re-runnable: a scrubbed file stays as it is. --repo (repeatable): a checkout other than this one that
reports were written in (they name its paths); its shared folder is taken as SHARED."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import HERE, REPO, SHARED, scrub

SUFFIXES = {".json", ".md", ".csv", ".txt", ".yaml", ".yml"}


def scrub_file(path: Path, repos: list[Path]) -> bool:
    """Scrub one file in place; True when it changed."""
    text = path.read_text()
    new = text
    for repo in repos:
        new = scrub(new, repo=repo, shared=SHARED)
    if new == text:
        return False
    path.write_text(new)
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dirs", nargs="*", type=Path, default=[HERE / "results"])
    ap.add_argument("--repo", action="append", type=Path, default=[],
                    help="another checkout whose paths the reports hold (this one is always scrubbed)")
    args = ap.parse_args(argv)
    repos = [*args.repo, REPO]
    files = sorted({p for d in args.dirs for p in Path(d).rglob("*") if p.is_file() and p.suffix in SUFFIXES})
    changed = [p for p in files if scrub_file(p, repos)]
    for p in changed:
        print(f"scrubbed {scrub(str(p.resolve()))}")
    print(f"{len(changed)} of {len(files)} files changed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
