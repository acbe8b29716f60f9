"""Obtaining and renewing the `acme = true` certificates: one thread in the control process.

Theory of operation
-------------------
One control process runs per host, so one manager orders for the whole host and the workers never
race each other.  For each managed certificate (a `[[tls.certificates]]` entry with `acme = true`),
on every step of its thread:

1. Read storage: is there a certificate for these names that can be served (key matches, valid now,
   covers every name)?  Its renewal is due at notAfter - `renew_before` (at half its life if
   `renew_before` is longer than the life: short-lived certificates); with none, at once.
2. If storage holds another certificate than the master loaded for this generation (issued here a
   moment ago, or by another node sharing the storage), ask the master to reload: the normal reload
   path rebuilds the TLS contexts, carries the session-ticket keys over and drains the old workers,
   so no connection is dropped.  The reload also replaces this process; what must outlive it (back-off,
   failures, last error) is in storage, next to the certificate.
3. When due, take the name's storage lock (another node or a still-draining control process may
   hold it: try again shortly) and order (client.py).  On failure, wait before the next try:
   exponential back-off from 2 s (the CA did not answer) or 60 s (the CA refused, failed validation
   included), at least what the CA's Retry-After says, and at least an hour for a rate limit sent
   without one.  Let's Encrypt allows 5 failed validations per name per hour: 60, 120, 240 s ... stays
   under it.
4. Sleep until the earliest due time, at most STORAGE_POLL (certificates other nodes obtain are
   picked up within it).

Everything the admin listener shows (/status, the next-renewal gauge) is read from the `Managed`
objects, which only this thread writes.
"""

from __future__ import annotations

import threading
import time

from fastlb.acme import client
from fastlb.acme.storage import Storage
from fastlb.net import certs

STORAGE_POLL = 30.0
LOCK_RETRY = 2.0
BACKOFF = {"unreachable": (2.0, 600.0), "refused": (60.0, 86400.0), "rate_limited": (60.0, 86400.0)}
RATE_LIMIT_WAIT = 3600.0


class Managed:
    """One managed certificate and what /status says of it."""

    def __init__(self, names: tuple[str, ...], installed_not_after: float | None):
        self.names = names
        self.name = names[0]
        self.installed = installed_not_after   # notAfter of what this generation serves
        self.not_after: float | None = None    # of the usable certificate in storage
        self.next_try = 0.0                     # Unix time of the next order (renewal or retry)
        self.state = "starting"
        self.failures = 0
        self.last_error = ""
        self.last_order = 0.0
        self.lock_wait = 0.0                    # another process holds the lock: not before this

    def status(self) -> dict:
        return {
            "names": list(self.names), "state": self.state,
            "serving": "issued" if self.installed is not None and self.installed == self.not_after else "temporary",
            "not_after": self.not_after, "next_try": self.next_try, "failures": self.failures,
            "last_error": self.last_error, "last_order": self.last_order,
        }


