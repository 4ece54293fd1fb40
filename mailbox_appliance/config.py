"""Configuration: one TOML file loaded into frozen dataclasses.

Every problem is reported as a single :class:`ConfigError` whose message names
the file, the key and what was expected, so that start-up and
``mailappliance check-config`` can print one clear line instead of a traceback.
Relative paths are resolved against the folder holding the file.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import tomllib
import typing
from dataclasses import dataclass, field

from twisted.internet import endpoints


class ConfigError(Exception):
    """A configuration problem, phrased for the administrator in one line."""

    def __str__(self):
        # Messages quote values and library errors that may hold line breaks;
        # the contract is one line, so they are folded here once for everyone.
        return " ".join(super().__str__().splitlines())


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text):
    """Seconds in ``"90"``, ``"90s"``, ``"5m"``, ``"4h"``, ``"5d"``, ``"1w"``, ``"0.2s"``.

    An int when the figure is whole, else a float.
    """
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    m = _DURATION.match(str(text))
    if not m:
        raise ValueError(text)
    figure = float(m.group(1)) * _UNITS[m.group(2)]
    return int(figure) if figure == int(figure) else figure


@dataclass(frozen=True)
class ServerConfig:
    """The ``[server]`` section: who we are and what we accept."""

    hostname: str = "mail.example.test"
    domains: tuple = ("example.test",)
    data_dir: str = "var"
    relay_networks: tuple = ()
    # Clients here may send passwords without TLS (IMAP LOGIN, POP3 USER/PASS);
    # default none. Dovecot counts same-host connections as secure; list
    # "127.0.0.0/8" (and "::1/128") for the same.
    plaintext_auth_networks: tuple = ()
    max_message_size: int = 26214400


@dataclass(frozen=True)
class ListenConfig:
    """The ``[listen]`` section: Twisted endpoint strings, ``""`` turns one off."""

    smtp: str = "tcp:2525:interface=127.0.0.1"
    submission: str = ""
    submissions: str = ""
    lmtp: str = ""
    imap: str = ""
    imaps: str = ""
    pop3: str = ""
    pop3s: str = ""


@dataclass(frozen=True)
class TLSConfig:
    """The ``[tls]`` section: a PEM pair, or empty for a generated self-signed one."""

    certificate: str = ""
    key: str = ""


@dataclass(frozen=True)
class DirectoryConfig:
    """The ``[directory]`` section: embedded LDIF or an external LDAP server."""

    ldif: str = ""
    url: str = ""
    bind_dn: str = ""
    bind_password: str = ""
    base_dn: str = "dc=example,dc=test"
    cache_ttl: int = 60
    timeout: int = 10
    max_alias_depth: int = 8


@dataclass(frozen=True)
class DNSConfig:
    """The ``[dns]`` section."""

    servers: tuple = ()
    timeout: int = 10               # seconds for one query, all retries included


@dataclass(frozen=True)
class DeliveryConfig:
    """The ``[delivery]`` section: outbound and retry behaviour."""

    smtp_port: int = 25
    smarthost: str = ""
    # AUTH to the smarthost; credentials are only ever sent inside TLS.
    smarthost_user: str = ""
    smarthost_password: str = ""
    retry_schedule: tuple = ("1m", "5m", "15m", "30m", "1h", "2h", "4h")
    warn_after: str = "4h"
    max_age: str = "5d"
    # Outbound TLS per destination domain (or the smarthost's host name):
    # "may" (opportunistic, the default), "encrypt" (TLS required, any
    # certificate), "verify" (TLS with a certificate valid for the name),
    # "none" (never STARTTLS).
    tls_policy: dict = field(default_factory=dict)
    # A bundle of CA certificates for "verify"; empty: the system's.
    tls_ca_file: str = ""
    max_connections: int = 50           # outbound SMTP connections in total
    max_per_domain: int = 10            # ... to one destination domain
    connect_timeout: int = 30
    command_timeout: int = 300          # RFC 5321 4.5.3.2: 5 minutes per reply
    data_timeout: int = 600             # the reply to the final dot: 10 minutes
    connection_idle: int = 5            # an idle reusable connection is kept this long
    connection_max_messages: int = 100  # messages over one connection, then a new one
    # A destination whose every host refused or timed out is not tried again
    # (its mail is deferred at once) for this long.
    dead_destination_time: str = "60s"
    # Delivery attempts in flight: fresh mail and retries have their own
    # slots, so a backlog of deferred mail never holds up new mail.
    concurrency: int = 40
    retry_concurrency: int = 10
    # Where a bounce that cannot be delivered goes (once); default
    # postmaster@ the first of server.domains.
    postmaster: str = ""


@dataclass(frozen=True)
class SubmissionConfig:
    """The ``[submission]`` section: the authenticated ports (587/465)."""

    # The envelope sender must be the user's mail or a mailLocalAddress (or <>).
    sender_login_match: bool = True
    # Likewise every address of the From: header; false relaxes it.
    from_header_match: bool = True
    # Name the authenticated user in a comment of the Received: header.
    authenticated_header: bool = False
    # Failed AUTH attempts per client address in one minute, then 421 (0: no cap).
    max_auth_failures_per_minute: int = 10


@dataclass(frozen=True)
class ConnectionControlConfig:
    """``[antispam.connection]``: rate and concurrency limits, greet pause, bad RCPTs."""

    greet_pause: str = "0s"
    max_connections_per_ip: int = 20
    max_connection_rate: int = 60
    max_message_rate: int = 100         # MAIL commands per rate_window
    rate_window: str = "60s"
    bad_rcpt_throttle: int = 3
    bad_rcpt_limit: int = 20


@dataclass(frozen=True)
class HeloCheckConfig:
    """``[antispam.helo]``: what a HELO/EHLO name must be."""

    reject_invalid: bool = True
    reject_our_name: bool = True
    require_resolvable: bool = False


@dataclass(frozen=True)
class DNSCheckConfig:
    """``[antispam.dns]``: sender MX, reverse DNS and block lists."""

    check_sender_mx: bool = True
    require_rdns: str = "off"           # off | tempfail | reject
    dnsbl: tuple = ()
    rhsbl: tuple = ()
    timeout: str = "10s"
    # A sender domain whose MX hosts all sit in these networks cannot take
    # replies ("bad MX"); a loopback lab may empty the list.
    bad_mx_networks: tuple = ("0.0.0.0/8", "10.0.0.0/8", "127.0.0.0/8", "169.254.0.0/16",
                              "172.16.0.0/12", "192.168.0.0/16", "::1/128", "::/128",
                              "fc00::/7", "fe80::/10")


@dataclass(frozen=True)
class SPFCheckConfig:
    """``[antispam.spf]``: RFC 7208 checks of the envelope sender."""

    enabled: bool = True
    fail: str = "reject"                # reject | tag
    permerror: str = "tag"              # reject | tag


@dataclass(frozen=True)
class GreylistConfig:
    """``[antispam.greylist]``: milter-greylist style triplets."""

    enabled: bool = True
    delay: str = "5m"
    retry_window: str = "4h"
    auto_whitelist: str = "36d"
    dnsbl_delay: str = "12h"
    dnsbl: tuple = ()
    whitelist_networks: tuple = ()
    whitelist_senders: tuple = ()
    whitelist_recipients: tuple = ()
    whitelist_spf_pass: bool = False


@dataclass(frozen=True)
class ContentConfig:
    """``[antispam.content]``: the content filters at end of data, and their verdict."""

    enabled: bool = True
    tag_score: float = 5.0          # X-Spam-Flag and the Junk folder from here
    reject_score: float = 15.0      # 550 5.7.1 from here
    max_scan_size: int = 4 * 1024 * 1024
    scan_timeout: str = "30s"


@dataclass(frozen=True)
class DKIMConfig:
    """``[antispam.dkim]``: verify inbound signatures, sign mail of our domains."""

    verify: bool = True
    sign: bool = True
    selector: str = "mail"
    key_dir: str = "dkim"           # under data_dir
    max_signatures: int = 5
    algorithm: str = "rsa-sha256"   # or ed25519-sha256


@dataclass(frozen=True)
class DMARCConfig:
    """``[antispam.dmarc]``: what the sender domain's DMARC policy makes us do."""

    enabled: bool = True
    reject_action: str = "reject"       # reject | junk | tag
    quarantine_action: str = "junk"     # junk | tag


