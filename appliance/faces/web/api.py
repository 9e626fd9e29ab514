"""The JSON API behind the page (`/api/...`): the same authentication (session + CSRF header,
or `Authorization: Bearer <token>`) and the same validation as the control socket. A refused
request answers {"error": "..."} with 400 (404 for an unknown device) and changes nothing."""
from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from microdot import Response

from appliance.errors import ConfigError, KalkiError
from appliance.faces.web.http import json_response, mime, route, upload_name
from appliance.faces.web.http import state as web_state
from appliance.faces.web.views import allow_as, download, profile_words
from appliance.supervisor.ops import SETTABLE_POSTURES, error_status
from appliance.vocab import DAYS

MAX_LIMIT = 1000
log = logging.getLogger("kalki.web")


def actor(request) -> str:
    return f"web:{request.g.user}"


def ok(data, status=200) -> Response:
    return json_response(data, status)


async def body(request) -> dict:
    if mime(request) != "application/json":
        raise ConfigError("send a JSON object with Content-Type: application/json")
    try:
        data = json.loads(request.body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"malformed JSON: {e}") from None
    except RecursionError:
        raise ConfigError("malformed JSON: nested too deeply") from None
    if not isinstance(data, dict):
        raise ConfigError("the body must be a JSON object")
    return data


def limit(request, default=50) -> int:
    raw = request.args.get("limit", str(default))
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_LIMIT:
        raise ConfigError(f"limit: expected 1 to {MAX_LIMIT}, got {raw!r}")
    return int(raw)


def known_keys(data: dict, allowed: tuple, where: str) -> None:
    unknown = set(data) - set(allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)} (known: {', '.join(allowed)})")


class UnknownProfile(ConfigError):
    """A 404, not a 400: the path names no profile."""


def endpoint(fn):
    async def wrapper(request):
        try:
            return await fn(request)
        except UnknownProfile as e:
            return json_response({"error": str(e)}, 404)
        except (KalkiError, ValueError, TypeError) as e:
            return json_response({"error": str(e)}, error_status(e))
    wrapper.__name__ = fn.__name__
    return wrapper


def ops_of(request):
    return web_state(request).ops


@endpoint
async def status(request):
    ops = ops_of(request)
    out = ops.status()
    out["summary"] = ops.summary()
    out["claim_open"] = ops.claim_open()
    return ok(out)


@endpoint
async def devices(request):
    return ok(ops_of(request).devices())


@endpoint
async def device(request):
    out = ops_of(request).device_detail(request.url_args["name"])
    flows = out.get("flows") or {}
    # each refused flow with the destination that allows it (POST .../allow), as the page offers
    flows["refused"] = [{**f, "allow_as": allow_as(f)} for f in flows.get("refused") or []]
    return ok(out)


@endpoint
async def device_traffic(request):
    return ok(ops_of(request).traffic(request.url_args["name"], request.args.get("span", "hour")))


@endpoint
async def traffic_overview(request):
    raw = request.args.get("points", "60")
    if not raw.isdigit():
        raise ConfigError(f"points: expected a number, got {raw!r}")
    return ok(ops_of(request).traffic_overview(request.args.get("span", "hour"), int(raw)))


@endpoint
async def device_telemetry(request):
    return ok(ops_of(request).telemetry_view(request.url_args["name"]))


@endpoint
async def device_delete(request):
    return ok(ops_of(request).device_remove(name=request.url_args["name"]))


@endpoint
async def rename(request):
    data = await body(request)
    known_keys(data, ("name",), "rename")
    if "name" not in data:
        raise ConfigError("rename: missing 'name' (the device's new name)")
    return ok(ops_of(request).device_rename(request.url_args["name"], data["name"], actor=actor(request)))


@endpoint
async def group(request):
    data = await body(request)
    known_keys(data, ("group",), "group")
    if "group" not in data:
        raise ConfigError("group: missing 'group' (a name, or null for none)")
    return ok(ops_of(request).device_group(request.url_args["name"], data["group"], actor=actor(request)))


