"""Non-blocking MLflow logging that outlives a tracking-server outage, and the replay of what it could not send.

Why not MLflow's own asynchronous logging (`log_metrics(..., synchronous=False)`, MLFLOW_ENABLE_ASYNC_LOGGING)?
In mlflow 3.x (`mlflow/utils/async_logging/async_logging_queue.py`) its queue is unbounded; a batch whose request
still fails after the client's HTTP retries is logged as an error and dropped; batches go out on a thread pool, so
not in order; and `end_run` waits for the queue and then calls `set_terminated` with the process-wide retry budget
(MLFLOW_HTTP_REQUEST_MAX_RETRIES=7, backoff factor 2 capped at 120 s, MLFLOW_HTTP_REQUEST_TIMEOUT=120 s: minutes
per call, the stall measured in issue 20).

`Outbox` queues metrics, params, tags and the run's final status in memory. One background thread sends them in
order, as `runs/log-batch` requests of its own: one attempt each (no client retries), CONNECT_TIMEOUT_S to connect and
READ_TIMEOUT_S to answer (a batch that timed out is sent again in halves), and a growing pause (up to MAX_BACKOFF_S) while the server is away, so the training step never waits on the network.
The buffer is bounded (`max_buffered` values): beyond it new metric values go straight to the local file.
`close()` lets the queue drain (at most CLOSE_WAIT_S more while the server is away) and writes whatever is left to
that file (JSON lines); `bitllava runs replay FILE` sends it into the run later.
"""

from __future__ import annotations

import collections
import json
import os
import sys
import threading
import time
from dataclasses import dataclass

from components import storage

CONNECT_TIMEOUT_S, READ_TIMEOUT_S = 3, 30  # one request of the background sender (a busy server may be slow)
MAX_BACKOFF_S = 4.0  # longest pause between two tries while the server does not answer
CLOSE_WAIT_S = 30.0  # how long close() keeps trying an unreachable server before writing the file
DRAIN_LIMIT_S = 600.0  # how long close() lets a reachable server take the rest of the queue
MAX_BUFFERED = 200_000  # metric values held in memory (about 40 MB); more go straight to the file
BATCH_METRICS, BATCH_PARAMS, BATCH_TAGS = 900, 90, 90  # within MLflow's log-batch limits (1000 / 100 / 100)
PARAM_VALUE_LIMIT = 6000


def _say(message: str) -> None:
    print(f"[mlflow] {message}", file=sys.stderr, flush=True)


def unsent_file(out: str, run_id: str) -> tuple[str, str | None]:
    """(local file for the unsent records, storage URI to copy it to at close or None): `<out>/mlflow-unsent/
    <run_id>.jsonl` when `out` is a local folder; under the temp folder (copied to `out` at close) for s3://."""
    if storage.is_s3(out):
        import tempfile

        return (os.path.join(tempfile.gettempdir(), "bitllava-mlflow-unsent", f"{run_id}.jsonl"),
                storage.join(out, "mlflow-unsent", f"{run_id}.jsonl"))
    return os.path.join(os.path.abspath(out), "mlflow-unsent", f"{run_id}.jsonl"), None


def unsent_left(out: str, run_id: str) -> str | None:
    """The file of a run's unsent records, when a logger left one (the driver's check after training); says so."""
    local, copy = unsent_file(out, run_id)
    found = copy if copy and storage.exists(copy) else local if os.path.exists(local) else None
    if found:
        _say(f"run {run_id} is missing values in MLflow (the server was away at the end); they are kept in "
             f"{found}: `bitllava runs replay {found}` sends them")
    return found


@dataclass
class Delivery:
    """What close() reports: values sent, values left in `file` (None when everything was sent)."""
    sent: int
    unsent: int
    file: str | None
    copy: str | None = None  # the file's copy on the output storage (s3:// outputs)

    def replay_command(self) -> str | None:
        return f"bitllava runs replay {self.copy or self.file}" if self.file else None


