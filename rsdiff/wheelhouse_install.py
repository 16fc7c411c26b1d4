"""Install an rsdiff wheelhouse (``python -m rsdiff.wheelhouse``) on a machine without network.

Standard library only: it runs before anything is installed. Copy every ``part_NNN`` folder to
the target, then

    python part_000/install_wheelhouse.py part_*  [--target-python /path/to/python]

It joins the wheels that travelled as chunks, checks every wheel's size and sha256 against
``wheelhouse.json`` (a missing part or a corrupt copy is named, and nothing is installed), and
runs ``pip install --no-index --find-links`` for the wheelhouse's requirements.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path


def assemble(parts: list[Path], folder: Path) -> dict:
    """Every wheel of the wheelhouse in ``folder``, joined and checked; returns the manifest.

    Raises:
        SystemExit: a piece is missing, or a wheel's size or checksum is not the recorded one.
    """
    root = next((p for p in parts if (p / "wheelhouse.json").is_file()), None)
    if root is None:
        raise SystemExit(
            "no wheelhouse.json in the parts given: pass every part_NNN folder, part_000 included"
        )
    manifest = json.loads((root / "wheelhouse.json").read_text())
    by_name = {p.name: p for p in parts}
    if len(by_name) != manifest["parts"]:
        raise SystemExit(
            f"the wheelhouse has {manifest['parts']} parts, {len(by_name)} given: pass all of them"
        )
    for wheel in manifest["wheels"]:
        target = folder / wheel["wheel"]
        digest = hashlib.sha256()
        with target.open("wb") as out:
            for piece in wheel["pieces"]:
                part, _, name = piece.partition("/")
                source = by_name.get(part, Path(part)) / name
                if not source.is_file():
                    raise SystemExit(f"{piece} is missing: copy part {part} again")
                data = source.read_bytes()
                digest.update(data)
                out.write(data)
        if target.stat().st_size != wheel["bytes"] or digest.hexdigest() != wheel["sha256"]:
            raise SystemExit(
                f"{wheel['wheel']} does not match its checksum: copy {', '.join(wheel['pieces'])} again"
            )
    return manifest


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("parts", nargs="+", type=Path, help="the part_NNN folders")
    ap.add_argument("--target-python", default=sys.executable, help="the interpreter to install into")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="wheelhouse-") as tmp:
        manifest = assemble([p.resolve() for p in args.parts], Path(tmp))
        print(f"{len(manifest['wheels'])} wheels checked; installing {' '.join(manifest['requirements'])}")
        cmd = [args.target_python, "-m", "pip", "install", "--no-index", "--find-links", tmp,
               *manifest["requirements"]]  # fmt: skip
        sys.exit(subprocess.run(cmd).returncode)


if __name__ == "__main__":
    main()
