"""Who may use a server, and each of its tools (DESIGN §3 ``access``, ``groups_claim``, ``tool_policy``).

The one place these rules live. Every check calls ``access_decide`` or ``tool_decide``: the callback
(after the upstream login), the upstream refresh, the gateway (each request, from cached data) and the
admin's "Who can use this?" page.

- ``access``: ``{"emails": [...], "email_domains": [...], "subjects": [...], "groups": [...]}``. A user
  matching any entry is admitted; no entries at all: anyone the upstream admits. Emails and domains match
  case-insensitively, and never an email the upstream says is not verified (``email_verified: false``).
- ``groups_claim``: the claim with the user's groups, a dotted path for nested claims
  (``realm_access.roles``); a claim whose own name contains dots (``https://example.com/groups``) is
  found too.
- ``tool_policy``: ``[{"tools": ["<glob>", ...], "groups": ["<group>", ...]}, ...]``. A tool matched by
  a rule is for users in one of the groups of any rule that matches it; a tool no rule matches is open to
  every admitted user.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

DEFAULT_GROUPS_CLAIM = "groups"
ACCESS_KEYS = ("emails", "email_domains", "subjects", "groups")
MAX_ENTRIES = 1000  # per list: a policy is configuration, not a user directory
MAX_GROUPS = 500  # groups kept per user (claims beyond are ignored)
MAX_TEXT = 255


@dataclass(frozen=True, slots=True)
class UserClaims:
    """The user's claims as the proxy keeps them: the subject, email (empty when unknown or unverified)
    and groups, which the policies look at, and the display name, which only the identity assertion
    carries (gateway/identity.py)."""

    subject: str
    email: str = ""
    groups: tuple[str, ...] = ()
    name: str = ""

    def as_stored(self) -> dict:
        """The claims kept on the upstream session (encrypted): only what the policies and the identity
        assertion need."""
        stored = {"email": self.email, "groups": list(self.groups)}
        if self.name:
            stored["name"] = self.name
        return stored

    @classmethod
    def from_stored(cls, *, subject: str, stored: Mapping | None) -> UserClaims:
        stored = stored or {}
        groups = stored.get("groups") or []
        return cls(
            subject=subject,
            email=str(stored.get("email") or ""),
            groups=tuple(str(group) for group in groups if isinstance(group, str))[:MAX_GROUPS],
            name=str(stored.get("name") or ""),
        )


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    reason: str  # for people: the operator (audit log, admin) and the user (error messages)


# -- the user's claims -----------------------------------------------------------------------------


def claim_lookup(claims: Mapping, path: str):
    """The value of a claim: by its exact name first, else by a dotted path into nested objects."""
    if path in claims:
        return claims[path]
    value = claims
    for part in path.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


def user_claims_from(*, subject: str, claims: Mapping, groups_claim: str = "") -> UserClaims:
    """The proxy's view of an ID token's or userinfo's claims."""
    email = claims.get("email")
    email = email.strip().lower() if isinstance(email, str) and "@" in email else ""
    if email and claims.get("email_verified") in (False, "false"):
        email = ""  # the upstream says it does not know this address is the user's
    raw_groups = claim_lookup(claims, groups_claim or DEFAULT_GROUPS_CLAIM)
    if isinstance(raw_groups, str):
        raw_groups = [raw_groups]
    if not isinstance(raw_groups, (list, tuple)):
        raw_groups = []
    groups = tuple(dict.fromkeys(str(g)[:MAX_TEXT] for g in raw_groups if isinstance(g, (str, int))))[:MAX_GROUPS]
    name = claims.get("name")
    name = name.strip()[:MAX_TEXT] if isinstance(name, str) else ""
    return UserClaims(subject=subject, email=email[:MAX_TEXT], groups=groups, name=name)


# -- decisions -------------------------------------------------------------------------------------


def access_is_restricted(access: Mapping | None) -> bool:
    return bool(access) and any(access.get(key) for key in ACCESS_KEYS)


def policy_needs_claims(*, access: Mapping | None, tool_policy: Sequence | None) -> bool:
    """Whether a server's policies look at the user's claims at all."""
    return access_is_restricted(access) or bool(tool_policy)


