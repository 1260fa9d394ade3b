"""What an offline wandb run wrote: the records of its ``run-<id>.wandb`` file (wandb's transaction log, a LevelDB
log of protobuf records), for tests that check the dashboard side of a run by reading the real artifact."""
import struct
from pathlib import Path
from typing import Dict, Iterator, List

from wandb.proto import wandb_internal_pb2 as pb

BLOCK, HEADER = 32768, 7  # LevelDB log blocks; the file header and each record header are 7 bytes
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> Iterator["pb.Record"]:
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a wandb transaction log"
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        if BLOCK - pos % BLOCK < HEADER:  # a block's tail too short for a header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        chunk, pos = data[pos + HEADER:pos + HEADER + length], pos + HEADER + length
        if kind == 0 and length == 0:
            break
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(pending)
            yield record


def _items(items) -> Dict[str, str]:
    return {item.key or "/".join(item.nested_key): item.value_json for item in items}


def read_run(run_dir: Path) -> dict:
    """The run record (id, name, group, job type), the config, every history row, the final summary and the
    artifacts (name, type, file names) of the offline run in ``run_dir`` (``wandb/offline-run-*``)."""
    (path,) = Path(run_dir).glob("run-*.wandb")
    out: dict = {"config": {}, "history": [], "summary": {}, "artifacts": []}
    for r in records(path):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            out.update(id=r.run.run_id, name=r.run.display_name, group=r.run.run_group, job_type=r.run.job_type)
        elif kind == "config":
            out["config"].update(_items(r.config.update))
        elif kind == "history":
            out["history"].append(_items(r.history.item))
        elif kind == "summary":
            out["summary"].update(_items(r.summary.update))
        elif kind == "artifact":
            out["artifacts"].append({"name": r.artifact.name, "type": r.artifact.type,
                                     "files": sorted(e.path for e in r.artifact.manifest.contents)})
    return out


def offline_runs(job_dir: Path) -> List[Path]:
    return sorted((Path(job_dir) / "wandb").glob("offline-run-*"))
