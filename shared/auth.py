"""NATS identities and what each may do; HTTP API keys; the server's accounts.

gfaas runs one NATS account for itself (`GFAAS`: every service, the admin, JetStream)
and one for tenants (`TENANTS`), which exports nothing and imports from GFAAS the
services `gfaas.v1.t.*.invoke.*`, `.invoke_async.*` and `.result.*` (`TENANT_SERVICES`)
and the stream of async callbacks `gfaas.v1.tcb.>`. Each tenant is a user there who
may publish only those under its own name (`gfaas.v1.t.<its name>.…`) and hear only
its own inbox (`_INBOX_<its name>.>`) and callbacks (`gfaas.v1.tcb.<its name>.>`),
so the tenant in the subject that reaches GFAAS is the authenticated one (the server
refuses any other), whatever headers the caller wrote; ingress reads it from the
subject (`tenant_of_subject`). Tenants neither see the service account's subjects
nor each other's replies, and a tenant's async invocation ids carry its tag
(`tenant_invocation_id`), so no tenant can name another's result. (One account per
tenant, with a subject mapping, would be neater, but nats-server 2.15 does not wire
a service import of an account added by a config reload: `gfaas tenant add` would
need a restart.)

Inside GFAAS each service has its own user whose publish and subscribe allow-lists
(`service_permissions`) name only the subjects of docs/architecture.md's table it
handles or sends: only the scheduler and ingress (direct sends under a grant) publish
`worker.<id>.run`, only workers publish heartbeats and done notes and subscribe to
run subjects, only the broker subscribes to broker subjects. No service but the
admin writes the registry or the model store, or deletes or purges a stream. Each
identity hears replies only in its own inbox (`_INBOX_<identity>`, which
`connect_options` sets), so no service hears the answers to the admin's requests or
another service's (connections of one identity, every worker's, share theirs); each
may answer any of them.

Everything lives in the auth directory (`auth_dir`, `<state_dir>/auth`), mode 0700:

- `users.json`: every identity's password (0600; the server's config has them too);
- `accounts.conf`: the nats-server include rendered from it (`render_accounts`);
- `<identity>.json`: each service's and the admin's credentials file (`Credentials`);
- `tenants/<name>.json`: a tenant's credentials file, from `add_tenant`;
- `tokens.json`: HTTP/gRPC API keys, as sha256 hex -> tenant (`TokenBook` reads it).

No connections here: services connect through shared.bus, clients through
gfaas.client, both with `connect_options`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from shared import jetstream
from shared.config import Settings
from shared.names import check_name
from shared.schema import DEFAULT_TENANT
from shared.subjects import PREFIX

SERVICE_ACCOUNT: Final = "GFAAS"
TENANT_ACCOUNT: Final = "TENANTS"
ADMIN: Final = "admin"
# The services' users: their names are the services' (shared.config, gfaas up).
SERVICES: Final = ("ingress", "scheduler", "gpu-worker", "memory-broker")
# Function instances (the processes agents start, where handler code runs): less than
# their worker may (no deploy checks, profiles or agent commands to hear, no beats of
# an agent's to send), so a handler cannot pose as its node's agent or worker.
INSTANCE: Final = "gpu-instance"
IDENTITIES: Final = (ADMIN, *SERVICES, INSTANCE)
# Where a tenant's requests land in GFAAS: `gfaas.v1.t.<tenant>.<op>.<x>`, the
# service-account subjects `gfaas.v1.<op>.<x>` (shared.subjects) under the tenant's name.
TENANT_INVOKE_ALL: Final = f"{PREFIX}.t.*.invoke.*"
TENANT_INVOKE_ASYNC_ALL: Final = f"{PREFIX}.t.*.invoke_async.*"
TENANT_RESULT_ALL: Final = f"{PREFIX}.t.*.result.*"
TENANT_SERVICES: Final = (TENANT_INVOKE_ALL, TENANT_INVOKE_ASYNC_ALL, TENANT_RESULT_ALL)
# Where ingress publishes tenants' async callbacks (`gfaas.v1.tcb.<tenant>.…`): a stream
# the TENANTS account imports, each tenant hearing only its own.
TENANT_CALLBACKS_ALL: Final = f"{PREFIX}.tcb.>"
# How long a tenant's request may wait for its reply through the import (the longest
# invocation deadline a tenant can use).
RESPONSE_THRESHOLD: Final = "15m"
API_KEY_PREFIX: Final = "gfk_"
_DIR_MODE: Final = 0o700
_FILE_MODE: Final = 0o600


class AuthError(ValueError):
    pass


def tenant_invoke(tenant: str, function: str = "*") -> str:
    return f"{PREFIX}.t.{tenant}.invoke.{function}"


def tenant_invoke_async(tenant: str, function: str = "*") -> str:
    return f"{PREFIX}.t.{tenant}.invoke_async.{function}"


def tenant_result(tenant: str, invocation_id: str = "*") -> str:
    return f"{PREFIX}.t.{tenant}.result.{invocation_id}"


def tenant_of_subject(subject: str, op: str = "invoke") -> str | None:
    """The tenant in `gfaas.v1.t.<tenant>.<op>.<x>` (the server wrote it), else None:
    another op, or a plain `gfaas.v1.<op>.<x>` from inside the service account."""
    parts = subject.split(".")
    if len(parts) == 6 and f"{parts[0]}.{parts[1]}" == PREFIX and parts[2] == "t":
        return parts[3] if parts[4] == op else None
    return None


def tenant_callbacks(tenant: str) -> str:
    """The subjects a tenant's async callbacks may go to: `<this>.<tokens>`."""
    return f"{PREFIX}.tcb.{tenant}"


