"""The directory: who has which address, where mail goes, who may log in.

* :mod:`.model` -- the plain values handed out (User, Resolution, Expansion);
* :mod:`.ldap` -- :class:`~.ldap.LDAPDirectory`, IDirectory over LDAP (ldaptor);
* :mod:`.embedded` -- the read-only LDAP server serving the LDIF file;
* :mod:`.cache` -- :class:`~.cache.CachingDirectory`, a TTL cache in front;
* :mod:`.service` -- :class:`~.service.DirectoryService`, all of it as a service.
"""
