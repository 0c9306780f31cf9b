"""Fetch the built-in text sources that come from package registries into sparseffn's cache.

    python scripts/fetch_texts.py [austen] [news]      (both by default; run by install.sh)

- ``austen``: Jane Austen's six novels from Debian's ``r-cran-janeaustenr`` (``apt-get
  download``, then the R lazy-load database parsed with PyPI ``rdata``);
- ``news``: 300 news articles (``lee_background.cor``) read from the ``gensim`` wheel (``pip
  download``), without installing gensim.

The library reads the cached JSON only (``sparseffn.data``); it never calls a package manager.
"""
from __future__ import annotations

import argparse
import gzip
import subprocess
import sys
import tempfile
import warnings
import zipfile
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sparseffn.data import FETCH, cache_dir, write_json_atomic  # noqa: E402


def _run(cmd: list[str], cwd: Path, what: str) -> None:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"could not fetch {what} with `{' '.join(cmd)}` (exit "
                         f"{proc.returncode}): {proc.stderr.strip()[-400:]}")


def _parse_rdb(rdata, base: Path) -> dict[str, str]:
    """{object name: text} of an R lazy-load database (``.rdx`` index + ``.rdb`` blobs)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # rdata: "Unknown file type: assumed RDS"
        index = rdata.conversion.convert(
            rdata.parser.parse_data(gzip.decompress(base.with_suffix(".rdx").read_bytes())))
        blob = base.with_suffix(".rdb").read_bytes()
        books = {}
        for name, (offset, length) in index["variables"].items():
            # Each object: 4-byte big-endian length, then a zlib stream of an R serialization.
            raw = zlib.decompress(blob[int(offset) + 4:int(offset) + int(length)])
            lines = rdata.conversion.convert(rdata.parser.parse_data(raw))
            books[str(name)] = "\n".join(str(line) for line in lines)
    return books


def fetch_austen(tmp: Path) -> dict[str, str]:
    import rdata  # in the dev extra
    _run(["apt-get", "download", "r-cran-janeaustenr"], tmp, "Debian r-cran-janeaustenr")
    deb = next(tmp.glob("r-cran-janeaustenr_*.deb"))
    _run(["dpkg-deb", "-x", str(deb), "x"], tmp, "the .deb contents")
    base = next((tmp / "x").rglob("janeaustenr/data/Rdata.rdx")).with_suffix("")
    return _parse_rdb(rdata, base)


def fetch_news(tmp: Path) -> list[str]:
    _run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
          "gensim", "-d", str(tmp)], tmp, "the gensim wheel from PyPI")
    wheel = next(tmp.glob("gensim-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        text = zf.read("gensim/test/test_data/lee_background.cor").decode("utf-8", "replace")
    return [line.strip() for line in text.splitlines() if line.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sources", nargs="*", metavar="SOURCE",
                        help=f"any of {sorted(FETCH)} (default: all)")
    parser.add_argument("--force", action="store_true", help="fetch again even if cached")
    args = parser.parse_args(argv)
    unknown = set(args.sources) - set(FETCH)
    if unknown:
        parser.error(f"unknown sources {sorted(unknown)}; choose from {sorted(FETCH)}")
    for source in args.sources or sorted(FETCH):
        target = cache_dir() / f"{source}.json"
        if target.exists() and not args.force:
            print(f"{source}: cached at {target}")
            continue
        with tempfile.TemporaryDirectory() as tmp:
            data = {"austen": fetch_austen, "news": fetch_news}[source](Path(tmp))
        write_json_atomic(target, data)
        print(f"{source}: fetched into {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
