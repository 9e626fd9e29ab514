"""A device's MUD file fetched from the URL it names in DHCP (option 161), checked, and kept in a
cache for the operator's approval (RFC 8520 sections 10 and 13).

What `fetch` checks, in order; anything that fails is refused with an error naming the URL, and
a refused file is never offered:
- the URL is https (RFC 8520 allows no other scheme), and so is every redirect and the
  signature's URL;
- the server's certificate verifies against the site's CA file (`[mud] ca_file`) or, without
  one, the system's trust store, and names the URL's host (Python's ssl defaults);
- the file is at most 1 MB (as `kalki profile import`), and the whole fetch (file, signature and
  its check) ends within the timeout;
- the file's own `mud-url` is the URL it was fetched from;
- it reads with the importer (appliance.policy.mud) and makes a profile the supervisor would
  load; nothing is installed;
- where the file names a `mud-signature`, the signature (a DER CMS detached signature over the
  file's bytes, RFC 8520 section 13) is fetched and `openssl cms -verify` checks it against the
  same trust as the server. The result names the signer's certificate subject. A file that names
  no signature is offered as "no signature published".

Not checked: who the signer is. Any certificate that chains to a trusted CA signs any MUD file
(`-purpose any`); there is no pinning of a manufacturer's certificate to its MUD URLs beyond
choosing the CA file. The operator reads the signer's subject at approval.
"""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
import http.client
import json
import os
import re
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from appliance.errors import ConfigError
from appliance.policy import mud as mudfiles
from appliance.policy import profiles

MAX_BYTES = mudfiles.MAX_BYTES        # as `kalki profile import`
MAX_SIGNATURE_BYTES = 256 * 1024      # a CMS signature with its certificate chain is a few kB
DEFAULT_TIMEOUT = 10.0
CACHE_VALIDITY_HOURS = 48             # RFC 8520's default cache-validity
MAX_CACHED = 200                      # files kept; the oldest go first (devices name what they like)
NO_SIGNATURE = "no signature published"
ACCEPT = "application/mud+json, application/json;q=0.9"


class MudFetchError(ConfigError):
    """A MUD file not fetched, or refused; the message names the URL."""


@dataclass(frozen=True)
class Fetched:
    """A MUD file fetched and checked, ready to be offered."""
    url: str
    text: str                      # the file as served (UTF-8)
    signature: str                 # "verified by <subject>" or NO_SIGNATURE
    signer: str | None             # the signer's certificate subject, when verified
    signature_url: str | None
    type_name: str                 # the importer's type name for it (the MUD URL's last part)
    fetched: str                   # ISO time (UTC)
    cache_hours: int               # the file's cache-validity

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> Fetched:
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls)})


def check_https(url, what: str = "MUD URL") -> str:
    """`url` if it is an https URL with a host; otherwise a MudFetchError naming it."""
    try:
        parts = urllib.parse.urlsplit(url) if isinstance(url, str) else None
    except ValueError:
        parts = None
    if parts is None or parts.scheme != "https" or not parts.hostname:
        raise MudFetchError(f"{what} {url!r}: not fetched: only https URLs are (RFC 8520)")
    return url


def tls_context(ca_file: str = "") -> ssl.SSLContext:
    """Certificates verified against `ca_file` only, or the system's trust store without one."""
    try:
        return ssl.create_default_context(cafile=ca_file or None)
    except (OSError, ssl.SSLError) as e:
        raise MudFetchError(f"mud.ca_file {ca_file}: {getattr(e, 'strerror', None) or e}") from None