@dataclass(frozen=True)
class RulesConfig:
    """``[antispam.rules]``: the scoring rules (built-in ones and local files)."""

    enabled: bool = True
    default_rules: bool = True
    files: tuple = ()
    time_budget: str = "0.2s"


@dataclass(frozen=True)
class BayesConfig:
    """``[antispam.bayes]``: the Bayesian filter and its token database."""

    enabled: bool = True
    min_spam: int = 200
    min_ham: int = 200
    per_user: bool = True
    token_max_age: str = "180d"
    max_tokens: int = 1000000


@dataclass(frozen=True)
class MilterConfig:
    """One ``[[antispam.milter]]`` entry: an external filter (Sendmail milter protocol)."""

    name: str = ""
    endpoint: str = ""
    connect_timeout: str = "5s"
    command_timeout: str = "10s"
    eom_timeout: str = "30s"
    default_action: str = "tempfail"    # tempfail | accept
    macros: dict = field(default_factory=dict)


@dataclass(frozen=True)
class AntispamConfig:
    """``[antispam.*]``: the checks at the door and the content filters (``antispam/``)."""

    connection: ConnectionControlConfig = field(default_factory=ConnectionControlConfig)
    helo: HeloCheckConfig = field(default_factory=HeloCheckConfig)
    dns: DNSCheckConfig = field(default_factory=DNSCheckConfig)
    spf: SPFCheckConfig = field(default_factory=SPFCheckConfig)
    greylist: GreylistConfig = field(default_factory=GreylistConfig)
    content: ContentConfig = field(default_factory=ContentConfig)
    dkim: DKIMConfig = field(default_factory=DKIMConfig)
    dmarc: DMARCConfig = field(default_factory=DMARCConfig)
    rules: RulesConfig = field(default_factory=RulesConfig)
    bayes: BayesConfig = field(default_factory=BayesConfig)
    milter: tuple = ()              # of MilterConfig, in the order they run


