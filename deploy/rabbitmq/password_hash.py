#!/usr/bin/env python3
"""RabbitMQ password hashes (rabbit_password_hashing_sha256) for definitions.json.

    python3 deploy/rabbitmq/password_hash.py <password>          # prints a hash (random salt)
    python3 deploy/rabbitmq/password_hash.py --check <hash> <pw>  # exit 0 when they match

Format: base64(salt[4] + sha256(salt[4] + utf8(password))). The hashes committed in
definitions.json are those of the fixed, public DEMO passwords of deploy/.env.example (compose
only). Production never takes passwords from this file: there they are set by the broker's
operator / secret store (e.g. the RabbitMQ messaging-topology operator's User resource pointing
at a Kubernetes Secret, or `rabbitmqctl change_password`).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import sys


def password_hash(password: str, salt: bytes | None = None) -> str:
    salt = os.urandom(4) if salt is None else salt
    if len(salt) != 4:
        raise ValueError("the salt is 4 bytes")
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


def matches(stored: str, password: str) -> bool:
    raw = base64.b64decode(stored)
    return len(raw) == 36 and hmac.compare_digest(password_hash(password, raw[:4]), stored)


def main(argv: list[str]) -> int:
    if len(argv) == 3 and argv[0] == "--check":
        return 0 if matches(argv[1], argv[2]) else 1
    if len(argv) == 1:
        print(password_hash(argv[0]))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
