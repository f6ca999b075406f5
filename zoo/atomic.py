"""Writing files and folders so that they appear complete or not at all: everything is written beside the
target under a temporary name, then renamed into place (a rename within a folder is atomic). An interrupted
save never leaves a half-written file under the real name."""
import os
import shutil
from pathlib import Path


def write_file(path, data):
    """Write `data` (bytes, str as UTF-8, or a function given the open binary file to write into) to `path`."""
    def write(tmp):
        with open(tmp, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data if isinstance(data, bytes) else data.encode("utf-8"))
    return make_file(path, write)


def make_file(path, make):
    """Make `path` with `make(tmp)` writing the file at a temporary path beside it (this process's own), then
    renamed into place: processes making the same file at once never see one half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        make(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_folder(folder, fill):
    """Make `folder` with `fill(tmp)` writing its files into a folder beside it, then renamed into place
    (an older folder of that name is swapped aside and removed). An older folder holding anything the new one
    does not (the user's own files beside a model: a README, a generation_config.json, a src/ folder) is not
    replaced: ValueError naming them."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        fill(tmp)
        if folder.exists() and (kept := sorted({p.name for p in folder.iterdir()} - {p.name for p in tmp.iterdir()})):
            raise ValueError(f"{folder} holds {', '.join(kept[:5])}{' ...' if len(kept) > 5 else ''}, which this "
                             "save would not write: save to a new or empty folder, or move them out first")
        if folder.exists():  # swap: the old save goes aside, the new one takes its name, the old is removed
            old = folder.parent / f".{folder.name}.old-{os.getpid()}"
            os.replace(folder, old)
            os.replace(tmp, folder)
            shutil.rmtree(old)
        else:
            os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