@dataclass(frozen=True)
class SMTPConfig:
    """The ``[smtp]`` section: protocol limits of the SMTP listeners."""

    max_recipients: int = 1000
    max_received_headers: int = 50
    max_errors: int = 20
    command_timeout: int = 300
    data_timeout: int = 600
    # A connection that never stops talking is cut after this many seconds.
    session_deadline: int = 3600


@dataclass(frozen=True)
class IMAPConfig:
    """The ``[imap]`` section: limits of IMAP sessions."""

    max_append: int = 50 * 1024 * 1024      # octets of one APPEND literal
    max_command: int = 65536                # octets of any other command
    max_user_ip_connections: int = 20       # sessions of one user from one address
    idle_timeout: int = 30 * 60             # RFC 3501: at least 30 minutes


@dataclass(frozen=True)
class ListsConfig:
    """``[lists]``: the list server (its domains and its command robot)."""

    domains: tuple = ()             # empty: the [server] domains
    robot: str = "lists"            # the command address's local part at each list domain
    # The site's list administrators: mail to listmaster@ and the robot's
    # alerts go to them (empty: the postmaster).
    listmasters: tuple = ()

    def list_domains(self, server):
        return tuple(d.lower() for d in (self.domains or server.domains))


@dataclass(frozen=True)
class Config:
    """The whole configuration; ``path`` is the file it came from."""

    path: str = ""
    server: ServerConfig = field(default_factory=ServerConfig)
    listen: ListenConfig = field(default_factory=ListenConfig)
    tls: TLSConfig = field(default_factory=TLSConfig)
    directory: DirectoryConfig = field(default_factory=DirectoryConfig)
    dns: DNSConfig = field(default_factory=DNSConfig)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    submission: SubmissionConfig = field(default_factory=SubmissionConfig)
    smtp: SMTPConfig = field(default_factory=SMTPConfig)
    imap: IMAPConfig = field(default_factory=IMAPConfig)
    antispam: AntispamConfig = field(default_factory=AntispamConfig)
    lists: ListsConfig = field(default_factory=ListsConfig)

    @property
    def data_dir(self) -> str:
        return self.server.data_dir

    def relay_nets(self):
        return [ipaddress.ip_network(n, strict=False) for n in self.server.relay_networks]

    def plaintext_auth_nets(self):
        return [ipaddress.ip_network(n, strict=False)
                for n in self.server.plaintext_auth_networks]


