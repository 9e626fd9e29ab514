"""Mosquitto, configured by the project: no anonymous clients, one password per device,
an ACL that lets a device speak only under its own topic and Home Assistant's user alone set a
posture, and (the denials plugin) client ids that a device cannot borrow from another device or
from the supervisor.

    broker = Broker(Path("/run/kalki/mqtt"), port=1883, users={"kalki": pw, "light1": pw1})
    with broker:
        broker.add_user("plug2", random_password())   # no restart: SIGHUP re-reads the files

    # the password of one user of a broker started by someone else (kalki-mosquitto.service)
    set_password(Path("/var/lib/kalki/mqtt"), "homeassistant", pw, ("127.0.0.1", 1883))
"""
from __future__ import annotations

import base64
import getpass
import hashlib
import os
import secrets
import shutil
import signal
import socket
import string
import subprocess
import threading
import time
from pathlib import Path

from appliance import HOME, netns
from appliance.errors import ConfigError, KalkiError
from appliance.vocab import check_device_name, check_discovery_prefix

MOSQUITTO = "/usr/sbin/mosquitto"
MAX_PACKET_SIZE = 65536  # the broker drops the connection of a client sending more
PBKDF2_ITERATIONS = 101  # what mosquitto_passwd 2.x writes by default
RESERVED_NAMES = {"bridge"}  # <base>/bridge/... belongs to the supervisor

# MQTT 3.1.1 CONNECT, clean session, empty client id, no credentials.
ANONYMOUS_CONNECT = bytes.fromhex("100c00044d5154540402003c0000")

CONF = "mosquitto.conf"
PASSWORDS = "passwords"
ACL = "acl"
LOG = "mosquitto.log"
OUTPUT = "mosquitto.out"  # stderr: errors from before the log file is opened
# The plugin that refuses and counts a device's publishes outside its own topics and connections
# with another user's client id (mosquitto/kalki_denials.c), built by scripts/setup.sh, and for
# the SD-card image by image/stages/30-appliance.sh.
DENIALS_PLUGIN = HOME / "build" / "kalki_denials.so"


PASSWORD_ALPHABET = string.ascii_letters + string.digits


def random_password() -> str:
    # Letters and digits only: a password that begins with '-' reads as an option to argparse,
    # mosquitto_pub -P and every other command line a technician or a script passes it to.
    return "".join(secrets.choice(PASSWORD_ALPHABET) for _ in range(32))


def check_name(name: str, what: str = "device name") -> str:
    """Names become topic levels and ACL %u substitutions (vocab.DEVICE_NAME)."""
    return check_device_name(name, what)


def hash_password(password: str) -> str:
    """Mosquitto 2.x's PBKDF2-SHA512 format, the same as `mosquitto_passwd -b` writes."""
    if not password or "\n" in password:
        raise ConfigError("a broker password must be non-empty and one line")
    salt = secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, PBKDF2_ITERATIONS, 64)
    return f"$7${PBKDF2_ITERATIONS}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


class BrokerFilesError(ConfigError):
    """A file of the broker's (mqtt.broker_directory) cannot be read or written; the message
    names it."""


def _write(path: Path, text: str, mode: int = 0o600, owner: tuple[int, int] | None = None) -> None:
    # The broker may re-read these on SIGHUP at any moment: never let it see half a file, nor
    # (after a power cut) an empty one. Private from its creation: a password file's hashes
    # are never readable by others, not even for an instant.
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        os.fchmod(fd, mode)      # a leftover temp file keeps its old mode; the umask narrows a new one
        if owner is not None:
            os.fchown(fd, *owner)
        f.write(text)
        f.flush()
        os.fsync(fd)
    os.replace(tmp, path)


