"""Loading and unloading adapters over HTTP, safe by default.

A server on a developer's laptop is reachable from every web page the developer opens: a page can
send a cross-site "simple" request (text/plain body, no preflight), or rebind its own DNS name to
127.0.0.1 and talk to the server as a same-origin site. So the admin routes:

- are off unless the server was started with an admin token (`--admin-token` or the environment
  variable LOWREGRET_ADMIN_TOKEN), and then need `Authorization: Bearer <token>` (a browser never
  adds that header to a cross-site request on its own);
- require `Content-Type: application/json` on bodies (a cross-site form or text/plain post is refused);
- accept only a Host header naming the bound address (or `--allowed-host` names), and refuse a
  cross-origin `Origin` (DNS rebinding);
- load only registry references or folders under `--adapter-root`, and never show absolute paths.

Routes: ours (`POST /v1/adapters`, `DELETE /v1/adapters/{name}`) and vLLM's names for the same
operations (`POST /v1/load_lora_adapter`, `POST /v1/unload_lora_adapter`).
"""

from __future__ import annotations

import hmac
import ipaddress
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field, StrictBool

from serving.adapters import AdapterExists, describe_adapter
from serving.engine import Engine
from serving.protocol import ApiError

TOKEN_ENV = "LOWREGRET_ADMIN_TOKEN"


@dataclass(frozen=True)
class AdminOptions:
    """What the operator decided about the admin routes.

    Attributes:
        token: the bearer token; None turns the admin routes off.
        adapter_roots: folders whose sub-folders may be loaded by path (registry references always may).
        allowed_hosts: Host header names accepted besides the bound address (a DNS name behind a proxy).
    """

    token: str | None = None
    adapter_roots: tuple[Path, ...] = ()
    allowed_hosts: tuple[str, ...] = ()


def _host_name(host_header: str) -> str:
    """`example.com:8000` -> `example.com`, `[::1]:8000` -> `::1`."""
    netloc = urlsplit(f"//{host_header}")
    try:
        return (netloc.hostname or "").lower()
    except ValueError:
        return ""


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class HostCheck:
    """Which Host header names reach this server: the bound address, `localhost` when it is a
    loopback address, any IP literal when bound to all interfaces, and the operator's extra names."""

    names: frozenset[str]
    any_ip: bool

    @classmethod
    def for_address(cls, host: str, bound_ip: str, extra: tuple[str, ...] = ()) -> HostCheck:
        names = {host.lower(), bound_ip.lower(), *(e.lower() for e in extra)}
        ip = ipaddress.ip_address(bound_ip.split("%")[0])
        if ip.is_loopback:
            names |= {"localhost", "127.0.0.1", "::1"}
        return cls(frozenset(names), any_ip=ip.is_unspecified)

    def allows(self, host_header: str) -> bool:
        name = _host_name(host_header)
        return name in self.names or (self.any_ip and _is_ip(name))


# No control characters (a NUL byte in a path is a 500 from the OS layer otherwise): refused as 400.
PRINTABLE = r"^[^\x00-\x1f\x7f]*$"


class AddAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=PRINTABLE, description="the served name (the `model` field of requests)")
    source: str = Field(pattern=PRINTABLE, description="NAME@ALIAS, NAME@VERSION, or a folder relative to an --adapter-root")
    replace: StrictBool = Field(False, description="swap the weights behind a served name")


class LoadLoraAdapterRequest(BaseModel):
    """vLLM's body for /v1/load_lora_adapter."""

    model_config = ConfigDict(extra="ignore")

    lora_name: str = Field(pattern=PRINTABLE)
    lora_path: str = Field(pattern=PRINTABLE, description="NAME@ALIAS, NAME@VERSION, or a folder relative to an --adapter-root")
    load_inplace: StrictBool = Field(False, description="vLLM's name for replace")


class UnloadLoraAdapterRequest(BaseModel):
    """vLLM's body for /v1/unload_lora_adapter."""

    model_config = ConfigDict(extra="ignore")

    lora_name: str


class AdapterInfo(BaseModel):
    name: str
    source: str
    version: str | None
    rank: int


class AdapterRemoved(BaseModel):
    name: str
    deleted: bool = True


def admin_router(engine: Engine, options: AdminOptions, hosts: HostCheck) -> APIRouter:
    """The admin routes, each behind the checks in the module docstring."""

    def guard(request: Request) -> None:
        if options.token is None:
            raise ApiError(
                403,
                f"Adapter admin is off on this server: start it with --admin-token TOKEN (or {TOKEN_ENV}) "
                "to load and unload adapters over HTTP.",
                code="admin_disabled",
            )
        host = request.headers.get("host", "")
        if not hosts.allows(host):
            raise ApiError(
                403,
                f"Host {host!r} is not this server's address, so admin requests through it are refused "
                "(DNS rebinding protection): use the address the server listens on, or start it with "
                "--allowed-host NAME.",
                code="host_not_allowed",
            )
        origin = request.headers.get("origin")
        if origin is not None and urlsplit(origin).netloc.lower() != host.lower():
            raise ApiError(403, f"Cross-origin admin request from {origin!r} refused.", code="cross_origin")
        given = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, f"Bearer {options.token}".encode()):
            raise ApiError(
                401,
                "Adapter admin needs `Authorization: Bearer <admin token>`.",
                headers={"WWW-Authenticate": "Bearer"},
            )
        if request.method == "POST":
            media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if media_type != "application/json":
                raise ApiError(
                    415,
                    f"Admin requests must send `Content-Type: application/json` (got {media_type or 'none'!r}).",
                )

    router = APIRouter(dependencies=[Depends(guard)], tags=["admin"])

    def add(name: str, source: str, replace: bool) -> AdapterInfo:
        if name == engine.base_name:
            raise ApiError(400, f"{name!r} is the base model's name; pick another adapter name.", param="name")
        if name in engine.pool and not replace:
            raise AdapterExists(name)
        entry = describe_adapter(name, source, options.adapter_roots, confined=True)
        engine.pool.add(entry, replace=replace)
        return AdapterInfo(name=entry.name, source=entry.source, version=entry.version, rank=entry.rank)

    # Plain `def` routes: FastAPI runs them on its thread pool, so a load that waits for the
    # running batch (the pool's lock) never blocks the event loop.
    @router.post("/v1/adapters", status_code=201, response_model=AdapterInfo)
    def add_adapter(body: AddAdapterRequest) -> AdapterInfo:
        """Serve an adapter under a name (loaded now; a failed load changes nothing)."""
        return add(body.name, body.source, body.replace)

    @router.delete("/v1/adapters/{name}", response_model=AdapterRemoved)
    def remove_adapter(name: str) -> AdapterRemoved:
        """Stop serving an adapter."""
        engine.pool.remove(name)
        return AdapterRemoved(name=name)

    @router.post("/v1/load_lora_adapter", response_model=AdapterInfo)
    def load_lora_adapter(body: LoadLoraAdapterRequest) -> AdapterInfo:
        """vLLM's route name for POST /v1/adapters."""
        return add(body.lora_name, body.lora_path, body.load_inplace)

    @router.post("/v1/unload_lora_adapter", response_model=AdapterRemoved)
    def unload_lora_adapter(body: UnloadLoraAdapterRequest) -> AdapterRemoved:
        """vLLM's route name for DELETE /v1/adapters/{name}."""
        engine.pool.remove(body.lora_name)
        return AdapterRemoved(name=body.lora_name)

    return router
