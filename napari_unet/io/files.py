"""Writing files safely: atomic replacement, output-path checks, and never overwriting an input."""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path
from typing import Callable

from napari_unet.io.formats import OutputPathError, PathLike

# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------


def _current_umask() -> int:
    """The process umask, read without changing it (os.umask would race with other threads)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


def atomic_write(path: PathLike, write_fn: Callable[[Path], None]) -> Path:
    """Write a file through a temporary file in the same folder, then rename it into place.

    Parameters
    ----------
    path : str or os.PathLike
        Destination. Its folder must exist.
    write_fn : callable
        Called with the temporary path; must write the complete file there.

    Returns
    -------
    pathlib.Path
        The destination path.

    Notes
    -----
    On any exception (including KeyboardInterrupt) the temporary file is removed and the
    exception re-raised; an existing file at ``path`` is left untouched. The new file gets the
    permissions of the file it replaces, or the usual ``0o666 & ~umask``.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, "it is a folder", str(path))
    ome = path.name.lower().endswith((".ome.tif", ".ome.tiff"))
    suffix = "".join(path.suffixes[-2:]) if ome else path.suffix
    try:
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=suffix)
    except OSError as err:
        raise _os_error_for(err, path) from err
    tmp = Path(tmp_name)
    try:
        os.close(fd)
        write_fn(tmp)
        mode = path.stat().st_mode & 0o7777 if path.exists() else 0o666 & ~_current_umask()
        os.chmod(tmp, mode)
        with open(tmp, "rb+") as written:
            os.fsync(written.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        if isinstance(err, OSError):
            raise _os_error_for(err, path) from err
        raise
    return path


def _os_error_for(err: OSError, path: Path) -> OSError:
    """The same kind of error, about ``path`` (the user's file) instead of a temporary file."""
    if err.errno is None:
        return OSError(f"cannot write {path}: {err}")
    return OSError(err.errno, err.strerror or os.strerror(err.errno), str(path))


def _probe_writable(folder: Path) -> None:
    """Create and remove a file in ``folder``: the surest test that writing there works."""
    fd, name = tempfile.mkstemp(dir=folder, prefix=".napari-unet-probe.")
    os.close(fd)
    os.unlink(name)


def check_output_path(path: PathLike, *, create_parent: bool = False, folder: bool = False) -> Path:
    """Check before a long computation that ``path`` can be written; returns it expanded.

    Parameters
    ----------
    path : str or os.PathLike
        The output the user asked for.
    create_parent : bool
        Missing parent folders will be created (their nearest existing ancestor must be a
        writable folder); otherwise the parent folder must exist.
    folder : bool
        The output is a folder (zarr store, batch output): an existing folder is fine, an
        existing file is not. Otherwise an existing folder is refused.

    Raises
    ------
    OutputPathError
        One line naming ``path``: it is a folder (or a file, for ``folder=True``), its folder
        does not exist, a parent is a file, or the folder cannot be written (permissions, a
        read-only file system).
    """
    path = Path(path).expanduser()
    if path.is_dir() and not folder:
        raise OutputPathError(f"cannot write {path}: it is a folder; give a file name")
    if folder and path.exists() and not path.is_dir():
        raise OutputPathError(f"cannot write {path}: a file of that name exists (expected a folder)")
    parent = path.parent
    ancestor = parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputPathError(f"cannot write {path}: {ancestor} is a file, not a folder")
    if ancestor != parent and not create_parent:
        raise OutputPathError(f"cannot write {path}: the folder {parent} does not exist")
    target = path if folder and path.is_dir() else ancestor
    try:
        _probe_writable(target)
    except OSError as err:
        reason = err.strerror or str(err)
        raise OutputPathError(f"cannot write {path}: {reason} ({target})") from None
    return path


def _refuse_input_overwrite(path: Path, input_path: PathLike | None) -> None:
    if input_path is None:
        return
    input_path = Path(input_path).expanduser()
    same = False
    try:
        same = os.path.samefile(path, input_path)
    except OSError:  # one of them does not exist (yet)
        pass
    if same or path.resolve() == input_path.resolve():
        raise ValueError(
            f"refusing to overwrite the input image {input_path}: choose another output file"
        )
