"""The agent config (``agent.yaml``): node, policy path, ledger URL, PBX, MQTT, metrics, web, logs.

Validated like the policy (file, line, field on every error; unknown keys are
errors). Paths are relative to the config file. Secrets (AMI secret, ESL
password, MQTT password) may be written inline, or taken from the environment
(``secret_env: NAME``) or from a systemd credential (``secret_file:`` a path,
or ``secret_credential: NAME`` read from ``$CREDENTIALS_DIRECTORY``). Secrets
never appear in logs or in ``repr``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal, Self

from pydantic import (
    ConfigDict,
    Field,
    SecretStr,
    StrictStr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from agent.yamlfile import ConfigError, LocatedError, NoBoolNumbers, read_yaml, validate


class _Strict(NoBoolNumbers):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _address(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{value!r} is not HOST:PORT (e.g. '127.0.0.1:4573')")
    return host.strip("[]") or "127.0.0.1", int(port)


Listen = Annotated[StrictStr, Field(pattern=r"^.*:\d{1,5}$")]


class SecretSource(_Strict):
    """A secret inline, from an environment variable, a file or a systemd credential."""

    secret: SecretStr | None = None
    secret_env: StrictStr | None = None
    secret_file: StrictStr | None = None
    secret_credential: StrictStr | None = None

    @model_validator(mode="after")
    def _one_source(self) -> Self:
        given = [n for n in ("secret", "secret_env", "secret_file", "secret_credential")
                 if getattr(self, n) is not None]
        if len(given) > 1:
            raise ValueError(f"give the secret one way only, not {', '.join(given)}")
        return self

    def resolve(self, base: Path) -> str:
        if self.secret is not None:
            return self.secret.get_secret_value()
        if self.secret_env is not None:
            value = os.environ.get(self.secret_env)
            if value is None:
                raise ValueError(f"environment variable {self.secret_env} is not set")
            return value
        if self.secret_credential is not None:
            directory = os.environ.get("CREDENTIALS_DIRECTORY")
            if not directory:
                raise ValueError("secret_credential needs systemd's $CREDENTIALS_DIRECTORY "
                                 "(LoadCredential= in the unit)")
            return (Path(directory) / self.secret_credential).read_text().strip()
        if self.secret_file is not None:
            return (base / self.secret_file).read_text().strip()
        return ""


class AmiSpec(SecretSource):
    host: StrictStr = "127.0.0.1"
    port: int = Field(5038, ge=1, le=65535)
    username: StrictStr = "callgate"


class FastAgiSpec(_Strict):
    listen: Listen = "127.0.0.1:4573"


class EslSpec(_Strict):
    host: StrictStr = "127.0.0.1"
    port: int = Field(8021, ge=1, le=65535)
    password: SecretStr | None = None
    password_env: StrictStr | None = None
    password_credential: StrictStr | None = None

    def resolve(self) -> str:
        return SecretSource(secret=self.password, secret_env=self.password_env,
                            secret_credential=self.password_credential).resolve(Path("."))


class OutboundSocketSpec(_Strict):
    listen: Listen = "127.0.0.1:8084"


class PbxSpec(_Strict):
    kind: Literal["asterisk", "freeswitch"]
    ami: AmiSpec | None = None
    fastagi: FastAgiSpec | None = None
    esl: EslSpec | None = None
    outbound_socket: OutboundSocketSpec | None = None
    outbound_contexts: list[StrictStr] = Field(default_factory=list)
    watch_only_contexts: list[StrictStr] = Field(default_factory=list)
    decision_budget_ms: int = Field(500, ge=10, le=10_000)
    ring_allowance_seconds: int = Field(0, ge=0, le=300)
    # The control link's slow-or-dead rules (agent/pbx/liveness.py): a command
    # fails after command_timeout_seconds, doubled while the PBX stays slow up to
    # command_timeout_max_seconds (default: dead_after_seconds), and the link is
    # dead only after dead_after_seconds with no byte at all while a reply is due.
    command_timeout_seconds: float = Field(5.0, ge=1, le=120)
    command_timeout_max_seconds: float | None = Field(None, ge=1, le=600)
    dead_after_seconds: float = Field(30.0, ge=1, le=600, validate_default=True)

    @field_validator("command_timeout_max_seconds")
    @classmethod
    def _max_not_below_first(cls, value: float | None, info: ValidationInfo) -> float | None:
        first = info.data.get("command_timeout_seconds")
        if value is not None and first is not None and value < first:
            raise ValueError(f"{value:g} s is shorter than pbx.command_timeout_seconds "
                             f"({first:g} s), the timeout it backs off from")
        return value

    @field_validator("dead_after_seconds")
    @classmethod
    def _dead_after_not_below_timeout(cls, value: float, info: ValidationInfo) -> float:
        # validated when defaulted too: command_timeout_seconds: 40 alone would
        # call a PBX dead before its first command may time out.
        first = info.data.get("command_timeout_seconds")
        if first is not None and value < first:
            raise ValueError(f"{value:g} s is shorter than pbx.command_timeout_seconds "
                             f"({first:g} s): a PBX would be called dead before a command "
                             f"may time out; set it to at least {first:g} (default 30)")
        return value

    @property
    def command_timeout_max(self) -> float:
        """The ceiling of the backed-off command timeout (default: ``dead_after_seconds``)."""
        if self.command_timeout_max_seconds is None:
            return self.dead_after_seconds
        return self.command_timeout_max_seconds

    @model_validator(mode="after")
    def _matches_kind(self) -> Self:
        if self.kind == "asterisk" and (self.esl or self.outbound_socket):
            raise ValueError("esl/outbound_socket belong to kind: freeswitch")
        if self.kind == "freeswitch" and (self.ami or self.fastagi):
            raise ValueError("ami/fastagi belong to kind: asterisk")
        return self


class MqttSpec(_Strict):
    url: StrictStr = "mqtt://127.0.0.1:1883"
    username: StrictStr | None = None
    password: SecretStr | None = None
    password_env: StrictStr | None = None
    password_credential: StrictStr | None = None
    topic_prefix: StrictStr = "callgate"
    buffer: int = Field(10_000, ge=1, le=10_000_000)
    tls: bool = False
    ca_file: StrictStr | None = None


class MetricsSpec(_Strict):
    listen: Listen = "127.0.0.1:9108"


class WebSpec(_Strict):
    """The finance console (agent/web): off unless the section is present."""

    listen: Listen = "127.0.0.1:8090"
    tokens_file: StrictStr | None = None
    tokens_credential: StrictStr | None = None
    users_file: StrictStr | None = None
    users_credential: StrictStr | None = None
    tls_cert: StrictStr | None = None
    tls_key: StrictStr | None = None
    allow_plaintext_remote: bool = False
    behind_proxy: bool = False
    max_body_bytes: int = Field(16_384, ge=1024, le=1_048_576)
    request_timeout_seconds: float = Field(15, ge=1, le=300)
    failed_logins: int = Field(10, ge=1, le=1000)
    failed_logins_window_seconds: float = Field(300, ge=1, le=86_400)
    session_hours: float = Field(8, gt=0, le=168)

    @model_validator(mode="after")
    def _safe(self) -> Self:
        from agent.web.listen import plaintext_remote

        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("give both tls_cert and tls_key, or neither")
        if self.tokens_file and self.tokens_credential:
            raise ValueError("give tokens_file or tokens_credential, not both")
        if self.users_file and self.users_credential:
            raise ValueError("give users_file or users_credential, not both")
        problem = plaintext_remote(_address(self.listen)[0], self.tls_cert is not None,
                                   self.allow_plaintext_remote)
        if problem:
            raise ValueError(problem)
        return self


class LogSpec(_Strict):
    format: Literal["json", "console", "auto"] = "auto"
    level: Literal["debug", "info", "warning", "error"] = "info"


class MeterSpec(_Strict):
    grace_seconds: int = Field(2, ge=0, le=30)
    lead_seconds: int = Field(5, ge=1, le=60)
    warning_seconds: int = Field(0, ge=0, le=300)
    # every balance read this often: low-balance warnings for postings made by the
    # CLI, and the metrics' per-account balance gauges (one read serves both)
    balance_check_seconds: float = Field(10.0, ge=1, le=3600)


class CdrSpec(_Strict):
    """The PBX's own CDR file, followed to settle calls from it (README: CDR source)."""

    file: StrictStr
    format: Literal["asterisk-custom", "asterisk-csv", "freeswitch-csv",
                    "freeswitch-example"] | None = None  # default: by pbx.kind
    columns: list[StrictStr] | None = None  # replaces the format's columns
    timezone: StrictStr = "UTC"  # of CDR times written without a zone
    poll_seconds: float = Field(1.0, gt=0, le=60)
    state_file: StrictStr | None = None  # default: <state_directory>/cdr-position.json
    pending_max_age_seconds: float = Field(3600.0, gt=0)

    def layout(self, kind: str) -> Any:
        from agent.cdr.formats import preset

        name = self.format or ("asterisk-custom" if kind == "asterisk" else "freeswitch-csv")
        return preset(name, timezone=self.timezone, columns=self.columns)