@endpoint
async def approve(request):
    data = await body(request)
    known_keys(data, ("type",), "approve")
    return ok(ops_of(request).device_approve(request.url_args["name"], data.get("type")))


@endpoint
async def posture(request):
    data = await body(request)
    known_keys(data, ("posture", "for"), "posture")
    if "posture" not in data:
        raise ConfigError("posture: missing 'posture'")
    return ok(ops_of(request).posture_set(request.url_args["name"], data["posture"], data.get("for")))


@endpoint
async def reset(request):
    return ok(ops_of(request).posture_reset(name=request.url_args["name"]))


def _optional_text(data: dict, key: str, where: str) -> str | None:
    value = data.get(key)
    if value is not None and not isinstance(value, str):
        raise ConfigError(f"{where}: {key!r} must be a string, got {value!r}")
    return value


@endpoint
async def learn(request):
    data = await body(request)
    known_keys(data, ("for", "type"), "learn")
    duration = data.get("for")
    if duration is not None and (isinstance(duration, bool) or not isinstance(duration, (str, int))):
        raise ConfigError(f"learn: 'for' must be a duration such as \"24h\" or seconds, got {duration!r}")
    return ok(ops_of(request).device_learn(request.url_args["name"], for_=duration,
                                           type=_optional_text(data, "type", "learn"), actor=actor(request)))


async def _own_destination(request, add: bool):
    where = "allow" if add else "disallow"
    data = await body(request)
    known_keys(data, ("destination",), where)
    if "destination" not in data:
        raise ConfigError(f"{where}: missing 'destination' (e.g. \"cloud.example.com:443/tcp\")")
    ops = ops_of(request)
    do = ops.device_allow if add else ops.device_disallow
    return ok(do(request.url_args["name"], data["destination"], actor=actor(request)))


@endpoint
async def allow(request):
    return await _own_destination(request, True)


@endpoint
async def disallow(request):
    return await _own_destination(request, False)


@endpoint
async def device_profile(request):
    a = request.args
    return ok(ops_of(request).profile_from_device(request.url_args["name"], type=a.get("type") or None,
                                                  format=a.get("format") or "toml",
                                                  mud_url=a.get("mud_url") or None))


@endpoint
async def profiles(request):
    return ok(ops_of(request).profile_list())


def _known_profile(request) -> str:
    type_ = request.url_args["type"]
    if type_ not in ops_of(request).profile_types():
        raise UnknownProfile(f"profile {type_!r}: no such device type")
    return type_


@endpoint
async def profile(request):
    shown = ops_of(request).profile_show(_known_profile(request))
    return ok({**shown, "in_words": profile_words(shown.get("postures") or {})})


@endpoint
async def profile_post(request):
    data = await body(request)
    known_keys(data, ("text", "filename", "type", "device_ip"), "profile import")
    text = data.get("text")
    if not isinstance(text, str) or not text.strip():
        raise ConfigError("profile import: 'text' must be the file's text (a TOML profile or a MUD file)")
    filename = _optional_text(data, "filename", "profile import") or \
        ("upload.json" if text.lstrip("\ufeff \t\r\n").startswith("{") else "upload.toml")
    type_ = _optional_text(data, "type", "profile import")
    r = ops_of(request).profile_import(text, upload_name(filename), type=type_,
                                       device_ip=data.get("device_ip"), actor=actor(request))
    return ok(r, status=201)


@endpoint
async def profile_export(request):
    a = request.args
    return ok(ops_of(request).profile_export(_known_profile(request), format=a.get("format") or "toml",
                                             mud_url=a.get("mud_url") or None))


@endpoint
async def profile_delete(request):
    return ok(ops_of(request).profile_remove(_known_profile(request), actor=actor(request)))


