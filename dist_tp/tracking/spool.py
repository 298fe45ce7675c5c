"""The spool: every tracking event of a run folder, appended to ``<run>/mlflow/spool.jsonl``
before it goes anywhere, and its delivery to MLflow.

``mlflow/state.json`` (written atomically) holds the tracking URI, the run id and how many
spool lines have been delivered, so a replay or a resumed training run never sends an event
twice.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from dist_tp.config import ConfigError
from dist_tp.core.files import write_json
from dist_tp.tracking.store import ensure_experiment, open_client

log = logging.getLogger(__name__)

SPOOL_DIR = "mlflow"
PARAMS_PER_BATCH = 100  # MLflow's limits per log_batch call
METRICS_PER_BATCH = 1000


class Spool:
    """The append-only event log of one run folder, and its delivery state."""

    def __init__(self, out: str | Path) -> None:
        self.dir = Path(out) / SPOOL_DIR
        self.path = self.dir / "spool.jsonl"
        self.state_path = self.dir / "state.json"

    def exists(self) -> bool:
        return self.path.is_file()

    def append(self, event: dict) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        line = json.dumps(event, separators=(",", ":")) + "\n"
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()

    def events(self) -> list[dict]:
        """Every complete event; a torn last line (a kill mid-write) is dropped with a warning."""
        if not self.path.is_file():
            return []
        events = []
        lines = self.path.read_text(encoding="utf-8").splitlines()
        for number, line in enumerate(lines, 1):
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError as exc:
                if number == len(lines):
                    log.warning("%s:%d: incomplete last event ignored", self.path, number)
                    break
                raise ConfigError(f"{self.path}:{number}: not a spool event: {exc}") from exc
        return events

    def state(self) -> dict:
        if not self.state_path.is_file():
            return {"delivered": 0}
        try:
            return json.loads(self.state_path.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{self.state_path}: unreadable spool state: {exc}") from exc

    def save_state(self, state: dict) -> None:
        write_json(self.state_path, state)

    def undelivered(self) -> int:
        """How many events MLflow has not received yet."""
        if not self.exists():
            return 0
        return max(0, len(self.events()) - self.state().get("delivered", 0))


class Delivery:
    """Sends spool events to one MLflow tracking URI; the run id lives in the spool state."""

    def __init__(self, spool: Spool, uri: str) -> None:
        self.spool, self.uri = spool, uri
        self.client = open_client(uri)

    def send(self, events: list[dict], state: dict) -> int:
        """Deliver ``events`` in order, updating ``state`` (saved after each event batch).
        Returns how many were delivered; raises on the first failure (what was delivered
        before it is recorded)."""
        sent = 0
        try:
            for event in events:
                self._send_one(event, state)
                sent += 1
                state["delivered"] = state.get("delivered", 0) + 1
        finally:
            if sent:
                self.spool.save_state(state)
        return sent

    def _send_one(self, event: dict, state: dict) -> None:
        from mlflow.entities import Metric, Param, RunStatus

        op = event["op"]
        client = self.client
        if op == "start":
            if not state.get("run_id"):
                exp_id = ensure_experiment(client, event["experiment"])
                run = client.create_run(exp_id, run_name=event["run_name"], tags=event["tags"])
                state.update(run_id=run.info.run_id, experiment_id=exp_id, uri=self.uri)
                self.spool.save_state(state)  # the run exists: never create it twice
                params = [Param(k, v) for k, v in event["params"].items()]
                for i in range(0, len(params), PARAMS_PER_BATCH):
                    client.log_batch(state["run_id"], params=params[i : i + PARAMS_PER_BATCH])
            else:  # a resumed run continues the same MLflow run
                client.update_run(state["run_id"], status=RunStatus.to_string(RunStatus.RUNNING))
        elif op == "metrics":
            metrics = [
                Metric(k, float(v), int(event["ts"]), int(event["step"]))
                for k, v in event["values"].items()
            ]
            for i in range(0, len(metrics), METRICS_PER_BATCH):
                client.log_batch(state["run_id"], metrics=metrics[i : i + METRICS_PER_BATCH])
        elif op == "artifact":
            local = self.spool.dir.parent / event["path"]
            if local.is_file():
                client.log_artifact(state["run_id"], str(local), event.get("dir") or None)
            else:
                log.warning("artifact %s is gone; not sent", local)
        elif op == "end":
            client.set_terminated(state["run_id"], status=event["status"])
        else:
            raise ConfigError(f"{self.spool.path}: unknown spool event {op!r}")
