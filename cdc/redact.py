"""Secrets out of everything cdc prints or stores: one redaction for error lines, warnings, logs,
saved configs, checkpoint configs, logger configs and exports.

Credentials belong in the environment (AWS_*, HF_TOKEN, ...), yet they reach cdc's text anyway: a
shard URL written as `https://user:pass@host/...`, a presigned URL's signature, a tool's error that
quotes the curl command line with its bearer token. `redact` replaces each of those with `***`;
`redact_obj` does it to every string of a config-like structure. Pure: no torch, no I/O.
"""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Mapping
from typing import Any

MASK = "***"

# variables known to hold credentials, masked whatever their length (a short secret is still one)
SECRET_ENV = (
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_ACCESS_KEY_ID",
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "WANDB_API_KEY",
    "AZURE_STORAGE_KEY",
    "AZURE_STORAGE_SAS_TOKEN",
    "AZURE_STORAGE_CONNECTION_STRING",
    "GITHUB_TOKEN",
)
# any other variable named like a credential; its value must be this long to be masked, so that a
# short flag such as SOME_KEY=1 does not turn every "1" in a message into ***
SECRET_SUFFIXES = ("_TOKEN", "_SECRET", "_KEY", "_PASSWORD")
MIN_SUFFIXED = 8
MIN_KNOWN = 4  # shorter values of known variables are placeholders ("none", "x"), not secrets

# scheme://USERINFO@host: userinfo never holds "/", so a later "@" in the path is left alone; one
# slash too, since a URL that went through pathlib.Path reads `https:/user:pass@host`
_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*:/{1,2})[^/\s?#'\"]+@")
# Authorization: Bearer xxx, Authorization: Basic xxx, or a bare `bearer xxx` (curl -H, tool errors)
_AUTH_HEADER = re.compile(r"(authorization\s*[:=]\s*(?:(?:bearer|basic|token)\s+)?)[^\s'\",]+", re.IGNORECASE)
_BEARER = re.compile(r"(\bbearer\s+)[^\s'\",]+", re.IGNORECASE)
# name=value pairs whose name ends like a credential (query strings, pipe: commands, tool errors);
# `[\w.-]*` so that access_token=, X-Amz-Signature=, X-Amz-Security-Token=, sas_token= all match
_PAIR = re.compile(
    r"(\b[\w.-]*(?:token|signature|secret|password|passwd|api[_-]?key|access[_-]?key|accountkey|credential|sig)=)"
    r"[^&\s#'\",;]+",
    re.IGNORECASE,
)


def _secret_values(environ: Mapping[str, str]) -> list[str]:
    """The values of credential variables set now, longest first (so a secret that contains another
    is masked whole)."""
    found = set()
    for name, value in environ.items():
        known = name in SECRET_ENV and len(value) >= MIN_KNOWN
        if known or (name.upper().endswith(SECRET_SUFFIXES) and len(value) >= MIN_SUFFIXED):
            found.add(value)
    return sorted(found, key=len, reverse=True)


def redact(text: str, environ: Mapping[str, str] | None = None) -> str:
    """`text` with URL user-info, Authorization / bearer values, credential-named `name=value`
    pairs and the values of credential variables in `environ` (default os.environ) replaced by ***."""
    for value in _secret_values(os.environ if environ is None else environ):
        text = text.replace(value, MASK)
    text = _USERINFO.sub(rf"\g<1>{MASK}@", text)
    text = _AUTH_HEADER.sub(rf"\g<1>{MASK}", text)
    text = _BEARER.sub(rf"\g<1>{MASK}", text)
    return _PAIR.sub(rf"\g<1>{MASK}", text)


def redact_obj(obj: Any, environ: Mapping[str, str] | None = None) -> Any:
    """A copy of `obj` (dicts, lists, tuples, scalars) with every string, keys included, redacted."""
    if isinstance(obj, str):
        return redact(obj, environ)
    if isinstance(obj, Mapping):
        return {redact_obj(k, environ): redact_obj(v, environ) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact_obj(v, environ) for v in obj)
    return obj


def redact_args(argv: list[str], environ: Mapping[str, str] | None = None) -> list[str]:
    """A command line to record or show, as a list: every `--set KEY=VALUE` value masked (a recipe
    override can carry a URL with credentials in any form), every argument redacted as text."""
    out, after_set = [], False
    for arg in argv:
        if after_set and "=" in arg:
            arg = arg.split("=", 1)[0] + "=" + MASK
        elif arg.startswith("--set=") and arg.count("=") >= 2:
            arg = "--set=" + arg[len("--set=") :].split("=", 1)[0] + "=" + MASK
        after_set = arg == "--set"
        out.append(redact(arg, environ))
    return out


def redact_argv(argv: list[str], environ: Mapping[str, str] | None = None) -> str:
    """redact_args as one shell-quoted line."""
    return shlex.join(redact_args(argv, environ))


def redacted_yaml(obj: Any) -> str:
    """YAML of `obj` with every string redacted: how a config is saved (config.yaml, base.yaml)."""
    import yaml

    return yaml.safe_dump(redact_obj(obj), sort_keys=False)