def inbox(identity: str) -> str:
    """An identity's inbox prefix (a service, the admin, a tenant): the only replies
    its user may hear. Tenants live in their own account, so a tenant named like a
    service shares nothing with it."""
    return f"_INBOX_{identity}"


def tenant_inbox(tenant: str) -> str:
    return inbox(tenant)


def tenant_user(tenant: str) -> str:
    """A tenant's NATS user name."""
    return f"t-{tenant}"


# A tenant's async invocation ids begin with its tag: a fixed-length digest of its
# name, so one tenant can neither make an id in another's range (ingress prefixes
# whatever id it is given) nor read one (a result lookup for an id without the
# caller's tag is answered as an unknown id, without looking).
_TAG_HEX: Final = 16


def tenant_tag(tenant: str) -> str:
    return f"t{hashlib.sha256(tenant.encode()).hexdigest()[:_TAG_HEX]}-"


def tenant_invocation_id(tenant: str, given: str) -> str:
    """The id a tenant's async invocation is kept under: `given` when it is already
    one of the tenant's (a retry with the id ingress answered), else with its tag."""
    tag = tenant_tag(tenant)
    return given if given.startswith(tag) else tag + given


def owns_invocation(tenant: str, invocation_id: str) -> bool:
    return invocation_id.startswith(tenant_tag(tenant))


# -- permissions ---------------------------------------------------------------------------