def write_config(directory: Path, listen: str = "127.0.0.1", port: int = 1883,
                 users: dict[str, str] | None = None, supervisor_user: str = "kalki",
                 base: str = "kalki", run_as: str | None = None,
                 denials_plugin: Path | None = DENIALS_PLUGIN,
                 home_assistant_user: str | None = None,
                 discovery_prefix: str = "homeassistant") -> Path:
    """Write mosquitto.conf, the password file and the ACL into directory; returns the conf.

    users maps user name to password: the supervisor_user may read and write everything,
    the home_assistant_user (if any) reads the discovery configs under discovery_prefix and
    the supervisor's topics and alone may set postures, every other user is a device. run_as
    is the account mosquitto drops to when started as root; by default the current one, which
    can read the files written here. The denials plugin is loaded when it is there: without
    it the broker refuses the same publishes, and nobody counts them, but any user may
    connect with any client id, and so disconnect whoever holds that id (the supervisor
    included).
    """
    directory = Path(directory)
    users = dict(users or {})
    check_name(supervisor_user, "supervisor user")
    check_name(base, "topic base")
    check_discovery_prefix(discovery_prefix, base, "discovery prefix")
    if home_assistant_user:
        check_name(home_assistant_user, "Home Assistant user")
        if home_assistant_user in (supervisor_user, *RESERVED_NAMES):
            raise ConfigError(f"Home Assistant user {home_assistant_user!r} is the supervisor's")
    for name in users:
        check_name(name, "broker user")
        if name in RESERVED_NAMES:
            raise ConfigError(f"broker user {name!r} is reserved for the supervisor's topics")
    if not 0 < port < 65536:
        raise ConfigError(f"broker port {port} is out of range")
    run_as = run_as or getpass.getuser()
    directory.mkdir(parents=True, exist_ok=True)

    lines = [f"{u}:{hash_password(p)}\n" for u, p in users.items()]
    if home_assistant_user and home_assistant_user not in users:
        # Its password is set on the appliance (set_password), and known only as this hash:
        # rewriting the file for a device must not log Home Assistant out.
        kept = _user_line(directory / PASSWORDS, home_assistant_user)
        lines += [kept] if kept else []
    _write(directory / PASSWORDS, "".join(lines))
    # Patterns apply to every user; %u is the authenticated user name, so a device can only
    # publish under its own topic and only read its own commands.
    _write(directory / ACL, "\n".join([
        f"user {supervisor_user}",
        "topic readwrite #",
        "",
        # MQTT does not tell a subscriber who published, so this is what makes a posture command
        # Home Assistant's: no one else may write <base>/<device>/posture/set. <prefix>/status
        # is its birth and last will, which the supervisor answers with the discovery configs.
        *([f"user {home_assistant_user}",
           f"topic read {discovery_prefix}/#",
           f"topic write {discovery_prefix}/status",
           f"topic read {base}/+/posture",
           f"topic write {base}/+/posture/set",
           f"topic read {base}/+/alert",
           f"topic read {base}/bridge/state",
           f"topic read {base}/bridge/event",
           ""] if home_assistant_user else []),
        f"pattern write {base}/%u",
        f"pattern write {base}/%u/availability",
        f"pattern read {base}/%u/set",
        f"pattern read {base}/bridge/state",
        "",
    ]))
    conf = directory / CONF
    _write(conf, "\n".join([
        "per_listener_settings false",
        "allow_anonymous false",
        "persistence false",
        f"user {run_as}",
        f"listener {port} {listen}",
        f"password_file {directory / PASSWORDS}",
        f"acl_file {directory / ACL}",
        f"max_packet_size {MAX_PACKET_SIZE}",
        # The id the broker gives a client that sends none, and the one the denials plugin lets
        # anyone use: said here, as Mosquitto 2.0.11 forgets its default at a reload.
        "auto_id_prefix auto-",
        f"log_dest file {directory / LOG}",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "log_type information",  # includes "Reloading config.", which reload() waits for
        "log_timestamp_format %Y-%m-%dT%H:%M:%S",
        # The plugin reads the password file for the user names that own client ids, and to
        # count a refused client id only when its password was right.
        *([f"plugin {denials_plugin}", f"plugin_opt_base {base}",
           f"plugin_opt_supervisor {supervisor_user}",
           *([f"plugin_opt_home_assistant {home_assistant_user}"] if home_assistant_user else []),
           f"plugin_opt_passwords {directory / PASSWORDS}"]
          if denials_plugin and Path(denials_plugin).is_file() else []),
        "",
    ]), 0o644)
    if os.geteuid() == 0 and run_as != getpass.getuser():
        for path in (directory, directory / PASSWORDS, directory / ACL):
            shutil.chown(path, user=run_as)
    return conf