class _Sender:
    """One attempt per call: log-batch / run update on an http(s) server without client retries, else the store."""

    def __init__(self, tracking_uri: str, run_id: str):
        self.uri, self.run_id = tracking_uri, run_id
        self.http = tracking_uri.startswith(("http://", "https://"))

    def send(self, metrics: list, params: dict, tags: dict, status: tuple | None) -> None:
        """Raises ConnectionError (worth another try) or ValueError (the server refused the records)."""
        if not self.http:
            from mlflow.entities import Metric, Param, RunTag
            from mlflow.tracking import MlflowClient

            client = MlflowClient(self.uri)
            if metrics or params or tags:
                client.log_batch(self.run_id, metrics=[Metric(k, v, ts, s) for k, v, ts, s in metrics],
                                 params=[Param(k, v) for k, v in params.items()],
                                 tags=[RunTag(k, v) for k, v in tags.items()])
            if status:
                client.set_terminated(self.run_id, status=status[0], end_time=status[1])
            return
        if metrics or params or tags:
            self._post("/api/2.0/mlflow/runs/log-batch", {
                "run_id": self.run_id,
                "metrics": [{"key": k, "value": v, "timestamp": ts, "step": s} for k, v, ts, s in metrics],
                "params": [{"key": k, "value": v} for k, v in params.items()],
                "tags": [{"key": k, "value": v} for k, v in tags.items()]})
        if status:
            self._post("/api/2.0/mlflow/runs/update", {"run_id": self.run_id, "run_uuid": self.run_id,
                                                        "status": status[0], "end_time": status[1]})

    def _post(self, endpoint: str, body: dict) -> None:
        from mlflow.utils.credentials import get_default_host_creds
        from mlflow.utils.rest_utils import http_request

        try:
            response = http_request(get_default_host_creds(self.uri), endpoint, "POST", json=body, max_retries=0,
                                    timeout=(CONNECT_TIMEOUT_S, READ_TIMEOUT_S))
        except Exception as err:  # connection refused, timeout, DNS: MLflow wraps them in MlflowException
            raise ConnectionError(str(err).splitlines()[0][:300]) from None
        if response.status_code == 429 or response.status_code >= 500:
            raise ConnectionError(f"HTTP {response.status_code} from {self.uri}")
        if response.status_code >= 400:
            raise ValueError(f"HTTP {response.status_code} from {self.uri}{endpoint}: {response.text[:300]}")


