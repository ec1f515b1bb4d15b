"""Benchmarks of the MCP OAuth proxy against calling the internal server directly and against FastMCP's
OAuthProxy. Not timed tests: `python -m bench --help`, results in docs/PERFORMANCE.md."""
