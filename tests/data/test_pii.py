import importlib
import inspect

import pytest

from starcoder2.data.document import Document
from starcoder2.data.pii import (
    SYNTHETIC_IPS, PIIConfig, Span, find_pii, merge_spans, redact, redact_document)

AWS = "AKIAZ7X2Q4MVN3W8KPLR"
GITHUB = "ghp_aB3dE5fG7hI9jK1lM3nO5pQ7rS9tU1vW3xY5"
SLACK = "xoxb-2048-17761-Zk3pQ9vT2mLp8RzK"
BASE64 = "q8Zr3LxV0pN6wT2yB9mF4hK7sD1gJ5cA"  # 32 distinct characters: 5 bits/char > 4.5
HEX = "f3a9c1e7b5d2048c"
PRIVATE_KEY = "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEAvJ8k2\nq3x9Zr/Lp0+W==\n-----END RSA PRIVATE KEY-----"
SECRETS = {
    "EMAIL": ["alice.smith@acme-corp.com", "bob@mail.uni-hamburg.de"],
    "IP_ADDRESS": ["93.184.216.34", "2a00:1450:4001:82a::200e", "140.82.112.3"],
    "KEY": [AWS, GITHUB, SLACK, BASE64, HEX, PRIVATE_KEY],
    "PASSWORD": ["hunter2!x", "s3cr3t-k3y-42"],
}
PLANTED = f'''"""Deploy helper. Maintainer: Alice <alice.smith@acme-corp.com>, cc bob@mail.uni-hamburg.de."""
import boto3

HOST = "93.184.216.34"  # production, see also 2a00:1450:4001:82a::200e
MIRROR = "https://140.82.112.3/releases"
AWS_ACCESS_KEY_ID = "{AWS}"
GITHUB_TOKEN = "{GITHUB}"
SLACK = "{SLACK}"
SIGNING = "{BASE64}"
NONCE = '{HEX}'
password = "hunter2!x"
config = {{"db_password": "hunter2!x", "secret_key": 's3cr3t-k3y-42'}}
KEY = """{PRIVATE_KEY}"""
'''
ORDINARY = '''__version__ = "1.2.3.4"
LOCALHOST = "127.0.0.1"; ANY = "0.0.0.0"; LAN = "10.0.0.7"; V6 = "::1"; DOC = "2001:db8::1"
RESOLVER = "8.8.8.8"  # Google dns, left alone: a well-known public resolver
released = "2023-01-02"; stamp = "12:30:45"; mac = "00:1a:2b:3c:4d:5e"
COLOURS = ["#a1b2c3", "#ffffff", 0xdeadbeef]
checksum_sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
REQUEST_ID = "123e4567-e89b-12d3-a456-426614174000"
evens, odds = xs[::2], xs[1::2]
y = a @ b.T
password = ""; passwd = "{{ vault_pass }}"; pwd = "${DB_PASS}"; secret = "%s"; pass_ = "abc"
password = os.environ["DB_PASSWORD"]
author = "someone@example.com"
'''
MODULES = ["json.decoder", "json.encoder", "string", "functools", "collections", "ipaddress", "datetime"]


def test_planted_secrets_are_found_and_redacted():
    spans = find_pii(PLANTED)
    for kind, values in SECRETS.items():
        found = {s.value for s in spans if s.kind == kind}
        assert set(values) <= found, (kind, set(values) - found)
    out = redact(PLANTED, spans, seed_key="owner/repo/deploy.py")
    for values in SECRETS.values():
        for value in values:
            assert value not in out, value
    assert "PRIVATE KEY" not in out and "MIIEowIBAAKCAQEAvJ8k2" not in out
    assert out.count("<EMAIL>") == 2 and out.count("<PASSWORD>") == 3 and "<KEY>" in out
    assert 'AWS_ACCESS_KEY_ID = "<KEY>"' in out and 'NONCE = \'<KEY>\'' in out
    assert any(f'HOST = "{ip}"' in out for ip in SYNTHETIC_IPS[4])
    assert any(f"also {ip}\n" in out for ip in SYNTHETIC_IPS[6])
    assert out.startswith('"""Deploy helper.') and out.endswith('"""\n') and "import boto3" in out