class Outbox:
    """Ordered, bounded, non-blocking logging of one run's metrics, params, tags and final status."""

    def __init__(self, tracking_uri: str, run_id: str, file: str, copy_to: str | None = None,
                 max_buffered: int = MAX_BUFFERED):
        self.uri, self.run_id, self.file, self.copy_to = tracking_uri, run_id, file, copy_to
        self.max_buffered = max_buffered
        self._sender = _Sender(tracking_uri, run_id)
        self._metrics: collections.deque = collections.deque()  # (key, value, timestamp ms, step)
        self._params: dict = {}
        self._tags: dict = {}
        self._status: tuple | None = None
        self._batch = BATCH_METRICS  # metric values per request: halved after a timeout, doubled after a success
        self._spilled = 0  # values written to the file while the buffer was full
        self._sent = 0
        self._cond = threading.Condition()
        self._file_lock = threading.Lock()
        self._closing_at: float | None = None
        self.reachable = True
        self._down_since: float | None = None
        self._take_over_file()
        self._thread = threading.Thread(target=self._run, name=f"mlflow-outbox-{run_id[:8]}", daemon=True)
        self._thread.start()

    def _take_over_file(self) -> None:
        """Records an earlier attempt of this run (a restarted worker) left unsent go out first."""
        if not os.path.exists(self.file):
            return
        with open(self.file) as f:
            records = [json.loads(line) for line in f if line.strip()]
        for record in records[1:]:
            self._metrics.extend(tuple(m) for m in record.get("metrics", []))
            self._params.update(record.get("params", {}))
            self._tags.update(record.get("tags", {}))
        os.remove(self.file)
        _say(f"sending {len(self._metrics)} metric values an earlier attempt left in {self.file}")

    # -- producers (the training step): never wait on the network --
    def log_metrics(self, metrics: dict, step: int = 0, timestamp_ms: int | None = None) -> None:
        ts = int(time.time() * 1000) if timestamp_ms is None else timestamp_ms
        rows = [(k, float(v), ts, int(step)) for k, v in metrics.items()]
        with self._cond:
            room = max(0, self.max_buffered - len(self._metrics))
            self._metrics.extend(rows[:room])
            overflow = rows[room:]
            self._cond.notify()
        if overflow:
            if not self._spilled:
                _say(f"buffer full ({self.max_buffered} values): further metric values go to {self.file}")
            self._spilled += len(overflow)
            self._append({"metrics": [list(r) for r in overflow]})

    def log_params(self, params: dict) -> None:
        with self._cond:
            self._params.update({k: str(v)[:PARAM_VALUE_LIMIT] for k, v in params.items()})
            self._cond.notify()

    def set_tags(self, tags: dict) -> None:
        with self._cond:
            self._tags.update({k: str(v) for k, v in tags.items()})
            self._cond.notify()

    def set_terminated(self, status: str = "FINISHED") -> None:
        """Sent after everything queued before it."""
        with self._cond:
            self._status = (status, int(time.time() * 1000))
            self._cond.notify()

    def pending(self) -> int:
        with self._cond:
            return len(self._metrics) + len(self._params) + len(self._tags) + (self._status is not None)

    # -- the background sender --
    def _take(self):
        metrics = [self._metrics[i] for i in range(min(self._batch, len(self._metrics)))]
        params = dict(list(self._params.items())[:BATCH_PARAMS])
        tags = dict(list(self._tags.items())[:BATCH_TAGS])
        rest = len(self._metrics) > len(metrics) or len(self._params) > len(params) or len(self._tags) > len(tags)
        return metrics, params, tags, (None if rest else self._status)

    def _drop(self, metrics, params, tags, status) -> None:
        for _ in metrics:
            self._metrics.popleft()
        for k in params:
            self._params.pop(k, None)
        for k in tags:
            self._tags.pop(k, None)
        if status is not None and self._status == status:
            self._status = None

    def _run(self) -> None:
        backoff = 0.5
        while True:
            with self._cond:
                while not self.pending() and self._closing_at is None:
                    self._cond.wait()
                if not self.pending():
                    return
                if self._closing_at is not None:
                    limit = DRAIN_LIMIT_S if self.reachable else CLOSE_WAIT_S
                    if time.monotonic() - self._closing_at > limit:
                        return
                batch = self._take()
            try:
                self._sender.send(*batch)
            except ConnectionError as err:
                if any(w in str(err).lower() for w in ("timed out", "timeout")):
                    self._batch = max(10, self._batch // 2)
                if self.reachable:
                    self.reachable, self._down_since = False, time.monotonic()
                    _say(f"{self.uri} does not answer ({err}); training goes on, metrics wait in memory "
                         f"(up to {self.max_buffered} values, then in {self.file}) and are sent when it answers")
                with self._cond:
                    self._cond.wait(backoff)  # close() wakes it for one more try at once
                backoff = min(2 * backoff, MAX_BACKOFF_S)
                continue
            except ValueError as err:  # refused for good: keep the records in the file, go on with the rest
                _say(f"the server refused {len(batch[0])} metrics / {len(batch[1])} params / {len(batch[2])} tags "
                     f"({err}); they are kept in {self.file}")
                self._append(self._record(*batch))
            else:
                self._sent += len(batch[0]) + len(batch[1]) + len(batch[2])
                self._batch = min(BATCH_METRICS, 2 * self._batch)
            with self._cond:
                self._drop(*batch)
                waiting = len(self._metrics)
            backoff = 0.5
            if not self.reachable:
                self.reachable = True
                _say(f"{self.uri} answers again after {time.monotonic() - self._down_since:.0f} s; sending the "
                     f"buffered values ({waiting + len(batch[0])} metric values)")

    # -- the end --
    def close(self) -> Delivery:
        """Let the queue drain, write what is left to the file, say where it is and how to replay it."""
        with self._cond:
            self._closing_at = time.monotonic()
            self._cond.notify_all()
        self._thread.join(DRAIN_LIMIT_S + CONNECT_TIMEOUT_S + READ_TIMEOUT_S + 5)
        with self._cond:
            left = self._record(list(self._metrics), dict(self._params), dict(self._tags), self._status)
            unsent = len(self._metrics) + len(self._params) + len(self._tags)
            self._metrics.clear(), self._params.clear(), self._tags.clear()
            self._status = None
        if unsent or left.get("status"):
            self._append(left)
        unsent += self._spilled
        if not os.path.exists(self.file):
            return Delivery(self._sent, 0, None)
        copy = None
        if self.copy_to:
            try:
                with open(self.file, "rb") as f:
                    storage.write_bytes_atomic(self.copy_to, f.read())
                copy = self.copy_to
            except Exception as err:  # the object store may be away too: the local file stays
                _say(f"could not copy {self.file} to {self.copy_to}: {err}")
        delivery = Delivery(self._sent, unsent, self.file, copy)
        _say(f"NOT LOGGED: {unsent} values (and the run's final status) of run {self.run_id} could not be sent to "
             f"{self.uri}; they are kept in {copy or self.file}. Once the server is back, send them with: "
             f"{delivery.replay_command()}")
        return delivery

    @staticmethod
    def _record(metrics, params, tags, status) -> dict:
        record = {}
        if metrics:
            record["metrics"] = [list(m) for m in metrics]
        if params:
            record["params"] = params
        if tags:
            record["tags"] = tags
        if status:
            record["status"], record["end_time"] = status
        return record

    def _append(self, record: dict) -> None:
        with self._file_lock:
            self._write(record)

    def _write(self, record: dict) -> None:
        new = not os.path.exists(self.file)
        os.makedirs(os.path.dirname(self.file) or ".", exist_ok=True)
        with open(self.file, "a") as f:
            if new:
                f.write(json.dumps({"tracking_uri": self.uri, "run_id": self.run_id}) + "\n")
            f.write(json.dumps(record) + "\n")


def log_or_keep(tracking_uri: str, run_id: str, out: str, metrics: dict | None = None, params: dict | None = None,
                tags: dict | None = None, status: str | None = None, step: int = 0) -> Delivery:
    """One-shot logging (an eval's results, a pipeline step's run, the parent run's end) that does not fail when
    the server is away: what it cannot send within CLOSE_WAIT_S is kept under `<out>/mlflow-unsent/`."""
    file, copy = unsent_file(out, run_id)
    box = Outbox(tracking_uri, run_id, file, copy)
    if params:
        box.log_params(params)
    if tags:
        box.set_tags(tags)
    if metrics:
        box.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)
    if status:
        box.set_terminated(status)
    return box.close()


