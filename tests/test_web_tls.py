"""TLS served by callgate itself (``web: {tls_cert, tls_key}``), over real HTTPS on loopback.

A self-signed certificate for 127.0.0.1 is made for each test with the
``openssl`` command (the project does not depend on a crypto package). The
client trusts exactly that certificate and checks the host name, so a passing
request has really been TLS; a client that does not trust it is refused, and
plain HTTP to the TLS port gets no answer. Also: ``callgate serve`` listens
on a non-loopback address with TLS, refuses it without TLS, and accepts it
without TLS only when told explicitly (``--allow-plaintext-remote``).
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from agent.cli import main
from agent.config import WebSpec
from agent.gate.policy import load_policy
from agent.ledger import open_ledger
from agent.web.server import bound_port, start_from_config
from tests.daemon_harness import free_port, write_config
from tests.web_harness import POLICY, write_files


def self_signed(tmp: Path) -> tuple[Path, Path]:
    """cert.pem and key.pem for 127.0.0.1 and localhost, valid for two days."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.fail("the openssl command is needed to make a test certificate", pytrace=False)
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2",
         "-subj", "/CN=callgate test", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        check=True, capture_output=True, timeout=60)
    key.chmod(0o600)
    return cert, key


def trusting(cert: Path) -> ssl.SSLContext:
    """A client context that trusts only ``cert`` and checks the host name."""
    context = ssl.create_default_context(cafile=str(cert))
    assert context.check_hostname and context.verify_mode is ssl.CERT_REQUIRED
    return context


async def test_the_console_serves_https_itself(tmp_path: Path) -> None:
    cert, _ = self_signed(tmp_path)
    policy_path, _, _, tokens = write_files(tmp_path)
    policy = load_policy(policy_path)
    spec = WebSpec(listen="127.0.0.1:0", tokens_file="tokens.txt", users_file="users.txt",
                   tls_cert="cert.pem", tls_key="key.pem")
    ledger = await open_ledger(f"sqlite://{tmp_path}/ledger.db")
    runner = await start_from_config(spec, tmp_path, ledger, lambda: policy)
    port = bound_port(runner)
    headers = {"Authorization": f"Bearer {tokens['finance']}"}
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"https://127.0.0.1:{port}/api/v1/whoami", headers=headers,
                                ssl=trusting(cert)) as r:
                assert r.status == 200 and (await r.json())["name"] == "payments"
                assert r.url.scheme == "https"
            async with http.post(f"https://localhost:{port}/api/v1/accounts/acme/topup",
                                 headers=headers, json={"amount": "100", "ref": "TLS-1"},
                                 ssl=trusting(cert)) as r:
                assert r.status == 201
            # A client that does not trust the certificate refuses the server: real TLS.
            with pytest.raises(aiohttp.ClientConnectorCertificateError):
                async with http.get(f"https://127.0.0.1:{port}/api/v1/whoami",
                                    ssl=ssl.create_default_context()):
                    pass
            # Plain HTTP to the TLS port gets no HTTP answer.
            with pytest.raises(aiohttp.ClientError):
                async with http.get(f"http://127.0.0.1:{port}/api/v1/whoami",
                                    headers=headers):
                    pass
        # Over HTTPS the session cookie is Secure (and HttpOnly, SameSite=Strict).
        jar = aiohttp.CookieJar(unsafe=True)
        async with aiohttp.ClientSession(cookie_jar=jar) as http:
            async with http.get(f"https://127.0.0.1:{port}/login", ssl=trusting(cert)) as r:
                nonce = re.search(r'name="nonce" value="([^"]*)"', await r.text())
                assert nonce is not None
            async with http.post(f"https://127.0.0.1:{port}/login", ssl=trusting(cert),
                                 allow_redirects=False,
                                 data={"nonce": nonce.group(1), "token": tokens["read"]}) as r:
                assert r.status == 303
                cookie = next(v for v in r.headers.getall("Set-Cookie")
                              if v.startswith("callgate_session="))
                assert all(flag in cookie for flag in ("Secure", "HttpOnly",
                                                       "SameSite=Strict")), cookie
    finally:
        await runner.cleanup()
        await ledger.close()
    assert [(p.ref, p.operator) for p in await _history(tmp_path)] == [("TLS-1", "payments")]