P = PREFIX
# Every service may answer requesters in the account: any identity's inbox, and the
# default one of a client that connects without gfaas's options (a plain nats-py or
# `nats` CLI session as the admin). It hears only its own inbox.
_ANY_INBOX: Final = ("_INBOX.>", *(f"{inbox(i)}.>" for i in IDENTITIES))
# Replies to tenants' requests (the server's reply subjects for service imports).
_TENANT_REPLIES: Final = "_R_.>"
_JS: Final = ("$JS.API.>", "$JS.ACK.>", "$JS.FC.>")
# No service may change what the admin alone writes, nor drop a stream's contents.
_JS_DENY: Final = (
    f"$KV.{jetstream.FUNCTIONS_BUCKET}.>",
    f"$KV.{jetstream.WORKFLOWS_BUCKET}.>",
    f"$O.{jetstream.MODELS_BUCKET}.>",
    # Code bundles are handler code: what a worker's credentials (which handler code
    # holds) could write there, every instance pinning it would refuse or run.
    f"$O.{jetstream.CODE_BUCKET}.>",
    "$JS.API.STREAM.DELETE.>",
    "$JS.API.STREAM.PURGE.>",
    "$JS.API.STREAM.MSG.DELETE.>",
    f"$JS.API.STREAM.UPDATE.KV_{jetstream.FUNCTIONS_BUCKET}",
    f"$JS.API.STREAM.UPDATE.KV_{jetstream.WORKFLOWS_BUCKET}",
    f"$JS.API.STREAM.UPDATE.OBJ_{jetstream.MODELS_BUCKET}",
    f"$JS.API.STREAM.UPDATE.OBJ_{jetstream.CODE_BUCKET}",
    # Nor create it before the admin does, with subjects or transforms of its own that
    # the admin's first push would then find and use (nodes only open it).
    f"$JS.API.STREAM.CREATE.OBJ_{jetstream.CODE_BUCKET}",
    # A stream updated to max_msgs 1 drops all it held: a purge by another name. Only
    # ingress updates streams (its own three, `jetstream._stream`), none of these.
    f"$JS.API.STREAM.UPDATE.KV_{jetstream.RESULTS_BUCKET}",
    f"$JS.API.STREAM.UPDATE.KV_{jetstream.PROFILES_BUCKET}",
    f"$JS.API.STREAM.UPDATE.KV_{jetstream.LEADER_BUCKET}",
    # No service deletes a consumer: ingress's async one gone, queued invocations wait.
    "$JS.API.CONSUMER.DELETE.>",
)
_INVOCATIONS: Final = jetstream.INVOCATIONS_STREAM
# What only ingress does with JetStream: update a stream, and read, take or change the
# async invocations queued for it (every tenant's requests); a worker's credentials,
# which handler code holds, could otherwise empty the queue or take from it.
_JS_DENY_BUT_INGRESS: Final = (
    "$JS.API.STREAM.UPDATE.>",
    f"$JS.API.STREAM.MSG.GET.{_INVOCATIONS}",
    f"$JS.API.DIRECT.GET.{_INVOCATIONS}",
    f"$JS.API.DIRECT.GET.{_INVOCATIONS}.>",
    # CONSUMER.CREATE, .LIST, .NAMES; CREATE.<stream>.<name>, .INFO; MSG.NEXT and
    # DURABLE.CREATE.
    f"$JS.API.CONSUMER.*.{_INVOCATIONS}",
    f"$JS.API.CONSUMER.*.{_INVOCATIONS}.>",
    f"$JS.API.CONSUMER.*.*.{_INVOCATIONS}.>",
)


def may_delete_consumers(user: str) -> bool:
    """Whether a connection as NATS user `user` may delete a JetStream consumer: not
    a service's or an instance's identity (`_JS_DENY`); the admin, a connection
    without a user (a server without authentication) or anyone else may try. What
    would be refused is not sent: the server logs every refusal as a permissions
    violation on the connection."""
    permissions = SERVICE_PERMISSIONS.get(user)
    return permissions is None or "$JS.API.CONSUMER.DELETE.>" not in permissions.publish_deny


def _kv(bucket: str) -> str:
    return f"$KV.{bucket}.>"


@dataclass(frozen=True)
class Permissions:
    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    publish_deny: tuple[str, ...] = ()

    def as_config(self) -> dict[str, Any]:
        pub: dict[str, Any] = {"allow": list(self.publish)}
        if self.publish_deny:
            pub["deny"] = list(self.publish_deny)
        return {"publish": pub, "subscribe": {"allow": list(self.subscribe)}}


def _service(
    name: str, publish: Sequence[str], subscribe: Sequence[str], *, js: bool = True
) -> Permissions:
    # Its own status too: `gfaas health SERVICE` (compose's healthcheck) asks it with
    # the container's own credentials.
    common_pub = [*_ANY_INBOX, f"{P}.echo.*", f"{P}.status.{name}"]
    common_sub = [f"{inbox(name)}.>", f"{P}.echo.*", f"{P}.status.{name}"]
    return Permissions(
        publish=tuple([*common_pub, *(_JS if js else ()), *publish]),
        subscribe=tuple([*common_sub, *subscribe]),
        publish_deny=(*_JS_DENY, *(() if name == "ingress" else _JS_DENY_BUT_INGRESS))
        if js
        else (),
    )


# What a process that runs handlers publishes, a worker or an instance: answers,
# heartbeats and completions, the agent's token requests, the broker's regions, logs
# and async results. A worker adds its agent's own subjects.
_RUNS_PUBLISH: Final = (
    _TENANT_REPLIES,
    f"{P}.heartbeat.*",
    f"{P}.done.>",
    f"{P}.refused",
    f"{P}.agent.*.acquire",
    f"{P}.agent.*.release",
    f"{P}.agent.*.failed",
    f"{P}.agent.*.weights",
    f"{P}.broker.*.*",
    f"{P}.logs.*",
    _kv(jetstream.RESULTS_BUCKET),
)


