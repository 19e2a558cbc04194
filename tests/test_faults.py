"""Kill a capture and a training run with SIGKILL at chosen and at random points, resume, compare.

Every run happens in a child process (tests/fault_worker.py). A kill lands either at a named event, the n-th
fsync or os.replace on a named file (the worker SIGKILLs itself there, optionally after cutting the file
being synced to half its size, which is what a write interrupted half-way leaves), or after a random delay
from this process. Which commit or checkpoint a chain of kills hits is drawn from a seeded generator, so the
file is deterministic. After the last kill a clean run resumes, and the result must equal an uninterrupted
run made in a fresh interpreter: the capture folder file for file (shards and manifest byte for byte, no
shard duplicated or missing; moment checkpoints tensor for tensor, since safetensors writes a metadata map
in a varying key order), the TSAE's weights and history bit for bit.

The four capture chains together hit each file a commit writes (shard, moment checkpoint, manifest) at each
point of its atomic write (half-written temp file, complete temp file before fsync, before the rename, after
the rename); the training chains do the same for checkpoints.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from atoms.activations import load_shards, load_tokens
from atoms.errors import BadInputError
from atoms.train import latest_checkpoint

WORKER = Path(__file__).resolve().parent / "fault_worker.py"
N_COMMITS = 7  # fault_worker.CAPTURE: 420 rows in shards of 64
CHECKPOINTS = [3, 6, 9, 12, 15, 18, 21, 24]  # fault_worker.TRAIN: 24 steps, a checkpoint every 3
KILLED = -signal.SIGKILL
JOB_TIMEOUT = 120.0


class Worker:
    """The forking server of fault_worker.py: one job at a time, each in a fresh child process."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.proc = subprocess.Popen(
            [sys.executable, str(WORKER), "serve"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=WORKER.parent.parent,
        )
        self.n = 0

    def _line(self, timeout: float) -> str:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise TimeoutError(f"fault_worker gave no answer within {timeout} s")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"fault_worker exited with {self.proc.wait()}")
        return line.strip()

    def wait_ready(self) -> None:
        assert self._line(JOB_TIMEOUT) == "ready"

    def run(self, job: dict, kill_after: float | None = None) -> int:
        """Run `job`; with kill_after, SIGKILL the child that long after its ready file appears.

        Returns the child's exit code (-9 when killed); a failure's traceback is in job["log"].
        """
        self.n += 1
        job = {"log": str(self.root / f"job{self.n}.log"), **job}
        if kill_after is not None:
            job["ready"] = str(self.root / f"job{self.n}.ready")
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        pid = json.loads(self._line(JOB_TIMEOUT))["pid"]
        if kill_after is not None:
            deadline = time.monotonic() + JOB_TIMEOUT
            while not Path(job["ready"]).exists() and time.monotonic() < deadline:
                time.sleep(0.005)
            time.sleep(kill_after)
            os.kill(pid, signal.SIGKILL)  # our own child; if it had already ended, the status says so
        return json.loads(self._line(JOB_TIMEOUT))["status"]

    def log(self) -> str:
        return (self.root / f"job{self.n}.log").read_text()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The forking worker, and uninterrupted reference runs made meanwhile in a fresh interpreter."""
    root = tmp_path_factory.mktemp("faults")
    worker = Worker(root)
    ref = {"cap": root / "ref_cap", "ckpt": root / "ref_ckpt", "result": root / "ref_result.pt"}
    jobs = [
        {"kind": "capture", "dir": str(ref["cap"]), "events": str(root / "ref_cap.events")},
        {"kind": "train", "dir": str(ref["ckpt"]), "data": str(ref["cap"]), "result": str(ref["result"])},
    ]
    fresh = subprocess.run(
        [sys.executable, str(WORKER), "run", json.dumps(jobs)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=WORKER.parent.parent,
    )
    assert fresh.returncode == 0, fresh.stderr
    worker.wait_ready()
    yield worker, ref, root
    worker.close()


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def safetensors_content(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """Metadata and tensors: safetensors writes its metadata map in a varying order, so bytes can differ."""
    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}


def committed(folder: Path) -> int:
    manifest = folder / "manifest.json"
    return len(json.loads(manifest.read_text())["shards"]) if manifest.exists() else -1


def assert_same_capture(got: Path, ref: Path) -> None:
    a, b = files(got), files(ref)
    assert sorted(a) == sorted(b)  # no shard, moment or temp file more or less
    for name in b:
        if a[name] == b[name]:
            continue
        assert name.startswith("moment_"), name  # the only files with a metadata map
        (meta_a, ta), (meta_b, tb) = safetensors_content(got / name), safetensors_content(ref / name)
        assert meta_a == meta_b and ta.keys() == tb.keys(), name
        assert all(torch.equal(ta[k], tb[k]) for k in tb), name
    tokens = load_tokens(got)
    pairs = list(zip(tokens.sequence.tolist(), tokens.position.tolist(), strict=True))
    assert len(pairs) == 420 and pairs == sorted(set(pairs))  # every row once, in stream order


# ---------------------------------------------------------------------------------------------- capture


def capture_kill(rng: np.random.Generator, folder: Path, kind: str, target: str, mode: str) -> dict:
    """A kill at one of the next three commits not yet made, on `target` ("shard", "moment", "manifest").

    Three kills of a chain thus stay within the 7 commits (and the final manifest) of a capture.
    """
    done = committed(folder)
    fresh = done < 0
    done = max(done, 0)
    if target == "manifest":
        # Manifest writes of this run: the empty one (fresh runs only), one per commit, the final one.
        c = int(rng.integers(-1 if fresh else done, min(done + 2, N_COMMITS) + 1))
        name = "manifest.json" + (".tmp" if kind == "fsync" else "")
        return {"kind": kind, "name": name, "nth": c - done + 1 + fresh, "mode": mode}
    c = int(rng.integers(done, min(done + 2, N_COMMITS - 1) + 1))
    if target == "shard":
        name = f"shard_{c:05d}.safetensors"
    else:
        name = f"moment_{c + 1:05d}_layer{int(rng.integers(1, 3)):03d}.safetensors"
    return {"kind": kind, "name": name + (".tmp" if kind == "fsync" else ""), "nth": 1, "mode": mode}


CAPTURE_CHAINS = {
    "A": [("fsync", "shard", "truncate"), ("replace", "moment", "before"), ("replace", "manifest", "after")],
    "B": [("fsync", "manifest", "truncate"), ("replace", "shard", "after"), ("fsync", "moment", "truncate")],
    "C": [("replace", "manifest", "before"), ("fsync", "shard", "before"), ("replace", "moment", "after")],
    "D": [("fsync", "moment", "before"), ("replace", "shard", "before"), ("fsync", "manifest", "before")],
}


@pytest.mark.parametrize("chain", sorted(CAPTURE_CHAINS))
def test_capture_killed_three_times_then_resumed(setup, chain):
    worker, ref, root = setup
    rng = np.random.default_rng([7, ord(chain)])
    folder = root / f"cap_{chain}"
    for kind, target, mode in CAPTURE_CHAINS[chain]:
        kill = capture_kill(rng, folder, kind, target, mode)
        status = worker.run({"kind": "capture", "dir": str(folder), "kill": kill})
        assert status == KILLED, (kill, worker.log())
    assert worker.run({"kind": "capture", "dir": str(folder)}) == 0, worker.log()
    assert_same_capture(folder, ref["cap"])


def test_capture_killed_at_random_times(setup):
    worker, ref, root = setup
    folder = root / "cap_random"
    for delay in np.random.default_rng(11).uniform(0.0, 0.2, size=2):
        assert worker.run({"kind": "capture", "dir": str(folder), "pause": 0.05}, kill_after=delay) == KILLED
    assert worker.run({"kind": "capture", "dir": str(folder)}) == 0, worker.log()
    assert_same_capture(folder, ref["cap"])


def test_capture_debris_is_never_read(setup):
    """Files a crash (or anything else) left beside the manifest are discarded and rewritten, never read."""
    worker, ref, root = setup
    folder = root / "cap_debris"
    kill = {"kind": "replace", "name": "manifest.json", "nth": 4, "mode": "after"}  # after commit 3
    assert worker.run({"kind": "capture", "dir": str(folder), "kill": kill}) == KILLED
    assert committed(folder) == 3
    half = ref["cap"] / "shard_00003.safetensors"
    (folder / "shard_00003.safetensors").write_bytes(half.read_bytes()[: half.stat().st_size // 2])
    (folder / "shard_00004.safetensors.tmp").write_bytes(b"\0" * 100)
    (folder / "moment_00004_layer001.safetensors").write_bytes(b"not a moment")
    (folder / "manifest.json.tmp").write_text('{"format": 1, "shards": [')
    events = root / "debris.events"
    assert worker.run({"kind": "capture", "dir": str(folder), "events": str(events)}) == 0, worker.log()
    assert_same_capture(folder, ref["cap"])
    written = [json.loads(line)["name"] for line in events.read_text().splitlines()]
    assert written[:2] == ["shard_00003.safetensors.tmp", "shard_00003.safetensors"]  # rewritten first


def test_capture_with_a_damaged_committed_shard_says_so(setup):
    """A shard the manifest lists but that was damaged later: a clear error, never its bytes."""
    worker, ref, root = setup
    folder = root / "cap_damaged"
    shutil.copytree(ref["cap"], folder)
    shard = folder / "shard_00002.safetensors"
    os.truncate(shard, shard.stat().st_size - 7)
    message = r"shard_00002\.safetensors.*is unreadable.*Delete .* and capture again"
    with pytest.raises(BadInputError, match=message):
        load_shards(folder, 1)
    with pytest.raises(BadInputError, match=message):
        load_tokens(folder)
    assert worker.run({"kind": "capture", "dir": str(folder)}) == 1
    assert "BadInputError" in worker.log() and "shard_00002.safetensors" in worker.log()


# ---------------------------------------------------------------------------------------------- training


def train_job(folder: Path, ref: dict, root: Path, **extra) -> dict:
    result = str(root / f"{folder.name}.pt")
    return {"kind": "train", "dir": str(folder), "data": str(ref["cap"]), "result": result, **extra}


def train_kill(rng: np.random.Generator, folder: Path, kind: str, mode: str) -> dict:
    latest = latest_checkpoint(folder) if folder.exists() else None
    done = int(latest.name[5:-3]) if latest else 0
    # One of the next three checkpoints: three kills of a chain stay within the run's eight.
    step = int(rng.choice([s for s in CHECKPOINTS if s > done][:3]))
    name = f".step_{step:09d}.pt.tmp" if kind == "fsync" else f"step_{step:09d}.pt"
    return {"kind": kind, "name": name, "nth": 1, "mode": mode}


def assert_equal_values(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name, value in b.items():
        same = torch.equal(a[name], value) if isinstance(value, torch.Tensor) else a[name] == value
        assert same, name


def assert_same_training(folder: Path, got: Path, ref: dict) -> None:
    a, b = torch.load(got, weights_only=True), torch.load(ref["result"], weights_only=True)
    assert_equal_values(a["model"], b["model"])  # weights and the scales, bit for bit
    assert_equal_values(a["result"], b["result"])  # per-step history, final lambda, dead latents
    # keep_checkpoints = 2 and no temporary file left behind by any of the kills.
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in ref["ckpt"].iterdir())


TRAIN_CHAINS = {
    "A": [("fsync", "truncate"), ("replace", "before"), ("replace", "after")],
    "B": [("fsync", "before"), ("replace", "after"), ("fsync", "truncate")],
}


@pytest.mark.parametrize("chain", sorted(TRAIN_CHAINS))
def test_training_killed_three_times_then_resumed(setup, chain):
    worker, ref, root = setup
    rng = np.random.default_rng([8, ord(chain)])
    folder = root / f"train_{chain}"
    for kind, mode in TRAIN_CHAINS[chain]:
        kill = train_kill(rng, folder, kind, mode)
        assert worker.run(train_job(folder, ref, root, kill=kill)) == KILLED, (kill, worker.log())
    assert worker.run(train_job(folder, ref, root)) == 0, worker.log()
    assert_same_training(folder, root / f"{folder.name}.pt", ref)


def test_training_killed_at_random_times(setup):
    worker, ref, root = setup
    folder = root / "train_random"
    for delay in np.random.default_rng(12).uniform(0.0, 0.2, size=2):
        status = worker.run(train_job(folder, ref, root, pause=0.02), kill_after=delay)
        assert status == KILLED
    assert worker.run(train_job(folder, ref, root)) == 0, worker.log()
    assert_same_training(folder, root / f"{folder.name}.pt", ref)


def test_damaged_latest_checkpoint_is_a_clear_error_and_the_fix_works(setup):
    """A truncated newest checkpoint stops the resume with a message; doing what it says resumes exactly."""
    worker, ref, root = setup
    folder = root / "train_damaged"
    kill = {"kind": "replace", "name": "step_000000012.pt", "nth": 1, "mode": "after"}
    assert worker.run(train_job(folder, ref, root, kill=kill)) == KILLED
    newest = folder / "step_000000012.pt"
    os.truncate(newest, newest.stat().st_size // 3)
    (folder / ".step_000000015.pt.tmp").write_bytes(b"half a checkpoint")  # never read
    assert worker.run(train_job(folder, ref, root)) == 1
    assert "step_000000012.pt is unreadable" in worker.log()
    assert "delete it to resume from an older one" in worker.log()
    newest.unlink()
    assert worker.run(train_job(folder, ref, root)) == 0, worker.log()
    assert_same_training(folder, root / f"{folder.name}.pt", ref)
