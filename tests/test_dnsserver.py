import dns.resolver
import pytest

from fastsend.testing.dnsserver import DNSServer


def resolver(server: DNSServer) -> dns.resolver.Resolver:
    r = dns.resolver.Resolver(configure=False)
    r.nameservers = [server.address]
    r.port = server.port
    return r


def test_serves_mx_txt_and_nxdomain(dns_server: DNSServer) -> None:
    long_txt = "v=DKIM1; k=rsa; p=" + "A" * 400
    dns_server.set_zones(
        {
            "example.test": [("MX", "10 mx1.example.test.", 60), ("TXT", "v=spf1 -all")],
            "s1._domainkey.example.test": [("TXT", long_txt)],
            "mx1.example.test": [("A", "127.0.0.1")],
        }
    )
    r = resolver(dns_server)
    mx = r.resolve("example.test", "MX")
    assert [str(x.exchange) for x in mx] == ["mx1.example.test."]
    assert mx.rrset is not None and mx.rrset.ttl == 60
    txt = r.resolve("s1._domainkey.example.test", "TXT")
    assert b"".join(next(iter(txt)).strings).decode() == long_txt
    with pytest.raises(dns.resolver.NXDOMAIN):
        r.resolve("nope.test", "A")
    with pytest.raises(dns.resolver.NoAnswer):
        r.resolve("mx1.example.test", "MX")
