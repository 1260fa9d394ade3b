"""Files written whole or not at all."""
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_path(path) -> Iterator[Path]:
    """A temporary name beside ``path`` to write to, renamed onto ``path`` when the block ends without an
    error: a kill leaves the old file or the complete new one, never a truncated file under the real name. The file
    gets the mode the user's umask gives a new file, whatever wrote it."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # two processes writing one file never share it
    yield tmp
    os.chmod(tmp, 0o666 & ~_umask())  # safetensors creates its files 0600: labmates on a shared disk read them too
    os.replace(tmp, path)


def _umask() -> int:
    try:  # Linux says it; setting it to read it would open a window in which other threads' files are 0666
        return int(next(line for line in open("/proc/self/status") if line.startswith("Umask:")).split()[1], 8)
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0)
        os.umask(mask)
        return mask
