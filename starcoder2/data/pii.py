"""PII redaction, BigCode's regex + detect-secrets path (data-pipeline.md §3.8), as pure functions.

    spans = find_pii(text)                                   # EMAIL, IP_ADDRESS, KEY, PASSWORD
    text = redact(text, spans, seed_key="owner/repo/a.py")
    doc, counts = redact_document(doc)                       # both at once, counts per kind

Detection: a delimited e-mail regex (example.com/org/net kept); IPv4/IPv6 validated by `ipaddress`
with the reference's guards (a digit, not a date, `x.x.x.x` is a version unless "dns"/"server" is
near), non-global addresses and popular DNS resolvers kept; the reference's 18 detect-secrets plugins
and 4 filters, run in memory on the lines that hold a candidate token (a >= 9 character run with a
digit, or a quoted letter run of >= 20), plus a not-a-hash guard; regexes for token shapes that must
never slip through (AWS key ids, GitHub and Slack tokens, private key blocks); and `password = "..."`
style literals (PASSWORD). Replacements are the NER path's placeholders `<EMAIL>`, `<KEY>`,
`<PASSWORD>`; an IP becomes one of 5 synthetic private addresses of its family, chosen by hashing
`seed_key` and the value. About 3-6 MB/s on CPython's stdlib sources (one core).

The plugins are built and called directly rather than through `transient_settings` + `scan_line`:
scan_line's eager search drops the entropy limit on unquoted strings, and the settings object is
process-global. Left out: the StarPII NER model (gated weights, GPU inference; NAME and USERNAME are
therefore not redacted), the gibberish-detector check on keys (needs a trained model file), the
reference's file-level "hash-heavy file" skip (any "sha" in a short file, e.g. "shape", turned key
detection off), and random replacement e-mails/keys (placeholders are idempotent; random ones are not).
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from starcoder2.data.document import Document

KINDS = ("EMAIL", "IP_ADDRESS", "KEY", "PASSWORD")
PLACEHOLDERS = {"EMAIL": "<EMAIL>", "KEY": "<KEY>", "PASSWORD": "<PASSWORD>"}
SYNTHETIC_IPS = {  # bigcode-dataset pii/replacements.json: private addresses, never real hosts
    4: ("172.16.31.10", "172.16.58.3", "172.16.17.32", "192.168.127.12", "192.168.3.11"),
    6: ("fd00:c2b6:b24b:be67:2827:688d:e6a1:6a3b", "fd00:a516:7c1b:17cd:6d81:2137:bd2a:2c5b",
        "fc00:e968:6179::de52:7100", "fc00:db20:35b:7399::5", "fdf8:f53e:61e4::18"),
}
POPULAR_DNS_SERVERS = frozenset(ipaddress.ip_address(a) for a in (  # the reference's 14, + IPv6 forms
    "8.8.8.8", "8.8.4.4", "1.1.1.1", "1.0.0.1", "76.76.19.19", "76.223.122.150", "9.9.9.9",
    "149.112.112.112", "208.67.222.222", "208.67.220.220", "8.26.56.26", "8.20.247.20",
    "94.140.14.14", "94.140.15.15", "2001:4860:4860::8888", "2001:4860:4860::8844",
    "2606:4700:4700::1111", "2606:4700:4700::1001", "2620:fe::fe", "2620:fe::9",
    "2620:119:35::35", "2620:119:53::53"))
PLUGINS = (  # bigcode-dataset pii/utils/keys_detection.py (keyword, basic-auth, private-key off)
    "ArtifactoryDetector", "AWSKeyDetector", "Base64HighEntropyString", "HexHighEntropyString",
    "AzureStorageKeyDetector", "CloudantDetector", "DiscordBotTokenDetector", "GitHubTokenDetector",
    "IbmCloudIamDetector", "IbmCosHmacDetector", "JwtTokenDetector", "MailchimpDetector", "NpmDetector",
    "SendGridDetector", "SlackDetector", "SoftlayerDetector", "StripeDetector", "TwilioKeyDetector")

# Delimiters: a match must start after one of these (or at the start) and end before one. "[" is not a
# left delimiter so that Python slices like x[1::2] are not IPv6 addresses.
_L = r"""(?<![^\s@?,!;:'"()<>=/`])"""
_R = r"""(?=\Z|[\s@?,!;:'"()<>/\]`]|\.(?!\w))"""
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_IPV4 = rf"{_OCTET}(?:\.{_OCTET}){{3}}"
_IPV6 = rf"(?:[0-9A-Fa-f]{{0,4}}:){{2,7}}(?:[0-9A-Fa-f]{{1,4}}|{_IPV4})?"  # a candidate; ipaddress decides
# A leading lookahead on a character class lets `re` skip positions fast (about 3x on source code).
_IP = re.compile(rf"(?=[0-9A-Fa-f:]){_L}({_IPV4}|{_IPV6}){_R}")
_DATE = re.compile(r"[12]\d{3}[-/.][0-3]\d[-/.][0-3]\d|[0-3]\d[-/.][0-3]\d[-/.](?:[12]\d{3}|\d\d)|[12]\d{3}[-/][12]\d{3}")
_EMAIL = re.compile(r"""(?<![^\s@,?!;:)('".<>\[\]{}=/`])([^\s@?!;,:)('"<>\[\]{}=/`]+@[^\s@!?;,/]*"""
                    r"""[^\s@?!;,/:)('">.]\.[^\W\d_]\w+)(?=\Z|[\s@,?!;:)('".>\]}`])""")
_TOKENS = re.compile(  # shapes that are secrets whatever detect-secrets says
    r"(?=[Agx-])\b(?:(?:AKIA|ASIA|ABIA|ACCA|A3T[A-Z0-9])[0-9A-Z]{16}|gh[pousr]_[A-Za-z0-9_]{36,251}"
    r"|github_pat_[A-Za-z0-9_]{22,255}|xox[abposr]-[A-Za-z0-9-]{10,})\b"
    r"|-----BEGIN[ A-Z0-9]*PRIVATE KEY[ A-Z]*-----(?:.*?-----END[ A-Z0-9]*PRIVATE KEY[ A-Z]*-----"
    r"|(?:(?:\s|\\n)+[A-Za-z0-9+/=]{16,})*)", re.DOTALL)  # no END: the base64 lines that follow
_PASSWORD = re.compile(  # keyword ending an identifier, optional ": type", an assignment, a literal
    r"(?=[PpSsAa])(?<![a-z])(?i:pass(?:word|wd|phrase)?|pwd|secret(?:[_-]?(?:access[_-]?)?key)?|api[_-]?key"
    r"|(?:access|auth)[_-]?token)['\"]?(?:\s*:\s*[\w.\[\]]+)?\s*(?::=|=>|=(?!=)|:)\s*[rbuRBU]?(['\"])([^\s'\"]*)\1")
_TEMPLATE = re.compile(r"\{.*\}|\$\w|%[(\w]|^<.*>$")  # {{x}}, {x}, ${x}, $X, %s, %(x)s, <PLACEHOLDER>
_C = "A-Za-z0-9+/=_-"  # base64 + url-safe alphabet: what a key is written with
_CANDIDATE = re.compile(rf"(?<![{_C}])(?=[{_C}]{{9}})[A-Za-z+/=_-]*\d[{_C}]*|['\"][A-Za-z+/=_-]{{20,}}['\"]")
_HASH_WORDS = ("sha", "md5", "hash", "byte")  # a hex key of a digest's length near these is a digest


@dataclass(frozen=True, kw_only=True)
class PIIConfig:
    emails: bool = True
    ip_addresses: bool = True
    keys: bool = True  # token-shape regexes, plus detect-secrets when `detect_secrets`
    passwords: bool = True
    detect_secrets: bool = True
    base64_limit: float = 4.5  # Shannon entropy (bits/char) above which a quoted base64 string is a key
    hex_limit: float = 3.0  # the same for hex strings (detect-secrets defaults)
    min_password_length: int = 4
    version_context: int = 100  # chars either side searched for "dns"/"server" around an x.x.x.x

    def __post_init__(self):
        for name in ("base64_limit", "hex_limit"):
            if not 0.0 <= getattr(self, name) <= 8.0:
                raise ValueError(f"{name}={getattr(self, name)} must be in [0, 8] bits per character")
        if self.min_password_length < 1:
            raise ValueError(f"min_password_length={self.min_password_length} must be >= 1")


@dataclass(frozen=True)
class Span:
    start: int
    end: int
    kind: str  # one of KINDS
    value: str


def find_pii(text: str, config: PIIConfig = PIIConfig()) -> list[Span]:
    """Every PII span in `text`, sorted by start; spans may overlap (redact() resolves that)."""
    spans = []
    if config.emails and "@" in text:
        spans += [Span(*m.span(1), "EMAIL", m[1]) for m in _EMAIL.finditer(text) if not _is_example(m[1])]
    if config.ip_addresses:
        spans += [Span(*m.span(1), "IP_ADDRESS", m[1]) for m in _IP.finditer(text) if _is_public_ip(text, m, config)]
    if config.keys:
        spans += [Span(*m.span(), "KEY", m[0]) for m in _TOKENS.finditer(text)]
        if config.detect_secrets:
            spans += _detect_secrets(text, config)
    if config.passwords:
        spans += [Span(*m.span(2), "PASSWORD", m[2]) for m in _PASSWORD.finditer(text)
                  if len(m[2]) >= config.min_password_length and not _TEMPLATE.search(m[2])]
    return sorted(spans, key=lambda s: (s.start, -s.end))


def _is_example(email: str) -> bool:  # RFC 2606 example domains: already anonymous
    return re.search(r"[@.]example\.(?:com|org|net)$", email, re.IGNORECASE) is not None


def _is_public_ip(text: str, m: re.Match, config: PIIConfig) -> bool:
    value = m[1]
    if not any(ch.isdigit() for ch in value) or _DATE.fullmatch(value):
        return False
    if len(value) == 7 and value.count(".") == 3:  # 1.2.3.4 is a version, unless near "dns"/"server"
        context = text[max(0, m.start(1) - config.version_context): m.end(1) + config.version_context].lower()
        if "dns" not in context and "server" not in context:
            return False
    try:
        ip = ipaddress.ip_address(value)
    except ValueError:
        return False
    local = ip.is_multicast or ip.is_reserved or ip.is_link_local or getattr(ip, "is_site_local", False)
    return ip.is_global and not local and ip not in POPULAR_DNS_SERVERS


@functools.lru_cache(maxsize=4)
def _plugins(base64_limit: float, hex_limit: float) -> tuple:
    from detect_secrets.core.plugins.util import get_mapping_from_secret_type_to_class

    classes = {c.__name__: c for c in get_mapping_from_secret_type_to_class().values()}
    limits = {"Base64HighEntropyString": base64_limit, "HexHighEntropyString": hex_limit}
    return tuple(classes[n](limit=limits[n]) if n in limits else classes[n]() for n in PLUGINS)


def _candidate_lines(text: str) -> Iterator[tuple[int, str]]:
    """(offset, line) of each line holding a candidate token; linear even for one huge line."""
    next_line = 0
    for m in _CANDIDATE.finditer(text):
        if m.start() < next_line:
            continue
        start = text.rfind("\n", next_line, m.start()) + 1 or next_line
        end = text.find("\n", m.end())
        end = len(text) if end < 0 else end
        next_line = end + 1
        yield start, text[start:end]


def _detect_secrets(text: str, config: PIIConfig) -> list[Span]:
    from detect_secrets.filters import heuristic as h  # the reference's 4 filters, called directly

    plugins, spans = _plugins(config.base64_limit, config.hex_limit), []
    for offset, line in _candidate_lines(text):
        line = line.rstrip()
        low = line.lower()
        values = {s.secret_value for p in plugins for s in p.analyze_line(filename="<memory>", line=line)
                  if len(s.secret_value or "") >= 8 and not (  # GitHubTokenDetector yields its group, "ghp"
                      h.is_potential_uuid(s.secret_value) or h.is_likely_id_string(s.secret_value, line, p)
                      or h.is_templated_secret(s.secret_value) or h.is_sequential_string(s.secret_value))}
        for value in values:
            is_hex = re.fullmatch(r"[0-9a-fA-F]+", value) is not None
            if is_hex and len(value) in (32, 40, 56, 64, 96, 128) and any(w in low for w in _HASH_WORDS):
                continue  # a digest, not a key
            i = line.find(value)
            while i >= 0:
                spans.append(Span(offset + i, offset + i + len(value), "KEY", value))
                i = line.find(value, i + len(value))
    return spans


def merge_spans(text: str, spans: Iterable[Span]) -> list[Span]:
    """Sorted, non-overlapping spans: overlapping ones become their union, with the longer one's kind."""
    out: list[Span] = []
    for s in sorted(spans, key=lambda s: (s.start, -s.end)):
        if out and s.start < out[-1].end:
            prev = out[-1]
            kind = prev.kind if prev.end - prev.start >= s.end - s.start else s.kind
            end = max(prev.end, s.end)
            out[-1] = Span(prev.start, end, kind, text[prev.start:end])
        else:
            out.append(s)
    return out


def _replacement(span: Span, seed_key: str) -> str:
    if span.kind != "IP_ADDRESS":
        return PLACEHOLDERS[span.kind]
    digest = hashlib.sha256(f"{seed_key}\0{span.value}".encode("utf-8", "surrogatepass")).digest()
    return SYNTHETIC_IPS[6 if ":" in span.value else 4][digest[0] % 5]


def redact(text: str, spans: Iterable[Span], *, seed_key: str) -> str:
    """Splice replacements into `text`; the same value gets the same replacement for one `seed_key`."""
    parts, pos = [], 0
    for s in merge_spans(text, spans):
        parts += [text[pos:s.start], _replacement(s, seed_key)]
        pos = s.end
    return "".join(parts) + text[pos:]


def redact_document(doc: Document, config: PIIConfig = PIIConfig()) -> tuple[Document, dict[str, int]]:
    """The redacted document and the number of redacted spans per kind."""
    spans = merge_spans(doc.text, find_pii(doc.text, config))
    counts = dict.fromkeys(KINDS, 0)
    for s in spans:
        counts[s.kind] += 1
    if not spans:
        return doc, counts
    return doc.with_(text=redact(doc.text, spans, seed_key=f"{doc.repo}/{doc.path}")), counts
