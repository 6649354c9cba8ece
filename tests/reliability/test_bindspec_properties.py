"""Properties of the bind-spec parser (hypothesis): canonical texts, and nothing but BindSpecError.

Every generated valid spec (each scheme, hosts, ports, paths, fds, systemd names, allow-lists
written in any accepted way) parses to the parts it was built from, and its canonical text
parses to the same spec with the same text. Arbitrary and mutated text either parses, and then
round-trips, or raises BindSpecError: never another exception. Ports outside 0..65535 and hosts
that are neither names nor addresses are refused.
"""

from __future__ import annotations

import ipaddress
import os
from typing import Any

import pytest
from hypothesis import given, settings, strategies as st

from prefork.bindspec import BindSpec, parse_bind, split_bind_list
from prefork.errors import BindSpecError

pytestmark = pytest.mark.reliability

_SCHEME_WORDS = {"tcp", "udp", "fd", "unix", "unix-dgram", "systemd"}

_hostnames = st.from_regex(r"[A-Za-z0-9_.-]{1,60}", fullmatch=True).filter(lambda h: h.lower() not in _SCHEME_WORDS)
_ipv4 = st.ip_addresses(v=4)
_ipv6 = st.ip_addresses(v=6)
_ports = st.integers(0, 65535)
_fdnames = st.from_regex(r"[\x20-\x39\x3b-\x7e]{1,40}", fullmatch=True).filter(lambda n: "?allow=" not in n)


def _encodable(path: str) -> bool:
    try:
        return len(os.fsencode(path)) <= 107
    except UnicodeError:
        return False


_paths = st.text(min_size=1, max_size=80).filter(
    lambda p: "\0" not in p and "?allow=" not in p and p != "//" and _encodable(p))


@st.composite
def networks(draw: Any) -> tuple[str, Any]:
    """(text as a user may write it, the network it means)."""
    address = draw(st.one_of(_ipv4, _ipv6))
    prefix = draw(st.integers(0, address.max_prefixlen))
    network = ipaddress.ip_network(f"{address}/{prefix}", strict=False)
    forms = [str(network), f"{network.network_address.exploded}/{prefix}"]
    if prefix == network.max_prefixlen:
        forms.append(str(network.network_address))  # a bare address is a /32 or /128
    if network.version == 4:
        forms.append(f"{network.network_address}/{network.netmask}")
    return draw(st.sampled_from(forms)), network


@st.composite
def allow_lists(draw: Any) -> tuple[str, frozenset[Any]]:
    """'' (no list), or '?allow=' with networks in any order, some given twice."""
    if draw(st.booleans()):
        return "", frozenset()
    listed = draw(st.lists(networks(), min_size=1, max_size=6))
    texts = [text for text, _ in listed]
    texts += draw(st.lists(st.sampled_from(texts), max_size=2))  # duplicates collapse
    return "?allow=" + ",".join(draw(st.permutations(texts))), frozenset(n for _, n in listed)


@st.composite
def valid_specs(draw: Any) -> tuple[str, str, Any, frozenset[Any]]:
    """(spec text, scheme, address, networks) of a valid spec of any form."""
    kind = draw(st.sampled_from(["tcp", "udp", "bare", "unix", "unix-dgram", "fd", "systemd"]))
    if kind in ("unix", "unix-dgram"):
        path = draw(_paths)
        slashes = draw(st.booleans())
        address = path if slashes or not path.startswith("//") else path[2:]
        return f"{kind}:{'//' if slashes else ''}{path}", kind, address, frozenset()
    query, allowed = draw(allow_lists())
    if kind == "fd":
        fd = draw(st.integers(0, 2**31 - 1))
        zeros = draw(st.integers(0, min(2, 10 - len(str(fd)))))  # at most 10 digits in all
        return f"fd://{'0' * zeros}{fd}{query}", "fd", fd, allowed
    if kind == "systemd":
        name = draw(st.none() | _fdnames)
        return ("systemd" if name is None else f"systemd:{name}") + query, "systemd", name, allowed
    host, shown = draw(st.one_of(
        _ipv4.map(lambda a: (str(a), str(a))),
        _ipv6.map(lambda a: (str(a), f"[{a.exploded if a.version == 6 else a}]")),
        _hostnames.map(lambda h: (h, h)),
    ))
    port = draw(_ports)
    prefix = {"tcp": draw(st.sampled_from(["tcp://", "TCP://"])), "udp": "udp://", "bare": ""}[kind]
    return f"{prefix}{shown}:{port}{query}", "udp" if kind == "udp" else "tcp", (host, port), allowed


@given(valid_specs())
@settings(max_examples=400)
def test_every_valid_spec_parses_to_its_parts_and_its_canonical_text_round_trips(case: Any) -> None:
    text, scheme, address, allowed = case
    spec = parse_bind(text)
    assert (spec.scheme, spec.address, frozenset(spec.allow)) == (scheme, address, allowed)
    again = parse_bind(spec.text)
    assert again == spec and again.text == spec.text  # the text is canonical: a fixed point
    assert len(set(spec.allow)) == len(spec.allow)
    assert list(spec.allow) == sorted(spec.allow, key=lambda n: (n.version, int(n.network_address), n.prefixlen))
    assert parse_bind(spec.address_text) == BindSpec(spec.scheme, spec.address, spec.address_text)


