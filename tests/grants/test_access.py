"""The access and tool policy rules (grants/access.py): the one place every check goes through."""

import pytest

from oauthproxy.grants.access import (
    UserClaims,
    access_decide,
    access_policy_problems,
    groups_claim_problems,
    tool_decide,
    tool_policy_problems,
    user_claims_from,
)

POLICY = {
    "emails": ["Boss@Example.com"],
    "email_domains": ["sales.example.com"],
    "subjects": ["svc-42"],
    "groups": ["crm-users"],
}


@pytest.mark.parametrize("user, allowed", [
    (UserClaims(subject="x", email="boss@example.com"), True),  # emails match case-insensitively
    (UserClaims(subject="x", email="ann@sales.example.com"), True),
    (UserClaims(subject="x", email="ann@evil-sales.example.com"), False),  # a domain, not a suffix
    (UserClaims(subject="x", email="ann@example.com"), False),
    (UserClaims(subject="svc-42"), True),
    (UserClaims(subject="x", groups=("other", "crm-users")), True),
    (UserClaims(subject="x", groups=("crm-users-old",)), False),
    (UserClaims(subject=""), False),
])
def test_access_admits_any_matching_entry(user, allowed):
    assert access_decide(access=POLICY, user=user).allowed is allowed


@pytest.mark.parametrize("access", [None, {}, {"groups": []}, {"emails": [], "subjects": []}])
def test_no_access_policy_admits_everyone(access):
    assert access_decide(access=access, user=UserClaims(subject="anyone")).allowed


def test_an_unverified_email_never_matches():
    claims = {"sub": "u1", "email": "boss@example.com", "email_verified": False}
    user = user_claims_from(subject="u1", claims=claims)
    assert user.email == ""
    assert not access_decide(access=POLICY, user=user).allowed


@pytest.mark.parametrize("claims, path, groups", [
    ({"groups": ["a", "b"]}, "", ("a", "b")),
    ({"groups": "a"}, "groups", ("a",)),
    ({"realm_access": {"roles": ["admins", "users"]}}, "realm_access.roles", ("admins", "users")),
    ({"https://example.com/groups": ["x"]}, "https://example.com/groups", ("x",)),  # dots in the name
    ({"realm_access": "oops"}, "realm_access.roles", ()),
    ({"groups": {"not": "a list"}}, "groups", ()),
    ({"groups": ["a", None, {"x": 1}, "a"]}, "groups", ("a",)),
])
def test_groups_come_from_the_configured_claim(claims, path, groups):
    assert user_claims_from(subject="s", claims=claims, groups_claim=path).groups == groups


RULES = [{"tools": ["admin_*"], "groups": ["admins"]}, {"tools": ["delete_*", "admin_purge"], "groups": ["owners"]}]


@pytest.mark.parametrize("tool, groups, allowed", [
    ("echo", (), True),  # no rule: open to every admitted user
    ("admin_reset", (), False),
    ("admin_reset", ("admins",), True),
    ("admin_purge", ("owners",), True),  # any matching rule's groups
    ("admin_purge", ("admins",), True),
    ("delete_account", ("admins",), False),
    ("Admin_reset", (), True),  # globs are case-sensitive like tool names
])
def test_tool_rules(tool, groups, allowed):
    assert tool_decide(tool_policy=RULES, tool=tool, user=UserClaims(subject="s", groups=groups)).allowed is allowed


def test_a_refusal_names_the_tool_and_the_groups():
    decision = tool_decide(tool_policy=RULES, tool="admin_reset", user=UserClaims(subject="s"))
    assert decision.reason == "The tool admin_reset is only for members of: admins."


@pytest.mark.parametrize("value", [
    [], "groups", {"group": ["x"]}, {"groups": "x"}, {"groups": [1]}, {"groups": [""]},
    {"emails": ["not-an-email"]}, {"email_domains": ["@"]}, {"email_domains": ["a@b.com"]},
])
def test_bad_access_policies_are_explained(value):
    assert access_policy_problems(value)


@pytest.mark.parametrize("value", [
    {}, "groups", [{"tools": []}], [{"groups": ["a"]}], [{"tools": "admin_*"}], [{"tools": ["x"], "extra": 1}],
    [{"tools": ["x"], "groups": "admins"}],
])
def test_bad_tool_policies_are_explained(value):
    assert tool_policy_problems(value)


def test_good_policies_pass():
    assert access_policy_problems(POLICY) == []
    assert tool_policy_problems(RULES) == []
    assert groups_claim_problems("realm_access.roles") == []
    assert groups_claim_problems("has space")
