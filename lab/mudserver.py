"""The lab's MUD file server: a directory served over HTTPS, as a manufacturer serves the MUD
files its devices name in DHCP (option 161), with a certificate from a per-lab test CA, and
detached CMS signatures (RFC 8520 section 13) made with a signer certificate from the same CA.

The appliance trusts the lab's CA through `[mud] ca_file` (the CA's PEM file), for the server
and for the signatures alike. Outside the product; the tests run it on 127.0.0.1 in-process,
a lab runs it on the internet host:

    python -m lab.mudserver --directory DIR --ca-dir CA --bind 198.19.0.2 --port 4443 \\
        --ready-file F

(port 443 of the internet host is lab.sink's). `TestCA` makes the CA and its certificates with
the cryptography package; `sign` signs a file with `openssl cms -sign`.
"""
from __future__ import annotations

import argparse
import datetime
import http.server
import ipaddress
import os
import signal
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

MUD_TYPE = "application/mud+json"          # RFC 8520 section 17.1
SIGNATURE_TYPE = "application/pkcs7-signature"
LAB_PORT = 4443                            # on the internet host, whose 443 is lab.sink's


class TestCA:
    """A certificate authority for one lab, kept in `directory` (ca.pem, ca.key); made on first
    use. Its certificates are EC P-256 and valid for 30 days."""

    __test__ = False      # not a pytest class

    def __init__(self, directory: Path | str, name: str = "Kalki lab MUD CA"):
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.cert_path, self.key_path = self.directory / "ca.pem", self.directory / "ca.key"
        if self.cert_path.exists() and self.key_path.exists():
            self.cert = x509.load_pem_x509_certificate(self.cert_path.read_bytes())
            self.key = serialization.load_pem_private_key(self.key_path.read_bytes(), None)
            return
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
                     .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(now - datetime.timedelta(days=1))
                     .not_valid_after(now + datetime.timedelta(days=30))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                     .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                                  key_encipherment=False, data_encipherment=False,
                                                  key_agreement=False, key_cert_sign=True, crl_sign=True,
                                                  encipher_only=False, decipher_only=False), critical=True)
                     .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()),
                                    critical=False)
                     .sign(self.key, hashes.SHA256()))
        _write_key(self.key_path, self.key)
        self.cert_path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, stem: str, common_name: str, names: tuple[str, ...] = (),
              signer: bool = False) -> tuple[Path, Path]:
        """A certificate and key (<stem>.pem, <stem>.key in the CA's directory): for a server,
        `names` are its DNS names and IP addresses; a `signer` signs MUD files."""
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Kalki lab"),
                                            x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
                   .issuer_name(self.cert.subject).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(days=1))
                   .not_valid_after(now + datetime.timedelta(days=30))
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                       self.cert.public_key()), critical=False))   # type: ignore[arg-type]
        if names:
            alt: list[x509.GeneralName] = []
            for n in names:
                try:
                    alt.append(x509.IPAddress(ipaddress.ip_address(n)))
                except ValueError:
                    alt.append(x509.DNSName(n))
            builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
        usage = ExtendedKeyUsageOID.EMAIL_PROTECTION if signer else ExtendedKeyUsageOID.SERVER_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())      # type: ignore[arg-type]
        cert_path, key_path = self.directory / f"{stem}.pem", self.directory / f"{stem}.key"
        _write_key(key_path, key)
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return cert_path, key_path

    def server_context(self, names: tuple[str, ...]) -> ssl.SSLContext:
        cert, key = self.issue("server", names[0] if names else "mud server", names)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        return ctx

    def signer(self, common_name: str = "Kalki lab MUD signer") -> tuple[Path, Path]:
        """The signer's certificate and key, made once."""
        cert, key = self.directory / "signer.pem", self.directory / "signer.key"
        if cert.exists() and key.exists():
            return cert, key
        return self.issue("signer", common_name, signer=True)


def _write_key(path: Path, key) -> None:
    from cryptography.hazmat.primitives import serialization
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))


def sign(path: Path | str, cert: Path | str, key: Path | str, out: Path | str | None = None) -> Path:
    """A detached CMS signature of the file's bytes, DER (RFC 8520 section 13), written to `out`
    (default: the file's name with .p7s); returns its path."""
    path = Path(path)
    out = Path(out) if out else path.with_suffix(".p7s")
    subprocess.run(["openssl", "cms", "-sign", "-binary", "-outform", "DER", "-in", str(path),
                    "-signer", str(cert), "-inkey", str(key), "-out", str(out)],
                   check=True, capture_output=True)
    return out