class SystemMetrics:
    """MLflow's system metrics (CPU, memory, disk, network, GPU as `system/...`) sampled into an Outbox, so that
    they too wait out an outage (MLflow's own monitor stops for good at the first failed request)."""

    def __init__(self, outbox: Outbox, interval_s: float = 10.0):
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self.outbox, self.interval = outbox, interval_s
        self.monitor = SystemMetricsMonitor(outbox.run_id, tracking_uri=outbox.uri)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mlflow-system-metrics", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        step = 0
        while not self._stop.wait(self.interval):
            try:
                self.monitor.collect_metrics()
                values = self.monitor.aggregate_metrics()
                for m in self.monitor.monitors:
                    m.clear_metrics()
            except Exception:  # a sensor that fails (no GPU driver, ...) must not end the run
                continue
            self.outbox.log_metrics({f"system/{k}": v for k, v in values.items()}, step=step)
            step += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def replay(path: str, tracking_uri: str | None = None) -> dict:
    """Send a file written by Outbox.close() into its run (metrics, params, tags, then the final status)."""
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    text = storage.read_bytes(path).decode() if storage.is_s3(path) else open(path).read()
    lines = [json.loads(line) for line in text.splitlines() if line.strip()]
    if not lines or "run_id" not in lines[0]:
        raise ValueError(f"{path} is not a file of unsent MLflow records (its first line names no run_id)")
    run_id, uri = lines[0]["run_id"], tracking_uri or lines[0]["tracking_uri"]
    metrics, params, tags, status = [], {}, {}, None
    for record in lines[1:]:
        if record.get("run_id") not in (None, run_id):
            raise ValueError(f"{path} mixes runs {run_id} and {record['run_id']}")
        metrics += record.get("metrics", [])
        params.update(record.get("params", {}))
        tags.update(record.get("tags", {}))
        if record.get("status"):
            status = (record["status"], record["end_time"])
    client = MlflowClient(uri)
    client.get_run(run_id)  # a clear error when the run is not in that store
    for i in range(0, len(metrics), BATCH_METRICS):
        client.log_batch(run_id, metrics=[Metric(k, v, ts, s) for k, v, ts, s in metrics[i:i + BATCH_METRICS]])
    items = list(params.items())
    for i in range(0, len(items), BATCH_PARAMS):
        client.log_batch(run_id, params=[Param(k, v) for k, v in items[i:i + BATCH_PARAMS]])
    items = list(tags.items())
    for i in range(0, len(items), BATCH_TAGS):
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in items[i:i + BATCH_TAGS]])
    if status:
        client.set_terminated(run_id, status=status[0], end_time=status[1])
    done = None
    if not storage.is_s3(path):
        done = path + ".replayed"
        os.replace(path, done)  # a second replay of the same file would log every value twice
    return {"run_id": run_id, "tracking_uri": uri, "metrics": len(metrics), "params": len(params),
            "tags": len(tags), "status": status[0] if status else None, "file": done or path}
