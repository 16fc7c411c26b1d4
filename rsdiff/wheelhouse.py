"""An offline install of rsdiff's runtime for a machine without network (an air-gapped cluster, a
GPU host behind a firewall): resolve what it lacks, download those wheels for its Python and
platform, and pack them into parts no larger than what one transfer carries.

    python -m rsdiff.wheelhouse --out wheels --python 3.12 --platform manylinux_2_28_x86_64 \\
        --have target-freeze.txt --part-mb 60 'rsdiff[test] @ file:///path/to/rsdiff'

``--have`` is the target's ``pip freeze``: those exact versions constrain the resolution and are
not downloaded (a GPU host keeps its own CUDA build of torch). ``--skip`` names packages never
downloaded (default: torch's CUDA stack). The parts are folders ``part_000``, ``part_001``, ...;
a wheel larger than a part travels as numbered chunks. ``part_000`` holds ``wheelhouse.json``
(every wheel's size and sha256, its chunks, the requirements) and ``install_wheelhouse.py``, a
standard-library script that joins the chunks, checks every checksum and runs
``pip install --no-index``:

    python part_000/install_wheelhouse.py part_*        # on the target, after copying the parts
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

MANIFEST = "wheelhouse.json"
INSTALLER = "install_wheelhouse.py"
DEFAULT_SKIP = ("torch", "torchvision", "torchaudio", "triton", "nvidia-*")


@dataclass(frozen=True)
class Pin:
    """One resolved distribution: its normalised name, exact version and, for a local wheel, its
    ``file://`` address (copied, not downloaded)."""

    name: str
    version: str
    local: str | None = None

    @property
    def requirement(self) -> str:
        return f"{self.name}=={self.version}"