SERVICE_PERMISSIONS: Final[Mapping[str, Permissions]] = {
    "ingress": _service(
        "ingress",
        publish=[
            _TENANT_REPLIES,
            f"{P}.schedule",
            # Tenants' async invocations, queued under the tenant's name.
            f"{P}.invoke_async.*",
            f"{P}.tcb.*.>",
            # Direct sends under a grant (services/ingress/dispatch.py).
            f"{P}.worker.*.run",
            f"{P}.grant_return",
            f"{P}.alive.*",
            f"{P}.broker.*.*",
            f"{P}.dead.*",
            f"{P}.logs.*",
            _kv(jetstream.RESULTS_BUCKET),
        ],
        subscribe=[
            f"{P}.invoke.*",
            *TENANT_SERVICES,
            f"{P}.result.*",
            f"{P}.ingress.*.grant",
            f"{P}.done.*",
            f"{P}.done.scheduler.*",
            f"{P}.worker_lost",
            f"{P}.scheduler_alive",
            # The async path watches the worker running a claimed invocation.
            f"{P}.heartbeat.*",
        ],
    ),
    "scheduler": _service(
        "scheduler",
        publish=[
            _TENANT_REPLIES,
            f"{P}.worker.*.run",
            f"{P}.ingress.*.grant",
            f"{P}.worker_lost",
            f"{P}.scheduler_alive",
            f"{P}.agent.*.start",
            f"{P}.agent.*.stop",
            f"{P}.profile",
            f"{P}.logs.*",
            _kv(jetstream.LEADER_BUCKET),
            _kv(jetstream.PROFILES_BUCKET),
        ],
        subscribe=[
            f"{P}.schedule",
            f"{P}.refused",
            f"{P}.heartbeat.*",
            f"{P}.done.>",
            f"{P}.grant_return",
            f"{P}.alive.*",
            f"{P}.agent_beat.*",
            f"{P}.profiled.*",
            # Its peers' beats: a leader that steps down hands what waits to the one it
            # heard (scheduler/handlers.py `hand_over`); unheard, it answers unavailable.
            f"{P}.scheduler_alive",
        ],
    ),
    # Workers and their agents (the instances they start connect as INSTANCE:
    # `instance_creds`).
    "gpu-worker": _service(
        "gpu-worker",
        publish=[
            *_RUNS_PUBLISH,
            f"{P}.agent_beat.*",
            f"{P}.profiled.*",
            _kv(jetstream.PROFILES_BUCKET),
        ],
        subscribe=[
            f"{P}.worker.*.run",
            f"{P}.handler_check",
            f"{P}.profile",
            f"{P}.agent.*.*",
            f"{P}.heartbeat.*",
        ],
    ),
    INSTANCE: _service(
        INSTANCE,
        publish=_RUNS_PUBLISH,
        subscribe=[
            f"{P}.worker.*.run",
            # It answers `gfaas status gpu-worker` as the worker it is to the others.
            f"{P}.status.gpu-worker",
        ],
    ),
    "memory-broker": _service(
        "memory-broker",
        publish=[],
        subscribe=[f"{P}.broker.*.*", f"{P}.heartbeat.*", f"{P}.alive.*"],
        js=False,
    ),
}


def tenant_permissions(tenant: str) -> Permissions:
    """A tenant in the TENANTS account: it can ask for invocations, async ones and
    their results under its own name (the imports) and hear the answers in its own
    inbox and its callbacks; nothing else."""
    return Permissions(
        publish=(tenant_invoke(tenant), tenant_invoke_async(tenant), tenant_result(tenant)),
        subscribe=(f"{tenant_inbox(tenant)}.>", f"{tenant_callbacks(tenant)}.>"),
    )


# -- files ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Credentials:
    """A gfaas credentials file: who connects, and to which account it belongs; a
    tenant's names it (its subjects and inbox follow from the name)."""

    user: str
    password: str
    account: str = SERVICE_ACCOUNT
    tenant: str = ""

    def dump(self, path: Path) -> None:
        _write_private(path, json.dumps(self.__dict__, indent=2) + "\n")

    @classmethod
    def load(cls, path: Path | str) -> Credentials:
        try:
            raw = json.loads(Path(path).read_text())
            return cls(
                user=str(raw["user"]),
                password=str(raw["password"]),
                account=str(raw.get("account", SERVICE_ACCOUNT)),
                tenant=str(raw.get("tenant", "")),
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise AuthError(f"cannot read NATS credentials {path}: {exc}") from None


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=_DIR_MODE)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _FILE_MODE)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _password() -> str:
    return secrets.token_urlsafe(24)