def _unsayable_in_a_list(text: str) -> bool:
    """A spec whose own text holds a comma (or edge spaces), which a comma-separated list cannot say."""
    if text.startswith("unix"):
        return "," in text or text != text.strip()  # all of it is the path, '?' included
    if text.startswith("systemd"):
        return "," in text.partition("?allow=")[0]  # the name; the allow-list's commas are handled
    return False


@given(st.lists(valid_specs(), min_size=1, max_size=4))
def test_a_comma_separated_list_of_canonical_specs_splits_back_into_them(cases: Any) -> None:
    texts = [parse_bind(text).text for text, *_ in cases]
    if any(_unsayable_in_a_list(text) for text in texts):
        return  # a Unix path or systemd name may hold a comma or edge spaces; the list cannot say them
    assert split_bind_list(",".join(texts)) == texts


def _parses_or_refuses(text: str) -> None:
    try:
        spec = parse_bind(text)
    except BindSpecError as exc:
        assert repr(text) in str(exc)  # the message names the spec
        return
    assert parse_bind(spec.text) == spec


@given(st.text(max_size=80) | st.text(alphabet="tcpudfsyemnix-:/[]%?&=,allow0123456789.abcdef ", max_size=60))
@settings(max_examples=600)
def test_arbitrary_text_parses_or_raises_bindspecerror_only(text: str) -> None:
    _parses_or_refuses(text)


@given(valid_specs(), st.data())
@settings(max_examples=400)
def test_mutated_valid_specs_parse_or_raise_bindspecerror_only(case: Any, data: Any) -> None:
    text = case[0]
    for _ in range(data.draw(st.integers(1, 3))):
        at = data.draw(st.integers(0, len(text)))
        action = data.draw(st.sampled_from(["insert", "delete", "replace"]))
        piece = data.draw(st.sampled_from(list(":/[]?=,.%@ ") + ["?allow=", "//", "::", "/33", "\0", "é"])
                          | st.characters())
        if action == "insert":
            text = text[:at] + piece + text[at:]
        elif action == "delete":
            text = text[:at] + text[at + 1:]
        else:
            text = text[:at] + piece + text[at + 1:]
    _parses_or_refuses(text)


_bad_ports = st.integers(65536, 10**30) | st.integers(-(10**30), -1)


@given(scheme=st.sampled_from(["tcp://", "udp://", ""]), host=st.one_of(_ipv4.map(str), _hostnames), port=_bad_ports)
def test_ports_outside_0_to_65535_are_refused(scheme: str, host: str, port: int) -> None:
    with pytest.raises(BindSpecError, match="is not a number from 0 to 65535"):
        parse_bind(f"{scheme}{host}:{port}")


_HOSTNAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")
# A host with a character no host name has; ':' and '?' are left out, since they end the host
# (HOST:PORT, ?allow=), and '[' at the start opens an IPv6 address.
_bad_hosts = st.text(min_size=1, max_size=30).filter(
    lambda h: any(c not in _HOSTNAME_CHARS for c in h) and ":" not in h and "?" not in h and not h.startswith("["))


@given(scheme=st.sampled_from(["tcp://", "udp://"]), host=_bad_hosts, port=_ports)
def test_hosts_that_are_not_names_or_addresses_are_refused(scheme: str, host: str, port: int) -> None:
    with pytest.raises(BindSpecError):
        parse_bind(f"{scheme}{host}:{port}")


@given(scheme=st.sampled_from(["tcp://", "udp://"]),
       host=st.text(alphabet="0123456789abcdefgxyz:.%", min_size=1, max_size=45), port=_ports)
def test_bracketed_hosts_must_be_ipv6_addresses(scheme: str, host: str, port: int) -> None:
    try:
        valid = ipaddress.IPv6Address(host)
    except ValueError:
        with pytest.raises(BindSpecError, match="is not an IPv6 address"):
            parse_bind(f"{scheme}[{host}]:{port}")
    else:
        assert parse_bind(f"{scheme}[{host}]:{port}").address == (str(valid), port)


@given(scheme=st.sampled_from(["tcp://", "udp://"]), host=st.from_regex(r"[a-z]{254,300}", fullmatch=True))
@settings(max_examples=20)
def test_host_names_longer_than_dns_allows_are_refused(scheme: str, host: str) -> None:
    with pytest.raises(BindSpecError, match="is not a host name"):
        parse_bind(f"{scheme}{host}:80")


@given(item=st.text(min_size=1, max_size=50).filter(lambda t: "," not in t))
@settings(max_examples=400)
def test_an_allow_list_item_is_a_network_or_a_bindspecerror_naming_it(item: str) -> None:
    text = f"tcp://127.0.0.1:80?allow={item}"
    try:
        network = ipaddress.ip_network(item)
    except ValueError:
        with pytest.raises(BindSpecError) as caught:
            parse_bind(text)
        assert repr(text) in str(caught.value)
        return
    if "%" in item or not item.isascii():
        with pytest.raises(BindSpecError):
            parse_bind(text)  # zones and non-ASCII digits are refused, even where ipaddress takes them
        return
    assert parse_bind(text).allow == (network,)


@given(path=_paths, networks=st.lists(networks(), min_size=1, max_size=3))
def test_unix_specs_refuse_an_allow_list(path: str, networks: Any) -> None:
    for scheme in ("unix", "unix-dgram"):
        text = f"{scheme}:{path}?allow={','.join(t for t, _ in networks)}"
        with pytest.raises(BindSpecError, match="allow= does not apply to Unix sockets"):
            parse_bind(text)