@endpoint
async def maintenance(request):
    data = await body(request)
    known_keys(data, ("minutes",), "maintenance")
    if "minutes" not in data:
        raise ConfigError("maintenance: missing 'minutes'")
    return ok(ops_of(request).maintenance(minutes=data["minutes"]))


@endpoint
async def alerts(request):
    return ok(ops_of(request).alerts(device=request.args.get("device"), limit=limit(request)))


@endpoint
async def alert_keep(request):
    return ok(ops_of(request).alert_keep(request.url_args["id"], actor=actor(request)))


@endpoint
async def alert_release(request):
    return ok(ops_of(request).alert_release(request.url_args["id"], actor=actor(request)))


@endpoint
async def alert_block(request):
    data = await body(request)
    known_keys(data, ("seconds",), "block")
    if "seconds" not in data:
        raise ConfigError("block: missing 'seconds' (0: until unblocked; or \"15m\", \"1d\")")
    return ok(ops_of(request).alert_block(request.url_args["id"], data["seconds"], actor=actor(request)))


@endpoint
async def blocked(request):
    return ok(ops_of(request).blocked_sources())


@endpoint
async def unblock(request):
    return ok(ops_of(request).unblock_source(request.url_args["source"], by=actor(request)))


@endpoint
async def decisions(request):
    kind = request.args.get("kind")
    if kind not in (None, "decision", "audit"):
        raise ConfigError(f"kind: expected decision or audit, got {kind!r}")
    return ok(ops_of(request).decisions(device=request.args.get("device"),
                                        limit=limit(request), kind=kind))


@endpoint
async def audit(request):
    return ok(ops_of(request).audit_log(limit(request, 100)))


@endpoint
async def rules(request):
    return ok(ops_of(request).rules_view())


@endpoint
async def rules_post(request):
    data = await body(request)
    known_keys(data, ("text",), "rules")
    return ok({"saved": ops_of(request).put_rules_text(data.get("text"), actor(request))})


@endpoint
async def rules_validate(request):
    data = await body(request)
    known_keys(data, ("text",), "rules/validate")
    if not isinstance(data.get("text"), str):
        raise ConfigError("rules/validate: 'text' must be a string of TOML")
    return ok(ops_of(request).rules_validate(text=data["text"], source="rules"))


@endpoint
async def rule_put(request):
    data = await body(request)
    name = request.url_args["name"]
    if data.get("name", name) != name:
        raise ConfigError(f"rule {name!r}: the body names another rule, {data.get('name')!r}")
    return ok({"saved": ops_of(request).put_rules([{**data, "name": name}], f"rule {name}",
                                      actor(request))})


@endpoint
async def rule_enabled(request):
    data = await body(request)
    known_keys(data, ("enabled",), "enabled")
    return ok(ops_of(request).set_rule_enabled(request.url_args["name"], data.get("enabled"),
                                   actor(request)))


@endpoint
async def rule_delete(request):
    ops_of(request).delete_rule(request.url_args["name"], actor(request))
    return ok({"deleted": request.url_args["name"]})


@endpoint
async def settings(request):
    ops = ops_of(request)
    return ok({**ops.settings(), "mqtt": ops.mqtt_view()})


@endpoint
async def settings_put(request):
    data = await body(request)
    return ok(ops_of(request).update_settings(data, actor(request)))


@endpoint
async def backup(request):
    """The backup file itself (as the settings page's download)."""
    r = ops_of(request).backup(with_secrets=request.args.get("secrets") == "1", actor=actor(request))
    return download(r["text"], r["filename"])


@endpoint
async def restore(request):
    data = await body(request)
    known_keys(data, ("text", "backup", "dry_run"), "restore")
    text = data.get("text")
    if "backup" in data:       # the file's JSON as it is, instead of its text
        if text is not None:
            raise ConfigError("restore: send 'text' or 'backup', not both")
        text = json.dumps(data["backup"])
    if not isinstance(text, str):
        raise ConfigError("restore: 'text' must be the backup file's text (or 'backup' its JSON)")
    dry_run = data.get("dry_run", False)
    return ok(ops_of(request).restore(text, dry_run=dry_run, actor=actor(request)))