@dataclass
class AuthState:
    """What `users.json` holds: every identity's password, by name."""

    directory: Path
    services: dict[str, str] = field(default_factory=dict)
    tenants: dict[str, str] = field(default_factory=dict)

    @property
    def users_file(self) -> Path:
        return self.directory / "users.json"

    @property
    def accounts_file(self) -> Path:
        return self.directory / "accounts.conf"

    @property
    def tokens_file(self) -> Path:
        return self.directory / "tokens.json"

    def creds_file(self, identity: str) -> Path:
        return self.directory / f"{identity}.json"

    def tenant_creds_file(self, tenant: str) -> Path:
        return self.directory / "tenants" / f"{tenant}.json"

    def save(self) -> None:
        text = json.dumps({"services": self.services, "tenants": self.tenants}, indent=2)
        _write_private(self.users_file, text + "\n")

    @classmethod
    def load(cls, directory: Path) -> AuthState:
        state = cls(directory)
        if state.users_file.exists():
            raw = json.loads(state.users_file.read_text())
            state.services = dict(raw.get("services", {}))
            state.tenants = dict(raw.get("tenants", {}))
        return state


def ensure(directory: Path) -> AuthState:
    """The auth directory with every service's and the admin's credentials (made at
    first start, kept after) and the server's accounts include rendered."""
    directory.mkdir(parents=True, exist_ok=True, mode=_DIR_MODE)
    os.chmod(directory, _DIR_MODE)
    state = AuthState.load(directory)
    changed = False
    for identity in IDENTITIES:
        if identity not in state.services:
            state.services[identity] = _password()
            changed = True
    if changed:
        state.save()
    for identity in IDENTITIES:
        creds = Credentials(identity, state.services[identity])
        if not state.creds_file(identity).exists():
            creds.dump(state.creds_file(identity))
    write_accounts(state)
    return state


def add_tenant(directory: Path, tenant: str) -> tuple[Path, str]:
    """A new tenant: its account and user (the server picks them up on reload), its
    credentials file and a fresh API key (only its hash is kept). Returns the
    credentials file and the key. A tenant that exists gets another key."""
    check_name("tenant", tenant)
    if tenant == DEFAULT_TENANT:
        # What the service account's invocations without a tenant run as: a tenant of
        # that name would share their leases.
        raise AuthError(f"tenant name {DEFAULT_TENANT!r} is reserved")
    state = ensure(directory)
    if tenant not in state.tenants:
        state.tenants[tenant] = _password()
        state.save()
        write_accounts(state)
    path = state.tenant_creds_file(tenant)
    Credentials(tenant_user(tenant), state.tenants[tenant], TENANT_ACCOUNT, tenant).dump(path)
    return path, issue_api_key(state.tokens_file, tenant)


def issue_api_key(tokens_file: Path, tenant: str) -> str:
    key = API_KEY_PREFIX + secrets.token_urlsafe(32)
    tokens = _read_tokens(tokens_file)
    tokens[hash_key(key)] = tenant
    _write_private(tokens_file, json.dumps(tokens, indent=2) + "\n")
    return key


def remove_tenant(directory: Path, tenant: str) -> tuple[bool, int]:
    """Revoke a tenant: its NATS user leaves the accounts include (the server closes
    its connections when it reloads), its credentials file goes, and so does every API
    key issued to it (ingress stops taking them within TokenBook's recheck). Returns
    whether it had a user, and how many keys were revoked."""
    check_name("tenant", tenant)
    state = ensure(directory)
    had_user = state.tenants.pop(tenant, None) is not None
    if had_user:
        state.save()
        write_accounts(state)
    state.tenant_creds_file(tenant).unlink(missing_ok=True)
    tokens = _read_tokens(state.tokens_file)
    kept = {digest: owner for digest, owner in tokens.items() if owner != tenant}
    if len(kept) != len(tokens):
        _write_private(state.tokens_file, json.dumps(kept, indent=2) + "\n")
    return had_user, len(tokens) - len(kept)


