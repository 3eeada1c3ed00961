"""Find the hosts that receive mail for a domain: its MX records, in the order to try them.

The job: turn a peer domain into an ordered list of MX hosts, each with its addresses, or into
a failure value saying why no host can be tried.  It follows RFC 5321 §5.1:

- MX records are sorted by preference; hosts of equal preference are tried in random order.
- A domain without MX records (an empty answer) has an implicit MX: the domain itself.
- If our own host name (``operator.hostname``) is among the MX hosts, that record and every
  less preferred one are dropped, so that mail never loops back to us.
- Each MX host is resolved to its addresses, IPv4 (A) first, then IPv6 (AAAA); a host without
  any address is skipped.

DNS answers are cached for their TTL (``dns.resolver.Cache``), so a burst of messages to one
domain asks the nameservers once.  The resolver is ``relay.nameservers`` (each ``IP`` or
``IP:PORT``, every nameserver with its own port), or the system's (``/etc/resolv.conf``) when
that list is empty; ``relay.dns_timeout`` bounds each lookup.

Errors are values (``MxFailure``), never exceptions, with the reply code and the RFC 3463
enhanced status code the queue records and the DSN reports:

- null MX (RFC 7505: the only MX is "0 .") → 556 5.1.10, permanent;
- the domain does not exist (NXDOMAIN) → 550 5.1.2 "bad destination system address": RFC 3463
  §3.2 uses X.1.2 when the host part of the address does not exist or cannot accept mail;
- neither the MX hosts nor the implicit MX have an address → 550 5.4.4 "unable to route";
- our own host name is the best MX → 554 5.4.6 "routing loop detected";
- timeout, SERVFAIL, no nameserver answered, no resolver configuration → 451 4.4.3 "directory
  server failure" (RFC 3463 §3.5), temporary: the queue tries again later.
"""

from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver

from gateway.config import Settings, parse_nameserver

__all__ = ["MxFailure", "MxHost", "MxResolver"]

log = logging.getLogger("mssgw.delivery.mx")

MAX_ADDRESSES = 10  # addresses tried per delivery attempt, all MX hosts together (bounds the time spent)


@dataclass(frozen=True)
class MxFailure:
    """Why no MX host can be tried: the reply the recipients get."""

    code: int
    enhanced: str
    text: str

    @property
    def permanent(self) -> bool:
        return self.code >= 500


@dataclass(frozen=True)
class MxHost:
    """One host to try: its name (the one its certificate must carry) and its addresses."""

    name: str
    preference: int
    addresses: tuple[str, ...]
    implicit: bool = False


def _null_mx(domain: str) -> MxFailure:
    return MxFailure(556, "5.1.10", f"{domain} accepts no mail (null MX)")


def _no_such_domain(domain: str) -> MxFailure:
    return MxFailure(550, "5.1.2", f"{domain} does not exist (NXDOMAIN)")


def _dns_failure(what: str, exc: BaseException, timeout: float) -> MxFailure:
    return MxFailure(451, "4.4.3", f"DNS lookup of {what} failed: {_why(exc, timeout)}")


def _why(exc: BaseException, timeout: float) -> str:
    if isinstance(exc, dns.exception.Timeout):
        return f"no answer within {timeout:g} s"
    if isinstance(exc, dns.resolver.NoNameservers):
        return "no nameserver answered (SERVFAIL or refused)"
    if isinstance(exc, dns.resolver.NoResolverConfiguration):
        return "no nameserver configured"
    return (str(exc).strip() or type(exc).__name__)[:200]


