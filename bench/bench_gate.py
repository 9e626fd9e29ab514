"""The gate's added latency per request (issue 15's benchmark), on loopback.

A device (Python's threading HTTP/1.1 server, keep-alive, a 60-byte JSON answer) in a process
of its own; three gates (appliance.dataplane.gate, each a process, --target-override to the
device) with the policies the profiles use:

  direct        the client talks to the device: the baseline
  auth_gate     HTTP Basic on every request (the admin's check remembered after the first)
  api_filter    "GET *" and "PUT /api/*/lights/*/state"
  filter_guard  api_filter + token_guard (status and failure_text counting)
  decoy         the deception umbox's HTTP decoy imitating a light (it answers itself: what a
                known attacker waits for instead of the device)

The client keeps one connection per case open and sends GETs; cases are interleaved round by
round. Reported: p50 and p99 per request (ms) and the added latency, the median of per-round
differences to `direct`, with the load average beside each.
"""
from __future__ import annotations

import base64
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common
from common import emit, median, percentile

BENCH = "gate"
ROUNDS = int(os.environ.get("KALKI_BENCH_ROUNDS", 9))
PER_ROUND = int(os.environ.get("KALKI_BENCH_GATE_REQUESTS", 300))
ROOT = Path(__file__).resolve().parents[1]
USER, PASSWORD = "admin", "bench-gate-pass"

DEVICE = r"""
import http.server, sys
BODY = b'{"device": "bench", "state": {"on": true, "brightness": 80}}'
ANSWER = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
          + str(len(BODY)).encode() + b"\r\n\r\n" + BODY)
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        self.wfile.write(ANSWER)     # one write: no Nagle / delayed-ACK stall between head and body
    def log_message(self, *a):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")


def main() -> int:
    common.install_signal_handlers()
    from appliance.dataplane.gate import hash_password
    procs: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory(prefix="kalki-bench-gate-") as tmp:
        try:
            device_port = free_port()
            procs.append(subprocess.Popen([sys.executable, "-c", DEVICE, str(device_port)]))
            creds = Path(tmp) / "gate.json"
            creds.write_text(json.dumps({"user": USER, "password_sha256": hash_password(PASSWORD)}))
            guard = {"max_failures": 1000, "window_ms": 60000, "block_seconds": 0,
                     "statuses": [401, 403], "failure_text": "unauthorized user"}
            policies = {
                "auth_gate": {"auth": True},
                "api_filter": {"allow": ["GET *", "PUT /api/*/lights/*/state"]},
                "filter_guard": {"allow": ["GET *", "PUT /api/*/lights/*/state"], "token_guard": guard},
            }
            ports = {"direct": device_port}
            for name, policy in policies.items():
                directory = Path(tmp) / name
                directory.mkdir()
                (directory / "127.0.0.1.json").write_text(json.dumps({"port": device_port, **policy}))
                ports[name] = free_port()
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "appliance.dataplane.gate", "--listen", f"127.0.0.1:{ports[name]}",
                     "--target-override", f"127.0.0.1:{device_port}", "--policy-dir", str(directory),
                     "--credentials-file", str(creds), "--log-level", "WARNING"], cwd=ROOT))
            directory = Path(tmp) / "decoy"
            directory.mkdir()
            (directory / "127.0.0.1.json").write_text(json.dumps({"decoy": {"type": "light"}}))
            ports["decoy"] = free_port()
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "appliance.dataplane.gate", "--listen", f"127.0.0.1:{free_port()}",
                 "--target-override", f"127.0.0.1:{device_port}", "--policy-dir", str(directory),
                 "--decoy-http-port", str(ports["decoy"]), "--log-level", "WARNING"], cwd=ROOT))
            for port in ports.values():
                wait_port(port)
            auth = {"Authorization": "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()}
            conns = {name: http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                     for name, port in ports.items()}

            def one(name: str) -> float:
                t0 = time.perf_counter()
                conns[name].request("GET", "/api/bench/lights", headers=auth if name == "auth_gate" else {})
                r = conns[name].getresponse()
                r.read()
                assert r.status == 200, (name, r.status)
                return (time.perf_counter() - t0) * 1000

            for name in ports:      # warm-up (and the admin check remembered)
                for _ in range(20):
                    one(name)
            samples: dict[str, list[float]] = {name: [] for name in ports}
            medians: dict[str, list[float]] = {name: [] for name in ports}
            for _ in range(ROUNDS):
                for name in ports:
                    xs = [one(name) for _ in range(PER_ROUND)]
                    samples[name] += xs
                    medians[name].append(median(xs))
            load = round(os.getloadavg()[0], 2)
            for name, xs in samples.items():
                emit(BENCH, f"{name}_p50", round(median(xs), 3), "ms", n=len(xs), load=load)
                emit(BENCH, f"{name}_p99", round(percentile(xs, 99), 3), "ms", n=len(xs), load=load)
                if name != "direct":
                    added = [m - d for m, d in zip(medians[name], medians["direct"])]
                    emit(BENCH, f"{name}_added_p50", round(median(added), 3), "ms", n=ROUNDS, load=load,
                         what="median of per-round (case median - direct median)")
            for c in conns.values():
                c.close()
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                try:
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    p.kill()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