def hash_key(key: str) -> str:
    # API keys are 256 random bits: a plain hash is as good as a slow one here.
    return hashlib.sha256(key.encode()).hexdigest()


def _read_tokens(path: Path) -> dict[str, str]:
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise AuthError(f"cannot read API keys {path}: {exc}") from None
    return {str(k): str(v) for k, v in raw.items()} if isinstance(raw, dict) else {}


class TokenBook:
    """Bearer tokens -> tenants, from `tokens.json`, read again when it changes (looked
    at no more than every `recheck_s`), so keys that `gfaas tenant add` issues work
    at once without restarting ingress."""

    def __init__(self, path: Path, *, recheck_s: float = 0.5) -> None:
        self.path = path
        self.recheck_s = recheck_s
        self._tokens: dict[str, str] = {}
        self._stamp: tuple[int, int] | None = None
        self._checked = 0.0
        self._refresh(time.monotonic())

    def _refresh(self, now: float) -> None:
        self._checked = now
        try:
            st = self.path.stat()
        except FileNotFoundError:
            self._tokens, self._stamp = {}, None
            return
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp != self._stamp:
            with contextlib.suppress(AuthError):
                self._tokens = _read_tokens(self.path)
                self._stamp = stamp

    def tenant(self, authorization: str | None) -> str | None:
        """The tenant of an `Authorization: Bearer <key>` value, or None."""
        if not authorization:
            return None
        scheme, _, key = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            return None
        now = time.monotonic()
        if now - self._checked >= self.recheck_s:
            self._refresh(now)
        return self._tokens.get(hash_key(key.strip()))


UNAUTHENTICATED_REASON: Final = (
    "unauthenticated: send 'Authorization: Bearer <API key>' (`gfaas tenant add NAME` issues one)"
)


# -- the server's accounts -----------------------------------------------------------------


def render_accounts(state: AuthState, *, anonymous: bool = False) -> str:
    """The nats-server include: accounts, users and their permissions, the import
    of each tenant. `anonymous` (gfaas up --insecure) lets clients without
    credentials in as the admin."""
    users: list[dict[str, Any]] = [
        {"user": ADMIN, "password": state.services[ADMIN]},
    ]
    for service in (*SERVICES, INSTANCE):
        users.append(
            {
                "user": service,
                "password": state.services[service],
                "permissions": SERVICE_PERMISSIONS[service].as_config(),
            }
        )
    accounts: dict[str, Any] = {
        SERVICE_ACCOUNT: {
            "jetstream": "enabled",
            "users": users,
            "exports": [
                *(
                    {"service": subject, "response_threshold": RESPONSE_THRESHOLD}
                    for subject in TENANT_SERVICES
                ),
                {"stream": TENANT_CALLBACKS_ALL},
            ],
        }
    }
    accounts[TENANT_ACCOUNT] = {
        "users": [
            {
                "user": tenant_user(tenant),
                "password": password,
                "permissions": tenant_permissions(tenant).as_config(),
            }
            for tenant, password in sorted(state.tenants.items())
        ],
        "imports": [
            *(
                {"service": {"account": SERVICE_ACCOUNT, "subject": subject}}
                for subject in TENANT_SERVICES
            ),
            {"stream": {"account": SERVICE_ACCOUNT, "subject": TENANT_CALLBACKS_ALL}},
        ],
    }
    text = "# Generated by gfaas (shared/auth.py); `gfaas tenant add` rewrites it.\n"
    text += f"accounts: {json.dumps(accounts, indent=2)}\n"
    if anonymous:
        text += f'no_auth_user: "{ADMIN}"\n'
    return text


def write_accounts(state: AuthState, *, anonymous: bool | None = None) -> None:
    """Render the include; `anonymous` None keeps what the file says now (a reload
    cannot change it: the server refuses)."""
    if anonymous is None:
        anonymous = _anonymous_now(state.accounts_file)
    text = render_accounts(state, anonymous=anonymous)
    with contextlib.suppress(FileNotFoundError):
        if state.accounts_file.read_text() == text:
            return
    _write_private(state.accounts_file, text)


def _anonymous_now(path: Path) -> bool:
    try:
        return "\nno_auth_user:" in path.read_text()
    except FileNotFoundError:
        return False


