"""The one place secrets are removed from anything the runner writes out.

A ``Redactor`` is built from the secret values resolved for a run and the sensitive names
(API-key header or query parameter, custom auth headers). It masks:

- every secret value, also in the forms it takes on the way out: JSON-escaped, percent-encoded
  (the variants urllib and yarl produce, upper- and lower-case hex) and base64 (standard and
  URL-safe, aligned at any byte offset, so a password inside ``base64("user:pass")`` is found
  whatever the username);
- the value of the ``Authorization``, ``Proxy-Authorization``, ``Cookie`` and ``Set-Cookie``
  headers, of the OAuth2 token parameters, and of every sensitive name, wherever it appears as a
  header, a query/form parameter, a ``"name": "value"`` pair or a dict key;
- userinfo in URLs (``https://user:pass@host`` becomes ``https://[REDACTED]@host``).

Short secrets (fewer than ``MIN_SUBSTRING_LEN`` = 4 characters) are a deliberate special case.
Masking every occurrence of ``"ab"`` inside other words would mangle every log line and, worse,
act as an oracle: the pattern of masked letters would spell out the secret. They are therefore
masked wherever they stand as a token of their own (not touching a letter or digit on either side:
``"pw": "ab"``, ``?k=ab``, ``ab`` alone, a dict value equal to it), and never inside longer words.
Their headers, parameters and dict keys are masked by name as usual.

Every form of a long secret is searched for and replaced as plain text, longest first, so that
where forms of two secrets overlap the longer is masked; there is no regex of secrets to compile
(that cost more than a run's status writes). The short secrets' forms are one regex, for their
bounds.

The process has one ``SecretRegistry``, made by the composition root: each run registers its
secrets for as long as it is in flight, and the stdout logger and the execution log use its
``redactor()``, which sees the secrets of every run (and every refreshed OAuth2 token).

Modules: ``forms`` (the forms of a secret), ``matching`` (finding secrets and names),
``redactor`` (``Redactor``), ``registry`` (``SecretRegistry``, ``LayeredRedactor``).
"""

from runner.redact.forms import (
    DEFAULT_SENSITIVE_NAMES,
    MIN_SUBSTRING_LEN,
    REDACTED,
    secret_variants,
)
from runner.redact.redactor import Redactor
from runner.redact.registry import LayeredRedactor, SecretRegistry

__all__ = [
    "DEFAULT_SENSITIVE_NAMES",
    "MIN_SUBSTRING_LEN",
    "REDACTED",
    "LayeredRedactor",
    "Redactor",
    "SecretRegistry",
    "secret_variants",
]
