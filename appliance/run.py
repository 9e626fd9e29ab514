"""`kalki run`: the composition root. Every component is built here and handed in, and every
callback is wired here: telemetry (MQTT, adapters, the neighbour table, kernel events) reports
up to the supervisor, and the faces (web page, panel, control socket) get the ops.

Nothing else builds components, so this file is the map of the running appliance.
"""
from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from appliance.config import Config, load
from appliance.dataplane.api import Dataplane, GatewaySettings
from appliance.dataplane.port import DataplanePort
from appliance.dataplane.umbox import check_controllers, check_my_controllers
from appliance.supervisor import control
from appliance.supervisor.core import Supervisor
from appliance.supervisor.memory import Collector, one_malloc_arena
from appliance.supervisor.ops import Ops
from appliance.system.broker import BrokerFiles
from appliance.system.site import ERROR_FILE, isolation_warning_now
from appliance.telemetry import kernel
from appliance.telemetry.neighbours import NeighbourMonitor
from appliance.telemetry.stations import BridgeWatch, CloneDetector, HostapdWatch

log = logging.getLogger("kalki.run")
SWITCH_INTERVAL_S = 0.0005


def open_dataplane(cfg: Config) -> Dataplane:
    g = cfg.gateway
    settings = GatewaySettings(devices_if=g.devices_interface, uplink_if=g.uplink_interface,
                               gateway_ip=g.address, lan=g.lan, gate_port=g.gate_port,
                               gate_policy_dir=g.gate_policy_dir,
                               mqtt_port=cfg.mqtt.port, name_grace_s=cfg.names.grace_seconds,
                               name_keep_s=cfg.names.keep_seconds,
                               controllers=check_controllers(cfg.controllers, "config: controllers"),
                               my_controllers=check_my_controllers(cfg.my_controllers,
                                                                   "config: my_controllers"))
    return Dataplane.open(g.instance, g.namespace or None, settings)


def read_kernel_events(sup: Supervisor, dp: DataplanePort) -> None:
    """Kernel events are given back to the ring only once acted on (enforced, recorded): a
    supervisor killed between reading an attack and acting on it reads it again after its
    restart."""
    try:
        sup.on_kernel_alerts(kernel.alerts(dp.events(limit=512, consume=False), sup.device_ip))
    finally:
        dp.consume_events()


def kernel_first(sup: Supervisor, dp: DataplanePort) -> Callable[[], None]:
    """Supervisor.kernel_first: kernel events waiting in the ring acted on at once. The ring's
    own reader runs only after the callbacks queued on the loop before it woke: at 1,000
    devices reporting once a second, reports queue, and the ticker's steps run as one
    callback (bench_supervisor's kernel_1000_*)."""
    reading = False

    def check() -> None:
        nonlocal reading
        if reading or not dp.events_pending():
            return
        reading = True
        try:
            read_kernel_events(sup, dp)
        except Exception:      # noqa: BLE001 -- the ticker and the report asking go on; the
            # ring's own reader (add_reader) meets the same events and the same error, and says it
            log.exception("kernel events: reading them before other work failed")
        finally:
            reading = False
    return check


def start_resolver(cfg: Config, dp: DataplanePort):
    """The devices' port 53, in front of dnsmasq (appliance.dataplane.resolver); None if off."""
    if not cfg.names.resolver:
        return None
    from appliance.dataplane.resolver import Resolver
    # Until it listens, devices resolve nothing and open no name's address: closed, not open.
    return Resolver(cfg.gateway.address, ("127.0.0.1", cfg.names.upstream_port), dp.answer,
                    namespace=cfg.gateway.namespace or None).start_when_possible()


def connect_mqtt(cfg: Config, sup: Supervisor, ops: Ops, loop: asyncio.AbstractEventLoop):
    m = cfg.mqtt
    try:
        password = Path(m.password_file).read_text().strip()
    except OSError as e:
        log.warning("MQTT off: cannot read %s: %s", m.password_file, e)
        return None
    from appliance.telemetry.mqtt import Bus
    return Bus(m.host, m.port, m.user, password, m.base,
               known_device=lambda level: sup.device_for_topic(level) is not None,
               on_telemetry=sup.on_telemetry, on_availability=sup.on_availability,
               on_denied=sup.on_denied, on_client_id_denied=sup.on_client_id_denied, loop=loop,
               max_payload=m.max_payload,
               on_connected=lambda: _later(loop, sup.republish),
               # these two come through the loop already (the bus hands them over)
               on_posture_command=ops.home_assistant_posture,
               on_home_assistant_online=sup.republish, discovery_prefix=m.discovery_prefix)


