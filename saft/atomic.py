"""Files written whole or not at all."""
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_path(path) -> Iterator[Path]:
    """A temporary name beside ``path`` to write to, renamed onto ``path`` when the block ends without an
    error: a kill leaves the old file or the complete new one, never a truncated file under the real name."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # two processes writing one file never share it
    yield tmp
    os.replace(tmp, path)
