"""``lepton keys`` and ``lepton route``: who may call the server, and which version answers."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from lepton.cli.common import (
    RegistryOpt,
    _registry,
    app,
    console,
    err,
)

keys_app = typer.Typer(help="API keys for the inference server.", no_args_is_help=True)
route_app = typer.Typer(help="Traffic routes between model versions (A/B, canary, shadow).", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
app.add_typer(route_app, name="route")


@keys_app.command("create")
def keys_create(
    tenant: Annotated[str, typer.Option(help="Tenant the key belongs to.")],
    scope: Annotated[str, typer.Option(help="predict or admin.")] = "predict",
    registry: RegistryOpt = None,
) -> None:
    """Create an API key; it is printed once and stored only as a hash."""
    key = _registry(registry).create_key(tenant, scope)
    err.print(f"API key for tenant {tenant} ({scope}); store it now, it cannot be shown again:")
    print(key)


@keys_app.command("list")
def keys_list(registry: RegistryOpt = None) -> None:
    """List key ids, tenants and scopes (never the keys)."""
    console.print_json(json.dumps(_registry(registry).list_keys()))


@keys_app.command("revoke")
def keys_revoke(key_id: Annotated[str, typer.Argument(help="The id shown by `lepton keys list`.")],
                registry: RegistryOpt = None) -> None:
    """Revoke a key."""
    _registry(registry).revoke_key(key_id)
    console.print(f"revoked {key_id}")


@route_app.command("set")
def route_set(
    name: Annotated[str, typer.Argument(help="Model name.")],
    weights: Annotated[list[str], typer.Argument(help="VERSION=WEIGHT pairs, e.g. v3=90 v4=10.")],
    shadow: Annotated[int | None, typer.Option(
        help="A version that sees copies of traffic; answers recorded only.", min=1, max=2**31 - 1)]
    = None,
    registry: RegistryOpt = None,
) -> None:
    """Split a model's traffic between versions (sticky per X-Lepton-Client header)."""
    parsed = {}
    for item in weights:
        version, sep, weight = item.lower().removeprefix("v").partition("=")
        if not sep or not version.isdigit():
            raise typer.BadParameter(f"expected VERSION=WEIGHT such as v3=90, got {item!r}")
        try:
            parsed[int(version)] = float(weight)
        except ValueError:
            raise typer.BadParameter(f"weight of {item!r} is not a number") from None
    route = _registry(registry).set_route(name, parsed, shadow)
    console.print(f"{name}: {route.weights} shadow={route.shadow}; running servers pick it up on reload")


@route_app.command("clear")
def route_clear(name: Annotated[str, typer.Argument()], registry: RegistryOpt = None) -> None:
    """Send all traffic to the served reference again."""
    _registry(registry).set_route(name, {})
    console.print(f"{name}: route cleared")


