"""The lab's "internet" host: accepts TCP on a few ports and answers one line, so tests can
see which destinations a device reaches; the --tls-ports speak TLS first (a self-signed
certificate made at start), as real clouds do. Run as: python -m lab.sink --ports 80,443"""
import argparse
import asyncio
import datetime
import os
import signal
import ssl
import tempfile


async def _answer(reader, writer):
    port = writer.get_extra_info("sockname")[1]
    try:
        writer.write(f"sink {port}\n".encode())
        await writer.drain()
        await asyncio.wait_for(reader.read(4096), 5)
    except (TimeoutError, OSError):
        pass
    finally:
        writer.close()


def tls_context() -> ssl.SSLContext:
    """A server context with a fresh self-signed certificate for *.example (lab names)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "lab cloud")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("*.example")]), critical=False)
            .sign(key, hashes.SHA256()))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with tempfile.TemporaryDirectory() as d:
        cert_path, key_path = os.path.join(d, "cert.pem"), os.path.join(d, "key.pem")
        with open(cert_path, "wb") as f:
            f.write(cert.public_bytes(serialization.Encoding.PEM))
        with open(key_path, "wb") as f:
            f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
        ctx.load_cert_chain(cert_path, key_path)
    return ctx


async def serve(ports, bind="0.0.0.0", tls_ports=()):
    ctx = tls_context() if tls_ports else None
    return [await asyncio.start_server(_answer, bind, p, backlog=1024, reuse_address=True,
                                       ssl=ctx if p in tls_ports else None)
            for p in ports]


async def _main(args):
    tls = [int(p) for p in args.tls_ports.split(",") if p]
    servers = await serve([int(p) for p in args.ports.split(",")] + tls, args.bind, tls)
    if args.ready_file:
        tmp = args.ready_file + ".tmp"
        with open(tmp, "w") as f:
            f.write(str(os.getpid()))
        os.replace(tmp, args.ready_file)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    for s in servers:
        s.close()


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m lab.sink")
    ap.add_argument("--ports", default="80,443")
    ap.add_argument("--tls-ports", default="", help="ports that speak TLS (not also in --ports)")
    ap.add_argument("--bind", default="0.0.0.0")
    ap.add_argument("--ready-file")
    asyncio.run(_main(ap.parse_args(argv)))


if __name__ == "__main__":
    main()
