"""Passwords, invite tokens and CSRF tokens.

Passwords are hashed with Argon2id (argon2-cffi's defaults follow RFC 9106's recommended
parameters). Invite tokens and CSRF tokens come from :mod:`secrets`; only the SHA-256 of an
invite token is stored, so a copy of the database does not contain working login links.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import secrets

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

_hasher = PasswordHasher()


@functools.cache
def _dummy_hash() -> str:
    """Verified against when the username does not exist, so a wrong username costs as much time
    as a wrong password and response times do not reveal which accounts exist."""
    return _hasher.hash("kilter-no-such-user")


MIN_PASSWORD = 8


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def verify_password(stored_hash: str | None, password: str) -> bool:
    """True when ``password`` matches; always spends one Argon2 verification."""
    try:
        return _hasher.verify(stored_hash or _dummy_hash(), password) and stored_hash is not None
    except (VerificationError, InvalidHashError):
        return False


def needs_rehash(stored_hash: str) -> bool:
    """True when the hash was made with weaker parameters than the current defaults."""
    try:
        return _hasher.check_needs_rehash(stored_hash)
    except InvalidHashError:
        return False


def password_problem(password: str) -> str | None:
    if len(password) < MIN_PASSWORD:
        return f"the password must have at least {MIN_PASSWORD} characters"
    if len(password) > 1024:
        return "the password is too long"
    return None


def new_token(nbytes: int = 32) -> str:
    return secrets.token_urlsafe(nbytes)


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def same_token(a: str | None, b: str | None) -> bool:
    """Constant-time comparison; missing tokens never match."""
    if not a or not b:
        return False
    return hmac.compare_digest(a.encode(), b.encode())
