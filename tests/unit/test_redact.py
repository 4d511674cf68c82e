"""The redactor: secrets in every form they leave in, sensitive names, URLs, exceptions and
the process-wide registry. No sockets."""

from __future__ import annotations

import base64
import json
import re
import uuid
from urllib.parse import quote, quote_plus

import aiohttp
import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from runner.redact import (
    MIN_SUBSTRING_LEN,
    REDACTED,
    LayeredRedactor,
    Redactor,
    SecretRegistry,
)

PASSWORD = "s3cr3t P@ss/wörd+&="
API_KEY = "k_live_9f8e7d6c5b4a"
REDACTOR = Redactor([PASSWORD, API_KEY, "alice", f"alice:{PASSWORD}"], ["X-API-Key", "apikey"])


def test_plain_secret_is_masked_wherever_it_appears() -> None:
    out = REDACTOR.text(f"calling with key={API_KEY}; body {{'p': '{PASSWORD}'}}")

    assert API_KEY not in out and PASSWORD not in out
    assert out.count(REDACTED) == 2


@pytest.mark.parametrize(
    "encoded",
    [
        quote(PASSWORD, safe=""),
        quote(PASSWORD),
        quote_plus(PASSWORD),
        re.sub("%[0-9A-F]{2}", lambda m: m.group().lower(), quote(PASSWORD, safe="")),
        str(URL("https://h/p").with_query({"q": PASSWORD})).split("q=")[1],  # yarl's quoting
        json.dumps(PASSWORD)[1:-1],
        json.dumps(PASSWORD, ensure_ascii=False)[1:-1],
    ],
)
def test_encoded_secret_is_masked(encoded: str) -> None:
    out = REDACTOR.text(f"GET https://api.example/x?q={encoded}&page=2")

    assert encoded not in out
    assert out.endswith("&page=2")


@pytest.mark.parametrize(
    "encoder", [base64.b64encode, base64.urlsafe_b64encode], ids=["std", "urlsafe"]
)
def test_base64_of_a_secret_and_of_the_basic_pair_are_masked(encoder: object) -> None:
    assert callable(encoder)
    alone = encoder(API_KEY.encode()).decode()
    pair = encoder(f"alice:{PASSWORD}".encode()).decode()

    out = REDACTOR.text(f"{alone} Authorization-ish Basic {pair}")

    assert alone not in out and pair not in out