def access_decide(*, access: Mapping | None, user: UserClaims) -> Decision:
    """May this user use the server?"""
    if not access_is_restricted(access):
        return Decision(True, "The server admits everyone the identity provider lets sign in.")
    email = user.email
    if email and email in {e.lower() for e in access.get("emails") or ()}:
        return Decision(True, f"The email address {email} is on the server's list.")
    if email:
        domain = email.rpartition("@")[2]
        if domain in {d.lower().lstrip("@") for d in access.get("email_domains") or ()}:
            return Decision(True, f"The email domain {domain} is on the server's list.")
    if user.subject and user.subject in (access.get("subjects") or ()):
        return Decision(True, "The user's subject is on the server's list.")
    shared = [group for group in access.get("groups") or () if group in user.groups]
    if shared:
        return Decision(True, f"The user is in the group {shared[0]}.")
    return Decision(False, "The account matches none of the server's allowed emails, domains, subjects or groups.")


def tool_rules_matching(tool_policy: Sequence[Mapping] | None, tool: str) -> list[Mapping]:
    return [rule for rule in tool_policy or () if any(fnmatchcase(tool, p) for p in rule.get("tools") or ())]


def tool_decide(*, tool_policy: Sequence[Mapping] | None, tool: str, user: UserClaims) -> Decision:
    """May this (admitted) user see and call this tool?"""
    rules = tool_rules_matching(tool_policy, tool)
    if not rules:
        return Decision(True, "No tool rule matches this tool: it is open to every user of the server.")
    allowed = list(dict.fromkeys(group for rule in rules for group in rule.get("groups") or ()))
    shared = [group for group in allowed if group in user.groups]
    if shared:
        return Decision(True, f"The user is in the group {shared[0]}.")
    if not allowed:
        return Decision(False, f"The tool {tool} is not available to anyone.")
    return Decision(False, f"The tool {tool} is only for members of: {', '.join(allowed)}.")


# -- validation (the model's clean() calls these) --------------------------------------------------


def _str_list_problem(value, *, what: str) -> str | None:
    if not isinstance(value, list):
        return f"{what} must be a list of strings."
    if len(value) > MAX_ENTRIES:
        return f"{what} has more than {MAX_ENTRIES} entries."
    if not all(isinstance(v, str) and v.strip() and len(v) <= MAX_TEXT and "\x00" not in v for v in value):
        return f"{what} must contain non-empty strings of at most {MAX_TEXT} characters."
    return None


def access_policy_problems(access) -> list[str]:
    if access in (None, ""):
        return []
    if not isinstance(access, dict):
        return ['Use an object such as {"groups": ["sales"], "email_domains": ["example.com"]}.']
    problems = []
    unknown = sorted(set(access) - set(ACCESS_KEYS))
    if unknown:
        problems.append(f"Unknown key(s) {', '.join(map(repr, unknown))}: use {', '.join(ACCESS_KEYS)}.")
    for key in ACCESS_KEYS:
        if key in access and (problem := _str_list_problem(access[key], what=key)):
            problems.append(problem)
    if not problems:
        bad = [e for e in access.get("emails") or () if "@" not in e.strip("@")]
        if bad:
            problems.append(f"Not an email address: {bad[0]!r}.")
        bad = [d for d in access.get("email_domains") or () if "@" in d.lstrip("@") or "." not in d]
        if bad:
            problems.append(f"Not an email domain: {bad[0]!r} (use e.g. example.com).")
    return problems


def groups_claim_problems(groups_claim) -> list[str]:
    if groups_claim in (None, ""):
        return []
    if not isinstance(groups_claim, str) or len(groups_claim) > MAX_TEXT or not groups_claim.isprintable() or any(
        char.isspace() for char in groups_claim
    ):
        return ["Use a claim name, or a dotted path such as realm_access.roles."]
    return []


def tool_policy_problems(tool_policy) -> list[str]:
    if tool_policy in (None, ""):
        return []
    example = '[{"tools": ["admin_*"], "groups": ["admins"]}]'
    if not isinstance(tool_policy, list) or len(tool_policy) > MAX_ENTRIES:
        return [f"Use a list of rules such as {example}."]
    problems = []
    for index, rule in enumerate(tool_policy, start=1):
        if not isinstance(rule, dict) or set(rule) - {"tools", "groups"} or "tools" not in rule:
            problems.append(f'Rule {index}: use an object with "tools" and "groups", e.g. {example}.')
            continue
        for key in ("tools", "groups"):
            if problem := _str_list_problem(rule.get(key, []), what=f"Rule {index}: {key}"):
                problems.append(problem)
        if not rule.get("tools"):
            problems.append(f"Rule {index}: name at least one tool (a glob such as admin_*).")
    return problems
