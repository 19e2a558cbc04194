"""Child processes for tests/test_faults.py: a capture or a training run, SIGKILLed at a chosen point.

`python fault_worker.py run JOBS_JSON` runs a list of jobs one after the other in this interpreter.
`python fault_worker.py serve` imports torch, transformers and atoms once (about 10 s on the build machine),
prints "ready", then reads one job per line on stdin and runs each in a fresh fork of itself, printing
{"pid": ...} when the child starts and {"status": ...} (os.waitstatus_to_exitcode: -9 for SIGKILL) when it
ends. Forking keeps a dozen kills and resumes within the test file's time budget; every job still runs in a
process of its own that dies for real.

A job is a dict:
  kind: "capture" (the tiny Llama of tiny_models over TEXTS into `dir`) or "train" (a TSAE on the layer-2 rows
    of the capture in `data`, checkpoints in `dir`, final weights and history to `result`).
  kill: None, or {"kind": "fsync" | "replace", "name": file name, "nth": n, "mode": m}: at the n-th such
    event of this process on that file in `dir`, SIGKILL this process. mode "truncate" (fsync only) first cuts
    the file being synced to half its size, i.e. a write interrupted half-way; "before" dies before the call,
    "after" (replace only) right after the rename.
  events: None, or a file to which every fsync/replace in `dir` is appended as a JSON line (the phases).
  ready: None, or a file created once the run is under way (after the first commit), for external kills.
  pause: seconds to sleep after every shard or step, so an external kill lands inside the run.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from tiny_models import byte_tokenizer, tiny_llama

from atoms.activations import capture, load_capture, load_shards
from atoms.aip import AIP
from atoms.train import TrainConfig, train
from atoms.tsae import TSAE

TEXTS = [
    "The quick brown fox jumps over the lazy dog. " * 6,
    "Atoms are sparse directions in the residual stream.",
    "Wikipedia is a free online encyclopedia written by volunteers. " * 4,
]
# 420 rows of 31 per chunk, shards of 64: 7 commits (6 full shards and one of 36), 5 batches of 3 chunks.
CAPTURE = {"layers": [1, 2], "max_tokens": 420, "seq_len": 32, "batch_size": 3, "shard_tokens": 64}
# 420 rows, batches of 64: 6 batches an epoch, so 24 steps cross 3 epoch boundaries; a checkpoint every 3
# steps (8 in all); target_l0 puts the controller's state into the run.
TRAIN = {
    "lr": 1e-3,
    "batch_size": 64,
    "steps": 24,
    "lr_warmup_steps": 4,
    "sparsity_warmup_steps": 8,
    "target_l0": 5.0,
    "checkpoint_every": 3,
    "keep_checkpoints": 2,
    "dead_window": 256,
    "log_every": 1000,
}
N_ATOMS = 64


class _Faults:
    """Wraps os.fsync and os.replace to log events on files in `root` and to die at the chosen one."""

    def __init__(self, root: Path, kill: dict | None, events: str | None) -> None:
        self.root, self.kill, self.events = root.resolve(), kill, events
        self.seen: dict[tuple[str, str], int] = {}
        self.fsync, self.replace = os.fsync, os.replace
        os.fsync, os.replace = self._fsync, self._replace

    def _event(self, kind: str, path: Path) -> str | None:
        """Record the event; return the kill mode if this is the event to die at."""
        path = Path(path).resolve()
        if path.parent != self.root:
            return None
        key = (kind, path.name)
        self.seen[key] = self.seen.get(key, 0) + 1
        if self.events is not None:
            with open(self.events, "a") as f:
                f.write(json.dumps({"kind": kind, "name": path.name}) + "\n")
        k = self.kill
        if k is not None and (k["kind"], k["name"], k["nth"]) == (*key, self.seen[key]):
            return k["mode"]
        return None

    def _fsync(self, fd: int) -> None:
        path = Path(os.readlink(f"/proc/self/fd/{fd}"))
        mode = self._event("fsync", path)
        if mode == "truncate":
            os.truncate(path, path.stat().st_size // 2)
        if mode is not None:
            os.kill(os.getpid(), signal.SIGKILL)
        self.fsync(fd)

    def _replace(self, src, dst) -> None:
        mode = self._event("replace", Path(dst))
        if mode == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        self.replace(src, dst)
        if mode == "after":
            os.kill(os.getpid(), signal.SIGKILL)


def _touch(path: str | None) -> None:
    if path is not None:
        Path(path).touch()


def run_job(job: dict) -> None:
    torch.set_num_threads(1)  # the same blocking in every process, so results compare bit for bit
    out = Path(job["dir"])
    out.mkdir(parents=True, exist_ok=True)
    _Faults(out, job.get("kill"), job.get("events"))
    pause = float(job.get("pause", 0.0))
    if job["kind"] == "capture":
        tok = byte_tokenizer()

        def on_shard(shards: int, _tokens: int) -> None:
            _touch(job.get("ready"))
            time.sleep(pause)

        capture(tiny_llama(tok), tok, TEXTS, out_dir=out, on_shard=on_shard, **CAPTURE)
        return
    data = Path(job["data"])
    x = load_shards(data, 2)
    aip = AIP.from_moment(load_capture(data).moments[2])
    model = TSAE(x.shape[1], N_ATOMS, aip, seed=3)

    def on_step(_stats) -> None:
        _touch(job.get("ready"))
        time.sleep(pause)

    result = train(model, x, TrainConfig(**TRAIN), checkpoint_dir=out, progress=False, callback=on_step)
    torch.save({"model": model.state_dict(), "result": result._asdict()}, job["result"])


def serve() -> None:
    """Fork a child per job line on stdin; report its pid, then its exit status, on stdout."""
    print("ready", flush=True)
    for line in sys.stdin:
        job = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                log = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND)
                os.dup2(log, 1)
                os.dup2(log, 2)
                run_job(job)
            except BaseException:
                traceback.print_exc()
                code = 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        print(json.dumps({"pid": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"status": os.waitstatus_to_exitcode(status)}), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve()
    else:
        for one in json.loads(sys.argv[2]):
            run_job(one)
