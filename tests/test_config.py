"""Unit tests of mailbox_appliance.config: defaults, paths and one-line errors.

Every bad configuration must raise ConfigError whose single-line message names
the file, the key and what was expected (DESIGN.md, "Configuration contract").
"""

import dataclasses
import os
import shutil
import textwrap

from twisted.trial import unittest

from mailbox_appliance import config, tls

FIXTURE_LDIF = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                            "e2e", "fixtures", "directory.ldif")
LDIF = '[directory]\nldif = "directory.ldif"\n'


class _ConfigDir:
    """A temporary folder holding a config file and its LDIF."""

    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        shutil.copy(FIXTURE_LDIF, os.path.join(self.dir, "directory.ldif"))

    def write(self, text, name="mailappliance.toml", mode="w"):
        path = os.path.join(self.dir, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, mode) as f:
            f.write(textwrap.dedent(text) if isinstance(text, str) else text)
        return path

    def load(self, text):
        return config.load(self.write(text))

    def assertBad(self, text, *fragments, name="mailappliance.toml"):
        """``text`` fails to load; the message names the file and each fragment."""
        path = self.write(text, name) if text is not None else os.path.join(self.dir, name)
        e = self.assertRaises(config.ConfigError, config.load, path)
        message = str(e)
        self.assertNotIn("\n", message)
        self.assertTrue(message.startswith(path + ": "), message)
        for fragment in fragments:
            self.assertIn(fragment, message)
        return message


class DefaultsTests(_ConfigDir, unittest.TestCase):

    def test_minimal_file_gets_defaults(self):
        cfg = self.load(LDIF)
        self.assertEqual(cfg.path, os.path.join(self.dir, "mailappliance.toml"))
        self.assertEqual(cfg.server, config.ServerConfig(
            data_dir=os.path.join(self.dir, "var")))
        self.assertEqual(cfg.server.hostname, "mail.example.test")
        self.assertEqual(cfg.server.domains, ("example.test",))
        self.assertEqual(cfg.server.relay_networks, ())
        self.assertEqual(cfg.server.max_message_size, 26214400)
        self.assertEqual(cfg.listen, config.ListenConfig())
        self.assertEqual(cfg.tls, config.TLSConfig())
        self.assertEqual(cfg.dns, config.DNSConfig())
        self.assertEqual(cfg.delivery, config.DeliveryConfig())
        self.assertEqual(cfg.smtp, config.SMTPConfig())
        self.assertEqual(cfg.directory.ldif, os.path.join(self.dir, "directory.ldif"))
        self.assertEqual(cfg.directory.cache_ttl, 60)
        self.assertEqual(cfg.data_dir, cfg.server.data_dir)
        self.assertEqual(cfg.relay_nets(), [])

    def test_example_config_in_etc_loads(self):
        # The quick-start configuration shipped in etc/ must itself be valid.
        etc = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "etc")
        path = os.path.join(etc, "mailappliance.toml")
        if not os.path.exists(path):
            raise unittest.SkipTest("no etc/mailappliance.toml")
        cfg = config.load(path)
        self.assertEqual(cfg.server.data_dir, os.path.normpath(os.path.join(etc, "../var")))

    def test_contract_keys_all_accepted(self):
        cfg = self.load("""\
            [server]
            hostname = "mx.example.test"
            domains  = ["example.test", "example.org"]
            data_dir = "../var"
            relay_networks = ["192.0.2.0/24", "2001:db8::/32", "127.0.0.1"]
            max_message_size = 1000
            [listen]
            smtp        = "tcp:2525:interface=127.0.0.1"
            submission  = ""
            submissions = ""
            lmtp        = ""
            imap        = ""
            imaps       = ""
            pop3        = ""
            pop3s       = ""
            [tls]
            certificate = ""
            key = ""
            [directory]
            ldif = "directory.ldif"
            url = ""
            bind_dn = ""
            bind_password = ""
            base_dn = "dc=example,dc=test"
            cache_ttl = 0
            [dns]
            servers = ["127.0.0.1:5353"]
            [delivery]
            smtp_port = 2526
            smarthost = "relay.example.test:587"
            retry_schedule = ["1m", "5m"]
            warn_after = "4h"
            max_age = "5d"
            [smtp]
            max_recipients = 100
            """)
        self.assertEqual(cfg.server.domains, ("example.test", "example.org"))
        self.assertIsInstance(cfg.server.domains, tuple)
        self.assertEqual(len(cfg.relay_nets()), 3)
        self.assertEqual(cfg.dns.servers, ("127.0.0.1:5353",))
        self.assertEqual(cfg.delivery.retry_schedule, ("1m", "5m"))
        self.assertEqual(cfg.delivery.smarthost, "relay.example.test:587")
        self.assertEqual(cfg.smtp.max_recipients, 100)
        self.assertEqual(cfg.directory.cache_ttl, 0)

    def test_frozen(self):
        cfg = self.load(LDIF)
        for obj, attr, value in [(cfg, "path", "x"), (cfg.server, "hostname", "x"),
                                 (cfg.listen, "smtp", ""), (cfg.tls, "key", "x"),
                                 (cfg.directory, "url", "x"), (cfg.dns, "servers", ()),
                                 (cfg.delivery, "smtp_port", 1),
                                 (cfg.smtp, "max_recipients", 1)]:
            self.assertRaises(dataclasses.FrozenInstanceError, setattr, obj, attr, value)

    def test_empty_listener_is_off(self):
        cfg = self.load(LDIF + '[listen]\nsmtp = ""\n')
        self.assertEqual(cfg.listen.smtp, "")


