#!/usr/bin/python3
"""Turn the reStructuredText man pages in this directory into roff.

    python3 docs/man/build.py OUTDIR

writes OUTDIR/<page>.<section> (modeld.8, modeldctl.1, modeld.toml.5, org.modeld1.5) with
docutils' manpage writer (Debian and Fedora: python3-docutils). ``@VERSION@`` becomes the
version in service/modeld/__init__.py; the date is SOURCE_DATE_EPOCH's (dpkg-buildpackage
and rpmbuild set it), so builds are reproducible. Any docutils warning fails the build.
"""

from __future__ import annotations

import datetime
import os
import re
import sys
from pathlib import Path

from docutils.core import publish_string
from docutils.utils import SystemMessage

HERE = Path(__file__).resolve().parent
INIT = HERE.parents[1] / "service" / "modeld" / "__init__.py"


def version() -> str:
    match = re.search(r'^__version__ = "([^"]+)"', INIT.read_text(), re.MULTILINE)
    if match is None:
        raise SystemExit(f"build.py: no __version__ in {INIT}")
    return match.group(1)


def date() -> str:
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    when = (
        datetime.datetime.fromtimestamp(int(epoch), datetime.UTC)
        if epoch
        else datetime.datetime.now(datetime.UTC)
    )
    return when.strftime("%Y-%m-%d")


def pages() -> list[Path]:
    """The sources: ``<name>.<section>.rst``."""
    return sorted(HERE.glob("*.[1-8].rst"))


def build(source: Path, outdir: Path, ver: str, day: str) -> Path:
    text = source.read_text(encoding="utf-8").replace("@VERSION@", ver)
    text = text.replace(":Version:", f":Date: {day}\n:Version:", 1)
    roff = publish_string(
        text,
        source_path=str(source),
        writer_name="manpage",
        settings_overrides={"report_level": 2, "halt_level": 2, "input_encoding": "utf-8"},
    )
    target = outdir / source.name.removesuffix(".rst")
    target.write_bytes(roff)
    return target


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    outdir = Path(argv[1])
    outdir.mkdir(parents=True, exist_ok=True)
    ver, day = version(), date()
    for source in pages():
        try:
            print(build(source, outdir, ver, day))
        except SystemMessage as err:
            print(f"build.py: {err}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
