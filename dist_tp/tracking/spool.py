"""The spool: every tracking event of a run folder, appended to ``<run>/mlflow/spool.jsonl``
before it goes anywhere, and its delivery to MLflow.

``mlflow/state.json`` (written atomically) holds the tracking URI (recorded when the run
starts, whether or not MLflow answers), the run id and how many spool lines have been
delivered, so a replay or a resumed training run never sends an event twice.

Two kinds of event are delivered with care:

- final metrics (``"final": true``, a run's test figures): a key whose value the MLflow run
  already holds is not logged again, so a run killed after its final metrics and resumed,
  or an event delivered but not yet counted when the process died, leaves one point per key;
- an artifact that the store refuses (or a file that is gone) while the tracking server
  answers is skipped with a warning naming it and listed in the state's ``skipped``; a
  server that does not answer keeps it spooled, as any other event.
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
            values = event["values"]
            if event.get("final"):  # once per run: what the run holds already is not repeated
                held = client.get_run(state["run_id"]).data.metrics
                values = {k: v for k, v in values.items() if held.get(k) != float(v)}
            metrics = [
                Metric(k, float(v), int(event["ts"]), int(event["step"])) for k, v in values.items()
            ]
            for i in range(0, len(metrics), METRICS_PER_BATCH):
                client.log_batch(state["run_id"], metrics=metrics[i : i + METRICS_PER_BATCH])
        elif op == "artifact":
            self._send_artifact(event, state)
        elif op == "end":
            client.set_terminated(state["run_id"], status=event["status"])
        else:
            raise ConfigError(f"{self.spool.path}: unknown spool event {op!r}")

    def _send_artifact(self, event: dict, state: dict) -> None:
        """Upload one artifact. When that fails but the tracking server answers, the store
        refused the file (or it went): skip it with a warning and list it in the state's
        ``skipped``, so the spool goes on and the run still ends. When the server does not
        answer, raise: the event stays spooled."""
        local = self.spool.dir.parent / event["path"]
        reason = "the file is gone"
        if local.is_file():
            try:
                self.client.log_artifact(state["run_id"], str(local), event.get("dir") or None)
                return
            except Exception as exc:  # noqa: BLE001 - the store's or the file's failure
                try:
                    self.client.get_run(state["run_id"])
                except Exception:  # noqa: BLE001 - the server is down: keep it spooled
                    raise exc from None
                reason = f"{type(exc).__name__}: {first_line(exc)}"
        log.warning(
            "artifact %s was not uploaded to MLflow run %s (%s); skipped, the run goes on",
            local,
            state["run_id"],
            reason,
        )
        skipped = state.setdefault("skipped", [])
        if event["path"] not in skipped:
            skipped.append(event["path"])


def first_line(exc: BaseException, limit: int = 300) -> str:
    """An exception's message, one line, at most ``limit`` characters."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else ""
