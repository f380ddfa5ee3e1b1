"""The operator API: HTTP/JSON over the store, authenticated by a bearer token.

Two ports serve it: the API port (plain HTTP, `--api-address`, 15080) and the TLS port
(`--discovery-address`, 15012 as istiod's secure xDS port) whose certificate the mesh's CA
issues to the control plane itself, so that a proxy verifies whom it gives its token to
(`meshproxy run --ca-bundle`). Join tokens, and so identities, are taken on the TLS port
only: a token sent in clear could be read off the wire and replayed.

Paths (Kubernetes' shape; KIND is the kind's plural in lower case: services, workloads,
routes, destinationpolicies, authorizationpolicies, ratelimits, peerauthentications):
    GET    /apis/mesh/v1/KIND                         every namespace's
    GET    /apis/mesh/v1/namespaces/NS/KIND           one namespace's
    POST   /apis/mesh/v1/namespaces/NS/KIND           create (409 if it exists)
    GET    /apis/mesh/v1/namespaces/NS/KIND/NAME
    PUT    /apis/mesh/v1/namespaces/NS/KIND/NAME      create or replace; with
                                                      metadata.resourceVersion, only if the
                                                      stored one is still that (else 409)
    DELETE /apis/mesh/v1/namespaces/NS/KIND/NAME[?resourceVersion=N]
    GET    /v1/proxy-status                           every proxy's push status
    GET    /v1/registry                               registrations, self-preservation
    GET    /v1/discovery  (Upgrade: meshproxy-discovery/1)  a proxy's push stream
                                                      (control/messages.py), with the
                                                      proxy token, or on the TLS port with
                                                      a join token (then with an identity)
    POST   /v1/tokens     {"namespace", "service_account", "ttl"}  a join token
    GET    /v1/ca         the CA: trust domain, roots, signer, rotation phase
    POST   /v1/ca/rotate-root                         begin a root rotation
A resource's resourceVersion is the store revision of its last change. Every request needs
`Authorization: Bearer <token>` (401 otherwise, compared in constant time). A resource is
checked (control/resources.py) before it is stored: 400 with every error and its field
path, so an invalid one is never pushed. Errors are JSON: {"error": ..., "errors": [...]}.
"""

from __future__ import annotations

import hmac
import json
import logging
import ssl
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

import h11
import msgspec
import trio

from meshproxy.config.load import ConfigError
from meshproxy.control import messages
from meshproxy.control.resources import SPECS, Resource, decode, resource_key
from meshproxy.control.store import Conflict, Store
from meshproxy.control.tokens import DEFAULT_TTL, TokenError, TokenKey

if TYPE_CHECKING:
    from meshproxy.control.replica import Replica
from meshproxy.transport.h11_io import next_event, respond, serve_tcp

log = logging.getLogger("meshproxy.control.api")

PREFIX = "/apis/mesh/v1/"
PLURALS = {"services": "Service", "workloads": "Workload", "routes": "Route",
           "destinationpolicies": "DestinationPolicy",
           "authorizationpolicies": "AuthorizationPolicy", "ratelimits": "RateLimit",
           "peerauthentications": "PeerAuthentication"}
assert set(PLURALS.values()) == set(SPECS), "a kind without its path"
# A resource is a few KiB; a request body past this is refused (413) before it is read.
MAX_BODY = 1 << 20
# A client has this long to send a request once connected or between keep-alive requests.
REQUEST_TIMEOUT = 30.0
HANDSHAKE_TIMEOUT = 10.0


@dataclass
class Reply:
    status: int
    body: Any
    headers: tuple[tuple[str, str], ...] = ()


def _error(status: int, message: str, errors: list[str] | None = None,
           headers: tuple[tuple[str, str], ...] = ()) -> Reply:
    body: dict[str, Any] = {"error": message}
    if errors:
        body["errors"] = errors
    return Reply(status, body, headers)