class Manager:
    def __init__(self, cfg, cert_facts, log, count, request_reload):
        """cert_facts: (name, notAfter) per configured certificate as the master loaded them.
        count(result): fastlb_acme_orders_total.  request_reload(): ask the master for a reload."""
        self.spec = cfg.acme
        self.storage = Storage(cfg.acme)
        self.log = log
        self.count = count
        self.request_reload = request_reload
        self.certificates = [
            Managed(spec.names, cert_facts[i][1] if i < len(cert_facts) else None)
            for i, spec in enumerate(cfg.tls.certificates) if spec.acme
        ]
        self._wake = threading.Event()
        self._stopped = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        # A control process stopped by a reload in the middle of an order leaves its answers behind.
        self.storage.sweep_challenges(time.time() - 2 * client.ORDER_TIMEOUT)
        self._thread = threading.Thread(target=self._run, name="acme", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """The control process is stopping: a running order is abandoned, its lock released at once
        so the next generation's control process need not wait for the lock to expire."""
        self._stopped = True
        self._wake.set()
        for managed in self.certificates:
            self.storage.unlock(managed.name)

    def status(self) -> list[dict]:
        return [m.status() for m in self.certificates]

    # -- the thread ------------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stopped:
            now = time.time()
            try:
                self.step(now)
                due = min((m.next_try for m in self.certificates), default=now + STORAGE_POLL)
            except Exception:  # noqa: BLE001 - a bug here must not silently end renewals
                self.log.exception("acme: unexpected error; trying again in %gs", STORAGE_POLL)
                due = now + STORAGE_POLL
            self._wake.wait(min(max(due - time.time(), 0.05), STORAGE_POLL))

    def step(self, now: float) -> None:
        changed = []
        for managed in self.certificates:
            if self._stopped:
                return
            self._refresh(managed, now)
            if now >= managed.next_try and not self._stopped:
                self._obtain(managed, now)
                self._refresh(managed, time.time())
            if managed.not_after is not None and managed.not_after != managed.installed:
                changed.append(managed)
        if changed and not self._stopped:
            for managed in changed:
                managed.installed = managed.not_after  # one reload per new certificate
            self.log.info("acme: new certificate for %s in storage; reloading to serve it",
                          ", ".join(m.name for m in changed))
            self.request_reload()

    def _refresh(self, managed: Managed, now: float) -> None:
        found = self.storage.usable_certificate(managed.names, now)
        managed.not_after = certs.certificate_not_after(found[1]) if found else None
        renew_at = self._renewal_time(found[1]) if found else now
        saved = self.storage.load_state(managed.name)
        managed.failures = int(saved.get("failures", 0))
        managed.last_error = str(saved.get("error", ""))
        managed.last_order = float(saved.get("last_order", 0.0))
        if renew_at > now:
            # Renewed since the failures (here or by another node): they no longer count.
            managed.next_try, managed.failures = renew_at, 0
        else:
            managed.next_try = max(renew_at, float(saved.get("next_try", 0.0)), managed.lock_wait)
        if managed.state != "ordering":
            if managed.next_try == managed.lock_wait > now:
                managed.state = "locked"
            elif managed.failures and managed.next_try > now:
                managed.state = "waiting"
            else:
                managed.state = "valid" if found else "temporary"

    def _renewal_time(self, leaf) -> float:
        """notAfter - renew_before; at half the certificate's life when renew_before is at least as long
        as the whole life (short-lived certificates), which would otherwise order again at once."""
        not_before = leaf.not_valid_before_utc.timestamp()
        not_after = certs.certificate_not_after(leaf)
        if self.spec.renew_before < not_after - not_before:
            return not_after - self.spec.renew_before
        return not_before + (not_after - not_before) / 2

    def _obtain(self, managed: Managed, now: float) -> None:
        if not self.storage.lock(managed.name, now):
            # Another node, or this host's previous control process, is ordering it: its certificate
            # is picked up from storage on one of these looks.
            managed.lock_wait = now + LOCK_RETRY
            return
        try:
            managed.state = "ordering"
            why = "renewing" if managed.not_after is not None else "obtaining"
            self.log.info("acme: %s: %s a certificate for %s from %s", managed.name, why,
                          ", ".join(managed.names), self.spec.directory)
            try:
                bundle, leaf = client.order(self.spec, self.storage, managed.names, self.log)
            except client.OrderError as exc:
                self._failed(managed, exc, now)
                return
            except Exception as exc:  # noqa: BLE001 - the library's surprises are the CA's refusal
                self.log.exception("acme: %s: order failed unexpectedly", managed.name)
                self._failed(managed, client.OrderError("refused", f"{type(exc).__name__}: {exc}"), now)
                return
            self.storage.write(self.storage.certificate_path(managed.name), bundle)
            self.storage.save_state(managed.name, {"last_order": time.time()})
            self.count("success")
            self.log.info("acme: %s: certificate issued, valid until %s; renewal at %s", managed.name,
                          _when(certs.certificate_not_after(leaf)), _when(self._renewal_time(leaf)))
        finally:
            managed.state = "starting"
            self.storage.unlock(managed.name)

    def _failed(self, managed: Managed, exc: client.OrderError, now: float) -> None:
        failures = managed.failures + 1
        first, cap = BACKOFF[exc.kind]
        delay = min(cap, first * 2 ** (failures - 1))
        if exc.retry_after is not None:
            delay = max(delay, exc.retry_after)  # RFC 8555 section 6.6
        elif exc.kind == "rate_limited":
            delay = max(delay, RATE_LIMIT_WAIT)
        next_try = now + delay
        error = f"{exc.kind}: {exc.detail}"
        self.storage.save_state(managed.name, {"failures": failures, "next_try": next_try, "error": error,
                                               "last_order": now})
        self.count("rate_limited" if exc.kind == "rate_limited" else "failure")
        self.log.warning("acme: %s: order failed (%s); next try at %s (in %ds)", managed.name, error,
                         _when(next_try), round(delay))


def _when(unix: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(unix))