class AgentSpec(_Strict):
    node: Annotated[StrictStr, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]
    policy: StrictStr = "policy.yaml"
    ledger: StrictStr | None = None
    state_directory: StrictStr | None = None
    pbx: PbxSpec
    mqtt: MqttSpec | None = None
    metrics: MetricsSpec | None = None
    web: WebSpec | None = None
    log: LogSpec = Field(default_factory=LogSpec)
    meter: MeterSpec = Field(default_factory=MeterSpec)
    cdr: CdrSpec | None = None

    @model_validator(mode="after")
    def _cdr_layout(self) -> Self:
        if self.cdr is not None:
            from agent.cdr.formats import CdrFormatError

            try:
                self.cdr.layout(self.pbx.kind)
            except CdrFormatError as exc:
                raise ValueError(f"cdr: {exc}") from None
        return self


class AgentConfig:
    """The validated config with paths resolved and secrets read."""

    def __init__(self, spec: AgentSpec, path: Path) -> None:
        self.spec = spec
        self.path = path
        base = path.parent
        self.node = spec.node
        self.policy_path = (base / spec.policy).resolve()
        state = spec.state_directory or os.environ.get("STATE_DIRECTORY") or "/var/lib/callgate"
        self.state_directory = (base / state).resolve()
        # sqlite:///var/lib/x.db names /var/lib/x.db (README); sqlite:ledger.db is
        # relative to this file.
        if spec.ledger and spec.ledger.startswith("sqlite:") and not spec.ledger.startswith(
                "sqlite://"):
            self.ledger = "sqlite://" + str((base / spec.ledger[len("sqlite:"):]).resolve())
        elif spec.ledger:
            self.ledger = spec.ledger
        else:
            self.ledger = "sqlite://" + str(self.state_directory / "ledger.db")
        self.cdr_file = (base / spec.cdr.file).resolve() if spec.cdr else None
        self.cdr_state_file = (
            (base / spec.cdr.state_file).resolve() if spec.cdr and spec.cdr.state_file
            else self.state_directory / "cdr-position.json")

    def __repr__(self) -> str:
        return f"AgentConfig(node={self.node!r}, path={str(self.path)!r})"

    def listen(self, value: str) -> tuple[str, int]:
        return _address(value)


def load_agent_config(path: Path | str) -> AgentConfig:
    path = Path(path)
    doc = read_yaml(path)
    spec = validate(doc, AgentSpec)
    return AgentConfig(spec, path)


def resolve_secret(config: AgentConfig) -> str:
    """The PBX secret, read only when the agent runs (``policy check`` does not need it).

    A missing environment variable, file or credential is a :class:`ConfigError`
    naming the config key, never a silent empty secret.
    """
    pbx = config.spec.pbx
    where = "pbx.ami" if pbx.kind == "asterisk" else "pbx.esl"
    try:
        if pbx.kind == "asterisk":
            return (pbx.ami or AmiSpec()).resolve(config.path.parent)
        return (pbx.esl or EslSpec()).resolve()
    except (OSError, ValueError) as exc:
        raise config_error(config.path, f"{where}: secret: {exc}") from None


def config_error(path: Path, message: str) -> ConfigError:
    return ConfigError([LocatedError(str(path), None, "", message)])


