"""The composition root: config in, a running agent out; signals, reload, health, shutdown.

``Daemon(config).run()`` opens the ledger, loads the policy, builds the gate,
the meter, the PBX adapter, the MQTT publisher and the metrics endpoint, and
runs them under one task group until SIGTERM/SIGINT. With a ``web:`` section it
also serves the finance console (agent/web) on the same loop, over the same
ledger and the live policy.

- SIGHUP, or a change of the policy file (or of a do-not-call file it names),
  reloads the policy. The new one is validated first; a bad one is logged with
  its located errors and the old one stays in force. Live calls are never
  dropped by a reload: they keep their admitted tariff and are re-checked
  against the new policy at their next increment.
- SIGTERM stops taking new calls (the gate answers ``shutting_down``, which the
  shipped dialplans turn into a refusal), lets the meter finish what is in
  flight for a bounded time, flushes the MQTT buffer with a bounded wait, closes
  the ledger and exits 0. Calls still up keep their PBX-side deadline and are
  adopted by the next start.
- Compliance: the live do-not-call copy is loaded from the ledger before the
  first call and kept fresh by a poll of its change log
  (:mod:`agent.compliance.dnc_sync`); every settled call feeds the early
  warning (:mod:`agent.compliance.risk`), which publishes ``risk`` when a share
  crosses the policy's limit.
- systemd: ``READY=1`` once the ledger is open and the PBX connected, watchdog
  pings from the event loop, ``RELOADING=1``/``STOPPING=1`` around reloads and
  shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Callable, Sequence
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from agent import __version__, eventloop
from agent.calls import CallInfo, EventSink, PbxControl
from agent.compliance.dnc_sync import DncSync
from agent.compliance.risk import RiskMonitor
from agent.config import AgentConfig, SecretSource, resolve_secret
from agent.gate.decision import Decision
from agent.gate.policy import Policy, load_policy
from agent.gatekeeper import Gatekeeper
from agent.ledger import Balance, Ledger, LedgerError, open_ledger
from agent.meter.clock import Clock, WallClock
from agent.meter.meter import Meter, MeterSettings
from agent.status import StatusBoard, verdict
from agent.yamlfile import ConfigError

if TYPE_CHECKING:  # the adapters are imported when run, the one the config names
    from agent.pbx.asterisk import AsteriskSettings
    from agent.pbx.freeswitch import FreeswitchSettings

log = structlog.get_logger("callgate.daemon")

POLICY_POLL_SECONDS = 2.0
STATUS_PROBE_SECONDS = 2.0  # how long /status waits for the ledger to answer
PRUNE_EVERY = timedelta(hours=1)
DNC_LOAD_TIMEOUT = 30.0  # seconds; millions of entries load in a few


class StartupError(Exception):
    """The agent cannot start; the message says why (exit status 1)."""


def preflight(config: AgentConfig, notes: list[str] | None = None) -> Policy:
    """Everything ``run`` checks before it opens a socket or the ledger; the policy.

    ``callgate config check`` runs exactly this (and then probes the ledger), so
    a config it passes is not refused by ``run`` for a reason it could have seen.
    Raises :class:`StartupError`, one line per problem. Given ``notes`` (a check
    run outside the service), a secret that only systemd provides
    (``LoadCredential=``, absent without ``$CREDENTIALS_DIRECTORY``) is noted
    there instead of counted as a problem.
    """
    import os

    outside = notes is not None and not os.environ.get("CREDENTIALS_DIRECTORY")

    def credential_only(text: str) -> bool:
        if outside and "CREDENTIALS_DIRECTORY" in text:
            assert notes is not None
            notes.append(f"{text.split(':')[0]}: a systemd credential, provided only "
                         "inside the service (LoadCredential=); not checked here")
            return True
        return False

    problems: list[str] = []
    policy: Policy | None = None
    try:
        policy = load_policy(config.policy_path)
    except ConfigError as exc:
        problems.extend(f"policy refused: {_clip(str(e))}" for e in exc.errors)
    try:
        _make_publisher(config)
    except (ValueError, OSError) as exc:  # MqttSettingsError: a bad URL, a missing CA file
        if not credential_only(f"mqtt: {exc}"):
            problems.append(f"{config.path}: mqtt: {_clip(str(exc))}")
    try:
        resolve_secret(config)
    except ConfigError as exc:
        problems.extend(_clip(str(e)) for e in exc.errors
                        if not credential_only(f"{e.message}"))
    for what, value in _listens(config):
        try:
            config.listen(value)
        except ValueError as exc:
            problems.append(f"{config.path}: {what}: {exc}")
    if config.spec.web is not None:
        from agent.web.server import credential_files

        try:
            credential_files(config.spec.web, config.path.parent)
        except ConfigError as exc:
            problems.extend(f"web: {_clip(str(e))}" for e in exc.errors
                            if not credential_only(f"web: {e}"))
    if notes is not None:
        notes.extend(cdr_notes(config))
    if problems or policy is None:
        raise StartupError("\n".join(problems))
    return policy


def cdr_notes(config: AgentConfig) -> list[str]:
    """What keeps the CDR source (``cdr:``) from reading yet: notes, not refusals (the
    agent gates and meters without it; the source waits for its file)."""
    import os

    if config.cdr_file is None:
        return []
    path = config.cdr_file
    if path.is_dir():
        return [f"cdr.file: {path} is a directory; name the PBX's CDR file in it "
                "(e.g. Master.csv)"]
    if path.exists():
        if not path.is_file():
            return [f"cdr.file: {path} is not a regular file"]
        if not os.access(path, os.R_OK):
            return [f"cdr.file: {path} is not readable by this user (the PBX's group?)"]
        return []
    if not path.parent.is_dir():
        return [f"cdr.file: no directory {path.parent}; is the PBX's CDR backend enabled?"]
    return [f"cdr.file: {path} does not exist yet; the PBX creates it with its first CDR"]


def _listens(config: AgentConfig) -> list[tuple[str, str]]:
    """The addresses the agent listens on, by config key."""
    pbx = config.spec.pbx
    out = []
    if pbx.kind == "asterisk":
        out.append(("pbx.fastagi.listen", (pbx.fastagi.listen if pbx.fastagi
                                           else "127.0.0.1:4573")))
    else:
        out.append(("pbx.outbound_socket.listen",
                    pbx.outbound_socket.listen if pbx.outbound_socket else "127.0.0.1:8084"))
    if config.spec.metrics is not None:
        out.append(("metrics.listen", config.spec.metrics.listen))
    if config.spec.web is not None:
        out.append(("web.listen", config.spec.web.listen))
    return out


def _check_free(config: AgentConfig) -> None:
    """A listen address already taken is one clear line before anything starts.

    Binds and closes a socket the way asyncio's servers bind (SO_REUSEADDR), so
    a port merely in TIME_WAIT is not reported; a racing process can still take
    it afterwards, which the server's own bind then reports.
    """
    import socket

    for what, value in _listens(config):
        host, port = config.listen(value)
        if port == 0:
            continue
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise StartupError(f"{what} {value}: {exc.strerror or exc}") from None
        family, kind, proto, _, address = infos[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
                probe.listen(1)
            except OSError as exc:
                raise StartupError(
                    f"{what} {value}: {exc.strerror or exc} (is another callgate, or "
                    "something else, listening there?)"
                ) from None


def _clip(text: str, limit: int = 300) -> str:
    """A value from a file cut to a readable length for a log line, an event or an error."""
    from agent.money import clip

    return clip(text, limit)


def _files_of(policy_path: Path, policy: Policy | None) -> list[Path]:
    """The policy file and the do-not-call files it names (what a reload depends on).

    Read from the text, so a refused policy's new DNC file names are watched too;
    whatever shape the text has, this never raises (a file it cannot read is
    watched alone, plus the files of the policy in force).
    """
    files = [policy_path]
    known = list(policy.dnc_files) if policy is not None else []
    try:
        from agent.yamlfile import read_yaml

        data = read_yaml(policy_path).data
        sections = []
        if isinstance(data, dict):
            accounts = data.get("accounts")
            sections = [data.get("defaults"),
                        *(accounts.values() if isinstance(accounts, dict) else [])]
        for section in sections:
            dnc = section.get("do_not_call") if isinstance(section, dict) else None
            names = dnc.get("files") if isinstance(dnc, dict) else None
            for name in names if isinstance(names, list) else []:
                path = Path(str(name))
                known.append(path if path.is_absolute() else policy_path.parent / path)
    except Exception as exc:  # ConfigError, or anything else: the watcher must go on
        log.debug("policy.files_unknown", error=str(exc))
    for path in known:
        if path not in files:
            files.append(path)
    return files


def _load(path: Path, current: Policy | None) -> tuple[Policy | None, list[str], list[Path]]:
    """Load ``path`` (in a worker thread): the policy or its errors, and the files to watch."""
    policy: Policy | None = None
    errors: list[str] = []
    try:
        policy = load_policy(path)
    except ConfigError as exc:
        errors = [_clip(str(e)) for e in exc.errors]
    except Exception as exc:  # load_policy promises ConfigError; be sure anyway
        errors = [_clip(f"{path}: cannot load: {type(exc).__name__}: {exc}")]
    return policy, errors, _files_of(path, policy or current)


def _stamp(files: list[Path]) -> tuple[tuple[str, int, int], ...]:
    out = []
    for f in files:
        try:
            st = f.stat()
            out.append((str(f), st.st_mtime_ns, st.st_size))
        except (OSError, ValueError):  # ValueError: a NUL in a name from a bad edit
            out.append((str(f), 0, 0))
    return tuple(out)


class Daemon:
    def __init__(self, config: AgentConfig, *, clock: Clock | None = None) -> None:
        self.config = config
        self.clock = clock or WallClock()
        self.policy: Policy | None = None
        self.ledger: Any = None
        self.adapter: Any = None
        self.meter: Meter | None = None
        self.gate: Gatekeeper | None = None
        self.publisher: Any = None
        self.metrics: Any = None
        self.metrics_server: asyncio.Server | None = None
        self.web: Any = None  # the finance console's runner, when web: is configured
        self.cdr_source: Any = None
        self.ready = asyncio.Event()
        self._stop = asyncio.Event()
        self._reload = asyncio.Event()
        self._policy_stamp: tuple[tuple[str, int, int], ...] = ()
        self._policy_files: list[Path] = []  # the policy and its DNC files, per load
        self.board = StatusBoard(self.clock.now(), __version__, config.node)
        self.dnc_sync: DncSync | None = None
        self.risk = RiskMonitor()

    # -- public -------------------------------------------------------------------
    def request_stop(self) -> None:
        self._stop.set()

    def request_reload(self) -> None:
        self._reload.set()

    def current_policy(self) -> Policy:
        assert self.policy is not None
        return self.policy

    def health(self) -> tuple[bool, str]:
        if self.ledger is None:
            return False, "ledger not open"
        if self.adapter is None or not self.adapter.connected:
            return False, "PBX not connected"
        if self._stop.is_set():
            return False, "stopping"
        if self.dnc_sync is not None and not self.dnc_sync.loaded:
            return False, "live do-not-call list not loaded from the ledger yet"
        return True, "ok"

    async def run(self) -> int:
        """Run until asked to stop; 0 on a clean stop. :class:`StartupError` if it cannot start."""
        from agent import systemd

        try:
            await self._start()
        except BaseException:
            await self._close()  # what was opened before the failure (ledger, metrics)
            raise
        loop = asyncio.get_running_loop()
        installed = self._install_signals(loop)
        tasks: list[asyncio.Task[Any]] = []
        stopper: asyncio.Task[Any] | None = None
        try:
            assert self.adapter is not None and self.meter is not None
            tasks.append(asyncio.create_task(self.adapter.run(), name="pbx"))
            tasks.append(asyncio.create_task(self.meter.run(), name="meter"))
            if self.publisher is not None:
                tasks.append(asyncio.create_task(self.publisher.run(), name="mqtt"))
            tasks.append(asyncio.create_task(self._watch_policy(), name="policy-watch"))
            tasks.append(asyncio.create_task(self._prune_attempts(), name="prune"))
            if self.cdr_source is not None:
                tasks.append(asyncio.create_task(self.cdr_source.run(), name="cdr"))
            assert self.dnc_sync is not None
            tasks.append(asyncio.create_task(self.dnc_sync.run(), name="dnc-sync"))
            tasks.append(asyncio.create_task(systemd.watchdog_loop(), name="watchdog"))
            tasks.append(asyncio.create_task(self._announce_ready(), name="ready"))
            stopper = asyncio.create_task(self._stop.wait(), name="stop")
            pending: set[asyncio.Task[Any]] = {*tasks, stopper}
            while not stopper.done():
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    # A component that returns has nothing more to do (the watchdog
                    # without systemd); one that raises takes the agent down, loudly.
                    if task is not stopper and not task.cancelled() and task.exception():
                        error = task.exception()
                        log.error("daemon.component_failed", component=task.get_name(),
                                  error=_clip(str(error)))
                        raise StartupError(f"{task.get_name()}: {_clip(str(error))}") from None
            await self._shutdown()
            return 0
        finally:
            # Every task this started ends here, the stopper too: a task left pending
            # is "Task was destroyed but it is pending!" when the loop closes.
            waited = [*tasks, *([stopper] if stopper is not None else [])]
            for task in waited:
                task.cancel()
            await asyncio.gather(*waited, return_exceptions=True)
            for sig in installed:
                loop.remove_signal_handler(sig)
            await self._close()

    # -- start and stop -----------------------------------------------------------
    async def _start(self) -> None:
        config = self.config
        spec = config.spec
        try:
            self.policy = preflight(config)
            _check_free(config)
        except StartupError as exc:
            lines = [line for line in str(exc).splitlines() if line.strip()]
            for line in lines:
                log.error("daemon.cannot_start", error=line)
            more = len(lines) - 1
            # One line for the operator (systemd's status shows the last line); every
            # problem is in the log above it.
            raise StartupError(lines[0] + (
                f" (and {more} more problem{'s' if more > 1 else ''}; see the log)"
                if more > 0 else "")) from None
        self._policy_files = _files_of(config.policy_path, self.policy)
        self._policy_stamp = _stamp(self._policy_files)
        self.board.policy_loaded(config.policy_path, self.clock.now(), len(self.policy.accounts))
        # asyncpg logs a traceback every second or two while PostgreSQL is away; the
        # ledger's own LedgerUnavailable lines already say so, once per operation.
        logging.getLogger("asyncpg").setLevel(logging.ERROR)
        if config.ledger.startswith("sqlite:///"):
            database = Path("/" + config.ledger[len("sqlite:///"):].split("?")[0].lstrip("/"))
            with contextlib.suppress(OSError):  # open_ledger reports what is wrong
                database.parent.mkdir(parents=True, exist_ok=True)
        try:
            ledger = await open_ledger(config.ledger)
        except Exception as exc:
            raise StartupError(
                f"cannot open the ledger {_redact(config.ledger)}: {_clip(str(exc))}") from None
        self.metrics = _make_metrics()
        self.ledger = _TimedLedger(ledger, self.metrics) if self.metrics else ledger
        try:
            self.publisher = _make_publisher(config)
        except (ValueError, OSError) as exc:  # MqttSettingsError: a bad URL, a missing CA file
            raise StartupError(f"mqtt: {exc}") from None
        budget = spec.pbx.decision_budget_ms / 1000
        # The live do-not-call copy: loaded before the first call is gated, so a
        # number added a minute ago is refused from the first call; if the ledger
        # cannot be read now the sync keeps trying (see agent.compliance.dnc_sync).
        self.dnc_sync = DncSync(ledger)
        try:
            async with asyncio.timeout(DNC_LOAD_TIMEOUT):
                await self.dnc_sync.load()
        except (LedgerError, OSError, TimeoutError) as exc:
            log.warning("dnc.load_failed", error=str(exc) or type(exc).__name__)
        self.gate = Gatekeeper(
            ledger=self.ledger, policy=self.current_policy, clock=self.clock,
            node=config.node, budget=budget * 0.8,
            ring_allowance=spec.pbx.ring_allowance_seconds, on_decision=self._on_decision,
            live_dnc=self.dnc_sync.live,
        )
        settings = MeterSettings(grace_seconds=spec.meter.grace_seconds,
                                 lead_seconds=spec.meter.lead_seconds,
                                 warning_seconds=spec.meter.warning_seconds,
                                 balance_check_interval=spec.meter.balance_check_seconds)
        pbx_proxy = _LatePbx()
        self.meter = Meter(ledger=self.ledger, pbx=pbx_proxy, policy=self.current_policy,
                           clock=self.clock, node=config.node, settings=settings,
                           publish=self._publish,
                           warning_hook=self._warn if settings.warning_seconds else None,
                           on_balances=self._balances_read if spec.metrics else None)
        try:
            self.adapter = make_adapter(config, self.gate, self.meter.on_event, self.clock)
        except ConfigError as exc:
            raise StartupError(str(exc)) from None
        pbx_proxy.target = self.adapter
        if spec.cdr is not None:
            self.cdr_source = _make_cdr_source(config, self.ledger, self.clock, self.metrics)
            for note in cdr_notes(config):
                log.warning("cdr.not_readable_yet", note=note)
        if self.metrics is not None:
            meter, adapter = self.meter, self.adapter
            self.metrics.live_calls.set_function(lambda: len(meter.live))
            self.metrics.open_holds.set_function(lambda: len(meter.live))
            self.metrics.open_holds_amount.set_function(
                lambda: float(sum((c.held for c in meter.live.values()), Decimal(0))))
            self.metrics.pbx_connected.set_function(lambda: 1 if adapter.connected else 0)
            self.metrics.watch_pbx_link(adapter.health)
            self.metrics.watch_gate_listener(lambda: getattr(adapter, "listener", None))
            loop = asyncio.get_running_loop()
            self.metrics.asyncio_tasks.set_function(lambda: len(asyncio.all_tasks(loop)))
            sync = self.dnc_sync
            self.metrics.live_dnc_entries.set_function(lambda: len(sync.live))
            self.metrics.live_dnc_age.set_function(sync.age)
            if self.publisher is not None:
                self.metrics.watch_publisher(self.publisher)
            self.metrics.started.set(self.board.started_at.timestamp())
            self.metrics.policy_loaded(True, self.clock.now().timestamp())
            self._watch_accounts()
        if spec.metrics is not None and self.metrics is not None:
            from agent.metrics import serve_metrics

            host, port = config.listen(spec.metrics.listen)
            try:
                self.metrics_server = await serve_metrics(self.metrics, host, port, self.health,
                                                          status=self.status_document)
            except OSError as exc:
                raise StartupError(
                    f"metrics.listen {spec.metrics.listen}: {exc.strerror or exc}") from None
        if spec.web is not None:
            await self._start_web()
        log.info("daemon.started", version=__version__, node=config.node, pbx=spec.pbx.kind,
                 policy=str(config.policy_path), ledger=_redact(config.ledger),
                 accounts=len(self.policy.accounts), loop=eventloop.running_loop_name())

    async def _start_web(self) -> None:
        """The finance console on this loop, over the daemon's own ledger and live policy."""
        from agent.web.server import start_from_config

        assert self.config.spec.web is not None
        try:
            self.web = await start_from_config(
                self.config.spec.web, self.config.path.parent, self.ledger,
                self.current_policy, node=self.config.node,
                publish=self.publisher.publish if self.publisher is not None else None)
        except ConfigError as exc:
            raise StartupError(f"web: {exc}".replace("\n", "; ")) from None
        except OSError as exc:
            raise StartupError(f"web: cannot serve on {self.config.spec.web.listen}: "
                               f"{exc.strerror or exc}") from None

    async def _announce_ready(self) -> None:
        from agent import systemd

        assert self.adapter is not None
        while not self.adapter.connected:
            await asyncio.sleep(0.05)
        self.ready.set()
        systemd.ready()
        systemd.status(f"gating for {len(self.current_policy().accounts)} accounts")
        log.info("daemon.ready")

    async def _shutdown(self) -> None:
        from agent import systemd

        systemd.stopping()
        log.info("daemon.stopping")
        if self.gate is not None:
            self.gate.accepting = False
        if self.meter is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5):
                    await self.meter.wait_idle()
        if self.publisher is not None:
            with contextlib.suppress(Exception):
                await self.publisher.flush(timeout=5)
        log.info("daemon.stopped")

    async def _close(self) -> None:
        if self.metrics_server is not None:
            self.metrics_server.close()
        if self.web is not None:
            with contextlib.suppress(Exception):
                await self.web.cleanup()
            self.web = None
        if self.ledger is not None:
            with contextlib.suppress(Exception):
                await self.ledger.close()
            self.ledger = None

    def _install_signals(self, loop: asyncio.AbstractEventLoop) -> list[int]:
        installed = []
        handlers: dict[int, Callable[[], None]] = {
            signal.SIGTERM: self.request_stop,
            signal.SIGINT: self.request_stop,
            signal.SIGHUP: self.request_reload,
        }
        for sig, handler in handlers.items():
            try:
                loop.add_signal_handler(sig, handler)
                installed.append(sig)
            except (NotImplementedError, RuntimeError, ValueError):
                pass  # not the main thread (tests): signals are the caller's business
        return installed

    # -- policy -------------------------------------------------------------------
    def reload_policy(self, why: str) -> bool:
        """Load the policy again (in this thread); keep the old one if the new one has
        any error. Never raises: whatever the file holds, the outcome is logged and
        published (``policy/reload``), and a refused policy leaves the one in force."""
        from agent import systemd

        systemd.reloading()
        return self._apply(why, *_load(self.config.policy_path, self.policy))

    async def reload_policy_off_loop(self, why: str) -> bool:
        """:meth:`reload_policy` with the file read and compiled in a worker thread, so
        gating goes on meanwhile (a multi-megabyte policy or DNC file takes seconds)."""
        from agent import systemd

        systemd.reloading()
        path = self.config.policy_path
        try:
            loaded = await asyncio.to_thread(_load, path, self.policy)
        except Exception as exc:  # _load promises not to raise; be sure anyway
            log.exception("policy.reload_failed", why=why)
            loaded = None, [_clip(f"{path}: cannot load: {exc}")], [path]
        return self._apply(why, *loaded)

    def _apply(self, why: str, policy: Policy | None, errors: list[str],
               files: list[Path]) -> bool:
        from agent import systemd

        # Work out the files once per load: the watcher only stats them (parsing
        # the policy every poll cost 2% of the daemon's CPU under load).
        self._policy_files = files
        self._policy_stamp = _stamp(files)
        systemd.ready()
        if policy is not None:
            self.policy = policy
            self.board.policy_loaded(self.config.policy_path, self.clock.now(),
                                     len(policy.accounts))
            self._watch_accounts()
            log.info("policy.reloaded", why=why, accounts=len(policy.accounts))
            self._publish("policy/reload", {"ok": True, "why": why,
                                            "accounts": len(policy.accounts)})
            self._count_reload(True)
            return True
        for error in errors:
            log.error("policy.reload_refused", error=error, why=why)
        log.error("policy.kept_old", errors=len(errors))
        self._publish("policy/reload", {"ok": False, "why": why, "errors": errors})
        self.board.reload_refused(self.config.policy_path, self.clock.now(), why, errors)
        self._count_reload(False)
        return False

    async def _watch_policy(self) -> None:
        """Reload on SIGHUP or a changed file; one bad round never ends the watch."""
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(POLICY_POLL_SECONDS):
                    await self._reload.wait()
            try:
                if self._reload.is_set():
                    self._reload.clear()
                    await self.reload_policy_off_loop("SIGHUP")
                    continue
                stamp = _stamp(self._policy_files)
                if stamp != self._policy_stamp:
                    await asyncio.sleep(0.2)  # let an editor finish writing
                    await self.reload_policy_off_loop("file changed")
            except Exception:  # the next round (one poll later) tries again
                log.exception("policy.watch_failed")

    async def _prune_attempts(self) -> None:
        while True:
            await asyncio.sleep(PRUNE_EVERY.total_seconds())
            if self.ledger is None or self.policy is None:
                continue
            keep = timedelta(seconds=self.policy.longest_cap_seconds) + timedelta(days=1)
            with contextlib.suppress(Exception):
                pruned = await self.ledger.prune_attempts(self.clock.now() - keep)
                log.info("ledger.attempts_pruned", rows=pruned)

    # -- events and metrics -------------------------------------------------------
    def _publish(self, topic: str, payload: dict[str, Any]) -> None:
        # Count the cut-offs that happened, not the planned ones (a party may hang up first).
        if topic == "cutoff" and payload.get("stage") == "executed":
            self._count_cutoff(payload)
        if self.publisher is not None:
            self.publisher.publish(topic, payload)
        if topic == "call/end":
            self._observe_risk(payload)

    def _observe_risk(self, cdr: dict[str, Any]) -> None:
        """The early warning: feed the settled call in; publish ``risk`` on a crossing."""
        limits = self.policy.risk if self.policy is not None else None
        if limits is None:
            return
        account = str(cdr.get("account") or "")
        alerts = self.risk.observe(limits, account, self.clock.now(),
                                   cdr.get("answered_at") is not None,
                                   int(cdr.get("billsec") or 0))
        if self.metrics is not None:
            self.metrics.risk(self.risk.reading(account),
                              self.risk.raised(account, "short_calls"),
                              self.risk.raised(account, "answer_rate"))
        for alert in alerts:
            log.warning("risk." + alert.state, account=account, kind=alert.kind,
                        percent=str(alert.value), limit=alert.limit)
            if self.publisher is not None:
                self.publisher.publish("risk", alert.payload(limits))

    async def _warn(self, call_id: str, seconds: int) -> None:
        """A cut-off is coming: tell subscribers (a tone player, the agent's screen)."""
        log.info("meter.cutoff_warning", call_id=call_id, seconds=seconds)
        self._publish("cutoff", {"stage": "warning", "call_id": call_id, "seconds": seconds})

    def _on_decision(self, call: CallInfo, decision: Decision, elapsed: float) -> None:
        self.board.decision(self.clock.now(), decision.result, decision.reason.value)
        if self.metrics is not None:
            self.metrics.decision(decision.result, decision.reason.value, elapsed)
            self.metrics.account_refused(decision.account, decision.reason.value)
        self._publish("decision", {
            "call_id": call.call_id, "account": decision.account, "result": decision.result,
            "reason": decision.reason.value, "message": decision.message,
            "caller": call.caller_id, "callee": call.destination,
            "direction": call.direction.value, "max_seconds": decision.max_seconds,
            "paid_seconds": decision.paid_seconds, "until_close": decision.until_close,
        })

    def _count_reload(self, ok: bool) -> None:
        if self.metrics is not None:
            self.metrics.policy_reload(ok, self.clock.now().timestamp())

    def _count_cutoff(self, payload: dict[str, Any]) -> None:
        reason = str(payload.get("reason") or "unknown")
        late_ms = payload.get("late_ms")
        late = late_ms / 1000 if isinstance(late_ms, int | float) else None
        grace = self.config.spec.meter.grace_seconds
        self.board.cutoff(self.clock.now(), reason, late is not None and late > grace)
        if self.metrics is not None:
            self.metrics.cutoff(reason, late, grace)

    def _watch_accounts(self) -> None:
        """Per-account series for exactly the policy's accounts (bounded label values)."""
        if self.metrics is None or self.policy is None or self.meter is None:
            return
        meter = self.meter

        def live_by_account() -> dict[str, int]:
            counts: dict[str, int] = {}
            for call in list(meter.live.values()):
                counts[call.account] = counts.get(call.account, 0) + 1
            return counts

        self.metrics.watch_accounts(
            {a: p.low_balance_warning for a, p in self.policy.accounts.items()}, live_by_account)

    def _balances_read(self, balances: Sequence[Balance]) -> None:
        """The meter's periodic read of every balance (meter.balance_check_seconds) sets
        the per-account gauges too: one read per period, not one each. When it fails
        the gauges go stale; the refreshed timestamp says so."""
        if self.metrics is not None:
            self.metrics.account_balances({b.account: b.available for b in balances},
                                          self.clock.now().timestamp())

    async def status_document(self) -> dict[str, Any]:
        """``GET /status``: the board's record plus live readings, and the verdict."""
        now = self.clock.now()
        doc = self.board.document(now)
        ledger: dict[str, Any] = {"url": _redact(self.config.ledger), "reachable": False}
        started = asyncio.get_running_loop().time()
        try:
            async with asyncio.timeout(STATUS_PROBE_SECONDS):
                await self.ledger.get_call("status-probe")
            ledger["reachable"] = True
            ledger["probe_ms"] = round((asyncio.get_running_loop().time() - started) * 1000, 1)
        except TimeoutError:
            ledger["error"] = f"no answer within {STATUS_PROBE_SECONDS:g} s"
        except Exception as exc:
            ledger["error"] = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        adapter, meter, publisher = self.adapter, self.meter, self.publisher
        live: dict[str, int] = {}
        for call in list(meter.live.values()) if meter is not None else []:
            live[call.account] = live.get(call.account, 0) + 1
        doc.update({
            "pid": os.getpid(), "ready": self.ready.is_set(),
            "accepting": bool(self.gate is not None and self.gate.accepting),
            "pbx": {"kind": self.config.spec.pbx.kind,
                    "connected": bool(adapter is not None and adapter.connected),
                    **(adapter.health.snapshot() if adapter is not None else {})},
            "ledger": ledger,
            "mqtt": None if publisher is None else {
                "connected": bool(publisher.connected), "depth": publisher.depth,
                "dropped": publisher.dropped, "published": publisher.published},
            "live_calls": {"total": sum(live.values()), "by_account": dict(sorted(live.items()))},
        })
        state, problems = verdict(doc)
        doc["state"], doc["problems"] = state, problems
        return doc