def fetch(url: str, ca_file: str = "", timeout: float = DEFAULT_TIMEOUT) -> Fetched:
    """The MUD file at `url`, checked as the module says; a MudFetchError names what failed."""
    check_https(url)
    deadline = time.monotonic() + timeout
    ctx = tls_context(ca_file)
    raw = _get(url, ctx, deadline, timeout, MAX_BYTES, "MUD file")
    try:
        mud = mudfiles.parse_mud(raw, url)
    except ConfigError as e:
        raise MudFetchError(f"{e} (the MUD file fetched from its URL)") from None
    if mud.mud_url != url:
        raise MudFetchError(f"{url}: the file's mud-url is {mud.mud_url}, not the URL it was fetched "
                            "from: refused")
    data = json.loads(raw.decode("utf-8-sig"))        # parse_mud read it; only the signature's URL
    named = data["ietf-mud:mud"].get("mud-signature")
    signer = signature_url = None
    if named is None:
        signature = NO_SIGNATURE
    else:
        signature_url = urllib.parse.urljoin(url, named)
        check_https(signature_url, f"{url}: its mud-signature")
        der = _get(signature_url, ctx, deadline, timeout, MAX_SIGNATURE_BYTES, "signature")
        signer = verify_signature(url, raw, der, ca_file, max(0.5, deadline - time.monotonic()))
        signature = f"verified by {signer}"
    try:
        type_name = mudfiles.default_type_name(mud)
    except ConfigError:
        type_name = "mud-" + hashlib.sha256(url.encode()).hexdigest()[:8]
    try:        # what `kalki profile import` would install, checked the same way
        profile, _ = mudfiles.to_profile(mud, type_name)
        profiles.profile_from_text(profiles.dump_profile(profile), url)
    except ConfigError as e:
        raise MudFetchError(f"{url}: makes no profile: {e}") from None
    hours = data["ietf-mud:mud"].get("cache-validity", CACHE_VALIDITY_HOURS)
    return Fetched(url, raw.decode("utf-8-sig"), signature, signer, signature_url, type_name,
                   datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), hours)


class _HttpsRedirects(urllib.request.HTTPRedirectHandler):
    max_redirections = 5

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        newurl = urllib.parse.urljoin(req.full_url, newurl)
        if urllib.parse.urlsplit(newurl).scheme != "https":
            raise MudFetchError(f"{req.full_url}: redirected to {newurl}, which is not https: refused")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _get(url: str, ctx: ssl.SSLContext, deadline: float, timeout: float, limit: int, what: str) -> bytes:
    """The body at `url`: at most `limit` bytes, all of it before `deadline` (time.monotonic()).
    Directly, with no proxy: the appliance has no proxy setting."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}),
                                         urllib.request.HTTPSHandler(context=ctx), _HttpsRedirects())
    request = urllib.request.Request(url, headers={"Accept": ACCEPT, "User-Agent": "kalki-mud"})
    late = MudFetchError(f"{url}: the {what} did not arrive within {timeout:g} s")
    try:
        with opener.open(request, timeout=max(0.01, deadline - time.monotonic())) as response:
            length = response.headers.get("Content-Length", "")
            if length.isdigit() and int(length) > limit:
                raise MudFetchError(f"{url}: the {what} is {int(length)} bytes; at most {limit} are "
                                    "fetched: refused")
            body = bytearray()
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise late
                _read_timeout(response, left)
                chunk = response.read1(65536)
                if not chunk:
                    return bytes(body)
                body += chunk
                if len(body) > limit:
                    raise MudFetchError(f"{url}: the {what} is larger than {limit} bytes: refused")
    except MudFetchError:
        raise
    except urllib.error.HTTPError as e:
        raise MudFetchError(f"{url}: the {what} was not served: HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        reason = e.reason
        if isinstance(reason, TimeoutError):
            raise late from None
        if isinstance(reason, ssl.SSLCertVerificationError):
            raise MudFetchError(f"{url}: the server's certificate does not verify: "
                                f"{reason.verify_message or reason}") from None
        raise MudFetchError(f"{url}: the {what} could not be fetched: "
                            f"{getattr(reason, 'strerror', None) or reason}") from None
    except TimeoutError:
        raise late from None
    except (OSError, http.client.HTTPException, ValueError) as e:
        raise MudFetchError(f"{url}: the {what} could not be fetched: {e or type(e).__name__}") from None


def _read_timeout(response, seconds: float) -> None:
    """Each read waits at most what is left of the whole fetch's time."""
    sock = getattr(getattr(getattr(response, "fp", None), "raw", None), "_sock", None)
    if sock is not None:
        sock.settimeout(max(0.01, seconds))