_SECTIONS = {
    "server": ServerConfig,
    "listen": ListenConfig,
    "tls": TLSConfig,
    "directory": DirectoryConfig,
    "dns": DNSConfig,
    "delivery": DeliveryConfig,
    "submission": SubmissionConfig,
    "smtp": SMTPConfig,
    "imap": IMAPConfig,
    "antispam": AntispamConfig,
    "lists": ListsConfig,
}
# Sections made of sub-tables only: [antispam.connection], [antispam.helo], ...
_NESTED = {"antispam"}

# Sub-sections written as arrays of tables ([[antispam.milter]]).
_TABLE_ARRAYS = {("antispam", "milter"): MilterConfig}

# Keys naming files, resolved against the config file's folder.
_PATH_KEYS = {("server", "data_dir"), ("tls", "certificate"), ("tls", "key"),
              ("directory", "ldif"), ("delivery", "tls_ca_file"), ("antispam.rules", "files")}

_TYPE_NAMES = {int: "an integer", str: "a string", tuple: "a list", bool: "true or false",
               dict: "a table", float: "a number"}


def _check_type(where, value, expected):
    if expected is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif expected is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif expected is tuple:
        ok = isinstance(value, list)
    else:
        ok = isinstance(value, expected)
    if not ok:
        raise ConfigError(f"{where}: expected {_TYPE_NAMES[expected]}, got {value!r}")


def load(path: str) -> Config:
    """Read, validate and return the configuration in ``path``."""
    path = os.path.abspath(path)
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: configuration file not found")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read configuration file: {e.strerror}")
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: TOML syntax error: {e}")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: expected a UTF-8 TOML file, found byte "
                          f"0x{e.object[e.start]:02x} at offset {e.start}")
    return from_dict(raw, path)


def from_dict(raw: dict, path: str) -> Config:
    """Build a :class:`Config` from parsed TOML, checking every key."""
    base = os.path.dirname(os.path.abspath(path)) if path else os.getcwd()
    sections = {}
    for name, value in raw.items():
        cls = _SECTIONS.get(name)
        if cls is None:
            raise ConfigError(f"{path}: unknown section [{name}]; expected one of "
                              + ", ".join(f"[{s}]" for s in _SECTIONS))
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: [{name}]: expected a table, got {value!r}")
        if name in _NESTED:
            parts = {}
            subs = typing.get_type_hints(cls)
            for sub, subvalue in value.items():
                if sub not in subs:
                    raise ConfigError(f"{path}: unknown section [{name}.{sub}]; expected one of "
                                      + ", ".join(f"[{name}.{f}]" for f in subs))
                if (name, sub) in _TABLE_ARRAYS:
                    if not isinstance(subvalue, list) or not all(
                            isinstance(t, dict) for t in subvalue):
                        raise ConfigError(f"{path}: [[{name}.{sub}]]: expected tables "
                                          f"(written [[{name}.{sub}]]), got {subvalue!r}")
                    parts[sub] = tuple(_section(path, base, f"{name}.{sub}",
                                                _TABLE_ARRAYS[(name, sub)], t) for t in subvalue)
                    continue
                if not isinstance(subvalue, dict):
                    raise ConfigError(f"{path}: [{name}.{sub}]: expected a table, "
                                      f"got {subvalue!r}")
                parts[sub] = _section(path, base, f"{name}.{sub}", subs[sub], subvalue)
            sections[name] = cls(**parts)
            continue
        sections[name] = _section(path, base, name, cls, value)
    if "server" not in sections or not any(
            f == "data_dir" for f in raw.get("server", {})):
        srv = sections.get("server", ServerConfig())
        sections["server"] = dataclasses.replace(
            srv, data_dir=os.path.normpath(os.path.join(base, srv.data_dir)))
    cfg = Config(path=path, **sections)
    _validate(cfg)
    return cfg


