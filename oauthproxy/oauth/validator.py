"""The oauthlib request validator, bound to one MCP server per request."""

from oauth2_provider.oauth2_validators import OAuth2Validator


class ProxyOAuth2Validator(OAuth2Validator):
    pass
