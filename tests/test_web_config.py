"""The console's config, credential files, limits, and both ways to run it (daemon, serve)."""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from agent.cli import main
from agent.config import load_agent_config
from agent.web.auth import (
    FailureLimit,
    Principal,
    Role,
    Sessions,
    load_credentials,
    password_hash,
    token_hash,
)
from agent.web.listen import plaintext_remote
from agent.yamlfile import ConfigError
from tests.daemon_harness import Agent, free_port, sim_port, simulator, write_config
from tests.test_mqtt import mosquitto  # noqa: F401  (a fixture)
from tests.test_web_api import call
from tests.web_harness import POLICY, console_at, write_files


# -- where it may listen ---------------------------------------------------------------------
@pytest.mark.parametrize(("host", "tls", "allowed", "refused"), [
    ("127.0.0.1", False, False, False), ("127.0.0.9", False, False, False),
    ("::1", False, False, False), ("localhost", False, False, False),
    ("0.0.0.0", False, False, True), ("192.0.2.10", False, False, True),
    ("console.example", False, False, True), ("0.0.0.0", True, False, False),
    ("0.0.0.0", False, True, False),
])
def test_plaintext_only_on_loopback(host: str, tls: bool, allowed: bool, refused: bool) -> None:
    assert (plaintext_remote(host, tls, allowed) is not None) == refused


def _config(tmp: Path, web: str) -> Path:
    return write_config(tmp, "asterisk", 5038, 4573, "s", extra=f"web: {web}\n")


def test_a_remote_listen_address_without_tls_is_a_located_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_agent_config(_config(tmp_path, "{listen: '0.0.0.0:8090', tokens_file: t}"))
    text = str(caught.value)
    assert "agent.yaml:" in text and "web" in text and "is not loopback" in text
    assert load_agent_config(_config(tmp_path, "{listen: '0.0.0.0:8090', tokens_file: t, "
                                               "allow_plaintext_remote: true}")).spec.web
    with pytest.raises(ConfigError, match="both tls_cert and tls_key"):
        load_agent_config(_config(tmp_path, "{tls_cert: c.pem}"))
    spec = load_agent_config(_config(tmp_path, "{tokens_file: t}")).spec.web
    assert spec is not None and spec.listen == "127.0.0.1:8090"
    assert load_agent_config(write_config(tmp_path, "asterisk", 5038, 4573, "s")).spec.web is None