def verify_signature(url: str, content: bytes, der: bytes, ca_file: str = "", timeout: float = 10.0) -> str:
    """The subject of the certificate that signed `content` (`der`: a DER CMS detached
    signature), as `openssl cms -verify` checks it against `ca_file` only, or the system's trust
    store; a MudFetchError "signature does not verify" otherwise."""
    with tempfile.TemporaryDirectory(prefix="kalki-mud-") as d:
        content_path, sig_path, signer_path = (os.path.join(d, n)
                                               for n in ("mud.json", "mud.p7s", "signer.pem"))
        for path, data in ((content_path, content), (sig_path, der)):
            with open(path, "wb") as f:
                f.write(data)
        command = ["openssl", "cms", "-verify", "-inform", "DER", "-binary", "-content", content_path,
                   "-in", sig_path, "-purpose", "any", "-out", os.devnull, "-signer", signer_path]
        if ca_file:
            command += ["-CAfile", ca_file, "-no-CApath", "-no-CAstore"]
        try:
            proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        except FileNotFoundError:
            raise MudFetchError(f"{url}: its signature cannot be checked: openssl is not installed") from None
        except subprocess.TimeoutExpired:
            raise MudFetchError(f"{url}: its signature was not checked within {timeout:.0f} s") from None
        if proc.returncode != 0:
            raise MudFetchError(f"{url}: signature does not verify: {_openssl_reason(proc.stderr)}")
        try:
            pem = Path(signer_path).read_bytes()
        except OSError:
            pem = b""
    return _subjects(pem) or "an unnamed signer"


def _openssl_reason(stderr: str) -> str:
    """openssl's errors in words: 'verification failure; unable to get local issuer
    certificate', not its error codes and source lines."""
    reasons: list[str] = []
    for line in stderr.splitlines():
        line = line.strip()
        m = re.match(r"^[0-9A-Fa-f]+:error:[0-9A-Fa-f]+:[^:]*:[^:]*:([^:]*)", line)
        text = m.group(1) if m else re.sub(r"^(Verify error|Error):\s*", "", line)
        if text and text not in reasons and "Verification failure" not in text:
            reasons.append(text)
    return "; ".join(reasons)[:300] or "openssl says no"


def _subjects(pem: bytes) -> str:
    """The subjects of the certificates in a PEM file (openssl -signer writes each signer's)."""
    try:
        from cryptography import x509
        blocks = re.findall(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", pem, re.S)
        return "; ".join(x509.load_pem_x509_certificate(b).subject.rfc4514_string() for b in blocks)
    except (ImportError, ValueError):
        return ""


# -- the cache: <state directory>/mud-cache/<hash of the URL>.json ------------------------------
def cache_path(cache_dir: Path | str, url: str) -> Path:
    return Path(cache_dir) / (hashlib.sha256(url.encode()).hexdigest()[:32] + ".json")


def cached(cache_dir: Path | str, url: str, fresh: bool = False) -> Fetched | None:
    """What was fetched from `url` and kept; with `fresh`, only within its cache-validity."""
    try:
        got = Fetched.from_json(json.loads(cache_path(cache_dir, url).read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if got.url != url:
        return None
    if fresh:
        try:
            age = datetime.datetime.now(datetime.UTC) - datetime.datetime.fromisoformat(got.fetched)
        except (TypeError, ValueError):
            return None
        if not datetime.timedelta(0) <= age < datetime.timedelta(hours=got.cache_hours):
            return None
    return got


def save(cache_dir: Path | str, got: Fetched) -> Path:
    """Kept atomically (temporary file, fsync, rename)."""
    directory = Path(cache_dir)
    directory.mkdir(parents=True, exist_ok=True)
    path = cache_path(directory, got.url)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(got.to_json(), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _prune(directory, keep=path)
    return path


def _prune(directory: Path, keep: Path) -> None:
    """At most MAX_CACHED files: an unapproved device that names a new URL at every lease must
    not fill the SD card."""
    try:
        files = sorted((p for p in directory.glob("*.json") if p != keep),
                       key=lambda p: p.stat().st_mtime)
        for old in files[:max(0, len(files) + 1 - MAX_CACHED)]:
            old.unlink()
    except OSError:
        pass


def fetch_cached(url: str, cache_dir: Path | str, ca_file: str = "",
                 timeout: float = DEFAULT_TIMEOUT) -> Fetched:
    """The file from the cache while its cache-validity lasts, else fetched (and kept). A
    refusal is not kept: the next try fetches again."""
    got = cached(cache_dir, url, fresh=True)
    if got is None:
        got = fetch(url, ca_file, timeout)
        try:
            save(cache_dir, got)
        except OSError as e:
            raise MudFetchError(f"{url}: fetched, but not kept in {cache_dir}: {e.strerror or e}") from None
    return got