class _Handler(http.server.SimpleHTTPRequestHandler):
    server: MudServer._Server

    extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map,
                      ".json": MUD_TYPE, ".p7s": SIGNATURE_TYPE}

    def do_GET(self):      # noqa: N802  (http.server's name)
        owner = self.server.owner
        owner.requests.append(self.path)
        moved = owner.redirect.get(self.path)
        if moved:
            self.send_response(302)
            self.send_header("Location", moved)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        delay = owner.delay.get(self.path)
        if delay:
            time.sleep(delay)
        drip = owner.drip.get(self.path)
        if drip:      # the body a few bytes at a time: each read is quick, the whole is slow
            self.send_response(200)
            self.send_header("Content-Type", MUD_TYPE)
            self.end_headers()
            try:
                for _ in range(1000):
                    self.wfile.write(b" ")
                    self.wfile.flush()
                    time.sleep(drip)
            except OSError:
                pass
            return
        super().do_GET()

    def log_message(self, format, *args):      # quiet; the requests are in owner.requests
        pass


class MudServer:
    """Serves `directory` over HTTPS with a certificate from `ca` for `names` (host names and
    addresses); in a thread, until stop(). For the tests: `delay` (path -> seconds before
    answering), `drip` (path -> seconds between bytes of an endless body) and `redirect` (path
    -> where it moved)."""

    class _Server(http.server.ThreadingHTTPServer):
        daemon_threads = True
        owner: MudServer

        def handle_error(self, request, client_address):
            """A client that refused the certificate, or went away: the client says why."""

    def __init__(self, directory: Path | str, ca: TestCA, bind: str = "127.0.0.1", port: int = 0,
                 names: tuple[str, ...] = ()):
        self.directory = Path(directory)
        self.delay: dict[str, float] = {}
        self.drip: dict[str, float] = {}
        self.redirect: dict[str, str] = {}
        self.requests: list[str] = []
        directory_ = str(self.directory)

        class Handler(_Handler):
            def __init__(self, *a, **kw):
                super().__init__(*a, directory=directory_, **kw)

        self._httpd = MudServer._Server((bind, port), Handler)
        self._httpd.owner = self
        ctx = ca.server_context(names or (bind,))
        # the handshake in the request's thread, so that a silent client holds up only itself
        self._httpd.socket = ctx.wrap_socket(self._httpd.socket, server_side=True,
                                             do_handshake_on_connect=False)
        self.port = self._httpd.server_address[1]
        self.host = bind
        self._thread: threading.Thread | None = None

    def url(self, path: str) -> str:
        return f"https://{self.host}:{self.port}/{path.lstrip('/')}"

    def start(self) -> MudServer:
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="mudserver", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread:
            self._thread.join(5)

    def __enter__(self) -> MudServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def start_in_lab(s, lab_dir: Path) -> TestCA:
    """The lab's MUD file server on the internet host (https://198.19.0.2:4443/), serving
    <lab dir>/mud-files with a certificate from the lab's CA in <lab dir>/mud-ca; returns the
    CA, whose ca.pem the supervisor takes as `[mud] ca_file`. The lab's state records the URL
    base (gateway.mud_base) and the directory (gateway.mud_files); `down` stops it."""
    from lab import topology
    ca = TestCA(lab_dir / "mud-ca")
    files = lab_dir / "mud-files"
    files.mkdir(exist_ok=True)
    flag = lab_dir / "mudserver.ready"
    s.pids["mudserver"] = topology.spawn(s.namespaces["inet"], [
        sys.executable, "-m", "lab.mudserver", "--directory", str(files), "--ca-dir", str(ca.directory),
        "--bind", topology.INET_IP, "--port", str(LAB_PORT), "--ready-file", str(flag)],
        lab_dir / "mudserver.log")
    s.gateway["mud_base"] = f"https://{topology.INET_IP}:{LAB_PORT}/"
    s.gateway["mud_files"] = str(files)
    topology.wait_for_files([flag], 30, f"lab {s.name}: the MUD file server")
    return ca


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m lab.mudserver", description=__doc__.split("\n\n")[0])
    ap.add_argument("--directory", required=True, help="the MUD files (and their .p7s signatures)")
    ap.add_argument("--ca-dir", required=True, help="the lab's test CA (made there if missing)")
    ap.add_argument("--bind", default="0.0.0.0")
    ap.add_argument("--port", type=int, default=4443)
    ap.add_argument("--names", default="", help="comma-separated host names and addresses of the "
                    "server's certificate (default: --bind)")
    ap.add_argument("--ready-file")
    args = ap.parse_args(argv)
    names = tuple(n for n in args.names.split(",") if n) or (args.bind,)
    server = MudServer(args.directory, TestCA(args.ca_dir), args.bind, args.port, names)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server._httpd.shutdown).start())
    if args.ready_file:
        tmp = args.ready_file + ".tmp"
        Path(tmp).write_text(str(os.getpid()))
        os.replace(tmp, args.ready_file)
    server._httpd.serve_forever()
    server._httpd.server_close()


if __name__ == "__main__":
    main()
