"""npm registry packages as local tarballs, for the benchmarks built from what packages ship.

A package is fetched once with `npm pack` (pinned versions) into a cache folder and read from its tarball;
nothing is unpacked. Used by icon_sources (Iconify icon sets) and glyph_sources (Fontsource fonts).
"""
from __future__ import annotations

import subprocess
import tarfile
import zlib
from pathlib import Path
from typing import Callable


class SourceError(Exception):
    """A package could not be fetched or read (one line for the user)."""


def tarball_name(spec: str) -> str:
    """npm pack's file name for 'scope/name@version': '@iconify-json/ph@1.2.2' -> 'iconify-json-ph-1.2.2.tgz'."""
    name, _, version = spec.rpartition("@")
    return f"{name.lstrip('@').replace('/', '-')}-{version}.tgz"


def fetch(specs: list[str], cache: Path) -> dict[str, Path]:
    """Tarball per package spec, packed by `npm pack` into `cache` unless already there."""
    cache.mkdir(parents=True, exist_ok=True)
    missing = [s for s in specs if not (cache / tarball_name(s)).is_file()]
    if missing:
        try:
            subprocess.run(["npm", "pack", "--silent", *missing], cwd=cache, check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=600)
        except FileNotFoundError:
            raise SourceError(f"npm not found: install Node.js/npm, or put {', '.join(map(tarball_name, missing))} "
                              f"in {cache}") from None
        except subprocess.CalledProcessError as e:
            tail = (e.stderr or "").strip().splitlines()
            raise SourceError(f"npm pack {' '.join(missing)} failed: {tail[-1] if tail else e}") from None
    out = {s: cache / tarball_name(s) for s in specs}
    for s, p in out.items():
        if not p.is_file():
            raise SourceError(f"npm pack did not write {p}")
    return out


def read_member(tgz: Path, member: str) -> bytes:
    """One file of a package tarball ('package/icons.json')."""
    try:
        with tarfile.open(tgz, "r:gz") as tf:
            f = tf.extractfile(member)
            if f is None:
                raise KeyError(member)
            return f.read()
    except (KeyError, tarfile.TarError, OSError) as e:
        raise SourceError(f"{tgz.name}: cannot read {member} ({type(e).__name__})") from None


def read_members(tgz: Path, wanted: Callable[[str], bool]) -> dict[str, bytes]:
    """Every file of a package tarball whose name `wanted` accepts, in one pass over the archive."""
    out = {}
    try:
        with tarfile.open(tgz, "r:gz") as tf:
            for info in tf:
                if info.isfile() and wanted(info.name):
                    out[info.name] = tf.extractfile(info).read()
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise SourceError(f"{tgz.name}: cannot read the tarball ({type(e).__name__})") from None
    return out