async def _history(tmp: Path) -> list[Any]:
    ledger = await open_ledger(f"sqlite://{tmp}/ledger.db")
    try:
        return await ledger.history("acme")
    finally:
        await ledger.close()


def _serve(tmp: Path, config: Path, *args: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CALLGATE_")}
    return subprocess.Popen(
        [sys.executable, "-m", "agent", "-c", str(config), "--ledger",
         f"sqlite://{tmp}/ledger.db", "serve", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


async def _answers(proc: subprocess.Popen[str], url: str, token: str,
                   context: ssl.SSLContext | None) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http:
        for _ in range(300):
            try:
                async with http.get(url, headers={"Authorization": f"Bearer {token}"},
                                    ssl=context if context is not None else True) as r:
                    body: dict[str, Any] = await r.json()
                    return body
            except aiohttp.ClientConnectionError:
                if proc.poll() is not None:
                    break
                await asyncio.sleep(0.1)
    raise AssertionError(proc.stderr.read() if proc.stderr and proc.poll() is not None
                         else "no answer")


async def _stop(proc: subprocess.Popen[str]) -> str:
    proc.send_signal(signal.SIGTERM)
    out, err = await asyncio.to_thread(proc.communicate, timeout=30)
    assert proc.returncode == 0, err
    return out + err


async def test_serve_on_a_non_loopback_address_needs_tls_or_an_explicit_yes(
        tmp_path: Path) -> None:
    cert, _ = self_signed(tmp_path)
    _, _, _, tokens = write_files(tmp_path)
    assert await asyncio.to_thread(
        main, ["--ledger", f"sqlite://{tmp_path}/ledger.db", "ledger", "init"]) == 0
    port = free_port()
    web = f"{{listen: '0.0.0.0:{port}', tokens_file: tokens.txt"
    # In the config without TLS: refused before anything listens, one line, exit 2.
    plain = write_config(tmp_path, "asterisk", 5038, 4573, "s", policy=POLICY,
                         extra=f"web: {web}}}\n")
    proc = _serve(tmp_path, plain)
    _, err = await asyncio.to_thread(proc.communicate, timeout=30)
    assert proc.returncode == 2 and err.count("\n") == 1 and "is not loopback" in err, err
    # With TLS: served on every address, HTTPS answers on loopback.
    secure = write_config(tmp_path, "asterisk", 5038, 4573, "s", policy=POLICY,
                          extra=f"web: {web}, tls_cert: cert.pem, tls_key: key.pem}}\n")
    proc = _serve(tmp_path, secure)
    try:
        body = await _answers(proc, f"https://127.0.0.1:{port}/api/v1/whoami",
                              tokens["read"], trusting(cert))
        assert body["name"] == "auditor"
        logged = await _stop(proc)
        assert "tls=True" in logged or '"tls": true' in logged, logged
        assert tokens["read"] not in logged
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # Without TLS only when told explicitly (a TLS proxy on a private link).
    loopback = write_config(tmp_path, "asterisk", 5038, 4573, "s", policy=POLICY,
                            extra="web: {tokens_file: tokens.txt}\n")
    proc = _serve(tmp_path, loopback, "--listen", f"0.0.0.0:{port}")
    _, err = await asyncio.to_thread(proc.communicate, timeout=30)
    assert proc.returncode == 2 and "is not loopback" in err, err
    proc = _serve(tmp_path, loopback, "--listen", f"0.0.0.0:{port}",
                  "--allow-plaintext-remote")
    try:
        body = await _answers(proc, f"http://127.0.0.1:{port}/api/v1/whoami",
                              tokens["read"], None)
        assert body["name"] == "auditor"
        await _stop(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_an_unreadable_certificate_is_one_line_and_nothing_served(tmp_path: Path) -> None:
    write_files(tmp_path)
    (tmp_path / "cert.pem").write_text("not a certificate\n")
    (tmp_path / "key.pem").write_text("not a key\n")
    assert main(["--ledger", f"sqlite://{tmp_path}/ledger.db", "ledger", "init"]) == 0
    config = write_config(tmp_path, "asterisk", 5038, 4573, "s", policy=POLICY,
                          extra=f"web: {{listen: '127.0.0.1:{free_port()}', tokens_file: "
                                "tokens.txt, tls_cert: cert.pem, tls_key: key.pem}\n")
    proc = _serve(tmp_path, config)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 1 and "cannot serve on" in err, (out, err)
    assert err.count("\n") == 1 and "Traceback" not in err, err