class OperatorAPI:
    def __init__(self, store: Store, token: str, replica: Replica | None = None,
                 proxy_token: str | None = None, tokens: TokenKey | None = None) -> None:
        if not token:
            raise ValueError("the operator API needs a token")
        self.store = store
        self.replica = replica
        self.tokens = tokens
        self._token = f"Bearer {token}".encode()
        self._proxy_token = f"Bearer {proxy_token or token}".encode()

    # ---------------------------------------------------------------- deciding

    async def handle(self, method: str, target: str, headers: list[tuple[bytes, bytes]],
                     body: bytes) -> Reply:
        auth = next((v for k, v in headers if k == b"authorization"), b"")
        if not hmac.compare_digest(auth, self._token):
            return _error(401, "missing or wrong bearer token",
                          headers=(("www-authenticate", 'Bearer realm="meshproxy"'),))
        url = urlsplit(target)
        if url.path == "/v1/tokens" and method == "POST":
            return self._create_token(body)
        if url.path.startswith("/v1/ca"):
            if self.replica is None or self.replica.authority is None:
                return _error(404, "this control plane runs no CA")
            if url.path == "/v1/ca" and method == "GET":
                return Reply(200, self.replica.issuer.ca_view())
            if url.path == "/v1/ca/rotate-root" and method == "POST":
                try:
                    return Reply(200, await self.replica.issuer.rotate_root())
                except ValueError as exc:
                    return _error(409, str(exc))
            return _error(404, f"no such path {url.path}")
        if url.path in ("/v1/proxy-status", "/v1/registry") and method == "GET":
            if self.replica is None:
                return _error(404, "this API serves no replica")
            if url.path == "/v1/registry":
                return Reply(200, self.replica.registry_view())
            return Reply(200, {"proxies": await self.replica.proxy_status()})
        if not url.path.startswith(PREFIX):
            return _error(404, f"no such path {url.path}")
        parts = url.path[len(PREFIX):].strip("/").split("/")
        query = parse_qs(url.query)
        if len(parts) == 1 and method == "GET":
            return await self._list(parts[0], None)
        if len(parts) < 3 or parts[0] != "namespaces":
            return _error(404, f"no such path {url.path}")
        ns, plural = parts[1], parts[2]
        if len(parts) == 3:
            if method == "GET":
                return await self._list(plural, ns)
            if method == "POST":
                return await self._write(plural, ns, None, body, create=True)
            return _error(405, f"{method} is not allowed on a collection")
        if len(parts) != 4:
            return _error(404, f"no such path {url.path}")
        name = parts[3]
        if method == "GET":
            return await self._get(plural, ns, name)
        if method == "PUT":
            return await self._write(plural, ns, name, body, create=False)
        if method == "DELETE":
            rv = query.get("resourceVersion", [None])[0]
            return await self._delete(plural, ns, name, rv)
        return _error(405, f"{method} is not allowed on a resource")

    def _create_token(self, body: bytes) -> Reply:
        if self.tokens is None or self.replica is None or self.replica.authority is None:
            return _error(404, "this control plane runs no CA: no join tokens")
        try:
            req = json.loads(body or b"{}")
            ns, sa = str(req["namespace"]), str(req["service_account"])
            ttl = float(req.get("ttl", DEFAULT_TTL))
        except (ValueError, KeyError, TypeError) as exc:
            return _error(400, "expected {\"namespace\", \"service_account\", \"ttl\"}",
                          [f"{type(exc).__name__}: {exc}"])
        spiffe = self.replica.authority.spiffe(ns, sa)
        now = time.time()
        try:
            token = self.tokens.create(ns, sa, spiffe, ttl, now)
        except TokenError as exc:
            return _error(400, str(exc))
        self.replica.metrics.inc("meshproxy_ca_tokens_created")
        log.info("join token made for %s, expires in %.0f s", spiffe, ttl)
        return Reply(201, {"token": token, "spiffe_id": spiffe, "expires_at": now + ttl})

    @staticmethod
    def _kind(plural: str) -> str | None:
        return PLURALS.get(plural)

    @staticmethod
    def _out(entry_value: bytes, revision: int) -> dict[str, Any]:
        doc = json.loads(entry_value)
        doc["metadata"]["resourceVersion"] = str(revision)
        return dict(doc)

    async def _list(self, plural: str, ns: str | None) -> Reply:
        kind = self._kind(plural)
        if kind is None:
            return _error(404, f"no such kind {plural!r} (known: {', '.join(sorted(PLURALS))})")
        prefix = f"/mesh/v1/{kind}/" + (f"{ns}/" if ns else "")
        entries, rev = await self.store.list(prefix)
        return Reply(200, {"kind": f"{kind}List", "resourceVersion": str(rev),
                           "items": [self._out(e.value, e.revision) for e in entries]})

    async def _get(self, plural: str, ns: str, name: str) -> Reply:
        kind = self._kind(plural)
        if kind is None:
            return _error(404, f"no such kind {plural!r}")
        entry = await self.store.get(resource_key(kind, ns, name))
        if entry is None:
            return _error(404, f"{kind} {ns}/{name} not found")
        return Reply(200, self._out(entry.value, entry.revision))

    async def _write(self, plural: str, ns: str, name: str | None, body: bytes,
                     create: bool) -> Reply:
        kind = self._kind(plural)
        if kind is None:
            return _error(404, f"no such kind {plural!r}")
        try:
            doc = json.loads(body)
        except ValueError as exc:
            return _error(400, f"the body is not JSON: {exc}")
        try:
            res = decode(doc, "request")
        except ConfigError as exc:
            return _error(400, f"invalid {kind}", exc.errors)
        meta = res.metadata
        where = [] if res.kind == kind else [f"kind: {res.kind} sent to {plural}"]
        if meta.namespace != ns:
            where.append(f"metadata.namespace: {meta.namespace!r}, the path says {ns!r}")
        if name is not None and meta.name != name:
            where.append(f"metadata.name: {meta.name!r}, the path says {name!r}")
        if where:
            return _error(400, "the resource does not match its path", where)
        expect: int | None = 0 if create else None
        if meta.resource_version:
            try:
                expect = int(meta.resource_version)
            except ValueError:
                return _error(400, "invalid resource", [
                    f"metadata.resourceVersion: not a number: {meta.resource_version!r}"])
        stored = Resource(kind=res.kind, metadata=msgspec.structs.replace(
            meta, resource_version=None), spec=res.spec)
        value = json.dumps(stored.to_builtins(), sort_keys=True).encode()
        try:
            rev = await self.store.put(res.key, value, expect=expect)
        except Conflict as exc:
            what = "already exists" if create and not meta.resource_version else (
                f"changed: resourceVersion {exc.current}, not {exc.expected}")
            return _error(409, f"{kind} {ns}/{meta.name} {what}")
        log.info("%s %s/%s stored at revision %d", kind, ns, meta.name, rev)
        return Reply(201 if create else 200, self._out(value, rev))

    async def _delete(self, plural: str, ns: str, name: str, rv: str | None) -> Reply:
        kind = self._kind(plural)
        if kind is None:
            return _error(404, f"no such kind {plural!r}")
        try:
            expect = int(rv) if rv is not None else None
        except ValueError:
            return _error(400, f"resourceVersion: not a number: {rv!r}")
        try:
            rev = await self.store.delete(resource_key(kind, ns, name), expect=expect)
        except Conflict as exc:
            return _error(409, f"{kind} {ns}/{name} changed: resourceVersion {exc.current}, "
                               f"not {exc.expected}")
        if rev is None:
            return _error(404, f"{kind} {ns}/{name} not found")
        log.info("%s %s/%s deleted at revision %d", kind, ns, name, rev)
        return Reply(200, {"deleted": f"{ns}/{name}", "resourceVersion": str(rev)})

    # ---------------------------------------------------------------- doing

    async def serve(self, host: str, port: int, *,
                    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        await serve_tcp(self._connection, host, port, task_status)

    async def serve_tls(self, host: str, port: int, context: ssl.SSLContext, *,
                        task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED
                        ) -> None:
        async def handler(raw: trio.SocketStream) -> None:
            stream = trio.SSLStream(raw, context, server_side=True)
            try:
                with trio.fail_after(HANDSHAKE_TIMEOUT):
                    await stream.do_handshake()
            except (trio.BrokenResourceError, trio.TooSlowError) as exc:
                log.debug("TLS handshake on the discovery port failed: %r", exc)
                await raw.aclose()
                return
            await self._connection(stream, secure=True)

        await serve_tcp(handler, host, port, task_status)

    async def _connection(self, stream: trio.abc.Stream, secure: bool = False) -> None:
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                request = None
                with trio.move_on_after(REQUEST_TIMEOUT):  # silent clients are let go
                    request = await self._read(stream, conn)
                if request is None:
                    return
                method, target, headers, body = request
                if target == messages.PATH and self.replica is not None:
                    await self._discovery(conn, stream, method, headers, secure)
                    return
                if body is None:
                    reply = _error(413, f"the body exceeds {MAX_BODY} bytes")
                else:
                    try:
                        reply = await self.handle(method, target, headers, body)
                    except Exception:
                        log.exception("%s %s failed", method, target)
                        reply = _error(500, "internal error (logged by the control plane)")
                data = json.dumps(reply.body).encode()
                if not await respond(conn, stream, reply.status, [
                        ("content-type", "application/json"),
                        ("content-length", str(len(data))), *reply.headers], data):
                    return
        except (trio.BrokenResourceError, h11.ProtocolError):
            return
        finally:
            with trio.move_on_after(1) as scope:  # a TLS close_notify to a gone peer
                scope.shield = True
                try:
                    await stream.aclose()
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass

    def _authenticate(self, auth: bytes, secure: bool) -> tuple[Any, str, str | None]:
        """(claims, spiffe_id, refusal): the proxy token gives a stream without an identity;
        a valid join token on the TLS port, one with the token's identity."""
        if hmac.compare_digest(auth, self._proxy_token):
            return None, "", None
        assert self.replica is not None
        token = auth[len(b"Bearer "):].decode("ascii", "replace") \
            if auth.startswith(b"Bearer ") else ""
        if self.tokens is None or self.replica.authority is None:
            return None, "", "missing or wrong bearer token"
        if not secure:
            if token.count(".") == 2:
                self.replica.refused("plaintext", "a join token was sent to the plain-HTTP "
                                     "port; tokens are taken on the TLS discovery port only")
            return None, "", "missing or wrong bearer token"
        try:
            claims = self.tokens.verify(token, time.time())
        except TokenError as exc:
            self.replica.refused("token", f"discovery stream refused: {exc}")
            return None, "", "missing, expired or invalid join token"
        return claims, self.replica.authority.spiffe(claims.namespace,
                                                     claims.service_account), None

    async def _discovery(self, conn: h11.Connection, stream: trio.abc.Stream, method: str,
                         headers: list[tuple[bytes, bytes]], secure: bool) -> None:
        """A proxy's push stream: authenticated, switched to the discovery protocol, then
        the push server's until it closes."""
        assert self.replica is not None
        hdr = dict(headers)
        claims, spiffe, refusal = self._authenticate(hdr.get(b"authorization", b""), secure)
        if refusal is not None:
            reply = _error(401, refusal)
        elif method != "GET" or hdr.get(b"upgrade", b"").decode() != messages.UPGRADE:
            reply = _error(426, f"{messages.PATH} needs Upgrade: {messages.UPGRADE}")
        else:
            await stream.send_all(conn.send(h11.InformationalResponse(
                status_code=101, headers=[("upgrade", messages.UPGRADE),
                                          ("connection", "upgrade")])))
            leftover, _closed = conn.trailing_data
            await self.replica.push.serve(stream, bytes(leftover), self.replica.id, claims,
                                          spiffe)
            return
        data = json.dumps(reply.body).encode()
        await respond(conn, stream, reply.status, [("content-type", "application/json"),
                                                   ("content-length", str(len(data))),
                                                   ("connection", "close")], data)

    @staticmethod
    async def _read(stream: trio.abc.Stream, conn: h11.Connection
                    ) -> tuple[str, str, list[tuple[bytes, bytes]], bytes | None] | None:
        """The next request (its body None when too large), or None at the end."""
        req: h11.Request | None = None
        body = b""
        while True:
            ev = await next_event(conn, stream)
            if isinstance(ev, h11.Request):
                req = ev
                length = next((v for k, v in ev.headers if k == b"content-length"), b"0")
                if int(length) > MAX_BODY:  # answered 413, then the connection closes
                    return (ev.method.decode(), ev.target.decode(), list(ev.headers), None)
            elif isinstance(ev, h11.Data):
                body += bytes(ev.data)
                if len(body) > MAX_BODY:
                    assert req is not None
                    return (req.method.decode(), req.target.decode(), list(req.headers), None)
            elif isinstance(ev, h11.EndOfMessage):
                assert req is not None
                return (req.method.decode(), req.target.decode(), list(req.headers), body)
            elif isinstance(ev, h11.ConnectionClosed):
                return None
