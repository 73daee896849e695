"""The controller's records in the store: who owns which version, and what a conflict means.

The reconciler reads and writes job and node records only through a :class:`Repository`. It
remembers the version of every record this controller loaded or wrote, and writes with
compare-and-set on that version (Ray's ``instance_storage.py``, ``expected_version``). A
conflict means another controller wrote a record this one owns: another controller leads. The
repository then raises :class:`SteppedDownError` (a ``FencedError``, the same signal leader
election gives) and the control loop ends; the app steps down (``app.py``). It never adopts the
other writer's copy to overwrite it on the next pass: that was last-writer-wins.

One case is not a conflict: the record is gone (the store restarted empty, without
persistence). Then this controller's copy is written again as new, as it is the only one left.

A store that cannot be reached is not a conflict either: ``save`` and ``delete`` return False
and the caller keeps the change for its next pass (``store/retrying.py`` already retried).
"""

from __future__ import annotations

import logging
import threading

from hpt.controller.store import ConflictError, FencedError, Store, StoreUnavailableError

log = logging.getLogger(__name__)


class SteppedDownError(FencedError):
    """A record this controller owns was written by another controller: it leads now. Nothing
    was written; the caller stops acting as the leader."""


class Repository:
    """Versions and compare-and-set writes of the records under one store; thread-safe.

    Args:
        store: the store (usually a ``RetryingStore``); its errors other than conflicts pass
            through.
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self._lock = threading.Lock()
        self._versions: dict[str, int] = {}

    def version(self, key: str) -> int:
        """The version of ``key`` this controller holds (0: it holds none)."""
        with self._lock:
            return self._versions.get(key, 0)

    def load(self, prefix: str) -> dict[str, bytes]:
        """Every record under ``prefix``, key -> value; their versions become this controller's.

        Raises:
            StoreUnavailableError: the store cannot be read.
        """
        items = self.store.scan(prefix)
        with self._lock:
            for key, item in items.items():
                self._versions[key] = item.version
        return {key: item.value for key, item in items.items()}

    def create(self, key: str, value: bytes) -> None:
        """Write a record that must not exist yet (a new job).

        Raises:
            SteppedDownError: it exists: another controller created it.
            StoreUnavailableError: the store cannot be written (nothing was).
        """
        try:
            version = self.store.put(key, value, expected_version=0)
        except ConflictError as exc:
            raise SteppedDownError(f"{key} was created by another controller: {exc}") from exc
        with self._lock:
            self._versions[key] = version

    def save(self, key: str, value: bytes) -> bool:
        """Write this controller's copy of ``key`` over the version it holds.

        Returns:
            True when written; False when the store is down (keep the change, try next pass).

        Raises:
            SteppedDownError: another controller wrote the record since.
        """
        expected = self.version(key)
        try:
            version = self.store.put(key, value, expected_version=expected)
        except StoreUnavailableError:
            return False
        except ConflictError as exc:
            if exc.actual != 0:
                raise SteppedDownError(
                    f"{key} was written by another controller ({exc}): it leads; stepping down"
                ) from exc
            log.warning("store lost %s; writing it again", key)  # restarted empty
            try:
                version = self.store.put(key, value, expected_version=0)
            except StoreUnavailableError:
                return False
            except ConflictError as again:
                raise SteppedDownError(
                    f"{key} was written by another controller ({again}): it leads; stepping down"
                ) from again
        with self._lock:
            self._versions[key] = version
        return True

    def delete(self, key: str) -> bool:
        """Delete ``key`` at the version this controller holds (an absent key is deleted).

        Returns:
            True when deleted; False when the store is down.

        Raises:
            SteppedDownError: another controller wrote the record since.
        """
        expected = self.version(key)
        try:
            self.store.delete(key, expected_version=expected or None)
        except StoreUnavailableError:
            return False
        except ConflictError as exc:
            if exc.actual != 0:
                raise SteppedDownError(
                    f"{key} was written by another controller ({exc}): it leads; stepping down"
                ) from exc
            # already gone (the store restarted empty): deleted all the same
        with self._lock:
            self._versions.pop(key, None)
        return True
