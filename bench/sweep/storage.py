"""Where a study lives: a journal file (default) or an RDB URL, both with Optuna's trial heartbeats.

``study.optimize`` records a heartbeat of every running trial and, before each new trial, fails the RUNNING trials
whose heartbeat is older than the grace period (a worker that died), then calls the storage's stale-trial callback.
RDBStorage implements that protocol (optuna.storages.BaseHeartbeat); JournalStorage does not, so ``HeartbeatJournal``
adds it: the heartbeat is a trial system attribute written through the journal, like every other trial update.
"""

from __future__ import annotations

import inspect
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import optuna
from optuna.storages import JournalStorage
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from bench import tracking
from bench.validate import ConfigError

RDB_SCHEMES = ("sqlite", "postgresql", "mysql")


@dataclass
class Storage:
    url: str  # what the user gave, made absolute for journal files
    optuna: Any  # the optuna storage object
    journal: Path | None = None  # the journal file, for journal storages

    def dashboard_command(self) -> str:
        inside = self.journal is not None and self.journal.is_relative_to(Path.cwd())
        return f"optuna-dashboard {self.journal.relative_to(Path.cwd()) if inside else self.url} --host 127.0.0.1"

    def safe_url(self) -> str:
        """The URL with its password masked (for tags and printed lines)."""
        password = urlparse(self.url).password
        return self.url.replace(f":{password}@", ":***@") if password else self.url


def check_storage(spec: str, timeout: float = 3.0) -> None:
    """Fail fast on a storage that cannot work; creates nothing. Talks only to the URL's own host."""
    if "://" not in spec:
        path = Path(spec).expanduser().resolve()
        if path.exists() and not path.is_file():
            raise ConfigError(f"sweep.storage {spec!r}: {path} exists and is not a file (expected a journal file)")
        if path.is_file() and path.stat().st_size:  # Optuna would append to a foreign file before failing to read it
            with open(path, "rb") as handle:
                first = handle.readline(65536)
            try:
                is_journal = "op_code" in json.loads(first)
            except (ValueError, TypeError):
                is_journal = False
            if not is_journal:
                raise ConfigError(f"sweep.storage {spec!r}: {path} is not an Optuna journal file; give a new path "
                                  f"or an RDB URL")
        existing = path.parent
        while not existing.exists():
            existing = existing.parent
        if not existing.is_dir() or not os.access(existing, os.W_OK):
            raise ConfigError(f"sweep.storage {spec!r}: directory {existing} is not writable")
        return
    scheme = urlparse(spec).scheme
    if scheme.split("+")[0] not in RDB_SCHEMES:
        raise ConfigError(f"sweep.storage {spec!r}: unknown scheme {scheme!r}; use a journal file path "
                          f"(optuna.journal) or an RDB URL: {', '.join(s + '://' for s in RDB_SCHEMES)}")
    try:
        tracking.check_uri(spec, timeout, what="sweep.storage",
                           hint="start the database or use a journal file: sweep.storage=optuna.journal")
    except tracking.TrackingURIError as err:
        raise ConfigError(str(err)) from None


def _stale_trial_failed(study, trial) -> None:
    """The storage's stale-trial callback: say which trial a dead worker left and that its slot is free again."""
    print(f"trial {trial.number} of a worker that stopped sending heartbeats (pid {trial.user_attrs.get('pid')} on "
          f"{trial.user_attrs.get('host')}) was marked FAIL; its slot goes to a live worker", flush=True)


def _heartbeat_journal(path: Path, heartbeat: int):
    """A JournalStorage with Optuna's heartbeat protocol (BaseHeartbeat)."""
    class HeartbeatJournal(JournalStorage, BaseHeartbeat):
        def record_heartbeat(self, trial_id: int) -> None:
            self.set_trial_system_attr(trial_id, "heartbeat", time.time())

        def _get_stale_trial_ids(self, study_id: int) -> list[int]:
            """RUNNING trials whose last heartbeat (or start, before the first one) is older than 2 intervals."""
            now = time.time()
            return [t._trial_id for t in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,))
                    if now - t.system_attrs.get("heartbeat", t.datetime_start.timestamp()) > 2 * heartbeat]

        def get_heartbeat_interval(self) -> int:
            return heartbeat

        def get_heartbeat_stale_trial_callback(self):
            return _stale_trial_failed

        get_failed_trial_callback = get_heartbeat_stale_trial_callback  # the name of optuna < 4.9

    return HeartbeatJournal(JournalFileBackend(str(path)))


def open_storage(spec: str, heartbeat: int) -> Storage:
    """The optuna storage for a journal path or an RDB URL (after check_storage)."""
    if "://" not in spec:
        path = Path(spec).expanduser().resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        return Storage(str(path), _heartbeat_journal(path, heartbeat), journal=path)
    if tracking._sqlite_path(spec) is not None:  # as for a journal: the database's folder is created
        tracking._sqlite_path(spec).resolve().parent.mkdir(parents=True, exist_ok=True)
    callback = ("heartbeat_stale_trial_callback" if "heartbeat_stale_trial_callback" in
                inspect.signature(optuna.storages.RDBStorage).parameters else "failed_trial_callback")  # optuna < 4.9
    for attempt in range(3):  # workers starting together on a fresh database race to create Optuna's tables
        try:
            rdb = optuna.storages.RDBStorage(spec, heartbeat_interval=heartbeat, grace_period=2 * heartbeat,
                                             **{callback: _stale_trial_failed})
            break
        except ImportError as err:
            raise ConfigError(f"sweep.storage {spec!r}: the database driver is missing ({err}); install it, e.g. "
                              f"pip install 'stepbench[postgres]'") from None
        except Exception as err:  # noqa: BLE001 - SQLAlchemy's many connection errors: one message
            if attempt == 2:
                raise ConfigError(f"sweep.storage {spec!r}: cannot open the database: "
                                  f"{' '.join(str(err).split())[:300]}") from None
            time.sleep(1.0 + attempt)
    return Storage(spec, rdb)