@endpoint
async def tokens(request):
    return ok(ops_of(request).tokens())


@endpoint
async def token_post(request):
    data = await body(request)
    known_keys(data, ("name",), "token")
    ops = ops_of(request)
    token, rec = ops.create_token(data.get("name"), actor(request))
    return ok({**rec, "token": token}, status=201)


@endpoint
async def token_delete(request):
    ops = ops_of(request)
    rec = ops.delete_token(request.url_args["id"], actor(request))
    return ok({"deleted": rec["id"]})


async def events(request):
    """Server-sent events from `ops.subscribe()`; ends when the client goes or its login ends."""
    st = web_state(request)
    ops = st.ops
    session_id = request.g.session.id if request.g.via == "session" else None
    epoch = ops.auth_epoch

    async def stream():     # subscribes when the answer is written (not for HEAD)
        q = ops.subscribe()
        try:
            yield b"retry: 2000\n: connected\n\n"
            while True:
                try:
                    event = await asyncio.wait_for(q.get(), 15)
                except TimeoutError:
                    event = None
                if ops.auth_epoch != epoch or (session_id and st.sessions.get(session_id) is None):
                    yield b"event: logout\ndata: {}\n\n"
                    return
                if event is None:
                    yield b": keep-alive\n\n"
                    continue
                if event.get("kind") == "alert":     # with its words and local time, for the page
                    try:
                        event = ops.alert_event(event)
                    except Exception:      # noqa: BLE001 - the event goes out as it came
                        log.exception("web: explaining alert %s", event.get("type"))
                yield f"data: {json.dumps(event, default=str)}\n\n".encode()
        finally:
            ops.unsubscribe(q)

    return Response(stream(), 200, {"Content-Type": "text/event-stream", "X-Accel-Buffering": "no"})


async def openapi(request):
    return ok(OPENAPI)


def add_routes(app) -> None:
    route(app, "GET", "/api/openapi.json", openapi)
    route(app, "GET", "/api/status", status)
    route(app, "GET", "/api/devices", devices)
    route(app, "GET", "/api/devices/<name>", device)
    route(app, "DELETE", "/api/devices/<name>", device_delete)
    route(app, "GET", "/api/devices/<name>/traffic", device_traffic)
    route(app, "GET", "/api/devices/<name>/telemetry", device_telemetry)
    route(app, "GET", "/api/traffic", traffic_overview)
    route(app, "POST", "/api/devices/<name>/approve", approve)
    route(app, "POST", "/api/devices/<name>/rename", rename)
    route(app, "POST", "/api/devices/<name>/group", group)
    route(app, "POST", "/api/devices/<name>/posture", posture)
    route(app, "POST", "/api/devices/<name>/reset", reset)
    route(app, "POST", "/api/devices/<name>/learn", learn)
    route(app, "POST", "/api/devices/<name>/allow", allow)
    route(app, "POST", "/api/devices/<name>/disallow", disallow)
    route(app, "GET", "/api/devices/<name>/profile", device_profile)
    route(app, "GET", "/api/profiles", profiles)
    route(app, "POST", "/api/profiles", profile_post)
    route(app, "GET", "/api/profiles/<type>", profile)
    route(app, "DELETE", "/api/profiles/<type>", profile_delete)
    route(app, "GET", "/api/profiles/<type>/export", profile_export)
    route(app, "POST", "/api/maintenance", maintenance)
    route(app, "GET", "/api/alerts", alerts)
    route(app, "POST", "/api/alerts/<id>/keep", alert_keep)
    route(app, "POST", "/api/alerts/<id>/release", alert_release)
    route(app, "POST", "/api/alerts/<id>/block", alert_block)
    route(app, "GET", "/api/blocked", blocked)
    route(app, "DELETE", "/api/blocked/<source>", unblock)
    route(app, "GET", "/api/decisions", decisions)
    route(app, "GET", "/api/audit", audit)
    route(app, "GET", "/api/rules", rules)
    route(app, "POST", "/api/rules", rules_post)
    route(app, "POST", "/api/rules/validate", rules_validate)
    route(app, "PUT", "/api/rules/<name>", rule_put)
    route(app, "POST", "/api/rules/<name>/enabled", rule_enabled)
    route(app, "DELETE", "/api/rules/<name>", rule_delete)
    route(app, "GET", "/api/settings", settings)
    route(app, "PUT", "/api/settings", settings_put)
    route(app, "GET", "/api/backup", backup)
    route(app, "POST", "/api/restore", restore)
    route(app, "GET", "/api/tokens", tokens)
    route(app, "POST", "/api/tokens", token_post)
    route(app, "DELETE", "/api/tokens/<id>", token_delete)
    route(app, "GET", "/api/events", events)