class _TimedLedger:
    """The ledger with each operation's latency recorded (``callgate_ledger_operation_seconds``)."""

    def __init__(self, ledger: Ledger, metrics: Any) -> None:
        self._ledger = ledger
        self._metrics = metrics

    def __getattr__(self, name: str) -> Any:
        target = getattr(self._ledger, name)
        if not callable(target) or name.startswith("_"):
            return target
        timer = self._metrics.ledger_timer

        async def timed(*args: Any, **kwargs: Any) -> Any:
            with timer(name):
                return await target(*args, **kwargs)

        # Made once per operation, not on every call (several per call placed):
        # later lookups find it on the instance and skip __getattr__.
        setattr(self, name, timed)
        return timed


class _LatePbx:
    """The meter needs the PBX and the adapter needs the meter's sink: this breaks the cycle."""

    target: Any = None

    async def hangup(self, call_id: str, cause: Any) -> None:
        await self.target.hangup(call_id, cause)

    async def set_deadline(self, call_id: str, at: Any) -> None:
        await self.target.set_deadline(call_id, at)

    async def active_calls(self) -> Any:
        return await self.target.active_calls()


def make_adapter(config: AgentConfig, gate: Gatekeeper, sink: EventSink,
                 clock: Clock) -> PbxControl:
    """The adapter the config names, with its secrets resolved."""
    settings = adapter_settings(config)
    if config.spec.pbx.kind == "asterisk":
        from agent.pbx.asterisk import AsteriskAdapter, AsteriskSettings

        assert isinstance(settings, AsteriskSettings)
        return AsteriskAdapter(settings, gate, sink, clock=clock.now)
    from agent.pbx.freeswitch import FreeswitchAdapter, FreeswitchSettings

    assert isinstance(settings, FreeswitchSettings)
    return FreeswitchAdapter(settings, gate, sink, clock=clock.now)