def normalise(name: str) -> str:
    """PEP 503 name: lower case, runs of ``-_.`` as one ``-``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_freeze(text: str) -> dict[str, str]:
    """``{name: version}`` of a ``pip freeze`` listing (local labels such as ``+cu128`` dropped;
    editable, URL and comment lines skipped). A bare name (a hand-written list of what the target
    has) maps to ``""``: there at some version, never carried, not constrained."""
    have = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", "-")) or " @ " in line:
            continue
        name, sep, version = line.partition("==")
        if sep or re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", line):
            have[normalise(name)] = version.split("+")[0].strip()
    return have


def resolve(
    requirements: list[str], python: str, platforms: list[str], have: dict[str, str], index: list[str]
) -> list[Pin]:
    """Every distribution ``requirements`` need on the target, as pip resolves it there (binary
    wheels only). What the target has at a known version (``have``) counts as installed there: it is
    offered to the resolver as a dependency-free stand-in, so its own dependencies (torch's CUDA
    wheels, say) are neither resolved nor fetched. ``index``: pip's index options (``--no-index``,
    ``--find-links DIR``), empty for PyPI."""
    with tempfile.TemporaryDirectory(prefix="rsdiff-wheelhouse-") as tmp:
        stand_ins = Path(tmp) / "have"
        stand_ins.mkdir()
        for name, version in have.items():
            if version:
                _stand_in(stand_ins, name, version)
        constraints = Path(tmp) / "constraints.txt"
        constraints.write_text("".join(f"{n}=={v}\n" for n, v in sorted(have.items()) if v))
        report = Path(tmp) / "report.json"
        _pip("install", "--dry-run", "--ignore-installed", "--quiet", "--report", str(report),
             "--target", str(Path(tmp) / "target"), *_target_flags(python, platforms), *index,
             f"--find-links={stand_ins}", "-c", str(constraints), *requirements)  # fmt: skip
        chosen = json.loads(report.read_text())["install"]
    pins = []
    for item in chosen:
        url = item.get("download_info", {}).get("url", "")
        local = url if url.startswith("file://") else None
        pins.append(Pin(normalise(item["metadata"]["name"]), item["metadata"]["version"], local))
    return sorted(pins, key=lambda p: p.name)


STAND_IN = "rsdiff.wheelhouse.have"  # the local version label of a stand-in wheel


def _stand_in(folder: Path, name: str, version: str) -> None:
    """A wheel of ``name`` ``version+rsdiff.wheelhouse.have`` with no files and no dependencies: it
    satisfies ``name==version`` and sorts above the published ``version``, so pip picks it."""
    import zipfile

    dist = f"{name.replace('-', '_')}-{version}+{STAND_IN}"
    info = f"{dist}.dist-info"
    files = {
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}+{STAND_IN}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: rsdiff\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        f"{info}/RECORD": "",
    }
    with zipfile.ZipFile(folder / f"{dist}-py3-none-any.whl", "w") as z:
        for path, text in files.items():
            z.writestr(path, text)


def missing(pins: list[Pin], have: dict[str, str], skip: tuple[str, ...] = DEFAULT_SKIP) -> list[Pin]:
    """The pins the target lacks: not already there at that version, not in ``skip`` (fnmatch)."""
    from fnmatch import fnmatch

    there = [p for p in pins if p.name in have and have[p.name] in ("", p.version.split("+")[0])]
    return [p for p in pins if p not in there and not any(fnmatch(p.name, s) for s in skip)]


def download(
    pins: list[Pin], python: str, platforms: list[str], folder: Path, index: list[str]
) -> list[Path]:
    """The wheels of ``pins`` for the target, in ``folder``: local ones copied, the others
    downloaded in one pip call without dependencies."""
    from urllib.parse import unquote, urlparse

    folder.mkdir(parents=True, exist_ok=True)
    for pin in pins:
        if pin.local:
            shutil.copy2(unquote(urlparse(pin.local).path), folder)
    remote = [p.requirement for p in pins if not p.local]
    if remote:
        _pip(
            "download",
            "--no-deps",
            "--quiet",
            "-d",
            str(folder),
            *_target_flags(python, platforms),
            *index,
            *remote,
        )
    return sorted(folder.glob("*.whl"))


def build_local(project: Path, folder: Path) -> Path:
    """The wheel of a local project folder (``pip wheel --no-deps``), in ``folder``."""
    before = set(folder.glob("*.whl"))
    _pip("wheel", "--no-deps", "--quiet", "-w", str(folder), str(project))
    (built,) = set(folder.glob("*.whl")) - before
    return built


Piece = tuple[Path, int, int, str]  # (wheel, offset, length, file name in its part)


def plan_parts(wheels: list[Path], part_bytes: int) -> list[list[Piece]]:
    """Which bytes of which wheel go into which part: largest wheels first, each part filled to
    ``part_bytes`` (``part_000`` keeps 256 KiB for the manifest and the installer); a wheel that
    does not fit the room left is cut into numbered chunks ``NAME.whl.000``, ``.001``, ..."""
    parts: list[list[Piece]] = [[]]
    room = part_bytes - (256 << 10)
    for wheel in sorted(wheels, key=lambda w: -w.stat().st_size):
        size, offset, index = wheel.stat().st_size, 0, 0
        while offset < size or (size == 0 and index == 0):
            if room <= 0:
                parts.append([])
                room = part_bytes
            length = min(room, size - offset)
            name = wheel.name if length == size else f"{wheel.name}.{index:03d}"
            parts[-1].append((wheel, offset, length, name))
            offset, room, index = offset + length, room - length, index + 1
    return parts


def check_out(out: Path) -> None:
    """Refuse an ``out`` folder that holds anything but an earlier wheelhouse (it is replaced)."""
    if (
        out.exists()
        and (not out.is_dir() or any(out.iterdir()))
        and not (out / "part_000" / MANIFEST).is_file()
    ):
        raise ValueError(f"{out} holds files and is not a wheelhouse: choose a new or empty folder for --out")


def pack(wheels: list[Path], out: Path, part_bytes: int, requirements: list[str]) -> list[Path]:
    """``wheels`` packed into folders ``out/part_NNN`` of at most ``part_bytes`` each
    (:func:`plan_parts`), with the manifest and the installer in ``part_000``; returns the parts.
    Written under a temporary name and renamed, so a stopped run leaves no complete-looking
    wheelhouse; ``out`` may be new, empty or an earlier wheelhouse (replaced), nothing else."""
    if part_bytes < 1 << 20:
        raise ValueError(f"part size {part_bytes} bytes is below 1 MiB")
    check_out(out)
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    parts = plan_parts(wheels, part_bytes)
    for number, content in enumerate(parts):
        folder = staging / f"part_{number:03d}"
        folder.mkdir(parents=True)
        for wheel, offset, length, name in content:
            _copy_range(wheel, offset, length, folder / name)
    files = [
        {"wheel": w.name, "bytes": w.stat().st_size, "sha256": _sha256(w),
         "pieces": [f"part_{n:03d}/{name}" for n, c in enumerate(parts) for x, _, _, name in c if x == w]}
        for w in sorted(wheels)
    ]  # fmt: skip
    manifest = {"requirements": requirements, "wheels": files, "parts": len(parts)}
    (staging / "part_000" / MANIFEST).write_text(json.dumps(manifest, indent=1))
    shutil.copy(Path(__file__).with_name("wheelhouse_install.py"), staging / "part_000" / INSTALLER)
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    return sorted(out.glob("part_*"))


def _copy_range(src: Path, offset: int, length: int, dst: Path) -> None:
    with src.open("rb") as fin, dst.open("wb") as fout:
        fin.seek(offset)
        while length > 0:
            block = fin.read(min(length, 1 << 22))
            fout.write(block)
            length -= len(block)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _target_flags(python: str, platforms: list[str]) -> list[str]:
    flags = ["--only-binary=:all:", "--python-version", python]
    for platform in platforms:
        flags += ["--platform", platform]
    return flags


def _pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True)


def local_requirement(spec: str, wheels: Path) -> tuple[str, str]:
    """``(resolve_as, install_as)`` for one requirement: a local project folder (``path`` or
    ``path[extras]``) becomes its built wheel; anything else is passed to pip as written."""
    match = re.fullmatch(r"(.+?)(\[[^\]]*\])?", spec)
    path, extras = Path(match.group(1)), match.group(2) or ""
    if not path.is_dir():
        return spec, spec
    wheel = build_local(path, wheels)
    name = normalise(wheel.name.split("-")[0])
    return f"{name}{extras} @ {wheel.resolve().as_uri()}", f"{name}{extras}"


def build(requirements: list[str], out: Path, python: str, platforms: list[str], have: dict[str, str],
          skip: tuple[str, ...], part_bytes: int, index: list[str]) -> list[Path]:  # fmt: skip
    """The whole wheelhouse (module doc): resolve, download what the target lacks, pack."""
    with tempfile.TemporaryDirectory(prefix="rsdiff-wheels-") as tmp:
        built = Path(tmp) / "local"
        built.mkdir()
        pairs = [local_requirement(r, built) for r in requirements]
        pins = resolve([r for r, _ in pairs], python, platforms, have, index)
        need = missing(pins, have, skip)
        log.info("%d distributions resolved, %d to carry: %s", len(pins), len(need),
                 " ".join(p.requirement for p in need))  # fmt: skip
        wheels = download(need, python, platforms, Path(tmp) / "carry", index)
        return pack(wheels, out, part_bytes, [i for _, i in pairs])


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m rsdiff.wheelhouse", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])  # fmt: skip
    add = ap.add_argument
    add("requirements", nargs="+", help="what to install there, e.g. '.[test]' (a local folder is built)")
    add("--out", type=Path, required=True, help="the wheelhouse folder (its part_NNN inside)")
    add("--python", required=True, help="the target's Python version, e.g. 3.12")
    add("--platform", action="append", required=True, help="a wheel platform tag the target takes")
    add("--have", type=Path, help="the target's `pip freeze`")
    add("--skip", action="append", default=None, help=f"never carry (default: {' '.join(DEFAULT_SKIP)})")
    add("--find-links", action="append", default=[], help="a folder of wheels (a local mirror)")
    add("--no-index", action="store_true", help="nothing from PyPI: --find-links only")
    add("--part-mb", type=float, default=60.0, help="the largest part, MiB (default 60)")
    return ap


def main(argv: list[str] | None = None) -> None:
    ap = _parser()
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.have is not None and not args.have.is_file():
        ap.exit(
            2, f"--have {args.have}: no such file; on the target, `pip freeze > {args.have.name}` writes it\n"
        )
    if args.part_mb < 1:
        ap.exit(2, f"--part-mb {args.part_mb}: a part must hold at least 1 MiB\n")
    have = read_freeze(args.have.read_text()) if args.have else {}
    index = ["--no-index"] * args.no_index + [f"--find-links={f}" for f in args.find_links]
    try:
        check_out(args.out)
        parts = build(args.requirements, args.out, args.python, args.platform, have,
                      tuple(args.skip or DEFAULT_SKIP), int(args.part_mb * 2**20), index)  # fmt: skip
    except ValueError as exc:
        ap.exit(2, f"{exc}\n")
    except subprocess.CalledProcessError as exc:
        ap.exit(2, f"pip failed ({' '.join(exc.cmd[3:5])}): see its message above; check the requirements, "
                   "--python and --platform\n")  # fmt: skip
    sizes = ", ".join(f"{sum(f.stat().st_size for f in p.iterdir()) / 2**20:.1f}" for p in parts)
    print(
        f"{len(parts)} part(s) in {args.out} ({sizes} MiB); on the target: python part_000/{INSTALLER} part_*"
    )


if __name__ == "__main__":
    main()