# -- OpenAPI 3 -----------------------------------------------------------------------------

def _json_body(schema: dict, required=True) -> dict:
    return {"required": required, "content": {"application/json": {"schema": schema}}}


def _op(summary: str, body: dict | None = None, params=(), ok_schema=None, errors=(400,)) -> dict:
    op: dict[str, Any] = {"summary": summary, "responses": {
        "200": {"description": "done", "content": {"application/json": {"schema": ok_schema or {}}}},
        "401": {"$ref": "#/components/responses/Unauthorized"}}}
    for code in errors:
        op["responses"][str(code)] = {"$ref": "#/components/responses/Error"}
    if body:
        op["requestBody"] = body
        op["responses"]["403"] = {"$ref": "#/components/responses/Csrf"}
    if params:
        op["parameters"] = list(params)
    return op


_NAME = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}
_LIMIT = {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT}}
_DEVICE = {"name": "device", "in": "query", "schema": {"type": "string"}}
_SPAN = {"name": "span", "in": "query", "schema": {"type": "string", "enum": ["hour", "day"]},
         "description": "the last hour in 10-s slots (default) or the last day in 5-minute slots"}
_ID = {"name": "id", "in": "path", "required": True, "schema": {"type": "integer"}}
_POSTURE = {"type": "string", "enum": list(SETTABLE_POSTURES)}
_TYPE = {"name": "type", "in": "path", "required": True, "schema": {"type": "string"}}
_FORMAT = {"name": "format", "in": "query", "schema": {"type": "string", "enum": ["toml", "mud"]}}
_MUD_URL = {"name": "mud_url", "in": "query", "schema": {"type": "string"},
            "description": "with format mud: the URL it is published under"}
_DESTINATION = {"type": "object", "required": ["destination"], "properties": {"destination": {
    "type": "string", "example": "n-devs.tplinkcloud.com:443/tcp",
    "description": "name:port/proto, address[/prefix][:port][/proto] or lan:port/proto"}}}