class PathTests(_ConfigDir, unittest.TestCase):
    """Relative paths are relative to the folder of the file, not the cwd."""

    def test_relative_paths_resolved_against_file_folder(self):
        sub = os.path.join(self.dir, "etc")
        os.makedirs(os.path.join(sub, "ldap"))
        shutil.copy(FIXTURE_LDIF, os.path.join(sub, "ldap", "dir.ldif"))
        tls.generate_self_signed("mx.example.test", os.path.join(sub, "certs", "c.pem"),
                                 os.path.join(sub, "certs", "k.pem"))
        cfg = config.load(self.write("""\
            [server]
            data_dir = "../var"
            [tls]
            certificate = "certs/c.pem"
            key = "./certs/k.pem"
            [directory]
            ldif = "ldap/dir.ldif"
            """, "etc/mailappliance.toml"))
        self.assertEqual(cfg.server.data_dir, os.path.join(self.dir, "var"))
        self.assertEqual(cfg.tls.certificate, os.path.join(sub, "certs", "c.pem"))
        self.assertEqual(cfg.tls.key, os.path.join(sub, "certs", "k.pem"))
        self.assertEqual(cfg.directory.ldif, os.path.join(sub, "ldap", "dir.ldif"))

    def test_default_data_dir_is_beside_the_file(self):
        path = self.write(LDIF, "deep/er/m.toml")
        shutil.copy(FIXTURE_LDIF, os.path.join(self.dir, "deep", "er", "directory.ldif"))
        cfg = config.load(path)
        self.assertEqual(cfg.server.data_dir, os.path.join(self.dir, "deep", "er", "var"))

    def test_relative_config_path_resolved_before_use(self):
        path = self.write(LDIF)
        cfg = config.load(os.path.relpath(path))
        self.assertEqual(cfg.path, path)
        self.assertEqual(cfg.server.data_dir, os.path.join(self.dir, "var"))
        self.assertEqual(cfg.directory.ldif, os.path.join(self.dir, "directory.ldif"))

    def test_absolute_paths_kept(self):
        other = os.path.abspath(self.mktemp())
        cfg = self.load(LDIF + f'[server]\ndata_dir = "{other}"\n')
        self.assertEqual(cfg.server.data_dir, other)

    def test_from_dict(self):
        path = os.path.join(self.dir, "x.toml")
        cfg = config.from_dict({"directory": {"ldif": "directory.ldif"},
                                "server": {"domains": ["a.test"]}}, path)
        self.assertEqual(cfg.path, path)
        self.assertEqual(cfg.directory.ldif, os.path.join(self.dir, "directory.ldif"))
        self.assertEqual(cfg.server.domains, ("a.test",))
        e = self.assertRaises(config.ConfigError, config.from_dict,
                              {"directory": {"ldif": "directory.ldif"},
                               "server": {"domains": "a.test"}}, path)
        self.assertIn("[server] domains: expected a list", str(e))