def adapter_settings(config: AgentConfig) -> AsteriskSettings | FreeswitchSettings:
    """The settings of the adapter the config names (``pbx:``), its secret resolved."""
    spec = config.spec.pbx
    budget = spec.decision_budget_ms / 1000
    if spec.kind == "asterisk":
        from agent.config import AmiSpec, FastAgiSpec
        from agent.pbx.asterisk import AsteriskSettings

        ami = spec.ami or AmiSpec()
        fastagi = spec.fastagi or FastAgiSpec()
        return AsteriskSettings(
            ami_host=ami.host, ami_port=ami.port, username=ami.username,
            secret=resolve_secret(config),
            fastagi_listen=config.listen(fastagi.listen),
            decision_budget=budget,
            watch_only_contexts=frozenset(spec.watch_only_contexts),
            outbound_contexts=frozenset(spec.outbound_contexts),
            ping_timeout=spec.command_timeout_seconds,
            command_timeout_max=spec.command_timeout_max,
            dead_after=spec.dead_after_seconds,
        )
    from agent.config import EslSpec, OutboundSocketSpec
    from agent.pbx.freeswitch import FreeswitchSettings

    esl = spec.esl or EslSpec()
    outbound = spec.outbound_socket or OutboundSocketSpec()
    return FreeswitchSettings(
        esl_host=esl.host, esl_port=esl.port, password=resolve_secret(config),
        outbound_listen=config.listen(outbound.listen), decision_budget=budget,
        watch_only_contexts=frozenset(spec.watch_only_contexts),
        outbound_contexts=frozenset(spec.outbound_contexts),
        command_timeout=spec.command_timeout_seconds,
        command_timeout_max=spec.command_timeout_max,
        dead_after=spec.dead_after_seconds,
    )