OPENAPI = {
    "openapi": "3.0.3",
    "info": {"title": "Kalki gateway API", "version": "1",
             "description": "The operator's API of a Kalki gateway. Authenticate with the page's "
                            "session cookie (then send the page's CSRF token in X-CSRF-Token on "
                            "POST, PUT and DELETE) or with an API token made on the settings page: "
                            "Authorization: Bearer <token>. Errors are {\"error\": \"...\"} naming "
                            "the culprit; a refused request changes nothing."},
    "security": [{"bearer": []}, {"session": []}],
    "components": {
        "securitySchemes": {
            "bearer": {"type": "http", "scheme": "bearer"},
            "session": {"type": "apiKey", "in": "cookie", "name": "kalki_session"}},
        "schemas": {"Error": {"type": "object", "properties": {"error": {"type": "string"}},
                              "required": ["error"]}},
        "responses": {
            "Error": {"description": "refused; nothing changed",
                      "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}},
            "Unauthorized": {"description": "no valid session or token",
                             "content": {"application/json": {
                                 "schema": {"$ref": "#/components/schemas/Error"}}}},
            "Csrf": {"description": "session without the right X-CSRF-Token header, or a "
                                    "request from another origin (its Origin header)",
                     "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}}},
    "paths": {
        "/healthz": {"get": {"summary": "liveness (no authentication)", "security": [],
                             "responses": {"200": {"description": "the supervisor's loop runs"},
                                           "503": {"description": "the loop is stuck"}}}},
        "/api/status": {"get": _op("supervisor status, posture summary (the LEDs), claim window")},
        "/api/devices": {"get": _op("every device with its posture", ok_schema={"type": "array"})},
        "/api/devices/{name}": {
            "get": _op("a device: identity, posture, history, umboxes, counters, the names it resolved "
                       "(names: bound, refused), the flows outside its profile (flows: refused, each "
                       "with allow_as, the destination that allows it; learnt), its own destinations "
                       "(allow), alerts, telemetry, decisions", params=[_NAME], errors=(404,)),
            "delete": _op("forget a device", params=[_NAME], errors=(404,))},
        "/api/devices/{name}/traffic": {"get": _op(
            "the device's traffic from the kernel's counters: at (each slot's start, epoch "
            "seconds), passed_packets, dropped_packets, passed_bytes, dropped_bytes (per slot; null: "
            "no data then), reasons (dropped packets per slot by reason), totals, step (seconds per "
            "slot), and drops (the reasons in words, most packets first)", params=[_NAME, _SPAN],
            errors=(400, 404))},
        "/api/devices/{name}/telemetry": {"get": _op(
            "the device's telemetry: latest (one row per key: value, at, when, source, meaning) and "
            "series (each numeric key's recent values: at, values)", params=[_NAME], errors=(404,))},
        "/api/traffic": {"get": _op(
            "every device's passed and dropped packets over the span in buckets, for small charts",
            params=[_SPAN, {"name": "points", "in": "query",
                            "schema": {"type": "integer", "minimum": 1, "default": 60}}])},
        "/api/devices/{name}/approve": {"post": _op(
            "approve a new device with a type", params=[_NAME], errors=(400, 404),
            body=_json_body({"type": "object", "required": ["type"],
                             "properties": {"type": {"type": "string", "description": "a profile"}}}))},
        "/api/devices/{name}/rename": {"post": _op(
            "rename a device: its identity, posture, history (found under the new name) and MQTT "
            "identity stay (its broker user and topic, as mqtt_user); its retained posture topic "
            "moves and Home Assistant's entity is kept (same unique_id). Answers {device, from, "
            "notes}; 400 if the name breaks the name rule or is taken", params=[_NAME],
            errors=(400, 404), body=_json_body({"type": "object", "required": ["name"], "properties": {
                "name": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,40}$"}}}))},
        "/api/devices/{name}/group": {"post": _op(
            "put a device in a group (rules select it with {group = ...}); null: in none",
            params=[_NAME], errors=(400, 404), body=_json_body({"type": "object", "required": ["group"],
                                                                "properties": {"group": {
                                                                    "type": "string", "nullable": True,
                                                                    "pattern": "^[A-Za-z0-9_-]{1,40}$"}}}))},
        "/api/devices/{name}/posture": {"post": _op(
            "set a posture, optionally for a while", params=[_NAME], errors=(400, 404),
            body=_json_body({"type": "object", "required": ["posture"],
                             "properties": {"posture": _POSTURE,
                                            "for": {"type": "string", "example": "15m"}}}))},
        "/api/devices/{name}/reset": {"post": _op("back to normal", params=[_NAME], errors=(400, 404),
                                                  body=_json_body({"type": "object"}, required=False))},
        "/api/devices/{name}/learn": {"post": _op(
            "posture learning for a while (24 h unless 'for'): the device reaches what it asks for, "
            "every flow outside its profile is recorded; a device not approved yet is approved "
            "first, as 'type' (default: generic)", params=[_NAME], errors=(400, 404),
            body=_json_body({"type": "object", "properties": {
                "for": {"type": "string", "example": "24h", "description": "90s, 15m, 2h, 1d"},
                "type": {"type": "string", "description": "a profile, for a device not approved yet"}}},
                required=False))},
        "/api/devices/{name}/allow": {"post": _op(
            "a destination the device may open on top of its profile (a refused flow's allow_as)",
            params=[_NAME], errors=(400, 404), body=_json_body(_DESTINATION))},
        "/api/devices/{name}/disallow": {"post": _op(
            "take back a destination given with allow", params=[_NAME], errors=(400, 404),
            body=_json_body(_DESTINATION))},
        "/api/devices/{name}/profile": {"get": _op(
            "what the device did while learning, as a profile (TOML) or a MUD file to read, edit "
            "and import", errors=(400, 404), params=[
                _NAME, {"name": "type", "in": "query", "schema": {"type": "string"},
                        "description": "the new type's name (default <type>-<device>)"},
                _FORMAT, _MUD_URL])},
        "/api/profiles": {
            "get": _op("every device type, shipped and installed", ok_schema={"type": "array"}),
            "post": _op(
                "install a profile from a TOML profile or an RFC 8520 MUD file (JSON), told apart by "
                "their content; everything is checked first, an error names the file and the place "
                "in it; answers the type and the importer's notes (201)",
                body=_json_body({"type": "object", "required": ["text"], "properties": {
                    "text": {"type": "string"},
                    "filename": {"type": "string", "description": "names the file in errors"},
                    "type": {"type": "string", "description": "the device type's name "
                                                               "(default: the file's)"},
                    "device_ip": {"type": "string", "description": "MUD files: the device's "
                                                                   "address in the capture"}}}))},
        "/api/profiles/{type}": {
            "get": _op("a profile: its postures' umbox stacks, and in_words: each umbox in a "
                       "sentence, by posture", params=[_TYPE], errors=(404,)),
            "delete": _op("remove an installed profile no device uses", params=[_TYPE],
                          errors=(400, 404))},
        "/api/profiles/{type}/export": {"get": _op(
            "a profile as its TOML file, or its normal posture's destinations as a MUD file: "
            "{type, format, text}", params=[_TYPE, _FORMAT, _MUD_URL], errors=(400, 404))},
        "/api/maintenance": {"post": _op(
            "pause automation for some minutes (0 ends it)",
            body=_json_body({"type": "object", "required": ["minutes"],
                             "properties": {"minutes": {"type": "integer", "minimum": 0,
                                                        "maximum": 1440}}}))},
        "/api/alerts": {"get": _op("alerts, newest first, each with its explanation in words "
                                   "(what happened, why it matters, the posture that followed)",
                                   params=[_DEVICE, _LIMIT])},
        "/api/alerts/{id}/keep": {"post": _op(
            "keep the posture that followed an alert: an audit record; the page offers nothing more "
            "for it", params=[_ID], errors=(400,), body=_json_body({"type": "object"}, required=False))},
        "/api/alerts/{id}/release": {"post": _op(
            "the alert's device back to normal (as reset), with an audit record", params=[_ID],
            errors=(400,), body=_json_body({"type": "object"}, required=False))},
        "/api/alerts/{id}/block": {"post": _op(
            "the alert's source into the kernel drop set", params=[_ID],
            body=_json_body({"type": "object", "required": ["seconds"], "properties": {"seconds": {
                "oneOf": [{"type": "integer", "minimum": 0}, {"type": "string"}], "example": "1h",
                "description": "seconds, or 90s, 15m, 2h, 1d; 0: until unblocked"}}}))},
        "/api/blocked": {"get": _op("the sources in the kernel drop set: source, device, reason, why, "
                                    "seconds_left, until (null: until unblocked)")},
        "/api/blocked/{source}": {"delete": _op("take a source out of the drop set", params=[
            {"name": "source", "in": "path", "required": True, "schema": {"type": "string"}}])},
        "/api/decisions": {"get": _op("decisions and audit entries, newest first", params=[
            _DEVICE, _LIMIT, {"name": "kind", "in": "query",
                              "schema": {"type": "string", "enum": ["decision", "audit"]}}])},
        "/api/audit": {"get": _op("the audit log", params=[_LIMIT])},
        "/api/rules": {
            "get": _op("every rule: built-in, profile and site, each with what it does in words"),
            "post": _op("add or replace site rules from TOML ([[rules]] tables)",
                        body=_json_body({"type": "object", "required": ["text"],
                                         "properties": {"text": {"type": "string"}}}))},
        "/api/rules/validate": {"post": _op(
            "validate TOML rules without saving",
            body=_json_body({"type": "object", "required": ["text"],
                             "properties": {"text": {"type": "string"}}}))},
        "/api/rules/{name}": {
            "put": _op("add or replace one site rule (JSON: when, then, priority, applies_to, "
                       "description, enabled)", params=[_NAME],
                       body=_json_body({"type": "object", "required": ["when", "then"]})),
            "delete": _op("delete a site rule", params=[_NAME])},
        "/api/rules/{name}/enabled": {"post": _op(
            "switch a rule off or on: a site rule, or a built-in or profile rule (audited)",
            params=[_NAME],
            body=_json_body({"type": "object", "required": ["enabled"],
                             "properties": {"enabled": {"type": "boolean"}}}))},
        "/api/settings": {
            "get": _op("business hours, time zone, MQTT users"),
            "put": _op("change business hours and/or the time zone", body=_json_body({
                "type": "object", "properties": {
                    "timezone": {"type": "string", "example": "Europe/Berlin"},
                    "business_hours": {"type": "object", "required": ["days", "start", "end"],
                                       "properties": {"days": {"type": "array", "items": {
                                           "type": "string", "enum": list(DAYS)}},
                                           "start": {"type": "string", "example": "08:00"},
                                           "end": {"type": "string", "example": "18:00"}}}}}))},
        "/api/backup": {"get": _op(
            "a backup: settings, installed profiles, site rules and the device list as one JSON "
            "file (format kalki-backup, with a sha256 of its content); the admin password hash and "
            "the API tokens only with secrets=1", params=[
                {"name": "secrets", "in": "query", "schema": {"type": "string", "enum": ["1"]}}])},
        "/api/restore": {"post": _op(
            "restore a backup: all of it is checked first and an error, naming the culprit, "
            "changes nothing; a device held in a stricter posture than the backup's keeps it; "
            "dry_run only checks. Answers what was (or would be) done",
            body=_json_body({"type": "object", "properties": {
                "text": {"type": "string", "description": "the backup file's text"},
                "backup": {"type": "object", "description": "or the file's JSON as it is"},
                "dry_run": {"type": "boolean"}}}))},
        "/api/tokens": {
            "get": _op("API tokens (names and ids; the tokens are stored hashed)"),
            "post": _op("create a token; the answer shows it once",
                        body=_json_body({"type": "object", "required": ["name"],
                                         "properties": {"name": {"type": "string"}}}))},
        "/api/tokens/{id}": {"delete": _op("delete a token", params=[
            {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}])},
        "/api/events": {"get": {"summary": "server-sent events: posture, alert, decision, device, "
                                           "panel", "responses": {"200": {
                                               "description": "text/event-stream of JSON objects",
                                               "content": {"text/event-stream": {}}}}}},
        "/api/openapi.json": {"get": _op("this document")},
    },
}
