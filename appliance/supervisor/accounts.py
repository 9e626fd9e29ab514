"""The gateway's accounts: the admin password (scrypt, no default: the first admin claims the
box while the claim window is open) and the API tokens, kept hashed in the store's settings."""
from __future__ import annotations

import datetime
import hashlib
import hmac
import secrets

from appliance.errors import ConfigError
from appliance.vocab import SCRYPT, hash_password, verify_password

__all__ = ["SCRYPT", "hash_password", "verify_password"]

MIN_PASSWORD = 10
MAX_PASSWORD = 1024
TOKENS_SETTING = "api_tokens"


def check_new_credentials(user, password, confirm) -> str:
    """The checked user name; raises ConfigError naming what is wrong."""
    if not isinstance(user, str) or not 1 <= len(user.strip()) <= 64 or not user.strip().isprintable():
        raise ConfigError("user: 1 to 64 printable characters")
    if not isinstance(password, str) or len(password) < MIN_PASSWORD:
        raise ConfigError(f"password: at least {MIN_PASSWORD} characters")
    if len(password) > MAX_PASSWORD:
        raise ConfigError(f"password: at most {MAX_PASSWORD} characters")
    if password != confirm:
        raise ConfigError("password: the two entries differ")
    return user.strip()


# -- API tokens (stored hashed in the store's settings) --------------------------------------

def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def list_tokens(store) -> list[dict]:
    return [{k: v for k, v in t.items() if k != "sha256"}
            for t in (store.get_setting(TOKENS_SETTING) or [])]


def create_token(store, name, now: datetime.datetime) -> tuple[str, dict]:
    if not isinstance(name, str) or not 1 <= len(name.strip()) <= 64 or not name.strip().isprintable():
        raise ConfigError("token name: 1 to 64 printable characters")
    tokens = store.get_setting(TOKENS_SETTING) or []
    if any(t["name"] == name.strip() for t in tokens):
        raise ConfigError(f"token name: {name.strip()!r} exists already")
    if len(tokens) >= 50:
        raise ConfigError("token: at most 50 tokens; delete one first")
    token = "kalki_" + secrets.token_urlsafe(32)
    rec = {"id": secrets.token_hex(6), "name": name.strip(), "sha256": _token_hash(token),
           "created": now.isoformat(timespec="seconds")}
    store.set_setting(TOKENS_SETTING, tokens + [rec])
    return token, {k: v for k, v in rec.items() if k != "sha256"}


def delete_token(store, token_id: str) -> dict:
    tokens = store.get_setting(TOKENS_SETTING) or []
    gone = next((t for t in tokens if t["id"] == token_id), None)
    if gone is None:
        raise ConfigError(f"token {token_id!r} does not exist")
    store.set_setting(TOKENS_SETTING, [t for t in tokens if t["id"] != token_id])
    return {k: v for k, v in gone.items() if k != "sha256"}


def token_owner(store, token: str) -> dict | None:
    digest = _token_hash(token)
    found = None
    for t in store.get_setting(TOKENS_SETTING) or []:
        if hmac.compare_digest(t["sha256"], digest):
            found = t
    return found