@pytest.mark.parametrize("username", ["bob", "bo", "b", "robert", "someone-else@corp"])
def test_password_inside_base64_is_masked_whatever_the_username(username: str) -> None:
    # The password's characters in base64 depend on its byte offset; every offset is covered.
    redactor = Redactor([PASSWORD])
    header = base64.b64encode(f"{username}:{PASSWORD}".encode()).decode()

    out = redactor.text(f"basic={header}")

    assert out.count(REDACTED) == 1
    visible = out.replace(REDACTED, "").removeprefix("basic=").rstrip("=")
    # Left visible: the username's characters and at most one character on each side of the
    # mask that mixes bits of the password with its neighbours (at most 4 of its bits).
    assert len(visible) <= -(-(len(username) + 1) * 4 // 3) + 2


def test_userinfo_is_removed_from_urls_in_text_and_in_url() -> None:
    text = "fetch https://bob:hunter2@api.example:8443/v1?x=1 failed"

    assert REDACTOR.text(text) == f"fetch https://{REDACTED}@api.example:8443/v1?x=1 failed"
    assert REDACTOR.url("https://bob@api.example/v1") == f"https://{REDACTED}@api.example/v1"


def test_api_key_query_parameter_is_masked_by_name_case_insensitively() -> None:
    url = "https://api.example/v1/things?page=2&ApiKey=unregistered-value&b=3"

    assert REDACTOR.url(url) == f"https://api.example/v1/things?page=2&ApiKey={REDACTED}&b=3"
    assert "unregistered-value" not in REDACTOR.text(f"GET {url}")


def test_oauth_parameters_in_a_form_body_are_masked() -> None:
    body = "grant_type=refresh_token&refresh_token=rt-unknown&client_secret=cs-unknown&scope=a"

    out = Redactor().text(body)

    assert out == (
        f"grant_type=refresh_token&refresh_token={REDACTED}&client_secret={REDACTED}&scope=a"
    )


def test_headers_are_masked_by_name_case_insensitively_and_other_values_scrubbed() -> None:
    headers = {
        "authorization": "Bearer opaque",
        "Proxy-Authorization": "Basic xyz",
        "COOKIE": "sid=1",
        "Set-Cookie": "sid=2",
        "x-api-key": "unregistered",
        "X-Echo": f"you sent {API_KEY}",
        "Accept": "application/json",
    }

    out = REDACTOR.headers(headers)

    assert out == {
        "authorization": REDACTED,
        "Proxy-Authorization": REDACTED,
        "COOKIE": REDACTED,
        "Set-Cookie": REDACTED,
        "x-api-key": REDACTED,
        "X-Echo": f"you sent {REDACTED}",
        "Accept": "application/json",
    }


def test_repeated_headers_are_kept_and_masked() -> None:
    multi = CIMultiDict([("Set-Cookie", "a=1"), ("Set-Cookie", "b=2"), ("Vary", "x")])

    assert REDACTOR.headers(multi) == {"Set-Cookie": f"{REDACTED}, {REDACTED}", "Vary": "x"}


def test_header_text_and_reprs_are_masked() -> None:
    text = (
        "Authorization: Bearer eyJunregistered\n"
        "{'Cookie': 'sid=abc', 'Accept': '*/*'}\n"
        '{"set-cookie": "x=1", "ok": "yes"}\n'
        "[('Proxy-Authorization', 'Basic Zm9v')]"
    )

    out = Redactor().text(text).splitlines()

    assert out == [
        f"Authorization: {REDACTED}",
        f"{{'Cookie': '{REDACTED}', 'Accept': '*/*'}}",
        f'{{"set-cookie": "{REDACTED}", "ok": "yes"}}',
        f"[('Proxy-Authorization', '{REDACTED}')]",
    ]


def test_value_is_deep_and_masks_sensitive_keys() -> None:
    data = {
        "status": 200,
        "headers": {"Set-Cookie": ["a", "b"], "X-Api-Key": "zzz", "Content-Type": "json"},
        "body": {"items": [{"token": API_KEY}, (PASSWORD, 3)], API_KEY: True},
        "n": 1.5,
    }

    out = REDACTOR.value(data)

    assert out == {
        "status": 200,
        "headers": {"Set-Cookie": REDACTED, "X-Api-Key": REDACTED, "Content-Type": "json"},
        "body": {"items": [{"token": REDACTED}, (REDACTED, 3)], REDACTED: True},
        "n": 1.5,
    }
    assert data["headers"]["X-Api-Key"] == "zzz"  # a copy, the input is untouched


def test_numeric_secret_is_masked_in_data_even_as_a_number() -> None:
    assert Redactor(["987654"]).value({"pin": 987654, "ok": 987653}) == {
        "pin": REDACTED,
        "ok": 987653,
    }


def test_short_secrets_are_masked_as_tokens_never_inside_words() -> None:
    # Documented choice: a 1-3 character secret is masked where it stands alone; masking it
    # inside words would wreck every line and reveal the secret by the pattern of masks.
    assert MIN_SUBSTRING_LEN == 4
    redactor = Redactor(["ab", "7"])

    out = redactor.text('{"pw": "ab", "table": "ab-tests", "n": 7, "id": 17} ?k=ab&x=1')

    assert out == (
        f'{{"pw": "{REDACTED}", "table": "{REDACTED}-tests", "n": {REDACTED}, "id": 17}}'
        f" ?k={REDACTED}&x=1"
    )
    assert redactor.value({"pw": "ab", "note": "table"}) == {"pw": REDACTED, "note": "table"}
    assert redactor.text(base64.b64encode(b"ab").decode()) == REDACTED


def test_overlapping_secrets_mask_the_longest_at_a_position() -> None:
    redactor = Redactor(["abcd", "abcdefgh"])

    assert redactor.text("xabcdefghy") == f"x{REDACTED}y"


def test_text_is_idempotent_and_leaves_clean_text_alone() -> None:
    line = "2024-01-01 INFO step fetch attempt=1 status=200 url=https://api.example/v1?page=2"

    assert REDACTOR.text(line) == line
    once = REDACTOR.text(f"{API_KEY} Authorization: Bearer x")
    assert REDACTOR.text(once) == once


def test_empty_redactor_masks_only_names_and_userinfo() -> None:
    assert Redactor().text("plain words") == "plain words"
    assert Redactor().extended(["newtoken"]).text("got newtoken") == f"got {REDACTED}"


@given(
    # A secret inside the mask itself ("[RED") would be "found" in every masked output.
    secret=st.text(min_size=MIN_SUBSTRING_LEN, max_size=40).filter(
        lambda s: s.strip() and s not in REDACTED
    ),
    before=st.text(max_size=20),
    after=st.text(max_size=20),
)
def test_a_long_secret_never_survives_in_any_surrounding_text(
    secret: str, before: str, after: str
) -> None:
    redactor = Redactor([secret])

    assert secret not in redactor.text(before + secret + after)
    assert quote(secret, safe="") not in redactor.url(f"https://h/p?q={quote(secret, safe='')}")


# --- exceptions ------------------------------------------------------------------------------


def response_error(url: str, headers: dict[str, str]) -> aiohttp.ClientResponseError:
    info = aiohttp.RequestInfo(
        url=URL(url),
        method="GET",
        headers=CIMultiDictProxy(CIMultiDict(headers)),
        real_url=URL(url),
    )
    return aiohttp.ClientResponseError(info, (), status=500, message="Internal Server Error")


def test_client_response_error_text_and_repr_are_redacted() -> None:
    exc = response_error(
        f"https://bob:hunter2@api.example/v1?apikey={API_KEY}&page=2",
        {"Authorization": "Bearer unregistered-token", "X-API-Key": API_KEY},
    )

    text = REDACTOR.exception_text(exc)
    as_repr = REDACTOR.text(repr(exc))

    assert text.startswith("ClientResponseError: 500, message='Internal Server Error'")
    for leaked in (API_KEY, "hunter2", "unregistered-token"):
        assert leaked not in text and leaked not in as_repr
    assert "page=2" in text


def test_invalid_url_error_is_redacted() -> None:
    try:
        raise aiohttp.InvalidURL(f"http//bob:pw@host/x?apikey={API_KEY}", "no scheme")
    except aiohttp.InvalidURL as exc:
        text = REDACTOR.exception_text(exc, with_traceback=True)

    assert API_KEY not in text
    assert "InvalidURL" in text and "no scheme" in text


def test_yarl_error_text_is_redacted() -> None:
    with pytest.raises(ValueError) as caught:
        URL.build(scheme="https", host=f"{API_KEY} .example")
    assert API_KEY in str(caught.value)  # yarl quotes the host it refuses

    assert API_KEY not in REDACTOR.exception_text(caught.value)


# --- the process-wide registry ---------------------------------------------------------------


def test_registry_masks_secrets_of_every_run_in_flight_until_unregistered() -> None:
    registry = SecretRegistry()
    first = registry.register(["run-one-secret"], ["X-One"])
    registry.register(["run-two-secret"])

    both = registry.redactor()
    assert both.text("run-one-secret run-two-secret") == f"{REDACTED} {REDACTED}"
    assert both.headers({"x-one": "v"}) == {"x-one": REDACTED}
    assert registry.redactor() is both  # cached until the set changes

    registry.unregister(first)
    registry.unregister(first)  # twice is harmless
    after = registry.redactor()
    assert after.text("run-one-secret run-two-secret") == f"run-one-secret {REDACTED}"


def test_the_registry_redactor_masks_exception_text_of_a_run_in_flight() -> None:
    registry = SecretRegistry()
    handle = registry.register(["global-registry-secret"])
    try:
        text = registry.redactor().exception_text(RuntimeError("boom global-registry-secret"))
    finally:
        registry.unregister(handle)

    assert text == f"RuntimeError: boom {REDACTED}"


_NAMES_AND_SECRETS = st.sampled_from(
    ["Authorization", "X-API-Key", "Ünïcode-Kéy", "cookie", API_KEY, "ab", "https://u:p@h/"]
)
_CLEAN_CHECKED = Redactor([API_KEY, "ab"], ["X-API-Key", "Ünïcode-Kéy"])


@given(
    st.recursive(
        st.one_of(st.none(), st.integers(), st.text(), _NAMES_AND_SECRETS),
        lambda inner: st.one_of(
            st.lists(inner, max_size=4),
            st.dictionaries(st.one_of(st.text(max_size=8), _NAMES_AND_SECRETS), inner, max_size=4),
        ),
        max_leaves=12,
    )
)
def test_the_clean_check_of_encoded_json_agrees_with_the_check_of_its_text(data: object) -> None:
    raw = json.dumps(data, ensure_ascii=False).encode()
    for redactor in (_CLEAN_CHECKED, Redactor()):
        assert redactor.is_clean_json(raw) == redactor.is_clean(raw.decode()), raw


def test_a_name_outside_ascii_is_still_found_in_any_case() -> None:
    redactor = Redactor([], ["Ünïcode-Kéy"])
    assert not redactor.is_clean_json('{"ÜNÏCODE-KÉY": "v"}'.encode())
    assert not redactor.is_clean_json(b'{"h": "AUTHORIZATION: x"}')
    assert redactor.is_clean_json(b'{"h": "author"}')


def test_a_word_names_share_is_searched_once_and_alone_proves_nothing() -> None:
    # The default names share "token": one search stands for access_token, id_token and
    # refresh_token, and where "token" occurs without any of them the text is still clean.
    redactor = Redactor([], ["x-session-token", "api-key"])
    for text in ("max_tokens: 5", "tokenizer", "TOKEN", "x-session-tok"):
        assert redactor.is_clean(text), text
        assert redactor.is_clean_json(json.dumps({"k": text}).encode()), text
    for text in ("Refresh_Token=abc", "x-session-token: abc", "id_token", "api-key: abc"):
        assert not redactor.is_clean(text), text
        assert not redactor.is_clean_json(json.dumps({"k": text}).encode()), text


@pytest.mark.parametrize(
    "redactor",
    [
        Redactor(),
        Redactor([], ["X-API-Key", "api-key", "token", "Ünïcode-Kéy"]),
        Redactor([], ["x-session-token", "session-token-id", "cookie-jar"]),
    ],
    ids=["default names", "configured names holding others", "configured names sharing words"],
)
def test_every_sensitive_name_fails_the_clean_check_and_is_masked(redactor: Redactor) -> None:
    # The clean checks search for fewer names than they know (a name holding another needs no
    # search of its own); none may slip through, whichever case it is written in.
    for name in sorted(redactor.sensitive_names):
        for spelled in (name, name.upper()):
            data = {"headers": {spelled: "v4lue"}}
            raw = json.dumps(data, ensure_ascii=False).encode()
            assert not redactor.is_clean_json(raw), spelled
            assert not redactor.is_clean(f"{spelled}: v4lue"), spelled
            assert b"v4lue" not in redactor.json(data), spelled


@given(
    st.recursive(
        st.one_of(st.none(), st.booleans(), st.integers(), st.text(), _NAMES_AND_SECRETS),
        lambda inner: st.one_of(
            st.lists(inner, max_size=4),
            st.dictionaries(st.one_of(st.text(max_size=8), _NAMES_AND_SECRETS), inner, max_size=4),
        ),
        max_leaves=12,
    )
)
def test_scrubbed_data_equals_the_walked_copy(data: object) -> None:
    for redactor in (_CLEAN_CHECKED, Redactor()):
        scrubbed = redactor.scrubbed(data)
        assert scrubbed == redactor.value(data), data
        if scrubbed is not data:
            # A copy only when something was masked, never for clean data.
            assert not redactor.is_clean_json(json.dumps(data, ensure_ascii=False).encode())


def test_scrubbed_masks_a_secret_that_json_escapes() -> None:
    secret = 'pa"ss\\word\n'
    redactor = Redactor([secret])
    data = {"note": f"the key is {secret} ok", "nested": [secret]}
    assert redactor.scrubbed(data) == redactor.value(data)
    assert secret not in json.dumps(redactor.scrubbed(data))


def test_scrubbed_falls_back_to_the_walk_for_data_json_cannot_hold() -> None:
    data = {"when": {1, 2}, "key": API_KEY}
    assert REDACTOR.scrubbed(data) == REDACTOR.value(data)


# --- a clean part searched once ---------------------------------------------------------------

_LONG_SECRET = "a-long-secret-of-forty-characters-0123456"
_AROUND = Redactor([API_KEY, "ab", _LONG_SECRET], ["X-API-Key"])
_PIECES = st.sampled_from(
    ["Authorization", "x-api-key", "ab", API_KEY, _LONG_SECRET, "@", "://", "k"]
)


_TEXT = st.text(st.characters(codec="utf-8"), max_size=6)
_CUT = _PIECES.flatmap(lambda p: st.integers(0, len(p)).map(lambda i: (p[:i], p[i:])))


@given(_TEXT, _CUT, st.integers(0, 300), _CUT, _TEXT)
def test_the_search_around_a_clean_part_finds_what_the_whole_search_finds(
    before: str, first: tuple[str, str], padding: int, last: tuple[str, str], after: str
) -> None:
    # A name or secret cut in two across each end of the part, with text either side.
    clean = (first[1] + "x" * padding + last[0]).encode()
    if not _AROUND.is_clean_json(clean):
        return  # only a part that is clean alone is ever searched around
    raw = (before + first[0]).encode() + clean + (last[1] + after).encode()
    around = _AROUND.is_clean_around(raw, clean)
    # Never clean where the whole is not; and, where no short secret's bounds are cut, as
    # often clean as the whole.
    assert around <= _AROUND.is_clean_json(raw), raw
    if "ab" not in raw.decode().lower():
        assert around == _AROUND.is_clean_json(raw), raw


@pytest.mark.parametrize(
    ("before", "after"),
    [
        ('{"h":"Bearer x", "x-api', '-key": "v"}'),  # a name across the start
        ('{"h":"', f'{API_KEY[3:]}"}}'),  # a secret across the end, its start in the part
        ('{"u":"https', ' "@h"}'),  # URL userinfo: "://" and "@" apart
    ],
)
def test_a_match_across_the_edge_of_a_clean_part_is_found(before: str, after: str) -> None:
    name_end = "-key" if "x-api" in before else ""
    secret_start = API_KEY[:3] if API_KEY[3:] in after else ""
    scheme = "://" if "https" in before else ""
    part = f"{name_end}{'x' * 100}{secret_start}".encode()
    clean = (scheme.encode() + part) if scheme else part
    assert _AROUND.is_clean_json(clean)
    raw = before.encode() + clean + after.encode()
    assert not _AROUND.is_clean_json(raw)
    assert not _AROUND.is_clean_around(raw, clean)


def test_json_around_masks_what_the_whole_would() -> None:
    output = {"status": 200, "body": {"id": "c_1", "pad": "x" * 300}}
    raw, clean = _AROUND.json_checked(output)
    assert clean and raw == json.dumps(output, separators=(",", ":")).encode()
    event = {"error": f"X-API-Key: {API_KEY}", "output": msgspec.Raw(raw)}

    masked = _AROUND.json_around(event, raw)

    assert API_KEY not in masked.decode() and json.loads(masked)["output"] == output
    assert masked == _AROUND.json(event)
    assert _AROUND.json_checked({"k": API_KEY}) == (b'{"k":"' + REDACTED.encode() + b'"}', False)


# --- a run's secrets in memory ---------------------------------------------------------------


def test_a_redactor_leaves_no_secret_in_the_regex_cache() -> None:
    # re.compile keeps the last 512 patterns it compiled, with their text: a run's secrets
    # must not stay there after the run (CONTRACT §4).
    secret = "zq" + uuid.uuid4().hex
    assert Redactor([secret]).text(f"key {secret}") == f"key {REDACTED}"
    assert Redactor([secret], ["x-key"]).is_clean(f"{secret}") is False

    cached = [str(key) + str(getattr(value, "pattern", "")) for key, value in re._cache.items()]  # type: ignore[attr-defined]
    assert not any(secret[:16] in text for text in cached)


def test_runs_with_the_same_secrets_share_one_redactor_until_the_last_of_them_ends() -> None:
    registry = SecretRegistry()
    first = registry.register(["s3cret-value-1"], ["X-Key"], extra=["process-secret"])
    second = registry.register(["s3cret-value-1"], ["x-key"], extra=["process-secret"])
    other = registry.register(["another-secret-2"], ["X-Key"], extra=["process-secret"])

    mine = registry.run_redactor(first)
    assert registry.run_redactor(second) is mine
    assert registry.run_redactor(other) is not mine
    assert registry.shared == 2
    assert mine.text("s3cret-value-1 and process-secret, X-Key: v") == (
        f"{REDACTED} and {REDACTED}, X-Key: {REDACTED}"
    )
    assert "another-secret-2" in mine.text("another-secret-2")

    registry.unregister(first)
    assert registry.shared == 2  # the second run still has it
    registry.unregister(second)
    registry.unregister(other)
    assert registry.shared == 0


def test_the_process_redactor_stays_while_runs_with_the_same_secrets_come_and_go() -> None:
    # Made again only when the secrets or names held change: with MongoDB every execution-log
    # document is scrubbed by it, and each run's start and end used to remake it.
    registry = SecretRegistry()
    registry.register(["process-secret"])
    first = registry.register(["tenant-key-1"], ["X-Key"], extra=["process-secret"])
    before = registry.redactor()
    second = registry.register(["tenant-key-1"], ["X-Key"], extra=["process-secret"])
    registry.unregister(first)
    assert registry.redactor() is before
    registry.unregister(second)
    after = registry.redactor()
    assert after is not before
    assert after.text("tenant-key-1 process-secret") == f"tenant-key-1 {REDACTED}"


def test_the_process_redactor_is_made_of_what_the_runs_redactors_hold() -> None:
    registry = SecretRegistry()
    handles = [registry.register([f"tenant-{i}-key-value"], [f"X-Key-{i}"]) for i in range(3)]
    short = registry.register(["pw"])
    combined = registry.redactor()
    runs = [registry.run_redactor(h) for h in handles]
    # Long secrets are plain text to search (nothing compiled); a short one's bounded pattern
    # is the very one its run compiled.
    assert all(run._secret_patterns == () for run in runs)
    assert set(combined._secret_words) == {w for run in runs for w in run._secret_words}
    (pattern,) = combined._secret_patterns
    assert pattern is registry.run_redactor(short)._secret_patterns[0]
    assert combined.text("pw, tenant-0-key-value tenant-2-key-value X-Key-1: v") == (
        f"{REDACTED}, {REDACTED} {REDACTED} X-Key-1: {REDACTED}"
    )


def test_a_layered_redactor_masks_the_tokens_minted_after_its_run_started() -> None:
    # An OAuth2 run masks what it started with and every token the process refreshed since;
    # not every other run's secrets, which would be a search per set of them in every event.
    registry = SecretRegistry()
    registry.register(["other-run-secret"])
    layered = LayeredRedactor(Redactor(["own-secret-value"]), registry)
    assert layered.json_checked({"t": "minted-token-value"})[1] is True

    minted = registry.register(["minted-token-value"], minted=True)
    assert layered.text("own-secret-value minted-token-value") == f"{REDACTED} {REDACTED}"
    assert layered.json_checked({"t": "minted-token-value"})[1] is False
    assert registry.minted_redactor().secrets == frozenset({"minted-token-value"})
    assert "other-run-secret" in registry.redactor().secrets

    registry.unregister(minted)
    assert registry.minted_redactor().secrets == frozenset()


def test_where_forms_of_two_secrets_overlap_the_longer_is_masked() -> None:
    redactor = Redactor(["abcdef", "abcdefghij"])
    assert redactor.text("x abcdefghij y abcdef") == f"x {REDACTED} y {REDACTED}"
    assert not redactor.is_clean("abcdefghi")


_PART_A = Redactor(["alpha-secret-1", "xy"], ["X-One"])
_PART_B = Redactor(["bravo-secret-22", "zq"], ["X-Two"])
_UNION = Redactor(
    _PART_A.secrets | _PART_B.secrets, _PART_A.sensitive_names | _PART_B.sensitive_names
)
_COMBINED = Redactor.combined([_PART_A, _PART_B])
_PIECES = st.sampled_from(
    [
        "alpha-secret-1",
        "bravo-secret-22",
        "xy",
        "zq",
        "X-One",
        "x-two",
        "token",
        ": ",
        "=",
        "?",
        "&",
        " ",
        '"',
        "https://u:p@h/",
        "plain",
        "ab1",
        "\n",
    ]
)


@given(st.lists(_PIECES, max_size=12).map("".join))
def test_a_combined_redactor_finds_what_one_of_all_the_secrets_finds(text: str) -> None:
    assert _COMBINED.is_clean(text) == _UNION.is_clean(text)
    masked = _COMBINED.text(text)
    for secret in ("alpha-secret-1", "bravo-secret-22"):
        assert secret not in masked
    if _UNION.text(text) == text:
        assert masked == text
