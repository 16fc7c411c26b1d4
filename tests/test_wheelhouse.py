"""The offline wheelhouse (``python -m rsdiff.wheelhouse``): resolved by pip's real resolver from
a local wheel folder (no network), packed into parts with a wheel split into chunks, and
installed from the parts into a fresh virtualenv with no index; a corrupt or missing piece is
named and nothing is installed."""

from __future__ import annotations

import base64
import hashlib
import os
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

from rsdiff.wheelhouse import INSTALLER, MANIFEST, Pin, main, missing, read_freeze

pytestmark = pytest.mark.integration
PY = f"{sys.version_info.major}.{sys.version_info.minor}"


def _wheel(folder: Path, name: str, version: str, requires: list[str], payload: int = 0) -> Path:
    """A real pure-Python wheel: ``name/__init__.py`` (plus ``payload`` random bytes of data)."""
    files = {f"{name}/__init__.py": f"VERSION = {version!r}\n".encode()}
    if payload:
        files[f"{name}/blob.bin"] = os.urandom(payload)  # incompressible: the wheel is this large
    info = f"{name}-{version}.dist-info"
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    files[f"{info}/METADATA"] = (meta + "".join(f"Requires-Dist: {r}\n" for r in requires)).encode()
    files[f"{info}/WHEEL"] = (
        b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    )
    digest = {
        p: base64.urlsafe_b64encode(hashlib.sha256(d).digest()).rstrip(b"=").decode()
        for p, d in files.items()
    }
    record = [f"{p},sha256={digest[p]},{len(d)}" for p, d in files.items()]
    files[f"{info}/RECORD"] = ("\n".join([*record, f"{info}/RECORD,,"]) + "\n").encode()
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for p, d in files.items():
            z.writestr(p, d)
    return path


@pytest.fixture(scope="module")
def mirror(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("mirror")
    _wheel(folder, "alpha", "1.0", ["beta>=1", "gamma"], payload=int(2.5 * 2**20))
    _wheel(folder, "beta", "1.2", [])
    _wheel(folder, "gamma", "0.3", ["delta-cuda"])  # like torch: its dependency is nowhere to be had
    return folder


def _build(mirror: Path, out: Path, *extra: str) -> None:
    main(["alpha", "--out", str(out), "--python", PY, "--platform", "any", "--no-index",
          "--find-links", str(mirror), "--part-mb", "1", *extra])  # fmt: skip


def _fresh_venv(where: Path) -> Path:
    venv.EnvBuilder(with_pip=True).create(where)
    return where / "bin" / "python"


def test_a_wheelhouse_installs_into_a_fresh_virtualenv_without_an_index(mirror, tmp_path):
    (tmp_path / "freeze.txt").write_text("gamma==0.3\nsomething-else==2.0+cu128\n")
    _build(mirror, tmp_path / "house", "--have", str(tmp_path / "freeze.txt"))
    parts = sorted((tmp_path / "house").glob("part_*"))
    assert len(parts) >= 3  # a 2.5 MiB wheel in 1 MiB parts: chunks
    assert all(sum(f.stat().st_size for f in p.iterdir()) <= 2**20 for p in parts)
    assert (parts[0] / MANIFEST).is_file() and (parts[0] / INSTALLER).is_file()
    carried = {f.name.split(".whl")[0] for p in parts for f in p.glob("*.whl*")}
    # gamma: the target has it, so neither it nor what it needs (delta-cuda, unavailable) is resolved
    assert carried == {"alpha-1.0-py3-none-any", "beta-1.2-py3-none-any"}
    assert not (tmp_path / "house.partial").exists()

    python = _fresh_venv(tmp_path / "venv")
    _wheel(tmp_path, "gamma", "0.3", [])  # what the target already has
    gamma = tmp_path / "gamma-0.3-py3-none-any.whl"
    subprocess.run([python, "-m", "pip", "install", "--no-index", "-q", gamma], check=True)
    done = subprocess.run([sys.executable, parts[0] / INSTALLER, *parts, "--target-python", python],
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 wheels checked; installing alpha" in done.stdout
    check = (
        "import alpha, beta, gamma; "
        "print(alpha.VERSION, beta.VERSION, len(open(alpha.__path__[0] + '/blob.bin', 'rb').read()))"
    )
    assert subprocess.run(
        [python, "-c", check], capture_output=True, text=True, check=True
    ).stdout.split() == ["1.0", "1.2", str(int(2.5 * 2**20))]


def test_a_corrupt_or_missing_piece_is_named_and_nothing_is_installed(mirror, tmp_path):
    (tmp_path / "freeze.txt").write_text("gamma==0.3\n")
    _build(mirror, tmp_path / "house", "--have", str(tmp_path / "freeze.txt"))
    parts = sorted((tmp_path / "house").glob("part_*"))
    chunk = next(f for p in parts for f in p.glob("alpha-*.whl.001"))
    data = bytearray(chunk.read_bytes())
    data[100] ^= 0xFF
    chunk.write_bytes(bytes(data))
    python = _fresh_venv(tmp_path / "venv")
    bad = subprocess.run([sys.executable, parts[0] / INSTALLER, *parts, "--target-python", python],
                         capture_output=True, text=True)  # fmt: skip
    assert bad.returncode != 0
    assert "alpha-1.0-py3-none-any.whl does not match its checksum: copy part_" in bad.stderr
    short = subprocess.run(
        [sys.executable, parts[0] / INSTALLER, *parts[:-1]], capture_output=True, text=True
    )
    assert f"has {len(parts)} parts, {len(parts) - 1} given" in short.stderr
    assert subprocess.run([python, "-c", "import alpha"], capture_output=True).returncode != 0


def test_bad_arguments_exit_2_with_one_line(mirror, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["alpha", "--out", str(tmp_path), "--python", PY, "--platform", "any", "--have", "nope.txt"])
    assert stop.value.code == 2
    assert "--have nope.txt: no such file" in capsys.readouterr().err
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(SystemExit) as stop:  # never replaces a folder that is not a wheelhouse
        _build(mirror, tmp_path)
    assert stop.value.code == 2
    assert "holds files and is not a wheelhouse: choose a new or empty folder" in capsys.readouterr().err
    assert (tmp_path / "mine.txt").read_text() == "keep me"


def test_what_the_target_has_is_not_carried():
    listing = "torch==2.11.0+cu130\nNumPy==2.1.0\n-e git+https://x#egg=y\nx @ file:///x.whl\nscipy\n"
    have = read_freeze(listing)
    assert have == {"torch": "2.11.0", "numpy": "2.1.0", "scipy": ""}  # scipy: there, version unknown
    pins = [Pin("numpy", "2.1.0"), Pin("numpy-extra", "1"), Pin("nvidia-cudnn-cu12", "9"),
            Pin("ray", "2.60.0"), Pin("scipy", "1.16.0"), Pin("torch", "2.12.0")]  # fmt: skip
    assert [p.name for p in missing(pins, have)] == ["numpy-extra", "ray"]  # torch: skipped by default
