"""Every test's Ray uses a token from the environment: Ray 2.60 would otherwise generate one
into ~/.ray/auth_token, and tests never write to the home directory."""

from __future__ import annotations

import os
import secrets

os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