def test_config_check_reads_the_web_credentials(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    _, tokens, _, _ = write_files(tmp_path)
    config = write_config(tmp_path, "asterisk", 5038, 4573, "s",
                          policy=(tmp_path / "policy.yaml").read_text(),
                          extra="web: {tokens_file: tokens.txt}\n")
    assert main(["config", "check", str(config), "--json"]) == 0, capsys.readouterr()
    capsys.readouterr()
    tokens.write_text("clerk root sha256:00\n")
    assert main(["config", "check", str(config), "--json"]) == 1
    problems = json.loads(capsys.readouterr().out)["problems"]
    assert problems == [f"web: {tokens}:1: clerk: role 'root' is not one of read, finance, "
                        "admin"]


# -- credential files ---------------------------------------------------------------------------
def test_credential_files_report_every_bad_line(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.txt"
    tokens.write_text("# comment\n"
                      f"ok finance {token_hash('cg_x')}\n"
                      "two fields\n"
                      f"boss superuser {token_hash('cg_y')}\n"
                      "plain read notahash\n"
                      f"ok read {token_hash('cg_z')}\n")
    tokens.chmod(0o600)
    with pytest.raises(ConfigError) as caught:
        load_credentials(tokens, None)
    lines = [str(e) for e in caught.value.errors]
    assert lines == [
        f"{tokens}:3: expected 'NAME ROLE HASH', got 2 field(s)",
        f"{tokens}:4: boss: role 'superuser' is not one of read, finance, admin",
        f"{tokens}:5: plain: the hash must be sha256: and 64 hex digits "
        "(callgate web token makes one)",
        f"{tokens}:6: ok: token 'ok' is listed twice",
    ]


def test_a_world_readable_credential_file_is_refused(tmp_path: Path) -> None:
    _, tokens, users, _ = write_files(tmp_path)
    users.chmod(0o644)
    with pytest.raises(ConfigError, match="readable by everyone"):
        load_credentials(tokens, users)


def test_passwords_and_tokens_verify_and_nothing_else(tmp_path: Path) -> None:
    users = tmp_path / "users.txt"
    users.write_text(f"clerk finance {password_hash('a long password')}\n")
    users.chmod(0o600)
    tokens = tmp_path / "tokens.txt"
    tokens.write_text(f"app read {token_hash('cg_secret')}\n")
    tokens.chmod(0o600)
    creds = load_credentials(tokens, users)
    assert creds.by_password("clerk", "a long password") == Principal("clerk", Role.FINANCE,
                                                                      "user")
    assert creds.by_password("clerk", "a long passwor") is None
    assert creds.by_password("nobody", "a long password") is None
    assert creds.by_token("cg_secret") == Principal("app", Role.READ, "token")
    assert creds.by_token("cg_secreT") is None and creds.by_token("secret") is None


def test_the_failed_sign_in_limit_is_bounded() -> None:
    limit = FailureLimit(limit=2, window=10, clients=3)
    limit.failed("a", 0)
    assert limit.blocked_for("a", 1) == 0
    limit.failed("a", 1)
    assert limit.blocked_for("a", 2) == 8 and limit.blocked_for("b", 2) == 0
    assert limit.blocked_for("a", 9.5) == 0.5 and limit.blocked_for("a", 10) == 0
    for name in "bcdef":
        limit.failed(name, 20)
    assert len(limit._failures) == 3


def test_sessions_expire() -> None:
    sessions = Sessions(lifetime=60)
    sid = sessions.start(Principal("x", Role.READ, "user"), now=0)
    assert sessions.get(sid, 59) is not None and sessions.get(sid, 60) is None
    assert sessions.get("forged", 1) is None


async def test_tokens_from_a_systemd_credential(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from agent.config import WebSpec
    from agent.gate.policy import load_policy
    from agent.ledger import open_ledger
    from agent.web.server import start_from_config

    _, tokens, _, secrets = write_files(tmp_path)
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    tokens.rename(credentials / "web-tokens")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))
    spec = WebSpec(listen="127.0.0.1:0", tokens_credential="web-tokens")
    ledger = await open_ledger(f"sqlite://{tmp_path}/ledger.db")
    policy = load_policy(tmp_path / "policy.yaml")
    runner = await start_from_config(spec, tmp_path, ledger, lambda: policy)
    try:
        port = runner.addresses[0][1]
        async with aiohttp.ClientSession() as http, http.get(
                f"http://127.0.0.1:{port}/api/v1/whoami",
                headers={"Authorization": f"Bearer {secrets['admin']}"}) as r:
            assert (await r.json())["name"] == "boss"
    finally:
        await runner.cleanup()
        await ledger.close()
    monkeypatch.delenv("CREDENTIALS_DIRECTORY")
    with pytest.raises(ConfigError, match="CREDENTIALS_DIRECTORY"):
        await start_from_config(spec, tmp_path, ledger, lambda: policy)


# -- the commands ---------------------------------------------------------------------------------
def test_web_token_and_user_make_lines_the_console_accepts(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    assert main(["web", "token", "crm", "--role", "finance", "--json"]) == 0
    made = json.loads(capsys.readouterr().out)
    assert made["line"].startswith("crm finance sha256:") and made["token"] not in made["line"]
    monkeypatch.setattr("sys.stdin", io.StringIO("a very long password\n"))
    assert main(["web", "user", "anna", "--role", "read"]) == 0
    user_line = capsys.readouterr().out
    (tmp_path / "t").write_text(made["line"] + "\n")
    (tmp_path / "u").write_text(user_line)
    for f in ("t", "u"):
        (tmp_path / f).chmod(0o600)
    creds = load_credentials(tmp_path / "t", tmp_path / "u")
    assert creds.by_token(made["token"]) == Principal("crm", Role.FINANCE, "token")
    assert creds.by_password("anna", "a very long password") is not None
    monkeypatch.setattr("sys.stdin", io.StringIO("short\n"))
    assert main(["web", "user", "anna", "--role", "read"]) == 2
    assert capsys.readouterr().err == "callgate: error: a password must be at least 12 characters\n"
    assert main(["web", "token", "bad name!", "--role", "read"]) == 2


def _serve(tmp: Path, *args: str) -> subprocess.Popen[str]:
    (tmp / "policy.yaml").write_text(POLICY)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CALLGATE_")}
    return subprocess.Popen(
        [sys.executable, "-m", "agent", "--policy", str(tmp / "policy.yaml"), "--ledger",
         f"sqlite://{tmp}/ledger.db", "serve", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def test_serve_refuses_what_it_must(tmp_path: Path) -> None:
    _, tokens, _, _ = write_files(tmp_path)
    proc = _serve(tmp_path, "--tokens", str(tokens), "--listen", "0.0.0.0:18099")
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 2 and err.count("\n") == 1 and "is not loopback" in err, err
    proc = _serve(tmp_path)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 2 and "nobody could sign in" in err, err
    proc = _serve(tmp_path, "--tokens", str(tokens))  # like the CLI: never a new ledger
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 2 and err.count("\n") == 1 and "ledger init" in err, err
    assert not (tmp_path / "ledger.db").exists()


async def test_serve_answers_and_stops_on_sigterm(tmp_path: Path) -> None:
    _, tokens, _, secrets = write_files(tmp_path)
    port = free_port()
    assert await asyncio.to_thread(
        main, ["--ledger", f"sqlite://{tmp_path}/ledger.db", "ledger", "init"]) == 0
    proc = _serve(tmp_path, "--tokens", str(tokens), "--listen", f"127.0.0.1:{port}")
    try:
        headers = {"Authorization": f"Bearer {secrets['finance']}"}
        async with aiohttp.ClientSession() as http:
            # Generous: a loaded 2-core CI machine may take well over 10 s to
            # import and start `serve`. On failure, kill it before reading its
            # output, so the test fails instead of blocking on a live pipe.
            deadline = time.monotonic() + 60
            while True:
                try:
                    async with http.get(f"http://127.0.0.1:{port}/api/v1/whoami",
                                        headers=headers) as r:
                        assert (await r.json())["name"] == "payments"
                        break
                except aiohttp.ClientConnectionError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        proc.kill()
                        _, err = await asyncio.to_thread(proc.communicate, timeout=10)
                        raise AssertionError(err or "no answer") from None
                    await asyncio.sleep(0.1)
            async with http.post(f"http://127.0.0.1:{port}/api/v1/accounts/acme/topup",
                                 headers=headers, json={"amount": "100", "ref": "B1"}) as r:
                assert r.status == 201
        proc.send_signal(signal.SIGTERM)
        out, err = await asyncio.to_thread(proc.communicate, timeout=30)
        assert proc.returncode == 0, err
        assert secrets["finance"] not in out + err  # never logged
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def test_the_daemon_serves_the_console_on_its_own_loop(tmp_path: Path) -> None:
    _, tokens, _, secrets = write_files(tmp_path)
    gate_port, web_port = free_port(), free_port()
    async with simulator("asterisk", "s", gate_port) as sim:
        config = write_config(
            tmp_path, "asterisk", sim_port(sim), gate_port, "s",
            policy=(tmp_path / "policy.yaml").read_text(),
            extra=f"web: {{listen: '127.0.0.1:{web_port}', tokens_file: tokens.txt}}\n")
        assert tokens.parent == config.parent
        async with Agent(config) as agent:
            await agent.wait_for("daemon.ready")
            assert agent.matching("web.listening", address=f"127.0.0.1:{web_port}")
            headers = {"Authorization": f"Bearer {secrets['finance']}"}
            base = f"http://127.0.0.1:{web_port}/api/v1"
            async with aiohttp.ClientSession() as http:
                async with http.post(f"{base}/accounts/acme/topup", headers=headers,
                                     json={"amount": "100", "ref": "B1"}) as r:
                    assert r.status == 201
                async with http.get(f"{base}/accounts/acme", headers=headers) as r:
                    body: dict[str, Any] = await r.json()
                    assert body["balance"]["available"] == "100.0000"
                    assert body["name"] == "ACME Telemarketing"
            assert agent.proc is not None
            agent.proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(agent.proc.wait(), 20) == 0
            assert not any(secrets["finance"] in json.dumps(line) for line in agent.lines)


@pytest.mark.usefixtures("mosquitto")
async def test_serve_publishes_the_clis_events_on_mqtt(tmp_path: Path) -> None:
    """A complaint recorded through `callgate serve` is a `complaint` event, as from the CLI."""
    import uuid

    from tests.test_mqtt import subscribed

    _, _, _, secrets = write_files(tmp_path)
    port, prefix = free_port(), f"callgate-test-{uuid.uuid4().hex[:12]}"
    config = write_config(
        tmp_path, "asterisk", 5038, 4573, "s", policy=(tmp_path / "policy.yaml").read_text(),
        node="finance-host",
        extra=(f"web: {{listen: '127.0.0.1:{port}', tokens_file: tokens.txt}}\n"
               f"mqtt: {{url: 'mqtt://127.0.0.1:1883', topic_prefix: {prefix}}}\n"))
    url = f"sqlite://{tmp_path}/ledger.db"
    assert await asyncio.to_thread(main, ["--ledger", url, "ledger", "init"]) == 0
    env = {k: v for k, v in os.environ.items() if not k.startswith("CALLGATE_")}
    proc = subprocess.Popen([sys.executable, "-m", "agent", "-c", str(config), "--ledger", url,
                             "serve"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    headers = {"Authorization": f"Bearer {secrets['finance']}"}
    base = f"http://127.0.0.1:{port}/api/v1"
    try:
        async with subscribed(prefix) as subscriber, aiohttp.ClientSession() as http:
            for _ in range(300):
                try:
                    async with http.post(f"{base}/accounts/acme/topup", headers=headers,
                                         json={"amount": "1200", "ref": "B1"}) as r:
                        assert r.status == 201
                        break
                except aiohttp.ClientConnectionError:
                    assert proc.poll() is None, proc.communicate()
                    await asyncio.sleep(0.1)
            async with http.post(f"{base}/accounts/acme/complaint", headers=headers,
                                 json={"callee": "13800138000", "ticket": "T-web"}) as r:
                assert r.status == 201
            (message,) = await subscriber.wait_for(1)
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.to_thread(proc.communicate, timeout=30)
        assert proc.returncode == 0, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert str(message.topic) == f"{prefix}/finance-host/complaint"
    payload = json.loads(bytes(message.payload))  # type: ignore[arg-type]
    assert (payload["action"], payload["ticket"], payload["operator"], payload["fine"]) == (
        "added", "T-web", "payments", "1000.0000")


def test_serve_logs_a_broken_policy_edit_and_keeps_the_last_good_one(tmp_path: Path) -> None:
    """A broken edit on a finance host was dropped silently: nobody learnt the policy in
    force was not the file's."""
    from structlog.testing import capture_logs

    from agent.cli.web import _PolicyFile
    from agent.gate.policy import load_policy

    policy, _, _, _ = write_files(tmp_path)
    source = _PolicyFile(policy, load_policy(policy))
    good = source()
    policy.write_text(policy.read_text() + "accounts: [oops\n")
    with capture_logs() as logs:
        assert source() is good
        assert source() is good  # once per edit, not once per request
    refused = [x for x in logs if x["event"] == "web.policy_refused"]
    assert len(refused) == 1 and refused[0]["log_level"] == "error", logs
    assert str(policy) in refused[0]["error"] and "\n" not in refused[0]["error"]


async def test_serve_answers_requests_while_a_slow_policy_reload_runs(
        ledger_url: str, tmp_path: Path) -> None:
    """The reload ran on the request's event loop: a policy with large do-not-call files
    stalled every request of the console while it loaded."""
    import threading

    from agent.cli.web import _PolicyFile
    from agent.gate.policy import load_policy

    started, release = threading.Event(), threading.Event()

    def slow(path: Path) -> Any:  # a policy whose do-not-call files take a while
        started.set()
        if not release.wait(timeout=5):  # on the loop, nobody can release it
            raise RuntimeError("the reload blocked the event loop")
        return load_policy(path)

    async with console_at(ledger_url, tmp_path) as s:
        source = _PolicyFile(s.policy_path, load_policy(s.policy_path), load=slow)
        s.console.policy = source
        old = source()
        s.policy_path.write_text(s.policy_path.read_text() + "# edited\n")
        try:
            for _ in range(2):  # the request that notices the edit, and one during the reload
                status, body = await asyncio.wait_for(
                    call(s, "GET", "/api/v1/accounts/acme/suspension", "read"), 10)
                assert status == 200, body
            assert await asyncio.to_thread(started.wait, 10)
            assert source() is old  # answered from the policy in force meanwhile
        finally:
            release.set()
        assert source._reloading is not None
        await asyncio.wait_for(source._reloading, 10)
        assert source() is not old


@pytest.mark.parametrize("option", ["--listen", "--tokens", "--users"])
def test_serve_refuses_a_blank_option_instead_of_its_default(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], option: str) -> None:
    """`serve --listen ""` served on 127.0.0.1:8090 and `--users ""` ran without the users
    file: a blank ("$UNSET") is refused like --ledger "", never read as not given."""
    _, tokens, _, _ = write_files(tmp_path)
    args = {"--listen": "127.0.0.1:1", "--tokens": str(tokens), option: ""}
    argv = ["--policy", str(tmp_path / "policy.yaml"), "--ledger",
            f"sqlite://{tmp_path}/ledger.db", "serve", *(x for kv in args.items() for x in kv)]
    assert main(argv) == 2
    assert capsys.readouterr().err == f"callgate: error: {option} must not be blank\n"