def reload_server(pid_file: Path) -> bool:
    """Ask a running nats-server (its pid file) to read its config again: new tenants
    can connect once it has. False when none runs there."""
    import signal

    try:
        pid = int(pid_file.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return False
    if b"nats-server" not in cmdline:
        return False
    os.kill(pid, signal.SIGHUP)
    return True


# -- connecting ----------------------------------------------------------------------------


def connect_options(
    *, creds: str | Path = "", user: str = "", password: str = "", tls_ca: str = ""
) -> dict[str, Any]:
    """nats.connect keyword arguments for an identity (a credentials file, or a user
    and password) and a CA to verify the server's TLS certificate with."""
    options: dict[str, Any] = {}
    if creds:
        loaded = Credentials.load(creds)
        options.update(user=loaded.user, password=loaded.password)
        prefix = inbox_prefix(loaded.user, loaded.tenant)
    else:
        if user:
            options.update(user=user, password=password)
        prefix = inbox_prefix(user)
    if prefix:
        options["inbox_prefix"] = prefix
    if tls_ca:
        import ssl

        options["tls"] = ssl.create_default_context(cafile=tls_ca)
    return options


def inbox_prefix(user: str, tenant: str = "") -> str:
    """The inbox an identity may hear (its permissions allow no other): a tenant's
    (its credentials file names it), a service's or the admin's by its user, so a
    user and password alone (what a worker's handler user is handed instead of the
    file) get it too; "" for anyone else (anonymous: nats-py's default `_INBOX`)."""
    if tenant:
        return tenant_inbox(tenant)
    return inbox(user) if user in IDENTITIES else ""


def settings_connect_options(settings: Settings) -> dict[str, Any]:
    return connect_options(
        creds=settings.nats_creds,
        user=settings.nats_user,
        password=settings.nats_password,
        tls_ca=settings.nats_tls_ca,
    )


def instance_creds(settings: Settings) -> str:
    """The credentials file a worker's instances connect with: INSTANCE's, beside the
    worker's own file (`gfaas auth init` writes both); the worker's own where there is
    none (an auth directory from before INSTANCE), "" without a file."""
    if not settings.nats_creds:
        return ""
    own = Path(settings.nats_creds).with_name(f"{INSTANCE}.json")
    return str(own) if own.exists() else settings.nats_creds


def auth_dir(settings: Settings) -> Path:
    return Path(settings.auth_dir) if settings.auth_dir else settings.state_dir / "auth"


def default_admin_creds(settings: Settings) -> Path | None:
    """What `gfaas` commands connect with unless told: GFAAS_NATS_CREDS, else the
    admin's credentials in the state directory when there are some."""
    if settings.nats_creds:
        return Path(settings.nats_creds)
    path = auth_dir(settings) / f"{ADMIN}.json"
    return path if path.exists() else None


# -- the embedded server -------------------------------------------------------------------


def server_config(
    state: AuthState, *, pid_file: Path, tls_cert: str = "", tls_key: str = ""
) -> str:
    """What gfaas up appends to the embedded server's config: the accounts include,
    a pid file (for `reload_server`) and TLS when a certificate is given."""
    # nats-server reads an include relative to the config, which sits beside the pid
    # file (shared.natsd: both in the server's state dir).
    include = os.path.relpath(state.accounts_file.resolve(), pid_file.resolve().parent)
    text = f'include "{include}"\n'
    text += f'pid_file: "{pid_file.resolve()}"\n'
    if tls_cert or tls_key:
        if not (tls_cert and tls_key):
            raise AuthError("TLS needs both GFAAS_NATS_TLS_CERT and GFAAS_NATS_TLS_KEY")
        cert, key = Path(tls_cert).resolve(), Path(tls_key).resolve()
        text += f'tls {{ cert_file: "{cert}", key_file: "{key}" }}\n'
    return text


def adopt_unauthenticated_store(store_dir: Path) -> bool:
    """A store from before accounts (everything in the global account `$G`) moves to
    the service account, once, so an upgraded platform keeps its registry, models and
    results. True when it moved."""
    root = store_dir / "jetstream"
    old, new = root / "$G", root / SERVICE_ACCOUNT
    if old.is_dir() and not new.exists():
        old.rename(new)
        return True
    return False