def test_ordinary_code_is_untouched():
    assert find_pii(ORDINARY) == []
    for name in MODULES:
        source = inspect.getsource(importlib.import_module(name))
        assert find_pii(source) == [], name
        assert redact_document(Document(text=source, repo="cpython", path=name))[0].text == source


def test_version_like_address_counts_near_dns_or_server():
    assert find_pii('VERSION = "1.2.3.4"') == []
    assert [s.value for s in find_pii('dns_server = "1.2.3.4"')] == ["1.2.3.4"]
    far = 'dns = 1\n' + "x = 0\n" * 30 + 'v = "1.2.3.4"'
    assert find_pii(far) == []


def test_not_a_hash_guard_and_detect_secrets_filters():
    digest = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
    assert find_pii(f'EXPECTED_SHA256 = "{digest}"') == []
    assert [s.kind for s in find_pii(f'TOKEN = "{digest}"')] == ["KEY"]  # same string, no hash word
    assert find_pii('user_id = "8f3a9c1e7b5d2048"') == []  # is_likely_id_string
    assert find_pii('B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"') == []  # is_sequential_string


def test_config_switches_kinds_and_detect_secrets():
    kinds = lambda **kw: {s.kind for s in find_pii(PLANTED, PIIConfig(**kw))}
    assert kinds(emails=False, ip_addresses=False) == {"KEY", "PASSWORD"}
    assert kinds(keys=False, passwords=False) == {"EMAIL", "IP_ADDRESS"}
    values = {s.value for s in find_pii(PLANTED, PIIConfig(detect_secrets=False))}
    assert {AWS, GITHUB, SLACK} <= values and PRIVATE_KEY in values  # token shapes need no plugin
    assert BASE64 not in values and HEX not in values  # entropy keys do
    assert {s.value for s in find_pii(f'S = "{BASE64}"', PIIConfig(base64_limit=5.5))} == set()
    for bad in (dict(base64_limit=9.0), dict(hex_limit=-1.0), dict(min_password_length=0)):
        with pytest.raises(ValueError):
            PIIConfig(**bad)


def test_same_value_same_replacement_within_a_file_and_files_may_differ():
    text = "a = 93.184.216.34\nb = 140.82.112.3\nc = 93.184.216.34\nd = 2a00:1450:4001:82a::200e\n"
    out = redact(text, find_pii(text), seed_key="o/r/x.py").splitlines()
    assert out[0][4:] == out[2][4:] and out[0][4:] in SYNTHETIC_IPS[4] and out[3][4:] in SYNTHETIC_IPS[6]
    assert redact(text, find_pii(text), seed_key="o/r/x.py").splitlines() == out  # deterministic
    per_file = {redact("a = 93.184.216.34", find_pii("a = 93.184.216.34"), seed_key=f"o/r/{i}.py") for i in range(20)}
    assert len(per_file) > 1


def test_redacting_twice_changes_nothing_more():
    once = redact(PLANTED, find_pii(PLANTED), seed_key="k")
    assert find_pii(once) == [] and redact(once, find_pii(once), seed_key="k") == once


def test_overlapping_spans_merge_keeping_the_longer():
    text = "abcdefghij"
    merged = merge_spans(text, [Span(0, 4, "PASSWORD", "abcd"), Span(2, 9, "KEY", "cdefghi"), Span(9, 10, "EMAIL", "j")])
    assert merged == [Span(0, 9, "KEY", "abcdefghi"), Span(9, 10, "EMAIL", "j")]
    assert redact(text, [Span(2, 9, "KEY", "cdefghi"), Span(0, 4, "PASSWORD", "abcd")], seed_key="k") == "<KEY>j"


def test_redact_document_counts_and_keeps_provenance():
    doc = Document(text=PLANTED, repo="owner/repo", path="deploy.py", language="Python", meta={"stars": 3})
    out, counts = redact_document(doc)
    assert counts == {"EMAIL": 2, "IP_ADDRESS": 3, "KEY": 6, "PASSWORD": 3}
    assert (out.repo, out.path, out.language, out.meta) == ("owner/repo", "deploy.py", "Python", {"stars": 3})
    assert out.text == redact(PLANTED, find_pii(PLANTED), seed_key="owner/repo/deploy.py")
    clean = Document(text=ORDINARY, repo="r", path="p.py")
    assert redact_document(clean) == (clean, {"EMAIL": 0, "IP_ADDRESS": 0, "KEY": 0, "PASSWORD": 0})