def _later(loop: asyncio.AbstractEventLoop, fn) -> None:
    """Runs fn on the loop: for callbacks from other threads (paho's, gpiozero's)."""
    loop.call_soon_threadsafe(fn)


def start_adapter(cfg: Config, sup: Supervisor, loop: asyncio.AbstractEventLoop):
    from appliance.telemetry.adapters import HueAdapter, load_credentials
    credentials = load_credentials(cfg.adapters.credentials_file)
    if not credentials:
        return None

    def report(name: str, payload: dict) -> None:
        if sup.bus:     # the same topic an MQTT device would use; the bus hands it back
            sup.bus.publish_telemetry(name, payload)
        else:
            sup.on_telemetry(name, payload)

    adapter = HueAdapter(credentials, devices=lambda: sup.known, profile=sup.profiles.get,
                         on_report=report, on_availability=sup.on_availability, loop=loop)
    adapter.start()
    return adapter


async def start_control(cfg: Config, ops: Ops) -> asyncio.AbstractServer:
    path = Path(cfg.control.socket)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        path.unlink()
    old = os.umask(0o077)     # root-only: the socket can change postures
    try:
        return await asyncio.start_unix_server(lambda r, w: control.serve_client(ops, r, w), path=str(path))
    finally:
        os.umask(old)


async def serve(cfg: Config) -> None:
    loop = asyncio.get_running_loop()
    sup = Supervisor(cfg)
    sup.broker_files = BrokerFiles(Path(cfg.mqtt.broker_directory), (cfg.mqtt.host, cfg.mqtt.port))
    sup.site_error = read_site_error()
    sup.isolation_warning = read_isolation_warning()
    ops = Ops(sup)
    # Notifications say an alert in the page's words; a channel's failure comes back to the loop.
    sup.notifier.explain = lambda alert: ops.alert_event(alert)["explanation"]
    sup.notifier.loop = loop
    stop = asyncio.Event()
    neighbours = web = control_server = resolver = None
    stations: list = []
    try:
        if await asyncio.to_thread(missing_interfaces, cfg):
            # Nothing to attach XDP to yet: the boot firewall keeps the devices side closed,
            # and the command, the page and the LEDs say why while we wait for it.
            control_server = await start_control(cfg, ops)
            web = await start_faces(cfg, sup, ops)
            await wait_for_interfaces(cfg, sup)
            sup.isolation_warning = read_isolation_warning()    # its driver is known now
        sup.attach(open_dataplane(cfg), loop)
        dp = sup.dp
        resolver = start_resolver(cfg, dp)
        loop.add_reader(dp.events_fileno(), lambda: read_kernel_events(sup, dp))
        sup.kernel_first = kernel_first(sup, dp)
        sup.attach_bus(connect_mqtt(cfg, sup, ops, loop))
        if control_server is None:
            control_server = await start_control(cfg, ops)
        neighbours = NeighbourMonitor(cfg.gateway.devices_interface, cfg.gateway.lan, sup.discovered, loop,
                                      counters=sup.counters)
        neighbours.start()
        stations = start_stations(cfg, sup)
        sup.adapter = start_adapter(cfg, sup, loop)
        if sup.adapter:
            sup.restore_polls()
        if web is None and sup.panel is None:
            web = await start_faces(cfg, sup, ops)
        # What start-up made (modules, profiles, rules, the store) lives as long as the
        # process: out of the collector's sight, as what survives each full pass is after it
        # (memory.Collector). And the collector runs from the ticker, between events, never
        # whenever an allocation count trips it: collections in the middle of moving 25
        # cameras put milliseconds on the slowest decisions.
        sup.collector = Collector(freezing=True)
        # The state file is written behind the loop (a crash before the write leaves the
        # kernel stricter than the file, and the restart keeps the kernel's posture).
        sup.store.write_behind()
        sup.start_ticker()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        gc.collect()
        gc.freeze()
        gc.disable()
        print(f"kalki: protection enforced for {sup.enforced_count()} devices "
              f"(resident memory {_resident_mb()})", flush=True)
        await stop.wait()
    finally:
        if resolver:
            resolver.close()
        if web:
            await web.cleanup()
        if neighbours:
            neighbours.close()
        for watch in stations:
            watch.close()
        if control_server:
            control_server.close()
        if sup.attached:
            loop.remove_reader(sup.dp.events_fileno())
        sup.close()