class MxResolver:
    """MX lookups with a TTL cache; one per relay, its resolver made on first use."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.nameservers = [parse_nameserver(n, "relay.nameservers") for n in settings.relay.nameservers]
        self.timeout = settings.relay.dns_timeout
        self._resolver: dns.asyncresolver.Resolver | None = None

    def resolver(self) -> dns.asyncresolver.Resolver:
        """The asyncio resolver (made once); raises ``NoResolverConfiguration`` without nameservers."""
        if self._resolver is None:
            if self.nameservers:
                res = dns.asyncresolver.Resolver(configure=False)
                res.nameservers = [dns.nameserver.Do53Nameserver(addr, port) for addr, port in self.nameservers]
            else:
                res = dns.asyncresolver.Resolver()
            res.lifetime = self.timeout
            res.timeout = min(res.timeout, self.timeout)
            res.cache = dns.resolver.Cache()
            self._resolver = res
        return self._resolver

    async def hosts(self, domain: str) -> list[MxHost] | MxFailure:
        """The hosts to try for ``domain``, most preferred first, or why there are none."""
        domain = domain.rstrip(".").lower()
        try:
            res = self.resolver()
            answer = await res.resolve(domain, "MX", search=False)
            records = [(int(r.preference), r.exchange) for r in answer]
        except dns.resolver.NXDOMAIN:
            return _no_such_domain(domain)
        except dns.resolver.NoAnswer:
            records = []
        except dns.exception.SyntaxError:
            return MxFailure(550, "5.1.2", f"{domain!r} is not a valid domain name")
        except dns.exception.DNSException as exc:
            return _dns_failure(f"MX of {domain}", exc, self.timeout)

        if not records:  # RFC 5321 §5.1: the implicit MX
            addresses, problem = await self._addresses(domain)
            if addresses:
                return [MxHost(domain, 0, addresses[:MAX_ADDRESSES], implicit=True)]
            if problem:
                return MxFailure(451, "4.4.3", f"DNS lookup of {domain}'s address failed: {problem}")
            return MxFailure(550, "5.4.4", f"{domain} has no MX record and no address")

        real = [(pref, name) for pref, name in records if name != dns.name.root]
        if not real:  # RFC 7505 §3: "0 ." alone (a second "." changes nothing)
            return _null_mx(domain)
        random.shuffle(real)  # RFC 5321 §5.1: equal preferences in random order
        real.sort(key=lambda r: r[0])
        names = [(pref, name.to_text(omit_final_dot=True).lower()) for pref, name in real]

        own = self.settings.hostname.rstrip(".").lower()
        mine = [pref for pref, name in names if name == own]
        if mine:  # RFC 5321 §5.1: discard our own record and every less preferred one
            names = [(pref, name) for pref, name in names if pref < min(mine)]
            if not names:
                return MxFailure(554, "5.4.6", f"routing loop: {own} (this gateway) is the best MX of {domain}")

        resolved = await asyncio.gather(*(self._addresses(name) for _, name in names))
        hosts: list[MxHost] = []
        problems: list[str] = []
        budget = MAX_ADDRESSES
        for (pref, name), (addresses, problem) in zip(names, resolved, strict=True):
            if problem:
                problems.append(f"{name}: {problem}")
            if addresses and budget > 0:
                hosts.append(MxHost(name, pref, addresses[:budget]))
                budget -= len(hosts[-1].addresses)
            elif not addresses:
                log.info("MX host %s of %s has no address%s", name, domain, f" ({problem})" if problem else "")
        if hosts:
            return hosts
        if problems:
            return MxFailure(451, "4.4.3", f"DNS lookup of the MX hosts of {domain} failed: {'; '.join(problems)}"[:500])
        return MxFailure(550, "5.4.4", f"no MX host of {domain} has an address")

    async def _addresses(self, name: str) -> tuple[tuple[str, ...], str | None]:
        """IPv4 then IPv6 addresses of ``name``, and the reason of a temporary lookup failure."""
        res = self.resolver()
        found: list[str] = []
        problem: str | None = None
        answers = await asyncio.gather(*(res.resolve(name, rdtype, search=False) for rdtype in ("A", "AAAA")),
                                       return_exceptions=True)  # fmt: skip
        for answer in answers:
            if isinstance(answer, dns.resolver.NXDOMAIN | dns.resolver.NoAnswer | dns.exception.SyntaxError):
                continue
            if isinstance(answer, BaseException):
                if not isinstance(answer, Exception):
                    raise answer  # cancellation and the like pass through
                problem = problem or _why(answer, self.timeout)
                continue
            found.extend(r.to_text() for r in answer)
        return tuple(dict.fromkeys(found)), problem