class DurationTests(unittest.TestCase):

    def test_valid(self):
        for text, seconds in [("90", 90), ("90s", 90), ("5m", 300), ("4h", 14400),
                              ("5d", 432000), ("1w", 604800), (" 2 m ", 120), (0, 0),
                              (3600, 3600), ("0s", 0), ("1.5h", 5400), ("0.2s", 0.2)]:
            self.assertEqual(config.parse_duration(text), seconds, text)

    def test_invalid(self):
        for text in ["", "m", "5x", "5 minutes", "-5m", "1.", ".5s", "1,5h", "5mm", "h5", True,
                     None]:
            self.assertRaises(ValueError, config.parse_duration, text)


class ErrorTests(_ConfigDir, unittest.TestCase):
    """Each bad configuration: ConfigError naming the file, the key, the expectation."""

    def test_missing_file(self):
        self.assertBad(None, "configuration file not found", name="nope.toml")

    def test_file_is_a_folder(self):
        os.makedirs(os.path.join(self.dir, "folder.toml"))
        self.assertBad(None, "cannot read configuration file", name="folder.toml")

    def test_toml_syntax_error(self):
        self.assertBad('[server]\nhostname = "x\n', "TOML syntax error", "line 2")

    def test_toml_duplicate_key(self):
        self.assertBad('[server]\nhostname = "a.test"\nhostname = "b.test"\n',
                       "TOML syntax error")

    def test_not_utf8(self):
        path = self.write(b'[server]\nhostname = "\xff"\n', mode="wb")
        e = self.assertRaises(config.ConfigError, config.load, path)
        self.assertTrue(str(e).startswith(path + ": "))
        self.assertIn("expected a UTF-8 TOML file", str(e))

    def test_unknown_section(self):
        self.assertBad(LDIF + "[serverr]\nhostname = 'x'\n",
                       "unknown section [serverr]", "expected one of", "[server]")

    def test_section_not_a_table(self):
        self.assertBad('server = "mx"\n' + LDIF, "[server]", "expected a table", "'mx'")

    def test_unknown_key(self):
        self.assertBad(LDIF + '[server]\nhostnme = "mx.example.test"\n',
                       "'hostnme'", "[server]", "expected one of", "hostname")

    def test_list_domains_must_be_ours(self):
        self.assertBad(LDIF + '[server]\ndomains = ["example.test"]\n'
                       '[lists]\ndomains = ["other.test"]\n',
                       "[lists] domains", "other.test is not one of [server] domains")
        self.assertBad(LDIF + '[lists]\ndomains = ["bad domain"]\n', "[lists] domains")

    def test_list_robot_name(self):
        self.assertBad(LDIF + '[lists]\nrobot = "Lists Robot"\n', "[lists] robot",
                       "expected a lower-case local part")
        path = self.write(LDIF + '[server]\ndomains = ["example.test", "l.example.test"]\n'
                          '[lists]\nrobot = "sympa"\ndomains = ["L.example.test"]\n')
        cfg = config.load(path)
        self.assertEqual(cfg.lists.robot, "sympa")
        self.assertEqual(cfg.lists.list_domains(cfg.server), ("l.example.test",))

    def test_unknown_nested_table(self):
        self.assertBad(LDIF + '[server.extra]\nx = 1\n', "'extra'", "[server]")

    def test_wrong_type_integer(self):
        self.assertBad(LDIF + '[server]\nmax_message_size = "big"\n',
                       "[server] max_message_size", "expected an integer", "'big'")

    def test_bool_and_float_are_not_integers(self):
        self.assertBad(LDIF + '[server]\nmax_message_size = true\n',
                       "[server] max_message_size", "expected an integer")
        self.assertBad('[directory]\nldif = "directory.ldif"\ncache_ttl = 1.5\n',
                       "[directory] cache_ttl", "expected an integer")

    def test_wrong_type_string(self):
        self.assertBad(LDIF + '[server]\nhostname = 5\n', "[server] hostname",
                       "expected a string")

    def test_wrong_type_list(self):
        self.assertBad(LDIF + '[server]\ndomains = "example.test"\n', "[server] domains",
                       "expected a list")

    def test_list_of_non_strings(self):
        self.assertBad(LDIF + '[server]\ndomains = ["example.test", 5]\n',
                       "[server] domains", "expected a list of strings", "5")
        self.assertBad(LDIF + '[delivery]\nretry_schedule = [60, 120]\n',
                       "[delivery] retry_schedule", "expected a list of strings")

    def test_bad_hostname(self):
        self.assertBad(LDIF + '[server]\nhostname = "mx example"\n', "[server] hostname",
                       "expected a host name")
        self.assertBad(LDIF + '[server]\nhostname = ""\n', "[server] hostname")

    def test_bad_domains(self):
        self.assertBad(LDIF + '[server]\ndomains = ["localhost"]\n', "[server] domains",
                       "expected domain names", "'localhost'")
        self.assertBad(LDIF + '[server]\ndomains = []\n', "[server] domains",
                       "expected at least one domain")

    def test_empty_data_dir(self):
        self.assertBad(LDIF + '[server]\ndata_dir = ""\n', "[server] data_dir",
                       "expected a folder")

    def test_data_dir_below_a_file(self):
        self.assertBad(LDIF + '[server]\ndata_dir = "directory.ldif/var"\n',
                       "[server] data_dir", "expected a folder",
                       os.path.join(self.dir, "directory.ldif") + " is not a folder")
        # A folder that does not exist yet is made at start-up: fine here.
        self.assertEqual(self.load(LDIF + '[server]\ndata_dir = "a/b/c"\n').server.data_dir,
                         os.path.join(self.dir, "a", "b", "c"))
        self.assertFalse(os.path.exists(os.path.join(self.dir, "a")))

    def test_bad_relay_networks(self):
        self.assertBad(LDIF + '[server]\nrelay_networks = ["192.0.2.0/33"]\n',
                       "[server] relay_networks", "expected CIDR networks", "192.0.2.0/33")
        self.assertBad(LDIF + '[server]\nrelay_networks = ["lan"]\n',
                       "[server] relay_networks", "'lan'")

    def test_non_positive_message_size(self):
        self.assertBad(LDIF + '[server]\nmax_message_size = 0\n',
                       "[server] max_message_size", "expected a positive number")

    def test_bad_endpoint_string(self):
        self.assertBad(LDIF + '[listen]\nsmtp = "tcpp:25"\n', "[listen] smtp",
                       "expected a Twisted endpoint string", "'tcpp:25'")
        self.assertBad(LDIF + '[listen]\nimap = "tcp:notaport"\n', "[listen] imap",
                       "expected a Twisted endpoint string")
        self.assertBad(LDIF + '[listen]\nsubmission = "tcp:70000"\n', "[listen] submission",
                       "expected a Twisted endpoint string", "65535")

    def test_ldif_missing(self):
        self.assertBad('[directory]\nldif = "missing.ldif"\n', "[directory] ldif",
                       "cannot read", os.path.join(self.dir, "missing.ldif"),
                       "No such file")

    def test_ldif_unreadable(self):
        if os.geteuid() == 0:
            raise unittest.SkipTest("root reads files whatever their mode")
        path = os.path.join(self.dir, "directory.ldif")
        os.chmod(path, 0)
        self.addCleanup(os.chmod, path, 0o644)
        self.assertBad(LDIF, "[directory] ldif", "cannot read", path, "Permission denied")

    def test_ldif_is_a_folder(self):
        os.makedirs(os.path.join(self.dir, "ldifdir"))
        self.assertBad('[directory]\nldif = "ldifdir"\n', "[directory] ldif", "cannot read")

    def test_ldif_does_not_parse(self):
        self.write("dn: dc=example,dc=test\nobjectClass: dcObject\n\nnot an ldif line\n",
                   "directory.ldif")
        self.assertBad(LDIF, "[directory] ldif", "expected an LDIF file", "does not load")

    def test_ldif_required_without_url(self):
        self.assertBad("[server]\n", "[directory] ldif",
                       "expected an LDIF file when url is empty")

    def test_url_means_no_ldif_needed(self):
        cfg = self.load('[directory]\nurl = "ldap://127.0.0.1:389"\n')
        self.assertEqual(cfg.directory.url, "ldap://127.0.0.1:389")
        # Even a configured but missing LDIF is not loaded, so not checked.
        cfg = self.load('[directory]\nurl = "ldaps://ldap.example.test"\n'
                        'ldif = "missing.ldif"\n')
        self.assertEqual(cfg.directory.ldif, os.path.join(self.dir, "missing.ldif"))

    def test_bad_url(self):
        self.assertBad('[directory]\nurl = "http://ldap.example.test"\n', "[directory] url",
                       'expected "ldap://host:port"')

    def test_negative_cache_ttl(self):
        self.assertBad('[directory]\nldif = "directory.ldif"\ncache_ttl = -1\n',
                       "[directory] cache_ttl", "expected seconds >= 0")

    def test_bad_dns_servers(self):
        self.assertBad(LDIF + '[dns]\nservers = ["1.2.3.4 53"]\n', "[dns] servers",
                       'expected "ip:port"')
        # A name server cannot be found by name.
        self.assertBad(LDIF + '[dns]\nservers = ["ns.example.test:53"]\n', "[dns] servers",
                       "not a name")
        self.assertBad(LDIF + '[dns]\nservers = ["127.0.0.1:70000"]\n', "[dns] servers")
        cfg = self.load(LDIF + '[dns]\nservers = ["[::1]:5353", "192.0.2.1"]\ntimeout = 3\n')
        self.assertEqual(cfg.dns.servers, ("[::1]:5353", "192.0.2.1"))

    def test_outbound_and_submission_keys(self):
        cfg = self.load(LDIF + textwrap.dedent('''\
            [delivery]
            smarthost = "relay.example.test:587"
            smarthost_user = "me"
            smarthost_password = "secret"
            max_per_domain = 3
            dead_destination_time = "2m"
            [delivery.tls_policy]
            "Bank.Example" = "verify"
            [submission]
            from_header_match = false
            max_auth_failures_per_minute = 0
            '''))
        self.assertEqual(cfg.delivery.tls_policy, {"bank.example": "verify"})
        self.assertEqual(cfg.delivery.max_per_domain, 3)
        self.assertFalse(cfg.submission.from_header_match)
        self.assertTrue(cfg.submission.sender_login_match)
        self.assertEqual(cfg.submission.max_auth_failures_per_minute, 0)

    def test_bad_outbound_keys(self):
        self.assertBad(LDIF + '[delivery.tls_policy]\n"x.test" = "always"\n',
                       "[delivery] tls_policy", "'always'")
        self.assertBad(LDIF + '[delivery.tls_policy]\n"x.test" = 1\n',
                       "[delivery] tls_policy", "expected a table of strings")
        self.assertBad(LDIF + '[delivery]\ntls_policy = "verify"\n',
                       "[delivery] tls_policy", "expected a table")
        self.assertBad(LDIF + '[delivery]\nsmarthost_user = "me"\n',
                       "[delivery] smarthost_user", "expected a smarthost")
        self.assertBad(LDIF + '[delivery]\nmax_per_domain = 0\n',
                       "[delivery] max_per_domain", "expected a positive number")
        self.assertBad(LDIF + '[delivery]\ndead_destination_time = "a while"\n',
                       "[delivery] dead_destination_time", "expected a duration")
        self.assertBad(LDIF + '[delivery]\npostmaster = "nobody"\n',
                       "[delivery] postmaster", "expected an address")
        self.assertBad(LDIF + '[delivery]\ntls_ca_file = "missing.pem"\n',
                       "[delivery] tls_ca_file", "cannot read")
        self.assertBad(LDIF + '[submission]\nmax_auth_failures_per_minute = -1\n',
                       "[submission] max_auth_failures_per_minute", ">= 0")
        self.assertBad(LDIF + '[submission]\nrelaxed = true\n', "unknown key 'relaxed'")

    def test_tls_only_one_of_pair(self):
        self.assertBad(LDIF + '[tls]\ncertificate = "c.pem"\n', "[tls] certificate and key",
                       "expected both or neither")
        self.assertBad(LDIF + '[tls]\nkey = "k.pem"\n', "[tls] certificate and key",
                       "expected both or neither")

    def test_tls_files_missing(self):
        self.assertBad(LDIF + '[tls]\ncertificate = "c.pem"\nkey = "k.pem"\n',
                       "[tls] certificate/key", "expected a matching PEM pair",
                       os.path.join(self.dir, "c.pem"))

    def test_tls_files_do_not_load(self):
        self.write("not a certificate\n", "c.pem")
        self.write("not a key\n", "k.pem")
        self.assertBad(LDIF + '[tls]\ncertificate = "c.pem"\nkey = "k.pem"\n',
                       "[tls] certificate/key", "expected a matching PEM pair")

    def test_tls_key_does_not_match(self):
        tls.generate_self_signed("a.example.test", os.path.join(self.dir, "a", "c.pem"),
                                 os.path.join(self.dir, "a", "k.pem"))
        tls.generate_self_signed("b.example.test", os.path.join(self.dir, "b", "c.pem"),
                                 os.path.join(self.dir, "b", "k.pem"))
        self.assertBad(LDIF + '[tls]\ncertificate = "a/c.pem"\nkey = "b/k.pem"\n',
                       "[tls] certificate/key", "expected a matching PEM pair")
        # The matching pair itself is fine.
        cfg = self.load(LDIF + '[tls]\ncertificate = "a/c.pem"\nkey = "a/k.pem"\n')
        self.assertEqual(cfg.tls.key, os.path.join(self.dir, "a", "k.pem"))

    def test_tls_key_and_cert_swapped(self):
        tls.generate_self_signed("a.example.test", os.path.join(self.dir, "c.pem"),
                                 os.path.join(self.dir, "k.pem"))
        self.assertBad(LDIF + '[tls]\ncertificate = "k.pem"\nkey = "c.pem"\n',
                       "[tls] certificate/key", "expected a matching PEM pair")

    def test_bad_durations(self):
        self.assertBad(LDIF + '[delivery]\nwarn_after = "4x"\n', "[delivery] warn_after",
                       "expected a duration")
        self.assertBad(LDIF + '[delivery]\nmax_age = "soon"\n', "[delivery] max_age",
                       "expected a duration")
        self.assertBad(LDIF + '[delivery]\nwarn_after = 3600\n', "[delivery] warn_after",
                       "expected a string")
        self.assertBad(LDIF + '[delivery]\nretry_schedule = ["5m", "later"]\n',
                       "[delivery] retry_schedule", "expected durations", "'later'")
        self.assertBad(LDIF + '[delivery]\nretry_schedule = []\n',
                       "[delivery] retry_schedule", "expected at least one duration")

    def test_bad_delivery_port_and_smarthost(self):
        self.assertBad(LDIF + '[delivery]\nsmtp_port = 0\n', "[delivery] smtp_port",
                       "expected a port")
        self.assertBad(LDIF + '[delivery]\nsmtp_port = 65536\n', "[delivery] smtp_port")
        self.assertBad(LDIF + '[delivery]\nsmarthost = "relay.example.test"\n',
                       "[delivery] smarthost", 'expected "host:port"')
        self.assertBad(LDIF + '[delivery]\nsmarthost = "relay.example.test:99999"\n',
                       "[delivery] smarthost")
        cfg = self.load(LDIF + '[delivery]\nsmarthost = "[192.0.2.1]:25"\n')
        self.assertEqual(cfg.delivery.smarthost, "[192.0.2.1]:25")

    def test_max_recipients_at_least_100(self):
        self.assertBad(LDIF + '[smtp]\nmax_recipients = 99\n', "[smtp] max_recipients",
                       "expected at least 100")
        self.assertEqual(self.load(LDIF + '[smtp]\nmax_recipients = 100\n')
                         .smtp.max_recipients, 100)

    def test_smtp_limits_positive(self):
        for key in ("max_errors", "command_timeout", "data_timeout", "session_deadline",
                    "max_received_headers"):
            self.assertBad(LDIF + f'[smtp]\n{key} = 0\n', f"[smtp] {key}",
                           "expected a positive number")

    def test_message_is_one_line(self):
        self.assertEqual(str(config.ConfigError("a: b\nc\r\nd")), "a: b c d")