def _user_line(path: Path, user: str) -> str | None:
    """user's "name:hash" line of a password file, newline included; None if it has none."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as e:        # unreadable: the page says which file, it does not fail
        raise BrokerFilesError(f"{path}: cannot read the broker's passwords: {e.strerror}") from e
    return next((line for line in text.splitlines(keepends=True)
                 if line.split(":", 1)[0] == user and ":" in line), None)


def mosquitto_hash_matches(password: str, hashed: str) -> bool:
    """Whether password is the one hashed (hash_password's format, mosquitto_passwd's "$7$")."""
    try:
        kind, iterations, salt, digest = hashed.strip().split("$")[1:]
        if kind != "7":
            return False
        got = hashlib.pbkdf2_hmac("sha512", password.encode(), base64.b64decode(salt),
                                  int(iterations), len(base64.b64decode(digest)))
    except ValueError:
        return False
    return secrets.compare_digest(got, base64.b64decode(digest))


def password_is_set(directory: Path, user: str) -> bool:
    return _user_line(Path(directory) / PASSWORDS, user) is not None


_PASSWORDS_LOCK = threading.Lock()     # one read-modify-write of the password file at a time


def _replace_line(path: Path, user: str, line: str | None) -> str | None:
    """Puts line (None: nothing) in place of user's line, every other line as it was, the file
    owned and private as before (the broker re-reads it as the user it dropped to); returns
    user's line before."""
    try:
        st = path.stat()
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no broker password file there (mqtt.broker_directory names "
                          "the directory appliance/system/broker.py writes Mosquitto's files "
                          "into)") from None
    except OSError as e:
        raise BrokerFilesError(f"{path}: cannot read the broker's password file: "
                               f"{e.strerror or e}") from None
    before = _user_line(path, user)
    kept = [x for x in text.splitlines(keepends=True) if x.split(":", 1)[0] != user or ":" not in x]
    if kept and not kept[-1].endswith("\n"):
        kept[-1] += "\n"
    try:
        _write(path, "".join(kept) + (line or ""), 0o600,
               (st.st_uid, st.st_gid) if os.geteuid() == 0 else None)
    except OSError as e:        # a read-only file system, a directory it may not write
        raise BrokerFilesError(f"{path}: cannot write the broker's password file: "
                               f"{e.strerror or e}") from None
    return before


def set_password(directory: Path, user: str, password: str, reach: tuple[str, int],
                 namespace: str | None = None, timeout: float = 5.0) -> bool:
    """Gives user this password in the broker's password file (the hash only) and has the
    running broker read it: from then on the old password is refused, and a client still
    connected with it is disconnected (Mosquitto checks every session again at a reload).
    Every other user's line is left as it is, and nobody else is disconnected. reach is where
    the broker answers (for reload_running). True if a running broker re-read the file; False
    if none runs (it reads the file when it starts). If the broker does not reload, the old
    line is put back and the KalkiError says so."""
    check_name(user, "broker user")
    directory = Path(directory)
    line = f"{user}:{hash_password(password)}\n"
    with _PASSWORDS_LOCK:
        before = _replace_line(directory / PASSWORDS, user, line)
        try:
            return reload_running(directory, reach, namespace, timeout)
        except (KalkiError, OSError) as e:
            try:
                _replace_line(directory / PASSWORDS, user, before)
            except BrokerFilesError as undone:
                raise BrokerFilesError(f"the broker did not take the new password ({e}), and "
                                       f"the old one could not be put back ({undone})") from None
            # The signal may have arrived and only the wait failed: a broker that read the new
            # line would keep it until its next reload, against what is said here.
            _hang_up(directory)
            raise KalkiError(f"the broker did not take the new password ({e}); it keeps the "
                             "old one") from None