def _make_cdr_source(config: AgentConfig, ledger: Ledger, clock: Clock, metrics: Any) -> Any:
    """The follower of the PBX's CDR file that settles calls from it (``cdr:`` in agent.yaml)."""
    from agent.cdr.formats import CdrRow
    from agent.cdr.source import CdrSource

    spec = config.spec.cdr
    assert spec is not None and config.cdr_file is not None
    contexts = frozenset(config.spec.pbx.outbound_contexts)

    def outbound(row: CdrRow) -> bool:
        return row.context in contexts if contexts else bool(row.accountcode)

    with contextlib.suppress(OSError):  # the source logs what is wrong when it saves
        config.cdr_state_file.parent.mkdir(parents=True, exist_ok=True)
    return CdrSource(ledger=ledger, path=config.cdr_file,
                     layout=spec.layout(config.spec.pbx.kind),
                     state_path=config.cdr_state_file, clock=clock,
                     poll_seconds=spec.poll_seconds,
                     pending_max_age=spec.pending_max_age_seconds, outbound=outbound,
                     metrics=metrics)


def _make_metrics() -> Any:
    try:
        from agent.metrics import Metrics
    except ImportError:
        return None
    return Metrics()


def _make_publisher(config: AgentConfig) -> Any:
    spec = config.spec.mqtt
    if spec is None:
        return None
    from agent.events.mqtt import EventPublisher, MqttSettings

    password = None
    if spec.password is not None or spec.password_env or spec.password_credential:
        password = SecretSource(secret=spec.password, secret_env=spec.password_env,
                                secret_credential=spec.password_credential).resolve(
                                    config.path.parent)
    return EventPublisher(MqttSettings(
        url=spec.url, username=spec.username, password=password, tls=spec.tls,
        ca_file=spec.ca_file, topic_prefix=spec.topic_prefix, node=config.node,
        buffer=spec.buffer,
    ))


def _redact(url: str) -> str:
    """A ledger URL without its password, for logs."""
    if "://" not in url or "@" not in url:
        return url
    scheme, rest = url.split("://", 1)
    credentials, host = rest.rsplit("@", 1)
    user = credentials.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}" if ":" in credentials else url