def _section(path, base, name, cls, value):
    """One table of the file as its dataclass, every key and type checked."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, v in value.items():
        where = f"{path}: [{name}] {key}"
        if key not in hints:
            raise ConfigError(f"{path}: unknown key '{key}' in [{name}]; expected one of "
                              + ", ".join(f.name for f in dataclasses.fields(cls)))
        _check_type(where, v, hints[key])
        if hints[key] is tuple:
            for item in v:
                if not isinstance(item, str):
                    raise ConfigError(f"{where}: expected a list of strings, got {item!r}")
            v = tuple(v)
        elif hints[key] is dict:
            for k, item in v.items():
                if not isinstance(item, str):
                    raise ConfigError(f"{where}: expected a table of strings, "
                                      f"got {k} = {item!r}")
            v = {k.lower(): item for k, item in v.items()}
        if (name, key) in _PATH_KEYS and v:
            if isinstance(v, tuple):
                v = tuple(os.path.normpath(os.path.join(base, item)) for item in v)
            else:
                v = os.path.normpath(os.path.join(base, v))
        kwargs[key] = v
    return cls(**kwargs)


def _validate(cfg: Config) -> None:
    p = cfg.path
    s = cfg.server
    if not s.hostname or not re.match(r"^[A-Za-z0-9.-]+$", s.hostname):
        raise ConfigError(f"{p}: [server] hostname: expected a host name, got {s.hostname!r}")
    for d in s.domains:
        if not re.match(r"^[A-Za-z0-9.-]+$", d) or "." not in d:
            raise ConfigError(f"{p}: [server] domains: expected domain names, got {d!r}")
    for key in ("relay_networks", "plaintext_auth_networks"):
        for n in getattr(s, key):
            try:
                ipaddress.ip_network(n, strict=False)
            except ValueError:
                raise ConfigError(f"{p}: [server] {key}: expected CIDR networks "
                                  f"like \"192.0.2.0/24\", got {n!r}")
    if not s.data_dir:
        raise ConfigError(f"{p}: [server] data_dir: expected a folder, got ''")
    blocker = _not_a_folder(s.data_dir)
    if blocker:
        raise ConfigError(f"{p}: [server] data_dir: expected a folder (or a place to "
                          f"make one) at {s.data_dir}, but {blocker} is not a folder")
    if not s.domains:
        raise ConfigError(f"{p}: [server] domains: expected at least one domain name")
    if s.max_message_size <= 0:
        raise ConfigError(f"{p}: [server] max_message_size: expected a positive number of bytes")
    for d in cfg.lists.domains:
        if not re.match(r"^[A-Za-z0-9.-]+$", d) or "." not in d:
            raise ConfigError(f"{p}: [lists] domains: expected domain names, got {d!r}")
        if d.lower() not in {x.lower() for x in s.domains}:
            raise ConfigError(f"{p}: [lists] domains: {d} is not one of [server] domains "
                              f"(list mail must be ours to receive)")
    for a in cfg.lists.listmasters:
        if not re.match(r"^[^@\s<>]+@[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+$", a):
            raise ConfigError(f"{p}: [lists] listmasters: expected mail addresses, got {a!r}")
    if not re.match(r"^[a-z0-9][a-z0-9._-]{0,49}$", cfg.lists.robot):
        raise ConfigError(f"{p}: [lists] robot: expected a lower-case local part like "
                          f"\"lists\", got {cfg.lists.robot!r}")
    from twisted.internet import reactor
    for f in dataclasses.fields(ListenConfig):
        desc = getattr(cfg.listen, f.name)
        if desc:
            try:
                ep = endpoints.serverFromString(reactor, desc)
                port = getattr(ep, "_port", None)
                if isinstance(port, int) and not 0 <= port <= 65535:
                    raise ValueError(f"port {port} is not in 0-65535")
            except Exception as e:
                raise ConfigError(f"{p}: [listen] {f.name}: expected a Twisted endpoint string "
                                  f"like \"tcp:25:interface=0.0.0.0\", got {desc!r} ({e})")
    t = cfg.tls
    if bool(t.certificate) != bool(t.key):
        raise ConfigError(f"{p}: [tls] certificate and key: expected both or neither")
    if t.certificate:
        from mailbox_appliance import tls
        try:
            tls.load_pair(t.certificate, t.key)
            tls.load_chain(t.certificate)
        except Exception as e:
            raise ConfigError(f"{p}: [tls] certificate/key: expected a matching PEM pair, "
                              f"could not load {t.certificate} / {t.key}: {e}")
    d = cfg.directory
    if d.url:
        if not re.match(r"^ldaps?://[^/\s]+/?$", d.url):
            raise ConfigError(f"{p}: [directory] url: expected \"ldap://host:port\", got {d.url!r}")
    else:
        if not d.ldif:
            raise ConfigError(f"{p}: [directory] ldif: expected an LDIF file when url is empty")
        try:
            with open(d.ldif, "rb") as f:
                f.read(1)
        except OSError as e:
            raise ConfigError(f"{p}: [directory] ldif: cannot read {d.ldif}: {e.strerror}")
        problem = _ldif_problem(d.ldif)
        if problem:
            raise ConfigError(f"{p}: [directory] ldif: expected an LDIF file with one tree, "
                              f"{d.ldif} does not load: {problem}")
    if d.cache_ttl < 0:
        raise ConfigError(f"{p}: [directory] cache_ttl: expected seconds >= 0")
    from mailbox_appliance.dns import parse_server
    for server in cfg.dns.servers:
        try:
            parse_server(server)
        except ValueError:
            raise ConfigError(f"{p}: [dns] servers: expected \"ip:port\" entries (an address, "
                              f"not a name), got {server!r}")
    dl = cfg.delivery
    if not 0 < dl.smtp_port <= 65535:
        raise ConfigError(f"{p}: [delivery] smtp_port: expected a port in 1-65535, "
                          f"got {dl.smtp_port}")
    if dl.smarthost:
        m = _SMARTHOST.match(dl.smarthost)
        if not m or not 0 < int(m.group(2)) <= 65535:
            raise ConfigError(f"{p}: [delivery] smarthost: expected \"host:port\", "
                              f"got {dl.smarthost!r}")
    for key in ("warn_after", "max_age", "dead_destination_time"):
        try:
            parse_duration(getattr(dl, key))
        except ValueError:
            raise ConfigError(f"{p}: [delivery] {key}: expected a duration like \"4h\" or \"5d\"")
    if not dl.retry_schedule:
        raise ConfigError(f"{p}: [delivery] retry_schedule: expected at least one duration")
    for item in dl.retry_schedule:
        try:
            parse_duration(item)
        except ValueError:
            raise ConfigError(f"{p}: [delivery] retry_schedule: expected durations like \"5m\", "
                              f"got {item!r}")
    for domain, level in dl.tls_policy.items():
        if level not in TLS_LEVELS:
            raise ConfigError(f"{p}: [delivery] tls_policy: expected one of "
                              f"{', '.join(TLS_LEVELS)} for {domain!r}, got {level!r}")
    if dl.smarthost_user and not dl.smarthost:
        raise ConfigError(f"{p}: [delivery] smarthost_user: expected a smarthost to log in to")
    if dl.tls_ca_file:
        try:
            with open(dl.tls_ca_file, "rb") as f:
                f.read(1)
        except OSError as e:
            raise ConfigError(f"{p}: [delivery] tls_ca_file: cannot read {dl.tls_ca_file}: "
                              f"{e.strerror}")
    if dl.postmaster and "@" not in dl.postmaster:
        raise ConfigError(f"{p}: [delivery] postmaster: expected an address, "
                          f"got {dl.postmaster!r}")
    _validate_antispam(p, cfg.antispam)
    if cfg.smtp.max_recipients < 100:
        raise ConfigError(f"{p}: [smtp] max_recipients: expected at least 100 (RFC 5321 4.5.3.1.8)")
    positive = [(s, f.name) for s in ("smtp", "imap") for f in dataclasses.fields(getattr(cfg, s))]
    positive += [("delivery", k) for k in (
        "max_connections", "max_per_domain", "connect_timeout", "command_timeout",
        "data_timeout", "connection_max_messages", "concurrency", "retry_concurrency")]
    positive += [("dns", "timeout")]
    if cfg.submission.max_auth_failures_per_minute < 0:
        raise ConfigError(f"{p}: [submission] max_auth_failures_per_minute: expected a number "
                          f">= 0 (0 turns the cap off)")
    if dl.connection_idle < 0:
        raise ConfigError(f"{p}: [delivery] connection_idle: expected seconds >= 0")
    for section, name in positive:
        values = getattr(cfg, section)
        for f in [f for f in dataclasses.fields(values) if f.name == name]:
            if getattr(values, f.name) <= 0:
                raise ConfigError(f"{p}: [{section}] {f.name}: expected a positive number, "
                                  f"got {getattr(values, f.name)}")


def _validate_antispam(p, a):
    durations = [("connection", "greet_pause"), ("connection", "rate_window"),
                 ("dns", "timeout"), ("greylist", "delay"), ("greylist", "retry_window"),
                 ("greylist", "auto_whitelist"), ("greylist", "dnsbl_delay"),
                 ("content", "scan_timeout"),
                 ("bayes", "token_max_age")]
    for sub, key in durations:
        try:
            parse_duration(getattr(getattr(a, sub), key))
        except ValueError:
            raise ConfigError(f"{p}: [antispam.{sub}] {key}: expected a duration like \"5m\"")
    _validate_content(p, a)
    c = a.connection
    for key in ("max_connections_per_ip", "max_connection_rate", "max_message_rate",
                "bad_rcpt_throttle", "bad_rcpt_limit"):
        if getattr(c, key) <= 0:
            raise ConfigError(f"{p}: [antispam.connection] {key}: expected a positive number")
    if a.dns.require_rdns not in ("off", "tempfail", "reject"):
        raise ConfigError(f"{p}: [antispam.dns] require_rdns: expected off, tempfail or reject, "
                          f"got {a.dns.require_rdns!r}")
    for key, value in (("fail", a.spf.fail), ("permerror", a.spf.permerror)):
        if value not in ("reject", "tag"):
            raise ConfigError(f"{p}: [antispam.spf] {key}: expected reject or tag, "
                              f"got {value!r}")
    for sub, key in (("dns", "dnsbl"), ("dns", "rhsbl"), ("greylist", "dnsbl")):
        for zone in getattr(getattr(a, sub), key):
            if not re.match(r"^[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+\.?$", zone):
                raise ConfigError(f"{p}: [antispam.{sub}] {key}: expected DNS zone names, "
                                  f"got {zone!r}")
    for n in a.dns.bad_mx_networks:
        try:
            ipaddress.ip_network(n, strict=False)
        except ValueError:
            raise ConfigError(f"{p}: [antispam.dns] bad_mx_networks: expected CIDR networks, "
                              f"got {n!r}")
    for n in a.greylist.whitelist_networks:
        try:
            ipaddress.ip_network(n, strict=False)
        except ValueError:
            raise ConfigError(f"{p}: [antispam.greylist] whitelist_networks: expected CIDR "
                              f"networks like \"192.0.2.0/24\", got {n!r}")


def _validate_content(p, a):
    c = a.content
    if not 0 < c.tag_score <= c.reject_score:
        raise ConfigError(f"{p}: [antispam.content] tag_score, reject_score: expected "
                          f"0 < tag_score <= reject_score, got {c.tag_score} and {c.reject_score}")
    if c.max_scan_size <= 0:
        raise ConfigError(f"{p}: [antispam.content] max_scan_size: expected a positive "
                          f"number of bytes")
    choices = [("dkim", "algorithm", ("rsa-sha256", "ed25519-sha256")),
               ("dmarc", "reject_action", ("reject", "junk", "tag")),
               ("dmarc", "quarantine_action", ("junk", "tag"))]
    for sub, key, allowed in choices:
        value = getattr(getattr(a, sub), key)
        if value not in allowed:
            raise ConfigError(f"{p}: [antispam.{sub}] {key}: expected "
                              + " or ".join(allowed) + f", got {value!r}")
    if not re.match(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$", a.dkim.selector):
        raise ConfigError(f"{p}: [antispam.dkim] selector: expected a DNS label like "
                          f"\"mail\", got {a.dkim.selector!r}")
    for key in ("max_signatures",):
        if getattr(a.dkim, key) <= 0:
            raise ConfigError(f"{p}: [antispam.dkim] {key}: expected a positive number")
    for key in ("min_spam", "min_ham", "max_tokens"):
        if getattr(a.bayes, key) <= 0:
            raise ConfigError(f"{p}: [antispam.bayes] {key}: expected a positive number")
    names = set()
    from twisted.internet import reactor
    for m in a.milter:
        if not m.name or not re.match(r"^[A-Za-z0-9_.-]+$", m.name) or m.name in names:
            raise ConfigError(f"{p}: [[antispam.milter]] name: expected a unique short name, "
                              f"got {m.name!r}")
        names.add(m.name)
        try:
            endpoints.clientFromString(reactor, m.endpoint)
        except Exception as e:
            raise ConfigError(f"{p}: [[antispam.milter]] {m.name}: endpoint: expected a "
                              f"client endpoint like \"tcp:127.0.0.1:8891\", got "
                              f"{m.endpoint!r} ({e})")
        for key in ("connect_timeout", "command_timeout", "eom_timeout"):
            try:
                parse_duration(getattr(m, key))
            except ValueError:
                raise ConfigError(f"{p}: [[antispam.milter]] {m.name}: {key}: expected a "
                                  f"duration like \"10s\"")
        if m.default_action not in ("tempfail", "accept"):
            raise ConfigError(f"{p}: [[antispam.milter]] {m.name}: default_action: expected "
                              f"tempfail or accept, got {m.default_action!r}")
    _validate_rules(p, a.rules)


def _validate_rules(p, r):
    from mailbox_appliance.antispam.rules import parse_budget
    try:
        parse_budget(r.time_budget)
    except ValueError as e:
        raise ConfigError(f"{p}: [antispam.rules] {e}")


def check_rule_files(cfg: Config) -> None:
    """Raise ConfigError for a rule file that cannot be read or has errors.

    Run at start and by ``check-config``, not by every admin command: a
    typo in a rule file (which a running appliance's reload tolerates) must
    not stop ``queue flush`` in the middle of an incident.
    """
    from mailbox_appliance.antispam.rules import load_rules
    p, r = cfg.path, cfg.antispam.rules
    for f in r.files:
        try:
            with open(f, "rb"):
                pass
        except OSError as e:
            raise ConfigError(f"{p}: [antispam.rules] files: cannot read {f}: {e.strerror}")
    if r.enabled and r.files:
        # A rule file with errors is refused at start, as Postfix refuses a
        # bad main.cf; a reload (SIGHUP) keeps the rules that parse.
        problems = load_rules(r.files, r.default_rules).errors
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise ConfigError(f"{p}: [antispam.rules] files: {problems[0]}{more}")


def _not_a_folder(path):
    """The first existing part of ``path`` that is not a folder, or None.

    Only what can be told without creating anything: permissions are left to
    start-up, since check-config may run as another user than the appliance.
    """
    probe = path
    while True:
        if os.path.exists(probe):
            return None if os.path.isdir(probe) else probe
        parent = os.path.dirname(probe)
        if parent == probe:
            return None
        probe = parent


TLS_LEVELS = ("none", "may", "encrypt", "verify")

_SMARTHOST = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):(\d{1,5})$")


def _ldif_problem(path):
    """Why the embedded server could not load ``path``, or None if it can."""
    from mailbox_appliance.directory.embedded import load_ldif
    outcome = []
    load_ldif(path).addBoth(outcome.append)
    if outcome and hasattr(outcome[0], "getErrorMessage"):
        return outcome[0].getErrorMessage()
    return None