def running_pid(conf: Path) -> int | None:
    """The pid of the mosquitto running from conf (`mosquitto -c conf`, as kalki-mosquitto.service,
    the lab and Broker start it), found in /proc; None if there is none."""
    conf = Path(conf).resolve()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            if not argv or Path(os.fsdecode(argv[0])).name != "mosquitto" or b"-c" not in argv:
                continue
            given = Path(os.fsdecode(argv[argv.index(b"-c") + 1]))
            if not given.is_absolute():
                given = (entry / "cwd").resolve() / given
            if given.resolve() == conf:
                return int(entry.name)
        except (OSError, IndexError):
            continue     # gone, or not ours to read
    return None


def _hang_up(directory: Path) -> None:
    """SIGHUP to the mosquitto running from directory's conf, if any, not waited for."""
    pid = running_pid(directory / CONF)
    if pid is not None:
        try:
            os.kill(pid, signal.SIGHUP)
        except OSError:
            pass     # gone: it reads the file when it starts again


def reload_running(directory: Path, reach: tuple[str, int], namespace: str | None = None,
                   timeout: float = 5.0) -> bool:
    """SIGHUP to the mosquitto running from directory's conf, waiting until it has re-read its
    files; False if none runs."""
    directory = Path(directory)
    pid = running_pid(directory / CONF)
    if pid is None:
        return False
    _signal_and_wait(lambda: os.kill(pid, signal.SIGHUP), directory / LOG, reach, namespace, timeout)
    return True


def _signal_and_wait(hup, log: Path, reach: tuple[str, int], namespace: str | None,
                     timeout: float) -> None:
    offset = log.stat().st_size  # the log only grows; read just what the reload adds
    hup()
    deadline = time.monotonic() + timeout
    while b"Reloading config" not in _read_from(log, offset):
        if time.monotonic() > deadline:
            raise KalkiError(f"mosquitto on port {reach[1]} did not reload within {timeout:g}s")
        time.sleep(0.05)
    # The line is logged just before the files are re-read; mosquitto is single-threaded,
    # so once it answers a connection the reload is complete.
    with netns.entered(namespace), socket.create_connection(reach, 5) as s:
        s.sendall(ANONYMOUS_CONNECT)
        s.settimeout(5)
        s.recv(4)  # CONNACK (refused: anonymous)


def listeners(directory: Path) -> list[dict]:
    """The listeners of directory's mosquitto.conf: [{"address", "port", "tls"}] ("address" ""
    for every address); [] if there is no conf."""
    try:
        text = (Path(directory) / CONF).read_text()
    except OSError:
        return []
    found: list[dict] = []
    for line in text.splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] == "listener" and words[1].isdigit():
            address = words[2] if len(words) > 2 else ""
            found.append({"address": "" if address in ("0.0.0.0", "::") else address,
                          "port": int(words[1]), "tls": False})
        elif found and words and words[0] in ("certfile", "psk_hint"):
            found[-1]["tls"] = True     # a listener's settings follow its line
    return found


class BrokerFiles:
    """The files of a broker someone else runs from directory (kalki-mosquitto.service on the
    image, the lab's): what the supervisor may do with them, handed to it by appliance.run.
    reach is where the broker answers the supervisor."""

    def __init__(self, directory: Path, reach: tuple[str, int], namespace: str | None = None):
        self.directory = Path(directory)
        self.reach = reach
        self.namespace = namespace

    def listeners(self) -> list[dict]:
        return listeners(self.directory)

    def password_is_set(self, user: str) -> bool:
        return password_is_set(self.directory, user)

    def new_password(self, user: str) -> tuple[str, bool]:
        """A new random password for user, in force (set_password); (it, whether a running
        broker re-read the file)."""
        password = random_password()
        return password, set_password(self.directory, user, password, self.reach, self.namespace)