def start_stations(cfg: Config, sup: Supervisor) -> list:
    """What the hardware below the gateway says about where devices are (clones)."""
    st = cfg.stations
    detector = CloneDetector(st.window_seconds)
    watches: list = []
    if st.bridge:
        bridge = BridgeWatch(st.bridge, st.bridge_namespace, detector, sup.on_clone, st.cut_clone_port)
        bridge.start()
        watches.append(bridge)
    if st.hostapd_control:
        hostapd = HostapdWatch(st.hostapd_control, detector, sup.on_clone,
                               os.path.dirname(cfg.control.socket))
        try:
            hostapd.start()
            watches.append(hostapd)
        except OSError as e:
            log.warning("no station events from hostapd: %s", e)
    return watches


async def start_faces(cfg: Config, sup: Supervisor, ops: Ops):
    """The web page (returned, for its clean-up) and the LED panel, as configured."""
    web = None
    if cfg.web.enabled:
        from appliance.faces.web import start_web
        web = await start_web(ops)
    if cfg.panel.enabled:
        from appliance.faces.panel import Panel
        sup.panel = Panel(ops)
    return web


RTMGRP_LINK = 1


def missing_interfaces(cfg: Config) -> list[str]:
    """The configured interfaces the gateway's namespace does not have (yet). (By name, with
    the socket module: importing pyroute2 would cost the supervisor 7-20 MB.)"""
    import socket

    from appliance import netns
    missing = []
    with netns.entered(cfg.gateway.namespace or None):
        for name in (cfg.gateway.devices_interface, cfg.gateway.uplink_interface):
            try:
                socket.if_nametoindex(name)
            except OSError:
                missing.append(name)
    return missing


def interface_fault(missing: list[str], cfg: Config) -> str:
    key = {cfg.gateway.devices_interface: "gateway.devices_interface",
           cfg.gateway.uplink_interface: "gateway.uplink_interface"}
    return "; ".join(f"{'devices' if key[n].endswith('devices_interface') else 'uplink'} interface "
                     f"{n} missing: plug in the adapter or fix kalki.toml ({key[n]})" for n in missing)


async def wait_for_interfaces(cfg: Config, sup: Supervisor) -> None:
    """Waits, on netlink's link events, until every configured interface exists; meanwhile
    the fault is the supervisor's site error (the page's banner, the LEDs' site-error).
    The wait is a thread's, so the loop stays free."""
    before = sup.site_error

    def wait() -> None:
        import select
        import socket

        from appliance import netns
        with netns.entered(cfg.gateway.namespace or None):
            # rtnetlink's link group: an interface added or renamed wakes us at once
            events = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        try:
            events.bind((0, RTMGRP_LINK))
            while missing := missing_interfaces(cfg):
                sup.site_error = interface_fault(missing, cfg)
                if select.select([events], [], [], 1.0)[0]:
                    events.recv(65536)
        finally:
            events.close()
    sup.site_error = interface_fault(await asyncio.to_thread(missing_interfaces, cfg), cfg)
    log.error("%s; waiting for it", sup.site_error)
    await asyncio.to_thread(wait)
    sup.site_error = before
    log.warning("the configured interfaces are there now: loading the data path")


def read_site_error() -> str | None:
    """What the image's site-apply found wrong in kalki.toml on the SD card, if anything."""
    try:
        return ERROR_FILE.read_text().strip() or None
    except OSError:
        return None


def read_isolation_warning() -> str | None:
    """Whether devices on the devices side may reach each other without crossing the data path
    (the site file's network.isolation and the devices interface's driver)."""
    warning = isolation_warning_now()
    if warning:
        log.warning("%s", warning)
    return warning


def _resident_mb() -> str:
    """VmRSS, for the start-up line that the serial console and the image's boot test show."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return f"{int(line.split()[1]) / 1024:.1f} MB"
    except (OSError, ValueError, IndexError):
        pass
    return "unknown"


def main(config_path: str) -> int:
    one_malloc_arena()      # before any thread: see memory.py
    # Each system call of an enforcement (a map update, nftables, a file) lets the GIL go, and
    # a worker that takes it meanwhile (the tamper watch, the logs' flush, paho's thread) kept
    # it for up to the default 5 ms before the loop had it back. bench_supervisor's
    # kernel_1000_enforce_p99: 2.4 ms with 5 ms, 1.4 and 1.7 ms with 0.5 ms.
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    cfg = load(config_path)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    asyncio.run(serve(cfg))
    return 0
