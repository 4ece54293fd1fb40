"""Client addresses against configured networks (relay_networks and the like)."""

import ipaddress


def networks_predicate(networks):
    """A test "is this client address in one of these networks?".

    IPv4 clients seen through an IPv6 socket (``::ffff:192.0.2.1``) count as
    their IPv4 address; anything that is not an IP address (a UNIX socket) is
    in none.
    """
    networks = list(networks)

    def contains(ip):
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        if addr.version == 6 and addr.ipv4_mapped:
            addr = addr.ipv4_mapped
        return any(addr in net for net in networks)
    return contains