def _read_from(path: Path, offset: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read()


class Broker:
    """One mosquitto process and the files it runs from."""

    def __init__(self, directory: Path, listen: str = "127.0.0.1", port: int = 1883,
                 users: dict[str, str] | None = None, supervisor_user: str = "kalki",
                 base: str = "kalki", run_as: str | None = None, binary: str = MOSQUITTO,
                 denials_plugin: Path | None = DENIALS_PLUGIN,
                 home_assistant_user: str | None = None, discovery_prefix: str = "homeassistant"):
        self.directory = Path(directory)
        self.listen = listen
        self.port = port
        self.users = dict(users or {})
        self.supervisor_user = supervisor_user
        self.base = base
        self.run_as = run_as
        self.binary = binary
        self.denials_plugin = denials_plugin
        self.home_assistant_user = home_assistant_user
        self.discovery_prefix = discovery_prefix
        self.namespace: str | None = None
        self._process: subprocess.Popen | None = None
        self.conf = self._write()

    def _write(self) -> Path:
        return write_config(self.directory, self.listen, self.port, self.users,
                            self.supervisor_user, self.base, self.run_as, self.denials_plugin,
                            self.home_assistant_user, self.discovery_prefix)

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def _started(self) -> subprocess.Popen:
        """The mosquitto process, which start() makes."""
        if self._process is None:
            raise KalkiError(f"mosquitto on port {self.port} is not started")
        return self._process

    def start(self, namespace: str | None = None, timeout: float = 10.0) -> Broker:
        if self.running:
            raise KalkiError(f"mosquitto on port {self.port} is already running (pid {self.pid})")
        self.namespace = namespace
        if self._accepts_connections():
            # Otherwise we would take someone else's listener for ours.
            raise KalkiError(f"port {self.port} on {self._connect_host()} is already in use")
        command = [self.binary, "-c", str(self.conf)]
        if namespace:
            # nsenter execs mosquitto in place, so the pid we hold is the broker's own.
            command = ["nsenter", f"--net={netns.path(namespace)}", *command]
        with open(self.directory / OUTPUT, "ab") as output:
            self._process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=output,
                                             stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self._wait_listening(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _connect_host(self) -> str:
        return "127.0.0.1" if self.listen in ("0.0.0.0", "") else self.listen

    def _accepts_connections(self) -> bool:
        try:
            with netns.entered(self.namespace), socket.create_connection(
                    (self._connect_host(), self.port), 0.5):
                return True
        except OSError:
            return False

    def _wait_listening(self, timeout: float) -> None:
        host = self._connect_host()
        deadline = time.monotonic() + timeout
        process = self._started()
        while True:
            if process.poll() is not None:
                raise KalkiError(f"mosquitto exited with status {process.returncode} "
                                 f"before listening on {host}:{self.port}:\n{self.log_tail()}")
            if self._accepts_connections():
                return
            if time.monotonic() > deadline:
                raise KalkiError(f"mosquitto is not listening on {host}:{self.port} after "
                                 f"{timeout:g}s:\n{self.log_tail()}")
            time.sleep(0.05)

    def log_tail(self, lines: int = 20) -> str:
        tail = []
        for name in (OUTPUT, LOG):
            try:
                tail += (self.directory / name).read_text(errors="replace").splitlines()[-lines:]
            except FileNotFoundError:
                pass
        return "\n".join(tail) or "(no broker output)"

    def stop(self, timeout: float = 5.0) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def reload(self, timeout: float = 5.0) -> None:
        """SIGHUP: mosquitto re-reads the password and ACL files; waits until it has."""
        if not self.running:
            return  # the files are read at the next start anyway
        try:
            _signal_and_wait(lambda: self._started().send_signal(signal.SIGHUP),
                             self.directory / LOG, (self._connect_host(), self.port),
                             self.namespace, timeout)
        except KalkiError as e:
            raise KalkiError(f"{e}:\n{self.log_tail()}") from None

    def add_user(self, name: str, password: str) -> None:
        check_name(name, "broker user")
        self.users[name] = password
        self._write()
        self.reload()

    def remove_user(self, name: str) -> None:
        if self.users.pop(name, None) is None:
            return
        self._write()
        self.reload()

    def __enter__(self) -> Broker:
        if not self.running:
            self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
